//! End-to-end forward passes of Stable Diffusion 1.5's networks on the CPU backend, with
//! seeded random weights: the UNet at a 32x32 latent (batch 2, as classifier-free guidance
//! runs it) and at 64x64 (batch 1), the VAE decoder at a 32x32 latent, and the CLIP text
//! encoder on 77 tokens; and the ControlNet step at 64x64 (batch 2): the plain UNet, the
//! ControlNet alone (its hint embedded once, outside the timing, as a generation does) and
//! the UNet with the ControlNet's residuals, each with its share of the step's work.
//!
//! ```text
//! cargo bench -p sd-benches --bench networks                 # everything
//! cargo bench -p sd-benches --bench networks -- unet32 --runs 5 --profile
//! ```
//!
//! Names: `peak`, `unet32`, `unet64`, `vae32`, `clip`, `control64`, and, only when named,
//! SDXL's UNet (`xl64`: 64x64 latents, batch 1; `xl128`: 128x128, batch 2, a 1024x1024
//! step with guidance; with `--dtype bf16 --runs 1` it fits a 24 GiB machine). For each network it prints the median
//! wall time of `--runs` forward passes (after one warm-up pass), the work (counted by
//! [`sd_benches::Profiled`] from the shapes of every product), the rate, its fraction of this
//! machine's measured f32 GEMM peak (a 2048^3 product through the backend, measured in the
//! same run), the average number of busy cores, and the peak resident memory of a process
//! that ran only that network (each network runs in a child process of its own). `--profile`
//! adds the time per operation in the timed passes, `--shapes` the products that took
//! longest per operand shapes. `--bf16` multiplies in bf16 (AVX512-BF16); `--dtype f16` or
//! `bf16` hands the networks half-precision weights.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use sd_benches::{Profiled, cpu_time, data, median, minor_faults, peak_rss};
use sd_models::CpuBackend;
use sd_models::backend::{DType, DataOps, MatmulOps};
use sd_models::clip::{ClipTextConfig, ClipTextModel};
use sd_models::controlnet::{ControlInput, ControlNetConfig, ControlNetModel, ControlScale};
use sd_models::nn::RandomWeights;
use sd_models::unet::{Unet2DConditionConfig, Unet2DConditionModel, UnetConditioning};
use sd_models::vae::{AutoencoderKl, AutoencoderKlConfig};

const NAMES: [&str; 6] = ["peak", "unet32", "unet64", "vae32", "clip", "control64"];
/// SDXL's UNet (minutes per pass, 5-10 GB of weights): only when named.
const XL_NAMES: [&str; 2] = ["xl64", "xl128"];

struct Options {
    names: Vec<String>,
    runs: usize,
    profile: bool,
    shapes: bool,
    dtype: DType,
    child: bool,
    peak_gflops: Option<f64>,
    bf16: bool,
}

fn options() -> Options {
    let mut o = Options {
        names: Vec::new(),
        runs: 3,
        profile: false,
        shapes: false,
        dtype: DType::F32,
        child: false,
        peak_gflops: None,
        bf16: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => o.runs = args.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--profile" => o.profile = true,
            "--shapes" => o.shapes = true,
            "--dtype" => {
                o.dtype = sd_benches::parse_dtype(args.next().as_deref()).unwrap();
            }
            "--child" => o.child = true,
            "--bf16" => o.bf16 = true,
            "--peak" => {
                o.peak_gflops = args.next().and_then(|v| v.parse().ok());
            }
            // cargo bench passes --bench; criterion-style filters are plain names.
            "--bench" => {}
            name if NAMES.contains(&name) || XL_NAMES.contains(&name) => {
                o.names.push(name.to_string());
            }
            other => panic!("unknown argument {other:?}; names are {NAMES:?} and {XL_NAMES:?}"),
        }
    }
    if o.names.is_empty() {
        o.names = NAMES.iter().map(|s| s.to_string()).collect();
    }
    o
}

/// The median GFLOP/s of a 2048^3 f32 product through the backend.
fn gemm_peak(cpu: &CpuBackend) -> f64 {
    let n = 2048;
    let a = cpu.upload(&data(n * n, 0.1), &[n, n]).unwrap();
    let b = cpu.upload(&data(n * n, 0.2), &[n, n]).unwrap();
    cpu.matmul(&a, &b).unwrap();
    let mut times: Vec<Duration> = (0..7)
        .map(|_| {
            let t0 = Instant::now();
            std::hint::black_box(cpu.matmul(&a, &b).unwrap());
            t0.elapsed()
        })
        .collect();
    2.0 * (n * n * n) as f64 / median(&mut times).as_secs_f64() / 1e9
}

/// Runs `forward` once to warm up and count, then `runs` times; prints the line.
fn measure(
    name: &str,
    what: &str,
    o: &Options,
    backend: &Profiled<CpuBackend>,
    mut forward: impl FnMut(),
) {
    backend.reset();
    forward();
    let flops = backend.total_flops() as f64;
    // The profile covers the timed passes, not the warm-up (first touches of memory).
    backend.reset();
    let cpu0 = cpu_time();
    let faults0 = minor_faults();
    let wall0 = Instant::now();
    let mut times: Vec<Duration> = (0..o.runs)
        .map(|_| {
            let t0 = Instant::now();
            forward();
            t0.elapsed()
        })
        .collect();
    let wall = wall0.elapsed();
    let busy = match (cpu0, cpu_time()) {
        (Some(a), Some(b)) => (b - a).as_secs_f64() / wall.as_secs_f64(),
        _ => f64::NAN,
    };
    let faults = match (faults0, minor_faults()) {
        (Some(a), Some(b)) => (b - a) as f64 / o.runs.max(1) as f64,
        _ => f64::NAN,
    };
    let t = median(&mut times).as_secs_f64();
    let gflops = flops / t / 1e9;
    let peak = o.peak_gflops.unwrap_or(f64::NAN);
    let rss = peak_rss().map_or(f64::NAN, |b| b as f64 / (1 << 30) as f64);
    println!(
        "{name:<7} {what:<34} {:>9.1} ms {:>7.1} GFLOP {:>6.1} GFLOP/s {:>5.1}% of peak  {busy:.2} cores busy  {faults:.0} page faults/run ({:.0} MiB)  peak RSS {rss:.2} GiB",
        t * 1e3,
        flops / 1e9,
        gflops,
        100.0 * gflops / peak,
        faults * 4096.0 / (1 << 20) as f64
    );
    if o.profile {
        let rows: Vec<_> = backend.stats().into_iter().collect();
        print_profile(rows, o.runs, usize::MAX);
    }
    if o.shapes {
        println!("          the {SHAPE_ROWS} products that took longest, by operand shapes:");
        print_profile(
            backend.shape_stats().into_iter().collect(),
            o.runs,
            SHAPE_ROWS,
        );
    }
}

/// Rows of `--shapes`.
const SHAPE_ROWS: usize = 30;

/// Prints the first `rows` of a profile of `runs` passes, longest first, per pass.
fn print_profile<K: std::fmt::Display>(
    mut stats: Vec<(K, sd_benches::OpStats)>,
    runs: usize,
    rows: usize,
) {
    stats.sort_by_key(|r| std::cmp::Reverse(r.1.time));
    let total: f64 = stats.iter().map(|r| r.1.time.as_secs_f64()).sum();
    let runs = runs.max(1);
    for (op, s) in stats.into_iter().take(rows) {
        let secs = s.time.as_secs_f64();
        let rate = if s.flops > 0 {
            format!("{:>6.1} GFLOP/s", s.flops as f64 / secs / 1e9)
        } else {
            String::new()
        };
        println!(
            "          {:<16} {:>5} calls {:>9.1} ms {:>5.1}%  {rate}",
            op.to_string(),
            s.calls / runs as u64,
            secs * 1e3 / runs as f64,
            100.0 * secs / total
        );
    }
}

fn run_one(name: &str, o: &Options) {
    let cpu = sd_benches::cpu_backend(o.bf16).expect("bf16 products need AVX512-BF16");
    let products = if o.bf16 { "bf16 products" } else { "f32" };
    let backend = Profiled::new(cpu, true);
    let backend = if o.shapes {
        backend.with_shapes()
    } else {
        backend
    };
    let weights = RandomWeights::new(0).with_dtype(o.dtype);
    let dt = o.dtype;
    match name {
        "peak" => {
            let g = gemm_peak(&cpu);
            println!("peak    f32 GEMM 2048^3 through the backend {g:>8.1} GFLOP/s");
        }
        "unet32" | "unet64" => {
            let (hw, batch) = if name == "unet32" { (32, 2) } else { (64, 1) };
            let config = Unet2DConditionConfig::stable_diffusion_1_5().unwrap();
            let unet = Unet2DConditionModel::from_source(&backend, &weights, config).unwrap();
            let x = backend
                .upload(&data(batch * 4 * hw * hw, 0.3), &[batch, 4, hw, hw])
                .unwrap();
            let text = backend
                .upload(&data(batch * 77 * 768, 0.4), &[batch, 77, 768])
                .unwrap();
            measure(
                name,
                &format!("SD 1.5 UNet {hw}x{hw} batch {batch} ({dt} weights, {products})"),
                o,
                &backend,
                || {
                    std::hint::black_box(unet.forward(&backend, &x, &[500.0], &text).unwrap());
                },
            );
        }
        "xl64" | "xl128" => {
            // 64x64 latents, batch 1 (a 512x512 image); 128x128, batch 2 (a 1024x1024 image
            // with guidance).
            let (hw, batch) = if name == "xl64" { (64, 1) } else { (128, 2) };
            let config = Unet2DConditionConfig::stable_diffusion_xl().unwrap();
            let unet = Unet2DConditionModel::from_source(&backend, &weights, config).unwrap();
            let x = backend
                .upload(&data(batch * 4 * hw * hw, 0.3), &[batch, 4, hw, hw])
                .unwrap();
            let text = backend
                .upload(&data(batch * 77 * 2048, 0.4), &[batch, 77, 2048])
                .unwrap();
            let pooled = backend
                .upload(&data(batch * 1280, 0.7), &[batch, 1280])
                .unwrap();
            let side = (8 * hw) as f64;
            let ids: Vec<f64> = (0..batch)
                .flat_map(|_| [side, side, 0.0, 0.0, side, side])
                .collect();
            let extra = UnetConditioning {
                text_embeds: Some(&pooled),
                time_ids: Some(&ids),
                ..UnetConditioning::default()
            };
            measure(
                name,
                &format!("SDXL UNet {hw}x{hw} batch {batch} ({dt} weights, {products})"),
                o,
                &backend,
                || {
                    std::hint::black_box(
                        unet.forward_with(&backend, &x, &[500.0], &text, &extra)
                            .unwrap(),
                    );
                },
            );
        }
        "control64" => {
            let (hw, batch) = (64, 2);
            let config = Unet2DConditionConfig::stable_diffusion_1_5().unwrap();
            let control_config = ControlNetConfig::for_unet(&config);
            let unet = Unet2DConditionModel::from_source(&backend, &weights, config).unwrap();
            let controlnet = ControlNetModel::from_source(
                &backend,
                &RandomWeights::new(1).with_dtype(o.dtype),
                control_config,
            )
            .unwrap();
            let x = backend
                .upload(&data(batch * 4 * hw * hw, 0.3), &[batch, 4, hw, hw])
                .unwrap();
            let text = backend
                .upload(&data(batch * 77 * 768, 0.4), &[batch, 77, 768])
                .unwrap();
            let side = 8 * hw;
            let image = backend
                .upload(&data(3 * side * side, 0.6), &[1, 3, side, side])
                .unwrap();
            let hint = controlnet.embed_hint(&backend, &image).unwrap();
            let control = ControlInput::new(&hint, ControlScale::default());
            let what = |part: &str| {
                format!("SD 1.5 {part} {hw}x{hw} batch {batch} ({dt} weights, {products})")
            };
            measure("unet64b2", &what("UNet"), o, &backend, || {
                std::hint::black_box(unet.forward(&backend, &x, &[500.0], &text).unwrap());
            });
            measure("cnet64", &what("ControlNet"), o, &backend, || {
                std::hint::black_box(
                    controlnet
                        .forward(&backend, &x, &[500.0], &text, &control)
                        .unwrap(),
                );
            });
            measure(name, &what("UNet + ControlNet"), o, &backend, || {
                let r = controlnet
                    .forward(&backend, &x, &[500.0], &text, &control)
                    .unwrap();
                let extra = UnetConditioning {
                    down_residuals: Some(&r.down),
                    mid_residual: Some(&r.mid),
                    ..UnetConditioning::default()
                };
                std::hint::black_box(
                    unet.forward_with(&backend, &x, &[500.0], &text, &extra)
                        .unwrap(),
                );
            });
        }
        "vae32" => {
            let config = AutoencoderKlConfig::stable_diffusion_1_5().unwrap();
            let vae = AutoencoderKl::from_source(&backend, &weights, config).unwrap();
            let z = backend
                .upload(&data(4 * 32 * 32, 0.5), &[1, 4, 32, 32])
                .unwrap();
            measure(
                name,
                &format!("SD 1.5 VAE decoder 32x32 -> 256x256 ({products})"),
                o,
                &backend,
                || {
                    std::hint::black_box(vae.decode(&backend, &z).unwrap());
                },
            );
        }
        "clip" => {
            let config = ClipTextConfig::stable_diffusion_1_5().unwrap();
            let clip = ClipTextModel::random(&backend, &weights, config, false).unwrap();
            let mut ids: Vec<u32> = vec![49406];
            ids.extend((0..20).map(|i| 320 + i * 37));
            ids.resize(77, 49407);
            measure(
                name,
                &format!("SD 1.5 CLIP text encoder, 77 tokens ({products})"),
                o,
                &backend,
                || {
                    std::hint::black_box(clip.forward(&backend, &[ids.clone()]).unwrap());
                },
            );
        }
        other => panic!("unknown network {other}"),
    }
}

fn main() {
    let o = options();
    if o.child {
        for name in &o.names {
            run_one(name, &o);
        }
        return;
    }
    // The peak first, in this process; then each network in a fresh process, so that each
    // peak RSS is that network's own.
    let threads = rayon::current_num_threads();
    let (fma, dp) = sd_benches::fma_peak(threads);
    let show = |v: Option<f64>| v.map_or("n/a".to_string(), |g| format!("{g:.1} GFLOP/s"));
    println!(
        "peak    AVX-512 f32 FMA loop {}, AVX512-BF16 dot-product loop {} ({threads} threads)",
        show(fma),
        show(dp)
    );
    let peak = gemm_peak(&CpuBackend::new());
    println!("peak    f32 GEMM 2048^3 through the backend {peak:>8.1} GFLOP/s ({threads} threads)");
    let exe = std::env::current_exe().unwrap();
    for name in o.names.iter().filter(|n| *n != "peak") {
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("--child")
            .arg(name)
            .args(["--runs", &o.runs.to_string()])
            .args(["--peak", &peak.to_string()])
            .args(["--dtype", &o.dtype.name().to_lowercase()]);
        if o.shapes {
            cmd.arg("--shapes");
        }
        if o.profile {
            cmd.arg("--profile");
        }
        if o.bf16 {
            cmd.arg("--bf16");
        }
        let status = cmd.status().unwrap();
        assert!(status.success(), "{name} failed");
    }
}

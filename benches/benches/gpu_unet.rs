//! Stable Diffusion 1.5's UNet step on the CUDA backend (seeded random weights, a 64x64
//! latent, batch 2 as classifier-free guidance runs it, f16 by default), against PyTorch eager
//! through diffusers on the same machine in the same run.
//!
//! ```text
//! cargo bench -p sd-benches --bench gpu_unet -- [--dtype f16|bf16|f32] [--size 64]
//!     [--batch 2] [--runs 20] [--pytorch PYTHON]
//! ```
//!
//! It prints the device, a large cuBLAS GEMM in the same dtype through the backend (the
//! card's practical tensor-core peak, measured in this run), then the UNet step: the median
//! of `--runs` timed steps after three warm-up steps, the work (counted from the shapes of
//! every product by [`sd_benches::Profiled`] on one extra step), TFLOP/s and the fraction of
//! the GEMM peak, and the device allocations the timed steps made (none is the goal: the pool
//! serves a repeated step from its cache). With `--pytorch PYTHON` it then runs
//! `tools/bench/unet_step_torch.py` with that interpreter on the same shapes and dtype
//! (diffusers' default attention processor, `scaled_dot_product_attention`; cuDNN
//! convolutions) and prints both times and their ratio.
//!
//! `--cpu --dtype f32` runs the same steps on the CPU backend instead (f32 products; for a
//! small `--size`, to try the bench on a machine without a GPU). The exit status is a failure
//! if the PyTorch side was asked for and failed. A binary built elsewhere
//! (`cargo bench -p sd-benches --bench gpu_unet --no-run`) runs with no Rust toolchain; run it
//! from the repository root there so that it finds the PyTorch script.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use sd_benches::{Profiled, data, median};
use sd_cuda::{CudaBackend, CudaOptions};
use sd_models::backend::{Backend, DType, DataOps};
use sd_models::nn::RandomWeights;
use sd_models::unet::{Unet2DConditionConfig, Unet2DConditionModel};

struct Options {
    dtype: DType,
    size: usize,
    batch: usize,
    runs: usize,
    pytorch: Option<String>,
    cpu: bool,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        dtype: DType::F16,
        size: 64,
        batch: 2,
        runs: 20,
        pytorch: None,
        cpu: false,
    };
    let mut args = std::env::args().skip(1);
    let number = |v: Option<String>, what: &str| -> Result<usize, String> {
        v.as_deref()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{what} takes a positive number"))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dtype" => o.dtype = sd_benches::parse_dtype(args.next().as_deref())?,
            "--size" => o.size = number(args.next(), "--size")?,
            "--batch" => o.batch = number(args.next(), "--batch")?,
            "--runs" => o.runs = number(args.next(), "--runs")?,
            "--pytorch" => o.pytorch = Some(args.next().ok_or("--pytorch PYTHON")?),
            "--cpu" => o.cpu = true,
            // cargo bench passes --bench.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.cpu && o.dtype != DType::F32 {
        return Err("--cpu runs f32 products: give --dtype f32 (the default is f16)".into());
    }
    if !o.size.is_multiple_of(8) {
        return Err(format!("--size {}: the UNet needs a multiple of 8", o.size));
    }
    Ok(o)
}

/// Seconds per call of `f` (median of `runs` after `warm` calls), each call synchronised.
fn time<B: Backend>(
    backend: &B,
    sync: &dyn Fn(&B),
    warm: usize,
    runs: usize,
    mut f: impl FnMut(),
) -> f64 {
    for _ in 0..warm {
        f();
    }
    sync(backend);
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t0 = Instant::now();
            f();
            sync(backend);
            t0.elapsed()
        })
        .collect();
    median(&mut times).as_secs_f64()
}

/// The `n^3` product in `dtype` through the backend, in FLOP/s.
fn gemm_peak<B: Backend>(backend: &B, sync: &dyn Fn(&B), n: usize, dtype: DType) -> f64 {
    let a = backend.upload(&data(n * n, 0.1), &[n, n]).unwrap();
    let b = backend.upload(&data(n * n, 0.2), &[n, n]).unwrap();
    let (a, b) = (
        backend.cast(&a, dtype).unwrap(),
        backend.cast(&b, dtype).unwrap(),
    );
    let s = time(backend, sync, 3, 10, || {
        drop(backend.matmul(&a, &b).unwrap());
    });
    2.0 * (n as f64).powi(3) / s
}

/// The UNet step: seconds, FLOP, and the device allocations the timed steps made.
fn unet_step<B: Backend>(
    backend: &B,
    sync: &dyn Fn(&B),
    o: &Options,
    allocations: &dyn Fn() -> u64,
) -> (f64, f64, u64) {
    let counting = Profiled::new(backend.clone(), true);
    let timing = Profiled::new(backend.clone(), false);
    let config = Unet2DConditionConfig::stable_diffusion_1_5().unwrap();
    let weights = RandomWeights::new(0).with_dtype(o.dtype);
    let t0 = Instant::now();
    let unet = Unet2DConditionModel::from_source(&timing, &weights, config).unwrap();
    sync(backend);
    println!(
        "SD 1.5 UNet with random {} weights built in {:.1} s",
        o.dtype,
        t0.elapsed().as_secs_f64()
    );
    let (b, s) = (o.batch, o.size);
    let x = timing
        .upload(&data(b * 4 * s * s, 0.3), &[b, 4, s, s])
        .unwrap();
    let text = timing
        .upload(&data(b * 77 * 768, 0.4), &[b, 77, 768])
        .unwrap();
    drop(unet.forward(&counting, &x, &[500.0], &text).unwrap());
    let flops = counting.total_flops() as f64;
    let step = || drop(unet.forward(&timing, &x, &[500.0], &text).unwrap());
    for _ in 0..3 {
        step();
    }
    sync(backend);
    let before = allocations();
    let secs = time(backend, sync, 0, o.runs, step);
    (secs, flops, allocations() - before)
}

/// Runs the PyTorch side; its time per step in seconds.
fn pytorch(python: &str, o: &Options) -> Result<f64, String> {
    let dtype = match o.dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    };
    let device = if o.cpu { "cpu" } else { "cuda" };
    // Where it was at build time, else relative to the working directory (a binary copied
    // to a GPU machine, run from the repository root there).
    let built = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tools/bench/unet_step_torch.py"
    );
    let script = if std::path::Path::new(built).is_file() {
        built
    } else {
        "tools/bench/unet_step_torch.py"
    };
    let out = Command::new(python)
        .arg(script)
        .args(["--device", device, "--dtype", dtype])
        .args([
            "--size",
            &o.size.to_string(),
            "--batch",
            &o.batch.to_string(),
        ])
        .args(["--runs", &o.runs.to_string()])
        .output()
        .map_err(|e| format!("{python}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    if !out.status.success() {
        return Err(format!(
            "the PyTorch side failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT ms="))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|ms| ms / 1e3)
        .ok_or_else(|| "the PyTorch side printed no RESULT line".to_string())
}

/// Prints the lines; `false` if the PyTorch side was asked for and failed.
fn report<B: Backend>(
    backend: &B,
    sync: &dyn Fn(&B),
    o: &Options,
    allocations: &dyn Fn() -> u64,
) -> bool {
    let n = if o.cpu { 1024 } else { 8192 };
    let peak = gemm_peak(backend, sync, n, o.dtype);
    println!(
        "GEMM {n}^3 {} through the backend: {:.2} TFLOP/s (the peak below)",
        o.dtype,
        peak / 1e12
    );
    let (secs, flops, made) = unet_step(backend, sync, o, allocations);
    println!(
        "ours    SD 1.5 UNet step {s}x{s} batch {b} {dt}: {:>8.2} ms  {:.2} TFLOP  {:.1} TFLOP/s  {:.0}% of the GEMM  ({made} device allocations in the {runs} timed steps)",
        secs * 1e3,
        flops / 1e12,
        flops / secs / 1e12,
        100.0 * flops / secs / peak,
        s = o.size,
        b = o.batch,
        dt = o.dtype,
        runs = o.runs,
    );
    if let Some(python) = &o.pytorch {
        match pytorch(python, o) {
            Ok(theirs) => println!(
                "ratio   PyTorch / ours = {:.2} (above 1: ours is faster)",
                theirs / secs
            ),
            Err(e) => {
                println!("PyTorch: {e}");
                return false;
            }
        }
    }
    true
}

fn main() -> ExitCode {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("gpu_unet: {e}");
            return ExitCode::FAILURE;
        }
    };
    if o.cpu {
        let cpu = sd_models::CpuBackend::new();
        println!(
            "CPU backend ({} threads), f32 products",
            rayon::current_num_threads()
        );
        return exit(report(&cpu, &|_| {}, &o, &|| 0));
    }
    let g = match CudaBackend::with_options(CudaOptions::new(0).with_upload_dtype(o.dtype)) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("gpu_unet needs a CUDA GPU (or --cpu): {e}");
            return ExitCode::FAILURE;
        }
    };
    let t0 = Instant::now();
    g.warm_up().unwrap();
    println!(
        "{} ({}, {} SMs): kernels compiled and loaded in {:.1} s",
        g.device_name(),
        g.arch(),
        g.sm_count(),
        t0.elapsed().as_secs_f64()
    );
    let sync = |g: &CudaBackend| g.synchronize().unwrap();
    exit(report(&g, &sync, &o, &|| g.pool_stats().device_allocations))
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

//! GPU tests: the backend conformance suite and every kernel at Stable Diffusion's shapes,
//! against the CPU backend, in f32, f16 and bf16. They need a CUDA GPU (sm_80 or newer) with
//! its driver, NVRTC and cuBLAS, so they are ignored by default:
//!
//! ```text
//! cargo test -p sd-cuda --release -- --ignored            # with a toolchain
//! cargo test -p sd-cuda --release --no-run                # or build here, then on the GPU:
//! target/release/deps/gpu-<hash> --ignored --test-threads 1
//! ```
//!
//! The binary needs no Rust toolchain and no network: the kernel sources are inside it, and
//! NVRTC, libcuda and cuBLAS come from the machine's CUDA install (on LD_LIBRARY_PATH or the
//! loader's path). `SD_CUDA_SEED` fixes the random inputs (the seed is printed otherwise).
//! Tolerances are relative L2 errors: 1e-4 in f32, 1e-2 in f16 and bf16 (inputs are rounded to
//! the storage type first, so the error measured is the kernels'), except the conformance
//! suite's softmax check in bf16 (see `conformance_in`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use sd_cuda::{CudaBackend, CudaOptions, CudaTensor};
use sd_models::CpuBackend;
use sd_models::backend::{
    ActivationOps, AttentionMask, AttentionOps, Conv2dParams, ConvOps, DType, DataOps,
    ElementwiseOps, MatmulOps, NormOps, ResampleOps, conformance,
};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn gpu_with(dtype: DType) -> CudaBackend {
    let b = match CudaBackend::with_options(CudaOptions::new(0).with_upload_dtype(dtype)) {
        Ok(b) => b,
        Err(e) => panic!("these tests need a CUDA GPU: {e}"),
    };
    // Compile every kernel once per process on all cores, not one at a time on first use.
    static WARM: std::sync::Once = std::sync::Once::new();
    WARM.call_once(|| b.warm_up().expect("the kernels compile and load"));
    b
}

fn gpu() -> CudaBackend {
    gpu_with(DType::F32)
}

fn seed() -> u64 {
    let s = std::env::var("SD_CUDA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(7, |d| d.as_nanos() as u64)
        });
    eprintln!("SD_CUDA_SEED={s}");
    s
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F32 { 1e-4 } else { 1e-2 }
}

fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal) * scale)
        .collect()
}

/// The values as the storage type holds them.
fn rounded(dtype: DType, v: &[f32]) -> Vec<f32> {
    match dtype {
        DType::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
        DType::BF16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        _ => v.to_vec(),
    }
}

/// The same data on both backends: the GPU copy in `dtype`, the CPU copy of the rounded
/// values in f32.
struct Pair {
    gpu: CudaTensor,
    cpu: sd_models::CpuTensor,
}

fn pair(g: &CudaBackend, c: &CpuBackend, dtype: DType, data: &[f32], shape: &[usize]) -> Pair {
    let gpu = g.cast(&g.upload(data, shape).unwrap(), dtype).unwrap();
    let cpu = c.upload(&rounded(dtype, data), shape).unwrap();
    Pair { gpu, cpu }
}

fn compare(
    name: &str,
    g: &CudaBackend,
    c: &CpuBackend,
    got: &CudaTensor,
    want: &sd_models::CpuTensor,
    tol: f64,
) {
    assert_eq!(
        got.shape(),
        sd_models::backend::BackendBase::shape(c, want),
        "{name}: shape"
    );
    let got = g.download(got).unwrap();
    let want = c.download(want).unwrap();
    let err = conformance::rel_l2(&got, &want);
    eprintln!("{name}: relative L2 error {err:.2e} (tolerance {tol:.0e})");
    assert!(
        !err.is_nan() && err <= tol,
        "{name}: relative L2 error {err:e} > {tol:e}"
    );
}

// ------------------------------------------------------------------------------------------
// The conformance suite.
// ------------------------------------------------------------------------------------------

/// The suite's relative error of a failure ("relative L2 error 1.2e-2 > 1e-2").
fn reported_error(f: &conformance::Failure) -> Option<f64> {
    let rest = f.message.strip_prefix("relative L2 error ")?;
    rest.split_whitespace().next()?.parse().ok()
}

fn conformance_in(dtype: DType) {
    let b = gpu_with(dtype);
    for s in [42, seed()] {
        let failures = conformance::run(&b, tol(dtype), s);
        // bf16 keeps 8 bits of mantissa: the suite's softmax check rounds its inputs after
        // scaling them by 3 (|x| up to ~10), which alone moves the exact softmax by up to
        // 1.9% (median 0.7%, above 1% for 16% of seeds, in a simulation of perfectly rounded
        // bf16 over 1000 seeds). That check gets 2.5e-2 in bf16; every other one keeps 1e-2.
        let unexpected: Vec<_> = failures
            .iter()
            .filter(|f| {
                !(dtype == DType::BF16
                    && f.check == "softmax"
                    && reported_error(f).is_some_and(|e| e <= 2.5e-2))
            })
            .collect();
        if unexpected.len() < failures.len() {
            eprintln!("{dtype} seed {s}: within bf16's rounding: {failures:?}");
        }
        assert!(unexpected.is_empty(), "{dtype} seed {s}: {unexpected:#?}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn conformance_f32() {
    conformance_in(DType::F32);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn conformance_f16() {
    conformance_in(DType::F16);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn conformance_bf16() {
    conformance_in(DType::BF16);
}

// ------------------------------------------------------------------------------------------
// Kernels at SD shapes.
// ------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_at_sd_shapes() {
    let (g, c) = (gpu(), CpuBackend::new());
    let mut rng = StdRng::seed_from_u64(seed());
    // (batch, heads, queries, keys, head size): self-attention over a 64x64 latent and
    // cross-attention to 77 text tokens, for each SD head size.
    for d in [40, 64, 80, 160] {
        for lk in [4096, 77] {
            let (b, h, lq) = (1, 2, 4096);
            let q = randn(&mut rng, b * h * lq * d, 1.0);
            let k = randn(&mut rng, b * h * lk * d, 1.0);
            let v = randn(&mut rng, b * h * lk * d, 1.0);
            let mask = randn(&mut rng, lk, 1.0);
            for dtype in DTYPES {
                let q = pair(&g, &c, dtype, &q, &[b, h, lq, d]);
                let k = pair(&g, &c, dtype, &k, &[b, h, lk, d]);
                let v = pair(&g, &c, dtype, &v, &[b, h, lk, d]);
                let scale = 1.0 / (d as f32).sqrt();
                let t0 = Instant::now();
                let got = g
                    .attention(&q.gpu, &k.gpu, &v.gpu, AttentionMask::None, scale)
                    .unwrap();
                g.synchronize().unwrap();
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                let want = c
                    .attention(&q.cpu, &k.cpu, &v.cpu, AttentionMask::None, scale)
                    .unwrap();
                let name = format!("attention {dtype} {lq}x{lk} d{d} ({ms:.1} ms with compile)");
                compare(&name, &g, &c, &got, &want, tol(dtype));
                if lk == 77 {
                    // A key-padding mask broadcast over heads and queries.
                    let m = pair(&g, &c, DType::F32, &mask, &[1, 1, 1, lk]);
                    let got = g
                        .attention(
                            &q.gpu,
                            &k.gpu,
                            &v.gpu,
                            AttentionMask::Additive(&m.gpu),
                            scale,
                        )
                        .unwrap();
                    let want = c
                        .attention(
                            &q.cpu,
                            &k.cpu,
                            &v.cpu,
                            AttentionMask::Additive(&m.cpu),
                            scale,
                        )
                        .unwrap();
                    compare(
                        &format!("attention {dtype} {lq}x{lk} d{d} + mask"),
                        &g,
                        &c,
                        &got,
                        &want,
                        tol(dtype),
                    );
                }
            }
        }
    }
    // CLIP's causal self-attention: 77 tokens, 12 heads of 64.
    let (b, h, l, d) = (2, 12, 77, 64);
    let q = randn(&mut rng, b * h * l * d, 1.0);
    for dtype in DTYPES {
        let q = pair(&g, &c, dtype, &q, &[b, h, l, d]);
        let got = g
            .attention(&q.gpu, &q.gpu, &q.gpu, AttentionMask::Causal, 0.125)
            .unwrap();
        let want = c
            .attention(&q.cpu, &q.cpu, &q.cpu, AttentionMask::Causal, 0.125)
            .unwrap();
        compare(
            &format!("attention {dtype} causal 77 d64"),
            &g,
            &c,
            &got,
            &want,
            tol(dtype),
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn conv_at_sd_shapes() {
    let (g, c) = (gpu(), CpuBackend::new());
    let mut rng = StdRng::seed_from_u64(seed());
    // (channels in, size, channels out, kernel, stride, padding)
    let cases = [
        (320, 64, 320, 3, 1, 1),
        (640, 32, 640, 3, 1, 1),
        (1280, 16, 1280, 3, 1, 1),
        (1280, 8, 1280, 3, 1, 1),
        (320, 64, 320, 3, 2, 1),
        (640, 32, 640, 3, 2, 1),
        (1280, 16, 1280, 3, 2, 1),
        (4, 64, 320, 3, 1, 1),
        (320, 64, 4, 3, 1, 1),
        (320, 32, 640, 1, 1, 0),
        (640, 16, 1280, 1, 1, 0),
    ];
    for (ci, size, co, k, s, p) in cases {
        let x = randn(&mut rng, ci * size * size, 1.0);
        let w = randn(
            &mut rng,
            co * ci * k * k,
            1.0 / ((ci * k * k) as f32).sqrt(),
        );
        let bias = randn(&mut rng, co, 1.0);
        for dtype in DTYPES {
            let x = pair(&g, &c, dtype, &x, &[1, ci, size, size]);
            let w = pair(&g, &c, dtype, &w, &[co, ci, k, k]);
            let bias = pair(&g, &c, dtype, &bias, &[co]);
            let params = Conv2dParams::new(s, p);
            let got = g.conv2d(&x.gpu, &w.gpu, Some(&bias.gpu), params).unwrap();
            let want = c.conv2d(&x.cpu, &w.cpu, Some(&bias.cpu), params).unwrap();
            let name =
                format!("conv {dtype} [1, {ci}, {size}, {size}] -> {co}, {k}x{k} stride {s}");
            compare(&name, &g, &c, &got, &want, tol(dtype));
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn norms_and_activations_at_sd_shapes() {
    let (g, c) = (gpu(), CpuBackend::new());
    let mut rng = StdRng::seed_from_u64(seed());
    for (ch, size) in [(320, 64), (640, 32), (1280, 16), (1280, 8), (128, 256)] {
        let x = randn(&mut rng, ch * size * size, 2.0);
        let x: Vec<f32> = x.iter().map(|v| v + 1.5).collect();
        let gamma = randn(&mut rng, ch, 1.0);
        let beta = randn(&mut rng, ch, 1.0);
        for dtype in DTYPES {
            let x = pair(&g, &c, dtype, &x, &[1, ch, size, size]);
            let gm = pair(&g, &c, dtype, &gamma, &[ch]);
            let bt = pair(&g, &c, dtype, &beta, &[ch]);
            let got = g
                .group_norm_silu(&x.gpu, 32, &gm.gpu, &bt.gpu, 1e-5)
                .unwrap();
            let want = c
                .group_norm_silu(&x.cpu, 32, &gm.cpu, &bt.cpu, 1e-5)
                .unwrap();
            compare(
                &format!("group_norm_silu {dtype} [1, {ch}, {size}, {size}]"),
                &g,
                &c,
                &got,
                &want,
                tol(dtype),
            );
            let got = g.group_norm(&x.gpu, 32, &gm.gpu, &bt.gpu, 1e-6).unwrap();
            let want = c.group_norm(&x.cpu, 32, &gm.cpu, &bt.cpu, 1e-6).unwrap();
            compare(
                &format!("group_norm {dtype} [1, {ch}, {size}, {size}]"),
                &g,
                &c,
                &got,
                &want,
                tol(dtype),
            );
        }
    }
    for (rows, cols) in [(2 * 4096, 320), (2 * 77, 768), (2 * 256, 1280)] {
        let x = randn(&mut rng, rows * cols, 1.0);
        let gamma = randn(&mut rng, cols, 1.0);
        let beta = randn(&mut rng, cols, 1.0);
        let y = randn(&mut rng, rows * 2 * cols, 1.0);
        for dtype in DTYPES {
            let x = pair(&g, &c, dtype, &x, &[rows, cols]);
            let gm = pair(&g, &c, dtype, &gamma, &[cols]);
            let bt = pair(&g, &c, dtype, &beta, &[cols]);
            let got = g.layer_norm(&x.gpu, &gm.gpu, &bt.gpu, 1e-5).unwrap();
            let want = c.layer_norm(&x.cpu, &gm.cpu, &bt.cpu, 1e-5).unwrap();
            compare(
                &format!("layer_norm {dtype} [{rows}, {cols}]"),
                &g,
                &c,
                &got,
                &want,
                tol(dtype),
            );
            let got = g.softmax_last(&x.gpu).unwrap();
            let want = c.softmax_last(&x.cpu).unwrap();
            compare(
                &format!("softmax {dtype} [{rows}, {cols}]"),
                &g,
                &c,
                &got,
                &want,
                tol(dtype),
            );
            let y = pair(&g, &c, dtype, &y, &[rows, 2 * cols]);
            let got = g.geglu(&y.gpu).unwrap();
            let want = c.geglu(&y.cpu).unwrap();
            compare(
                &format!("geglu {dtype} [{rows}, {}]", 2 * cols),
                &g,
                &c,
                &got,
                &want,
                tol(dtype),
            );
            let got = g.silu(&x.gpu).unwrap();
            let want = c.silu(&x.cpu).unwrap();
            compare(
                &format!("silu {dtype} [{rows}, {cols}]"),
                &g,
                &c,
                &got,
                &want,
                tol(dtype),
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn matmul_and_data_movement_at_sd_shapes() {
    let (g, c) = (gpu(), CpuBackend::new());
    let mut rng = StdRng::seed_from_u64(seed());
    for (rows, inf, outf) in [
        (2 * 4096, 320, 320),
        (2 * 4096, 320, 2560),
        (2 * 77, 768, 320),
        (2 * 1024, 1280, 640),
    ] {
        let x = randn(&mut rng, rows * inf, 1.0);
        let w = randn(&mut rng, outf * inf, 1.0 / (inf as f32).sqrt());
        let bias = randn(&mut rng, outf, 1.0);
        for dtype in DTYPES {
            let x = pair(&g, &c, dtype, &x, &[rows, inf]);
            let w = pair(&g, &c, dtype, &w, &[outf, inf]);
            let bias = pair(&g, &c, dtype, &bias, &[outf]);
            let got = g.linear(&x.gpu, &w.gpu, Some(&bias.gpu)).unwrap();
            let want = c.linear(&x.cpu, &w.cpu, Some(&bias.cpu)).unwrap();
            compare(
                &format!("linear {dtype} [{rows}, {inf}] -> {outf}"),
                &g,
                &c,
                &got,
                &want,
                tol(dtype),
            );
        }
    }
    // [B, L, H, D] -> [B, H, L, D], a channel concat and a slice, and upsampling.
    let x = randn(&mut rng, 2 * 4096 * 320, 1.0);
    let y = randn(&mut rng, 2 * 320 * 32 * 32, 1.0);
    for dtype in DTYPES {
        let t = pair(&g, &c, dtype, &x, &[2, 4096, 8, 40]);
        let got = g.permute(&t.gpu, &[0, 2, 1, 3]).unwrap();
        let want = c.permute(&t.cpu, &[0, 2, 1, 3]).unwrap();
        compare(&format!("permute {dtype}"), &g, &c, &got, &want, 0.0);
        let u = pair(&g, &c, dtype, &y, &[2, 320, 32, 32]);
        let got = g.concat(&[&u.gpu, &u.gpu], 1).unwrap();
        let want = c.concat(&[&u.cpu, &u.cpu], 1).unwrap();
        compare(&format!("concat {dtype}"), &g, &c, &got, &want, 0.0);
        let got = g.slice(&u.gpu, 1, 100, 160).unwrap();
        let want = c.slice(&u.cpu, 1, 100, 160).unwrap();
        compare(&format!("slice {dtype}"), &g, &c, &got, &want, 0.0);
        let got = g.upsample_nearest2x(&u.gpu).unwrap();
        let want = c.upsample_nearest2x(&u.cpu).unwrap();
        compare(&format!("upsample {dtype}"), &g, &c, &got, &want, 0.0);
        let bias = pair(&g, &c, dtype, &y[..320], &[1, 320, 1, 1]);
        let got = g.add(&u.gpu, &bias.gpu).unwrap();
        let want = c.add(&u.cpu, &bias.cpu).unwrap();
        compare(
            &format!("add per channel {dtype}"),
            &g,
            &c,
            &got,
            &want,
            tol(dtype),
        );
    }
}

/// After a first pass, repeating the same work allocates no device memory.
#[test]
#[ignore = "needs a CUDA GPU"]
fn steady_state_does_not_allocate() {
    let g = gpu_with(DType::F16);
    let mut rng = StdRng::seed_from_u64(1);
    let x = g
        .upload(&randn(&mut rng, 2 * 320 * 32 * 32, 1.0), &[2, 320, 32, 32])
        .unwrap();
    let w = g
        .upload(&randn(&mut rng, 320 * 320 * 9, 0.02), &[320, 320, 3, 3])
        .unwrap();
    let gamma = g.upload(&[1.0; 320], &[320]).unwrap();
    let beta = g.upload(&[0.0; 320], &[320]).unwrap();
    let step = |x: &CudaTensor| -> CudaTensor {
        let h = g.group_norm_silu(x, 32, &gamma, &beta, 1e-5).unwrap();
        let h = g.conv2d(&h, &w, None, Conv2dParams::new(1, 1)).unwrap();
        let t = g.reshape(&h, &[2, 320, 1024]).unwrap();
        let t = g.permute(&t, &[0, 2, 1]).unwrap();
        let t = g.reshape(&t, &[2, 1024, 8, 40]).unwrap();
        let q = g.permute(&t, &[0, 2, 1, 3]).unwrap();
        let a = g.attention(&q, &q, &q, AttentionMask::None, 0.158).unwrap();
        let a = g.permute(&a, &[0, 2, 1, 3]).unwrap();
        let a = g.reshape(&a, &[2, 1024, 320]).unwrap();
        let a = g.permute(&a, &[0, 2, 1]).unwrap();
        let a = g.reshape(&a, &[2, 320, 32, 32]).unwrap();
        g.add(x, &a).unwrap()
    };
    let mut y = step(&x);
    y = step(&y);
    g.synchronize().unwrap();
    let before = g.pool_stats();
    for _ in 0..5 {
        y = step(&y);
    }
    g.synchronize().unwrap();
    let after = g.pool_stats();
    eprintln!("pool before {before:?}, after {after:?}");
    assert_eq!(
        before.device_allocations, after.device_allocations,
        "device allocations in the steady state"
    );
    assert!(after.reuses > before.reuses);
    assert!(g.download(&y).unwrap().iter().all(|v| v.is_finite()));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn every_kernel_loads_on_this_device() {
    // The first backend of a process compiles every kernel (`gpu_with`); a second warm-up
    // finds them loaded.
    let t0 = Instant::now();
    let g = gpu();
    g.warm_up().unwrap();
    eprintln!(
        "{} ({}, {} SMs): every kernel loaded in {:.1} s (compiling too if this test ran first)",
        g.device_name(),
        g.arch(),
        g.sm_count(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_missing_device_is_an_error() {
    let e = CudaBackend::new(4096).expect_err("device 4096");
    assert!(
        matches!(e, sd_cuda::CudaError::NoDevice { ordinal: 4096, .. }),
        "{e:?}"
    );
}

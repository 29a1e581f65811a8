//! Times the CUDA backend's kernels at Stable Diffusion 1.x/2.x shapes (batch 2, as with
//! classifier-free guidance) and reports each one's TFLOP/s against a large cuBLAS GEMM
//! measured in the same run (the device's practical tensor-core peak), and GB/s for the
//! memory-bound kernels.
//!
//! ```text
//! cargo run -p sd-cuda --release --example gpu_bench              # f16
//! cargo run -p sd-cuda --release --example gpu_bench -- bf16      # or bf16, f32
//! ```
//!
//! Built elsewhere (`cargo build -p sd-cuda --release --example gpu_bench`), the binary
//! `target/release/examples/gpu_bench` runs on a GPU machine with no Rust toolchain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::ExitCode;
use std::time::Instant;

use sd_cuda::{CudaBackend, CudaTensor};
use sd_models::backend::{
    ActivationOps, AttentionMask, AttentionOps, Conv2dParams, ConvOps, DType, DataOps, MatmulOps,
    NormOps,
};

/// Deterministic data in [-0.5, 0.5): timing does not depend on the values.
fn data(n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i.wrapping_mul(2_654_435_761) % 1000) as f32 / 1000.0 - 0.5) * scale)
        .collect()
}

fn tensor(g: &CudaBackend, dtype: DType, shape: &[usize], scale: f32) -> CudaTensor {
    let n = shape.iter().product();
    let t = g.upload(&data(n, scale), shape).unwrap();
    g.cast(&t, dtype).unwrap()
}

/// Seconds per call of `f`: three warm-up calls, then as many as fit in 0.3 s (at least 5).
fn time<T>(g: &CudaBackend, mut f: impl FnMut() -> T) -> f64 {
    for _ in 0..3 {
        drop(f());
    }
    g.synchronize().unwrap();
    let t0 = Instant::now();
    let mut n = 0u32;
    while n < 5 || t0.elapsed().as_secs_f64() < 0.3 {
        drop(f());
        n += 1;
        if n.is_multiple_of(8) {
            g.synchronize().unwrap();
        }
    }
    g.synchronize().unwrap();
    t0.elapsed().as_secs_f64() / f64::from(n)
}

struct Row {
    name: String,
    seconds: f64,
    flops: f64,
    bytes: f64,
}

fn main() -> ExitCode {
    let dtype = match std::env::args().nth(1).as_deref() {
        None | Some("f16") => DType::F16,
        Some("bf16") => DType::BF16,
        Some("f32") => DType::F32,
        Some(other) => {
            eprintln!("unknown dtype {other}: f16, bf16 or f32");
            return ExitCode::FAILURE;
        }
    };
    let g = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("gpu_bench needs a CUDA GPU: {e}");
            return ExitCode::FAILURE;
        }
    };
    let esize = dtype.size_in_bytes() as f64;
    let t0 = Instant::now();
    g.warm_up().unwrap();
    println!(
        "{} ({}, {} SMs), {dtype}: all kernels compiled and loaded in {:.1} s",
        g.device_name(),
        g.arch(),
        g.sm_count(),
        t0.elapsed().as_secs_f64()
    );

    // The reference: a large GEMM on cuBLAS.
    let n = 8192;
    let a = tensor(&g, dtype, &[n, n], 1.0);
    let b = tensor(&g, dtype, &[n, n], 1.0);
    let gemm_s = time(&g, || g.matmul(&a, &b).unwrap());
    let peak = 2.0 * (n as f64).powi(3) / gemm_s;
    drop((a, b));
    println!(
        "cuBLAS GEMM {n}^3 {dtype}: {:.1} TFLOP/s (the reference below)\n",
        peak / 1e12
    );

    let mut rows: Vec<Row> = Vec::new();

    // Convolutions: SD's UNet and VAE shapes.
    let convs = [
        (320, 64, 320, 3, 1),
        (640, 32, 640, 3, 1),
        (1280, 16, 1280, 3, 1),
        (1280, 8, 1280, 3, 1),
        (320, 64, 320, 3, 2),
        (640, 32, 640, 3, 2),
        (1280, 16, 1280, 3, 2),
        (320, 32, 640, 1, 1),
        (4, 64, 320, 3, 1),
        (512, 128, 512, 3, 1),
    ];
    for (ci, size, co, k, s) in convs {
        let batch = 2;
        let x = tensor(&g, dtype, &[batch, ci, size, size], 1.0);
        let w = tensor(&g, dtype, &[co, ci, k, k], 0.05);
        let bias = tensor(&g, dtype, &[co], 1.0);
        let p = Conv2dParams::new(s, k / 2);
        let secs = time(&g, || g.conv2d(&x, &w, Some(&bias), p).unwrap());
        let out = size / s;
        rows.push(Row {
            name: format!("conv {k}x{k}/{s} [{batch}, {ci}, {size}, {size}] -> {co}"),
            seconds: secs,
            flops: 2.0 * (batch * co * out * out * ci * k * k) as f64,
            bytes: esize
                * (batch * ci * size * size + co * ci * k * k + batch * co * out * out) as f64,
        });
    }

    // Attention: (heads, queries, keys, head size) of SD 1.x (8 heads) and 2.x (64-wide heads).
    let attn = [
        (8, 4096, 4096, 40),
        (8, 4096, 77, 40),
        (8, 1024, 1024, 80),
        (8, 256, 256, 160),
        (5, 4096, 4096, 64),
        (10, 1024, 1024, 64),
    ];
    for (h, lq, lk, d) in attn {
        let batch = 2;
        let q = tensor(&g, dtype, &[batch, h, lq, d], 1.0);
        let k = tensor(&g, dtype, &[batch, h, lk, d], 1.0);
        let v = tensor(&g, dtype, &[batch, h, lk, d], 1.0);
        let scale = 1.0 / (d as f32).sqrt();
        let secs = time(&g, || {
            g.attention(&q, &k, &v, AttentionMask::None, scale).unwrap()
        });
        rows.push(Row {
            name: format!("attention {batch}x{h} heads {lq}x{lk} d{d}"),
            seconds: secs,
            flops: 4.0 * (batch * h * lq * lk * d) as f64,
            bytes: esize * (batch * h * (2 * lq + 2 * lk) * d) as f64,
        });
    }

    // Plain GEMMs of the transformer blocks (cuBLAS).
    for (rows_, inf, outf) in [
        (2 * 4096, 320, 2560),
        (2 * 4096, 1280, 320),
        (2 * 1024, 640, 640),
    ] {
        let x = tensor(&g, dtype, &[rows_, inf], 1.0);
        let w = tensor(&g, dtype, &[outf, inf], 0.05);
        let bias = tensor(&g, dtype, &[outf], 1.0);
        let secs = time(&g, || g.linear(&x, &w, Some(&bias)).unwrap());
        rows.push(Row {
            name: format!("linear [{rows_}, {inf}] -> {outf} (cuBLAS)"),
            seconds: secs,
            flops: 2.0 * (rows_ * inf * outf) as f64,
            bytes: esize * (rows_ * inf + inf * outf + rows_ * outf) as f64,
        });
    }

    // Memory-bound kernels.
    for (ch, size) in [(320, 64), (1280, 16), (128, 256)] {
        let x = tensor(&g, dtype, &[2, ch, size, size], 1.0);
        let gm = tensor(&g, dtype, &[ch], 1.0);
        let bt = tensor(&g, dtype, &[ch], 1.0);
        let secs = time(&g, || g.group_norm_silu(&x, 32, &gm, &bt, 1e-5).unwrap());
        rows.push(Row {
            name: format!("group_norm_silu [2, {ch}, {size}, {size}]"),
            seconds: secs,
            flops: 0.0,
            bytes: esize * 3.0 * (2 * ch * size * size) as f64,
        });
    }
    let x = tensor(&g, dtype, &[2 * 4096, 320], 1.0);
    let gm = tensor(&g, dtype, &[320], 1.0);
    let secs = time(&g, || g.layer_norm(&x, &gm, &gm, 1e-5).unwrap());
    rows.push(Row {
        name: "layer_norm [8192, 320]".into(),
        seconds: secs,
        flops: 0.0,
        bytes: esize * 2.0 * (8192 * 320) as f64,
    });
    let y = tensor(&g, dtype, &[2 * 4096, 2560], 1.0);
    let secs = time(&g, || g.geglu(&y).unwrap());
    rows.push(Row {
        name: "geglu [8192, 2560]".into(),
        seconds: secs,
        flops: 0.0,
        bytes: esize * 1.5 * (8192 * 2560) as f64,
    });
    let secs = time(&g, || g.softmax_last(&y).unwrap());
    rows.push(Row {
        name: "softmax [8192, 2560]".into(),
        seconds: secs,
        flops: 0.0,
        bytes: esize * 2.0 * (8192 * 2560) as f64,
    });

    println!(
        "{:<48} {:>10} {:>9} {:>8} {:>9}",
        "kernel", "time (us)", "TFLOP/s", "of GEMM", "GB/s"
    );
    for r in rows {
        let tflops = r.flops / r.seconds / 1e12;
        let of_peak = if r.flops > 0.0 {
            format!("{:.0}%", 100.0 * r.flops / r.seconds / peak)
        } else {
            "-".into()
        };
        println!(
            "{:<48} {:>10.1} {:>9} {:>8} {:>9.0}",
            r.name,
            r.seconds * 1e6,
            if r.flops > 0.0 {
                format!("{tflops:.1}")
            } else {
                "-".into()
            },
            of_peak,
            r.bytes / r.seconds / 1e9
        );
    }
    println!("\npool: {:?}", g.pool_stats());
    ExitCode::SUCCESS
}

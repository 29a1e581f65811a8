//! The CPU backend's hot kernels at Stable Diffusion 1.5 shapes, and the machine's GEMM peak.
//!
//! Throughput is in floating-point operations (criterion's "elem/s" = FLOP/s; a multiply-add
//! counts 2), so each kernel's rate reads directly against `peak/sgemm_2048`, a large square
//! f32 GEMM through the backend's own packed GEMM, the one every product uses: the fraction of the
//! measured peak is the ratio of the two rates. Run:
//! `cargo bench -p sd-benches --bench cpu_kernels`.

// A benchmark fails loudly, like a test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sd_benches::data;
use sd_models::CpuBackend;
use sd_models::backend::{
    ActivationOps, AttentionMask, AttentionOps, Conv2dParams, ConvOps, DataOps, MatmulOps, NormOps,
};
use sd_models::cpu::CpuPrecision;

fn bench(c: &mut Criterion) {
    let cpu = CpuBackend::new();

    let mut g = c.benchmark_group("peak");
    let n = 2048;
    let a = cpu.upload(&data(n * n, 0.1), &[n, n]).unwrap();
    let b = cpu.upload(&data(n * n, 0.2), &[n, n]).unwrap();
    g.throughput(Throughput::Elements((2 * n * n * n) as u64));
    g.bench_function("sgemm_2048", |bch| bch.iter(|| cpu.matmul(&a, &b).unwrap()));
    g.finish();

    // 3x3 convolutions of the UNet's resnets (batch 1, padding 1), and the stride-2 downsamples.
    let mut g = c.benchmark_group("conv3x3");
    for (hw, ch, stride) in [
        (64, 320, 1),
        (32, 640, 1),
        (16, 1280, 1),
        (8, 1280, 1),
        (64, 320, 2),
    ] {
        let x = cpu
            .upload(&data(ch * hw * hw, 0.3), &[1, ch, hw, hw])
            .unwrap();
        // Prepared once, as a loaded layer's weight is.
        let w = cpu
            .prepare_conv_weight(
                cpu.upload(&data(ch * ch * 9, 0.4), &[ch, ch, 3, 3])
                    .unwrap(),
            )
            .unwrap();
        let bias = cpu.upload(&data(ch, 0.5), &[ch]).unwrap();
        let out = hw / stride;
        g.throughput(Throughput::Elements((2 * ch * ch * 9 * out * out) as u64));
        g.bench_with_input(
            BenchmarkId::new(format!("s{stride}"), format!("{hw}x{hw}x{ch}")),
            &(),
            |bch, _| {
                bch.iter(|| {
                    cpu.conv2d(&x, &w, Some(&bias), Conv2dParams::new(stride, 1))
                        .unwrap()
                })
            },
        );
    }
    g.finish();

    // The VAE decoder's 3x3 convolutions at a 64x64 latent (512 pixels), in f32 and with
    // bf16 products (where the CPU has AVX512-BF16).
    let bf16 = CpuBackend::new().with_precision(CpuPrecision::Bf16).ok();
    let mut g = c.benchmark_group("vae_conv3x3");
    g.sample_size(10);
    for (hw, ch) in [(64, 512), (128, 256), (256, 128)] {
        for (name, backend) in [("f32", Some(cpu)), ("bf16", bf16)] {
            let Some(b) = backend else { continue };
            let x = b
                .upload(&data(ch * hw * hw, 0.3), &[1, ch, hw, hw])
                .unwrap();
            let w = b
                .prepare_conv_weight(b.upload(&data(ch * ch * 9, 0.4), &[ch, ch, 3, 3]).unwrap())
                .unwrap();
            g.throughput(Throughput::Elements((2 * ch * ch * 9 * hw * hw) as u64));
            g.bench_with_input(
                BenchmarkId::new(name, format!("{hw}x{hw}x{ch}")),
                &(),
                |bch, _| bch.iter(|| b.conv2d(&x, &w, None, Conv2dParams::new(1, 1)).unwrap()),
            );
        }
    }
    g.finish();

    // Linear layers of the 64x64 transformer blocks: 4096 tokens of 320 channels, the
    // projections, the GEGLU up-projection (320 -> 2 x 1280) and its down-projection.
    let mut g = c.benchmark_group("linear");
    for (rows, inf, outf) in [
        (4096, 320, 320),
        (4096, 320, 2560),
        (4096, 1280, 320),
        (77, 768, 320),
    ] {
        let x = cpu.upload(&data(rows * inf, 0.6), &[rows, inf]).unwrap();
        let w = cpu
            .prepare_linear_weight(cpu.upload(&data(outf * inf, 0.7), &[outf, inf]).unwrap())
            .unwrap();
        g.throughput(Throughput::Elements((2 * rows * inf * outf) as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{rows}x{inf}x{outf}")),
            &(),
            |bch, _| bch.iter(|| cpu.linear(&x, &w, None).unwrap()),
        );
    }
    g.finish();

    // Attention at the 64x64 level: 8 heads of 40, 4096 queries, self (4096 keys) and cross
    // (77 keys).
    let mut g = c.benchmark_group("attention");
    g.sample_size(10);
    for keys in [4096, 77] {
        let (b, h, lq, d) = (1, 8, 4096, 40);
        let q = cpu
            .upload(&data(b * h * lq * d, 0.8), &[b, h, lq, d])
            .unwrap();
        let k = cpu
            .upload(&data(b * h * keys * d, 0.9), &[b, h, keys, d])
            .unwrap();
        g.throughput(Throughput::Elements((4 * b * h * lq * keys * d) as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("4096q_{keys}k_h8_d40")),
            &(),
            |bch, _| {
                bch.iter(|| {
                    cpu.attention(&q, &k, &k, AttentionMask::None, 0.158)
                        .unwrap()
                })
            },
        );
    }
    g.finish();

    let mut g = c.benchmark_group("group_norm_silu");
    // The UNet's 64x64 and 32x32 levels, and the VAE decoder's last (256x256 of a 512x512 image).
    for (hw, ch) in [(64, 320), (32, 640), (256, 128)] {
        let x = cpu
            .upload(&data(ch * hw * hw, 1.0), &[1, ch, hw, hw])
            .unwrap();
        let p = cpu.upload(&data(ch, 1.1), &[ch]).unwrap();
        g.throughput(Throughput::Bytes((ch * hw * hw * 4) as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{hw}x{hw}x{ch}")),
            &(),
            |bch, _| bch.iter(|| cpu.group_norm_silu(&x, 32, &p, &p, 1e-5).unwrap()),
        );
    }
    g.finish();

    // The GEGLU of the 64x64 transformer blocks: 4096 tokens, 2 x 1280 in, 1280 out.
    let mut g = c.benchmark_group("geglu");
    let x = cpu.upload(&data(4096 * 2560, 1.0), &[4096, 2560]).unwrap();
    g.throughput(Throughput::Bytes(4096 * 2560 * 4));
    g.bench_function("4096x2560", |bch| bch.iter(|| cpu.geglu(&x).unwrap()));
    g.finish();

    // The transformer blocks' layer norms: 4096 tokens of 320 (64x64) and 1024 of 640 (32x32).
    let mut g = c.benchmark_group("layer_norm");
    for (tokens, ch) in [(4096, 320), (1024, 640)] {
        let x = cpu.upload(&data(tokens * ch, 1.0), &[tokens, ch]).unwrap();
        let p = cpu.upload(&data(ch, 1.1), &[ch]).unwrap();
        g.throughput(Throughput::Bytes((tokens * ch * 4) as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{tokens}x{ch}")),
            &(),
            |bch, _| bch.iter(|| cpu.layer_norm(&x, &p, &p, 1e-5).unwrap()),
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);

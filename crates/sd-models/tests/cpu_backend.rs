//! The CPU backend against the conformance suite, and its determinism across thread counts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sd_models::backend::{AttentionMask, Conv2dParams, DataOps, conformance};
use sd_models::backend::{AttentionOps, ConvOps, MatmulOps, NormOps};
use sd_models::cpu::{CpuIsa, CpuPrecision};
use sd_models::{CpuBackend, CpuTensor};

#[test]
fn cpu_backend_conforms() {
    for seed in [1, 2, 3] {
        let failures = conformance::run(&CpuBackend::new(), 1e-5, seed);
        assert!(failures.is_empty(), "seed {seed}: {failures:#?}");
    }
}

/// Every kernel family this CPU can run, not only the fastest.
#[test]
fn every_kernel_family_conforms() {
    for isa in [CpuIsa::Avx512, CpuIsa::Avx2, CpuIsa::Portable] {
        match CpuBackend::with_isa(isa) {
            Ok(cpu) => {
                assert_eq!(cpu.isa(), isa);
                let failures = conformance::run(&cpu, 1e-5, 4);
                assert!(failures.is_empty(), "{isa:?}: {failures:#?}");
            }
            Err(e) => {
                assert!(!isa.is_supported());
                assert!(matches!(e, sd_models::Error::Unsupported(_)));
            }
        }
    }
}

/// bf16 products (where the CPU has AVX512-BF16) at bf16 tolerance: relative L2 1e-2.
#[test]
fn bf16_products_conform_at_bf16_tolerance() {
    let Ok(cpu) = CpuBackend::new().with_precision(CpuPrecision::Bf16) else {
        assert!(!CpuPrecision::bf16_supported() || CpuBackend::new().isa() != CpuIsa::Avx512);
        return;
    };
    assert_eq!(cpu.precision(), CpuPrecision::Bf16);
    for seed in [5, 6] {
        let failures = conformance::run(&cpu, 1e-2, seed);
        assert!(failures.is_empty(), "seed {seed}: {failures:#?}");
    }
}

#[test]
fn bf16_is_refused_where_the_kernels_cannot_run_it() {
    let portable = CpuBackend::with_isa(CpuIsa::Portable).unwrap();
    assert!(matches!(
        portable.with_precision(CpuPrecision::Bf16),
        Err(sd_models::Error::Unsupported(_))
    ));
    assert!(portable.with_precision(CpuPrecision::F32).is_ok());
}

/// Weights loaded in half precision stay in half precision once prepared for f32 products
/// (half the memory), and give what the same values in f32 give.
#[test]
fn half_precision_weights_stay_half_and_compute_the_same() {
    use half::{bf16, f16};
    use sd_models::backend::{BackendBase, DType, HalfData};
    let cpu = CpuBackend::new();
    let data = |n: usize, s: f32| {
        (0..n)
            .map(|i| (i as f32 * 0.37 + s).sin())
            .collect::<Vec<_>>()
    };
    let x = cpu.upload(&data(70 * 48, 0.1), &[70, 48]).unwrap();
    let w16: Vec<f16> = data(40 * 48, 0.3).into_iter().map(f16::from_f32).collect();
    let lin_half = cpu
        .prepare_linear_weight(cpu.upload_half(HalfData::F16(&w16), &[40, 48]).unwrap())
        .unwrap();
    assert_eq!(cpu.dtype(&lin_half), DType::F16);
    let lin_f32 = cpu
        .prepare_linear_weight(
            cpu.upload(
                &w16.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                &[40, 48],
            )
            .unwrap(),
        )
        .unwrap();
    assert_eq!(cpu.dtype(&lin_f32), DType::F32);
    assert_eq!(
        cpu.download(&cpu.linear(&x, &lin_half, None).unwrap())
            .unwrap(),
        cpu.download(&cpu.linear(&x, &lin_f32, None).unwrap())
            .unwrap()
    );
    // 8 input channels take the implicit GEMM, 32 the direct convolution (with AVX-512).
    for c in [8, 32] {
        let img = cpu
            .upload(&data(2 * c * 9 * 9, 0.2), &[2, c, 9, 9])
            .unwrap();
        let wb: Vec<bf16> = data(12 * c * 9, 0.4)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let conv_half = cpu
            .prepare_conv_weight(
                cpu.upload_half(HalfData::BF16(&wb), &[12, c, 3, 3])
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(cpu.dtype(&conv_half), DType::BF16);
        let conv_f32 = cpu
            .prepare_conv_weight(
                cpu.upload(
                    &wb.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                    &[12, c, 3, 3],
                )
                .unwrap(),
            )
            .unwrap();
        let p = Conv2dParams::new(1, 1);
        assert_eq!(
            cpu.download(&cpu.conv2d(&img, &conv_half, None, p).unwrap())
                .unwrap(),
            cpu.download(&cpu.conv2d(&img, &conv_f32, None, p).unwrap())
                .unwrap()
        );
        // The prepared half weight reads back as its values, whatever its layout.
        assert_eq!(
            cpu.download(&cpu.reshape(&conv_half, &[12, c, 3, 3]).unwrap())
                .unwrap(),
            wb.iter().map(|v| v.to_f32()).collect::<Vec<_>>()
        );
    }
    // The prepared half weight still reads back as its values.
    assert_eq!(
        cpu.download(&cpu.reshape(&lin_half, &[40, 48]).unwrap())
            .unwrap(),
        w16.iter().map(|v| v.to_f32()).collect::<Vec<_>>()
    );
}

fn ops_once(cpu: &CpuBackend) -> Vec<Vec<f32>> {
    let data = |n: usize, s: f32| {
        (0..n)
            .map(|i| (i as f32 * 0.37 + s).sin())
            .collect::<Vec<f32>>()
    };
    let x = cpu
        .upload(&data(2 * 32 * 16 * 16, 0.1), &[2, 32, 16, 16])
        .unwrap();
    let w = cpu
        .upload(&data(64 * 32 * 9, 0.2), &[64, 32, 3, 3])
        .unwrap();
    let g = cpu.upload(&data(32, 0.3), &[32]).unwrap();
    let q = cpu
        .upload(&data(2 * 4 * 256 * 40, 0.4), &[2, 4, 256, 40])
        .unwrap();
    let lin_w = cpu.upload(&data(320 * 40, 0.5), &[320, 40]).unwrap();
    let outs: Vec<CpuTensor> = vec![
        cpu.conv2d(&x, &w, None, Conv2dParams::new(1, 1)).unwrap(),
        cpu.group_norm_silu(&x, 8, &g, &g, 1e-5).unwrap(),
        cpu.attention(&q, &q, &q, AttentionMask::None, 0.15)
            .unwrap(),
        cpu.linear(&q, &lin_w, None).unwrap(),
    ];
    outs.iter().map(|t| cpu.download(t).unwrap()).collect()
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let cpu = CpuBackend::new();
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| ops_once(&cpu))
    };
    let one = run(1);
    let two = run(2);
    let three = run(3);
    assert_eq!(one, two, "1 vs 2 threads");
    assert_eq!(one, three, "1 vs 3 threads");
}

/// `upload_vec` takes the buffer as the tensor (the same values as `upload`), refuses a
/// length the shape does not have, and `host_values` gives the values row-major whether it
/// can borrow them (a contiguous tensor) or must gather them (a permuted view).
#[test]
fn owned_uploads_and_borrowed_values_agree_with_upload_and_download() {
    let cpu = CpuBackend::new();
    let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
    let owned = cpu.upload_vec(values.clone(), &[2, 3, 4]).unwrap();
    assert_eq!(cpu.download(&owned).unwrap(), values);
    assert_eq!(&*cpu.host_values(&owned).unwrap(), values.as_slice());
    let e = cpu.upload_vec(values.clone(), &[5, 5]).unwrap_err();
    assert!(matches!(e, sd_models::Error::Shape { .. }), "{e}");
    let e = cpu.upload_vec(Vec::new(), &[1]).unwrap_err();
    assert!(matches!(e, sd_models::Error::Shape { .. }), "{e}");
    let permuted = cpu.permute(&owned, &[2, 0, 1]).unwrap();
    assert_eq!(
        cpu.host_values(&permuted).unwrap().into_owned(),
        cpu.download(&permuted).unwrap()
    );
}

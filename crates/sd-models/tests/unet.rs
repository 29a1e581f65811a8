//! The UNets against diffusers (fixtures/unet, written by tools/fixtures/generate.py
//! unet_vae): tiny random-initialised `UNet2DConditionModel`s (SD 1.x-like, SD 2.x-like,
//! inpainting with class labels and an LCM guidance embedding, and one with the less common
//! options) and class-conditional `UNet2DModel`s, each at two timesteps, to a relative L2
//! error of 1e-4 (the observed errors are printed; they are near 1e-6). Then the bad inputs,
//! each a typed error, and the presets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use safetensors::SafeTensors;
use sd_models::backend::DType;
use sd_models::backend::conformance::rel_l2;
use sd_models::backend::{BackendBase, DataOps};
use sd_models::nn::{ClassLabels, RandomWeights};
use sd_models::unet::{
    Unet2DConditionConfig, Unet2DConditionModel, Unet2DConfig, Unet2DModel, UnetConditioning,
};
use sd_models::weights::Variant;
use sd_models::{CpuBackend, CpuTensor, Error};

use common::fixtures::{Labels, numbers};

const RTOL: f64 = 1e-4;

fn dir(name: &str) -> PathBuf {
    common::fixtures::root().join("unet").join(name)
}

struct Fixture {
    inputs: Vec<u8>,
    expected: Vec<u8>,
    case: serde_json::Value,
}

impl Fixture {
    fn read(name: &str) -> Self {
        Fixture {
            inputs: std::fs::read(dir(name).join("inputs.safetensors")).unwrap(),
            expected: std::fs::read(dir(name).join("expected.safetensors")).unwrap(),
            case: serde_json::from_str(
                &std::fs::read_to_string(dir(name).join("case.json")).unwrap(),
            )
            .unwrap(),
        }
    }

    fn input(&self, cpu: &CpuBackend, name: &str) -> Option<CpuTensor> {
        let st = SafeTensors::deserialize(&self.inputs).unwrap();
        let t = st.tensor(name).ok()?;
        Some(cpu.upload(&floats(t.data()), t.shape()).unwrap())
    }

    fn expected(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.expected).unwrap();
        floats(st.tensor(name).unwrap().data())
    }

    fn timesteps(&self) -> Vec<f64> {
        numbers(&self.case["timesteps"])
    }
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn check(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let err = rel_l2(got, want);
    println!("{what}: relative L2 error {err:.2e}");
    assert!(err <= RTOL, "{what}: relative L2 error {err:e}");
}

#[test]
fn unet_2d_condition_models_match_diffusers() {
    let cpu = CpuBackend::new();
    for name in ["sd1", "sd2", "inpaint", "misc"] {
        let unet = Unet2DConditionModel::from_dir(&cpu, dir(name), &[Variant::Default], true)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let fx = Fixture::read(name);
        let sample = fx.input(&cpu, "sample").unwrap();
        let text = fx.input(&cpu, "encoder_hidden_states").unwrap();
        let cond = fx.input(&cpu, "timestep_cond");
        let labels = Labels::of(&fx.case);
        let extra = UnetConditioning {
            class_labels: labels.get(),
            timestep_cond: cond.as_ref(),
            ..UnetConditioning::default()
        };
        for (i, t) in fx.timesteps().into_iter().enumerate() {
            let out = unet
                .forward_with(&cpu, &sample, &[t], &text, &extra)
                .unwrap();
            check(
                &format!("{name} t={t}"),
                &cpu.download(&out).unwrap(),
                &fx.expected(&format!("t{i}")),
            );
        }
    }
}

/// The CPU backend's bf16 products (AVX512-BF16, where the CPU has it) against diffusers'
/// float32 outputs, at a bf16 tolerance: relative L2 2e-2.
#[test]
fn bf16_products_match_diffusers_at_bf16_tolerance() {
    use sd_models::cpu::CpuPrecision;
    let Ok(cpu) = CpuBackend::new().with_precision(CpuPrecision::Bf16) else {
        println!("no AVX512-BF16 here: nothing to check");
        return;
    };
    for name in ["sd1", "sd2"] {
        let unet = Unet2DConditionModel::from_dir(&cpu, dir(name), &[Variant::Default], true)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let fx = Fixture::read(name);
        let sample = fx.input(&cpu, "sample").unwrap();
        let text = fx.input(&cpu, "encoder_hidden_states").unwrap();
        for (i, t) in fx.timesteps().into_iter().enumerate() {
            let out = unet.forward(&cpu, &sample, &[t], &text).unwrap();
            let got = cpu.download(&out).unwrap();
            let err = rel_l2(&got, &fx.expected(&format!("t{i}")));
            println!("{name} t={t} in bf16: relative L2 error {err:.2e}");
            assert!(
                err <= 2e-2,
                "{name} t={t}: relative L2 error {err:e} in bf16"
            );
        }
    }
}

#[test]
fn unet_2d_models_match_diffusers() {
    let cpu = CpuBackend::new();
    for name in ["class_cond", "ddpm"] {
        let unet = Unet2DModel::from_dir(&cpu, dir(name), &[Variant::Default], true)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let fx = Fixture::read(name);
        let sample = fx.input(&cpu, "sample").unwrap();
        let labels = Labels::of(&fx.case);
        let labels = labels
            .get()
            .unwrap_or_else(|| panic!("{name}: no class labels"));
        for (i, t) in fx.timesteps().into_iter().enumerate() {
            let out = unet.forward(&cpu, &sample, &[t], Some(labels)).unwrap();
            check(
                &format!("{name} t={t}"),
                &cpu.download(&out).unwrap(),
                &fx.expected(&format!("t{i}")),
            );
        }
    }
}

#[test]
fn per_entry_timesteps_equal_a_broadcast_one() {
    let cpu = CpuBackend::new();
    let unet = Unet2DConditionModel::from_dir(&cpu, dir("sd1"), &[Variant::Default], true).unwrap();
    let fx = Fixture::read("sd1");
    let sample = fx.input(&cpu, "sample").unwrap();
    let text = fx.input(&cpu, "encoder_hidden_states").unwrap();
    let one = unet.forward(&cpu, &sample, &[999.0], &text).unwrap();
    let each = unet.forward(&cpu, &sample, &[999.0, 999.0], &text).unwrap();
    assert_eq!(cpu.download(&one).unwrap(), cpu.download(&each).unwrap());
}

fn shape_error<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    match r {
        Err(e @ Error::Shape { .. }) => e.to_string(),
        other => panic!("expected a shape error, got {other:?}"),
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let cpu = CpuBackend::new();
    let unet = Unet2DConditionModel::from_dir(&cpu, dir("sd1"), &[Variant::Default], true).unwrap();
    let zeros = |shape: &[usize]| {
        cpu.upload(&vec![0.0; shape.iter().product()], shape)
            .unwrap()
    };
    let text = zeros(&[2, 7, 32]);
    // Wrong channel count, wrong rank.
    shape_error(unet.forward(&cpu, &zeros(&[2, 3, 16, 16]), &[1.0], &text));
    shape_error(unet.forward(&cpu, &zeros(&[2, 4, 16]), &[1.0], &text));
    // An empty latent.
    shape_error(unet.forward(&cpu, &zeros(&[2, 4, 0, 16]), &[1.0], &text));
    // ControlNet residuals of the wrong count or shape.
    let sample = zeros(&[2, 4, 16, 16]);
    let skips: Vec<_> = [16, 16, 16, 8, 8, 8, 4, 4, 4]
        .iter()
        .zip([16, 16, 16, 16, 16, 16, 16, 32, 32])
        .map(|(&s, c)| zeros(&[2, c, s, s]))
        .collect();
    let residuals = UnetConditioning {
        down_residuals: Some(&skips[..8]),
        ..UnetConditioning::default()
    };
    let e = shape_error(unet.forward_with(&cpu, &sample, &[1.0], &text, &residuals));
    assert!(e.contains("down_block_additional_residuals"), "{e}");
    let mid = zeros(&[2, 32, 4, 5]);
    let residuals = UnetConditioning {
        mid_residual: Some(&mid),
        ..UnetConditioning::default()
    };
    let e = shape_error(unet.forward_with(&cpu, &sample, &[1.0], &text, &residuals));
    assert!(e.contains("mid_block_additional_residual"), "{e}");
    // Text embeddings of the wrong width or batch.
    let e = shape_error(unet.forward(&cpu, &zeros(&[2, 4, 16, 16]), &[1.0], &zeros(&[2, 7, 48])));
    assert!(e.contains("encoder_hidden_states"), "{e}");
    shape_error(unet.forward(&cpu, &zeros(&[2, 4, 16, 16]), &[1.0], &zeros(&[1, 7, 32])));
    // Three timesteps for a batch of two.
    shape_error(unet.forward(&cpu, &zeros(&[2, 4, 16, 16]), &[1.0, 2.0, 3.0], &text));

    // Class-conditional networks need labels of their kind.
    let inpaint =
        Unet2DConditionModel::from_dir(&cpu, dir("inpaint"), &[Variant::Default], true).unwrap();
    let sample = zeros(&[2, 9, 16, 16]);
    shape_error(inpaint.forward(&cpu, &sample, &[1.0], &text));
    let extra = UnetConditioning {
        class_labels: Some(ClassLabels::Timesteps(&[1.0, 2.0])),
        timestep_cond: None,
        ..UnetConditioning::default()
    };
    shape_error(inpaint.forward_with(&cpu, &sample, &[1.0], &text, &extra));
    let extra = UnetConditioning {
        class_labels: Some(ClassLabels::Ids(&[1, 99])),
        timestep_cond: None,
        ..UnetConditioning::default()
    };
    assert!(matches!(
        inpaint.forward_with(&cpu, &sample, &[1.0], &text, &extra),
        Err(Error::TokenOutOfVocab {
            id: 99,
            vocab_size: 10
        })
    ));
    let cond = zeros(&[2, 5]);
    let extra = UnetConditioning {
        class_labels: Some(ClassLabels::Ids(&[1, 2])),
        timestep_cond: Some(&cond),
        ..UnetConditioning::default()
    };
    shape_error(inpaint.forward_with(&cpu, &sample, &[1.0], &text, &extra));

    // A guidance embedding for a network without one.
    let extra = UnetConditioning {
        class_labels: None,
        timestep_cond: Some(&cond),
        ..UnetConditioning::default()
    };
    shape_error(unet.forward_with(&cpu, &zeros(&[2, 4, 16, 16]), &[1.0], &text, &extra));

    let ddpm = Unet2DModel::from_dir(&cpu, dir("class_cond"), &[Variant::Default], true).unwrap();
    shape_error(ddpm.forward(&cpu, &zeros(&[1, 3, 16, 16]), &[1.0], None));
    shape_error(ddpm.forward(
        &cpu,
        &zeros(&[1, 3, 15, 16]),
        &[1.0],
        Some(ClassLabels::Ids(&[1])),
    ));
}

#[test]
fn bad_configs_are_typed_errors() {
    let config_error = |json: &str| match Unet2DConditionConfig::from_json(json, "config.json") {
        Err(e @ Error::Config { .. }) => e.to_string(),
        other => panic!("expected a config error for {json}, got {other:?}"),
    };
    let e = config_error(r#"{"flux_capacitor": 1}"#);
    assert!(e.contains("flux_capacitor"), "{e}");
    let e = config_error(r#"{"down_block_types": ["SimpleCrossAttnDownBlock2D"]}"#);
    assert!(e.contains("SimpleCrossAttnDownBlock2D"), "{e}");
    let e = config_error(r#"{"num_attention_heads": 8}"#);
    assert!(e.contains("num_attention_heads"), "{e}");
    let e = config_error(r#"{"addition_embed_type": "text_time"}"#);
    assert!(e.contains("addition_embed_type"), "{e}");
    let e = config_error(r#"{"attention_head_dim": [8, 8]}"#);
    assert!(e.contains("attention_head_dim"), "{e}");
    let e = config_error(r#"{"block_out_channels": [320, 640, 1280, 1000]}"#);
    assert!(e.contains("norm_num_groups"), "{e}");
    let e = config_error(r#"{"act_fn": "mish"}"#);
    assert!(e.contains("mish"), "{e}");
    let e = config_error(r#"{"transformer_layers_per_block": [[1, 2], 1, 1, 1]}"#);
    assert!(e.contains("reverse_transformer_layers_per_block"), "{e}");

    let e = Unet2DConfig::from_json(r#"{"time_embedding_type": "fourier"}"#, "config.json")
        .unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e}");
    let e = Unet2DConfig::from_json(r#"{"resnet_num_groups": 32}"#, "config.json").unwrap_err();
    assert!(e.to_string().contains("resnet_num_groups"), "{e}");
}

#[test]
fn presets_are_the_stable_diffusion_configs() {
    let sd15 = Unet2DConditionConfig::stable_diffusion_1_5().unwrap();
    assert_eq!(sd15.block_out_channels, [320, 640, 1280, 1280]);
    assert_eq!(sd15.cross_attention_dim(0), Some(768));
    assert_eq!(
        (0..4)
            .map(|b| sd15.head_width(b).unwrap())
            .collect::<Vec<_>>(),
        [40, 80, 160, 160]
    );
    assert!(!sd15.use_linear_projection);
    let sd21 = Unet2DConditionConfig::stable_diffusion_2_1().unwrap();
    assert_eq!(sd21.cross_attention_dim(0), Some(1024));
    assert_eq!(
        (0..4).map(|b| sd21.heads(b).unwrap()).collect::<Vec<_>>(),
        [5, 10, 20, 20]
    );
    assert_eq!(
        (0..4)
            .map(|b| sd21.head_width(b).unwrap())
            .collect::<Vec<_>>(),
        [64; 4]
    );
    assert!(sd21.use_linear_projection && sd21.upcast_attention);
    assert_eq!(sd21.downsample_factor(), 8);
}

/// One forward pass of the full SD 1.5 UNet (random weights) on one 32x32 latent (a 256x256
/// image) with 77 text tokens, on the CPU backend. Run with
/// `cargo test -p sd-models --test unet -- --ignored --nocapture` (the test profile is
/// optimised).
#[test]
#[ignore = "full-size SD 1.5 UNet, slow"]
fn full_size_sd15_forward() {
    let cpu = CpuBackend::new();
    let config = Unet2DConditionConfig::stable_diffusion_1_5().unwrap();
    let start = std::time::Instant::now();
    let source = common::Recording::new(RandomWeights::new(0));
    let unet = Unet2DConditionModel::from_source(&cpu, &source, config).unwrap();
    println!(
        "built SD 1.5 UNet (random weights) in {:.1?}",
        start.elapsed()
    );
    // The network asked for exactly the keys and shapes of diffusers' SD 1.5 UNet.
    common::assert_layout("sd15_unet", &source.log.borrow());
    let n = 4 * 32 * 32;
    let latents: Vec<f32> = (0..n)
        .map(|i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let latents = cpu.upload(&latents, &[1, 4, 32, 32]).unwrap();
    let text: Vec<f32> = (0..77 * 768_usize)
        .map(|i| ((i * 104_729 % 997) as f32 / 498.5) - 1.0)
        .collect();
    let text = cpu.upload(&text, &[1, 77, 768]).unwrap();
    let start = std::time::Instant::now();
    let out = unet.forward(&cpu, &latents, &[500.0], &text).unwrap();
    let elapsed = start.elapsed();
    assert_eq!(cpu.shape(&out), [1, 4, 32, 32]);
    let values = cpu.download(&out).unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
    println!(
        "SD 1.5 UNet forward, one 32x32 latent (a 256x256 image), CPU: {elapsed:.2?} \
         ({} threads)",
        rayon::current_num_threads()
    );
}

/// The SD 2.1 UNet built from random weights (in f16, to halve the memory) loads exactly the
/// keys and shapes of diffusers' network.
#[test]
#[ignore = "full-size SD 2.1 UNet, slow"]
fn full_size_sd21_layout() {
    let cpu = CpuBackend::new();
    let config = Unet2DConditionConfig::stable_diffusion_2_1().unwrap();
    let source = common::Recording::new(RandomWeights::new(0).with_dtype(DType::F16));
    Unet2DConditionModel::from_source(&cpu, &source, config).unwrap();
    common::assert_layout("sd21_unet", &source.log.borrow());
}

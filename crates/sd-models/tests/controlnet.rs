//! ControlNet against diffusers (fixtures/controlnet, written by tools/fixtures/generate.py
//! controlnet): tiny random-initialised `ControlNetModel`s fitted to tiny UNets (SD 1.x-like,
//! a second seed, SD 2.x-like with `global_pool_conditions`), each residual at two timesteps
//! with and without guess mode, the UNet given those residuals, a latent of odd size; then
//! the UNet alone at latent sizes its downsampling does not divide (fixtures/unet/odd_size),
//! each to a relative L2 error of 1e-4. Then the bad inputs, each a typed error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use sd_models::backend::conformance::rel_l2;
use sd_models::backend::{BackendBase, DataOps};
use sd_models::controlnet::{ControlInput, ControlNetConfig, ControlNetModel, ControlScale};
use sd_models::unet::PerBlock;
use sd_models::unet::{Unet2DConditionModel, UnetConditioning};
use sd_models::weights::compvis::open_controlnet;
use sd_models::weights::{LoadDType, Variant};
use sd_models::{CpuBackend, CpuTensor, Error};

use common::fixtures::{Tensor, numbers, read_json, read_tensors, root};

const RTOL: f64 = 1e-4;

fn check(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let err = rel_l2(got, want);
    println!("{what}: relative L2 error {err:.2e}");
    assert!(err <= RTOL, "{what}: relative L2 error {err:e}");
}

struct Case {
    dir: PathBuf,
    meta: serde_json::Value,
    inputs: HashMap<String, Tensor>,
    expected: HashMap<String, Tensor>,
}

impl Case {
    fn read(name: &str) -> Self {
        let dir = root().join("controlnet").join(name);
        Case {
            meta: read_json(&dir.join("case.json")),
            inputs: read_tensors(&dir.join("inputs.safetensors")),
            expected: read_tensors(&dir.join("expected.safetensors")),
            dir,
        }
    }

    fn input(&self, cpu: &CpuBackend, name: &str) -> CpuTensor {
        let (shape, data) = &self.inputs[name];
        cpu.upload(data, shape).unwrap()
    }

    fn want(&self, name: &str) -> &[f32] {
        &self
            .expected
            .get(name)
            .unwrap_or_else(|| panic!("{name}"))
            .1
    }

    fn unet(&self, cpu: &CpuBackend) -> Unet2DConditionModel<CpuBackend> {
        let dir = root().join(self.meta["unet"].as_str().unwrap());
        Unet2DConditionModel::from_dir(cpu, dir, &[Variant::Default], true).unwrap()
    }
}

/// Runs a case's ControlNet and the UNet with its residuals at every timestep; `prefix`
/// picks the odd-size inputs (`"odd."`) or the batch of two (`""`).
fn run_case(
    name: &str,
    case: &Case,
    cpu: &CpuBackend,
    controlnet: &ControlNetModel<CpuBackend>,
    unet: &Unet2DConditionModel<CpuBackend>,
    prefix: &str,
    guess_modes: &[bool],
) {
    let sample = case.input(cpu, &format!("{prefix}sample"));
    let text = case.input(cpu, &format!("{prefix}encoder_hidden_states"));
    let image = case.input(cpu, &format!("{prefix}controlnet_cond"));
    let hint = controlnet.embed_hint(cpu, &image).unwrap();
    let scale = case.meta["conditioning_scale"].as_f64().unwrap() as f32;
    for (i, t) in numbers(&case.meta["timesteps"]).into_iter().enumerate() {
        for &guess_mode in guess_modes {
            let mode = if guess_mode { "guess." } else { "" };
            let key = |what: &str| format!("{prefix}t{i}.{mode}{what}");
            let out = controlnet
                .forward(
                    cpu,
                    &sample,
                    &[t],
                    &text,
                    &ControlInput::new(&hint, ControlScale { scale, guess_mode }),
                )
                .unwrap();
            for (j, r) in out.down.iter().enumerate() {
                let k = key(&format!("down.{j}"));
                check(
                    &format!("{name} {k}"),
                    &cpu.download(r).unwrap(),
                    case.want(&k),
                );
            }
            let k = key("mid");
            check(
                &format!("{name} {k}"),
                &cpu.download(&out.mid).unwrap(),
                case.want(&k),
            );
            let extra = UnetConditioning {
                down_residuals: Some(&out.down),
                mid_residual: Some(&out.mid),
                ..UnetConditioning::default()
            };
            let y = unet
                .forward_with(cpu, &sample, &[t], &text, &extra)
                .unwrap();
            let k = key("unet_out");
            check(
                &format!("{name} {k}"),
                &cpu.download(&y).unwrap(),
                case.want(&k),
            );
        }
        if prefix.is_empty() {
            let y = unet.forward(cpu, &sample, &[t], &text).unwrap();
            let k = format!("t{i}.unet_plain");
            check(
                &format!("{name} {k}"),
                &cpu.download(&y).unwrap(),
                case.want(&k),
            );
        }
    }
}

#[test]
fn controlnets_match_diffusers() {
    let cpu = CpuBackend::new();
    for name in ["sd1", "sd1_b", "sd2_pool"] {
        let case = Case::read(name);
        let controlnet =
            ControlNetModel::from_dir(&cpu, &case.dir, &[Variant::Default], true).unwrap();
        assert_eq!(
            controlnet.config().down_residual_count(),
            case.meta["down_residuals"].as_u64().unwrap() as usize
        );
        let unet = case.unet(&cpu);
        run_case(name, &case, &cpu, &controlnet, &unet, "", &[false, true]);
        if case.inputs.contains_key("odd.sample") {
            run_case(name, &case, &cpu, &controlnet, &unet, "odd.", &[false]);
        }
        // One embedding per control image, however many steps use it.
        assert_eq!(controlnet.hints_embedded(), 1 + usize::from(name == "sd1"));
    }
}

#[test]
fn the_fp16_variant_loads_the_same_network() {
    // The f32 file holds the f16 file's values widened, so the two load identically.
    let cpu = CpuBackend::new();
    let case = Case::read("sd1");
    let a = ControlNetModel::from_dir(&cpu, &case.dir, &[Variant::Default], true).unwrap();
    let b = ControlNetModel::from_dir(&cpu, &case.dir, &[Variant::Fp16], true).unwrap();
    let sample = case.input(&cpu, "sample");
    let text = case.input(&cpu, "encoder_hidden_states");
    let image = case.input(&cpu, "controlnet_cond");
    let run = |c: &ControlNetModel<CpuBackend>| {
        let hint = c.embed_hint(&cpu, &image).unwrap();
        let out = c
            .forward(
                &cpu,
                &sample,
                &[500.0],
                &text,
                &ControlInput::new(&hint, ControlScale::default()),
            )
            .unwrap();
        cpu.download(&out.mid).unwrap()
    };
    assert_eq!(run(&a), run(&b));
}

#[test]
fn latents_of_any_size_match_diffusers() {
    let cpu = CpuBackend::new();
    let dir = root().join("unet/odd_size");
    let meta = read_json(&dir.join("case.json"));
    let inputs = read_tensors(&dir.join("inputs.safetensors"));
    let expected = read_tensors(&dir.join("expected.safetensors"));
    let timesteps = numbers(&meta["timesteps"]);
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let model = root().join("unet").join(case["model"].as_str().unwrap());
        let unet = Unet2DConditionModel::from_dir(&cpu, model, &[Variant::Default], true).unwrap();
        let upload = |k: &str| {
            let (shape, data) = &inputs[&format!("{name}.{k}")];
            cpu.upload(data, shape).unwrap()
        };
        let (sample, text) = (upload("sample"), upload("encoder_hidden_states"));
        for (i, &t) in timesteps.iter().enumerate() {
            let y = unet.forward(&cpu, &sample, &[t], &text).unwrap();
            assert_eq!(cpu.shape(&y), cpu.shape(&sample));
            let want = &expected[&format!("{name}.t{i}")].1;
            check(&format!("{name} t={t}"), &cpu.download(&y).unwrap(), want);
        }
    }
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
    let case = Case::read("sd1");
    let controlnet = ControlNetModel::from_dir(&cpu, &case.dir, &[Variant::Default], true).unwrap();
    let zeros = |shape: &[usize]| {
        cpu.upload(&vec![0.0; shape.iter().product()], shape)
            .unwrap()
    };
    // A control image of the wrong channel count, or of a size the hint network cannot
    // bring to the latents' (8 pixels per latent pixel).
    let e = shape_error(controlnet.embed_hint(&cpu, &zeros(&[1, 1, 64, 64])));
    assert!(e.contains("control image"), "{e}");
    shape_error(controlnet.embed_hint(&cpu, &zeros(&[1, 3, 60, 64])));
    // A hint of another size than the latents.
    let hint = controlnet
        .embed_hint(&cpu, &zeros(&[1, 3, 72, 64]))
        .unwrap();
    let sample = case.input(&cpu, "sample");
    let text = case.input(&cpu, "encoder_hidden_states");
    let e = shape_error(controlnet.forward(
        &cpu,
        &sample,
        &[1.0],
        &text,
        &ControlInput::new(&hint, ControlScale::default()),
    ));
    assert!(e.contains("hint"), "{e}");
    // A scale that is not a number.
    let hint = controlnet
        .embed_hint(&cpu, &zeros(&[1, 3, 64, 64]))
        .unwrap();
    let scale = ControlScale {
        scale: f32::NAN,
        guess_mode: false,
    };
    match controlnet.forward(
        &cpu,
        &sample,
        &[1.0],
        &text,
        &ControlInput::new(&hint, scale),
    ) {
        Err(Error::Config { what, .. }) => assert_eq!(what, "controlnet_conditioning_scale"),
        other => panic!("expected a config error, got {other:?}"),
    }
    // Text embeddings of another width.
    shape_error(controlnet.forward(
        &cpu,
        &sample,
        &[1.0],
        &zeros(&[2, 5, 24]),
        &ControlInput::new(&hint, ControlScale::default()),
    ));
}

#[test]
fn bad_configs_are_typed_errors() {
    let base = std::fs::read_to_string(root().join("controlnet/sd1/config.json")).unwrap();
    assert!(ControlNetConfig::from_json(&base, "sd1").is_ok());
    let mut json: serde_json::Value = serde_json::from_str(&base).unwrap();
    json["not_a_key"] = serde_json::json!(1);
    let e = ControlNetConfig::from_json(&json.to_string(), "bad.json").unwrap_err();
    assert!(e.to_string().contains("not_a_key"), "{e}");
    let mut json: serde_json::Value = serde_json::from_str(&base).unwrap();
    json["conditioning_embedding_out_channels"] = serde_json::json!([]);
    let e = ControlNetConfig::from_json(&json.to_string(), "bad.json").unwrap_err();
    assert!(
        e.to_string()
            .contains("conditioning_embedding_out_channels"),
        "{e}"
    );
    let mut json: serde_json::Value = serde_json::from_str(&base).unwrap();
    json["controlnet_conditioning_channel_order"] = serde_json::json!("cmyk");
    assert!(ControlNetConfig::from_json(&json.to_string(), "bad.json").is_err());
}

#[test]
fn single_files_load_the_same_network_as_the_folder() {
    let cpu = CpuBackend::new();
    let case = Case::read("sd1");
    let folder = ControlNetModel::from_dir(&cpu, &case.dir, &[Variant::Default], true).unwrap();
    let sample = case.input(&cpu, "sample");
    let text = case.input(&cpu, "encoder_hidden_states");
    let image = case.input(&cpu, "controlnet_cond");
    let run = |c: &ControlNetModel<CpuBackend>| {
        let hint = c.embed_hint(&cpu, &image).unwrap();
        let scale = ControlScale {
            scale: 0.7,
            guess_mode: false,
        };
        let out = c
            .forward(
                &cpu,
                &sample,
                &[37.5],
                &text,
                &ControlInput::new(&hint, scale),
            )
            .unwrap();
        let mut all: Vec<f32> = out
            .down
            .iter()
            .flat_map(|r| cpu.download(r).unwrap())
            .collect();
        all.extend(cpu.download(&out.mid).unwrap());
        all
    };
    let want = run(&folder);
    for name in [
        "control_sd1.safetensors",
        "control_sd1_noprefix.safetensors",
    ] {
        let path = root().join("controlnet/single_file").join(name);
        let mut file = open_controlnet(&path, LoadDType::F32, true).unwrap();
        // The tiny network has 2 heads per block and 8 groups, which no shape shows (SD
        // 1.x's are 8 and 32).
        assert_eq!(file.config.attention_head_dim, PerBlock::Each(vec![8, 8]));
        file.config.attention_head_dim = PerBlock::All(2);
        file.config.norm_num_groups = Some(8);
        assert_eq!(&file.config, folder.config(), "{name}: the inferred config");
        let net = ControlNetModel::from_file(&cpu, file).unwrap();
        assert_eq!(run(&net), want, "{name}: bit-identical residuals");
    }
}

#[test]
fn a_file_that_is_not_a_controlnet_is_a_typed_error() {
    let cpu = CpuBackend::new();
    let sd = std::fs::read_dir(root().join("single_file/sd1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    match ControlNetModel::from_single_file(&cpu, &sd, LoadDType::F32) {
        Err(e @ Error::CannotInfer { .. }) => {
            assert!(e.to_string().contains("Stable Diffusion checkpoint"), "{e}");
        }
        other => panic!("expected CannotInfer, got {other:?}"),
    }
    // A truncated ControlNet file.
    let bytes =
        std::fs::read(root().join("controlnet/single_file/control_sd1.safetensors")).unwrap();
    let dir = common::fixtures::scratch_dir("sd-models-controlnet");
    common::fixtures::write_whole(&dir, "truncated.safetensors", &bytes[..bytes.len() / 2]);
    assert!(
        ControlNetModel::from_single_file(&cpu, dir.join("truncated.safetensors"), LoadDType::F32)
            .is_err()
    );
}

#[test]
fn a_controlnet_file_holding_its_stable_diffusion_model_loads_only_the_controlnet() {
    // ControlNet 1.0's full checkpoints hold the SD model beside `control_model.*`.
    let read = |p: PathBuf| std::fs::read(p).unwrap();
    let control = read(root().join("controlnet/single_file/control_sd1.safetensors"));
    let sd = read(root().join("single_file/sd1/model.safetensors"));
    let (control, sd) = (
        safetensors::SafeTensors::deserialize(&control).unwrap(),
        safetensors::SafeTensors::deserialize(&sd).unwrap(),
    );
    let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        control.tensors().into_iter().chain(sd.tensors()).collect();
    let bytes = safetensors::serialize(tensors, None).unwrap();
    let dir = common::fixtures::scratch_dir("sd-models-controlnet");
    common::fixtures::write_whole(&dir, "full.safetensors", &bytes);
    let mut file = open_controlnet(dir.join("full.safetensors"), LoadDType::F32, true).unwrap();
    file.config.attention_head_dim = PerBlock::All(2);
    file.config.norm_num_groups = Some(8);
    let cpu = CpuBackend::new();
    ControlNetModel::from_file(&cpu, file).unwrap();
}

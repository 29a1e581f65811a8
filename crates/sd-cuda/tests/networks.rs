//! The tiny networks of `fixtures/` end to end on a backend, against diffusers and
//! transformers: the conditional UNets (SD 1.x- and 2.x-like, inpainting with class labels and
//! an LCM guidance embedding, the less common options), the class-conditional `UNet2DModel`s,
//! the VAE (encode and decode), the CLIP text encoders, and the tiny pipeline (text-to-image,
//! image-to-image, 9-channel inpainting, with diffusers' noise replayed).
//!
//! One harness, generic over the backend ([`outputs`]), runs everywhere:
//! - `the_harness_holds_on_the_cpu_backend` runs it on the CPU backend in CI, so the harness
//!   itself (the fixture reading, the cases, the comparison) is tested where there is no GPU;
//! - the `on_the_gpu_*` tests run it on [`CudaBackend`] (`#[ignore = "needs a CUDA GPU"]`): in
//!   f32 against diffusers' outputs to a relative L2 error of 1e-4, and in f16 and bf16
//!   (weights and activations stored in the half type) against the CPU backend given the
//!   same half-precision weights, to 1e-2 in f16 and 2e-2 in bf16 (the bar the CPU backend's
//!   own bf16 products are held to against diffusers; bf16 keeps 8 bits of mantissa, and a
//!   whole network stores every activation in it).
//!
//! ```text
//! cargo test -p sd-cuda --release --test networks -- --ignored --test-threads 1
//! ```
//!
//! A binary built elsewhere finds the fixtures through `SD_FIXTURES`, or in `fixtures/` of the
//! working directory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::PathBuf;

#[path = "../../sd-models/tests/common/fixtures.rs"]
mod fixtures;

use safetensors::SafeTensors;
use sd_cuda::{CudaBackend, CudaOptions};
use sd_models::CpuBackend;
use sd_models::backend::conformance::rel_l2;
use sd_models::backend::{Backend, BackendBase, DType, DataOps};
use sd_models::clip::ClipTextModel;
use sd_models::pipeline::{Control, LoadOptions, Outcome, Progress, StableDiffusion, Task};
use sd_models::unet::{Unet2DConditionModel, Unet2DModel, UnetConditioning};
use sd_models::vae::{AutoencoderKl, DecoderPrecision};
use sd_models::weights::{LoadDType, Variant};

use fixtures::{
    Labels, PipelineCase, Tensor, numbers, read_json, read_tensors, root, scratch_dir, write_whole,
};

/// One output of one network on one backend, with what diffusers (or transformers) computed.
struct Output {
    name: String,
    got: Vec<f32>,
    reference: Vec<f32>,
}

/// Collects outputs; the backend's tensors are downloaded as they come.
struct Outputs<'a, B: Backend> {
    backend: &'a B,
    list: Vec<Output>,
}

impl<B: Backend> Outputs<'_, B> {
    fn push(&mut self, name: String, got: &B::Tensor, reference: Vec<f32>) {
        let got = self.backend.download(got).unwrap();
        assert_eq!(got.len(), reference.len(), "{name}: length");
        self.list.push(Output {
            name,
            got,
            reference,
        });
    }
}

/// The input tensor `name` of a fixture, uploaded.
fn input<B: Backend>(b: &B, tensors: &HashMap<String, Tensor>, name: &str) -> Option<B::Tensor> {
    tensors
        .get(name)
        .map(|(shape, data)| b.upload(data, shape).unwrap())
}

fn reference(tensors: &HashMap<String, Tensor>, name: &str) -> Vec<f32> {
    tensors
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in the fixture"))
        .1
        .clone()
}

/// A UNet fixture: its folder, inputs, diffusers' outputs and case.json.
struct UnetCase {
    dir: PathBuf,
    inputs: HashMap<String, Tensor>,
    expected: HashMap<String, Tensor>,
    case: serde_json::Value,
}

impl UnetCase {
    fn read(name: &str) -> Self {
        let dir = root().join("unet").join(name);
        UnetCase {
            inputs: read_tensors(&dir.join("inputs.safetensors")),
            expected: read_tensors(&dir.join("expected.safetensors")),
            case: read_json(&dir.join("case.json")),
            dir,
        }
    }

    /// Each timestep of the case with diffusers' output at it.
    fn timesteps(&self) -> Vec<(f64, Vec<f32>)> {
        numbers(&self.case["timesteps"])
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, reference(&self.expected, &format!("t{i}"))))
            .collect()
    }
}

fn conditional_unets<B: Backend>(out: &mut Outputs<'_, B>, dtype: LoadDType) {
    let b = out.backend;
    for name in ["sd1", "sd2", "inpaint", "misc"] {
        let fx = UnetCase::read(name);
        let unet = Unet2DConditionModel::from_dir_as(b, &fx.dir, &[Variant::Default], true, dtype)
            .unwrap_or_else(|e| panic!("unet {name}: {e}"));
        let sample = input(b, &fx.inputs, "sample").unwrap();
        let text = input(b, &fx.inputs, "encoder_hidden_states").unwrap();
        let cond = input(b, &fx.inputs, "timestep_cond");
        let labels = Labels::of(&fx.case);
        let extra = UnetConditioning {
            class_labels: labels.get(),
            timestep_cond: cond.as_ref(),
            ..UnetConditioning::default()
        };
        for (t, want) in fx.timesteps() {
            let y = unet.forward_with(b, &sample, &[t], &text, &extra).unwrap();
            out.push(format!("unet {name} t={t}"), &y, want);
        }
    }
}

/// The conditional UNets at latent sizes their downsampling does not divide (upsampling to
/// odd skip connections).
fn odd_size_unets<B: Backend>(out: &mut Outputs<'_, B>, dtype: LoadDType) {
    let b = out.backend;
    let dir = root().join("unet/odd_size");
    let meta = read_json(&dir.join("case.json"));
    let inputs = read_tensors(&dir.join("inputs.safetensors"));
    let expected = read_tensors(&dir.join("expected.safetensors"));
    let timesteps = numbers(&meta["timesteps"]);
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let model = root().join("unet").join(case["model"].as_str().unwrap());
        let unet =
            Unet2DConditionModel::from_dir_as(b, model, &[Variant::Default], true, dtype).unwrap();
        let sample = input(b, &inputs, &format!("{name}.sample")).unwrap();
        let text = input(b, &inputs, &format!("{name}.encoder_hidden_states")).unwrap();
        for (i, &t) in timesteps.iter().enumerate() {
            let y = unet.forward(b, &sample, &[t], &text).unwrap();
            out.push(
                format!("unet odd size {name} t={t}"),
                &y,
                reference(&expected, &format!("{name}.t{i}")),
            );
        }
    }
}

fn class_conditional_unets<B: Backend>(out: &mut Outputs<'_, B>, dtype: LoadDType) {
    let b = out.backend;
    for name in ["class_cond", "ddpm"] {
        let fx = UnetCase::read(name);
        let unet = Unet2DModel::from_dir_as(b, &fx.dir, &[Variant::Default], true, dtype)
            .unwrap_or_else(|e| panic!("unet2d {name}: {e}"));
        let sample = input(b, &fx.inputs, "sample").unwrap();
        let labels = Labels::of(&fx.case);
        let labels = labels
            .get()
            .unwrap_or_else(|| panic!("{name}: no class labels"));
        for (t, want) in fx.timesteps() {
            let y = unet.forward(b, &sample, &[t], Some(labels)).unwrap();
            out.push(format!("unet2d {name} t={t}"), &y, want);
        }
    }
}

fn vae<B: Backend>(out: &mut Outputs<'_, B>, dtype: LoadDType) {
    let b = out.backend;
    let dir = root().join("vae/kl");
    let vae = AutoencoderKl::from_dir_as(b, &dir, &[Variant::Default], true, dtype).unwrap();
    let inputs = read_tensors(&dir.join("inputs.safetensors"));
    let expected = read_tensors(&dir.join("expected.safetensors"));
    let image = input(b, &inputs, "image").unwrap();
    let posterior = vae.encode(b, &image).unwrap();
    out.push(
        "vae moments".into(),
        &posterior.moments,
        reference(&expected, "moments"),
    );
    // Decode diffusers' own mode, so that the decoder is checked on its own.
    let (shape, mode) = &expected["mode"];
    let z = b.upload(mode, shape).unwrap();
    let decoded = vae.decode_with(b, &z, DecoderPrecision::F32, None).unwrap();
    out.push(
        "vae decoded".into(),
        &decoded,
        reference(&expected, "decoded"),
    );
}

fn text_encoders<B: Backend>(out: &mut Outputs<'_, B>, dtype: LoadDType) {
    let b = out.backend;
    for name in ["sd1", "sd2", "eos_first"] {
        let dir = root().join("clip").join(name);
        let model = ClipTextModel::from_dir_as(b, &dir, &[Variant::Default], true, dtype)
            .unwrap_or_else(|e| panic!("clip {name}: {e}"));
        let expected = read_tensors(&dir.join("expected.safetensors"));
        let ids: Vec<Vec<u32>> = read_json(&dir.join("input_ids.json"))["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| numbers(row).into_iter().map(|v| v as u32).collect())
            .collect();
        let y = model.forward(b, &ids).unwrap();
        out.push(
            format!("clip {name} last_hidden_state"),
            &y.last_hidden_state,
            reference(&expected, "last_hidden_state"),
        );
        match &y.text_embeds {
            Some(e) => out.push(
                format!("clip {name} text_embeds"),
                e,
                reference(&expected, "text_embeds"),
            ),
            None => out.push(
                format!("clip {name} pooled_output"),
                &y.pooled_output,
                reference(&expected, "pooled_output"),
            ),
        }
    }
}

fn pipelines<B: Backend + Clone>(out: &mut Outputs<'_, B>, dtype: LoadDType) {
    let b = out.backend;
    let dir = root().join("pipeline");
    let options = LoadOptions {
        weights: dtype,
        ..LoadOptions::default()
    };
    let pipe = StableDiffusion::from_dir(b.clone(), dir.join("sd1"), &options).unwrap();
    let inpaint_unet = Unet2DConditionModel::from_dir_as(
        b,
        dir.join("inpaint_unet"),
        &[Variant::Default],
        true,
        dtype,
    )
    .unwrap();
    let inpaint = StableDiffusion::from_dir(b.clone(), dir.join("sd1"), &options)
        .unwrap()
        .with_unet(inpaint_unet)
        .unwrap();
    let controlled = |case: &PipelineCase| {
        let mut p = StableDiffusion::from_dir(b.clone(), dir.join("sd1"), &options).unwrap();
        for net in case.controlnet_dirs() {
            p = p.load_controlnet(net, &options).unwrap();
        }
        p
    };
    for name in [
        "txt2img_euler_a",
        "img2img_ddim",
        "inpaint_unet9_ddim",
        "controlnet_two",
        "controlnet_guess",
        "controlnet_img2img",
    ] {
        let case = PipelineCase::read(name);
        let params = case.params();
        let mut noise = case.noise();
        let (image, mask) = (case.image(), case.mask());
        let strength = case.strength();
        // A pipeline of its own only for the cases with ControlNets.
        let with_controlnets = (!case.controlnet_dirs().is_empty()).then(|| controlled(&case));
        let plain = with_controlnets.as_ref().unwrap_or(&pipe);
        let (task, pipe) = match (&image, &mask) {
            (Some(image), Some(mask)) => (
                Task::Inpaint {
                    image,
                    mask,
                    strength,
                },
                &inpaint,
            ),
            (Some(image), None) => (Task::ImageToImage { image, strength }, plain),
            _ => (Task::TextToImage, plain),
        };
        let mut go = |_: &Progress<'_>| Control::Continue;
        let g = match pipe.generate(&params, task, &mut noise, &mut go).unwrap() {
            Outcome::Finished(g) => g,
            other => panic!("{name}: not finished: {other:?}"),
        };
        assert_eq!(
            noise.used(),
            case.noise_count(),
            "{name}: every noise tensor used, in order"
        );
        let pixels = b.upload(&g.pixels, &[g.pixels.len()]).unwrap();
        out.push(format!("pipeline {name}"), &pixels, case.expected());
    }
}

/// Every output of every fixture network on `backend`, with the weights handed over in
/// `dtype`.
fn outputs<B: Backend + Clone>(backend: &B, dtype: LoadDType) -> Vec<Output> {
    let mut out = Outputs {
        backend,
        list: Vec::new(),
    };
    conditional_unets(&mut out, dtype);
    odd_size_unets(&mut out, dtype);
    class_conditional_unets(&mut out, dtype);
    vae(&mut out, dtype);
    text_encoders(&mut out, dtype);
    pipelines(&mut out, dtype);
    out.list
}

/// Prints every output's error against diffusers and returns the worst.
fn against_diffusers(outputs: &[Output]) -> (f64, String) {
    let mut worst = (0.0, String::new());
    for o in outputs {
        let err = rel_l2(&o.got, &o.reference);
        println!("{}: relative L2 error {err:.2e} against diffusers", o.name);
        if err.is_nan() || err > worst.0 {
            worst = (err, o.name.clone());
        }
    }
    worst
}

#[test]
fn the_harness_holds_on_the_cpu_backend() {
    let cpu = CpuBackend::new();
    let outputs = outputs(&cpu, LoadDType::F32);
    assert_eq!(
        outputs.len(),
        4 * 2 + 4 * 2 + 2 * 2 + 2 + 3 * 2 + 6,
        "every case ran"
    );
    let (worst, name) = against_diffusers(&outputs);
    assert!(worst <= 1e-4, "{name}: relative L2 error {worst:e}");
}

fn gpu(dtype: DType) -> CudaBackend {
    let b = CudaBackend::with_options(CudaOptions::new(0).with_upload_dtype(dtype))
        .unwrap_or_else(|e| panic!("these tests need a CUDA GPU: {e}"));
    // Compile every kernel once per process on all cores, not one at a time on first use.
    static WARM: std::sync::Once = std::sync::Once::new();
    WARM.call_once(|| b.warm_up().expect("the kernels compile and load"));
    b
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn on_the_gpu_in_f32_the_networks_match_diffusers() {
    let outputs = outputs(&gpu(DType::F32), LoadDType::F32);
    let (worst, name) = against_diffusers(&outputs);
    assert!(worst <= 1e-4, "{name}: relative L2 error {worst:e}");
}

/// The GPU with weights and activations in `dtype` against the CPU backend with the same
/// rounded weights (computing in f32): what is measured is the GPU's half-precision
/// arithmetic and storage, not the weights' rounding.
fn half_against_the_cpu<B: Backend + Clone>(backend: &B, load: LoadDType, tolerance: f64) {
    let dtype = load.resolve(DType::F32);
    let want = outputs(&CpuBackend::new(), load);
    let got = outputs(backend, load);
    against_diffusers(&got);
    let mut worst = (0.0, String::new());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.name, w.name);
        let err = rel_l2(&g.got, &w.got);
        println!(
            "{}: relative L2 error {err:.2e} in {dtype} against the CPU",
            g.name
        );
        if err.is_nan() || err > worst.0 {
            worst = (err, g.name.clone());
        }
    }
    assert!(
        worst.0 <= tolerance,
        "{}: relative L2 error {:e} in {dtype}",
        worst.1,
        worst.0
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn on_the_gpu_in_f16_the_networks_match_the_cpu() {
    half_against_the_cpu(&gpu(DType::F16), LoadDType::F16, 1e-2);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn on_the_gpu_in_bf16_the_networks_match_the_cpu() {
    half_against_the_cpu(&gpu(DType::BF16), LoadDType::BF16, 2e-2);
}

/// The VAE fixture made loud: its decoder's first convolution scaled by 256 (exact in f16)
/// and latents peaking at 1000, so that the activations exceed f16's 65504 from the first
/// block on, as the real SD VAE's do on ordinary latents. Returns the latents (finite in f16),
/// their shape, and the folder of the loud VAE (written once per process).
fn loud_vae() -> (Vec<f32>, Vec<usize>, PathBuf) {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let src = root().join("vae/kl");
    let dir = DIR.get_or_init(|| {
        let dir = scratch_dir("sd-cuda-loud-vae");
        let config = std::fs::read(src.join("config.json")).unwrap();
        write_whole(&dir, "config.json", &config);
        let name = "diffusion_pytorch_model.safetensors";
        let bytes = std::fs::read(src.join(name)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (key, view) in st.tensors() {
            let mut data = view.data().to_vec();
            if key.starts_with("decoder.conv_in.") {
                assert_eq!(view.dtype(), safetensors::Dtype::F16);
                for c in data.chunks_exact_mut(2) {
                    let v = half::f16::from_le_bytes([c[0], c[1]]).to_f32() * 256.0;
                    c.copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
                }
            }
            tensors.push((key, view.dtype(), view.shape().to_vec(), data));
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(k, d, shape, data)| {
                let view = safetensors::tensor::TensorView::new(*d, shape.clone(), data).unwrap();
                (k.clone(), view)
            })
            .collect();
        write_whole(&dir, name, &safetensors::serialize(views, None).unwrap());
        dir
    });
    let expected = read_tensors(&src.join("expected.safetensors"));
    let (shape, mode) = &expected["mode"];
    let peak = mode.iter().fold(0.0_f32, |m, v| m.max(v.abs()));
    let z = mode
        .iter()
        .map(|v| half::f16::from_f32(v * (1e3 / peak)).to_f32())
        .collect();
    (z, shape.clone(), dir.clone())
}

/// The precondition of `on_the_gpu_the_f16_vae_stays_finite`, checked on the CPU: a decoder
/// that rounds its activations to f16 (after every block) overflows on the loud VAE where the
/// f32 one does not.
#[test]
fn the_loud_vae_overflows_a_naive_f16_decoder() {
    let cpu = CpuBackend::new();
    let (z, shape, dir) = loud_vae();
    let vae =
        AutoencoderKl::from_dir_as(&cpu, &dir, &[Variant::Default], true, LoadDType::F16).unwrap();
    let z = cpu.upload(&z, &shape).unwrap();
    let full = cpu.download(&vae.decode(&cpu, &z).unwrap()).unwrap();
    assert!(full.iter().all(|v| v.is_finite()));
    let naive = cpu
        .download(
            &vae.decode_with(&cpu, &z, DecoderPrecision::NaiveF16, None)
                .unwrap(),
        )
        .unwrap();
    let bad = naive.iter().filter(|v| !v.is_finite()).count();
    println!(
        "naive f16 decoder on the CPU: {bad} of {} values not finite",
        naive.len()
    );
    assert!(bad > 0);
}

/// The loud VAE's decoder with f16 weights and f16 storage: the default decoder upcasts and
/// stays finite (and agrees with the CPU), the naive one overflows.
#[test]
#[ignore = "needs a CUDA GPU"]
fn on_the_gpu_the_f16_vae_stays_finite() {
    let cpu = CpuBackend::new();
    let (big, shape, dir) = loud_vae();
    let vae_cpu =
        AutoencoderKl::from_dir_as(&cpu, &dir, &[Variant::Default], true, LoadDType::F16).unwrap();
    let want = cpu
        .download(
            &vae_cpu
                .decode(&cpu, &cpu.upload(&big, &shape).unwrap())
                .unwrap(),
        )
        .unwrap();

    let g = gpu(DType::F16);
    let vae =
        AutoencoderKl::from_dir_as(&g, &dir, &[Variant::Default], true, LoadDType::F16).unwrap();
    let z = g.upload(&big, &shape).unwrap();
    assert_eq!(g.dtype(&z), DType::F16);
    let full = g
        .download(
            &vae.decode_with(&g, &z, DecoderPrecision::F32, None)
                .unwrap(),
        )
        .unwrap();
    assert!(
        full.iter().all(|v| v.is_finite()),
        "the default decoder overflowed"
    );
    let err = rel_l2(&full, &want);
    println!("upcast f16 decoder against the CPU: relative L2 error {err:.2e}");
    assert!(err <= 1e-2, "{err:e}");
    let naive = g
        .download(
            &vae.decode_with(&g, &z, DecoderPrecision::NaiveF16, None)
                .unwrap(),
        )
        .unwrap();
    let bad = naive.iter().filter(|v| !v.is_finite()).count();
    println!(
        "naive f16 decoder: {bad} of {} values not finite",
        naive.len()
    );
    assert!(bad > 0, "the naive decoder was expected to overflow");
}

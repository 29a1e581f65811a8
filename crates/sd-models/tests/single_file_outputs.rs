//! A single-file checkpoint gives the same outputs as its diffusers folder: the tiny SD 1.x
//! and 2.x fixtures of tools/fixtures/single_file_fixtures.py, whose single file holds the
//! original CompVis key names, through the UNet and the VAE decoder, bit for bit; and the
//! text-to-image pipeline loaded from the single file draws the folder's images.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use sd_core::PredictionType;
use sd_models::CpuBackend;
use sd_models::backend::DataOps;
use sd_models::clip::{ClipTextModel, ClipTokenizer};
use sd_models::pipeline::{Control, LoadOptions, Outcome, Params, SamplerChoice, StableDiffusion};
use sd_models::unet::{Unet2DConditionConfig, Unet2DConditionModel};
use sd_models::vae::{AutoencoderKl, AutoencoderKlConfig};
use sd_models::weights::compvis::{Component, SingleFileOptions};
use sd_models::weights::{LoadDType, Variant};
use serde_json::{Map, Value};

use common::fixtures::{scratch_dir, write_whole};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/single_file")
}

/// The fixture's overrides (head and group counts the tiny widths do not share with the
/// real models).
fn options(name: &str) -> SingleFileOptions {
    let text = std::fs::read_to_string(fixtures().join(name).join("overrides.json")).unwrap();
    let overrides: Map<String, Value> = serde_json::from_str(&text).unwrap();
    let mut options = SingleFileOptions::new().dtype(LoadDType::F32).strict(true);
    for component in Component::ALL {
        if let Some(fields) = overrides.get(component.name()) {
            options = options.override_config(component, fields.clone());
        }
    }
    options
}

fn input(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32) * 0.731 + seed).sin()).collect()
}

#[test]
fn single_files_give_the_folder_outputs() {
    let cpu = CpuBackend::new();
    for name in ["sd1", "sd2"] {
        let single = options(name)
            .open(fixtures().join(name).join("model.safetensors"))
            .unwrap();

        let folder_unet = Unet2DConditionModel::from_dir(
            &cpu,
            fixtures().join(name).join("unet"),
            &[Variant::Default],
            true,
        )
        .unwrap();
        let config = single.config(Component::Unet).unwrap();
        let config = Unet2DConditionConfig::from_json(
            &serde_json::to_string(config).unwrap(),
            "single-file unet",
        )
        .unwrap();
        let single_unet =
            Unet2DConditionModel::load(&cpu, single.unet(), config, LoadDType::F32).unwrap();
        let c = folder_unet.config().clone();
        let latent = cpu
            .upload(
                &input(c.in_channels * 16 * 16, 0.3),
                &[1, c.in_channels, 16, 16],
            )
            .unwrap();
        let context_width = c.cross_attention_dim.get(0).unwrap();
        let context = cpu
            .upload(&input(7 * context_width, 0.9), &[1, 7, context_width])
            .unwrap();
        let a = cpu
            .download(
                &folder_unet
                    .forward(&cpu, &latent, &[500.0], &context)
                    .unwrap(),
            )
            .unwrap();
        let b = cpu
            .download(
                &single_unet
                    .forward(&cpu, &latent, &[500.0], &context)
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(a, b, "{name}: UNet outputs differ");

        let folder_vae = AutoencoderKl::from_dir(
            &cpu,
            fixtures().join(name).join("vae"),
            &[Variant::Default],
            true,
        )
        .unwrap();
        let config = single.config(Component::Vae).unwrap();
        let config = AutoencoderKlConfig::from_json(
            &serde_json::to_string(config).unwrap(),
            "single-file vae",
        )
        .unwrap();
        let single_vae =
            AutoencoderKl::load(&cpu, single.vae().unwrap(), config, LoadDType::F32).unwrap();
        let lc = folder_vae.config().latent_channels;
        let z = cpu.upload(&input(lc * 8 * 8, 0.1), &[1, lc, 8, 8]).unwrap();
        let a = cpu.download(&folder_vae.decode(&cpu, &z).unwrap()).unwrap();
        let b = cpu.download(&single_vae.decode(&cpu, &z).unwrap()).unwrap();
        assert_eq!(a, b, "{name}: VAE decoder outputs differ");
        assert!(a.iter().all(|v| v.is_finite()));
    }
}

/// A tokenizer folder whose ids fit the fixtures' 100-token text encoders: the letters, the
/// letters ending a word, a few merges and the two special tokens (ids 98 and 99); anything
/// else is the unknown token. Written once per process (the tests run in parallel).
fn tiny_tokenizer() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(write_tiny_tokenizer).clone()
}

fn write_tiny_tokenizer() -> PathBuf {
    let dir = scratch_dir("sd-tiny-tokenizer");
    let merges = ["c a", "ca t</w>", "o w</w>", "l ow</w>", "r e", "re d</w>"];
    let mut tokens: Vec<String> = ('a'..='z').map(String::from).collect();
    tokens.extend(('a'..='z').map(|c| format!("{c}</w>")));
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    while tokens.len() < 98 {
        tokens.push(format!("x{}", tokens.len()));
    }
    tokens.push("<|startoftext|>".into());
    tokens.push("<|endoftext|>".into());
    let vocab: Map<String, Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| (t, Value::from(id)))
        .collect();
    let vocab = serde_json::to_string(&Value::Object(vocab)).unwrap();
    write_whole(&dir, "vocab.json", vocab.as_bytes());
    let merges = format!("#version: 0.2\n{}\n", merges.join("\n"));
    write_whole(&dir, "merges.txt", merges.as_bytes());
    dir
}

/// The fixture's overrides as pipeline load options.
fn load_options(name: &str, tokenizer: &std::path::Path) -> LoadOptions {
    LoadOptions {
        tokenizer: Some(tokenizer.to_path_buf()),
        single_file: options(name),
        strict: true,
        ..LoadOptions::default()
    }
}

fn image(pipe: &StableDiffusion<CpuBackend>, prompt: &str) -> Vec<f32> {
    let side = pipe.size_multiple() * 2;
    let params = Params {
        prompt: prompt.into(),
        negative_prompt: "red".into(),
        steps: 3,
        guidance_scale: 5.0,
        seed: 11,
        width: Some(side),
        height: Some(side),
        sampler: SamplerChoice::Name("Euler a".into()),
        ..Params::default()
    };
    match pipe.txt2img(&params, |_| Control::Continue).unwrap() {
        Outcome::Finished(g) => g.pixels,
        other => panic!("not finished: {other:?}"),
    }
}

#[test]
fn single_file_pipelines_draw_the_folder_images() {
    let tokenizer = tiny_tokenizer();
    for name in ["sd1", "sd2"] {
        let dir = fixtures().join(name);
        let options = load_options(name, &tokenizer);
        let single = StableDiffusion::from_single_file(
            CpuBackend::new(),
            dir.join("model.safetensors"),
            &options,
        )
        .unwrap();
        // `load` picks the single-file loader for a file.
        let loaded =
            StableDiffusion::load(CpuBackend::new(), dir.join("model.safetensors"), &options)
                .unwrap();

        let cpu = CpuBackend::new();
        let folder = StableDiffusion::from_parts(
            cpu,
            ClipTokenizer::from_dir(&tokenizer).unwrap(),
            ClipTextModel::from_dir(&cpu, dir.join("text_encoder"), &[Variant::Default], true)
                .unwrap(),
            Unet2DConditionModel::from_dir(&cpu, dir.join("unet"), &[Variant::Default], true)
                .unwrap(),
            AutoencoderKl::from_dir(&cpu, dir.join("vae"), &[Variant::Default], true).unwrap(),
            single.scheduler_config().clone(),
        )
        .unwrap();

        let expected = image(&folder, "a cat");
        assert!(expected.iter().all(|v| v.is_finite()));
        assert_eq!(image(&single, "a cat"), expected, "{name}: single file");
        assert_eq!(image(&loaded, "a cat"), expected, "{name}: load");
        assert_ne!(
            image(&single, "a red cat"),
            expected,
            "{name}: the prompt is used"
        );
    }
}

#[test]
fn single_file_prediction_type_follows_the_kind_unless_set() {
    let tokenizer = tiny_tokenizer();
    let path = fixtures().join("sd2").join("model.safetensors");
    let default = StableDiffusion::from_single_file(
        CpuBackend::new(),
        &path,
        &load_options("sd2", &tokenizer),
    )
    .unwrap();
    // diffusers' rule for SD 2.x text-to-image files.
    assert_eq!(
        default.scheduler_config().prediction_type,
        Some(PredictionType::VPrediction)
    );
    let mut options = load_options("sd2", &tokenizer);
    options.single_file = options.single_file.prediction_type(PredictionType::Epsilon);
    let epsilon = StableDiffusion::from_single_file(CpuBackend::new(), &path, &options).unwrap();
    assert_eq!(
        epsilon.scheduler_config().prediction_type,
        Some(PredictionType::Epsilon)
    );
    assert_ne!(image(&default, "a cat"), image(&epsilon, "a cat"));
}

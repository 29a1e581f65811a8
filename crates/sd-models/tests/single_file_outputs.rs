//! A single-file checkpoint gives the same outputs as its diffusers folder: the tiny SD 1.x
//! and 2.x fixtures of tools/fixtures/single_file_fixtures.py, whose single file holds the
//! original CompVis key names, through the UNet and the VAE decoder, bit for bit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use sd_models::CpuBackend;
use sd_models::backend::DataOps;
use sd_models::unet::{Unet2DConditionConfig, Unet2DConditionModel};
use sd_models::vae::{AutoencoderKl, AutoencoderKlConfig};
use sd_models::weights::compvis::{Component, SingleFileOptions};
use sd_models::weights::{LoadDType, Variant};
use serde_json::{Map, Value};

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

//! A whole Stable Diffusion 1.5 text-to-image generation on the CPU backend, with seeded
//! random weights (no real weights can be downloaded here): the time of each stage and the
//! process's peak resident memory, which is what decides whether a machine can run it.
//!
//! ```text
//! cargo bench -p sd-benches --bench generate -- [--size 512] [--steps 4] [--bf16] [--dtype f16]
//! cargo bench -p sd-benches --bench generate -- --xl [--size 1024] [--steps 2] [--tiling] --bf16 --dtype bf16
//! ```
//!
//! `--xl` builds Stable Diffusion XL base instead (the full-size configs of
//! `crates/sd-models/presets/sdxl`: CLIP ViT-L and OpenCLIP bigG, the 2.6 B-parameter UNet, the
//! VAE; the fixtures' tokenizers), at 1024x1024 unless `--size` says otherwise; `--tiling`
//! decodes in tiles.
//!
//! `--bf16` multiplies in bf16 (AVX512-BF16), which keeps the prepared weights in bf16;
//! `--dtype f16|bf16` hands the networks half-precision weights as a half-precision
//! checkpoint would. The tokenizer is the fixtures' copy of CLIP's vocabulary. Classifier-free
//! guidance runs the UNet at batch 2, as diffusers does.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Instant;

use sd_benches::{current_rss, peak_rss};
use sd_models::CpuBackend;
use sd_models::backend::DType;
use sd_models::clip::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use sd_models::nn::RandomWeights;
use sd_models::pipeline::{Control, Params, SamplerChoice, StableDiffusion};
use sd_models::unet::{Unet2DConditionConfig, Unet2DConditionModel};
use sd_models::vae::{AutoencoderKl, AutoencoderKlConfig};
use sd_schedulers::SchedulerConfig;

/// SDXL base's configs (the crate's presets).
const XL_TEXT_ENCODER: &str = include_str!("../../crates/sd-models/presets/sdxl/text_encoder.json");
const XL_TEXT_ENCODER_2: &str =
    include_str!("../../crates/sd-models/presets/sdxl/text_encoder_2.json");
const XL_VAE: &str = include_str!("../../crates/sd-models/presets/sdxl/vae.json");
const XL_SCHEDULER: &str = include_str!("../../crates/sd-models/presets/sdxl/scheduler.json");

/// A pipeline of `xl`'s architecture with seeded random weights of `dtype`.
fn build(cpu: CpuBackend, xl: bool, dtype: DType) -> StableDiffusion<CpuBackend> {
    let weights = RandomWeights::new(0).with_dtype(dtype);
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let clip = |json: &str, what: &str, projection: bool| {
        let config = ClipTextConfig::from_json(json, what).unwrap();
        ClipTextModel::random(&cpu, &weights, config, projection).unwrap()
    };
    if !xl {
        let tokenizer = ClipTokenizer::from_dir(fixtures.join("pipeline/sd1/tokenizer")).unwrap();
        let text_encoder = ClipTextModel::random(
            &cpu,
            &weights,
            ClipTextConfig::stable_diffusion_1_5().unwrap(),
            false,
        )
        .unwrap();
        let unet = Unet2DConditionModel::from_source(
            &cpu,
            &weights,
            Unet2DConditionConfig::stable_diffusion_1_5().unwrap(),
        )
        .unwrap();
        let vae = AutoencoderKl::from_source(
            &cpu,
            &weights,
            AutoencoderKlConfig::stable_diffusion_1_5().unwrap(),
        )
        .unwrap();
        let scheduler = SchedulerConfig::stable_diffusion_v1();
        return StableDiffusion::from_parts(cpu, tokenizer, text_encoder, unet, vae, scheduler)
            .unwrap();
    }
    let tokenizer = |name: &str| ClipTokenizer::from_dir(fixtures.join("sdxl/base").join(name));
    let first = (
        tokenizer("tokenizer").unwrap(),
        clip(XL_TEXT_ENCODER, "text_encoder", false),
    );
    let second = (
        tokenizer("tokenizer_2").unwrap(),
        clip(XL_TEXT_ENCODER_2, "text_encoder_2", true),
    );
    let unet = Unet2DConditionModel::from_source(
        &cpu,
        &weights,
        Unet2DConditionConfig::stable_diffusion_xl().unwrap(),
    )
    .unwrap();
    let vae_config = AutoencoderKlConfig::from_json(XL_VAE, "vae").unwrap();
    let vae = AutoencoderKl::from_source(&cpu, &weights, vae_config).unwrap();
    let scheduler = SchedulerConfig::from_json(XL_SCHEDULER).unwrap();
    StableDiffusion::from_parts_xl(cpu, first, second, unet, vae, scheduler).unwrap()
}

fn main() {
    let mut size = None;
    let mut steps = None;
    let mut xl = false;
    let mut tiling = false;
    let mut bf16 = false;
    let mut dtype = DType::F32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => size = Some(args.next().and_then(|v| v.parse().ok()).expect("--size N")),
            "--steps" => steps = Some(args.next().and_then(|v| v.parse().ok()).expect("--steps N")),
            "--xl" => xl = true,
            "--tiling" => tiling = true,
            "--bf16" => bf16 = true,
            "--dtype" => {
                dtype = sd_benches::parse_dtype(args.next().as_deref()).unwrap();
            }
            "--bench" => {}
            other => panic!("unknown argument {other:?}"),
        }
    }
    let size = size.unwrap_or(if xl { 1024 } else { 512 });
    let steps = steps.unwrap_or(if xl { 2 } else { 4 });
    let cpu = sd_benches::cpu_backend(bf16).expect("bf16 products need AVX512-BF16");
    let t0 = Instant::now();
    let pipe = build(cpu, xl, dtype);
    let built = t0.elapsed();
    let rss_built = peak_rss().unwrap_or(0);
    let rss_now = current_rss().unwrap_or(0);
    let params = Params {
        prompt: "a lighthouse on a cliff at dawn, oil painting".into(),
        steps,
        width: Some(size),
        height: Some(size),
        sampler: SamplerChoice::Name("DPM++ 2M".into()),
        vae_tiling: tiling,
        ..Params::default()
    };
    let t0 = Instant::now();
    let mut step_rss = 0;
    let outcome = pipe
        .txt2img(&params, |_| {
            step_rss = step_rss.max(peak_rss().unwrap_or(0));
            Control::Continue
        })
        .unwrap();
    let total = t0.elapsed();
    let g = outcome.into_generation().unwrap();
    let t = g.timings;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "{} txt2img {size}x{size}, {steps} steps of DPM++ 2M, guidance 7.5 ({} products, {dtype} weights given{})",
        if xl { "SDXL" } else { "SD 1.5" },
        if bf16 { "bf16" } else { "f32" },
        if tiling { ", tiled decoding" } else { "" }
    );
    println!(
        "  built in {:.1} s, peak RSS then {:.2} GiB, resident after building {:.2} GiB",
        built.as_secs_f64(),
        gib(rss_built),
        gib(rss_now)
    );
    println!(
        "  text encoding {:.0} ms, denoising {:.2} s ({:.2} s per step), decoding {:.2} s, total {:.2} s",
        t.text_encoding.as_secs_f64() * 1e3,
        t.denoising.as_secs_f64(),
        t.denoising.as_secs_f64() / steps as f64,
        t.decoding.as_secs_f64(),
        total.as_secs_f64()
    );
    println!(
        "  peak RSS {:.2} GiB (through the denoising steps {:.2} GiB)",
        gib(peak_rss().unwrap_or(0)),
        gib(step_rss)
    );
    assert_eq!(g.images.len(), 1);
    assert_eq!((g.images[0].width(), g.images[0].height()), (size, size));
}

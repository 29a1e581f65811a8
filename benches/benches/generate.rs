//! A whole Stable Diffusion 1.5 text-to-image generation on the CPU backend, with seeded
//! random weights (no real weights can be downloaded here): the time of each stage and the
//! process's peak resident memory, which is what decides whether a machine can run it.
//!
//! ```text
//! cargo bench -p sd-benches --bench generate -- [--size 512] [--steps 4] [--bf16] [--dtype f16]
//! ```
//!
//! `--bf16` multiplies in bf16 (AVX512-BF16), which keeps the prepared weights in bf16;
//! `--dtype f16|bf16` hands the networks half-precision weights as a half-precision
//! checkpoint would. The tokenizer is the fixtures' copy of CLIP's vocabulary. Classifier-free
//! guidance runs the UNet at batch 2, as diffusers does.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Instant;

use sd_benches::{current_rss, peak_rss};
use sd_models::backend::DType;
use sd_models::clip::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use sd_models::nn::RandomWeights;
use sd_models::pipeline::{Control, Params, SamplerChoice, StableDiffusion};
use sd_models::unet::{Unet2DConditionConfig, Unet2DConditionModel};
use sd_models::vae::{AutoencoderKl, AutoencoderKlConfig};
use sd_schedulers::SchedulerConfig;

fn main() {
    let mut size = 512;
    let mut steps = 4;
    let mut bf16 = false;
    let mut dtype = DType::F32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => size = args.next().and_then(|v| v.parse().ok()).expect("--size N"),
            "--steps" => steps = args.next().and_then(|v| v.parse().ok()).expect("--steps N"),
            "--bf16" => bf16 = true,
            "--dtype" => {
                dtype = sd_benches::parse_dtype(args.next().as_deref()).unwrap();
            }
            "--bench" => {}
            other => panic!("unknown argument {other:?}"),
        }
    }
    let cpu = sd_benches::cpu_backend(bf16).expect("bf16 products need AVX512-BF16");
    let t0 = Instant::now();
    let weights = RandomWeights::new(0).with_dtype(dtype);
    let tokenizer = ClipTokenizer::from_dir(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/pipeline/sd1/tokenizer"),
    )
    .unwrap();
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
    let pipe =
        StableDiffusion::from_parts(cpu, tokenizer, text_encoder, unet, vae, scheduler).unwrap();
    let built = t0.elapsed();
    let rss_built = peak_rss().unwrap_or(0);
    let rss_now = current_rss().unwrap_or(0);
    let params = Params {
        prompt: "a lighthouse on a cliff at dawn, oil painting".into(),
        steps,
        width: Some(size),
        height: Some(size),
        sampler: SamplerChoice::Name("DPM++ 2M".into()),
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
        "SD 1.5 txt2img {size}x{size}, {steps} steps of DPM++ 2M, guidance 7.5 ({} products, {dtype} weights given)",
        if bf16 { "bf16" } else { "f32" }
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

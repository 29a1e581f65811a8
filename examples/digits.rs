//! Draws handwritten digits with the small class-conditional DDPM embedded in the repository
//! (`assets/digits`): no download, a few seconds on two cores.
//!
//! ```text
//! cargo run --release --example digits
//! cargo run --release --example digits -- --per-class 4 --sampler "Euler a" --steps 30 -o grid.png
//! ```
//!
//! The grid has one row per digit, 0 at the top, and `--per-class` samples in each row. The
//! model is a diffusers `UNet2DModel` (1.1 M parameters) trained by `tools/digits/train.py`
//! on scikit-learn's 8x8 digits, upsampled to 16x16; it runs through sd-core's schedule,
//! an sd-schedulers sampler and sd-models' CPU backend.

#[path = "sd_cli.rs"]
mod sd_cli;

use std::error::Error;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use sd_models::CpuBackend;
use sd_models::cpu::CpuPrecision;
use sd_models::pipeline::{
    ClassGuidance, Image, PixelDiffusion, PixelParams, PixelSamples, SamplerChoice,
};

/// Draws a grid of handwritten digits 0 to 9 with the embedded digits model.
#[derive(Debug, Parser)]
struct Cli {
    /// Samples of each digit (one row per digit).
    #[arg(long, default_value_t = 10)]
    per_class: usize,
    /// Only these digits, e.g. "042" (default: 0 to 9).
    #[arg(long)]
    digits: Option<String>,
    /// Inference steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// The sampler ("DPM++ 2M", "Euler a", "DDIM", "DDPM", ...).
    #[arg(long, default_value = "DPM++ 2M")]
    sampler: String,
    /// The seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Each 16x16 sample is drawn this many times larger.
    #[arg(long, default_value_t = 4)]
    scale: usize,
    /// The output PNG.
    #[arg(long, short, default_value = "digits.png")]
    output: PathBuf,
    /// Replace the output file if it exists.
    #[arg(long)]
    overwrite: bool,
    /// The model folder (unet/ and scheduler/).
    #[arg(long, short, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/digits"))]
    model: PathBuf,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Multiply in bf16 (AVX512-BF16); an error on a CPU without it.
    #[arg(long)]
    bf16: bool,
    /// Classifier-free guidance scale, for a model trained with label dropout
    /// (`train-digits --label-dropout`): its last class is the null class.
    #[arg(long)]
    guidance: Option<f32>,
}

fn main() -> std::process::ExitCode {
    sd_cli::report(run(Cli::parse()))
}

fn run(cli: Cli) -> Result<(), Box<dyn Error>> {
    if !cli.overwrite && cli.output.exists() {
        return Err(format!(
            "{} exists; pass --overwrite to replace it",
            cli.output.display()
        )
        .into());
    }
    if cli.per_class == 0 || cli.scale == 0 {
        return Err("--per-class and --scale must be at least 1".into());
    }
    let digits: Vec<u32> = match &cli.digits {
        None => (0..10).collect(),
        Some(s) => s
            .chars()
            .map(|c| {
                c.to_digit(10)
                    .ok_or(format!("--digits: {c:?} is not a digit"))
            })
            .collect::<Result<_, _>>()?,
    };
    if digits.is_empty() {
        return Err("--digits: no digit given".into());
    }
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()?;
    }

    let t0 = Instant::now();
    let precision = if cli.bf16 {
        CpuPrecision::Bf16
    } else {
        CpuPrecision::F32
    };
    let pipe = PixelDiffusion::from_dir(CpuBackend::new().with_precision(precision)?, &cli.model)?;
    eprintln!("load:      {:.2} s", t0.elapsed().as_secs_f64());

    let classes: Vec<u32> = digits
        .iter()
        .flat_map(|&d| std::iter::repeat_n(d, cli.per_class))
        .collect();
    let params = PixelParams {
        classes,
        steps: cli.steps,
        sampler: SamplerChoice::Name(cli.sampler.clone()),
        seed: cli.seed,
        guidance: match (cli.guidance, pipe.num_classes()) {
            (None, _) => None,
            (Some(scale), Some(classes)) if classes > 10 => Some(ClassGuidance {
                scale,
                null_class: classes as u32 - 1,
            }),
            (Some(_), _) => {
                return Err(
                    "--guidance needs a model trained with label dropout (11 classes, the last the null class)"
                        .into(),
                );
            }
        },
        ..PixelParams::default()
    };
    let (bar, callback) = sd_cli::progress_bar();
    let outcome = pipe.sample(&params, callback)?;
    bar.finish();
    let samples = outcome.into_generation().ok_or("the run was cancelled")?;
    eprintln!(
        "denoising: {:.2} s ({} samples, {} steps of {})",
        samples.denoising.as_secs_f64(),
        samples.shape[0],
        samples.steps_run,
        cli.sampler
    );
    let grid = grid(&samples, cli.per_class, cli.scale)?;
    sd_cli::save(&grid, &cli.output, cli.overwrite)?;
    eprintln!(
        "wrote {} ({} rows of {})",
        cli.output.display(),
        digits.len(),
        cli.per_class
    );
    Ok(())
}

/// The samples in rows of `per_class`, each scaled up `scale` times (nearest neighbour) on
/// a grey background with a 2-pixel gap.
fn grid(samples: &PixelSamples, per_class: usize, scale: usize) -> Result<Image, Box<dyn Error>> {
    const GAP: usize = 2;
    let images = samples.to_images()?;
    let [n, _, h, w] = samples.shape;
    let rows = n / per_class;
    let (cw, ch) = (w * scale + GAP, h * scale + GAP);
    let (width, height) = (per_class * cw + GAP, rows * ch + GAP);
    let mut data = vec![96_u8; width * height * 3];
    for (i, img) in images.iter().enumerate() {
        let (x0, y0) = ((i % per_class) * cw + GAP, (i / per_class) * ch + GAP);
        for y in 0..h * scale {
            for x in 0..w * scale {
                let rgb = img.pixel(x / scale, y / scale).unwrap_or([0; 3]);
                let at = ((y0 + y) * width + x0 + x) * 3;
                data[at..at + 3].copy_from_slice(&rgb);
            }
        }
    }
    Ok(Image::new(width, height, data)?)
}

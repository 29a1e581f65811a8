//! What the image programs (`txt2img`, `img2img`, `inpaint`, `outpaint`, `controlnet`) share:
//! the common arguments, loading, ControlNets and their control images, the progress bar, PNG
//! in and out, and the timing report. Each program uses part of it.
#![allow(dead_code)]

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use sd_core::PredictionType;
use sd_cuda::{CudaBackend, CudaOptions};
use sd_models::backend::DType;
use sd_models::clip::LongPrompt;
use sd_models::cpu::CpuPrecision;
use sd_models::lora::Lora;
use sd_models::pipeline::{
    Control, ControlImage, Generation, Image, Limits, LoadOptions, Margins, Mask, Outcome, Params,
    Progress, SamplerChoice, SdxlParams, StableDiffusion,
};
use sd_models::weights::LoadDType;
use sd_models::weights::compvis::{Component, ModelKind, SingleFileOptions};
use sd_models::{Backend, CpuBackend};

/// What a single-file checkpoint's UNet predicts, by diffusers' names.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Predicts {
    /// The noise (SD 1.x, SD 2.x base at 512 pixels).
    Epsilon,
    /// The velocity (SD 2.x at 768 pixels).
    #[value(name = "v_prediction")]
    Velocity,
    /// The clean image.
    Sample,
}

impl From<Predicts> for PredictionType {
    fn from(p: Predicts) -> Self {
        match p {
            Predicts::Epsilon => PredictionType::Epsilon,
            Predicts::Velocity => PredictionType::VPrediction,
            Predicts::Sample => PredictionType::Sample,
        }
    }
}

/// A single file's Stable Diffusion version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// Stable Diffusion 1.x.
    Sd1,
    /// Stable Diffusion 2.x.
    Sd2,
    /// Stable Diffusion XL.
    Sdxl,
}

/// `WIDTHxHEIGHT`.
fn parse_size(text: &str) -> Result<(usize, usize), String> {
    let (w, h) = text
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{text:?}: expected WIDTHxHEIGHT, e.g. 1024x1024"))?;
    let n = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|e| format!("{text:?}: {v:?} is not a size ({e})"))
    };
    Ok((n(w)?, n(h)?))
}

/// `A,B`.
fn parse_pair(text: &str) -> Result<(usize, usize), String> {
    let (a, b) = text
        .split_once(',')
        .ok_or_else(|| format!("{text:?}: expected two numbers A,B"))?;
    let n = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|e| format!("{text:?}: {v:?} is not a number ({e})"))
    };
    Ok((n(a)?, n(b)?))
}

/// `COMPONENT.KEY=VALUE` as a component and a one-field JSON object.
fn config_override(text: &str) -> Result<(Component, serde_json::Value), Box<dyn Error>> {
    let bad = || {
        format!(
            "--config-override {text:?}: expected COMPONENT.KEY=VALUE with COMPONENT unet, vae, \
             text_encoder or text_encoder_2"
        )
    };
    let (target, value) = text.split_once('=').ok_or_else(bad)?;
    let (component, key) = target.split_once('.').ok_or_else(bad)?;
    let component = match component {
        "unet" => Component::Unet,
        "vae" => Component::Vae,
        "text_encoder" => Component::TextEncoder,
        "text_encoder_2" => Component::TextEncoder2,
        _ => return Err(bad().into()),
    };
    // A bare word is a string; anything else is read as JSON.
    let value =
        serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
    Ok((component, serde_json::json!({ key: value })))
}

/// Where the networks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// The CPU backend (AVX-512, AVX2 or portable kernels, chosen at run time).
    Cpu,
    /// A CUDA GPU (sd-cuda: the NVIDIA driver, NVRTC and cuBLAS, found at run time).
    Cuda,
}

/// What a program asks of the pipeline, with the inputs it names.
#[derive(Debug)]
pub enum Work {
    /// Text-to-image, at the model's size unless given.
    TextToImage {
        /// Width in pixels.
        width: Option<usize>,
        /// Height in pixels.
        height: Option<usize>,
    },
    /// Image-to-image from a PNG.
    ImageToImage {
        /// The input image.
        image: PathBuf,
        /// How much to change it, in [0, 1].
        strength: f64,
    },
    /// Inpainting the white part of a mask.
    Inpaint {
        /// The input image.
        image: PathBuf,
        /// The mask (white is repainted).
        mask: PathBuf,
        /// How much to change the masked region, in [0, 1].
        strength: f64,
    },
    /// Outpainting: the canvas extended by margins.
    Outpaint {
        /// The input image.
        image: PathBuf,
        /// Pixels added on each side.
        margins: Margins,
    },
}

impl Work {
    /// Fails, naming the file, if an input image or mask is missing: before the model takes
    /// its time to load.
    fn check_inputs(&self) -> Result<(), Box<dyn Error>> {
        let paths: Vec<&Path> = match self {
            Work::TextToImage { .. } => vec![],
            Work::ImageToImage { image, .. } | Work::Outpaint { image, .. } => vec![image],
            Work::Inpaint { image, mask, .. } => vec![image, mask],
        };
        for p in paths {
            match std::fs::metadata(p) {
                Err(e) => return Err(format!("{}: {e}", p.display()).into()),
                Ok(m) if !m.is_file() => {
                    return Err(format!("{}: not a regular file", p.display()).into());
                }
                Ok(_) => {}
            }
        }
        Ok(())
    }
}

/// ControlNets and their control images (the `controlnet` program's arguments).
#[derive(Debug, Args, Default)]
pub struct ControlArgs {
    /// A ControlNet: a diffusers folder or an original single file (lllyasviel's
    /// `control_*.safetensors`). Repeat it for several ControlNets.
    #[arg(long = "control", required = true)]
    pub nets: Vec<PathBuf>,
    /// The control image of each ControlNet, in the same order (resized to the output size).
    #[arg(long = "control-image", required = true)]
    pub images: Vec<PathBuf>,
    /// The conditioning scale: one for every ControlNet, or one each.
    #[arg(long = "control-scale")]
    pub scales: Vec<f64>,
    /// The fraction of the steps before which the ControlNets do not act: one, or one each.
    #[arg(long = "control-start")]
    pub starts: Vec<f64>,
    /// The fraction of the steps after which they stop acting: one, or one each.
    #[arg(long = "control-end")]
    pub ends: Vec<f64>,
    /// Guess mode: the ControlNets act on the prompt's half of the guidance only, strongly
    /// enough to steer the picture with an empty prompt.
    #[arg(long)]
    pub guess_mode: bool,
    /// Make each control image a Canny edge map of it first (for a Canny ControlNet and a
    /// photo).
    #[arg(long)]
    pub canny: bool,
    /// The Canny detector's low threshold (gradient magnitude).
    #[arg(long, default_value_t = 100.0)]
    pub canny_low: f32,
    /// The Canny detector's high threshold.
    #[arg(long, default_value_t = 200.0)]
    pub canny_high: f32,
    /// Also write the control images as the ControlNets see them (NAME-control-K.png beside
    /// the output).
    #[arg(long)]
    pub save_control: bool,
}

impl ControlArgs {
    /// Fails, naming it, on a missing file or a count that does not fit the ControlNets.
    fn check(&self) -> Result<(), Box<dyn Error>> {
        let n = self.nets.len();
        if self.images.len() != n {
            return Err(format!(
                "{} --control-image for {n} --control: give one control image per ControlNet",
                self.images.len()
            )
            .into());
        }
        for (what, v) in [
            ("--control-scale", &self.scales),
            ("--control-start", &self.starts),
            ("--control-end", &self.ends),
        ] {
            if v.len() > 1 && v.len() != n {
                return Err(format!(
                    "{} {what} for {n} ControlNets: give one, or one each",
                    v.len()
                )
                .into());
            }
        }
        if !(self.canny_low.is_finite() && self.canny_high.is_finite())
            || self.canny_low < 0.0
            || self.canny_low > self.canny_high
        {
            return Err(format!(
                "--canny-low {} and --canny-high {}: need 0 <= low <= high",
                self.canny_low, self.canny_high
            )
            .into());
        }
        match self.nets.iter().chain(&self.images).find(|p| !p.exists()) {
            Some(p) => Err(format!("{}: no such file", p.display()).into()),
            None => Ok(()),
        }
    }

    /// The `k`th value of a per-ControlNet option, or its default.
    fn nth(values: &[f64], k: usize, default: f64) -> f64 {
        match values {
            [] => default,
            [one] => *one,
            each => each[k],
        }
    }

    /// The control images at `width x height`, made edge maps with `--canny`.
    fn control_images(
        &self,
        width: usize,
        height: usize,
    ) -> Result<Vec<ControlImage>, Box<dyn Error>> {
        self.images
            .iter()
            .enumerate()
            .map(|(k, path)| {
                let rgb = open_rgb(path)?;
                let rgb = if (rgb.width() as usize, rgb.height() as usize) == (width, height) {
                    rgb
                } else {
                    image::imageops::resize(
                        &rgb,
                        width as u32,
                        height as u32,
                        image::imageops::FilterType::Lanczos3,
                    )
                };
                let rgb = if self.canny {
                    canny(&rgb, self.canny_low, self.canny_high)
                } else {
                    rgb
                };
                Ok(ControlImage {
                    image: Image::new(width, height, rgb.into_raw())?,
                    scale: Self::nth(&self.scales, k, 1.0),
                    start: Self::nth(&self.starts, k, 0.0),
                    end: Self::nth(&self.ends, k, 1.0),
                })
            })
            .collect()
    }
}

/// The Canny edge map of an image (its luma, edges white on black, in all three channels),
/// with `low` and `high` hysteresis thresholds on the gradient magnitude.
pub fn canny(rgb: &image::RgbImage, low: f32, high: f32) -> image::RgbImage {
    let grey = image::DynamicImage::ImageRgb8(rgb.clone()).to_luma8();
    let edges = imageproc::edges::canny(&grey, low, high);
    image::DynamicImage::ImageLuma8(edges).to_rgb8()
}

/// What to do with a prompt longer than the text encoder's 75 tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LongPromptArg {
    /// Keep the first 75 tokens (diffusers), with a warning.
    Truncate,
    /// Encode every token, in chunks of 75 joined along the sequence.
    Chunks,
}

/// The arguments every image program takes.
#[derive(Debug, Args)]
pub struct Common {
    /// The model: a diffusers folder (model_index.json, unet/, vae/, ...) or a single
    /// .safetensors checkpoint.
    #[arg(long, short)]
    pub model: PathBuf,
    /// The prompt.
    #[arg(long, short)]
    pub prompt: String,
    /// The negative prompt (empty: SDXL uses zero embeddings, as diffusers).
    #[arg(long, short, default_value = "")]
    pub negative: String,
    /// SDXL: the second text encoder's prompt (default: the prompt).
    #[arg(long)]
    pub prompt_2: Option<String>,
    /// SDXL: the second text encoder's negative prompt (default: the negative prompt).
    #[arg(long)]
    pub negative_2: Option<String>,
    /// SDXL: the original size the model is told of, WIDTHxHEIGHT (default: the output's).
    #[arg(long, value_parser = parse_size)]
    pub original_size: Option<(usize, usize)>,
    /// SDXL: the target size the model is told of, WIDTHxHEIGHT (default: the output's).
    #[arg(long, value_parser = parse_size)]
    pub target_size: Option<(usize, usize)>,
    /// SDXL: the crop's top-left corner the model is told of, TOP,LEFT in pixels.
    #[arg(long, value_parser = parse_pair, default_value = "0,0")]
    pub crop_top_left: (usize, usize),
    /// SDXL text-to-image: a refiner model (folder or single file) that finishes each
    /// image: the base runs the schedule up to --refiner-start and hands its latents over
    /// (diffusers' denoising_end / denoising_start).
    #[arg(long)]
    pub refiner: Option<PathBuf>,
    /// With --refiner: the fraction of the schedule after which the refiner takes over.
    #[arg(long, default_value_t = 0.8)]
    pub refiner_start: f64,
    /// Inference steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (at most 1: no guidance).
    #[arg(long, short, default_value_t = 7.5)]
    pub guidance: f64,
    /// Guidance rescale in [0, 1].
    #[arg(long, default_value_t = 0.0)]
    pub guidance_rescale: f64,
    /// The sampler ("Euler a", "DPM++ 2M Karras", "DDIM", ...); the model's own if absent.
    #[arg(long)]
    pub sampler: Option<String>,
    /// The seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images to generate.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Images per generation (0: as many as fit 8 images of 512x512). More --num-images
    /// than that run as several generations seeded --seed, --seed + 1, ..., each written as
    /// it finishes, so that many images take one batch's memory.
    #[arg(long, default_value_t = 0)]
    pub batch_size: usize,
    /// CLIP layers to skip from the end.
    #[arg(long, default_value_t = 0)]
    pub clip_skip: usize,
    /// Read the prompts as plain text, not in AUTOMATIC1111's weighting syntax (`(word)`,
    /// `[word]`, `(word:1.5)`, `BREAK`), which is read by default.
    #[arg(long)]
    pub plain_prompt: bool,
    /// Plain prompts longer than the text encoder's 75 tokens: cut them (with a warning), or
    /// encode them in chunks (weighted prompts are always chunked).
    #[arg(long, value_enum, default_value_t = LongPromptArg::Truncate)]
    pub long_prompt: LongPromptArg,
    /// The output PNG (several images: NAME-1.png, NAME-2.png, ...).
    #[arg(long, short, default_value = "out.png")]
    pub output: PathBuf,
    /// Replace existing output files.
    #[arg(long)]
    pub overwrite: bool,
    /// Prefer the fp16 variant weight files, and keep half-precision weights in half
    /// precision in memory (half the memory; products still in f32 unless --bf16).
    #[arg(long)]
    pub fp16: bool,
    /// Multiply in bf16 (AVX512-BF16; about twice as fast, weights kept in bf16); an error
    /// on a CPU without it.
    #[arg(long)]
    pub bf16: bool,
    /// A LoRA to apply, as FILE or FILE:MULTIPLIER (kohya/AUTOMATIC1111 or diffusers/PEFT
    /// .safetensors). Repeatable.
    #[arg(long = "lora")]
    pub loras: Vec<String>,
    /// Where `<lora:NAME:MULTIPLIER>` tags in the prompt find NAME.safetensors.
    #[arg(long)]
    pub lora_dir: Option<PathBuf>,
    /// A folder of textual inversion embeddings (.safetensors, diffusers' or AUTOMATIC1111's
    /// layout): each becomes usable in prompts by its token (diffusers' files) or its file
    /// name (AUTOMATIC1111's). Pickles (.pt, .bin) are skipped with a warning.
    #[arg(long)]
    pub embeddings: Option<PathBuf>,
    /// The tokenizer folder (required for a single-file checkpoint).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// What a single-file checkpoint's UNet predicts, instead of the default for its kind
    /// (diffusers' rule: v_prediction for SD 2.x text-to-image files, else epsilon).
    #[arg(long, value_enum)]
    pub prediction_type: Option<Predicts>,
    /// A single-file checkpoint's Stable Diffusion version, where its weights do not show it.
    #[arg(long, value_enum)]
    pub kind: Option<KindArg>,
    /// A single-file checkpoint's config field that its weights cannot show, as
    /// COMPONENT.KEY=VALUE (unet, vae or text_encoder; VALUE in JSON), e.g.
    /// `unet.norm_num_groups=32`. Repeatable.
    #[arg(long = "config-override")]
    pub config_overrides: Vec<String>,
    /// Check that every weight is finite before loading (a second pass over the files).
    #[arg(long)]
    pub check_weights: bool,
    /// Load a single-file checkpoint's EMA copy of the UNet (`model_ema.*`).
    #[arg(long)]
    pub ema: bool,
    /// Worker threads (default: one per core; at most the machine's logical CPUs unless
    /// --oversubscribe).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Allow more --threads than the machine has logical CPUs.
    #[arg(long)]
    pub oversubscribe: bool,
    /// The largest width or height accepted, in pixels (a guard against typos; raise it for
    /// larger images).
    #[arg(long, default_value_t = Limits::default().max_side)]
    pub max_side: usize,
    /// The most images one run may make.
    #[arg(long, default_value_t = Limits::default().max_images)]
    pub max_images: usize,
    /// The most inference steps.
    #[arg(long, default_value_t = Limits::default().max_steps)]
    pub max_steps: usize,
    /// Where the networks run. On `cuda`, `--fp16` or `--bf16` keeps weights and
    /// activations in that type on the GPU (f32 otherwise).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// The CUDA device's ordinal (with `--device cuda`).
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
}

impl Common {
    /// The pipeline parameters (width and height set by the caller).
    pub fn params(&self) -> Params {
        Params {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative.clone(),
            steps: self.steps,
            guidance_scale: self.guidance,
            guidance_rescale: self.guidance_rescale,
            sampler: self
                .sampler
                .clone()
                .map_or(SamplerChoice::Model, SamplerChoice::Name),
            seed: self.seed,
            num_images: self.num_images,
            clip_skip: self.clip_skip,
            limits: self.limits(),
            max_batch: self.batch_size,
            prompt_weighting: !self.plain_prompt,
            long_prompt: match self.long_prompt {
                LongPromptArg::Truncate => LongPrompt::Truncate,
                LongPromptArg::Chunks => LongPrompt::Chunks,
            },
            sdxl: SdxlParams {
                prompt_2: self.prompt_2.clone(),
                negative_prompt_2: self.negative_2.clone(),
                // diffusers' sizes are (height, width).
                original_size: self.original_size.map(|(w, h)| (h, w)),
                target_size: self.target_size.map(|(w, h)| (h, w)),
                crops_coords_top_left: self.crop_top_left,
                ..SdxlParams::default()
            },
            ..Params::default()
        }
    }

    /// The limits of `--max-side`, `--max-images` and `--max-steps`.
    pub fn limits(&self) -> Limits {
        Limits {
            max_side: self.max_side,
            max_pixels: self.max_side.saturating_mul(self.max_side),
            max_images: self.max_images,
            max_steps: self.max_steps,
        }
    }

    /// The output files, refused if one exists and `--overwrite` is not given.
    pub fn outputs(&self) -> Result<Vec<PathBuf>, Box<dyn Error>> {
        // Before anything is allocated per image.
        self.limits().check_counts(self.num_images, self.steps)?;
        let paths: Vec<PathBuf> = if self.num_images == 1 {
            vec![self.output.clone()]
        } else {
            let stem = self
                .output
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy();
            let ext = self
                .output
                .extension()
                .unwrap_or_default()
                .to_string_lossy();
            (1..=self.num_images)
                .map(|i| self.output.with_file_name(format!("{stem}-{i}.{ext}")))
                .collect()
        };
        for p in &paths {
            if !self.overwrite && std::fs::symlink_metadata(p).is_ok() {
                return Err(
                    format!("{} exists; pass --overwrite to replace it", p.display()).into(),
                );
            }
            // Before the model takes its time to load: the folder exists and can be written.
            sd_models::files::check_writable(p, self.overwrite)?;
        }
        Ok(paths)
    }

    /// Checks the outputs, sets the thread count, loads the model on the chosen device
    /// (reporting how long it took), does `work` on it and writes its images.
    ///
    /// # Errors
    /// An existing output without `--overwrite`, a device, model or input that cannot be
    /// loaded, and the pipeline's errors.
    pub fn run(&self, work: &Work) -> Result<(), Box<dyn Error>> {
        self.run_controlled(work, None)
    }

    /// [`run`](Self::run) with ControlNets.
    ///
    /// # Errors
    /// As [`run`](Self::run); missing control files or counts that do not fit.
    pub fn run_controlled(
        &self,
        work: &Work,
        controls: Option<&ControlArgs>,
    ) -> Result<(), Box<dyn Error>> {
        let outputs = self.outputs()?;
        work.check_inputs()?;
        if let Some(c) = controls {
            c.check()?;
        }
        if let Some(n) = self.threads {
            let cpus = std::thread::available_parallelism().map_or(1, usize::from);
            if n == 0 || (n > cpus && !self.oversubscribe) {
                return Err(format!(
                    "--threads {n}: this machine has {cpus} logical CPUs (pass --oversubscribe \
                     for more threads than that)"
                )
                .into());
            }
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global()?;
        }
        match self.device {
            Device::Cpu => {
                let precision = if self.bf16 {
                    CpuPrecision::Bf16
                } else {
                    CpuPrecision::F32
                };
                let weights = if self.fp16 {
                    LoadDType::Stored
                } else {
                    LoadDType::F32
                };
                let backend = CpuBackend::new().with_precision(precision)?;
                let refiner = self.load_refiner(&backend, weights)?;
                self.run_on(
                    self.load(backend, weights, controls)?,
                    refiner,
                    work,
                    controls,
                    &outputs,
                )
            }
            Device::Cuda => {
                let (dtype, weights) = match (self.bf16, self.fp16) {
                    (true, _) => (DType::BF16, LoadDType::BF16),
                    (false, true) => (DType::F16, LoadDType::F16),
                    (false, false) => (DType::F32, LoadDType::F32),
                };
                let options = CudaOptions::new(self.gpu).with_upload_dtype(dtype);
                let backend = CudaBackend::with_options(options)?;
                eprintln!("device:        {} ({dtype})", backend.device_name());
                let refiner = self.load_refiner(&backend, weights)?;
                self.run_on(
                    self.load(backend, weights, controls)?,
                    refiner,
                    work,
                    controls,
                    &outputs,
                )
            }
        }
    }

    /// Does `work` on `pipe`, with a progress bar, writing the images to `outputs` as each
    /// generation finishes. More images than `--batch-size` (or than fit 8 images of
    /// 512x512) run as several generations, seeded `--seed`, `--seed + 1`, ..., so that
    /// memory stays one batch's.
    fn run_on<B: Backend>(
        &self,
        mut pipe: StableDiffusion<B>,
        refiner: Option<StableDiffusion<B>>,
        work: &Work,
        controls: Option<&ControlArgs>,
        outputs: &[PathBuf],
    ) -> Result<(), Box<dyn Error>> {
        let mut params = self.params();
        if refiner.is_some() && !matches!(work, Work::TextToImage { .. }) {
            return Err("--refiner finishes text-to-image only".into());
        }
        self.apply_loras(&mut pipe, &mut params)?;
        let tokenizer = pipe.tokenizer();
        let window = tokenizer.max_length() - 2;
        for (what, text) in [
            ("prompt", &params.prompt),
            ("negative prompt", &params.negative_prompt),
        ] {
            let n = tokenizer.token_count(text)?;
            if n > window && !params.prompt_weighting && params.long_prompt == LongPrompt::Truncate
            {
                eprintln!(
                    "warning: the {what} is {n} tokens; the text encoder sees the first {window} \
                     (--long-prompt chunks encodes all of them)"
                );
            }
        }
        let multiple = pipe.size_multiple();
        // The inputs, read once for every generation.
        let (image, mask) = match work {
            Work::TextToImage { .. } => (None, None),
            Work::ImageToImage { image, .. } | Work::Outpaint { image, .. } => {
                (Some(load_image(image, multiple)?), None)
            }
            Work::Inpaint { image, mask, .. } => {
                let image = load_image(image, multiple)?;
                let mask = load_mask(mask, image.width(), image.height())?;
                (Some(image), Some(mask))
            }
        };
        // The output size: the input image's, else the one asked for, else the first
        // control image's (as diffusers' ControlNet pipeline), else the model's.
        let size = match work {
            Work::TextToImage { width, height } => {
                let control = match controls.and_then(|c| c.images.first()) {
                    Some(path) => {
                        let rgb = open_rgb(path)?;
                        let round = |v: u32| (v as usize / multiple * multiple).max(multiple);
                        Some((round(rgb.width()), round(rgb.height())))
                    }
                    None => None,
                };
                let (dw, dh) = control.unwrap_or_else(|| pipe.default_size());
                (width.unwrap_or(dw), height.unwrap_or(dh))
            }
            Work::ImageToImage { .. } | Work::Inpaint { .. } => image
                .as_ref()
                .map_or((0, 0), |image| (image.width(), image.height())),
            Work::Outpaint { .. } if controls.is_some() => {
                return Err("ControlNets with outpainting are not supported".into());
            }
            Work::Outpaint { .. } => (0, 0),
        };
        if let Some(c) = controls {
            params.controls = c.control_images(size.0, size.1)?;
            params.guess_mode = c.guess_mode;
            if c.save_control {
                for (k, control) in params.controls.iter().enumerate() {
                    let stem = self
                        .output
                        .file_stem()
                        .unwrap_or_default()
                        .to_string_lossy();
                    let path = self
                        .output
                        .with_file_name(format!("{stem}-control-{}.png", k + 1));
                    save(&control.image, &path, self.overwrite)?;
                    eprintln!("wrote {}", path.display());
                }
            }
        }
        if matches!(work, Work::TextToImage { .. }) {
            params.width = Some(size.0);
            params.height = Some(size.1);
        }
        let per_run = match self.batch_size {
            0 => pipe.images_per_call(size.0, size.1),
            b => b,
        };
        for (k, paths) in outputs.chunks(per_run).enumerate() {
            params.num_images = paths.len();
            params.seed = self.seed.wrapping_add(k as u64);
            let (bar, progress) = progress_bar();
            let outcome = match (work, &image, &mask) {
                (Work::TextToImage { .. }, _, _) => match &refiner {
                    None => pipe.txt2img(&params, progress)?,
                    Some(refiner) => {
                        let base = Params {
                            denoising_end: Some(self.refiner_start),
                            latents_only: true,
                            ..params.clone()
                        };
                        let Some(handoff) = pipe.txt2img(&base, progress)?.into_generation() else {
                            return Err("cancelled".into());
                        };
                        bar.finish();
                        eprintln!("refiner:       from {} of the schedule", self.refiner_start);
                        let (refiner_bar, progress) = progress_bar();
                        let finish = Params {
                            denoising_start: Some(self.refiner_start),
                            ..params.clone()
                        };
                        let latents = &handoff.latents;
                        let outcome = refiner.img2img_latents(
                            &finish,
                            latents,
                            handoff.latent_shape,
                            1.0,
                            progress,
                        )?;
                        refiner_bar.finish();
                        outcome
                    }
                },
                (Work::ImageToImage { strength, .. }, Some(image), _) => {
                    pipe.img2img(&params, image, *strength, progress)?
                }
                (Work::Inpaint { strength, .. }, Some(image), Some(mask)) => {
                    pipe.inpaint(&params, image, mask, *strength, progress)?
                }
                (Work::Outpaint { margins, .. }, Some(image), _) => {
                    pipe.outpaint(&params, image, *margins, progress)?
                }
                _ => return Err("an input image is missing".into()),
            };
            bar.finish();
            finish(outcome, paths, self.overwrite)?;
        }
        Ok(())
    }

    /// Applies the `--lora` files and the prompt's `<lora:NAME:MULTIPLIER>` tags (taken out
    /// of the prompt, found in `--lora-dir`), reporting what matched.
    fn apply_loras<B: Backend>(
        &self,
        pipe: &mut StableDiffusion<B>,
        params: &mut Params,
    ) -> Result<(), Box<dyn Error>> {
        let (prompt, tags) = sd_models::clip::extract_loras(&params.prompt);
        params.prompt = prompt;
        let mut loras = Vec::new();
        for spec in &self.loras {
            // FILE:MULTIPLIER, where a last ":number" is the multiplier.
            let (file, multiplier) = match spec.rsplit_once(':') {
                Some((f, m)) if m.parse::<f64>().is_ok() => (f, m.parse::<f64>()?),
                _ => (spec.as_str(), 1.0),
            };
            loras.push(Lora::open(file)?.with_multiplier(multiplier));
        }
        for (name, multiplier) in tags {
            let dir = self.lora_dir.as_ref().ok_or_else(|| {
                format!("the prompt asks for <lora:{name}>: give the folder with --lora-dir")
            })?;
            let file = dir.join(format!("{name}.safetensors"));
            loras.push(Lora::open(&file)?.with_multiplier(multiplier));
        }
        if loras.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let report = pipe.set_loras(&loras, false)?;
        eprintln!(
            "lora:          {} updates applied ({})",
            report.matched,
            secs(t0.elapsed())
        );
        for key in &report.unmatched {
            eprintln!("warning: LoRA key matched no weight: {key}");
        }
        Ok(())
    }

    /// Loads the model on `backend` with the weights in `weights`, and reports how long it
    /// took.
    fn load<B: Backend>(
        &self,
        backend: B,
        weights: LoadDType,
        controls: Option<&ControlArgs>,
    ) -> Result<StableDiffusion<B>, Box<dyn Error>> {
        let t0 = Instant::now();
        let options = self.load_options(weights)?;
        let mut pipe = StableDiffusion::load(backend, &self.model, &options)?;
        for net in controls.map(|c| c.nets.as_slice()).unwrap_or_default() {
            pipe = pipe.load_controlnet(net, &options)?;
        }
        if let Some(dir) = &self.embeddings {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            for file in files {
                let ext = file
                    .extension()
                    .map(|e| e.to_string_lossy().to_lowercase())
                    .unwrap_or_default();
                if ext == "safetensors" {
                    match pipe.load_textual_inversion(&file, None) {
                        Ok(tokens) => {
                            eprintln!("embedding:     {} ({})", tokens[0], file.display());
                        }
                        // A name that is already a word: one file skipped, not the run.
                        Err(e @ sd_models::Error::Tokenizer(_)) => {
                            eprintln!("warning: skipping {}: {e}", file.display());
                        }
                        Err(e) => return Err(e.into()),
                    }
                } else if let Some(why) = sd_models::files::pickle_message(&file) {
                    eprintln!("warning: skipping {}: {why}", file.display());
                }
            }
        }
        for key in pipe.unknown_keys() {
            eprintln!("warning: unknown config key {key}");
        }
        eprintln!("load:          {}", secs(t0.elapsed()));
        Ok(pipe)
    }

    /// The `--refiner` model, if one is given, on a copy of `backend`.
    fn load_refiner<B: Backend>(
        &self,
        backend: &B,
        weights: LoadDType,
    ) -> Result<Option<StableDiffusion<B>>, Box<dyn Error>> {
        let Some(path) = &self.refiner else {
            return Ok(None);
        };
        let t0 = Instant::now();
        let refiner = StableDiffusion::load(backend.clone(), path, &self.load_options(weights)?)?;
        if !refiner.is_xl() {
            return Err(format!("--refiner {}: not an SDXL model", path.display()).into());
        }
        eprintln!("refiner load:  {}", secs(t0.elapsed()));
        Ok(Some(refiner))
    }

    /// The load options of the command line, with the weights kept in `weights`.
    fn load_options(&self, weights: LoadDType) -> Result<LoadOptions, Box<dyn Error>> {
        let mut single_file = SingleFileOptions::new().ema(self.ema);
        if let Some(kind) = self.kind {
            let inpainting = false;
            single_file = single_file.kind(match kind {
                KindArg::Sdxl => ModelKind::Sdxl,
                _ => ModelKind::new(kind == KindArg::Sd2, inpainting),
            });
        }
        for text in &self.config_overrides {
            let (component, fields) = config_override(text)?;
            single_file = single_file.override_config(component, fields);
        }
        if let Some(p) = self.prediction_type {
            single_file = single_file.prediction_type(p.into());
        }
        Ok(LoadOptions {
            single_file,
            fp16_variant: self.fp16,
            strict: false,
            check_weights: self.check_weights,
            tokenizer: self.tokenizer.clone(),
            weights,
        })
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// A progress bar over the steps, as a pipeline callback.
pub fn progress_bar() -> (ProgressBar, impl FnMut(&Progress<'_>) -> Control) {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps [{elapsed} < {eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let b = bar.clone();
    let callback = move |p: &Progress<'_>| {
        b.set_length(p.steps as u64);
        b.set_position(p.step as u64 + 1);
        Control::Continue
    };
    (bar, callback)
}

/// Writes the images of an outcome and reports the stages' times.
pub fn finish(
    outcome: Outcome,
    outputs: &[PathBuf],
    overwrite: bool,
) -> Result<(), Box<dyn Error>> {
    let generation: Generation = outcome.into_generation().ok_or("the run was cancelled")?;
    let t = generation.timings;
    eprintln!("text encoding: {}", secs(t.text_encoding));
    if !t.image_encoding.is_zero() {
        eprintln!("image encoding: {}", secs(t.image_encoding));
    }
    eprintln!(
        "denoising:     {} ({} steps)",
        secs(t.denoising),
        generation.steps_run
    );
    eprintln!("decoding:      {}", secs(t.decoding));
    for (image, path) in generation.images.iter().zip(outputs) {
        save(image, path, overwrite)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Writes `image` to `path` as PNG, atomically (a failure leaves no partial file and an
/// existing one whole); an existing file is replaced only with `overwrite`.
pub fn save(image: &Image, path: &Path, overwrite: bool) -> Result<(), Box<dyn Error>> {
    if overwrite {
        image.save(path)?;
    } else {
        image.save_new(path)?;
    }
    Ok(())
}

/// Reads an image file as RGB; the error names the file.
fn open_rgb(path: &Path) -> Result<image::RgbImage, Box<dyn Error>> {
    // Only regular files, within the library's decoding limits; errors name the file.
    let image = Image::open(path)?;
    let (w, h) = (image.width() as u32, image.height() as u32);
    Ok(
        image::RgbImage::from_raw(w, h, image.into_raw())
            .ok_or("image buffer of the wrong size")?,
    )
}

/// Reads an RGB image, resized down (Lanczos, as diffusers' default resampling) to the
/// nearest multiple of what the model needs, if it is not one already.
pub fn load_image(path: &Path, multiple: usize) -> Result<Image, Box<dyn Error>> {
    let rgb = open_rgb(path)?;
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let (tw, th) = (w / multiple * multiple, h / multiple * multiple);
    if tw == 0 || th == 0 {
        return Err(format!(
            "{}: {w}x{h} is smaller than {multiple} pixels",
            path.display()
        )
        .into());
    }
    let rgb = if (tw, th) == (w, h) {
        rgb
    } else {
        eprintln!("resizing {w}x{h} to {tw}x{th}");
        image::imageops::resize(
            &rgb,
            tw as u32,
            th as u32,
            image::imageops::FilterType::Lanczos3,
        )
    };
    Ok(Image::new(tw, th, rgb.into_raw())?)
}

/// Reads a mask (white: repaint), resized with nearest neighbour to `width x height`.
pub fn load_mask(path: &Path, width: usize, height: usize) -> Result<Mask, Box<dyn Error>> {
    let rgb = open_rgb(path)?;
    let rgb = if (rgb.width() as usize, rgb.height() as usize) == (width, height) {
        rgb
    } else {
        image::imageops::resize(
            &rgb,
            width as u32,
            height as u32,
            image::imageops::FilterType::Nearest,
        )
    };
    let image = Image::new(width, height, rgb.into_raw())?;
    Ok(Mask::from_image(&image))
}

/// Runs a program's body and reports its error, if any, in words (not `Debug`), with a
/// failing exit status.
pub fn report(result: Result<(), Box<dyn Error>>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! Stable Diffusion's generation: its parameters, the checks, prompt and image encoding, the
//! set-up of the one denoising loop (`denoise.rs`) for each task, decoding, progress and
//! outcome.
//!
//! Follows `__call__` of diffusers' `StableDiffusionPipeline`, `...Img2ImgPipeline` and
//! `...InpaintPipeline` (diffusers 0.42); the order of random draws is in the
//! [module documentation](super).

use std::time::{Duration, Instant};

use rand::SeedableRng;
use sd_core::TimestepSpacing;
use sd_schedulers::config::BaseConfig;
use sd_schedulers::{NoiseSource, Plan, RngNoise, Sampler, SchedulerConfig, registry};

use crate::backend::Backend;
use crate::clip::{ClipTokenizer, LongPrompt, WeightedChunk, apply_weights, parse_weighted};
use crate::error::{Error, Result};
use crate::pipeline::StableDiffusion;
use crate::pipeline::denoise::{
    ActiveControl, AddedConditioning, Conditioning, ControlledUnet, LoopEnd, NoisePredictor, Run,
    StepPosition, denoise,
};
use crate::pipeline::image::{Image, Margins, Mask, outpaint_canvas};
use crate::pipeline::load::scheduler_error;
use crate::vae::DecoderPrecision;

/// Which sampler to run.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub enum SamplerChoice {
    /// The one the model's scheduler config names (its `_class_name`).
    #[default]
    Model,
    /// A sampler by name (`"Euler a"`, `"DPM++ 2M Karras"`, `"DDIMScheduler"`, ...: see
    /// [`sd_schedulers::registry::names`]), built from the model's scheduler config.
    Name(String),
    /// A complete scheduler config of its own (its `_class_name` picks the sampler).
    Config(Box<SchedulerConfig>),
}

/// What to generate; the task-specific inputs are in [`Task`].
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// The prompt.
    pub prompt: String,
    /// What to steer away from (the unconditional half of guidance); `""` as diffusers'
    /// default.
    pub negative_prompt: String,
    /// Inference steps (image tasks run the last `floor(steps * strength)` of them).
    pub steps: usize,
    /// Classifier-free guidance scale; at most 1 disables guidance (one UNet pass per step,
    /// the negative prompt unused).
    pub guidance_scale: f64,
    /// Guidance rescale factor in [0, 1] (`guidance_rescale`, Lin et al. 2023); 0 is off.
    pub guidance_rescale: f64,
    /// The sampler.
    pub sampler: SamplerChoice,
    /// The seed of the random number generator every random value is drawn from.
    pub seed: u64,
    /// The width in pixels: a multiple of 8. `None`: the model's default for text-to-image,
    /// the image's width for image tasks (where a given width must equal it).
    pub width: Option<usize>,
    /// The height in pixels, as [`Params::width`].
    pub height: Option<usize>,
    /// Images per prompt.
    pub num_images: usize,
    /// CLIP layers to skip from the end (diffusers' `clip_skip`; 0 uses the last layer, SDXL
    /// the one before it). As in diffusers, it applies to the prompt, not to the negative
    /// prompt.
    pub clip_skip: usize,
    /// What to do with prompts longer than the tokenizer's 75 tokens: truncate (diffusers) or
    /// encode in chunks of 75 tokens, concatenated along the sequence.
    pub long_prompt: LongPrompt,
    /// Read the prompts in AUTOMATIC1111's weighting syntax (`(word)`, `[word]`,
    /// `(word:1.5)`, `BREAK`; see [`crate::clip::prompt`]), chunked whatever their length;
    /// off by default, as diffusers reads prompts as plain text.
    pub prompt_weighting: bool,
    /// Decode with the VAE's tiling (for large images).
    pub vae_tiling: bool,
    /// Bounds on the size, image count and steps, checked before any work.
    pub limits: Limits,
    /// The most images the UNet and the VAE see in one call (0: as many as keep a call
    /// within 8 images of 512x512). Many images then take many images' time but only one
    /// batch's activations; the noise and the sampler still cover every image, so the
    /// result depends on it only by float rounding.
    pub max_batch: usize,
    /// Go on when values stop being finite (NaN or infinite). By default a generation stops
    /// with [`Error::NonFinite`] naming the stage (text encoding, a step, decoding) where
    /// they first appear, instead of returning a black image.
    pub keep_non_finite: bool,
    /// One control image per ControlNet of the pipeline
    /// ([`StableDiffusion::with_controlnet`]), in the same order; empty without
    /// ControlNets.
    pub controls: Vec<ControlImage>,
    /// diffusers' `guess_mode`: the ControlNets see only the prompt's half of a guided
    /// batch, with their residuals growing from 0.1x at the first skip connection to 1x at
    /// the mid block, so that they can steer the picture without a prompt.
    pub guess_mode: bool,
    /// SDXL's second prompts and micro-conditioning (ignored by SD 1.x/2.x models).
    pub sdxl: SdxlParams,
    /// diffusers' `denoising_end`, in (0, 1): stop once this fraction of the schedule has
    /// been denoised (counted in training timesteps, as diffusers), leaving the rest to
    /// another model: SDXL's base hands its latents to the refiner this way (with
    /// [`latents_only`](Self::latents_only)). `None` runs every step.
    pub denoising_end: Option<f64>,
    /// diffusers' `denoising_start`, in (0, 1), for image tasks: the image (or latents) is
    /// taken as already denoised up to this fraction of the schedule, so the steps before it
    /// are skipped, no noise is added and the task's `strength` is ignored. The refiner's
    /// half of a base-to-refiner handoff ([`StableDiffusion::img2img_latents`]).
    pub denoising_start: Option<f64>,
    /// Return the final latents without decoding them (diffusers' `output_type="latent"`):
    /// [`Generation::images`] and [`Generation::pixels`] are then empty.
    pub latents_only: bool,
}

/// SDXL's extra inputs, with diffusers' defaults. Sizes are `(height, width)` in pixels, as
/// diffusers' tuples.
#[derive(Debug, Clone, PartialEq)]
pub struct SdxlParams {
    /// The second text encoder's prompt (`prompt_2`); `None` or empty: the prompt.
    pub prompt_2: Option<String>,
    /// The second text encoder's negative prompt (`negative_prompt_2`); `None` or empty: the
    /// negative prompt.
    pub negative_prompt_2: Option<String>,
    /// The size the model is told the training image had (`original_size`); `None`: the
    /// output size.
    pub original_size: Option<(usize, usize)>,
    /// The crop's top-left corner the model is told of (`crops_coords_top_left`, (0, 0)
    /// for a well-framed picture).
    pub crops_coords_top_left: (usize, usize),
    /// The size the model is told to aim at (`target_size`); `None`: the output size.
    pub target_size: Option<(usize, usize)>,
    /// `negative_original_size`: with [`negative_target_size`](Self::negative_target_size),
    /// the negative half's own ids (else it takes the prompt's, as diffusers).
    pub negative_original_size: Option<(usize, usize)>,
    /// `negative_crops_coords_top_left`.
    pub negative_crops_coords_top_left: (usize, usize),
    /// `negative_target_size`.
    pub negative_target_size: Option<(usize, usize)>,
    /// The refiner's `aesthetic_score` (6).
    pub aesthetic_score: f64,
    /// The refiner's `negative_aesthetic_score` (2.5).
    pub negative_aesthetic_score: f64,
}

impl Default for SdxlParams {
    fn default() -> Self {
        SdxlParams {
            prompt_2: None,
            negative_prompt_2: None,
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
            negative_original_size: None,
            negative_crops_coords_top_left: (0, 0),
            negative_target_size: None,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
    }
}

/// SDXL's micro-conditioning ids of a generation, by row of the guided batch.
struct TimeIds {
    negative: Vec<f64>,
    positive: Vec<f64>,
    /// Images.
    n: usize,
    /// Rows alternate negative and positive ids, as diffusers' text-to-image pipelines
    /// build them (`cat([negative, positive]).repeat(n, 1)`), rather than following the
    /// batch's halves (`[uncond x n, cond x n]`); the two differ only for several images with
    /// negative sizes of their own.
    interleaved: bool,
}

impl TimeIds {
    /// The ids of row `row` of the batch (`[uncond x n, cond x n]` with guidance).
    fn row(&self, guided: bool, row: usize) -> &[f64] {
        let negative = if !guided {
            false
        } else if self.interleaved {
            row.is_multiple_of(2)
        } else {
            row < self.n
        };
        if negative {
            &self.negative
        } else {
            &self.positive
        }
    }
}

/// A prompt's embeddings: the UNet's context and, for SDXL, the pooled embedding.
#[derive(Debug, Clone)]
pub struct PromptEmbeds<T> {
    /// `[1, L, D]`: the text embeddings the UNet attends to.
    pub context: T,
    /// `[1, P]`: SDXL's pooled embedding (the second text encoder's projection of the end
    /// token of the first chunk); `None` for SD 1.x/2.x.
    pub pooled: Option<T>,
}

/// Bounds on what one generation may ask for, checked before any work is done or memory
/// taken: a mistyped size or count is an error naming it and the bound, not an allocation
/// failure minutes later. Raise them for machines and jobs that need more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest width or height in pixels (default 4096).
    pub max_side: usize,
    /// The most pixels per image (default 4096 x 4096).
    pub max_pixels: usize,
    /// The most images per call (default 1000).
    pub max_images: usize,
    /// The most inference steps (default 1000, the training schedule's length).
    pub max_steps: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_side: 4096,
            max_pixels: 4096 * 4096,
            max_images: 1000,
            max_steps: 1000,
        }
    }
}

impl Limits {
    /// Checks an image size against the bounds.
    ///
    /// # Errors
    /// [`Error::Config`] naming `width`, `height` or `pixels` and the bound.
    pub fn check_size(&self, width: usize, height: usize) -> Result<()> {
        for (what, v) in [("width", width), ("height", height)] {
            if v > self.max_side {
                return Err(config_error(
                    what,
                    format!(
                        "{v} pixels is more than the limit of {} (the max_side limit: --max-side \
                         in the programs)",
                        self.max_side
                    ),
                ));
            }
        }
        match width.checked_mul(height) {
            Some(p) if p <= self.max_pixels => Ok(()),
            _ => Err(config_error(
                "pixels",
                format!(
                    "{width}x{height} is more than the limit of {} pixels (the max_pixels \
                     limit: --max-side in the programs)",
                    self.max_pixels
                ),
            )),
        }
    }

    /// Checks an image count and a step count against the bounds.
    ///
    /// # Errors
    /// [`Error::Config`] naming `num_images` or `steps` and the bound.
    pub fn check_counts(&self, images: usize, steps: usize) -> Result<()> {
        if images > self.max_images {
            return Err(config_error(
                "num_images",
                format!(
                    "{images} images is more than the limit of {} per call (the max_images \
                     limit: --max-images in the programs)",
                    self.max_images
                ),
            ));
        }
        if steps > self.max_steps {
            return Err(config_error(
                "steps",
                format!(
                    "{steps} steps is more than the limit of {} (the max_steps limit: \
                     --max-steps in the programs)",
                    self.max_steps
                ),
            ));
        }
        Ok(())
    }
}

/// A ControlNet's control image and how strongly and when it acts.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlImage {
    /// The control image (edges, depth, pose...), of the output's size.
    pub image: Image,
    /// `controlnet_conditioning_scale`: its residuals are multiplied by it (1 by default).
    pub scale: f64,
    /// The fraction of the steps before which it does not act (`control_guidance_start`,
    /// 0 by default).
    pub start: f64,
    /// The fraction of the steps after which it stops acting (`control_guidance_end`, 1 by
    /// default).
    pub end: f64,
}

impl ControlImage {
    /// The image at scale 1 for every step.
    pub fn new(image: Image) -> Self {
        ControlImage {
            image,
            scale: 1.0,
            start: 0.0,
            end: 1.0,
        }
    }
}

impl Default for Params {
    /// diffusers' defaults: 50 steps, guidance 7.5, the model's sampler, one image.
    fn default() -> Self {
        Params {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 50,
            guidance_scale: 7.5,
            guidance_rescale: 0.0,
            sampler: SamplerChoice::Model,
            seed: 0,
            width: None,
            height: None,
            num_images: 1,
            clip_skip: 0,
            long_prompt: LongPrompt::Truncate,
            prompt_weighting: false,
            vae_tiling: false,
            limits: Limits::default(),
            max_batch: 0,
            keep_non_finite: false,
            controls: Vec::new(),
            guess_mode: false,
            sdxl: SdxlParams::default(),
            denoising_end: None,
            denoising_start: None,
            latents_only: false,
        }
    }
}

/// The task and its inputs.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Task<'a> {
    /// Text-to-image: from pure noise.
    TextToImage,
    /// Image-to-image: the image encoded and noised to the level at which the last
    /// `floor(steps * strength)` steps start.
    ImageToImage {
        /// The starting image.
        image: &'a Image,
        /// How much to change it, in [0, 1]: 0 runs no step (the VAE round trip of the
        /// image), 1 all steps.
        strength: f64,
    },
    /// Inpainting: the mask's white part repainted.
    Inpaint {
        /// The image.
        image: &'a Image,
        /// The mask, of the image's size.
        mask: &'a Mask,
        /// As for image-to-image; 1 starts the repainted region from pure noise.
        strength: f64,
    },
    /// Image-to-image from latents at the UNet's scale instead of an image (no VAE
    /// encoding): the [`Generation::latents`] of another run, such as SDXL's base stopped
    /// at [`Params::denoising_end`] for the refiner to finish from
    /// [`Params::denoising_start`] (diffusers' img2img pipelines given a latent `image`).
    Latents {
        /// `[1 or N, C, h, w]` values (one entry is repeated for every image).
        latents: &'a [f32],
        /// Their shape.
        shape: [usize; 4],
        /// As for image-to-image (ignored with [`Params::denoising_start`]).
        strength: f64,
    },
}

/// What the progress callback sees after each step.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// The step just taken, counted from 0 among the steps run.
    pub step: usize,
    /// The number of steps to run (model evaluations: twice the steps for Heun and KDPM2).
    pub steps: usize,
    /// The timestep the UNet was evaluated at.
    pub timestep: f64,
    /// The latents after the step, `[N, C, h, w]`.
    pub latents: &'a [f32],
    /// The sampler's prediction of the clean latents at this step, `[N, C, h, w]`
    /// (decode it with [`StableDiffusion::decode_latents`] for a preview).
    pub pred_original: &'a [f32],
    /// `[N, C, h, w]`.
    pub latent_shape: [usize; 4],
}

/// What the progress callback asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Go on.
    Continue,
    /// Stop here and decode the latents as they are (as diffusers' `interrupt`).
    Stop,
    /// Stop here without decoding.
    Cancel,
}

/// Where each stage's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Tokenizing and encoding the prompts.
    pub text_encoding: Duration,
    /// Encoding the input image (and the masked image) with the VAE.
    pub image_encoding: Duration,
    /// The denoising loop.
    pub denoising: Duration,
    /// Decoding the latents.
    pub decoding: Duration,
}

/// A finished (or stopped) generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The images, `num_images` of them.
    pub images: Vec<Image>,
    /// The decoded images before quantisation, `[N, 3, H, W]` in [0, 1] (diffusers'
    /// `output_type="np"`, channels first).
    pub pixels: Vec<f32>,
    /// The final latents, `[N, C, h, w]`.
    pub latents: Vec<f32>,
    /// `[N, C, h, w]`.
    pub latent_shape: [usize; 4],
    /// The steps run.
    pub steps_run: usize,
    /// Where the time went.
    pub timings: Timings,
}

/// How a run ended: [`Generation`] for the Stable Diffusion pipelines,
/// [`PixelSamples`](super::PixelSamples) for pixel-space models.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<G = Generation> {
    /// Every step ran.
    Finished(G),
    /// The callback said [`Control::Stop`]: the result of that step (latents decoded).
    Stopped(G),
    /// The callback said [`Control::Cancel`] after `steps_run` steps.
    Cancelled {
        /// The steps run.
        steps_run: usize,
    },
}

impl<G> Outcome<G> {
    /// The generation, unless cancelled.
    pub fn into_generation(self) -> Option<G> {
        match self {
            Outcome::Finished(g) | Outcome::Stopped(g) => Some(g),
            Outcome::Cancelled { .. } => None,
        }
    }

    /// Whether every step ran.
    pub fn is_finished(&self) -> bool {
        matches!(self, Outcome::Finished(_))
    }
}

fn config_error(what: &str, message: String) -> Error {
    Error::Config {
        what: what.to_string(),
        message,
    }
}

fn fill(noise: &mut dyn NoiseSource, len: usize) -> Result<Vec<f32>> {
    let mut out = vec![0.0; len];
    noise
        .fill(&mut out)
        .map_err(|e| scheduler_error("noise", e))?;
    Ok(out)
}

/// `noise_cfg` rescaled towards the standard deviation of `text` per image, as diffusers'
/// `rescale_noise_cfg` (PyTorch's unbiased `std` over all but the batch axis).
fn rescale_noise_cfg(cfg: &mut [f32], text: &[f32], per_image: usize, rescale: f64) {
    fn std(x: &[f32]) -> f64 {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = x
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0).max(1.0);
        var.sqrt()
    }
    for (c, t) in cfg
        .chunks_exact_mut(per_image)
        .zip(text.chunks_exact(per_image))
    {
        let factor = std(t) / std(c);
        for v in c.iter_mut() {
            let rescaled = f64::from(*v) * factor;
            *v = (rescale * rescaled + (1.0 - rescale) * f64::from(*v)) as f32;
        }
    }
}

/// The images of `lh x lw` latents one network call takes when [`Params::max_batch`] is 0:
/// as many as fit 8 images of 512x512 (64x64 latents; 2 at 1024x1024), at least one.
pub(crate) fn images_per_call(lh: usize, lw: usize) -> usize {
    (8 * 64 * 64 / lh.saturating_mul(lw).max(1)).max(1)
}

/// Whether every value is finite.
pub(crate) fn all_finite(values: &[f32]) -> bool {
    values.iter().all(|v| v.is_finite())
}

/// Repeats `one` (one image's values) `n` times.
fn repeat(one: &[f32], n: usize) -> Vec<f32> {
    one.repeat(n)
}

impl<B: Backend> StableDiffusion<B> {
    /// Text-to-image with the seeded generator of [`Params::seed`].
    ///
    /// # Errors
    /// As [`StableDiffusion::generate`].
    pub fn txt2img(
        &self,
        params: &Params,
        mut callback: impl FnMut(&Progress<'_>) -> Control,
    ) -> Result<Outcome> {
        self.generate(
            params,
            Task::TextToImage,
            &mut seeded(params),
            &mut callback,
        )
    }

    /// Image-to-image with the seeded generator of [`Params::seed`].
    ///
    /// # Errors
    /// As [`StableDiffusion::generate`].
    pub fn img2img(
        &self,
        params: &Params,
        image: &Image,
        strength: f64,
        mut callback: impl FnMut(&Progress<'_>) -> Control,
    ) -> Result<Outcome> {
        let task = Task::ImageToImage { image, strength };
        self.generate(params, task, &mut seeded(params), &mut callback)
    }

    /// Image-to-image from latents `[1 or N, C, h, w]` at the UNet's scale ([`Task::Latents`])
    /// with the seeded generator of [`Params::seed`]: SDXL's base-to-refiner handoff, as
    /// diffusers' "ensemble of experts":
    ///
    /// ```no_run
    /// # fn main() -> sd_models::Result<()> {
    /// use sd_models::cpu::CpuBackend;
    /// use sd_models::pipeline::{Control, LoadOptions, Params, StableDiffusion};
    ///
    /// let options = LoadOptions::default();
    /// let base = StableDiffusion::load(CpuBackend::new(), "sdxl-base", &options)?;
    /// let refiner = StableDiffusion::load(CpuBackend::new(), "sdxl-refiner", &options)?;
    /// let prompt = "a lighthouse at dusk".to_string();
    /// let handoff = Params {
    ///     prompt,
    ///     denoising_end: Some(0.8),
    ///     latents_only: true,
    ///     ..Params::default()
    /// };
    /// let base_out = base
    ///     .txt2img(&handoff, |_| Control::Continue)?
    ///     .into_generation()
    ///     .expect("not cancelled");
    /// let finish = Params {
    ///     denoising_end: None,
    ///     denoising_start: Some(0.8),
    ///     latents_only: false,
    ///     ..handoff
    /// };
    /// let image = refiner
    ///     .img2img_latents(&finish, &base_out.latents, base_out.latent_shape, 1.0, |_| {
    ///         Control::Continue
    ///     })?
    ///     .into_generation()
    ///     .expect("not cancelled");
    /// image.images[0].save("lighthouse.png")?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`StableDiffusion::generate`].
    pub fn img2img_latents(
        &self,
        params: &Params,
        latents: &[f32],
        shape: [usize; 4],
        strength: f64,
        mut callback: impl FnMut(&Progress<'_>) -> Control,
    ) -> Result<Outcome> {
        let task = Task::Latents {
            latents,
            shape,
            strength,
        };
        self.generate(params, task, &mut seeded(params), &mut callback)
    }

    /// Inpainting with the seeded generator of [`Params::seed`].
    ///
    /// # Errors
    /// As [`StableDiffusion::generate`].
    pub fn inpaint(
        &self,
        params: &Params,
        image: &Image,
        mask: &Mask,
        strength: f64,
        mut callback: impl FnMut(&Progress<'_>) -> Control,
    ) -> Result<Outcome> {
        let task = Task::Inpaint {
            image,
            mask,
            strength,
        };
        self.generate(params, task, &mut seeded(params), &mut callback)
    }

    /// Outpainting: the image extended by `margins` ([`outpaint_canvas`]) and the new
    /// border inpainted from pure noise (strength 1), with the seeded generator of
    /// [`Params::seed`]. The extended size must be a multiple of 8.
    ///
    /// # Errors
    /// Those of [`outpaint_canvas`] and [`StableDiffusion::generate`].
    pub fn outpaint(
        &self,
        params: &Params,
        image: &Image,
        margins: Margins,
        callback: impl FnMut(&Progress<'_>) -> Control,
    ) -> Result<Outcome> {
        let side = |a: usize, b: usize, c: usize| a.checked_add(b).and_then(|s| s.checked_add(c));
        let size = side(image.width(), margins.left, margins.right).zip(side(
            image.height(),
            margins.top,
            margins.bottom,
        ));
        match size {
            Some((w, h)) => params.limits.check_size(w, h)?,
            None => {
                return Err(config_error(
                    "outpaint margins",
                    format!("{margins:?} overflow the canvas size"),
                ));
            }
        }
        let (canvas, mask) = outpaint_canvas(image, margins)?;
        self.inpaint(params, &canvas, &mask, 1.0, callback)
    }

    /// Decodes latents `[N, C, h, w]` (at the UNet's scale) to images and their `[N, 3, H, W]`
    /// values in [0, 1]: for the final latents, or a preview of a step's predicted x0.
    ///
    /// # Errors
    /// [`Error::Shape`] for a length other than the shape's; the VAE's errors.
    pub fn decode_latents(
        &self,
        latents: &[f32],
        shape: [usize; 4],
        tiling: bool,
    ) -> Result<(Vec<Image>, Vec<f32>)> {
        // In batches, as a generation decodes.
        let [_, _, h, w] = shape;
        self.decode_in(latents, shape, tiling, images_per_call(h, w))
    }

    /// [`decode_latents`](Self::decode_latents) in batches of `chunk` images.
    fn decode_in(
        &self,
        latents: &[f32],
        shape: [usize; 4],
        tiling: bool,
        chunk: usize,
    ) -> Result<(Vec<Image>, Vec<f32>)> {
        let [n, c, h, w] = shape;
        let per_image = c.checked_mul(h).and_then(|v| v.checked_mul(w)).unwrap_or(0);
        if per_image == 0 || Some(latents.len()) != per_image.checked_mul(n) {
            return Err(Error::Shape {
                op: "decode_latents",
                expected: format!("latents of shape {shape:?}"),
                found: format!("{} values", latents.len()),
            });
        }
        let mut images = Vec::with_capacity(n);
        let mut pixels = Vec::new();
        for part in latents.chunks(chunk.max(1) * per_image) {
            let (i, p) = self.decode_batch(part, [part.len() / per_image, c, h, w], tiling)?;
            images.extend(i);
            pixels.extend(p);
        }
        Ok((images, pixels))
    }

    fn decode_batch(
        &self,
        latents: &[f32],
        shape: [usize; 4],
        tiling: bool,
    ) -> Result<(Vec<Image>, Vec<f32>)> {
        let b = &self.backend;
        let z = b.upload(latents, &shape)?;
        let z = self.vae.unscale_latents(b, &z)?;
        let tiling = tiling.then(|| self.vae.default_tiling());
        let x = self.vae.decode_with(b, &z, DecoderPrecision::F32, tiling)?;
        let dims = b.shape(&x).to_vec();
        let (h, w) = match dims[..] {
            [_, 3, h, w] => (h, w),
            _ => {
                return Err(Error::Shape {
                    op: "decode_latents",
                    expected: "[N, 3, H, W] images from the VAE".into(),
                    found: format!("{dims:?}"),
                });
            }
        };
        let pixels: Vec<f32> = b
            .download(&x)?
            .into_iter()
            .map(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0))
            .collect();
        let images = pixels
            .chunks_exact(3 * h * w)
            .map(|p| Image::from_chw_unit(p, w, h))
            .collect::<Result<Vec<_>>>()?;
        Ok((images, pixels))
    }

    /// The sampler `params` asks for, planned for `params.steps` steps.
    ///
    /// # Errors
    /// [`Error::Config`] for an unknown sampler name or a config the sampler rejects.
    pub fn sampler(&self, params: &Params) -> Result<Box<dyn Sampler>> {
        let plan = Plan::steps(params.steps).with_batch_size(params.num_images.max(1));
        match &params.sampler {
            SamplerChoice::Model => registry::from_config(&self.scheduler, plan),
            SamplerChoice::Name(name) => registry::sampler(name, &self.scheduler, plan),
            SamplerChoice::Config(config) => registry::from_config(config, plan),
        }
        .map_err(|e| scheduler_error("sampler", e))
    }

    /// The embeddings of the prompts: the negative prompt's first with guidance, then the
    /// prompt's. SDXL's empty negative prompts give zeros with
    /// [`force_zeros_for_empty_prompt`](Self::force_zeros_for_empty_prompt), as diffusers.
    fn encode_prompts(
        &self,
        params: &Params,
        guidance: bool,
    ) -> Result<Vec<PromptEmbeds<B::Tensor>>> {
        let xl = &params.sdxl;
        let positive = (params.prompt.as_str(), xl.prompt_2.as_deref());
        let negative = (
            params.negative_prompt.as_str(),
            xl.negative_prompt_2.as_deref(),
        );
        let zero_negative = self.is_xl()
            && self.xl.force_zeros_for_empty_prompt
            && negative.0.is_empty()
            && negative.1.is_none_or(str::is_empty);
        let mut pairs = vec![positive];
        if guidance && !zero_negative {
            pairs.insert(0, negative);
        }
        let mut chunked = pairs
            .iter()
            .map(|&(p, p2)| self.prompt_chunk_pair(p, p2, params))
            .collect::<Result<Vec<_>>>()?;
        if chunked.len() > 1 {
            // Chunked prompts of different lengths: pad the shorter with empty chunks.
            let chunks = chunked.iter().map(|c| c.0.len()).max().unwrap_or(1);
            let empty_1 = empty_chunk(&self.tokenizer)?;
            let empty_2 = match &self.second {
                Some((t, _)) => Some(empty_chunk(t)?),
                None => None,
            };
            for (c1, c2) in &mut chunked {
                c1.resize(chunks, empty_1.clone());
                if let (Some(c2), Some(e)) = (c2.as_mut(), &empty_2) {
                    c2.resize(chunks, e.clone());
                }
            }
        }
        // As diffusers, the negative prompt is encoded without `clip_skip`.
        let last = chunked.len() - 1;
        let mut embeds = chunked
            .iter()
            .enumerate()
            .map(|(i, (c1, c2))| {
                let skip = if i == last { params.clip_skip } else { 0 };
                self.encode_chunks(c1, c2.as_deref(), skip)
            })
            .collect::<Result<Vec<_>>>()?;
        if guidance && zero_negative {
            let b = &self.backend;
            let zeros = |t: &B::Tensor| -> Result<B::Tensor> {
                let shape = b.shape(t).to_vec();
                b.upload(&vec![0.0; shape.iter().product()], &shape)
            };
            let p = &embeds[0];
            let zero = PromptEmbeds {
                context: zeros(&p.context)?,
                pooled: p.pooled.as_ref().map(zeros).transpose()?,
            };
            embeds.insert(0, zero);
        }
        Ok(embeds)
    }

    /// The chunks of a prompt for the first tokenizer and, for SDXL, of the second prompt
    /// (the prompt if `None`) for the second tokenizer, in as many chunks.
    fn prompt_chunk_pair(
        &self,
        prompt: &str,
        prompt_2: Option<&str>,
        params: &Params,
    ) -> Result<(Vec<WeightedChunk>, Option<Vec<WeightedChunk>>)> {
        let first = self.prompt_chunks(&self.tokenizer, prompt, params)?;
        let Some((tokenizer_2, _)) = &self.second else {
            return Ok((first, None));
        };
        // As diffusers' `prompt_2 or prompt`: an empty second prompt is the prompt.
        let prompt_2 = prompt_2.filter(|p| !p.is_empty()).unwrap_or(prompt);
        let mut second = self.prompt_chunks(tokenizer_2, prompt_2, params)?;
        // A second prompt of another length: both in as many chunks.
        let chunks = first.len().max(second.len());
        let mut first = first;
        first.resize(chunks, empty_chunk(&self.tokenizer)?);
        second.resize(chunks, empty_chunk(tokenizer_2)?);
        Ok((first, Some(second)))
    }

    /// A prompt's 77-id chunks for `tokenizer`, each with a weight per id: AUTOMATIC1111's
    /// weighting with [`Params::prompt_weighting`], else plain chunks (all weights 1) cut or
    /// continued as [`Params::long_prompt`] says.
    fn prompt_chunks(
        &self,
        tokenizer: &ClipTokenizer,
        prompt: &str,
        params: &Params,
    ) -> Result<Vec<WeightedChunk>> {
        let prompt = &self.expand_embeddings(prompt);
        if params.prompt_weighting {
            return tokenizer.encode_weighted(&parse_weighted(prompt));
        }
        let ones = vec![1.0; tokenizer.max_length()];
        Ok(tokenizer
            .encode_long(prompt, params.long_prompt)?
            .into_iter()
            .map(|ids| WeightedChunk {
                ids,
                weights: ones.clone(),
            })
            .collect())
    }

    /// The embeddings of a prompt's chunks: `[1, chunks * L, D]`, weighted where a weight is
    /// not 1. SDXL: each encoder's hidden state before its last `clip_skip + 1` layers
    /// (diffusers' `hidden_states[-(clip_skip + 2)]`), joined along the width, and the pooled
    /// embedding of the first chunk from the second encoder's projection.
    fn encode_chunks(
        &self,
        chunks: &[WeightedChunk],
        chunks_2: Option<&[WeightedChunk]>,
        clip_skip: usize,
    ) -> Result<PromptEmbeds<B::Tensor>> {
        let b = &self.backend;
        let weighted = |e: B::Tensor, chunks: &[WeightedChunk]| -> Result<B::Tensor> {
            let (k, l, d) = match b.shape(&e)[..] {
                [k, l, d] => (k, l, d),
                ref other => {
                    return Err(Error::Shape {
                        op: "encode_prompts",
                        expected: "[chunks, L, D] text embeddings".into(),
                        found: format!("{other:?}"),
                    });
                }
            };
            if chunks.iter().all(|c| c.weights.iter().all(|&w| w == 1.0)) {
                return Ok(e);
            }
            let mut host = b.download(&e)?;
            for (hidden, chunk) in host.chunks_exact_mut(l * d).zip(chunks) {
                apply_weights(hidden, &chunk.weights);
            }
            b.upload(&host, &[k, l, d])
        };
        let rows = |chunks: &[WeightedChunk]| -> Vec<Vec<u32>> {
            chunks.iter().map(|c| c.ids.clone()).collect()
        };
        // `[chunks, L, D]` as one sequence `[1, chunks * L, D]`.
        let flat = |context: &B::Tensor| -> Result<B::Tensor> {
            let shape = b.shape(context).to_vec();
            b.reshape(context, &[1, shape[0] * shape[1], shape[2]])
        };
        if !self.is_xl() {
            let e = self.text_encoder.encode(b, &rows(chunks), clip_skip)?;
            return Ok(PromptEmbeds {
                context: flat(&weighted(e, chunks)?)?,
                pooled: None,
            });
        }
        // SDXL: each encoder's hidden state before its last `clip_skip + 1` layers, joined
        // along the width; the pooled embedding from the last encoder's projection (the
        // refiner has the second encoder alone).
        let mut encoders = vec![(&self.text_encoder, chunks)];
        if let (Some((_, encoder_2)), Some(chunks_2)) = (&self.second, chunks_2) {
            encoders.push((encoder_2, chunks_2));
        }
        let mut hidden = Vec::with_capacity(encoders.len());
        let mut pooled = None;
        for (encoder, chunks) in encoders {
            let out = encoder.forward(b, &rows(chunks))?;
            let states = out.hidden_states.len();
            let i = states
                .checked_sub(clip_skip.saturating_add(2))
                .ok_or_else(|| Error::Config {
                    what: "clip_skip".into(),
                    message: format!(
                        "{clip_skip} skips all {} layers (SDXL uses the layer before the last \
                     clip_skip + 1)",
                        encoder.layers.len()
                    ),
                })?;
            hidden.push(weighted(out.hidden_states[i].clone(), chunks)?);
            pooled = out.text_embeds;
        }
        let pooled = pooled.ok_or_else(|| Error::Config {
            what: "text encoder".into(),
            message: "SDXL's last text encoder has no text_projection for the pooled embedding"
                .into(),
        })?;
        let refs: Vec<&B::Tensor> = hidden.iter().collect();
        let context = b.concat(&refs, 2)?;
        Ok(PromptEmbeds {
            context: flat(&context)?,
            pooled: Some(b.slice(&pooled, 0, 0, 1)?),
        })
    }

    /// A prompt's text embeddings `[1, chunks * 77, D]` as the UNet sees them, with the
    /// weighting, chunking and CLIP skip of `params` (for SDXL, both encoders' on the same
    /// prompt).
    ///
    /// # Errors
    /// [`Error::Tokenizer`] and the text encoders' errors.
    pub fn encode_prompt(&self, prompt: &str, params: &Params) -> Result<B::Tensor> {
        Ok(self.encode_prompt_pair(prompt, None, params)?.context)
    }

    /// A prompt's embeddings as [`encode_prompt`](Self::encode_prompt), with SDXL's second
    /// prompt for the second encoder (`None`: the prompt) and its pooled embedding.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] and the text encoders' errors.
    pub fn encode_prompt_pair(
        &self,
        prompt: &str,
        prompt_2: Option<&str>,
        params: &Params,
    ) -> Result<PromptEmbeds<B::Tensor>> {
        let (c1, c2) = self.prompt_chunk_pair(prompt, prompt_2, params)?;
        self.encode_chunks(&c1, c2.as_deref(), params.clip_skip)
    }

    /// SDXL's micro-conditioning ids of the negative and the positive half for an output of
    /// `width x height` (diffusers' `_get_add_time_ids`): original size, crop top-left and
    /// target size, each (height, width); the refiner's: original size, crop top-left and
    /// aesthetic score. The negative half's defaults follow diffusers' pipelines, which
    /// differ: text-to-image takes the negative sizes and crop only when both negative sizes
    /// are given (else the prompt's ids), the image tasks take each negative size or the
    /// prompt's and the prompt's crop.
    pub fn time_ids(
        &self,
        params: &Params,
        width: usize,
        height: usize,
        image_task: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let xl = &params.sdxl;
        let pair = |p: (usize, usize)| [p.0 as f64, p.1 as f64];
        let out = (height, width);
        let ids = |original: (usize, usize), crop: (usize, usize), last: &[f64]| -> Vec<f64> {
            let mut v = Vec::with_capacity(6);
            v.extend(pair(original));
            v.extend(pair(crop));
            v.extend_from_slice(last);
            v
        };
        let original = xl.original_size.unwrap_or(out);
        let target = xl.target_size.unwrap_or(out);
        let negative_original = xl.negative_original_size.unwrap_or(original);
        if self.xl.requires_aesthetics_score {
            let positive = ids(original, xl.crops_coords_top_left, &[xl.aesthetic_score]);
            let negative = ids(
                negative_original,
                xl.negative_crops_coords_top_left,
                &[xl.negative_aesthetic_score],
            );
            return (negative, positive);
        }
        let positive = ids(original, xl.crops_coords_top_left, &pair(target));
        let negative = if image_task {
            let negative_target = xl.negative_target_size.unwrap_or(target);
            ids(
                negative_original,
                xl.crops_coords_top_left,
                &pair(negative_target),
            )
        } else {
            match (xl.negative_original_size, xl.negative_target_size) {
                (Some(o), Some(t)) => ids(o, xl.negative_crops_coords_top_left, &pair(t)),
                _ => positive.clone(),
            }
        };
        (negative, positive)
    }

    /// The conditioning of a UNet call on `k` images: each prompt's embeddings repeated `k`
    /// times (the negative prompt's first with guidance), SDXL's pooled embeddings and ids
    /// likewise (`ids`: one list per prompt, in the same order), and the inpainting UNet's
    /// extra channels for each entry.
    fn conditioning(
        &self,
        prompts: &[PromptEmbeds<B::Tensor>],
        ids: &TimeIds,
        extra: Option<&[f32]>,
        (first, k): (usize, usize),
        guidance: bool,
        (lh, lw): (usize, usize),
    ) -> Result<Conditioning<B::Tensor>> {
        let b = &self.backend;
        let mut rows = Vec::with_capacity(prompts.len() * k);
        let mut pooled = Vec::with_capacity(prompts.len() * k);
        let mut time_ids = Vec::new();
        for (half, p) in prompts.iter().enumerate() {
            rows.extend(std::iter::repeat_n(&p.context, k));
            if let Some(q) = &p.pooled {
                pooled.extend(std::iter::repeat_n(q, k));
                for i in 0..k {
                    time_ids.extend_from_slice(ids.row(guidance, half * ids.n + first + i));
                }
            }
        }
        let mut cond = Conditioning::new(b.concat(&rows, 0)?, guidance);
        if !pooled.is_empty() {
            cond = cond.with_added(AddedConditioning {
                text_embeds: b.concat(&pooled, 0)?,
                time_ids,
            });
        }
        if let Some(one) = extra {
            let batch = prompts.len() * k;
            let channels = one.len() / (lh * lw);
            cond = cond.with_concat(b.upload(&one.repeat(batch), &[batch, channels, lh, lw])?);
        }
        Ok(cond)
    }

    /// Images per network call: [`Params::max_batch`], or with 0 as many as keep a call
    /// within 8 images of 512x512 (64x64 latents; 2 at 1024x1024), at least one.
    fn batch_size(params: &Params, (lh, lw): (usize, usize)) -> usize {
        let chosen = match params.max_batch {
            0 => images_per_call(lh, lw),
            k => k,
        };
        chosen.clamp(1, params.num_images.max(1))
    }

    /// The image task's image encoded to scaled latents `[1, C, h, w]` with the posterior
    /// noise drawn from `noise`.
    fn encode_image(
        &self,
        pixels: &[f32],
        w: usize,
        h: usize,
        noise: &mut dyn NoiseSource,
    ) -> Result<Vec<f32>> {
        let b = &self.backend;
        let x = b.upload(pixels, &[1, 3, h, w])?;
        let dist = self.vae.encode(b, &x)?;
        let len = b.shape(&dist.mean).iter().product();
        let eps = b.upload(&fill(noise, len)?, b.shape(&dist.mean))?;
        let z = dist.sample(b, &eps)?;
        b.download(&self.vae.scale_latents(b, &z)?)
    }

    /// The pipeline's ControlNets with their control images embedded (once per generation).
    fn active_controls(&self, params: &Params) -> Result<Vec<ActiveControl<'_, B>>> {
        let b = &self.backend;
        self.controlnets
            .iter()
            .zip(&params.controls)
            .map(|(model, c)| {
                let (w, h) = (c.image.width(), c.image.height());
                let image = b.upload(&c.image.to_chw_unit(), &[1, 3, h, w])?;
                Ok(ActiveControl {
                    model,
                    hint: model.embed_hint(b, &image)?,
                    scale: c.scale as f32,
                    start: c.start,
                    end: c.end,
                })
            })
            .collect()
    }

    fn check_params(&self, params: &Params, task: &Task<'_>) -> Result<(usize, usize, f64)> {
        if params.steps == 0 {
            return Err(config_error(
                "steps",
                "0 steps: at least 1 is needed".into(),
            ));
        }
        if params.num_images == 0 {
            return Err(config_error("num_images", "0 images asked for".into()));
        }
        params
            .limits
            .check_counts(params.num_images, params.steps)?;
        // Finite in f64 is not enough: the guidance is applied in f32.
        if !(params.guidance_scale as f32).is_finite() {
            return Err(config_error(
                "guidance_scale",
                format!("{} is not a finite number", params.guidance_scale),
            ));
        }
        if !(0.0..=1.0).contains(&params.guidance_rescale) {
            return Err(config_error(
                "guidance_rescale",
                format!("{} is outside [0, 1]", params.guidance_rescale),
            ));
        }
        if self.is_inpainting() && !matches!(task, Task::Inpaint { .. }) {
            return Err(config_error(
                "task",
                format!(
                    "this is an inpainting model (its UNet takes {} channels: latents, mask and \
                     masked image): it only inpaints and outpaints; use an ordinary model for \
                     text-to-image and image-to-image",
                    self.unet.config().in_channels
                ),
            ));
        }
        let (input, strength) = match *task {
            Task::TextToImage => (None, 1.0),
            Task::ImageToImage { image, strength } => (Some(image_size(image)), strength),
            Task::Inpaint {
                image,
                mask,
                strength,
            } => {
                if (mask.width(), mask.height()) != (image.width(), image.height()) {
                    return Err(Error::Shape {
                        op: "inpaint",
                        expected: format!(
                            "a mask of the image's size {}x{}",
                            image.width(),
                            image.height()
                        ),
                        found: format!("{}x{}", mask.width(), mask.height()),
                    });
                }
                (Some(image_size(image)), strength)
            }
            Task::Latents {
                latents,
                shape,
                strength,
            } => (Some(self.check_latents(params, latents, shape)?), strength),
        };
        if !(0.0..=1.0).contains(&strength) {
            return Err(config_error(
                "strength",
                format!("{strength} is outside [0, 1]"),
            ));
        }
        self.check_denoising_window(params, task)?;
        let (dw, dh) = self.default_size();
        let (w, h) = match input {
            None => (params.width.unwrap_or(dw), params.height.unwrap_or(dh)),
            Some((iw, ih)) => {
                for (what, given, actual) in
                    [("width", params.width, iw), ("height", params.height, ih)]
                {
                    if let Some(g) = given.filter(|&g| g != actual) {
                        return Err(config_error(
                            what,
                            format!(
                                "{g} differs from the input image's {actual} (resize the image)"
                            ),
                        ));
                    }
                }
                (iw, ih)
            }
        };
        params.limits.check_size(w, h)?;
        let multiple = self.size_multiple();
        for (what, v) in [("width", w), ("height", h)] {
            if v == 0 || v % multiple != 0 {
                return Err(config_error(
                    what,
                    format!(
                        "{v} is not a positive multiple of {multiple} (the VAE's pixels per \
                         latent pixel)"
                    ),
                ));
            }
        }
        self.check_controls(params, w, h)?;
        Ok((w, h, strength))
    }

    /// The pixel size of [`Task::Latents`]' latents, after checking their shape against the
    /// model and the image count.
    fn check_latents(
        &self,
        params: &Params,
        latents: &[f32],
        shape: [usize; 4],
    ) -> Result<(usize, usize)> {
        let [n, c, lh, lw] = shape;
        let channels = self.vae.config().latent_channels;
        let len = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let f = self.vae_scale_factor();
        let fits = c == channels
            && (n == 1 || n == params.num_images)
            && lh > 0
            && lw > 0
            && len == Some(latents.len());
        match (fits, lw.checked_mul(f), lh.checked_mul(f)) {
            (true, Some(w), Some(h)) => Ok((w, h)),
            _ => Err(Error::Shape {
                op: "img2img_latents",
                expected: format!(
                    "latents [1 or num_images ({}), {channels}, h, w] of as many values",
                    params.num_images
                ),
                found: format!("shape {shape:?} with {} values", latents.len()),
            }),
        }
    }

    /// Checks [`Params::denoising_start`] and [`Params::denoising_end`]: each in (0, 1), the
    /// start before the end, a start only for the image-to-image tasks.
    fn check_denoising_window(&self, params: &Params, task: &Task<'_>) -> Result<()> {
        for (what, v) in [
            ("denoising_start", params.denoising_start),
            ("denoising_end", params.denoising_end),
        ] {
            if let Some(v) = v.filter(|v| !(*v > 0.0 && *v < 1.0)) {
                return Err(config_error(
                    what,
                    format!("{v} is not strictly between 0 and 1"),
                ));
            }
        }
        if let (Some(start), Some(end)) = (params.denoising_start, params.denoising_end)
            && start >= end
        {
            return Err(config_error(
                "denoising_start",
                format!("{start} is not before denoising_end {end}"),
            ));
        }
        if params.denoising_start.is_some()
            && !matches!(task, Task::ImageToImage { .. } | Task::Latents { .. })
        {
            return Err(config_error(
                "denoising_start",
                "only image-to-image (from an image or latents) starts part-way through the \
                 schedule"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The steps `start..end` of `sampler`'s schedule a task runs: image tasks skip the first
    /// ones by strength (or up to [`Params::denoising_start`]), [`Params::denoising_end`]
    /// drops the last ones. The cut-offs are diffusers': a fraction `f` of the schedule ends
    /// at the training timestep `round(T - f T)` (rounding half to even, as Python); a start
    /// keeps the timesteps below it, one more for a second-order sampler whose count is even
    /// (so that it never starts between a step's two evaluations), an end those at or above
    /// it.
    fn schedule_window(
        &self,
        params: &Params,
        task: &Task<'_>,
        sampler: &dyn Sampler,
        strength: f64,
    ) -> Result<(usize, usize)> {
        let timesteps = sampler.timesteps();
        let train = BaseConfig::diffusers_default(TimestepSpacing::Leading)
            .resolve(&self.scheduler)
            .num_train_timesteps as f64;
        let cutoff = |fraction: f64| (train - fraction * train).round_ties_even();
        let start = match (task, params.denoising_start) {
            (Task::TextToImage, _) => 0,
            (_, Some(fraction)) => {
                let c = cutoff(fraction);
                let mut kept = timesteps.iter().filter(|&&t| t < c).count();
                if sampler.order() == 2 && kept.is_multiple_of(2) {
                    kept += 1;
                }
                timesteps.len().saturating_sub(kept)
            }
            (_, None) => sampler
                .start_index(strength)
                .map_err(|e| scheduler_error("strength", e))?,
        };
        let end = match params.denoising_end {
            Some(fraction) => {
                let c = cutoff(fraction);
                start + timesteps[start..].iter().filter(|&&t| t >= c).count()
            }
            None => timesteps.len(),
        };
        Ok((start, end))
    }

    fn check_controls(&self, params: &Params, w: usize, h: usize) -> Result<()> {
        let nets = self.controlnets.len();
        if params.controls.len() != nets {
            return Err(config_error(
                "controls",
                format!(
                    "{} control images for the pipeline's {nets} ControlNets (one each)",
                    params.controls.len()
                ),
            ));
        }
        for (k, c) in params.controls.iter().enumerate() {
            let what = format!("controls[{k}]");
            if (c.image.width(), c.image.height()) != (w, h) {
                return Err(Error::Shape {
                    op: "ControlNet",
                    expected: format!("control image {k} of the output's size {w}x{h}"),
                    found: format!("{}x{} (resize it)", c.image.width(), c.image.height()),
                });
            }
            if !c.scale.is_finite() || !(c.scale as f32).is_finite() {
                return Err(config_error(
                    &format!("{what}.scale"),
                    format!("{} is not a finite number", c.scale),
                ));
            }
            if !(0.0..=1.0).contains(&c.start) || !(0.0..=1.0).contains(&c.end) || c.start >= c.end
            {
                return Err(config_error(
                    &format!("{what}.start"),
                    format!(
                        "the guidance window [{}, {}] is not within [0, 1] with start < end",
                        c.start, c.end
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Runs `task` with the noise of `noise` (see the [module documentation](super) for the
    /// order of draws), calling `callback` after every step.
    ///
    /// # Errors
    /// [`Error::Config`] naming the parameter for 0 steps or images, a width or height that
    /// is not a multiple of 8 or differs from the input image's, a strength or guidance
    /// rescale outside [0, 1], a guidance scale that is not finite in `f32`, a task an
    /// inpainting model cannot do, an unknown sampler, a noise source that fails, a control
    /// image count other than the ControlNets', a control scale that is not finite or a
    /// guidance window outside [0, 1] or empty; [`Error::Shape`] for a mask or a control
    /// image of another size than the output; [`Error::NonFinite`] when values stop being
    /// finite (unless [`Params::keep_non_finite`]); [`Error::Prompt`] and the networks'
    /// errors.
    pub fn generate(
        &self,
        params: &Params,
        task: Task<'_>,
        noise: &mut dyn NoiseSource,
        callback: &mut dyn FnMut(&Progress<'_>) -> Control,
    ) -> Result<Outcome> {
        let (w, h, strength) = self.check_params(params, &task)?;
        let b = &self.backend;
        let mut timings = Timings::default();
        let mut sampler = self.sampler(params)?;
        let timesteps = sampler.timesteps().to_vec();
        let (start, end) = self.schedule_window(params, &task, sampler.as_ref(), strength)?;

        let guidance = params.guidance_scale > 1.0;
        let t0 = Instant::now();
        let prompts = self.encode_prompts(params, guidance)?;
        for p in &prompts {
            if !params.keep_non_finite && !all_finite(&b.download(&p.context)?) {
                return Err(Error::NonFinite {
                    stage: "after text encoding",
                    step: None,
                });
            }
        }
        timings.text_encoding = t0.elapsed();

        let n = params.num_images;
        let f = self.vae_scale_factor();
        let c = self.vae.config().latent_channels;
        let (lw, lh) = (w / f, h / f);
        let per_image = c * lh * lw;
        let shape = [n, c, lh, lw];
        let inpainting_unet = self.is_inpainting();

        // 1. The image's latents.
        let t0 = Instant::now();
        let (pixels, mask) = match task {
            Task::TextToImage | Task::Latents { .. } => (None, None),
            Task::ImageToImage { image, .. } => (Some(image.to_chw_signed()), None),
            Task::Inpaint { image, mask, .. } => (Some(image.to_chw_signed()), Some(mask)),
        };
        let encode_image = match task {
            Task::TextToImage | Task::Latents { .. } => false,
            Task::ImageToImage { .. } => true,
            Task::Inpaint { .. } => !inpainting_unet || strength < 1.0,
        };
        let image_latents = match (&pixels, task) {
            (Some(p), _) if encode_image => Some(repeat(&self.encode_image(p, w, h, noise)?, n)),
            // One entry for every image, or one each.
            (_, Task::Latents { latents, .. }) => {
                Some(repeat(latents, n * per_image / latents.len()))
            }
            _ => None,
        };
        if pixels.is_some() {
            timings.image_encoding = t0.elapsed();
        }

        // 2. The initial noise and latents; none is drawn for latents taken as already
        // noised (diffusers' `add_noise=False` with `denoising_start`).
        let add_noise = params.denoising_start.is_none();
        let init_noise = if add_noise {
            fill(noise, n * per_image)?
        } else {
            Vec::new()
        };
        let pure_noise = match task {
            Task::TextToImage => true,
            Task::ImageToImage { .. } | Task::Latents { .. } => false,
            Task::Inpaint { .. } => strength == 1.0,
        };
        let latents = match &image_latents {
            Some(x0) if !pure_noise => {
                if add_noise && start < timesteps.len() {
                    let mut out = vec![0.0; x0.len()];
                    sampler
                        .add_noise(x0, &init_noise, start, &mut out)
                        .map_err(|e| scheduler_error("add_noise", e))?;
                    out
                } else {
                    x0.clone()
                }
            }
            _ => {
                let sigma = sampler.init_noise_sigma() as f32;
                init_noise.iter().map(|v| v * sigma).collect()
            }
        };

        // 3. The mask at the latents' size, and the masked image's latents.
        let t0 = Instant::now();
        let mut mask_latent = None;
        let mut masked_latents = None;
        if let (Some(mask), Some(p)) = (mask, &pixels) {
            let m = mask.binary();
            let masked: Vec<f32> = p
                .iter()
                .enumerate()
                .map(|(i, &v)| if m[i % (w * h)] < 0.5 { v } else { 0.0 })
                .collect();
            if inpainting_unet {
                masked_latents = Some(self.encode_image(&masked, w, h, noise)?);
            } else {
                // Drawn and unused, as diffusers does.
                fill(noise, per_image)?;
            }
            mask_latent = Some(mask.binary_nearest(lw, lh));
            timings.image_encoding += t0.elapsed();
        }

        // The ControlNets' hints, embedded once.
        let controls = self.active_controls(params)?;
        let controlled = ControlledUnet {
            unet: &self.unet,
            controls,
            // As diffusers: the first ControlNet's pooling decides.
            guess_mode: params.guess_mode
                || self
                    .controlnets
                    .first()
                    .is_some_and(|c| c.config().global_pool_conditions),
        };
        let predictor: &dyn NoisePredictor<B> = if self.controlnets.is_empty() {
            &self.unet
        } else {
            &controlled
        };
        // The mask and masked-image latents an inpainting UNet takes beside each latent.
        let extra: Option<Vec<f32>> = match (&mask_latent, &masked_latents) {
            (Some(m), Some(ml)) => Some([m.as_slice(), ml.as_slice()].concat()),
            _ => None,
        };
        let chunk = Self::batch_size(params, (lh, lw));
        let image_task = !matches!(task, Task::TextToImage);
        let (negative, positive) = self.time_ids(params, w, h, image_task);
        let ids = TimeIds {
            negative,
            positive,
            n,
            // diffusers' text-to-image pipelines repeat [negative, positive] per image.
            interleaved: !image_task,
        };
        // Made once per (images in the call, parity of its first image).
        type Made<T> = ((usize, usize), Conditioning<T>);
        let mut conds: Vec<Made<B::Tensor>> = Vec::new();

        // The denoising loop.
        let t0 = Instant::now();
        let mut predict = |step: StepPosition, t: f64, scaled: &[f32]| -> Result<Vec<f32>> {
            let mut model_output = Vec::with_capacity(scaled.len());
            // The images in batches of `chunk`; with guidance each batch is its images'
            // unconditional halves, then their conditional halves.
            for (call, images) in scaled.chunks(chunk * per_image).enumerate() {
                let k = images.len() / per_image;
                let first = call * chunk;
                // The conditioning depends on the images only through their count and, with
                // interleaved SDXL ids, the parity of the first.
                let key = (k, if ids.interleaved { first % 2 } else { 0 });
                let cond = match conds.iter().position(|(made_for, _)| *made_for == key) {
                    Some(i) => &conds[i].1,
                    None => {
                        let made = self.conditioning(
                            &prompts,
                            &ids,
                            extra.as_deref(),
                            (first, k),
                            guidance,
                            (lh, lw),
                        )?;
                        conds.push((key, made));
                        &conds[conds.len() - 1].1
                    }
                };
                let batch = if guidance { 2 * k } else { k };
                let x = if guidance {
                    b.upload(&images.repeat(2), &[batch, c, lh, lw])?
                } else {
                    b.upload(images, &[batch, c, lh, lw])?
                };
                let out = b.download(&predictor.predict(b, &x, t, cond, step)?)?;
                if !guidance {
                    model_output.extend(out);
                    continue;
                }
                let (uncond, text) = out.split_at(k * per_image);
                let g = params.guidance_scale as f32;
                let mut cfg: Vec<f32> = uncond
                    .iter()
                    .zip(text)
                    .map(|(&u, &t)| u + g * (t - u))
                    .collect();
                if params.guidance_rescale > 0.0 {
                    rescale_noise_cfg(&mut cfg, text, per_image, params.guidance_rescale);
                }
                model_output.extend(cfg);
            }
            Ok(model_output)
        };
        let blend = !inpainting_unet && mask_latent.is_some();
        let mut after_step = |sampler: &dyn Sampler, i: usize, latents: &mut [f32]| -> Result<()> {
            let (Some(m), Some(x0), true) = (&mask_latent, &image_latents, blend) else {
                return Ok(());
            };
            // Blend the known region back, noised to the next step's level (clean after the
            // last step run).
            let known = if i + 1 < end {
                let mut out = vec![0.0; x0.len()];
                sampler
                    .add_noise(x0, &init_noise, i + 1, &mut out)
                    .map_err(|e| scheduler_error("add_noise", e))?;
                out
            } else {
                x0.clone()
            };
            let plane = lh * lw;
            for (j, v) in latents.iter_mut().enumerate() {
                let keep = 1.0 - m[j % plane];
                *v = keep * known[j] + (1.0 - keep) * *v;
            }
            Ok(())
        };
        let run = Run {
            sampler: sampler.as_mut(),
            noise,
            start,
            end,
            shape,
            check_finite: !params.keep_non_finite,
        };
        let done = denoise(run, latents, &mut predict, &mut after_step, callback)?;
        timings.denoising = t0.elapsed();
        let (latents, steps_run) = (done.latents, done.steps_run);
        if done.end == LoopEnd::Cancelled {
            return Ok(Outcome::Cancelled { steps_run });
        }

        let t0 = Instant::now();
        let (images, pixels) = if params.latents_only {
            (Vec::new(), Vec::new())
        } else {
            self.decode_in(&latents, shape, params.vae_tiling, chunk)?
        };
        if !params.keep_non_finite && !all_finite(&pixels) {
            return Err(Error::NonFinite {
                stage: "after decoding",
                step: None,
            });
        }
        timings.decoding = t0.elapsed();
        let generation = Generation {
            images,
            pixels,
            latents,
            latent_shape: shape,
            steps_run,
            timings,
        };
        Ok(if done.end == LoopEnd::Finished {
            Outcome::Finished(generation)
        } else {
            Outcome::Stopped(generation)
        })
    }
}

/// An image's `(width, height)`.
fn image_size(image: &Image) -> (usize, usize) {
    (image.width(), image.height())
}

/// The chunk of an empty prompt, all weights 1: what pads prompts to as many chunks.
fn empty_chunk(tokenizer: &ClipTokenizer) -> Result<WeightedChunk> {
    Ok(WeightedChunk {
        ids: tokenizer.encode("")?,
        weights: vec![1.0; tokenizer.max_length()],
    })
}

fn seeded(params: &Params) -> RngNoise<rand::rngs::StdRng> {
    RngNoise(rand::rngs::StdRng::seed_from_u64(params.seed))
}

//! Pixel-space diffusion: sampling a [`Unet2DModel`] directly in image space, optionally
//! class-conditional, with any sampler.
//!
//! Follows diffusers 0.42's `DDPMPipeline` (`pipelines/ddpm/pipeline_ddpm.py`), with what
//! that pipeline lacks and a user of a class-conditional model needs: class labels, any
//! sampler of `sd-schedulers` (not only the model's own), `scale_model_input` for the
//! k-diffusion samplers, and the progress callback of the Stable Diffusion pipelines.
//!
//! ```text
//! x_T = init_noise_sigma * noise [N, C, H, W]
//! for each step i:  eps = unet(scale_model_input(x, i), t_i, labels);  x = step(i, eps, x)
//! ```
//!
//! Random values are drawn from one [`NoiseSource`]: the initial noise `[N, C, H, W]`, image
//! after image, then each step of a stochastic sampler, `[N, C, H, W]`. The sampler steps the
//! whole batch at once; the network may see it in smaller pieces
//! ([`PixelParams::max_batch`]), which changes neither the noise nor, beyond float
//! rounding, the result.
//!
//! The crate's embedded example model, a class-conditional DDPM of handwritten digits, is in
//! the repository's `assets/digits` (`cargo run --release --example digits`).

use std::path::Path;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use sd_schedulers::{NoiseSource, Plan, RngNoise, Sampler, SchedulerConfig, registry};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::files::read_regular_string;
use crate::nn::ClassLabels;
use crate::pipeline::denoise::{LoopEnd, Run, StepPosition, denoise};
use crate::pipeline::generate::{Control, Limits, Outcome, Progress, SamplerChoice};
use crate::pipeline::image::Image;
use crate::pipeline::load::scheduler_error;
use crate::unet::Unet2DModel;
use crate::weights::Variant;

/// A pixel-space diffusion model: a [`Unet2DModel`] and its scheduler config.
#[derive(Debug)]
pub struct PixelDiffusion<B: Backend> {
    backend: B,
    unet: Unet2DModel<B>,
    scheduler: SchedulerConfig,
}

/// What to sample.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelParams {
    /// The class of each sample, for a class-conditional network (`num_class_embeds`): as
    /// many samples as classes. Must be empty for an unconditional network.
    pub classes: Vec<u32>,
    /// The number of samples of an unconditional network (ignored when `classes` is not
    /// empty).
    pub num_images: usize,
    /// Inference steps.
    pub steps: usize,
    /// The sampler.
    pub sampler: SamplerChoice,
    /// The seed of the random number generator every random value is drawn from.
    pub seed: u64,
    /// `(height, width)` in pixels; `None`: the network's `sample_size`.
    pub size: Option<(usize, usize)>,
    /// The most samples the network evaluates at once (0: the whole batch; with guidance
    /// each sample counts twice). Bounds the memory of a large batch; the result depends on
    /// it only by float rounding.
    pub max_batch: usize,
    /// Go on when values stop being finite (by default a step that makes NaN or infinity
    /// stops with [`Error::NonFinite`]).
    pub keep_non_finite: bool,
    /// Bounds on the size, sample count and steps, checked before any work.
    pub limits: Limits,
    /// Classifier-free guidance, for a class-conditional network trained with label dropout
    /// (`None`: the conditional prediction alone).
    pub guidance: Option<ClassGuidance>,
}

/// Classifier-free guidance for a class-conditional network that learned a "no class" label
/// (label dropout, [`crate::train::ddpm::drop_labels`]): each step predicts with the sample's
/// class and with the null class and takes `uncond + scale * (cond - uncond)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassGuidance {
    /// The guidance scale: 1 is the conditional prediction, 0 the unconditional one.
    pub scale: f32,
    /// The class the network learned as "no class" (`train-digits --label-dropout` makes it
    /// the last one).
    pub null_class: u32,
}

impl Default for PixelParams {
    /// One unconditional sample in 50 steps with the model's sampler, as `DDPMPipeline`
    /// would with `num_inference_steps=50`.
    fn default() -> Self {
        PixelParams {
            classes: Vec::new(),
            num_images: 1,
            steps: 50,
            sampler: SamplerChoice::Model,
            seed: 0,
            size: None,
            max_batch: 0,
            keep_non_finite: false,
            limits: Limits::default(),
            guidance: None,
        }
    }
}

/// Samples drawn by [`PixelDiffusion`].
#[derive(Debug, Clone, PartialEq)]
pub struct PixelSamples {
    /// The samples as the sampler left them, `[N, C, H, W]`, nominally in [-1, 1].
    pub values: Vec<f32>,
    /// `[N, C, H, W]`.
    pub shape: [usize; 4],
    /// The steps run.
    pub steps_run: usize,
    /// The time the denoising loop took.
    pub denoising: Duration,
}

impl PixelSamples {
    /// The samples in [0, 1]: `clamp(x / 2 + 0.5, 0, 1)`, as `DDPMPipeline`'s output.
    pub fn to_unit(&self) -> Vec<f32> {
        self.values
            .iter()
            .map(|&v| (v / 2.0 + 0.5).clamp(0.0, 1.0))
            .collect()
    }

    /// The samples as 8-bit RGB images (one channel is shown grey; three are RGB).
    ///
    /// # Errors
    /// [`Error::Shape`] for samples with other than 1 or 3 channels.
    pub fn to_images(&self) -> Result<Vec<Image>> {
        let [_, c, h, w] = self.shape;
        let unit = self.to_unit();
        unit.chunks_exact(c * h * w)
            .map(|s| match c {
                3 => Image::from_chw_unit(s, w, h),
                1 => Image::from_chw_unit(&s.repeat(3), w, h),
                _ => Err(Error::Shape {
                    op: "PixelSamples::to_images",
                    expected: "1 or 3 channels".into(),
                    found: format!("{c} channels"),
                }),
            })
            .collect()
    }
}

fn config_error(what: &str, message: String) -> Error {
    Error::Config {
        what: what.to_string(),
        message,
    }
}

impl<B: Backend> PixelDiffusion<B> {
    /// A pipeline from a network and the scheduler config it was trained with.
    pub fn from_parts(backend: B, unet: Unet2DModel<B>, scheduler: SchedulerConfig) -> Self {
        PixelDiffusion {
            backend,
            unet,
            scheduler,
        }
    }

    /// Loads a diffusers `DDPMPipeline` folder: `unet/` (config and weights) and
    /// `scheduler/scheduler_config.json`. Unused weights are an error.
    ///
    /// # Errors
    /// [`Error::Io`] naming a missing file; [`Error::Config`] for a malformed config; the
    /// network's loading errors.
    pub fn from_dir(backend: B, dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let unet = Unet2DModel::from_dir(&backend, dir.join("unet"), &[Variant::Default], true)?;
        let path = dir.join("scheduler").join("scheduler_config.json");
        let scheduler = SchedulerConfig::from_json(&read_regular_string(&path)?)
            .map_err(|e| scheduler_error(&path.display().to_string(), e))?;
        Ok(Self::from_parts(backend, unet, scheduler))
    }

    /// The network.
    pub fn unet(&self) -> &Unet2DModel<B> {
        &self.unet
    }

    /// The scheduler config every sampler is built from.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The number of classes of a class-conditional network (`num_class_embeds`).
    pub fn num_classes(&self) -> Option<usize> {
        self.unet.config().num_class_embeds
    }

    /// `(height, width)` of the network's `sample_size`, if its config gives one.
    pub fn sample_size(&self) -> Option<(usize, usize)> {
        self.unet
            .config()
            .sample_size
            .as_ref()
            .map(|s| s.height_width())
    }

    /// The sampler `params` asks for, planned for `params.steps` steps and `batch` samples.
    ///
    /// # Errors
    /// [`Error::Config`] for an unknown sampler name or a config the sampler rejects.
    pub fn sampler(&self, params: &PixelParams, batch: usize) -> Result<Box<dyn Sampler>> {
        let plan = Plan::steps(params.steps).with_batch_size(batch.max(1));
        match &params.sampler {
            SamplerChoice::Model => registry::from_config(&self.scheduler, plan),
            SamplerChoice::Name(name) => registry::sampler(name, &self.scheduler, plan),
            SamplerChoice::Config(config) => registry::from_config(config, plan),
        }
        .map_err(|e| scheduler_error("sampler", e))
    }

    /// `(N, height, width)` after checking `params` against the network.
    fn check(&self, params: &PixelParams) -> Result<(usize, usize, usize)> {
        if params.steps == 0 {
            return Err(config_error(
                "steps",
                "0 steps: at least 1 is needed".into(),
            ));
        }
        let n = match self.num_classes() {
            Some(classes) => {
                if params.classes.is_empty() {
                    return Err(config_error(
                        "classes",
                        format!(
                            "the network is class-conditional ({classes} classes): give a class per sample"
                        ),
                    ));
                }
                if let Some(&bad) = params.classes.iter().find(|&&c| c as usize >= classes) {
                    return Err(config_error(
                        "classes",
                        format!("class {bad} is not one of the network's 0..{classes}"),
                    ));
                }
                if let Some(g) = params.guidance
                    && (g.null_class as usize >= classes || !g.scale.is_finite())
                {
                    return Err(config_error(
                        "guidance",
                        format!(
                            "null class {} of the network's 0..{classes} and a finite scale ({})",
                            g.null_class, g.scale
                        ),
                    ));
                }
                params.classes.len()
            }
            None if params.guidance.is_some() => {
                return Err(config_error(
                    "guidance",
                    "class guidance needs a class-conditional network".into(),
                ));
            }
            None => {
                if !params.classes.is_empty() {
                    return Err(config_error(
                        "classes",
                        "the network is unconditional: it takes no classes".into(),
                    ));
                }
                if params.num_images == 0 {
                    return Err(config_error("num_images", "0 images asked for".into()));
                }
                params.num_images
            }
        };
        let (h, w) = match params.size.or_else(|| self.sample_size()) {
            Some(size) => size,
            None => {
                return Err(config_error(
                    "size",
                    "the network's config has no sample_size: give a size".into(),
                ));
            }
        };
        params.limits.check_counts(n, params.steps)?;
        params.limits.check_size(w, h)?;
        let factor = self.unet.config().downsample_factor();
        for (what, v) in [("height", h), ("width", w)] {
            if v == 0 || v % factor != 0 {
                return Err(config_error(
                    what,
                    format!(
                        "{v} is not a positive multiple of {factor}, the network's downsampling"
                    ),
                ));
            }
        }
        Ok((n, h, w))
    }

    /// Samples with the seeded generator of [`PixelParams::seed`] (`rand`'s `StdRng`).
    ///
    /// # Errors
    /// As [`PixelDiffusion::generate`].
    pub fn sample(
        &self,
        params: &PixelParams,
        mut callback: impl FnMut(&Progress<'_>) -> Control,
    ) -> Result<Outcome<PixelSamples>> {
        let mut noise = RngNoise(rand::rngs::StdRng::seed_from_u64(params.seed));
        self.generate(params, &mut noise, &mut callback)
    }

    /// Samples with the noise of `noise` (the initial noise `[N, C, H, W]`, then each step of
    /// a stochastic sampler), calling `callback` after every step; [`Progress::latents`] are
    /// the samples.
    ///
    /// # Errors
    /// [`Error::Config`] naming the parameter for 0 steps, missing, unexpected or
    /// out-of-range classes, a size the network cannot downsample, an unknown sampler or a
    /// failing noise source; the network's errors.
    pub fn generate(
        &self,
        params: &PixelParams,
        noise: &mut dyn NoiseSource,
        callback: &mut dyn FnMut(&Progress<'_>) -> Control,
    ) -> Result<Outcome<PixelSamples>> {
        let (n, h, w) = self.check(params)?;
        let b = &self.backend;
        let c = self.unet.config().in_channels;
        // Learned-variance networks predict more channels than they take (the sampler
        // splits them).
        let out_per_image = self.unet.config().out_channels * h * w;
        let per_image = c * h * w;
        let shape = [n, c, h, w];
        let mut sampler = self.sampler(params, n)?;

        let mut samples = vec![0.0_f32; n * per_image];
        noise
            .fill(&mut samples)
            .map_err(|e| scheduler_error("noise", e))?;
        let sigma = sampler.init_noise_sigma() as f32;
        samples.iter_mut().for_each(|v| *v *= sigma);

        // With guidance each sample is evaluated twice (with its class and the null class).
        let chunk = match (params.max_batch, params.guidance) {
            (0, _) => n,
            (max, None) => max.min(n),
            (max, Some(_)) => (max / 2).clamp(1, n),
        };
        let t0 = Instant::now();
        let mut predict = |_: StepPosition, t: f64, scaled: &[f32]| -> Result<Vec<f32>> {
            let mut model_output = vec![0.0_f32; n * out_per_image];
            for (start, (x, out)) in scaled
                .chunks(chunk * per_image)
                .zip(model_output.chunks_mut(chunk * out_per_image))
                .enumerate()
                .map(|(j, p)| (j * chunk, p))
            {
                let m = x.len() / per_image;
                let classes = params.classes.get(start..start + m).unwrap_or(&[]);
                let Some(g) = params.guidance else {
                    let input = b.upload(x, &[m, c, h, w])?;
                    let labels = (!classes.is_empty()).then_some(ClassLabels::Ids(classes));
                    let eps = self.unet.forward(b, &input, &[t], labels)?;
                    out.copy_from_slice(&b.download(&eps)?);
                    continue;
                };
                // The conditional and unconditional predictions in one batch of 2m.
                let input = b.upload(&[x, x].concat(), &[2 * m, c, h, w])?;
                let labels: Vec<u32> = classes
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(g.null_class, m))
                    .collect();
                let both = b.download(&self.unet.forward(
                    b,
                    &input,
                    &[t],
                    Some(ClassLabels::Ids(&labels)),
                )?)?;
                let (cond, uncond) = both.split_at(m * out_per_image);
                // Guided where the prediction is of the noise (the first `c` channels); a
                // learned variance (further channels) is the conditional one.
                out.copy_from_slice(cond);
                for (oc, uc) in out
                    .chunks_exact_mut(out_per_image)
                    .zip(uncond.chunks_exact(out_per_image))
                {
                    let guided = per_image.min(out_per_image);
                    for (o, &u) in oc[..guided].iter_mut().zip(&uc[..guided]) {
                        *o = u + g.scale * (*o - u);
                    }
                }
            }
            Ok(model_output)
        };
        let run = Run {
            sampler: sampler.as_mut(),
            noise,
            start: 0,
            end: usize::MAX,
            shape,
            check_finite: !params.keep_non_finite,
        };
        let done = denoise(run, samples, &mut predict, &mut |_, _, _| Ok(()), callback)?;
        let steps_run = done.steps_run;
        if done.end == LoopEnd::Cancelled {
            return Ok(Outcome::Cancelled { steps_run });
        }
        let result = PixelSamples {
            values: done.latents,
            shape,
            steps_run,
            denoising: t0.elapsed(),
        };
        Ok(if done.end == LoopEnd::Finished {
            Outcome::Finished(result)
        } else {
            Outcome::Stopped(result)
        })
    }
}

//! Multistep sampling of a latent consistency model (Luo et al., 2023, "Latent Consistency
//! Models: Synthesizing High-Resolution Images with Few-Step Inference", Algorithm 1; the
//! consistency models of Song et al., 2023), as diffusers' `LCMScheduler`:
//!
//! ```text
//! x0       = prediction_type.to_x0(model_output, x_t)        (then clipped or thresholded)
//! c_skip   = sigma_data^2 / ((s t)^2 + sigma_data^2),  c_out = s t / sqrt((s t)^2 + sigma_data^2)
//! denoised = c_out x0 + c_skip x_t                            (sigma_data = 0.5, s = timestep_scaling)
//! x_prev   = sqrt(abar_prev) denoised + sqrt(1 - abar_prev) z,   z ~ N(0, I)
//! ```
//!
//! with `prev` the next timestep of the schedule; the last step returns `denoised` and draws
//! no noise. [`StepOutput::pred_original_sample`](crate::StepOutput) holds `denoised` (what
//! diffusers returns as `denoised`, the consistency function's output).
//!
//! # Timesteps
//!
//! The model was distilled on `N = original_inference_steps` timesteps
//! `k (i + 1) - 1`, `i = 0..N`, `k = T / N` (integer division); `n` of them are picked, largest
//! first, at the indices `floor(j N / n)` of the reversed list. `timestep_spacing` and
//! `steps_offset` are ignored, as in diffusers. Custom timesteps (strictly decreasing, below
//! `T`) replace the picked ones.
//!
//! diffusers' `set_timesteps` also takes a `strength` and an `original_inference_steps` that
//! overrides the config's; they are [`LcmOptions`]. With `strength < 1` (LCM's own
//! image-to-image pipeline) only the first `floor(N strength)` distillation timesteps are
//! candidates, so the whole (shorter-reaching) schedule is run from its first step, after
//! [`Sampler::add_noise`] at index 0. With custom timesteps, `strength` drops the first
//! `n - floor(n strength)` of them, and, as in diffusers, every step of the shortened list then
//! draws noise, the last one included (diffusers compares the step index with the original
//! count).
//!
//! `set_alpha_to_one` has no effect: the previous timestep is never negative.

use sd_core::{NoiseSchedule, PredictionType, TimestepSpacing};

use crate::common::postprocess_x0;
use crate::config::{BaseConfig, BetaScheduleName, SchedulerConfig, ThresholdConfig};
use crate::ddpm::{check_custom_timesteps, predict_x0};
use crate::error::{Error, Result, check_len};
use crate::noise::NoiseSource;
use crate::sampler::{Plan, RunOrder, Sampler, Steps, check_step_slices};

/// `sigma_data` of the consistency boundary conditions.
const SIGMA_DATA: f64 = 0.5;

/// The arguments of LCM's `set_timesteps` beyond the step count (diffusers passes them there
/// rather than in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct LcmOptions {
    /// Image-to-image strength in (0, 1]: only the first `floor(N strength)` distillation
    /// timesteps are used (1: all of them).
    pub strength: f64,
    /// Overrides the config's `original_inference_steps`.
    pub original_inference_steps: Option<usize>,
}

impl Default for LcmOptions {
    fn default() -> Self {
        LcmOptions {
            strength: 1.0,
            original_inference_steps: None,
        }
    }
}

impl LcmOptions {
    /// Options with the given image-to-image `strength`.
    pub fn strength(strength: f64) -> Self {
        LcmOptions {
            strength,
            ..Default::default()
        }
    }
}

/// The LCM sampler; see the module documentation.
#[derive(Debug, Clone)]
pub struct Lcm {
    schedule: NoiseSchedule,
    prediction_type: PredictionType,
    threshold: ThresholdConfig,
    batch_size: usize,
    timestep_scaling: f64,
    train_timesteps: Vec<usize>,
    timesteps: Vec<f64>,
    num_inference_steps: usize,
    options: LcmOptions,
    run: RunOrder,
    noise: Vec<f32>,
}

/// The consistency-model defaults of LCM and TCD: scaled_linear 0.00085 to 0.012.
pub(crate) fn consistency_base(config: &SchedulerConfig) -> BaseConfig {
    let mut base = BaseConfig::diffusers_default(TimestepSpacing::Leading);
    base.beta_start = 0.00085;
    base.beta_end = 0.012;
    base.beta_schedule = BetaScheduleName::ScaledLinear;
    base.resolve(config)
}

/// Checks the `strength` of a consistency sampler's `set_timesteps`.
pub(crate) fn check_strength(strength: f64) -> Result<()> {
    if (0.0..=1.0).contains(&strength) {
        Ok(())
    } else {
        Err(Error::Strength(strength))
    }
}

/// The timesteps of LCM's and TCD's `set_timesteps`, largest first, and diffusers'
/// `num_inference_steps`. `origin` holds the candidate timesteps in increasing order and
/// `original_steps` the distillation step count they were checked against.
pub(crate) fn consistency_timesteps(
    sampler: &'static str,
    num_train_timesteps: usize,
    original_steps: usize,
    origin: &[usize],
    strength: f64,
    steps: &Steps,
) -> Result<(Vec<usize>, usize)> {
    match steps {
        Steps::Timesteps(custom) => {
            check_custom_timesteps(sampler, custom, num_train_timesteps)?;
            let n = custom.len();
            let init = ((n as f64 * strength) as usize).min(n);
            let kept = custom[n - init..].to_vec();
            if kept.is_empty() {
                return Err(Error::InvalidConfig {
                    sampler,
                    key: "strength",
                    value: strength.to_string(),
                    reason: "leaves none of the custom timesteps",
                });
            }
            Ok((kept, n))
        }
        Steps::Count(n) => {
            let n = *n;
            if n == 0 || n > num_train_timesteps {
                return Err(Error::InvalidConfig {
                    sampler,
                    key: "num_inference_steps",
                    value: n.to_string(),
                    reason: "must lie in 1..=num_train_timesteps",
                });
            }
            if origin.len() / n < 1 {
                return Err(Error::InvalidConfig {
                    sampler,
                    key: "num_inference_steps",
                    value: n.to_string(),
                    reason: "more steps than original_inference_steps x strength timesteps",
                });
            }
            if n > original_steps {
                return Err(Error::InvalidConfig {
                    sampler,
                    key: "num_inference_steps",
                    value: n.to_string(),
                    reason: "cannot be larger than original_inference_steps",
                });
            }
            // np.floor(np.linspace(0, len, n, endpoint=False)) into the reversed list.
            let len = origin.len();
            let step = len as f64 / n as f64;
            let timesteps = (0..n)
                .map(|j| {
                    let i = ((j as f64 * step).floor() as usize).min(len - 1);
                    origin[len - 1 - i]
                })
                .collect();
            Ok((timesteps, n))
        }
        Steps::Sigmas(_) => Err(Error::InvalidConfig {
            sampler,
            key: "sigmas",
            value: "custom".into(),
            reason: "this sampler takes a step count or custom timesteps",
        }),
    }
}

/// LCM's distillation timesteps `k (i + 1) - 1`, `i < floor(N strength)`, `k = T / N`, after
/// checking `N` against `T`.
pub(crate) fn distillation_timesteps(
    sampler: &'static str,
    num_train_timesteps: usize,
    original_steps: usize,
    strength: f64,
) -> Result<Vec<usize>> {
    if original_steps == 0 || original_steps > num_train_timesteps {
        return Err(Error::InvalidConfig {
            sampler,
            key: "original_inference_steps",
            value: original_steps.to_string(),
            reason: "must lie in 1..=num_train_timesteps",
        });
    }
    let k = num_train_timesteps / original_steps;
    let count = (original_steps as f64 * strength) as usize;
    Ok((1..=count).map(|i| i * k - 1).collect())
}

impl Lcm {
    /// diffusers' class name.
    pub const CLASS_NAME: &'static str = "LCMScheduler";

    /// Builds the sampler from a scheduler config (any class's) and a plan: a step count, or
    /// custom timesteps.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for custom sigmas, step counts or timesteps diffusers
    /// rejects (more steps than `original_inference_steps`, say), or a schedule LCM does not
    /// implement; [`Error::Core`] for impossible step counts.
    pub fn new(config: &SchedulerConfig, plan: impl Into<Plan>) -> Result<Self> {
        Self::with_options(config, plan, LcmOptions::default())
    }

    /// As [`Lcm::new`], with `set_timesteps` options.
    ///
    /// # Errors
    /// As [`Lcm::new`]; [`Error::Strength`] for a strength outside [0, 1], and
    /// [`Error::InvalidConfig`] for one that leaves no step.
    pub fn with_options(
        config: &SchedulerConfig,
        plan: impl Into<Plan>,
        options: LcmOptions,
    ) -> Result<Self> {
        let plan = plan.into();
        let base = consistency_base(config);
        base.require_schedule(
            Self::CLASS_NAME,
            &[
                BetaScheduleName::Linear,
                BetaScheduleName::ScaledLinear,
                BetaScheduleName::SquaredcosCapV2,
            ],
        )?;
        check_strength(options.strength)?;
        let timestep_scaling = config.timestep_scaling.unwrap_or(10.0);
        if !timestep_scaling.is_finite() {
            return Err(Error::InvalidConfig {
                sampler: Self::CLASS_NAME,
                key: "timestep_scaling",
                value: timestep_scaling.to_string(),
                reason: "must be finite",
            });
        }
        let schedule = base.noise_schedule()?;
        let t = base.num_train_timesteps;
        let original_steps = options
            .original_inference_steps
            .or(config.original_inference_steps)
            .unwrap_or(50);
        let origin = distillation_timesteps(Self::CLASS_NAME, t, original_steps, options.strength)?;
        let (train_timesteps, num_inference_steps) = consistency_timesteps(
            Self::CLASS_NAME,
            t,
            original_steps,
            &origin,
            options.strength,
            &plan.steps,
        )?;
        for &ts in &train_timesteps {
            schedule.alpha_bar(ts)?;
        }
        Ok(Lcm {
            schedule,
            prediction_type: base.prediction_type,
            threshold: ThresholdConfig::resolve(config, false),
            batch_size: plan.batch_size,
            timestep_scaling,
            timesteps: train_timesteps.iter().map(|&v| v as f64).collect(),
            train_timesteps,
            num_inference_steps,
            options,
            run: RunOrder::default(),
            noise: Vec::new(),
        })
    }

    /// The training timesteps, largest first.
    pub fn train_timesteps(&self) -> &[usize] {
        &self.train_timesteps
    }

    /// The `set_timesteps` options in use.
    pub fn options(&self) -> LcmOptions {
        self.options
    }

    /// The boundary-condition scalings `(c_skip, c_out)` at training timestep `t`.
    pub fn boundary_scalings(&self, t: usize) -> (f64, f64) {
        let scaled = t as f64 * self.timestep_scaling;
        let d = scaled * scaled + SIGMA_DATA * SIGMA_DATA;
        (SIGMA_DATA * SIGMA_DATA / d, scaled / d.sqrt())
    }
}

impl Sampler for Lcm {
    fn class_name(&self) -> &'static str {
        Self::CLASS_NAME
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn num_inference_steps(&self) -> usize {
        self.num_inference_steps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn add_noise(
        &self,
        original: &[f32],
        noise: &[f32],
        index: usize,
        out: &mut [f32],
    ) -> Result<()> {
        self.check_index(index)?;
        check_len("noise", original.len(), noise.len())?;
        Ok(self
            .schedule
            .add_noise(original, noise, self.train_timesteps[index], out)?)
    }

    fn step_into(
        &mut self,
        index: usize,
        model_output: &[f32],
        sample: &[f32],
        noise: &mut dyn NoiseSource,
        prev_sample: &mut [f32],
        pred_original_sample: &mut [f32],
    ) -> Result<()> {
        self.check_index(index)?;
        check_step_slices(model_output, sample, prev_sample, pred_original_sample)?;
        self.run.advance(index)?;

        let t = self.train_timesteps[index];
        let prev = self.train_timesteps.get(index + 1).copied().unwrap_or(t);
        let abar_t = self.schedule.alpha_bar(t)?;
        let abar_prev = self.schedule.alpha_bar(prev)?;
        let (c_skip, c_out) = self.boundary_scalings(t);

        let x0 = pred_original_sample;
        predict_x0(self.prediction_type, abar_t, model_output, sample, x0)?;
        postprocess_x0(x0, &self.threshold, self.batch_size)?;
        // denoised = c_out x0 + c_skip x_t, kept as the step's clean estimate.
        sd_core::ops::lincomb2_in_place(x0, c_out, c_skip, sample)?;
        let denoised = &*x0;

        if index + 1 != self.num_inference_steps {
            self.noise.resize(sample.len(), 0.0);
            noise.fill(&mut self.noise)?;
            sd_core::ops::lincomb2(
                prev_sample,
                abar_prev.sqrt(),
                denoised,
                (1.0 - abar_prev).sqrt(),
                &self.noise,
            )?;
        } else {
            prev_sample.copy_from_slice(denoised);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.run.reset();
    }
}

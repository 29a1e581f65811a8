//! DDIM (Song et al., 2021, "Denoising Diffusion Implicit Models", eq. 12), as diffusers'
//! `DDIMScheduler`:
//!
//! ```text
//! x0  = prediction_type.to_x0(model_output, x_t)      (then clipped or thresholded)
//! eps = prediction_type.to_eps(model_output, x_t)
//! sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev))
//! x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma_t^2) eps + sigma_t z
//! ```
//!
//! The previous timestep is `t - T / n` (integer division) whatever the spacing, as in
//! diffusers; before the first training step the alpha-bar is 1 (`set_alpha_to_one`) or
//! `abar_0`. `eta = 0` is deterministic; `eta > 0` draws `z` from the noise source.

use sd_core::{NoiseSchedule, PredictionType, TimestepSpacing};

use crate::common::postprocess_x0;
use crate::config::{BaseConfig, BetaScheduleName, SchedulerConfig, ThresholdConfig};
use crate::error::{Error, Result, check_len};
use crate::noise::NoiseSource;
use crate::sampler::{Plan, RunOrder, Sampler, Steps, check_step_slices};

/// The step options of DDIM that diffusers passes to `step` rather than keeping in the config.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub struct DdimOptions {
    /// The weight of the stochastic part, 0 (deterministic DDIM) to 1 (DDPM-like).
    pub eta: f64,
    /// Recompute eps from the clipped x0.
    pub use_clipped_model_output: bool,
}

impl DdimOptions {
    /// Options with the given `eta`.
    pub fn eta(eta: f64) -> Self {
        DdimOptions {
            eta,
            ..Default::default()
        }
    }
}

/// The DDIM sampler; see the module documentation.
#[derive(Debug, Clone)]
pub struct Ddim {
    schedule: NoiseSchedule,
    prediction_type: PredictionType,
    threshold: ThresholdConfig,
    batch_size: usize,
    final_alpha_cumprod: f64,
    train_timesteps: Vec<usize>,
    timesteps: Vec<f64>,
    step_ratio: usize,
    options: DdimOptions,
    run: RunOrder,
    noise: Vec<f32>,
}

impl Ddim {
    /// diffusers' class name.
    pub const CLASS_NAME: &'static str = "DDIMScheduler";

    /// Builds the sampler from a scheduler config (any class's) and a plan, with `eta = 0`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for what DDIM does not support (custom timesteps or sigmas, a
    /// schedule it does not implement), [`Error::Core`] for impossible step counts.
    pub fn new(config: &SchedulerConfig, plan: impl Into<Plan>) -> Result<Self> {
        Self::with_options(config, plan, DdimOptions::default())
    }

    /// As [`Ddim::new`], with step options.
    ///
    /// # Errors
    /// As [`Ddim::new`]; also for `eta < 0`.
    pub fn with_options(
        config: &SchedulerConfig,
        plan: impl Into<Plan>,
        options: DdimOptions,
    ) -> Result<Self> {
        let plan = plan.into();
        let base = BaseConfig::diffusers_default(TimestepSpacing::Leading).resolve(config);
        base.require_schedule(
            Self::CLASS_NAME,
            &[
                BetaScheduleName::Linear,
                BetaScheduleName::ScaledLinear,
                BetaScheduleName::SquaredcosCapV2,
            ],
        )?;
        if options.eta.is_nan() || options.eta < 0.0 {
            return Err(Error::InvalidConfig {
                sampler: Self::CLASS_NAME,
                key: "eta",
                value: options.eta.to_string(),
                reason: "must be at least 0",
            });
        }
        let schedule = base.noise_schedule()?;
        let Steps::Count(n) = plan.steps else {
            return Err(Error::InvalidConfig {
                sampler: Self::CLASS_NAME,
                key: "steps",
                value: "custom".into(),
                reason: "DDIM takes a step count",
            });
        };
        let t = base.num_train_timesteps;
        let train_timesteps = base.timestep_spacing.timesteps(t, n, base.steps_offset)?;
        for &ts in &train_timesteps {
            schedule.alpha_bar(ts)?;
        }
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            schedule.alphas_cumprod()[0]
        };
        Ok(Ddim {
            prediction_type: base.prediction_type,
            threshold: ThresholdConfig::resolve(config, true),
            batch_size: plan.batch_size,
            final_alpha_cumprod,
            timesteps: train_timesteps.iter().map(|&v| v as f64).collect(),
            train_timesteps,
            step_ratio: t / n,
            schedule,
            options,
            run: RunOrder::default(),
            noise: Vec::new(),
        })
    }

    /// The training timesteps, largest first.
    pub fn train_timesteps(&self) -> &[usize] {
        &self.train_timesteps
    }
}

impl Sampler for Ddim {
    fn class_name(&self) -> &'static str {
        Self::CLASS_NAME
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn num_inference_steps(&self) -> usize {
        self.train_timesteps.len()
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
        let abar_t = self.schedule.alpha_bar(t)?;
        let abar_prev = match t.checked_sub(self.step_ratio) {
            Some(prev) => self.schedule.alpha_bar(prev)?,
            None => self.final_alpha_cumprod,
        };
        let to_x0 = self.prediction_type.x0_coefficients(abar_t);
        let to_eps = self.prediction_type.eps_coefficients(abar_t);
        to_x0.apply(model_output, sample, pred_original_sample)?;
        postprocess_x0(pred_original_sample, &self.threshold, self.batch_size)?;

        let variance = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev);
        let std_dev = self.options.eta * variance.sqrt();
        let direction = (1.0 - abar_prev - std_dev * std_dev).sqrt();
        let signal = abar_prev.sqrt();
        if self.options.use_clipped_model_output {
            // eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), from the clipped x0.
            let (sa, s1a) = (abar_t.sqrt(), (1.0 - abar_t).sqrt());
            let (a, b, c) = (
                (signal - direction * sa / s1a) as f32,
                (direction / s1a) as f32,
                0.0_f32,
            );
            for ((p, &x0), &x) in prev_sample
                .iter_mut()
                .zip(pred_original_sample.iter())
                .zip(sample)
            {
                *p = a * x0 + b * x + c;
            }
        } else {
            let (s, dm, ds) = (
                signal as f32,
                (direction * to_eps.model) as f32,
                (direction * to_eps.sample) as f32,
            );
            for (((p, &x0), &m), &x) in prev_sample
                .iter_mut()
                .zip(pred_original_sample.iter())
                .zip(model_output)
                .zip(sample)
            {
                *p = s * x0 + dm * m + ds * x;
            }
        }
        if self.options.eta > 0.0 {
            self.noise.resize(sample.len(), 0.0);
            noise.fill(&mut self.noise)?;
            sd_core::ops::lincomb2_in_place(prev_sample, 1.0, std_dev, &self.noise)?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.run.reset();
    }
}

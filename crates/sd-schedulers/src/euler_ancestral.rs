//! Euler's method with ancestral sampling (k-diffusion's `sample_euler_ancestral`, after
//! Karras et al., 2022, "Elucidating the Design Space of Diffusion-Based Generative Models";
//! the ancestral split of the step is that of Ho et al., 2020, "Denoising Diffusion
//! Probabilistic Models"), as diffusers' `EulerAncestralDiscreteScheduler`:
//!
//! ```text
//! sigma_up   = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)
//! sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)
//! d          = (x - x0(x, sigma_i)) / sigma_i
//! x_next     = x + (sigma_down - sigma_i) d + sigma_up z
//! ```
//!
//! Each step goes deterministically down to `sigma_down` and adds fresh noise `z` back up to
//! `sigma_{i+1}`; a noise tensor is drawn at every step, the last included (where
//! `sigma_up = 0`), as diffusers draws it. The model sees `x / sqrt(sigma^2 + 1)`. Noise
//! levels are the training sigmas interpolated at the spaced timesteps (the class has no
//! Karras or exponential ramp and ignores those keys). With `rescale_betas_zero_snr` the last
//! alpha-bar becomes 2^-24, so the first sigma is about 4096. diffusers does not implement
//! `prediction_type = "sample"` for this class; it is rejected at construction.

use sd_core::{PredictionType, TimestepSpacing};

use crate::common::{KSchedule, add_noise_sigma, f32_round, k_alphas_cumprod, k_init_noise_sigma};
use crate::config::{BaseConfig, BetaScheduleName, SchedulerConfig, SigmaConfig};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use crate::sampler::{Plan, RunOrder, Sampler, Steps, check_step_slices};

/// The Euler ancestral sampler; see the module documentation.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    prediction_type: PredictionType,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    num_inference_steps: usize,
    run: RunOrder,
    noise: Vec<f32>,
}

impl EulerAncestral {
    /// diffusers' class name.
    pub const CLASS_NAME: &'static str = "EulerAncestralDiscreteScheduler";

    /// Builds the sampler from a scheduler config (any class's) and a plan.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for what the class does not support (custom timesteps or
    /// sigmas, a schedule it does not implement, `prediction_type = "sample"`),
    /// [`Error::Core`] for impossible step counts.
    pub fn new(config: &SchedulerConfig, plan: impl Into<Plan>) -> Result<Self> {
        let plan = plan.into();
        let base = BaseConfig::diffusers_default(TimestepSpacing::Linspace).resolve(config);
        base.require_schedule(
            Self::CLASS_NAME,
            &[
                BetaScheduleName::Linear,
                BetaScheduleName::ScaledLinear,
                BetaScheduleName::SquaredcosCapV2,
            ],
        )?;
        if base.prediction_type == PredictionType::Sample {
            return Err(Error::InvalidConfig {
                sampler: Self::CLASS_NAME,
                key: "prediction_type",
                value: "sample".into(),
                reason: "not implemented by diffusers for this sampler",
            });
        }
        let Steps::Count(n) = plan.steps else {
            return Err(Error::InvalidConfig {
                sampler: Self::CLASS_NAME,
                key: "steps",
                value: "custom".into(),
                reason: "EulerAncestralDiscreteScheduler takes a step count",
            });
        };
        let schedule = base.noise_schedule()?;
        let alphas_cumprod = k_alphas_cumprod(&schedule, base.rescale_betas_zero_snr);
        let k = KSchedule::new(
            Self::CLASS_NAME,
            &alphas_cumprod,
            base.timestep_spacing,
            base.steps_offset,
            &SigmaConfig::default(),
            &plan.steps,
        )?;
        let mut sigmas: Vec<f64> = k.sigmas.into_iter().map(f32_round).collect();
        sigmas.push(0.0);
        let timesteps: Vec<f64> = k.timesteps.into_iter().map(f32_round).collect();
        let init_noise_sigma = k_init_noise_sigma(&sigmas, base.timestep_spacing);
        Ok(EulerAncestral {
            prediction_type: base.prediction_type,
            timesteps,
            sigmas,
            init_noise_sigma,
            num_inference_steps: n,
            run: RunOrder::default(),
            noise: Vec::new(),
        })
    }
}

impl Sampler for EulerAncestral {
    fn class_name(&self) -> &'static str {
        Self::CLASS_NAME
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn num_inference_steps(&self) -> usize {
        self.num_inference_steps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn model_input_scale(&self, index: usize) -> Result<f64> {
        self.check_index(index)?;
        let sigma = self.sigmas[index];
        Ok(1.0 / (sigma * sigma + 1.0).sqrt())
    }

    fn add_noise(
        &self,
        original: &[f32],
        noise: &[f32],
        index: usize,
        out: &mut [f32],
    ) -> Result<()> {
        self.check_index(index)?;
        add_noise_sigma(original, noise, self.sigmas[index], out)
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

        let (sigma_from, sigma_to) = (self.sigmas[index], self.sigmas[index + 1]);
        let sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from))
            .sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();
        self.prediction_type
            .x0_coefficients_sigma(sigma_from)
            .apply(model_output, sample, pred_original_sample)?;
        self.noise.resize(sample.len(), 0.0);
        noise.fill(&mut self.noise)?;
        // x + (x - x0) / sigma * (sigma_down - sigma) + sigma_up z
        let ratio = (sigma_down - sigma_from) / sigma_from;
        sd_core::ops::lincomb3(
            prev_sample,
            1.0 + ratio,
            sample,
            -ratio,
            pred_original_sample,
            sigma_up,
            &self.noise,
        )?;
        Ok(())
    }

    fn reset(&mut self) {
        self.run.reset();
    }
}

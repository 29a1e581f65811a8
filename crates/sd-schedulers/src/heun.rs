//! Heun's second-order method on the probability-flow ODE (Karras et al., 2022, "Elucidating
//! the Design Space of Diffusion-Based Generative Models", Algorithm 1 without churn), as
//! diffusers' `HeunDiscreteScheduler`:
//!
//! ```text
//! d_i    = (x_i - x0(x_i, sigma_i)) / sigma_i
//! x'     = x_i + (sigma_{i+1} - sigma_i) d_i                          (Euler predictor)
//! d'     = (x' - x0(x', sigma_{i+1})) / sigma_{i+1}
//! x_next = x_i + (sigma_{i+1} - sigma_i) (d_i + d') / 2                (trapezoidal corrector)
//! ```
//!
//! Each step evaluates the model twice, so the schedule lists every noise level after the
//! first twice, as diffusers does: `timesteps = [t_0, t_1, t_1, ..., t_{n-1}, t_{n-1}]`
//! (`2n - 1` evaluations) and `sigmas = [s_0, s_1, s_1, ..., s_{n-1}, s_{n-1}, 0]`. The last
//! step, down to sigma 0, is a plain Euler step. Whether a call is a predictor or a corrector
//! is the sampler's state, as in diffusers: the first step of a run predicts, and each
//! predictor is followed by its corrector. The model sees `x / sqrt(sigma^2 + 1)` with the
//! `sigmas` entry of the call. The predicted x0 is clipped to `clip_sample_range` if
//! `clip_sample` is set.
//!
//! Noise levels are the training sigmas interpolated at the spaced (or custom) timesteps, or
//! the Karras / exponential ramps (between `sigma_min` and `sigma_max` where the config has
//! them). The class knows the `exp` beta schedule (`alpha_bar(t) = exp(-12 t)`), and does
//! not know `rescale_betas_zero_snr`, thresholding, `final_sigmas_type` or the flow options,
//! which it ignores.

use sd_core::{PredictionType, TimestepSpacing};

use crate::common::{
    KSchedule, add_noise_sigma, f32_round, k_alphas_cumprod, k_init_noise_sigma, postprocess_x0,
};
use crate::config::{
    BaseConfig, BetaScheduleName, FinalSigmasType, SchedulerConfig, SigmaConfig, ThresholdConfig,
};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use crate::sampler::{Plan, RunOrder, Sampler, Steps, check_step_slices};

/// The Heun sampler; see the module documentation.
#[derive(Debug, Clone)]
pub struct Heun {
    prediction_type: PredictionType,
    clip: ThresholdConfig,
    batch_size: usize,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    num_inference_steps: usize,
    run: RunOrder,
    /// The step size of the pending predictor; `None` when the next call predicts.
    dt: Option<f64>,
    /// The predictor's derivative and the sample it started from.
    prev_derivative: Vec<f32>,
    first_sample: Vec<f32>,
    scratch: Vec<f32>,
}

impl Heun {
    /// diffusers' class name.
    pub const CLASS_NAME: &'static str = "HeunDiscreteScheduler";

    /// Builds the sampler from a scheduler config (any class's) and a plan (a step count or
    /// custom timesteps).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for what the class does not support (custom sigmas, custom
    /// timesteps with a sigma ramp, a schedule it does not implement, beta sigmas, more than
    /// one ramp), [`Error::Core`] for impossible step counts.
    pub fn new(config: &SchedulerConfig, plan: impl Into<Plan>) -> Result<Self> {
        let plan = plan.into();
        let mut defaults = BaseConfig::diffusers_default(TimestepSpacing::Linspace);
        defaults.beta_start = 0.00085;
        defaults.beta_end = 0.012;
        let mut base = defaults.resolve(config);
        // HeunDiscreteScheduler has no `rescale_betas_zero_snr`.
        base.rescale_betas_zero_snr = false;
        base.require_schedule(
            Self::CLASS_NAME,
            &[
                BetaScheduleName::Linear,
                BetaScheduleName::ScaledLinear,
                BetaScheduleName::SquaredcosCapV2,
                BetaScheduleName::Exp,
            ],
        )?;
        let known = SchedulerConfig {
            use_flow_sigmas: None,
            use_dynamic_shifting: None,
            ..config.clone()
        };
        let mut sigma_config = SigmaConfig::resolve(&known, Self::CLASS_NAME)?;
        sigma_config.final_sigmas_type = FinalSigmasType::Zero;
        let n = match &plan.steps {
            Steps::Count(n) => *n,
            Steps::Timesteps(ts) if ts.is_empty() => {
                return Err(Error::InvalidConfig {
                    sampler: Self::CLASS_NAME,
                    key: "timesteps",
                    value: "[]".into(),
                    reason: "needs at least one timestep",
                });
            }
            Steps::Timesteps(ts) => ts.len(),
            _ => {
                return Err(Error::InvalidConfig {
                    sampler: Self::CLASS_NAME,
                    key: "sigmas",
                    value: "custom".into(),
                    reason: "HeunDiscreteScheduler takes a step count or timesteps",
                });
            }
        };
        let schedule = base.noise_schedule()?;
        let alphas_cumprod = k_alphas_cumprod(&schedule, false);
        let k = KSchedule::new(
            Self::CLASS_NAME,
            &alphas_cumprod,
            base.timestep_spacing,
            base.steps_offset,
            &sigma_config,
            &plan.steps,
        )?;
        // Every level after the first twice: [s0, s1, s1, ..., 0] and [t0, t1, t1, ...].
        let mut sigmas = Vec::with_capacity(2 * n);
        let mut timesteps = Vec::with_capacity(2 * n);
        for (i, (&s, &t)) in k.sigmas.iter().zip(&k.timesteps).enumerate() {
            let repeat = if i == 0 { 1 } else { 2 };
            for _ in 0..repeat {
                sigmas.push(f32_round(s));
                timesteps.push(f32_round(t));
            }
        }
        sigmas.push(0.0);
        let init_noise_sigma = k_init_noise_sigma(&sigmas, base.timestep_spacing);
        let mut clip = ThresholdConfig::resolve(config, false);
        // The class clips (`clip_sample`) but does not threshold.
        clip.thresholding = false;
        Ok(Heun {
            prediction_type: base.prediction_type,
            clip,
            batch_size: plan.batch_size,
            timesteps,
            sigmas,
            init_noise_sigma,
            num_inference_steps: n,
            run: RunOrder::default(),
            dt: None,
            prev_derivative: Vec::new(),
            first_sample: Vec::new(),
            scratch: Vec::new(),
        })
    }
}

impl Sampler for Heun {
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

    fn order(&self) -> usize {
        2
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
        _noise: &mut dyn NoiseSource,
        prev_sample: &mut [f32],
        pred_original_sample: &mut [f32],
    ) -> Result<()> {
        self.check_index(index)?;
        check_step_slices(model_output, sample, prev_sample, pred_original_sample)?;
        self.run.advance(index)?;

        match self.dt {
            None => {
                // Predictor: an Euler step from sigma_i to sigma_{i+1}.
                let (sigma, sigma_next) = (self.sigmas[index], self.sigmas[index + 1]);
                self.prediction_type.x0_coefficients_sigma(sigma).apply(
                    model_output,
                    sample,
                    pred_original_sample,
                )?;
                postprocess_x0(pred_original_sample, &self.clip, self.batch_size)?;
                self.prev_derivative.resize(sample.len(), 0.0);
                sd_core::ops::lincomb2(
                    &mut self.prev_derivative,
                    1.0 / sigma,
                    sample,
                    -1.0 / sigma,
                    pred_original_sample,
                )?;
                let dt = sigma_next - sigma;
                self.first_sample.resize(sample.len(), 0.0);
                self.first_sample.copy_from_slice(sample);
                self.dt = Some(dt);
                sd_core::ops::lincomb2(prev_sample, 1.0, sample, dt, &self.prev_derivative)?;
            }
            Some(dt) => {
                // Corrector at sigma_{i+1}, averaging the two derivatives.
                let sigma_next = self.sigmas[index];
                self.prediction_type
                    .x0_coefficients_sigma(sigma_next)
                    .apply(model_output, sample, pred_original_sample)?;
                postprocess_x0(pred_original_sample, &self.clip, self.batch_size)?;
                self.scratch.resize(sample.len(), 0.0);
                sd_core::ops::lincomb2(
                    &mut self.scratch,
                    1.0 / sigma_next,
                    sample,
                    -1.0 / sigma_next,
                    pred_original_sample,
                )?;
                sd_core::ops::lincomb3(
                    prev_sample,
                    1.0,
                    &self.first_sample,
                    0.5 * dt,
                    &self.prev_derivative,
                    0.5 * dt,
                    &self.scratch,
                )?;
                self.dt = None;
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.run.reset();
        self.dt = None;
    }
}

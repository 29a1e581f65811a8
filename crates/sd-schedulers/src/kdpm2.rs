//! The second-order "DPM-Solver-2" sampler of k-diffusion (`sample_dpm_2`, after Karras et
//! al., 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", and Lu et
//! al., 2022, "DPM-Solver", Algorithm 1 with the midpoint in log-sigma), as diffusers'
//! `KDPM2DiscreteScheduler`:
//!
//! ```text
//! sigma_mid = exp((ln sigma_i + ln sigma_{i+1}) / 2)
//! d_i       = (x_i - x0(x_i, sigma_i)) / sigma_i
//! x_mid     = x_i + (sigma_mid - sigma_i) d_i                        (to the midpoint)
//! d_mid     = (x_mid - x0(x_mid, sigma_mid)) / sigma_mid
//! x_next    = x_i + (sigma_{i+1} - sigma_i) d_mid                    (midpoint rule)
//! ```
//!
//! Each step evaluates the model twice, as diffusers lists it: `timesteps = [t_0, tm_1, t_1,
//! tm_2, t_2, ..., tm_{n-1}, t_{n-1}]` (`2n - 1` evaluations, `tm_k` the fractional timestep
//! of the midpoint between `sigma_{k-1}` and `sigma_k`), and `sigmas = [s_0, s_1, s_1, ...,
//! s_{n-1}, s_{n-1}, 0, 0, 0]` (`2n + 2` values). The last step, whose midpoint with sigma 0
//! is 0, is a plain Euler step. Whether a call is the first or the second half of a step is
//! the sampler's state, as in diffusers: the first call of a run is a first half. The model
//! sees `x / sqrt(sigma^2 + 1)` with `sigma_i` on a first half and `sigma_mid` on a second.
//!
//! Noise levels are the training sigmas interpolated at the spaced timesteps, or the Karras /
//! exponential ramps (between `sigma_min` and `sigma_max` where the config has them). Quirks
//! of diffusers kept on purpose: with Karras sigmas the timesteps are rounded to integers
//! (the midpoints' are not); with either ramp they stay in float64 rather than float32. The
//! class does not implement `prediction_type = "sample"` (rejected at construction) and does
//! not know `rescale_betas_zero_snr`, clipping, `final_sigmas_type` or the flow options,
//! which it ignores.

use sd_core::{PredictionType, TimestepSpacing, sigma_to_t};

use crate::common::{KSchedule, add_noise_sigma, f32_round, k_alphas_cumprod, k_init_noise_sigma};
use crate::config::{BaseConfig, BetaScheduleName, FinalSigmasType, SchedulerConfig, SigmaConfig};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use crate::sampler::{Plan, RunOrder, Sampler, Steps, check_step_slices};

/// The noise levels KDPM2 and KDPM2 ancestral share, before interleaving.
#[derive(Debug, Clone)]
pub(crate) struct Kdpm2Levels {
    /// The resolved keys.
    pub base: BaseConfig,
    /// The number of inference steps.
    pub n: usize,
    /// `n` sigmas and the final 0, in float32.
    pub sigmas: Vec<f64>,
    /// `n` timesteps, in the precision diffusers keeps them.
    pub timesteps: Vec<f64>,
    /// The training log-sigmas, for `sigma_to_t`.
    pub log_sigmas: Vec<f64>,
    /// Whether diffusers keeps the timesteps in float64 (after a sigma ramp).
    pub f64_timesteps: bool,
}

impl Kdpm2Levels {
    /// Resolves the config as `KDPM2DiscreteScheduler` and `KDPM2AncestralDiscreteScheduler`
    /// do and computes their noise levels.
    pub(crate) fn new(
        sampler: &'static str,
        config: &SchedulerConfig,
        plan: &Plan,
    ) -> Result<Self> {
        let mut defaults = BaseConfig::diffusers_default(TimestepSpacing::Linspace);
        defaults.beta_start = 0.00085;
        defaults.beta_end = 0.012;
        let mut base = defaults.resolve(config);
        // The KDPM2 classes have no `rescale_betas_zero_snr`.
        base.rescale_betas_zero_snr = false;
        base.require_schedule(
            sampler,
            &[
                BetaScheduleName::Linear,
                BetaScheduleName::ScaledLinear,
                BetaScheduleName::SquaredcosCapV2,
            ],
        )?;
        if base.prediction_type == PredictionType::Sample {
            return Err(Error::InvalidConfig {
                sampler,
                key: "prediction_type",
                value: "sample".into(),
                reason: "not implemented by diffusers for this sampler",
            });
        }
        let known = SchedulerConfig {
            use_flow_sigmas: None,
            use_dynamic_shifting: None,
            ..config.clone()
        };
        let mut sigma_config = SigmaConfig::resolve(&known, sampler)?;
        sigma_config.final_sigmas_type = FinalSigmasType::Zero;
        let Steps::Count(n) = plan.steps else {
            return Err(Error::InvalidConfig {
                sampler,
                key: "steps",
                value: "custom".into(),
                reason: "this sampler takes a step count",
            });
        };
        let schedule = base.noise_schedule()?;
        let alphas_cumprod = k_alphas_cumprod(&schedule, false);
        let k = KSchedule::new(
            sampler,
            &alphas_cumprod,
            base.timestep_spacing,
            base.steps_offset,
            &sigma_config,
            &plan.steps,
        )?;
        let f64_timesteps = sigma_config.use_karras_sigmas || sigma_config.use_exponential_sigmas;
        let timesteps = k
            .timesteps
            .into_iter()
            .map(|t| {
                if sigma_config.use_karras_sigmas {
                    t.round_ties_even()
                } else if f64_timesteps {
                    t
                } else {
                    f32_round(t)
                }
            })
            .collect();
        let mut sigmas: Vec<f64> = k.sigmas.into_iter().map(f32_round).collect();
        sigmas.push(0.0);
        let log_sigmas = k.train_sigmas.iter().map(|s| s.ln()).collect();
        Ok(Kdpm2Levels {
            base,
            n,
            sigmas,
            timesteps,
            log_sigmas,
            f64_timesteps,
        })
    }

    /// The fractional timestep of a noise level, in the precision of the timesteps.
    pub(crate) fn timestep_of(&self, sigma: f64) -> Result<f64> {
        let t = sigma_to_t(sigma, &self.log_sigmas)?;
        Ok(if self.f64_timesteps { t } else { f32_round(t) })
    }

    /// The largest sigma and `init_noise_sigma` from it.
    pub(crate) fn init_noise_sigma(&self) -> f64 {
        k_init_noise_sigma(&self.sigmas, self.base.timestep_spacing)
    }
}

/// diffusers' `cat([v[:1], v[1:].repeat_interleave(2), v[-1:]])`.
pub(crate) fn interleave(values: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(2 * values.len());
    for (i, &v) in values.iter().enumerate() {
        out.push(v);
        if i > 0 {
            out.push(v);
        }
    }
    if let Some(&last) = values.last() {
        out.push(last);
    }
    out
}

/// The KDPM2 sampler; see the module documentation.
#[derive(Debug, Clone)]
pub struct Kdpm2 {
    prediction_type: PredictionType,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    sigmas_interpol: Vec<f64>,
    init_noise_sigma: f64,
    num_inference_steps: usize,
    run: RunOrder,
    /// Whether a first half is pending (its sample is in `first_sample`).
    pending: bool,
    first_sample: Vec<f32>,
}

impl Kdpm2 {
    /// diffusers' class name.
    pub const CLASS_NAME: &'static str = "KDPM2DiscreteScheduler";

    /// Builds the sampler from a scheduler config (any class's) and a plan.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for what the class does not support (custom timesteps or
    /// sigmas, a schedule it does not implement, `prediction_type = "sample"`, beta sigmas,
    /// more than one ramp), [`Error::Core`] for impossible step counts.
    pub fn new(config: &SchedulerConfig, plan: impl Into<Plan>) -> Result<Self> {
        let plan = plan.into();
        let levels = Kdpm2Levels::new(Self::CLASS_NAME, config, &plan)?;
        let s = &levels.sigmas;
        // The log-midpoint of each sigma and the one before (the one before the first being
        // the final 0, through diffusers' roll; diffusers gets NaN there, never used).
        let interpol: Vec<f64> = (0..s.len())
            .map(|k| f32_round((s[k] * s[(k + s.len() - 1) % s.len()]).sqrt()))
            .collect();
        let mut timesteps = Vec::with_capacity(2 * levels.n);
        for (k, &t) in levels.timesteps.iter().enumerate() {
            if k > 0 {
                timesteps.push(levels.timestep_of(interpol[k])?);
            }
            timesteps.push(t);
        }
        Ok(Kdpm2 {
            prediction_type: levels.base.prediction_type,
            timesteps,
            sigmas: interleave(s),
            sigmas_interpol: interleave(&interpol),
            init_noise_sigma: levels.init_noise_sigma(),
            num_inference_steps: levels.n,
            run: RunOrder::default(),
            pending: false,
            first_sample: Vec::new(),
        })
    }
}

impl Sampler for Kdpm2 {
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

    /// `1 / sqrt(sigma^2 + 1)` with the step's sigma on a first half and the midpoint's on a
    /// second half (which the sampler's state decides, as in diffusers).
    fn model_input_scale(&self, index: usize) -> Result<f64> {
        self.check_index(index)?;
        let sigma = if self.pending {
            self.sigmas_interpol[index]
        } else {
            self.sigmas[index]
        };
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

        if self.pending {
            // Second half: the derivative at the midpoint, applied from the step's start.
            let sigma = self.sigmas[index.saturating_sub(1)];
            let (sigma_mid, sigma_next) = (self.sigmas_interpol[index], self.sigmas[index]);
            self.prediction_type
                .x0_coefficients_sigma(sigma_mid)
                .apply(model_output, sample, pred_original_sample)?;
            let ratio = (sigma_next - sigma) / sigma_mid;
            sd_core::ops::lincomb3(
                prev_sample,
                1.0,
                &self.first_sample,
                ratio,
                sample,
                -ratio,
                pred_original_sample,
            )?;
            self.pending = false;
        } else {
            // First half: an Euler step to the midpoint.
            let (sigma, sigma_mid) = (self.sigmas[index], self.sigmas_interpol[index + 1]);
            self.prediction_type.x0_coefficients_sigma(sigma).apply(
                model_output,
                sample,
                pred_original_sample,
            )?;
            self.first_sample.resize(sample.len(), 0.0);
            self.first_sample.copy_from_slice(sample);
            self.pending = true;
            let ratio = (sigma_mid - sigma) / sigma;
            sd_core::ops::lincomb2(
                prev_sample,
                1.0 + ratio,
                sample,
                -ratio,
                pred_original_sample,
            )?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.run.reset();
        self.pending = false;
    }
}

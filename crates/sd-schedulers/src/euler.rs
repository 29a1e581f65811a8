//! Euler's method on the probability-flow ODE (Karras et al., 2022, Algorithm 2 with its
//! optional "churn"), as diffusers' `EulerDiscreteScheduler`:
//!
//! ```text
//! sigma_hat = sigma_i (1 + gamma),  gamma = min(s_churn / N, sqrt(2) - 1) if s_tmin <= sigma_i <= s_tmax
//! x        <- x + sqrt(sigma_hat^2 - sigma_i^2) s_noise z            (only if gamma > 0)
//! d        = (x - x0(x, sigma_hat)) / sigma_hat
//! x_next   = x + (sigma_{i+1} - sigma_hat) d
//! ```
//!
//! The model sees `x / sqrt(sigma^2 + 1)`. Noise levels come from the training sigmas
//! interpolated at the spaced timesteps, or the Karras / exponential ramps.

use sd_core::TimestepSpacing;

use crate::common::{KSchedule, add_noise_sigma, f32_round, k_alphas_cumprod, k_init_noise_sigma};
use crate::config::{
    BaseConfig, BetaScheduleName, FinalSigmasType, InterpolationType, SchedulerConfig, SigmaConfig,
    TimestepType,
};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use crate::sampler::{Plan, RunOrder, Sampler, Steps, check_step_slices};

/// The churn options of Euler that diffusers passes to `step` (all off by default).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct EulerOptions {
    /// How much noise to add back per step (0: deterministic).
    pub s_churn: f64,
    /// The lowest sigma that gets churn.
    pub s_tmin: f64,
    /// The highest sigma that gets churn.
    pub s_tmax: f64,
    /// The scale of the churn noise.
    pub s_noise: f64,
}

impl Default for EulerOptions {
    fn default() -> Self {
        EulerOptions {
            s_churn: 0.0,
            s_tmin: 0.0,
            s_tmax: f64::INFINITY,
            s_noise: 1.0,
        }
    }
}

/// The Euler sampler; see the module documentation.
#[derive(Debug, Clone)]
pub struct Euler {
    base: BaseConfig,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    num_inference_steps: usize,
    options: EulerOptions,
    run: RunOrder,
    scratch: Vec<f32>,
}

impl Euler {
    /// diffusers' class name.
    pub const CLASS_NAME: &'static str = "EulerDiscreteScheduler";

    /// Builds the sampler from a scheduler config (any class's) and a plan.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for unsupported options, [`Error::Core`] for impossible step
    /// counts.
    pub fn new(config: &SchedulerConfig, plan: impl Into<Plan>) -> Result<Self> {
        Self::with_options(config, plan, EulerOptions::default())
    }

    /// As [`Euler::new`], with churn options.
    ///
    /// # Errors
    /// As [`Euler::new`].
    pub fn with_options(
        config: &SchedulerConfig,
        plan: impl Into<Plan>,
        options: EulerOptions,
    ) -> Result<Self> {
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
        let sigma_config = SigmaConfig::resolve(config, Self::CLASS_NAME)?;
        let interpolation = config.interpolation_type.unwrap_or_default();
        let timestep_type = config.timestep_type.unwrap_or_default();
        let schedule = base.noise_schedule()?;
        let alphas_cumprod = k_alphas_cumprod(&schedule, base.rescale_betas_zero_snr);

        let (timesteps, mut sigmas, num_inference_steps) = match &plan.steps {
            Steps::Sigmas(custom) => {
                if custom.len() < 2 {
                    return Err(Error::InvalidConfig {
                        sampler: Self::CLASS_NAME,
                        key: "sigmas",
                        value: format!("{} values", custom.len()),
                        reason: "needs at least one step and the final sigma",
                    });
                }
                let log_sigmas: Vec<f64> = alphas_cumprod
                    .iter()
                    .map(|&a| sd_core::sigmas::sigma_from_alpha_bar(a).ln())
                    .collect();
                let sigmas: Vec<f64> = custom.iter().map(|&s| f32_round(s)).collect();
                let timesteps = sigmas[..sigmas.len() - 1]
                    .iter()
                    .map(|&s| sd_core::sigma_to_t(s, &log_sigmas))
                    .collect::<sd_core::Result<Vec<_>>>()?;
                let n = timesteps.len();
                // Custom sigmas already end with the final one.
                (timesteps, sigmas, n)
            }
            steps => {
                let n = match steps {
                    Steps::Count(n) => *n,
                    Steps::Timesteps(ts) => ts.len(),
                    Steps::Sigmas(_) => 0,
                };
                let mut k = KSchedule::new(
                    Self::CLASS_NAME,
                    &alphas_cumprod,
                    base.timestep_spacing,
                    base.steps_offset,
                    &sigma_config,
                    steps,
                )?;
                if interpolation == InterpolationType::LogLinear {
                    // diffusers spaces n + 1 sigmas evenly in log between the largest and the
                    // smallest training sigma here, and keeps all of them.
                    let s = &k.train_sigmas;
                    let (hi, lo) = (s[s.len() - 1].ln() as f32, s[0].ln() as f32);
                    k.sigmas = torch_linspace_f32(hi, lo, n + 1)
                        .into_iter()
                        .map(|v| f64::from(v.exp()))
                        .collect();
                    if sigma_config.use_karras_sigmas || sigma_config.use_exponential_sigmas {
                        return Err(Error::InvalidConfig {
                            sampler: Self::CLASS_NAME,
                            key: "interpolation_type",
                            value: "log_linear".into(),
                            reason: "not supported together with a sigma ramp",
                        });
                    }
                }
                let last = match sigma_config.final_sigmas_type {
                    FinalSigmasType::Zero => 0.0,
                    FinalSigmasType::SigmaMin => k.train_sigmas[0],
                };
                let mut sigmas = k.sigmas;
                sigmas.push(last);
                (
                    k.timesteps,
                    sigmas.into_iter().map(f32_round).collect::<Vec<_>>(),
                    n,
                )
            }
        };
        sigmas.iter_mut().for_each(|s| *s = f32_round(*s));
        let timesteps: Vec<f64> = if timestep_type == TimestepType::Continuous
            && base.prediction_type == sd_core::PredictionType::VPrediction
        {
            sigmas[..sigmas.len() - 1]
                .iter()
                .map(|s| f32_round(0.25 * s.ln()))
                .collect()
        } else {
            timesteps.into_iter().map(f32_round).collect()
        };
        let init_noise_sigma = k_init_noise_sigma(&sigmas, base.timestep_spacing);
        Ok(Euler {
            base,
            timesteps,
            sigmas,
            init_noise_sigma,
            num_inference_steps,
            options,
            run: RunOrder::default(),
            scratch: Vec::new(),
        })
    }
}

/// `torch.linspace(start, end, n)` in float32.
fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

impl Sampler for Euler {
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

        let o = self.options;
        let sigma = self.sigmas[index];
        let gamma = if o.s_tmin <= sigma && sigma <= o.s_tmax {
            (o.s_churn / (self.sigmas.len() - 1) as f64).min(std::f64::consts::SQRT_2 - 1.0)
        } else {
            0.0
        };
        let sigma_hat = sigma * (gamma + 1.0);
        // The (possibly churned) sample lives in prev_sample until the update.
        prev_sample.copy_from_slice(sample);
        if gamma > 0.0 {
            self.scratch.resize(sample.len(), 0.0);
            noise.fill(&mut self.scratch)?;
            let amount = (sigma_hat * sigma_hat - sigma * sigma).sqrt() * o.s_noise;
            sd_core::ops::lincomb2_in_place(prev_sample, 1.0, amount, &self.scratch)?;
        }
        let x0 = match self.base.prediction_type {
            sd_core::PredictionType::Epsilon => {
                self.base.prediction_type.x0_coefficients_sigma(sigma_hat)
            }
            other => other.x0_coefficients_sigma(sigma),
        };
        x0.apply(model_output, prev_sample, pred_original_sample)?;
        // x_next = x + (x - x0) / sigma_hat * dt
        let ratio = (self.sigmas[index + 1] - sigma_hat) / sigma_hat;
        sd_core::ops::lincomb2_in_place(prev_sample, 1.0 + ratio, -ratio, pred_original_sample)?;
        Ok(())
    }

    fn reset(&mut self) {
        self.run.reset();
    }
}

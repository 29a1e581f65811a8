//! Ancestral sampling of the DDPM reverse process (Ho et al., 2020, "Denoising Diffusion
//! Probabilistic Models", Algorithm 2 and eqs. 6-7), on a shortened schedule, as diffusers'
//! `DDPMScheduler`:
//!
//! ```text
//! x0     = prediction_type.to_x0(model_output, x_t)        (then clipped or thresholded)
//! x_prev = mu~(x0, x_t) + std z,   z ~ N(0, I), drawn only if t > 0
//! mu~    = sqrt(abar_prev) beta / (1 - abar_t) x0 + sqrt(alpha) (1 - abar_prev) / (1 - abar_t) x_t
//!          with alpha = abar_t / abar_prev, beta = 1 - alpha (the step's own beta)
//! ```
//!
//! `prev` is the next timestep of the schedule (custom or spaced), and alpha-bar 1 after the
//! last one. The standard deviation `std` follows `variance_type`
//! ([`sd_core::PosteriorCoefficients::std_dev`]): `fixed_small` and `fixed_small_log` take the
//! posterior variance `beta~ = (1 - abar_prev) / (1 - abar_t) beta` (clamped below at 1e-20),
//! `fixed_large` the step's `beta`; `learned` takes the model's variance channel `v` as the
//! variance, `learned_range` interpolates the logs (Nichol & Dhariwal, 2021, "Improved
//! Denoising Diffusion Probabilistic Models", eq. 15):
//! `ln var = (v + 1) / 2 ln(beta) + (1 - (v + 1) / 2) ln(beta~)`, element-wise.
//!
//! # Learned variances
//!
//! With `learned` or `learned_range`, the model outputs twice the sample's channels: for each
//! sample of the batch (the [`Plan`]'s `batch_size`), first the prediction, then the variance
//! channels, as diffusers' `torch.split(model_output, C, dim=1)` of a `[B, 2C, H, W]` tensor
//! reads them. `step` then takes a `model_output` of twice the sample's length.
//!
//! # Where this differs from diffusers
//!
//! diffusers' `fixed_large_log` takes the square root of `ln(beta)`, which is negative, so
//! every stochastic step of that variance type returns NaN there. Here `fixed_large_log` is
//! what its name says, the step's beta handled through its log: `std = exp(ln(beta) / 2)`,
//! which equals `fixed_large`. A negative `learned` variance gives NaN, as in diffusers.
//! Custom timesteps behave as diffusers' `set_timesteps(timesteps=...)`, and trailing spacing
//! never yields diffusers' occasional spurious timestep -1 (see [`sd_core::spacing`]).

use sd_core::{NoiseSchedule, PredictionType, TimestepSpacing, VarianceType};

use crate::common::postprocess_x0;
use crate::config::{BaseConfig, BetaScheduleName, SchedulerConfig, ThresholdConfig};
use crate::error::{Error, Result, check_len};
use crate::noise::NoiseSource;
use crate::sampler::{Plan, RunOrder, Sampler, Steps};

/// The DDPM sampler; see the module documentation.
#[derive(Debug, Clone)]
pub struct Ddpm {
    schedule: NoiseSchedule,
    prediction_type: PredictionType,
    variance_type: VarianceType,
    threshold: ThresholdConfig,
    batch_size: usize,
    train_timesteps: Vec<usize>,
    timesteps: Vec<f64>,
    run: RunOrder,
    noise: Vec<f32>,
    prediction: Vec<f32>,
    variance: Vec<f32>,
}

impl Ddpm {
    /// diffusers' class name.
    pub const CLASS_NAME: &'static str = "DDPMScheduler";

    /// Builds the sampler from a scheduler config (any class's) and a plan: a step count, or
    /// custom timesteps (strictly decreasing, below `num_train_timesteps`).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for custom sigmas, custom timesteps diffusers rejects, a
    /// schedule DDPM does not implement (`exp`) or a batch size of 0; [`Error::Core`] for
    /// impossible step counts and timesteps past the schedule (`leading` with an offset).
    pub fn new(config: &SchedulerConfig, plan: impl Into<Plan>) -> Result<Self> {
        let plan = plan.into();
        let base = BaseConfig::diffusers_default(TimestepSpacing::Leading).resolve(config);
        base.require_schedule(
            Self::CLASS_NAME,
            &[
                BetaScheduleName::Linear,
                BetaScheduleName::ScaledLinear,
                BetaScheduleName::SquaredcosCapV2,
                BetaScheduleName::Sigmoid,
                BetaScheduleName::Laplace,
            ],
        )?;
        if plan.batch_size == 0 {
            return Err(Error::InvalidConfig {
                sampler: Self::CLASS_NAME,
                key: "batch_size",
                value: "0".into(),
                reason: "must be at least 1",
            });
        }
        let schedule = base.noise_schedule()?;
        let t = base.num_train_timesteps;
        let train_timesteps = match &plan.steps {
            Steps::Count(n) => base.timestep_spacing.timesteps(t, *n, base.steps_offset)?,
            Steps::Timesteps(custom) => {
                check_custom_timesteps(Self::CLASS_NAME, custom, t)?;
                custom.clone()
            }
            Steps::Sigmas(_) => {
                return Err(Error::InvalidConfig {
                    sampler: Self::CLASS_NAME,
                    key: "sigmas",
                    value: "custom".into(),
                    reason: "DDPM takes a step count or custom timesteps",
                });
            }
        };
        for &ts in &train_timesteps {
            schedule.alpha_bar(ts)?;
        }
        Ok(Ddpm {
            schedule,
            prediction_type: base.prediction_type,
            variance_type: config.variance_type.unwrap_or_default(),
            threshold: ThresholdConfig::resolve(config, true),
            batch_size: plan.batch_size,
            timesteps: train_timesteps.iter().map(|&v| v as f64).collect(),
            train_timesteps,
            run: RunOrder::default(),
            noise: Vec::new(),
            prediction: Vec::new(),
            variance: Vec::new(),
        })
    }

    /// The training timesteps, largest first.
    pub fn train_timesteps(&self) -> &[usize] {
        &self.train_timesteps
    }

    /// The variance type in use.
    pub fn variance_type(&self) -> VarianceType {
        self.variance_type
    }

    /// Splits a learned-variance model output (`[prediction, variance]` per batch sample)
    /// into the scratch buffers.
    fn split_learned(&mut self, model_output: &[f32], len: usize) -> Result<()> {
        check_len(
            "model_output (prediction and variance)",
            2 * len,
            model_output.len(),
        )?;
        if !len.is_multiple_of(self.batch_size) {
            return Err(Error::LengthMismatch {
                what: "sample (for the plan's batch size)",
                expected: len / self.batch_size * self.batch_size,
                found: len,
            });
        }
        let per = len / self.batch_size;
        self.prediction.resize(len, 0.0);
        self.variance.resize(len, 0.0);
        for ((chunk, p), v) in model_output
            .chunks_exact(2 * per)
            .zip(self.prediction.chunks_exact_mut(per))
            .zip(self.variance.chunks_exact_mut(per))
        {
            p.copy_from_slice(&chunk[..per]);
            v.copy_from_slice(&chunk[per..]);
        }
        Ok(())
    }
}

/// The predicted x0 at alpha-bar `abar_t`. At zero terminal SNR (`abar_t = 0`) an epsilon
/// prediction has no x0; diffusers' division `(x_t - eps) / 0` then gives infinities, which
/// clipping or thresholding bounds, and so does this (the coefficient form would give NaN).
pub(crate) fn predict_x0(
    prediction_type: PredictionType,
    abar_t: f64,
    model_output: &[f32],
    sample: &[f32],
    out: &mut [f32],
) -> Result<()> {
    if abar_t == 0.0 && prediction_type == PredictionType::Epsilon {
        check_len("model_output", out.len(), model_output.len())?;
        check_len("sample", out.len(), sample.len())?;
        for ((o, &m), &x) in out.iter_mut().zip(model_output).zip(sample) {
            *o = (x - m) / 0.0;
        }
        return Ok(());
    }
    Ok(prediction_type
        .x0_coefficients(abar_t)
        .apply(model_output, sample, out)?)
}

/// Checks custom timesteps as diffusers' `set_timesteps(timesteps=...)` of DDPM, LCM and TCD
/// does: not empty, strictly decreasing, the first below `num_train_timesteps`.
pub(crate) fn check_custom_timesteps(
    sampler: &'static str,
    timesteps: &[usize],
    num_train_timesteps: usize,
) -> Result<()> {
    let Some(&first) = timesteps.first() else {
        return Err(Error::InvalidConfig {
            sampler,
            key: "timesteps",
            value: "[]".into(),
            reason: "needs at least one timestep",
        });
    };
    if timesteps.windows(2).any(|w| w[1] >= w[0]) {
        return Err(Error::InvalidConfig {
            sampler,
            key: "timesteps",
            value: format!("{timesteps:?}"),
            reason: "custom timesteps must be in descending order",
        });
    }
    if first >= num_train_timesteps {
        return Err(Error::InvalidConfig {
            sampler,
            key: "timesteps",
            value: first.to_string(),
            reason: "custom timesteps must start below num_train_timesteps",
        });
    }
    Ok(())
}

impl Sampler for Ddpm {
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
        check_len("prev_sample", sample.len(), prev_sample.len())?;
        check_len(
            "pred_original_sample",
            sample.len(),
            pred_original_sample.len(),
        )?;
        let learned = self.variance_type.is_learned();
        if learned {
            self.split_learned(model_output, sample.len())?;
        } else {
            check_len("model_output", sample.len(), model_output.len())?;
        }
        self.run.advance(index)?;

        let t = self.train_timesteps[index];
        let prev = self.train_timesteps.get(index + 1).copied();
        let abar_t = self.schedule.alpha_bar(t)?;
        let posterior = self.schedule.posterior(t, prev)?;
        let prediction = if learned {
            &self.prediction[..]
        } else {
            model_output
        };
        predict_x0(
            self.prediction_type,
            abar_t,
            prediction,
            sample,
            pred_original_sample,
        )?;
        postprocess_x0(pred_original_sample, &self.threshold, self.batch_size)?;
        posterior.mean(pred_original_sample, sample, prev_sample)?;

        if t > 0 {
            self.noise.resize(sample.len(), 0.0);
            noise.fill(&mut self.noise)?;
            if learned {
                let vt = self.variance_type;
                for ((p, &z), &v) in prev_sample.iter_mut().zip(&self.noise).zip(&self.variance) {
                    *p += (posterior.std_dev(vt, f64::from(v)) as f32) * z;
                }
            } else {
                let std = posterior.std_dev(self.variance_type, 0.0);
                sd_core::ops::lincomb2_in_place(prev_sample, 1.0, std, &self.noise)?;
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.run.reset();
    }
}

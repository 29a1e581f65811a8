//! The posterior q(x_{t-1} | x_t, x_0) of the forward process (Ho et al., 2020, eqs. 6-7),
//! between any timestep `t` and an earlier `s` (the previous timestep of a shortened schedule,
//! as diffusers' `DDPMScheduler` uses it):
//!
//! ```text
//! alpha_t|s  = alpha_bar_t / alpha_bar_s,           beta_t|s = 1 - alpha_t|s
//! mu~        = sqrt(alpha_bar_s) beta_t|s / (1 - alpha_bar_t) * x_0
//!            + sqrt(alpha_t|s) (1 - alpha_bar_s) / (1 - alpha_bar_t) * x_t
//! beta~      = (1 - alpha_bar_s) / (1 - alpha_bar_t) * beta_t|s
//! ```
//!
//! With `s = t - 1` these are the paper's coefficients. `beta~` is clamped below at `1e-20`
//! (so its log is finite at `t = 0`), as diffusers' `_get_variance` does; the
//! [`VarianceType`]s choose between `beta~` ("fixed_small"), `beta_t|s` ("fixed_large") and a
//! learned interpolation of their logs (Nichol & Dhariwal, 2021, eq. 15).

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::ops::lincomb2;
use crate::real::Real;
use crate::schedule::NoiseSchedule;

/// The lower clamp of the posterior variance, as in diffusers.
pub const MIN_POSTERIOR_VARIANCE: f64 = 1e-20;

/// The variance of the reverse step, by diffusers' `variance_type` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum VarianceType {
    /// The posterior variance `beta~` (the lower bound of Ho et al.).
    #[default]
    FixedSmall,
    /// `beta~`, handled through its log.
    FixedSmallLog,
    /// The step's beta, `beta_t|s` (the upper bound of Ho et al.).
    FixedLarge,
    /// `beta_t|s`, handled through its log.
    FixedLargeLog,
    /// The model predicts the variance itself.
    Learned,
    /// The model predicts `v` in `[-1, 1]` and the log-variance is
    /// `(v + 1) / 2 * ln(beta_t|s) + (1 - (v + 1) / 2) * ln(beta~)`.
    LearnedRange,
}

impl VarianceType {
    /// Whether the model outputs a variance channel for this type.
    pub fn is_learned(self) -> bool {
        matches!(self, VarianceType::Learned | VarianceType::LearnedRange)
    }
}

/// The coefficients of q(x_s | x_t, x_0) for one pair of timesteps `s < t`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PosteriorCoefficients {
    /// The weight of `x_0` in the posterior mean.
    pub x0: f64,
    /// The weight of `x_t` in the posterior mean.
    pub xt: f64,
    /// The step's beta, `beta_t|s = 1 - alpha_bar_t / alpha_bar_s`.
    pub beta: f64,
    /// The posterior variance `beta~`, clamped below at [`MIN_POSTERIOR_VARIANCE`].
    pub variance: f64,
    /// `ln(beta~)` of the clamped variance.
    pub log_variance_clipped: f64,
}

impl PosteriorCoefficients {
    /// The coefficients between the alpha-bars of `t` and of an earlier `s`.
    pub fn from_alpha_bars(alpha_bar_t: f64, alpha_bar_s: f64) -> Self {
        let alpha = alpha_bar_t / alpha_bar_s;
        let beta = 1.0 - alpha;
        let one_minus_t = 1.0 - alpha_bar_t;
        let one_minus_s = 1.0 - alpha_bar_s;
        let variance = (one_minus_s / one_minus_t * beta).max(MIN_POSTERIOR_VARIANCE);
        PosteriorCoefficients {
            x0: alpha_bar_s.sqrt() * beta / one_minus_t,
            xt: alpha.sqrt() * one_minus_s / one_minus_t,
            beta,
            variance,
            log_variance_clipped: variance.ln(),
        }
    }

    /// The posterior mean: `out = x0 * x_0 + xt * x_t`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`](crate::Error::LengthMismatch) if the slices differ in length.
    pub fn mean<T: Real>(&self, x_0: &[T], x_t: &[T], out: &mut [T]) -> Result<()> {
        lincomb2(out, self.x0, x_0, self.xt, x_t)
    }

    /// The log-variance of the reverse step for a variance type. `model_value` is the model's
    /// variance output at one element for the learned types (a variance for
    /// [`VarianceType::Learned`], a value in `[-1, 1]` for [`VarianceType::LearnedRange`]) and
    /// is ignored by the fixed types.
    pub fn log_variance(&self, variance_type: VarianceType, model_value: f64) -> f64 {
        match variance_type {
            VarianceType::FixedSmall | VarianceType::FixedSmallLog => self.log_variance_clipped,
            VarianceType::FixedLarge | VarianceType::FixedLargeLog => self.beta.ln(),
            VarianceType::Learned => model_value.ln(),
            VarianceType::LearnedRange => {
                let frac = (model_value + 1.0) / 2.0;
                frac * self.beta.ln() + (1.0 - frac) * self.log_variance_clipped
            }
        }
    }

    /// The standard deviation of the reverse step, `exp(log_variance / 2)`.
    pub fn std_dev(&self, variance_type: VarianceType, model_value: f64) -> f64 {
        (0.5 * self.log_variance(variance_type, model_value)).exp()
    }
}

impl NoiseSchedule {
    /// The posterior coefficients between timestep `t` and the earlier timestep `s`; `None`
    /// for `s` is the clean sample (alpha-bar 1), the target of the last step.
    ///
    /// # Errors
    /// [`Error::TimestepOutOfRange`](crate::Error::TimestepOutOfRange) for a timestep outside
    /// the schedule.
    pub fn posterior(&self, t: usize, s: Option<usize>) -> Result<PosteriorCoefficients> {
        Ok(PosteriorCoefficients::from_alpha_bars(
            self.alpha_bar(t)?,
            self.alpha_bar_or_one(s)?,
        ))
    }
}

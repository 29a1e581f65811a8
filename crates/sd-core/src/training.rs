//! The training objective of denoising diffusion (Ho et al., 2020, Algorithm 1):
//!
//! ```text
//! t ~ Uniform{0, ..., T-1},  eps ~ N(0, I),  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
//! L = E || target - model(x_t, t) ||^2
//! ```
//!
//! where the target is `eps` (the "simple" loss of the paper), `x_0` or the velocity, by
//! [`PredictionType`]. Min-SNR-gamma weighting (Hang et al., 2023) scales each sample's loss by
//! `min(SNR(t), gamma) / SNR(t)` for `epsilon`, `min(SNR(t), gamma) / (SNR(t) + 1)` for
//! `v_prediction` and `min(SNR(t), gamma)` for `sample`, which is what diffusers' training
//! scripts do.
//!
//! Randomness comes from the caller: a uniform draw for the timestep and a noise slice, so a
//! training step can be replayed exactly and sd-core needs no random number generator.

use crate::error::{Error, Result, check_len, check_nonzero};
use crate::forward::batch_sample_len;
use crate::prediction::PredictionType;
use crate::real::Real;
use crate::schedule::NoiseSchedule;

/// Maps a uniform draw `u` in `[0, 1)` to a training timestep in `0..T`
/// (`floor(u T)`, the last timestep for `u` rounding up to 1).
///
/// # Errors
/// [`Error::Zero`] if `T` is 0, [`Error::InvalidParameter`] for `u` outside `[0, 1]`.
pub fn timestep_from_uniform(u: f64, num_train_timesteps: usize) -> Result<usize> {
    check_nonzero("num_train_timesteps", num_train_timesteps)?;
    if !(0.0..=1.0).contains(&u) {
        return Err(Error::InvalidParameter {
            name: "u",
            value: u,
            reason: "a uniform draw must lie in [0, 1)",
        });
    }
    Ok(((u * num_train_timesteps as f64) as usize).min(num_train_timesteps - 1))
}

/// How the per-sample losses of a batch are weighted.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum LossWeighting {
    /// Every timestep weighs 1 (the "simple" loss).
    #[default]
    Uniform,
    /// Min-SNR-gamma weighting; Hang et al. recommend `gamma = 5`.
    MinSnr {
        /// The cap on the SNR.
        gamma: f64,
    },
}

impl LossWeighting {
    /// The weight of a sample at signal-to-noise ratio `snr` for a prediction type.
    pub fn weight(self, snr: f64, prediction_type: PredictionType) -> f64 {
        match self {
            LossWeighting::Uniform => 1.0,
            LossWeighting::MinSnr { gamma } => {
                let capped = snr.min(gamma);
                match prediction_type {
                    PredictionType::Epsilon => capped / snr,
                    PredictionType::VPrediction => capped / (snr + 1.0),
                    PredictionType::Sample => capped,
                }
            }
        }
    }
}

impl NoiseSchedule {
    /// Builds one training example: the noisy input `x_t` of `x0` at timestep `t` with noise
    /// `eps`, and the regression target of `prediction_type`.
    ///
    /// # Errors
    /// [`Error::TimestepOutOfRange`] unless `t < T`; [`Error::LengthMismatch`] if the slices
    /// differ in length.
    pub fn training_example<T: Real>(
        &self,
        prediction_type: PredictionType,
        x0: &[T],
        eps: &[T],
        t: usize,
        x_t: &mut [T],
        target: &mut [T],
    ) -> Result<()> {
        let alpha_bar = self.alpha_bar(t)?;
        self.add_noise(x0, eps, t, x_t)?;
        prediction_type.target(x0, eps, alpha_bar, target)
    }

    /// The weighted loss of a batch: the mean over samples of `weight(t_i) * MSE_i`, where
    /// `prediction` and `target` hold `timesteps.len()` samples one after another.
    ///
    /// # Errors
    /// [`Error::Zero`] for an empty batch; [`Error::LengthMismatch`] if the slices differ in
    /// length or do not split into equal samples; [`Error::TimestepOutOfRange`].
    pub fn loss<T: Real>(
        &self,
        prediction_type: PredictionType,
        weighting: LossWeighting,
        prediction: &[T],
        target: &[T],
        timesteps: &[usize],
    ) -> Result<f64> {
        let sample_len = batch_sample_len(prediction.len(), timesteps.len())?;
        check_len("target", prediction.len(), target.len())?;
        let mut total = 0.0;
        for ((&t, p), y) in timesteps
            .iter()
            .zip(prediction.chunks_exact(sample_len))
            .zip(target.chunks_exact(sample_len))
        {
            total += weighting.weight(self.snr(t)?, prediction_type) * mse(p, y)?;
        }
        Ok(total / timesteps.len() as f64)
    }
}

/// The mean squared error `mean((prediction - target)^2)`, accumulated in `f64`.
///
/// # Errors
/// [`Error::Zero`] for empty slices, [`Error::LengthMismatch`] if they differ in length.
pub fn mse<T: Real>(prediction: &[T], target: &[T]) -> Result<f64> {
    check_len("target", prediction.len(), target.len())?;
    check_nonzero("number of elements", prediction.len())?;
    let sum: f64 = prediction
        .iter()
        .zip(target)
        .map(|(&p, &y)| {
            let d = p.to_f64() - y.to_f64();
            d * d
        })
        .sum();
    Ok(sum / prediction.len() as f64)
}

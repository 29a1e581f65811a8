//! What the network predicts, and the conversions between its output and the clean sample
//! `x_0` and the noise `eps`, given the noisy sample `x_t = sqrt(a) x_0 + sqrt(1 - a) eps`
//! with `a = alpha_bar_t`:
//!
//! | prediction type | model output | `x_0` | `eps` |
//! |---|---|---|---|
//! | `epsilon` | `eps` | `(x_t - sqrt(1-a) eps) / sqrt(a)` | `eps` |
//! | `sample` | `x_0` | `x_0` | `(x_t - sqrt(a) x_0) / sqrt(1-a)` |
//! | `v_prediction` | `v = sqrt(a) eps - sqrt(1-a) x_0` | `sqrt(a) x_t - sqrt(1-a) v` | `sqrt(a) v + sqrt(1-a) x_t` |
//!
//! The velocity is that of Salimans & Ho, 2022 ("Progressive Distillation", sec. 4). Each
//! conversion is linear in (model output, sample), so it is given as two coefficients that a
//! sampler can fold into its own update. The k-diffusion samplers work on the unscaled sample
//! `x = x_t / sqrt(a)` with `sigma = sqrt((1 - a) / a)`; [`PredictionType::x0_coefficients_sigma`]
//! gives the same conversion in that parametrisation.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::ops::{copy, lincomb2};
use crate::real::Real;

/// What the network predicts, by diffusers' `prediction_type` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[non_exhaustive]
pub enum PredictionType {
    /// The noise `eps` (Stable Diffusion 1.x, 2.x base).
    #[default]
    #[serde(rename = "epsilon")]
    Epsilon,
    /// The clean sample `x_0`.
    #[serde(rename = "sample")]
    Sample,
    /// The velocity `v = sqrt(a) eps - sqrt(1 - a) x_0` (Stable Diffusion 2.x 768).
    #[serde(rename = "v_prediction")]
    VPrediction,
}

/// A linear map `(model_output, sample) -> model * model_output + sample * sample`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conversion {
    /// The weight of the model output.
    pub model: f64,
    /// The weight of the noisy sample.
    pub sample: f64,
}

impl Conversion {
    /// `out = model * model_output + sample * sample`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`](crate::Error::LengthMismatch) if the slices differ in length.
    pub fn apply<T: Real>(&self, model_output: &[T], sample: &[T], out: &mut [T]) -> Result<()> {
        lincomb2(out, self.model, model_output, self.sample, sample)
    }
}

impl PredictionType {
    /// The conversion from (model output, `x_t`) to the predicted `x_0` at alpha-bar `a`.
    pub fn x0_coefficients(self, alpha_bar: f64) -> Conversion {
        let (sa, s1a) = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt());
        match self {
            PredictionType::Epsilon => Conversion {
                model: -s1a / sa,
                sample: 1.0 / sa,
            },
            PredictionType::Sample => Conversion {
                model: 1.0,
                sample: 0.0,
            },
            PredictionType::VPrediction => Conversion {
                model: -s1a,
                sample: sa,
            },
        }
    }

    /// The conversion from (model output, `x_t`) to the predicted `eps` at alpha-bar `a`.
    pub fn eps_coefficients(self, alpha_bar: f64) -> Conversion {
        let (sa, s1a) = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt());
        match self {
            PredictionType::Epsilon => Conversion {
                model: 1.0,
                sample: 0.0,
            },
            PredictionType::Sample => Conversion {
                model: -sa / s1a,
                sample: 1.0 / s1a,
            },
            PredictionType::VPrediction => Conversion {
                model: sa,
                sample: s1a,
            },
        }
    }

    /// The conversion to `x_0` in the k-diffusion parametrisation, where the sample is
    /// `x = x_0 + sigma eps` (the scaled `x_t / sqrt(a)`, fed to the network as
    /// `x / sqrt(sigma^2 + 1)`): `epsilon` gives `x - sigma eps`, `v_prediction` gives
    /// `x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v`, `sample` the output itself.
    pub fn x0_coefficients_sigma(self, sigma: f64) -> Conversion {
        match self {
            PredictionType::Epsilon => Conversion {
                model: -sigma,
                sample: 1.0,
            },
            PredictionType::Sample => Conversion {
                model: 1.0,
                sample: 0.0,
            },
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                Conversion {
                    model: -sigma / s2.sqrt(),
                    sample: 1.0 / s2,
                }
            }
        }
    }

    /// Writes the predicted `x_0` into `out`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`](crate::Error::LengthMismatch) if the slices differ in length.
    pub fn to_x0<T: Real>(
        self,
        model_output: &[T],
        sample: &[T],
        alpha_bar: f64,
        out: &mut [T],
    ) -> Result<()> {
        self.x0_coefficients(alpha_bar)
            .apply(model_output, sample, out)
    }

    /// Writes the predicted `eps` into `out`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`](crate::Error::LengthMismatch) if the slices differ in length.
    pub fn to_eps<T: Real>(
        self,
        model_output: &[T],
        sample: &[T],
        alpha_bar: f64,
        out: &mut [T],
    ) -> Result<()> {
        self.eps_coefficients(alpha_bar)
            .apply(model_output, sample, out)
    }

    /// The training target of this prediction type for a clean sample `x0` noised with `eps`:
    /// `eps`, `x0` or the velocity.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`](crate::Error::LengthMismatch) if the slices differ in length.
    pub fn target<T: Real>(self, x0: &[T], eps: &[T], alpha_bar: f64, out: &mut [T]) -> Result<()> {
        match self {
            PredictionType::Epsilon => copy(eps, out),
            PredictionType::Sample => copy(x0, out),
            PredictionType::VPrediction => velocity(x0, eps, alpha_bar, out),
        }
    }
}

/// The velocity `v = sqrt(a) eps - sqrt(1 - a) x_0` at alpha-bar `a` (diffusers'
/// `get_velocity`).
///
/// # Errors
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) if the slices differ in length.
pub fn velocity<T: Real>(x0: &[T], eps: &[T], alpha_bar: f64, out: &mut [T]) -> Result<()> {
    lincomb2(out, -(1.0 - alpha_bar).sqrt(), x0, alpha_bar.sqrt(), eps)
}

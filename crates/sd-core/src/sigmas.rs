//! Noise levels in the k-diffusion parametrisation (Karras et al., 2022, "Elucidating the
//! Design Space of Diffusion-Based Generative Models").
//!
//! Dividing `x_t` by `sqrt(alpha_bar_t)` turns the forward process into `x = x_0 + sigma eps`
//! with
//!
//! ```text
//! sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
//! ```
//!
//! The samplers of that family (LMS, Euler, Heun, DPM-Solver with Karras sigmas, ...) pick
//! their noise levels from the training sigmas by interpolation ([`interp_linear`], as
//! diffusers' `np.interp`; [`interp_log_linear`], as k-diffusion's `t_to_sigma`), or from
//! the Karras ramp ([`karras_sigmas`], `rho = 7`) or an exponential ramp
//! ([`exponential_sigmas`]) between the smallest and largest training sigma, and map noise
//! levels back to fractional timesteps with [`sigma_to_t`].

use crate::error::{Error, Result, check_nonzero};
use crate::schedule::NoiseSchedule;

/// The `rho` of Karras et al. (their eq. 5 and the value of the paper).
pub const KARRAS_RHO: f64 = 7.0;

/// `sigma = sqrt((1 - alpha_bar) / alpha_bar)` for one alpha-bar.
pub fn sigma_from_alpha_bar(alpha_bar: f64) -> f64 {
    ((1.0 - alpha_bar) / alpha_bar).sqrt()
}

/// The alpha-bar of a noise level: `1 / (sigma^2 + 1)`.
pub fn alpha_bar_from_sigma(sigma: f64) -> f64 {
    1.0 / (sigma * sigma + 1.0)
}

/// A noise level in the variance-preserving parametrisation of the DPM-Solver family (Lu et
/// al., 2022, "DPM-Solver", sec. 2): `x_t = alpha_t x_0 + sigma_t eps` with
/// `alpha_t = 1 / sqrt(sigma^2 + 1)` and `sigma_t = sigma alpha_t`, so that
/// `alpha_t^2 + sigma_t^2 = 1` and `alpha_t = sqrt(alpha_bar)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VpCoefficients {
    /// `alpha_t = sqrt(alpha_bar)`.
    pub alpha_t: f64,
    /// `sigma_t = sqrt(1 - alpha_bar)`.
    pub sigma_t: f64,
}

impl VpCoefficients {
    /// The pair for a k-diffusion noise level `sigma` (diffusers' `_sigma_to_alpha_sigma_t`).
    pub fn from_sigma(sigma: f64) -> Self {
        let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
        VpCoefficients {
            alpha_t,
            sigma_t: sigma * alpha_t,
        }
    }

    /// The half log-SNR `lambda_t = ln(alpha_t) - ln(sigma_t)`, the time variable of
    /// DPM-Solver, UniPC and DEIS (computed as the reference does, from the two logs).
    pub fn lambda(&self) -> f64 {
        self.alpha_t.ln() - self.sigma_t.ln()
    }
}

impl NoiseSchedule {
    /// The training sigmas, `sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)` for `t` in
    /// `0..T`, increasing with `t`.
    pub fn sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod()
            .iter()
            .map(|&a| sigma_from_alpha_bar(a))
            .collect()
    }

    /// `ln(sigma_t)` for `t` in `0..T`, as [`sigma_to_t`] takes it.
    pub fn log_sigmas(&self) -> Vec<f64> {
        self.sigmas().into_iter().map(f64::ln).collect()
    }
}

/// Values `values[0..n]` at the integer points `0..n`, linearly interpolated at a fractional
/// `t` and held constant beyond the ends (numpy's `np.interp(t, arange(n), values)`).
///
/// # Errors
/// [`Error::Zero`] for no values.
pub fn interp_linear(values: &[f64], t: f64) -> Result<f64> {
    interp(values, t, |v| v, |v| v)
}

/// As [`interp_linear`] but linear in `ln(value)` (k-diffusion's `t_to_sigma`): the
/// interpolation that is exact for an exponential ramp.
///
/// # Errors
/// [`Error::Zero`] for no values.
pub fn interp_log_linear(values: &[f64], t: f64) -> Result<f64> {
    interp(values, t, f64::ln, f64::exp)
}

fn interp(
    values: &[f64],
    t: f64,
    into: impl Fn(f64) -> f64,
    back: impl Fn(f64) -> f64,
) -> Result<f64> {
    check_nonzero("number of values", values.len())?;
    let last = values.len() - 1;
    if t.is_nan() {
        return Ok(f64::NAN);
    }
    if t <= 0.0 {
        return Ok(values[0]);
    }
    if t >= last as f64 {
        return Ok(values[last]);
    }
    let low = t.floor() as usize;
    let (a, b) = (into(values[low]), into(values[low + 1]));
    Ok(back((b - a) * (t - low as f64) + a))
}

/// The fractional timestep of a noise level: `ln(sigma)` located between two consecutive
/// training log-sigmas (`log_sigmas`, increasing) and linearly interpolated between their
/// indices, clamped to `[0, T - 1]` (diffusers' `_sigma_to_t`).
///
/// # Errors
/// [`Error::InvalidParameter`] for fewer than two log-sigmas.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> Result<f64> {
    if log_sigmas.len() < 2 {
        return Err(Error::InvalidParameter {
            name: "log_sigmas.len()",
            value: log_sigmas.len() as f64,
            reason: "needs at least two noise levels to interpolate between",
        });
    }
    let log_sigma = sigma.max(1e-10).ln();
    // The last index whose log-sigma is at most ln(sigma); 0 when there is none.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    Ok((1.0 - w) * low as f64 + w * (low + 1) as f64)
}

fn check_sigma_range(sigma_min: f64, sigma_max: f64) -> Result<()> {
    if !(sigma_min > 0.0 && sigma_min.is_finite()) {
        return Err(Error::InvalidParameter {
            name: "sigma_min",
            value: sigma_min,
            reason: "must be positive and finite",
        });
    }
    if !(sigma_max >= sigma_min && sigma_max.is_finite()) {
        return Err(Error::InvalidParameter {
            name: "sigma_max",
            value: sigma_max,
            reason: "must be finite and at least sigma_min",
        });
    }
    Ok(())
}

/// `n` noise levels from `sigma_max` down to `sigma_min` on the Karras et al. ramp (their
/// eq. 5): `(sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`.
///
/// # Errors
/// [`Error::Zero`] for `n = 0`; [`Error::InvalidParameter`] unless
/// `0 < sigma_min <= sigma_max < inf` and `rho > 0`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize, rho: f64) -> Result<Vec<f64>> {
    check_nonzero("number of sigmas", n)?;
    check_sigma_range(sigma_min, sigma_max)?;
    if rho.is_nan() || rho <= 0.0 {
        return Err(Error::InvalidParameter {
            name: "rho",
            value: rho,
            reason: "must be positive",
        });
    }
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    Ok(numpy_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect())
}

/// `n` noise levels from `sigma_max` down to `sigma_min`, evenly spaced in `ln(sigma)`.
///
/// # Errors
/// [`Error::Zero`] for `n = 0`; [`Error::InvalidParameter`] unless
/// `0 < sigma_min <= sigma_max < inf`.
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Result<Vec<f64>> {
    check_nonzero("number of sigmas", n)?;
    check_sigma_range(sigma_min, sigma_max)?;
    Ok(numpy_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect())
}

/// `np.linspace(start, stop, n)`: `start + i * step` with the last value exactly `stop`.
pub(crate) fn numpy_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut values: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    if let Some(last) = values.last_mut() {
        *last = stop;
    }
    values
}

//! Pieces several samplers share: post-processing of the predicted x0 and the noise levels
//! of the k-diffusion family. Everything here follows diffusers' code for the same piece.

use sd_core::sigmas::{interp_linear, sigma_to_t};
use sd_core::{NoiseSchedule, TimestepSpacing, exponential_sigmas, karras_sigmas};

use crate::config::{SigmaConfig, ThresholdConfig};
use crate::error::{Error, Result, check_len};
use crate::sampler::Steps;

/// Clips or dynamically thresholds a predicted x0 in place, as `clip_sample` / `thresholding`
/// ask (thresholding wins, as in diffusers). `batch_size` samples share the slice.
///
/// # Errors
/// [`Error::LengthMismatch`] if the slice does not split into `batch_size` samples.
pub(crate) fn postprocess_x0(
    x0: &mut [f32],
    config: &ThresholdConfig,
    batch_size: usize,
) -> Result<()> {
    if config.thresholding {
        dynamic_threshold(
            x0,
            batch_size,
            config.dynamic_thresholding_ratio,
            config.sample_max_value,
        )
    } else {
        if config.clip_sample {
            let r = config.clip_sample_range as f32;
            for v in x0.iter_mut() {
                *v = v.clamp(-r, r);
            }
        }
        Ok(())
    }
}

/// Dynamic thresholding (Saharia et al., 2022, "Photorealistic Text-to-Image Diffusion Models
/// with Deep Language Understanding", sec. 2.3; diffusers' `_threshold_sample`): per sample,
/// `s` is the `ratio` quantile of `|x0|` clamped to `[1, max_value]`, and x0 becomes
/// `clamp(x0, -s, s) / s`.
pub(crate) fn dynamic_threshold(
    x0: &mut [f32],
    batch_size: usize,
    ratio: f64,
    max_value: f64,
) -> Result<()> {
    if batch_size == 0 || !x0.len().is_multiple_of(batch_size) {
        return Err(Error::LengthMismatch {
            what: "sample (for the batch size given to thresholding)",
            expected: batch_size.max(1) * (x0.len() / batch_size.max(1)),
            found: x0.len(),
        });
    }
    let len = x0.len() / batch_size;
    let mut sorted = vec![0.0_f32; len];
    for sample in x0.chunks_exact_mut(len) {
        for (s, v) in sorted.iter_mut().zip(sample.iter()) {
            *s = v.abs();
        }
        sorted.sort_unstable_by(f32::total_cmp);
        let s = quantile_sorted(&sorted, ratio).clamp(1.0, max_value) as f32;
        for v in sample.iter_mut() {
            *v = v.clamp(-s, s) / s;
        }
    }
    Ok(())
}

/// `torch.quantile` of sorted values: linear interpolation between the order statistics
/// around `q (n - 1)`.
fn quantile_sorted(sorted: &[f32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 1.0;
    }
    let rank = q * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    let frac = rank - lo as f64;
    let (a, b) = (f64::from(sorted[lo]), f64::from(sorted[hi]));
    a + frac * (b - a)
}

/// Rounds to `f32` and back: diffusers keeps its timesteps and sigmas as float32 tensors.
pub(crate) fn f32_round(v: f64) -> f64 {
    f64::from(v as f32)
}

/// The timesteps and noise levels of the k-diffusion samplers before their final sigma is
/// appended, as diffusers' Euler, LMS, Heun and KDPM2 compute them: spaced timesteps
/// (fractional for `linspace`), the training sigmas interpolated at them, then optionally the
/// Karras or exponential ramp between the extremes with the timesteps mapped back through
/// `sigma_to_t`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct KSchedule {
    /// One timestep per step (fractional where interpolated).
    pub timesteps: Vec<f64>,
    /// One sigma per step, largest first (no final sigma yet).
    pub sigmas: Vec<f64>,
    /// The training sigmas, `sqrt((1 - abar) / abar)` (increasing with t).
    pub train_sigmas: Vec<f64>,
}

impl KSchedule {
    /// Builds the schedule for `steps` over `schedule`'s alpha-bars (`alphas_cumprod`, which a
    /// sampler may have patched, e.g. zero-SNR's last value).
    pub(crate) fn new(
        sampler: &'static str,
        alphas_cumprod: &[f64],
        spacing: TimestepSpacing,
        steps_offset: usize,
        sigma_config: &SigmaConfig,
        steps: &Steps,
    ) -> Result<Self> {
        let train_sigmas: Vec<f64> = alphas_cumprod
            .iter()
            .map(|&a| sd_core::sigmas::sigma_from_alpha_bar(a))
            .collect();
        let log_sigmas: Vec<f64> = train_sigmas.iter().map(|s| s.ln()).collect();
        let t = alphas_cumprod.len();
        let (timesteps, sigmas) = match steps {
            Steps::Count(n) => {
                let timesteps = spacing.fractional_timesteps(t, *n, steps_offset)?;
                let sigmas = timesteps
                    .iter()
                    .map(|&ts| interp_linear(&train_sigmas, ts))
                    .collect::<sd_core::Result<Vec<_>>>()?;
                (timesteps, sigmas)
            }
            Steps::Timesteps(ts) => {
                if sigma_config.use_karras_sigmas || sigma_config.use_exponential_sigmas {
                    return Err(Error::InvalidConfig {
                        sampler,
                        key: "use_karras_sigmas",
                        value: "true".into(),
                        reason: "custom timesteps cannot be combined with a sigma ramp",
                    });
                }
                let timesteps: Vec<f64> = ts.iter().map(|&v| v as f64).collect();
                let sigmas = timesteps
                    .iter()
                    .map(|&ts| interp_linear(&train_sigmas, ts))
                    .collect::<sd_core::Result<Vec<_>>>()?;
                (timesteps, sigmas)
            }
            Steps::Sigmas(_) => {
                return Err(Error::InvalidConfig {
                    sampler,
                    key: "sigmas",
                    value: "custom".into(),
                    reason: "this sampler takes a step count or timesteps",
                });
            }
        };
        let n = sigmas.len();
        let ramp = if sigma_config.use_karras_sigmas {
            Some(karras_sigmas(
                sigma_config.sigma_min.unwrap_or(sigmas[n - 1]),
                sigma_config.sigma_max.unwrap_or(sigmas[0]),
                n,
                sd_core::sigmas::KARRAS_RHO,
            )?)
        } else if sigma_config.use_exponential_sigmas {
            Some(exponential_sigmas(
                sigma_config.sigma_min.unwrap_or(sigmas[n - 1]),
                sigma_config.sigma_max.unwrap_or(sigmas[0]),
                n,
            )?)
        } else {
            None
        };
        let (timesteps, sigmas) = match ramp {
            Some(sigmas) => {
                let timesteps = sigmas
                    .iter()
                    .map(|&s| sigma_to_t(s, &log_sigmas))
                    .collect::<sd_core::Result<Vec<_>>>()?;
                (timesteps, sigmas)
            }
            None => (timesteps, sigmas),
        };
        Ok(KSchedule {
            timesteps,
            sigmas,
            train_sigmas,
        })
    }
}

/// The standard deviation of the initial noise of a k-diffusion sampler: its largest sigma
/// for `linspace` and `trailing` spacing, `sqrt(sigma_max^2 + 1)` for `leading` (diffusers'
/// `init_noise_sigma`).
pub(crate) fn k_init_noise_sigma(sigmas: &[f64], spacing: TimestepSpacing) -> f64 {
    let max_sigma = sigmas.iter().copied().fold(0.0, f64::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
        _ => (max_sigma * max_sigma + 1.0).sqrt(),
    }
}

/// The alpha-bars of `schedule` as diffusers' k-diffusion samplers use them: with zero
/// terminal SNR, the last alpha-bar is set to 2^-24 so that the first sigma is finite.
pub(crate) fn k_alphas_cumprod(schedule: &NoiseSchedule, rescaled: bool) -> Vec<f64> {
    let mut a = schedule.alphas_cumprod().to_vec();
    if rescaled && let Some(last) = a.last_mut() {
        *last = 2f64.powi(-24);
    }
    a
}

/// `out = original + sigma * noise`: the forward process of the k-diffusion family.
pub(crate) fn add_noise_sigma(
    original: &[f32],
    noise: &[f32],
    sigma: f64,
    out: &mut [f32],
) -> Result<()> {
    check_len("noise", original.len(), noise.len())?;
    Ok(sd_core::ops::lincomb2(out, 1.0, original, sigma, noise)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_interpolates_like_torch() {
        // torch.quantile(tensor([1., 2., 3., 4.]), 0.5) == 2.5; q = 0.995 of 0..=99 is 98.505.
        assert_eq!(quantile_sorted(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.5);
        let v: Vec<f32> = (0..100).map(|i| i as f32).collect();
        assert!((quantile_sorted(&v, 0.995) - 98.505).abs() < 1e-9);
    }

    #[test]
    fn thresholding_scales_each_sample_by_its_own_percentile() {
        let mut x = [0.5_f32, -3.0, 2.0, 0.1, 0.2, -0.3];
        dynamic_threshold(&mut x, 2, 1.0, 10.0).unwrap();
        // Sample 1: s = 3 -> divided by 3; sample 2: s clamps to 1 -> unchanged.
        assert_eq!(x, [0.5 / 3.0, -1.0, 2.0 / 3.0, 0.1, 0.2, -0.3]);
        assert!(dynamic_threshold(&mut x, 4, 0.9, 1.0).is_err());
    }
}

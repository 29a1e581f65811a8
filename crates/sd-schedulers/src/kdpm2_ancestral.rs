//! The ancestral "DPM-Solver-2" sampler of k-diffusion (`sample_dpm_2_ancestral`, after
//! Karras et al., 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
//! and Lu et al., 2022, "DPM-Solver"), as diffusers' `KDPM2AncestralDiscreteScheduler`:
//!
//! ```text
//! sigma_up   = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)
//! sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)
//! sigma_mid  = exp((ln sigma_i + ln sigma_down) / 2)
//! d_i        = (x_i - x0(x_i, sigma_i)) / sigma_i
//! x_mid      = x_i + (sigma_mid - sigma_i) d_i                         (to the midpoint)
//! d_mid      = (x_mid - x0(x_mid, sigma_mid)) / sigma_mid
//! x_next     = x_i + (sigma_down - sigma_i) d_mid + sigma_up z         (midpoint rule, then noise)
//! ```
//!
//! Each step goes deterministically down to `sigma_down` by the midpoint rule and adds fresh
//! noise `z` back up to `sigma_{i+1}`. It evaluates the model twice, as diffusers lists it:
//! `timesteps = [t_0, tm_0, t_1, tm_1, ..., tm_{n-2}, t_{n-1}]` (`2n - 1` evaluations,
//! `tm_k` the fractional timestep of step `k`'s midpoint) and `sigmas = [s_0, s_1, s_1, ...,
//! s_{n-1}, s_{n-1}, 0, 0, 0]` (`2n + 2` values). The last step goes to sigma 0, where the
//! midpoint is set to 0: it is a plain Euler step and draws no noise; every other step draws
//! one noise tensor, in its second half. Whether a call is the first or the second half of
//! a step is the sampler's state, as in diffusers: the first call of a run is a first half.
//! The model sees `x / sqrt(sigma^2 + 1)` with `sigma_i` on a first half and `sigma_mid` on a
//! second.
//!
//! Noise levels are the training sigmas interpolated at the spaced timesteps, or the Karras /
//! exponential ramps (between `sigma_min` and `sigma_max` where the config has them). Quirks
//! of diffusers kept on purpose: with Karras sigmas the timesteps are rounded to integers
//! (the midpoints' are not); with either ramp they stay in float64 rather than float32. The
//! class does not implement `prediction_type = "sample"` (rejected at construction) and does
//! not know `rescale_betas_zero_snr`, clipping, `final_sigmas_type` or the flow options,
//! which it ignores.

use sd_core::PredictionType;

use crate::common::{add_noise_sigma, f32_round};
use crate::config::SchedulerConfig;
use crate::error::Result;
use crate::kdpm2::{Kdpm2Levels, interleave};
use crate::noise::NoiseSource;
use crate::sampler::{Plan, RunOrder, Sampler, check_step_slices};

/// The KDPM2 ancestral sampler; see the module documentation.
#[derive(Debug, Clone)]
pub struct Kdpm2Ancestral {
    prediction_type: PredictionType,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    sigmas_interpol: Vec<f64>,
    sigmas_up: Vec<f64>,
    sigmas_down: Vec<f64>,
    init_noise_sigma: f64,
    num_inference_steps: usize,
    run: RunOrder,
    /// Whether a first half is pending (its sample is in `first_sample`).
    pending: bool,
    first_sample: Vec<f32>,
    noise: Vec<f32>,
}

impl Kdpm2Ancestral {
    /// diffusers' class name.
    pub const CLASS_NAME: &'static str = "KDPM2AncestralDiscreteScheduler";

    /// Builds the sampler from a scheduler config (any class's) and a plan.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for what the class does not
    /// support (custom timesteps or sigmas, a schedule it does not implement,
    /// `prediction_type = "sample"`, beta sigmas, more than one ramp),
    /// [`Error::Core`](crate::Error::Core) for impossible step counts.
    pub fn new(config: &SchedulerConfig, plan: impl Into<Plan>) -> Result<Self> {
        let plan = plan.into();
        let levels = Kdpm2Levels::new(Self::CLASS_NAME, config, &plan)?;
        let s = &levels.sigmas;
        let len = s.len();
        // In diffusers these are float32 tensors; the last sigma_up is 0/0 (NaN, never used).
        let mut up = Vec::with_capacity(len);
        let mut down = Vec::with_capacity(len);
        for k in 0..len {
            let (sigma, next) = (s[k], if k + 1 < len { s[k + 1] } else { 0.0 });
            let u = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
            let d = if k + 1 < len {
                (next * next - u * u).max(0.0).sqrt()
            } else {
                0.0
            };
            up.push(f32_round(u));
            down.push(f32_round(d));
        }
        let interpol: Vec<f64> = (0..len)
            .map(|k| {
                if k + 2 >= len {
                    0.0
                } else {
                    f32_round((s[k] * down[k]).sqrt())
                }
            })
            .collect();
        let mut timesteps = Vec::with_capacity(2 * levels.n);
        for (k, &t) in levels.timesteps.iter().enumerate() {
            if k > 0 {
                timesteps.push(levels.timestep_of(interpol[k - 1])?);
            }
            timesteps.push(t);
        }
        Ok(Kdpm2Ancestral {
            prediction_type: levels.base.prediction_type,
            timesteps,
            sigmas: interleave(s),
            sigmas_interpol: interleave(&interpol),
            sigmas_up: interleave(&up),
            sigmas_down: interleave(&down),
            init_noise_sigma: levels.init_noise_sigma(),
            num_inference_steps: levels.n,
            run: RunOrder::default(),
            pending: false,
            first_sample: Vec::new(),
            noise: Vec::new(),
        })
    }
}

impl Sampler for Kdpm2Ancestral {
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
            self.sigmas_interpol[index.saturating_sub(1)]
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
        noise: &mut dyn NoiseSource,
        prev_sample: &mut [f32],
        pred_original_sample: &mut [f32],
    ) -> Result<()> {
        self.check_index(index)?;
        check_step_slices(model_output, sample, prev_sample, pred_original_sample)?;
        self.run.advance(index)?;

        if self.pending {
            // Second half: the midpoint's derivative down to sigma_down, then noise.
            let i = index.saturating_sub(1);
            let (sigma, sigma_mid) = (self.sigmas[i], self.sigmas_interpol[i]);
            let (sigma_up, sigma_down) = (self.sigmas_up[i], self.sigmas_down[i]);
            self.prediction_type
                .x0_coefficients_sigma(sigma_mid)
                .apply(model_output, sample, pred_original_sample)?;
            self.noise.resize(sample.len(), 0.0);
            noise.fill(&mut self.noise)?;
            let ratio = (sigma_down - sigma) / sigma_mid;
            sd_core::ops::lincomb(
                prev_sample,
                &[1.0, ratio, -ratio, sigma_up],
                &[
                    self.first_sample.as_slice(),
                    sample,
                    pred_original_sample,
                    self.noise.as_slice(),
                ],
            )?;
            self.pending = false;
        } else {
            // First half: an Euler step to the midpoint.
            let (sigma, sigma_mid) = (self.sigmas[index], self.sigmas_interpol[index]);
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

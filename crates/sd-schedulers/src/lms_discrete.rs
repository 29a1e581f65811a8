//! The linear multistep method of k-diffusion (Karras et al., 2022, "Elucidating the Design
//! Space of Diffusion-Based Generative Models", whose code ships `sample_lms`), as diffusers'
//! `LMSDiscreteScheduler`: an Adams–Bashforth method of order up to `r` (default 4) on the
//! probability-flow ODE `dx/dsigma = (x - x0(x, sigma)) / sigma`.
//!
//! ```text
//! d_i    = (x_i - x0(x_i, sigma_i)) / sigma_i
//! q      = min(i + 1, r)
//! c_ij   = integral over [sigma_i, sigma_{i+1}] of prod_{k < q, k != j} (tau - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k})
//! x_next = x_i + sum_{j < q} c_ij d_{i-j}
//! ```
//!
//! The coefficients are the integrals of the Lagrange basis polynomials through the last `q`
//! noise levels. diffusers integrates them numerically with `scipy.integrate.quad`, which is
//! exact for polynomials of this degree; here the polynomial is expanded and integrated
//! exactly. The model sees `x / sqrt(sigma^2 + 1)`. Noise levels are the training sigmas
//! interpolated at the spaced timesteps, or the Karras / exponential ramps.
//!
//! Quirks of diffusers kept on purpose:
//! - the order `q` grows with the step index, not with the number of derivatives kept, so a
//!   run that starts late (image-to-image) takes its first step with the coefficient `c_i0`
//!   of an order-`r` basis and only the one derivative it has;
//! - the class does not know `rescale_betas_zero_snr`, `final_sigmas_type` or the flow
//!   options and ignores them; it knows `sigma_min` / `sigma_max` only through the config it
//!   was built from, which its exponential ramp reads and its Karras ramp does not.

use sd_core::{PredictionType, TimestepSpacing};

use crate::common::{KSchedule, add_noise_sigma, f32_round, k_alphas_cumprod, k_init_noise_sigma};
use crate::config::{BaseConfig, BetaScheduleName, FinalSigmasType, SchedulerConfig, SigmaConfig};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use crate::sampler::{Plan, RunOrder, Sampler, Steps, check_step_slices};

/// The step option of LMS that diffusers passes to `step` rather than keeping in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LmsOptions {
    /// The order `r` of the multistep method (diffusers' `order`, 4 by default).
    pub order: usize,
}

impl Default for LmsOptions {
    fn default() -> Self {
        LmsOptions { order: 4 }
    }
}

impl LmsOptions {
    /// Options with the given order.
    pub fn order(order: usize) -> Self {
        LmsOptions { order }
    }
}

/// The LMS sampler; see the module documentation.
#[derive(Debug, Clone)]
pub struct LmsDiscrete {
    prediction_type: PredictionType,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    num_inference_steps: usize,
    options: LmsOptions,
    run: RunOrder,
    /// A ring of the last `order` derivatives; `newest` is the slot of the latest.
    history: Vec<Vec<f32>>,
    history_len: usize,
    newest: usize,
    /// The weighted sum of the derivatives.
    scratch: Vec<f32>,
    /// The coefficients of the Lagrange polynomial being integrated.
    poly: Vec<f64>,
}

impl LmsDiscrete {
    /// diffusers' class name.
    pub const CLASS_NAME: &'static str = "LMSDiscreteScheduler";

    /// Builds the sampler from a scheduler config (any class's) and a plan, with order 4.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for what LMS does not support (custom timesteps or sigmas, a
    /// schedule it does not implement, beta sigmas, more than one sigma ramp),
    /// [`Error::Core`] for impossible step counts.
    pub fn new(config: &SchedulerConfig, plan: impl Into<Plan>) -> Result<Self> {
        Self::with_options(config, plan, LmsOptions::default())
    }

    /// As [`LmsDiscrete::new`], with step options.
    ///
    /// # Errors
    /// As [`LmsDiscrete::new`]; also for order 0.
    pub fn with_options(
        config: &SchedulerConfig,
        plan: impl Into<Plan>,
        options: LmsOptions,
    ) -> Result<Self> {
        let plan = plan.into();
        let mut base = BaseConfig::diffusers_default(TimestepSpacing::Linspace).resolve(config);
        // LMSDiscreteScheduler has no `rescale_betas_zero_snr`.
        base.rescale_betas_zero_snr = false;
        base.require_schedule(
            Self::CLASS_NAME,
            &[
                BetaScheduleName::Linear,
                BetaScheduleName::ScaledLinear,
                BetaScheduleName::SquaredcosCapV2,
            ],
        )?;
        if options.order == 0 {
            return Err(Error::InvalidConfig {
                sampler: Self::CLASS_NAME,
                key: "order",
                value: "0".into(),
                reason: "the multistep order must be at least 1",
            });
        }
        // Only the keys the class knows: no flow sigmas, no dynamic shifting, final sigma 0.
        let known = SchedulerConfig {
            use_flow_sigmas: None,
            use_dynamic_shifting: None,
            ..config.clone()
        };
        let mut sigma_config = SigmaConfig::resolve(&known, Self::CLASS_NAME)?;
        sigma_config.final_sigmas_type = FinalSigmasType::Zero;
        if sigma_config.use_karras_sigmas {
            // LMS's Karras ramp runs between the interpolated extremes whatever the config.
            sigma_config.sigma_min = None;
            sigma_config.sigma_max = None;
        }
        let Steps::Count(n) = plan.steps else {
            return Err(Error::InvalidConfig {
                sampler: Self::CLASS_NAME,
                key: "steps",
                value: "custom".into(),
                reason: "LMSDiscreteScheduler takes a step count",
            });
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
        let mut sigmas: Vec<f64> = k.sigmas.into_iter().map(f32_round).collect();
        sigmas.push(0.0);
        let timesteps: Vec<f64> = k.timesteps.into_iter().map(f32_round).collect();
        let init_noise_sigma = k_init_noise_sigma(&sigmas, base.timestep_spacing);
        Ok(LmsDiscrete {
            prediction_type: base.prediction_type,
            timesteps,
            sigmas,
            init_noise_sigma,
            num_inference_steps: n,
            options,
            run: RunOrder::default(),
            history: Vec::new(),
            history_len: 0,
            newest: options.order - 1,
            scratch: Vec::new(),
            poly: Vec::with_capacity(options.order),
        })
    }
}

/// The coefficient `c_ij` of the module documentation (diffusers' `get_lms_coefficient`): the
/// integral over `[sigma_i, sigma_{i+1}]` of the Lagrange basis polynomial of node
/// `sigma_{i-j}` through the nodes `sigma_i, ..., sigma_{i-order+1}`, expanded in
/// `u = tau - sigma_i` and integrated term by term. `poly` is scratch. Requires
/// `current_order < order <= index + 1` and `index + 1 < sigmas.len()`.
fn lms_coefficient(
    sigmas: &[f64],
    order: usize,
    index: usize,
    current_order: usize,
    poly: &mut Vec<f64>,
) -> f64 {
    let origin = sigmas[index];
    let node = |k: usize| sigmas[index - k] - origin;
    let a_j = node(current_order);
    poly.clear();
    poly.push(1.0);
    let mut denominator = 1.0;
    for k in (0..order).filter(|&k| k != current_order) {
        let a_k = node(k);
        denominator *= a_j - a_k;
        // poly(u) *= (u - a_k)
        poly.push(0.0);
        for m in (1..poly.len()).rev() {
            poly[m] = poly[m - 1] - a_k * poly[m];
        }
        poly[0] *= -a_k;
    }
    // The integral from 0 to h of sum_m poly[m] u^m, by Horner's rule.
    let h = sigmas[index + 1] - origin;
    let integral = poly
        .iter()
        .enumerate()
        .rev()
        .fold(0.0, |acc, (m, &c)| acc * h + c / (m + 1) as f64)
        * h;
    integral / denominator
}

impl Sampler for LmsDiscrete {
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
        _noise: &mut dyn NoiseSource,
        prev_sample: &mut [f32],
        pred_original_sample: &mut [f32],
    ) -> Result<()> {
        self.check_index(index)?;
        check_step_slices(model_output, sample, prev_sample, pred_original_sample)?;
        self.run.advance(index)?;

        let capacity = self.options.order;
        let sigma = self.sigmas[index];
        self.prediction_type.x0_coefficients_sigma(sigma).apply(
            model_output,
            sample,
            pred_original_sample,
        )?;

        // The derivative goes into the ring slot after the newest (the oldest once full).
        if self.history.len() < capacity {
            self.history.resize_with(capacity, Vec::new);
        }
        let slot = (self.newest + 1) % capacity;
        let derivative = &mut self.history[slot];
        derivative.resize(sample.len(), 0.0);
        sd_core::ops::lincomb2(
            derivative,
            1.0 / sigma,
            sample,
            -1.0 / sigma,
            pred_original_sample,
        )?;
        self.newest = slot;
        self.history_len = (self.history_len + 1).min(capacity);

        // As diffusers: the order counts steps of the schedule, the sum the derivatives kept.
        let order = (index + 1).min(capacity);
        let terms = order.min(self.history_len);
        self.scratch.resize(sample.len(), 0.0);
        for j in 0..terms {
            let c = lms_coefficient(&self.sigmas, order, index, j, &mut self.poly);
            let d = &self.history[(self.newest + capacity - j) % capacity];
            if j == 0 {
                sd_core::ops::scale(&mut self.scratch, c, d)?;
            } else {
                sd_core::ops::lincomb2_in_place(&mut self.scratch, 1.0, c, d)?;
            }
        }
        sd_core::ops::lincomb2(prev_sample, 1.0, sample, 1.0, &self.scratch)?;
        Ok(())
    }

    fn reset(&mut self) {
        self.run.reset();
        self.history_len = 0;
        self.newest = self.options.order - 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gauss–Legendre with 5 nodes on [a, b]: exact for polynomials of degree up to 9.
    fn gauss_legendre(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
        const NODES: [(f64, f64); 5] = [
            (0.0, 0.568_888_888_888_888_9),
            (-0.538_469_310_105_683_1, 0.478_628_670_499_366_47),
            (0.538_469_310_105_683_1, 0.478_628_670_499_366_47),
            (-0.906_179_845_938_664, 0.236_926_885_056_189_08),
            (0.906_179_845_938_664, 0.236_926_885_056_189_08),
        ];
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        NODES
            .iter()
            .map(|&(x, w)| w * f(mid + half * x))
            .sum::<f64>()
            * half
    }

    #[test]
    fn coefficients_are_the_integrals_of_the_lagrange_basis() {
        let sigmas = [14.6, 9.7, 6.1, 3.8, 2.2, 1.1, 0.45, 0.0];
        let mut poly = Vec::new();
        for index in 0..sigmas.len() - 1 {
            for order in 1..=(index + 1).min(6) {
                let mut sum = 0.0;
                for j in 0..order {
                    let basis = |tau: f64| {
                        (0..order)
                            .filter(|&k| k != j)
                            .map(|k| {
                                (tau - sigmas[index - k]) / (sigmas[index - j] - sigmas[index - k])
                            })
                            .product::<f64>()
                    };
                    let expected = gauss_legendre(basis, sigmas[index], sigmas[index + 1]);
                    let got = lms_coefficient(&sigmas, order, index, j, &mut poly);
                    assert!(
                        (got - expected).abs() <= 1e-12 * expected.abs().max(1.0),
                        "order {order} index {index} j {j}: {got} vs {expected}"
                    );
                    sum += got;
                }
                // The basis sums to 1, so the coefficients sum to the step length.
                let h = sigmas[index + 1] - sigmas[index];
                assert!((sum - h).abs() <= 1e-12 * h.abs(), "{sum} vs {h}");
            }
        }
    }

    #[test]
    fn first_order_is_euler() {
        let sigmas = [3.0, 1.5, 0.0];
        let mut poly = Vec::new();
        assert_eq!(lms_coefficient(&sigmas, 1, 0, 0, &mut poly), -1.5);
        assert_eq!(lms_coefficient(&sigmas, 1, 1, 0, &mut poly), -1.5);
    }
}

//! DEIS (Zhang & Chen, 2023, "Fast Sampling of Diffusion Models with Exponential Integrator",
//! the multistep log-rho variant, sec. 4 and appendix), as diffusers' `DEISMultistepScheduler`.
//!
//! With `rho = sigma_t / alpha_t` (the k-diffusion sigma, see [`VpCoefficients`]) and the
//! predicted noises `e_k` of the previous steps (newest `e_0` at noise level `s_0`), the noise
//! is extrapolated by a Lagrange polynomial in `ln rho` and integrated exactly:
//!
//! ```text
//! order 1:  x_t = (alpha_t / alpha_s0) x - sigma_t (e^h - 1) e_0,   h = lambda_t - lambda_s0
//! order 2:  x_t = alpha_t (x / alpha_s0 + c_0 e_0 + c_1 e_1)
//!           c_0 = F(rho_t; s0, s1) - F(rho_s0; s0, s1),  c_1 = F(rho_t; s1, s0) - F(rho_s0; s1, s0)
//!           F(t; b, c) = t (ln t - ln c - 1) / (ln b - ln c)
//! order 3:  x_t = alpha_t (x / alpha_s0 + c_0 e_0 + c_1 e_1 + c_2 e_2)
//!           c_0 = G(rho_t; s0, s1, s2) - G(rho_s0; s0, s1, s2), c_1, c_2 by rotating (s0, s1, s2)
//!           G(t; b, c, d) = t (ln c (ln d - ln t + 1) - ln d ln t + ln d + ln^2 t - 2 ln t + 2)
//!                           / ((ln b - ln c)(ln b - ln d))
//! ```
//!
//! where `F(., b, c)` / `G(., b, c, d)` are antiderivatives (in `rho`) of the Lagrange basis
//! polynomial of node `b` in `ln rho`, with `rho_b = rho_s0` and so on. The basis sums to 1, so
//! `sum c_k = rho_t - rho_s0` and, with `x = alpha_s0 x0 + sigma_s0 e_0`, every order is applied
//! in the equivalent form
//!
//! ```text
//! x_t = alpha_t x0 + sigma_t e_0 + alpha_t sum_{k >= 1} c_k (e_k - e_0)
//! ```
//!
//! which does not cancel in float32 where `alpha_t / alpha_s0` is large (diffusers' form loses
//! `alpha_t / alpha_s0` ulps: 385 at the cosine schedule's first step). Each step converts the
//! model output to x0 (clipped by dynamic thresholding if asked) and back to the noise,
//! `e = (x - alpha_t x0) / sigma_t`, then updates at order `min(solver_order, steps taken + 1)`;
//! with `lower_order_final` and fewer than 15 steps, the last step is first order and the one
//! before at most second. `solver_order` above 3 runs as 3 (diffusers' branches do the same).
//! The model sees the sample unscaled; `init_noise_sigma` is 1.
//!
//! Noise levels are those of UniPC and DPM-Solver (the multistep spacing, or a Karras or
//! exponential ramp, honouring `sigma_min`/`sigma_max` if the config has them); the final noise
//! level is the smallest training sigma, or with a ramp its last sigma repeated, which makes the
//! last step the identity (diffusers' quirk, reproduced). As in diffusers, the keys DEIS does
//! not know are ignored: `rescale_betas_zero_snr` (the schedule is not rescaled),
//! `final_sigmas_type`. `algorithm_type` `dpmsolver`/`dpmsolver++` and every `solver_type` are
//! read as `deis`/`logrho` as diffusers does; the SDE algorithm types are an error.

use sd_core::{PredictionType, TimestepSpacing, VpCoefficients};

use crate::common::{f32_round, postprocess_x0};
use crate::config::ThresholdConfig;
use crate::config::{AlgorithmType, BaseConfig, BetaScheduleName, SchedulerConfig, SigmaConfig};
use crate::error::{Error, Result, check_len};
use crate::noise::NoiseSource;
use crate::sampler::{Plan, RunOrder, Sampler};
use crate::unipc::MultistepSchedule;

/// The DEIS sampler; see the module documentation.
#[derive(Debug, Clone)]
pub struct Deis {
    prediction_type: PredictionType,
    threshold: ThresholdConfig,
    batch_size: usize,
    solver_order: usize,
    lower_order_final: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    vp: Vec<VpCoefficients>,
    run: RunOrder,
    /// The predicted noises of the last three steps, oldest first.
    history: [Vec<f32>; 3],
    /// How many entries of `history` hold outputs of this run (diffusers' `lower_order_nums`).
    filled: usize,
}

impl Deis {
    /// diffusers' class name.
    pub const CLASS_NAME: &'static str = "DEISMultistepScheduler";

    /// Builds the sampler from a scheduler config (any class's) and a plan, with diffusers'
    /// defaults: order 2, `lower_order_final`, `linspace` spacing.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for what DEIS does not support (an SDE `algorithm_type`,
    /// `solver_order = 0`, custom timesteps or sigmas, beta sigmas, flow sigmas), [`Error::Core`]
    /// for impossible step counts.
    pub fn new(config: &SchedulerConfig, plan: impl Into<Plan>) -> Result<Self> {
        let plan = plan.into();
        let name = Self::CLASS_NAME;
        let mut base = BaseConfig::diffusers_default(TimestepSpacing::Linspace).resolve(config);
        // DEISMultistepScheduler has no rescale_betas_zero_snr: diffusers ignores the key.
        base.rescale_betas_zero_snr = false;
        base.require_schedule(
            name,
            &[
                BetaScheduleName::Linear,
                BetaScheduleName::ScaledLinear,
                BetaScheduleName::SquaredcosCapV2,
            ],
        )?;
        let sigma_config = SigmaConfig::resolve(config, name)?;
        match config.algorithm_type {
            None
            | Some(AlgorithmType::Deis)
            | Some(AlgorithmType::DpmSolver)
            | Some(AlgorithmType::DpmSolverPlusPlus) => {}
            Some(other) => {
                return Err(Error::InvalidConfig {
                    sampler: name,
                    key: "algorithm_type",
                    value: format!("{other:?}"),
                    reason: "DEIS implements only the deis algorithm (diffusers raises too)",
                });
            }
        }
        let solver_order = config.solver_order.unwrap_or(2);
        if solver_order == 0 {
            return Err(Error::InvalidConfig {
                sampler: name,
                key: "solver_order",
                value: "0".into(),
                reason: "must be at least 1",
            });
        }
        let schedule = base.noise_schedule()?;
        let m = MultistepSchedule::new(
            name,
            schedule.alphas_cumprod(),
            base.timestep_spacing,
            base.steps_offset,
            &sigma_config,
            &plan.steps,
        )?;
        let last = if m.ramp {
            m.sigmas[m.sigmas.len() - 1]
        } else {
            m.train_sigmas[0]
        };
        let mut sigmas = m.sigmas;
        sigmas.push(last);
        let sigmas: Vec<f64> = sigmas.into_iter().map(f32_round).collect();
        let vp = sigmas
            .iter()
            .map(|&s| VpCoefficients::from_sigma(s))
            .collect();
        Ok(Deis {
            prediction_type: base.prediction_type,
            threshold: {
                let mut t = ThresholdConfig::resolve(config, false);
                // DEIS has no clip_sample.
                t.clip_sample = false;
                t
            },
            batch_size: plan.batch_size,
            solver_order,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            timesteps: m.timesteps,
            sigmas,
            vp,
            run: RunOrder::default(),
            history: Default::default(),
            filled: 0,
        })
    }

    /// The solver order (orders above 3 run as 3).
    pub fn solver_order(&self) -> usize {
        self.solver_order
    }

    /// The weights of `[x0, e_0, e_1, e_2]` in the update at `order` from noise level index
    /// `index` to `index + 1` (`e_k` at index `index - k`), in the form
    /// `alpha_t x0 + sigma_t e_0 + alpha_t sum_{k >= 1} c_k (e_k - e_0)`.
    fn weights(&self, index: usize, order: usize) -> [f64; 4] {
        let pt = self.vp[index + 1];
        let rho = |i: usize| self.vp[i].sigma_t / self.vp[i].alpha_t;
        // c_1, c_2 of the module documentation (c_0 = rho_t - rho_s0 - c_1 - c_2 is implied).
        let (c1, c2) = match order {
            1 => (0.0, 0.0),
            2 => {
                let (t, s0, s1) = (rho(index + 1), rho(index), rho(index - 1));
                let f = |t: f64, b: f64, c: f64| t * (-c.ln() + t.ln() - 1.0) / (b.ln() - c.ln());
                (f(t, s1, s0) - f(s0, s1, s0), 0.0)
            }
            _ => {
                let (t, s0, s1, s2) = (rho(index + 1), rho(index), rho(index - 1), rho(index - 2));
                let g = |t: f64, b: f64, c: f64, d: f64| {
                    let (lt, lb, lc, ld) = (t.ln(), b.ln(), c.ln(), d.ln());
                    let numerator =
                        t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0);
                    numerator / ((lb - lc) * (lb - ld))
                };
                (
                    g(t, s1, s2, s0) - g(s0, s1, s2, s0),
                    g(t, s2, s0, s1) - g(s0, s2, s0, s1),
                )
            }
        };
        let a = pt.alpha_t;
        [a, pt.sigma_t - a * (c1 + c2), a * c1, a * c2]
    }
}

impl Sampler for Deis {
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
        self.timesteps.len()
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
        let vp = self.vp[index];
        Ok(sd_core::ops::lincomb2(
            out, vp.alpha_t, original, vp.sigma_t, noise,
        )?)
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
        let len = sample.len();
        check_len("model_output", len, model_output.len())?;
        check_len("prev_sample", len, prev_sample.len())?;
        check_len("pred_original_sample", len, pred_original_sample.len())?;
        if self.run.is_first() {
            self.filled = 0;
        }
        self.run.advance(index)?;

        // x0 (thresholded), then the noise it implies: e = (x - alpha_t x0) / sigma_t.
        let vp = self.vp[index];
        self.prediction_type
            .x0_coefficients(vp.alpha_t * vp.alpha_t)
            .apply(model_output, sample, pred_original_sample)?;
        postprocess_x0(pred_original_sample, &self.threshold, self.batch_size)?;
        self.history.rotate_left(1);
        let eps = &mut self.history[2];
        eps.resize(len, 0.0);
        sd_core::ops::lincomb2(
            eps,
            1.0 / vp.sigma_t,
            sample,
            -vp.alpha_t / vp.sigma_t,
            pred_original_sample,
        )?;

        let n = self.timesteps.len();
        let lower = self.lower_order_final && n < 15;
        let order = if self.solver_order == 1 || self.filled < 1 || (lower && index == n - 1) {
            1
        } else if self.solver_order == 2 || self.filled < 2 || (lower && index == n - 2) {
            2
        } else {
            3
        };
        if self.sigmas[index + 1] == self.sigmas[index] {
            // The last step of a ramp (its last sigma repeated): diffusers' update is exactly
            // the identity.
            prev_sample.copy_from_slice(sample);
            self.filled = (self.filled + 1).min(self.solver_order);
            return Ok(());
        }
        let w = self.weights(index, order);
        let [e0, e1, e2] = [&self.history[2], &self.history[1], &self.history[0]];
        let x0: &[f32] = pred_original_sample;
        match order {
            1 => sd_core::ops::lincomb2(prev_sample, w[0], x0, w[1], e0)?,
            2 => sd_core::ops::lincomb3(prev_sample, w[0], x0, w[1], e0, w[2], e1)?,
            _ => sd_core::ops::lincomb(prev_sample, &w, &[x0, e0, e1, e2])?,
        }
        self.filled = (self.filled + 1).min(self.solver_order);
        Ok(())
    }

    fn reset(&mut self) {
        self.run.reset();
        self.filled = 0;
    }
}

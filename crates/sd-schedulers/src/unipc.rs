//! UniPC (Zhao et al., 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
//! of Diffusion Models", Algorithms 1-3 with the B(h) variants of sec. 3.3), as diffusers'
//! `UniPCMultistepScheduler`.
//!
//! In the half log-SNR `lambda = ln(alpha_t / sigma_t)` (see [`VpCoefficients`]), with the
//! converted model outputs `m_k` of the previous steps (newest `m_0`, at noise level `s_0`):
//!
//! ```text
//! h   = lambda_t - lambda_s0,  hh = -h (data prediction) or h (noise prediction)
//! r_k = (lambda_sk - lambda_s0) / h,   D_k = (m_k - m_0) / r_k          (k = 1 .. p-1)
//! B(h) = hh (bh1) or e^hh - 1 (bh2)
//! UniP-p:  x_t   = (sigma_t / sigma_s0) x_s0 - alpha_t (e^hh - 1) m_0 - alpha_t B(h) sum_k rho_k D_k
//! UniC-p:  x_t^c = (sigma_t / sigma_s0) x_s0 - alpha_t (e^hh - 1) m_0
//!                  - alpha_t B(h) (sum_k rho_k D_k + rho_p (m_t - m_0))
//! ```
//!
//! with `alpha`/`sigma` swapped in the two outer coefficients for noise prediction
//! (`predict_x0 = false`: `m` is the predicted noise, the ratio `alpha_t / alpha_s0`). The
//! weights `rho` solve `R rho = b` with `R_ij = r_j^i` (`r_p = 1`) and `b_i = i! h phi_i / B(h)`
//! from the recursion `h phi_1 = (e^hh - 1) / hh - 1`, `h phi_{i+1} = h phi_i / hh - 1 / (i+1)!`;
//! the predictor uses the leading `(p-1) x (p-1)` block, except `rho = 1/2` at `p = 2`, and the
//! corrector `rho = 1/2` at `p = 1`. These systems have at most 3 unknowns and are solved here in
//! `f64` (diffusers solves them in float32).
//!
//! Each step converts the model output (to x0, clipped by dynamic thresholding if asked, or to
//! the noise), corrects the previous step's prediction with UniC at the previous order (unless
//! `disable_corrector` lists the previous step, and not at the first step of a run), and
//! predicts the next sample with UniP at order `min(solver_order, steps taken + 1)`, lowered to
//! the number of steps left with `lower_order_final` (for any number of steps, unlike DEIS and
//! DPM-Solver). The model sees the sample unscaled; `init_noise_sigma` is 1.
//!
//! Noise levels: the training timesteps of the multistep solvers (`n + 1` spaced points, the
//! last dropped) with their training sigmas, or a Karras or exponential ramp between the
//! smallest and largest training sigma (or `sigma_min`/`sigma_max`) with the timesteps mapped
//! back by `sigma_to_t` (rounded for Karras, truncated for exponential, as diffusers does). The
//! final noise level is 0 or, with `final_sigmas_type = "sigma_min"`, the smallest training
//! sigma (the last ramp sigma with a ramp, which makes the last step the identity).
//!
//! Differences from diffusers, all typed errors at construction: a `solver_p` (another
//! scheduler as the predictor), `solver_order` above 3, custom timesteps or sigmas (diffusers
//! takes custom sigmas only with flow sigmas), `shift_terminal` (flow sigmas only), and the
//! configurations whose last step diffusers cannot take to a final sigma of 0: `bh1`
//! (`0 * inf = NaN`), noise prediction (`NaN`), and `lower_order_final = false` with
//! `solver_order >= 2` (`inf`, or a singular matrix at order 3); each works with
//! `final_sigmas_type = "sigma_min"`.

use sd_core::sigmas::{KARRAS_RHO, interp_linear, sigma_from_alpha_bar};
use sd_core::{
    Conversion, PredictionType, TimestepSpacing, VpCoefficients, exponential_sigmas, karras_sigmas,
    sigma_to_t,
};

use crate::common::{f32_round, k_alphas_cumprod, postprocess_x0};
use crate::config::{
    BaseConfig, BetaScheduleName, FinalSigmasType, SchedulerConfig, SigmaConfig, SolverType,
    ThresholdConfig,
};
use crate::error::{Error, Result, check_len};
use crate::noise::NoiseSource;
use crate::sampler::{Plan, RunOrder, Sampler, Steps};

/// The per-step timesteps and noise levels of diffusers' multistep solvers (UniPC, DEIS; the
/// same `set_timesteps` as DPM-Solver's without `lambda_min_clipped`), before the final noise
/// level, which each class appends its own way.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MultistepSchedule {
    /// One integer timestep per step (stored as `f64`).
    pub timesteps: Vec<f64>,
    /// One noise level per step, largest first (not yet rounded to `f32`).
    pub sigmas: Vec<f64>,
    /// The training sigmas, increasing with `t`.
    pub train_sigmas: Vec<f64>,
    /// Whether the noise levels are a Karras or exponential ramp.
    pub ramp: bool,
}

impl MultistepSchedule {
    /// `set_timesteps(n)` of the multistep solvers over `alphas_cumprod` (already patched for
    /// zero terminal SNR where the class does so).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for custom timesteps or sigmas, [`Error::Core`] for impossible
    /// step counts or a ramp with `sigma_min > sigma_max`.
    pub(crate) fn new(
        sampler: &'static str,
        alphas_cumprod: &[f64],
        spacing: TimestepSpacing,
        steps_offset: usize,
        sigma_config: &SigmaConfig,
        steps: &Steps,
    ) -> Result<Self> {
        let Steps::Count(n) = *steps else {
            return Err(Error::InvalidConfig {
                sampler,
                key: "steps",
                value: "custom".into(),
                reason: "this sampler takes a step count (diffusers takes custom sigmas only with flow sigmas)",
            });
        };
        let t = alphas_cumprod.len();
        let train_sigmas: Vec<f64> = alphas_cumprod
            .iter()
            .map(|&a| sigma_from_alpha_bar(a))
            .collect();
        let spaced = spacing.multistep_timesteps(t, n, steps_offset, t)?;
        let (lo, hi) = (train_sigmas[0], train_sigmas[t - 1]);
        let sigma_min = sigma_config.sigma_min.unwrap_or(lo);
        let sigma_max = sigma_config.sigma_max.unwrap_or(hi);
        // Karras timesteps are rounded, exponential ones truncated (numpy's astype(int64)).
        let ramp = if sigma_config.use_karras_sigmas {
            Some((karras_sigmas(sigma_min, sigma_max, n, KARRAS_RHO)?, true))
        } else if sigma_config.use_exponential_sigmas {
            Some((exponential_sigmas(sigma_min, sigma_max, n)?, false))
        } else {
            None
        };
        let (timesteps, sigmas) = match ramp {
            Some((sigmas, round)) => {
                let log_sigmas: Vec<f64> = train_sigmas.iter().map(|s| s.ln()).collect();
                let timesteps = sigmas
                    .iter()
                    .map(|&s| {
                        sigma_to_t(s, &log_sigmas).map(|t| {
                            if round {
                                t.round_ties_even()
                            } else {
                                t.trunc()
                            }
                        })
                    })
                    .collect::<sd_core::Result<Vec<_>>>()?;
                (timesteps, sigmas)
            }
            None => {
                let sigmas = spaced
                    .iter()
                    .map(|&ts| interp_linear(&train_sigmas, ts as f64))
                    .collect::<sd_core::Result<Vec<_>>>()?;
                (spaced.iter().map(|&ts| ts as f64).collect(), sigmas)
            }
        };
        Ok(MultistepSchedule {
            timesteps,
            sigmas,
            train_sigmas,
            ramp: sigma_config.use_karras_sigmas || sigma_config.use_exponential_sigmas,
        })
    }
}

/// Solves the `n x n` system `a x = b` (`n <= 3`) by Gaussian elimination with partial
/// pivoting; `None` if it is singular or not finite.
pub(crate) fn solve_small(mut a: [[f64; 3]; 3], mut b: [f64; 3], n: usize) -> Option<[f64; 3]> {
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        let p = a[pivot][col];
        if p == 0.0 || !p.is_finite() {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col];
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (v, &pv) in a[row].iter_mut().zip(&pivot_row).skip(col) {
                *v -= f * pv;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0.0; 3];
    for row in (0..n).rev() {
        let tail: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - tail) / a[row][row];
    }
    x.iter().take(n).all(|v| v.is_finite()).then_some(x)
}

/// The UniPC sampler; see the module documentation.
#[derive(Debug, Clone)]
pub struct UniPc {
    prediction_type: PredictionType,
    threshold: ThresholdConfig,
    batch_size: usize,
    solver_order: usize,
    bh2: bool,
    predict_x0: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    vp: Vec<VpCoefficients>,
    num_inference_steps: usize,
    run: RunOrder,
    /// The converted outputs of the last `solver_order` steps, oldest first.
    history: Vec<Vec<f32>>,
    /// How many entries of `history` hold outputs of this run (diffusers' `lower_order_nums`).
    filled: usize,
    /// The order of the last prediction, which the next step's corrector uses.
    last_order: usize,
    /// The (corrected) sample the last prediction started from.
    last_sample: Vec<f32>,
    converted: Vec<f32>,
    corrected: Vec<f32>,
}

impl UniPc {
    /// diffusers' class name.
    pub const CLASS_NAME: &'static str = "UniPCMultistepScheduler";

    /// Builds the sampler from a scheduler config (any class's) and a plan, with diffusers'
    /// defaults: `bh2`, order 2, data prediction, `lower_order_final`, `linspace` spacing.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for what UniPC does not support here (see the module
    /// documentation), [`Error::Core`] for impossible step counts.
    pub fn new(config: &SchedulerConfig, plan: impl Into<Plan>) -> Result<Self> {
        let plan = plan.into();
        let name = Self::CLASS_NAME;
        let invalid = |key: &'static str, value: String, reason: &'static str| {
            Err(Error::InvalidConfig {
                sampler: name,
                key,
                value,
                reason,
            })
        };
        let base = BaseConfig::diffusers_default(TimestepSpacing::Linspace).resolve(config);
        base.require_schedule(
            name,
            &[
                BetaScheduleName::Linear,
                BetaScheduleName::ScaledLinear,
                BetaScheduleName::SquaredcosCapV2,
            ],
        )?;
        let sigma_config = SigmaConfig::resolve(config, name)?;
        if let Some(solver_p) = &config.solver_p
            && !solver_p.is_null()
        {
            return invalid(
                "solver_p",
                solver_p.to_string(),
                "another scheduler as the predictor is not supported",
            );
        }
        if let Some(shift) = config.shift_terminal {
            return invalid(
                "shift_terminal",
                shift.to_string(),
                "only supported with flow sigmas (diffusers raises too)",
            );
        }
        let solver_order = config.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return invalid(
                "solver_order",
                solver_order.to_string(),
                "UniPC is implemented for orders 1 to 3",
            );
        }
        // diffusers maps the other classes' solver types to bh2.
        let bh2 = !matches!(config.solver_type, Some(SolverType::Bh1));
        let predict_x0 = config.predict_x0.unwrap_or(true);
        let lower_order_final = config.lower_order_final.unwrap_or(true);
        if sigma_config.final_sigmas_type == FinalSigmasType::Zero {
            let why = if !predict_x0 {
                Some((
                    "predict_x0",
                    "false",
                    "diffusers' last step to sigma = 0 is NaN with noise prediction; use final_sigmas_type = \"sigma_min\"",
                ))
            } else if !bh2 {
                Some((
                    "solver_type",
                    "bh1",
                    "diffusers' last step to sigma = 0 is NaN with bh1; use final_sigmas_type = \"sigma_min\"",
                ))
            } else if !lower_order_final && solver_order >= 2 {
                Some((
                    "lower_order_final",
                    "false",
                    "diffusers' last step to sigma = 0 is not finite above order 1; use final_sigmas_type = \"sigma_min\"",
                ))
            } else {
                None
            };
            if let Some((key, value, reason)) = why {
                return invalid(key, value.into(), reason);
            }
        }

        let schedule = base.noise_schedule()?;
        let alphas_cumprod = k_alphas_cumprod(&schedule, base.rescale_betas_zero_snr);
        let m = MultistepSchedule::new(
            name,
            &alphas_cumprod,
            base.timestep_spacing,
            base.steps_offset,
            &sigma_config,
            &plan.steps,
        )?;
        let last = match sigma_config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin if m.ramp => m.sigmas[m.sigmas.len() - 1],
            FinalSigmasType::SigmaMin => m.train_sigmas[0],
        };
        let mut sigmas = m.sigmas;
        sigmas.push(last);
        let sigmas: Vec<f64> = sigmas.into_iter().map(f32_round).collect();
        let vp = sigmas
            .iter()
            .map(|&s| VpCoefficients::from_sigma(s))
            .collect();

        let mut threshold = ThresholdConfig::resolve(config, false);
        // UniPC has no clip_sample, and thresholds only a predicted x0.
        threshold.clip_sample = false;
        threshold.thresholding &= predict_x0;
        Ok(UniPc {
            prediction_type: base.prediction_type,
            threshold,
            batch_size: plan.batch_size,
            solver_order,
            bh2,
            predict_x0,
            lower_order_final,
            disable_corrector: config.disable_corrector.clone().unwrap_or_default(),
            num_inference_steps: m.timesteps.len(),
            timesteps: m.timesteps,
            sigmas,
            vp,
            run: RunOrder::default(),
            history: vec![Vec::new(); solver_order],
            filled: 0,
            last_order: 1,
            last_sample: Vec::new(),
            converted: Vec::new(),
            corrected: Vec::new(),
        })
    }

    /// The solver order.
    pub fn solver_order(&self) -> usize {
        self.solver_order
    }

    /// The weights of `[x, m_0, m_1, m_2, m_t]` in the update from noise level index `s0` to
    /// index `t` at `order` (the corrector's when `corrector`), `m_k` at index `s0 - k`.
    fn weights(&self, t: usize, s0: usize, order: usize, corrector: bool) -> Result<[f64; 5]> {
        let (pt, ps0) = (self.vp[t], self.vp[s0]);
        let lambda_s0 = ps0.lambda();
        let h = pt.lambda() - lambda_s0;
        let mut w = [0.0; 5];
        if h == 0.0 {
            // Two equal noise levels (the last step of a ramp ending at sigma_min): the update
            // is the identity, as diffusers' is at the orders where it is finite.
            w[0] = 1.0;
            return Ok(w);
        }
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let b_h = if self.bh2 { h_phi_1 } else { hh };
        let (ratio, c) = if self.predict_x0 {
            (pt.sigma_t / ps0.sigma_t, pt.alpha_t)
        } else {
            (pt.alpha_t / ps0.alpha_t, pt.sigma_t)
        };
        w[0] = ratio;
        w[1] = -c * h_phi_1;

        let mut r = [1.0; 3];
        for (k, rk) in r.iter_mut().enumerate().take(order - 1) {
            *rk = (self.vp[s0 - k - 1].lambda() - lambda_s0) / h;
        }
        let mut b = [0.0; 3];
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        for (i, bi) in b.iter_mut().enumerate().take(order) {
            *bi = h_phi_k * factorial / b_h;
            factorial *= (i + 2) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        let mut matrix = [[0.0; 3]; 3];
        for (i, row) in matrix.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = r[j].powi(i as i32);
            }
        }
        let singular = || {
            Error::Core(sd_core::Error::InvalidParameter {
                name: "UniPC order conditions",
                value: order as f64,
                reason: "the linear system for the UniPC weights is singular (repeated noise levels)",
            })
        };
        let rhos = match (corrector, order) {
            (false, 1) => [0.0; 3],
            (false, 2) => [0.5, 0.0, 0.0],
            (false, p) => solve_small(matrix, b, p - 1).ok_or_else(singular)?,
            (true, 1) => [0.5, 0.0, 0.0],
            (true, p) => solve_small(matrix, b, p).ok_or_else(singular)?,
        };
        for k in 1..order {
            let d = c * b_h * rhos[k - 1] / r[k - 1];
            w[1] += d;
            w[1 + k] = -d;
        }
        if corrector {
            let d = c * b_h * rhos[order - 1];
            w[1] += d;
            w[4] = -d;
        }
        Ok(w)
    }

    /// `out = sum w_k term_k` over `x`, the history (newest first, `order` of them) and, for
    /// the corrector, the current converted output.
    fn combine(
        &self,
        weights: &[f64; 5],
        x: &[f32],
        order: usize,
        model_t: Option<&[f32]>,
        out: &mut [f32],
    ) -> Result<()> {
        let newest = self.history.len() - 1;
        let mut terms: [&[f32]; 5] = [x; 5];
        let mut w = [0.0; 5];
        terms[1] = &self.history[newest];
        w[..2].copy_from_slice(&weights[..2]);
        let mut count = 2;
        for k in 1..order {
            terms[count] = &self.history[newest - k];
            w[count] = weights[1 + k];
            count += 1;
        }
        if let Some(m) = model_t {
            terms[count] = m;
            w[count] = weights[4];
            count += 1;
        }
        Ok(sd_core::ops::lincomb(out, &w[..count], &terms[..count])?)
    }
}

impl Sampler for UniPc {
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
        let first = self.run.is_first();
        self.run.advance(index)?;
        if first {
            self.filled = 0;
        }

        // The model output as the solver uses it: x0 (thresholded) or the noise.
        let vp = self.vp[index];
        let alpha_bar = vp.alpha_t * vp.alpha_t;
        let to_x0: Conversion = self.prediction_type.x0_coefficients(alpha_bar);
        to_x0.apply(model_output, sample, pred_original_sample)?;
        self.converted.resize(len, 0.0);
        if self.predict_x0 {
            postprocess_x0(pred_original_sample, &self.threshold, self.batch_size)?;
            self.converted.copy_from_slice(pred_original_sample);
        } else {
            self.prediction_type.eps_coefficients(alpha_bar).apply(
                model_output,
                sample,
                &mut self.converted,
            )?;
        }

        // UniC: correct the last prediction (which is `sample`) with this output.
        let corrector = !first && !self.disable_corrector.contains(&(index - 1));
        if corrector {
            let w = self.weights(index, index - 1, self.last_order, true)?;
            let mut corrected = std::mem::take(&mut self.corrected);
            corrected.resize(len, 0.0);
            let result = self.combine(
                &w,
                &self.last_sample,
                self.last_order,
                Some(&self.converted),
                &mut corrected,
            );
            self.corrected = corrected;
            result?;
            std::mem::swap(&mut self.last_sample, &mut self.corrected);
        } else {
            self.last_sample.resize(len, 0.0);
            self.last_sample.copy_from_slice(sample);
        }

        // Push this output into the history (the evicted buffer becomes the next scratch).
        self.history.rotate_left(1);
        let newest = self.history.len() - 1;
        std::mem::swap(&mut self.history[newest], &mut self.converted);

        // UniP: predict the next sample.
        let mut order = self.solver_order;
        if self.lower_order_final {
            order = order.min(self.timesteps.len() - index);
        }
        let order = order.min(self.filled + 1);
        let w = self.weights(index + 1, index, order, false)?;
        self.combine(&w, &self.last_sample, order, None, prev_sample)?;
        self.last_order = order;
        self.filled = (self.filled + 1).min(self.solver_order);
        Ok(())
    }

    fn reset(&mut self) {
        self.run.reset();
        self.filled = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solves_small_systems() {
        let a = [[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]];
        let x = solve_small(a, [3.0, 5.0, 5.0], 3).unwrap();
        for (v, e) in x.iter().zip([1.0, 1.0, 1.0]) {
            assert!((v - e).abs() < 1e-12, "{x:?}");
        }
        // A zero first pivot needs the row swap.
        let x = solve_small(
            [[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0; 3]],
            [2.0, 3.0, 0.0],
            2,
        );
        assert_eq!(x, Some([1.0, 2.0, 0.0]));
        assert_eq!(
            solve_small([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0; 3]], [1.0; 3], 2),
            None
        );
    }
}

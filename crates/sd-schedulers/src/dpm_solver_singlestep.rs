//! The single-step DPM-Solver (Lu et al., 2022, "DPM-Solver: A Fast ODE Solver for Diffusion
//! Probabilistic Model Sampling in Around 10 Steps", Algorithms 1 and 2) and DPM-Solver++
//! (Lu et al., 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
//! Models", Algorithm 1), as diffusers' `DPMSolverSinglestepScheduler`.
//!
//! The schedule's steps are grouped by an order list (`[1, 2, 1, 2, ...]` for order 2,
//! `[1, 2, 3, 1, 2, 3, ...]` for order 3). A group of order `k` takes `k` model evaluations
//! and ends with one update of order `k` from the sample at the start of the group, the base
//! `s` (`s1` for order 2, `s2` for order 3); the steps before the last of a group are the
//! lower-order updates of the same solver that give the intermediate samples. With
//! `h = lambda_t - lambda_s`, `r0 = (lambda_s0 - lambda_s) / h`,
//! `r1 = (lambda_s1 - lambda_s) / h`, and `m0` the newest converted output:
//!
//! ```text
//! order 1:           D0 = m0                         (base s0)
//! order 2:           D0 = m1, D1 = (m0 - m1) / r0    (base s1)
//! order 3:           D0 = m2, D1_0 = (m1 - m2) / r1, D1_1 = (m0 - m2) / r0   (base s2)
//!   midpoint:        x_t = A x_s + B D0 + C_heun D1_1
//!   heun:            D1 = (r0 D1_0 - r1 D1_1) / (r0 - r1), D2 = 2 (D1_1 - D1_0) / (r0 - r1),
//!                    x_t = A x_s + B D0 + C_heun D1 + E D2
//! ```
//!
//! with the coefficients `A`, `B`, `C`, `E` and the noise weight `N` of the multistep solver
//! ([`crate::dpm_solver_multistep`]'s table) for `dpmsolver`, `dpmsolver++` and
//! `sde-dpmsolver++` (which draws noise every step); the second-order update uses `C` of
//! `solver_type`.
//!
//! The order list: without `lower_order_final`, the pattern repeated; with it, the pattern
//! ends early so that the last group is complete (order 3 with `n % 3 == 0` ends
//! `..., 1, 2, 1`; order 2 with `n` even ends `..., 1, 1`). The last step is first order when
//! the final noise level is 0. As in diffusers, `lower_order_final` is switched on when `n`
//! is not a multiple of the order or the final noise level is 0; and an order is lowered at
//! the start of a run (image-to-image) while the history lacks the outputs it needs.
//!
//! The class knows no `timestep_spacing`, `steps_offset`, `rescale_betas_zero_snr` or
//! `use_lu_lambdas`, and ignores them in a model's config as diffusers' `from_config` does:
//! its timesteps are `linspace`-like (`n + 1` points from 0 to the last unclipped timestep,
//! rounded, the last dropped). Karras timesteps are always rounded, exponential ones
//! truncated. Not supported: `sde-dpmsolver` (diffusers does not implement it in this class)
//! and `dpmsolver` with thresholding (diffusers fails there, indexing its alpha table with
//! `None`).

use crate::config::{AlgorithmType, FinalSigmasType, SchedulerConfig};
use crate::dpm_solver_multistep::{Class, DpmCore, OutputWeights, Phi};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use crate::sampler::{Plan, Sampler, Steps};

/// The single-step DPM-Solver / DPM-Solver++ sampler; see the module documentation.
#[derive(Debug, Clone)]
pub struct DpmSolverSinglestep {
    core: DpmCore,
    order_list: Vec<usize>,
    num_inference_steps: usize,
    /// The sample at the start of the current group (diffusers' `self.sample`).
    base: Vec<f32>,
}

impl DpmSolverSinglestep {
    /// diffusers' class name.
    pub const CLASS_NAME: &'static str = "DPMSolverSinglestepScheduler";

    /// Builds the sampler from a scheduler config (any class's) and a plan (a step count or
    /// custom timesteps), with the class defaults: DPM-Solver++ of order 2, midpoint.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for what diffusers rejects or what is not implemented (an
    /// order other than 1 to 3, `sde-dpmsolver`, `dpmsolver` with thresholding, a
    /// noise-prediction algorithm with the final sigma 0, a learned variance without epsilon
    /// prediction, custom sigmas, custom timesteps with a sigma ramp, beta / flow sigmas,
    /// dynamic shifting), [`Error::Core`] for impossible step counts.
    pub fn new(config: &SchedulerConfig, plan: impl Into<Plan>) -> Result<Self> {
        let plan = plan.into();
        let solver_order = config.solver_order.unwrap_or(2);
        if config.algorithm_type == Some(AlgorithmType::DpmSolver)
            && config.thresholding == Some(true)
        {
            return Err(Error::InvalidConfig {
                sampler: Self::CLASS_NAME,
                key: "thresholding",
                value: "true".into(),
                reason: "diffusers' single-step dpmsolver cannot threshold (it fails)",
            });
        }
        let core = DpmCore::new(Class::Singlestep, config, &plan, solver_order)?;
        let n = match &plan.steps {
            Steps::Timesteps(ts) => ts.len(),
            _ => core.timesteps.len(),
        };
        let final_zero = config.final_sigmas_type.unwrap_or_default() == FinalSigmasType::Zero;
        let lower_order_final = config.lower_order_final.unwrap_or(false)
            || !n.is_multiple_of(solver_order)
            || final_zero;
        let order_list = order_list(n, solver_order, lower_order_final, final_zero);
        Ok(DpmSolverSinglestep {
            num_inference_steps: n,
            order_list,
            core,
            base: Vec::new(),
        })
    }

    /// The order of the update at each step (diffusers' `order_list`), before the lowering
    /// at the start of a run.
    pub fn order_list(&self) -> &[usize] {
        &self.order_list
    }
}

/// diffusers' `get_order_list`.
fn order_list(steps: usize, order: usize, lower_order_final: bool, final_zero: bool) -> Vec<usize> {
    let repeat = |pattern: &[usize], times: usize| -> Vec<usize> {
        pattern
            .iter()
            .copied()
            .cycle()
            .take(pattern.len() * times)
            .collect()
    };
    let mut orders = match (order, lower_order_final) {
        (3, true) => match steps % 3 {
            0 => [
                repeat(&[1, 2, 3], (steps / 3).saturating_sub(1)),
                vec![1, 2, 1],
            ]
            .concat(),
            1 => [repeat(&[1, 2, 3], steps / 3), vec![1]].concat(),
            _ => [repeat(&[1, 2, 3], steps / 3), vec![1, 2]].concat(),
        },
        (2, true) => {
            if steps.is_multiple_of(2) {
                [repeat(&[1, 2], (steps / 2).saturating_sub(1)), vec![1, 1]].concat()
            } else {
                [repeat(&[1, 2], steps / 2), vec![1]].concat()
            }
        }
        (3, false) => repeat(&[1, 2, 3], steps / 3),
        (2, false) => repeat(&[1, 2], steps / 2),
        _ => vec![1; steps],
    };
    if final_zero && let Some(last) = orders.last_mut() {
        *last = 1;
    }
    orders
}

impl Sampler for DpmSolverSinglestep {
    fn class_name(&self) -> &'static str {
        Self::CLASS_NAME
    }

    fn timesteps(&self) -> &[f64] {
        &self.core.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.core.sigmas)
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
        self.core.add_noise(original, noise, index, out)
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
        let begun = self.core.begin(
            index,
            model_output,
            sample,
            noise,
            prev_sample,
            pred_original_sample,
        )?;
        // Lowered while the history lacks the outputs the order needs.
        let order = self
            .order_list
            .get(index)
            .copied()
            .unwrap_or(1)
            .min(begun.available);
        let core = &self.core;
        let (t, s0) = (core.vp(index + 1), core.vp(index));
        let (base_sample, base) = match order {
            1 => (sample, s0),
            2 => (&self.base[..], core.vp(index - 1)),
            _ => (&self.base[..], core.vp(index - 2)),
        };
        let h = t.lambda() - base.lambda();
        let phi = Phi::new(core.algorithm, t, base, h);
        let weights = match order {
            1 => OutputWeights::one(phi.d0),
            2 => {
                // D0 = m1, D1 = (m0 - m1) / r0.
                let r0 = (s0.lambda() - base.lambda()) / h;
                let c = phi.d1(core.heun);
                OutputWeights::two(c / r0, phi.d0 - c / r0)
            }
            _ => {
                let s1 = core.vp(index - 1);
                let r0 = (s0.lambda() - base.lambda()) / h;
                let r1 = (s1.lambda() - base.lambda()) / h;
                // D0 = m2, D1_0 = (m1 - m2) / r1, D1_1 = (m0 - m2) / r0.
                let c1 = phi.d1_heun;
                if core.heun {
                    // c1 D1 + d2 D2 = a D1_0 + b D1_1.
                    let a = (c1 * r0 - 2.0 * phi.d2) / (r0 - r1);
                    let b = (-c1 * r1 + 2.0 * phi.d2) / (r0 - r1);
                    OutputWeights::three(b / r0, a / r1, phi.d0 - a / r1 - b / r0)
                } else {
                    OutputWeights::three(c1 / r0, 0.0, phi.d0 - c1 / r0)
                }
            }
        };
        core.combine(prev_sample, base_sample, phi.sample, &weights, phi.noise)?;
        if order == 1 {
            self.base.resize(sample.len(), 0.0);
            self.base.copy_from_slice(sample);
        }
        self.core.commit(begun);
        Ok(())
    }

    fn reset(&mut self) {
        self.core.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::order_list;

    #[test]
    fn order_lists_follow_diffusers() {
        assert_eq!(order_list(9, 3, true, true), [1, 2, 3, 1, 2, 3, 1, 2, 1]);
        assert_eq!(
            order_list(10, 3, true, false),
            [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]
        );
        assert_eq!(
            order_list(11, 3, true, false),
            [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2]
        );
        assert_eq!(order_list(9, 3, false, false), [1, 2, 3, 1, 2, 3, 1, 2, 3]);
        assert_eq!(
            order_list(10, 2, true, false),
            [1, 2, 1, 2, 1, 2, 1, 2, 1, 1]
        );
        assert_eq!(
            order_list(11, 2, true, true),
            [1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1]
        );
        assert_eq!(order_list(4, 2, false, false), [1, 2, 1, 2]);
        assert_eq!(order_list(3, 1, false, true), [1, 1, 1]);
        assert_eq!(order_list(1, 3, true, true), [1]);
        assert_eq!(order_list(2, 2, true, false), [1, 1]);
    }
}

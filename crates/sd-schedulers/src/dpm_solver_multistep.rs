//! The multistep DPM-Solver (Lu et al., 2022, "DPM-Solver: A Fast ODE Solver for Diffusion
//! Probabilistic Model Sampling in Around 10 Steps") and DPM-Solver++ (Lu et al., 2022,
//! "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
//! Algorithm 2), with their stochastic variants, as diffusers' `DPMSolverMultistepScheduler`.
//! DPM-Solver++ of order 2 is the UIs' "DPM++ 2M" ("DPM++ 2M Karras" with Karras sigmas,
//! "DPM++ 2M SDE" with `sde-dpmsolver++`).
//!
//! Each noise level `s` of the schedule is taken in the variance-preserving form
//! `x_s = alpha_s x_0 + sigma_s eps` ([`VpCoefficients`]), with the time variable
//! `lambda_s = ln(alpha_s) - ln(sigma_s)`. The model output is converted to what the solver
//! integrates: the data prediction `D = x_0` (then thresholded if asked) for `dpmsolver++` and
//! `sde-dpmsolver++`, the noise prediction `D = eps` for `dpmsolver` and `sde-dpmsolver`.
//! A step from `s0` to `t` with `h = lambda_t - lambda_s0` uses the last outputs `m0` (this
//! step's), `m1`, `m2` at `s0`, `s1`, `s2`, with `r0 = (lambda_s0 - lambda_s1) / h`,
//! `r1 = (lambda_s1 - lambda_s2) / h`:
//!
//! ```text
//! order 1:  D0 = m0
//! order 2:  D0 = m0, D1 = (m0 - m1) / r0
//! order 3:  D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1,
//!           D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1)
//!
//! x_t = A x_s0 + B D0 + C D1 + E D2 + N z
//!
//!                  A                    B                   C (midpoint)        C (heun, and order 3)          E (order 3)                              N
//! dpmsolver++      sigma_t/sigma_s0     -alpha_t(e^-h - 1)  -alpha_t(e^-h - 1)/2  alpha_t((e^-h - 1)/h + 1)    -alpha_t((e^-h - 1 + h)/h^2 - 1/2)        0
//! dpmsolver        alpha_t/alpha_s0     -sigma_t(e^h - 1)   -sigma_t(e^h - 1)/2   -sigma_t((e^h - 1)/h - 1)    -sigma_t((e^h - 1 - h)/h^2 - 1/2)         0
//! sde-dpmsolver++  sigma_t/sigma_s0 e^-h alpha_t(1 - e^-2h) alpha_t(1 - e^-2h)/2  alpha_t((1 - e^-2h)/(-2h) + 1) alpha_t((1 - e^-2h - 2h)/(2h)^2 - 1/2) sigma_t sqrt(1 - e^-2h)
//! sde-dpmsolver    alpha_t/alpha_s0     -2sigma_t(e^h - 1)  -sigma_t(e^h - 1)     -2sigma_t((e^h - 1)/h - 1)   (none)                                    sigma_t sqrt(e^2h - 1)
//! ```
//!
//! `z` is standard normal noise, drawn every step by the SDE variants. The order of a step is
//! the configured one, lowered at the start of a run (order `k` needs `k - 1` earlier outputs
//! of this run) and at the end: the last step is first order with `euler_at_final`, with the
//! final noise level 0, or with `lower_order_final` and fewer than 15 steps, in which case the
//! step before it is at most second order.
//!
//! Noise levels: the training sigmas interpolated at the spaced timesteps (`n + 1` points
//! with the last dropped, after skipping the timesteps whose `lambda` lies below
//! `lambda_min_clipped`), or the Karras, exponential or lambda-uniform (`use_lu_lambdas`:
//! evenly spaced in `ln(sigma)` between the extreme training sigmas) ramps, whose timesteps
//! are the training timesteps of their sigmas rounded (Karras, lambda-uniform; for
//! `squaredcos_cap_v2` truncated, as diffusers skips the rounding there) or truncated
//! (exponential). The last noise level is 0 (`final_sigmas_type = "zero"`) or the smallest
//! training sigma. A model that predicts its variance too (`variance_type = "learned"` or
//! `"learned_range"`) outputs twice the sample's channels; the solver keeps the first half of
//! each sample of the batch.
//!
//! Quirks of diffusers kept: `algorithm_type = "deis"` runs DPM-Solver++ and the solver types
//! `logrho`, `bh1`, `bh2` run the midpoint update; `final_sigmas_type = "zero"` is rejected
//! for the noise-prediction algorithms (and for `"deis"`, which is checked before it is
//! mapped); `clip_sample` is not a key of this class and is ignored; the sigmas are stored in
//! float32. The timesteps of the exponential ramp are truncated, so whether its first
//! timestep is `T - 1` or `T - 2` turns on the last bit of a float32 logarithm in diffusers;
//! here it is computed from the float64 schedule.
//!
//! The pieces the single-step solver shares (the schedule, the conversion of the model
//! output, the update coefficients, the history) live here as `pub(crate)` items.

use sd_core::sigmas::{KARRAS_RHO, alpha_bar_from_sigma, interp_linear, sigma_from_alpha_bar};
use sd_core::{
    PredictionType, TimestepSpacing, VpCoefficients, exponential_sigmas, karras_sigmas, sigma_to_t,
};

use crate::common::{f32_round, k_alphas_cumprod, postprocess_x0};
use crate::config::{
    AlgorithmType, BaseConfig, BetaScheduleName, FinalSigmasType, SchedulerConfig, SigmaConfig,
    SolverType, ThresholdConfig,
};
use crate::error::{Error, Result, check_len};
use crate::noise::NoiseSource;
use crate::sampler::{Plan, RunOrder, Sampler, Steps};

/// The multistep DPM-Solver / DPM-Solver++ sampler; see the module documentation.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    core: DpmCore,
    solver_order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    num_inference_steps: usize,
}

impl DpmSolverMultistep {
    /// diffusers' class name.
    pub const CLASS_NAME: &'static str = "DPMSolverMultistepScheduler";

    /// Builds the sampler from a scheduler config (any class's) and a plan (a step count or
    /// custom timesteps), with the class defaults: DPM-Solver++ of order 2, midpoint,
    /// `linspace` spacing, `lower_order_final`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for what diffusers rejects or what is not implemented (an
    /// order other than 1 to 3, `sde-dpmsolver` of order 3, a noise-prediction algorithm
    /// with the final sigma 0, a learned variance without epsilon prediction, custom sigmas,
    /// custom timesteps with a sigma ramp, beta / flow sigmas, dynamic shifting),
    /// [`Error::Core`] for impossible step counts.
    pub fn new(config: &SchedulerConfig, plan: impl Into<Plan>) -> Result<Self> {
        let plan = plan.into();
        let solver_order = config.solver_order.unwrap_or(2);
        let core = DpmCore::new(Class::Multistep, config, &plan, solver_order)?;
        let num_inference_steps = core.timesteps.len();
        Ok(DpmSolverMultistep {
            solver_order,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_sigma_zero: config.final_sigmas_type.unwrap_or_default() == FinalSigmasType::Zero,
            num_inference_steps,
            core,
        })
    }

    /// The order of the update at step `index` when `previous` outputs of this run precede
    /// it (diffusers' `lower_order_final`, `lower_order_second` and `lower_order_nums`).
    fn step_order(&self, index: usize, previous: usize) -> usize {
        let n = self.core.timesteps.len();
        let few_steps = self.lower_order_final && n < 15;
        let lower_final =
            index + 1 == n && (self.euler_at_final || few_steps || self.final_sigma_zero);
        let lower_second = index + 2 == n && few_steps;
        if self.solver_order == 1 || previous < 1 || lower_final {
            1
        } else if self.solver_order == 2 || previous < 2 || lower_second {
            2
        } else {
            3
        }
    }
}

impl Sampler for DpmSolverMultistep {
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
        let order = self.step_order(index, begun.available - 1);
        let core = &self.core;
        let (t, s0) = (core.vp(index + 1), core.vp(index));
        let h = t.lambda() - s0.lambda();
        let phi = Phi::new(core.algorithm, t, s0, h);
        let weights = match order {
            1 => OutputWeights::one(phi.d0),
            2 => {
                let r0 = (s0.lambda() - core.vp(index - 1).lambda()) / h;
                // D0 = m0, D1 = (m0 - m1) / r0.
                let c = phi.d1(core.heun);
                OutputWeights::two(phi.d0 + c / r0, -c / r0)
            }
            _ => {
                let (s1, s2) = (core.vp(index - 1), core.vp(index - 2));
                let r0 = (s0.lambda() - s1.lambda()) / h;
                let r1 = (s1.lambda() - s2.lambda()) / h;
                // D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0+r1), with
                // D1_0 = (m0 - m1)/r0 and D1_1 = (m1 - m2)/r1: a D1_0 + b D1_1 in all.
                let (c1, c2) = (phi.d1_heun, phi.d2);
                let k = r0 / (r0 + r1);
                let a = c1 * (1.0 + k) + c2 / (r0 + r1);
                let b = -c1 * k - c2 / (r0 + r1);
                OutputWeights::three(phi.d0 + a / r0, -a / r0 + b / r1, -b / r1)
            }
        };
        core.combine(prev_sample, sample, phi.sample, &weights, phi.noise)?;
        self.core.commit(begun);
        Ok(())
    }

    fn reset(&mut self) {
        self.core.reset();
    }
}

// ------------------------------------------------------------------------------------------
// The pieces both DPM-Solver samplers share.
// ------------------------------------------------------------------------------------------

/// Which diffusers class a [`DpmCore`] follows: they read different config keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// `DPMSolverMultistepScheduler`: reads `timestep_spacing`, `steps_offset`,
    /// `rescale_betas_zero_snr`, `use_lu_lambdas`, has `sde-dpmsolver`, and does not round
    /// the Karras / lambda-uniform timesteps of `squaredcos_cap_v2`.
    Multistep,
    /// `DPMSolverSinglestepScheduler`: linspace-like spacing without offset, no zero-SNR
    /// rescaling, no lambda-uniform steps, no `sde-dpmsolver`.
    Singlestep,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::Multistep => DpmSolverMultistep::CLASS_NAME,
            Class::Singlestep => crate::dpm_solver_singlestep::DpmSolverSinglestep::CLASS_NAME,
        }
    }
}

/// The solver algorithm, after diffusers' mapping of `"deis"` to DPM-Solver++.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Algorithm {
    /// Noise prediction, deterministic.
    DpmSolver,
    /// Data prediction, deterministic.
    DpmSolverPlusPlus,
    /// Noise prediction, stochastic.
    SdeDpmSolver,
    /// Data prediction, stochastic.
    SdeDpmSolverPlusPlus,
}

impl Algorithm {
    /// Whether the solver integrates the data prediction (x0) rather than the noise.
    pub(crate) fn predicts_data(self) -> bool {
        matches!(
            self,
            Algorithm::DpmSolverPlusPlus | Algorithm::SdeDpmSolverPlusPlus
        )
    }

    /// Whether each step draws noise.
    pub(crate) fn is_stochastic(self) -> bool {
        matches!(
            self,
            Algorithm::SdeDpmSolver | Algorithm::SdeDpmSolverPlusPlus
        )
    }
}

/// The coefficients of one update from a base noise level `s` to `t` with
/// `h = lambda_t - lambda_s` (see the module documentation's table): `x_t = sample x_s +
/// d0 D0 + d1 D1 + d2 D2 + noise z`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Phi {
    /// The weight of the base sample.
    pub(crate) sample: f64,
    /// The weight of `D0`.
    pub(crate) d0: f64,
    /// The weight of `D1` in the second-order midpoint update.
    pub(crate) d1_midpoint: f64,
    /// The weight of `D1` in the second-order Heun update and the third-order updates.
    pub(crate) d1_heun: f64,
    /// The weight of `D2` (third order; NaN for `sde-dpmsolver`, which has none).
    pub(crate) d2: f64,
    /// The weight of the noise (0 for the deterministic algorithms).
    pub(crate) noise: f64,
}

impl Phi {
    /// The coefficients of `algorithm` from `base` to `target` (diffusers'
    /// `dpm_solver_first_order_update` and the higher-order updates). `h` is infinite when
    /// `target` is the noise level 0, which only the data-prediction algorithms reach.
    pub(crate) fn new(
        algorithm: Algorithm,
        target: VpCoefficients,
        base: VpCoefficients,
        h: f64,
    ) -> Self {
        let (alpha_t, sigma_t) = (target.alpha_t, target.sigma_t);
        match algorithm {
            Algorithm::DpmSolverPlusPlus => {
                let em1 = (-h).exp_m1(); // e^-h - 1
                Phi {
                    sample: sigma_t / base.sigma_t,
                    d0: -alpha_t * em1,
                    d1_midpoint: -0.5 * alpha_t * em1,
                    d1_heun: alpha_t * (em1 / h + 1.0),
                    d2: -alpha_t * ((em1 + h) / (h * h) - 0.5),
                    noise: 0.0,
                }
            }
            Algorithm::DpmSolver => {
                let ep1 = h.exp_m1(); // e^h - 1
                Phi {
                    sample: alpha_t / base.alpha_t,
                    d0: -sigma_t * ep1,
                    d1_midpoint: -0.5 * sigma_t * ep1,
                    d1_heun: -sigma_t * (ep1 / h - 1.0),
                    d2: -sigma_t * ((ep1 - h) / (h * h) - 0.5),
                    noise: 0.0,
                }
            }
            Algorithm::SdeDpmSolverPlusPlus => {
                let one_m = -(-2.0 * h).exp_m1(); // 1 - e^-2h
                Phi {
                    sample: sigma_t / base.sigma_t * (-h).exp(),
                    d0: alpha_t * one_m,
                    d1_midpoint: 0.5 * alpha_t * one_m,
                    d1_heun: alpha_t * (one_m / (-2.0 * h) + 1.0),
                    d2: alpha_t * ((one_m - 2.0 * h) / (4.0 * h * h) - 0.5),
                    noise: sigma_t * one_m.sqrt(),
                }
            }
            Algorithm::SdeDpmSolver => {
                let ep1 = h.exp_m1();
                Phi {
                    sample: alpha_t / base.alpha_t,
                    d0: -2.0 * sigma_t * ep1,
                    d1_midpoint: -sigma_t * ep1,
                    d1_heun: -2.0 * sigma_t * (ep1 / h - 1.0),
                    d2: f64::NAN,
                    noise: sigma_t * (2.0 * h).exp_m1().sqrt(),
                }
            }
        }
    }

    /// The weight of `D1` in the second-order update of `solver_type` (Heun or midpoint).
    pub(crate) fn d1(&self, heun: bool) -> f64 {
        if heun { self.d1_heun } else { self.d1_midpoint }
    }
}

/// The weights of the converted model outputs in an update, newest first (`m0`, `m1`, `m2`),
/// with the `D` differences folded in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct OutputWeights {
    weights: [f64; 3],
    order: usize,
}

impl OutputWeights {
    /// `w0 m0`.
    pub(crate) fn one(w0: f64) -> Self {
        OutputWeights {
            weights: [w0, 0.0, 0.0],
            order: 1,
        }
    }

    /// `w0 m0 + w1 m1`.
    pub(crate) fn two(w0: f64, w1: f64) -> Self {
        OutputWeights {
            weights: [w0, w1, 0.0],
            order: 2,
        }
    }

    /// `w0 m0 + w1 m1 + w2 m2`.
    pub(crate) fn three(w0: f64, w1: f64, w2: f64) -> Self {
        OutputWeights {
            weights: [w0, w1, w2],
            order: 3,
        }
    }
}

/// What [`DpmCore::begin`] leaves for the update and [`DpmCore::commit`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Begun {
    run: RunOrder,
    /// How many converted outputs of this run the update may use, this step's included
    /// (at most 3).
    pub(crate) available: usize,
}

/// The state and settings both DPM-Solver samplers share: the schedule, the conversion of
/// the model output, the history of converted outputs and the scratch buffers.
#[derive(Debug, Clone)]
pub(crate) struct DpmCore {
    pub(crate) algorithm: Algorithm,
    /// `solver_type = "heun"` (else midpoint).
    pub(crate) heun: bool,
    prediction_type: PredictionType,
    threshold: Option<ThresholdConfig>,
    learned_variance: bool,
    batch_size: usize,
    /// One per step, integer-valued.
    pub(crate) timesteps: Vec<f64>,
    /// One per step plus the final one, float32-rounded.
    pub(crate) sigmas: Vec<f64>,
    run: RunOrder,
    /// The converted outputs of earlier steps of this run, newest first.
    history: [Vec<f32>; 3],
    /// How many entries of `history` belong to this run.
    count: usize,
    /// This step's converted output, moved into `history` by `commit`.
    current: Vec<f32>,
    noise: Vec<f32>,
    mean: Vec<f32>,
}

impl DpmCore {
    /// Reads the keys `class` knows from `config` with the class defaults, and builds the
    /// schedule of `plan`.
    pub(crate) fn new(
        class: Class,
        config: &SchedulerConfig,
        plan: &Plan,
        solver_order: usize,
    ) -> Result<Self> {
        let sampler = class.name();
        let invalid = |key: &'static str, value: String, reason: &'static str| {
            Err(Error::InvalidConfig {
                sampler,
                key,
                value,
                reason,
            })
        };
        let mut base = BaseConfig::diffusers_default(TimestepSpacing::Linspace).resolve(config);
        if class == Class::Singlestep {
            // Not keys of the single-step class: from_config drops them.
            base.timestep_spacing = TimestepSpacing::Linspace;
            base.steps_offset = 0;
            base.rescale_betas_zero_snr = false;
        }
        base.require_schedule(
            sampler,
            &[
                BetaScheduleName::Linear,
                BetaScheduleName::ScaledLinear,
                BetaScheduleName::SquaredcosCapV2,
            ],
        )?;
        let sigma_config = SigmaConfig::resolve(config, sampler)?;
        if !(1..=3).contains(&solver_order) {
            return invalid(
                "solver_order",
                solver_order.to_string(),
                "must be 1, 2 or 3",
            );
        }
        let algorithm_type = config
            .algorithm_type
            .unwrap_or(AlgorithmType::DpmSolverPlusPlus);
        let algorithm = match algorithm_type {
            AlgorithmType::DpmSolver => Algorithm::DpmSolver,
            AlgorithmType::DpmSolverPlusPlus | AlgorithmType::Deis => Algorithm::DpmSolverPlusPlus,
            AlgorithmType::SdeDpmSolverPlusPlus => Algorithm::SdeDpmSolverPlusPlus,
            AlgorithmType::SdeDpmSolver if class == Class::Multistep => Algorithm::SdeDpmSolver,
            other => {
                return invalid(
                    "algorithm_type",
                    format!("{other:?}"),
                    "not implemented by this class",
                );
            }
        };
        if algorithm == Algorithm::SdeDpmSolver && solver_order == 3 {
            return invalid(
                "solver_order",
                "3".into(),
                "sde-dpmsolver has no third-order update (diffusers fails at its first one)",
            );
        }
        // diffusers checks the name before mapping "deis" to dpmsolver++.
        let named_data_prediction = matches!(
            algorithm_type,
            AlgorithmType::DpmSolverPlusPlus | AlgorithmType::SdeDpmSolverPlusPlus
        );
        if !named_data_prediction && sigma_config.final_sigmas_type == FinalSigmasType::Zero {
            return invalid(
                "final_sigmas_type",
                "zero".into(),
                "not supported for this algorithm_type; use sigma_min",
            );
        }
        let heun = match config.solver_type.unwrap_or(SolverType::Midpoint) {
            SolverType::Heun => true,
            // diffusers maps DEIS's and UniPC's solver types to midpoint.
            SolverType::Midpoint | SolverType::Logrho | SolverType::Bh1 | SolverType::Bh2 => false,
        };
        let learned_variance = config.variance_type.is_some_and(|v| v.is_learned());
        if learned_variance && base.prediction_type != PredictionType::Epsilon {
            return invalid(
                "variance_type",
                format!("{:?}", config.variance_type),
                "a learned variance is split off only with epsilon prediction",
            );
        }
        let mut threshold = ThresholdConfig::resolve(config, false);
        // Not a key of the DPM-Solver classes.
        threshold.clip_sample = false;
        if plan.batch_size == 0 {
            return invalid("batch_size", "0".into(), "must be at least 1");
        }

        let schedule = base.noise_schedule()?;
        let alphas_cumprod = k_alphas_cumprod(&schedule, base.rescale_betas_zero_snr);
        let use_lu = class == Class::Multistep && config.use_lu_lambdas.unwrap_or(false);
        let round_ramp =
            class == Class::Singlestep || base.beta_schedule != BetaScheduleName::SquaredcosCapV2;
        let (timesteps, sigmas) = dpm_schedule(
            sampler,
            &alphas_cumprod,
            &base,
            &sigma_config,
            use_lu,
            round_ramp,
            config.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY),
            &plan.steps,
        )?;
        Ok(DpmCore {
            algorithm,
            heun,
            prediction_type: base.prediction_type,
            threshold: threshold.thresholding.then_some(threshold),
            learned_variance,
            batch_size: plan.batch_size,
            timesteps,
            sigmas,
            run: RunOrder::default(),
            history: Default::default(),
            count: 0,
            current: Vec::new(),
            noise: Vec::new(),
            mean: Vec::new(),
        })
    }

    /// The VP coefficients of noise level `i` (`sigmas[i]`).
    pub(crate) fn vp(&self, i: usize) -> VpCoefficients {
        VpCoefficients::from_sigma(self.sigmas[i])
    }

    /// `out = alpha_i original + sigma_i noise` (diffusers' `add_noise`); `index` is checked
    /// by the caller.
    pub(crate) fn add_noise(
        &self,
        original: &[f32],
        noise: &[f32],
        index: usize,
        out: &mut [f32],
    ) -> Result<()> {
        check_len("noise", original.len(), noise.len())?;
        let vp = self.vp(index);
        Ok(sd_core::ops::lincomb2(
            out, vp.alpha_t, original, vp.sigma_t, noise,
        )?)
    }

    /// The first half of a step: checks the slices and the order of the steps, draws the
    /// noise of a stochastic step and converts the model output (diffusers'
    /// `convert_model_output`) into this step's history entry, writing the predicted x0.
    /// Nothing of the sampler's state changes until [`DpmCore::commit`].
    pub(crate) fn begin(
        &mut self,
        index: usize,
        model_output: &[f32],
        sample: &[f32],
        noise: &mut dyn NoiseSource,
        prev_sample: &mut [f32],
        pred_original_sample: &mut [f32],
    ) -> Result<Begun> {
        let len = sample.len();
        let factor = if self.learned_variance { 2 } else { 1 };
        check_len("model_output", factor * len, model_output.len())?;
        check_len("prev_sample", len, prev_sample.len())?;
        check_len("pred_original_sample", len, pred_original_sample.len())?;
        let per_sample = self.learned_variance || self.threshold.is_some();
        if per_sample && !len.is_multiple_of(self.batch_size) {
            return Err(Error::LengthMismatch {
                what: "sample (a whole number of samples of the plan's batch size)",
                expected: len / self.batch_size * self.batch_size,
                found: len,
            });
        }
        let mut run = self.run;
        let previous = if run.is_first() { 0 } else { self.count };
        run.advance(index)?;

        if self.algorithm.is_stochastic() {
            self.noise.resize(len, 0.0);
            noise.fill(&mut self.noise)?;
        }
        let mean = if self.learned_variance {
            // Each sample's output is [mean channels, variance channels].
            let per = len / self.batch_size;
            self.mean.clear();
            for chunk in model_output.chunks_exact(2 * per) {
                self.mean.extend_from_slice(&chunk[..per]);
            }
            &self.mean[..]
        } else {
            model_output
        };

        let sigma = self.sigmas[index];
        let vp = VpCoefficients::from_sigma(sigma);
        let alpha_bar = alpha_bar_from_sigma(sigma);
        self.current.resize(len, 0.0);
        let x0 = pred_original_sample;
        if self.algorithm.predicts_data() {
            self.prediction_type.x0_coefficients(alpha_bar).apply(
                mean,
                sample,
                &mut self.current,
            )?;
            if let Some(threshold) = &self.threshold {
                postprocess_x0(&mut self.current, threshold, self.batch_size)?;
            }
            x0.copy_from_slice(&self.current);
        } else {
            let eps = &mut self.current;
            self.prediction_type
                .eps_coefficients(alpha_bar)
                .apply(mean, sample, eps)?;
            // x0 = (x - sigma eps) / alpha
            sd_core::ops::lincomb2(x0, 1.0 / vp.alpha_t, sample, -vp.sigma_t / vp.alpha_t, eps)?;
            if let Some(threshold) = &self.threshold {
                postprocess_x0(x0, threshold, self.batch_size)?;
                // eps = (x - alpha x0) / sigma
                sd_core::ops::lincomb2(
                    eps,
                    1.0 / vp.sigma_t,
                    sample,
                    -vp.alpha_t / vp.sigma_t,
                    x0,
                )?;
            }
        }
        Ok(Begun {
            run,
            available: (previous + 1).min(3),
        })
    }

    /// `out = sample_weight base + sum_k weights_k m_k + noise_weight z`, with `m0` this
    /// step's converted output, `m1`, `m2` the earlier ones, and `z` this step's noise.
    pub(crate) fn combine(
        &self,
        out: &mut [f32],
        base: &[f32],
        sample_weight: f64,
        weights: &OutputWeights,
        noise_weight: f64,
    ) -> Result<()> {
        let mut w = [0.0; 5];
        let mut terms: [&[f32]; 5] = [base; 5];
        w[0] = sample_weight;
        let outputs: [&[f32]; 3] = [&self.current, &self.history[0], &self.history[1]];
        let mut n = weights.order + 1;
        w[1..n].copy_from_slice(&weights.weights[..weights.order]);
        terms[1..n].copy_from_slice(&outputs[..weights.order]);
        if self.algorithm.is_stochastic() {
            w[n] = noise_weight;
            terms[n] = &self.noise;
            n += 1;
        }
        Ok(sd_core::ops::lincomb(out, &w[..n], &terms[..n])?)
    }

    /// The second half of a step: this step's output joins the history and the run
    /// advances.
    pub(crate) fn commit(&mut self, begun: Begun) {
        self.history.rotate_right(1);
        std::mem::swap(&mut self.history[0], &mut self.current);
        self.count = begun.available;
        self.run = begun.run;
    }

    /// Forgets the run in progress.
    pub(crate) fn reset(&mut self) {
        self.run.reset();
        self.count = 0;
    }
}

/// Rounds a fractional timestep as numpy's `round` (ties to even) or truncates it as
/// `astype(int64)` does.
fn to_timestep(t: f64, round: bool) -> f64 {
    if round {
        t.round_ties_even()
    } else {
        t.trunc()
    }
}

/// The timesteps and noise levels (float32-rounded, with the final one) of diffusers'
/// DPM-Solver `set_timesteps`; see the module documentation.
#[allow(clippy::too_many_arguments)]
fn dpm_schedule(
    sampler: &'static str,
    alphas_cumprod: &[f64],
    base: &BaseConfig,
    sigma_config: &SigmaConfig,
    use_lu: bool,
    round_ramp: bool,
    lambda_min_clipped: f64,
    steps: &Steps,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let t_len = alphas_cumprod.len();
    let train_sigmas: Vec<f64> = alphas_cumprod
        .iter()
        .map(|&a| sigma_from_alpha_bar(a))
        .collect();
    let log_sigmas: Vec<f64> = train_sigmas.iter().map(|s| s.ln()).collect();
    let ramp = sigma_config.use_karras_sigmas || use_lu || sigma_config.use_exponential_sigmas;
    let (timesteps, n): (Vec<f64>, usize) = match steps {
        Steps::Count(n) => {
            // Skip the timesteps whose lambda lies below lambda_min_clipped (the last ones).
            let clipped = train_sigmas
                .iter()
                .filter(|&&s| VpCoefficients::from_sigma(s).lambda() < lambda_min_clipped)
                .count();
            let timesteps = base.timestep_spacing.multistep_timesteps(
                t_len,
                *n,
                base.steps_offset,
                t_len - clipped,
            )?;
            (timesteps.into_iter().map(|t| t as f64).collect(), *n)
        }
        Steps::Timesteps(ts) => {
            if ramp {
                let key = if sigma_config.use_karras_sigmas {
                    "use_karras_sigmas"
                } else if use_lu {
                    "use_lu_lambdas"
                } else {
                    "use_exponential_sigmas"
                };
                return Err(Error::InvalidConfig {
                    sampler,
                    key,
                    value: "true".into(),
                    reason: "custom timesteps cannot be combined with a sigma ramp",
                });
            }
            if ts.is_empty() {
                return Err(Error::InvalidConfig {
                    sampler,
                    key: "timesteps",
                    value: "[]".into(),
                    reason: "needs at least one timestep",
                });
            }
            (ts.iter().map(|&t| t as f64).collect(), ts.len())
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
    let (sigma_lo, sigma_hi) = (
        f32_round(train_sigmas[0]),
        f32_round(train_sigmas[t_len - 1]),
    );
    let range = (
        sigma_config.sigma_min.unwrap_or(sigma_lo),
        sigma_config.sigma_max.unwrap_or(sigma_hi),
    );
    // diffusers' precedence: Karras, then lambda-uniform, then exponential.
    let ramp = if sigma_config.use_karras_sigmas {
        Some((karras_sigmas(range.0, range.1, n, KARRAS_RHO)?, round_ramp))
    } else if use_lu {
        Some((exponential_sigmas(sigma_lo, sigma_hi, n)?, round_ramp))
    } else if sigma_config.use_exponential_sigmas {
        Some((exponential_sigmas(range.0, range.1, n)?, false))
    } else {
        None
    };
    let (timesteps, mut sigmas) = match ramp {
        Some((sigmas, round)) => {
            let timesteps = sigmas
                .iter()
                .map(|&s| Ok(to_timestep(sigma_to_t(s, &log_sigmas)?, round)))
                .collect::<Result<Vec<_>>>()?;
            (timesteps, sigmas)
        }
        None => {
            let sigmas = timesteps
                .iter()
                .map(|&t| interp_linear(&train_sigmas, t))
                .collect::<sd_core::Result<Vec<_>>>()?;
            (timesteps, sigmas)
        }
    };
    sigmas.push(match sigma_config.final_sigmas_type {
        FinalSigmasType::Zero => 0.0,
        FinalSigmasType::SigmaMin => train_sigmas[0],
    });
    sigmas.iter_mut().for_each(|s| *s = f32_round(*s));
    Ok((timesteps, sigmas))
}

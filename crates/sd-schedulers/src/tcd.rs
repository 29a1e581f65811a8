//! Strategic stochastic sampling of a trajectory consistency model (Zheng et al., 2024,
//! "Trajectory Consistency Distillation", sec. 4.4 and Algorithm 4), as diffusers'
//! `TCDScheduler`. With `gamma` (diffusers' `eta` step argument) and `prev` the next timestep
//! of the schedule (0 after the last):
//!
//! ```text
//! x0     = prediction_type.to_x0(model_output, x_t),  eps = prediction_type.to_eps(model_output, x_t)
//! s      = floor((1 - gamma) prev)
//! x_s    = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps                      (diffusers' pred_noised_sample)
//! x_prev = sqrt(abar_prev / abar_s) x_s + sqrt(1 - abar_prev / abar_s) z,   z ~ N(0, I)
//! ```
//!
//! `gamma = 0` is deterministic (`x_prev = x_s`, `s = prev`); the last step, and every step
//! with `gamma = 0`, returns `x_s` and draws no noise. As in diffusers, the last step maps to
//! `s = 0`, not to the clean sample: its output keeps `sqrt(1 - abar_0)` of the noise
//! estimate. `(1 - gamma) prev` is evaluated in float32 before the floor, as diffusers does.
//! [`StepOutput::pred_original_sample`](crate::StepOutput) holds `x0` (diffusers returns
//! `x_s` instead and no clean estimate).
//!
//! # Timesteps
//!
//! As [`Lcm`](crate::lcm::Lcm)'s (the distillation timesteps of `original_inference_steps`, `n`
//! of them picked), with the same `strength` option. One quirk of diffusers is kept: an
//! `original_inference_steps` passed to `set_timesteps` ([`TcdOptions`]) is only checked
//! against the step count, and the candidates become every training timestep below
//! `T strength`.
//!
//! # Ignored keys
//!
//! TCD's `step` neither clips nor thresholds x0 and has no boundary-condition scalings:
//! `clip_sample`, `thresholding`, `timestep_scaling`, `set_alpha_to_one`, `timestep_spacing` and
//! `steps_offset` are accepted and have no effect, as in diffusers.

use sd_core::{NoiseSchedule, PredictionType};

use crate::config::{BetaScheduleName, SchedulerConfig};
use crate::error::{Error, Result, check_len};
use crate::lcm::{check_strength, consistency_base, consistency_timesteps, distillation_timesteps};
use crate::noise::NoiseSource;
use crate::sampler::{Plan, RunOrder, Sampler, check_step_slices};

/// The options of TCD: the `eta` diffusers passes to `step` and the arguments of its
/// `set_timesteps` beyond the step count.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct TcdOptions {
    /// The paper's `gamma` in [0, 1] (diffusers' `eta`): how far back each step jumps before
    /// noise is added again (0: deterministic). diffusers' default is 0.3.
    pub eta: f64,
    /// Image-to-image strength in (0, 1], as [`LcmOptions::strength`](crate::lcm::LcmOptions).
    pub strength: f64,
    /// `set_timesteps`'s `original_inference_steps` (see the module documentation: it does
    /// not act as the config key does).
    pub original_inference_steps: Option<usize>,
}

impl Default for TcdOptions {
    fn default() -> Self {
        TcdOptions {
            eta: 0.3,
            strength: 1.0,
            original_inference_steps: None,
        }
    }
}

impl TcdOptions {
    /// Options with the given `eta` (gamma).
    pub fn eta(eta: f64) -> Self {
        TcdOptions {
            eta,
            ..Default::default()
        }
    }
}

/// The TCD sampler; see the module documentation.
#[derive(Debug, Clone)]
pub struct Tcd {
    schedule: NoiseSchedule,
    prediction_type: PredictionType,
    train_timesteps: Vec<usize>,
    timesteps: Vec<f64>,
    num_inference_steps: usize,
    options: TcdOptions,
    run: RunOrder,
    noise: Vec<f32>,
}

impl Tcd {
    /// diffusers' class name.
    pub const CLASS_NAME: &'static str = "TCDScheduler";

    /// Builds the sampler from a scheduler config (any class's) and a plan (a step count or
    /// custom timesteps), with `eta = 0.3`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for custom sigmas, step counts or timesteps diffusers
    /// rejects, or a schedule TCD does not implement; [`Error::Core`] for impossible step
    /// counts.
    pub fn new(config: &SchedulerConfig, plan: impl Into<Plan>) -> Result<Self> {
        Self::with_options(config, plan, TcdOptions::default())
    }

    /// As [`Tcd::new`], with options.
    ///
    /// # Errors
    /// As [`Tcd::new`]; [`Error::InvalidConfig`] for `eta` outside [0, 1] (diffusers
    /// asserts) or a strength that leaves no step, [`Error::Strength`] for a strength outside
    /// [0, 1].
    pub fn with_options(
        config: &SchedulerConfig,
        plan: impl Into<Plan>,
        options: TcdOptions,
    ) -> Result<Self> {
        let plan = plan.into();
        let base = consistency_base(config);
        base.require_schedule(
            Self::CLASS_NAME,
            &[
                BetaScheduleName::Linear,
                BetaScheduleName::ScaledLinear,
                BetaScheduleName::SquaredcosCapV2,
            ],
        )?;
        if !(0.0..=1.0).contains(&options.eta) {
            return Err(Error::InvalidConfig {
                sampler: Self::CLASS_NAME,
                key: "eta",
                value: options.eta.to_string(),
                reason: "gamma must lie in [0, 1]",
            });
        }
        check_strength(options.strength)?;
        let schedule = base.noise_schedule()?;
        let t = base.num_train_timesteps;
        let (original_steps, origin) = match options.original_inference_steps {
            // diffusers: every training timestep below T * strength.
            Some(steps) => (steps, (0..(t as f64 * options.strength) as usize).collect()),
            None => {
                let steps = config.original_inference_steps.unwrap_or(50);
                (
                    steps,
                    distillation_timesteps(Self::CLASS_NAME, t, steps, options.strength)?,
                )
            }
        };
        let (train_timesteps, num_inference_steps) = consistency_timesteps(
            Self::CLASS_NAME,
            t,
            original_steps,
            &origin,
            options.strength,
            &plan.steps,
        )?;
        for &ts in &train_timesteps {
            schedule.alpha_bar(ts)?;
        }
        Ok(Tcd {
            schedule,
            prediction_type: base.prediction_type,
            timesteps: train_timesteps.iter().map(|&v| v as f64).collect(),
            train_timesteps,
            num_inference_steps,
            options,
            run: RunOrder::default(),
            noise: Vec::new(),
        })
    }

    /// The training timesteps, largest first.
    pub fn train_timesteps(&self) -> &[usize] {
        &self.train_timesteps
    }

    /// The options in use.
    pub fn options(&self) -> TcdOptions {
        self.options
    }

    /// The intermediate timestep `s = floor((1 - gamma) prev)`, evaluated in float32 as
    /// diffusers does.
    fn intermediate_timestep(&self, prev: usize) -> usize {
        let s = ((1.0 - self.options.eta) as f32 * prev as f32).floor();
        // s lies in [0, prev]; the clamp only guards against float32 rounding.
        (s.max(0.0) as usize).min(prev)
    }
}

impl Sampler for Tcd {
    fn class_name(&self) -> &'static str {
        Self::CLASS_NAME
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
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
        Ok(self
            .schedule
            .add_noise(original, noise, self.train_timesteps[index], out)?)
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

        let t = self.train_timesteps[index];
        let prev = self.train_timesteps.get(index + 1).copied().unwrap_or(0);
        let s = self.intermediate_timestep(prev);
        let abar_t = self.schedule.alpha_bar(t)?;
        let abar_prev = self.schedule.alpha_bar(prev)?;
        let abar_s = self.schedule.alpha_bar(s)?;

        self.prediction_type.x0_coefficients(abar_t).apply(
            model_output,
            sample,
            pred_original_sample,
        )?;
        // x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps, eps itself linear in (output, x_t).
        let to_eps = self.prediction_type.eps_coefficients(abar_t);
        let (signal, noise_level) = (abar_s.sqrt(), (1.0 - abar_s).sqrt());
        sd_core::ops::lincomb3(
            prev_sample,
            signal,
            pred_original_sample,
            noise_level * to_eps.model,
            model_output,
            noise_level * to_eps.sample,
            sample,
        )?;

        if self.options.eta > 0.0 && index + 1 != self.num_inference_steps {
            self.noise.resize(sample.len(), 0.0);
            noise.fill(&mut self.noise)?;
            let ratio = abar_prev / abar_s;
            sd_core::ops::lincomb2_in_place(
                prev_sample,
                ratio.sqrt(),
                (1.0 - ratio).sqrt(),
                &self.noise,
            )?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.run.reset();
    }
}

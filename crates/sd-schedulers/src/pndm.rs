//! Pseudo numerical methods for diffusion models (Liu et al., 2022, "Pseudo Numerical Methods
//! for Diffusion Models on Manifolds", PNDM), as diffusers' `PNDMScheduler`: PLMS (the linear
//! multistep method, Stable Diffusion 1.x's default with `skip_prk_steps`) and, without
//! `skip_prk_steps`, its Runge-Kutta (PRK) warm-up.
//!
//! Every update is the paper's transfer function `phi` (eq. 11), the deterministic DDIM step
//! from `t` to `prev` for a noise estimate `e`:
//!
//! ```text
//! phi(x, e, t, prev) = sqrt(abar_prev / abar_t) x
//!                    - (abar_prev - abar_t) e / (abar_t sqrt(1 - abar_prev) + sqrt(abar_t (1 - abar_t) abar_prev))
//! ```
//!
//! with `abar_prev` the final alpha-bar (1 with `set_alpha_to_one`, else `abar_0`) for
//! `prev < 0`, and `e` converted from a velocity first (`e = sqrt(abar_t) v + sqrt(1 - abar_t) x`)
//! for v-prediction. `e` combines the model outputs of the run so far (`r = T / n`, integer
//! division; `e` is this step's model output, `e_1, e_2, ...` the stored ones, newest first):
//!
//! | step of the run, model evaluated at `t` | noise estimate | update |
//! |---|---|---|
//! | PLMS 0 | `e` (stored) | `phi(x_t, e, t, t - r)` |
//! | PLMS 1, `t` the repeated timestep | `(e + e_1) / 2` (not stored) | `phi(x_0', ., t + r, t)` from PLMS 0's sample `x_0'` (Heun's method) |
//! | PLMS 2, 3, 4+ (`e` stored first) | `(3e_1 - e_2)/2`, `(23e_1 - 16e_2 + 5e_3)/12`, `(55e_1 - 59e_2 + 37e_3 - 9e_4)/24` | `phi(x_t, ., t, t - r)` |
//! | PRK stage `k` of 4 (`k = 1` stores `e`) | `e` for `k < 4`, `(e_a + 2e_b + 2e_c + e)/6` for `k = 4` | `phi(x_s, ., s, t - h)` for odd `k`, `phi(x_s, ., s, t)` for even `k` |
//!
//! In the PRK rows, RK4 (classical Runge-Kutta) on `phi`: `s` and `x_s` are the timestep and
//! sample of the step's first stage, `h = r / 2` (integer division) and `e_a, e_b, e_c` the
//! outputs of the first three stages; the model sees the stages at `s`, the midpoint twice,
//! and the next timestep. The PRK warm-up takes the three largest steps (12 model
//! evaluations), then PLMS continues with the stored outputs (the first stage's of each PRK
//! step). [`Sampler::timesteps`] lists every evaluation, repeats included, exactly as
//! diffusers' `scheduler.timesteps`: `[t_{n-1}, t_{n-2}, t_{n-2}, t_{n-3}, ..., t_0]` with
//! `skip_prk_steps`, `[t_{n-1}, t_{n-2} + h, t_{n-2} + h, t_{n-2}, t_{n-2}, ..., t_{n-4}]`
//! then `t_{n-4}, ..., t_0` without.
//!
//! # Quirks reproduced from diffusers
//!
//! - The targets `t - r` and `t - h` are computed from the timestep whatever the spacing:
//!   with `linspace` or `trailing` spacing they need not be timesteps of the list, and PLMS 1
//!   steps from `t_{n-2} + r`, not from `t_{n-1}`.
//! - The stage of the method is set by the number of steps taken in the run, not by the
//!   index: a run started mid-schedule (image-to-image) starts with PLMS 0 (or the first PRK
//!   stage) there, as diffusers' counter does. During the PRK warm-up diffusers then still
//!   takes `s` from the start of the PRK list whatever the index, which makes a PRK run
//!   started mid-schedule meaningless; it is reproduced all the same (a fixture checks it).
//!   Start PRK runs at 0.
//! - PNDM does not know `rescale_betas_zero_snr`, `clip_sample` or `thresholding`: diffusers'
//!   `from_config` drops them, and so does this sampler.
//!
//! # The predicted x0
//!
//! diffusers returns no `pred_original_sample` for PNDM. Since `phi` is the DDIM step, every
//! update equals `x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) e` with
//! `x0 = (x - sqrt(1 - abar_t) e) / sqrt(abar_t)` (for the same `x`, `e`, `t`): that `x0`,
//! the clean sample the combined noise estimate points to, is what
//! [`StepOutput::pred_original_sample`](crate::StepOutput) holds.

use sd_core::{NoiseSchedule, PredictionType, TimestepSpacing};

use crate::config::{BaseConfig, BetaScheduleName, SchedulerConfig};
use crate::error::{Error, Result, check_len};
use crate::noise::NoiseSource;
use crate::sampler::{Plan, RunOrder, Sampler, Steps, check_step_slices};

/// The number of model evaluations of the PRK warm-up (three Runge-Kutta steps of four).
const PRK_EVALUATIONS: usize = 12;

/// The PNDM sampler; see the module documentation.
#[derive(Debug, Clone)]
pub struct Pndm {
    schedule: NoiseSchedule,
    prediction_type: PredictionType,
    final_alpha_cumprod: f64,
    skip_prk_steps: bool,
    train_timesteps: Vec<usize>,
    timesteps: Vec<f64>,
    prk_len: usize,
    step_ratio: usize,
    num_inference_steps: usize,
    run: RunOrder,
    /// Steps taken in this run (diffusers' `counter`).
    counter: usize,
    /// The stored model outputs, oldest first; the first `ets_len` are in use.
    ets: [Vec<f32>; 4],
    ets_len: usize,
    /// The weighted sum of the PRK stages so far.
    cur_model_output: Vec<f32>,
    /// The sample the current PRK step (or PLMS steps 0 and 1) starts from.
    cur_sample: Vec<f32>,
    /// The combined noise estimate of the step.
    eps: Vec<f32>,
}

impl Pndm {
    /// diffusers' class name.
    pub const CLASS_NAME: &'static str = "PNDMScheduler";

    /// Builds the sampler from a scheduler config (any class's) and a step count.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for custom timesteps or sigmas, `prediction_type = "sample"`
    /// (diffusers raises at the first step), a schedule PNDM does not implement, or fewer than
    /// 4 steps with the PRK warm-up (whose schedule in diffusers then ends before the clean
    /// sample); [`Error::Core`] for impossible step counts.
    pub fn new(config: &SchedulerConfig, plan: impl Into<Plan>) -> Result<Self> {
        let plan = plan.into();
        let mut base = BaseConfig::diffusers_default(TimestepSpacing::Leading).resolve(config);
        // PNDMScheduler has no such key; from_config drops it.
        base.rescale_betas_zero_snr = false;
        base.require_schedule(
            Self::CLASS_NAME,
            &[
                BetaScheduleName::Linear,
                BetaScheduleName::ScaledLinear,
                BetaScheduleName::SquaredcosCapV2,
            ],
        )?;
        if base.prediction_type == PredictionType::Sample {
            return Err(Error::InvalidConfig {
                sampler: Self::CLASS_NAME,
                key: "prediction_type",
                value: "sample".into(),
                reason: "PNDM supports epsilon and v_prediction",
            });
        }
        let Steps::Count(n) = plan.steps else {
            return Err(Error::InvalidConfig {
                sampler: Self::CLASS_NAME,
                key: "steps",
                value: "custom".into(),
                reason: "PNDM takes a step count",
            });
        };
        let skip_prk_steps = config.skip_prk_steps.unwrap_or(false);
        let schedule = base.noise_schedule()?;
        let t = base.num_train_timesteps;
        // Largest first.
        let spaced = base.timestep_spacing.timesteps(t, n, base.steps_offset)?;
        let step_ratio = t / n;
        let (train_timesteps, prk_len) = if skip_prk_steps {
            // [t_{n-1}, t_{n-2}, t_{n-2}, t_{n-3}, ..., t_0].
            let mut ts = Vec::with_capacity(n + 1);
            ts.push(spaced[0]);
            if let Some(&second) = spaced.get(1) {
                ts.push(second);
            }
            ts.extend_from_slice(&spaced[1..]);
            (ts, 0)
        } else {
            if n < 4 {
                return Err(Error::InvalidConfig {
                    sampler: Self::CLASS_NAME,
                    key: "skip_prk_steps",
                    value: format!("false with {n} steps"),
                    reason: "the Runge-Kutta warm-up needs at least 4 steps",
                });
            }
            // The four largest timesteps [d, c, b, a] give the PRK evaluations
            // [d, c+h, c+h, c, c, b+h, b+h, b, b, a+h, a+h, a], then PLMS from a down.
            let h = step_ratio / 2;
            let mut ts = Vec::with_capacity(PRK_EVALUATIONS + n - 3);
            for pair in spaced[..4].windows(2) {
                let (upper, lower) = (pair[0], pair[1]);
                ts.push(upper);
                let mid = lower + h;
                ts.push(mid);
                ts.push(mid);
                ts.push(lower);
            }
            ts.extend_from_slice(&spaced[3..]);
            (ts, PRK_EVALUATIONS)
        };
        for &ts in &train_timesteps {
            schedule.alpha_bar(ts)?;
        }
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            schedule.alphas_cumprod()[0]
        };
        Ok(Pndm {
            schedule,
            prediction_type: base.prediction_type,
            final_alpha_cumprod,
            skip_prk_steps,
            timesteps: train_timesteps.iter().map(|&v| v as f64).collect(),
            train_timesteps,
            prk_len,
            step_ratio,
            num_inference_steps: n,
            run: RunOrder::default(),
            counter: 0,
            ets: Default::default(),
            ets_len: 0,
            cur_model_output: Vec::new(),
            cur_sample: Vec::new(),
            eps: Vec::new(),
        })
    }

    /// The training timesteps of every model evaluation, repeats included.
    pub fn train_timesteps(&self) -> &[usize] {
        &self.train_timesteps
    }

    /// Whether the PRK warm-up is skipped (PLMS only).
    pub fn skip_prk_steps(&self) -> bool {
        self.skip_prk_steps
    }

    /// Appends a model output to the stored ones, keeping the last four.
    fn push_ets(&mut self, model_output: &[f32]) {
        if self.ets_len == self.ets.len() {
            self.ets.rotate_left(1);
            self.ets_len -= 1;
        }
        let slot = &mut self.ets[self.ets_len];
        slot.clear();
        slot.extend_from_slice(model_output);
        self.ets_len += 1;
    }

    /// Keeps `sample` as the start of the current PRK step or of PLMS steps 0 and 1.
    fn store_sample(&mut self, sample: &[f32]) {
        self.cur_sample.clear();
        self.cur_sample.extend_from_slice(sample);
    }

    /// The alpha-bar of a possibly negative previous timestep.
    fn alpha_bar_prev(&self, prev: isize) -> Result<f64> {
        match usize::try_from(prev) {
            Ok(p) => Ok(self.schedule.alpha_bar(p)?),
            Err(_) => Ok(self.final_alpha_cumprod),
        }
    }

    /// Sets `self.eps` for the PRK evaluation `self.counter`.
    fn prk_stage(&mut self, model_output: &[f32], sample: &[f32]) {
        let len = model_output.len();
        self.cur_model_output.resize(len, 0.0);
        self.eps.resize(len, 0.0);
        match self.counter % 4 {
            0 => {
                for (c, &m) in self.cur_model_output.iter_mut().zip(model_output) {
                    *c = m * (1.0 / 6.0);
                }
                self.push_ets(model_output);
                self.store_sample(sample);
                self.eps.copy_from_slice(model_output);
            }
            1 | 2 => {
                for (c, &m) in self.cur_model_output.iter_mut().zip(model_output) {
                    *c += m * (1.0 / 3.0);
                }
                self.eps.copy_from_slice(model_output);
            }
            _ => {
                for ((e, c), &m) in self
                    .eps
                    .iter_mut()
                    .zip(self.cur_model_output.iter_mut())
                    .zip(model_output)
                {
                    *e = *c + m * (1.0 / 6.0);
                    *c = 0.0;
                }
            }
        }
    }

    /// Sets `self.eps` for the PLMS step `self.counter`.
    fn plms_stage(&mut self, model_output: &[f32], sample: &[f32]) -> Result<()> {
        if self.counter != 1 {
            self.push_ets(model_output);
        }
        self.eps.resize(model_output.len(), 0.0);
        let (ets, n, eps) = (&self.ets, self.ets_len, &mut self.eps);
        let back = |k: usize| -> &[f32] { &ets[n - k] };
        match n {
            1 if self.counter == 0 => {
                eps.copy_from_slice(model_output);
                self.cur_sample.clear();
                self.cur_sample.extend_from_slice(sample);
            }
            1 => {
                for (e, (&m, &p)) in eps.iter_mut().zip(model_output.iter().zip(back(1))) {
                    *e = (m + p) / 2.0;
                }
            }
            2 => sd_core::ops::lincomb(eps, &[1.5, -0.5], &[back(1), back(2)])?,
            3 => sd_core::ops::lincomb(
                eps,
                &[23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0],
                &[back(1), back(2), back(3)],
            )?,
            _ => sd_core::ops::lincomb(
                eps,
                &[55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0],
                &[back(1), back(2), back(3), back(4)],
            )?,
        }
        Ok(())
    }
}

/// The transfer function `phi` from `t` to `prev` for the noise estimate `eps` (converted
/// from a velocity first), and the x0 it implies.
fn transfer(
    prediction_type: PredictionType,
    abar_t: f64,
    abar_prev: f64,
    sample: &[f32],
    eps: &mut [f32],
    prev_sample: &mut [f32],
    pred_original_sample: &mut [f32],
) -> Result<()> {
    if prediction_type == PredictionType::VPrediction {
        let c = prediction_type.eps_coefficients(abar_t);
        sd_core::ops::lincomb2_in_place(eps, c.model, c.sample, sample)?;
    }
    let sample_coeff = (abar_prev / abar_t).sqrt();
    let denom = abar_t * (1.0 - abar_prev).sqrt() + (abar_t * (1.0 - abar_t) * abar_prev).sqrt();
    let eps_coeff = -(abar_prev - abar_t) / denom;
    sd_core::ops::lincomb2(prev_sample, sample_coeff, sample, eps_coeff, eps)?;
    PredictionType::Epsilon
        .x0_coefficients(abar_t)
        .apply(eps, sample, pred_original_sample)?;
    Ok(())
}

impl Sampler for Pndm {
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
        _noise: &mut dyn NoiseSource,
        prev_sample: &mut [f32],
        pred_original_sample: &mut [f32],
    ) -> Result<()> {
        self.check_index(index)?;
        check_step_slices(model_output, sample, prev_sample, pred_original_sample)?;
        if self.ets_len > 0 && self.ets[0].len() != sample.len() {
            return Err(Error::LengthMismatch {
                what: "sample (against the run's earlier steps)",
                expected: self.ets[0].len(),
                found: sample.len(),
            });
        }
        let timestep = self.train_timesteps[index];
        let prk = self.counter < self.prk_len;
        // The timestep the update starts from, its target, and whether it starts from the
        // stored sample rather than this one (diffusers' `_get_prev_sample` arguments).
        let (t, prev, from_stored) = if prk {
            let diff = if self.counter % 2 == 1 {
                0
            } else {
                self.step_ratio / 2
            };
            let base = self.train_timesteps[self.counter / 4 * 4];
            (
                base,
                timestep as isize - diff as isize,
                !self.counter.is_multiple_of(4),
            )
        } else if self.counter == 1 {
            (timestep + self.step_ratio, timestep as isize, true)
        } else {
            (
                timestep,
                timestep as isize - self.step_ratio as isize,
                false,
            )
        };
        // Look the alpha-bars up before changing any state, so that an error leaves the run
        // as it was.
        let abar_t = self.schedule.alpha_bar(t)?;
        let abar_prev = self.alpha_bar_prev(prev)?;
        self.run.advance(index)?;
        if prk {
            self.prk_stage(model_output, sample);
        } else {
            self.plms_stage(model_output, sample)?;
        }
        self.counter += 1;
        let base: &[f32] = if from_stored {
            &self.cur_sample
        } else {
            sample
        };
        transfer(
            self.prediction_type,
            abar_t,
            abar_prev,
            base,
            &mut self.eps,
            prev_sample,
            pred_original_sample,
        )
    }

    fn reset(&mut self) {
        self.run.reset();
        self.counter = 0;
        self.ets_len = 0;
    }
}

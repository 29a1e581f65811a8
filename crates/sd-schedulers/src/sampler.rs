//! The [`Sampler`] trait every sampler implements, and how a run is planned.

use crate::error::{Error, Result, check_len};
use crate::noise::NoiseSource;

/// Which steps a sampler takes: a count spaced by the config's `timestep_spacing`, or the
/// timesteps or noise levels themselves (where the sampler supports them, as in diffusers).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Steps {
    /// `n` inference steps.
    Count(usize),
    /// Custom training timesteps, largest first.
    Timesteps(Vec<usize>),
    /// Custom noise levels, largest first, including the final one (k-diffusion samplers).
    Sigmas(Vec<f64>),
}

/// Everything a sampler needs besides its config to be ready to run.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Plan {
    /// The steps.
    pub steps: Steps,
    /// How many samples of equal size a slice holds, for dynamic thresholding, whose
    /// percentile is taken per sample (as diffusers does over its batch dimension). 1 unless
    /// thresholding a batch.
    pub batch_size: usize,
}

impl Plan {
    /// `n` steps, batch of 1.
    pub fn steps(n: usize) -> Self {
        Plan {
            steps: Steps::Count(n),
            batch_size: 1,
        }
    }

    /// Custom timesteps, batch of 1.
    pub fn timesteps(timesteps: Vec<usize>) -> Self {
        Plan {
            steps: Steps::Timesteps(timesteps),
            batch_size: 1,
        }
    }

    /// Custom sigmas, batch of 1.
    pub fn sigmas(sigmas: Vec<f64>) -> Self {
        Plan {
            steps: Steps::Sigmas(sigmas),
            batch_size: 1,
        }
    }

    /// The same plan for a batch of `batch_size` samples.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }
}

impl From<usize> for Plan {
    fn from(n: usize) -> Self {
        Plan::steps(n)
    }
}

/// The result of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// The sample to feed the next step (`x_{t-1}`).
    pub prev_sample: Vec<f32>,
    /// The sampler's estimate of the clean sample at this step.
    pub pred_original_sample: Vec<f32>,
}

/// A sampler: built ready to run from a config and a [`Plan`], it walks a sample from noise to
/// data one model evaluation at a time.
///
/// Step `i` evaluates the model at `timesteps()[i]` on `scale_model_input(sample, i)` and
/// passes its output to `step(i, ...)`. Multistep samplers keep the outputs of earlier steps;
/// the steps of a run must come in order (the first may be any index, for image-to-image),
/// and anything else is an error, not a silently wrong result. [`Sampler::reset`] starts a
/// new run.
pub trait Sampler: Send {
    /// The diffusers class this sampler reproduces, e.g. `"DDIMScheduler"`.
    fn class_name(&self) -> &'static str;

    /// The timesteps at which the model is evaluated, one per step, in order. Fractional for
    /// some samplers; samplers with several evaluations per step (Heun, KDPM2) repeat them.
    fn timesteps(&self) -> &[f64];

    /// The noise level of each step for samplers that have them (plus the final one), as
    /// diffusers' `scheduler.sigmas`.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }

    /// The number of inference steps asked for.
    fn num_inference_steps(&self) -> usize;

    /// The number of model evaluations per inference step (2 for Heun and KDPM2), which
    /// image-to-image uses to find where to start.
    fn order(&self) -> usize {
        1
    }

    /// The standard deviation of the initial noise (`init_noise_sigma`): the first sample is
    /// standard normal noise times this.
    fn init_noise_sigma(&self) -> f64;

    /// The factor the sample is scaled by before the model sees it at step `i`
    /// (`1 / sqrt(sigma^2 + 1)` for the k-diffusion samplers, 1 for the others).
    fn model_input_scale(&self, index: usize) -> Result<f64> {
        self.check_index(index)?;
        Ok(1.0)
    }

    /// Writes the model's input at step `i` into `out` (diffusers' `scale_model_input`).
    ///
    /// # Errors
    /// [`Error::StepOutOfRange`], [`Error::LengthMismatch`].
    fn scale_model_input(&self, sample: &[f32], index: usize, out: &mut [f32]) -> Result<()> {
        check_len("out", sample.len(), out.len())?;
        let scale = self.model_input_scale(index)? as f32;
        for (o, &s) in out.iter_mut().zip(sample) {
            *o = s * scale;
        }
        Ok(())
    }

    /// Noises a clean sample to the noise level at which step `index` expects its input
    /// (diffusers' `add_noise`, used by image-to-image and inpainting).
    ///
    /// # Errors
    /// [`Error::StepOutOfRange`], [`Error::LengthMismatch`].
    fn add_noise(
        &self,
        original: &[f32],
        noise: &[f32],
        index: usize,
        out: &mut [f32],
    ) -> Result<()>;

    /// One step: from the model's output at step `index` and the current sample, writes the
    /// next sample and the predicted clean sample. Stochastic samplers draw their noise from
    /// `noise`.
    ///
    /// # Errors
    /// [`Error::StepOutOfOrder`], [`Error::StepOutOfRange`], [`Error::LengthMismatch`], and
    /// [`Error::Noise`] if a stochastic step gets no noise.
    fn step_into(
        &mut self,
        index: usize,
        model_output: &[f32],
        sample: &[f32],
        noise: &mut dyn NoiseSource,
        prev_sample: &mut [f32],
        pred_original_sample: &mut [f32],
    ) -> Result<()>;

    /// As [`Sampler::step_into`], allocating the outputs.
    ///
    /// # Errors
    /// As [`Sampler::step_into`].
    fn step(
        &mut self,
        index: usize,
        model_output: &[f32],
        sample: &[f32],
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let mut prev_sample = vec![0.0; sample.len()];
        let mut pred_original_sample = vec![0.0; sample.len()];
        self.step_into(
            index,
            model_output,
            sample,
            noise,
            &mut prev_sample,
            &mut pred_original_sample,
        )?;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample,
        })
    }

    /// Forgets the run in progress (the history of multistep samplers).
    fn reset(&mut self);

    /// The step at which image-to-image with `strength` starts: of `n` inference steps, the
    /// last `floor(n * strength)` are run (diffusers' `get_timesteps`), counted in model
    /// evaluations. Strength 1 starts from pure noise, 0 runs no step.
    ///
    /// # Errors
    /// [`Error::Strength`] outside [0, 1].
    fn start_index(&self, strength: f64) -> Result<usize> {
        if !(0.0..=1.0).contains(&strength) {
            return Err(Error::Strength(strength));
        }
        let n = self.num_inference_steps();
        let init = ((n as f64 * strength) as usize).min(n);
        Ok(((n - init) * self.order()).min(self.timesteps().len()))
    }

    /// Checks that `index` is a step of this schedule.
    ///
    /// # Errors
    /// [`Error::StepOutOfRange`].
    fn check_index(&self, index: usize) -> Result<()> {
        let len = self.timesteps().len();
        if index < len {
            Ok(())
        } else {
            Err(Error::StepOutOfRange { index, len })
        }
    }
}

/// The slice checks every step starts with: the model output and both output buffers have
/// the sample's length.
///
/// # Errors
/// [`Error::LengthMismatch`] naming the slice.
pub(crate) fn check_step_slices(
    model_output: &[f32],
    sample: &[f32],
    prev_sample: &[f32],
    pred_original_sample: &[f32],
) -> Result<()> {
    check_len("model_output", sample.len(), model_output.len())?;
    check_len("prev_sample", sample.len(), prev_sample.len())?;
    check_len(
        "pred_original_sample",
        sample.len(),
        pred_original_sample.len(),
    )
}

/// Keeps the order of a run's steps: the first step may be any index, each later one must be
/// the next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RunOrder {
    next: Option<usize>,
}

impl RunOrder {
    /// Accepts `index` as the next step, or says which one was expected.
    pub(crate) fn advance(&mut self, index: usize) -> Result<()> {
        match self.next {
            Some(expected) if expected != index => Err(Error::StepOutOfOrder {
                expected,
                found: index,
            }),
            _ => {
                self.next = Some(index + 1);
                Ok(())
            }
        }
    }

    /// Whether no step of the run has been taken yet (multistep samplers start at low order).
    pub(crate) fn is_first(&self) -> bool {
        self.next.is_none()
    }

    /// Starts a new run.
    pub(crate) fn reset(&mut self) {
        self.next = None;
    }
}

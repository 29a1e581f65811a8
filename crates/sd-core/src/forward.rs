//! The forward process q(x_t | x_0) of Ho et al., 2020, eq. 4:
//!
//! ```text
//! x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,    eps ~ N(0, I)
//! ```
//!
//! diffusers: `SchedulerMixin.add_noise`.

use crate::error::{Error, Result, check_len};
use crate::ops::lincomb2;
use crate::real::Real;
use crate::schedule::NoiseSchedule;

/// The two coefficients of the forward process at one timestep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForwardCoefficients {
    /// `sqrt(alpha_bar_t)`, the weight of the clean sample.
    pub signal: f64,
    /// `sqrt(1 - alpha_bar_t)`, the weight of the noise.
    pub noise: f64,
}

impl ForwardCoefficients {
    /// The coefficients for a given alpha-bar.
    pub fn from_alpha_bar(alpha_bar: f64) -> Self {
        ForwardCoefficients {
            signal: alpha_bar.sqrt(),
            noise: (1.0 - alpha_bar).sqrt(),
        }
    }

    /// `out = signal * x0 + noise * eps`.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] if the slices differ in length.
    pub fn apply<T: Real>(&self, x0: &[T], eps: &[T], out: &mut [T]) -> Result<()> {
        lincomb2(out, self.signal, x0, self.noise, eps)
    }
}

impl NoiseSchedule {
    /// The coefficients of q(x_t | x_0) at timestep `t`.
    ///
    /// # Errors
    /// [`Error::TimestepOutOfRange`] unless `t < T`.
    pub fn forward_coefficients(&self, t: usize) -> Result<ForwardCoefficients> {
        self.alpha_bar(t).map(ForwardCoefficients::from_alpha_bar)
    }

    /// Noises `x0` to timestep `t`: `out = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps`.
    ///
    /// # Errors
    /// [`Error::TimestepOutOfRange`] unless `t < T`; [`Error::LengthMismatch`] if the slices
    /// differ in length.
    pub fn add_noise<T: Real>(&self, x0: &[T], eps: &[T], t: usize, out: &mut [T]) -> Result<()> {
        self.forward_coefficients(t)?.apply(x0, eps, out)
    }

    /// Noises a batch: `x0`, `eps` and `out` hold `timesteps.len()` samples of equal size one
    /// after another, and sample `i` is noised to `timesteps[i]` (diffusers' `add_noise` with
    /// one timestep per sample).
    ///
    /// # Errors
    /// [`Error::Zero`] for an empty batch, [`Error::LengthMismatch`] if the data does not split
    /// into `timesteps.len()` equal samples, [`Error::TimestepOutOfRange`] for a bad timestep.
    pub fn add_noise_batch<T: Real>(
        &self,
        x0: &[T],
        eps: &[T],
        timesteps: &[usize],
        out: &mut [T],
    ) -> Result<()> {
        let sample_len = batch_sample_len(x0.len(), timesteps.len())?;
        check_len("eps", x0.len(), eps.len())?;
        check_len("out", x0.len(), out.len())?;
        for (((&t, x0), eps), out) in timesteps
            .iter()
            .zip(x0.chunks_exact(sample_len))
            .zip(eps.chunks_exact(sample_len))
            .zip(out.chunks_exact_mut(sample_len))
        {
            self.add_noise(x0, eps, t, out)?;
        }
        Ok(())
    }
}

/// The length of one sample of a batch of `batch` samples held in `total` values.
pub(crate) fn batch_sample_len(total: usize, batch: usize) -> Result<usize> {
    if batch == 0 {
        return Err(Error::Zero { what: "batch size" });
    }
    let sample_len = total / batch;
    check_len("batch data", sample_len * batch, total)?;
    Ok(sample_len)
}

//! Where stochastic samplers get their noise: always from the caller, so a run can be
//! replayed bit for bit.
//!
//! A sampler asks its [`NoiseSource`] for a standard normal tensor of the sample's size each
//! time it needs one, in a fixed order. [`RngNoise`] draws from a seeded random number
//! generator the caller owns; [`ReplayNoise`] hands out a given sequence of tensors (for
//! example the noise diffusers drew, to replay its trajectory); [`NoNoise`] is for
//! deterministic samplers and fails if asked.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};

/// A source of standard normal noise.
pub trait NoiseSource {
    /// Fills `out` with independent standard normal values.
    ///
    /// # Errors
    /// [`Error::Noise`] if the source cannot provide them.
    fn fill(&mut self, out: &mut [f32]) -> Result<()>;
}

/// Noise drawn from a random number generator the caller owns and seeds.
///
/// ```
/// use rand::SeedableRng;
/// use sd_schedulers::{NoiseSource, RngNoise};
///
/// let mut noise = RngNoise(rand::rngs::StdRng::seed_from_u64(42));
/// let mut buffer = [0.0_f32; 8];
/// noise.fill(&mut buffer)?;
/// # Ok::<(), sd_schedulers::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct RngNoise<R>(pub R);

impl<R: Rng> NoiseSource for RngNoise<R> {
    fn fill(&mut self, out: &mut [f32]) -> Result<()> {
        for v in out.iter_mut() {
            *v = StandardNormal.sample(&mut self.0);
        }
        Ok(())
    }
}

/// A given sequence of noise tensors, handed out in order.
#[derive(Debug, Clone, Default)]
pub struct ReplayNoise {
    tensors: Vec<Vec<f32>>,
    next: usize,
}

impl ReplayNoise {
    /// Replays `tensors`, first to last.
    pub fn new(tensors: Vec<Vec<f32>>) -> Self {
        ReplayNoise { tensors, next: 0 }
    }

    /// How many tensors have been handed out.
    pub fn used(&self) -> usize {
        self.next
    }
}

impl NoiseSource for ReplayNoise {
    fn fill(&mut self, out: &mut [f32]) -> Result<()> {
        let tensor = self.tensors.get(self.next).ok_or_else(|| {
            Error::Noise(format!(
                "the replayed sequence has only {} tensors",
                self.tensors.len()
            ))
        })?;
        if tensor.len() != out.len() {
            return Err(Error::Noise(format!(
                "replayed tensor {} has {} values, the sample {}",
                self.next,
                tensor.len(),
                out.len()
            )));
        }
        out.copy_from_slice(tensor);
        self.next += 1;
        Ok(())
    }
}

/// For deterministic samplers: any request for noise is an error.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNoise;

impl NoiseSource for NoNoise {
    fn fill(&mut self, _out: &mut [f32]) -> Result<()> {
        Err(Error::Noise(
            "this sampler configuration is stochastic: pass an RngNoise or a ReplayNoise".into(),
        ))
    }
}

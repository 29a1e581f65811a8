//! The error type of sd-schedulers.

/// What went wrong building or stepping a sampler.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The schedule mathematics rejected an input.
    #[error(transparent)]
    Core(#[from] sd_core::Error),
    /// A scheduler config could not be read.
    #[error("scheduler config: {0}")]
    Json(#[from] serde_json::Error),
    /// A config value the sampler cannot use, or a combination diffusers rejects.
    #[error("{sampler}: {key} = {value}: {reason}")]
    InvalidConfig {
        /// The sampler (diffusers class name).
        sampler: &'static str,
        /// The config key.
        key: &'static str,
        /// The value found.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No sampler has that name.
    #[error("no sampler is called {name:?}; known names: {known}")]
    UnknownSampler {
        /// The name asked for.
        name: String,
        /// The names that exist.
        known: String,
    },
    /// `step` was called for another index than the next one.
    #[error(
        "step {found} called, but the next step of this run is {expected}; call reset() to start a new run"
    )]
    StepOutOfOrder {
        /// The index the sampler expects.
        expected: usize,
        /// The index given.
        found: usize,
    },
    /// A step index past the end of the schedule.
    #[error("step index {index} is past the schedule's {len} steps")]
    StepOutOfRange {
        /// The index given.
        index: usize,
        /// The number of model evaluations.
        len: usize,
    },
    /// A slice has the wrong length.
    #[error("{what}: expected length {expected}, found {found}")]
    LengthMismatch {
        /// Which slice.
        what: &'static str,
        /// The length it must have.
        expected: usize,
        /// The length it has.
        found: usize,
    },
    /// A stochastic sampler was given no noise, or a replayed noise sequence ran out or did
    /// not fit.
    #[error("noise: {0}")]
    Noise(String),
    /// An image-to-image strength outside [0, 1].
    #[error("strength {0} lies outside [0, 1]")]
    Strength(f64),
}

/// The result type of sd-schedulers.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn check_len(what: &'static str, expected: usize, found: usize) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            what,
            expected,
            found,
        })
    }
}

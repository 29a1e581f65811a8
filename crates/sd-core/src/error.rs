//! The error type of sd-core: every impossible input is a typed value, never a panic.

/// What went wrong in an sd-core computation. Each variant names the offending input and,
/// where there is one, the expected and the found value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A count that must be positive was zero (training timesteps, inference steps, ...).
    #[error("{what} must be at least 1, found 0")]
    Zero {
        /// The name of the count.
        what: &'static str,
    },
    /// More inference steps were asked for than the model was trained with.
    #[error(
        "{num_inference_steps} inference steps asked for, but the schedule has only \
         {num_train_timesteps} training timesteps"
    )]
    TooManyInferenceSteps {
        /// The number of inference steps asked for.
        num_inference_steps: usize,
        /// The number of training timesteps of the schedule.
        num_train_timesteps: usize,
    },
    /// A beta of a schedule lies outside the open interval (0, 1).
    #[error("beta[{index}] = {value} lies outside (0, 1)")]
    BetaOutOfRange {
        /// Its index in the schedule.
        index: usize,
        /// Its value.
        value: f64,
    },
    /// Two slices that must have the same length do not.
    #[error("{what}: expected length {expected}, found {found}")]
    LengthMismatch {
        /// Which slice.
        what: &'static str,
        /// The length it must have.
        expected: usize,
        /// The length it has.
        found: usize,
    },
    /// A timestep is not one of the schedule's.
    #[error("timestep {timestep} is outside 0..{num_train_timesteps}")]
    TimestepOutOfRange {
        /// The timestep given.
        timestep: f64,
        /// The number of training timesteps of the schedule.
        num_train_timesteps: usize,
    },
    /// A parameter has a value the computation cannot use.
    #[error("{name} = {value}: {reason}")]
    InvalidParameter {
        /// The parameter's name.
        name: &'static str,
        /// Its value.
        value: f64,
        /// What a valid value is.
        reason: &'static str,
    },
}

/// The result type of sd-core.
pub type Result<T> = std::result::Result<T, Error>;

/// Returns [`Error::LengthMismatch`] unless `found == expected`.
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

/// Returns [`Error::Zero`] if `value` is zero.
pub(crate) fn check_nonzero(what: &'static str, value: usize) -> Result<()> {
    if value == 0 {
        Err(Error::Zero { what })
    } else {
        Ok(())
    }
}

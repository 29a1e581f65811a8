//! The error type of sd-models: every bad input (a file, a weight, a shape, a prompt) is a
//! typed value that names what was wrong.

use std::path::PathBuf;

/// What went wrong in sd-models.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operation got a tensor of the wrong shape.
    #[error("{op}: expected {expected}, found {found}")]
    Shape {
        /// The operation or layer.
        op: &'static str,
        /// What it needs.
        expected: String,
        /// What it got.
        found: String,
    },
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A weight file is not valid safetensors (empty, truncated, corrupt header).
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    SafeTensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A weight the network needs is in none of the files.
    #[error("missing weight {key} (looked in {files})")]
    MissingWeight {
        /// The key.
        key: String,
        /// The files searched.
        files: String,
    },
    /// A weight has the wrong shape.
    #[error("{}: weight {key} has shape {found:?}, expected {expected:?}", file.display())]
    WeightShape {
        /// The key.
        key: String,
        /// The file holding it.
        file: PathBuf,
        /// The shape the network needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A weight has a dtype that cannot be loaded.
    #[error("{}: weight {key} has dtype {dtype}, expected F32, F16 or BF16", file.display())]
    WeightDType {
        /// The key.
        key: String,
        /// The file holding it.
        file: PathBuf,
        /// The dtype found.
        dtype: String,
    },
    /// Two files (or two keys renamed to one name) hold the same weight.
    #[error("weight {key} is in {first} and again in {}", second.display())]
    DuplicateWeight {
        /// The key.
        key: String,
        /// Where it was found first (with the key as stored there).
        first: String,
        /// The second file holding it.
        second: PathBuf,
    },
    /// Strict loading found weights the network did not use.
    #[error("{} unused weights, e.g. {}", keys.len(), keys.iter().take(5).cloned().collect::<Vec<_>>().join(", "))]
    UnusedWeights {
        /// The unused keys.
        keys: Vec<String>,
    },
    /// A config file is malformed, has an unknown key or an impossible value.
    #[error("{what}: {message}")]
    Config {
        /// Which config (usually its path).
        what: String,
        /// What is wrong.
        message: String,
    },
    /// A single-file checkpoint whose model could not be recognised from its tensors' names
    /// and shapes.
    #[error("{file} (single-file checkpoint): cannot infer {message}")]
    CannotInfer {
        /// The checkpoint.
        file: String,
        /// What could not be inferred, and from what.
        message: String,
    },
    /// The tokenizer could not be built or could not encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A prompt is unusable (for example empty where that is not allowed, or too long).
    #[error("prompt: {0}")]
    Prompt(String),
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab_size}")]
    TokenOutOfVocab {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// The backend cannot do this (a dtype it has no kernel for, a size past its limits).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A backend's device or library failed: a missing driver, a failed launch or copy, no
    /// device memory left. `source` is the backend's own error, with the details.
    #[error("{backend}: {source}")]
    Backend {
        /// Which backend (for example `"cuda"`).
        backend: &'static str,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A generation's numbers stopped being finite (NaN or infinite): weights that are not
    /// finite, a half-precision overflow, a guidance scale too large for `f32`.
    #[error("non-finite values (NaN or infinity) {stage}{}", step.map_or(String::new(), |s| format!(" at step {s}")))]
    NonFinite {
        /// Where they first appeared: `"after text encoding"`, `"after the denoising step"`,
        /// `"after decoding"`.
        stage: &'static str,
        /// The step, counted from 0 among the steps run, for the denoising loop.
        step: Option<usize>,
    },
    /// A weight file holds NaN or infinity (found by
    /// [`WeightFile::check_finite`](crate::weights::WeightFile::check_finite), the programs'
    /// `--check-weights`).
    #[error("{}: tensor {key} holds non-finite values (NaN or infinity)", file.display())]
    NonFiniteWeight {
        /// The tensor.
        key: String,
        /// The file.
        file: std::path::PathBuf,
    },
    /// The schedule mathematics rejected an input.
    #[error(transparent)]
    Core(#[from] sd_core::Error),
}

/// The result type of sd-models.
pub type Result<T> = std::result::Result<T, Error>;

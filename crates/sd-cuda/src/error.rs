//! The error type of sd-cuda: a missing library, device or capability is a typed value that
//! says what is missing and how to get it, found when the backend is built rather than on
//! first use.
//!
//! The tensor operations return [`sd_models::Error`] (they implement its `Backend` trait);
//! a device failure there becomes [`sd_models::Error::Backend`] with this error as its
//! source, and a request it cannot serve [`sd_models::Error::Unsupported`].

use crate::kernels::Arch;

/// What went wrong in sd-cuda.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// The CUDA driver library is not installed (no NVIDIA driver, or no GPU machine).
    #[error(
        "the CUDA driver library was not found (tried {searched}); sd-cuda needs an NVIDIA GPU \
         and its driver"
    )]
    DriverNotFound {
        /// The library names tried.
        searched: String,
    },
    /// NVRTC, the run-time CUDA compiler, is not installed.
    #[error(
        "NVRTC (the CUDA run-time compiler) was not found (tried {searched}); install the CUDA \
         toolkit, or `pip install nvidia-cuda-nvrtc` and put its lib folder in LD_LIBRARY_PATH \
         (crates/sd-cuda/ci/install-nvrtc.sh does both)"
    )]
    NvrtcNotFound {
        /// The library names tried.
        searched: String,
    },
    /// cuBLAS is not installed.
    #[error(
        "cuBLAS was not found (tried {searched}); install the CUDA toolkit's libcublas, or \
         `pip install nvidia-cublas` and put its lib folder in LD_LIBRARY_PATH"
    )]
    CublasNotFound {
        /// The library names tried.
        searched: String,
    },
    /// A library is older than sd-cuda supports, or older than another one it must match.
    #[error("{what}: found {found}, need {needed}")]
    Version {
        /// Which library.
        what: &'static str,
        /// The version found.
        found: String,
        /// What is needed.
        needed: String,
    },
    /// The requested device does not exist.
    #[error("there is no CUDA device {ordinal} ({count} present)")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many devices there are.
        count: usize,
    },
    /// The device is older than the kernels need.
    #[error(
        "device {ordinal} is {arch}; sd-cuda needs sm_80 (Ampere) or newer for its tensor-core \
         and bf16 instructions"
    )]
    ArchTooOld {
        /// The device.
        ordinal: usize,
        /// Its architecture.
        arch: Arch,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver: {call} failed: {message}")]
    Driver {
        /// The operation.
        call: &'static str,
        /// The driver's error.
        message: String,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS: {call} failed: {message}")]
    Cublas {
        /// The operation.
        call: &'static str,
        /// cuBLAS's status.
        message: String,
    },
    /// An NVRTC query failed (the library loaded, but a call into it did not succeed).
    #[error("NVRTC: {call} failed: {message}")]
    Nvrtc {
        /// The call.
        call: &'static str,
        /// NVRTC's status.
        message: String,
    },
    /// NVRTC rejected a kernel module (a bug in the kernels, or an unsupported architecture).
    #[error("NVRTC could not compile {program} for {arch}: {message}\n{log}")]
    Compile {
        /// The kernel source (a module's file name).
        program: String,
        /// The target architecture.
        arch: Arch,
        /// NVRTC's status.
        message: String,
        /// The compiler's log.
        log: String,
    },
    /// A request sd-cuda cannot serve (a dtype, a rank, a size past its limits).
    #[error("{0}")]
    Unsupported(String),
}

impl CudaError {
    /// A driver error from a cudarc call.
    pub(crate) fn driver(call: &'static str, e: cudarc::driver::DriverError) -> Self {
        let message = match e.error_string() {
            Ok(s) => format!("{:?} ({})", e.0, s.to_string_lossy()),
            Err(_) => format!("{:?}", e.0),
        };
        CudaError::Driver { call, message }
    }

    /// A cuBLAS error from a cudarc call.
    pub(crate) fn cublas(call: &'static str, e: cudarc::cublas::result::CublasError) -> Self {
        CudaError::Cublas {
            call,
            message: format!("{:?}", e.0),
        }
    }
}

impl From<CudaError> for sd_models::Error {
    /// A request sd-cuda cannot serve stays [`sd_models::Error::Unsupported`]; everything
    /// else (a missing library or device, a failed driver, cuBLAS or NVRTC call) becomes
    /// [`sd_models::Error::Backend`] with this error as its source.
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::Unsupported(message) => {
                sd_models::Error::Unsupported(format!("cuda: {message}"))
            }
            e => sd_models::Error::Backend {
                backend: "cuda",
                source: Box::new(e),
            },
        }
    }
}

/// The result type of sd-cuda's own functions.
pub type Result<T> = std::result::Result<T, CudaError>;

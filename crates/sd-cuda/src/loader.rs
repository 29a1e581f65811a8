//! Finding the CUDA libraries before cudarc touches them.
//!
//! cudarc (with `dynamic-loading`) opens libcuda, libnvrtc and libcublas on first use and
//! panics when it cannot. Every path into cudarc goes through these checks first, so a
//! machine without a driver, NVRTC or cuBLAS gets a [`CudaError`] instead. The checks try the
//! same library names, in the same order, as cudarc does (so the library found here is the
//! one cudarc loads), and then check versions: the bindings are CUDA 13.0's, and a symbol
//! missing from an old library would be another panic.

use std::ffi::c_int;
use std::sync::OnceLock;

use crate::error::{CudaError, Result};

/// The oldest NVRTC the kernels are tested with (sm_90 and the bf16 conversions need 11.8;
/// 12.0 is the oldest whose API cudarc's CUDA 13 bindings call safely).
const MIN_NVRTC: (i32, i32) = (12, 0);

/// The oldest driver (CUDA 12.0): older ones lack symbols the bindings resolve.
const MIN_DRIVER: i32 = 12000;

fn candidates(lib: &str) -> String {
    cudarc::get_lib_name_candidates(lib).join(", ")
}

/// Whether the CUDA driver library can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: tries dlopen on cudarc's list of names and closes what it opened; runs no
    // CUDA code.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether NVRTC can be loaded.
pub fn nvrtc_available() -> bool {
    // SAFETY: as in `driver_available`.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether cuBLAS can be loaded.
pub fn cublas_available() -> bool {
    // SAFETY: as in `driver_available`.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// Checks that NVRTC is present and new enough; returns its version (major, minor). Only
/// after this succeeds may cudarc's NVRTC functions be called.
///
/// # Errors
/// [`CudaError::NvrtcNotFound`] without NVRTC, [`CudaError::Version`] for one older than 12.0.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    static VERSION: OnceLock<std::result::Result<(i32, i32), String>> = OnceLock::new();
    let found = VERSION.get_or_init(|| {
        if !nvrtc_available() {
            return Err(candidates("nvrtc"));
        }
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        // SAFETY: the library is present (checked above); nvrtcVersion writes two ints.
        let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        match status.result() {
            Ok(()) => Ok((major, minor)),
            Err(e) => Err(format!("a library that failed nvrtcVersion ({e:?})")),
        }
    });
    let (major, minor) = found
        .clone()
        .map_err(|searched| CudaError::NvrtcNotFound { searched })?;
    if (major, minor) < MIN_NVRTC {
        return Err(CudaError::Version {
            what: "NVRTC",
            found: format!("{major}.{minor}"),
            needed: format!("{}.{} or newer", MIN_NVRTC.0, MIN_NVRTC.1),
        });
    }
    Ok((major, minor))
}

/// Checks that the driver is present and new enough; returns its CUDA version (12040 is
/// 12.4). Only after this succeeds may cudarc's driver functions be called.
///
/// # Errors
/// [`CudaError::DriverNotFound`] without a driver, [`CudaError::Version`] for one older than
/// CUDA 12.0.
pub fn driver_version() -> Result<i32> {
    if !driver_available() {
        return Err(CudaError::DriverNotFound {
            searched: candidates("cuda"),
        });
    }
    let mut version: c_int = 0;
    // SAFETY: the library is present (checked above); cuDriverGetVersion writes one int and
    // needs no cuInit.
    let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    status
        .result()
        .map_err(|e| CudaError::driver("cuDriverGetVersion", e))?;
    if version < MIN_DRIVER {
        return Err(CudaError::Version {
            what: "CUDA driver",
            found: cuda_version_string(version),
            needed: format!("{} or newer", cuda_version_string(MIN_DRIVER)),
        });
    }
    Ok(version)
}

/// Checks that cuBLAS is present.
///
/// # Errors
/// [`CudaError::CublasNotFound`] without it.
pub fn check_cublas() -> Result<()> {
    if cublas_available() {
        Ok(())
    } else {
        Err(CudaError::CublasNotFound {
            searched: candidates("cublas"),
        })
    }
}

/// "12.4" for 12040.
pub(crate) fn cuda_version_string(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_strings() {
        assert_eq!(cuda_version_string(12040), "12.4");
        assert_eq!(cuda_version_string(13000), "13.0");
    }
}

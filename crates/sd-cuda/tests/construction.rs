//! Building the backend where something is missing is an error, never a panic. On this
//! project's CI (no GPU, no driver) `CudaBackend::new` must fail with `DriverNotFound`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write as _;

use sd_cuda::{CudaBackend, CudaError, CudaOptions, loader};
use sd_models::backend::DType;

#[test]
fn no_driver_is_a_typed_error() {
    let result = CudaBackend::new(0);
    if loader::driver_available() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED no_driver_is_a_typed_error: a CUDA driver is installed here ({})",
            match &result {
                Ok(b) => format!("built {b:?}"),
                Err(e) => format!("construction failed anyway: {e}"),
            }
        );
        return;
    }
    match result {
        Err(CudaError::DriverNotFound { searched }) => {
            assert!(searched.contains("libcuda.so"), "{searched}");
        }
        other => panic!("expected DriverNotFound, got {other:?}"),
    }
}

#[test]
fn a_device_that_does_not_exist_is_an_error() {
    // Whatever this machine has, there is no device 4096.
    let e = CudaBackend::new(4096).expect_err("device 4096");
    assert!(
        matches!(
            e,
            CudaError::DriverNotFound { .. }
                | CudaError::NvrtcNotFound { .. }
                | CudaError::CublasNotFound { .. }
                | CudaError::NoDevice { ordinal: 4096, .. }
                | CudaError::Version { .. }
        ),
        "{e:?}"
    );
    // And it converts into sd-models' error for code that only knows that one.
    let message = e.to_string();
    let e: sd_models::Error = e.into();
    match &e {
        sd_models::Error::Backend { backend, source } => {
            assert_eq!(*backend, "cuda");
            assert_eq!(source.to_string(), message);
            assert!(source.downcast_ref::<CudaError>().is_some());
        }
        other => panic!("expected a backend error, got {other:?}"),
    }
    assert_eq!(e.to_string(), format!("cuda: {message}"));
    // A request it cannot serve stays `Unsupported`.
    let e: sd_models::Error = CudaError::Unsupported("dtype u8".into()).into();
    assert!(matches!(e, sd_models::Error::Unsupported(ref m) if m == "cuda: dtype u8"));
}

#[test]
fn the_options_are_checked_too() {
    let o = CudaOptions::new(0).with_upload_dtype(DType::BF16);
    assert_eq!(o.upload_dtype, DType::BF16);
    assert!(CudaBackend::with_options(CudaOptions::new(4096)).is_err());
}

#[test]
fn messages_say_how_to_fix_it() {
    let e = CudaError::NvrtcNotFound {
        searched: "libnvrtc.so.13".into(),
    };
    assert!(e.to_string().contains("install-nvrtc.sh"));
}

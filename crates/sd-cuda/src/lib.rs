//! A CUDA backend for `sd-models`.
//!
//! [`CudaBackend`] implements [`sd_models::Backend`] on an NVIDIA GPU through cudarc:
//! weights and activations stay in device memory in f32, f16 or bf16 (computing and
//! accumulating in f32), all work goes to one stream, and device memory is pooled, so a
//! denoising loop allocates only in its first step.
//!
//! The kernels are CUDA C in this crate (`kernels/*.cu`), compiled at run time by NVRTC for
//! the device's architecture and cached once per process ([`kernels`]): a fused
//! flash-attention kernel (FlashAttention-2's online softmax, tensor cores for f16/bf16, head
//! sizes up to 160 with 40 and 80 padded onto the tensor cores, causal and additive masks),
//! an implicit-GEMM convolution on tensor cores (no unfolded input in memory, split-K for
//! small images), group norm fused with SiLU, layer norm, GEGLU, softmax, broadcast
//! arithmetic, casts and copies. Plain matrix products go to cuBLAS.
//!
//! The crate builds, and its tests pass, on a machine with no GPU and no CUDA toolkit: the
//! driver, NVRTC and cuBLAS are loaded at run time, and their absence is a [`CudaError`] from
//! [`CudaBackend::new`], never a panic. Without a GPU the tests check what can be checked:
//! - `tests/kernels_compile.rs` compiles every kernel for sm_80 and sm_90 with NVRTC alone
//!   (`ci/install-nvrtc.sh` installs it from PyPI and prints the folder for
//!   `LD_LIBRARY_PATH`), reports registers, spills and code sizes, and checks the parameter
//!   structs' layout against the CUDA declarations;
//! - `tests/emulation.rs` runs every kernel on the CPU in an emulator of the CUDA execution
//!   model (threads, barriers, warp shuffles, the `mma.sync` fragment layout) against
//!   double-precision references;
//! - `tests/construction.rs` checks that a missing driver is an error;
//! - `tests/networks.rs` runs its end-to-end harness (the fixture UNets, VAE, CLIP encoders
//!   and pipeline against diffusers) on the CPU backend, the same code its GPU tests run.
//!
//! # On a GPU
//!
//! The GPU tests are `#[ignore]`d: `tests/gpu.rs` (the conformance suite in f32, f16 and
//! bf16, every kernel at SD's shapes against the CPU backend, the pool's steady state) and
//! `tests/networks.rs` (the fixture networks and pipeline end to end: f32 against diffusers,
//! f16 and bf16 against the CPU backend, the f16 VAE staying finite):
//!
//! ```text
//! cargo test -p sd-cuda --release -- --ignored --test-threads 1
//! ```
//!
//! or, built on a machine without a GPU (`cargo test -p sd-cuda --release --no-run` prints the
//! binaries), run as `target/release/deps/gpu-<hash> --ignored --test-threads 1` (and
//! `networks-<hash>`, from the repository root, which holds `fixtures/`) where there is a GPU
//! and no toolchain. `examples/gpu_bench.rs` times the kernels against cuBLAS, and
//! `cargo bench -p sd-benches --bench gpu_unet -- --pytorch python3` the SD 1.5 UNet step
//! against PyTorch. `ci/gpu-prepare.sh` builds all of these into `.device/` here, and
//! `ci/gpu-run.sh` runs them there in one call.
//!
//! ```
//! use sd_models::backend::{DataOps, ActivationOps};
//!
//! let Ok(gpu) = sd_cuda::CudaBackend::new(0) else {
//!     return Ok(()); // no GPU here
//! };
//! let x = gpu.upload(&[-1.0, 0.0, 2.0], &[3])?;
//! let y = gpu.download(&gpu.silu(&x)?)?;
//! assert!((y[2] - 2.0 / (1.0 + (-2.0_f32).exp())).abs() < 1e-6);
//! # Ok::<(), sd_models::Error>(())
//! ```
#![warn(missing_docs)]

mod device;

mod activation;
mod attention;
mod conv;
mod data;
mod elementwise;
mod matmul;
mod norm;
mod pool;
mod resample;
mod tensor;

pub mod error;
pub mod kernels;
pub mod loader;

pub use device::{CudaBackend, CudaOptions};
pub use error::{CudaError, Result};
pub use pool::PoolStats;
pub use tensor::CudaTensor;

/// The `#[repr(C)]` parameter structs passed to kernels, with their sizes and field offsets,
/// so a test can check them against the CUDA declarations (see `tests/kernels_compile.rs`).
pub mod abi {
    use crate::kernels::Module;

    /// A struct shared with the kernels: its CUDA name and module, its size, and its fields'
    /// names and byte offsets.
    #[derive(Debug, Clone)]
    pub struct SharedStruct {
        /// The CUDA struct name.
        pub name: &'static str,
        /// The module declaring it.
        pub module: Module,
        /// `size_of` on the Rust side.
        pub size: usize,
        /// `(field, offset_of)` on the Rust side.
        pub fields: Vec<(&'static str, usize)>,
    }

    macro_rules! shared {
        ($ty:ty, $name:literal, $module:expr, [$($field:ident),+ $(,)?]) => {
            SharedStruct {
                name: $name,
                module: $module,
                size: std::mem::size_of::<$ty>(),
                fields: vec![$((stringify!($field), std::mem::offset_of!($ty, $field))),+],
            }
        };
    }

    /// Every parameter struct.
    pub fn shared_structs() -> Vec<SharedStruct> {
        vec![
            shared!(
                crate::data::PermuteParams,
                "PermuteParams",
                Module::Data,
                [rank, out_shape, in_stride]
            ),
            shared!(
                crate::elementwise::BroadcastParams,
                "BroadcastParams",
                Module::Elementwise,
                [rank, shape, stride_a, stride_b]
            ),
            shared!(
                crate::conv::ConvParams,
                "ConvParams",
                Module::Conv,
                [
                    n,
                    c,
                    h,
                    w,
                    o,
                    kh,
                    kw,
                    ho,
                    wo,
                    sh,
                    sw,
                    ph,
                    pw,
                    k,
                    p,
                    k_tiles_per_split,
                    has_bias
                ]
            ),
            shared!(
                crate::attention::AttnParams,
                "AttnParams",
                Module::Attention,
                [
                    lq, lk, d, dv, heads, scale, causal, has_mask, mask_sb, mask_sh, mask_sq,
                    mask_sk
                ]
            ),
        ]
    }
}

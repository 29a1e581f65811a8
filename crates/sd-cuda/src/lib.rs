//! A CUDA backend for `sd-models`.
//!
//! This crate will hold `CudaBackend`, built on cudarc, with kernels compiled at run time by
//! NVRTC: fused flash-style attention, implicit-GEMM convolution, group and layer norm. It will
//! build and pass its non-GPU tests on a machine with no CUDA toolkit and no GPU.
//!
//! It is an empty shell until the CUDA issue lands.
#![warn(missing_docs)]

//! Stable Diffusion networks over a `Backend` trait.
//!
//! This crate holds the `Backend` trait and its CPU implementation (ndarray, rayon, the `gemm`
//! crate), the CLIP tokenizer and text encoder, safetensors weight loading, and (in later
//! issues) the UNet, the VAE and the pipelines.
#![warn(missing_docs)]

pub mod backend;
pub mod clip;
mod config;
pub mod cpu;
pub mod error;
pub mod nn;
pub mod weights;

pub use backend::Backend;
pub use cpu::{CpuBackend, CpuTensor};
pub use error::{Error, Result};
pub use sd_core;

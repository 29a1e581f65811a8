//! Stable Diffusion networks over a `Backend` trait.
//!
//! | module | what |
//! |---|---|
//! | [`backend`] | the `Backend` trait (op families with defaults) and its conformance suite |
//! | [`cpu`] | `CpuBackend`: its own packed GEMM (AVX-512, AVX2, portable; f32 or bf16 products), fused attention, rayon |
//! | [`weights`] | memory-mapped safetensors (folders, shards, fp16 variants, single-file CompVis checkpoints), typed keys, checked shapes |
//! | [`clip`] | the CLIP tokenizer and text encoder (SD 1.x and 2.x) |
//! | [`unet`] | `UNet2DConditionModel` (SD 1.x, 2.x, inpainting) and `UNet2DModel` (pixel-space DDPM) |
//! | [`vae`] | `AutoencoderKL`: encoder, decoder, tiling, f16-safe decoding |
//! | [`nn`] | the layers and blocks they share, loading from a checkpoint or random weights |
//! | [`pipeline`] | text-to-image, image-to-image, inpainting and outpainting over any backend and sampler |
//!
//! Every network, and the pipelines end to end, match diffusers/transformers on fixtures
//! written by `tools/fixtures`.
#![warn(missing_docs)]

pub mod backend;
pub mod clip;
mod config;
pub mod controlnet;
pub mod cpu;
pub mod error;
pub mod files;
pub mod lora;
pub mod nn;
pub mod pipeline;
pub mod train;
pub mod unet;
pub mod vae;
pub mod weights;

pub use backend::Backend;
pub use cpu::{CpuBackend, CpuTensor};
pub use error::{Error, Result};
pub use sd_core;

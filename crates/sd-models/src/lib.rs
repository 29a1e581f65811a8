//! Stable Diffusion networks over a `Backend` trait.
//!
//! This crate will hold the `Backend` trait and its CPU implementation (ndarray, rayon), the
//! CLIP tokenizer and text encoder, the UNet and the VAE, safetensors weight loading and the
//! pipelines (text-to-image, image-to-image, inpainting, outpainting).
//!
//! It is an empty shell until the sd-models issues land.
#![warn(missing_docs)]

pub use sd_core;

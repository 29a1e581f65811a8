//! Stable Diffusion's VAE, diffusers' `AutoencoderKL`: images to a diagonal Gaussian over
//! latents and latents back to images, whole or tiled, with the pipelines' latent scaling and
//! an `f32` decoder that does not overflow where a naive `f16` one does.
//!
//! ```
//! use sd_models::CpuBackend;
//! use sd_models::backend::{BackendBase, DataOps};
//! use sd_models::vae::{AutoencoderKl, AutoencoderKlConfig};
//!
//! let config = AutoencoderKlConfig::from_json(
//!     r#"{"block_out_channels": [8, 16], "norm_num_groups": 4,
//!         "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
//!         "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
//!     "config.json",
//! )?;
//! let cpu = CpuBackend::new();
//! let vae = AutoencoderKl::random(&cpu, config, 0)?;
//! let image = cpu.upload(&vec![0.5; 3 * 16 * 16], &[1, 3, 16, 16])?;
//! let latents = vae.scale_latents(&cpu, &vae.encode(&cpu, &image)?.mode())?;
//! assert_eq!(cpu.shape(&latents), [1, 4, 8, 8]);
//! let decoded = vae.decode(&cpu, &vae.unscale_latents(&cpu, &latents)?)?;
//! assert_eq!(cpu.shape(&decoded), [1, 3, 16, 16]);
//! # Ok::<(), sd_models::Error>(())
//! ```

pub mod autoencoder_kl;
pub mod config;
pub mod tiling;

pub use autoencoder_kl::{AutoencoderKl, DecoderPrecision, DiagonalGaussian};
pub use config::AutoencoderKlConfig;
pub use tiling::Tiling;

//! The UNets: Stable Diffusion's text-conditioned latent denoiser ([`Unet2DConditionModel`],
//! SD 1.x and 2.x, inpainting, class-conditional and LCM variants) and the pixel-space DDPM
//! network ([`Unet2DModel`]), at diffusers parity, with their configurations and the blocks
//! they share with the VAE.
//!
//! ```
//! use sd_models::CpuBackend;
//! use sd_models::backend::{BackendBase, DataOps};
//! use sd_models::unet::{Unet2DConditionConfig, Unet2DConditionModel};
//!
//! // A tiny SD-1.x-shaped network with random weights.
//! let config = Unet2DConditionConfig::from_json(
//!     r#"{"block_out_channels": [32, 64], "layers_per_block": 1,
//!         "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
//!         "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
//!         "cross_attention_dim": 16, "attention_head_dim": 4, "norm_num_groups": 8}"#,
//!     "config.json",
//! )?;
//! let cpu = CpuBackend::new();
//! let unet = Unet2DConditionModel::random(&cpu, config, 0)?;
//! let latents = cpu.upload(&vec![0.1; 2 * 4 * 8 * 8], &[2, 4, 8, 8])?;
//! let text = cpu.upload(&vec![0.5; 2 * 5 * 16], &[2, 5, 16])?;
//! let noise = unet.forward(&cpu, &latents, &[999.0], &text)?;
//! assert_eq!(cpu.shape(&noise), [2, 4, 8, 8]);
//! # Ok::<(), sd_models::Error>(())
//! ```

pub mod blocks;
pub mod condition;
pub mod config;
pub mod encoder;
pub mod unet2d;

pub use condition::Unet2DConditionModel;
pub use config::{
    DownBlockType, MidBlockType, PerBlock, SampleSize, Unet2DConditionConfig, Unet2DConfig,
    UpBlockType,
};
pub use encoder::{UnetConditioning, UnetEncoder};
pub use unet2d::Unet2DModel;

//! ControlNet (Zhang et al., 2023): a copy of the UNet's encoder, fed a control image (edges,
//! depth, pose, scribble), whose outputs are added to the UNet's skip connections so that the
//! picture follows the control image. diffusers' `ControlNetModel` for Stable Diffusion 1.x
//! and 2.x, loaded from diffusers folders or from the single files of the original releases.
//!
//! ```
//! use sd_models::CpuBackend;
//! use sd_models::backend::{BackendBase, DataOps};
//! use sd_models::controlnet::{ControlInput, ControlNetConfig, ControlNetModel, ControlScale};
//! use sd_models::unet::{Unet2DConditionConfig, Unet2DConditionModel, UnetConditioning};
//!
//! // A tiny SD-1.x-shaped UNet and its ControlNet, with random weights.
//! let config = Unet2DConditionConfig::from_json(
//!     r#"{"block_out_channels": [32, 64], "layers_per_block": 1,
//!         "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
//!         "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
//!         "cross_attention_dim": 16, "attention_head_dim": 4, "norm_num_groups": 8}"#,
//!     "config.json",
//! )?;
//! let cpu = CpuBackend::new();
//! let controlnet = ControlNetModel::random(&cpu, ControlNetConfig::for_unet(&config), 1)?;
//! let unet = Unet2DConditionModel::random(&cpu, config, 0)?;
//!
//! // The control image (in [0, 1], 8 pixels per latent pixel) is embedded once.
//! let edges = cpu.upload(&vec![0.5; 3 * 64 * 64], &[1, 3, 64, 64])?;
//! let hint = controlnet.embed_hint(&cpu, &edges)?;
//!
//! let latents = cpu.upload(&vec![0.1; 2 * 4 * 8 * 8], &[2, 4, 8, 8])?;
//! let text = cpu.upload(&vec![0.5; 2 * 5 * 16], &[2, 5, 16])?;
//! let control = ControlInput::new(&hint, ControlScale::default());
//! let residuals = controlnet.forward(&cpu, &latents, &[999.0], &text, &control)?;
//! let extra = UnetConditioning {
//!     down_residuals: Some(&residuals.down),
//!     mid_residual: Some(&residuals.mid),
//!     ..UnetConditioning::default()
//! };
//! let noise = unet.forward_with(&cpu, &latents, &[999.0], &text, &extra)?;
//! assert_eq!(cpu.shape(&noise), [2, 4, 8, 8]);
//! # Ok::<(), sd_models::Error>(())
//! ```

pub mod config;
pub mod model;

pub use config::{ChannelOrder, ControlNetConfig};
pub use model::{
    ControlHint, ControlInput, ControlNetConditioningEmbedding, ControlNetModel, ControlNetOutput,
    ControlScale,
};

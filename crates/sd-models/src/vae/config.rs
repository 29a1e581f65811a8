//! The VAE's `config.json` (diffusers' `AutoencoderKL`), every key diffusers writes, with its
//! defaults; unknown keys are an error.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nn::Activation;
use crate::unet::config::{DownBlockType, SampleSize, UpBlockType};

/// diffusers' `AutoencoderKL` config, with its defaults for missing keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct AutoencoderKlConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// The encoder's blocks (all `DownEncoderBlock2D`).
    pub down_block_types: Vec<DownBlockType>,
    /// The decoder's blocks (all `UpDecoderBlock2D`).
    pub up_block_types: Vec<UpBlockType>,
    /// Channels of each block.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    /// The activation.
    pub act_fn: Activation,
    /// Latent channels (4 for Stable Diffusion).
    pub latent_channels: usize,
    /// Groups of every group norm.
    pub norm_num_groups: usize,
    /// The image size the VAE was trained at: the tile size of tiled encoding and decoding.
    pub sample_size: SampleSize,
    /// Latents are multiplied by this after encoding (0.18215 for Stable Diffusion 1.x and
    /// 2.x).
    pub scaling_factor: f64,
    /// Subtracted from latents before scaling (SD3, Flux); `None` for 0.
    pub shift_factor: Option<f64>,
    /// Per-channel latent statistics some pipelines normalise with (informational here).
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent statistics some pipelines normalise with (informational here).
    pub latents_std: Option<Vec<f64>>,
    /// The decoder overflows in `f16`: pipelines run it in `f32` (the default of
    /// [`DecoderPrecision`](super::DecoderPrecision) does).
    pub force_upcast: bool,
    /// Whether the encoder output passes through `quant_conv`.
    pub use_quant_conv: bool,
    /// Whether latents pass through `post_quant_conv` before decoding.
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have attention.
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKlConfig {
    fn default() -> Self {
        AutoencoderKlConfig {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec![DownBlockType::DownEncoderBlock2D],
            up_block_types: vec![UpBlockType::UpDecoderBlock2D],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: Activation::Silu,
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: SampleSize::Square(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

const KEYS: &[&str] = &[
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "act_fn",
    "latent_channels",
    "norm_num_groups",
    "sample_size",
    "scaling_factor",
    "shift_factor",
    "latents_mean",
    "latents_std",
    "force_upcast",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
];

impl AutoencoderKlConfig {
    /// Parses a `config.json`'s text; `what` names it in errors.
    ///
    /// # Errors
    /// [`Error::Config`] for malformed JSON, an unknown key or block type, a wrong value, or
    /// an impossible combination (see [`validate`](Self::validate)).
    pub fn from_json(json: &str, what: &str) -> Result<Self> {
        let config: Self = crate::config::parse(json, what, KEYS)?;
        config.validate(what)?;
        Ok(config)
    }

    /// Reads a `config.json`.
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read; as [`from_json`](Self::from_json).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let config: Self = crate::config::read(path, KEYS)?;
        config.validate(&path.display().to_string())?;
        Ok(config)
    }

    /// Stable Diffusion 1.5's VAE (`presets/sd15/vae.json`): 83,653,863 parameters, 512-pixel
    /// tiles.
    ///
    /// # Errors
    /// None in practice: the preset is parsed and validated like any config (and tested).
    pub fn stable_diffusion_1_5() -> Result<Self> {
        Self::from_json(
            include_str!("../../presets/sd15/vae.json"),
            "presets/sd15/vae.json",
        )
    }

    /// Stable Diffusion 2.1's VAE (`presets/sd21/vae.json`): the same network, 768-pixel tiles.
    ///
    /// # Errors
    /// None in practice: the preset is parsed and validated like any config (and tested).
    pub fn stable_diffusion_2_1() -> Result<Self> {
        Self::from_json(
            include_str!("../../presets/sd21/vae.json"),
            "presets/sd21/vae.json",
        )
    }

    /// How much the VAE downsamples (`2^(blocks - 1)`, 8 for Stable Diffusion).
    pub fn downsample_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Rejects impossible configurations.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key and the problem.
    pub fn validate(&self, what: &str) -> Result<()> {
        let error = |message: String| Error::Config {
            what: what.to_string(),
            message,
        };
        let blocks = self.block_out_channels.len();
        if blocks == 0 {
            return Err(error("block_out_channels is empty".into()));
        }
        crate::config::check_network_bounds(
            what,
            &self.block_out_channels,
            &[self.layers_per_block],
            &[],
        )?;
        if self.down_block_types.len() != blocks || self.up_block_types.len() != blocks {
            return Err(error(format!(
                "{} down_block_types and {} up_block_types for {blocks} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| **t != DownBlockType::DownEncoderBlock2D)
        {
            return Err(error(format!("down block {t:?} in a VAE encoder")));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| **t != UpBlockType::UpDecoderBlock2D)
        {
            return Err(error(format!("up block {t:?} in a VAE decoder")));
        }
        for (key, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("layers_per_block", self.layers_per_block),
            ("latent_channels", self.latent_channels),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            if v == 0 {
                return Err(error(format!("{key} must be positive")));
            }
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 || !c.is_multiple_of(self.norm_num_groups) {
                return Err(error(format!(
                    "block_out_channels[{i}] = {c} is not a positive multiple of \
                     norm_num_groups {}",
                    self.norm_num_groups
                )));
            }
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return Err(error(format!(
                "scaling_factor {} must be finite and non-zero",
                self.scaling_factor
            )));
        }
        let (h, w) = self.sample_size.height_width();
        if h == 0 || w == 0 {
            return Err(error("sample_size must be positive".into()));
        }
        Ok(())
    }
}

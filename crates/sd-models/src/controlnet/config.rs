//! diffusers' `ControlNetModel` config (`models/controlnets/controlnet.py`), every key it
//! writes, with its defaults; unknown keys are an error.
//!
//! The network's encoder half is the conditional UNet's, so the shared keys mean what they
//! mean there ([`Unet2DConditionConfig`]), including `attention_head_dim`, which counts
//! heads. [`ControlNetConfig::unet_config`] gives the UNet config the encoder is built from.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nn::{Activation, ClassEmbedType, TimeEmbeddingNorm};
use crate::unet::{DownBlockType, MidBlockType, PerBlock, Unet2DConditionConfig, UpBlockType};

/// The order of the control image's channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    /// Red, green, blue (every released ControlNet).
    #[default]
    Rgb,
    /// Blue, green, red: the image's channels are reversed before the hint network.
    Bgr,
}

/// diffusers' `ControlNetModel` config, with its defaults for missing keys (SD 1.x's encoder
/// except `cross_attention_dim` 1280, as diffusers).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ControlNetConfig {
    /// Input channels of the latents.
    pub in_channels: usize,
    /// Channels of the control image (3).
    pub conditioning_channels: usize,
    /// Cosines first in the time embedding.
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the time embedding.
    pub freq_shift: f64,
    /// The down blocks.
    pub down_block_types: Vec<DownBlockType>,
    /// The middle block.
    pub mid_block_type: Option<MidBlockType>,
    /// `attn1` attends to the text embeddings too.
    pub only_cross_attention: PerBlock<bool>,
    /// Channels of each block.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block.
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the downsampling convolutions.
    pub downsample_padding: usize,
    /// `output_scale_factor` of the mid block.
    pub mid_block_scale_factor: f64,
    /// The activation of resnets and time embedding.
    pub act_fn: Activation,
    /// Groups of every group norm.
    pub norm_num_groups: Option<usize>,
    /// Epsilon of the norms.
    pub norm_eps: f64,
    /// Width of the text embeddings.
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer blocks per cross-attention layer.
    pub transformer_layers_per_block: PerBlock<PerBlock<usize>>,
    /// Unsupported (must be `null`).
    pub encoder_hid_dim: Option<usize>,
    /// Unsupported (must be `null`).
    pub encoder_hid_dim_type: Option<String>,
    /// The number of heads per block (as in the UNet's config).
    pub attention_head_dim: PerBlock<usize>,
    /// The number of heads, overriding `attention_head_dim` when given.
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Linear rather than 1x1 convolution transformer projections (SD 2.x).
    pub use_linear_projection: bool,
    /// The class embedding, if any.
    pub class_embed_type: Option<ClassEmbedType>,
    /// `null`, or SDXL's `"text_time"` (as the UNet's).
    pub addition_embed_type: Option<String>,
    /// Width of each micro-conditioning id's embedding with `"text_time"`.
    pub addition_time_embed_dim: Option<usize>,
    /// Size of the class table (with no `class_embed_type`).
    pub num_class_embeds: Option<usize>,
    /// Attention in `f32` for half-precision activations.
    #[serde(deserialize_with = "crate::unet::config::null_is_false")]
    pub upcast_attention: bool,
    /// How resnets take the time embedding.
    pub resnet_time_scale_shift: TimeEmbeddingNorm,
    /// Width of the class label vectors for `"projection"` class embeddings.
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// The order of the control image's channels.
    pub controlnet_conditioning_channel_order: ChannelOrder,
    /// Channels of the hint network's convolutions (each step after the first halves the
    /// resolution: `(16, 32, 96, 256)` goes from pixels to latents, by 8).
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// The residuals are averaged over height and width (the "shuffle" ControlNets).
    pub global_pool_conditions: bool,
    /// Ignored without `addition_embed_type`.
    pub addition_embed_type_num_heads: usize,
}

impl Default for ControlNetConfig {
    fn default() -> Self {
        let unet = Unet2DConditionConfig::default();
        ControlNetConfig {
            in_channels: 4,
            conditioning_channels: 3,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: unet.down_block_types,
            mid_block_type: unet.mid_block_type,
            only_cross_attention: PerBlock::All(false),
            block_out_channels: unet.block_out_channels,
            layers_per_block: PerBlock::All(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: Activation::Silu,
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::All(1280),
            transformer_layers_per_block: PerBlock::All(PerBlock::All(1)),
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: TimeEmbeddingNorm::Default,
            projection_class_embeddings_input_dim: None,
            controlnet_conditioning_channel_order: ChannelOrder::Rgb,
            conditioning_embedding_out_channels: vec![16, 32, 96, 256],
            global_pool_conditions: false,
            addition_embed_type_num_heads: 64,
        }
    }
}

const KEYS: &[&str] = &[
    "in_channels",
    "conditioning_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
    "controlnet_conditioning_channel_order",
    "conditioning_embedding_out_channels",
    "global_pool_conditions",
    "addition_embed_type_num_heads",
];

impl ControlNetConfig {
    /// Parses a `config.json`'s text; `what` names it in errors.
    ///
    /// # Errors
    /// [`Error::Config`] for malformed JSON, an unknown key or block type, a wrong value, or
    /// an unsupported or impossible combination (see [`validate`](Self::validate)).
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

    /// The ControlNet of a UNet: its encoder's configuration with the default hint network
    /// (`ControlNetModel.from_unet`).
    #[must_use]
    pub fn for_unet(unet: &Unet2DConditionConfig) -> Self {
        ControlNetConfig {
            in_channels: unet.in_channels,
            flip_sin_to_cos: unet.flip_sin_to_cos,
            freq_shift: unet.freq_shift,
            down_block_types: unet.down_block_types.clone(),
            mid_block_type: unet.mid_block_type,
            only_cross_attention: unet.only_cross_attention.clone(),
            block_out_channels: unet.block_out_channels.clone(),
            layers_per_block: unet.layers_per_block.clone(),
            downsample_padding: unet.downsample_padding,
            mid_block_scale_factor: unet.mid_block_scale_factor,
            act_fn: unet.act_fn,
            norm_num_groups: unet.norm_num_groups,
            norm_eps: unet.norm_eps,
            cross_attention_dim: unet.cross_attention_dim.clone(),
            transformer_layers_per_block: unet.transformer_layers_per_block.clone(),
            attention_head_dim: unet.attention_head_dim.clone(),
            use_linear_projection: unet.use_linear_projection,
            class_embed_type: unet.class_embed_type,
            num_class_embeds: unet.num_class_embeds,
            upcast_attention: unet.upcast_attention,
            resnet_time_scale_shift: unet.resnet_time_scale_shift,
            projection_class_embeddings_input_dim: unet.projection_class_embeddings_input_dim,
            ..ControlNetConfig::default()
        }
    }

    /// The configuration of the UNet whose encoder half this network copies (its up blocks
    /// mirror the down blocks; they are never built).
    #[must_use]
    pub fn unet_config(&self) -> Unet2DConditionConfig {
        let up_block_types = self
            .down_block_types
            .iter()
            .rev()
            .map(|t| match t {
                DownBlockType::CrossAttnDownBlock2D => UpBlockType::CrossAttnUpBlock2D,
                _ => UpBlockType::UpBlock2D,
            })
            .collect();
        Unet2DConditionConfig {
            in_channels: self.in_channels,
            out_channels: self.in_channels,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            down_block_types: self.down_block_types.clone(),
            mid_block_type: self.mid_block_type,
            up_block_types,
            only_cross_attention: self.only_cross_attention.clone(),
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block.clone(),
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            act_fn: self.act_fn,
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            cross_attention_dim: self.cross_attention_dim.clone(),
            transformer_layers_per_block: self.transformer_layers_per_block.clone(),
            encoder_hid_dim: self.encoder_hid_dim,
            encoder_hid_dim_type: self.encoder_hid_dim_type.clone(),
            attention_head_dim: self
                .num_attention_heads
                .clone()
                .unwrap_or_else(|| self.attention_head_dim.clone()),
            use_linear_projection: self.use_linear_projection,
            class_embed_type: self.class_embed_type,
            addition_embed_type: self.addition_embed_type.clone(),
            addition_time_embed_dim: self.addition_time_embed_dim,
            num_class_embeds: self.num_class_embeds,
            upcast_attention: self.upcast_attention,
            resnet_time_scale_shift: self.resnet_time_scale_shift,
            projection_class_embeddings_input_dim: self.projection_class_embeddings_input_dim,
            addition_embed_type_num_heads: self.addition_embed_type_num_heads,
            ..Unet2DConditionConfig::default()
        }
    }

    /// How much the hint network downsamples the control image: `2^(stages - 1)`.
    pub fn hint_downsample_factor(&self) -> usize {
        1 << self
            .conditioning_embedding_out_channels
            .len()
            .saturating_sub(1)
    }

    /// The channels of each residual for the skip connections, in the UNet's order:
    /// `conv_in`'s, then one per down-block resnet and downsampler.
    pub fn down_residual_widths(&self) -> Vec<usize> {
        let channels = &self.block_out_channels;
        let mut widths: Vec<usize> = channels.first().copied().into_iter().collect();
        for (i, &c) in channels.iter().enumerate() {
            let layers = self.layers_per_block.get(i).unwrap_or(0);
            let downsampler = usize::from(i + 1 < channels.len());
            widths.extend(std::iter::repeat_n(c, layers + downsampler));
        }
        widths
    }

    /// The number of residuals for the skip connections (12 for Stable Diffusion).
    pub fn down_residual_count(&self) -> usize {
        self.down_residual_widths().len()
    }

    /// Rejects unsupported and impossible configurations.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key and the problem.
    pub fn validate(&self, what: &str) -> Result<()> {
        let error = |message: String| Error::Config {
            what: what.to_string(),
            message,
        };
        self.unet_config().validate(what)?;
        // diffusers' ControlNetModel has no build without a mid block, nor a
        // "simple_projection" class embedding.
        if self.mid_block_type.is_none() {
            return Err(error(
                "mid_block_type null: a ControlNet has a mid block".into(),
            ));
        }
        if self.class_embed_type == Some(ClassEmbedType::SimpleProjection) {
            return Err(error(
                "class_embed_type \"simple_projection\" is not one a ControlNet takes".into(),
            ));
        }
        if self.conditioning_channels == 0 {
            return Err(error("conditioning_channels must be positive".into()));
        }
        if self.conditioning_embedding_out_channels.is_empty()
            || self.conditioning_embedding_out_channels.contains(&0)
        {
            return Err(error(format!(
                "conditioning_embedding_out_channels {:?} must be positive widths",
                self.conditioning_embedding_out_channels
            )));
        }
        if self.conditioning_embedding_out_channels.len() > 8 {
            return Err(error(format!(
                "conditioning_embedding_out_channels has {} entries: at most 8 are supported",
                self.conditioning_embedding_out_channels.len()
            )));
        }
        Ok(())
    }
}

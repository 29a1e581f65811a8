//! The UNets' `config.json`: diffusers' `UNet2DConditionModel` (Stable Diffusion's latent
//! denoiser) and `UNet2DModel` (the pixel-space DDPM network), every key diffusers writes,
//! with its defaults; unknown keys are an error.
//!
//! Two reference names mislead, and are kept because the file format forces them:
//!
//! - In `UNet2DConditionModel`, `attention_head_dim` is the **number of heads** of each
//!   block's transformer (diffusers issue 2011: `num_attention_heads` was never used, and
//!   diffusers 0.42 still rejects it). Stable Diffusion 1.x has 8 heads everywhere, so heads
//!   of 40, 80 and 160 channels; 2.x has `[5, 10, 20, 20]`, heads of 64 channels. Read it
//!   through [`Unet2DConditionConfig::heads`].
//! - In `UNet2DModel`, `attention_head_dim` really is the width of a head (`None`: one head
//!   as wide as the block); see [`Unet2DConfig::head_dim`].

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nn::{Activation, ClassEmbedType, TimeEmbeddingNorm};

/// A field that is a number for every block or a list with one per block.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// One per block.
    Each(Vec<T>),
    /// The same for every block.
    All(T),
}

impl<T: Clone> PerBlock<T> {
    /// The value of block `block`, if there is one.
    pub fn get(&self, block: usize) -> Option<T> {
        match self {
            PerBlock::All(v) => Some(v.clone()),
            PerBlock::Each(v) => v.get(block).cloned(),
        }
    }

    fn check_len(&self, blocks: usize, name: &str, error: &dyn Fn(String) -> Error) -> Result<()> {
        match self {
            PerBlock::Each(v) if v.len() != blocks => Err(error(format!(
                "{name} has {} entries for {blocks} blocks",
                v.len()
            ))),
            _ => Ok(()),
        }
    }

    fn values(&self) -> Vec<T> {
        match self {
            PerBlock::All(v) => vec![v.clone()],
            PerBlock::Each(v) => v.clone(),
        }
    }
}

/// `sample_size`: the training resolution (latent pixels for `UNet2DConditionModel`), one
/// number or `[height, width]`. Informational: any size the network can downsample runs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    /// Square.
    Square(usize),
    /// `[height, width]`.
    Pair(Vec<usize>),
}

impl SampleSize {
    /// `(height, width)`.
    pub fn height_width(&self) -> (usize, usize) {
        match self {
            SampleSize::Square(s) => (*s, *s),
            SampleSize::Pair(v) => (
                v.first().copied().unwrap_or(0),
                v.get(1).copied().unwrap_or(0),
            ),
        }
    }
}

/// A down block (diffusers' `down_block_types` and the VAE encoder's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[non_exhaustive]
pub enum DownBlockType {
    /// Resnets, each followed by a transformer with cross-attention; then a downsampler.
    CrossAttnDownBlock2D,
    /// Resnets, then a downsampler.
    DownBlock2D,
    /// Resnets, each followed by spatial self-attention; then a downsampler
    /// (`UNet2DModel`).
    AttnDownBlock2D,
    /// The VAE encoder's: resnets without time embedding, then a downsampler.
    DownEncoderBlock2D,
}

/// An up block (diffusers' `up_block_types` and the VAE decoder's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[non_exhaustive]
pub enum UpBlockType {
    /// Resnets on the skip connections, each followed by a cross-attention transformer;
    /// then an upsampler.
    CrossAttnUpBlock2D,
    /// Resnets on the skip connections, then an upsampler.
    UpBlock2D,
    /// Resnets on the skip connections, each followed by spatial self-attention; then an
    /// upsampler (`UNet2DModel`).
    AttnUpBlock2D,
    /// The VAE decoder's: resnets without skips or time embedding, then an upsampler.
    UpDecoderBlock2D,
}

/// The middle block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[non_exhaustive]
pub enum MidBlockType {
    /// Resnet, then (transformer, resnet) pairs.
    #[serde(rename = "UNetMidBlock2DCrossAttn")]
    UnetMidBlock2DCrossAttn,
    /// Resnet, then (spatial attention, resnet) pairs; in `UNet2DConditionModel` a single
    /// resnet.
    #[serde(rename = "UNetMidBlock2D")]
    UnetMidBlock2D,
}

fn error_for(what: &str) -> impl Fn(String) -> Error + '_ {
    move |message| Error::Config {
        what: what.to_string(),
        message,
    }
}

/// diffusers' `UNet2DConditionModel` config, with its defaults for missing keys (those of
/// Stable Diffusion 1.x, except `cross_attention_dim` 1280).
///
/// Supported: `CrossAttnDownBlock2D`/`DownBlock2D` down blocks, `CrossAttnUpBlock2D`/
/// `UpBlock2D` up blocks, a `UNetMidBlock2DCrossAttn`, `UNetMidBlock2D` or no mid block,
/// positional time embeddings, class embeddings, LCM's `time_cond_proj_dim`, SDXL's
/// `addition_embed_type: "text_time"` and per-block `transformer_layers_per_block`. Keys for
/// other networks (Kandinsky's `addition_embed_type` values and
/// `encoder_hid_dim_type`, GLIGEN's `attention_type`, Fourier time embeddings, dual
/// cross-attention) parse, and [`validate`](Self::validate) rejects values other than the
/// defaults. `resnet_skip_time_act`, `resnet_out_scale_factor`, `cross_attention_norm` and
/// `mid_block_only_cross_attention` only affect block types that are not supported and are
/// ignored, as diffusers ignores them for these blocks; `dropout` does nothing at inference.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Unet2DConditionConfig {
    /// Training resolution in latent pixels (informational).
    pub sample_size: Option<SampleSize>,
    /// Input channels: 4, 9 for inpainting (latents, mask, masked-image latents).
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Map the input from `[0, 1]` to `[-1, 1]` first.
    pub center_input_sample: bool,
    /// Cosines first in the time embedding.
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the time embedding.
    pub freq_shift: f64,
    /// The down blocks, from the input resolution down.
    pub down_block_types: Vec<DownBlockType>,
    /// The middle block; `None` for none.
    pub mid_block_type: Option<MidBlockType>,
    /// The up blocks, from the lowest resolution up.
    pub up_block_types: Vec<UpBlockType>,
    /// `attn1` attends to the text embeddings too.
    pub only_cross_attention: PerBlock<bool>,
    /// Channels of each block.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the downsampling convolutions (0: diffusers' asymmetric padding).
    pub downsample_padding: usize,
    /// `output_scale_factor` of the mid block.
    pub mid_block_scale_factor: f64,
    /// Training only.
    pub dropout: f64,
    /// The activation of resnets and time embedding.
    pub act_fn: Activation,
    /// Groups of every group norm (diffusers accepts `null` only for blocks not supported
    /// here).
    pub norm_num_groups: Option<usize>,
    /// Epsilon of the resnets' group norms and the output norm.
    pub norm_eps: f64,
    /// Width of the text embeddings (all blocks must agree).
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer blocks per cross-attention layer: one number, one per block, or one list
    /// per block with one per layer.
    pub transformer_layers_per_block: PerBlock<PerBlock<usize>>,
    /// The up blocks' counts when `transformer_layers_per_block` has per-layer lists.
    pub reverse_transformer_layers_per_block: Option<Vec<PerBlock<usize>>>,
    /// Unsupported (must be `null`).
    pub encoder_hid_dim: Option<usize>,
    /// Unsupported (must be `null`).
    pub encoder_hid_dim_type: Option<String>,
    /// The number of heads (see the module documentation and [`heads`](Self::heads)).
    pub attention_head_dim: PerBlock<usize>,
    /// Must be `null` (diffusers 0.42 rejects it too).
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Unsupported (must be `false`).
    pub dual_cross_attention: bool,
    /// Linear rather than 1x1 convolution transformer projections (Stable Diffusion 2.x).
    pub use_linear_projection: bool,
    /// The class embedding, if any.
    pub class_embed_type: Option<ClassEmbedType>,
    /// `null`, or SDXL's `"text_time"`: the pooled text embeddings and the sinusoidal
    /// embeddings of the micro-conditioning ids, through `add_embedding`, added to the time
    /// embedding.
    pub addition_embed_type: Option<String>,
    /// Width of each id's sinusoidal embedding with `"text_time"` (256 in SDXL).
    pub addition_time_embed_dim: Option<usize>,
    /// Size of the class table (with no `class_embed_type`).
    pub num_class_embeds: Option<usize>,
    /// Attention in `f32` for half-precision activations (Stable Diffusion 2.x); `null`
    /// (SDXL's config) is `false`, as in diffusers.
    #[serde(deserialize_with = "null_is_false")]
    pub upcast_attention: bool,
    /// How resnets take the time embedding.
    pub resnet_time_scale_shift: TimeEmbeddingNorm,
    /// Ignored (only for unsupported block types).
    pub resnet_skip_time_act: bool,
    /// Ignored (only for unsupported block types).
    pub resnet_out_scale_factor: f64,
    /// Must be `"positional"`.
    pub time_embedding_type: String,
    /// Width of the time embedding (default `4 * block_out_channels[0]`).
    pub time_embedding_dim: Option<usize>,
    /// An activation applied once to the time embedding.
    pub time_embedding_act_fn: Option<Activation>,
    /// An activation after the time embedding's second linear layer.
    pub timestep_post_act: Option<Activation>,
    /// Width of the guidance embedding added to the time projection (LCM).
    pub time_cond_proj_dim: Option<usize>,
    /// Kernel of `conv_in` (odd).
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out` (odd).
    pub conv_out_kernel: usize,
    /// Width of the class label vectors for `"projection"` class embeddings, and of
    /// `add_embedding`'s input with `"text_time"` (the pooled text width plus the ids'
    /// embeddings: 1280 + 6 x 256 = 2816 in SDXL).
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Must be `"default"`.
    pub attention_type: String,
    /// Concatenate the class embedding to the time embedding instead of adding it.
    pub class_embeddings_concat: bool,
    /// Ignored (only for unsupported mid blocks).
    pub mid_block_only_cross_attention: Option<bool>,
    /// Ignored (only for unsupported block types).
    pub cross_attention_norm: Option<String>,
    /// Ignored without `addition_embed_type`.
    pub addition_embed_type_num_heads: usize,
}

/// A boolean that may be `null` (false), as Python reads `None`.
pub(crate) fn null_is_false<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

impl Default for Unet2DConditionConfig {
    fn default() -> Self {
        Unet2DConditionConfig {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                DownBlockType::CrossAttnDownBlock2D,
                DownBlockType::CrossAttnDownBlock2D,
                DownBlockType::CrossAttnDownBlock2D,
                DownBlockType::DownBlock2D,
            ],
            mid_block_type: Some(MidBlockType::UnetMidBlock2DCrossAttn),
            up_block_types: vec![
                UpBlockType::UpBlock2D,
                UpBlockType::CrossAttnUpBlock2D,
                UpBlockType::CrossAttnUpBlock2D,
                UpBlockType::CrossAttnUpBlock2D,
            ],
            only_cross_attention: PerBlock::All(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::All(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: Activation::Silu,
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::All(1280),
            transformer_layers_per_block: PerBlock::All(PerBlock::All(1)),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: TimeEmbeddingNorm::Default,
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".into(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            addition_embed_type_num_heads: 64,
        }
    }
}

const CONDITION_KEYS: &[&str] = &[
    "sample_size",
    "in_channels",
    "out_channels",
    "center_input_sample",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "dropout",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "reverse_transformer_layers_per_block",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "attention_head_dim",
    "num_attention_heads",
    "dual_cross_attention",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "resnet_skip_time_act",
    "resnet_out_scale_factor",
    "time_embedding_type",
    "time_embedding_dim",
    "time_embedding_act_fn",
    "timestep_post_act",
    "time_cond_proj_dim",
    "conv_in_kernel",
    "conv_out_kernel",
    "projection_class_embeddings_input_dim",
    "attention_type",
    "class_embeddings_concat",
    "mid_block_only_cross_attention",
    "cross_attention_norm",
    "addition_embed_type_num_heads",
];

impl Unet2DConditionConfig {
    /// Parses a `config.json`'s text; `what` names it in errors.
    ///
    /// # Errors
    /// [`Error::Config`] for malformed JSON, an unknown key or block type, a wrong value, or
    /// an unsupported or impossible combination (see [`validate`](Self::validate)).
    pub fn from_json(json: &str, what: &str) -> Result<Self> {
        let config: Self = crate::config::parse(json, what, CONDITION_KEYS)?;
        config.validate(what)?;
        Ok(config)
    }

    /// Reads a `config.json`.
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read; as [`from_json`](Self::from_json).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let config: Self = crate::config::read(path, CONDITION_KEYS)?;
        config.validate(&path.display().to_string())?;
        Ok(config)
    }

    /// Stable Diffusion 1.5's UNet (`presets/sd15/unet.json`, as the model repository has
    /// it): 859,520,964 parameters.
    ///
    /// ```
    /// use sd_models::unet::Unet2DConditionConfig;
    ///
    /// let config = Unet2DConditionConfig::stable_diffusion_1_5()?;
    /// assert_eq!(config.heads(0), Some(8));
    /// assert_eq!(config.head_width(0), Some(40));
    /// # Ok::<(), sd_models::Error>(())
    /// ```
    ///
    /// # Errors
    /// None in practice: the preset is parsed and validated like any config (and tested).
    pub fn stable_diffusion_1_5() -> Result<Self> {
        Self::from_json(
            include_str!("../../presets/sd15/unet.json"),
            "presets/sd15/unet.json",
        )
    }

    /// Stable Diffusion XL base's UNet (`presets/sdxl/unet.json`): no attention in the first
    /// level, 1, 2 and 10 transformer blocks, 64-wide heads, the `"text_time"` added
    /// embedding; 2,567,463,684 parameters.
    ///
    /// ```
    /// use sd_models::unet::Unet2DConditionConfig;
    ///
    /// let config = Unet2DConditionConfig::stable_diffusion_xl()?;
    /// assert_eq!(config.text_time_dims(), Some((2816, 256)));
    /// assert_eq!(config.mid_transformer_layers(), Some(10));
    /// # Ok::<(), sd_models::Error>(())
    /// ```
    ///
    /// # Errors
    /// None in practice: the preset is parsed and validated like any config (and tested).
    pub fn stable_diffusion_xl() -> Result<Self> {
        Self::from_json(
            include_str!("../../presets/sdxl/unet.json"),
            "presets/sdxl/unet.json",
        )
    }

    /// Stable Diffusion 2.1's UNet (`presets/sd21/unet.json`): heads of 64 channels, linear
    /// projections, upcast attention; 865,910,724 parameters.
    ///
    /// # Errors
    /// None in practice: the preset is parsed and validated like any config (and tested).
    pub fn stable_diffusion_2_1() -> Result<Self> {
        Self::from_json(
            include_str!("../../presets/sd21/unet.json"),
            "presets/sd21/unet.json",
        )
    }

    /// The number of blocks on each side.
    pub fn blocks(&self) -> usize {
        self.block_out_channels.len()
    }

    /// The number of attention heads of block `block` (counted from the input side; the up
    /// blocks use the reversed list): diffusers' `attention_head_dim`, which in this model
    /// counts heads. The mid block uses the last block's.
    pub fn heads(&self, block: usize) -> Option<usize> {
        self.attention_head_dim.get(block)
    }

    /// The width of each head of block `block`: its channels divided by [`heads`](Self::heads).
    pub fn head_width(&self, block: usize) -> Option<usize> {
        let heads = self.heads(block)?;
        Some(self.block_out_channels.get(block)? / heads.max(1))
    }

    /// The width of the text embeddings of block `block`.
    pub fn cross_attention_dim(&self, block: usize) -> Option<usize> {
        self.cross_attention_dim.get(block)
    }

    /// The width of the time embedding (`time_embedding_dim`, default
    /// `4 * block_out_channels[0]`).
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or_else(|| 4 * self.block_out_channels.first().copied().unwrap_or(0))
    }

    /// How much the network downsamples: the latent height and width must be multiples of
    /// this (`2^(blocks - 1)`).
    pub fn downsample_factor(&self) -> usize {
        1 << self.blocks().saturating_sub(1)
    }

    /// The number of transformer blocks of layer `layer` of down block `block`.
    pub fn down_transformer_layers(&self, block: usize, layer: usize) -> Option<usize> {
        self.transformer_layers_per_block.get(block)?.get(layer)
    }

    /// The number of transformer blocks of layer `layer` of up block `block` (counted from
    /// the lowest resolution).
    pub fn up_transformer_layers(&self, block: usize, layer: usize) -> Option<usize> {
        match &self.reverse_transformer_layers_per_block {
            Some(reverse) => reverse.get(block)?.get(layer),
            None => {
                let mirrored = self.blocks().checked_sub(block + 1)?;
                self.transformer_layers_per_block.get(mirrored)?.get(layer)
            }
        }
    }

    /// The number of transformer blocks of the mid block's transformer.
    pub fn mid_transformer_layers(&self) -> Option<usize> {
        self.transformer_layers_per_block
            .get(self.blocks().checked_sub(1)?)?
            .get(0)
    }

    /// With SDXL's `"text_time"` added embedding: `add_embedding`'s input width
    /// (`projection_class_embeddings_input_dim`) and each id's embedding width
    /// (`addition_time_embed_dim`).
    pub fn text_time_dims(&self) -> Option<(usize, usize)> {
        if self.addition_embed_type.as_deref() != Some("text_time") {
            return None;
        }
        Some((
            self.projection_class_embeddings_input_dim?,
            self.addition_time_embed_dim?,
        ))
    }

    /// Rejects unsupported and impossible configurations.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key and the problem.
    pub fn validate(&self, what: &str) -> Result<()> {
        let error = error_for(what);
        let blocks = self.blocks();
        if blocks == 0 {
            return Err(error("block_out_channels is empty".into()));
        }
        let sample = self.sample_size.as_ref().map(SampleSize::height_width);
        crate::config::check_network_bounds(
            what,
            &self.block_out_channels,
            &self.layers_per_block.values(),
            &sample.map(|(h, w)| vec![h, w]).unwrap_or_default(),
        )?;
        if self.down_block_types.len() != blocks || self.up_block_types.len() != blocks {
            return Err(error(format!(
                "{} down_block_types and {} up_block_types for {blocks} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        self.only_cross_attention
            .check_len(blocks, "only_cross_attention", &error)?;
        self.layers_per_block
            .check_len(blocks, "layers_per_block", &error)?;
        self.cross_attention_dim
            .check_len(blocks, "cross_attention_dim", &error)?;
        self.attention_head_dim
            .check_len(blocks, "attention_head_dim", &error)?;
        self.transformer_layers_per_block.check_len(
            blocks,
            "transformer_layers_per_block",
            &error,
        )?;
        let nested = matches!(&self.transformer_layers_per_block, PerBlock::Each(v)
            if v.iter().any(|b| matches!(b, PerBlock::Each(_))));
        match &self.reverse_transformer_layers_per_block {
            None if nested => {
                return Err(error(
                    "per-layer transformer_layers_per_block needs \
                     reverse_transformer_layers_per_block"
                        .into(),
                ));
            }
            Some(r) if r.len() != blocks => {
                return Err(error(format!(
                    "reverse_transformer_layers_per_block has {} entries for {blocks} blocks",
                    r.len()
                )));
            }
            _ => {}
        }
        if self.num_attention_heads.is_some() {
            return Err(error(
                "num_attention_heads must be null: the head count is attention_head_dim \
                 (diffusers issue 2011)"
                    .into(),
            ));
        }
        let unsupported = [
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("encoder_hid_dim_type", self.encoder_hid_dim_type.is_some()),
            (
                "addition_embed_type",
                self.addition_embed_type
                    .as_deref()
                    .is_some_and(|t| t != "text_time"),
            ),
            ("dual_cross_attention", self.dual_cross_attention),
            (
                "time_embedding_type",
                self.time_embedding_type != "positional",
            ),
            ("attention_type", self.attention_type != "default"),
        ];
        if let Some((key, _)) = unsupported.iter().find(|(_, bad)| *bad) {
            return Err(error(format!(
                "{key} other than the Stable Diffusion 1.x/2.x default is not supported"
            )));
        }
        if self.addition_embed_type.as_deref() == Some("text_time") {
            match (
                self.addition_time_embed_dim,
                self.projection_class_embeddings_input_dim,
            ) {
                (Some(t), Some(p)) if t > 0 && p > t => {}
                _ => {
                    return Err(error(
                        "addition_embed_type \"text_time\" needs a positive \
                         addition_time_embed_dim and a larger \
                         projection_class_embeddings_input_dim"
                            .into(),
                    ));
                }
            }
        }
        let groups = self
            .norm_num_groups
            .filter(|&g| g > 0)
            .ok_or_else(|| error("norm_num_groups must be a positive number".into()))?;
        if self.in_channels == 0 || self.out_channels == 0 {
            return Err(error(
                "in_channels and out_channels must be positive".into(),
            ));
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return Err(error(
                "conv_in_kernel and conv_out_kernel must be odd".into(),
            ));
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 || !c.is_multiple_of(groups) {
                return Err(error(format!(
                    "block_out_channels[{i}] = {c} is not a positive multiple of \
                     norm_num_groups {groups}"
                )));
            }
            let heads = self.heads(i).unwrap_or(0);
            if heads == 0 || heads > c {
                return Err(error(format!(
                    "attention_head_dim[{i}] = {heads} heads for {c} channels"
                )));
            }
            if self.layers_per_block.get(i).unwrap_or(0) == 0 {
                return Err(error(format!("layers_per_block[{i}] must be positive")));
            }
        }
        for (i, t) in self.down_block_types.iter().enumerate() {
            if !matches!(
                t,
                DownBlockType::CrossAttnDownBlock2D | DownBlockType::DownBlock2D
            ) {
                return Err(error(format!(
                    "down_block_types[{i}] {t:?} is not supported in UNet2DConditionModel"
                )));
            }
        }
        for (i, t) in self.up_block_types.iter().enumerate() {
            if !matches!(t, UpBlockType::CrossAttnUpBlock2D | UpBlockType::UpBlock2D) {
                return Err(error(format!(
                    "up_block_types[{i}] {t:?} is not supported in UNet2DConditionModel"
                )));
            }
        }
        let cross = self.cross_attention_dim.values();
        if cross.contains(&0) || cross.windows(2).any(|p| p[0] != p[1]) {
            return Err(error(format!(
                "cross_attention_dim {cross:?}: one positive width for every block is supported"
            )));
        }
        if matches!(
            self.class_embed_type,
            Some(ClassEmbedType::Projection | ClassEmbedType::SimpleProjection)
        ) && self.projection_class_embeddings_input_dim.is_none()
        {
            return Err(error(
                "a projection class_embed_type needs projection_class_embeddings_input_dim".into(),
            ));
        }
        if self.class_embed_type == Some(ClassEmbedType::Identity) && self.class_embeddings_concat {
            return Err(error(
                "class_embeddings_concat with an identity class embedding".into(),
            ));
        }
        Ok(())
    }
}

/// diffusers' `UNet2DModel` config (the pixel-space DDPM network, without text), with its
/// defaults for missing keys.
///
/// Supported: `DownBlock2D`/`AttnDownBlock2D` down blocks, `UpBlock2D`/`AttnUpBlock2D` up
/// blocks, a `UNetMidBlock2D` or no mid block, positional time embeddings, class embeddings
/// (`num_class_embeds`, `"timestep"`, `"identity"`). Fourier and learned time embeddings (the
/// score-SDE networks, with skip blocks) are rejected by [`validate`](Self::validate).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Unet2DConfig {
    /// Training resolution (informational).
    pub sample_size: Option<SampleSize>,
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Map the input from `[0, 1]` to `[-1, 1]` first.
    pub center_input_sample: bool,
    /// Must be `"positional"`.
    pub time_embedding_type: String,
    /// Width of the time embedding (default `4 * block_out_channels[0]`).
    pub time_embedding_dim: Option<usize>,
    /// `downscale_freq_shift` of the time embedding (1 in DDPM).
    pub freq_shift: f64,
    /// Cosines first (false in DDPM).
    pub flip_sin_to_cos: bool,
    /// The down blocks.
    pub down_block_types: Vec<DownBlockType>,
    /// The middle block; `None` for none.
    pub mid_block_type: Option<MidBlockType>,
    /// The up blocks.
    pub up_block_types: Vec<UpBlockType>,
    /// Channels of each block.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// `output_scale_factor` of the mid block (its resnets and attention).
    pub mid_block_scale_factor: f64,
    /// Padding of the downsampling convolutions (0: asymmetric, as DDPM).
    pub downsample_padding: usize,
    /// `"conv"` or `"resnet"` (a resnet with average pooling) in `AttnDownBlock2D`.
    pub downsample_type: String,
    /// `"conv"` or `"resnet"` (a resnet with nearest upsampling) in `AttnUpBlock2D`.
    pub upsample_type: String,
    /// Training only.
    pub dropout: f64,
    /// The resnets' activation (the time embedding always uses SiLU, as diffusers).
    pub act_fn: Activation,
    /// The width of each attention head (see the module documentation and
    /// [`head_dim`](Self::head_dim)).
    pub attention_head_dim: Option<usize>,
    /// Groups of every group norm.
    pub norm_num_groups: usize,
    /// Groups of the mid block attention's norm (default: `norm_num_groups` with default
    /// time conditioning, no norm with scale-shift).
    pub attn_norm_num_groups: Option<usize>,
    /// Epsilon of the norms.
    pub norm_eps: f64,
    /// How resnets take the time embedding.
    pub resnet_time_scale_shift: TimeEmbeddingNorm,
    /// Whether the mid block has attention.
    pub add_attention: bool,
    /// The class embedding, if any (`"timestep"` or `"identity"`).
    pub class_embed_type: Option<ClassEmbedType>,
    /// Size of the class table (with no `class_embed_type`).
    pub num_class_embeds: Option<usize>,
    /// For learned time embeddings only.
    pub num_train_timesteps: Option<usize>,
}

impl Default for Unet2DConfig {
    fn default() -> Self {
        Unet2DConfig {
            sample_size: None,
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            freq_shift: 0.0,
            flip_sin_to_cos: true,
            down_block_types: vec![
                DownBlockType::DownBlock2D,
                DownBlockType::AttnDownBlock2D,
                DownBlockType::AttnDownBlock2D,
                DownBlockType::AttnDownBlock2D,
            ],
            mid_block_type: Some(MidBlockType::UnetMidBlock2D),
            up_block_types: vec![
                UpBlockType::AttnUpBlock2D,
                UpBlockType::AttnUpBlock2D,
                UpBlockType::AttnUpBlock2D,
                UpBlockType::UpBlock2D,
            ],
            block_out_channels: vec![224, 448, 672, 896],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            downsample_type: "conv".into(),
            upsample_type: "conv".into(),
            dropout: 0.0,
            act_fn: Activation::Silu,
            attention_head_dim: Some(8),
            norm_num_groups: 32,
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: TimeEmbeddingNorm::Default,
            add_attention: true,
            class_embed_type: None,
            num_class_embeds: None,
            num_train_timesteps: None,
        }
    }
}

const UNET_2D_KEYS: &[&str] = &[
    "sample_size",
    "in_channels",
    "out_channels",
    "center_input_sample",
    "time_embedding_type",
    "time_embedding_dim",
    "freq_shift",
    "flip_sin_to_cos",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "mid_block_scale_factor",
    "downsample_padding",
    "downsample_type",
    "upsample_type",
    "dropout",
    "act_fn",
    "attention_head_dim",
    "norm_num_groups",
    "attn_norm_num_groups",
    "norm_eps",
    "resnet_time_scale_shift",
    "add_attention",
    "class_embed_type",
    "num_class_embeds",
    "num_train_timesteps",
];

impl Unet2DConfig {
    /// Parses a `config.json`'s text; `what` names it in errors.
    ///
    /// # Errors
    /// [`Error::Config`] for malformed JSON, an unknown key or block type, a wrong value, or
    /// an unsupported or impossible combination (see [`validate`](Self::validate)).
    pub fn from_json(json: &str, what: &str) -> Result<Self> {
        let config: Self = crate::config::parse(json, what, UNET_2D_KEYS)?;
        config.validate(what)?;
        Ok(config)
    }

    /// Reads a `config.json`.
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read; as [`from_json`](Self::from_json).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let config: Self = crate::config::read(path, UNET_2D_KEYS)?;
        config.validate(&path.display().to_string())?;
        Ok(config)
    }

    /// The number of blocks on each side.
    pub fn blocks(&self) -> usize {
        self.block_out_channels.len()
    }

    /// The width of each attention head in a block of `channels` channels:
    /// `attention_head_dim`, or `channels` (one head) when it is `null`.
    pub fn head_dim(&self, channels: usize) -> usize {
        self.attention_head_dim.unwrap_or(channels)
    }

    /// The width of the time embedding.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or_else(|| 4 * self.block_out_channels.first().copied().unwrap_or(0))
    }

    /// How much the network downsamples (`2^(blocks - 1)`).
    pub fn downsample_factor(&self) -> usize {
        1 << self.blocks().saturating_sub(1)
    }

    /// Rejects unsupported and impossible configurations.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key and the problem.
    pub fn validate(&self, what: &str) -> Result<()> {
        let error = error_for(what);
        let blocks = self.blocks();
        if blocks == 0 {
            return Err(error("block_out_channels is empty".into()));
        }
        let sample = self.sample_size.as_ref().map(SampleSize::height_width);
        crate::config::check_network_bounds(
            what,
            &self.block_out_channels,
            &[self.layers_per_block],
            &sample.map(|(h, w)| vec![h, w]).unwrap_or_default(),
        )?;
        if self.down_block_types.len() != blocks || self.up_block_types.len() != blocks {
            return Err(error(format!(
                "{} down_block_types and {} up_block_types for {blocks} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if self.time_embedding_type != "positional" {
            return Err(error(format!(
                "time_embedding_type {:?} is not supported (only \"positional\")",
                self.time_embedding_type
            )));
        }
        for (key, value) in [
            ("downsample_type", &self.downsample_type),
            ("upsample_type", &self.upsample_type),
        ] {
            if value != "conv" && value != "resnet" {
                return Err(error(format!("{key} {value:?} (expected conv or resnet)")));
            }
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.layers_per_block == 0 {
            return Err(error(
                "in_channels, out_channels and layers_per_block must be positive".into(),
            ));
        }
        let groups = self.norm_num_groups;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if groups == 0 || c == 0 || !c.is_multiple_of(groups) {
                return Err(error(format!(
                    "block_out_channels[{i}] = {c} is not a positive multiple of \
                     norm_num_groups {groups}"
                )));
            }
            let d = self.head_dim(c);
            if d == 0 || d > c {
                return Err(error(format!(
                    "attention_head_dim {d} for a block of {c} channels"
                )));
            }
        }
        for (i, t) in self.down_block_types.iter().enumerate() {
            if !matches!(
                t,
                DownBlockType::DownBlock2D | DownBlockType::AttnDownBlock2D
            ) {
                return Err(error(format!(
                    "down_block_types[{i}] {t:?} is not supported in UNet2DModel"
                )));
            }
        }
        for (i, t) in self.up_block_types.iter().enumerate() {
            if !matches!(t, UpBlockType::UpBlock2D | UpBlockType::AttnUpBlock2D) {
                return Err(error(format!(
                    "up_block_types[{i}] {t:?} is not supported in UNet2DModel"
                )));
            }
        }
        if self.mid_block_type == Some(MidBlockType::UnetMidBlock2DCrossAttn) {
            return Err(error(
                "UNetMidBlock2DCrossAttn needs text: not a UNet2DModel mid block".into(),
            ));
        }
        if matches!(
            self.class_embed_type,
            Some(ClassEmbedType::Projection | ClassEmbedType::SimpleProjection)
        ) {
            return Err(error(
                "UNet2DModel has no projection class embeddings".into(),
            ));
        }
        Ok(())
    }
}

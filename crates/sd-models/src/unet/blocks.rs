//! The blocks the UNets and the VAE are built from, diffusers' `unets/unet_2d_blocks.py`.
//!
//! Each family is one type, its members differing in what follows each resnet and in
//! whether a time embedding and skip connections come in:
//!
//! | type | diffusers classes |
//! |---|---|
//! | [`DownBlock`] | `CrossAttnDownBlock2D`, `DownBlock2D`, `AttnDownBlock2D`, `DownEncoderBlock2D` |
//! | [`MidBlock`] | `UNetMidBlock2DCrossAttn`, `UNetMidBlock2D` |
//! | [`UpBlock`] | `CrossAttnUpBlock2D`, `UpBlock2D`, `AttnUpBlock2D`, `UpDecoderBlock2D` |
//!
//! Keys: `resnets.N`, `attentions.N` (a `Transformer2DModel` or a spatial `Attention`),
//! `downsamplers.0` / `upsamplers.0` (a convolution under `conv`, or a resampling resnet).

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::source::WeightSource;
use crate::nn::{
    Activation, Attention, AttentionConfig, Downsample2D, Resample, ResnetBlock2D, ResnetConfig,
    TimeEmbeddingNorm, Transformer2DModel, TransformerConfig, Upsample2D,
};
use crate::unet::config::{DownBlockType, UpBlockType};

/// What every resnet of a network shares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResnetSpec {
    /// Width of the time embedding (`None` in the VAE).
    pub temb_channels: Option<usize>,
    /// Groups of the norms.
    pub groups: usize,
    /// Epsilon of the norms.
    pub eps: f64,
    /// The activation.
    pub act: Activation,
    /// How the time embedding enters.
    pub time_embedding_norm: TimeEmbeddingNorm,
    /// The output is divided by this.
    pub output_scale_factor: f64,
}

impl ResnetSpec {
    fn config(&self, in_channels: usize, out_channels: usize, resample: Resample) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: self.temb_channels,
            groups: self.groups,
            eps: self.eps,
            act: self.act,
            time_embedding_norm: self.time_embedding_norm,
            output_scale_factor: self.output_scale_factor,
            resample,
        }
    }
}

/// What follows each resnet of a block.
#[derive(Debug, Clone, PartialEq)]
pub enum AttentionSpec {
    /// Nothing.
    None,
    /// A `Transformer2DModel` with cross-attention.
    Transformer {
        /// Number of heads (head width: the block's channels divided by it).
        heads: usize,
        /// Transformer blocks after each resnet, one entry per resnet.
        layers: Vec<usize>,
        /// Width of the text embeddings.
        cross_attention_dim: usize,
        /// Linear projections.
        use_linear_projection: bool,
        /// Attention in `f32` for half-precision activations.
        upcast_attention: bool,
        /// `attn1` attends to the text too.
        only_cross_attention: bool,
    },
    /// Spatial self-attention.
    Spatial {
        /// Width of each head (the number of heads is the channels divided by it).
        dim_head: usize,
        /// Groups of its norm; `None` for none.
        norm_num_groups: Option<usize>,
        /// Epsilon of its norm.
        eps: f64,
        /// The output is divided by this.
        rescale_output_factor: f64,
    },
}

/// The attention after a resnet.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum BlockAttention<B: Backend> {
    /// Cross-attention on the text embeddings.
    Transformer(Transformer2DModel<B>),
    /// Spatial self-attention.
    Spatial(Attention<B>),
}

impl<B: Backend> BlockAttention<B> {
    fn load<S: WeightSource>(
        backend: &B,
        w: &S,
        spec: &AttentionSpec,
        channels: usize,
        groups: usize,
        layer: usize,
    ) -> Result<Option<Self>> {
        Ok(match spec {
            AttentionSpec::None => None,
            AttentionSpec::Transformer {
                heads,
                layers,
                cross_attention_dim,
                use_linear_projection,
                upcast_attention,
                only_cross_attention,
            } => {
                let num_layers = layers.get(layer).copied().ok_or_else(|| Error::Config {
                    what: w.describe(),
                    message: format!(
                        "no transformer layer count for resnet {layer} (have {layers:?})"
                    ),
                })?;
                Some(BlockAttention::Transformer(Transformer2DModel::load(
                    backend,
                    w,
                    TransformerConfig {
                        in_channels: channels,
                        heads: *heads,
                        dim_head: channels / (*heads).max(1),
                        num_layers,
                        cross_attention_dim: *cross_attention_dim,
                        norm_num_groups: groups,
                        use_linear_projection: *use_linear_projection,
                        upcast_attention: *upcast_attention,
                        only_cross_attention: *only_cross_attention,
                    },
                )?))
            }
            AttentionSpec::Spatial {
                dim_head,
                norm_num_groups,
                eps,
                rescale_output_factor,
            } => Some(BlockAttention::Spatial(Attention::load(
                backend,
                w,
                AttentionConfig::spatial(
                    channels,
                    *dim_head,
                    *norm_num_groups,
                    *eps,
                    *rescale_output_factor,
                ),
            )?)),
        })
    }

    /// `x [N, C, H, W]`, attending to `context` for a transformer.
    ///
    /// # Errors
    /// [`Error::Shape`] for a transformer given no text embeddings, and shape mismatches.
    pub fn forward(
        &self,
        backend: &B,
        x: &B::Tensor,
        context: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        match self {
            BlockAttention::Transformer(t) => {
                let context = context.ok_or_else(|| Error::Shape {
                    op: "cross-attention block",
                    expected: "encoder hidden states".into(),
                    found: "none".into(),
                })?;
                t.forward(backend, x, context)
            }
            BlockAttention::Spatial(a) => a.forward_spatial(backend, x),
        }
    }
}

/// How a down block ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownsampleSpec {
    /// It does not downsample (the last block).
    None,
    /// A strided convolution with this padding (0: asymmetric).
    Conv {
        /// The padding.
        padding: usize,
    },
    /// A resnet with average pooling (`downsample_type = "resnet"`).
    Resnet,
}

/// A block's downsampler (key `downsamplers.0`).
#[derive(Debug, Clone)]
pub enum Downsampler<B: Backend> {
    /// A strided convolution (key `conv`).
    Conv(Downsample2D<B>),
    /// A resnet with average pooling.
    Resnet(ResnetBlock2D<B>),
}

/// A down block; see the module documentation.
#[derive(Debug, Clone)]
pub struct DownBlock<B: Backend> {
    /// Which diffusers block this is.
    pub kind: DownBlockType,
    /// The resnets.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// The attention after each resnet (empty for blocks without).
    pub attentions: Vec<BlockAttention<B>>,
    /// The downsampler, except in the last block.
    pub downsamplers: Option<Downsampler<B>>,
}

impl<B: Backend> DownBlock<B> {
    /// Loads a block of `num_layers` resnets from `in_channels` to `out_channels`.
    ///
    /// # Errors
    /// A missing or misshapen weight; [`Error::Config`] for impossible shapes.
    #[allow(clippy::too_many_arguments)]
    pub fn load<S: WeightSource>(
        backend: &B,
        w: &S,
        kind: DownBlockType,
        in_channels: usize,
        out_channels: usize,
        num_layers: usize,
        resnet: &ResnetSpec,
        attention: &AttentionSpec,
        downsample: DownsampleSpec,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(num_layers);
        let mut attentions = Vec::new();
        for i in 0..num_layers {
            let cin = if i == 0 { in_channels } else { out_channels };
            resnets.push(ResnetBlock2D::load(
                backend,
                &w.push("resnets").index(i),
                resnet.config(cin, out_channels, Resample::None),
            )?);
            if let Some(a) = BlockAttention::load(
                backend,
                &w.push("attentions").index(i),
                attention,
                out_channels,
                resnet.groups,
                i,
            )? {
                attentions.push(a);
            }
        }
        let d = w.push("downsamplers").index(0);
        let downsamplers =
            match downsample {
                DownsampleSpec::None => None,
                DownsampleSpec::Conv { padding } => Some(Downsampler::Conv(
                    Downsample2D::load_conv(backend, &d, out_channels, out_channels, padding)?,
                )),
                DownsampleSpec::Resnet => Some(Downsampler::Resnet(ResnetBlock2D::load(
                    backend,
                    &d,
                    resnet.config(out_channels, out_channels, Resample::Down),
                )?)),
            };
        Ok(DownBlock {
            kind,
            resnets,
            attentions,
            downsamplers,
        })
    }

    /// Runs the block on `x`; returns the output and the skip connections it adds (each
    /// resnet's or attention's output, then the downsampler's).
    ///
    /// # Errors
    /// Shape mismatches; a cross-attention block given no `context`.
    pub fn forward(
        &self,
        backend: &B,
        x: &B::Tensor,
        temb: Option<&B::Tensor>,
        context: Option<&B::Tensor>,
    ) -> Result<(B::Tensor, Vec<B::Tensor>)> {
        let mut h = x.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(backend, &h, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(backend, &h, context)?;
            }
            skips.push(h.clone());
        }
        match &self.downsamplers {
            Some(Downsampler::Conv(d)) => h = d.forward(backend, &h)?,
            Some(Downsampler::Resnet(r)) => h = r.forward(backend, &h, temb)?,
            None => return Ok((h, skips)),
        }
        skips.push(h.clone());
        Ok((h, skips))
    }
}

/// The middle block; see the module documentation.
#[derive(Debug, Clone)]
pub struct MidBlock<B: Backend> {
    /// `num_layers + 1` resnets.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// The attention between consecutive resnets (empty without attention).
    pub attentions: Vec<BlockAttention<B>>,
}

impl<B: Backend> MidBlock<B> {
    /// Loads a mid block of `channels` with `num_layers` (attention, resnet) pairs after the
    /// first resnet.
    ///
    /// # Errors
    /// A missing or misshapen weight; [`Error::Config`] for impossible shapes.
    pub fn load<S: WeightSource>(
        backend: &B,
        w: &S,
        channels: usize,
        num_layers: usize,
        resnet: &ResnetSpec,
        attention: &AttentionSpec,
    ) -> Result<Self> {
        let mut resnets = vec![ResnetBlock2D::load(
            backend,
            &w.push("resnets").index(0),
            resnet.config(channels, channels, Resample::None),
        )?];
        let mut attentions = Vec::new();
        for i in 0..num_layers {
            if let Some(a) = BlockAttention::load(
                backend,
                &w.push("attentions").index(i),
                attention,
                channels,
                resnet.groups,
                i,
            )? {
                attentions.push(a);
            }
            resnets.push(ResnetBlock2D::load(
                backend,
                &w.push("resnets").index(i + 1),
                resnet.config(channels, channels, Resample::None),
            )?);
        }
        Ok(MidBlock {
            resnets,
            attentions,
        })
    }

    /// Runs the block.
    ///
    /// # Errors
    /// Shape mismatches; a cross-attention block given no `context`.
    pub fn forward(
        &self,
        backend: &B,
        x: &B::Tensor,
        temb: Option<&B::Tensor>,
        context: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            if i > 0
                && let Some(attn) = self.attentions.get(i - 1)
            {
                h = attn.forward(backend, &h, context)?;
            }
            h = resnet.forward(backend, &h, temb)?;
        }
        Ok(h)
    }
}

/// How an up block ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpsampleSpec {
    /// It does not upsample (the last block).
    None,
    /// Nearest upsampling and a 3x3 convolution.
    Conv,
    /// A resnet with nearest upsampling (`upsample_type = "resnet"`).
    Resnet,
}

/// A block's upsampler (key `upsamplers.0`).
#[derive(Debug, Clone)]
pub enum Upsampler<B: Backend> {
    /// Nearest upsampling and a convolution (key `conv`).
    Conv(Upsample2D<B>),
    /// A resnet with nearest upsampling.
    Resnet(ResnetBlock2D<B>),
}

/// The channels of an up block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpChannels {
    /// Channels of the skip connection of the block's last resnet (the matching down
    /// block's input); for the decoder's blocks, which have no skips, the input channels.
    pub in_channels: usize,
    /// Channels coming from the previous up block.
    pub prev_output_channels: usize,
    /// Output channels.
    pub out_channels: usize,
}

/// An up block; see the module documentation.
#[derive(Debug, Clone)]
pub struct UpBlock<B: Backend> {
    /// Which diffusers block this is.
    pub kind: UpBlockType,
    /// The resnets.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// The attention after each resnet (empty for blocks without).
    pub attentions: Vec<BlockAttention<B>>,
    /// The upsampler, except in the last block.
    pub upsamplers: Option<Upsampler<B>>,
    skips: bool,
}

impl<B: Backend> UpBlock<B> {
    /// Loads a block of `num_layers` resnets; with `skips`, each resnet takes the
    /// concatenation of the running activations and a skip connection (the UNets), without
    /// (the VAE decoder) only the activations.
    ///
    /// # Errors
    /// A missing or misshapen weight; [`Error::Config`] for impossible shapes.
    #[allow(clippy::too_many_arguments)]
    pub fn load<S: WeightSource>(
        backend: &B,
        w: &S,
        kind: UpBlockType,
        channels: UpChannels,
        num_layers: usize,
        skips: bool,
        resnet: &ResnetSpec,
        attention: &AttentionSpec,
        upsample: UpsampleSpec,
    ) -> Result<Self> {
        let out = channels.out_channels;
        let mut resnets = Vec::with_capacity(num_layers);
        let mut attentions = Vec::new();
        for i in 0..num_layers {
            let cin = if skips {
                let skip = if i + 1 == num_layers {
                    channels.in_channels
                } else {
                    out
                };
                let prev = if i == 0 {
                    channels.prev_output_channels
                } else {
                    out
                };
                prev + skip
            } else if i == 0 {
                channels.in_channels
            } else {
                out
            };
            resnets.push(ResnetBlock2D::load(
                backend,
                &w.push("resnets").index(i),
                resnet.config(cin, out, Resample::None),
            )?);
            if let Some(a) = BlockAttention::load(
                backend,
                &w.push("attentions").index(i),
                attention,
                out,
                resnet.groups,
                i,
            )? {
                attentions.push(a);
            }
        }
        let u = w.push("upsamplers").index(0);
        let upsamplers = match upsample {
            UpsampleSpec::None => None,
            UpsampleSpec::Conv => Some(Upsampler::Conv(Upsample2D::load_conv(
                backend, &u, out, out,
            )?)),
            UpsampleSpec::Resnet => Some(Upsampler::Resnet(ResnetBlock2D::load(
                backend,
                &u,
                resnet.config(out, out, Resample::Up),
            )?)),
        };
        Ok(UpBlock {
            kind,
            resnets,
            attentions,
            upsamplers,
            skips,
        })
    }

    /// The number of skip connections the block consumes (its resnets, for a UNet block).
    pub fn skips_needed(&self) -> usize {
        if self.skips { self.resnets.len() } else { 0 }
    }

    /// Runs the block, taking its skip connections from the end of `skips` (the last one
    /// first) for a UNet block.
    ///
    /// # Errors
    /// [`Error::Shape`] if `skips` runs out; shape mismatches; a cross-attention block given
    /// no `context`.
    pub fn forward(
        &self,
        backend: &B,
        x: &B::Tensor,
        skips: &mut Vec<B::Tensor>,
        temb: Option<&B::Tensor>,
        context: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        self.forward_to(backend, x, skips, temb, context, None)
    }

    /// As [`forward`](Self::forward), with the upsampler resizing to `upsample_size`
    /// (height, width) instead of doubling, when given: the size of the next block's skip
    /// connection, which diffusers passes when the latent is not a multiple of the
    /// network's downsampling.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_to(
        &self,
        backend: &B,
        x: &B::Tensor,
        skips: &mut Vec<B::Tensor>,
        temb: Option<&B::Tensor>,
        context: Option<&B::Tensor>,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<B::Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            if self.skips {
                let skip = skips.pop().ok_or_else(|| Error::Shape {
                    op: "up block",
                    expected: "a skip connection per resnet".into(),
                    found: "none left".into(),
                })?;
                h = backend.concat(&[&h, &skip], 1)?;
            }
            h = resnet.forward(backend, &h, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(backend, &h, context)?;
            }
        }
        match &self.upsamplers {
            Some(Upsampler::Conv(u)) => u.forward_to(backend, &h, upsample_size),
            Some(Upsampler::Resnet(r)) => r.forward(backend, &h, temb),
            None => Ok(h),
        }
    }
}

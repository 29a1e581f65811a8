//! The pixel-space denoiser of DDPM (Ho et al., 2020), diffusers' `UNet2DModel`
//! (`models/unets/unet_2d.py`): no text, optionally class-conditional.
//!
//! ```text
//! emb = time_embedding(time_proj(t))  (+ class_embedding(labels))
//! h   = conv_in(sample);  down blocks (resnets, spatial attention);  mid block;
//! up blocks on the skip connections;  out = conv_out(silu(conv_norm_out(h)))
//! ```
//!
//! Its attention is the spatial single- or multi-head self-attention of [`Attention`]
//! (`attention_head_dim` is a head's width here). As with [`Unet2DConditionModel`], a height
//! or width that is not a multiple of the downsampling factor is an error.
//!
//! [`Attention`]: crate::nn::Attention
//! [`Unet2DConditionModel`]: crate::unet::Unet2DConditionModel

use std::path::Path;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::source::WeightSource;
use crate::nn::{
    Activation, ClassEmbedding, ClassLabels, Conv2d, GroupNorm, RandomWeights, TimeEmbeddingNorm,
    TimestepEmbedding, Timesteps, rename_legacy_attention,
};
use crate::unet::blocks::{
    AttentionSpec, DownBlock, DownsampleSpec, MidBlock, ResnetSpec, UpBlock, UpChannels,
    UpsampleSpec,
};
use crate::unet::condition::{broadcast_timesteps, missing_labels};
use crate::unet::config::{DownBlockType, Unet2DConfig, UpBlockType};
use crate::unet::encoder::check_sample;
use crate::weights::{LoadDType, OpenOptions, Variant, WeightStore};

/// diffusers' `UNet2DModel`; see the module documentation.
#[derive(Debug, Clone)]
pub struct Unet2DModel<B: Backend> {
    config: Unet2DConfig,
    /// The sinusoidal projection of the timesteps.
    pub time_proj: Timesteps,
    /// `linear_1`, `linear_2` (SiLU between, whatever `act_fn`).
    pub time_embedding: TimestepEmbedding<B>,
    /// The class embedding of class-conditional networks.
    pub class_embedding: Option<ClassEmbedding<B>>,
    /// `sample -> block_out_channels[0]`.
    pub conv_in: Conv2d<B>,
    /// The down blocks.
    pub down_blocks: Vec<DownBlock<B>>,
    /// The mid block.
    pub mid_block: Option<MidBlock<B>>,
    /// The up blocks.
    pub up_blocks: Vec<UpBlock<B>>,
    /// The output norm (followed by SiLU).
    pub conv_norm_out: GroupNorm<B>,
    /// `block_out_channels[0] -> out_channels`.
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Unet2DModel<B> {
    /// Builds the network from any [`WeightSource`].
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration; a missing or misshapen weight (named).
    pub fn from_source<S: WeightSource>(backend: &B, w: &S, config: Unet2DConfig) -> Result<Self> {
        config.validate("UNet2DModel config")?;
        let c = &config;
        let channels = &c.block_out_channels;
        let blocks = channels.len();
        let c0 = channels[0];
        let time_embed_dim = c.time_embed_dim();
        let time_proj = Timesteps::new(c0, c.flip_sin_to_cos, c.freq_shift);
        let time_embedding = TimestepEmbedding::load(
            backend,
            &w.push("time_embedding"),
            c0,
            time_embed_dim,
            Activation::Silu,
            None,
            None,
        )?;
        let class_embedding = ClassEmbedding::load(
            backend,
            &w.push("class_embedding"),
            c.class_embed_type,
            c.num_class_embeds,
            None,
            c0,
            time_embed_dim,
            Activation::Silu,
        )?;
        let resnet = ResnetSpec {
            temb_channels: Some(time_embed_dim),
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            act: c.act_fn,
            time_embedding_norm: c.resnet_time_scale_shift,
            output_scale_factor: 1.0,
        };
        let spatial =
            |block_channels: usize, rescale: f64, groups: Option<usize>| AttentionSpec::Spatial {
                dim_head: c.head_dim(block_channels),
                norm_num_groups: groups,
                eps: c.norm_eps,
                rescale_output_factor: rescale,
            };
        let conv_in = Conv2d::load(
            backend,
            &w.push("conv_in"),
            c.in_channels,
            c0,
            3,
            1,
            1,
            true,
        )?;

        let mut down_blocks = Vec::with_capacity(blocks);
        let mut output = c0;
        for (i, &kind) in c.down_block_types.iter().enumerate() {
            let input = output;
            output = channels[i];
            let last = i + 1 == blocks;
            let (attention, downsample) = match kind {
                DownBlockType::AttnDownBlock2D => (
                    spatial(output, 1.0, Some(c.norm_num_groups)),
                    match (last, c.downsample_type.as_str()) {
                        (true, _) => DownsampleSpec::None,
                        (false, "resnet") => DownsampleSpec::Resnet,
                        (false, _) => DownsampleSpec::Conv {
                            padding: c.downsample_padding,
                        },
                    },
                ),
                _ if last => (AttentionSpec::None, DownsampleSpec::None),
                _ => (
                    AttentionSpec::None,
                    DownsampleSpec::Conv {
                        padding: c.downsample_padding,
                    },
                ),
            };
            down_blocks.push(DownBlock::load(
                backend,
                &w.push("down_blocks").index(i),
                kind,
                input,
                output,
                c.layers_per_block,
                &resnet,
                &attention,
                downsample,
            )?);
        }

        let last = channels[blocks - 1];
        let mid_block = match c.mid_block_type {
            Some(_) => {
                let attn_groups = c.attn_norm_num_groups.or(match c.resnet_time_scale_shift {
                    TimeEmbeddingNorm::Default => Some(c.norm_num_groups),
                    _ => None,
                });
                let attention = if c.add_attention {
                    spatial(last, c.mid_block_scale_factor, attn_groups)
                } else {
                    AttentionSpec::None
                };
                Some(MidBlock::load(
                    backend,
                    &w.push("mid_block"),
                    last,
                    1,
                    &ResnetSpec {
                        output_scale_factor: c.mid_block_scale_factor,
                        ..resnet
                    },
                    &attention,
                )?)
            }
            None => None,
        };

        let mut up_blocks = Vec::with_capacity(blocks);
        let mut output = last;
        for (i, &kind) in c.up_block_types.iter().enumerate() {
            let mirrored = blocks - 1 - i;
            let prev = output;
            output = channels[mirrored];
            let input = channels[mirrored.saturating_sub(1)];
            let last = i + 1 == blocks;
            let (attention, upsample) = match kind {
                UpBlockType::AttnUpBlock2D => (
                    spatial(output, 1.0, Some(c.norm_num_groups)),
                    match (last, c.upsample_type.as_str()) {
                        (true, _) => UpsampleSpec::None,
                        (false, "resnet") => UpsampleSpec::Resnet,
                        (false, _) => UpsampleSpec::Conv,
                    },
                ),
                _ if last => (AttentionSpec::None, UpsampleSpec::None),
                _ => (AttentionSpec::None, UpsampleSpec::Conv),
            };
            up_blocks.push(UpBlock::load(
                backend,
                &w.push("up_blocks").index(i),
                kind,
                UpChannels {
                    in_channels: input,
                    prev_output_channels: prev,
                    out_channels: output,
                },
                c.layers_per_block + 1,
                true,
                &resnet,
                &attention,
                upsample,
            )?);
        }

        let conv_norm_out = GroupNorm::load(
            backend,
            &w.push("conv_norm_out"),
            c0,
            c.norm_num_groups,
            c.norm_eps,
        )?;
        let conv_out = Conv2d::load(
            backend,
            &w.push("conv_out"),
            c0,
            c.out_channels,
            3,
            1,
            1,
            true,
        )?;
        Ok(Unet2DModel {
            config,
            time_proj,
            time_embedding,
            class_embedding,
            conv_in,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    /// Loads the network from a store in diffusers' key layout, converting weights to
    /// `dtype`.
    ///
    /// # Errors
    /// As [`from_source`](Self::from_source).
    pub fn load(
        backend: &B,
        store: &WeightStore,
        config: Unet2DConfig,
        dtype: LoadDType,
    ) -> Result<Self> {
        Self::from_source(backend, &store.root().with_dtype(dtype), config)
    }

    /// Loads a diffusers `unet/` folder in `f32`, accepting the deprecated attention names of
    /// old checkpoints.
    ///
    /// # Errors
    /// As [`Unet2DConfig::from_file`] and [`load`](Self::load); unused weights are an error
    /// in strict mode.
    pub fn from_dir(
        backend: &B,
        dir: impl AsRef<Path>,
        variants: &[Variant],
        strict: bool,
    ) -> Result<Self> {
        Self::from_dir_as(backend, dir, variants, strict, LoadDType::F32)
    }

    /// As [`from_dir`](Self::from_dir), with the weights handed to the backend in `dtype`.
    ///
    /// # Errors
    /// As [`from_dir`](Self::from_dir).
    pub fn from_dir_as(
        backend: &B,
        dir: impl AsRef<Path>,
        variants: &[Variant],
        strict: bool,
        dtype: LoadDType,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let config = Unet2DConfig::from_file(dir.join("config.json"))?;
        OpenOptions::new()
            .rename(|k| Some(rename_legacy_attention(k)))
            .strict(strict)
            .load_folder(dir, variants, |store| {
                Self::load(backend, store, config, dtype)
            })
    }

    /// The network with seeded random weights.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration.
    pub fn random(backend: &B, config: Unet2DConfig, seed: u64) -> Result<Self> {
        Self::from_source(backend, &RandomWeights::new(seed), config)
    }

    /// The configuration.
    pub fn config(&self) -> &Unet2DConfig {
        &self.config
    }

    /// The prediction for `sample [N, in_channels, H, W]` at `timesteps` (one, or one per
    /// entry), with class labels for a class-conditional network.
    ///
    /// # Errors
    /// [`Error::Shape`] for a misshapen sample (or one the network cannot downsample), a
    /// timestep count other than 1 or `N`, missing labels for a class-conditional network,
    /// labels for an unconditional one, or labels of the wrong kind or count;
    /// [`Error::TokenOutOfVocab`] for a class id past the table.
    pub fn forward(
        &self,
        backend: &B,
        sample: &B::Tensor,
        timesteps: &[f64],
        class_labels: Option<ClassLabels<'_, B::Tensor>>,
    ) -> Result<B::Tensor> {
        let c = &self.config;
        let n = check_sample(
            backend,
            sample,
            c.in_channels,
            c.downsample_factor(),
            "UNet2DModel",
        )?;
        let timesteps = broadcast_timesteps(timesteps, n, "UNet2DModel")?;
        let sample = if c.center_input_sample {
            backend.affine(sample, 2.0, -1.0)?
        } else {
            sample.clone()
        };
        let t_emb = self.time_proj.forward(backend, &timesteps)?;
        let mut emb = self.time_embedding.forward(backend, &t_emb, None)?;
        match (&self.class_embedding, class_labels) {
            (Some(class), Some(labels)) => {
                let class_emb = class.forward(backend, labels, n, &self.time_proj)?;
                emb = backend.add(&emb, &class_emb)?;
            }
            (Some(_), None) => return Err(missing_labels("UNet2DModel")),
            (None, Some(_)) => {
                return Err(Error::Shape {
                    op: "UNet2DModel",
                    expected: "no class labels for a network without class embedding".into(),
                    found: "class labels".into(),
                });
            }
            (None, None) => {}
        }
        let mut h = self.conv_in.forward(backend, &sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            let (out, s) = block.forward(backend, &h, Some(&emb), None)?;
            h = out;
            skips.extend(s);
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(backend, &h, Some(&emb), None)?;
        }
        for block in &self.up_blocks {
            h = block.forward(backend, &h, &mut skips, Some(&emb), None)?;
        }
        let h = self.conv_norm_out.forward_silu(backend, &h)?;
        self.conv_out.forward(backend, &h)
    }
}

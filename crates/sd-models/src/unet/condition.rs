//! Stable Diffusion's latent denoiser, diffusers' `UNet2DConditionModel`
//! (`models/unets/unet_2d_condition.py`; Rombach et al., 2022):
//!
//! ```text
//! emb  = time_embedding(time_proj(t), timestep_cond)  (+ class_embedding(labels), or concat)
//! h    = conv_in(sample);                skips = [h]
//! for each down block:  h, s = block(h, emb, text);  skips += s
//! h    = mid_block(h, emb, text)
//! for each up block:    h = block(h, skips.pop(...), emb, text)
//! out  = conv_out(act(conv_norm_out(h)))
//! ```
//!
//! Stable Diffusion 1.x: four blocks of 320/640/1280/1280 channels, 8 heads, 1x1 convolution
//! projections, text embeddings of 768. 2.x: heads of 64 channels (`[5, 10, 20, 20]`), linear
//! projections, upcast attention, text embeddings of 1024. Inpainting networks take 9 input
//! channels (latents, mask, masked-image latents); the x4 upscaler's class labels are the
//! noise level (`num_class_embeds`); LCM-distilled networks take a guidance embedding
//! (`time_cond_proj_dim`).
//!
//! Unlike diffusers, a latent whose height or width is not a multiple of
//! [`Unet2DConditionConfig::downsample_factor`] is an error rather than upsampled to odd skip
//! sizes.

use std::path::Path;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::source::WeightSource;
use crate::nn::{
    ClassEmbedding, ClassLabels, Conv2d, GroupNorm, RandomWeights, TimestepEmbedding, Timesteps,
    rename_legacy_attention,
};
use crate::unet::blocks::{
    AttentionSpec, DownBlock, DownsampleSpec, MidBlock, ResnetSpec, UpBlock, UpChannels,
    UpsampleSpec,
};
use crate::unet::config::{DownBlockType, MidBlockType, Unet2DConditionConfig, UpBlockType};
use crate::weights::{LoadDType, OpenOptions, Variant, WeightStore};

/// Optional inputs of [`Unet2DConditionModel::forward_with`].
#[derive(Debug)]
pub struct UnetConditioning<'a, B: Backend> {
    /// Class labels, required by class-conditional networks.
    pub class_labels: Option<ClassLabels<'a, B::Tensor>>,
    /// The guidance embedding `[N, time_cond_proj_dim]` of LCM-distilled networks.
    pub timestep_cond: Option<&'a B::Tensor>,
}

impl<B: Backend> Default for UnetConditioning<'_, B> {
    fn default() -> Self {
        UnetConditioning {
            class_labels: None,
            timestep_cond: None,
        }
    }
}

impl<B: Backend> Clone for UnetConditioning<'_, B> {
    fn clone(&self) -> Self {
        UnetConditioning {
            class_labels: self.class_labels,
            timestep_cond: self.timestep_cond,
        }
    }
}

/// diffusers' `UNet2DConditionModel`; see the module documentation. Field names are the
/// checkpoint's key segments.
#[derive(Debug, Clone)]
pub struct Unet2DConditionModel<B: Backend> {
    config: Unet2DConditionConfig,
    /// The sinusoidal projection of the timesteps (no weights).
    pub time_proj: Timesteps,
    /// `linear_1`, `linear_2` (and `cond_proj`).
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
    /// The output norm.
    pub conv_norm_out: GroupNorm<B>,
    /// `block_out_channels[0] -> out_channels`.
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Unet2DConditionModel<B> {
    /// Builds the network from any [`WeightSource`] (a checkpoint's
    /// [`Weights`](crate::weights::Weights) or
    /// [`RandomWeights`]).
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration; a missing or misshapen weight (named).
    pub fn from_source<S: WeightSource>(
        backend: &B,
        w: &S,
        config: Unet2DConditionConfig,
    ) -> Result<Self> {
        config.validate("UNet2DConditionModel config")?;
        let c = &config;
        let what = || w.describe();
        let missing = |key: &str| Error::Config {
            what: what(),
            message: format!("{key} has no entry for a block"),
        };
        let channels = &c.block_out_channels;
        let blocks = channels.len();
        let c0 = channels[0];
        let groups = c.norm_num_groups.unwrap_or(32);
        let time_embed_dim = c.time_embed_dim();
        let time_proj = Timesteps::new(c0, c.flip_sin_to_cos, c.freq_shift);
        let time_embedding = TimestepEmbedding::load(
            backend,
            &w.push("time_embedding"),
            c0,
            time_embed_dim,
            c.act_fn,
            c.timestep_post_act,
            c.time_cond_proj_dim,
        )?;
        let class_embedding = ClassEmbedding::load(
            backend,
            &w.push("class_embedding"),
            c.class_embed_type,
            c.num_class_embeds,
            c.projection_class_embeddings_input_dim,
            c0,
            time_embed_dim,
            c.act_fn,
        )?;
        let blocks_temb = if c.class_embeddings_concat {
            2 * time_embed_dim
        } else {
            time_embed_dim
        };
        let resnet = ResnetSpec {
            temb_channels: Some(blocks_temb),
            groups,
            eps: c.norm_eps,
            act: c.act_fn,
            time_embedding_norm: c.resnet_time_scale_shift,
            output_scale_factor: 1.0,
        };
        let cross = c
            .cross_attention_dim(0)
            .ok_or_else(|| missing("cross_attention_dim"))?;
        let transformer = |block: usize, layers: Vec<usize>| -> Result<AttentionSpec> {
            Ok(AttentionSpec::Transformer {
                heads: c
                    .heads(block)
                    .ok_or_else(|| missing("attention_head_dim"))?,
                layers,
                cross_attention_dim: cross,
                use_linear_projection: c.use_linear_projection,
                upcast_attention: c.upcast_attention,
                only_cross_attention: c
                    .only_cross_attention
                    .get(block)
                    .ok_or_else(|| missing("only_cross_attention"))?,
            })
        };
        let conv_in = Conv2d::load(
            backend,
            &w.push("conv_in"),
            c.in_channels,
            c0,
            c.conv_in_kernel,
            1,
            (c.conv_in_kernel - 1) / 2,
            true,
        )?;

        let mut down_blocks = Vec::with_capacity(blocks);
        let mut output = c0;
        for (i, &kind) in c.down_block_types.iter().enumerate() {
            let input = output;
            output = channels[i];
            let layers = c
                .layers_per_block
                .get(i)
                .ok_or_else(|| missing("layers_per_block"))?;
            let attention = match kind {
                DownBlockType::CrossAttnDownBlock2D => transformer(
                    i,
                    (0..layers)
                        .map(|l| {
                            c.down_transformer_layers(i, l)
                                .ok_or_else(|| missing("transformer_layers_per_block"))
                        })
                        .collect::<Result<_>>()?,
                )?,
                _ => AttentionSpec::None,
            };
            let downsample = if i + 1 == blocks {
                DownsampleSpec::None
            } else {
                DownsampleSpec::Conv {
                    padding: c.downsample_padding,
                }
            };
            down_blocks.push(DownBlock::load(
                backend,
                &w.push("down_blocks").index(i),
                kind,
                input,
                output,
                layers,
                &resnet,
                &attention,
                downsample,
            )?);
        }

        let last = channels[blocks - 1];
        let mid_resnet = ResnetSpec {
            output_scale_factor: c.mid_block_scale_factor,
            ..resnet
        };
        let mid_block = match c.mid_block_type {
            Some(MidBlockType::UnetMidBlock2DCrossAttn) => {
                let layers = c
                    .mid_transformer_layers()
                    .ok_or_else(|| missing("transformer_layers_per_block"))?;
                // diffusers does not pass only_cross_attention to this mid block.
                let attention = match transformer(blocks - 1, vec![layers])? {
                    AttentionSpec::Transformer {
                        heads,
                        layers,
                        cross_attention_dim,
                        use_linear_projection,
                        upcast_attention,
                        ..
                    } => AttentionSpec::Transformer {
                        heads,
                        layers,
                        cross_attention_dim,
                        use_linear_projection,
                        upcast_attention,
                        only_cross_attention: false,
                    },
                    other => other,
                };
                Some(MidBlock::load(
                    backend,
                    &w.push("mid_block"),
                    last,
                    1,
                    &mid_resnet,
                    &attention,
                )?)
            }
            // diffusers builds this mid block with no attention layers: one resnet.
            Some(MidBlockType::UnetMidBlock2D) => Some(MidBlock::load(
                backend,
                &w.push("mid_block"),
                last,
                0,
                &mid_resnet,
                &AttentionSpec::None,
            )?),
            None => None,
        };

        let mut up_blocks = Vec::with_capacity(blocks);
        let mut output = last;
        for (i, &kind) in c.up_block_types.iter().enumerate() {
            let mirrored = blocks - 1 - i;
            let prev = output;
            output = channels[mirrored];
            let input = channels[mirrored.saturating_sub(1)];
            let layers = c
                .layers_per_block
                .get(mirrored)
                .ok_or_else(|| missing("layers_per_block"))?
                + 1;
            let attention = match kind {
                UpBlockType::CrossAttnUpBlock2D => transformer(
                    mirrored,
                    (0..layers)
                        .map(|l| {
                            c.up_transformer_layers(i, l)
                                .ok_or_else(|| missing("transformer_layers_per_block"))
                        })
                        .collect::<Result<_>>()?,
                )?,
                _ => AttentionSpec::None,
            };
            let upsample = if i + 1 == blocks {
                UpsampleSpec::None
            } else {
                UpsampleSpec::Conv
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
                layers,
                true,
                &resnet,
                &attention,
                upsample,
            )?);
        }

        let conv_norm_out =
            GroupNorm::load(backend, &w.push("conv_norm_out"), c0, groups, c.norm_eps)?;
        let conv_out = Conv2d::load(
            backend,
            &w.push("conv_out"),
            c0,
            c.out_channels,
            c.conv_out_kernel,
            1,
            (c.conv_out_kernel - 1) / 2,
            true,
        )?;
        Ok(Unet2DConditionModel {
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
        config: Unet2DConditionConfig,
        dtype: LoadDType,
    ) -> Result<Self> {
        Self::from_source(backend, &store.root().with_dtype(dtype), config)
    }

    /// Loads a diffusers `unet/` folder: `config.json` and the weights, preferring the given
    /// variants in order, in `f32`.
    ///
    /// # Errors
    /// As [`Unet2DConditionConfig::from_file`] and [`load`](Self::load); unused weights are
    /// an error in strict mode.
    pub fn from_dir(
        backend: &B,
        dir: impl AsRef<Path>,
        variants: &[Variant],
        strict: bool,
    ) -> Result<Self> {
        Self::from_dir_as(backend, dir, variants, strict, LoadDType::F32)
    }

    /// As [`from_dir`](Self::from_dir), with the weights handed to the backend in `dtype`:
    /// [`LoadDType::Stored`] keeps a half-precision file in its precision, which halves the
    /// weights' memory on the CPU backend.
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
        let config = Unet2DConditionConfig::from_file(dir.join("config.json"))?;
        OpenOptions::new()
            .rename(|k| Some(rename_legacy_attention(k)))
            .strict(strict)
            .load_folder(dir, variants, |store| {
                Self::load(backend, store, config, dtype)
            })
    }

    /// The network with seeded random weights ([`RandomWeights`]), for benchmarks and tests
    /// of full-size configurations.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration.
    pub fn random(backend: &B, config: Unet2DConditionConfig, seed: u64) -> Result<Self> {
        Self::from_source(backend, &RandomWeights::new(seed), config)
    }

    /// The configuration.
    pub fn config(&self) -> &Unet2DConditionConfig {
        &self.config
    }

    /// The noise (or v, or x0) prediction for `sample [N, in_channels, H, W]` at
    /// `timesteps` (one for the whole batch, or one per entry; fractional values allowed)
    /// given the text embeddings `encoder_hidden_states [N, L, cross_attention_dim]`.
    ///
    /// # Errors
    /// As [`forward_with`](Self::forward_with).
    pub fn forward(
        &self,
        backend: &B,
        sample: &B::Tensor,
        timesteps: &[f64],
        encoder_hidden_states: &B::Tensor,
    ) -> Result<B::Tensor> {
        self.forward_with(
            backend,
            sample,
            timesteps,
            encoder_hidden_states,
            &UnetConditioning::default(),
        )
    }

    /// [`forward`](Self::forward) with class labels and a guidance embedding.
    ///
    /// # Errors
    /// [`Error::Shape`] for a sample that is not `[N, in_channels, H, W]` or whose height or
    /// width is not a positive multiple of the downsampling factor, text embeddings that are
    /// not `[N, L, cross_attention_dim]`, a timestep count other than 1 or `N`, missing or
    /// unexpected class labels, labels of the wrong kind, or a guidance embedding of the
    /// wrong shape or for a network without one; [`Error::TokenOutOfVocab`] for a class id past the table.
    pub fn forward_with(
        &self,
        backend: &B,
        sample: &B::Tensor,
        timesteps: &[f64],
        encoder_hidden_states: &B::Tensor,
        extra: &UnetConditioning<'_, B>,
    ) -> Result<B::Tensor> {
        let c = &self.config;
        let n = check_sample(
            backend,
            sample,
            c.in_channels,
            c.downsample_factor(),
            "UNet2DConditionModel",
        )?;
        let cross = c.cross_attention_dim(0).unwrap_or(0);
        match *backend.shape(encoder_hidden_states) {
            [b, l, d] if b == n && l > 0 && d == cross => {}
            ref other => {
                return Err(Error::Shape {
                    op: "UNet2DConditionModel",
                    expected: format!("encoder_hidden_states [{n}, L, {cross}]"),
                    found: format!("{other:?}"),
                });
            }
        }
        let timesteps = broadcast_timesteps(timesteps, n, "UNet2DConditionModel")?;
        let timestep_cond = match (c.time_cond_proj_dim, extra.timestep_cond) {
            (Some(d), Some(t)) => {
                if backend.shape(t) != [n, d] {
                    return Err(Error::Shape {
                        op: "UNet2DConditionModel",
                        expected: format!("timestep_cond [{n}, {d}]"),
                        found: format!("{:?}", backend.shape(t)),
                    });
                }
                Some(t)
            }
            (None, Some(_)) => {
                return Err(Error::Shape {
                    op: "UNet2DConditionModel",
                    expected: "no timestep_cond for a network without time_cond_proj_dim".into(),
                    found: "timestep_cond".into(),
                });
            }
            (_, None) => None,
        };

        let sample = if c.center_input_sample {
            backend.affine(sample, 2.0, -1.0)?
        } else {
            sample.clone()
        };
        let t_emb = self.time_proj.forward(backend, &timesteps)?;
        let mut emb = self
            .time_embedding
            .forward(backend, &t_emb, timestep_cond)?;
        match (&self.class_embedding, extra.class_labels) {
            (Some(class), Some(labels)) => {
                let class_emb = class.forward(backend, labels, n, &self.time_proj)?;
                emb = if c.class_embeddings_concat {
                    backend.concat(&[&emb, &class_emb], 1)?
                } else {
                    backend.add(&emb, &class_emb)?
                };
            }
            (Some(_), None) => return Err(missing_labels("UNet2DConditionModel")),
            // diffusers ignores labels given to an unconditional network.
            (None, _) => {}
        }
        if let Some(act) = c.time_embedding_act_fn {
            emb = act.forward(backend, &emb)?;
        }

        let text = Some(encoder_hidden_states);
        let mut h = self.conv_in.forward(backend, &sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            let (out, s) = block.forward(backend, &h, Some(&emb), text)?;
            h = out;
            skips.extend(s);
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(backend, &h, Some(&emb), text)?;
        }
        for block in &self.up_blocks {
            h = block.forward(backend, &h, &mut skips, Some(&emb), text)?;
        }
        let h = self.conv_norm_out.forward_act(backend, &h, c.act_fn)?;
        self.conv_out.forward(backend, &h)
    }
}

/// Checks `sample [N, channels, H, W]` with `H` and `W` positive multiples of `factor`;
/// returns `N`.
pub(crate) fn check_sample<B: Backend>(
    backend: &B,
    sample: &B::Tensor,
    channels: usize,
    factor: usize,
    op: &'static str,
) -> Result<usize> {
    match *backend.shape(sample) {
        [n, ch, h, w]
            if n > 0
                && ch == channels
                && h > 0
                && w > 0
                && h.is_multiple_of(factor)
                && w.is_multiple_of(factor) =>
        {
            Ok(n)
        }
        ref other => Err(Error::Shape {
            op,
            expected: format!(
                "sample [N, {channels}, H, W] with H and W positive multiples of {factor}"
            ),
            found: format!("{other:?}"),
        }),
    }
}

/// One timestep per batch entry, from one for the batch or one per entry.
pub(crate) fn broadcast_timesteps(
    timesteps: &[f64],
    n: usize,
    op: &'static str,
) -> Result<Vec<f64>> {
    match timesteps {
        [t] => Ok(vec![*t; n]),
        ts if ts.len() == n => Ok(ts.to_vec()),
        ts => Err(Error::Shape {
            op,
            expected: format!("1 or {n} timesteps"),
            found: format!("{}", ts.len()),
        }),
    }
}

pub(crate) fn missing_labels(op: &'static str) -> Error {
    Error::Shape {
        op,
        expected: "class labels for a class-conditional network".into(),
        found: "none".into(),
    }
}

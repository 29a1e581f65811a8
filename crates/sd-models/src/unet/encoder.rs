//! The encoder half of diffusers' `UNet2DConditionModel`, shared with `ControlNetModel`
//! (`models/controlnets/controlnet.py`), which is a copy of it:
//!
//! ```text
//! emb   = time_embedding(time_proj(t), timestep_cond)  (+ class_embedding(labels), or concat)
//!         + add_embedding([text_embeds, add_time_proj(time_ids)])   SDXL's "text_time"
//! h     = conv_in(sample)                 (a ControlNet adds its hint embedding here)
//! skips = [h];  for each down block:  h, s = block(h, emb, text);  skips += s
//! h     = mid_block(h, emb, text)
//! ```
//!
//! The pieces are separate methods ([`UnetEncoder::embed`], [`UnetEncoder::down`],
//! [`UnetEncoder::mid`]) because the two networks call them in different places. The
//! encoder's weights sit at the root of the checkpoint (`time_embedding.*`, `conv_in.*`,
//! `down_blocks.*`, `mid_block.*`), as in both networks' files.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::source::WeightSource;
use crate::nn::{ClassEmbedding, ClassLabels, Conv2d, TimestepEmbedding, Timesteps};
use crate::unet::blocks::{AttentionSpec, DownBlock, DownsampleSpec, MidBlock, ResnetSpec};
use crate::unet::condition::{broadcast_timesteps, missing_labels};
use crate::unet::config::{DownBlockType, MidBlockType, Unet2DConditionConfig};

/// Optional inputs of [`Unet2DConditionModel::forward_with`](super::Unet2DConditionModel::forward_with)
/// and the ControlNet.
#[derive(Debug)]
pub struct UnetConditioning<'a, B: Backend> {
    /// Class labels, required by class-conditional networks.
    pub class_labels: Option<ClassLabels<'a, B::Tensor>>,
    /// The guidance embedding `[N, time_cond_proj_dim]` of LCM-distilled networks.
    pub timestep_cond: Option<&'a B::Tensor>,
    /// Residuals added to the skip connections (diffusers'
    /// `down_block_additional_residuals`), one per skip, each of its skip's shape: what a
    /// ControlNet computes. Ignored by the ControlNet itself.
    pub down_residuals: Option<&'a [B::Tensor]>,
    /// A residual added to the mid block's output (`mid_block_additional_residual`).
    pub mid_residual: Option<&'a B::Tensor>,
    /// SDXL's pooled text embeddings `[N, D]` (`added_cond_kwargs["text_embeds"]`), required
    /// by networks with `addition_embed_type: "text_time"`.
    pub text_embeds: Option<&'a B::Tensor>,
    /// SDXL's micro-conditioning ids (`added_cond_kwargs["time_ids"]`): `K` numbers per
    /// entry, entry after entry (`K = 6` for the base model: original size, crop top-left,
    /// target size; 5 for the refiner), required with `text_embeds`.
    pub time_ids: Option<&'a [f64]>,
}

impl<B: Backend> Default for UnetConditioning<'_, B> {
    fn default() -> Self {
        UnetConditioning {
            class_labels: None,
            timestep_cond: None,
            down_residuals: None,
            mid_residual: None,
            text_embeds: None,
            time_ids: None,
        }
    }
}

impl<B: Backend> Clone for UnetConditioning<'_, B> {
    fn clone(&self) -> Self {
        UnetConditioning {
            class_labels: self.class_labels,
            timestep_cond: self.timestep_cond,
            down_residuals: self.down_residuals,
            mid_residual: self.mid_residual,
            text_embeds: self.text_embeds,
            time_ids: self.time_ids,
        }
    }
}

/// The time embedding, `conv_in`, the down blocks and the mid block of a conditional UNet
/// or a ControlNet; see the module documentation. Field names are the checkpoint's key
/// segments.
#[derive(Debug, Clone)]
pub struct UnetEncoder<B: Backend> {
    config: Unet2DConditionConfig,
    /// The sinusoidal projection of the timesteps (no weights).
    pub time_proj: Timesteps,
    /// `linear_1`, `linear_2` (and `cond_proj`).
    pub time_embedding: TimestepEmbedding<B>,
    /// The class embedding of class-conditional networks.
    pub class_embedding: Option<ClassEmbedding<B>>,
    /// The sinusoidal projection of SDXL's micro-conditioning ids (`"text_time"`).
    pub add_time_proj: Option<Timesteps>,
    /// SDXL's added embedding of the pooled text embeddings and the projected ids
    /// (`linear_1`, `linear_2`).
    pub add_embedding: Option<TimestepEmbedding<B>>,
    /// `sample -> block_out_channels[0]`.
    pub conv_in: Conv2d<B>,
    /// The down blocks.
    pub down_blocks: Vec<DownBlock<B>>,
    /// The mid block.
    pub mid_block: Option<MidBlock<B>>,
}

/// What every resnet of a conditional UNet shares.
pub(crate) fn resnet_spec(c: &Unet2DConditionConfig) -> ResnetSpec {
    let time_embed_dim = c.time_embed_dim();
    ResnetSpec {
        temb_channels: Some(if c.class_embeddings_concat {
            2 * time_embed_dim
        } else {
            time_embed_dim
        }),
        groups: c.norm_num_groups.unwrap_or(32),
        eps: c.norm_eps,
        act: c.act_fn,
        time_embedding_norm: c.resnet_time_scale_shift,
        output_scale_factor: 1.0,
    }
}

/// An error for a per-block key with no entry for a block.
pub(crate) fn missing_entry(what: String, key: &str) -> Error {
    Error::Config {
        what,
        message: format!("{key} has no entry for a block"),
    }
}

/// The cross-attention transformers of block `block` (`layers`: transformer blocks after
/// each resnet); `mid` leaves out `only_cross_attention`, which diffusers does not pass to
/// the mid block.
pub(crate) fn transformer_spec(
    c: &Unet2DConditionConfig,
    block: usize,
    layers: Vec<usize>,
    mid: bool,
    what: &dyn Fn() -> String,
) -> Result<AttentionSpec> {
    let missing = |key: &str| missing_entry(what(), key);
    Ok(AttentionSpec::Transformer {
        heads: c
            .heads(block)
            .ok_or_else(|| missing("attention_head_dim"))?,
        layers,
        cross_attention_dim: c
            .cross_attention_dim(0)
            .ok_or_else(|| missing("cross_attention_dim"))?,
        use_linear_projection: c.use_linear_projection,
        upcast_attention: c.upcast_attention,
        only_cross_attention: !mid
            && c.only_cross_attention
                .get(block)
                .ok_or_else(|| missing("only_cross_attention"))?,
    })
}

impl<B: Backend> UnetEncoder<B> {
    /// Loads the encoder half of a network of configuration `config` from the root of its
    /// checkpoint.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration; a missing or misshapen weight (named).
    pub fn load<S: WeightSource>(
        backend: &B,
        w: &S,
        config: Unet2DConditionConfig,
    ) -> Result<Self> {
        config.validate("UNet2DConditionModel config")?;
        let c = &config;
        let what = || w.describe();
        let missing = |key: &str| missing_entry(what(), key);
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
        let (add_time_proj, add_embedding) = match c.text_time_dims() {
            Some((input, time_dim)) => (
                Some(Timesteps::new(time_dim, c.flip_sin_to_cos, c.freq_shift)),
                // diffusers builds it with TimestepEmbedding's default activation, SiLU.
                Some(TimestepEmbedding::load(
                    backend,
                    &w.push("add_embedding"),
                    input,
                    time_embed_dim,
                    crate::nn::Activation::Silu,
                    None,
                    None,
                )?),
            ),
            None => (None, None),
        };
        let resnet = resnet_spec(c);
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
                DownBlockType::CrossAttnDownBlock2D => transformer_spec(
                    c,
                    i,
                    (0..layers)
                        .map(|l| {
                            c.down_transformer_layers(i, l)
                                .ok_or_else(|| missing("transformer_layers_per_block"))
                        })
                        .collect::<Result<_>>()?,
                    false,
                    &what,
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
                let attention = transformer_spec(c, blocks - 1, vec![layers], true, &what)?;
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
        Ok(UnetEncoder {
            config,
            time_proj,
            time_embedding,
            class_embedding,
            add_time_proj,
            add_embedding,
            conv_in,
            down_blocks,
            mid_block,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Unet2DConditionConfig {
        &self.config
    }

    /// Checks `sample [N, in_channels, H, W]` (any positive size) and the text embeddings
    /// `[N, L, cross_attention_dim]`; returns `N`.
    ///
    /// # Errors
    /// [`Error::Shape`] naming `op` and the misshapen input.
    pub fn check_inputs(
        &self,
        backend: &B,
        sample: &B::Tensor,
        encoder_hidden_states: &B::Tensor,
        op: &'static str,
    ) -> Result<usize> {
        let c = &self.config;
        let n = check_sample(backend, sample, c.in_channels, 1, op)?;
        let cross = c.cross_attention_dim(0).unwrap_or(0);
        match *backend.shape(encoder_hidden_states) {
            [b, l, d] if b == n && l > 0 && d == cross => Ok(n),
            ref other => Err(Error::Shape {
                op,
                expected: format!("encoder_hidden_states [{n}, L, {cross}]"),
                found: format!("{other:?}"),
            }),
        }
    }

    /// The time embedding `[N, time_embed_dim]` (twice as wide with
    /// `class_embeddings_concat`) of `timesteps` (one, or one per entry), with the class
    /// labels and guidance embedding of `extra`.
    ///
    /// # Errors
    /// [`Error::Shape`] for a timestep count other than 1 or `N`, missing class labels for a
    /// class-conditional network or labels of the wrong kind, or a guidance embedding of the
    /// wrong shape or for a network without one; [`Error::TokenOutOfVocab`] for a class id
    /// past the table.
    pub fn embed(
        &self,
        backend: &B,
        n: usize,
        timesteps: &[f64],
        extra: &UnetConditioning<'_, B>,
        op: &'static str,
    ) -> Result<B::Tensor> {
        let c = &self.config;
        let timesteps = broadcast_timesteps(timesteps, n, op)?;
        let timestep_cond = match (c.time_cond_proj_dim, extra.timestep_cond) {
            (Some(d), Some(t)) => {
                if backend.shape(t) != [n, d] {
                    return Err(Error::Shape {
                        op,
                        expected: format!("timestep_cond [{n}, {d}]"),
                        found: format!("{:?}", backend.shape(t)),
                    });
                }
                Some(t)
            }
            (None, Some(_)) => {
                return Err(Error::Shape {
                    op,
                    expected: "no timestep_cond for a network without time_cond_proj_dim".into(),
                    found: "timestep_cond".into(),
                });
            }
            (_, None) => None,
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
            (Some(_), None) => return Err(missing_labels(op)),
            // diffusers ignores labels given to an unconditional network.
            (None, _) => {}
        }
        if let Some(aug) = self.added_embedding(backend, n, extra, op)? {
            emb = backend.add(&emb, &aug)?;
        }
        if let Some(act) = c.time_embedding_act_fn {
            emb = act.forward(backend, &emb)?;
        }
        Ok(emb)
    }

    /// SDXL's added embedding (`get_aug_embed` for `"text_time"`):
    /// `add_embedding([text_embeds, add_time_proj(time_ids) as [N, K * dim]])`; `None` for
    /// other networks, which ignore the inputs as diffusers does.
    fn added_embedding(
        &self,
        backend: &B,
        n: usize,
        extra: &UnetConditioning<'_, B>,
        op: &'static str,
    ) -> Result<Option<B::Tensor>> {
        let (Some(proj), Some(add), Some((input, time_dim))) = (
            &self.add_time_proj,
            &self.add_embedding,
            self.config.text_time_dims(),
        ) else {
            return Ok(None);
        };
        let (Some(text), Some(ids)) = (extra.text_embeds, extra.time_ids) else {
            return Err(Error::Shape {
                op,
                expected: "text_embeds and time_ids for a network with addition_embed_type \
                           \"text_time\" (SDXL)"
                    .into(),
                found: "none".into(),
            });
        };
        let text_dim = match *backend.shape(text) {
            [rows, d] if rows == n && d < input => d,
            ref other => {
                return Err(Error::Shape {
                    op,
                    expected: format!("text_embeds [{n}, D] with D < {input}"),
                    found: format!("{other:?}"),
                });
            }
        };
        let per_entry = input - text_dim;
        if !per_entry.is_multiple_of(time_dim) || ids.len() * time_dim != n * per_entry {
            return Err(Error::Shape {
                op,
                expected: format!(
                    "{} time_ids ({} per entry: projection_class_embeddings_input_dim {input} = \
                     text_embeds {text_dim} + ids x addition_time_embed_dim {time_dim})",
                    n * per_entry / time_dim.max(1),
                    per_entry / time_dim.max(1)
                ),
                found: format!("{}", ids.len()),
            });
        }
        let projected = proj.forward(backend, ids)?;
        let projected = backend.reshape(&projected, &[n, per_entry])?;
        let text = backend.cast(text, backend.dtype(&projected))?;
        let joined = backend.concat(&[&text, &projected], 1)?;
        Ok(Some(add.forward(backend, &joined, None)?))
    }

    /// `conv_in` of the sample, mapped from `[0, 1]` to `[-1, 1]` first with
    /// `center_input_sample`.
    ///
    /// # Errors
    /// A shape mismatch.
    pub fn conv_in(&self, backend: &B, sample: &B::Tensor) -> Result<B::Tensor> {
        if self.config.center_input_sample {
            let centred = backend.affine(sample, 2.0, -1.0)?;
            self.conv_in.forward(backend, &centred)
        } else {
            self.conv_in.forward(backend, sample)
        }
    }

    /// The down blocks on `h` (the output of `conv_in`): the lowest-resolution activations
    /// and the skip connections, `h` first (one per down-block resnet and downsampler, plus
    /// one: 12 for Stable Diffusion).
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn down(
        &self,
        backend: &B,
        h: &B::Tensor,
        emb: &B::Tensor,
        text: &B::Tensor,
    ) -> Result<(B::Tensor, Vec<B::Tensor>)> {
        let mut h = h.clone();
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            let (out, s) = block.forward(backend, &h, Some(emb), Some(text))?;
            h = out;
            skips.extend(s);
        }
        Ok((h, skips))
    }

    /// The mid block (the identity for a network without one).
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn mid(
        &self,
        backend: &B,
        h: &B::Tensor,
        emb: &B::Tensor,
        text: &B::Tensor,
    ) -> Result<B::Tensor> {
        match &self.mid_block {
            Some(mid) => mid.forward(backend, h, Some(emb), Some(text)),
            None => Ok(h.clone()),
        }
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
            expected: if factor > 1 {
                format!("sample [N, {channels}, H, W] with H and W positive multiples of {factor}")
            } else {
                format!("sample [N, {channels}, H, W]")
            },
            found: format!("{other:?}"),
        }),
    }
}

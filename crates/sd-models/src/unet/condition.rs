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
//! Latents of any size run, as in diffusers: where a skip connection is of odd size, the up
//! block before it resizes to that size (`forward_upsample_size`). A ControlNet's residuals
//! enter through [`UnetConditioning`] (`down_block_additional_residuals`,
//! `mid_block_additional_residual`).

use std::path::Path;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::source::WeightSource;
use crate::nn::{Conv2d, GroupNorm, RandomWeights, rename_legacy_attention};
use crate::unet::blocks::{AttentionSpec, UpBlock, UpChannels, UpsampleSpec};
use crate::unet::config::{Unet2DConditionConfig, UpBlockType};
use crate::unet::encoder::{
    UnetConditioning, UnetEncoder, missing_entry, resnet_spec, transformer_spec,
};
use crate::weights::{LoadDType, OpenOptions, Variant, WeightStore};

/// diffusers' `UNet2DConditionModel`; see the module documentation. Field names are the
/// checkpoint's key segments.
#[derive(Debug, Clone)]
pub struct Unet2DConditionModel<B: Backend> {
    /// The time embedding, `conv_in`, the down blocks and the mid block (their keys at the
    /// root of the checkpoint), shared with the ControlNet.
    pub encoder: UnetEncoder<B>,
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
        let encoder = UnetEncoder::load(backend, w, config)?;
        let c = encoder.config();
        let what = || w.describe();
        let missing = |key: &str| missing_entry(what(), key);
        let channels = &c.block_out_channels;
        let blocks = channels.len();
        let c0 = channels[0];
        let resnet = resnet_spec(c);
        let mut up_blocks = Vec::with_capacity(blocks);
        let mut output = channels[blocks - 1];
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
                UpBlockType::CrossAttnUpBlock2D => transformer_spec(
                    c,
                    mirrored,
                    (0..layers)
                        .map(|l| {
                            c.up_transformer_layers(i, l)
                                .ok_or_else(|| missing("transformer_layers_per_block"))
                        })
                        .collect::<Result<_>>()?,
                    false,
                    &what,
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
        let groups = c.norm_num_groups.unwrap_or(32);
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
            encoder,
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
        self.encoder.config()
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

    /// [`forward`](Self::forward) with class labels, a guidance embedding and a
    /// ControlNet's residuals.
    ///
    /// # Errors
    /// [`Error::Shape`] for a sample that is not `[N, in_channels, H, W]` with positive `H`
    /// and `W`, text embeddings that are not `[N, L, cross_attention_dim]`, a timestep count
    /// other than 1 or `N`, missing or unexpected class labels, labels of the wrong kind, a
    /// guidance embedding of the wrong shape or for a network without one, or residuals of
    /// another count or shape than the skip connections and mid block output;
    /// [`Error::TokenOutOfVocab`] for a class id past the table.
    pub fn forward_with(
        &self,
        backend: &B,
        sample: &B::Tensor,
        timesteps: &[f64],
        encoder_hidden_states: &B::Tensor,
        extra: &UnetConditioning<'_, B>,
    ) -> Result<B::Tensor> {
        const OP: &str = "UNet2DConditionModel";
        let enc = &self.encoder;
        let n = enc.check_inputs(backend, sample, encoder_hidden_states, OP)?;
        let emb = enc.embed(backend, n, timesteps, extra, OP)?;
        let text = encoder_hidden_states;
        let h = enc.conv_in(backend, sample)?;
        let (h, mut skips) = enc.down(backend, &h, &emb, text)?;
        if let Some(residuals) = extra.down_residuals {
            add_residuals(backend, &mut skips, residuals)?;
        }
        let mut h = enc.mid(backend, &h, &emb, text)?;
        if let Some(r) = extra.mid_residual {
            h = add_residual(backend, &h, r, "mid_block_additional_residual")?;
        }
        let blocks = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let remaining = skips.len().saturating_sub(block.skips_needed());
            // diffusers passes the next skip's size only when the latent is not a multiple
            // of the downsampling; resizing to 2x is the same as doubling.
            let upsample_size = match skips.get(remaining.wrapping_sub(1)) {
                Some(next) if i + 1 < blocks => match *backend.shape(next) {
                    [_, _, h, w] => Some((h, w)),
                    _ => None,
                },
                _ => None,
            };
            h = block.forward_to(
                backend,
                &h,
                &mut skips,
                Some(&emb),
                Some(text),
                upsample_size,
            )?;
        }
        let h = self
            .conv_norm_out
            .forward_act(backend, &h, self.config().act_fn)?;
        self.conv_out.forward(backend, &h)
    }
}

/// Adds a ControlNet's residuals to the skip connections, one for one (not in place).
fn add_residuals<B: Backend>(
    backend: &B,
    skips: &mut [B::Tensor],
    residuals: &[B::Tensor],
) -> Result<()> {
    if residuals.len() != skips.len() {
        return Err(Error::Shape {
            op: "UNet2DConditionModel",
            expected: format!(
                "{} down_block_additional_residuals, one per skip connection",
                skips.len()
            ),
            found: format!("{}", residuals.len()),
        });
    }
    for (skip, r) in skips.iter_mut().zip(residuals) {
        *skip = add_residual(backend, skip, r, "down_block_additional_residuals")?;
    }
    Ok(())
}

/// `x + r` for a residual of `x`'s shape, or `[N, C, 1, 1]`.
fn add_residual<B: Backend>(
    backend: &B,
    x: &B::Tensor,
    r: &B::Tensor,
    what: &str,
) -> Result<B::Tensor> {
    // Pooled ControlNets (`global_pool_conditions`) give one value per channel, broadcast.
    let pooled = matches!((backend.shape(x), backend.shape(r)),
        (&[n, c, _, _], &[rn, rc, 1, 1]) if (rn, rc) == (n, c));
    if backend.shape(x) != backend.shape(r) && !pooled {
        return Err(Error::Shape {
            op: "UNet2DConditionModel",
            expected: format!("{what} of shape {:?}", backend.shape(x)),
            found: format!("{:?}", backend.shape(r)),
        });
    }
    backend.add(x, r)
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

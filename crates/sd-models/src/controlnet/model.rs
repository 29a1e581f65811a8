//! diffusers' `ControlNetModel` (`models/controlnets/controlnet.py`; Zhang et al., 2023,
//! "Adding Conditional Control to Text-to-Image Diffusion Models"):
//!
//! ```text
//! hint  = conv_out(silu(blocks(... silu(conv_in(image)) ...)))      once per generation
//! emb   = time embedding, as the UNet's
//! h     = conv_in(sample) + hint
//! skips = down blocks (h),  m = mid_block(...)                       the UNet's encoder
//! down  = [zero_conv_i(skip_i) * s_i],  mid = controlnet_mid_block(m) * s_mid
//! ```
//!
//! with `s_i` the conditioning scale, or in guess mode `scale * 10^(-1 + i / K)` for the
//! `K + 1` outputs (0.1 for the first skip up to 1 for the mid block). With
//! `global_pool_conditions` every residual is averaged over height and width.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::backend::Backend;
use crate::controlnet::config::{ChannelOrder, ControlNetConfig};
use crate::error::{Error, Result};
use crate::nn::source::WeightSource;
use crate::nn::{ClassLabels, Conv2d, RandomWeights, rename_legacy_attention};
use crate::unet::encoder::check_sample;
use crate::unet::{UnetConditioning, UnetEncoder};
use crate::weights::compvis::{ControlNetFile, open_controlnet};
use crate::weights::{LoadDType, OpenOptions, Variant, WeightStore};

/// The hint network (`controlnet_cond_embedding`): the control image to a feature map at the
/// latents' resolution with the UNet's first block width. Field names are the keys.
#[derive(Debug, Clone)]
pub struct ControlNetConditioningEmbedding<B: Backend> {
    /// `conditioning_channels -> widths[0]`, 3x3.
    pub conv_in: Conv2d<B>,
    /// For each later width: a 3x3 convolution keeping the width, then a 3x3 convolution of
    /// stride 2 to the next width.
    pub blocks: Vec<Conv2d<B>>,
    /// `widths[last] -> block_out_channels[0]`, 3x3 (zero-initialised in training).
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> ControlNetConditioningEmbedding<B> {
    fn load<S: WeightSource>(
        backend: &B,
        w: &S,
        in_channels: usize,
        widths: &[usize],
        out_channels: usize,
    ) -> Result<Self> {
        let conv =
            |w: &S, cin, cout, stride| Conv2d::load(backend, w, cin, cout, 3, stride, 1, true);
        let conv_in = conv(&w.push("conv_in"), in_channels, widths[0], 1)?;
        let mut blocks = Vec::with_capacity(2 * widths.len());
        for (i, pair) in widths.windows(2).enumerate() {
            let b = w.push("blocks");
            blocks.push(conv(&b.index(2 * i), pair[0], pair[0], 1)?);
            blocks.push(conv(&b.index(2 * i + 1), pair[0], pair[1], 2)?);
        }
        let last = widths[widths.len() - 1];
        let conv_out = conv(&w.push("conv_out"), last, out_channels, 1)?;
        Ok(ControlNetConditioningEmbedding {
            conv_in,
            blocks,
            conv_out,
        })
    }

    /// `image [N, C, H, W] -> [N, block_out_channels[0], H / f, W / f]`.
    ///
    /// # Errors
    /// A shape mismatch.
    pub fn forward(&self, backend: &B, image: &B::Tensor) -> Result<B::Tensor> {
        let mut h = backend.silu(&self.conv_in.forward(backend, image)?)?;
        for block in &self.blocks {
            h = backend.silu(&block.forward(backend, &h)?)?;
        }
        self.conv_out.forward(backend, &h)
    }
}

/// What a ControlNet adds to the UNet: one residual per skip connection and one for the mid
/// block's output (`[N, C, 1, 1]` each with `global_pool_conditions`).
#[derive(Debug, Clone)]
pub struct ControlNetOutput<T> {
    /// Residuals of the skip connections, in the order the UNet's down half makes them.
    pub down: Vec<T>,
    /// The residual of the mid block's output.
    pub mid: T,
}

/// How a ControlNet's residuals are scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlScale {
    /// `controlnet_conditioning_scale`: every residual is multiplied by it.
    pub scale: f32,
    /// diffusers' `guess_mode`: the residuals grow from `0.1 * scale` at the first skip
    /// connection to `scale` at the mid block (logarithmically); with guidance the pipelines
    /// run the ControlNet on the prompt's half of the batch only. Ignored with
    /// `global_pool_conditions`.
    pub guess_mode: bool,
}

impl Default for ControlScale {
    fn default() -> Self {
        ControlScale {
            scale: 1.0,
            guess_mode: false,
        }
    }
}

impl ControlScale {
    /// The factor of each of the `count` outputs (the skips' residuals, then the mid block's).
    fn factors(&self, count: usize, pooled: bool) -> Vec<f32> {
        if self.guess_mode && !pooled {
            // torch.logspace(-1, 0, count): in single precision, as diffusers computes it.
            let steps = count.saturating_sub(1).max(1) as f32;
            (0..count)
                .map(|i| 10f32.powf(-1.0 + i as f32 / steps) * self.scale)
                .collect()
        } else {
            vec![self.scale; count]
        }
    }
}

/// What a ControlNet evaluation takes besides the latents, timesteps and text.
#[derive(Debug)]
pub struct ControlInput<'a, T> {
    /// The control image's embedding ([`ControlNetModel::embed_hint`]).
    pub hint: &'a ControlHint<T>,
    /// How the residuals are scaled.
    pub scale: ControlScale,
    /// Class labels, for a class-conditional ControlNet.
    pub class_labels: Option<ClassLabels<'a, T>>,
    /// SDXL's pooled text embeddings `[N, D]`, for an SDXL ControlNet.
    pub text_embeds: Option<&'a T>,
    /// SDXL's micro-conditioning ids, `K` per entry (see
    /// [`UnetConditioning::time_ids`]).
    pub time_ids: Option<&'a [f64]>,
}

impl<'a, T> ControlInput<'a, T> {
    /// The hint at `scale`, with no class labels.
    pub fn new(hint: &'a ControlHint<T>, scale: ControlScale) -> Self {
        ControlInput {
            hint,
            scale,
            class_labels: None,
            text_embeds: None,
            time_ids: None,
        }
    }
}

/// The control image's hint embedding, computed once per generation by
/// [`ControlNetModel::embed_hint`] and reused at every step.
#[derive(Debug, Clone)]
pub struct ControlHint<T> {
    /// `[1 or N, block_out_channels[0], h, w]`.
    pub embedding: T,
}

/// diffusers' `ControlNetModel`; see the module documentation. Field names are the
/// checkpoint's key segments; the encoder's sit at the root.
#[derive(Debug, Clone)]
pub struct ControlNetModel<B: Backend> {
    config: ControlNetConfig,
    /// The copy of the UNet's time embedding, `conv_in`, down blocks and mid block.
    pub encoder: UnetEncoder<B>,
    /// The hint network.
    pub controlnet_cond_embedding: ControlNetConditioningEmbedding<B>,
    /// The 1x1 "zero convolutions" of the skip connections.
    pub controlnet_down_blocks: Vec<Conv2d<B>>,
    /// The 1x1 zero convolution of the mid block's output.
    pub controlnet_mid_block: Conv2d<B>,
    hints_embedded: Arc<AtomicUsize>,
}

impl<B: Backend> ControlNetModel<B> {
    /// Builds the network from any [`WeightSource`].
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration; a missing or misshapen weight (named).
    pub fn from_source<S: WeightSource>(
        backend: &B,
        w: &S,
        config: ControlNetConfig,
    ) -> Result<Self> {
        config.validate("ControlNetModel config")?;
        let encoder = UnetEncoder::load(backend, w, config.unet_config())?;
        let channels = &config.block_out_channels;
        let controlnet_cond_embedding = ControlNetConditioningEmbedding::load(
            backend,
            &w.push("controlnet_cond_embedding"),
            config.conditioning_channels,
            &config.conditioning_embedding_out_channels,
            channels[0],
        )?;
        let zero_conv = |w: &S, c: usize| Conv2d::load(backend, w, c, c, 1, 1, 0, true);
        let blocks = w.push("controlnet_down_blocks");
        let controlnet_down_blocks = config
            .down_residual_widths()
            .iter()
            .enumerate()
            .map(|(i, &c)| zero_conv(&blocks.index(i), c))
            .collect::<Result<Vec<_>>>()?;
        let last = channels[channels.len() - 1];
        let controlnet_mid_block = zero_conv(&w.push("controlnet_mid_block"), last)?;
        Ok(ControlNetModel {
            config,
            encoder,
            controlnet_cond_embedding,
            controlnet_down_blocks,
            controlnet_mid_block,
            hints_embedded: Arc::default(),
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
        config: ControlNetConfig,
        dtype: LoadDType,
    ) -> Result<Self> {
        Self::from_source(backend, &store.root().with_dtype(dtype), config)
    }

    /// Loads a diffusers ControlNet folder (`config.json` and the weights, preferring the
    /// given variants in order: `[Variant::Fp16, Variant::Default]` takes
    /// `diffusion_pytorch_model.fp16.safetensors` where there is one), in `f32`.
    ///
    /// # Errors
    /// As [`ControlNetConfig::from_file`] and [`load`](Self::load); unused weights are an
    /// error in strict mode.
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
        let config = ControlNetConfig::from_file(dir.join("config.json"))?;
        OpenOptions::new()
            .rename(|k| Some(rename_legacy_attention(k)))
            .strict(strict)
            .load_folder(dir, variants, |store| {
                Self::load(backend, store, config, dtype)
            })
    }

    /// Loads a ControlNet single file in the original layout (the `.safetensors` conversions
    /// of lllyasviel's ControlNet 1.0 and 1.1 `.pth` releases, keys with or without
    /// `control_model.`), its config inferred from the shapes ([`open_controlnet`]); every
    /// ControlNet key must be used.
    ///
    /// # Errors
    /// As [`open_controlnet`] (a file that is not a ControlNet is [`Error::CannotInfer`]) and
    /// [`from_file`](Self::from_file).
    pub fn from_single_file(backend: &B, path: impl AsRef<Path>, dtype: LoadDType) -> Result<Self> {
        Self::from_file(backend, open_controlnet(path, dtype, true)?)
    }

    /// Loads an opened ControlNet single file with its (possibly changed) config, then ends
    /// loading ([`WeightStore::finish`]).
    ///
    /// # Errors
    /// As [`from_source`](Self::from_source); unused keys in strict mode.
    pub fn from_file(backend: &B, file: ControlNetFile) -> Result<Self> {
        let net = Self::from_source(backend, &file.store.root(), file.config)?;
        file.store.finish()?;
        Ok(net)
    }

    /// The network with seeded random weights ([`RandomWeights`]), for benchmarks and tests.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration.
    pub fn random(backend: &B, config: ControlNetConfig, seed: u64) -> Result<Self> {
        Self::from_source(backend, &RandomWeights::new(seed), config)
    }

    /// The configuration.
    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// How many times [`embed_hint`](Self::embed_hint) has run (the pipelines run it once
    /// per generation, not per step).
    pub fn hints_embedded(&self) -> usize {
        self.hints_embedded.load(Ordering::Relaxed)
    }

    /// The hint embedding of a control image `[N, conditioning_channels, H, W]` with values
    /// in [0, 1] (not [-1, 1]) and `H`, `W` multiples of the hint network's downsampling.
    ///
    /// # Errors
    /// [`Error::Shape`] for another channel count or a size the hint network cannot
    /// downsample exactly.
    pub fn embed_hint(&self, backend: &B, image: &B::Tensor) -> Result<ControlHint<B::Tensor>> {
        let c = &self.config;
        check_sample(
            backend,
            image,
            c.conditioning_channels,
            c.hint_downsample_factor(),
            "ControlNetModel control image",
        )?;
        let image = match c.controlnet_conditioning_channel_order {
            ChannelOrder::Rgb => image.clone(),
            ChannelOrder::Bgr => {
                let planes = (0..c.conditioning_channels)
                    .rev()
                    .map(|i| backend.slice(image, 1, i, 1))
                    .collect::<Result<Vec<_>>>()?;
                let refs: Vec<&B::Tensor> = planes.iter().collect();
                backend.concat(&refs, 1)?
            }
        };
        self.hints_embedded.fetch_add(1, Ordering::Relaxed);
        Ok(ControlHint {
            embedding: self.controlnet_cond_embedding.forward(backend, &image)?,
        })
    }

    /// The residuals for the UNet, for `sample [N, in_channels, h, w]` at `timesteps`,
    /// with the text embeddings `[N, L, cross_attention_dim]` and the hint of
    /// [`embed_hint`](Self::embed_hint) (of batch 1, shared by every entry, or `N`) at the
    /// scale of `control`.
    ///
    /// # Errors
    /// [`Error::Shape`] for misshapen inputs or a hint whose size is not the latents';
    /// [`Error::Config`] for a scale that is not finite; as the UNet's time embedding.
    pub fn forward(
        &self,
        backend: &B,
        sample: &B::Tensor,
        timesteps: &[f64],
        encoder_hidden_states: &B::Tensor,
        control: &ControlInput<'_, B::Tensor>,
    ) -> Result<ControlNetOutput<B::Tensor>> {
        const OP: &str = "ControlNetModel";
        let enc = &self.encoder;
        let n = enc.check_inputs(backend, sample, encoder_hidden_states, OP)?;
        let (hint, scale) = (control.hint, control.scale);
        if !scale.scale.is_finite() {
            return Err(Error::Config {
                what: "controlnet_conditioning_scale".into(),
                message: format!("{} is not a finite number", scale.scale),
            });
        }
        let extra = UnetConditioning {
            class_labels: control.class_labels,
            text_embeds: control.text_embeds,
            time_ids: control.time_ids,
            ..UnetConditioning::default()
        };
        let emb = enc.embed(backend, n, timesteps, &extra, OP)?;
        let h = enc.conv_in(backend, sample)?;
        let hint = match (backend.shape(&hint.embedding), backend.shape(&h)) {
            (&[hn, hc, hh, hw], &[_, c, lh, lw]) if hc == c && hh == lh && hw == lw => {
                // A hint of batch 1 is broadcast by the addition.
                if hn != n && hn != 1 {
                    return Err(hint_error(backend.shape(&hint.embedding), n, c, lh, lw));
                }
                &hint.embedding
            }
            (found, &[_, c, lh, lw]) => return Err(hint_error(found, n, c, lh, lw)),
            _ => unreachable_shape()?,
        };
        let h = backend.add(&h, hint)?;
        let (h, skips) = enc.down(backend, &h, &emb, encoder_hidden_states)?;
        let mid = enc.mid(backend, &h, &emb, encoder_hidden_states)?;

        let factors = scale.factors(skips.len() + 1, self.config.global_pool_conditions);
        let finish = |x: B::Tensor, factor: f32| -> Result<B::Tensor> {
            let x = backend.affine(&x, factor, 0.0)?;
            if self.config.global_pool_conditions {
                spatial_mean(backend, &x)
            } else {
                Ok(x)
            }
        };
        let down = skips
            .iter()
            .zip(&self.controlnet_down_blocks)
            .zip(&factors)
            .map(|((skip, conv), &f)| finish(conv.forward(backend, skip)?, f))
            .collect::<Result<Vec<_>>>()?;
        let mid = finish(
            self.controlnet_mid_block.forward(backend, &mid)?,
            factors[factors.len() - 1],
        )?;
        Ok(ControlNetOutput { down, mid })
    }
}

fn hint_error(found: &[usize], n: usize, c: usize, h: usize, w: usize) -> Error {
    Error::Shape {
        op: "ControlNetModel",
        expected: format!(
            "a hint embedding [1 or {n}, {c}, {h}, {w}] (a control image of the output's size)"
        ),
        found: format!("{found:?}"),
    }
}

fn unreachable_shape<T>() -> Result<T> {
    Err(Error::Shape {
        op: "ControlNetModel",
        expected: "[N, C, H, W] activations".into(),
        found: "another rank".into(),
    })
}

/// The mean over height and width, `[N, C, H, W] -> [N, C, 1, 1]`.
fn spatial_mean<B: Backend>(backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
    let [n, c, h, w] = match *backend.shape(x) {
        [n, c, h, w] => [n, c, h, w],
        _ => return unreachable_shape(),
    };
    let flat = backend.reshape(x, &[n * c, h * w])?;
    let ones = backend.upload(&vec![1.0 / (h * w) as f32; h * w], &[h * w, 1])?;
    let mean = backend.matmul(&flat, &ones)?;
    backend.reshape(&mean, &[n, c, 1, 1])
}

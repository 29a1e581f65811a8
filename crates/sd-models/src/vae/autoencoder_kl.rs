//! Stable Diffusion's VAE (Kingma & Welling, 2014; Rombach et al., 2022), diffusers'
//! `AutoencoderKL` (`models/autoencoders/autoencoder_kl.py`, with `Encoder`, `Decoder` and
//! `DiagonalGaussianDistribution` from `vae.py`):
//!
//! ```text
//! encoder:  conv_in, DownEncoderBlock2Ds, mid block (resnet, attention, resnet),
//!           conv_norm_out, SiLU, conv_out  -> quant_conv -> [mean, logvar]
//! decoder:  post_quant_conv -> conv_in, mid block, UpDecoderBlock2Ds,
//!           conv_norm_out, SiLU, conv_out
//! ```
//!
//! The pipelines scale latents for the UNet: `(z - shift_factor) * scaling_factor` after
//! encoding ([`AutoencoderKl::scale_latents`]) and back before decoding
//! ([`AutoencoderKl::unscale_latents`]).
//!
//! Reduced precision: in `f16` the decoder's activations overflow (the mid block and the
//! last up blocks of Stable Diffusion's VAE exceed 65504 on ordinary latents), which is why
//! diffusers' configs carry `force_upcast` and pipelines decode in `f32`.
//! [`DecoderPrecision::F32`] (the default) keeps the activations in `f32` whatever the
//! weights' dtype and whatever dtype the backend handed the latents over in (the encoder,
//! likewise, always takes its image in `f32`); [`DecoderPrecision::NaiveF16`] rounds them to
//! `f16` after every block, as a plain half-precision decoder stores them, and shows the
//! overflow.

use std::path::Path;

use crate::backend::{Backend, DType};
use crate::error::{Error, Result};
use crate::nn::source::WeightSource;
use crate::nn::{Conv2d, GroupNorm, RandomWeights, TimeEmbeddingNorm, rename_legacy_attention};
use crate::unet::blocks::{
    AttentionSpec, DownBlock, DownsampleSpec, MidBlock, ResnetSpec, UpBlock, UpChannels,
    UpsampleSpec,
};
use crate::unet::config::{DownBlockType, UpBlockType};
use crate::vae::config::AutoencoderKlConfig;
use crate::vae::tiling::{Tiling, tiled};
use crate::weights::{LoadDType, OpenOptions, Variant, WeightStore};

/// How the decoder keeps its activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum DecoderPrecision {
    /// `f32` activations whatever the weights' dtype (diffusers' `force_upcast`).
    #[default]
    F32,
    /// Activations rounded to `f16` after every block (conv_in, the mid block, each up
    /// block, the output norm and conv_out): what a plain half-precision decoder computes,
    /// overflowing to infinity (then NaN) past 65504.
    NaiveF16,
}

fn spec(config: &AutoencoderKlConfig) -> ResnetSpec {
    ResnetSpec {
        temb_channels: None,
        groups: config.norm_num_groups,
        eps: 1e-6,
        act: config.act_fn,
        time_embedding_norm: TimeEmbeddingNorm::Default,
        output_scale_factor: 1.0,
    }
}

fn mid_attention(config: &AutoencoderKlConfig, channels: usize) -> AttentionSpec {
    if config.mid_block_add_attention {
        // One head as wide as the block.
        AttentionSpec::Spatial {
            dim_head: channels,
            norm_num_groups: Some(config.norm_num_groups),
            eps: 1e-6,
            rescale_output_factor: 1.0,
        }
    } else {
        AttentionSpec::None
    }
}

/// diffusers' `Encoder` (with `double_z`): image to `2 * latent_channels` moments.
#[derive(Debug, Clone)]
pub struct Encoder<B: Backend> {
    /// `in_channels -> block_out_channels[0]`.
    pub conv_in: Conv2d<B>,
    /// `DownEncoderBlock2D`s.
    pub down_blocks: Vec<DownBlock<B>>,
    /// Resnet, attention, resnet.
    pub mid_block: MidBlock<B>,
    /// The output norm (followed by SiLU).
    pub conv_norm_out: GroupNorm<B>,
    /// `block_out_channels[-1] -> 2 * latent_channels`.
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Encoder<B> {
    fn load<S: WeightSource>(backend: &B, w: &S, c: &AutoencoderKlConfig) -> Result<Self> {
        let channels = &c.block_out_channels;
        let blocks = channels.len();
        let resnet = spec(c);
        let mut down_blocks = Vec::with_capacity(blocks);
        let mut output = channels[0];
        for (i, &block_channels) in channels.iter().enumerate() {
            let input = output;
            output = block_channels;
            down_blocks.push(DownBlock::load(
                backend,
                &w.push("down_blocks").index(i),
                DownBlockType::DownEncoderBlock2D,
                input,
                output,
                c.layers_per_block,
                &resnet,
                &AttentionSpec::None,
                if i + 1 == blocks {
                    DownsampleSpec::None
                } else {
                    DownsampleSpec::Conv { padding: 0 }
                },
            )?);
        }
        let last = channels[blocks - 1];
        Ok(Encoder {
            conv_in: Conv2d::load(
                backend,
                &w.push("conv_in"),
                c.in_channels,
                channels[0],
                3,
                1,
                1,
                true,
            )?,
            down_blocks,
            mid_block: MidBlock::load(
                backend,
                &w.push("mid_block"),
                last,
                1,
                &resnet,
                &mid_attention(c, last),
            )?,
            conv_norm_out: GroupNorm::load(
                backend,
                &w.push("conv_norm_out"),
                last,
                c.norm_num_groups,
                1e-6,
            )?,
            conv_out: Conv2d::load(
                backend,
                &w.push("conv_out"),
                last,
                2 * c.latent_channels,
                3,
                1,
                1,
                true,
            )?,
        })
    }

    /// `x [N, in_channels, H, W] -> [N, 2 * latent_channels, H / f, W / f]`.
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let mut h = self.conv_in.forward(backend, x)?;
        for block in &self.down_blocks {
            h = block.forward(backend, &h, None, None)?.0;
        }
        h = self.mid_block.forward(backend, &h, None, None)?;
        h = self.conv_norm_out.forward_silu(backend, &h)?;
        self.conv_out.forward(backend, &h)
    }
}

/// diffusers' `Decoder`: latents to an image.
#[derive(Debug, Clone)]
pub struct Decoder<B: Backend> {
    /// `latent_channels -> block_out_channels[-1]`.
    pub conv_in: Conv2d<B>,
    /// Resnet, attention, resnet.
    pub mid_block: MidBlock<B>,
    /// `UpDecoderBlock2D`s.
    pub up_blocks: Vec<UpBlock<B>>,
    /// The output norm (followed by SiLU).
    pub conv_norm_out: GroupNorm<B>,
    /// `block_out_channels[0] -> out_channels`.
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Decoder<B> {
    fn load<S: WeightSource>(backend: &B, w: &S, c: &AutoencoderKlConfig) -> Result<Self> {
        let channels = &c.block_out_channels;
        let blocks = channels.len();
        let resnet = spec(c);
        let last = channels[blocks - 1];
        let mut up_blocks = Vec::with_capacity(blocks);
        let mut output = last;
        for i in 0..blocks {
            let prev = output;
            output = channels[blocks - 1 - i];
            up_blocks.push(UpBlock::load(
                backend,
                &w.push("up_blocks").index(i),
                UpBlockType::UpDecoderBlock2D,
                UpChannels {
                    in_channels: prev,
                    prev_output_channels: prev,
                    out_channels: output,
                },
                c.layers_per_block + 1,
                false,
                &resnet,
                &AttentionSpec::None,
                if i + 1 == blocks {
                    UpsampleSpec::None
                } else {
                    UpsampleSpec::Conv
                },
            )?);
        }
        Ok(Decoder {
            conv_in: Conv2d::load(
                backend,
                &w.push("conv_in"),
                c.latent_channels,
                last,
                3,
                1,
                1,
                true,
            )?,
            mid_block: MidBlock::load(
                backend,
                &w.push("mid_block"),
                last,
                1,
                &resnet,
                &mid_attention(c, last),
            )?,
            up_blocks,
            conv_norm_out: GroupNorm::load(
                backend,
                &w.push("conv_norm_out"),
                channels[0],
                c.norm_num_groups,
                1e-6,
            )?,
            conv_out: Conv2d::load(
                backend,
                &w.push("conv_out"),
                channels[0],
                c.out_channels,
                3,
                1,
                1,
                true,
            )?,
        })
    }

    /// `z [N, latent_channels, h, w] -> [N, out_channels, h f, w f]`, keeping activations
    /// as `precision` says.
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn forward(
        &self,
        backend: &B,
        z: &B::Tensor,
        precision: DecoderPrecision,
    ) -> Result<B::Tensor> {
        let round = |t: B::Tensor| -> Result<B::Tensor> {
            match precision {
                DecoderPrecision::NaiveF16 => backend.cast(&t, DType::F16),
                _ => Ok(t),
            }
        };
        let mut h = round(self.conv_in.forward(backend, z)?)?;
        h = round(self.mid_block.forward(backend, &h, None, None)?)?;
        let mut no_skips = Vec::new();
        for block in &self.up_blocks {
            h = round(block.forward(backend, &h, &mut no_skips, None, None)?)?;
        }
        h = round(self.conv_norm_out.forward_silu(backend, &h)?)?;
        h = round(self.conv_out.forward(backend, &h)?)?;
        backend.cast(&h, DType::F32)
    }
}

/// `t` in f32: itself when it already is, a cast otherwise.
fn upcast<B: Backend>(backend: &B, t: &B::Tensor) -> Result<B::Tensor> {
    if backend.dtype(t) == DType::F32 {
        Ok(t.clone())
    } else {
        backend.cast(t, DType::F32)
    }
}

/// The encoder's output distribution, diffusers' `DiagonalGaussianDistribution`: the
/// moments split into a mean and a log-variance clamped to `[-30, 20]`.
///
/// The backend has no `exp` or clamp, so the clamp and the standard deviation are computed on
/// the host from the downloaded moments (the latent is small: `1/48` of the image for
/// Stable Diffusion) and uploaded.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian<B: Backend> {
    /// The encoder's output `[N, 2 * latent_channels, h, w]` (diffusers' `parameters`).
    pub moments: B::Tensor,
    /// `[N, latent_channels, h, w]`.
    pub mean: B::Tensor,
    /// Clamped to `[-30, 20]`.
    pub logvar: B::Tensor,
    /// `exp(logvar / 2)`.
    pub std: B::Tensor,
}

impl<B: Backend> DiagonalGaussian<B> {
    /// Splits `moments [N, 2C, h, w]`.
    ///
    /// # Errors
    /// [`Error::Shape`] for moments that are not 4-D with an even channel count.
    pub fn new(backend: &B, moments: B::Tensor) -> Result<Self> {
        let [n, c2, h, w] = match *backend.shape(&moments) {
            [n, c2, h, w] if c2 % 2 == 0 && c2 > 0 => [n, c2, h, w],
            ref other => {
                return Err(Error::Shape {
                    op: "DiagonalGaussian",
                    expected: "moments [N, 2C, h, w]".into(),
                    found: format!("{other:?}"),
                });
            }
        };
        let c = c2 / 2;
        let mean = backend.slice(&moments, 1, 0, c)?;
        let logvar = backend.download(&backend.slice(&moments, 1, c, c)?)?;
        let logvar: Vec<f32> = logvar.into_iter().map(|v| v.clamp(-30.0, 20.0)).collect();
        let std: Vec<f32> = logvar.iter().map(|&v| (0.5 * v).exp()).collect();
        let shape = [n, c, h, w];
        Ok(DiagonalGaussian {
            mean,
            logvar: backend.upload(&logvar, &shape)?,
            std: backend.upload(&std, &shape)?,
            moments,
        })
    }

    /// The mode (the mean).
    pub fn mode(&self) -> B::Tensor {
        self.mean.clone()
    }

    /// A sample `mean + std * noise`, with standard normal `noise` of the mean's shape drawn
    /// by the caller.
    ///
    /// # Errors
    /// [`Error::Shape`] for noise of another shape.
    pub fn sample(&self, backend: &B, noise: &B::Tensor) -> Result<B::Tensor> {
        if backend.shape(noise) != backend.shape(&self.mean) {
            return Err(Error::Shape {
                op: "DiagonalGaussian::sample",
                expected: format!("noise {:?}", backend.shape(&self.mean)),
                found: format!("{:?}", backend.shape(noise)),
            });
        }
        backend.add(&self.mean, &backend.mul(&self.std, noise)?)
    }
}

/// diffusers' `AutoencoderKL`; see the module documentation.
#[derive(Debug, Clone)]
pub struct AutoencoderKl<B: Backend> {
    config: AutoencoderKlConfig,
    /// The encoder.
    pub encoder: Encoder<B>,
    /// The decoder.
    pub decoder: Decoder<B>,
    /// 1x1 on the moments (`use_quant_conv`).
    pub quant_conv: Option<Conv2d<B>>,
    /// 1x1 on the latents (`use_post_quant_conv`).
    pub post_quant_conv: Option<Conv2d<B>>,
}

impl<B: Backend> AutoencoderKl<B> {
    /// Builds the VAE from any [`WeightSource`].
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration; a missing or misshapen weight (named).
    pub fn from_source<S: WeightSource>(
        backend: &B,
        w: &S,
        config: AutoencoderKlConfig,
    ) -> Result<Self> {
        config.validate("AutoencoderKL config")?;
        let c = &config;
        let (l, l2) = (c.latent_channels, 2 * c.latent_channels);
        let quant_conv = if c.use_quant_conv {
            Some(Conv2d::load(
                backend,
                &w.push("quant_conv"),
                l2,
                l2,
                1,
                1,
                0,
                true,
            )?)
        } else {
            None
        };
        let post_quant_conv = if c.use_post_quant_conv {
            Some(Conv2d::load(
                backend,
                &w.push("post_quant_conv"),
                l,
                l,
                1,
                1,
                0,
                true,
            )?)
        } else {
            None
        };
        Ok(AutoencoderKl {
            encoder: Encoder::load(backend, &w.push("encoder"), c)?,
            decoder: Decoder::load(backend, &w.push("decoder"), c)?,
            quant_conv,
            post_quant_conv,
            config,
        })
    }

    /// Loads the VAE from a store in diffusers' key layout, converting weights to `dtype`.
    ///
    /// # Errors
    /// As [`from_source`](Self::from_source).
    pub fn load(
        backend: &B,
        store: &WeightStore,
        config: AutoencoderKlConfig,
        dtype: LoadDType,
    ) -> Result<Self> {
        Self::from_source(backend, &store.root().with_dtype(dtype), config)
    }

    /// Loads a diffusers `vae/` folder in `f32`, accepting the deprecated attention names
    /// (`query`, `key`, `value`, `proj_attn`) of older checkpoints.
    ///
    /// # Errors
    /// As [`AutoencoderKlConfig::from_file`] and [`load`](Self::load); unused weights are an
    /// error in strict mode.
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
        let config = AutoencoderKlConfig::from_file(dir.join("config.json"))?;
        OpenOptions::new()
            .rename(|k| Some(rename_legacy_attention(k)))
            .strict(strict)
            .load_folder(dir, variants, |store| {
                Self::load(backend, store, config, dtype)
            })
    }

    /// The VAE with seeded random weights.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration.
    pub fn random(backend: &B, config: AutoencoderKlConfig, seed: u64) -> Result<Self> {
        Self::from_source(backend, &RandomWeights::new(seed), config)
    }

    /// The configuration.
    pub fn config(&self) -> &AutoencoderKlConfig {
        &self.config
    }

    /// diffusers' tile geometry for this VAE: `sample_size` image tiles, latent tiles
    /// `downsample_factor` times smaller, overlap 0.25 (what `enable_tiling()` sets).
    pub fn default_tiling(&self) -> Tiling {
        let sample = self.config.sample_size.height_width().0;
        Tiling {
            sample_size: sample,
            latent_size: sample / self.config.downsample_factor(),
            overlap_factor: 0.25,
        }
    }

    fn check(
        &self,
        backend: &B,
        x: &B::Tensor,
        channels: usize,
        what: &str,
        op: &'static str,
    ) -> Result<()> {
        match *backend.shape(x) {
            [n, c, h, w] if n > 0 && c == channels && h > 0 && w > 0 => Ok(()),
            ref other => Err(Error::Shape {
                op,
                expected: format!("{what} [N, {channels}, H, W]"),
                found: format!("{other:?}"),
            }),
        }
    }

    fn encode_whole(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        // In f32 whatever the backend stores, as diffusers' pipelines upcast the VAE.
        let x = upcast(backend, x)?;
        let h = self.encoder.forward(backend, &x)?;
        match &self.quant_conv {
            Some(q) => q.forward(backend, &h),
            None => Ok(h),
        }
    }

    fn decode_whole(
        &self,
        backend: &B,
        z: &B::Tensor,
        precision: DecoderPrecision,
    ) -> Result<B::Tensor> {
        // A backend holding activations in half precision hands over half-precision latents:
        // `F32` decodes them in f32 (the products then promote the half weights).
        let z = match precision {
            DecoderPrecision::NaiveF16 => z.clone(),
            _ => upcast(backend, z)?,
        };
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(backend, &z)?,
            None => z,
        };
        self.decoder.forward(backend, &z, precision)
    }

    /// Encodes images `x [N, in_channels, H, W]` (values in `[-1, 1]`) to the latent
    /// distribution. Sizes that are not multiples of the downsampling factor are allowed
    /// (the strided convolutions round up, as PyTorch's).
    ///
    /// # Errors
    /// [`Error::Shape`] for a misshapen input.
    pub fn encode(&self, backend: &B, x: &B::Tensor) -> Result<DiagonalGaussian<B>> {
        self.encode_with(backend, x, None)
    }

    /// [`encode`](Self::encode), tiled as diffusers' `use_tiling` does when `tiling` is
    /// given: only an image larger than a tile is tiled.
    ///
    /// # Errors
    /// [`Error::Shape`] for a misshapen input; [`Error::Config`] for an invalid tiling.
    pub fn encode_with(
        &self,
        backend: &B,
        x: &B::Tensor,
        tiling: Option<Tiling>,
    ) -> Result<DiagonalGaussian<B>> {
        self.check(
            backend,
            x,
            self.config.in_channels,
            "image",
            "AutoencoderKL::encode",
        )?;
        let moments = match tiling {
            Some(t) if larger_than(backend, x, t.sample_size) => {
                self.tiled_encode(backend, x, t)?
            }
            _ => self.encode_whole(backend, x)?,
        };
        DiagonalGaussian::new(backend, moments)
    }

    /// Encodes `x` tile by tile (diffusers' `_tiled_encode`), returning the moments.
    ///
    /// # Errors
    /// [`Error::Shape`] for a misshapen input; [`Error::Config`] for an invalid tiling.
    pub fn tiled_encode(&self, backend: &B, x: &B::Tensor, tiling: Tiling) -> Result<B::Tensor> {
        tiling.validate()?;
        self.check(
            backend,
            x,
            self.config.in_channels,
            "image",
            "AutoencoderKL::encode",
        )?;
        tiled(
            backend,
            x,
            tiling.sample_size,
            tiling.latent_size,
            tiling.overlap_factor,
            |tile| self.encode_whole(backend, tile),
        )
    }

    /// Decodes latents `z [N, latent_channels, h, w]` (unscaled: see
    /// [`unscale_latents`](Self::unscale_latents)) to images, in `f32`.
    ///
    /// # Errors
    /// [`Error::Shape`] for misshapen latents.
    pub fn decode(&self, backend: &B, z: &B::Tensor) -> Result<B::Tensor> {
        self.decode_with(backend, z, DecoderPrecision::F32, None)
    }

    /// [`decode`](Self::decode) with a precision, tiled as diffusers' `use_tiling` does when
    /// `tiling` is given: only latents larger than a latent tile are tiled.
    ///
    /// # Errors
    /// [`Error::Shape`] for misshapen latents; [`Error::Config`] for an invalid tiling.
    pub fn decode_with(
        &self,
        backend: &B,
        z: &B::Tensor,
        precision: DecoderPrecision,
        tiling: Option<Tiling>,
    ) -> Result<B::Tensor> {
        self.check(
            backend,
            z,
            self.config.latent_channels,
            "latents",
            "AutoencoderKL::decode",
        )?;
        match tiling {
            Some(t) if larger_than(backend, z, t.latent_size) => {
                self.tiled_decode(backend, z, t, precision)
            }
            _ => self.decode_whole(backend, z, precision),
        }
    }

    /// Decodes `z` tile by tile (diffusers' `tiled_decode`).
    ///
    /// # Errors
    /// [`Error::Shape`] for misshapen latents; [`Error::Config`] for an invalid tiling.
    pub fn tiled_decode(
        &self,
        backend: &B,
        z: &B::Tensor,
        tiling: Tiling,
        precision: DecoderPrecision,
    ) -> Result<B::Tensor> {
        tiling.validate()?;
        self.check(
            backend,
            z,
            self.config.latent_channels,
            "latents",
            "AutoencoderKL::decode",
        )?;
        tiled(
            backend,
            z,
            tiling.latent_size,
            tiling.sample_size,
            tiling.overlap_factor,
            |tile| self.decode_whole(backend, tile, precision),
        )
    }

    /// Encoder latents to the UNet's scale, as the pipelines do after encoding:
    /// `(z - shift_factor) * scaling_factor`.
    ///
    /// # Errors
    /// Backend failures.
    pub fn scale_latents(&self, backend: &B, z: &B::Tensor) -> Result<B::Tensor> {
        let scale = self.config.scaling_factor;
        let shift = self.config.shift_factor.unwrap_or(0.0);
        backend.affine(z, scale as f32, (-shift * scale) as f32)
    }

    /// The UNet's latents back to the decoder's scale, as the pipelines do before decoding:
    /// `latents / scaling_factor + shift_factor`.
    ///
    /// # Errors
    /// Backend failures.
    pub fn unscale_latents(&self, backend: &B, latents: &B::Tensor) -> Result<B::Tensor> {
        let scale = self.config.scaling_factor;
        let shift = self.config.shift_factor.unwrap_or(0.0);
        backend.affine(latents, (1.0 / scale) as f32, shift as f32)
    }
}

fn larger_than<B: Backend>(backend: &B, x: &B::Tensor, size: usize) -> bool {
    let s = backend.shape(x);
    s.get(2).is_some_and(|&h| h > size) || s.get(3).is_some_and(|&w| w > size)
}

//! The residual block of every UNet and VAE, diffusers' `ResnetBlock2D` (`models/resnet.py`;
//! Ho et al., 2020, after Zagoruyko & Komodakis' wide ResNets):
//!
//! ```text
//! h = conv1(act(norm1(x)))                  (x and h resampled first when up or down)
//! default:      h = norm2(h + time_emb_proj(act(temb)))
//! scale_shift:  scale, shift = time_emb_proj(act(temb));  h = norm2(h) * (1 + scale) + shift
//! h = conv2(act(h))
//! out = (conv_shortcut(x) or x + h) / output_scale_factor
//! ```
//!
//! Keys: `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut` (1x1, present
//! when the channel count changes).

use serde::Deserialize;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::sampling::{Downsample2D, Upsample2D};
use crate::nn::source::WeightSource;
use crate::nn::{Activation, Conv2d, GroupNorm, Linear};

/// How a resnet block takes the time embedding (`resnet_time_scale_shift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[non_exhaustive]
pub enum TimeEmbeddingNorm {
    /// Added before `norm2` (`"default"`).
    #[default]
    #[serde(rename = "default")]
    Default,
    /// A scale and a shift applied after `norm2` (`"scale_shift"`).
    #[serde(rename = "scale_shift")]
    ScaleShift,
}

/// Resampling inside a resnet block (diffusers' `up` / `down` flags), applied to the input and
/// to the normalised activations before `conv1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Resample {
    /// None.
    #[default]
    None,
    /// Nearest-neighbour upsampling by 2.
    Up,
    /// 2x2 average pooling.
    Down,
}

/// The shape of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResnetConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Width of the time embedding; `None` for the VAE's blocks, which have none.
    pub temb_channels: Option<usize>,
    /// Groups of `norm1` and `norm2`.
    pub groups: usize,
    /// The norms' epsilon.
    pub eps: f64,
    /// The activation.
    pub act: Activation,
    /// How the time embedding enters.
    pub time_embedding_norm: TimeEmbeddingNorm,
    /// The output is divided by this.
    pub output_scale_factor: f64,
    /// Resampling.
    pub resample: Resample,
}

/// diffusers' `ResnetBlock2D`; see the module documentation.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D<B: Backend> {
    /// Before `conv1`.
    pub norm1: GroupNorm<B>,
    /// 3x3, `in -> out`.
    pub conv1: Conv2d<B>,
    /// `temb -> out` (`2 out` for scale-shift).
    pub time_emb_proj: Option<Linear<B>>,
    /// Before `conv2`.
    pub norm2: GroupNorm<B>,
    /// 3x3, `out -> out`.
    pub conv2: Conv2d<B>,
    /// 1x1, `in -> out`, when they differ.
    pub conv_shortcut: Option<Conv2d<B>>,
    config: ResnetConfig,
}

impl<B: Backend> ResnetBlock2D<B> {
    /// Loads a block.
    ///
    /// # Errors
    /// [`Error::Config`] for groups that do not divide the channels; a missing or misshapen
    /// weight.
    pub fn load<S: WeightSource>(backend: &B, w: &S, config: ResnetConfig) -> Result<Self> {
        let (cin, cout) = (config.in_channels, config.out_channels);
        let time_emb_proj = match config.temb_channels {
            Some(t) => {
                let out = match config.time_embedding_norm {
                    TimeEmbeddingNorm::Default => cout,
                    TimeEmbeddingNorm::ScaleShift => 2 * cout,
                };
                Some(Linear::load(
                    backend,
                    &w.push("time_emb_proj"),
                    t,
                    out,
                    true,
                )?)
            }
            None => None,
        };
        Ok(ResnetBlock2D {
            norm1: GroupNorm::load(backend, &w.push("norm1"), cin, config.groups, config.eps)?,
            conv1: Conv2d::load(backend, &w.push("conv1"), cin, cout, 3, 1, 1, true)?,
            time_emb_proj,
            norm2: GroupNorm::load(backend, &w.push("norm2"), cout, config.groups, config.eps)?,
            conv2: Conv2d::load(backend, &w.push("conv2"), cout, cout, 3, 1, 1, true)?,
            conv_shortcut: if cin == cout {
                None
            } else {
                Some(Conv2d::load(
                    backend,
                    &w.push("conv_shortcut"),
                    cin,
                    cout,
                    1,
                    1,
                    0,
                    true,
                )?)
            },
            config,
        })
    }

    /// The block's shape.
    pub fn config(&self) -> &ResnetConfig {
        &self.config
    }

    /// `x [N, in, H, W]` (and `temb [N, temb_channels]`) to `[N, out, H', W']`.
    ///
    /// # Errors
    /// [`Error::Shape`] for a block with a time projection given no embedding (or the
    /// reverse), and for shape mismatches.
    pub fn forward(
        &self,
        backend: &B,
        x: &B::Tensor,
        temb: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        // Each intermediate is reassigned, not shadowed, so that it is dropped (and its
        // buffer reused) as soon as the next one exists: at 512 pixels the VAE's are 128 MiB.
        let act = self.config.act;
        let mut h = self.norm1.forward_act(backend, x, act)?;
        let mut x = x.clone();
        match self.config.resample {
            Resample::None => {}
            Resample::Up => {
                x = Upsample2D::nearest().forward(backend, &x)?;
                h = Upsample2D::nearest().forward(backend, &h)?;
            }
            Resample::Down => {
                x = Downsample2D::avg_pool().forward(backend, &x)?;
                h = Downsample2D::avg_pool().forward(backend, &h)?;
            }
        }
        h = self.conv1.forward(backend, &h)?;
        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.forward(backend, &act.forward(backend, t)?)?;
                let n = backend.shape(&t).first().copied().unwrap_or(0);
                let c = backend.shape(&t).get(1).copied().unwrap_or(0);
                Some(backend.reshape(&t, &[n, c, 1, 1])?)
            }
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                return Err(Error::Shape {
                    op: "ResnetBlock2D",
                    expected: format!(
                        "a time embedding exactly when the block has one ({})",
                        self.config.temb_channels.is_some()
                    ),
                    found: format!("time embedding given: {}", temb.is_some()),
                });
            }
        };
        h = match (self.config.time_embedding_norm, temb) {
            (TimeEmbeddingNorm::ScaleShift, Some(t)) => {
                let c = self.config.out_channels;
                let scale = backend.slice(&t, 1, 0, c)?;
                let shift = backend.slice(&t, 1, c, c)?;
                h = self.norm2.forward(backend, &h)?;
                h = backend.mul(&h, &backend.affine(&scale, 1.0, 1.0)?)?;
                h = backend.add(&h, &shift)?;
                act.forward(backend, &h)?
            }
            (_, Some(t)) => {
                h = backend.add(&h, &t)?;
                self.norm2.forward_act(backend, &h, act)?
            }
            (_, None) => self.norm2.forward_act(backend, &h, act)?,
        };
        h = self.conv2.forward(backend, &h)?;
        if let Some(conv) = &self.conv_shortcut {
            x = conv.forward(backend, &x)?;
        }
        let out = backend.add(&x, &h)?;
        if self.config.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            backend.affine(&out, (1.0 / self.config.output_scale_factor) as f32, 0.0)
        }
    }
}

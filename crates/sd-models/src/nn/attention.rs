//! Attention layers, as diffusers has them:
//!
//! - [`Attention`]: `Attention` with `AttnProcessor2_0` (`models/attention_processor.py`):
//!   multi-head scaled dot-product attention (Vaswani et al., 2017) with projections `to_q`,
//!   `to_k`, `to_v` and `to_out.0`, self- or cross-attention. The spatial form
//!   ([`Attention::forward_spatial`]) is the VAE's and `UNet2DModel`'s attention block: a group
//!   norm (`group_norm`), attention over the `H x W` positions, a residual connection and a
//!   division by `rescale_output_factor`.
//! - [`BasicTransformerBlock`] (`models/attention.py`): pre-norm self-attention (`norm1`,
//!   `attn1`), cross-attention on the text embeddings (`norm2`, `attn2`) and a GEGLU
//!   feed-forward (`norm3`, `ff.net.0.proj`, `ff.net.2`; Shazeer, 2020).
//! - [`Transformer2DModel`] (`models/transformers/transformer_2d.py`, continuous input):
//!   group norm, `proj_in` (a 1x1 convolution, or a linear layer with
//!   `use_linear_projection`), the transformer blocks over the `H x W` positions, `proj_out`
//!   and a residual connection. Stable Diffusion 1.x uses convolutions, 2.x linear layers.
//!
//! `upcast_attention` (Stable Diffusion 2.x) computes the attention in `f32` when the
//! activations are in half precision; diffusers' default processor ignores it (PyTorch's
//! fused attention accumulates in `f32`), and so does an `f32` run here.
//!
//! Checkpoints saved before diffusers 0.14 name the spatial attention's projections `query`,
//! `key`, `value` and `proj_attn`; [`rename_legacy_attention`] maps them to the current names
//! once, at load time.

use crate::backend::{AttentionMask, Backend, DType};
use crate::error::{Error, Result};
use crate::nn::source::WeightSource;
use crate::nn::{Conv2d, GroupNorm, LayerNorm, Linear};

/// The shape of an [`Attention`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionConfig {
    /// Width of the queries (and of the output).
    pub query_dim: usize,
    /// Width of the keys and values' source for cross-attention; `None` for self-attention.
    pub cross_attention_dim: Option<usize>,
    /// Number of heads.
    pub heads: usize,
    /// Width of each head.
    pub dim_head: usize,
    /// Whether `to_q`, `to_k`, `to_v` have biases.
    pub bias: bool,
    /// Compute in `f32` when the activations are half precision.
    pub upcast_attention: bool,
    /// Groups of the input group norm (`group_norm`), if any (spatial attention).
    pub norm_num_groups: Option<usize>,
    /// The group norm's epsilon.
    pub eps: f64,
    /// Add the input to the output (spatial attention).
    pub residual_connection: bool,
    /// The output is divided by this.
    pub rescale_output_factor: f64,
}

impl AttentionConfig {
    /// A transformer block's attention: no biases on `to_q`/`to_k`/`to_v`, no norm, no
    /// residual.
    #[must_use]
    pub fn transformer(
        query_dim: usize,
        cross_attention_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        upcast_attention: bool,
    ) -> Self {
        AttentionConfig {
            query_dim,
            cross_attention_dim,
            heads,
            dim_head,
            bias: false,
            upcast_attention,
            norm_num_groups: None,
            eps: 1e-5,
            residual_connection: false,
            rescale_output_factor: 1.0,
        }
    }

    /// The VAE's and `UNet2DModel`'s spatial attention (diffusers' `_from_deprecated_attn_block`
    /// form): biases, a group norm (if `norm_num_groups`), a residual connection.
    #[must_use]
    pub fn spatial(
        channels: usize,
        dim_head: usize,
        norm_num_groups: Option<usize>,
        eps: f64,
        rescale_output_factor: f64,
    ) -> Self {
        AttentionConfig {
            query_dim: channels,
            cross_attention_dim: None,
            heads: (channels / dim_head.max(1)).max(1),
            dim_head,
            bias: true,
            upcast_attention: false,
            norm_num_groups,
            eps,
            residual_connection: true,
            rescale_output_factor,
        }
    }
}

/// diffusers' `Attention`; see the module documentation.
#[derive(Debug, Clone)]
pub struct Attention<B: Backend> {
    /// The input norm of spatial attention.
    pub group_norm: Option<GroupNorm<B>>,
    /// `query_dim -> heads * dim_head`.
    pub to_q: Linear<B>,
    /// `cross_attention_dim -> heads * dim_head`.
    pub to_k: Linear<B>,
    /// `cross_attention_dim -> heads * dim_head`.
    pub to_v: Linear<B>,
    /// `heads * dim_head -> query_dim` (key `to_out.0`).
    pub to_out: Linear<B>,
    config: AttentionConfig,
}

impl<B: Backend> Attention<B> {
    /// Loads an attention layer.
    ///
    /// # Errors
    /// [`Error::Config`] for zero heads or head width, or groups that do not divide the
    /// channels; a missing or misshapen weight.
    pub fn load<S: WeightSource>(backend: &B, w: &S, config: AttentionConfig) -> Result<Self> {
        if config.heads == 0 || config.dim_head == 0 {
            return Err(Error::Config {
                what: w.describe(),
                message: format!(
                    "attention with {} heads of width {}",
                    config.heads, config.dim_head
                ),
            });
        }
        let inner = config.heads * config.dim_head;
        let kv = config.cross_attention_dim.unwrap_or(config.query_dim);
        let group_norm = match config.norm_num_groups {
            Some(groups) => Some(GroupNorm::load(
                backend,
                &w.push("group_norm"),
                config.query_dim,
                groups,
                config.eps,
            )?),
            None => None,
        };
        Ok(Attention {
            group_norm,
            to_q: Linear::load(
                backend,
                &w.push("to_q"),
                config.query_dim,
                inner,
                config.bias,
            )?,
            to_k: Linear::load(backend, &w.push("to_k"), kv, inner, config.bias)?,
            to_v: Linear::load(backend, &w.push("to_v"), kv, inner, config.bias)?,
            to_out: Linear::load(
                backend,
                &w.push("to_out").index(0),
                inner,
                config.query_dim,
                true,
            )?,
            config,
        })
    }

    /// The layer's shape.
    pub fn config(&self) -> &AttentionConfig {
        &self.config
    }

    /// Attention of `x [B, L, query_dim]` to `context [B, Lk, cross_attention_dim]` (or to
    /// itself), giving `[B, L, query_dim]`. The norm, residual and rescaling of spatial
    /// attention are not applied here (see [`forward_spatial`](Self::forward_spatial)).
    ///
    /// # Errors
    /// [`Error::Shape`] for inputs of the wrong rank, width or batch.
    pub fn forward(
        &self,
        backend: &B,
        x: &B::Tensor,
        context: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        let c = &self.config;
        let kv_dim = c.cross_attention_dim.unwrap_or(c.query_dim);
        let (b, l) = match *backend.shape(x) {
            [b, l, d] if d == c.query_dim => (b, l),
            ref other => {
                return Err(Error::Shape {
                    op: "Attention",
                    expected: format!("hidden states [B, L, {}]", c.query_dim),
                    found: format!("{other:?}"),
                });
            }
        };
        let source = context.unwrap_or(x);
        let lk = match *backend.shape(source) {
            [bk, lk, d] if bk == b && d == kv_dim => lk,
            ref other => {
                return Err(Error::Shape {
                    op: "Attention",
                    expected: format!("encoder hidden states [{b}, Lk, {kv_dim}]"),
                    found: format!("{other:?}"),
                });
            }
        };
        let (heads, dh) = (c.heads, c.dim_head);
        let split = |t: B::Tensor, len: usize| -> Result<B::Tensor> {
            let t = backend.reshape(&t, &[b, len, heads, dh])?;
            backend.permute(&t, &[0, 2, 1, 3])
        };
        let mut q = split(self.to_q.forward(backend, x)?, l)?;
        let mut k = split(self.to_k.forward(backend, source)?, lk)?;
        let mut v = split(self.to_v.forward(backend, source)?, lk)?;
        let in_dtype = backend.dtype(&q);
        let upcast = c.upcast_attention && in_dtype != DType::F32;
        if upcast {
            q = backend.cast(&q, DType::F32)?;
            k = backend.cast(&k, DType::F32)?;
            v = backend.cast(&v, DType::F32)?;
        }
        let scale = 1.0 / (dh as f64).sqrt();
        let mut o = backend.attention(&q, &k, &v, AttentionMask::None, scale as f32)?;
        drop((q, k, v));
        if upcast {
            o = backend.cast(&o, in_dtype)?;
        }
        o = backend.permute(&o, &[0, 2, 1, 3])?;
        o = backend.reshape(&o, &[b, l, heads * dh])?;
        self.to_out.forward(backend, &o)
    }

    /// Spatial self-attention of `x [N, C, H, W]`: group norm, attention over the `H x W`
    /// positions, plus `x` (with `residual_connection`), divided by
    /// `rescale_output_factor`.
    ///
    /// # Errors
    /// [`Error::Shape`] for an input that is not `[N, query_dim, H, W]`.
    pub fn forward_spatial(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let [n, c, h, w] = match *backend.shape(x) {
            [n, c, h, w] if c == self.config.query_dim => [n, c, h, w],
            ref other => {
                return Err(Error::Shape {
                    op: "Attention",
                    expected: format!("[N, {}, H, W]", self.config.query_dim),
                    found: format!("{other:?}"),
                });
            }
        };
        let normed = match &self.group_norm {
            Some(norm) => norm.forward(backend, x)?,
            None => x.clone(),
        };
        let seq = backend.permute(&backend.reshape(&normed, &[n, c, h * w])?, &[0, 2, 1])?;
        drop(normed);
        let mut out = self.forward(backend, &seq, None)?;
        drop(seq);
        out = backend.permute(&out, &[0, 2, 1])?;
        out = backend.reshape(&out, &[n, c, h, w])?;
        if self.config.residual_connection {
            out = backend.add(&out, x)?;
        }
        if self.config.rescale_output_factor == 1.0 {
            Ok(out)
        } else {
            backend.affine(&out, (1.0 / self.config.rescale_output_factor) as f32, 0.0)
        }
    }
}

/// diffusers' `FeedForward` with GEGLU: `net.2(h * gelu(g))` where `h, g` are the halves of
/// `net.0.proj(x)`.
#[derive(Debug, Clone)]
pub struct FeedForward<B: Backend> {
    /// `dim -> 2 * inner` (key `net.0.proj`).
    pub net_0_proj: Linear<B>,
    /// `inner -> dim` (key `net.2`).
    pub net_2: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    /// Loads a GEGLU feed-forward of `dim` with inner width `4 dim`.
    ///
    /// # Errors
    /// A missing or misshapen weight.
    pub fn load<S: WeightSource>(backend: &B, w: &S, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        let net = w.push("net");
        Ok(FeedForward {
            net_0_proj: Linear::load(backend, &net.index(0).push("proj"), dim, 2 * inner, true)?,
            net_2: Linear::load(backend, &net.index(2), inner, dim, true)?,
        })
    }

    /// `x [..., dim] -> [..., dim]`.
    ///
    /// # Errors
    /// A shape mismatch.
    pub fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        // The projection (8x the width) is dropped as soon as GEGLU has read it.
        let h = backend.geglu(&self.net_0_proj.forward(backend, x)?)?;
        self.net_2.forward(backend, &h)
    }
}

/// diffusers' `BasicTransformerBlock` with layer norms and GEGLU; see the module
/// documentation. With `only_cross_attention`, `attn1` attends to the text embeddings too.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock<B: Backend> {
    /// Before `attn1`.
    pub norm1: LayerNorm<B>,
    /// Self-attention (cross-attention with `only_cross_attention`).
    pub attn1: Attention<B>,
    /// Before `attn2`.
    pub norm2: LayerNorm<B>,
    /// Cross-attention on the text embeddings.
    pub attn2: Attention<B>,
    /// Before the feed-forward.
    pub norm3: LayerNorm<B>,
    /// The feed-forward.
    pub ff: FeedForward<B>,
    only_cross_attention: bool,
}

impl<B: Backend> BasicTransformerBlock<B> {
    /// Loads a block of width `dim`.
    ///
    /// # Errors
    /// A missing or misshapen weight.
    #[allow(clippy::too_many_arguments)]
    pub fn load<S: WeightSource>(
        backend: &B,
        w: &S,
        dim: usize,
        heads: usize,
        dim_head: usize,
        cross_attention_dim: usize,
        upcast_attention: bool,
        only_cross_attention: bool,
    ) -> Result<Self> {
        let eps = 1e-5;
        let attn1_cross = only_cross_attention.then_some(cross_attention_dim);
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::load(backend, &w.push("norm1"), dim, eps as f32)?,
            attn1: Attention::load(
                backend,
                &w.push("attn1"),
                AttentionConfig::transformer(dim, attn1_cross, heads, dim_head, upcast_attention),
            )?,
            norm2: LayerNorm::load(backend, &w.push("norm2"), dim, eps as f32)?,
            attn2: Attention::load(
                backend,
                &w.push("attn2"),
                AttentionConfig::transformer(
                    dim,
                    Some(cross_attention_dim),
                    heads,
                    dim_head,
                    upcast_attention,
                ),
            )?,
            norm3: LayerNorm::load(backend, &w.push("norm3"), dim, eps as f32)?,
            ff: FeedForward::load(backend, &w.push("ff"), dim)?,
            only_cross_attention,
        })
    }

    /// `x [B, L, dim]` attending to `context [B, Lk, cross_attention_dim]`.
    ///
    /// # Errors
    /// A shape mismatch.
    pub fn forward(&self, backend: &B, x: &B::Tensor, context: &B::Tensor) -> Result<B::Tensor> {
        // Reassigned rather than shadowed, so that each intermediate is dropped at once.
        let mut h = self.norm1.forward(backend, x)?;
        h = self
            .attn1
            .forward(backend, &h, self.only_cross_attention.then_some(context))?;
        let mut x = backend.add(&h, x)?;
        h = self.norm2.forward(backend, &x)?;
        h = self.attn2.forward(backend, &h, Some(context))?;
        x = backend.add(&h, &x)?;
        h = self.norm3.forward(backend, &x)?;
        h = self.ff.forward(backend, &h)?;
        backend.add(&h, &x)
    }
}

/// `proj_in` / `proj_out` of a [`Transformer2DModel`].
#[derive(Debug, Clone)]
pub enum Projection<B: Backend> {
    /// A 1x1 convolution on `[N, C, H, W]` (Stable Diffusion 1.x).
    Conv(Conv2d<B>),
    /// A linear layer on `[N, H W, C]` (`use_linear_projection`, Stable Diffusion 2.x).
    Linear(Linear<B>),
}

impl<B: Backend> Projection<B> {
    fn load<S: WeightSource>(
        backend: &B,
        w: &S,
        input: usize,
        output: usize,
        use_linear: bool,
    ) -> Result<Self> {
        Ok(if use_linear {
            Projection::Linear(Linear::load(backend, w, input, output, true)?)
        } else {
            Projection::Conv(Conv2d::load(backend, w, input, output, 1, 1, 0, true)?)
        })
    }
}

/// The shape of a [`Transformer2DModel`] as the UNet's cross-attention blocks build it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransformerConfig {
    /// Channels in and out.
    pub in_channels: usize,
    /// Number of heads.
    pub heads: usize,
    /// Width of each head (`in_channels / heads` in the UNet).
    pub dim_head: usize,
    /// Number of [`BasicTransformerBlock`]s.
    pub num_layers: usize,
    /// Width of the text embeddings.
    pub cross_attention_dim: usize,
    /// Groups of the input group norm.
    pub norm_num_groups: usize,
    /// Linear rather than 1x1 convolution projections.
    pub use_linear_projection: bool,
    /// See the module documentation.
    pub upcast_attention: bool,
    /// `attn1` attends to the text embeddings too.
    pub only_cross_attention: bool,
}

/// diffusers' `Transformer2DModel` for continuous input; see the module documentation. Keys
/// `norm`, `proj_in`, `transformer_blocks`, `proj_out`.
#[derive(Debug, Clone)]
pub struct Transformer2DModel<B: Backend> {
    /// The input norm (eps 1e-6).
    pub norm: GroupNorm<B>,
    /// `in_channels -> heads * dim_head`.
    pub proj_in: Projection<B>,
    /// The blocks.
    pub transformer_blocks: Vec<BasicTransformerBlock<B>>,
    /// `heads * dim_head -> in_channels`.
    pub proj_out: Projection<B>,
    config: TransformerConfig,
}

impl<B: Backend> Transformer2DModel<B> {
    /// Loads a transformer.
    ///
    /// # Errors
    /// [`Error::Config`] for groups that do not divide the channels; a missing or misshapen
    /// weight.
    pub fn load<S: WeightSource>(backend: &B, w: &S, config: TransformerConfig) -> Result<Self> {
        let c = config;
        let inner = c.heads * c.dim_head;
        let blocks = w.push("transformer_blocks");
        Ok(Transformer2DModel {
            norm: GroupNorm::load(
                backend,
                &w.push("norm"),
                c.in_channels,
                c.norm_num_groups,
                1e-6,
            )?,
            proj_in: Projection::load(
                backend,
                &w.push("proj_in"),
                c.in_channels,
                inner,
                c.use_linear_projection,
            )?,
            transformer_blocks: (0..c.num_layers)
                .map(|i| {
                    BasicTransformerBlock::load(
                        backend,
                        &blocks.index(i),
                        inner,
                        c.heads,
                        c.dim_head,
                        c.cross_attention_dim,
                        c.upcast_attention,
                        c.only_cross_attention,
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            proj_out: Projection::load(
                backend,
                &w.push("proj_out"),
                inner,
                c.in_channels,
                c.use_linear_projection,
            )?,
            config,
        })
    }

    /// The transformer's shape.
    pub fn config(&self) -> &TransformerConfig {
        &self.config
    }

    /// `x [N, C, H, W]` attending to `context [N, L, cross_attention_dim]`, plus `x`.
    ///
    /// # Errors
    /// [`Error::Shape`] for mismatched shapes.
    pub fn forward(&self, backend: &B, x: &B::Tensor, context: &B::Tensor) -> Result<B::Tensor> {
        let [n, c, h, w] = match *backend.shape(x) {
            [n, c, h, w] if c == self.config.in_channels => [n, c, h, w],
            ref other => {
                return Err(Error::Shape {
                    op: "Transformer2DModel",
                    expected: format!("[N, {}, H, W]", self.config.in_channels),
                    found: format!("{other:?}"),
                });
            }
        };
        let inner = self.config.heads * self.config.dim_head;
        let to_seq = |t: &B::Tensor, ch: usize| -> Result<B::Tensor> {
            let t = backend.permute(t, &[0, 2, 3, 1])?;
            backend.reshape(&t, &[n, h * w, ch])
        };
        let from_seq = |t: &B::Tensor, ch: usize| -> Result<B::Tensor> {
            let t = backend.reshape(t, &[n, h, w, ch])?;
            backend.permute(&t, &[0, 3, 1, 2])
        };
        let normed = self.norm.forward(backend, x)?;
        let mut seq = match &self.proj_in {
            Projection::Conv(conv) => to_seq(&conv.forward(backend, &normed)?, inner)?,
            Projection::Linear(lin) => lin.forward(backend, &to_seq(&normed, c)?)?,
        };
        drop(normed);
        for block in &self.transformer_blocks {
            seq = block.forward(backend, &seq, context)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(backend, &from_seq(&seq, inner)?)?,
            Projection::Linear(lin) => from_seq(&lin.forward(backend, &seq)?, c)?,
        };
        backend.add(&out, x)
    }
}

/// Maps a key of diffusers' deprecated attention-block layout (before 0.14: `query`, `key`,
/// `value`, `proj_attn` inside an `attentions.N` module) to the current names (`to_q`,
/// `to_k`, `to_v`, `to_out.0`); other keys are returned unchanged. For
/// [`OpenOptions::rename`](crate::weights::OpenOptions::rename) when opening a VAE or a
/// `UNet2DModel` checkpoint.
///
/// ```
/// use sd_models::nn::rename_legacy_attention;
///
/// assert_eq!(
///     rename_legacy_attention("decoder.mid_block.attentions.0.proj_attn.weight"),
///     "decoder.mid_block.attentions.0.to_out.0.weight"
/// );
/// assert_eq!(rename_legacy_attention("decoder.conv_in.weight"), "decoder.conv_in.weight");
/// ```
#[must_use]
pub fn rename_legacy_attention(key: &str) -> String {
    let segments: Vec<&str> = key.split('.').collect();
    let in_attention = segments.len() >= 4
        && segments
            .windows(2)
            .any(|p| p[0] == "attentions" && p[1].parse::<usize>().is_ok());
    if !in_attention {
        return key.to_owned();
    }
    let n = segments.len();
    let renamed = match segments.get(n.saturating_sub(2)).copied() {
        Some("query") => "to_q",
        Some("key") => "to_k",
        Some("value") => "to_v",
        Some("proj_attn") => "to_out.0",
        _ => return key.to_owned(),
    };
    let mut out: Vec<&str> = segments[..n - 2].to_vec();
    out.push(renamed);
    out.push(segments[n - 1]);
    out.join(".")
}

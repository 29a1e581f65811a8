//! The CLIP text encoder (Radford et al., 2021), as transformers' `CLIPTextModel` and
//! `CLIPTextModelWithProjection` (`modeling_clip.py`):
//!
//! ```text
//! x = token_embedding[ids] + position_embedding[0..L]
//! for each layer:  x = x + self_attn(layer_norm1(x), causal)
//!                  x = x + fc2(act(fc1(layer_norm2(x))))
//! last_hidden_state = final_layer_norm(x)
//! pooled = last_hidden_state at the end token;  text_embeds = text_projection(pooled)
//! ```
//!
//! Stable Diffusion 1.x uses OpenAI's ViT-L/14 text tower (quick GELU) and feeds the UNet
//! `last_hidden_state`; 2.x uses OpenCLIP's ViT-H/14 (GELU), whose converted config already
//! drops the last layer (the "penultimate layer"). Clip skip (diffusers' `clip_skip`) feeds
//! `final_layer_norm(hidden_states[-(clip_skip + 1)])` instead.

use std::path::Path;

use crate::backend::{ActivationOps, AttentionMask, Backend, GeluApproximation};
use crate::clip::config::{ClipTextConfig, HiddenAct};
use crate::error::{Error, Result};
use crate::nn::{Embedding, LayerNorm, Linear, RandomWeights, WeightSource};
use crate::weights::{LoadDType, OpenOptions, Variant, WeightStore, Weights};

/// The two embedding tables; keys `embeddings.token_embedding`, `embeddings.position_embedding`.
#[derive(Debug, Clone)]
pub struct ClipEmbeddings {
    /// `[vocab_size, hidden_size]`.
    pub token_embedding: Embedding,
    /// `[max_position_embeddings, hidden_size]`.
    pub position_embedding: Embedding,
}

/// Multi-head self-attention; keys `q_proj`, `k_proj`, `v_proj`, `out_proj`.
#[derive(Debug, Clone)]
pub struct ClipAttention<B: Backend> {
    /// Query projection.
    pub q_proj: Linear<B>,
    /// Key projection.
    pub k_proj: Linear<B>,
    /// Value projection.
    pub v_proj: Linear<B>,
    /// Output projection.
    pub out_proj: Linear<B>,
    heads: usize,
}

/// The MLP; keys `fc1`, `fc2`.
#[derive(Debug, Clone)]
pub struct ClipMlp<B: Backend> {
    /// `hidden -> intermediate`.
    pub fc1: Linear<B>,
    /// `intermediate -> hidden`.
    pub fc2: Linear<B>,
    act: HiddenAct,
}

/// One pre-norm transformer layer; keys `self_attn`, `layer_norm1`, `mlp`, `layer_norm2`.
#[derive(Debug, Clone)]
pub struct ClipEncoderLayer<B: Backend> {
    /// Attention.
    pub self_attn: ClipAttention<B>,
    /// Before attention.
    pub layer_norm1: LayerNorm<B>,
    /// The MLP.
    pub mlp: ClipMlp<B>,
    /// Before the MLP.
    pub layer_norm2: LayerNorm<B>,
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct ClipTextOutput<B: Backend> {
    /// `final_layer_norm` of the last layer's output, `[B, L, hidden]`.
    pub last_hidden_state: B::Tensor,
    /// The embeddings' output and every layer's output (before the final norm),
    /// `num_hidden_layers + 1` tensors `[B, L, hidden]`, as transformers'
    /// `output_hidden_states`.
    pub hidden_states: Vec<B::Tensor>,
    /// `last_hidden_state` at each sequence's end token, `[B, hidden]`.
    pub pooled_output: B::Tensor,
    /// The projection of `pooled_output`, `[B, projection_dim]`, for models with one.
    pub text_embeds: Option<B::Tensor>,
}

/// The text encoder; see the module documentation. Keys live under `text_model.` (and
/// `text_projection.weight` for the projected variant).
#[derive(Debug, Clone)]
pub struct ClipTextModel<B: Backend> {
    config: ClipTextConfig,
    /// The embeddings.
    pub embeddings: ClipEmbeddings,
    /// The transformer layers (`encoder.layers`).
    pub layers: Vec<ClipEncoderLayer<B>>,
    /// The final norm.
    pub final_layer_norm: LayerNorm<B>,
    /// `CLIPTextModelWithProjection`'s projection (no bias).
    pub text_projection: Option<Linear<B>>,
}

impl<B: Backend> ClipTextModel<B> {
    /// Loads the model from a store holding transformers' key layout: the text tower under
    /// `text_model.` (as transformers 4.x saved it, and as Stable Diffusion checkpoints have
    /// it) or at the root (as transformers 5 saves a `CLIPTextModel`). The projection is
    /// loaded when the store has `text_projection.weight`.
    ///
    /// # Errors
    /// A missing or misshapen weight (named), or a configuration error.
    pub fn load(
        backend: &B,
        store: &WeightStore,
        config: ClipTextConfig,
        dtype: LoadDType,
    ) -> Result<Self> {
        config.validate("text encoder config")?;
        let root = Weights::new(store, Default::default(), dtype);
        let tm = if root.push("text_model").exists() {
            root.push("text_model")
        } else {
            root.clone()
        };
        // Older checkpoints carry the position ids as an integer buffer.
        tm.push("embeddings").push("position_ids").ignore();
        let projection = root.push("text_projection").contains("weight");
        Self::from_source(backend, &tm, &root, config, projection)
    }

    /// Builds the model from any [`WeightSource`]: the text tower from `tm`, the projection
    /// (`text_projection`, when `projection`) from `root`.
    fn from_source<S: WeightSource>(
        backend: &B,
        tm: &S,
        root: &S,
        config: ClipTextConfig,
        projection: bool,
    ) -> Result<Self> {
        let (d, eps) = (config.hidden_size, config.layer_norm_eps as f32);
        let emb = tm.push("embeddings");
        let embeddings = ClipEmbeddings {
            token_embedding: Embedding::load(&emb.push("token_embedding"), config.vocab_size, d)?,
            position_embedding: Embedding::load(
                &emb.push("position_embedding"),
                config.max_position_embeddings,
                d,
            )?,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = tm.push("encoder").push("layers").index(i);
                let a = l.push("self_attn");
                let m = l.push("mlp");
                Ok(ClipEncoderLayer {
                    self_attn: ClipAttention {
                        q_proj: Linear::load(backend, &a.push("q_proj"), d, d, true)?,
                        k_proj: Linear::load(backend, &a.push("k_proj"), d, d, true)?,
                        v_proj: Linear::load(backend, &a.push("v_proj"), d, d, true)?,
                        out_proj: Linear::load(backend, &a.push("out_proj"), d, d, true)?,
                        heads: config.num_attention_heads,
                    },
                    layer_norm1: LayerNorm::load(backend, &l.push("layer_norm1"), d, eps)?,
                    mlp: ClipMlp {
                        fc1: Linear::load(
                            backend,
                            &m.push("fc1"),
                            d,
                            config.intermediate_size,
                            true,
                        )?,
                        fc2: Linear::load(
                            backend,
                            &m.push("fc2"),
                            config.intermediate_size,
                            d,
                            true,
                        )?,
                        act: config.hidden_act,
                    },
                    layer_norm2: LayerNorm::load(backend, &l.push("layer_norm2"), d, eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(backend, &tm.push("final_layer_norm"), d, eps)?;
        let text_projection = if projection {
            Some(Linear::load(
                backend,
                &root.push("text_projection"),
                d,
                config.projection_dim,
                false,
            )?)
        } else {
            None
        };
        Ok(ClipTextModel {
            config,
            embeddings,
            layers,
            final_layer_norm,
            text_projection,
        })
    }

    /// The model with seeded random weights, in the dtype `weights` hands out, with the
    /// projection when `projection` (`CLIPTextModelWithProjection`): for tests and
    /// benchmarks.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration.
    pub fn random(
        backend: &B,
        weights: &RandomWeights,
        config: ClipTextConfig,
        projection: bool,
    ) -> Result<Self> {
        config.validate("text encoder config")?;
        Self::from_source(
            backend,
            &weights.push("text_model"),
            weights,
            config,
            projection,
        )
    }

    /// Loads a diffusers `text_encoder/` folder (or a transformers model folder):
    /// `config.json` and the weights, preferring the given variants in order.
    ///
    /// # Errors
    /// As [`ClipTextConfig::from_file`] and [`ClipTextModel::load`]; unknown weights are an
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
        let config = ClipTextConfig::from_file(dir.join("config.json"))?;
        OpenOptions::new()
            .strict(strict)
            .load_folder(dir, variants, |store| {
                Self::load(backend, store, config, dtype)
            })
    }

    /// The configuration.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Runs the encoder on a batch of token id sequences of equal length (at most
    /// `max_position_embeddings`).
    ///
    /// # Errors
    /// [`Error::Prompt`] for an empty batch, sequences of unequal or too great length;
    /// [`Error::TokenOutOfVocab`] for an id past the vocabulary.
    pub fn forward(&self, backend: &B, ids: &[Vec<u32>]) -> Result<ClipTextOutput<B>> {
        let (batch, len) = self.check_ids(ids)?;
        let d = self.config.hidden_size;
        let mut x = Vec::with_capacity(batch * len * d);
        for seq in ids {
            for (pos, &id) in seq.iter().enumerate() {
                let start = x.len();
                self.embeddings.token_embedding.push_row(id, &mut x)?;
                self.embeddings
                    .position_embedding
                    .add_row(pos as u32, &mut x[start..])?;
            }
        }
        let mut x = backend.upload(&x, &[batch, len, d])?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(x.clone());
        for layer in &self.layers {
            x = layer.forward(backend, &x)?;
            hidden_states.push(x.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(backend, &x)?;
        let pooled_output = self.pool(backend, &last_hidden_state, ids)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(backend, &pooled_output)?),
            None => None,
        };
        Ok(ClipTextOutput {
            last_hidden_state,
            hidden_states,
            pooled_output,
            text_embeds,
        })
    }

    /// The prompt embeddings diffusers feeds the UNet: `last_hidden_state`, or with
    /// `clip_skip = k > 0`, `final_layer_norm(hidden_states[-(k + 1)])`.
    ///
    /// # Errors
    /// As [`ClipTextModel::forward`]; [`Error::Config`] for a `clip_skip` past the layers.
    pub fn encode(&self, backend: &B, ids: &[Vec<u32>], clip_skip: usize) -> Result<B::Tensor> {
        if clip_skip >= self.layers.len() {
            return Err(Error::Config {
                what: "clip_skip".into(),
                message: format!("{clip_skip} skips all {} layers", self.layers.len()),
            });
        }
        let out = self.forward(backend, ids)?;
        if clip_skip == 0 {
            return Ok(out.last_hidden_state);
        }
        let h = &out.hidden_states[out.hidden_states.len() - 1 - clip_skip];
        self.final_layer_norm.forward(backend, h)
    }

    fn check_ids(&self, ids: &[Vec<u32>]) -> Result<(usize, usize)> {
        let len = ids.first().map_or(0, Vec::len);
        if ids.is_empty() || len == 0 {
            return Err(Error::Prompt("no token ids to encode".into()));
        }
        if ids.iter().any(|s| s.len() != len) {
            return Err(Error::Prompt(
                "token id sequences of different lengths in one batch".into(),
            ));
        }
        if len > self.config.max_position_embeddings {
            return Err(Error::Prompt(format!(
                "{len} tokens, more than the encoder's {} positions",
                self.config.max_position_embeddings
            )));
        }
        Ok((ids.len(), len))
    }

    /// Picks each sequence's end-token position of `h [B, L, D]`, as transformers does.
    fn pool(&self, backend: &B, h: &B::Tensor, ids: &[Vec<u32>]) -> Result<B::Tensor> {
        let len = ids[0].len();
        let rows = ids
            .iter()
            .enumerate()
            .map(|(b, seq)| {
                let pos = if self.config.eos_token_id == 2 {
                    // Legacy configs: the first position of the largest id (the end token).
                    let max = seq.iter().copied().max().unwrap_or(0);
                    seq.iter().position(|&t| t == max).unwrap_or(0)
                } else {
                    seq.iter()
                        .position(|&t| t == self.config.eos_token_id)
                        .unwrap_or(0)
                };
                let flat = backend.reshape(h, &[ids.len() * len, self.config.hidden_size])?;
                backend.slice(&flat, 0, b * len + pos, 1)
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&B::Tensor> = rows.iter().collect();
        backend.concat(&refs, 0)
    }
}

impl<B: Backend> ClipEncoderLayer<B> {
    fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let h = self.layer_norm1.forward(backend, x)?;
        let h = self.self_attn.forward(backend, &h)?;
        let x = backend.add(x, &h)?;
        let h = self.layer_norm2.forward(backend, &x)?;
        let h = self.mlp.forward(backend, &h)?;
        backend.add(&x, &h)
    }
}

impl<B: Backend> ClipAttention<B> {
    fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let shape = backend.shape(x).to_vec();
        let (b, l, d) = (shape[0], shape[1], shape[2]);
        let dh = d / self.heads;
        let heads = |t: B::Tensor| -> Result<B::Tensor> {
            let t = backend.reshape(&t, &[b, l, self.heads, dh])?;
            backend.permute(&t, &[0, 2, 1, 3])
        };
        let q = heads(self.q_proj.forward(backend, x)?)?;
        let k = heads(self.k_proj.forward(backend, x)?)?;
        let v = heads(self.v_proj.forward(backend, x)?)?;
        let o = backend.attention(&q, &k, &v, AttentionMask::Causal, 1.0 / (dh as f32).sqrt())?;
        let o = backend.permute(&o, &[0, 2, 1, 3])?;
        let o = backend.reshape(&o, &[b, l, d])?;
        self.out_proj.forward(backend, &o)
    }
}

impl<B: Backend> ClipMlp<B> {
    fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let h = self.fc1.forward(backend, x)?;
        let h = match self.act {
            HiddenAct::QuickGelu => backend.quick_gelu(&h)?,
            HiddenAct::Gelu => ActivationOps::gelu(backend, &h, GeluApproximation::None)?,
            HiddenAct::GeluTanh => ActivationOps::gelu(backend, &h, GeluApproximation::Tanh)?,
        };
        self.fc2.forward(backend, &h)
    }
}

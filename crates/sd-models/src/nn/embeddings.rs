//! Timestep and class embeddings, as diffusers' `models/embeddings.py`: the sinusoidal
//! `get_timestep_embedding` (Vaswani et al., 2017, as DDPM uses it), `Timesteps`,
//! `TimestepEmbedding` (`linear_1`, activation, `linear_2`) and the class embeddings a UNet
//! adds to it (`class_embed_type`, `num_class_embeds`).

use serde::Deserialize;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::source::WeightSource;
use crate::nn::{Activation, Linear};

/// The sinusoidal embedding of `timesteps` (fractional values allowed), `[N, embedding_dim]`
/// row-major, computed as diffusers' `get_timestep_embedding` does in float32:
///
/// ```text
/// freq_i = exp(-ln(max_period) * i / (half - downscale_freq_shift)),  i < half = dim / 2
/// emb    = [sin(t * freq), cos(t * freq)] * scale   ([cos, sin] if flip_sin_to_cos)
/// ```
///
/// zero-padded by one column for an odd `embedding_dim`. Every intermediate is rounded to
/// `f32` where PyTorch rounds it, so the result matches to the last bit or two.
///
/// ```
/// use sd_models::nn::get_timestep_embedding;
///
/// let e = get_timestep_embedding(&[0.0, 10.0], 4, true, 0.0, 1.0, 10000.0);
/// assert_eq!(&e[..4], &[1.0, 1.0, 0.0, 0.0]); // cos 0, cos 0, sin 0, sin 0
/// assert!((e[6] - 10.0_f32.sin()).abs() < 1e-6);
/// ```
#[must_use]
pub fn get_timestep_embedding(
    timesteps: &[f64],
    embedding_dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    scale: f64,
    max_period: f64,
) -> Vec<f32> {
    let half = embedding_dim / 2;
    let log_period = -(max_period.ln()) as f32;
    let divisor = (half as f64 - downscale_freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((log_period * i as f32) / divisor).exp())
        .collect();
    let scale = scale as f32;
    let mut out = Vec::with_capacity(timesteps.len() * embedding_dim);
    for &t in timesteps {
        let t = t as f32;
        let args: Vec<f32> = freqs.iter().map(|&f| scale * (t * f)).collect();
        let sin = args.iter().map(|&a| f64::from(a).sin() as f32);
        let cos = args.iter().map(|&a| f64::from(a).cos() as f32);
        if flip_sin_to_cos {
            out.extend(cos);
            out.extend(sin);
        } else {
            out.extend(sin);
            out.extend(cos);
        }
        if embedding_dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

/// diffusers' `Timesteps`: the sinusoidal projection of timesteps, without weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timesteps {
    /// The embedding size (the UNet's first block width).
    pub num_channels: usize,
    /// Cosines first (`flip_sin_to_cos`; `true` in Stable Diffusion, `false` in DDPM).
    pub flip_sin_to_cos: bool,
    /// `freq_shift` (0 in Stable Diffusion, 1 in DDPM).
    pub downscale_freq_shift: f64,
    /// A factor on the arguments (1).
    pub scale: f64,
    /// The longest period (10000).
    pub max_period: f64,
}

impl Timesteps {
    /// A projection of `num_channels` with scale 1 and period 10000.
    #[must_use]
    pub fn new(num_channels: usize, flip_sin_to_cos: bool, downscale_freq_shift: f64) -> Self {
        Timesteps {
            num_channels,
            flip_sin_to_cos,
            downscale_freq_shift,
            scale: 1.0,
            max_period: 10000.0,
        }
    }

    /// The embedding of `timesteps`, uploaded as `[N, num_channels]`.
    ///
    /// # Errors
    /// Backend failures.
    pub fn forward<B: Backend>(&self, backend: &B, timesteps: &[f64]) -> Result<B::Tensor> {
        let data = get_timestep_embedding(
            timesteps,
            self.num_channels,
            self.flip_sin_to_cos,
            self.downscale_freq_shift,
            self.scale,
            self.max_period,
        );
        backend.upload(&data, &[timesteps.len(), self.num_channels])
    }
}

/// diffusers' `TimestepEmbedding`: `linear_2(act(linear_1(x + cond_proj(condition))))`, then
/// an optional `post_act`; keys `linear_1`, `linear_2`, `cond_proj` (no bias; LCM's guidance
/// embedding).
#[derive(Debug, Clone)]
pub struct TimestepEmbedding<B: Backend> {
    /// `in -> time_embed_dim`.
    pub linear_1: Linear<B>,
    /// `time_embed_dim -> time_embed_dim`.
    pub linear_2: Linear<B>,
    /// `cond_proj_dim -> in`, without bias.
    pub cond_proj: Option<Linear<B>>,
    act: Activation,
    post_act: Option<Activation>,
}

impl<B: Backend> TimestepEmbedding<B> {
    /// Loads an embedding from `in_channels` to `time_embed_dim`.
    ///
    /// # Errors
    /// A missing or misshapen weight.
    pub fn load<S: WeightSource>(
        backend: &B,
        w: &S,
        in_channels: usize,
        time_embed_dim: usize,
        act: Activation,
        post_act: Option<Activation>,
        cond_proj_dim: Option<usize>,
    ) -> Result<Self> {
        let cond_proj = match cond_proj_dim {
            Some(d) => Some(Linear::load(
                backend,
                &w.push("cond_proj"),
                d,
                in_channels,
                false,
            )?),
            None => None,
        };
        Ok(TimestepEmbedding {
            linear_1: Linear::load(
                backend,
                &w.push("linear_1"),
                in_channels,
                time_embed_dim,
                true,
            )?,
            linear_2: Linear::load(
                backend,
                &w.push("linear_2"),
                time_embed_dim,
                time_embed_dim,
                true,
            )?,
            cond_proj,
            act,
            post_act,
        })
    }

    /// `sample [N, in]` (and `condition [N, cond_proj_dim]`) to `[N, time_embed_dim]`.
    ///
    /// # Errors
    /// A shape mismatch.
    pub fn forward(
        &self,
        backend: &B,
        sample: &B::Tensor,
        condition: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        let sample = match (&self.cond_proj, condition) {
            (Some(proj), Some(c)) => backend.add(sample, &proj.forward(backend, c)?)?,
            _ => sample.clone(),
        };
        let h = self.linear_1.forward(backend, &sample)?;
        let h = self.act.forward(backend, &h)?;
        let h = self.linear_2.forward(backend, &h)?;
        match self.post_act {
            Some(act) => act.forward(backend, &h),
            None => Ok(h),
        }
    }
}

/// `class_embed_type` of a UNet config: how class labels become an embedding added to the
/// time embedding. With no type but `num_class_embeds` set, a lookup table is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[non_exhaustive]
pub enum ClassEmbedType {
    /// The labels are timesteps, embedded like the timestep (`"timestep"`).
    #[serde(rename = "timestep")]
    Timestep,
    /// The labels are the embedding (`"identity"`).
    #[serde(rename = "identity")]
    Identity,
    /// A `TimestepEmbedding` of label vectors (`"projection"`).
    #[serde(rename = "projection")]
    Projection,
    /// A linear map of label vectors (`"simple_projection"`).
    #[serde(rename = "simple_projection")]
    SimpleProjection,
}

/// Class labels for a class-conditional UNet; which kind a model takes follows from its
/// `class_embed_type` (see [`ClassEmbedding`]).
#[derive(Debug)]
pub enum ClassLabels<'a, T> {
    /// Integer classes, one per batch entry (`num_class_embeds`).
    Ids(&'a [u32]),
    /// Timestep-like values, one per batch entry (`class_embed_type = "timestep"`).
    Timesteps(&'a [f64]),
    /// Vectors `[N, D]` (`"identity"`, `"projection"`, `"simple_projection"`).
    Vectors(&'a T),
}

impl<T> Clone for ClassLabels<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for ClassLabels<'_, T> {}

/// A class embedding, one per `class_embed_type` (keys under `class_embedding`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ClassEmbedding<B: Backend> {
    /// `nn.Embedding(num_class_embeds, time_embed_dim)`: key `weight`.
    Table {
        /// `[num_class_embeds, time_embed_dim]`.
        weight: B::Tensor,
        /// The number of classes.
        rows: usize,
    },
    /// A [`TimestepEmbedding`] of the labels' sinusoidal projection.
    Timestep(TimestepEmbedding<B>),
    /// The labels themselves.
    Identity,
    /// A [`TimestepEmbedding`] of label vectors.
    Projection(TimestepEmbedding<B>),
    /// A linear map of label vectors.
    SimpleProjection(Linear<B>),
}

impl<B: Backend> ClassEmbedding<B> {
    /// Loads the class embedding a UNet config asks for, or `None` for an unconditional one,
    /// as diffusers' `_set_class_embedding`. `timestep_input_dim` is the width of the time
    /// projection, `projection_dim` the `projection_class_embeddings_input_dim`.
    ///
    /// # Errors
    /// [`Error::Config`] for a projection without `projection_dim`; a missing or misshapen
    /// weight.
    #[allow(clippy::too_many_arguments)]
    pub fn load<S: WeightSource>(
        backend: &B,
        w: &S,
        class_embed_type: Option<ClassEmbedType>,
        num_class_embeds: Option<usize>,
        projection_dim: Option<usize>,
        timestep_input_dim: usize,
        time_embed_dim: usize,
        act: Activation,
    ) -> Result<Option<Self>> {
        let projection_dim = || {
            projection_dim.ok_or_else(|| Error::Config {
                what: w.describe(),
                message: "a projection class embedding needs projection_class_embeddings_input_dim"
                    .into(),
            })
        };
        Ok(Some(match (class_embed_type, num_class_embeds) {
            (None, None) => return Ok(None),
            (None, Some(rows)) => ClassEmbedding::Table {
                weight: super::upload(backend, &w.get("weight", &[rows, time_embed_dim])?)?,
                rows,
            },
            (Some(ClassEmbedType::Timestep), _) => {
                ClassEmbedding::Timestep(TimestepEmbedding::load(
                    backend,
                    w,
                    timestep_input_dim,
                    time_embed_dim,
                    act,
                    None,
                    None,
                )?)
            }
            (Some(ClassEmbedType::Identity), _) => ClassEmbedding::Identity,
            (Some(ClassEmbedType::Projection), _) => {
                ClassEmbedding::Projection(TimestepEmbedding::load(
                    backend,
                    w,
                    projection_dim()?,
                    time_embed_dim,
                    Activation::Silu,
                    None,
                    None,
                )?)
            }
            (Some(ClassEmbedType::SimpleProjection), _) => ClassEmbedding::SimpleProjection(
                Linear::load(backend, w, projection_dim()?, time_embed_dim, true)?,
            ),
        }))
    }

    /// The embedding `[N, time_embed_dim]` of `labels` for a batch of `batch`; `time_proj` is
    /// the UNet's timestep projection (for timestep labels).
    ///
    /// # Errors
    /// [`Error::Shape`] for labels of the wrong kind or count, or vectors of the wrong width;
    /// [`Error::TokenOutOfVocab`] for a class id past the table.
    pub fn forward(
        &self,
        backend: &B,
        labels: ClassLabels<'_, B::Tensor>,
        batch: usize,
        time_proj: &Timesteps,
    ) -> Result<B::Tensor> {
        let wrong = |expected: &str| Error::Shape {
            op: "class_labels",
            expected: format!("{expected} for a batch of {batch}"),
            found: match labels {
                ClassLabels::Ids(ids) => format!("{} class ids", ids.len()),
                ClassLabels::Timesteps(t) => format!("{} timesteps", t.len()),
                ClassLabels::Vectors(v) => format!("vectors {:?}", backend.shape(v)),
            },
        };
        match (self, labels) {
            (ClassEmbedding::Table { weight, rows }, ClassLabels::Ids(ids)) => {
                if ids.len() != batch {
                    return Err(wrong("one class id per batch entry"));
                }
                let picked = ids
                    .iter()
                    .map(|&id| {
                        if id as usize >= *rows {
                            return Err(Error::TokenOutOfVocab {
                                id,
                                vocab_size: *rows,
                            });
                        }
                        backend.slice(weight, 0, id as usize, 1)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let refs: Vec<&B::Tensor> = picked.iter().collect();
                backend.concat(&refs, 0)
            }
            (ClassEmbedding::Timestep(emb), ClassLabels::Timesteps(t)) => {
                if t.len() != batch {
                    return Err(wrong("one timestep label per batch entry"));
                }
                let proj = time_proj.forward(backend, t)?;
                emb.forward(backend, &proj, None)
            }
            (ClassEmbedding::Identity, ClassLabels::Vectors(v)) => {
                if backend.shape(v).first() != Some(&batch) || backend.shape(v).len() != 2 {
                    return Err(wrong("vectors [N, time_embed_dim]"));
                }
                Ok(v.clone())
            }
            (ClassEmbedding::Projection(emb), ClassLabels::Vectors(v)) => {
                if backend.shape(v).first() != Some(&batch) || backend.shape(v).len() != 2 {
                    return Err(wrong("vectors [N, projection_class_embeddings_input_dim]"));
                }
                emb.forward(backend, v, None)
            }
            (ClassEmbedding::SimpleProjection(proj), ClassLabels::Vectors(v)) => {
                if backend.shape(v).first() != Some(&batch) || backend.shape(v).len() != 2 {
                    return Err(wrong("vectors [N, projection_class_embeddings_input_dim]"));
                }
                proj.forward(backend, v)
            }
            (ClassEmbedding::Table { .. }, _) => Err(wrong("class ids")),
            (ClassEmbedding::Timestep(_), _) => Err(wrong("timestep labels")),
            _ => Err(wrong("label vectors")),
        }
    }
}

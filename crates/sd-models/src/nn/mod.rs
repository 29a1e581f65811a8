//! The building blocks the networks share: layers that load their parameters from a
//! [`Weights`](crate::weights::Weights) scope, with fields named after the checkpoint's key
//! segments, and run on any [`Backend`].

mod embedding;
mod linear;
mod norm;

pub mod activation;
pub mod attention;
pub mod conv;
pub mod embeddings;
pub mod group_norm;
pub mod resnet;
pub mod sampling;
pub mod source;

pub use activation::Activation;
pub use attention::{
    Attention, AttentionConfig, BasicTransformerBlock, FeedForward, Transformer2DModel,
    TransformerConfig, rename_legacy_attention,
};
pub use conv::Conv2d;
pub use embedding::Embedding;
pub use embeddings::{
    ClassEmbedType, ClassEmbedding, ClassLabels, TimestepEmbedding, Timesteps,
    get_timestep_embedding,
};
pub use group_norm::GroupNorm;
pub use linear::Linear;
pub use norm::LayerNorm;
pub use resnet::{Resample, ResnetBlock2D, ResnetConfig, TimeEmbeddingNorm};
pub use sampling::{Downsample2D, Upsample2D};
pub use source::{RandomWeights, WatchedSource, WeightSource};

use crate::backend::{Backend, HalfData};
use crate::error::Result;
use crate::weights::{HostData, HostTensor};

/// Uploads a host tensor to the backend in its dtype (half precision stays half).
///
/// # Errors
/// The backend's errors.
pub fn upload<B: Backend>(backend: &B, tensor: &HostTensor) -> Result<B::Tensor> {
    match tensor.data() {
        HostData::F32(v) => backend.upload(v, tensor.shape()),
        HostData::F16(v) => backend.upload_half(HalfData::F16(v), tensor.shape()),
        HostData::BF16(v) => backend.upload_half(HalfData::BF16(v), tensor.shape()),
    }
}

//! The activations a diffusers config names (`act_fn`, `time_embedding_act_fn`,
//! `timestep_post_act`), as diffusers' `get_activation` (`models/activations.py`) maps them.

use serde::Deserialize;

use crate::backend::{Backend, GeluApproximation};
use crate::error::Result;

/// An element-wise activation named in a config. Mish and ReLU, which no Stable Diffusion
/// UNet or VAE uses, are not supported: a config naming them fails to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
#[non_exhaustive]
pub enum Activation {
    /// `x * sigmoid(x)` (`"silu"`, also spelt `"swish"`): every Stable Diffusion network.
    #[default]
    #[serde(rename = "silu", alias = "swish")]
    Silu,
    /// Exact GELU (`"gelu"`).
    #[serde(rename = "gelu")]
    Gelu,
}

impl Activation {
    /// Applies the activation to `x`.
    ///
    /// # Errors
    /// Backend failures.
    pub fn forward<B: Backend>(self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        match self {
            Self::Silu => backend.silu(x),
            Self::Gelu => backend.gelu(x, GeluApproximation::None),
        }
    }
}

//! Layer normalisation (PyTorch's `nn.LayerNorm` over the last axis).

use crate::backend::Backend;
use crate::error::Result;
use crate::nn::source::WeightSource;

/// Layer normalisation over the last axis; keys `weight` and `bias`, both `[C]`.
#[derive(Debug, Clone)]
pub struct LayerNorm<B: Backend> {
    /// `gamma`, `[C]`.
    pub weight: B::Tensor,
    /// `beta`, `[C]`.
    pub bias: B::Tensor,
    /// Added to the variance.
    pub eps: f32,
}

impl<B: Backend> LayerNorm<B> {
    /// Loads `weight` and `bias` `[channels]` from `w`.
    ///
    /// # Errors
    /// A missing or misshapen weight.
    pub fn load<S: WeightSource>(backend: &B, w: &S, channels: usize, eps: f32) -> Result<Self> {
        Ok(LayerNorm {
            weight: super::upload(backend, &w.get("weight", &[channels])?)?,
            bias: super::upload(backend, &w.get("bias", &[channels])?)?,
            eps,
        })
    }

    /// `x [..., C] -> [..., C]`.
    ///
    /// # Errors
    /// A shape mismatch.
    pub fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        backend.layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

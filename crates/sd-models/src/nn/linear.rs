//! A linear layer, `y = x W^T + b` (PyTorch's `nn.Linear`, weight `[out, in]`).

use crate::backend::Backend;
use crate::error::Result;
use crate::nn::source::WeightSource;

/// A linear layer; keys `weight` `[out, in]` and optionally `bias` `[out]`.
#[derive(Debug, Clone)]
pub struct Linear<B: Backend> {
    /// `[out, in]`.
    pub weight: B::Tensor,
    /// `[out]`.
    pub bias: Option<B::Tensor>,
}

impl<B: Backend> Linear<B> {
    /// Loads `weight` (and `bias` if `bias`) from `w` (a checkpoint scope or random weights).
    ///
    /// # Errors
    /// A missing or misshapen weight.
    pub fn load<S: WeightSource>(
        backend: &B,
        w: &S,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = backend.prepare_linear_weight(super::upload(
            backend,
            &w.get("weight", &[out_features, in_features])?,
        )?)?;
        let bias = if bias {
            Some(super::upload(backend, &w.get("bias", &[out_features])?)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// `x [..., in] -> [..., out]`.
    ///
    /// # Errors
    /// A shape mismatch.
    pub fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        backend.linear(x, &self.weight, self.bias.as_ref())
    }
}

//! Group normalisation (Wu & He, 2018; PyTorch's `nn.GroupNorm` with affine parameters), the
//! norm of every UNet and VAE block.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::source::WeightSource;

/// Group normalisation of `[N, C, ...]` over `groups` groups of channels; keys `weight` and
/// `bias`, both `[C]`.
#[derive(Debug, Clone)]
pub struct GroupNorm<B: Backend> {
    /// `gamma`, `[C]`.
    pub weight: B::Tensor,
    /// `beta`, `[C]`.
    pub bias: B::Tensor,
    groups: usize,
    eps: f32,
}

impl<B: Backend> GroupNorm<B> {
    /// Loads a group norm of `channels` channels in `groups` groups.
    ///
    /// # Errors
    /// [`Error::Config`] if `groups` is zero or does not divide `channels` (PyTorch's
    /// `num_channels must be divisible by num_groups`); a missing or misshapen weight.
    pub fn load<S: WeightSource>(
        backend: &B,
        w: &S,
        channels: usize,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(Error::Config {
                what: w.describe(),
                message: format!("group norm of {channels} channels in {groups} groups"),
            });
        }
        Ok(GroupNorm {
            weight: super::upload(backend, &w.get("weight", &[channels])?)?,
            bias: super::upload(backend, &w.get("bias", &[channels])?)?,
            groups,
            eps: eps as f32,
        })
    }

    /// The number of groups.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// `x [N, C, ...] -> [N, C, ...]`.
    ///
    /// # Errors
    /// A shape mismatch.
    pub fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        backend.group_norm(x, self.groups, &self.weight, &self.bias, self.eps)
    }

    /// The norm followed by SiLU, fused where the backend can.
    ///
    /// # Errors
    /// A shape mismatch.
    pub fn forward_silu(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        backend.group_norm_silu(x, self.groups, &self.weight, &self.bias, self.eps)
    }

    /// The norm followed by `act` (fused for SiLU).
    ///
    /// # Errors
    /// A shape mismatch.
    pub fn forward_act(
        &self,
        backend: &B,
        x: &B::Tensor,
        act: super::Activation,
    ) -> Result<B::Tensor> {
        match act {
            super::Activation::Silu => self.forward_silu(backend, x),
            other => other.forward(backend, &self.forward(backend, x)?),
        }
    }
}

//! A 2-D convolution layer (PyTorch's `nn.Conv2d` with a square kernel, no groups or
//! dilation), loading `weight` `[out, in, k, k]` and `bias` `[out]`.

use crate::backend::{Backend, Conv2dParams};
use crate::error::Result;
use crate::nn::source::WeightSource;

/// A convolution; keys `weight` `[out, in, k, k]` and optionally `bias` `[out]`.
#[derive(Debug, Clone)]
pub struct Conv2d<B: Backend> {
    /// `[out, in, k, k]`.
    pub weight: B::Tensor,
    /// `[out]`.
    pub bias: Option<B::Tensor>,
    params: Conv2dParams,
}

impl<B: Backend> Conv2d<B> {
    /// Loads a `kernel x kernel` convolution from `in_channels` to `out_channels` with the
    /// given stride and padding (on each side).
    ///
    /// # Errors
    /// A missing or misshapen weight.
    #[allow(clippy::too_many_arguments)]
    pub fn load<S: WeightSource>(
        backend: &B,
        w: &S,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = backend.prepare_conv_weight(super::upload(
            backend,
            &w.get("weight", &[out_channels, in_channels, kernel, kernel])?,
        )?)?;
        let bias = if bias {
            Some(super::upload(backend, &w.get("bias", &[out_channels])?)?)
        } else {
            None
        };
        Ok(Conv2d {
            weight,
            bias,
            params: Conv2dParams::new(stride, padding),
        })
    }

    /// The stride and padding.
    pub fn params(&self) -> Conv2dParams {
        self.params
    }

    /// `x [N, in, H, W] -> [N, out, H', W']`.
    ///
    /// # Errors
    /// A shape mismatch.
    pub fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        backend.conv2d(x, &self.weight, self.bias.as_ref(), self.params)
    }
}

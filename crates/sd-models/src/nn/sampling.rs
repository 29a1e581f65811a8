//! Down- and upsampling by 2, as diffusers' `Downsample2D` (`models/downsampling.py`) and
//! `Upsample2D` (`models/upsampling.py`):
//!
//! - `Downsample2D`: a 3x3 convolution of stride 2 (key `conv`), padded by `padding` on
//!   every side, or, with `padding` 0, padded by one row and column at the bottom and right
//!   only (`F.pad(x, (0, 1, 0, 1))`, the VAE encoder's); without a convolution, 2x2 average
//!   pooling.
//! - `Upsample2D`: nearest-neighbour upsampling by 2, then a 3x3 convolution (key `conv`) if
//!   it has one.
//!
//! The backend has no padding or pooling operation; both are built here from its primitives
//! (concatenating zeros, slicing and adding).

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::nn::Conv2d;
use crate::nn::source::WeightSource;

/// diffusers' `Downsample2D` (as the UNet and VAE blocks build it, with `name="op"`).
#[derive(Debug, Clone)]
pub struct Downsample2D<B: Backend> {
    /// The strided convolution; `None` for average pooling.
    pub conv: Option<Conv2d<B>>,
    pad_bottom_right: bool,
}

impl<B: Backend> Downsample2D<B> {
    /// Loads a strided 3x3 convolution of `channels` to `out_channels` with `padding` (0: the
    /// asymmetric padding).
    ///
    /// # Errors
    /// A missing or misshapen weight.
    pub fn load_conv<S: WeightSource>(
        backend: &B,
        w: &S,
        channels: usize,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Downsample2D {
            conv: Some(Conv2d::load(
                backend,
                &w.push("conv"),
                channels,
                out_channels,
                3,
                2,
                padding,
                true,
            )?),
            pad_bottom_right: padding == 0,
        })
    }

    /// 2x2 average pooling (no weights).
    #[must_use]
    pub fn avg_pool() -> Self {
        Downsample2D {
            conv: None,
            pad_bottom_right: false,
        }
    }

    /// `x [N, C, H, W] -> [N, C', ceil-or-floor(H / 2), ...]` as PyTorch sizes it.
    ///
    /// # Errors
    /// A shape mismatch.
    pub fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        match &self.conv {
            Some(conv) if self.pad_bottom_right => {
                conv.forward(backend, &pad_bottom_right(backend, x)?)
            }
            Some(conv) => conv.forward(backend, x),
            None => avg_pool2x2(backend, x),
        }
    }
}

/// diffusers' `Upsample2D` with `use_conv` (key `conv`) or without.
#[derive(Debug, Clone)]
pub struct Upsample2D<B: Backend> {
    /// The 3x3 convolution after upsampling, if any.
    pub conv: Option<Conv2d<B>>,
}

impl<B: Backend> Upsample2D<B> {
    /// Loads the 3x3 convolution of `channels` to `out_channels`.
    ///
    /// # Errors
    /// A missing or misshapen weight.
    pub fn load_conv<S: WeightSource>(
        backend: &B,
        w: &S,
        channels: usize,
        out_channels: usize,
    ) -> Result<Self> {
        Ok(Upsample2D {
            conv: Some(Conv2d::load(
                backend,
                &w.push("conv"),
                channels,
                out_channels,
                3,
                1,
                1,
                true,
            )?),
        })
    }

    /// Nearest-neighbour upsampling only (no weights).
    #[must_use]
    pub fn nearest() -> Self {
        Upsample2D { conv: None }
    }

    /// `x [N, C, H, W] -> [N, C', 2H, 2W]`.
    ///
    /// # Errors
    /// A shape mismatch.
    pub fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        self.forward_to(backend, x, None)
    }

    /// As [`forward`](Self::forward), resized to `size = (H', W')` instead of doubled when
    /// given (diffusers' `output_size`, which the UNet passes when a skip connection is of
    /// odd size): `[N, C', H', W']`.
    ///
    /// # Errors
    /// A shape mismatch; an empty size.
    pub fn forward_to(
        &self,
        backend: &B,
        x: &B::Tensor,
        size: Option<(usize, usize)>,
    ) -> Result<B::Tensor> {
        let doubled = match *backend.shape(x) {
            [_, _, h, w] => (2 * h, 2 * w),
            _ => (0, 0),
        };
        if let Some(size) = size.filter(|&s| s != doubled) {
            let x = backend.upsample_nearest(x, size)?;
            return match &self.conv {
                Some(conv) => conv.forward(backend, &x),
                None => Ok(x),
            };
        }
        match &self.conv {
            Some(conv) => backend.upsample_nearest2x_conv2d(
                x,
                &conv.weight,
                conv.bias.as_ref(),
                conv.params(),
            ),
            None => backend.upsample_nearest2x(x),
        }
    }
}

fn dims4<B: Backend>(backend: &B, x: &B::Tensor, op: &'static str) -> Result<[usize; 4]> {
    match *backend.shape(x) {
        [n, c, h, w] => Ok([n, c, h, w]),
        ref other => Err(Error::Shape {
            op,
            expected: "[N, C, H, W]".into(),
            found: format!("{other:?}"),
        }),
    }
}

/// `x [N, C, H, W]` padded with a column of zeros on the right and a row at the bottom:
/// `[N, C, H + 1, W + 1]` (PyTorch's `F.pad(x, (0, 1, 0, 1))`).
///
/// # Errors
/// [`Error::Shape`] for a tensor that is not 4-D.
pub fn pad_bottom_right<B: Backend>(backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
    let [n, c, h, w] = dims4(backend, x, "pad")?;
    let column = backend.upload(&vec![0.0; n * c * h], &[n, c, h, 1])?;
    let x = backend.concat(&[x, &column], 3)?;
    let row = backend.upload(&vec![0.0; n * c * (w + 1)], &[n, c, 1, w + 1])?;
    backend.concat(&[&x, &row], 2)
}

/// 2x2 average pooling with stride 2 (PyTorch's `F.avg_pool2d(x, 2, 2)`, which drops an odd
/// last row or column): `[N, C, H, W] -> [N, C, H / 2, W / 2]`.
///
/// # Errors
/// [`Error::Shape`] for a tensor that is not 4-D or smaller than 2x2.
pub fn avg_pool2x2<B: Backend>(backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
    let [n, c, h, w] = dims4(backend, x, "avg_pool2x2")?;
    let (ho, wo) = (h / 2, w / 2);
    if ho == 0 || wo == 0 {
        return Err(Error::Shape {
            op: "avg_pool2x2",
            expected: "an image of at least 2x2".into(),
            found: format!("{:?}", [n, c, h, w]),
        });
    }
    let x = if h % 2 == 1 {
        backend.slice(x, 2, 0, 2 * ho)?
    } else {
        x.clone()
    };
    let x = if w % 2 == 1 {
        backend.slice(&x, 3, 0, 2 * wo)?
    } else {
        x
    };
    // [N*C*Ho, 2, Wo, 2]: the pairs of rows, then the pairs of columns.
    let x = backend.reshape(&x, &[n * c * ho, 2, wo, 2])?;
    let rows = backend.add(&backend.slice(&x, 1, 0, 1)?, &backend.slice(&x, 1, 1, 1)?)?;
    let sums = backend.add(
        &backend.slice(&rows, 3, 0, 1)?,
        &backend.slice(&rows, 3, 1, 1)?,
    )?;
    let mean = backend.affine(&sums, 0.25, 0.0)?;
    backend.reshape(&mean, &[n, c, ho, wo])
}

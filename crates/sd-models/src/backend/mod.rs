//! The `Backend` trait: the tensor operations the Stable Diffusion networks need, grouped by
//! family, each family a small trait.
//!
//! A backend owns its tensor type ([`BackendBase::Tensor`]), so weights and activations live
//! where the backend computes (a GPU backend keeps them in device memory); the host sees data
//! only through [`DataOps::download`]. [`Backend`] is every family together and is implemented
//! automatically for any type that implements them all.
//!
//! Families give default implementations built from primitives where one exists (attention
//! from matmul and softmax, GEGLU from slicing, GELU and a product, a fused group norm + SiLU
//! from the two), so a new backend can start small and override with fused kernels.
//!
//! Layouts: images are `[N, C, H, W]`, token sequences `[B, L, C]`, attention heads
//! `[B, H, L, D]`, linear weights `[out, in]` (PyTorch's), conv weights `[O, C, kh, kw]`.
//! Every operation documents its shapes and returns [`Error::Shape`](crate::Error::Shape) for
//! others; the layer that knows the shapes checks them once.
//!
//! [`conformance`] checks any backend against straightforward reference implementations.

use std::borrow::Cow;
use std::fmt::Debug;

use half::{bf16, f16};

use crate::error::Result;

pub mod conformance;

/// The element type a tensor or a stored weight is in. Computation accumulates in f32
/// whatever the storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// IEEE 754 single precision (safetensors `F32`).
    F32,
    /// IEEE 754 half precision (safetensors `F16`).
    F16,
    /// bfloat16: `f32`'s exponent with a 7-bit mantissa (safetensors `BF16`).
    BF16,
}

impl DType {
    /// The size of one element in bytes.
    #[must_use]
    pub fn size_in_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    /// The safetensors name (`"F32"`, `"F16"`, `"BF16"`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Host data in a half-precision type, for uploading weights kept in half precision.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum HalfData<'a> {
    /// IEEE half values.
    F16(&'a [f16]),
    /// bfloat16 values.
    BF16(&'a [bf16]),
}

/// What every backend has: its tensor type and what a tensor's shape and dtype are.
pub trait BackendBase: Clone + Debug + Send + Sync + 'static {
    /// The backend's tensor: an n-dimensional array in the backend's memory.
    type Tensor: Clone + Debug + Send + Sync;

    /// A short name for messages ("cpu", "cuda:0").
    fn name(&self) -> String;

    /// The shape of a tensor.
    fn shape<'a>(&self, tensor: &'a Self::Tensor) -> &'a [usize];

    /// The storage type of a tensor.
    fn dtype(&self, tensor: &Self::Tensor) -> DType;
}

/// Moving data in and out and reshaping it.
pub trait DataOps: BackendBase {
    /// A tensor of `shape` holding `data` (row-major).
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) if the lengths disagree.
    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor>;

    /// A tensor stored in half precision holding `data` (row-major).
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) if the lengths disagree.
    fn upload_half(&self, data: HalfData<'_>, shape: &[usize]) -> Result<Self::Tensor>;

    /// The tensor's values as f32, row-major.
    ///
    /// # Errors
    /// Backend failures (a device error).
    fn download(&self, tensor: &Self::Tensor) -> Result<Vec<f32>>;

    /// A tensor of `shape` that takes `data` (row-major) as its storage where the backend
    /// keeps tensors in host memory, so that nothing is copied; elsewhere an
    /// [`upload`](Self::upload).
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) if the lengths disagree.
    fn upload_vec(&self, data: Vec<f32>, shape: &[usize]) -> Result<Self::Tensor> {
        self.upload(&data, shape)
    }

    /// The tensor's values as f32, row-major: borrowed from the tensor where the backend
    /// keeps it so in host memory (no copy), else a [`download`](Self::download).
    ///
    /// # Errors
    /// Backend failures (a device error).
    fn host_values<'a>(&self, tensor: &'a Self::Tensor) -> Result<Cow<'a, [f32]>> {
        Ok(Cow::Owned(self.download(tensor)?))
    }

    /// The same values with another shape of the same size.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) if the sizes differ.
    fn reshape(&self, tensor: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;

    /// Reorders the axes: axis `i` of the result is axis `axes[i]` of the input.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) if `axes` is not a permutation of the axes.
    fn permute(&self, tensor: &Self::Tensor, axes: &[usize]) -> Result<Self::Tensor>;

    /// The `len` entries from `start` along `axis`.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) for an axis or range outside the tensor.
    fn slice(
        &self,
        tensor: &Self::Tensor,
        axis: usize,
        start: usize,
        len: usize,
    ) -> Result<Self::Tensor>;

    /// Tensors joined along `axis` (equal in every other dimension).
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) for no tensors or mismatched shapes.
    fn concat(&self, tensors: &[&Self::Tensor], axis: usize) -> Result<Self::Tensor>;

    /// The tensor converted to another storage type (rounding to nearest).
    ///
    /// # Errors
    /// [`Error::Unsupported`](crate::Error::Unsupported) for a dtype the backend cannot hold.
    fn cast(&self, tensor: &Self::Tensor, dtype: DType) -> Result<Self::Tensor>;
}

/// Element-wise arithmetic with numpy broadcasting.
pub trait ElementwiseOps: BackendBase {
    /// `a + b`, broadcast.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) if the shapes do not broadcast.
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// `a - b`, broadcast.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) if the shapes do not broadcast.
    fn sub(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// `a * b`, broadcast.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) if the shapes do not broadcast.
    fn mul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// `x * scale + shift`, element-wise with scalars.
    ///
    /// # Errors
    /// Backend failures.
    fn affine(&self, x: &Self::Tensor, scale: f32, shift: f32) -> Result<Self::Tensor>;
}

/// Matrix products.
pub trait MatmulOps: DataOps + ElementwiseOps {
    /// Batched product: `a [..., m, k] x b [..., k, n] -> [..., m, n]`, where `b`'s batch
    /// dimensions equal `a`'s, or `b` is a single `[k, n]` matrix.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) for mismatched shapes.
    fn matmul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// A linear layer's weight `[out, in]` in the form [`MatmulOps::linear`] reads fastest,
    /// made once when the layer is loaded (the CPU backend packs it for its GEMM). The
    /// result is only ever passed to `linear` (other operations still accept it, possibly
    /// more slowly). The default keeps the tensor as it is.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) for a weight that is not 2-D.
    fn prepare_linear_weight(&self, weight: Self::Tensor) -> Result<Self::Tensor> {
        Ok(weight)
    }

    /// A linear layer: `x [..., in] -> x W^T + b [..., out]` with `weight [out, in]` and
    /// `bias [out]`.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) for mismatched shapes.
    fn linear(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor> {
        let w_t = self.permute(weight, &[1, 0])?;
        let y = self.matmul(x, &w_t)?;
        match bias {
            Some(b) => self.add(&y, b),
            None => Ok(y),
        }
    }
}

/// The geometry of a 2-D convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conv2dParams {
    /// Stride (rows, columns).
    pub stride: (usize, usize),
    /// Zero padding (rows, columns) on each side.
    pub padding: (usize, usize),
}

impl Conv2dParams {
    /// Stride `stride` and padding `padding` in both directions.
    pub const fn new(stride: usize, padding: usize) -> Self {
        Conv2dParams {
            stride: (stride, stride),
            padding: (padding, padding),
        }
    }

    /// The output size of an input of `h x w` under a `kh x kw` kernel, if positive.
    pub fn output_size(&self, h: usize, w: usize, kh: usize, kw: usize) -> Option<(usize, usize)> {
        let (ph, pw) = (h + 2 * self.padding.0, w + 2 * self.padding.1);
        if ph < kh || pw < kw || self.stride.0 == 0 || self.stride.1 == 0 {
            return None;
        }
        Some(((ph - kh) / self.stride.0 + 1, (pw - kw) / self.stride.1 + 1))
    }
}

/// Convolutions.
pub trait ConvOps: ResampleOps {
    /// A convolution's weight `[O, C, kh, kw]` in the form [`ConvOps::conv2d`] reads fastest,
    /// made once when the layer is loaded (the CPU backend packs it for its GEMM). The
    /// result is only ever passed to `conv2d` (other operations still accept it, possibly
    /// more slowly). The default keeps the tensor as it is.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) for a weight that is not 4-D.
    fn prepare_conv_weight(&self, weight: Self::Tensor) -> Result<Self::Tensor> {
        Ok(weight)
    }

    /// `x [N, C, H, W]` convolved with `weight [O, C, kh, kw]` plus `bias [O]`, giving
    /// `[N, O, H', W']` (cross-correlation, as PyTorch's `conv2d`).
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) for mismatched shapes or an empty output.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        params: Conv2dParams,
    ) -> Result<Self::Tensor>;

    /// [`ConvOps::conv2d`] of `x [N, C, H, W]` upsampled by nearest neighbour
    /// ([`ResampleOps::upsample_nearest2x`]), as every upsampler of the UNet and the VAE
    /// does: `[N, O, H', W']` for the `2H x 2W` input. Fused backends never materialise the
    /// upsampled image (at 512 pixels the VAE's is 256 MiB); the default composes the two.
    ///
    /// # Errors
    /// As the two operations.
    fn upsample_nearest2x_conv2d(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        params: Conv2dParams,
    ) -> Result<Self::Tensor> {
        self.conv2d(&self.upsample_nearest2x(x)?, weight, bias, params)
    }
}

/// Element-wise activations and the softmax.
pub trait ActivationOps: DataOps + ElementwiseOps {
    /// `x * sigmoid(x)`.
    ///
    /// # Errors
    /// Backend failures.
    fn silu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// GELU, exact (`x Phi(x)`, with erf) or with the tanh approximation.
    ///
    /// # Errors
    /// Backend failures.
    fn gelu(&self, x: &Self::Tensor, approximation: GeluApproximation) -> Result<Self::Tensor>;

    /// `x * sigmoid(1.702 x)` (CLIP's quick GELU).
    ///
    /// # Errors
    /// Backend failures.
    fn quick_gelu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// Softmax over the last axis.
    ///
    /// # Errors
    /// Backend failures.
    fn softmax_last(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// GEGLU (Shazeer, 2020), as diffusers': `x [..., 2C]` split in halves `(h, g)` along the
    /// last axis, giving `h * gelu(g)` `[..., C]` (exact GELU).
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) for an odd last dimension.
    fn geglu(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        let shape = self.shape(x);
        let axis = shape.len().saturating_sub(1);
        let c2 = shape.last().copied().unwrap_or(0);
        if shape.is_empty() || c2 % 2 != 0 {
            return Err(crate::error::Error::Shape {
                op: "geglu",
                expected: "[..., 2C]".into(),
                found: format!("{shape:?}"),
            });
        }
        let h = self.slice(x, axis, 0, c2 / 2)?;
        let g = self.slice(x, axis, c2 / 2, c2 / 2)?;
        let g = self.gelu(&g, GeluApproximation::None)?;
        self.mul(&h, &g)
    }
}

/// Which GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GeluApproximation {
    /// `x Phi(x)` with the error function (PyTorch's default, `"gelu"`).
    #[default]
    None,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (`"gelu_pytorch_tanh"`).
    Tanh,
}

/// Normalisation layers.
pub trait NormOps: ActivationOps {
    /// Group normalisation (Wu & He, 2018) of `x [N, C, ...]` in `groups` groups of channels,
    /// with per-channel `gamma [C]` and `beta [C]`.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) if `C` is not a multiple of `groups` or the
    /// parameters do not have `C` entries.
    fn group_norm(
        &self,
        x: &Self::Tensor,
        groups: usize,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// Group normalisation followed by SiLU, as every UNet and VAE block does; fuse it where
    /// the backend can.
    ///
    /// # Errors
    /// As [`NormOps::group_norm`].
    fn group_norm_silu(
        &self,
        x: &Self::Tensor,
        groups: usize,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        let y = self.group_norm(x, groups, gamma, beta, eps)?;
        self.silu(&y)
    }

    /// Layer normalisation of `x [..., C]` over its last axis with `gamma [C]`, `beta [C]`.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) if the parameters do not have `C` entries.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;
}

/// A mask for attention.
#[derive(Debug, Clone, Copy)]
pub enum AttentionMask<'a, T> {
    /// Every query sees every key.
    None,
    /// Query `i` sees keys `0..=i` (CLIP's text encoder).
    Causal,
    /// Added to the scores: broadcastable to `[B, H, Lq, Lk]`.
    Additive(&'a T),
}

/// Scaled dot-product attention.
pub trait AttentionOps: MatmulOps + ActivationOps {
    /// `softmax(q k^T * scale + mask) v` for `q [B, H, Lq, D]`, `k [B, H, Lk, D]`,
    /// `v [B, H, Lk, Dv]`, giving `[B, H, Lq, Dv]`. The default materialises the scores;
    /// backends override it with a fused kernel.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) for mismatched shapes.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        mask: AttentionMask<'_, Self::Tensor>,
        scale: f32,
    ) -> Result<Self::Tensor> {
        let (qs, ks) = (self.shape(q).to_vec(), self.shape(k).to_vec());
        if qs.len() != 4 || ks.len() != 4 {
            return Err(crate::error::Error::Shape {
                op: "attention",
                expected: "q [B, H, Lq, D] and k [B, H, Lk, D]".into(),
                found: format!("q {qs:?}, k {ks:?}"),
            });
        }
        let k_t = self.permute(k, &[0, 1, 3, 2])?;
        let scores = self.matmul(q, &k_t)?;
        let scores = self.affine(&scores, scale, 0.0)?;
        let scores = match mask {
            AttentionMask::None => scores,
            AttentionMask::Additive(m) => self.add(&scores, m)?,
            AttentionMask::Causal => {
                let (lq, lk) = (qs[2], ks[2]);
                let mut m = vec![0.0_f32; lq * lk];
                for i in 0..lq {
                    for j in (i + 1)..lk {
                        m[i * lk + j] = f32::NEG_INFINITY;
                    }
                }
                let m = self.upload(&m, &[lq, lk])?;
                self.add(&scores, &m)?
            }
        };
        let p = self.softmax_last(&scores)?;
        self.matmul(&p, v)
    }
}

/// Resampling of images.
pub trait ResampleOps: BackendBase {
    /// Nearest-neighbour upsampling by 2: `[N, C, H, W] -> [N, C, 2H, 2W]`.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) for a tensor that is not 4-D.
    fn upsample_nearest2x(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// Nearest-neighbour resizing to `size = (H', W')`: `[N, C, H, W] -> [N, C, H', W']`,
    /// output row `i` reading input row [`nearest_index`]`(i, H, H')` (PyTorch's
    /// `F.interpolate(x, size=size, mode="nearest")`). The UNet uses it to upsample to a
    /// skip connection of odd size. The default gathers rows and columns with
    /// [`DataOps::slice`] and [`DataOps::concat`]; backends may override it with a kernel (the CPU backend does).
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) for a tensor that is not 4-D, an empty input or
    /// an empty size.
    fn upsample_nearest(&self, x: &Self::Tensor, size: (usize, usize)) -> Result<Self::Tensor>
    where
        Self: DataOps,
    {
        let (h, w) = match *self.shape(x) {
            [_, _, h, w] if h > 0 && w > 0 && size.0 > 0 && size.1 > 0 => (h, w),
            ref other => {
                return Err(crate::error::Error::Shape {
                    op: "upsample_nearest",
                    expected: format!("a non-empty [N, C, H, W] resized to a non-empty {size:?}"),
                    found: format!("{other:?}"),
                });
            }
        };
        let gather = |x: &Self::Tensor, axis: usize, from: usize, to: usize| {
            if from == to {
                return Ok(x.clone());
            }
            let slices = (0..to)
                .map(|i| self.slice(x, axis, nearest_index(i, from, to), 1))
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<&Self::Tensor> = slices.iter().collect();
            self.concat(&refs, axis)
        };
        let rows = gather(x, 2, h, size.0)?;
        gather(&rows, 3, w, size.1)
    }
}

/// The input index output index `i` reads when nearest-neighbour resizing `input` values to
/// `output`, exactly as PyTorch's `nearest` mode computes it: the identity for equal sizes,
/// `i / 2` for doubling, else `floor(i * (input / output))` in single precision, clamped.
#[must_use]
pub fn nearest_index(i: usize, input: usize, output: usize) -> usize {
    if input == output {
        i
    } else if output == 2 * input {
        i / 2
    } else {
        let scale = input as f32 / output as f32;
        ((i as f32 * scale).floor() as usize).min(input.saturating_sub(1))
    }
}

/// A complete backend: every operation family. Implemented automatically.
pub trait Backend:
    DataOps
    + ElementwiseOps
    + MatmulOps
    + ConvOps
    + ActivationOps
    + NormOps
    + AttentionOps
    + ResampleOps
{
}

impl<T> Backend for T where
    T: DataOps
        + ElementwiseOps
        + MatmulOps
        + ConvOps
        + ActivationOps
        + NormOps
        + AttentionOps
        + ResampleOps
{
}

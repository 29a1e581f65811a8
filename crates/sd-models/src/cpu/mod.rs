//! The CPU backend: ndarray arrays, rayon threads and its own packed GEMM with AVX-512, AVX2
//! and portable kernels.
//!
//! The reference backend: every operation of [`crate::backend`] in f32 (half-precision
//! tensors are widened when an operation reads them). Tensors are always contiguous, row-major
//! and shared by reference count, so cloning one is cheap. Reductions (norms, softmax, the
//! GEMM's sums) run in an order that does not depend on the number of threads, so results are
//! the same on every machine size.
//!
//! Where the time goes, and how it is spent well:
//! - every product (convolutions, linear layers, attention) runs on one BLIS-style GEMM with
//!   register-blocked microkernels chosen at run time ([`CpuIsa`]); weights are packed once
//!   when a layer is loaded (`prepare_*_weight`); a 3x3 convolution runs directly on a
//!   channel-blocked copy of its input (AVX-512) or as an implicit GEMM that packs the
//!   unfolded input tile by tile from the image (no im2col buffer either way), and a nearest
//!   upsampling before a convolution is read through the same copy or packing;
//! - attention is fused (tiled, online softmax; the scores never exist whole);
//! - large outputs come from a pool that dropped tensors return to, so a network's steady
//!   state neither maps fresh memory nor takes page faults;
//! - [`CpuBackend::with_precision`] with [`CpuPrecision::Bf16`] multiplies in bf16 on
//!   AVX512-BF16 (about twice the f32 rate), with weights kept in bf16; weights loaded in f16
//!   or bf16 stay in half precision for f32 products too (half the memory).
//!
//! ```
//! use sd_models::CpuBackend;
//! use sd_models::cpu::CpuPrecision;
//!
//! // bf16 products where the CPU has them, f32 elsewhere.
//! let cpu = CpuBackend::new().with_precision(CpuPrecision::fastest())?;
//! # let _ = cpu;
//! # Ok::<(), sd_models::Error>(())
//! ```

use std::sync::Arc;

use half::{bf16, f16};
use ndarray::{ArcArray, ArrayD, IxDyn};

use crate::backend::{BackendBase, DType};
use crate::error::{Error, Result};

mod activation;
mod attention;
mod conv;
mod data;
mod elementwise;
pub(crate) mod math;
mod matmul;
pub(crate) mod norm;
mod packed;
pub(crate) mod pool;
mod resample;

pub(crate) use matmul::{MatRef, Threads, add_product, add_product_of, add_product_windows};
use packed::Panels;
pub(crate) use packed::pack::Windows;
pub use packed::{CpuIsa, CpuPrecision};

/// The CPU backend. Work runs on rayon's global thread pool (set `RAYON_NUM_THREADS` to
/// choose its size).
///
/// ```
/// use sd_models::backend::{DataOps, ActivationOps};
/// use sd_models::CpuBackend;
///
/// let cpu = CpuBackend::new();
/// let x = cpu.upload(&[-1.0, 0.0, 2.0], &[3])?;
/// let y = cpu.silu(&x)?;
/// let y = cpu.download(&y)?;
/// assert!((y[2] - 2.0 / (1.0 + (-2.0_f32).exp())).abs() < 1e-6);
/// # Ok::<(), sd_models::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct CpuBackend {
    isa: CpuIsa,
    precision: CpuPrecision,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    /// The CPU backend, with the fastest kernels this CPU supports ([`CpuIsa::detect`]).
    pub fn new() -> Self {
        CpuBackend {
            isa: CpuIsa::detect(),
            precision: CpuPrecision::F32,
        }
    }

    /// The CPU backend with the kernels of `isa` (to compare them, or to run the portable
    /// ones).
    ///
    /// # Errors
    /// [`Error::Unsupported`] if this CPU cannot run them.
    pub fn with_isa(isa: CpuIsa) -> Result<Self> {
        if isa.is_supported() {
            Ok(CpuBackend {
                isa,
                precision: CpuPrecision::F32,
            })
        } else {
            Err(Error::Unsupported(format!(
                "cpu: this CPU cannot run the {isa:?} kernels"
            )))
        }
    }

    /// The kernels in use.
    pub fn isa(&self) -> CpuIsa {
        self.isa
    }

    /// The same backend multiplying in `precision`: [`CpuPrecision::Bf16`] rounds the
    /// operands of every product (convolutions, linear layers, attention) to bfloat16 and
    /// accumulates in f32 with AVX512-BF16, and keeps prepared weights in bf16 (half the
    /// memory); everything else stays f32. [`CpuPrecision::fastest`] picks bf16 where the CPU
    /// has it.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for bf16 on a CPU without AVX-512F and AVX512-BF16 (or with
    /// other kernels chosen by [`CpuBackend::with_isa`]).
    pub fn with_precision(self, precision: CpuPrecision) -> Result<Self> {
        if precision == CpuPrecision::Bf16
            && !(self.isa == CpuIsa::Avx512 && CpuPrecision::bf16_supported())
        {
            return Err(Error::Unsupported(format!(
                "cpu: bf16 products need AVX-512F and AVX512-BF16 ({:?} kernels here)",
                self.isa
            )));
        }
        Ok(CpuBackend { precision, ..self })
    }

    /// The precision products multiply in.
    pub fn precision(&self) -> CpuPrecision {
        self.precision
    }
}

/// A tensor of the CPU backend: a contiguous row-major ndarray in f32, f16 or bf16.
#[derive(Debug, Clone)]
pub struct CpuTensor {
    data: CpuData,
}

#[derive(Debug, Clone)]
enum CpuData {
    F32(ArcArray<f32, IxDyn>),
    F16(ArcArray<f16, IxDyn>),
    BF16(ArcArray<bf16, IxDyn>),
    /// A weight packed for the GEMM's kernels (see [`CpuBackend`]'s `prepare_*_weight`).
    Packed(Arc<Packed>),
}

/// How a packed weight is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PackLayout {
    /// `[M, K]` (the weight's first axis by the rest) as A micro-panels of `mr` rows: a
    /// convolution's weight.
    Rows { mr: usize },
    /// `[N, K]` as the B operand `K x N` in micro-panels of `nr` columns: a linear layer's
    /// weight.
    Cols { nr: usize },
    /// `[O, C, kh, kw]` as [`PackLayout::Cols`] with each row's `K` reordered for a direct
    /// convolution (channel block, tap, channel; see [`packed::blocked`]).
    Taps { nr: usize },
}

/// A weight packed once for the GEMM, with its logical shape.
#[derive(Debug)]
pub(crate) struct Packed {
    shape: Vec<usize>,
    layout: PackLayout,
    data: PackedData,
}

/// Packed values: f32, bf16 pairs for bf16 products (half the memory), or f32 panels kept
/// in the half precision the weight was loaded in (half the memory, widened as read).
#[derive(Debug)]
pub(crate) enum PackedData {
    F32(Vec<f32>),
    Bf16(Vec<u32>),
    HalfF16(Vec<f16>),
    HalfBf16(Vec<bf16>),
}

impl PackedData {
    /// A whole-`K` f32 packing (panels `width` wide of `k` groups each) as a product in
    /// `precision` reads it: itself, or as bf16 pairs.
    pub(crate) fn in_precision(
        f32s: Vec<f32>,
        k: usize,
        width: usize,
        precision: CpuPrecision,
    ) -> Self {
        match precision {
            CpuPrecision::F32 => PackedData::F32(f32s),
            CpuPrecision::Bf16 => PackedData::Bf16(packed::pack::pair_packing(&f32s, k, width)),
        }
    }

    fn precision(&self) -> CpuPrecision {
        match self {
            PackedData::Bf16(_) => CpuPrecision::Bf16,
            _ => CpuPrecision::F32,
        }
    }

    fn panels(&self) -> Panels<'_> {
        match self {
            PackedData::F32(v) => Panels::F32(v),
            PackedData::Bf16(v) => Panels::Bf16(v),
            PackedData::HalfF16(v) => Panels::HalfF16(v),
            PackedData::HalfBf16(v) => Panels::HalfBf16(v),
        }
    }

    /// Value `i` of an f32-layout packing (not of bf16 pairs).
    fn value(&self, i: usize) -> f32 {
        match self {
            PackedData::F32(d) => d[i],
            PackedData::HalfF16(d) => d[i].to_f32(),
            PackedData::HalfBf16(d) => d[i].to_f32(),
            PackedData::Bf16(_) => 0.0,
        }
    }
}

/// Packed panels borrowed from a prepared weight or made for one call.
#[derive(Debug)]
pub(crate) enum PanelsCow<'a> {
    Borrowed(Panels<'a>),
    Owned(PackedData),
}

impl PanelsCow<'_> {
    pub(crate) fn panels(&self) -> Panels<'_> {
        match self {
            PanelsCow::Borrowed(p) => *p,
            PanelsCow::Owned(d) => d.panels(),
        }
    }
}

impl Packed {
    /// The logical values, row-major.
    fn unpack(&self) -> Vec<f32> {
        let rows = self.shape.first().copied().unwrap_or(0);
        let k: usize = self.shape.iter().skip(1).product();
        let mut out = vec![0.0; rows * k];
        let p = match self.layout {
            PackLayout::Rows { mr } | PackLayout::Cols { nr: mr } | PackLayout::Taps { nr: mr } => {
                mr
            }
        };
        for (i, row) in out.chunks_exact_mut(k.max(1)).enumerate() {
            for (kk, v) in row.iter_mut().enumerate() {
                *v = match &self.data {
                    PackedData::Bf16(d) => {
                        let pair = d[((i / p) * k.div_ceil(2) + kk / 2) * p + i % p];
                        let bits = if kk % 2 == 0 {
                            pair & 0xffff
                        } else {
                            pair >> 16
                        };
                        f32::from_bits(bits << 16)
                    }
                    other => other.value(((i / p) * k + kk) * p + i % p),
                };
            }
        }
        match self.layout {
            PackLayout::Taps { .. } => {
                let (c, taps) = channels_and_taps(&self.shape);
                packed::blocked::channels_first(&out, c, taps)
            }
            _ => out,
        }
    }
}

/// The input channels and kernel taps of a convolution weight's shape `[O, C, kh, kw]`.
fn channels_and_taps(shape: &[usize]) -> (usize, usize) {
    let c = shape.get(1).copied().unwrap_or(1);
    (c, shape.iter().skip(2).product())
}

impl CpuTensor {
    /// Wraps an f32 ndarray (made contiguous if it is not).
    pub fn from_array(array: ArrayD<f32>) -> Self {
        let array = if array.is_standard_layout() {
            array
        } else {
            array.as_standard_layout().into_owned()
        };
        Self::f32(array.into_shared())
    }

    /// The f32 ndarray of an f32 tensor; `None` for a half-precision one.
    pub fn as_array(&self) -> Option<&ArcArray<f32, IxDyn>> {
        match &self.data {
            CpuData::F32(a) => Some(a),
            _ => None,
        }
    }

    pub(crate) fn f32(array: ArcArray<f32, IxDyn>) -> Self {
        CpuTensor {
            data: CpuData::F32(array),
        }
    }

    /// A new f32 tensor from contiguous data of a known-valid shape.
    pub(crate) fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        let len = data.len();
        ArrayD::from_shape_vec(IxDyn(shape), data)
            .map(|a| Self::f32(a.into_shared()))
            .map_err(|_| Error::Shape {
                op: "tensor",
                expected: format!(
                    "{} values for shape {shape:?}",
                    shape.iter().product::<usize>()
                ),
                found: format!("{len} values"),
            })
    }

    pub(crate) fn shape(&self) -> &[usize] {
        match &self.data {
            CpuData::F32(a) => a.shape(),
            CpuData::F16(a) => a.shape(),
            CpuData::BF16(a) => a.shape(),
            CpuData::Packed(p) => &p.shape,
        }
    }

    pub(crate) fn dtype(&self) -> DType {
        match &self.data {
            CpuData::F32(_) => DType::F32,
            CpuData::F16(_) => DType::F16,
            CpuData::BF16(_) => DType::BF16,
            CpuData::Packed(p) => match p.data {
                PackedData::F32(_) => DType::F32,
                PackedData::HalfF16(_) => DType::F16,
                PackedData::Bf16(_) | PackedData::HalfBf16(_) => DType::BF16,
            },
        }
    }

    /// The values as a contiguous f32 array (shared for f32 tensors, widened for half,
    /// unpacked for packed weights).
    pub(crate) fn to_f32_array(&self) -> ArcArray<f32, IxDyn> {
        match &self.data {
            CpuData::F32(a) => a.clone(),
            CpuData::F16(a) => a.mapv(f16::to_f32).into_shared(),
            CpuData::BF16(a) => a.mapv(bf16::to_f32).into_shared(),
            CpuData::Packed(p) => ArrayD::from_shape_vec(IxDyn(&p.shape), p.unpack())
                .map(ArrayD::into_shared)
                .unwrap_or_else(|_| ArrayD::zeros(IxDyn(&[0])).into_shared()),
        }
    }

    /// This `[m, ...]` weight as A micro-panels for `isa` in `precision` (`m` rows of `k`):
    /// its own packing if it was prepared so, else packed now.
    pub(crate) fn packed_rows(
        &self,
        isa: CpuIsa,
        precision: CpuPrecision,
        m: usize,
        k: usize,
    ) -> Result<PanelsCow<'_>> {
        self.packed(PackLayout::Rows { mr: isa.mr() }, precision, m, k)
    }

    /// This `[O, C, kh, kw]` weight as B micro-panels of a direct convolution
    /// ([`PackLayout::Taps`]) for `isa` in `precision`.
    pub(crate) fn packed_taps(
        &self,
        isa: CpuIsa,
        precision: CpuPrecision,
        o: usize,
        k: usize,
    ) -> Result<PanelsCow<'_>> {
        self.packed(PackLayout::Taps { nr: isa.nr() }, precision, o, k)
    }

    /// This `[n, k]` weight as B micro-panels (of its transpose) for `isa` in `precision`.
    pub(crate) fn packed_cols(
        &self,
        isa: CpuIsa,
        precision: CpuPrecision,
        n: usize,
        k: usize,
    ) -> Result<PanelsCow<'_>> {
        self.packed(PackLayout::Cols { nr: isa.nr() }, precision, n, k)
    }

    fn packed(
        &self,
        layout: PackLayout,
        precision: CpuPrecision,
        rows: usize,
        k: usize,
    ) -> Result<PanelsCow<'_>> {
        if self.shape().first() != Some(&rows) || self.shape().iter().product::<usize>() != rows * k
        {
            return Err(Error::Shape {
                op: "packed weight",
                expected: format!("[{rows}, ...] holding {rows} x {k} values"),
                found: format!("{:?}", self.shape()),
            });
        }
        if let CpuData::Packed(p) = &self.data
            && p.layout == layout
            && p.data.precision() == precision
        {
            return Ok(PanelsCow::Borrowed(p.data.panels()));
        }
        // Packed in another layout or precision: unpacked and packed again (slow; only a
        // weight prepared by another backend configuration comes here).
        let a = self.to_f32_array();
        let w = contiguous(&a, "packed weight")?;
        let (f32s, width) = match layout {
            PackLayout::Rows { mr } => (packed::pack::prepack_rows(w, rows, k, mr), mr),
            PackLayout::Cols { nr } => (packed::pack::prepack_cols(w, rows, k, nr), nr),
            PackLayout::Taps { nr } => {
                let (c, taps) = channels_and_taps(self.shape());
                let w = packed::blocked::taps_first(w, c, taps);
                (packed::pack::prepack_cols(&w, rows, k, nr), nr)
            }
        };
        Ok(PanelsCow::Owned(PackedData::in_precision(
            f32s, k, width, precision,
        )))
    }

    /// As [`CpuTensor::packed`], keeping a half-precision weight in its half precision for
    /// f32 products (exact: its values are halves).
    fn packed_keeping_half(
        &self,
        layout: PackLayout,
        precision: CpuPrecision,
        rows: usize,
        k: usize,
    ) -> Result<PackedData> {
        let owned = |c: PanelsCow<'_>| match c {
            PanelsCow::Owned(d) => d,
            PanelsCow::Borrowed(Panels::F32(v)) => PackedData::F32(v.to_vec()),
            PanelsCow::Borrowed(Panels::Bf16(v)) => PackedData::Bf16(v.to_vec()),
            PanelsCow::Borrowed(Panels::HalfF16(v)) => PackedData::HalfF16(v.to_vec()),
            PanelsCow::Borrowed(Panels::HalfBf16(v)) => PackedData::HalfBf16(v.to_vec()),
        };
        let data = owned(self.packed(layout, precision, rows, k)?);
        Ok(match (precision, self.dtype(), data) {
            (CpuPrecision::F32, DType::F16, PackedData::F32(v)) => {
                PackedData::HalfF16(v.iter().map(|&x| f16::from_f32(x)).collect())
            }
            (CpuPrecision::F32, DType::BF16, PackedData::F32(v)) => {
                PackedData::HalfBf16(v.iter().map(|&x| bf16::from_f32(x)).collect())
            }
            (_, _, d) => d,
        })
    }

    /// This weight packed once in `layout` and `precision` (what `prepare_*_weight`
    /// return). For f32 products a half-precision weight stays in half precision.
    pub(crate) fn prepacked(
        &self,
        layout: PackLayout,
        precision: CpuPrecision,
    ) -> Result<CpuTensor> {
        let shape = self.shape().to_vec();
        let rows = shape.first().copied().unwrap_or(0);
        let k: usize = shape.iter().skip(1).product();
        let data = self.packed_keeping_half(layout, precision, rows, k)?;
        Ok(CpuTensor {
            data: CpuData::Packed(Arc::new(Packed {
                shape,
                layout,
                data,
            })),
        })
    }
}

impl CpuTensor {
    /// Drops the tensor without giving its buffer to the pool (a weight's unpacked copy,
    /// which no later operation will want).
    pub(crate) fn discard(mut self) {
        self.data = CpuData::F32(ArcArray::from_vec(Vec::new()).into_dyn());
    }
}

impl Drop for CpuTensor {
    /// A large f32 buffer no other tensor shares goes back to the pool for the next
    /// operation's output.
    fn drop(&mut self) {
        if let CpuData::F32(a) = &mut self.data
            && a.len() >= pool::MIN_LEN
            && a.is_unique()
        {
            let a = std::mem::replace(a, ArcArray::from_vec(Vec::new()).into_dyn());
            let (v, _) = a.into_owned().into_raw_vec_and_offset();
            pool::give(v);
        }
    }
}

/// A new f32 tensor of `shape` in a pooled buffer, every value of which `fill` writes
/// through a standard-layout view.
pub(crate) fn pooled_with(
    shape: &[usize],
    op: &'static str,
    fill: impl FnOnce(ndarray::ArrayViewMutD<'_, f32>),
) -> Result<CpuTensor> {
    let mut out = pool::take(shape.iter().product());
    let dst = ndarray::ArrayViewMut::from_shape(IxDyn(shape), &mut out[..]).map_err(|e| {
        Error::Shape {
            op,
            expected: format!("{shape:?}"),
            found: e.to_string(),
        }
    })?;
    fill(dst);
    CpuTensor::from_vec(shape, out)
}

/// A new f32 tensor holding `view`'s values in standard layout, in a pooled buffer.
pub(crate) fn pooled(view: ndarray::ArrayViewD<'_, f32>, op: &'static str) -> Result<CpuTensor> {
    pooled_with(view.shape(), op, |mut dst| dst.assign(&view))
}

/// A contiguous slice of a standard-layout array (always true of CPU tensors).
pub(crate) fn contiguous<'a>(
    array: &'a ArcArray<f32, IxDyn>,
    op: &'static str,
) -> Result<&'a [f32]> {
    array
        .as_slice()
        .ok_or_else(|| Error::Unsupported(format!("{op}: non-contiguous CPU tensor")))
}

impl BackendBase for CpuBackend {
    type Tensor = CpuTensor;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn shape<'a>(&self, tensor: &'a CpuTensor) -> &'a [usize] {
        tensor.shape()
    }

    fn dtype(&self, tensor: &CpuTensor) -> DType {
        tensor.dtype()
    }
}

/// The number of threads of rayon's pool.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads()
}

/// Runs `f(i, chunk)` over the `chunk`-sized pieces of `data` on rayon's pool.
pub(crate) fn par_chunks_mut<F>(data: &mut [f32], chunk: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    use rayon::prelude::*;
    if chunk == 0 {
        return;
    }
    data.par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(i, c)| f(i, c));
}

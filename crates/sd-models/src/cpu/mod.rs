//! The CPU backend: ndarray arrays, rayon threads and the `gemm` crate's AVX-512 kernels.
//!
//! The reference backend: every operation of [`crate::backend`] in f32 (half-precision
//! tensors are widened when an operation reads them). Tensors are always contiguous, row-major
//! and shared by reference count, so cloning one is cheap. Reductions (norms, softmax, the
//! GEMM's sums) run in an order that does not depend on the number of threads, so results are
//! the same on every machine size.

use half::{bf16, f16};
use ndarray::{ArcArray, ArrayD, IxDyn};

use crate::backend::{BackendBase, DType};
use crate::error::{Error, Result};

mod activation;
mod attention;
mod conv;
mod data;
mod elementwise;
mod gemm;
mod matmul;
mod norm;
mod resample;

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
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend {
    _private: (),
}

impl CpuBackend {
    /// The CPU backend.
    pub fn new() -> Self {
        CpuBackend { _private: () }
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
        }
    }

    pub(crate) fn dtype(&self) -> DType {
        match &self.data {
            CpuData::F32(_) => DType::F32,
            CpuData::F16(_) => DType::F16,
            CpuData::BF16(_) => DType::BF16,
        }
    }

    /// The values as a contiguous f32 array (shared for f32 tensors, widened for half).
    pub(crate) fn to_f32_array(&self) -> ArcArray<f32, IxDyn> {
        match &self.data {
            CpuData::F32(a) => a.clone(),
            CpuData::F16(a) => a.mapv(f16::to_f32).into_shared(),
            CpuData::BF16(a) => a.mapv(bf16::to_f32).into_shared(),
        }
    }
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

//! Activations and the softmax for the CUDA backend (kernels in `kernels/elementwise.cu` for
//! the scalar maps, `kernels/activation.cu` for softmax and GEGLU). Mirrors sd-models'
//! `cpu/activation.rs`.

use cudarc::driver::LaunchConfig;
use sd_models::backend::{ActivationOps, GeluApproximation};
use sd_models::{Error, Result};

use crate::data::u32_arg;
use crate::device::{CudaBackend, float, launch};
use crate::elementwise::UnaryOp;
use crate::kernels::{Kernel, geometry};
use crate::tensor::CudaTensor;

/// Rows per block of the one-warp-per-row kernels (softmax, layer norm).
pub(crate) const ROWS_PER_BLOCK: usize = geometry::THREADS as usize / 32;

/// A launch of one warp per row.
pub(crate) fn warp_per_row(rows: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (u32_arg(rows.div_ceil(ROWS_PER_BLOCK))?, 1, 1),
        block_dim: (geometry::THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

impl ActivationOps for CudaBackend {
    fn silu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.unary(x, UnaryOp::Silu, 1.0, 0.0)
    }

    fn gelu(&self, x: &CudaTensor, approximation: GeluApproximation) -> Result<CudaTensor> {
        match approximation {
            GeluApproximation::None => self.unary(x, UnaryOp::Gelu, 1.0, 0.0),
            GeluApproximation::Tanh => self.unary(x, UnaryOp::GeluTanh, 1.0, 0.0),
        }
    }

    fn quick_gelu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.unary(x, UnaryOp::QuickGelu, 1.0, 0.0)
    }

    fn softmax_last(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let t = float(x.dtype)?;
        let cols = x.shape().last().copied().unwrap_or(1);
        let out = self.alloc(x.shape(), x.dtype)?;
        if out.is_empty() {
            return Ok(out);
        }
        let rows = x.len() / cols;
        let (o, i, r, c) = (out.ptr(), x.ptr(), u32_arg(rows)?, u32_arg(cols)?);
        // softmax_last_{t}(T* out, const T* x, u32 rows, u32 cols)
        launch!(
            self,
            Kernel::SoftmaxLast(t),
            warp_per_row(rows)?,
            o,
            i,
            r,
            c
        )?;
        Ok(out)
    }

    fn geglu(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let shape = x.shape().to_vec();
        let c2 = shape.last().copied().unwrap_or(0);
        if shape.is_empty() || c2 % 2 != 0 {
            return Err(Error::Shape {
                op: "geglu",
                expected: "[..., 2C]".into(),
                found: format!("{shape:?}"),
            });
        }
        let t = float(x.dtype)?;
        let mut out_shape = shape.clone();
        let last = out_shape.len() - 1;
        out_shape[last] = c2 / 2;
        let out = self.alloc(&out_shape, x.dtype)?;
        let n = out.len();
        if n == 0 {
            return Ok(out);
        }
        let rows = n / (c2 / 2);
        let (o, i, r, h) = (out.ptr(), x.ptr(), u32_arg(rows)?, u32_arg(c2 / 2)?);
        // geglu_{t}(T* out, const T* x, u32 rows, u32 half_cols)
        launch!(self, Kernel::Geglu(t), self.cfg_1d(n), o, i, r, h)?;
        Ok(out)
    }
}

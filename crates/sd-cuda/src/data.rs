//! Data movement for the CUDA backend: uploads, downloads, casts, permutes, slices and
//! concatenations (kernels in `kernels/data.cu`). Mirrors sd-models' `cpu/data.rs`, whose
//! shape rules and errors it repeats.

use cudarc::driver::DeviceRepr;
use half::{bf16, f16};
use sd_models::backend::{DType, DataOps, HalfData};
use sd_models::{Error, Result};

use crate::device::{CudaBackend, checked_len, float, launch, len_u32};
use crate::kernels::{Bits, Float, Kernel};
use crate::tensor::CudaTensor;

/// The most axes a permute takes (`MAX_DIMS` in common.cuh).
pub(crate) const MAX_DIMS: usize = 8;

/// `PermuteParams` of data.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PermuteParams {
    pub(crate) rank: u32,
    pub(crate) out_shape: [u32; MAX_DIMS],
    pub(crate) in_stride: [u32; MAX_DIMS],
}

// SAFETY: plain `#[repr(C)]` u32 fields, the layout of the CUDA struct (checked by the
// kernel-compilation test).
unsafe impl DeviceRepr for PermuteParams {}

fn check_len(op: &'static str, shape: &[usize], len: usize) -> Result<()> {
    let expected: usize = shape.iter().product();
    if expected == len {
        Ok(())
    } else {
        Err(Error::Shape {
            op,
            expected: format!("{expected} values for shape {shape:?}"),
            found: format!("{len} values"),
        })
    }
}

/// Row-major strides.
pub(crate) fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn bits(dtype: DType) -> Result<Bits> {
    Ok(float(dtype)?.bits())
}

/// A u32 kernel argument for a size the tensor limits bound (fails loudly otherwise).
pub(crate) fn u32_arg(v: usize) -> Result<u32> {
    Ok(len_u32(v)?)
}

impl CudaBackend {
    /// `dst[r * dst_stride + dst_off + c] = src[r * src_stride + src_off + c]` for
    /// `r < rows`, `c < width` (elements): `copy2d_{bits}(T* dst, const T* src, u32 rows,
    /// u32 width, u32 src_stride, u32 src_off, u32 dst_stride, u32 dst_off)`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn copy2d(
        &self,
        dst: &CudaTensor,
        src: &CudaTensor,
        rows: usize,
        width: usize,
        src_stride: usize,
        src_off: usize,
        dst_stride: usize,
        dst_off: usize,
    ) -> Result<()> {
        let n = rows * width;
        if n == 0 {
            return Ok(());
        }
        let (d, s) = (dst.ptr(), src.ptr());
        let (rows, width) = (u32_arg(rows)?, u32_arg(width)?);
        let (src_stride, src_off) = (u32_arg(src_stride)?, u32_arg(src_off)?);
        let (dst_stride, dst_off) = (u32_arg(dst_stride)?, u32_arg(dst_off)?);
        launch!(
            self,
            Kernel::Copy2d(bits(src.dtype)?),
            self.cfg_1d(n),
            d,
            s,
            rows,
            width,
            src_stride,
            src_off,
            dst_stride,
            dst_off
        )?;
        Ok(())
    }
}

impl DataOps for CudaBackend {
    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<CudaTensor> {
        check_len("from_f32", shape, data.len())?;
        checked_len(shape)?;
        let dtype = self.upload_dtype();
        let t = self.alloc(shape, dtype)?;
        match float(dtype)? {
            Float::F32 => self.upload_raw(&t, data)?,
            Float::F16 => {
                let h: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
                self.upload_raw(&t, &h)?;
            }
            Float::BF16 => {
                let h: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
                self.upload_raw(&t, &h)?;
            }
        }
        Ok(t)
    }

    fn upload_half(&self, data: HalfData<'_>, shape: &[usize]) -> Result<CudaTensor> {
        checked_len(shape)?;
        match data {
            HalfData::F16(d) => {
                check_len("from_half", shape, d.len())?;
                let t = self.alloc(shape, DType::F16)?;
                self.upload_raw(&t, d)?;
                Ok(t)
            }
            HalfData::BF16(d) => {
                check_len("from_half", shape, d.len())?;
                let t = self.alloc(shape, DType::BF16)?;
                self.upload_raw(&t, d)?;
                Ok(t)
            }
            _ => Err(Error::Unsupported(
                "upload_half: an unknown half type".into(),
            )),
        }
    }

    fn download(&self, tensor: &CudaTensor) -> Result<Vec<f32>> {
        let n = tensor.len();
        match float(tensor.dtype)? {
            Float::F32 => {
                let mut out = vec![0.0_f32; n];
                self.download_raw(tensor, &mut out)?;
                Ok(out)
            }
            Float::F16 => {
                let mut h = vec![f16::ZERO; n];
                self.download_raw(tensor, &mut h)?;
                Ok(h.iter().map(|v| v.to_f32()).collect())
            }
            Float::BF16 => {
                let mut h = vec![bf16::ZERO; n];
                self.download_raw(tensor, &mut h)?;
                Ok(h.iter().map(|v| v.to_f32()).collect())
            }
        }
    }

    fn reshape(&self, tensor: &CudaTensor, shape: &[usize]) -> Result<CudaTensor> {
        let from = tensor.shape();
        if from.iter().product::<usize>() != shape.iter().product::<usize>() {
            return Err(Error::Shape {
                op: "reshape",
                expected: format!("{} values for {shape:?}", shape.iter().product::<usize>()),
                found: format!("{from:?}"),
            });
        }
        Ok(tensor.with_shape(shape))
    }

    fn permute(&self, tensor: &CudaTensor, axes: &[usize]) -> Result<CudaTensor> {
        let shape = tensor.shape().to_vec();
        let mut seen = vec![false; shape.len()];
        let valid = axes.len() == shape.len()
            && axes
                .iter()
                .all(|&a| a < seen.len() && !std::mem::replace(&mut seen[a], true));
        if !valid {
            return Err(Error::Shape {
                op: "permute",
                expected: format!("a permutation of 0..{}", shape.len()),
                found: format!("{axes:?}"),
            });
        }
        let out_shape: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
        // Axes of size 1 can be reordered freely: when the others keep their order, the data
        // does not move.
        let moved: Vec<usize> = axes.iter().copied().filter(|&a| shape[a] != 1).collect();
        if moved.windows(2).all(|w| w[0] < w[1]) {
            return Ok(tensor.with_shape(&out_shape));
        }
        if shape.len() > MAX_DIMS {
            return Err(Error::Unsupported(format!(
                "permute of {} axes (at most {MAX_DIMS})",
                shape.len()
            )));
        }
        let st = strides(&shape);
        let mut p = PermuteParams {
            rank: u32_arg(shape.len())?,
            ..PermuteParams::default()
        };
        for (i, &a) in axes.iter().enumerate() {
            p.out_shape[i] = u32_arg(shape[a])?;
            p.in_stride[i] = u32_arg(st[a])?;
        }
        let out = self.alloc(&out_shape, tensor.dtype)?;
        let n = tensor.len();
        let (o, x, n32) = (out.ptr(), tensor.ptr(), u32_arg(n)?);
        // permute_{bits}(T* out, const T* in, PermuteParams p, u32 n)
        launch!(
            self,
            Kernel::Permute(bits(tensor.dtype)?),
            self.cfg_1d(n),
            o,
            x,
            p,
            n32
        )?;
        Ok(out)
    }

    fn slice(
        &self,
        tensor: &CudaTensor,
        axis: usize,
        start: usize,
        len: usize,
    ) -> Result<CudaTensor> {
        let shape = tensor.shape().to_vec();
        if axis >= shape.len() || start.checked_add(len).is_none_or(|end| end > shape[axis]) {
            return Err(Error::Shape {
                op: "slice",
                expected: format!("axis < {} and {start}+{len} <= its size", shape.len()),
                found: format!("axis {axis} of {shape:?}"),
            });
        }
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        let mut out_shape = shape.clone();
        out_shape[axis] = len;
        let out = self.alloc(&out_shape, tensor.dtype)?;
        self.copy2d(
            &out,
            tensor,
            outer,
            len * inner,
            shape[axis] * inner,
            start * inner,
            len * inner,
            0,
        )?;
        Ok(out)
    }

    fn concat(&self, tensors: &[&CudaTensor], axis: usize) -> Result<CudaTensor> {
        let Some(first) = tensors.first() else {
            return Err(Error::Shape {
                op: "concat",
                expected: "at least one tensor".into(),
                found: "none".into(),
            });
        };
        let rank = first.shape().len();
        let compatible = axis < rank
            && tensors.iter().all(|t| {
                let s = t.shape();
                s.len() == rank && (0..rank).all(|i| i == axis || s[i] == first.shape()[i])
            });
        if !compatible {
            return Err(Error::Shape {
                op: "concat",
                expected: format!("tensors equal but along axis {axis}"),
                found: format!(
                    "{:?}",
                    tensors
                        .iter()
                        .map(|t| t.shape().to_vec())
                        .collect::<Vec<_>>()
                ),
            });
        }
        let dtype = tensors
            .iter()
            .skip(1)
            .fold(first.dtype, |d, t| crate::device::promote(d, t.dtype));
        let total: usize = tensors.iter().map(|t| t.shape()[axis]).sum();
        let mut out_shape = first.shape().to_vec();
        out_shape[axis] = total;
        let out = self.alloc(&out_shape, dtype)?;
        let outer: usize = out_shape[..axis].iter().product();
        let inner: usize = out_shape[axis + 1..].iter().product();
        let mut offset = 0;
        for t in tensors {
            let t = self.to_dtype(t, dtype)?;
            let len = t.shape()[axis];
            self.copy2d(
                &out,
                &t,
                outer,
                len * inner,
                len * inner,
                0,
                total * inner,
                offset * inner,
            )?;
            offset += len;
        }
        Ok(out)
    }

    fn cast(&self, tensor: &CudaTensor, dtype: DType) -> Result<CudaTensor> {
        Ok(self.to_dtype(tensor, dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_major_strides() {
        assert_eq!(strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(strides(&[5]), vec![1]);
        assert!(strides(&[]).is_empty());
    }

    #[test]
    fn params_layout() {
        assert_eq!(std::mem::size_of::<PermuteParams>(), 4 * (1 + 2 * MAX_DIMS));
    }
}

//! Element-wise arithmetic for the CUDA backend, with numpy broadcasting (kernels in
//! `kernels/elementwise.cu`). Mirrors sd-models' `cpu/elementwise.rs`.
//!
//! Broadcast operands are described to the kernel by strides (0 along a broadcast axis) over
//! the output's axes, after dropping axes of size 1 and merging axes that are contiguous in
//! both operands: `[2, 3, 4] + [4]` becomes a two-axis loop, equal shapes a one-axis one.

use cudarc::driver::DeviceRepr;
use sd_models::backend::ElementwiseOps;
use sd_models::{Error, Result};

use crate::data::{MAX_DIMS, strides, u32_arg};
use crate::device::{CudaBackend, float, launch, promote};
use crate::kernels::Kernel;
use crate::tensor::CudaTensor;

/// `BroadcastParams` of elementwise.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BroadcastParams {
    pub(crate) rank: u32,
    pub(crate) shape: [u32; MAX_DIMS],
    pub(crate) stride_a: [u32; MAX_DIMS],
    pub(crate) stride_b: [u32; MAX_DIMS],
}

// SAFETY: plain `#[repr(C)]` u32 fields, the layout of the CUDA struct (checked by the
// kernel-compilation test).
unsafe impl DeviceRepr for BroadcastParams {}

/// The operation codes of elementwise.cu (`OP_*`, `UNARY_*`).
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub(crate) enum BinaryOp {
    Add = 0,
    Sub = 1,
    Mul = 2,
}

#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub(crate) enum UnaryOp {
    Affine = 0,
    Silu = 1,
    Gelu = 2,
    GeluTanh = 3,
    QuickGelu = 4,
}

/// The broadcast shape of two shapes (numpy rules), if any.
pub(crate) fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let da = if i + a.len() >= rank {
                a[i + a.len() - rank]
            } else {
                1
            };
            let db = if i + b.len() >= rank {
                b[i + b.len() - rank]
            } else {
                1
            };
            match (da, db) {
                (x, y) if x == y => Some(x),
                (1, y) => Some(y),
                (x, 1) => Some(x),
                _ => None,
            }
        })
        .collect()
}

/// The strides (in elements) of `s` read as a tensor of the broadcast shape of rank
/// `rank`: 0 along axes where `s` has size 1 or no axis.
pub(crate) fn broadcast_strides(s: &[usize], rank: usize) -> Vec<usize> {
    let padded: Vec<usize> = std::iter::repeat_n(1, rank - s.len())
        .chain(s.iter().copied())
        .collect();
    let st = strides(&padded);
    padded
        .iter()
        .zip(st)
        .map(|(&d, st)| if d == 1 { 0 } else { st })
        .collect()
}

/// One axis of a broadcast loop: (size, stride in a, stride in b), in elements.
pub(crate) type LoopAxis = (usize, usize, usize);

/// The loop the kernel runs for `a (op) b`: the output shape, then (size, stride in a,
/// stride in b) per axis, outermost first, with size-1 axes dropped and contiguous runs
/// merged (at least one axis).
pub(crate) fn broadcast_plan(a: &[usize], b: &[usize]) -> Option<(Vec<usize>, Vec<LoopAxis>)> {
    let shape = broadcast_shape(a, b)?;
    let rank = shape.len();
    let (sa, sb) = (broadcast_strides(a, rank), broadcast_strides(b, rank));
    let mut dims: Vec<LoopAxis> = Vec::new();
    for d in 0..rank {
        if shape[d] == 1 {
            continue;
        }
        let cur = (shape[d], sa[d], sb[d]);
        match dims.last_mut() {
            Some(prev) if prev.1 == cur.1 * cur.0 && prev.2 == cur.2 * cur.0 => {
                *prev = (prev.0 * cur.0, cur.1, cur.2);
            }
            _ => dims.push(cur),
        }
    }
    if dims.is_empty() {
        dims.push((1, 0, 0));
    }
    Some((shape, dims))
}

impl CudaBackend {
    fn binary(
        &self,
        op: &'static str,
        code: BinaryOp,
        a: &CudaTensor,
        b: &CudaTensor,
    ) -> Result<CudaTensor> {
        let Some((shape, dims)) = broadcast_plan(a.shape(), b.shape()) else {
            return Err(Error::Shape {
                op,
                expected: format!("a shape that broadcasts with {:?}", a.shape()),
                found: format!("{:?}", b.shape()),
            });
        };
        if dims.len() > MAX_DIMS {
            return Err(Error::Unsupported(format!(
                "{op}: more than {MAX_DIMS} broadcast axes"
            )));
        }
        let (ta, tb) = (float(a.dtype)?, float(b.dtype)?);
        let out = self.alloc(&shape, promote(a.dtype, b.dtype))?;
        let n = out.len();
        if n == 0 {
            return Ok(out);
        }
        let mut p = BroadcastParams {
            rank: u32_arg(dims.len())?,
            ..BroadcastParams::default()
        };
        for (i, &(size, s_a, s_b)) in dims.iter().enumerate() {
            p.shape[i] = u32_arg(size)?;
            p.stride_a[i] = u32_arg(s_a)?;
            p.stride_b[i] = u32_arg(s_b)?;
        }
        let (o, x, y, n32, code) = (out.ptr(), a.ptr(), b.ptr(), u32_arg(n)?, code as u32);
        // binary_{a}_{b}(TO* out, const TA* a, const TB* b, BroadcastParams p, u32 n, u32 op)
        launch!(
            self,
            Kernel::Binary { a: ta, b: tb },
            self.cfg_1d(n),
            o,
            x,
            y,
            p,
            n32,
            code
        )?;
        Ok(out)
    }

    /// `f(x)` element-wise, same dtype: `unary_{t}(T* out, const T* x, u32 n, u32 op,
    /// float scale, float shift)`.
    pub(crate) fn unary(
        &self,
        x: &CudaTensor,
        op: UnaryOp,
        scale: f32,
        shift: f32,
    ) -> Result<CudaTensor> {
        let t = float(x.dtype)?;
        let out = self.alloc(x.shape(), x.dtype)?;
        let n = x.len();
        if n == 0 {
            return Ok(out);
        }
        let (o, i, n32, code) = (out.ptr(), x.ptr(), u32_arg(n)?, op as u32);
        launch!(
            self,
            Kernel::Unary(t),
            self.cfg_1d(n),
            o,
            i,
            n32,
            code,
            scale,
            shift
        )?;
        Ok(out)
    }

    /// `y[r, c] += bias[c]` in place on a freshly made `y` of `rows x cols`, both of `y`'s
    /// dtype: `bias_rows_{t}(T* y, const T* bias, u32 rows, u32 cols)`.
    pub(crate) fn add_bias_rows(
        &self,
        y: &CudaTensor,
        bias: &CudaTensor,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let n = rows * cols;
        if n == 0 {
            return Ok(());
        }
        let t = float(y.dtype)?;
        let bias = self.to_dtype(bias, y.dtype)?;
        let (yp, bp, r, c) = (y.ptr(), bias.ptr(), u32_arg(rows)?, u32_arg(cols)?);
        launch!(self, Kernel::BiasRows(t), self.cfg_1d(n), yp, bp, r, c)?;
        Ok(())
    }
}

impl ElementwiseOps for CudaBackend {
    fn add(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.binary("add", BinaryOp::Add, a, b)
    }

    fn sub(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.binary("sub", BinaryOp::Sub, a, b)
    }

    fn mul(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        self.binary("mul", BinaryOp::Mul, a, b)
    }

    fn affine(&self, x: &CudaTensor, scale: f32, shift: f32) -> Result<CudaTensor> {
        self.unary(x, UnaryOp::Affine, scale, shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        // Equal shapes: one axis.
        let (s, d) = broadcast_plan(&[2, 3, 4], &[2, 3, 4]).unwrap();
        assert_eq!(s, vec![2, 3, 4]);
        assert_eq!(d, vec![(24, 1, 1)]);
        // A row vector: rows (stride 0 in b) then columns.
        let (_, d) = broadcast_plan(&[2, 3, 4], &[4]).unwrap();
        assert_eq!(d, vec![(6, 4, 0), (4, 1, 1)]);
        // Both broadcast.
        let (s, d) = broadcast_plan(&[2, 1, 4], &[3, 1]).unwrap();
        assert_eq!(s, vec![2, 3, 4]);
        assert_eq!(d, vec![(2, 4, 0), (3, 0, 1), (4, 1, 0)]);
        // Per-channel: [1, 5, 1, 1] against [2, 5, 3, 3].
        let (s, d) = broadcast_plan(&[1, 5, 1, 1], &[2, 5, 3, 3]).unwrap();
        assert_eq!(s, vec![2, 5, 3, 3]);
        assert_eq!(d, vec![(2, 0, 45), (5, 1, 9), (9, 0, 1)]);
        // Scalars.
        let (s, d) = broadcast_plan(&[], &[1, 1]).unwrap();
        assert_eq!(s, vec![1, 1]);
        assert_eq!(d, vec![(1, 0, 0)]);
        assert!(broadcast_plan(&[2, 3], &[4, 5]).is_none());
    }

    /// The plan reproduces numpy's indexing on every output element.
    #[test]
    fn plans_index_like_numpy() {
        let cases: [(&[usize], &[usize]); 5] = [
            (&[2, 3, 4], &[4]),
            (&[2, 1, 4], &[3, 1]),
            (&[1, 5, 1, 1], &[2, 5, 3, 3]),
            (&[3, 1, 2, 1], &[1, 4, 1, 5]),
            (&[6], &[1]),
        ];
        for (a, b) in cases {
            let (shape, dims) = broadcast_plan(a, b).unwrap();
            let rank = shape.len();
            let (sa, sb) = (broadcast_strides(a, rank), broadcast_strides(b, rank));
            let n: usize = shape.iter().product();
            for i in 0..n {
                // numpy
                let (mut rem, mut ia, mut ib) = (i, 0, 0);
                for d in (0..rank).rev() {
                    let idx = rem % shape[d];
                    rem /= shape[d];
                    ia += idx * sa[d];
                    ib += idx * sb[d];
                }
                // the kernel's loop
                let (mut rem, mut ka, mut kb) = (i, 0, 0);
                for &(size, s_a, s_b) in dims.iter().rev() {
                    let idx = rem % size;
                    rem /= size;
                    ka += idx * s_a;
                    kb += idx * s_b;
                }
                assert_eq!((ia, ib), (ka, kb), "{a:?} {b:?} element {i}");
            }
        }
    }
}

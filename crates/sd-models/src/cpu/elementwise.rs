//! Element-wise arithmetic for the CPU backend, with numpy broadcasting.

use ndarray::{ArcArray, IxDyn};

use super::{CpuBackend, CpuTensor, contiguous};
use crate::backend::ElementwiseOps;
use crate::error::{Error, Result};

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

fn binary(
    op: &'static str,
    a: &CpuTensor,
    b: &CpuTensor,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<CpuTensor> {
    let (x, y) = (a.to_f32_array(), b.to_f32_array());
    if x.shape() == y.shape() {
        let (xs, ys) = (contiguous(&x, op)?, contiguous(&y, op)?);
        let mut out = vec![0.0_f32; xs.len()];
        {
            use rayon::prelude::*;
            out.par_chunks_mut(1 << 14)
                .zip(xs.par_chunks(1 << 14).zip(ys.par_chunks(1 << 14)))
                .for_each(|(o, (xc, yc))| {
                    for ((o, &p), &q) in o.iter_mut().zip(xc).zip(yc) {
                        *o = f(p, q);
                    }
                });
        }
        return CpuTensor::from_vec(x.shape(), out);
    }
    let shape = broadcast_shape(x.shape(), y.shape()).ok_or_else(|| Error::Shape {
        op,
        expected: format!("a shape that broadcasts with {:?}", x.shape()),
        found: format!("{:?}", y.shape()),
    })?;
    let bx: ArcArray<f32, IxDyn> = broadcast(&x, &shape, op)?;
    let by: ArcArray<f32, IxDyn> = broadcast(&y, &shape, op)?;
    let mut out = ndarray::ArrayD::<f32>::zeros(IxDyn(&shape));
    ndarray::Zip::from(&mut out)
        .and(&bx)
        .and(&by)
        .for_each(|o, &p, &q| *o = f(p, q));
    Ok(CpuTensor::from_array(out))
}

fn broadcast(
    x: &ArcArray<f32, IxDyn>,
    shape: &[usize],
    op: &'static str,
) -> Result<ArcArray<f32, IxDyn>> {
    x.broadcast(IxDyn(shape))
        .map(|v| v.to_owned().into_shared())
        .ok_or_else(|| Error::Shape {
            op,
            expected: format!("broadcastable to {shape:?}"),
            found: format!("{:?}", x.shape()),
        })
}

impl ElementwiseOps for CpuBackend {
    fn add(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        binary("add", a, b, |x, y| x + y)
    }

    fn sub(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        binary("sub", a, b, |x, y| x - y)
    }

    fn mul(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        binary("mul", a, b, |x, y| x * y)
    }

    fn affine(&self, x: &CpuTensor, scale: f32, shift: f32) -> Result<CpuTensor> {
        super::activation::map(x, "affine", self.isa(), move |v| v * scale + shift)
    }
}

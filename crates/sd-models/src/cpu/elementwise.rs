//! Element-wise arithmetic for the CPU backend, with numpy broadcasting.

use ndarray::IxDyn;

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
        let mut out = super::pool::take(xs.len());
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
    // A per-plane value (`[N, C, 1, 1]` against `[N, C, H, W]`, as a resnet adds its time
    // embedding): one scalar per contiguous run, in parallel.
    if x.shape() == shape.as_slice()
        && let Some(inner) = trailing_ones(y.shape(), &shape)
    {
        let (xs, ys) = (contiguous(&x, op)?, contiguous(&y, op)?);
        let mut out = super::pool::take(xs.len());
        if inner > 0 {
            super::par_chunks_mut(&mut out, inner, |i, o| {
                let (src, v) = (&xs[i * inner..(i + 1) * inner], ys[i]);
                for (o, &p) in o.iter_mut().zip(src) {
                    *o = f(p, v);
                }
            });
        }
        return CpuTensor::from_vec(&shape, out);
    }
    let bx = x
        .broadcast(IxDyn(&shape))
        .ok_or_else(|| not_broadcastable(op, &shape, x.shape()))?;
    let by = y
        .broadcast(IxDyn(&shape))
        .ok_or_else(|| not_broadcastable(op, &shape, y.shape()))?;
    super::pooled_with(&shape, op, |dst| {
        ndarray::Zip::from(dst)
            .and(&bx)
            .and(&by)
            .for_each(|o, &p, &q| *o = f(p, q));
    })
}

/// If `small` equals `full` on its leading axes and is 1 on the rest (padded on the left
/// with the rank of `full`), the number of values each of its entries covers.
fn trailing_ones(small: &[usize], full: &[usize]) -> Option<usize> {
    if small.len() != full.len() {
        return None;
    }
    let lead = small.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
    (small[..lead] == full[..lead] && lead < full.len()).then(|| full[lead..].iter().product())
}

fn not_broadcastable(op: &'static str, shape: &[usize], found: &[usize]) -> Error {
    Error::Shape {
        op,
        expected: format!("broadcastable to {shape:?}"),
        found: format!("{found:?}"),
    }
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

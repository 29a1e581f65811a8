//! Group and layer normalisation for the CPU backend. Statistics take two passes (the mean,
//! then the mean squared deviation from it), summed in f32 over blocks of [`BLOCK`] values
//! (vectorised) and the block sums in f64, one row or group at a time, in an order that does
//! not depend on the thread count.

use super::math::{dispatch, silu};
use super::{CpuBackend, CpuIsa, CpuTensor, contiguous, par_chunks_mut};
use crate::backend::NormOps;
use crate::error::{Error, Result};

/// Values summed in f32 before the sum joins the f64 total.
const BLOCK: usize = 256;

/// The sum of `f` over `x`: in f32 within blocks of [`BLOCK`] values (sixteen lanes), the
/// block sums in f64, in a fixed order.
#[inline(always)]
pub(crate) fn sum_blocks(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    x.chunks(BLOCK)
        .map(|c| {
            // Sixteen partial sums, so that the loop vectorises.
            let mut acc = [0.0_f32; 16];
            let mut it = c.chunks_exact(16);
            for v in &mut it {
                for (a, &x) in acc.iter_mut().zip(v) {
                    *a += f(x);
                }
            }
            let tail: f32 = it.remainder().iter().map(|&x| f(x)).sum();
            f64::from(acc.iter().sum::<f32>() + tail)
        })
        .sum()
}

/// The mean and the (biased) variance of `x`, in two passes of [`sum_blocks`].
pub(crate) fn mean_var(isa: CpuIsa, x: &[f32]) -> (f32, f32) {
    let n = x.len().max(1) as f64;
    let mean = (dispatch!(isa, sum_blocks(x, |v| v)) / n) as f32;
    let var = dispatch!(isa, sum_blocks(x, |v| (v - mean) * (v - mean))) / n;
    (mean, var as f32)
}

fn params(
    op: &'static str,
    gamma: &CpuTensor,
    beta: &CpuTensor,
    c: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if gamma.shape() != [c] || beta.shape() != [c] {
        return Err(Error::Shape {
            op,
            expected: format!("gamma and beta [{c}]"),
            found: format!("{:?} and {:?}", gamma.shape(), beta.shape()),
        });
    }
    let (g, b) = (gamma.to_f32_array(), beta.to_f32_array());
    Ok((contiguous(&g, op)?.to_vec(), contiguous(&b, op)?.to_vec()))
}

#[allow(clippy::too_many_arguments)]
fn group_norm_impl(
    isa: CpuIsa,
    x: &CpuTensor,
    groups: usize,
    gamma: &CpuTensor,
    beta: &CpuTensor,
    eps: f32,
    fuse_silu: bool,
) -> Result<CpuTensor> {
    let shape = x.shape().to_vec();
    if shape.len() < 2 || groups == 0 || !shape[1].is_multiple_of(groups) {
        return Err(Error::Shape {
            op: "group_norm",
            expected: format!("[N, C, ...] with C a multiple of {groups}"),
            found: format!("{shape:?}"),
        });
    }
    let c = shape[1];
    let (g, b) = params("group_norm", gamma, beta, c)?;
    let spatial: usize = shape[2..].iter().product();
    let per_group = c / groups * spatial;
    let a = x.to_f32_array();
    let input = contiguous(&a, "group_norm")?;
    // Written whole below: the statistics and the output both read the input, so nothing
    // is copied first.
    let mut out = super::pool::take(input.len());
    par_chunks_mut(&mut out, per_group, |i, chunk| {
        let src = &input[i * per_group..i * per_group + chunk.len()];
        let (mean, var) = mean_var(isa, src);
        let inv = 1.0 / (var + eps).sqrt();
        let first_channel = (i % groups) * (c / groups);
        let planes = chunk
            .chunks_mut(spatial.max(1))
            .zip(src.chunks(spatial.max(1)));
        for (j, (plane, from)) in planes.enumerate() {
            let ch = first_channel + j;
            let (scale, shift) = (g[ch] * inv, b[ch] - mean * inv * g[ch]);
            dispatch!(isa, {
                if fuse_silu {
                    for (v, &x) in plane.iter_mut().zip(from) {
                        *v = silu(x * scale + shift);
                    }
                } else {
                    for (v, &x) in plane.iter_mut().zip(from) {
                        *v = x * scale + shift;
                    }
                }
            });
        }
    });
    CpuTensor::from_vec(&shape, out)
}

impl NormOps for CpuBackend {
    fn group_norm(
        &self,
        x: &CpuTensor,
        groups: usize,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        group_norm_impl(self.isa(), x, groups, gamma, beta, eps, false)
    }

    fn group_norm_silu(
        &self,
        x: &CpuTensor,
        groups: usize,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        group_norm_impl(self.isa(), x, groups, gamma, beta, eps, true)
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        let shape = x.shape().to_vec();
        let c = shape.last().copied().unwrap_or(0);
        let (g, b) = params("layer_norm", gamma, beta, c)?;
        let a = x.to_f32_array();
        let input = contiguous(&a, "layer_norm")?;
        // Written whole below, from the input: nothing is copied first.
        let mut out = super::pool::take(input.len());
        let isa = self.isa();
        par_chunks_mut(&mut out, c, |i, row| {
            let src = &input[i * c..(i + 1) * c];
            let (mean, var) = mean_var(isa, src);
            let inv = 1.0 / (var + eps).sqrt();
            dispatch!(isa, {
                for ((v, &x), (&gv, &bv)) in row.iter_mut().zip(src).zip(g.iter().zip(&b)) {
                    *v = (x - mean) * inv * gv + bv;
                }
            });
        });
        CpuTensor::from_vec(&shape, out)
    }
}

//! Group and layer normalisation for the CPU backend. Statistics accumulate in f64, one row or
//! group at a time, so the result does not depend on the thread count.

use super::math::silu;
use super::{CpuBackend, CpuTensor, contiguous, par_chunks_mut};
use crate::backend::NormOps;
use crate::error::{Error, Result};

fn mean_var(x: &[f32]) -> (f32, f32) {
    let n = x.len().max(1) as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean as f32, var as f32)
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

fn group_norm_impl(
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
    let mut out = contiguous(&a, "group_norm")?.to_vec();
    par_chunks_mut(&mut out, per_group, |i, chunk| {
        let (mean, var) = mean_var(chunk);
        let inv = 1.0 / (var + eps).sqrt();
        let first_channel = (i % groups) * (c / groups);
        for (j, plane) in chunk.chunks_mut(spatial.max(1)).enumerate() {
            let ch = first_channel + j;
            let (scale, shift) = (g[ch] * inv, b[ch] - mean * inv * g[ch]);
            for v in plane.iter_mut() {
                let y = *v * scale + shift;
                *v = if fuse_silu { silu(y) } else { y };
            }
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
        group_norm_impl(x, groups, gamma, beta, eps, false)
    }

    fn group_norm_silu(
        &self,
        x: &CpuTensor,
        groups: usize,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        group_norm_impl(x, groups, gamma, beta, eps, true)
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
        let mut out = contiguous(&a, "layer_norm")?.to_vec();
        par_chunks_mut(&mut out, c, |_, row| {
            let (mean, var) = mean_var(row);
            let inv = 1.0 / (var + eps).sqrt();
            for (v, (&gv, &bv)) in row.iter_mut().zip(g.iter().zip(&b)) {
                *v = (*v - mean) * inv * gv + bv;
            }
        });
        CpuTensor::from_vec(&shape, out)
    }
}

//! Activations and the softmax for the CPU backend.

use super::{CpuBackend, CpuTensor, contiguous, par_chunks_mut};
use crate::backend::{ActivationOps, GeluApproximation};
use crate::error::Result;

/// A new tensor of `f` applied to every element, in parallel.
pub(crate) fn map(
    x: &CpuTensor,
    op: &'static str,
    f: impl Fn(f32) -> f32 + Sync + Send,
) -> Result<CpuTensor> {
    let a = x.to_f32_array();
    let xs = contiguous(&a, op)?;
    let mut out = xs.to_vec();
    par_chunks_mut(&mut out, 1 << 14, |_, c| {
        for v in c.iter_mut() {
            *v = f(*v);
        }
    });
    CpuTensor::from_vec(a.shape(), out)
}

#[inline]
pub(crate) fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

#[inline]
pub(crate) fn gelu_exact(v: f32) -> f32 {
    0.5 * v * (1.0 + libm::erff(v * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline]
fn gelu_tanh(v: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2 / pi)
    0.5 * v * (1.0 + (K * (v + 0.044_715 * v * v * v)).tanh())
}

/// Softmax in place over consecutive rows of `row` values.
pub(crate) fn softmax_rows(data: &mut [f32], row: usize) {
    par_chunks_mut(data, row, |_, r| softmax_row(r));
}

pub(crate) fn softmax_row(r: &mut [f32]) {
    let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0_f32;
    for v in r.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in r.iter_mut() {
        *v *= inv;
    }
}

impl ActivationOps for CpuBackend {
    fn silu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        map(x, "silu", silu)
    }

    fn gelu(&self, x: &CpuTensor, approximation: GeluApproximation) -> Result<CpuTensor> {
        match approximation {
            GeluApproximation::None => map(x, "gelu", gelu_exact),
            GeluApproximation::Tanh => map(x, "gelu", gelu_tanh),
        }
    }

    fn quick_gelu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        map(x, "quick_gelu", |v| v / (1.0 + (-1.702 * v).exp()))
    }

    fn softmax_last(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let a = x.to_f32_array();
        let row = a.shape().last().copied().unwrap_or(1);
        let mut out = contiguous(&a, "softmax")?.to_vec();
        softmax_rows(&mut out, row);
        CpuTensor::from_vec(a.shape(), out)
    }
}

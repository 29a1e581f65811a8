//! Activations and the softmax for the CPU backend.

use super::math::{self, dispatch};
use super::{CpuBackend, CpuIsa, CpuTensor, contiguous, par_chunks_mut};
use crate::backend::{ActivationOps, GeluApproximation};
use crate::error::Result;

/// A new tensor of `f` applied to every element, in parallel, vectorised for `isa`.
pub(crate) fn map(
    x: &CpuTensor,
    op: &'static str,
    isa: CpuIsa,
    f: impl Fn(f32) -> f32 + Sync + Send + Copy,
) -> Result<CpuTensor> {
    let a = x.to_f32_array();
    let xs = contiguous(&a, op)?;
    let mut out = super::pool::take(xs.len());
    par_chunks_mut(&mut out, 1 << 14, |i, c| {
        let src = &xs[i << 14..(i << 14) + c.len()];
        dispatch!(isa, {
            for (v, &x) in c.iter_mut().zip(src) {
                *v = f(x);
            }
        })
    });
    CpuTensor::from_vec(a.shape(), out)
}

/// The exact (erf) GELU, with [`math::erf`] so that it vectorises.
#[inline(always)]
pub(crate) fn gelu_exact(v: f32) -> f32 {
    0.5 * v * (1.0 + math::erf(v * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline]
fn gelu_tanh(v: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2 / pi)
    0.5 * v * (1.0 + (K * (v + 0.044_715 * v * v * v)).tanh())
}

/// Softmax in place over consecutive rows of `row` values.
fn softmax_rows(isa: CpuIsa, data: &mut [f32], row: usize) {
    par_chunks_mut(data, row, |_, r| dispatch!(isa, softmax_row(r)));
}

#[inline(always)]
fn softmax_row(r: &mut [f32]) {
    let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0_f32;
    for v in r.iter_mut() {
        *v = math::exp(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in r.iter_mut() {
        *v *= inv;
    }
}

impl ActivationOps for CpuBackend {
    fn silu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        map(x, "silu", self.isa(), math::silu)
    }

    fn gelu(&self, x: &CpuTensor, approximation: GeluApproximation) -> Result<CpuTensor> {
        match approximation {
            GeluApproximation::None => map(x, "gelu", self.isa(), gelu_exact),
            GeluApproximation::Tanh => map(x, "gelu", self.isa(), gelu_tanh),
        }
    }

    fn quick_gelu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        map(x, "quick_gelu", self.isa(), |v| {
            v / (1.0 + math::exp(-1.702 * v))
        })
    }

    fn geglu(&self, x: &CpuTensor) -> Result<CpuTensor> {
        // One pass over each row: `h * gelu(g)` for the halves `h, g`.
        let shape = x.shape().to_vec();
        let c2 = shape.last().copied().unwrap_or(0);
        if shape.is_empty() || c2 % 2 != 0 {
            return Err(crate::error::Error::Shape {
                op: "geglu",
                expected: "[..., 2C]".into(),
                found: format!("{shape:?}"),
            });
        }
        let c = c2 / 2;
        let a = x.to_f32_array();
        let xs = contiguous(&a, "geglu")?;
        let mut out = super::pool::take(xs.len() / 2);
        let isa = self.isa();
        if let Some(rows) = (1_usize << 14).checked_div(c) {
            let rows_per_chunk = rows + 1;
            par_chunks_mut(&mut out, rows_per_chunk * c, |i, chunk| {
                let first = i * rows_per_chunk;
                for (r, o) in chunk.chunks_exact_mut(c).enumerate() {
                    let row = &xs[(first + r) * c2..(first + r + 1) * c2];
                    let (h, g) = row.split_at(c);
                    dispatch!(isa, {
                        for ((o, &hv), &gv) in o.iter_mut().zip(h).zip(g) {
                            *o = hv * gelu_exact(gv);
                        }
                    });
                }
            });
        }
        let mut out_shape = shape;
        if let Some(last) = out_shape.last_mut() {
            *last = c;
        }
        CpuTensor::from_vec(&out_shape, out)
    }

    fn softmax_last(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let a = x.to_f32_array();
        let row = a.shape().last().copied().unwrap_or(1);
        let mut out = super::pool::copy_of(contiguous(&a, "softmax")?);
        softmax_rows(self.isa(), &mut out, row);
        CpuTensor::from_vec(a.shape(), out)
    }
}

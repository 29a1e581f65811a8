//! Matrix products for the CPU backend, on the `gemm` crate.

use rayon::prelude::*;

use super::gemm::{Layout, sgemm, threads};
use super::{CpuBackend, CpuTensor, contiguous};
use crate::backend::MatmulOps;
use crate::error::{Error, Result};

/// Below this many multiply-adds per matrix, batches are spread over threads instead of
/// each product.
const SMALL_PRODUCT: usize = 1 << 18;

/// `out[batch] = a[batch] (m x k) * b[batch or shared] (k x n)`, batches in parallel when
/// each product is small.
#[allow(clippy::too_many_arguments)]
pub(crate) fn batched(
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    b_layout: Layout,
    b_shared: bool,
    out: &mut [f32],
) -> Result<()> {
    let b_stride = if b_shared { 0 } else { k * n };
    let run = |i: usize, c: &mut [f32], t: usize| {
        sgemm(
            m,
            n,
            k,
            &a[i * m * k..(i + 1) * m * k],
            Layout::RowMajor,
            &b[i * b_stride..i * b_stride + k * n],
            b_layout,
            c,
            false,
            t,
        )
    };
    if m * n * k < SMALL_PRODUCT && batch > 1 {
        out.par_chunks_mut(m * n)
            .enumerate()
            .try_for_each(|(i, c)| run(i, c, 1))
    } else {
        let t = threads();
        out.chunks_mut(m * n)
            .enumerate()
            .try_for_each(|(i, c)| run(i, c, t))
    }
}

impl MatmulOps for CpuBackend {
    fn matmul(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
        let ok = sa.len() >= 2
            && sb.len() >= 2
            && sa[sa.len() - 1] == sb[sb.len() - 2]
            && (sb.len() == 2 || sb[..sb.len() - 2] == sa[..sa.len() - 2]);
        if !ok {
            return Err(Error::Shape {
                op: "matmul",
                expected: "a [..., m, k] and b [..., k, n] (same batch) or [k, n]".into(),
                found: format!("a {sa:?}, b {sb:?}"),
            });
        }
        let (m, k, n) = (sa[sa.len() - 2], sa[sa.len() - 1], sb[sb.len() - 1]);
        let batch: usize = sa[..sa.len() - 2].iter().product();
        let (xa, xb) = (a.to_f32_array(), b.to_f32_array());
        let mut out = vec![0.0_f32; batch * m * n];
        batched(
            batch,
            m,
            n,
            k,
            contiguous(&xa, "matmul")?,
            contiguous(&xb, "matmul")?,
            Layout::RowMajor,
            sb.len() == 2,
            &mut out,
        )?;
        let mut shape = sa[..sa.len() - 2].to_vec();
        shape.extend([m, n]);
        CpuTensor::from_vec(&shape, out)
    }

    fn linear(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: Option<&CpuTensor>,
    ) -> Result<CpuTensor> {
        let (sx, sw) = (x.shape().to_vec(), weight.shape().to_vec());
        let ok = !sx.is_empty() && sw.len() == 2 && sx[sx.len() - 1] == sw[1];
        if !ok {
            return Err(Error::Shape {
                op: "linear",
                expected: format!("x [..., in] with weight [out, in]; weight is {sw:?}"),
                found: format!("x {sx:?}"),
            });
        }
        let (out_f, in_f) = (sw[0], sw[1]);
        if let Some(b) = bias
            && b.shape() != [out_f]
        {
            return Err(Error::Shape {
                op: "linear",
                expected: format!("bias [{out_f}]"),
                found: format!("{:?}", b.shape()),
            });
        }
        let rows: usize = sx[..sx.len() - 1].iter().product();
        let (xa, wa) = (x.to_f32_array(), weight.to_f32_array());
        let mut out = vec![0.0_f32; rows * out_f];
        if let Some(b) = bias {
            let ba = b.to_f32_array();
            let bs = contiguous(&ba, "linear")?;
            out.chunks_mut(out_f).for_each(|r| r.copy_from_slice(bs));
        }
        sgemm(
            rows,
            out_f,
            in_f,
            contiguous(&xa, "linear")?,
            Layout::RowMajor,
            contiguous(&wa, "linear")?,
            Layout::Transposed,
            &mut out,
            bias.is_some(),
            threads(),
        )?;
        let mut shape = sx[..sx.len() - 1].to_vec();
        shape.push(out_f);
        CpuTensor::from_vec(&shape, out)
    }
}

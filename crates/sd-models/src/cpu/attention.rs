//! Scaled dot-product attention for the CPU backend: one (batch, head) at a time on the
//! thread pool, scores for that head only (memory O(Lq x Lk) per thread, never the whole
//! batch's).

use rayon::prelude::*;

use super::activation::softmax_row;
use super::gemm::{Layout, sgemm};
use super::{CpuBackend, CpuTensor, contiguous};
use crate::backend::{AttentionMask, AttentionOps};
use crate::error::{Error, Result};

impl AttentionOps for CpuBackend {
    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        mask: AttentionMask<'_, CpuTensor>,
        scale: f32,
    ) -> Result<CpuTensor> {
        let (sq, sk, sv) = (q.shape().to_vec(), k.shape().to_vec(), v.shape().to_vec());
        let ok = sq.len() == 4
            && sk.len() == 4
            && sv.len() == 4
            && sq[..2] == sk[..2]
            && sk[..3] == sv[..3]
            && sq[3] == sk[3];
        if !ok {
            return Err(Error::Shape {
                op: "attention",
                expected: "q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv]".into(),
                found: format!("q {sq:?}, k {sk:?}, v {sv:?}"),
            });
        }
        let (b, h, lq, d) = (sq[0], sq[1], sq[2], sq[3]);
        let (lk, dv) = (sk[2], sv[3]);
        // An additive mask, broadcast to [B, H, Lq, Lk] once.
        let additive = match mask {
            AttentionMask::Additive(m) => {
                let a = m.to_f32_array();
                let full = a
                    .broadcast(ndarray::IxDyn(&[b, h, lq, lk]))
                    .ok_or_else(|| Error::Shape {
                        op: "attention",
                        expected: format!("a mask broadcastable to [{b}, {h}, {lq}, {lk}]"),
                        found: format!("{:?}", a.shape()),
                    })?;
                Some(full.as_standard_layout().into_owned())
            }
            _ => None,
        };
        let causal = matches!(mask, AttentionMask::Causal);
        let (qa, ka, va) = (q.to_f32_array(), k.to_f32_array(), v.to_f32_array());
        let (qs, ks, vs) = (
            contiguous(&qa, "attention")?,
            contiguous(&ka, "attention")?,
            contiguous(&va, "attention")?,
        );
        let mask_slice = additive.as_ref().and_then(|m| m.as_slice());
        let mut out = vec![0.0_f32; b * h * lq * dv];
        out.par_chunks_mut(lq * dv)
            .enumerate()
            .try_for_each(|(bh, o)| -> Result<()> {
                let mut scores = vec![0.0_f32; lq * lk];
                sgemm(
                    lq,
                    lk,
                    d,
                    &qs[bh * lq * d..(bh + 1) * lq * d],
                    Layout::RowMajor,
                    &ks[bh * lk * d..(bh + 1) * lk * d],
                    Layout::Transposed,
                    &mut scores,
                    false,
                    1,
                )?;
                for (i, row) in scores.chunks_mut(lk).enumerate() {
                    for (j, s) in row.iter_mut().enumerate() {
                        *s *= scale;
                        if let Some(m) = mask_slice {
                            *s += m[(bh * lq + i) * lk + j];
                        }
                        if causal && j > i {
                            *s = f32::NEG_INFINITY;
                        }
                    }
                    softmax_row(row);
                }
                sgemm(
                    lq,
                    dv,
                    lk,
                    &scores,
                    Layout::RowMajor,
                    &vs[bh * lk * dv..(bh + 1) * lk * dv],
                    Layout::RowMajor,
                    o,
                    false,
                    1,
                )
            })?;
        CpuTensor::from_vec(&[b, h, lq, dv], out)
    }
}

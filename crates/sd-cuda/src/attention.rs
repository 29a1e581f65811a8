//! Scaled dot-product attention for the CUDA backend: one fused flash-attention kernel
//! (`kernels/attention.cu`), tensor cores for f16/bf16, so the `Lq x Lk` scores never exist in
//! memory. Mirrors sd-models' `cpu/attention.rs`, whose shape rules and errors it repeats.
//!
//! Heads larger than 160 (no SD model has them) fall back to matmul, softmax, matmul.

use cudarc::driver::{DeviceRepr, LaunchConfig};
use sd_models::backend::{
    ActivationOps, AttentionMask, AttentionOps, DType, DataOps, ElementwiseOps, MatmulOps,
};
use sd_models::{Error, Result};

use crate::data::u32_arg;
use crate::device::{CudaBackend, float, launch, promote};
use crate::elementwise::broadcast_strides;
use crate::kernels::{HeadDim, Kernel, geometry};
use crate::tensor::CudaTensor;

/// `AttnParams` of attention.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct AttnParams {
    pub(crate) lq: u32,
    pub(crate) lk: u32,
    pub(crate) d: u32,
    pub(crate) dv: u32,
    pub(crate) heads: u32,
    pub(crate) scale: f32,
    pub(crate) causal: u32,
    pub(crate) has_mask: u32,
    pub(crate) mask_sb: u32,
    pub(crate) mask_sh: u32,
    pub(crate) mask_sq: u32,
    pub(crate) mask_sk: u32,
}

// SAFETY: plain `#[repr(C)]` 4-byte fields, the layout of the CUDA struct (checked by the
// kernel-compilation test).
unsafe impl DeviceRepr for AttnParams {}

/// The strides of a mask of shape `m` read as `[B, H, Lq, Lk]` (0 along broadcast axes), if
/// it broadcasts to `target`.
pub(crate) fn mask_strides(m: &[usize], target: [usize; 4]) -> Option<[usize; 4]> {
    if m.len() > 4 {
        return None;
    }
    let padded: Vec<usize> = std::iter::repeat_n(1, 4 - m.len())
        .chain(m.iter().copied())
        .collect();
    if padded.iter().zip(target).any(|(&d, t)| d != t && d != 1) {
        return None;
    }
    let s = broadcast_strides(m, 4);
    Some([s[0], s[1], s[2], s[3]])
}

impl CudaBackend {
    /// Attention through matmul and softmax, for heads the fused kernel does not take.
    fn attention_unfused(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        mask: AttentionMask<'_, CudaTensor>,
        scale: f32,
    ) -> Result<CudaTensor> {
        let (lq, lk) = (q.shape()[2], k.shape()[2]);
        let k_t = self.permute(k, &[0, 1, 3, 2])?;
        let scores = self.matmul(q, &k_t)?;
        let scores = self.affine(&scores, scale, 0.0)?;
        let scores = match mask {
            AttentionMask::None => scores,
            AttentionMask::Additive(m) => self.add(&scores, m)?,
            AttentionMask::Causal => {
                let mut m = vec![0.0_f32; lq * lk];
                for i in 0..lq {
                    for j in (i + 1)..lk {
                        m[i * lk + j] = f32::NEG_INFINITY;
                    }
                }
                let t = self.alloc(&[lq, lk], DType::F32)?;
                self.upload_raw(&t, &m)?;
                self.add(&scores, &t)?
            }
        };
        let p = self.softmax_last(&scores)?;
        let out = self.matmul(&p, v)?;
        Ok(self.to_dtype(&out, q.dtype)?)
    }
}

impl AttentionOps for CudaBackend {
    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        mask: AttentionMask<'_, CudaTensor>,
        scale: f32,
    ) -> Result<CudaTensor> {
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
        let additive = match mask {
            AttentionMask::Additive(m) => {
                let strides =
                    mask_strides(m.shape(), [b, h, lq, lk]).ok_or_else(|| Error::Shape {
                        op: "attention",
                        expected: format!("a mask broadcastable to [{b}, {h}, {lq}, {lk}]"),
                        found: format!("{:?}", m.shape()),
                    })?;
                Some((self.to_dtype(m, DType::F32)?, strides))
            }
            _ => None,
        };
        let dtype = promote(promote(q.dtype, k.dtype), v.dtype);
        let (q, k, v) = (
            self.to_dtype(q, dtype)?,
            self.to_dtype(k, dtype)?,
            self.to_dtype(v, dtype)?,
        );
        let head = HeadDim::fitting(d.max(dv));
        let (Some(head), true) = (head, b * h <= 65_535) else {
            return self.attention_unfused(&q, &k, &v, mask, scale);
        };
        let out = self.alloc(&[b, h, lq, dv], dtype)?;
        if out.is_empty() {
            return Ok(out);
        }
        if lk == 0 {
            self.zero(&out)?;
            return Ok(out);
        }
        let t = float(dtype)?;
        let (kernel, rows_per_block, threads) = match t.half() {
            Some(half) => (
                Kernel::AttentionTensorCore { dtype: half, head },
                geometry::ATT_TC.0,
                geometry::ATT_TC.2,
            ),
            None => (
                Kernel::AttentionF32(head),
                geometry::ATT_F32.0,
                geometry::ATT_F32.2,
            ),
        };
        let [sb, sh, sq_, sk_] = additive.as_ref().map_or([0; 4], |(_, s)| *s);
        let p = AttnParams {
            lq: u32_arg(lq)?,
            lk: u32_arg(lk)?,
            d: u32_arg(d)?,
            dv: u32_arg(dv)?,
            heads: u32_arg(h)?,
            scale,
            causal: u32::from(matches!(mask, AttentionMask::Causal)),
            has_mask: u32::from(additive.is_some()),
            mask_sb: u32_arg(sb)?,
            mask_sh: u32_arg(sh)?,
            mask_sq: u32_arg(sq_)?,
            mask_sk: u32_arg(sk_)?,
        };
        let cfg = LaunchConfig {
            grid_dim: (u32_arg(lq.div_ceil(rows_per_block))?, u32_arg(b * h)?, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: kernel.dynamic_shared_bytes(),
        };
        let (op, qp, kp, vp) = (out.ptr(), q.ptr(), k.ptr(), v.ptr());
        let mp = additive.as_ref().map_or(0, |(m, _)| m.ptr());
        // attn_tc_{t}_d{hd} / attn_f32_d{hd}(T* out, const T* q, const T* k, const T* v,
        //                                    const float* mask, AttnParams p)
        launch!(self, kernel, cfg, op, qp, kp, vp, mp, p)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_layout() {
        assert_eq!(std::mem::size_of::<AttnParams>(), 12 * 4);
    }

    #[test]
    fn masks_broadcast() {
        assert_eq!(
            mask_strides(&[1, 1, 3, 5], [2, 4, 3, 5]),
            Some([0, 0, 5, 1])
        );
        assert_eq!(mask_strides(&[5], [2, 4, 3, 5]), Some([0, 0, 0, 1]));
        assert_eq!(
            mask_strides(&[2, 1, 1, 5], [2, 4, 3, 5]),
            Some([5, 0, 0, 1])
        );
        assert_eq!(
            mask_strides(&[2, 4, 3, 5], [2, 4, 3, 5]),
            Some([60, 15, 5, 1])
        );
        assert_eq!(mask_strides(&[3, 1], [2, 4, 3, 5]), Some([0, 0, 1, 0]));
        assert_eq!(mask_strides(&[2, 5], [2, 4, 3, 5]), None);
        assert_eq!(mask_strides(&[1, 1, 1, 1, 5], [2, 4, 3, 5]), None);
    }
}

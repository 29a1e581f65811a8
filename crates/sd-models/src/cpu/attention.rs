//! Scaled dot-product attention for the CPU backend, fused in the manner of FlashAttention
//! (Dao et al., 2022): queries in blocks of [`BQ`], keys in blocks of [`BK`], an online
//! softmax (running maximum and sum per query), so the `Lq x Lk` scores never exist; memory
//! is `O(BQ x BK)` per thread.
//!
//! Each block is computed transposed, `S^T = K_blk Q_blk^T` (`[BK, BQ]`) and
//! `O^T += V_blk^T P^T` (`[Dv, BQ]`), on the packed GEMM: the per-query softmax statistics
//! then run along rows of `S^T`, one vector of queries at a time, and the short head size
//! (40 in SD 1.x's first level) is a GEMM's row count, which pads better than a column
//! count. Tasks are (batch, head, query block), spread over rayon's pool.

use rayon::prelude::*;

use super::math::{dispatch, exp};
use super::packed::pack::{Strided, pack_a, pack_cols_into, pair_panel};
use super::packed::{ASource, BSource, Panels, Product, Scratch, Start, run_serial};
use super::{CpuBackend, CpuIsa, CpuPrecision, CpuTensor, PackedData, contiguous, threads};
use crate::backend::{AttentionMask, AttentionOps};
use crate::error::{Error, Result};

/// Queries per block (a multiple of every kernel's tile width).
const BQ: usize = 64;
/// Keys per block.
const BK: usize = 192;

/// A mask broadcast to `[B, H, Lq, Lk]`: the element strides of each axis (0 where it is
/// broadcast).
struct Additive<'a> {
    data: &'a [f32],
    strides: [usize; 4],
}

impl Additive<'_> {
    #[inline]
    fn at(&self, b: usize, h: usize, q: usize, k: usize) -> f32 {
        let s = &self.strides;
        self.data[b * s[0] + h * s[1] + q * s[2] + k * s[3]]
    }
}

/// What one task needs to know.
struct Geometry {
    heads: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    scale: f32,
    causal: bool,
    precision: CpuPrecision,
}

/// The buffers of one task.
#[derive(Default)]
struct Work {
    /// `S^T` then `P^T`, `[BK, BQ]`.
    s: Vec<f32>,
    /// `O^T`, `[Dv, BQ]`.
    o: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    alpha: Vec<f32>,
    /// The query block as B micro-panels, `Q_blk^T [d, BQ]`, and as bf16 pairs.
    q: Vec<f32>,
    q16: Vec<u32>,
    scratch: Scratch,
}

/// One head's keys and values packed once for every query block: `K [Lk, d]` as A
/// micro-panels (a key block's panels are a contiguous run, as [`BK`] is a multiple of every
/// kernel's `mr`) and `V^T [dv, Lk]` as A micro-panels, key block after key block.
struct PackedHead {
    k: PackedData,
    v: PackedData,
}

/// The length of one key block of a packed `V^T`, in values (f32) or pairs (bf16).
fn v_block_len(isa: CpuIsa, dv: usize, precision: CpuPrecision) -> usize {
    let len = dv.div_ceil(isa.mr()) * isa.mr() * BK;
    match precision {
        CpuPrecision::F32 => len,
        CpuPrecision::Bf16 => len / 2,
    }
}

fn pack_head(isa: CpuIsa, g: &Geometry, k: &[f32], v: &[f32]) -> PackedHead {
    let mr = isa.mr();
    let kp = super::packed::pack::prepack_rows(k, g.lk, g.d, mr);
    let blocks = g.lk.div_ceil(BK);
    let len = v_block_len(isa, g.dv, CpuPrecision::F32);
    let mut vp = vec![0.0_f32; blocks * len];
    for (j, dst) in vp.chunks_exact_mut(len).enumerate() {
        let k0 = j * BK;
        let kb = BK.min(g.lk - k0);
        let block = Strided {
            data: &v[k0 * g.dv..(k0 + kb) * g.dv],
            rs: 1,
            cs: g.dv,
        };
        // Panels of BK keys (the last block's tail stays zero), so that a causal query block
        // can read the first keys of a block with the same panel stride.
        for (p, panel) in dst.chunks_exact_mut(BK * mr).enumerate() {
            pack_a(block, p * mr, mr.min(g.dv - p * mr), 0, kb, mr, panel);
        }
    }
    PackedHead {
        k: PackedData::in_precision(kp, g.d, mr, g.precision),
        v: PackedData::in_precision(vp, BK, mr, g.precision),
    }
}

/// The softmax statistics for one block of raw scores `s [kb, BQ]` (rows: keys, columns:
/// queries), turning it into `exp(scale * (s - max))` in place: updates each query's running
/// `max` (of the raw scores) and `sum`, and sets `alpha` to the factor by which earlier
/// partial outputs shrink. `scale > 0`, so the raw maximum is the scaled one's.
#[inline(always)]
fn online_softmax(
    s: &mut [f32],
    kb: usize,
    scale: f32,
    max: &mut [f32],
    sum: &mut [f32],
    alpha: &mut [f32],
) {
    let mut new_max = [f32::NEG_INFINITY; BQ];
    new_max.copy_from_slice(max);
    for row in s.chunks_exact(BQ).take(kb) {
        for (m, &v) in new_max.iter_mut().zip(row) {
            *m = m.max(v);
        }
    }
    // A query that has seen only masked keys has no finite maximum: its terms are all 0.
    let mut shift = [0.0_f32; BQ];
    for ((sh, a), (&m, &nm)) in shift
        .iter_mut()
        .zip(alpha.iter_mut())
        .zip(max.iter().zip(&new_max))
    {
        let finite = nm != f32::NEG_INFINITY;
        *sh = if finite { nm } else { 0.0 };
        *a = if finite { exp(scale * (m - nm)) } else { 0.0 };
    }
    let mut block_sum = [0.0_f32; BQ];
    for row in s.chunks_exact_mut(BQ).take(kb) {
        for ((v, &sh), acc) in row.iter_mut().zip(&shift).zip(block_sum.iter_mut()) {
            let p = exp(scale * (*v - sh));
            *v = p;
            *acc += p;
        }
    }
    for ((sm, &a), &bs) in sum.iter_mut().zip(alpha.iter()).zip(&block_sum) {
        *sm = *sm * a + bs;
    }
    max.copy_from_slice(&new_max);
}

/// [`online_softmax`] and [`rescale`] of `o` in one, with AVX-512: `BQ / 16` vectors of
/// queries at a time.
///
/// # Safety
/// The CPU supports AVX-512F; `s` holds `kb x BQ` values, `o` a multiple of `BQ`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn online_softmax_avx512(
    s: &mut [f32],
    kb: usize,
    scale: f32,
    max: &mut [f32],
    sum: &mut [f32],
    alpha: &mut [f32],
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    const V: usize = BQ / 16;
    debug_assert!(s.len() >= kb * BQ && max.len() >= BQ && sum.len() >= BQ);
    // SAFETY (whole body): every pointer stays inside its slice (lengths above).
    unsafe {
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let vscale = _mm512_set1_ps(scale);
        let mut old = [neg_inf; V];
        let mut new = [neg_inf; V];
        for i in 0..V {
            old[i] = _mm512_loadu_ps(max.as_ptr().add(16 * i));
            new[i] = old[i];
        }
        for row in s.chunks_exact(BQ).take(kb) {
            for i in 0..V {
                new[i] = _mm512_max_ps(new[i], _mm512_loadu_ps(row.as_ptr().add(16 * i)));
            }
        }
        let mut shift = [neg_inf; V];
        let mut a = [neg_inf; V];
        for i in 0..V {
            let finite = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(new[i], neg_inf);
            shift[i] = _mm512_maskz_mov_ps(finite, new[i]);
            let e = crate::cpu::math::exp_avx512(_mm512_mul_ps(
                vscale,
                _mm512_sub_ps(old[i], shift[i]),
            ));
            a[i] = _mm512_maskz_mov_ps(finite, e);
        }
        let mut acc = [_mm512_setzero_ps(); V];
        for row in s.chunks_exact_mut(BQ).take(kb) {
            for i in 0..V {
                let p = row.as_mut_ptr().add(16 * i);
                let e = crate::cpu::math::exp_avx512(_mm512_mul_ps(
                    vscale,
                    _mm512_sub_ps(_mm512_loadu_ps(p), shift[i]),
                ));
                _mm512_storeu_ps(p, e);
                acc[i] = _mm512_add_ps(acc[i], e);
            }
        }
        for i in 0..V {
            let sp = sum.as_mut_ptr().add(16 * i);
            _mm512_storeu_ps(sp, _mm512_fmadd_ps(_mm512_loadu_ps(sp), a[i], acc[i]));
            _mm512_storeu_ps(max.as_mut_ptr().add(16 * i), new[i]);
            _mm512_storeu_ps(alpha.as_mut_ptr().add(16 * i), a[i]);
        }
        for row in o.chunks_exact_mut(BQ) {
            for i in 0..V {
                let p = row.as_mut_ptr().add(16 * i);
                _mm512_storeu_ps(p, _mm512_mul_ps(_mm512_loadu_ps(p), a[i]));
            }
        }
    }
}

/// `o [dv, BQ] *= alpha` column by column.
#[inline(always)]
fn rescale(o: &mut [f32], alpha: &[f32]) {
    for row in o.chunks_exact_mut(BQ) {
        for (v, &a) in row.iter_mut().zip(alpha) {
            *v *= a;
        }
    }
}

/// One (batch, head, query block) task: writes `out` rows `q0 .. q0 + bq` of that head.
#[allow(clippy::too_many_arguments)]
fn task(
    isa: CpuIsa,
    g: &Geometry,
    q: &[f32],
    head: &PackedHead,
    mask: Option<&Additive<'_>>,
    bh: usize,
    q0: usize,
    out: &mut [f32],
    w: &mut Work,
) {
    let bq = BQ.min(g.lq - q0);
    let (b, h) = (bh / g.heads, bh % g.heads);
    let qh = &q[(bh * g.lq + q0) * g.d..(bh * g.lq + q0 + bq) * g.d];
    let (mr, nr) = (isa.mr(), isa.nr());
    w.q.resize(BQ.div_ceil(nr) * g.d * nr, 0.0);
    let q_t = Strided {
        data: qh,
        rs: 1,
        cs: g.d,
    };
    pack_cols_into(q_t, bq, g.d, nr, &mut w.q);
    let q_panels = match g.precision {
        CpuPrecision::F32 => Panels::F32(&w.q),
        CpuPrecision::Bf16 => {
            let pairs = g.d.div_ceil(2) * nr;
            w.q16.resize(BQ.div_ceil(nr) * pairs, 0);
            for (src, dst) in
                w.q.chunks_exact(g.d * nr)
                    .zip(w.q16.chunks_exact_mut(pairs))
            {
                pair_panel(src, g.d, nr, dst);
            }
            Panels::Bf16(&w.q16)
        }
    };
    let v_len = v_block_len(isa, g.dv, g.precision);
    let k_panel = match g.precision {
        CpuPrecision::F32 => g.d * mr,
        CpuPrecision::Bf16 => g.d.div_ceil(2) * mr,
    };
    w.s.resize(BK * BQ, 0.0);
    w.o.clear();
    w.o.resize(g.dv * BQ, 0.0);
    w.max.clear();
    w.max.resize(BQ, f32::NEG_INFINITY);
    w.sum.clear();
    w.sum.resize(BQ, 0.0);
    w.alpha.resize(BQ, 0.0);
    // Causal: keys past the block's last query are masked for every query in it.
    let keys = if g.causal { g.lk.min(q0 + bq) } else { g.lk };
    let mut k0 = 0;
    while k0 < keys {
        let kb = BK.min(keys - k0);
        // S^T [kb, bq] = K_blk [kb, d] * Q_blk^T [d, bq].
        let scores = Product {
            m: kb,
            n: bq,
            k: g.d,
            a: ASource::Packed(head.k.panels().skip((k0 / mr) * k_panel), g.d),
            b: BSource::Packed(q_panels),
            start: Start::Zero,
            precision: g.precision,
        };
        // SAFETY: `w.s` holds `BK x BQ >= kb x bq` values, rows `BQ` apart; the packed
        // operands hold the key block's and the query block's panels for this ISA.
        unsafe { run_serial(isa, &scores, w.s.as_mut_ptr(), BQ, &mut w.scratch) };
        let s = &mut w.s[..kb * BQ];
        // Columns past the block's queries, and keys after a query (causal), are masked.
        if bq < BQ {
            for row in s.chunks_exact_mut(BQ) {
                row[bq..].fill(f32::NEG_INFINITY);
            }
        }
        if g.causal && k0 + kb > q0 + 1 {
            for (kk, row) in s.chunks_exact_mut(BQ).enumerate() {
                // Key k0 + kk is masked for queries q0 + qq < k0 + kk.
                let visible_from = (k0 + kk).saturating_sub(q0).min(bq);
                row[..visible_from].fill(f32::NEG_INFINITY);
            }
        }
        if let Some(m) = mask {
            for (kk, row) in s.chunks_exact_mut(BQ).enumerate() {
                for (qq, x) in row.iter_mut().enumerate().take(bq) {
                    // The raw scores are scaled later: divide the mask by the scale.
                    *x += m.at(b, h, q0 + qq, k0 + kk) / g.scale;
                }
            }
        }
        let (max, sum, alpha) = (&mut w.max, &mut w.sum, &mut w.alpha);
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the backend checked AVX-512F; the buffers have the lengths asked.
            CpuIsa::Avx512 => unsafe {
                online_softmax_avx512(s, kb, g.scale, max, sum, alpha, &mut w.o);
            },
            _ => dispatch!(isa, {
                online_softmax(s, kb, g.scale, max, sum, alpha);
                rescale(&mut w.o, alpha);
            }),
        }
        // O^T [dv, bq] += V_blk^T [dv, kb] * P^T [kb, bq].
        let values = Product {
            m: g.dv,
            n: bq,
            k: kb,
            a: ASource::Packed(head.v.panels().skip((k0 / BK) * v_len), BK),
            b: BSource::Strided(Strided {
                data: &w.s[..kb * BQ],
                rs: BQ,
                cs: 1,
            }),
            start: Start::Accumulate,
            precision: g.precision,
        };
        // SAFETY: `w.o` holds `dv x BQ` values, rows `BQ` apart; the packed values hold the
        // key block's `V^T` panels, `w.s` the `kb x BQ` probabilities.
        unsafe { run_serial(isa, &values, w.o.as_mut_ptr(), BQ, &mut w.scratch) };
        k0 += kb;
    }
    for (qq, row) in out.chunks_exact_mut(g.dv).take(bq).enumerate() {
        let inv = 1.0 / w.sum[qq];
        for (dd, o) in row.iter_mut().enumerate() {
            *o = w.o[dd * BQ + qq] * inv;
        }
    }
}

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
        let mut out = super::pool::take(b * h * lq * dv);
        if out.is_empty() {
            return CpuTensor::from_vec(&[b, h, lq, dv], out);
        }
        let mask_array = match mask {
            AttentionMask::Additive(m) => Some(m.to_f32_array()),
            _ => None,
        };
        let additive = match &mask_array {
            Some(a) => {
                let full = a
                    .broadcast(ndarray::IxDyn(&[b, h, lq, lk]))
                    .ok_or_else(|| Error::Shape {
                        op: "attention",
                        expected: format!("a mask broadcastable to [{b}, {h}, {lq}, {lk}]"),
                        found: format!("{:?}", a.shape()),
                    })?;
                let st = full.strides();
                let data = contiguous(a, "attention")?;
                Some(Additive {
                    data,
                    strides: [
                        st[0] as usize,
                        st[1] as usize,
                        st[2] as usize,
                        st[3] as usize,
                    ],
                })
            }
            None => None,
        };
        let (qa, ka, va) = (q.to_f32_array(), k.to_f32_array(), v.to_f32_array());
        let (qs, ks, vs) = (
            contiguous(&qa, "attention")?,
            contiguous(&ka, "attention")?,
            contiguous(&va, "attention")?,
        );
        // The kernel folds a positive scale into the softmax; any other is applied to q.
        let (scaled_q, scale) = if scale > 0.0 && scale.is_finite() {
            (None, scale)
        } else {
            (
                Some(qs.iter().map(|x| x * scale).collect::<Vec<f32>>()),
                1.0,
            )
        };
        let qs = scaled_q.as_deref().unwrap_or(qs);
        let g = Geometry {
            heads: h,
            lq,
            lk,
            d,
            dv,
            scale,
            causal: matches!(mask, AttentionMask::Causal),
            precision: self.precision(),
        };
        let isa = self.isa();
        let heads: Vec<PackedHead> = (0..b * h)
            .into_par_iter()
            .map(|bh| {
                pack_head(
                    isa,
                    &g,
                    &ks[bh * lk * d..(bh + 1) * lk * d],
                    &vs[bh * lk * dv..(bh + 1) * lk * dv],
                )
            })
            .collect();
        let blocks = lq.div_ceil(BQ);
        let run = |w: &mut Work, (i, o): (usize, &mut [f32])| {
            let (bh, qb) = (i / blocks, i % blocks);
            task(
                isa,
                &g,
                qs,
                &heads[bh],
                additive.as_ref(),
                bh,
                qb * BQ,
                o,
                w,
            );
        };
        // Each task writes BQ rows of one head (the last block of a head may be shorter).
        let chunks: Vec<(usize, &mut [f32])> = out
            .chunks_mut(lq * dv)
            .flat_map(|head| head.chunks_mut(BQ * dv))
            .enumerate()
            .collect();
        if threads() > 1 && chunks.len() > 1 {
            chunks.into_par_iter().for_each_init(Work::default, run);
        } else {
            let mut w = Work::default();
            chunks.into_iter().for_each(|c| run(&mut w, c));
        }
        CpuTensor::from_vec(&[b, h, lq, dv], out)
    }
}

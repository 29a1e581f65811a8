//! The register-blocked microkernels: `C[rows x cols] (+)= A[rows x kc] B[kc x cols]` on
//! packed operands, for one tile of at most `MR x NR`.
//!
//! Operands are packed as [`super::pack`] writes them: `a` holds `kc` groups of `MR` values
//! (one column of the tile's A rows each), `b` holds `kc` groups of `NR` values (one row of
//! B). Rows of `a` past `rows` and columns of `b` past `cols` are zero padding; only the
//! `rows x cols` corner of C is read or written. Every kernel sums over `k` in order, one
//! fused multiply-add at a time, so a tile's result does not depend on how the caller split
//! the other dimensions.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// How a tile's accumulators start.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    /// From zero.
    Zero,
    /// From the values in C (a later `kc` block of the same product).
    Load,
    /// From `bias[row]` for every column (a convolution's per-channel bias).
    Row(*const f32),
    /// From `bias[col]` for every row (a linear layer's per-feature bias).
    Col(*const f32),
}

/// The AVX-512 tile: 12 rows by 32 columns (two zmm registers a row, 24 accumulators).
#[cfg(target_arch = "x86_64")]
pub(crate) const AVX512_MR: usize = 12;
/// See [`AVX512_MR`].
#[cfg(target_arch = "x86_64")]
pub(crate) const AVX512_NR: usize = 32;

/// The accumulators of a 12 x 32 AVX-512 tile: two vectors of 16 columns per row.
#[cfg(target_arch = "x86_64")]
type Tile512 = ([__m512; AVX512_MR], [__m512; AVX512_MR]);

/// The write masks of a tile's two column halves for `cols <= 32` valid columns.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn masks512(cols: usize) -> (__mmask16, __mmask16) {
    let m0 = if cols >= 16 {
        0xffff
    } else {
        (1u32 << cols) as u16 - 1
    };
    let m1 = if cols >= 32 {
        0xffff
    } else if cols > 16 {
        (1u32 << (cols - 16)) as u16 - 1
    } else {
        0
    };
    (m0, m1)
}

/// A tile's accumulators as `init` says.
///
/// # Safety
/// AVX-512F; `c` addresses `rows` rows of the masked columns `ldc` apart; the `Init`
/// pointer holds `rows` (`Row`) or the masked columns (`Col`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn start512(
    init: Init,
    c: *const f32,
    ldc: usize,
    rows: usize,
    (m0, m1): (__mmask16, __mmask16),
) -> Tile512 {
    let mut lo = [_mm512_setzero_ps(); AVX512_MR];
    let mut hi = [_mm512_setzero_ps(); AVX512_MR];
    // SAFETY: the caller's contract covers every offset; masked loads read only valid
    // columns, and no row past `rows` is read.
    unsafe {
        match init {
            Init::Zero => {}
            Init::Load => {
                for r in 0..rows.min(AVX512_MR) {
                    lo[r] = _mm512_maskz_loadu_ps(m0, c.add(r * ldc));
                    hi[r] = _mm512_maskz_loadu_ps(m1, c.add(r * ldc + 16));
                }
            }
            Init::Row(bias) => {
                for r in 0..rows.min(AVX512_MR) {
                    lo[r] = _mm512_set1_ps(*bias.add(r));
                    hi[r] = lo[r];
                }
            }
            Init::Col(bias) => {
                let b0 = _mm512_maskz_loadu_ps(m0, bias);
                let b1 = _mm512_maskz_loadu_ps(m1, bias.add(16));
                lo = [b0; AVX512_MR];
                hi = [b1; AVX512_MR];
            }
        }
    }
    (lo, hi)
}

/// Stores a tile's first `rows` rows, masked to its valid columns.
///
/// # Safety
/// AVX-512F; `c` addresses `rows` rows of the masked columns `ldc` apart, writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store512(
    (lo, hi): &Tile512,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    (m0, m1): (__mmask16, __mmask16),
) {
    for r in 0..rows.min(AVX512_MR) {
        // SAFETY: the caller's contract; the masks keep the stores to valid columns.
        unsafe {
            _mm512_mask_storeu_ps(c.add(r * ldc), m0, lo[r]);
            _mm512_mask_storeu_ps(c.add(r * ldc + 16), m1, hi[r]);
        }
    }
}

/// `C (+)= A B` for a tile of `rows <= 12` by `cols <= 32`.
///
/// # Safety
/// The CPU supports AVX-512F; `a` holds `kc * 12` and `b` `kc * 32` readable values; `c`
/// addresses `rows` rows of `cols` writable values `ldc` apart; an `Init` pointer holds
/// `rows` (`Row`) or `cols` (`Col`) values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn avx512_f32(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    init: Init,
) {
    let masks = masks512(cols);
    // SAFETY (whole body): the caller's contract covers every pointer offset below.
    unsafe {
        let (mut lo, mut hi) = start512(init, c, ldc, rows, masks);
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            let b0 = _mm512_loadu_ps(b);
            let b1 = _mm512_loadu_ps(b.add(16));
            for r in 0..AVX512_MR {
                let av = _mm512_set1_ps(*a.add(r));
                lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
                hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
            }
            a = a.add(AVX512_MR);
            b = b.add(AVX512_NR);
        }
        store512(&(lo, hi), c, ldc, rows, masks);
    }
}

/// `C (+)= A B` for a tile of `rows <= 12` by `cols <= 32` on bf16 pairs: `a` holds `kc2`
/// groups of 12 `u32`, each two bf16 values of one row of A (columns `2p`, `2p + 1`), `b`
/// holds `kc2` groups of 32 `u32`, each the same two rows of one column of B; products
/// accumulate in f32 (`vdpbf16ps`: both pairs' products, then the sum).
///
/// # Safety
/// The CPU supports AVX-512F and AVX512-BF16; `a` holds `kc2 * 12` and `b` `kc2 * 32`
/// values; `c` and the `Init` pointer as for [`avx512_f32`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn avx512_bf16(
    kc2: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    init: Init,
) {
    let masks = masks512(cols);
    // SAFETY (whole body): as for `avx512_f32`; the bf16 vectors are reinterpretations of
    // integer vectors of the same width.
    unsafe {
        let (mut lo, mut hi) = start512(init, c, ldc, rows, masks);
        let (mut a, mut b) = (a, b);
        for _ in 0..kc2 {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(16).cast()));
            for r in 0..AVX512_MR {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r) as i32));
                lo[r] = _mm512_dpbf16_ps(lo[r], av, b0);
                hi[r] = _mm512_dpbf16_ps(hi[r], av, b1);
            }
            a = a.add(AVX512_MR);
            b = b.add(AVX512_NR);
        }
        store512(&(lo, hi), c, ldc, rows, masks);
    }
}

/// `C (+)= A B` for a tile of `rows <= 12` by `cols <= 32` whose A rows are read where they
/// lie (a direct convolution's channel-blocked image, [`super::blocked`]): row `r`'s values
/// of block `q` are the `CB` values (f32) from `rows_at[r] + chunks[q]`; `b` holds `CB`
/// groups of 32 values for every block, as for [`avx512_f32`].
///
/// # Safety
/// The CPU supports AVX-512F; every `rows_at[r] + chunks[q]` addresses `CB` readable
/// values; `b` holds `chunks.len() * CB * 32`; `c` and the `Init` pointer as for
/// [`avx512_f32`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn avx512_f32_rows(
    rows_at: &[*const f32; AVX512_MR],
    chunks: &[usize],
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    init: Init,
) {
    use super::blocked::CB;
    let masks = masks512(cols);
    // SAFETY (whole body): as for `avx512_f32`, with A read at the caller's offsets.
    unsafe {
        let (mut lo, mut hi) = start512(init, c, ldc, rows, masks);
        let mut b = b;
        for &off in chunks {
            let a: [*const f32; AVX512_MR] = std::array::from_fn(|r| rows_at[r].add(off));
            for s in 0..CB {
                let b0 = _mm512_loadu_ps(b);
                let b1 = _mm512_loadu_ps(b.add(16));
                for r in 0..AVX512_MR {
                    let av = _mm512_set1_ps(*a[r].add(s));
                    lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
                    hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
                }
                b = b.add(AVX512_NR);
            }
        }
        store512(&(lo, hi), c, ldc, rows, masks);
    }
}

/// [`avx512_f32_rows`] on bf16 pairs: a block is `CB / 2` pairs of A (`u32`) and `CB / 2`
/// groups of 32 pairs of B, as for [`avx512_bf16`].
///
/// # Safety
/// As [`avx512_f32_rows`] in pairs, and the CPU supports AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn avx512_bf16_rows(
    rows_at: &[*const u32; AVX512_MR],
    chunks: &[usize],
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    init: Init,
) {
    use super::blocked::CB;
    let masks = masks512(cols);
    // SAFETY (whole body): as for `avx512_bf16`, with A read at the caller's offsets.
    unsafe {
        let (mut lo, mut hi) = start512(init, c, ldc, rows, masks);
        let mut b = b;
        for &off in chunks {
            let a: [*const u32; AVX512_MR] = std::array::from_fn(|r| rows_at[r].add(off));
            for s in 0..CB / 2 {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(16).cast()));
                for r in 0..AVX512_MR {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a[r].add(s) as i32));
                    lo[r] = _mm512_dpbf16_ps(lo[r], av, b0);
                    hi[r] = _mm512_dpbf16_ps(hi[r], av, b1);
                }
                b = b.add(AVX512_NR);
            }
        }
        store512(&(lo, hi), c, ldc, rows, masks);
    }
}

/// The portable tile: 6 rows by 16 columns, plain Rust that the compiler vectorises for the
/// target (AVX2 and FMA where [`avx2_f32`] is used).
pub(crate) const PORTABLE_MR: usize = 6;
/// See [`PORTABLE_MR`].
pub(crate) const PORTABLE_NR: usize = 16;

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn generic_f32<const FMA: bool>(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    init: Init,
) {
    const MR: usize = PORTABLE_MR;
    const NR: usize = PORTABLE_NR;
    let (rows, cols) = (rows.min(MR), cols.min(NR));
    let mut acc = [[0.0_f32; NR]; MR];
    // SAFETY: the callers' contract (see `portable_f32`) covers the reads and writes of C
    // and of the bias, limited to `rows x cols`.
    unsafe {
        match init {
            Init::Zero => {}
            Init::Load => {
                for (r, row) in acc.iter_mut().enumerate().take(rows) {
                    for (j, v) in row.iter_mut().enumerate().take(cols) {
                        *v = *c.add(r * ldc + j);
                    }
                }
            }
            Init::Row(bias) => {
                for (r, row) in acc.iter_mut().enumerate().take(rows) {
                    row.fill(*bias.add(r));
                }
            }
            Init::Col(bias) => {
                for row in acc.iter_mut() {
                    for (j, v) in row.iter_mut().enumerate().take(cols) {
                        *v = *bias.add(j);
                    }
                }
            }
        }
    }
    for (ak, bk) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(kc) {
        for (row, &av) in acc.iter_mut().zip(ak) {
            for (v, &bv) in row.iter_mut().zip(bk) {
                *v = if FMA {
                    av.mul_add(bv, *v)
                } else {
                    av * bv + *v
                };
            }
        }
    }
    // SAFETY: as above.
    unsafe {
        for (r, row) in acc.iter().enumerate().take(rows) {
            for (j, &v) in row.iter().enumerate().take(cols) {
                *c.add(r * ldc + j) = v;
            }
        }
    }
}

/// The portable tile compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU supports AVX2 and FMA; `a` holds `kc * 6` and `b` `kc * 16` values; `c`
/// addresses `rows` rows of `cols` writable values `ldc` apart; an `Init` pointer holds
/// `rows` or `cols` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn avx2_f32(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    init: Init,
) {
    generic_f32::<true>(kc, a, b, c, ldc, rows, cols, init);
}

/// The portable tile for any CPU.
///
/// # Safety
/// `c` addresses `rows` rows of `cols` writable values `ldc` apart; an `Init` pointer holds
/// `rows` or `cols` values.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn portable_f32(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    init: Init,
) {
    generic_f32::<false>(kc, a, b, c, ldc, rows, cols, init);
}

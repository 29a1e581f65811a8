//! Packing operands into the layouts the microkernels read.
//!
//! - an A micro-panel: `kc` groups of `mr` values, `dst[kk * mr + r] = A[r0 + r, k0 + kk]`;
//! - a B micro-panel: `kc` groups of `nr` values, `dst[kk * nr + j] = B[k0 + kk, n0 + j]`;
//!
//! zero beyond the matrix. Weights are packed once, whole ([`prepack_rows`],
//! [`prepack_cols`]): panel `p` of a row-packed `[M, K]` matrix is the A micro-panel of rows
//! `p * mr ..` over all of `K`, so any `kc` block of it is a contiguous slice. A convolution's
//! B operand is its input unfolded (im2col), packed straight from the image one micro-panel
//! at a time ([`pack_conv_b`]): the unfolded matrix never exists.

use crate::backend::Conv2dParams;

/// A strided matrix: element `(i, j)` at `data[i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Strided<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl Strided<'_> {
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// Packs rows `r0 .. r0 + rows` (`rows <= mr`) and columns `k0 .. k0 + kc` of `a` into an A
/// micro-panel.
#[inline(always)]
pub(crate) fn pack_a(
    a: Strided<'_>,
    r0: usize,
    rows: usize,
    k0: usize,
    kc: usize,
    mr: usize,
    dst: &mut [f32],
) {
    let dst = &mut dst[..kc * mr];
    if rows < mr {
        dst.fill(0.0);
    }
    if a.cs == 1 {
        // Rows are contiguous: each row becomes lane `r` of every group.
        transpose_lines(dst, mr, rows, kc, |r| &a.data[(r0 + r) * a.rs + k0..][..kc]);
    } else if a.rs == 1 {
        // Columns are contiguous (a transposed operand): each group is one slice.
        for (kk, d) in dst.chunks_exact_mut(mr).enumerate() {
            let start = (k0 + kk) * a.cs + r0;
            d[..rows].copy_from_slice(&a.data[start..start + rows]);
        }
    } else {
        for kk in 0..kc {
            for r in 0..rows {
                dst[kk * mr + r] = a.at(r0 + r, k0 + kk);
            }
        }
    }
}

/// Packs rows `k0 .. k0 + kc` and columns `n0 .. n0 + cols` (`cols <= nr`) of `b` into a B
/// micro-panel.
#[inline(always)]
pub(crate) fn pack_b(
    b: Strided<'_>,
    k0: usize,
    kc: usize,
    n0: usize,
    cols: usize,
    nr: usize,
    dst: &mut [f32],
) {
    let dst = &mut dst[..kc * nr];
    if b.cs == 1 {
        pack_b_rows(dst, nr, cols, |kk| &b.data[(k0 + kk) * b.rs + n0..][..cols]);
    } else if b.rs == 1 {
        // Columns are contiguous (a transposed operand): read each column once.
        pack_b_cols(dst, nr, cols, |j| &b.data[(n0 + j) * b.cs + k0..][..kc]);
    } else {
        for (kk, d) in dst.chunks_exact_mut(nr).enumerate() {
            for (j, v) in d.iter_mut().enumerate() {
                *v = if j < cols { b.at(k0 + kk, n0 + j) } else { 0.0 };
            }
        }
    }
}

/// A matrix whose rows (or, when `transposed`, columns) are windows of one buffer: line `l`
/// is `data[starts[l]..]`. The shifted copies of an image that a convolution's kernel taps
/// read are such a matrix, with no copy made.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Windows<'a> {
    pub data: &'a [f32],
    pub starts: &'a [usize],
    pub transposed: bool,
}

/// Packs rows `k0 .. k0 + kc` and columns `n0 .. n0 + cols` (`cols <= nr`) of the windows
/// matrix `b` into a B micro-panel.
#[inline(always)]
pub(crate) fn pack_windows_b(
    b: Windows<'_>,
    k0: usize,
    kc: usize,
    n0: usize,
    cols: usize,
    nr: usize,
    dst: &mut [f32],
) {
    let dst = &mut dst[..kc * nr];
    if b.transposed {
        pack_b_cols(dst, nr, cols, |j| &b.data[b.starts[n0 + j] + k0..][..kc]);
    } else {
        pack_b_rows(dst, nr, cols, |kk| {
            &b.data[b.starts[k0 + kk] + n0..][..cols]
        });
    }
}

/// A B micro-panel (`dst`, groups of `nr`) from contiguous rows: `row(kk)` is the panel's
/// `cols` values of row `kk`; the rest of each group is zero.
#[inline(always)]
fn pack_b_rows<'a>(dst: &mut [f32], nr: usize, cols: usize, row: impl Fn(usize) -> &'a [f32]) {
    for (kk, d) in dst.chunks_exact_mut(nr).enumerate() {
        // A loop, not copy_from_slice: a call to memmove per group of at most `nr` values
        // costs more than the copy.
        for (o, &v) in d[..cols].iter_mut().zip(row(kk)) {
            *o = v;
        }
        d[cols..].fill(0.0);
    }
}

/// A B micro-panel (`dst`, groups of `nr`) from contiguous columns: `col(j)` is column `j`
/// over the panel's rows, which becomes lane `j` of every group; columns past `cols` are
/// zero.
#[inline(always)]
fn pack_b_cols<'a>(dst: &mut [f32], nr: usize, cols: usize, col: impl Fn(usize) -> &'a [f32]) {
    if cols < nr {
        dst.fill(0.0);
    }
    let kc = dst.len() / nr;
    transpose_lines(dst, nr, cols, kc, col);
}

/// The most lines [`transpose_lines`] takes (the widest micro-panel, AVX-512's `NR`).
const MAX_LINES: usize = 32;

/// Lays `lines` slices side by side: `dst[kk * width + j] = line(j)[kk]` for `j < lines`
/// and `kk < len` (`lines <= width <= MAX_LINES`); other values of `dst` are left as they
/// are. This transposition is how contiguous rows of A and contiguous columns of B become
/// micro-panels. Where the CPU has AVX-512 (whichever kernels the backend runs: it is the
/// same data movement), blocks of 16 lines by 16 values are transposed in registers;
/// the rest is scattered one value at a time.
#[inline(always)]
pub(crate) fn transpose_lines<'a>(
    dst: &mut [f32],
    width: usize,
    lines: usize,
    len: usize,
    line: impl Fn(usize) -> &'a [f32],
) {
    debug_assert!(lines <= width && width <= MAX_LINES && dst.len() >= len * width);
    let mut src: [&[f32]; MAX_LINES] = [&[]; MAX_LINES];
    for (j, s) in src.iter_mut().enumerate().take(lines) {
        *s = &line(j)[..len];
    }
    let src = &src[..lines];
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if len >= 16 && lines >= 4 && super::CpuIsa::Avx512.is_supported() {
        // SAFETY: the CPU has AVX-512F (checked just above).
        done = unsafe { transpose_lines_avx512(dst, width, src, len) };
    }
    for (j, s) in src.iter().enumerate() {
        for (kk, &v) in s.iter().enumerate().skip(done) {
            dst[kk * width + j] = v;
        }
    }
}

/// Lane indices of one round of the 16 x 16 transposition (see [`transpose16`]): `low`
/// keeps register i's lanes whose bit `s` is clear and takes the others from register
/// i + s, `s` lanes down; `high` the converse.
#[cfg(target_arch = "x86_64")]
const fn round_index(s: usize, high: bool) -> [i32; 16] {
    let mut idx = [0i32; 16];
    let mut l = 0;
    while l < 16 {
        idx[l] = match (l & s == 0, high) {
            (true, false) => l,
            (false, false) => 16 + l - s,
            (true, true) => l + s,
            (false, true) => 16 + l,
        } as i32;
        l += 1;
    }
    idx
}

/// One round of [`transpose16`]: swaps the off-diagonal `S x S` blocks of every `2S x 2S`
/// block, pairing registers i and i + S.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose_round<const S: usize>(r: &mut [std::arch::x86_64::__m512; 16]) {
    use std::arch::x86_64::*;
    let (lo, hi) = (round_index(S, false), round_index(S, true));
    // SAFETY: unaligned loads of 16 i32 from local arrays.
    let (lo, hi) = unsafe {
        (
            _mm512_loadu_si512(lo.as_ptr().cast()),
            _mm512_loadu_si512(hi.as_ptr().cast()),
        )
    };
    for i in 0..16 {
        if i & S == 0 {
            let (a, b) = (r[i], r[i + S]);
            r[i] = _mm512_permutex2var_ps(a, lo, b);
            r[i + S] = _mm512_permutex2var_ps(a, hi, b);
        }
    }
}

/// Transposes 16 registers of 16 lanes in four rounds (S = 8, 4, 2, 1).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn transpose16(r: &mut [std::arch::x86_64::__m512; 16]) {
    transpose_round::<8>(r);
    transpose_round::<4>(r);
    transpose_round::<2>(r);
    transpose_round::<1>(r);
}

/// The AVX-512 part of [`transpose_lines`]: the first `len / 16 * 16` values of every line,
/// whose count it returns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose_lines_avx512(dst: &mut [f32], width: usize, src: &[&[f32]], len: usize) -> usize {
    use std::arch::x86_64::*;
    let full = len / 16 * 16;
    for (j0, block) in src.chunks(16).enumerate().map(|(b, l)| (b * 16, l)) {
        let n = block.len();
        let mask: __mmask16 = ((1u32 << n) - 1) as __mmask16;
        for kk in (0..full).step_by(16) {
            let mut r = [_mm512_setzero_ps(); 16];
            for (v, l) in r.iter_mut().zip(block) {
                // SAFETY: 16 values of the line, whose length `len` is at least kk + 16.
                *v = unsafe { _mm512_loadu_ps(l[kk..kk + 16].as_ptr()) };
            }
            transpose16(&mut r);
            for (t, v) in r.iter().enumerate() {
                let out = &mut dst[(kk + t) * width + j0..][..n];
                // SAFETY: `n` lanes stored into a slice of `n` values.
                unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr(), mask, *v) };
            }
        }
    }
    full
}

/// `w [m, k]` (row-major) as whole-`K` A micro-panels of `mr` rows: `ceil(m / mr) * k * mr`
/// values.
pub(crate) fn prepack_rows(w: &[f32], m: usize, k: usize, mr: usize) -> Vec<f32> {
    let mut out = vec![0.0; m.div_ceil(mr) * k * mr];
    pack_rows_into(
        Strided {
            data: w,
            rs: k,
            cs: 1,
        },
        m,
        k,
        mr,
        &mut out,
    );
    out
}

/// The `[m, k]` matrix `a` as whole-`K` A micro-panels into `dst` (`ceil(m / mr) * k * mr`
/// values).
pub(crate) fn pack_rows_into(a: Strided<'_>, m: usize, k: usize, mr: usize, dst: &mut [f32]) {
    for (p, d) in dst
        .chunks_exact_mut(k * mr)
        .take(m.div_ceil(mr))
        .enumerate()
    {
        pack_a(a, p * mr, mr.min(m - p * mr), 0, k, mr, d);
    }
}

/// `w [n, k]` (row-major; the B operand is its transpose, `B[k, j] = w[j, k]`, as a linear
/// layer's weight) as whole-`K` B micro-panels of `nr` columns: `ceil(n / nr) * k * nr`
/// values.
pub(crate) fn prepack_cols(w: &[f32], n: usize, k: usize, nr: usize) -> Vec<f32> {
    let mut out = vec![0.0; n.div_ceil(nr) * k * nr];
    pack_cols_into(
        Strided {
            data: w,
            rs: 1,
            cs: k,
        },
        n,
        k,
        nr,
        &mut out,
    );
    out
}

/// The `[k, n]` matrix `b` as whole-`K` B micro-panels into `dst` (`ceil(n / nr) * k * nr`
/// values).
pub(crate) fn pack_cols_into(b: Strided<'_>, n: usize, k: usize, nr: usize, dst: &mut [f32]) {
    for (p, d) in dst
        .chunks_exact_mut(k * nr)
        .take(n.div_ceil(nr))
        .enumerate()
    {
        pack_b(b, 0, k, p * nr, nr.min(n - p * nr), nr, d);
    }
}

/// The geometry of a convolution's implicit B operand: rows `k = (c, ki, kj)` (the weight's
/// `[C, kh, kw]` order), columns `n = (image, oy, ox)` (the output's pixels of `images`
/// images stored one after the other, side by side in the columns). With `up == 2` the
/// convolution sees the `[C, H, W]` image upsampled by nearest neighbour to `2H x 2W`, read
/// from the small one (pixel `(y, x)` of the large image is `(y / 2, x / 2)`); `up` is 1 or 2.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvGeom {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub up: usize,
    pub kh: usize,
    pub kw: usize,
    pub params: Conv2dParams,
    pub ho: usize,
    pub wo: usize,
    /// Images in the source, each `[C, H, W]`; their output pixels follow one another.
    pub images: usize,
}

impl ConvGeom {
    /// Rows of the unfolded input.
    pub fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Columns of the unfolded input (output pixels of every image).
    pub fn n(&self) -> usize {
        self.images * self.ho * self.wo
    }
}

/// Packs rows `k0 .. k0 + kc` and pixels `n0 .. n0 + cols` of the unfolded image `x
/// [C, H, W]` into a B micro-panel, reading the image directly.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn pack_conv_b(
    x: &[f32],
    g: &ConvGeom,
    k0: usize,
    kc: usize,
    n0: usize,
    cols: usize,
    nr: usize,
    dst: &mut [f32],
) {
    let (sh, sw) = g.params.stride;
    let (ph, pw) = g.params.padding;
    let taps = g.kh * g.kw;
    // The pixel block as runs along output rows: (first column j, offset of the image in
    // `x`, oy, first ox, length).
    let mut runs = [(0_usize, 0_usize, 0_usize, 0_usize, 0_usize); 64];
    let mut n_runs = 0;
    let mut j = 0;
    let pixels = g.ho * g.wo;
    let image = g.c * g.h * g.w;
    while j < cols && n_runs < runs.len() {
        let (img, pixel) = ((n0 + j) / pixels, (n0 + j) % pixels);
        let (oy, ox) = (pixel / g.wo, pixel % g.wo);
        let len = (g.wo - ox).min(cols - j);
        runs[n_runs] = (j, img * image, oy, ox, len);
        n_runs += 1;
        j += len;
    }
    let runs = &runs[..n_runs];
    // The size of the image the convolution sees, and the shift from its coordinates to
    // the stored image's (`up` is 1 or 2).
    let (vh, vw) = (g.h * g.up, g.w * g.up);
    let shift = g.up.trailing_zeros();
    // (c, ki, kj) of row k0, then stepped along (no division per row).
    let (mut c, tap) = (k0 / taps, k0 % taps);
    let (mut ki, mut kj) = (tap / g.kw, tap % g.kw);
    for d in dst[..kc * nr].chunks_exact_mut(nr) {
        let channel = c * g.h * g.w;
        d[cols..].fill(0.0);
        for &(j0, at, oy, ox0, len) in runs {
            let plane = &x[at + channel..at + channel + g.h * g.w];
            let out = &mut d[j0..j0 + len];
            let iy = (oy * sh + ki) as isize - ph as isize;
            if iy < 0 || iy >= vh as isize {
                out.fill(0.0);
                continue;
            }
            let iy = iy as usize >> shift;
            let row = &plane[iy * g.w..(iy + 1) * g.w];
            // Input column of output column ox: ox * sw + kj - pw.
            let first = (ox0 * sw + kj) as isize - pw as isize;
            if sw == 1 && g.up == 1 {
                copy_clipped(out, row, first);
                // The next micro-panel reads the next `nr` values of these rows: dozens of
                // streams at once, more than the hardware prefetchers follow.
                let s = first.max(0) as usize;
                prefetch(row, s + nr);
                prefetch(row, s + nr + 16);
            } else if sw == 1 {
                // Upsampled (`up` is 2), stride 1.
                copy_clipped_doubled(out, row, first);
            } else {
                for (t, o) in out.iter_mut().enumerate() {
                    let ix = first + (t * sw) as isize;
                    *o = if ix < 0 || ix >= vw as isize {
                        0.0
                    } else {
                        row[ix as usize >> shift]
                    };
                }
            }
        }
        kj += 1;
        if kj == g.kw {
            kj = 0;
            ki += 1;
            if ki == g.kh {
                ki = 0;
                c += 1;
            }
        }
    }
}

/// `out[t] = row[first + t]` where `first + t` lies in `row`, zero elsewhere: a stretch of
/// an image row clipped at both borders.
#[inline(always)]
fn copy_clipped(out: &mut [f32], row: &[f32], first: isize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected.
        unsafe { copy_clipped_avx512(out, row, first) };
        return;
    }
    copy_clipped_scalar(out, row, first);
}

/// [`copy_clipped`] one value at a time.
#[inline(always)]
fn copy_clipped_scalar(out: &mut [f32], row: &[f32], first: isize) {
    let len = out.len() as isize;
    let lo = (-first).clamp(0, len) as usize;
    let hi = (row.len() as isize - first).clamp(0, len) as usize;
    out[..lo].fill(0.0);
    if hi > lo {
        let s = (first + lo as isize) as usize;
        // A loop, not copy_from_slice: a call to memmove per run of at most `nr` values
        // costs more than the copy.
        for (o, &v) in out[lo..hi].iter_mut().zip(&row[s..s + (hi - lo)]) {
            *o = v;
        }
    }
    out[hi.max(lo)..].fill(0.0);
}

/// `out[t] = row[(first + t) / 2]` where `first + t` lies in the row upsampled twice by
/// nearest neighbour (`0 .. 2 * row.len()`), zero elsewhere.
#[inline(always)]
fn copy_clipped_doubled(out: &mut [f32], row: &[f32], first: isize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected.
        unsafe { copy_clipped_doubled_avx512(out, row, first) };
        return;
    }
    copy_clipped_doubled_scalar(out, row, first);
}

/// [`copy_clipped_doubled`] one value at a time.
#[inline(always)]
fn copy_clipped_doubled_scalar(out: &mut [f32], row: &[f32], first: isize) {
    let len = out.len() as isize;
    let lo = (-first).clamp(0, len) as usize;
    let hi = (2 * row.len() as isize - first).clamp(0, len) as usize;
    out[..lo].fill(0.0);
    for (t, o) in out.iter_mut().enumerate().take(hi).skip(lo) {
        *o = row[(first + t as isize) as usize / 2];
    }
    out[hi.max(lo)..].fill(0.0);
}

/// The mask of lanes `from .. to` of 16 (`from <= to <= 16`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn lanes(from: usize, to: usize) -> u16 {
    (((1_u32 << to) - 1) & !((1_u32 << from) - 1)) as u16
}

/// [`copy_clipped`], 16 values a masked load and store (a masked-off lane reads no memory,
/// so the loads may start before the row or end after it).
///
/// # Safety
/// The CPU supports AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn copy_clipped_avx512(out: &mut [f32], row: &[f32], first: isize) {
    use std::arch::x86_64::*;
    let (len, width) = (out.len(), row.len() as isize);
    for t in (0..len).step_by(16) {
        let n = (len - t).min(16) as isize;
        let start = first + t as isize;
        let lo = (-start).clamp(0, n) as usize;
        let hi = (width - start).clamp(0, n) as usize;
        // SAFETY: the loaded lanes are those of `row[start + lo .. start + hi]`, inside
        // `row`; masked-off lanes are not read (the pointer to them is never dereferenced);
        // the store covers `out[t .. t + n]`.
        unsafe {
            let v = _mm512_maskz_loadu_ps(lanes(lo, hi), row.as_ptr().wrapping_offset(start));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(t), lanes(0, n as usize), v);
        }
    }
}

/// [`copy_clipped_doubled`]: each 16 values come from 9 loaded ones, each twice
/// (`vpermps`).
///
/// # Safety
/// The CPU supports AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn copy_clipped_doubled_avx512(out: &mut [f32], row: &[f32], first: isize) {
    use std::arch::x86_64::*;
    let (len, width) = (out.len(), row.len() as isize);
    // Lane i of 16 starting at an even (odd) position reads loaded value i / 2 ((i + 1) / 2).
    let even = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    let odd = _mm512_setr_epi32(0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8);
    let span = |from: isize, to: isize, most: isize| {
        lanes(from.clamp(0, most) as usize, to.clamp(0, most) as usize)
    };
    for t in (0..len).step_by(16) {
        let n = (len - t).min(16) as isize;
        let start = first + t as isize;
        let valid = span(-start, 2 * width - start, n);
        let base = start.div_euclid(2);
        let loaded = span(-base, width - base, 9);
        let order = if start.rem_euclid(2) == 0 { even } else { odd };
        // SAFETY: the loaded lanes are those of `row[base + from .. base + to]`, inside
        // `row`; a valid lane's value index lies in `row`, so it was loaded; the store covers
        // `out[t .. t + n]`.
        unsafe {
            let v = _mm512_maskz_loadu_ps(loaded, row.as_ptr().wrapping_offset(base));
            let doubled = _mm512_maskz_permutexvar_ps(valid, order, v);
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(t), lanes(0, n as usize), doubled);
        }
    }
}

/// Asks for the cache line holding `data[at]` (nothing past the slice's end).
#[inline(always)]
fn prefetch(data: &[f32], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if at < data.len() {
        // SAFETY: prefetching has no effect on memory or on the program's state; the address
        // is inside the slice anyway.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                data.as_ptr().add(at).cast(),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at);
}

/// `x` rounded to bfloat16 (to nearest, ties to even; NaN stays NaN), as its 16 bits.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        (b >> 16) | 0x40
    } else {
        (b + 0x7fff + ((b >> 16) & 1)) >> 16
    }
}

/// An f32 micro-panel of `kc` groups of `width` values as bf16 pairs: `kc.div_ceil(2)`
/// groups of `width` `u32`, each holding groups `2p` (low half) and `2p + 1` (high half) of
/// the same position; a missing last group is zero.
///
/// Where the CPU converts to bf16 itself (AVX512-BF16 with AVX512BW), it does, 16 values
/// an instruction: the same bits as [`bf16_bits`] but for subnormal values, which become
/// zero (as `vdpbf16ps`, the only reader of these pairs, reads subnormals anyway).
#[inline(always)]
pub(crate) fn pair_panel(src: &[f32], kc: usize, width: usize, dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512bf16")
    {
        // SAFETY: the features were detected.
        unsafe { pair_panel_avx512(src, kc, width, dst) };
        return;
    }
    pair_panel_scalar(src, kc, width, dst);
}

/// [`pair_panel`] with AVX512-BF16's conversion: two vectors of 16 f32 (rows `2p` and
/// `2p + 1`) become 32 bf16 (`vcvtne2ps2bf16`), interleaved into 16 pairs (`vpermw`).
///
/// # Safety
/// The CPU supports AVX-512F, AVX512BW and AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pair_panel_avx512(src: &[f32], kc: usize, width: usize, dst: &mut [u32]) {
    use std::arch::x86_64::*;
    let pairs = kc.div_ceil(2);
    let (src, dst) = (&src[..kc * width], &mut dst[..pairs * width]);
    // Word 2j of the result is word j (row 2p, value j), word 2j + 1 is word 16 + j (row
    // 2p + 1, value j).
    let order: [i16; 32] = std::array::from_fn(|i| (i / 2 + 16 * (i % 2)) as i16);
    // SAFETY: `order` holds 64 bytes.
    let order = unsafe { _mm512_loadu_si512(order.as_ptr().cast()) };
    for (p, d) in dst.chunks_exact_mut(width).enumerate() {
        let even = &src[2 * p * width..(2 * p + 1) * width];
        let odd = src.get((2 * p + 1) * width..(2 * p + 2) * width);
        for j in (0..width).step_by(16) {
            let mask = lanes(0, (width - j).min(16));
            // SAFETY: the masks keep the loads inside `even` and `odd` and the store inside
            // `d`, all `width` values long from `j`.
            unsafe {
                let e = _mm512_maskz_loadu_ps(mask, even.as_ptr().add(j));
                let o = match odd {
                    Some(odd) => _mm512_maskz_loadu_ps(mask, odd.as_ptr().add(j)),
                    None => _mm512_setzero_ps(),
                };
                let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(o, e));
                let paired = _mm512_permutexvar_epi16(order, both);
                _mm512_mask_storeu_epi32(d.as_mut_ptr().add(j).cast(), mask, paired);
            }
        }
    }
}

/// [`pair_panel`] one value at a time, with [`bf16_bits`].
#[inline(always)]
fn pair_panel_scalar(src: &[f32], kc: usize, width: usize, dst: &mut [u32]) {
    let pairs = kc.div_ceil(2);
    for (p, d) in dst[..pairs * width].chunks_exact_mut(width).enumerate() {
        let even = &src[2 * p * width..(2 * p + 1) * width];
        if 2 * p + 1 < kc {
            let odd = &src[(2 * p + 1) * width..(2 * p + 2) * width];
            for ((d, &e), &o) in d.iter_mut().zip(even).zip(odd) {
                *d = bf16_bits(e) | (bf16_bits(o) << 16);
            }
        } else {
            for (d, &e) in d.iter_mut().zip(even) {
                *d = bf16_bits(e);
            }
        }
    }
}

/// A whole-`K` f32 packing (of [`prepack_rows`] or [`prepack_cols`], panels of `width`) as
/// bf16 pairs: each panel's `k` groups become `k.div_ceil(2)` pair groups.
pub(crate) fn pair_packing(packed: &[f32], k: usize, width: usize) -> Vec<u32> {
    let panels = packed.len() / (k * width).max(1);
    let pairs = k.div_ceil(2);
    let mut out = vec![0_u32; panels * pairs * width];
    for (src, dst) in packed
        .chunks_exact(k * width)
        .zip(out.chunks_exact_mut(pairs * width))
    {
        pair_panel(src, k, width, dst);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU's conversion gives the bits of `bf16_bits` (rounding to nearest even, ties
    /// included, infinities, signed zeros) on every width and an odd or even `kc`; a
    /// subnormal becomes a zero of its sign.
    #[test]
    fn paired_panels_match_the_definition() {
        let special = [
            0.0,
            -0.0,
            1.0,
            -1.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            // Exactly halfway between two bf16 values, below and above an even one.
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x3f80_7fff),
        ];
        for width in [12, 16, 32] {
            for kc in [1, 2, 7, 8, 33] {
                let src: Vec<f32> = (0..kc * width)
                    .map(|i| match i % 5 {
                        0 => special[i / 5 % special.len()],
                        _ => ((i as f32) * 0.618).sin() * 1e3_f32.powi((i % 7) as i32 - 3),
                    })
                    .collect();
                let pairs = kc.div_ceil(2);
                let mut fast = vec![7_u32; pairs * width + 3];
                let mut slow = fast.clone();
                pair_panel(&src, kc, width, &mut fast);
                pair_panel_scalar(&src, kc, width, &mut slow);
                assert_eq!(fast, slow, "width {width}, kc {kc}");
            }
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            let tiny = [f32::from_bits(1), -f32::from_bits(0x7f_ffff)];
            let mut d = [0_u32; 16];
            pair_panel(&[tiny[0]; 16], 1, 16, &mut d);
            assert_eq!(d, [0; 16]);
            pair_panel(&[tiny[1]; 16], 1, 16, &mut d);
            assert_eq!(d, [0x8000; 16]);
        }
    }

    /// Both ways of copying a clipped stretch of a row, plain and upsampled, give the
    /// definition's values for stretches starting before, inside and after the row and
    /// ending before, inside and after it, over lengths around the 16-value blocks.
    #[test]
    fn clipped_row_copies_match_the_definition() {
        let row: Vec<f32> = (1..=21).map(|v| v as f32).collect();
        let width = row.len() as isize;
        for len in [1, 5, 15, 16, 17, 32, 40] {
            for first in -45..50_isize {
                let plain: Vec<f32> = (0..len as isize)
                    .map(|t| match first + t {
                        i if (0..width).contains(&i) => row[i as usize],
                        _ => 0.0,
                    })
                    .collect();
                let doubled: Vec<f32> = (0..len as isize)
                    .map(|t| match first + t {
                        i if (0..2 * width).contains(&i) => row[i as usize / 2],
                        _ => 0.0,
                    })
                    .collect();
                let mut out = vec![f32::NAN; len];
                copy_clipped_scalar(&mut out, &row, first);
                assert_eq!(out, plain, "scalar, first {first}, len {len}");
                out.fill(f32::NAN);
                copy_clipped_doubled_scalar(&mut out, &row, first);
                assert_eq!(out, doubled, "scalar doubled, first {first}, len {len}");
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx512f") {
                    out.fill(f32::NAN);
                    // SAFETY: AVX-512F was detected.
                    unsafe { copy_clipped_avx512(&mut out, &row, first) };
                    assert_eq!(out, plain, "AVX-512, first {first}, len {len}");
                    out.fill(f32::NAN);
                    // SAFETY: as above.
                    unsafe { copy_clipped_doubled_avx512(&mut out, &row, first) };
                    assert_eq!(out, doubled, "AVX-512 doubled, first {first}, len {len}");
                }
            }
        }
    }

    /// Every line length around the 16-value blocks, every line count up to the widest
    /// panel, in groups as wide as each kernel's: the values land where the definition puts
    /// them, and nothing else in `dst` is touched.
    #[test]
    fn transposed_lines_land_in_their_lanes() {
        for width in [6usize, 12, 16, 32] {
            for lines in 1..=width {
                for len in [1usize, 3, 15, 16, 17, 31, 32, 33, 50] {
                    let src: Vec<Vec<f32>> = (0..lines)
                        .map(|j| (0..len + 5).map(|k| (j * 1000 + k) as f32).collect())
                        .collect();
                    let mut dst = vec![-1.0f32; len * width + 7];
                    transpose_lines(&mut dst, width, lines, len, |j| &src[j][2..]);
                    for (i, &v) in dst.iter().enumerate() {
                        let (kk, j) = (i / width, i % width);
                        let expected = if kk < len && j < lines {
                            src[j][2 + kk]
                        } else {
                            -1.0
                        };
                        assert_eq!(v, expected, "width {width}, {lines} lines of {len}, at {i}");
                    }
                }
            }
        }
    }
}

//! Direct convolution on channel-blocked images, the way oneDNN's brgemm convolutions and
//! Georganas et al. ("Anatomy of High-Performance Deep Learning Convolutions on SIMD
//! Architectures", 2018) run them: the product is turned around,
//! `out^T [pixels, O] = X [pixels, K] W^T [K, O]`, so that the vectors run along output
//! channels (the weight, packed once like a linear layer's) and the values broadcast are
//! the input's, read where they lie: no operand is packed while the product runs.
//!
//! For that the input is first copied once into a channel-blocked layout
//! `[C / CB][images][rows][Wp][CB]` (the padded image's rows, or a band of them for a large
//! image, [`Band`]) with its zero padding (and a nearest upsampling) written out: the [`CB`] channels of one pixel are 128 contiguous bytes (64 as bf16 pairs), so a
//! row of the product's A operand, the unfolded input of one output pixel, is a run of such
//! blocks at offsets that depend only on the tap ([`BlockedImage`]). `K` runs in the order
//! (channel block, tap, channel within the block), and the weight is reordered to match
//! ([`taps_first`]). The result, `[pixels, O]`, is transposed into the output's `[O,
//! pixels]` afterwards ([`channels_out`]); both copies move each activation value once,
//! where packing the unfolded input moved it once per tap and per block of output
//! channels.

use rayon::prelude::*;

use super::pack::{ConvGeom, pair_panel, transpose_lines};
#[cfg(target_arch = "x86_64")]
use super::pack::{lanes, transpose16};
use super::{ASource, BSource, CPtr, CpuIsa, CpuPrecision, Panels, Product, Start, run};
use crate::cpu::pool;
use crate::cpu::threads;

/// Channels per block.
pub(crate) const CB: usize = 32;

/// Whether a convolution with `c` input channels and a `kh x kw` kernel runs directly on a
/// channel-blocked image (and its weight is packed for it): AVX-512 kernels, whole channel
/// blocks, more than one tap (a 1x1 convolution reads the image as it is).
pub(crate) fn runs_direct(isa: CpuIsa, c: usize, kh: usize, kw: usize) -> bool {
    isa == CpuIsa::Avx512 && c > 0 && c.is_multiple_of(CB) && kh * kw > 1
}

/// The position of weight value `(channel, tap)` in a row of `K` ordered (channel block,
/// tap, channel within the block).
fn taps_first_index(channel: usize, tap: usize, taps: usize) -> usize {
    ((channel / CB) * taps + tap) * CB + channel % CB
}

/// `w [O, C, taps]` with every row's `K` in the direct convolution's order.
pub(crate) fn taps_first(w: &[f32], c: usize, taps: usize) -> Vec<f32> {
    let k = c * taps;
    let mut out = vec![0.0; w.len()];
    for (src, dst) in w.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        for (channel, values) in src.chunks_exact(taps).enumerate() {
            for (tap, &v) in values.iter().enumerate() {
                dst[taps_first_index(channel, tap, taps)] = v;
            }
        }
    }
    out
}

/// The inverse of [`taps_first`].
pub(crate) fn channels_first(w: &[f32], c: usize, taps: usize) -> Vec<f32> {
    let k = c * taps;
    let mut out = vec![0.0; w.len()];
    for (src, dst) in w.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        for (channel, values) in dst.chunks_exact_mut(taps).enumerate() {
            for (tap, v) in values.iter_mut().enumerate() {
                *v = src[taps_first_index(channel, tap, taps)];
            }
        }
    }
    out
}

/// The A operand of a direct convolution: row `p` (output pixel `p`), block `q` of [`CB`]
/// values of `K` (channel block and tap) is `data[pixels[p] + chunks[q]..][..CB]`, f32
/// values or (bf16 products) `CB / 2` pairs stored in f32 slots.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvRows<'a> {
    pub data: &'a [f32],
    pub pixels: &'a [usize],
    pub chunks: &'a [usize],
}

/// The bytes a band's copy of the input and its transposed result take together at most
/// (unless a single output row takes more): the copies stay in the buffer pool and the
/// last-level cache, and a large image (the VAE's, 512 pixels wide) is not copied whole.
pub(crate) const BAND_BYTES: usize = 24 << 20;

/// Output rows `oy0 .. oy1` of images `img0 .. img0 + images`: every row of the batch, or
/// some rows of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Band {
    pub img0: usize,
    pub images: usize,
    pub oy0: usize,
    pub oy1: usize,
}

impl Band {
    /// The bands a convolution of geometry `g` (`g.images` images) with `o` output
    /// channels runs in, each within `budget` bytes ([`BAND_BYTES`]).
    pub(crate) fn split(g: &ConvGeom, o: usize, budget: usize) -> Vec<Band> {
        let (sh, _) = g.params.stride;
        let wp = g.w * g.up + 2 * g.params.padding.1;
        // Bytes per output row: its results, and the input rows it adds to the copy.
        let per_row = 4 * (g.wo * o + sh * wp * g.c);
        let rows = (budget / per_row).max(1);
        if g.images * g.ho <= rows {
            return vec![Band {
                img0: 0,
                images: g.images,
                oy0: 0,
                oy1: g.ho,
            }];
        }
        (0..g.images)
            .flat_map(|img| {
                (0..g.ho).step_by(rows).map(move |oy0| Band {
                    img0: img,
                    images: 1,
                    oy0,
                    oy1: (oy0 + rows).min(g.ho),
                })
            })
            .collect()
    }

    /// Output pixels.
    pub(crate) fn pixels(&self, g: &ConvGeom) -> usize {
        self.images * (self.oy1 - self.oy0) * g.wo
    }
}

/// A band of a batch of images copied channel-blocked and padded for a direct convolution,
/// with the offsets [`ConvRows`] reads them by.
#[derive(Debug)]
pub(crate) struct BlockedImage {
    data: Vec<f32>,
    pixels: Vec<usize>,
    chunks: Vec<usize>,
}

impl BlockedImage {
    /// The input rows that band `band` of a convolution of geometry `g` reads, from the
    /// images `[C, H, W]` in `x` (`C` a multiple of [`CB`]), upsampled `g.up` times and
    /// padded, in f32 or as bf16 pairs (`bf16`): `[C / CB][band.images][rows][Wp][CB]`.
    pub(crate) fn new(x: &[f32], g: &ConvGeom, band: Band, bf16: bool) -> Self {
        let (sh, sw) = g.params.stride;
        let wp = g.w * g.up + 2 * g.params.padding.1;
        // Padded rows from `top` on.
        let top = band.oy0 * sh;
        let rows = (band.oy1 - band.oy0 - 1) * sh + g.kh;
        let plane = band.images * rows * wp;
        // Values a pixel's block takes.
        let slot = if bf16 { CB / 2 } else { CB };
        let mut data = pool::take(g.c / CB * plane * slot);
        let image = g.c * g.h * g.w;
        data.par_chunks_mut(rows * wp * slot)
            .enumerate()
            .for_each(|(i, dst)| {
                let (block, img) = (i / band.images, band.img0 + i % band.images);
                let x = &x[img * image + block * CB * g.h * g.w..][..CB * g.h * g.w];
                fill_block(x, g, top, bf16, dst);
            });
        let band_rows = band.oy1 - band.oy0;
        let pixels = (0..band.pixels(g))
            .map(|p| {
                let (img, pixel) = (p / (band_rows * g.wo), p % (band_rows * g.wo));
                let (oy, ox) = (pixel / g.wo, pixel % g.wo);
                ((img * rows + oy * sh) * wp + ox * sw) * slot
            })
            .collect();
        let taps = g.kh * g.kw;
        let chunks = (0..g.c / CB * taps)
            .map(|q| {
                let (block, tap) = (q / taps, q % taps);
                (block * plane + (tap / g.kw) * wp + tap % g.kw) * slot
            })
            .collect();
        BlockedImage {
            data,
            pixels,
            chunks,
        }
    }

    /// The product's A operand.
    pub(crate) fn rows(&self) -> ConvRows<'_> {
        ConvRows {
            data: &self.data,
            pixels: &self.pixels,
            chunks: &self.chunks,
        }
    }

    /// Gives the copy's buffer back to the pool.
    pub(crate) fn recycle(self) {
        pool::give(self.data);
    }
}

/// One channel block of one image: `x` holds its [`CB`] channels `[CB, H, W]`, `dst` the
/// padded rows from `top` on, `[rows][Wp]` pixels of `CB` values (or `CB / 2` bf16 pairs).
fn fill_block(x: &[f32], g: &ConvGeom, top: usize, bf16: bool, dst: &mut [f32]) {
    let (ph, pw) = g.params.padding;
    let (w, wp) = (g.w, g.w * g.up + 2 * pw);
    let slot = if bf16 { CB / 2 } else { CB };
    let row_len = wp * slot;
    // One source row as pixels, where it has to be repeated (upsampling).
    let mut pixels = vec![0.0_f32; if g.up > 1 { w * slot } else { 0 }];
    let (mut lines, mut pairs) = if bf16 {
        (vec![0.0_f32; CB * w], vec![0_u32; CB / 2 * w])
    } else {
        (Vec::new(), Vec::new())
    };
    let mut previous = None;
    for y in 0..dst.len() / row_len {
        let py = top + y;
        if py < ph || py >= ph + g.h * g.up {
            dst[y * row_len..][..row_len].fill(0.0);
            continue;
        }
        let sy = (py - ph) / g.up;
        // An upsampled row repeats the one above it.
        if let Some((prev_y, prev_sy)) = previous
            && prev_sy == sy
        {
            dst.copy_within(prev_y * row_len..(prev_y + 1) * row_len, y * row_len);
            previous = Some((y, sy));
            continue;
        }
        previous = Some((y, sy));
        let row = &mut dst[y * row_len..][..row_len];
        row[..pw * slot].fill(0.0);
        row[(wp - pw) * slot..].fill(0.0);
        let line = |j: usize| &x[(j * g.h + sy) * w..][..w];
        // Without upsampling the pixels land in place; else in `pixels`, then repeated.
        let target = if g.up == 1 {
            &mut row[pw * slot..][..w * slot]
        } else {
            &mut pixels[..]
        };
        if bf16 {
            for (j, l) in lines.chunks_exact_mut(w).enumerate() {
                l.copy_from_slice(line(j));
            }
            pair_panel(&lines, CB, w, &mut pairs);
            let pairs = as_f32(&pairs);
            transpose_lines(target, slot, slot, w, |j| &pairs[j * w..][..w]);
        } else {
            transpose_lines(target, slot, slot, w, line);
        }
        if g.up > 1 {
            for (out, px) in row[pw * slot..][..w * g.up * slot]
                .chunks_exact_mut(g.up * slot)
                .zip(pixels.chunks_exact(slot))
            {
                for o in out.chunks_exact_mut(slot) {
                    o.copy_from_slice(px);
                }
            }
        }
    }
}

/// bf16 pairs seen as f32 slots of the same bits (moved, never computed with).
fn as_f32(v: &[u32]) -> &[f32] {
    // SAFETY: u32 and f32 have the same size and alignment, and every bit pattern is an
    // f32; the slice borrows `v`.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) }
}

/// A direct convolution to run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Direct<'a> {
    /// The images `[g.images, C, H, W]`.
    pub x: &'a [f32],
    pub geom: ConvGeom,
    /// Output channels.
    pub o: usize,
    /// The weight packed as [`taps_first`], then [`super::pack::prepack_cols`], in
    /// `precision`.
    pub weight: Panels<'a>,
    pub bias: Option<&'a [f32]>,
    pub precision: CpuPrecision,
}

/// Runs `d` into `out` (`[images, o, ho, wo]`, every value written), band by band within
/// `budget` bytes of copies.
///
/// # Safety
/// `isa` is AVX-512 and supported (and AVX512-BF16 for bf16); the weight was packed for
/// it in `d.precision`, for the geometry's K; the bias holds `o` values.
pub(crate) unsafe fn convolve(isa: CpuIsa, d: &Direct<'_>, budget: usize, out: &mut [f32]) {
    let g = &d.geom;
    for band in Band::split(g, d.o, budget) {
        let image = BlockedImage::new(d.x, g, band, d.precision == CpuPrecision::Bf16);
        let m = band.pixels(g);
        let mut transposed = pool::take(m * d.o);
        let p = Product {
            m,
            n: d.o,
            k: g.k(),
            a: ASource::Rows(image.rows()),
            b: BSource::Packed(d.weight),
            start: d.bias.map_or(Start::Zero, Start::ColBias),
            precision: d.precision,
        };
        // SAFETY: the product writes `[m, o]` into `transposed`; the band was blocked for
        // this geometry and precision, with K in the weight's order; the rest is the
        // caller's contract.
        unsafe { run(isa, &[p], &[transposed.as_mut_ptr()], d.o, threads()) };
        image.recycle();
        channels_out(&transposed, d.o, band, g, out);
        pool::give(transposed);
    }
}

/// A band's result `[band pixels, o]` (`src`) into its place in the output `[images, o,
/// ho * wo]` (`out`) of a convolution of geometry `g`, in blocks of 16 x 16 values.
pub(crate) fn channels_out(src: &[f32], o: usize, band: Band, g: &ConvGeom, out: &mut [f32]) {
    const BLOCK: usize = 16;
    let per_image = (band.oy1 - band.oy0) * g.wo;
    let (plane, at) = (g.ho * g.wo, band.oy0 * g.wo);
    assert!(src.len() >= band.images * per_image * o);
    assert!(out.len() >= (band.img0 + band.images) * o * plane);
    let blocks = o.div_ceil(BLOCK);
    let out = CPtr(out.as_mut_ptr());
    (0..band.images * blocks).into_par_iter().for_each(|t| {
        let (img, o0) = (t / blocks, (t % blocks) * BLOCK);
        let width = BLOCK.min(o - o0);
        for p0 in (0..per_image).step_by(BLOCK) {
            let rows = BLOCK.min(per_image - p0);
            let from = &src[(img * per_image + p0) * o + o0..];
            let to = out.at(((band.img0 + img) * o + o0) * plane + at + p0);
            // SAFETY: task (img, o0) writes only channels o0 .. o0 + width of its image,
            // and of them the band's pixels from p0 for `rows`, inside `out` (asserted
            // above); `from` holds `rows` rows of `o` values from column o0.
            unsafe { transpose_block(from, o, rows, width, to, plane) };
        }
    });
}

/// Writes `to[j * ld_to + i] = from[i * ld_from + j]` for `i < rows`, `j < cols` (both at
/// most 16).
///
/// # Safety
/// `from` holds `(rows - 1) * ld_from + cols` values; `to` addresses `cols` writable rows of
/// `rows` values `ld_to` apart.
unsafe fn transpose_block(
    from: &[f32],
    ld_from: usize,
    rows: usize,
    cols: usize,
    to: *mut f32,
    ld_to: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if CpuIsa::Avx512.is_supported() {
        // SAFETY: the CPU has AVX-512F; the rest is the caller's contract.
        unsafe { transpose_block_avx512(from, ld_from, rows, cols, to, ld_to) };
        return;
    }
    for i in 0..rows {
        for j in 0..cols {
            // SAFETY: the caller's contract.
            unsafe { *to.add(j * ld_to + i) = from[i * ld_from + j] };
        }
    }
}

/// [`transpose_block`] in registers: masked loads of the rows, [`transpose16`], masked
/// stores of the columns.
///
/// # Safety
/// As [`transpose_block`], and the CPU supports AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_block_avx512(
    from: &[f32],
    ld_from: usize,
    rows: usize,
    cols: usize,
    to: *mut f32,
    ld_to: usize,
) {
    use std::arch::x86_64::*;
    let mut r = [_mm512_setzero_ps(); 16];
    for (i, v) in r.iter_mut().enumerate().take(rows) {
        let row = &from[i * ld_from..];
        // SAFETY: the mask keeps the load to the row's first `cols` values.
        *v = unsafe { _mm512_maskz_loadu_ps(lanes(0, cols.min(row.len())), row.as_ptr()) };
    }
    transpose16(&mut r);
    for (j, v) in r.iter().enumerate().take(cols) {
        // SAFETY: the caller's contract; the mask keeps the store to `rows` values.
        unsafe { _mm512_mask_storeu_ps(to.add(j * ld_to), lanes(0, rows), *v) };
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::backend::Conv2dParams;
    use crate::cpu::PackedData;
    use crate::cpu::packed::pack::{bf16_bits, prepack_cols};

    fn data(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * 0.618 + seed).sin()).collect()
    }

    /// Bands of a few rows (the budget of a large image, scaled down to small ones) give
    /// the same bits as one band, and both the direct sums of the convolution: with
    /// upsampling, stride 2, uneven padding, batches, output channels past a vector.
    #[test]
    fn bands_convolve_as_the_whole() {
        let isa = CpuIsa::Avx512;
        if !isa.is_supported() {
            return;
        }
        let mut precisions = vec![CpuPrecision::F32];
        if CpuPrecision::bf16_supported() {
            precisions.push(CpuPrecision::Bf16);
        }
        for precision in precisions {
            for &(n, c, h, w, o, stride, pad, up) in &[
                (2, 32, 7, 9, 5, (1, 1), (1, 1), 1),
                (1, 64, 9, 6, 37, (2, 2), (1, 0), 1),
                (3, 32, 4, 5, 33, (1, 1), (1, 1), 2),
                (1, 32, 10, 3, 8, (1, 2), (0, 2), 1),
            ] {
                let params = Conv2dParams {
                    stride,
                    padding: pad,
                };
                let (ho, wo) = params.output_size(h * up, w * up, 3, 3).unwrap();
                let geom = ConvGeom {
                    c,
                    h,
                    w,
                    up,
                    kh: 3,
                    kw: 3,
                    params,
                    ho,
                    wo,
                    images: n,
                };
                let x = data(n * c * h * w, 0.3);
                let wt = data(o * c * 9, 0.7);
                let bias = data(o, 0.1);
                let packed = PackedData::in_precision(
                    prepack_cols(&taps_first(&wt, c, 9), o, c * 9, isa.nr()),
                    c * 9,
                    isa.nr(),
                    precision,
                );
                let d = Direct {
                    x: &x,
                    geom,
                    o,
                    weight: packed.panels(),
                    bias: Some(&bias),
                    precision,
                };
                let run_with = |budget: usize| {
                    let mut out = vec![f32::NAN; n * o * ho * wo];
                    unsafe { convolve(isa, &d, budget, &mut out) };
                    out
                };
                // One output row per band, two, and everything at once.
                let per_row = 4 * (wo * o + stride.0 * (w * up + 2 * pad.1) * c);
                assert!(Band::split(&geom, o, per_row).len() == n * ho);
                let whole = run_with(BAND_BYTES);
                assert_eq!(Band::split(&geom, o, BAND_BYTES).len(), 1);
                assert_eq!(run_with(per_row), whole);
                assert_eq!(run_with(2 * per_row), whole);
                let seen = |v: f32| match precision {
                    CpuPrecision::F32 => f64::from(v),
                    CpuPrecision::Bf16 => f64::from(f32::from_bits(bf16_bits(v) << 16)),
                };
                for img in 0..n {
                    for oc in 0..o {
                        for oy in 0..ho {
                            for ox in 0..wo {
                                let mut want = f64::from(bias[oc]);
                                for ch in 0..c {
                                    for t in 0..9 {
                                        let iy = (oy * stride.0 + t / 3) as isize - pad.0 as isize;
                                        let ix = (ox * stride.1 + t % 3) as isize - pad.1 as isize;
                                        if iy < 0
                                            || ix < 0
                                            || iy as usize >= h * up
                                            || ix as usize >= w * up
                                        {
                                            continue;
                                        }
                                        let (sy, sx) = (iy as usize / up, ix as usize / up);
                                        want += seen(x[((img * c + ch) * h + sy) * w + sx])
                                            * seen(wt[(oc * c + ch) * 9 + t]);
                                    }
                                }
                                let got = whole[((img * o + oc) * ho + oy) * wo + ox];
                                let tol = 1e-5 * (c as f64 * 9.0).sqrt() * (1.0 + want.abs());
                                assert!(
                                    (f64::from(got) - want).abs() <= tol,
                                    "{precision:?} image {img} channel {oc} ({oy}, {ox}): {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

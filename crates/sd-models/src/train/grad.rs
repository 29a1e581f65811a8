//! The backward primitives: for an operation `y = f(x, params)` and the gradient `dy` of a
//! loss with respect to `y`, the gradients with respect to `x` and the parameters. All on
//! row-major `f32` slices (images `[N, C, H, W]`), with sums of many terms accumulated in
//! `f64` where the count is large, and the products of matrices on the CPU backend's packed
//! GEMM (`cpu::add_product`, the one the LoRA merge uses).

use rayon::prelude::*;

use crate::cpu::{MatRef, Threads, Windows};
use crate::error::{Error, Result};

fn shape_error(op: &'static str, expected: String, found: String) -> Error {
    Error::Shape {
        op,
        expected,
        found,
    }
}

fn check_len(op: &'static str, what: &str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(shape_error(
            op,
            format!("{what} of {expected} values"),
            format!("{len}"),
        ))
    }
}

/// A 2-D convolution's sizes: input `[n, c_in, h, w]`, weight `[c_out, c_in, k, k]`, stride
/// and zero padding on each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    /// Batch.
    pub n: usize,
    /// Input channels.
    pub c_in: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub c_out: usize,
    /// Kernel side.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Padding on each side.
    pub padding: usize,
}

impl ConvShape {
    /// The output's `(height, width)`.
    pub fn out_hw(&self) -> (usize, usize) {
        let out =
            |side: usize| (side + 2 * self.padding).saturating_sub(self.k) / self.stride.max(1) + 1;
        (out(self.h), out(self.w))
    }

    /// The range of output positions `o` along one side for which the input position
    /// `o * stride + offset - padding` lies inside `0..side`.
    fn valid(&self, out: usize, side: usize, offset: usize) -> std::ops::Range<usize> {
        let s = self.stride.max(1) as isize;
        let shift = offset as isize - self.padding as isize;
        // o * s + shift >= 0  and  o * s + shift < side
        let lo = if shift >= 0 {
            0
        } else {
            ((-shift) + s - 1) / s
        };
        let hi = ((side as isize - shift) + s - 1)
            .div_euclid(s)
            .clamp(0, out as isize);
        (lo as usize).min(hi as usize)..hi as usize
    }
}

/// The gradients of a 2-D convolution (PyTorch's `conv2d`, cross-correlation) for `x`
/// `[n, c_in, h, w]`, `weight` `[c_out, c_in, k, k]` and `dy` `[n, c_out, oh, ow]`: `(dx,
/// dweight, dbias)`.
///
/// Every gradient is computed for the whole batch at once on the packed GEMM. For stride 1
/// `dweight` and `dx` are each one product whose operand is the taps' shifted
/// views of the zero-padded input or output gradient (no columns). For a larger stride the
/// input is unfolded once (im2col, `[c_in k k, n oh ow]`): `dweight = dy [c_out, n oh ow] @
/// columns^T`, and the columns' gradient `weight^T @ dy` is scattered back onto the input
/// (col2im).
///
/// # Errors
/// [`Error::Shape`] for slices of other lengths than `shape` gives.
pub fn conv2d_backward(
    shape: ConvShape,
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let ConvShape {
        n,
        c_in,
        h,
        w,
        c_out,
        k,
        stride,
        padding,
    } = shape;
    if h == 0 || w == 0 || k == 0 || stride == 0 || k > h + 2 * padding || k > w + 2 * padding {
        return Err(shape_error(
            "conv2d_backward",
            "a non-empty image at least as large as the kernel (with its padding), a stride".into(),
            format!("{shape:?}"),
        ));
    }
    let (oh, ow) = shape.out_hw();
    let (plane, kk) = (oh * ow, c_in * k * k);
    check_len("conv2d_backward", "x", x.len(), n * c_in * h * w)?;
    check_len("conv2d_backward", "weight", weight.len(), c_out * kk)?;
    check_len("conv2d_backward", "dy", dy.len(), n * c_out * plane)?;
    let cols_n = n * plane;
    if cols_n == 0 || kk == 0 {
        return Ok((
            vec![0.0; x.len()],
            vec![0.0; weight.len()],
            vec![0.0; c_out],
        ));
    }
    let isa = crate::cpu::CpuIsa::detect();
    let db = (0..c_out)
        .into_par_iter()
        .map(|o| {
            (0..n)
                .map(|b| {
                    let values = &dy[(b * c_out + o) * plane..][..plane];
                    crate::cpu::math::dispatch!(isa, crate::cpu::norm::sum_blocks(values, |v| v))
                })
                .sum::<f64>() as f32
        })
        .collect();
    if stride == 1 {
        let grid = PaddedGrid::new(shape);
        return Ok((grid.input_grad(weight, dy)?, grid.weight_grad(x, dy)?, db));
    }
    // dy as [c_out, n * plane].
    let mut dy_c = crate::cpu::pool::take(dy.len());
    dy_c.par_chunks_mut(cols_n)
        .enumerate()
        .for_each(|(o, row)| {
            for (b, part) in row.chunks_exact_mut(plane).enumerate() {
                part.copy_from_slice(&dy[(b * c_out + o) * plane..][..plane]);
            }
        });
    let mut cols = crate::cpu::pool::zeroed(kk * cols_n);
    im2col(shape, x, &mut cols);
    // dweight [c_out, kk] = dy [c_out, n plane] @ columns^T [n plane, kk].
    let mut dw = vec![0.0f32; c_out * kk];
    crate::cpu::add_product_of(
        MatRef::new(&dy_c, c_out, cols_n),
        MatRef::new(&cols, kk, cols_n).t(),
        &mut dw,
        Threads::Pool,
    )?;
    // The columns' gradient [kk, n plane] = weight^T [kk, c_out] @ dy [c_out, n plane], in
    // the columns' buffer, then scattered.
    cols.fill(0.0);
    crate::cpu::add_product_of(
        MatRef::new(weight, c_out, kk).t(),
        MatRef::new(&dy_c, c_out, cols_n),
        &mut cols,
        Threads::Pool,
    )?;
    let mut dx = crate::cpu::pool::zeroed(x.len());
    col2im(shape, &cols, &mut dx);
    crate::cpu::pool::give(cols);
    crate::cpu::pool::give(dy_c);
    Ok((dx, dw, db))
}

/// The ranges of grid positions a weight gradient's product is cut into (a fixed count, so
/// that the result does not depend on the number of threads).
const GRID_PARTS: usize = 8;

/// A stride-1 convolution's tensors laid out channel-major on the zero-padded input grid
/// (`[channels, n, h + 2p, w + 2p]`, flattened per channel): on that grid, tap `(ky, kx)` of
/// the kernel reads the input at a fixed offset `ky * (w + 2p) + kx` from the output
/// position, so the taps are windows of one buffer and each gradient is one product over the
/// whole batch (a [`Windows`] operand). Output positions past the real output (the grid's
/// extra rows and columns) hold zero gradient, so whatever they read adds nothing.
struct PaddedGrid {
    s: ConvShape,
    /// Grid height and width, and positions per channel (`n (h + 2p) (w + 2p)`).
    hp: usize,
    wp: usize,
    span: usize,
    /// The largest tap offset: zeros kept beyond (or before) a grid so that shifted views
    /// stay inside the buffer.
    slack: usize,
}

impl PaddedGrid {
    fn new(s: ConvShape) -> Self {
        let (hp, wp) = (s.h + 2 * s.padding, s.w + 2 * s.padding);
        PaddedGrid {
            s,
            hp,
            wp,
            span: s.n * hp * wp,
            slack: (s.k - 1) * wp + s.k - 1,
        }
    }

    fn offset(&self, ky: usize, kx: usize) -> usize {
        ky * self.wp + kx
    }

    /// `t` `[n, c, rows, cols]` placed at row and column `top` of a zero grid per channel,
    /// the grids starting `lead` values into the buffer (and `slack` zeros after the last).
    fn place(
        &self,
        t: &[f32],
        c: usize,
        (rows, cols): (usize, usize),
        top: usize,
        lead: usize,
    ) -> Vec<f32> {
        let mut out = crate::cpu::pool::zeroed(lead + c * self.span + self.slack);
        out[lead..lead + c * self.span]
            .par_chunks_mut(self.span)
            .enumerate()
            .for_each(|(ch, grid)| {
                for b in 0..self.s.n {
                    let src = &t[(b * c + ch) * rows * cols..][..rows * cols];
                    for (y, row) in src.chunks_exact(cols).enumerate() {
                        grid[(b * self.hp + y + top) * self.wp + top..][..cols]
                            .copy_from_slice(row);
                    }
                }
            });
        out
    }

    /// dweight `[c_out, c_in, k, k]`: `dy [c_out, grid] @ windows^T`, one window of the input
    /// grid per `(c_in, tap)`.
    fn weight_grad(&self, x: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
        let ConvShape {
            c_in,
            c_out,
            k,
            h,
            w,
            padding,
            ..
        } = self.s;
        let (oh, ow) = self.s.out_hw();
        let xp = self.place(x, c_in, (h, w), padding, 0);
        let dyp = self.place(dy, c_out, (oh, ow), 0, 0);
        // dweight [c_out, (c_in, tap)] = dy [c_out, grid] @ windows^T, column (i, tap) of the
        // windows matrix the grid of channel i shifted by the tap's offset: one product whose
        // inner size is every grid position of the batch. It is cut into GRID_PARTS ranges of
        // positions, run side by side and added in order (the same sums whatever the
        // thread count).
        let len = self.span.div_ceil(GRID_PARTS.min(self.span));
        let shares: Vec<Vec<f32>> = (0..self.span.div_ceil(len))
            .into_par_iter()
            .map(|part| {
                let (from, cols) = (part * len, len.min(self.span - part * len));
                let starts: Vec<usize> = (0..c_in * k * k)
                    .map(|it| {
                        (it / (k * k)) * self.span + from + self.offset(it % (k * k) / k, it % k)
                    })
                    .collect();
                let mut dw = vec![0.0f32; c_out * c_in * k * k];
                crate::cpu::add_product_windows(
                    MatRef::strided(&dyp[from..], c_out, cols, self.span, 1),
                    Windows {
                        data: &xp,
                        starts: &starts,
                        transposed: true,
                    },
                    c_in * k * k,
                    &mut dw,
                    Threads::Here,
                )?;
                Ok(dw)
            })
            .collect::<Result<_>>()?;
        crate::cpu::pool::give(xp);
        crate::cpu::pool::give(dyp);
        let mut dw = vec![0.0f32; c_out * c_in * k * k];
        for share in &shares {
            for (t, v) in dw.iter_mut().zip(share) {
                *t += v;
            }
        }
        Ok(dw)
    }

    /// dx `[n, c_in, h, w]`: on the grid, `dx[q] = sum over (c_out, tap) of weight^T @ dy [.,
    /// q - offset_tap]`, dy placed after `slack` leading zeros so that the shifted views start
    /// inside the buffer.
    fn input_grad(&self, weight: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
        let ConvShape {
            n,
            c_in,
            c_out,
            k,
            h,
            w,
            padding,
            ..
        } = self.s;
        let (oh, ow) = self.s.out_hw();
        let dyp = self.place(dy, c_out, (oh, ow), 0, self.slack);
        // dx on the grid [c_in, grid] = weight^T [c_in, (c_out, tap)] @ windows, row (o, tap)
        // of the windows matrix the grid of dy's channel o shifted back by the tap's offset.
        let taps = k * k;
        let mut wt = vec![0.0f32; c_in * c_out * taps];
        for (o, row) in weight.chunks_exact(c_in * taps).enumerate() {
            for (i, w) in row.chunks_exact(taps).enumerate() {
                wt[(i * c_out + o) * taps..][..taps].copy_from_slice(w);
            }
        }
        let starts: Vec<usize> = (0..c_out * taps)
            .map(|ot| self.slack + (ot / taps) * self.span - self.offset(ot % taps / k, ot % k))
            .collect();
        let mut dxp = crate::cpu::pool::zeroed(c_in * self.span);
        crate::cpu::add_product_windows(
            MatRef::new(&wt, c_in, c_out * taps),
            Windows {
                data: &dyp,
                starts: &starts,
                transposed: false,
            },
            self.span,
            &mut dxp,
            Threads::Pool,
        )?;
        let mut dx = crate::cpu::pool::take(n * c_in * h * w);
        dx.par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(bi, plane)| {
                let (b, i) = (bi / c_in, bi % c_in);
                let grid = &dxp[i * self.span + b * self.hp * self.wp..];
                for (y, row) in plane.chunks_exact_mut(w).enumerate() {
                    row.copy_from_slice(&grid[(y + padding) * self.wp + padding..][..w]);
                }
            });
        crate::cpu::pool::give(dxp);
        crate::cpu::pool::give(dyp);
        Ok(dx)
    }
}

/// Unfolds `x` `[n, c_in, h, w]` into `cols` `[c_in k k, n oh ow]`: row `(i, ky, kx)` holds,
/// for each image and output position, the input value that tap reads (0 in the padding).
fn im2col(shape: ConvShape, x: &[f32], cols: &mut [f32]) {
    let ConvShape {
        n,
        c_in,
        h,
        w,
        k,
        stride,
        padding,
        ..
    } = shape;
    let (oh, ow) = shape.out_hw();
    let (plane, cols_n) = (oh * ow, n * oh * ow);
    cols.par_chunks_mut(k * k * cols_n)
        .enumerate()
        .for_each(|(i, rows)| {
            for ky in 0..k {
                let ys = shape.valid(oh, h, ky);
                for kx in 0..k {
                    let xs = shape.valid(ow, w, kx);
                    let row = &mut rows[(ky * k + kx) * cols_n..][..cols_n];
                    for b in 0..n {
                        let src = &x[(b * c_in + i) * h * w..][..h * w];
                        for y in ys.clone() {
                            let iy = y * stride + ky - padding;
                            let out = &mut row[b * plane + y * ow..][..ow];
                            for xo in xs.clone() {
                                out[xo] = src[iy * w + xo * stride + kx - padding];
                            }
                        }
                    }
                }
            }
        });
}

/// Adds the columns `cols` `[c_in k k, n oh ow]` back onto the input positions they were
/// read from (the adjoint of [`im2col`]) into `dx` `[n, c_in, h, w]`.
fn col2im(shape: ConvShape, cols: &[f32], dx: &mut [f32]) {
    let ConvShape {
        c_in,
        h,
        w,
        k,
        stride,
        padding,
        n,
        ..
    } = shape;
    let (oh, ow) = shape.out_hw();
    let (plane, cols_n) = (oh * ow, n * oh * ow);
    dx.par_chunks_mut(h * w).enumerate().for_each(|(bi, dst)| {
        let (b, i) = (bi / c_in, bi % c_in);
        for ky in 0..k {
            let ys = shape.valid(oh, h, ky);
            for kx in 0..k {
                let xs = shape.valid(ow, w, kx);
                let row = &cols[((i * k + ky) * k + kx) * cols_n..][..cols_n];
                for y in ys.clone() {
                    let iy = y * stride + ky - padding;
                    let from = &row[b * plane + y * ow..][..ow];
                    for xo in xs.clone() {
                        dst[iy * w + xo * stride + kx - padding] += from[xo];
                    }
                }
            }
        }
    });
}

/// A group norm's sizes: `[n, c, hw]` in `groups` groups of channels, with `eps`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupNormShape {
    /// Batch.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Values per channel (height times width).
    pub hw: usize,
    /// Groups (dividing `c`).
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
}

/// The gradients of a group norm with a per-channel scale `gamma` and shift `beta`
/// (PyTorch's `GroupNorm`), followed by SiLU when `silu`: `(dx, dgamma, dbeta)`.
///
/// # Errors
/// [`Error::Shape`] for slices of other lengths than `shape` gives, or groups that do not
/// divide the channels.
pub fn group_norm_backward(
    shape: GroupNormShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    dy: &[f32],
    silu: bool,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let GroupNormShape {
        n,
        c,
        hw,
        groups,
        eps,
    } = shape;
    if groups == 0 || c % groups != 0 {
        return Err(shape_error(
            "group_norm_backward",
            "groups dividing the channels".into(),
            format!("{groups} groups of {c} channels"),
        ));
    }
    check_len("group_norm_backward", "x", x.len(), n * c * hw)?;
    check_len("group_norm_backward", "dy", dy.len(), n * c * hw)?;
    check_len("group_norm_backward", "gamma", gamma.len(), c)?;
    check_len("group_norm_backward", "beta", beta.len(), c)?;
    let cg = c / groups;
    let mut dx = crate::cpu::pool::take(x.len());
    if dx.is_empty() {
        return Ok((dx, vec![0.0; c], vec![0.0; c]));
    }
    // Each (image, group) is a contiguous block of `cg * hw` values: one task each, giving
    // its block of dx and its channels' shares of dgamma and dbeta.
    let partial: Vec<(Vec<f64>, Vec<f64>)> = dx
        .par_chunks_mut(cg * hw)
        .enumerate()
        .map(|(bg, dxs)| {
            let g = bg % groups;
            let start = bg * cg * hw;
            let xs = &x[start..][..cg * hw];
            let channels = (&gamma[g * cg..][..cg], &beta[g * cg..][..cg]);
            let dys = &dy[start..][..cg * hw];
            let isa = crate::cpu::CpuIsa::detect();
            // The forward's own statistics.
            let (mean, var) = crate::cpu::norm::mean_var(isa, xs);
            let rstd = 1.0 / (f64::from(var) + eps).sqrt();
            crate::cpu::math::dispatch!(
                isa,
                group_norm_block_backward(
                    xs,
                    dys,
                    channels,
                    (f64::from(mean), rstd, hw),
                    silu,
                    dxs
                )
            )
        })
        .collect();
    let (mut dgamma, mut dbeta) = (vec![0.0f64; c], vec![0.0f64; c]);
    for (bg, (pg, pb)) in partial.iter().enumerate() {
        let g = bg % groups;
        for ci in 0..cg {
            dgamma[g * cg + ci] += pg[ci];
            dbeta[g * cg + ci] += pb[ci];
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    Ok((dx, f(dgamma), f(dbeta)))
}

/// Lanes of the channel sums below: independent accumulators the compiler keeps in vector
/// registers (one running sum would be a chain of dependent additions, one value at a time).
const LANES: usize = 16;

/// One (image, group) block of [`group_norm_backward`]: `xs` and `dys` its `cg * hw` values,
/// `gamma` and `beta` its channels', the group's mean and reciprocal standard deviation.
/// Writes `dxs` and returns the channels' `(dgamma, dbeta)`. The per-value arithmetic is in
/// `f32` and branch-free (the SiLU's exponential is `cpu::math::exp`), as are the sums over a
/// channel (in [`LANES`] partial sums); the group's sums over its channels are in `f64`.
#[inline(always)]
fn group_norm_block_backward(
    xs: &[f32],
    dys: &[f32],
    (gamma, beta): (&[f32], &[f32]),
    (mean, rstd, hw): (f64, f64, usize),
    silu: bool,
    dxs: &mut [f32],
) -> (Vec<f64>, Vec<f64>) {
    let (mean_f, rstd_f) = (mean as f32, rstd as f32);
    let cg = gamma.len();
    let (mut dgamma, mut dbeta) = (vec![0.0f64; cg], vec![0.0f64; cg]);
    let (mut sum_d, mut sum_dx) = (0.0f64, 0.0f64);
    // One value: its normalised input and dxhat = dz * gamma (kept in dx until the group's
    // means are known), and its terms of the four sums (dgamma, dbeta, dxhat, dxhat * xhat).
    let term = |x: f32, dyv: f32, (gm, bt): (f32, f32), d: &mut f32| {
        let xv = (x - mean_f) * rstd_f;
        let mut dz = dyv;
        if silu {
            let z = xv * gm + bt;
            let sg = 1.0 / (1.0 + crate::cpu::math::exp(-z));
            dz *= sg * (1.0 + z * (1.0 - sg));
        }
        *d = dz * gm;
        [dz * xv, dz, *d, *d * xv]
    };
    for ci in 0..cg {
        let affine = (gamma[ci], beta[ci]);
        let r = ci * hw..(ci + 1) * hw;
        let (xc, dyc, dc) = (&xs[r.clone()], &dys[r.clone()], &mut dxs[r]);
        let mut acc = [[0.0f32; LANES]; 4];
        let mut d_chunks = dc.chunks_exact_mut(LANES);
        let (mut x_chunks, mut dy_chunks) = (xc.chunks_exact(LANES), dyc.chunks_exact(LANES));
        for ((d, x), dyv) in (&mut d_chunks).zip(&mut x_chunks).zip(&mut dy_chunks) {
            for l in 0..LANES {
                let t = term(x[l], dyv[l], affine, &mut d[l]);
                for (a, v) in acc.iter_mut().zip(t) {
                    a[l] += v;
                }
            }
        }
        let mut sums = acc.map(|a| a.iter().sum::<f32>());
        for ((d, &x), &dyv) in d_chunks
            .into_remainder()
            .iter_mut()
            .zip(x_chunks.remainder())
            .zip(dy_chunks.remainder())
        {
            for (s, v) in sums.iter_mut().zip(term(x, dyv, affine, d)) {
                *s += v;
            }
        }
        dgamma[ci] = f64::from(sums[0]);
        dbeta[ci] = f64::from(sums[1]);
        sum_d += f64::from(sums[2]);
        sum_dx += f64::from(sums[3]);
    }
    let m = xs.len() as f64;
    let (mean_d, mean_dx) = ((sum_d / m) as f32, (sum_dx / m) as f32);
    for (d, &x) in dxs.iter_mut().zip(xs) {
        let xv = (x - mean_f) * rstd_f;
        *d = rstd_f * (*d - mean_d - xv * mean_dx);
    }
    (dgamma, dbeta)
}

/// The gradient of SiLU `x * sigmoid(x)`.
///
/// # Errors
/// [`Error::Shape`] for slices of different lengths.
pub fn silu_backward(x: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
    check_len("silu_backward", "dy", dy.len(), x.len())?;
    Ok(x.iter()
        .zip(dy)
        .map(|(&x, &d)| {
            let s = 1.0 / (1.0 + (-x).exp());
            d * s * (1.0 + x * (1.0 - s))
        })
        .collect())
}

/// The gradients of a linear layer `y = x W^T + b` for `x [m, k]` (any leading axes
/// flattened into `m`), `weight [n, k]` and `dy [m, n]`: `(dx, dweight, dbias)`.
///
/// # Errors
/// [`Error::Shape`] for slices of other lengths.
pub fn linear_backward(
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
    (m, k, n): (usize, usize, usize),
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    check_len("linear_backward", "x", x.len(), m * k)?;
    check_len("linear_backward", "weight", weight.len(), n * k)?;
    check_len("linear_backward", "dy", dy.len(), m * n)?;
    let mut dx = crate::cpu::pool::zeroed(m * k);
    crate::cpu::add_product(m, k, n, dy, weight, &mut dx)?;
    let mut dw = vec![0.0; n * k];
    crate::cpu::add_product_of(
        MatRef::new(dy, m, n).t(),
        MatRef::new(x, m, k),
        &mut dw,
        Threads::Pool,
    )?;
    let db = (0..n)
        .map(|j| (0..m).map(|i| f64::from(dy[i * n + j])).sum::<f64>() as f32)
        .collect();
    Ok((dx, dw, db))
}

/// The gradient of nearest-neighbour 2x upsampling of `[n, c, h, w]`: each input value
/// receives the sum of its 2x2 block of `dy [n, c, 2h, 2w]`.
///
/// # Errors
/// [`Error::Shape`] for a `dy` of another length.
pub fn upsample_nearest2x_backward(
    dy: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
) -> Result<Vec<f32>> {
    check_len(
        "upsample_nearest2x_backward",
        "dy",
        dy.len(),
        n * c * 4 * h * w,
    )?;
    let mut dx = crate::cpu::pool::take(n * c * h * w);
    for (plane, out) in dx.chunks_exact_mut(h * w).enumerate() {
        let up = &dy[plane * 4 * h * w..][..4 * h * w];
        for y in 0..h {
            for x in 0..w {
                let at = |yy: usize, xx: usize| up[yy * 2 * w + xx];
                out[y * w + x] = at(2 * y, 2 * x)
                    + at(2 * y, 2 * x + 1)
                    + at(2 * y + 1, 2 * x)
                    + at(2 * y + 1, 2 * x + 1);
            }
        }
    }
    Ok(dx)
}

/// The gradient of an embedding table `[rows, dim]` looked up at `ids`: each row the sum of
/// the `dy [ids.len(), dim]` rows that read it.
///
/// # Errors
/// [`Error::Shape`] for a `dy` of another length or an id past the table.
pub fn embedding_backward(ids: &[usize], dy: &[f32], rows: usize, dim: usize) -> Result<Vec<f32>> {
    check_len("embedding_backward", "dy", dy.len(), ids.len() * dim)?;
    let mut dw = vec![0.0f32; rows * dim];
    for (b, &id) in ids.iter().enumerate() {
        if id >= rows {
            return Err(shape_error(
                "embedding_backward",
                format!("ids below {rows}"),
                format!("{id}"),
            ));
        }
        for (o, &d) in dw[id * dim..][..dim].iter_mut().zip(&dy[b * dim..][..dim]) {
            *o += d;
        }
    }
    Ok(dw)
}

/// The sum over the spatial positions of `dy [n, c, hw]`: the gradient of a per-channel
/// value broadcast over an image (a resnet's time embedding, a bias).
///
/// # Errors
/// [`Error::Shape`] for a `dy` of another length.
pub fn sum_spatial(dy: &[f32], (n, c, hw): (usize, usize, usize)) -> Result<Vec<f32>> {
    check_len("sum_spatial", "dy", dy.len(), n * c * hw)?;
    Ok(dy
        .chunks_exact(hw.max(1))
        .map(|p| p.iter().map(|&v| f64::from(v)).sum::<f64>() as f32)
        .collect())
}

/// The mean squared error of `pred` against `target` and its gradient with respect to
/// `pred` (that of `target` is its negative), as `F.mse_loss` with reduction `mean`.
///
/// # Errors
/// [`Error::Shape`] for slices of different lengths or empty ones.
pub fn mse_loss(pred: &[f32], target: &[f32]) -> Result<(f32, Vec<f32>)> {
    check_len("mse_loss", "target", target.len(), pred.len())?;
    if pred.is_empty() {
        return Err(shape_error("mse_loss", "values".into(), "none".into()));
    }
    let n = pred.len() as f64;
    let loss = pred
        .iter()
        .zip(target)
        .map(|(&p, &t)| (f64::from(p) - f64::from(t)).powi(2))
        .sum::<f64>()
        / n;
    let grad = pred
        .iter()
        .zip(target)
        .map(|(&p, &t)| (2.0 * (f64::from(p) - f64::from(t)) / n) as f32)
        .collect();
    Ok((loss as f32, grad))
}

/// Multi-head attention's sizes: `[batch, len, heads * head_dim]` queries, keys and values,
/// head `h` in channels `h * head_dim ..`, logits scaled by `scale`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Batch.
    pub batch: usize,
    /// Query length.
    pub len_q: usize,
    /// Key and value length.
    pub len_k: usize,
    /// Heads.
    pub heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// The logits' scale (`1 / sqrt(head_dim)`).
    pub scale: f32,
}

/// One head's `[len, head_dim]` block of a `[batch, len, heads * head_dim]` tensor.
fn head_block(t: &[f32], b: usize, h: usize, len: usize, s: AttentionShape) -> Vec<f32> {
    let width = s.heads * s.head_dim;
    let mut out = Vec::with_capacity(len * s.head_dim);
    for i in 0..len {
        out.extend_from_slice(&t[(b * len + i) * width + h * s.head_dim..][..s.head_dim]);
    }
    out
}

fn put_head_block(t: &mut [f32], block: &[f32], b: usize, h: usize, len: usize, s: AttentionShape) {
    let width = s.heads * s.head_dim;
    for i in 0..len {
        t[(b * len + i) * width + h * s.head_dim..][..s.head_dim]
            .copy_from_slice(&block[i * s.head_dim..][..s.head_dim]);
    }
}

/// The gradients of scaled dot-product attention `softmax(q k^T * scale) v` (per head, over
/// the keys) for `q [batch, len_q, heads * head_dim]`, `k`, `v` `[batch, len_k, ...]` and
/// `dout [batch, len_q, ...]`: `(dq, dk, dv)`. The probabilities are recomputed from `q` and
/// `k` rather than kept from the forward pass.
///
/// # Errors
/// [`Error::Shape`] for slices of other lengths.
pub fn attention_backward(
    s: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let width = s.heads * s.head_dim;
    check_len(
        "attention_backward",
        "q",
        q.len(),
        s.batch * s.len_q * width,
    )?;
    check_len(
        "attention_backward",
        "k",
        k.len(),
        s.batch * s.len_k * width,
    )?;
    check_len(
        "attention_backward",
        "v",
        v.len(),
        s.batch * s.len_k * width,
    )?;
    check_len(
        "attention_backward",
        "dout",
        dout.len(),
        s.batch * s.len_q * width,
    )?;
    let (lq, lk, d) = (s.len_q, s.len_k, s.head_dim);
    // One task per (image, head); the products inside each run on its thread.
    let blocks: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..s.batch * s.heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let (qh, kh, vh) = (
                head_block(q, b, h, lq, s),
                head_block(k, b, h, lk, s),
                head_block(v, b, h, lk, s),
            );
            let doh = head_block(dout, b, h, lq, s);
            // p = softmax(q k^T * scale) [lq, lk]
            let mut p = vec![0.0f32; lq * lk];
            crate::cpu::add_product_of(
                MatRef::new(&qh, lq, d),
                MatRef::new(&kh, lk, d).t(),
                &mut p,
                Threads::Here,
            )?;
            for row in p.chunks_exact_mut(lk) {
                let max = row
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &x| m.max(x * s.scale));
                let mut sum = 0.0f64;
                for x in row.iter_mut() {
                    *x = (*x * s.scale - max).exp();
                    sum += f64::from(*x);
                }
                for x in row.iter_mut() {
                    *x = (f64::from(*x) / sum) as f32;
                }
            }
            // dv = p^T dout [lk, d]; dp = dout v^T [lq, lk]
            let mut dvh = vec![0.0f32; lk * d];
            crate::cpu::add_product_of(
                MatRef::new(&p, lq, lk).t(),
                MatRef::new(&doh, lq, d),
                &mut dvh,
                Threads::Here,
            )?;
            let mut dp = vec![0.0f32; lq * lk];
            crate::cpu::add_product_of(
                MatRef::new(&doh, lq, d),
                MatRef::new(&vh, lk, d).t(),
                &mut dp,
                Threads::Here,
            )?;
            // ds = p * (dp - rowsum(dp * p)) * scale
            for (prow, dprow) in p.chunks_exact(lk).zip(dp.chunks_exact_mut(lk)) {
                let dot: f64 = prow
                    .iter()
                    .zip(dprow.iter())
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                for (g, &pv) in dprow.iter_mut().zip(prow) {
                    *g = (f64::from(pv) * (f64::from(*g) - dot)) as f32 * s.scale;
                }
            }
            // dq = ds k [lq, d]; dk = ds^T q [lk, d]
            let mut dqh = vec![0.0f32; lq * d];
            crate::cpu::add_product(lq, d, lk, &dp, &kh, &mut dqh)?;
            let mut dkh = vec![0.0f32; lk * d];
            crate::cpu::add_product_of(
                MatRef::new(&dp, lq, lk).t(),
                MatRef::new(&qh, lq, d),
                &mut dkh,
                Threads::Here,
            )?;
            Ok((dqh, dkh, dvh))
        })
        .collect::<Result<_>>()?;
    let mut dq = vec![0.0f32; q.len()];
    let mut dk = vec![0.0f32; k.len()];
    let mut dv = vec![0.0f32; v.len()];
    for (bh, (dqh, dkh, dvh)) in blocks.iter().enumerate() {
        let (b, h) = (bh / s.heads, bh % s.heads);
        put_head_block(&mut dq, dqh, b, h, lq, s);
        put_head_block(&mut dk, dkh, b, h, lk, s);
        put_head_block(&mut dv, dvh, b, h, lk, s);
    }
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::{ConvShape, conv2d_backward};

    /// The three gradients of a convolution from their definitions, by loops.
    fn reference(s: ConvShape, x: &[f32], wt: &[f32], dy: &[f32]) -> [Vec<f64>; 3] {
        let (oh, ow) = s.out_hw();
        let (mut dx, mut dw, mut db) =
            (vec![0.0; x.len()], vec![0.0; wt.len()], vec![0.0; s.c_out]);
        for b in 0..s.n {
            for o in 0..s.c_out {
                for (oy, ox) in (0..oh).flat_map(|y| (0..ow).map(move |x| (y, x))) {
                    let g = f64::from(dy[((b * s.c_out + o) * oh + oy) * ow + ox]);
                    db[o] += g;
                    for i in 0..s.c_in {
                        for (ky, kx) in (0..s.k).flat_map(|y| (0..s.k).map(move |x| (y, x))) {
                            let (iy, ix) = (
                                (oy * s.stride + ky) as isize - s.padding as isize,
                                (ox * s.stride + kx) as isize - s.padding as isize,
                            );
                            if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                continue;
                            }
                            let xi = ((b * s.c_in + i) * s.h + iy as usize) * s.w + ix as usize;
                            let wi = ((o * s.c_in + i) * s.k + ky) * s.k + kx;
                            dx[xi] += g * f64::from(wt[wi]);
                            dw[wi] += g * f64::from(x[xi]);
                        }
                    }
                }
            }
        }
        [dx, dw, db]
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    }

    /// Both paths (the padded grid for stride 1, the columns for stride 2) against the
    /// definitions: batches of two, images that are not square, no padding, 1x1, 3x3 and
    /// 5x5 kernels, a kernel as large as the padded image. Shapes that do not make an
    /// output are errors, not panics.
    #[test]
    fn convolution_gradients_match_their_definition() {
        let shape = |n, c_in, h, w, c_out, k, stride, padding| ConvShape {
            n,
            c_in,
            h,
            w,
            c_out,
            k,
            stride,
            padding,
        };
        for s in [
            shape(2, 3, 5, 7, 4, 3, 1, 1),
            shape(2, 2, 6, 5, 3, 3, 1, 0),
            shape(1, 3, 6, 6, 2, 5, 1, 2),
            shape(2, 3, 4, 4, 5, 1, 1, 0),
            shape(1, 2, 3, 4, 2, 5, 1, 1),
            shape(2, 3, 7, 6, 4, 3, 2, 1),
            shape(1, 2, 5, 5, 3, 3, 2, 0),
        ] {
            let (oh, ow) = s.out_hw();
            let x = values(s.n * s.c_in * s.h * s.w, 1);
            let wt = values(s.c_out * s.c_in * s.k * s.k, 2);
            let dy = values(s.n * s.c_out * oh * ow, 3);
            let (dx, dw, db) = conv2d_backward(s, &x, &wt, &dy).unwrap();
            for (name, got, want) in [("dx", dx, 0), ("dw", dw, 1), ("db", db, 2)] {
                let want = &reference(s, &x, &wt, &dy)[want];
                let scale = want.iter().fold(1e-6_f64, |m, v| m.max(v.abs()));
                let worst = got
                    .iter()
                    .zip(want)
                    .map(|(&g, &w)| (f64::from(g) - w).abs() / scale)
                    .fold(0.0, f64::max);
                assert!(worst < 1e-5, "{name} of {s:?}: {worst:e}");
            }
        }
        for s in [
            shape(1, 1, 2, 2, 1, 5, 1, 1),
            shape(1, 1, 0, 3, 1, 1, 1, 0),
            shape(1, 1, 3, 3, 1, 3, 0, 1),
        ] {
            assert!(conv2d_backward(s, &[], &[], &[]).is_err(), "{s:?}");
        }
    }
}

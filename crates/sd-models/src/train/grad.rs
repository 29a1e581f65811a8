//! The backward primitives: for an operation `y = f(x, params)` and the gradient `dy` of a
//! loss with respect to `y`, the gradients with respect to `x` and the parameters. All on
//! row-major `f32` slices (images `[N, C, H, W]`), with sums of many terms accumulated in
//! `f64` where the count is large, and the products of matrices on the CPU backend's packed
//! GEMM (`cpu::add_product`, the one the LoRA merge uses).

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

/// `m x n` row-major `a` transposed to `n x m`.
fn transpose(a: &[f32], m: usize, n: usize) -> Vec<f32> {
    let mut t = vec![0.0; a.len()];
    for i in 0..m {
        for j in 0..n {
            t[j * m + i] = a[i * n + j];
        }
    }
    t
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
/// dweight, dbias)`. The whole batch's columns (im2col, `[c_in * k * k, n * oh * ow]`) make
/// each gradient one product on the packed GEMM: `dweight^T = columns @ dy^T`, and the
/// columns' gradient `weight^T @ dy`, scattered back onto the input (col2im).
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
        padding: _,
    } = shape;
    let (oh, ow) = shape.out_hw();
    let (plane, kk) = (oh * ow, c_in * k * k);
    check_len("conv2d_backward", "x", x.len(), n * c_in * h * w)?;
    check_len("conv2d_backward", "weight", weight.len(), c_out * kk)?;
    check_len("conv2d_backward", "dy", dy.len(), n * c_out * plane)?;
    let cols_n = n * plane;
    // dy as [c_out, n * plane] and as [n * plane, c_out].
    let mut dy_c = vec![0.0f32; dy.len()];
    for b in 0..n {
        for o in 0..c_out {
            dy_c[o * cols_n + b * plane..][..plane]
                .copy_from_slice(&dy[(b * c_out + o) * plane..][..plane]);
        }
    }
    let dy_t = transpose(&dy_c, c_out, cols_n);
    let db = (0..c_out)
        .map(|o| {
            dy_c[o * cols_n..][..cols_n]
                .iter()
                .map(|&v| f64::from(v))
                .sum::<f64>() as f32
        })
        .collect();
    // The columns [kk, n * plane]: row (i, ky, kx) holds, for each image and output
    // position, the input value it reads (0 in the padding).
    let mut cols = vec![0.0f32; kk * cols_n];
    for i in 0..c_in {
        for ky in 0..k {
            let ys = shape.valid(oh, h, ky);
            for kx in 0..k {
                let xs = shape.valid(ow, w, kx);
                let row = &mut cols[((i * k + ky) * k + kx) * cols_n..][..cols_n];
                for b in 0..n {
                    let src = &x[(b * c_in + i) * h * w..][..h * w];
                    for y in ys.clone() {
                        let iy = y * stride + ky - shape.padding;
                        let out = &mut row[b * plane + y * ow..][..ow];
                        for xo in xs.clone() {
                            out[xo] = src[iy * w + xo * stride + kx - shape.padding];
                        }
                    }
                }
            }
        }
    }
    // dweight^T [kk, c_out] = columns [kk, n plane] @ dy^T [n plane, c_out].
    let mut dw_t = vec![0.0f32; kk * c_out];
    crate::cpu::add_product(kk, c_out, cols_n, &cols, &dy_t, &mut dw_t)?;
    let dw = transpose(&dw_t, kk, c_out);
    // The columns' gradient [kk, n plane] = weight^T [kk, c_out] @ dy [c_out, n plane],
    // reusing the columns' buffer.
    let w_t = transpose(weight, c_out, kk);
    cols.iter_mut().for_each(|v| *v = 0.0);
    crate::cpu::add_product(kk, cols_n, c_out, &w_t, &dy_c, &mut cols)?;
    let mut dx = vec![0.0f32; x.len()];
    for i in 0..c_in {
        for ky in 0..k {
            let ys = shape.valid(oh, h, ky);
            for kx in 0..k {
                let xs = shape.valid(ow, w, kx);
                let row = &cols[((i * k + ky) * k + kx) * cols_n..][..cols_n];
                for b in 0..n {
                    let dst = &mut dx[(b * c_in + i) * h * w..][..h * w];
                    for y in ys.clone() {
                        let iy = y * stride + ky - shape.padding;
                        let from = &row[b * plane + y * ow..][..ow];
                        for xo in xs.clone() {
                            dst[iy * w + xo * stride + kx - shape.padding] += from[xo];
                        }
                    }
                }
            }
        }
    }
    Ok((dx, dw, db))
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
    let m = (cg * hw) as f64;
    let mut dx = vec![0.0f32; x.len()];
    let mut dgamma = vec![0.0f64; c];
    let mut dbeta = vec![0.0f64; c];
    for b in 0..n {
        for g in 0..groups {
            let start = (b * c + g * cg) * hw;
            let xs = &x[start..][..cg * hw];
            let mean = xs.iter().map(|&v| f64::from(v)).sum::<f64>() / m;
            let var = xs
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / m;
            let rstd = 1.0 / (var + eps).sqrt();
            // dxhat = dz * gamma, where dz is dy through the SiLU when there is one.
            let mut dxhat = vec![0.0f64; cg * hw];
            let mut xhat = vec![0.0f64; cg * hw];
            for ci in 0..cg {
                let ch = g * cg + ci;
                let (gm, bt) = (f64::from(gamma[ch]), f64::from(beta[ch]));
                for p in 0..hw {
                    let j = ci * hw + p;
                    let xh = (f64::from(xs[j]) - mean) * rstd;
                    let mut dz = f64::from(dy[start + j]);
                    if silu {
                        let z = xh * gm + bt;
                        let s = 1.0 / (1.0 + (-z).exp());
                        dz *= s * (1.0 + z * (1.0 - s));
                    }
                    xhat[j] = xh;
                    dxhat[j] = dz * gm;
                    dgamma[ch] += dz * xh;
                    dbeta[ch] += dz;
                }
            }
            let mean_d = dxhat.iter().sum::<f64>() / m;
            let mean_dx = dxhat.iter().zip(&xhat).map(|(d, x)| d * x).sum::<f64>() / m;
            for j in 0..cg * hw {
                dx[start + j] = (rstd * (dxhat[j] - mean_d - xhat[j] * mean_dx)) as f32;
            }
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    Ok((dx, f(dgamma), f(dbeta)))
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
    let mut dx = vec![0.0; m * k];
    crate::cpu::add_product(m, k, n, dy, weight, &mut dx)?;
    let dyt = transpose(dy, m, n);
    let mut dw = vec![0.0; n * k];
    crate::cpu::add_product(n, k, m, &dyt, x, &mut dw)?;
    let db = (0..n)
        .map(|j| dyt[j * m..][..m].iter().map(|&v| f64::from(v)).sum::<f64>() as f32)
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
    let mut dx = vec![0.0f32; n * c * h * w];
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
    let mut dq = vec![0.0f32; q.len()];
    let mut dk = vec![0.0f32; k.len()];
    let mut dv = vec![0.0f32; v.len()];
    for b in 0..s.batch {
        for h in 0..s.heads {
            let (qh, kh, vh) = (
                head_block(q, b, h, lq, s),
                head_block(k, b, h, lk, s),
                head_block(v, b, h, lk, s),
            );
            let doh = head_block(dout, b, h, lq, s);
            // p = softmax(q k^T * scale) [lq, lk]
            let kt = transpose(&kh, lk, d);
            let mut p = vec![0.0f32; lq * lk];
            crate::cpu::add_product(lq, lk, d, &qh, &kt, &mut p)?;
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
            let pt = transpose(&p, lq, lk);
            let mut dvh = vec![0.0f32; lk * d];
            crate::cpu::add_product(lk, d, lq, &pt, &doh, &mut dvh)?;
            let vt = transpose(&vh, lk, d);
            let mut dp = vec![0.0f32; lq * lk];
            crate::cpu::add_product(lq, lk, d, &doh, &vt, &mut dp)?;
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
            let dst = transpose(&dp, lq, lk);
            let mut dkh = vec![0.0f32; lk * d];
            crate::cpu::add_product(lk, d, lq, &dst, &qh, &mut dkh)?;
            put_head_block(&mut dq, &dqh, b, h, lq, s);
            put_head_block(&mut dk, &dkh, b, h, lk, s);
            put_head_block(&mut dv, &dvh, b, h, lk, s);
        }
    }
    Ok((dq, dk, dv))
}

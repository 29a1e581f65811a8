//! The backend conformance suite: every operation of [`Backend`] checked against a
//! straightforward reference implementation (plain loops over host data, written for clarity,
//! not speed) on fresh random inputs. Any backend runs it:
//!
//! ```
//! use sd_models::{CpuBackend, backend::conformance};
//!
//! let failures = conformance::run(&CpuBackend::new(), 1e-5, 42);
//! assert!(failures.is_empty(), "{failures:#?}");
//! ```
//!
//! Each check compares with the relative L2 error `||got - want|| / ||want||`; shape errors
//! must be errors, not panics.

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use super::{AttentionMask, Backend, Conv2dParams, DType, GeluApproximation, HalfData};
use crate::error::Result;

/// A check that failed: which and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The check's name.
    pub check: String,
    /// What went wrong.
    pub message: String,
}

/// Runs every check; returns the failures (empty when the backend conforms). `rel_l2` is the
/// tolerance (1e-5 for f32 backends), `seed` seeds the random inputs.
pub fn run<B: Backend>(backend: &B, rel_l2: f64, seed: u64) -> Vec<Failure> {
    let mut ctx = Ctx {
        b: backend,
        rng: StdRng::seed_from_u64(seed),
        tol: rel_l2,
        failures: Vec::new(),
    };
    type Check<B> = fn(&mut Ctx<'_, B>) -> Result<()>;
    let checks: Vec<(&str, Check<B>)> = vec![
        ("data movement", check_data),
        ("casts", check_casts),
        ("elementwise", check_elementwise),
        ("matmul", check_matmul),
        ("linear", check_linear),
        ("conv2d", check_conv2d),
        ("norms", check_norms),
        ("activations", check_activations),
        ("attention", check_attention),
        ("upsample", check_upsample),
        ("shape errors", check_shape_errors),
    ];
    for (name, check) in checks {
        if let Err(e) = check(&mut ctx) {
            ctx.failures.push(Failure {
                check: name.into(),
                message: e.to_string(),
            });
        }
    }
    ctx.failures
}

struct Ctx<'a, B: Backend> {
    b: &'a B,
    rng: StdRng,
    tol: f64,
    failures: Vec<Failure>,
}

impl<B: Backend> Ctx<'_, B> {
    fn randn(&mut self, shape: &[usize]) -> (Vec<f32>, B::Tensor) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| self.rng.sample(StandardNormal)).collect();
        // Generated data always matches its shape.
        let t = self.b.upload(&data, shape);
        (data, t.unwrap_or_else(|_| unreachable_tensor()))
    }

    fn tensor(&self, data: &[f32], shape: &[usize]) -> Result<B::Tensor> {
        self.b.upload(data, shape)
    }

    /// Records a failure unless `got` matches `want` in shape and within the tolerance.
    fn expect(
        &mut self,
        check: &str,
        got: &B::Tensor,
        want: &[f32],
        shape: &[usize],
    ) -> Result<()> {
        if self.b.shape(got) != shape {
            self.failures.push(Failure {
                check: check.into(),
                message: format!("shape {:?}, expected {shape:?}", self.b.shape(got)),
            });
            return Ok(());
        }
        let got = self.b.download(got)?;
        let err = rel_l2(&got, want);
        if err.is_nan() || err > self.tol {
            self.failures.push(Failure {
                check: check.into(),
                message: format!("relative L2 error {err:e} > {:e}", self.tol),
            });
        }
        Ok(())
    }

    fn expect_err(&mut self, check: &str, result: Result<B::Tensor>) {
        if result.is_ok() {
            self.failures.push(Failure {
                check: check.into(),
                message: "accepted mismatched shapes".into(),
            });
        }
    }
}

#[allow(clippy::panic)]
fn unreachable_tensor<T>() -> T {
    // upload with data built for its own shape cannot fail in a conforming backend; one
    // that fails here is reported by the panic message in the test that runs the suite.
    panic!("the backend rejected upload with matching data and shape")
}

/// `||a - b|| / ||b||` (0 when both are zero).
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0_f64, 0.0_f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = i % shape[d];
        i /= shape[d];
    }
    idx
}

// ------------------------------------------------------------------------------------------
// Reference implementations.
// ------------------------------------------------------------------------------------------

fn ref_permute(x: &[f32], shape: &[usize], axes: &[usize]) -> (Vec<f32>, Vec<usize>) {
    let out_shape: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
    let st = strides(shape);
    let out = (0..x.len())
        .map(|i| {
            let idx = unravel(i, &out_shape);
            let src: usize = idx.iter().zip(axes).map(|(&v, &a)| v * st[a]).sum();
            x[src]
        })
        .collect();
    (out, out_shape)
}

fn ref_broadcast(
    a: &[f32],
    sa: &[usize],
    b: &[f32],
    sb: &[usize],
    f: impl Fn(f32, f32) -> f32,
) -> (Vec<f32>, Vec<usize>) {
    let rank = sa.len().max(sb.len());
    let pad = |s: &[usize]| -> Vec<usize> {
        std::iter::repeat_n(1, rank - s.len())
            .chain(s.iter().copied())
            .collect()
    };
    let (pa, pb) = (pad(sa), pad(sb));
    let shape: Vec<usize> = pa.iter().zip(&pb).map(|(&x, &y)| x.max(y)).collect();
    let (ta, tb) = (strides(&pa), strides(&pb));
    let n: usize = shape.iter().product();
    let out = (0..n)
        .map(|i| {
            let idx = unravel(i, &shape);
            let ia: usize = (0..rank)
                .map(|d| if pa[d] == 1 { 0 } else { idx[d] * ta[d] })
                .sum();
            let ib: usize = (0..rank)
                .map(|d| if pb[d] == 1 { 0 } else { idx[d] * tb[d] })
                .sum();
            f(a[ia], b[ib])
        })
        .collect();
    (out, shape)
}

fn ref_matmul(
    a: &[f32],
    b: &[f32],
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    b_shared: bool,
) -> Vec<f32> {
    let mut out = vec![0.0; batch * m * n];
    for bi in 0..batch {
        let bo = if b_shared { 0 } else { bi * k * n };
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0_f64;
                for p in 0..k {
                    s += f64::from(a[bi * m * k + i * k + p]) * f64::from(b[bo + p * n + j]);
                }
                out[bi * m * n + i * n + j] = s as f32;
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn ref_conv(
    x: &[f32],
    sx: &[usize],
    w: &[f32],
    sw: &[usize],
    bias: Option<&[f32]>,
    p: Conv2dParams,
) -> (Vec<f32>, Vec<usize>) {
    let (n, c, h, wd) = (sx[0], sx[1], sx[2], sx[3]);
    let (o, kh, kw) = (sw[0], sw[2], sw[3]);
    let ho = (h + 2 * p.padding.0 - kh) / p.stride.0 + 1;
    let wo = (wd + 2 * p.padding.1 - kw) / p.stride.1 + 1;
    let mut out = vec![0.0; n * o * ho * wo];
    for ni in 0..n {
        for oi in 0..o {
            for y in 0..ho {
                for xx in 0..wo {
                    let mut s = bias.map_or(0.0, |b| f64::from(b[oi]));
                    for ci in 0..c {
                        for ki in 0..kh {
                            for kj in 0..kw {
                                let iy = (y * p.stride.0 + ki) as isize - p.padding.0 as isize;
                                let ix = (xx * p.stride.1 + kj) as isize - p.padding.1 as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xv = x[((ni * c + ci) * h + iy as usize) * wd + ix as usize];
                                let wv = w[((oi * c + ci) * kh + ki) * kw + kj];
                                s += f64::from(xv) * f64::from(wv);
                            }
                        }
                    }
                    out[((ni * o + oi) * ho + y) * wo + xx] = s as f32;
                }
            }
        }
    }
    (out, vec![n, o, ho, wo])
}

fn ref_normalize(values: &[f32], eps: f32) -> Vec<f64> {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    values
        .iter()
        .map(|&v| (f64::from(v) - mean) / (var + f64::from(eps)).sqrt())
        .collect()
}

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

fn gelu(v: f64) -> f64 {
    0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2))
}

fn softmax(row: &[f64]) -> Vec<f64> {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

// ------------------------------------------------------------------------------------------
// Checks.
// ------------------------------------------------------------------------------------------

fn check_data<B: Backend>(c: &mut Ctx<'_, B>) -> Result<()> {
    let (x, t) = c.randn(&[2, 3, 4, 5]);
    c.expect("round trip", &t, &x, &[2, 3, 4, 5])?;
    let r = c.b.reshape(&t, &[6, 20])?;
    c.expect("reshape", &r, &x, &[6, 20])?;
    for axes in [[0, 2, 1, 3], [3, 1, 0, 2], [0, 1, 3, 2]] {
        let (want, shape) = ref_permute(&x, &[2, 3, 4, 5], &axes);
        let got = c.b.permute(&t, &axes)?;
        c.expect(&format!("permute {axes:?}"), &got, &want, &shape)?;
    }
    // slice along axis 2: entries 1..3
    let got = c.b.slice(&t, 2, 1, 2)?;
    let want: Vec<f32> = (0..2 * 3 * 2 * 5)
        .map(|i| {
            let idx = unravel(i, &[2, 3, 2, 5]);
            x[((idx[0] * 3 + idx[1]) * 4 + idx[2] + 1) * 5 + idx[3]]
        })
        .collect();
    c.expect("slice", &got, &want, &[2, 3, 2, 5])?;
    // concat along axis 1 and axis 3
    let (y, u) = c.randn(&[2, 1, 4, 5]);
    let got = c.b.concat(&[&t, &u], 1)?;
    let want: Vec<f32> = (0..2 * 4 * 4 * 5)
        .map(|i| {
            let idx = unravel(i, &[2, 4, 4, 5]);
            if idx[1] < 3 {
                x[((idx[0] * 3 + idx[1]) * 4 + idx[2]) * 5 + idx[3]]
            } else {
                y[(idx[0] * 4 + idx[2]) * 5 + idx[3]]
            }
        })
        .collect();
    c.expect("concat axis 1", &got, &want, &[2, 4, 4, 5])?;
    let (z, v) = c.randn(&[2, 3, 4, 2]);
    let got = c.b.concat(&[&t, &v], 3)?;
    let want: Vec<f32> = (0..2 * 3 * 4 * 7)
        .map(|i| {
            let idx = unravel(i, &[2, 3, 4, 7]);
            let row = (idx[0] * 3 + idx[1]) * 4 + idx[2];
            if idx[3] < 5 {
                x[row * 5 + idx[3]]
            } else {
                z[row * 2 + idx[3] - 5]
            }
        })
        .collect();
    c.expect("concat last axis", &got, &want, &[2, 3, 4, 7])
}

fn check_casts<B: Backend>(c: &mut Ctx<'_, B>) -> Result<()> {
    let (x, t) = c.randn(&[3, 7]);
    let h = c.b.cast(&t, DType::F16)?;
    if c.b.dtype(&h) != DType::F16 {
        c.failures.push(Failure {
            check: "cast f16".into(),
            message: "dtype is not F16".into(),
        });
    }
    let want: Vec<f32> = x.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
    let back = c.b.cast(&h, DType::F32)?;
    c.expect("cast f16 (rounding)", &back, &want, &[3, 7])?;
    let want: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    let hb = c.b.cast(&t, DType::BF16)?;
    c.expect("cast bf16 (rounding)", &hb, &want, &[3, 7])?;
    let halves: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let up = c.b.upload_half(HalfData::F16(&halves), &[3, 7])?;
    let want: Vec<f32> = halves.iter().map(|v| v.to_f32()).collect();
    c.expect("from_half f16", &up, &want, &[3, 7])?;
    // A half tensor is usable by the compute ops.
    let s = c.b.affine(&up, 2.0, 1.0)?;
    let want: Vec<f32> = want.iter().map(|v| v * 2.0 + 1.0).collect();
    c.expect("affine on f16", &s, &want, &[3, 7])
}

fn check_elementwise<B: Backend>(c: &mut Ctx<'_, B>) -> Result<()> {
    let cases: [(&[usize], &[usize]); 4] = [
        (&[2, 3, 4], &[2, 3, 4]),
        (&[2, 3, 4], &[4]),
        (&[2, 1, 4], &[3, 1]),
        (&[1, 5, 1, 1], &[2, 5, 3, 3]),
    ];
    for (sa, sb) in cases {
        let (a, ta) = c.randn(sa);
        let (b, tb) = c.randn(sb);
        let (want, shape) = ref_broadcast(&a, sa, &b, sb, |x, y| x + y);
        let got = c.b.add(&ta, &tb)?;
        c.expect(&format!("add {sa:?} {sb:?}"), &got, &want, &shape)?;
        let (want, shape) = ref_broadcast(&a, sa, &b, sb, |x, y| x - y);
        let got = c.b.sub(&ta, &tb)?;
        c.expect(&format!("sub {sa:?} {sb:?}"), &got, &want, &shape)?;
        let (want, shape) = ref_broadcast(&a, sa, &b, sb, |x, y| x * y);
        let got = c.b.mul(&ta, &tb)?;
        c.expect(&format!("mul {sa:?} {sb:?}"), &got, &want, &shape)?;
    }
    let (a, ta) = c.randn(&[5, 6]);
    let got = c.b.affine(&ta, -0.5, 3.0)?;
    let want: Vec<f32> = a.iter().map(|v| v * -0.5 + 3.0).collect();
    c.expect("affine", &got, &want, &[5, 6])
}

fn check_matmul<B: Backend>(c: &mut Ctx<'_, B>) -> Result<()> {
    for (batch, m, k, n) in [
        (1, 1, 1, 1),
        (3, 17, 33, 9),
        (2, 64, 40, 77),
        (1, 130, 257, 65),
    ] {
        let (a, ta) = c.randn(&[batch, m, k]);
        let (b, tb) = c.randn(&[batch, k, n]);
        let got = c.b.matmul(&ta, &tb)?;
        c.expect(
            &format!("matmul {batch}x{m}x{k}x{n}"),
            &got,
            &ref_matmul(&a, &b, batch, m, k, n, false),
            &[batch, m, n],
        )?;
        let (b2, tb2) = c.randn(&[k, n]);
        let got = c.b.matmul(&ta, &tb2)?;
        c.expect(
            &format!("matmul shared {batch}x{m}x{k}x{n}"),
            &got,
            &ref_matmul(&a, &b2, batch, m, k, n, true),
            &[batch, m, n],
        )?;
    }
    // Four-dimensional batches (heads).
    let (a, ta) = c.randn(&[2, 3, 5, 4]);
    let (b, tb) = c.randn(&[2, 3, 4, 6]);
    let got = c.b.matmul(&ta, &tb)?;
    c.expect(
        "matmul 4-D",
        &got,
        &ref_matmul(&a, &b, 6, 5, 4, 6, false),
        &[2, 3, 5, 6],
    )
}

fn check_linear<B: Backend>(c: &mut Ctx<'_, B>) -> Result<()> {
    for (rows, inf, outf) in [(1, 3, 2), (2 * 77, 64, 96), (300, 40, 130)] {
        let (x, tx) = c.randn(&[rows, inf]);
        let (w, tw) = c.randn(&[outf, inf]);
        let (bias, tb) = c.randn(&[outf]);
        let (w_t, _) = ref_permute(&w, &[outf, inf], &[1, 0]);
        let plain = ref_matmul(&x, &w_t, 1, rows, inf, outf, true);
        let got = c.b.linear(&tx, &tw, None)?;
        c.expect(
            &format!("linear {rows}x{inf}->{outf}"),
            &got,
            &plain,
            &[rows, outf],
        )?;
        let with_bias: Vec<f32> = plain
            .iter()
            .enumerate()
            .map(|(i, v)| v + bias[i % outf])
            .collect();
        let got = c.b.linear(&tx, &tw, Some(&tb))?;
        c.expect(
            &format!("linear+bias {rows}x{inf}->{outf}"),
            &got,
            &with_bias,
            &[rows, outf],
        )?;
        // The same through a prepared weight, which other operations still read.
        let prepared = c.b.prepare_linear_weight(tw.clone())?;
        let got = c.b.linear(&tx, &prepared, Some(&tb))?;
        c.expect(
            &format!("linear+bias {rows}x{inf}->{outf}, prepared weight"),
            &got,
            &with_bias,
            &[rows, outf],
        )?;
        c.expect(
            &format!("prepared linear weight {outf}x{inf} read back"),
            &c.b.reshape(&prepared, &[outf, inf])?,
            &w,
            &[outf, inf],
        )?;
    }
    // Leading dimensions are kept.
    let (x, tx) = c.randn(&[2, 3, 8]);
    let (w, tw) = c.randn(&[5, 8]);
    let (w_t, _) = ref_permute(&w, &[5, 8], &[1, 0]);
    let got = c.b.linear(&tx, &tw, None)?;
    c.expect(
        "linear 3-D",
        &got,
        &ref_matmul(&x, &w_t, 1, 6, 8, 5, true),
        &[2, 3, 5],
    )
}

fn check_conv2d<B: Backend>(c: &mut Ctx<'_, B>) -> Result<()> {
    let cases: [(&[usize], &[usize], Conv2dParams, bool); 11] = [
        // Whole blocks of 32 channels, which a backend may convolve directly on a
        // channel-blocked copy: fewer output channels than a vector, a batch of small images
        // with a remainder past 32, stride 2 with a row count that is not a tile's.
        (
            &[2, 32, 9, 7],
            &[6, 32, 3, 3],
            Conv2dParams::new(1, 1),
            true,
        ),
        (
            &[3, 64, 4, 4],
            &[37, 64, 3, 3],
            Conv2dParams::new(1, 1),
            false,
        ),
        (
            &[1, 32, 11, 10],
            &[40, 32, 3, 3],
            Conv2dParams::new(2, 1),
            true,
        ),
        (&[2, 4, 9, 7], &[6, 4, 3, 3], Conv2dParams::new(1, 1), true),
        // Batches of small images, which a backend may run as one product.
        (&[3, 5, 4, 4], &[6, 5, 3, 3], Conv2dParams::new(1, 1), true),
        (
            &[2, 3, 8, 6],
            &[13, 3, 3, 3],
            Conv2dParams::new(2, 1),
            false,
        ),
        (&[1, 3, 8, 8], &[5, 3, 3, 3], Conv2dParams::new(2, 1), true),
        (&[2, 8, 5, 6], &[4, 8, 1, 1], Conv2dParams::new(1, 0), true),
        (&[1, 2, 7, 9], &[3, 2, 3, 3], Conv2dParams::new(2, 0), false),
        (&[1, 3, 6, 6], &[2, 3, 3, 3], Conv2dParams::new(1, 0), false),
        (
            &[1, 5, 16, 16],
            &[7, 5, 3, 3],
            Conv2dParams {
                stride: (1, 2),
                padding: (1, 0),
            },
            true,
        ),
    ];
    for (sx, sw, p, with_bias) in cases {
        let (x, tx) = c.randn(sx);
        let (w, tw) = c.randn(sw);
        let (b, tb) = c.randn(&[sw[0]]);
        let (want, shape) = ref_conv(&x, sx, &w, sw, with_bias.then_some(b.as_slice()), p);
        let got = c.b.conv2d(&tx, &tw, with_bias.then_some(&tb), p)?;
        c.expect(&format!("conv2d {sx:?} {sw:?} {p:?}"), &got, &want, &shape)?;
        let prepared = c.b.prepare_conv_weight(tw.clone())?;
        // Upsampled first, fused or not: the reference convolves the upsampled image.
        let big = c.b.upsample_nearest2x(&tx)?;
        let big_host = c.b.download(&big)?;
        let big_shape = [sx[0], sx[1], 2 * sx[2], 2 * sx[3]];
        let (want_up, shape_up) = ref_conv(
            &big_host,
            &big_shape,
            &w,
            sw,
            with_bias.then_some(b.as_slice()),
            p,
        );
        let got_up =
            c.b.upsample_nearest2x_conv2d(&tx, &prepared, with_bias.then_some(&tb), p)?;
        c.expect(
            &format!("upsample_nearest2x_conv2d {sx:?} {sw:?} {p:?}"),
            &got_up,
            &want_up,
            &shape_up,
        )?;
        let got = c.b.conv2d(&tx, &prepared, with_bias.then_some(&tb), p)?;
        c.expect(
            &format!("conv2d {sx:?} {sw:?} {p:?}, prepared weight"),
            &got,
            &want,
            &shape,
        )?;
        c.expect(
            &format!("prepared conv weight {sw:?} read back"),
            &c.b.permute(&prepared, &[0, 1, 2, 3])?,
            &w,
            sw,
        )?;
    }
    Ok(())
}

fn check_norms<B: Backend>(c: &mut Ctx<'_, B>) -> Result<()> {
    let (n, ch, hw, groups) = (2, 12, 5 * 3, 4);
    let (x, tx) = c.randn(&[n, ch, 5, 3]);
    let (g, tg) = c.randn(&[ch]);
    let (b, tb) = c.randn(&[ch]);
    let per = ch / groups * hw;
    let mut want = vec![0.0_f32; x.len()];
    let mut want_silu = vec![0.0_f32; x.len()];
    for (gi, chunk) in x.chunks(per).enumerate() {
        for (j, v) in ref_normalize(chunk, 1e-5).into_iter().enumerate() {
            let channel = (gi % groups) * (ch / groups) + j / hw;
            let y = v * f64::from(g[channel]) + f64::from(b[channel]);
            want[gi * per + j] = y as f32;
            want_silu[gi * per + j] = silu(y) as f32;
        }
    }
    let got = c.b.group_norm(&tx, groups, &tg, &tb, 1e-5)?;
    c.expect("group_norm", &got, &want, &[n, ch, 5, 3])?;
    let got = c.b.group_norm_silu(&tx, groups, &tg, &tb, 1e-5)?;
    c.expect("group_norm_silu", &got, &want_silu, &[n, ch, 5, 3])?;

    let (x, tx) = c.randn(&[3, 4, 24]);
    let (g, tg) = c.randn(&[24]);
    let (b, tb) = c.randn(&[24]);
    let want: Vec<f32> = x
        .chunks(24)
        .flat_map(|row| {
            ref_normalize(row, 1e-5)
                .into_iter()
                .enumerate()
                .map(|(i, v)| (v * f64::from(g[i]) + f64::from(b[i])) as f32)
                .collect::<Vec<_>>()
        })
        .collect();
    let got = c.b.layer_norm(&tx, &tg, &tb, 1e-5)?;
    c.expect("layer_norm", &got, &want, &[3, 4, 24])
}

fn check_activations<B: Backend>(c: &mut Ctx<'_, B>) -> Result<()> {
    let (x, tx) = c.randn(&[4, 33]);
    let x64: Vec<f64> = x.iter().map(|&v| f64::from(v) * 3.0).collect();
    let tx = c.b.affine(&tx, 3.0, 0.0)?;
    type Reference = fn(f64) -> f64;
    let ops: [(&str, Reference); 4] = [
        ("silu", silu),
        ("gelu", gelu),
        ("gelu tanh", |v| {
            0.5 * v
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())
        }),
        ("quick_gelu", |v| v / (1.0 + (-1.702 * v).exp())),
    ];
    for (name, f) in ops {
        let got = match name {
            "silu" => c.b.silu(&tx)?,
            "gelu" => c.b.gelu(&tx, GeluApproximation::None)?,
            "gelu tanh" => c.b.gelu(&tx, GeluApproximation::Tanh)?,
            _ => c.b.quick_gelu(&tx)?,
        };
        let want: Vec<f32> = x64.iter().map(|&v| f(v) as f32).collect();
        c.expect(name, &got, &want, &[4, 33])?;
    }
    let got = c.b.softmax_last(&tx)?;
    let want: Vec<f32> = x64.chunks(33).flat_map(softmax).map(|v| v as f32).collect();
    c.expect("softmax", &got, &want, &[4, 33])?;
    let (y, ty) = c.randn(&[2, 3, 10]);
    let got = c.b.geglu(&ty)?;
    let want: Vec<f32> = y
        .chunks(10)
        .flat_map(|row| {
            (0..5)
                .map(|i| (f64::from(row[i]) * gelu(f64::from(row[i + 5]))) as f32)
                .collect::<Vec<_>>()
        })
        .collect();
    c.expect("geglu", &got, &want, &[2, 3, 5])
}

fn check_attention<B: Backend>(c: &mut Ctx<'_, B>) -> Result<()> {
    for (b, h, lq, lk, d, dv) in [
        (1, 1, 1, 1, 4, 4),
        (2, 3, 17, 17, 8, 8),
        (1, 2, 40, 7, 16, 12),
        (2, 1, 64, 77, 40, 40),
        // Several query and key blocks of a tiled (flash-style) kernel, ragged at the end.
        (1, 2, 150, 150, 40, 24),
        (1, 1, 70, 400, 16, 16),
    ] {
        let (q, tq) = c.randn(&[b, h, lq, d]);
        let (k, tk) = c.randn(&[b, h, lk, d]);
        let (v, tv) = c.randn(&[b, h, lk, dv]);
        let (m, tm) = c.randn(&[1, 1, lq, lk]);
        let scale = 1.0 / (d as f32).sqrt();
        for (name, mask) in [
            ("none", AttentionMask::None),
            ("causal", AttentionMask::Causal),
            ("additive", AttentionMask::Additive(&tm)),
        ] {
            if name == "causal" && lq != lk {
                continue;
            }
            let mut want = vec![0.0_f32; b * h * lq * dv];
            for bh in 0..b * h {
                for i in 0..lq {
                    let scores: Vec<f64> = (0..lk)
                        .map(|j| {
                            let s: f64 = (0..d)
                                .map(|p| {
                                    f64::from(q[(bh * lq + i) * d + p])
                                        * f64::from(k[(bh * lk + j) * d + p])
                                })
                                .sum::<f64>()
                                * f64::from(scale);
                            match name {
                                "causal" if j > i => f64::NEG_INFINITY,
                                "additive" => s + f64::from(m[i * lk + j]),
                                _ => s,
                            }
                        })
                        .collect();
                    let p = softmax(&scores);
                    for e in 0..dv {
                        want[(bh * lq + i) * dv + e] = (0..lk)
                            .map(|j| p[j] * f64::from(v[(bh * lk + j) * dv + e]))
                            .sum::<f64>()
                            as f32;
                    }
                }
            }
            let got = c.b.attention(&tq, &tk, &tv, mask, scale)?;
            c.expect(
                &format!("attention {name} {b}x{h}x{lq}x{lk}x{d}"),
                &got,
                &want,
                &[b, h, lq, dv],
            )?;
        }
    }
    Ok(())
}

fn check_upsample<B: Backend>(c: &mut Ctx<'_, B>) -> Result<()> {
    let (x, tx) = c.randn(&[2, 3, 4, 5]);
    let want: Vec<f32> = (0..2 * 3 * 8 * 10)
        .map(|i| {
            let idx = unravel(i, &[2, 3, 8, 10]);
            x[((idx[0] * 3 + idx[1]) * 4 + idx[2] / 2) * 5 + idx[3] / 2]
        })
        .collect();
    let got = c.b.upsample_nearest2x(&tx)?;
    c.expect("upsample_nearest2x", &got, &want, &[2, 3, 8, 10])?;
    // Resizing to a skip connection's odd size (and shrinking, and a size kept), with
    // PyTorch's indices written out: 4 -> 7 rows, 5 -> 9 and 5 -> 3 columns.
    for (size, rows, cols) in [
        (
            (7, 9),
            vec![0, 0, 1, 1, 2, 2, 3],
            vec![0, 0, 1, 1, 2, 2, 3, 3, 4],
        ),
        ((4, 3), vec![0, 1, 2, 3], vec![0, 1, 3]),
    ] {
        let (ho, wo) = size;
        let want: Vec<f32> = (0..2 * 3 * ho * wo)
            .map(|i| {
                let idx = unravel(i, &[2, 3, ho, wo]);
                x[((idx[0] * 3 + idx[1]) * 4 + rows[idx[2]]) * 5 + cols[idx[3]]]
            })
            .collect();
        let got = c.b.upsample_nearest(&tx, size)?;
        c.expect("upsample_nearest", &got, &want, &[2, 3, ho, wo])?;
    }
    Ok(())
}

fn check_shape_errors<B: Backend>(c: &mut Ctx<'_, B>) -> Result<()> {
    let (_, a) = c.randn(&[2, 3]);
    let (_, b) = c.randn(&[4, 5]);
    let (_, img) = c.randn(&[1, 3, 4, 4]);
    let (_, w) = c.randn(&[2, 4, 3, 3]);
    c.expect_err("matmul mismatch", c.b.matmul(&a, &b));
    c.expect_err("add mismatch", c.b.add(&a, &b));
    c.expect_err("linear mismatch", c.b.linear(&a, &b, None));
    c.expect_err(
        "conv2d channels",
        c.b.conv2d(&img, &w, None, Conv2dParams::new(1, 1)),
    );
    c.expect_err("reshape size", c.b.reshape(&a, &[7]));
    c.expect_err("permute axes", c.b.permute(&a, &[0, 0]));
    c.expect_err("slice range", c.b.slice(&a, 1, 2, 2));
    c.expect_err("concat mismatch", c.b.concat(&[&a, &b], 0));
    c.expect_err("group_norm groups", c.b.group_norm(&img, 2, &a, &a, 1e-5));
    c.expect_err("upsample rank", c.b.upsample_nearest2x(&a));
    c.expect_err("upsample empty size", c.b.upsample_nearest(&img, (0, 3)));
    c.expect_err("upload length", c.tensor(&[1.0, 2.0], &[3]));
    c.expect_err("geglu odd", c.b.geglu(&c.b.upload(&[1.0; 3], &[3])?));
    let bad_q = c.tensor(&[0.0; 8], &[1, 1, 2, 4])?;
    let bad_k = c.tensor(&[0.0; 6], &[1, 1, 2, 3])?;
    c.expect_err(
        "attention head size",
        c.b.attention(&bad_q, &bad_k, &bad_k, AttentionMask::None, 1.0),
    );
    Ok(())
}

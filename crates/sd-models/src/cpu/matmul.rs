//! Matrix products for the CPU backend, on its packed GEMM ([`super::packed`]).

use super::packed::pack::{Strided, Windows};
use super::packed::{ASource, BSource, Product, Start, run};
use super::{CpuBackend, CpuTensor, PackLayout, contiguous, threads};
use crate::backend::MatmulOps;
use crate::error::{Error, Result};

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
        let (xs, ys) = (contiguous(&xa, "matmul")?, contiguous(&xb, "matmul")?);
        let b_stride = if sb.len() == 2 { 0 } else { k * n };
        let mut shape = sa[..sa.len() - 2].to_vec();
        shape.extend([m, n]);
        if m * n == 0 || k == 0 {
            return CpuTensor::from_vec(&shape, super::pool::zeroed(batch * m * n));
        }
        // Every value is written by the products.
        let mut out = super::pool::take(batch * m * n);
        let products: Vec<Product<'_>> = (0..batch)
            .map(|i| Product {
                m,
                n,
                k,
                a: ASource::Strided(Strided {
                    data: &xs[i * m * k..(i + 1) * m * k],
                    rs: k,
                    cs: 1,
                }),
                b: BSource::Strided(Strided {
                    data: &ys[i * b_stride..i * b_stride + k * n],
                    rs: n,
                    cs: 1,
                }),
                start: Start::Zero,
                precision: self.precision(),
            })
            .collect();
        let outputs: Vec<*mut f32> = out.chunks_mut(m * n).map(<[f32]>::as_mut_ptr).collect();
        // SAFETY: each product writes its own `[m, n]` block of `out`; the operands hold the
        // `[m, k]` and `[k, n]` matrices (shapes checked above); the ISA is supported.
        unsafe { run(self.isa(), &products, &outputs, n, threads()) };
        CpuTensor::from_vec(&shape, out)
    }

    fn prepare_linear_weight(&self, weight: CpuTensor) -> Result<CpuTensor> {
        if weight.shape().len() != 2 {
            return Err(Error::Shape {
                op: "prepare_linear_weight",
                expected: "[out, in]".into(),
                found: format!("{:?}", weight.shape()),
            });
        }
        let packed = weight.prepacked(
            PackLayout::Cols {
                nr: self.isa().nr(),
            },
            self.precision(),
        );
        weight.discard();
        packed
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
        let mut shape = sx[..sx.len() - 1].to_vec();
        shape.push(out_f);
        let xa = x.to_f32_array();
        let xs = contiguous(&xa, "linear")?;
        let ba = bias.map(CpuTensor::to_f32_array);
        let bs = match &ba {
            Some(b) => Some(contiguous(b, "linear")?),
            None => None,
        };
        if rows * out_f == 0 || in_f == 0 {
            let mut out = super::pool::zeroed(rows * out_f);
            if let Some(b) = bs {
                out.chunks_mut(out_f).for_each(|r| r.copy_from_slice(b));
            }
            return CpuTensor::from_vec(&shape, out);
        }
        // Every value is written by the product.
        let mut out = super::pool::take(rows * out_f);
        let isa = self.isa();
        let precision = self.precision();
        let packed = weight.packed_cols(isa, precision, out_f, in_f)?;
        let product = Product {
            m: rows,
            n: out_f,
            k: in_f,
            a: ASource::Strided(Strided {
                data: xs,
                rs: in_f,
                cs: 1,
            }),
            b: BSource::Packed(packed.panels()),
            start: bs.map_or(Start::Zero, Start::ColBias),
            precision,
        };
        // SAFETY: the product writes `out`'s `[rows, out_f]`; `x` holds `rows x in_f` values,
        // the weight was packed for this ISA's `nr` with `out_f x in_f` values, the bias
        // `out_f` (checked above).
        unsafe { run(isa, &[product], &[out.as_mut_ptr()], out_f, threads()) };
        CpuTensor::from_vec(&shape, out)
    }
}

/// A read-only `rows x cols` matrix of `f32`: element `(i, j)` at `data[i * rs + j * cs]`, so
/// that a transposed operand is a view, not a copy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// The row-major `rows x cols` matrix at the start of `data`.
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The `rows x cols` matrix with element `(i, j)` at `data[i * rs + j * cs]`.
    pub(crate) fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// The transpose, as a view of the same values.
    pub(crate) fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether `data` holds every element the shape and strides address.
    fn fits(&self) -> bool {
        let last = (self.rows.saturating_sub(1))
            .checked_mul(self.rs)
            .zip((self.cols.saturating_sub(1)).checked_mul(self.cs))
            .and_then(|(r, c)| r.checked_add(c));
        self.rows == 0 || self.cols == 0 || last.is_some_and(|l| l < self.data.len())
    }
}

/// Where a product runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    /// Across rayon's pool.
    Pool,
    /// On the calling thread: a product that is one task among others already spread
    /// across the pool.
    Here,
}

/// `c [m, n] += a [m, k] @ b [k, n]`, all row-major f32, on the packed GEMM in f32 (whatever
/// precision a backend multiplies in) with rayon's threads: the arithmetic of merging
/// low-rank updates into weights.
///
/// # Errors
/// [`Error::Shape`] if a slice is shorter than its shape says.
pub(crate) fn add_product(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
) -> Result<()> {
    if a.len() < m * k || b.len() < k * n {
        return Err(Error::Shape {
            op: "add_product",
            expected: format!("a [{m}, {k}], b [{k}, {n}], c [{m}, {n}]"),
            found: format!("{}, {} and {} values", a.len(), b.len(), c.len()),
        });
    }
    add_product_of(MatRef::new(a, m, k), MatRef::new(b, k, n), c, Threads::Pool)
}

/// `c [a.rows, b.cols] += a @ b` (`c` row-major) for matrix views, on the packed GEMM in f32
/// on `threads`: [`add_product`] where an operand is a transpose.
///
/// # Errors
/// [`Error::Shape`] for inner sizes that differ or a slice shorter than its view says.
pub(crate) fn add_product_of(
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    threads: Threads,
) -> Result<()> {
    if b.rows != a.cols || !b.fits() {
        return Err(Error::Shape {
            op: "add_product",
            expected: format!(
                "b [{}, {}] within its {} values",
                a.cols,
                b.cols,
                b.data.len()
            ),
            found: format!("b [{}, {}]", b.rows, b.cols),
        });
    }
    let strided = Strided {
        data: b.data,
        rs: b.rs,
        cs: b.cs,
    };
    product_into(a, BSource::Strided(strided), b.cols, c, threads)
}

/// `c [a.rows, n] += a @ b` for `b` `[a.cols, n]` whose rows (`transposed: false`, one start
/// per row) or columns (`transposed: true`, one start per column) are windows of one buffer
/// (see [`Windows`]): the taps of a convolution as shifted views of an image; on `threads`.
///
/// # Errors
/// [`Error::Shape`] for a start count that does not fit the shape or a window past the buffer.
pub(crate) fn add_product_windows(
    a: MatRef<'_>,
    b: Windows<'_>,
    n: usize,
    c: &mut [f32],
    threads: Threads,
) -> Result<()> {
    let (lines, len) = if b.transposed {
        (n, a.cols)
    } else {
        (a.cols, n)
    };
    let inside = |&s: &usize| s.checked_add(len).is_some_and(|end| end <= b.data.len());
    if b.starts.len() != lines || !b.starts.iter().all(inside) {
        return Err(Error::Shape {
            op: "add_product_windows",
            expected: format!("{lines} windows of {len} values within {}", b.data.len()),
            found: format!(
                "{} windows, the last ending at {}",
                b.starts.len(),
                b.starts.iter().max().map_or(0, |s| s.saturating_add(len))
            ),
        });
    }
    product_into(a, BSource::Windows(b), n, c, threads)
}

/// `c [a.rows, n] += a @ b` on the packed GEMM in f32; `b` holds `[a.cols, n]` (checked by
/// the caller).
fn product_into(a: MatRef<'_>, b: BSource<'_>, n: usize, c: &mut [f32], on: Threads) -> Result<()> {
    let (m, k) = (a.rows, a.cols);
    if !a.fits() || c.len() < m * n {
        return Err(Error::Shape {
            op: "add_product",
            expected: format!("a [{m}, {k}] within its values and c [{m}, {n}]"),
            found: format!("{} and {} values", a.data.len(), c.len()),
        });
    }
    if m * n * k == 0 {
        return Ok(());
    }
    let product = Product {
        m,
        n,
        k,
        a: ASource::Strided(Strided {
            data: a.data,
            rs: a.rs,
            cs: a.cs,
        }),
        b,
        start: Start::Accumulate,
        precision: super::CpuPrecision::F32,
    };
    let threads = match on {
        Threads::Pool => threads(),
        Threads::Here => 1,
    };
    // SAFETY: `c` holds `m x n` writable values and `a` every element it addresses (checked
    // here), `b` its `[k, n]` (checked by the callers); `detect` returns a supported ISA and
    // f32 needs nothing more.
    unsafe {
        run(
            super::CpuIsa::detect(),
            &[product],
            &[c.as_mut_ptr()],
            n,
            threads,
        )
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::{MatRef, Threads, add_product, add_product_of};

    #[test]
    fn add_product_accumulates_onto_c() {
        // Sizes that are no multiple of any tile, and a k past one packing block.
        for (m, n, k) in [(1, 1, 1), (13, 37, 5), (70, 33, 300)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 13) as f32 - 6.0).collect();
            let c0: Vec<f32> = (0..m * n).map(|i| (i % 3) as f32).collect();
            let mut c = c0.clone();
            add_product(m, n, k, &a, &b, &mut c).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let want: f32 =
                        c0[i * n + j] + (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f32>();
                    // Small integers: every sum is exact in f32.
                    assert_eq!(c[i * n + j], want, "{m}x{n}x{k} at ({i}, {j})");
                }
            }
        }
        let mut short = vec![0.0; 3];
        assert!(add_product(2, 2, 1, &[1.0; 2], &[1.0; 2], &mut short).is_err());
    }

    #[test]
    fn transposed_and_strided_views_multiply_as_their_values() {
        // a^T @ b^T, and a view that skips columns, on sizes past one tile; on the pool and
        // on the calling thread.
        let (m, n, k) = (19, 45, 70);
        let a_t: Vec<f32> = (0..k * m).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let b_t: Vec<f32> = (0..n * k).map(|i| ((i * 5) % 13) as f32 - 6.0).collect();
        let want: Vec<f32> = (0..m * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                (0..k).map(|p| a_t[p * m + i] * b_t[j * k + p]).sum()
            })
            .collect();
        let product = |threads| {
            let mut c = vec![0.0; m * n];
            add_product_of(
                MatRef::new(&a_t, k, m).t(),
                MatRef::new(&b_t, n, k).t(),
                &mut c,
                threads,
            )
            .unwrap();
            c
        };
        assert_eq!(product(Threads::Pool), want);
        assert_eq!(product(Threads::Here), want);
        // Every other column of a [m, 2k] matrix.
        let wide: Vec<f32> = (0..m * 2 * k).map(|i| (i % 5) as f32).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 3) as f32 - 1.0).collect();
        let mut c = vec![0.0; m * n];
        add_product_of(
            MatRef::strided(&wide, m, k, 2 * k, 2),
            MatRef::new(&b, k, n),
            &mut c,
            Threads::Pool,
        )
        .unwrap();
        for (ij, &v) in c.iter().enumerate() {
            let (i, j) = (ij / n, ij % n);
            let w: f32 = (0..k).map(|p| wide[i * 2 * k + 2 * p] * b[p * n + j]).sum();
            assert_eq!(v, w);
        }
        // Inner sizes that differ, and a view its slice cannot hold, are errors.
        let mut c = vec![0.0; 4];
        let pool = Threads::Pool;
        assert!(
            add_product_of(MatRef::new(&b, 2, 2), MatRef::new(&b, 3, 2), &mut c, pool).is_err()
        );
        assert!(
            add_product_of(
                MatRef::strided(&b[..4], 2, 2, 4, 1),
                MatRef::new(&b, 2, 2),
                &mut c,
                pool
            )
            .is_err()
        );
    }
}

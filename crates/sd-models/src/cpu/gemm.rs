//! The one place that calls the `gemm` crate: a safe row-major wrapper.

use crate::error::{Error, Result};

/// How a matrix operand is laid out in its slice.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Layout {
    /// Row-major `rows x cols`.
    RowMajor,
    /// The transpose of a row-major `cols x rows` matrix (a PyTorch weight `[out, in]` read as
    /// `in x out`).
    Transposed,
}

/// `c [m, n] (+)= a [m, k] * b [k, n]`, all row-major unless said otherwise, with `threads`
/// threads (1: single-threaded, for callers that parallelise outside).
///
/// # Errors
/// [`Error::Shape`] if a slice is shorter than its matrix.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_layout: Layout,
    b: &[f32],
    b_layout: Layout,
    c: &mut [f32],
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    if a.len() < m * k || b.len() < k * n || c.len() < m * n {
        return Err(Error::Shape {
            op: "gemm",
            expected: format!("a >= {}, b >= {}, c >= {} values", m * k, k * n, m * n),
            found: format!("{}, {}, {}", a.len(), b.len(), c.len()),
        });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return Ok(());
    }
    // (column stride, row stride) of each operand.
    let (a_cs, a_rs) = match a_layout {
        Layout::RowMajor => (1, k as isize),
        Layout::Transposed => (m as isize, 1),
    };
    let (b_cs, b_rs) = match b_layout {
        Layout::RowMajor => (1, n as isize),
        Layout::Transposed => (k as isize, 1),
    };
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the three slices hold at least m*k, k*n and m*n values (checked above), and the
    // strides address exactly those row-major (or transposed row-major) matrices, so every
    // read and write stays inside its slice; `c` is exclusively borrowed and does not alias
    // `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// The number of threads of rayon's pool.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads()
}

//! Linear combinations of slices: the only arithmetic a diffusion update does on a sample.
//!
//! Every update of the forward process, the posterior and the samplers is a weighted sum of a
//! few same-shaped tensors, `out = a x + b y (+ c z ...)`, with weights computed in `f64`.
//! These functions check the lengths once, round the weights to the element type once, and
//! run a loop the compiler vectorises. Samplers in `sd-schedulers` build their updates from
//! them, so each formula is one call.

use crate::error::{Result, check_len};
use crate::real::Real;

/// `out[i] = x[i]`.
///
/// # Errors
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) if `x` and `out` differ in length.
pub fn copy<T: Real>(x: &[T], out: &mut [T]) -> Result<()> {
    check_len("x", out.len(), x.len())?;
    out.copy_from_slice(x);
    Ok(())
}

/// `out[i] = a * x[i]`.
///
/// # Errors
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) if `x` and `out` differ in length.
pub fn scale<T: Real>(out: &mut [T], a: f64, x: &[T]) -> Result<()> {
    check_len("x", out.len(), x.len())?;
    let a = T::from_f64(a);
    for (o, &x) in out.iter_mut().zip(x) {
        *o = a * x;
    }
    Ok(())
}

/// `x[i] *= a`, in place.
pub fn scale_in_place<T: Real>(x: &mut [T], a: f64) {
    let a = T::from_f64(a);
    for x in x.iter_mut() {
        *x *= a;
    }
}

/// `out[i] = a * x[i] + b * y[i]`.
///
/// # Errors
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) if the slices differ in length.
pub fn lincomb2<T: Real>(out: &mut [T], a: f64, x: &[T], b: f64, y: &[T]) -> Result<()> {
    check_len("x", out.len(), x.len())?;
    check_len("y", out.len(), y.len())?;
    let (a, b) = (T::from_f64(a), T::from_f64(b));
    for ((o, &x), &y) in out.iter_mut().zip(x).zip(y) {
        *o = a * x + b * y;
    }
    Ok(())
}

/// `x[i] = a * x[i] + b * y[i]`, in place in `x`.
///
/// # Errors
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) if the slices differ in length.
pub fn lincomb2_in_place<T: Real>(x: &mut [T], a: f64, b: f64, y: &[T]) -> Result<()> {
    check_len("y", x.len(), y.len())?;
    let (a, b) = (T::from_f64(a), T::from_f64(b));
    for (x, &y) in x.iter_mut().zip(y) {
        *x = a * *x + b * y;
    }
    Ok(())
}

/// `out[i] = a * x[i] + b * y[i] + c * z[i]`.
///
/// # Errors
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) if the slices differ in length.
pub fn lincomb3<T: Real>(
    out: &mut [T],
    a: f64,
    x: &[T],
    b: f64,
    y: &[T],
    c: f64,
    z: &[T],
) -> Result<()> {
    check_len("x", out.len(), x.len())?;
    check_len("y", out.len(), y.len())?;
    check_len("z", out.len(), z.len())?;
    let (a, b, c) = (T::from_f64(a), T::from_f64(b), T::from_f64(c));
    for (((o, &x), &y), &z) in out.iter_mut().zip(x).zip(y).zip(z) {
        *o = a * x + b * y + c * z;
    }
    Ok(())
}

/// `out[i] = sum_k weights[k] * terms[k][i]`, for any number of terms.
///
/// Used by the multistep samplers, whose updates combine a history of model outputs.
///
/// # Errors
/// [`Error::LengthMismatch`](crate::Error::LengthMismatch) if `weights` and `terms` differ
/// in length or a term differs in length from `out`.
pub fn lincomb<T: Real>(out: &mut [T], weights: &[f64], terms: &[&[T]]) -> Result<()> {
    check_len("terms", weights.len(), terms.len())?;
    for term in terms {
        check_len("term", out.len(), term.len())?;
    }
    out.fill(T::default());
    for (&w, term) in weights.iter().zip(terms) {
        let w = T::from_f64(w);
        for (o, &t) in out.iter_mut().zip(term.iter()) {
            *o += w * t;
        }
    }
    Ok(())
}

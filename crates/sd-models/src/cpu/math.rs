//! Element-wise math for the CPU backend's kernels, written so that the compiler vectorises
//! it, and compiled for the widest vectors the CPU has ([`dispatch!`]).
//!
//! [`exp`] is `e^x` by Cody-Waite range reduction (`x = n ln 2 + r`, `|r| <= ln 2 / 2`) and
//! a degree-7 Taylor polynomial for `e^r`, scaled by `2^n` through the exponent bits: within
//! 2 ulp of the correctly rounded value for `-87 <= x <= 88.5` (`e^x` from 1.6e-38 to
//! 2.7e38), 0 below (and for `-inf`), `+inf` above. Unlike a libm call it vectorises, which makes the
//! softmax of attention and the sigmoid of SiLU cheap next to the products around them.

/// Runs a loop body compiled three times (AVX-512, AVX2 + FMA, baseline), picking the widest
/// the CPU supports at run time. The body is an `#[inline(always)]` function's call, so each
/// copy is vectorised for its own target.
macro_rules! dispatch {
    ($isa:expr, $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            unsafe fn wide<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn mid<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            match $isa {
                // SAFETY: the backend checked at construction that the CPU has the features.
                $crate::cpu::CpuIsa::Avx512 => unsafe { wide(|| $body) },
                // SAFETY: as above.
                $crate::cpu::CpuIsa::Avx2 => unsafe { mid(|| $body) },
                $crate::cpu::CpuIsa::Portable => $body,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = $isa;
            $body
        }
    }};
}
pub(crate) use dispatch;

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split so that n * LN2_HI is exact for |n| < 2^8.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
// Adding and subtracting 1.5 * 2^23 rounds a float of magnitude < 2^22 to an integer.
const ROUND: f32 = 12_582_912.0;

/// `e^x` (see the module documentation).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.0, 88.5);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // 2^n as two factors, each a normal float for every n the clamp allows (-126..=128).
    let ni = n as i32;
    let half = ni >> 1;
    let s1 = f32::from_bits(((half + 127) as u32) << 23);
    let s2 = f32::from_bits(((ni - half + 127) as u32) << 23);
    let y = p * s1 * s2;
    if x < -87.0 {
        0.0
    } else if x > 88.5 {
        f32::INFINITY
    } else {
        y
    }
}

/// [`exp`] on 16 lanes with AVX-512: the same reduction and polynomial, scaled by
/// `vscalefps` (which rounds to 0 below the denormal range and to `+inf` above the float
/// range); NaN stays NaN.
///
/// # Safety
/// The CPU supports AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Beyond these e^x is 0 or +inf in f32 anyway; max/min with x second keep a NaN.
    let x = _mm512_min_ps(
        _mm512_set1_ps(89.0),
        _mm512_max_ps(_mm512_set1_ps(-104.0), x),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(1.0 / 5040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// `x * sigmoid(x)`.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// The error function by Abramowitz and Stegun's 7.1.26 (absolute error at most 1.5e-7 in
/// exact arithmetic; in f32 within 4.6e-7 of libm's `erff` on [-8, 8], tested),
/// `1 - t P(t) e^{-x^2}` with `t = 1 / (1 + p |x|)`, the sign restored:
/// the approximation PyTorch's vectorised CPU kernels use for the exact GELU. Branch-free on
/// top of [`exp`], so a loop of it vectorises, unlike a libm call.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_8;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t;
    (1.0 - poly * exp(-ax * ax)).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_is_within_5e_7_of_libm() {
        let mut worst = 0.0_f32;
        let mut x = -8.0_f32;
        while x < 8.0 {
            worst = worst.max((erf(x) - libm::erff(x)).abs());
            x += 0.000_73;
        }
        assert!(worst <= 5e-7, "worst absolute error {worst:e}");
        // The approximation's own error at 0 (its coefficients sum to 1 - 6e-8).
        assert!(erf(0.0).abs() <= 1e-7);
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
        assert!(erf(f32::NAN).is_nan());
    }

    #[test]
    fn exp_is_within_two_ulp_where_it_is_normal() {
        let mut worst = 0.0_f64;
        let mut x = -87.0_f32;
        while x < 88.5 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            let ulp = f64::from(f32::EPSILON) * want;
            worst = worst.max((got - want).abs() / ulp);
            x += 0.001_37;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_exp_agrees() {
        use std::arch::x86_64::*;
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut worst = 0.0_f64;
        let mut x = -87.0_f32;
        while x < 88.5 {
            let xs: [f32; 16] = std::array::from_fn(|i| x + i as f32 * 0.0003);
            let mut out = [0.0_f32; 16];
            // SAFETY: AVX-512F was detected; both arrays hold 16 values.
            unsafe {
                _mm512_storeu_ps(out.as_mut_ptr(), exp_avx512(_mm512_loadu_ps(xs.as_ptr())));
            }
            for (&xi, &o) in xs.iter().zip(&out) {
                let want = f64::from(xi).exp();
                let ulp = f64::from(f32::EPSILON) * want;
                worst = worst.max((f64::from(o) - want).abs() / ulp);
            }
            x += 0.0137;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        let special = [
            f32::NEG_INFINITY,
            -200.0,
            f32::INFINITY,
            0.0,
            f32::NAN,
            100.0,
            -110.0,
            1.0,
            2.0,
            3.0,
            4.0,
            5.0,
            6.0,
            7.0,
            8.0,
            9.0,
        ];
        let mut out = [0.0_f32; 16];
        // SAFETY: as above.
        unsafe {
            _mm512_storeu_ps(
                out.as_mut_ptr(),
                exp_avx512(_mm512_loadu_ps(special.as_ptr())),
            );
        }
        assert_eq!(&out[..4], &[0.0, 0.0, f32::INFINITY, 1.0]);
        assert!(out[4].is_nan());
        assert_eq!(out[5], f32::INFINITY);
        assert_eq!(out[6], 0.0);
    }
}

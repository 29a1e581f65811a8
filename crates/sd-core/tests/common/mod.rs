//! Helpers shared by sd-core's tests: reading the diffusers fixtures and comparing numbers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use serde_json::Value;

/// Against diffusers run in float64: element-wise relative error.
pub const RTOL_F64: f64 = 1e-6;
/// Against diffusers as it ships (float32): error relative to the largest magnitude. Diffusers
/// computes its schedules in float32, where `1 - alpha_bar` near t = 0, alpha-bars near 1e-9
/// and the ratios of the zero-terminal-SNR rescale cancel, so its own values are off
/// element-wise by up to 1e-3 (zero-SNR betas) against its float64 run, but by at most 7.1e-6
/// relative to the largest magnitude.
pub const RTOL_F32: f64 = 1e-5;

/// Reads `fixtures/core/<name>` (written by tools/fixtures/generate.py).
pub fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/core")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON in {}: {e}", path.display()))
}

pub fn f64s(value: &Value) -> Vec<f64> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("expected an array, found {value}"))
        .iter()
        .map(|v| {
            v.as_f64()
                .unwrap_or_else(|| panic!("expected a number, found {v}"))
        })
        .collect()
}

pub fn f32s(value: &Value) -> Vec<f32> {
    f64s(value).into_iter().map(|v| v as f32).collect()
}

pub fn i64s(value: &Value) -> Vec<i64> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("expected an array, found {value}"))
        .iter()
        .map(|v| {
            v.as_i64()
                .unwrap_or_else(|| panic!("expected an integer, found {v}"))
        })
        .collect()
}

/// Compares with diffusers' run in `precision` ("f64" or "f32") under that run's tolerance.
#[track_caller]
pub fn assert_matches(what: &str, actual: &[f64], expected: &[f64], precision: &str) {
    let what = format!("{what} ({precision})");
    match precision {
        "f64" => assert_rel(&what, actual, expected, RTOL_F64),
        "f32" => assert_rel_max(&what, actual, expected, RTOL_F32),
        other => panic!("unknown precision {other}"),
    }
}

/// Element-wise relative error: `|a - e| <= rtol * |e|` (and `|a| <= rtol` where `e = 0`).
#[track_caller]
pub fn assert_rel(what: &str, actual: &[f64], expected: &[f64], rtol: f64) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let err = (a - e).abs();
        let scale = if e == 0.0 { 1.0 } else { e.abs() };
        assert!(
            err <= rtol * scale,
            "{what}[{i}]: got {a:e}, diffusers {e:e}, relative error {:e} > {rtol:e}",
            err / scale
        );
    }
}

/// Error relative to the largest magnitude of the expected values, for tensors whose
/// entries cross zero: `max |a - e| <= rtol * max |e|`.
#[track_caller]
pub fn assert_rel_max(what: &str, actual: &[f64], expected: &[f64], rtol: f64) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let scale = expected.iter().fold(0.0_f64, |m, e| m.max(e.abs()));
    assert!(scale > 0.0, "{what}: the expected values are all zero");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let err = (a - e).abs() / scale;
        assert!(
            err <= rtol,
            "{what}[{i}]: got {a:e}, diffusers {e:e}, error {err:e} of max |e| > {rtol:e}"
        );
    }
}

pub fn widen(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| f64::from(v)).collect()
}

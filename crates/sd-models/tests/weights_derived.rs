//! Derived views (`OpenOptions::derive`): store keys that are rows along dim 0 or the
//! transpose of a stored tensor, on safetensors files written here with the `safetensors`
//! crate.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use half::f16;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use sd_models::Error;
use sd_models::weights::{Derived, LoadDType, OpenOptions, WeightPath};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("sd-models-derived")
        .join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A file with `fused` `[6, 2]` = 0..12, `proj` `[2, 3]` = 0..6 (f32), `half` `[4, 3]` (f16)
/// and `ids` `[3]` (i64).
fn write_file(dir: &Path) -> PathBuf {
    let fused = f32_bytes(&(0..12).map(|i| i as f32).collect::<Vec<_>>());
    let proj = f32_bytes(&[0.0, 1.0, 2.0, 10.0, 11.0, 12.0]);
    let half: Vec<u8> = (0..12)
        .flat_map(|i| f16::from_f32(i as f32 + 0.5).to_le_bytes())
        .collect();
    let ids: Vec<u8> = [1_i64, 2, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
    let path = dir.join("model.safetensors");
    let views = [
        (
            "fused",
            TensorView::new(Dtype::F32, vec![6, 2], &fused).unwrap(),
        ),
        (
            "proj",
            TensorView::new(Dtype::F32, vec![2, 3], &proj).unwrap(),
        ),
        (
            "half",
            TensorView::new(Dtype::F16, vec![4, 3], &half).unwrap(),
        ),
        ("ids", TensorView::new(Dtype::I64, vec![3], &ids).unwrap()),
    ];
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

fn qkv(key: &str, shape: &[usize]) -> Option<Vec<(String, Derived)>> {
    let rows = *shape.first()?;
    let part = |name: &str, i| Some((format!("{key}.{name}"), Derived::chunk(rows, 3, i)?));
    Some(vec![part("q", 0)?, part("k", 1)?, part("v", 2)?])
}

#[test]
fn rows_and_transposes_load_as_their_own_keys() {
    let dir = temp_dir("views");
    let path = write_file(&dir.0);
    let store = OpenOptions::new()
        .strict(true)
        .derive(|key, shape| match key {
            "fused" => qkv(key, shape),
            "proj" => Some(vec![("proj.weight".to_owned(), Derived::Transpose)]),
            _ => None,
        })
        .open(&[&path])
        .unwrap();
    let keys: Vec<&str> = store.keys().collect();
    assert_eq!(
        keys,
        [
            "fused.k",
            "fused.q",
            "fused.v",
            "half",
            "ids",
            "proj.weight"
        ]
    );
    let get =
        |k: &str, shape: &[usize]| store.get(&WeightPath::new(k), shape).unwrap().to_f32_vec();
    assert_eq!(get("fused.q", &[2, 2]), [0.0, 1.0, 2.0, 3.0]);
    assert_eq!(get("fused.k", &[2, 2]), [4.0, 5.0, 6.0, 7.0]);
    assert_eq!(get("fused.v", &[2, 2]), [8.0, 9.0, 10.0, 11.0]);
    assert_eq!(
        get("proj.weight", &[3, 2]),
        [0.0, 10.0, 1.0, 11.0, 2.0, 12.0]
    );
    let info = store.info(&WeightPath::new("fused.k")).unwrap();
    assert_eq!(info.file_key, "fused");
    assert_eq!(info.shape, [2, 2]);
    assert_eq!(info.derived, Some(Derived::rows(2, 4)));
    // Each view is used on its own.
    assert_eq!(store.unused_keys(), ["half", "ids"]);
    assert!(
        matches!(store.finish(), Err(Error::UnusedWeights { keys }) if keys == ["half", "ids"])
    );
}

#[test]
fn half_precision_views_keep_their_bits() {
    let dir = temp_dir("half");
    let path = write_file(&dir.0);
    let store = OpenOptions::new()
        .dtype(LoadDType::Stored)
        .derive(|key, _| match key {
            "half" => Some(vec![
                ("half.rows".to_owned(), Derived::rows(1, 3)),
                ("half.t".to_owned(), Derived::Transpose),
            ]),
            _ => None,
        })
        .open(&[&path])
        .unwrap();
    let stored: Vec<f16> = (0..12).map(|i| f16::from_f32(i as f32 + 0.5)).collect();
    let rows = store.get(&WeightPath::new("half.rows"), &[2, 3]).unwrap();
    assert_eq!(rows.as_f16().unwrap(), &stored[3..9]);
    let t = store.get(&WeightPath::new("half.t"), &[3, 4]).unwrap();
    let want: Vec<f16> = (0..3)
        .flat_map(|c| (0..4).map(move |r| (r, c)))
        .map(|(r, c)| stored[r * 3 + c])
        .collect();
    assert_eq!(t.as_f16().unwrap(), &want[..]);
    assert!(!store.contains(&WeightPath::new("half")));
}

#[test]
fn views_compose_with_renaming_and_reshaping() {
    let dir = temp_dir("compose");
    let path = write_file(&dir.0);
    // The derive hook sees the renamed key; the reshape hook the derived shape.
    let store = OpenOptions::new()
        .rename(|key| Some(format!("attn.{key}")))
        .derive(|key, shape| {
            if key == "attn.fused" {
                qkv(key, shape)
            } else {
                None
            }
        })
        .reshape(|key, shape| (key == "attn.fused.v").then(|| vec![shape.iter().product()]))
        .open(&[&path])
        .unwrap();
    let v = store.get(&WeightPath::new("attn.fused.v"), &[4]).unwrap();
    assert_eq!(v.to_f32_vec(), [8.0, 9.0, 10.0, 11.0]);
    // A wrong expected shape names the key and the view it is.
    let err = store
        .get(&WeightPath::new("attn.fused.q"), &[4, 1])
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::WeightShape { .. }));
    assert!(
        message.contains("attn.fused.q (rows 0..2 of fused)"),
        "{message}"
    );
}

#[test]
fn bad_views_are_errors_at_open() {
    let dir = temp_dir("bad");
    let path = write_file(&dir.0);
    // Rows past the end.
    let err = OpenOptions::new()
        .derive(|key, _| (key == "fused").then(|| vec![("x".to_owned(), Derived::rows(4, 7))]))
        .open(&[&path])
        .unwrap_err();
    assert!(matches!(&err, Error::Shape { .. }), "{err}");
    assert!(
        err.to_string().contains("rows 4..7") && err.to_string().contains("fused of shape [6, 2]"),
        "{err}"
    );
    // A transpose of a 1-D tensor.
    let err = OpenOptions::new()
        .derive(|key, _| (key == "ids").then(|| vec![("x".to_owned(), Derived::Transpose)]))
        .open(&[&path])
        .unwrap_err();
    assert!(matches!(&err, Error::Shape { .. }), "{err}");
    // Two views under one key, or a view named like a stored key.
    let err = OpenOptions::new()
        .derive(|key, shape| {
            (key == "fused").then(|| {
                let q = Derived::chunk(shape[0], 2, 0).unwrap();
                vec![("proj".to_owned(), q)]
            })
        })
        .open(&[&path])
        .unwrap_err();
    assert!(matches!(&err, Error::DuplicateWeight { .. }), "{err}");
    // A reshape of a view to another number of elements.
    let err = OpenOptions::new()
        .derive(|key, shape| {
            if key == "fused" {
                qkv(key, shape)
            } else {
                None
            }
        })
        .reshape(|key, _| (key == "fused.q").then(|| vec![5]))
        .open(&[&path])
        .unwrap_err();
    assert!(
        matches!(&err, Error::Shape { .. }) && err.to_string().contains("rows 0..2 of fused"),
        "{err}"
    );
}

#[test]
fn a_view_of_an_integer_tensor_is_a_dtype_error_when_loaded() {
    let dir = temp_dir("dtype");
    let path = write_file(&dir.0);
    let store = OpenOptions::new()
        .derive(|key, _| {
            (key == "ids").then(|| vec![("ids.first".to_owned(), Derived::rows(0, 1))])
        })
        .open(&[&path])
        .unwrap();
    let err = store.get(&WeightPath::new("ids.first"), &[1]).unwrap_err();
    assert!(
        matches!(&err, Error::WeightDType { key, .. } if key.contains("rows 0..1 of ids")),
        "{err}"
    );
}

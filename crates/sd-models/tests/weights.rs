//! Weight loading: safetensors files written here with the `safetensors` crate (the format's
//! reference writer), read back through `sd_models::weights`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use half::{bf16, f16};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use sd_models::Error;
use sd_models::weights::{
    DType, HostData, HostTensor, LoadDType, OpenOptions, Variant, WeightFile, WeightPath,
    WeightStore, find_weights,
};

/// A fresh empty directory for one test, removed when dropped.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("sd-models-weights")
        .join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// One tensor to write: key, dtype, shape, little-endian bytes.
struct Raw {
    key: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn raw_f32(key: &str, shape: &[usize], values: &[f32]) -> Raw {
    Raw {
        key: key.to_owned(),
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        bytes: values.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn raw_f16(key: &str, shape: &[usize], values: &[f16]) -> Raw {
    Raw {
        key: key.to_owned(),
        dtype: Dtype::F16,
        shape: shape.to_vec(),
        bytes: values.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn raw_bf16(key: &str, shape: &[usize], values: &[bf16]) -> Raw {
    Raw {
        key: key.to_owned(),
        dtype: Dtype::BF16,
        shape: shape.to_vec(),
        bytes: values.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn raw_i64(key: &str, shape: &[usize], values: &[i64]) -> Raw {
    Raw {
        key: key.to_owned(),
        dtype: Dtype::I64,
        shape: shape.to_vec(),
        bytes: values.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// The safetensors bytes of `tensors`.
fn serialize(tensors: &[Raw]) -> Vec<u8> {
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            (
                t.key.as_str(),
                TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn write(path: &Path, tensors: &[Raw]) -> PathBuf {
    std::fs::write(path, serialize(tensors)).unwrap();
    path.to_path_buf()
}

/// A store over one file holding `tensors`, the file, and its directory (keep it alive).
fn store_of(name: &str, tensors: &[Raw]) -> (WeightStore, PathBuf, TempDir) {
    let dir = temp_dir(name);
    let path = write(&dir.join("model.safetensors"), tensors);
    (WeightStore::open(&[&path]).unwrap(), path, dir)
}

fn key(k: &str) -> WeightPath {
    WeightPath::new(k)
}

/// Every f16 bit pattern that is not a NaN.
fn all_f16() -> Vec<f16> {
    (0..=u16::MAX)
        .map(f16::from_bits)
        .filter(|x| !x.is_nan())
        .collect()
}

/// Every bf16 bit pattern that is not a NaN.
fn all_bf16() -> Vec<bf16> {
    (0..=u16::MAX)
        .map(bf16::from_bits)
        .filter(|x| !x.is_nan())
        .collect()
}

#[test]
fn weight_path_joins_typed_segments() {
    let root = WeightPath::root();
    assert!(root.is_root());
    assert_eq!(root.to_string(), "");
    let p = root
        .push("down_blocks")
        .index(0)
        .push("resnets")
        .index(1)
        .push("conv1")
        .push("weight");
    assert_eq!(p.to_string(), "down_blocks.0.resnets.1.conv1.weight");
    assert_eq!(p.as_str(), "down_blocks.0.resnets.1.conv1.weight");
    assert_eq!(
        p.segments().collect::<Vec<_>>(),
        ["down_blocks", "0", "resnets", "1", "conv1", "weight"]
    );
    assert_eq!(p.name(), Some("weight"));
    assert_eq!(
        p.parent().unwrap().to_string(),
        "down_blocks.0.resnets.1.conv1"
    );
    assert_eq!(key("a").parent(), Some(WeightPath::root()));
    assert_eq!(root.parent(), None);
    assert_eq!(root.push("").push("a").push("").to_string(), "a");
    assert!(p.starts_with(&key("down_blocks.0")));
    assert!(p.starts_with(&root));
    assert!(!key("down_blocks.10").starts_with(&key("down_blocks.1")));
    assert!(key("down_blocks.1").starts_with(&key("down_blocks.1")));
}

#[test]
fn f32_round_trip_is_exact() {
    let values = [
        0.0_f32,
        -0.0,
        1.0,
        -1.5,
        std::f32::consts::PI,
        f32::MAX,
        f32::MIN_POSITIVE,
        1.0e-45, // the smallest subnormal
        f32::INFINITY,
        f32::NEG_INFINITY,
        123_456.79,
        -7.25e-12,
    ];
    let (store, _, _dir) = store_of("f32", &[raw_f32("w", &[3, 4], &values)]);
    let info = store.info(&key("w")).unwrap();
    assert_eq!(info.dtype, Some(DType::F32));
    assert_eq!(info.dtype_name, "F32");
    assert_eq!(info.shape, [3, 4]);

    for dtype in [LoadDType::F32, LoadDType::Stored] {
        let t = store.get_as(&key("w"), &[3, 4], dtype).unwrap();
        assert_eq!(t.shape(), [3, 4]);
        assert_eq!(t.dtype(), DType::F32);
        let got = t.as_f32().unwrap();
        for (g, v) in got.iter().zip(&values) {
            assert_eq!(g.to_bits(), v.to_bits());
        }
    }
    // Narrowing on request rounds as `half` does.
    let t = store.get_as(&key("w"), &[3, 4], LoadDType::F16).unwrap();
    let want: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
    assert_eq!(bits16(t.as_f16().unwrap()), bits16(&want));
    let t = store.get_as(&key("w"), &[3, 4], LoadDType::BF16).unwrap();
    let want: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
    assert_eq!(bits16(t.as_bf16().unwrap()), bits16(&want));
}

trait Bits16 {
    fn bits(&self) -> u16;
}
impl Bits16 for f16 {
    fn bits(&self) -> u16 {
        self.to_bits()
    }
}
impl Bits16 for bf16 {
    fn bits(&self) -> u16 {
        self.to_bits()
    }
}
fn bits16<T: Bits16>(v: &[T]) -> Vec<u16> {
    v.iter().map(Bits16::bits).collect()
}

#[test]
fn f16_round_trip_is_exact_for_every_value() {
    let values = all_f16();
    let n = values.len();
    let (store, _, _dir) = store_of("f16", &[raw_f16("w", &[n], &values)]);
    assert_eq!(store.info(&key("w")).unwrap().dtype, Some(DType::F16));

    // Kept in half precision: the very bits.
    let stored = store.get_as(&key("w"), &[n], LoadDType::Stored).unwrap();
    assert_eq!(stored.dtype(), DType::F16);
    assert_eq!(bits16(stored.as_f16().unwrap()), bits16(&values));

    // Converted to f32: exact (f32 holds every f16), checked against IEEE facts too.
    let wide = store.get(&key("w"), &[n]).unwrap();
    assert_eq!(wide.dtype(), DType::F32);
    let wide = wide.as_f32().unwrap();
    for (w, v) in wide.iter().zip(&values) {
        assert_eq!(w.to_bits(), v.to_f32().to_bits());
        assert_eq!(f16::from_f32(*w).to_bits(), v.to_bits());
    }
    let at = |bits: u16| wide[values.iter().position(|v| v.to_bits() == bits).unwrap()];
    assert_eq!(at(0x3C00), 1.0);
    assert_eq!(at(0xC000), -2.0);
    assert_eq!(at(0x7BFF), 65504.0);
    assert_eq!(at(0x0001), 2.0_f32.powi(-24));
    assert_eq!(at(0x7C00), f32::INFINITY);
    assert_eq!(stored.to_f32_vec(), wide);
    assert_eq!(stored.clone().into_f32_vec(), wide);

    // f16 -> bf16 on request goes through f32.
    let b = store.get_as(&key("w"), &[n], LoadDType::BF16).unwrap();
    let want: Vec<bf16> = values.iter().map(|x| bf16::from_f32(x.to_f32())).collect();
    assert_eq!(bits16(b.as_bf16().unwrap()), bits16(&want));
}

#[test]
fn bf16_round_trip_is_exact_for_every_value() {
    let values = all_bf16();
    let n = values.len();
    let (store, _, _dir) = store_of("bf16", &[raw_bf16("w", &[n], &values)]);
    assert_eq!(store.info(&key("w")).unwrap().dtype_name, "BF16");

    let stored = store.get_as(&key("w"), &[n], LoadDType::Stored).unwrap();
    assert_eq!(stored.dtype(), DType::BF16);
    assert_eq!(bits16(stored.as_bf16().unwrap()), bits16(&values));

    // bf16 is the top half of an f32.
    let wide = store.get(&key("w"), &[n]).unwrap().into_f32_vec();
    for (w, v) in wide.iter().zip(&values) {
        assert_eq!(w.to_bits(), u32::from(v.to_bits()) << 16);
    }
    let at = |bits: u16| wide[values.iter().position(|v| v.to_bits() == bits).unwrap()];
    assert_eq!(at(0x3F80), 1.0);
    assert_eq!(at(0xC040), -3.0);
    assert_eq!(at(0x7F80), f32::INFINITY);

    let h = store.get_as(&key("w"), &[n], LoadDType::F16).unwrap();
    let want: Vec<f16> = values.iter().map(|x| f16::from_f32(x.to_f32())).collect();
    assert_eq!(bits16(h.as_f16().unwrap()), bits16(&want));
}

#[test]
fn large_tensors_convert_in_parallel_blocks_exactly() {
    // Larger than one conversion block, and not a multiple of it.
    let n = (1 << 16) * 3 + 17;
    let values: Vec<f16> = (0..n)
        .map(|i| f16::from_bits((i as u16).wrapping_mul(7919) & 0x7BFF))
        .collect();
    let (store, _, _dir) = store_of("large", &[raw_f16("w", &[n], &values)]);
    let wide = store.get(&key("w"), &[n]).unwrap().into_f32_vec();
    assert_eq!(wide.len(), n);
    for (w, v) in wide.iter().zip(&values) {
        assert_eq!(w.to_bits(), v.to_f32().to_bits());
    }
    let back = HostTensor::from_f32(vec![n], wide)
        .unwrap()
        .to_dtype(DType::F16);
    assert_eq!(bits16(back.as_f16().unwrap()), bits16(&values));
}

#[test]
fn host_tensor_checks_its_shape() {
    assert!(matches!(
        HostTensor::from_f32(vec![2, 3], vec![0.0; 5]),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        HostTensor::new(vec![usize::MAX, 2], HostData::F32(vec![])),
        Err(Error::Shape { .. })
    ));
    let t = HostTensor::from_f32(vec![2, 3], (0..6).map(|i| i as f32).collect()).unwrap();
    assert_eq!(t.size_in_bytes(), 24);
    let r = t.clone().reshape(vec![3, 2]).unwrap();
    assert_eq!(r.shape(), [3, 2]);
    assert_eq!(r.as_f32(), t.as_f32());
    assert!(matches!(t.reshape(vec![4]), Err(Error::Shape { .. })));
    let empty = HostTensor::from_f32(vec![0, 3], vec![]).unwrap();
    assert!(empty.is_empty());
}

#[test]
fn shape_mismatch_names_key_file_expected_and_found() {
    let (store, path, _dir) = store_of(
        "shape",
        &[raw_f32("conv_in.weight", &[4, 2, 3, 3], &[0.5; 72])],
    );
    let err = store
        .root()
        .push("conv_in")
        .get("weight", &[4, 2, 1, 1])
        .unwrap_err();
    match &err {
        Error::WeightShape {
            key,
            file,
            expected,
            found,
        } => {
            assert_eq!(key, "conv_in.weight");
            assert_eq!(file, &path);
            assert_eq!(expected, &[4, 2, 1, 1]);
            assert_eq!(found, &[4, 2, 3, 3]);
        }
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    for part in [
        "conv_in.weight",
        path.to_str().unwrap(),
        "[4, 2, 1, 1]",
        "[4, 2, 3, 3]",
    ] {
        assert!(text.contains(part), "{text:?} lacks {part:?}");
    }
    // A scalar against a vector, and a rank mismatch.
    assert!(matches!(
        store.get(&key("conv_in.weight"), &[72]),
        Err(Error::WeightShape { .. })
    ));
    // The right shape loads.
    assert_eq!(
        store
            .get(&key("conv_in.weight"), &[4, 2, 3, 3])
            .unwrap()
            .len(),
        72
    );
}

#[test]
fn missing_key_names_key_and_files() {
    let (store, path, _dir) = store_of("missing", &[raw_f32("a.weight", &[1], &[1.0])]);
    let err = store.get(&key("a.bias"), &[1]).unwrap_err();
    match &err {
        Error::MissingWeight { key, files } => {
            assert_eq!(key, "a.bias");
            assert!(files.contains(path.to_str().unwrap()), "{files}");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("a.bias"));
    // A prefix of a key is not a key.
    assert!(store.get(&key("a"), &[1]).is_err());
    // Probing an optional tensor is not an error and does not count as missing.
    assert!(store.get_optional(&key("a.bias"), &[1]).unwrap().is_none());
    assert!(!store.contains(&key("a.bias")));
    assert!(!store.root().push("a").contains("bias"));
    // An optional tensor that is present is still shape-checked, and counts as used.
    assert!(matches!(
        store.get_optional(&key("a.weight"), &[2]),
        Err(Error::WeightShape { .. })
    ));
    assert!(store.unused_keys().is_empty());
}

#[test]
fn missing_or_unreadable_file_is_io_with_the_path() {
    let dir = temp_dir("nofile");
    let path = dir.join("absent.safetensors");
    match WeightStore::open(&[&path]).unwrap_err() {
        Error::Io { path: p, source } => {
            assert_eq!(p, path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    // A directory is not a weight file.
    match WeightFile::open(&dir).unwrap_err() {
        Error::Io { path: p, .. } => assert_eq!(p, *dir),
        other => panic!("{other:?}"),
    }
    // A missing index, too.
    let index = dir.join("model.safetensors.index.json");
    assert!(matches!(WeightStore::open(&[&index]), Err(Error::Io { path, .. }) if path == index));
}

/// Opening `bytes` as a file fails with `Error::SafeTensors` naming it; returns the message.
fn invalid(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    match WeightStore::open(&[&path]) {
        Err(Error::SafeTensors { path: p, message }) => {
            assert_eq!(p, path);
            message
        }
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn empty_file_is_a_safetensors_error() {
    let dir = temp_dir("empty");
    let message = invalid(&dir, "empty.safetensors", b"");
    assert!(message.contains("empty"), "{message}");
}

#[test]
fn truncated_file_is_a_safetensors_error_at_every_length() {
    let dir = temp_dir("truncated");
    let bytes = serialize(&[
        raw_f32("a", &[3, 5], &[1.25; 15]),
        raw_f16("b", &[7], &[f16::ONE; 7]),
    ]);
    // Cut in half: the data is short of what the header describes.
    let message = invalid(&dir, "half.safetensors", &bytes[..bytes.len() / 2]);
    assert!(!message.is_empty());
    // Every shorter prefix fails cleanly, never panicking or reading past the map.
    for len in 0..bytes.len() {
        invalid(&dir, "cut.safetensors", &bytes[..len]);
    }
    // One byte too many is as wrong as one too few.
    let mut long = bytes.clone();
    long.push(0);
    invalid(&dir, "long.safetensors", &long);
    // The whole file is fine.
    std::fs::write(dir.join("whole.safetensors"), &bytes).unwrap();
    let store = WeightStore::open(&[dir.join("whole.safetensors")]).unwrap();
    assert_eq!(
        store.get(&key("a"), &[3, 5]).unwrap().to_f32_vec(),
        [1.25; 15]
    );
}

/// A file with header `json` (padded as the writer pads) followed by `data`.
fn with_header(json: &str, data: &[u8]) -> Vec<u8> {
    let mut header = json.as_bytes().to_vec();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    bytes.extend(data);
    bytes
}

#[test]
fn corrupt_headers_are_safetensors_errors() {
    let dir = temp_dir("corrupt");
    let data = [0_u8; 16];
    // Not JSON.
    let m = invalid(&dir, "json.safetensors", &with_header("{not json", &data));
    assert!(m.contains("JSON"), "{m}");
    // Not UTF-8.
    let mut bytes = with_header("{\"a\":1}", &data);
    bytes[9] = 0xFF;
    invalid(&dir, "utf8.safetensors", &bytes);
    // A header length far beyond the file.
    let mut bytes = with_header("{}", &[]);
    bytes[..8].copy_from_slice(&(1_u64 << 40).to_le_bytes());
    invalid(&dir, "huge.safetensors", &bytes);
    let mut bytes = with_header("{}", &[]);
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    invalid(&dir, "max.safetensors", &bytes);
    // Fewer than 8 bytes.
    invalid(&dir, "short.safetensors", &[1, 2, 3]);
    // Offsets that do not match dtype and shape.
    let json = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#;
    invalid(&dir, "size.safetensors", &with_header(json, &data[..12]));
    // Offsets past the data.
    let json = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    invalid(&dir, "past.safetensors", &with_header(json, &data[..8]));
    // Overlapping tensors.
    let json = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    invalid(&dir, "overlap.safetensors", &with_header(json, &data));
    // An unknown dtype name.
    let json = r#"{"a":{"dtype":"F31","shape":[4],"data_offsets":[0,16]}}"#;
    invalid(&dir, "dtype.safetensors", &with_header(json, &data));
    // A shape whose size overflows.
    let json = r#"{"a":{"dtype":"F32","shape":[18446744073709551615,4],"data_offsets":[0,16]}}"#;
    invalid(&dir, "overflow.safetensors", &with_header(json, &data));
    // Garbage.
    invalid(&dir, "garbage.safetensors", &[0xAB; 64]);

    // A hand-written valid header is read, as a check on with_header itself.
    let json =
        r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let path = dir.join("valid.safetensors");
    std::fs::write(&path, with_header(json, &data)).unwrap();
    let file = WeightFile::open(&path).unwrap();
    assert_eq!(file.metadata().unwrap()["format"], "pt");
    assert_eq!(
        file.load("a", &[4], LoadDType::F32).unwrap().to_f32_vec(),
        [0.0; 4]
    );
}

#[test]
fn other_dtypes_are_an_error_naming_key_and_file() {
    let (store, path, _dir) = store_of(
        "dtype",
        &[
            raw_i64("text_model.embeddings.position_ids", &[1, 3], &[0, 1, 2]),
            raw_f32("text_model.final_layer_norm.weight", &[2], &[1.0, 1.0]),
        ],
    );
    // Listed, with its dtype name, and opening succeeded.
    let info = store
        .info(&key("text_model.embeddings.position_ids"))
        .unwrap();
    assert_eq!(info.dtype, None);
    assert_eq!(info.dtype_name, "I64");
    let err = store
        .get(&key("text_model.embeddings.position_ids"), &[1, 3])
        .unwrap_err();
    match &err {
        Error::WeightDType { key, file, dtype } => {
            assert_eq!(key, "text_model.embeddings.position_ids");
            assert_eq!(file, &path);
            assert_eq!(dtype, "I64");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("I64"));
    // Every non-float dtype and F64 fail the same way, whatever is asked for.
    for (dtype, width) in [
        (Dtype::U8, 1),
        (Dtype::I8, 1),
        (Dtype::BOOL, 1),
        (Dtype::I32, 4),
        (Dtype::F64, 8),
    ] {
        let raw = Raw {
            key: "x".to_owned(),
            dtype,
            shape: vec![2],
            bytes: vec![0; 2 * width],
        };
        let (store, _, _dir) = store_of("dtypes", &[raw]);
        for load in [LoadDType::F32, LoadDType::Stored, LoadDType::F16] {
            assert!(
                matches!(
                    store.get_as(&key("x"), &[2], load),
                    Err(Error::WeightDType { .. })
                ),
                "{dtype:?}"
            );
        }
    }
}

#[test]
fn unused_keys_are_reported_and_strict_mode_fails() {
    let tensors = [
        raw_f32("a.weight", &[2], &[1.0, 2.0]),
        raw_f32("a.bias", &[2], &[3.0, 4.0]),
        raw_f32("b.weight", &[1], &[5.0]),
        raw_i64("buffers.position_ids", &[2], &[0, 1]),
    ];
    let dir = temp_dir("unused");
    let path = write(&dir.join("m.safetensors"), &tensors);

    let lenient = WeightStore::open(&[&path]).unwrap();
    assert!(!lenient.is_strict());
    assert_eq!(lenient.len(), 4);
    assert_eq!(
        lenient.unused_keys(),
        ["a.bias", "a.weight", "b.weight", "buffers.position_ids"]
    );
    // Probing does not use.
    assert!(lenient.contains(&key("a.weight")));
    assert!(lenient.info(&key("a.weight")).is_some());
    assert_eq!(lenient.keys_with_prefix(&key("a")).len(), 2);
    assert_eq!(lenient.unused_keys().len(), 4);

    lenient.root().push("a").get("weight", &[2]).unwrap();
    assert!(lenient.ignore(&key("buffers.position_ids")));
    assert!(!lenient.ignore(&key("buffers.absent")));
    assert_eq!(lenient.unused_keys(), ["a.bias", "b.weight"]);
    // Not strict: finish returns them for a warning.
    assert_eq!(lenient.finish().unwrap(), ["a.bias", "b.weight"]);

    let strict = OpenOptions::new().strict(true).open(&[&path]).unwrap();
    assert!(strict.is_strict());
    strict.get(&key("a.weight"), &[2]).unwrap();
    strict.get(&key("a.bias"), &[2]).unwrap();
    match strict.finish().unwrap_err() {
        Error::UnusedWeights { keys } => assert_eq!(keys, ["b.weight", "buffers.position_ids"]),
        other => panic!("{other:?}"),
    }
    // A failed load still counts as asked for (the error is reported there).
    assert!(strict.get(&key("b.weight"), &[7]).is_err());
    assert_eq!(strict.root().push("buffers").ignore(), 1);
    assert!(strict.finish().unwrap().is_empty());
}

#[test]
fn prefixes_and_children_follow_segments() {
    let names = [
        "down_blocks.0.resnets.0.conv1.weight",
        "down_blocks.1.resnets.0.conv1.weight",
        "down_blocks.10.resnets.0.conv1.weight",
        "down_blocks.2.attentions.0.proj_in.weight",
        "down_blocks.2.resnets.0.conv1.weight",
        "down_blocks.1x.weight",
        "down_blocks-x.weight",
        "conv_in.weight",
    ];
    let tensors: Vec<Raw> = names.iter().map(|n| raw_f32(n, &[1], &[0.0])).collect();
    let (store, _, _dir) = store_of("prefix", &tensors);
    assert_eq!(
        store.keys_with_prefix(&key("down_blocks.1")),
        ["down_blocks.1.resnets.0.conv1.weight"]
    );
    assert_eq!(store.keys_with_prefix(&key("down_blocks")).len(), 6);
    assert_eq!(store.keys_with_prefix(&WeightPath::root()).len(), 8);
    assert_eq!(
        store.keys_with_prefix(&key("conv_in.weight")),
        ["conv_in.weight"]
    );
    assert!(store.keys_with_prefix(&key("conv")).is_empty());
    let down = store.root().push("down_blocks");
    assert_eq!(down.children(), ["0", "1", "2", "10", "1x"]);
    assert_eq!(down.index(2).children(), ["attentions", "resnets"]);
    assert!(down.index(2).push("attentions").exists());
    assert!(!down.index(3).exists());
    assert_eq!(
        store.root().children(),
        ["conv_in", "down_blocks", "down_blocks-x"]
    );
    assert_eq!(store.keys().count(), 8);
    assert_eq!(store.unused_keys().len(), 8);
}

/// Writes `tensors` as two shards and an index named `index_name` in `dir`.
fn write_sharded(dir: &Path, shard_names: [&str; 2], index_name: &str, tensors: Vec<Raw>) {
    // Alternate tensors between the shards.
    let mut first = Vec::new();
    let mut second = Vec::new();
    for (i, t) in tensors.into_iter().enumerate() {
        if i % 2 == 0 {
            first.push(t)
        } else {
            second.push(t)
        }
    }
    let mut map = serde_json::Map::new();
    for (shard, part) in shard_names.iter().zip([&first, &second]) {
        for t in part {
            map.insert(t.key.clone(), serde_json::Value::from(*shard));
        }
        write(&dir.join(shard), part);
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join(index_name), index.to_string()).unwrap();
}

fn four_tensors(scale: f32) -> Vec<Raw> {
    (0..4)
        .map(|i| {
            raw_f32(
                &format!("block.{i}.weight"),
                &[2],
                &[scale * i as f32, -scale],
            )
        })
        .collect()
}

#[test]
fn sharded_index_with_two_shards() {
    let dir = temp_dir("sharded");
    let shards = [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    ];
    write_sharded(
        &dir,
        shards,
        "diffusion_pytorch_model.safetensors.index.json",
        four_tensors(1.0),
    );
    let index = dir.join("diffusion_pytorch_model.safetensors.index.json");

    for store in [
        WeightStore::open(&[&index]).unwrap(),
        WeightStore::open_folder(&dir, &[]).unwrap(),
    ] {
        let files: Vec<&Path> = store.files().collect();
        assert_eq!(files, [dir.join(shards[0]), dir.join(shards[1])]);
        assert_eq!(store.len(), 4);
        let blocks = store.root().push("block");
        for i in 0..4 {
            let t = blocks.index(i).get("weight", &[2]).unwrap();
            assert_eq!(t.to_f32_vec(), [i as f32, -1.0]);
            let info = blocks.index(i).info("weight").unwrap();
            assert_eq!(info.file, dir.join(shards[i % 2]));
        }
        assert!(store.finish().unwrap().is_empty());
        // A missing key names both shards.
        match store.get(&key("block.9.weight"), &[2]).unwrap_err() {
            Error::MissingWeight { files, .. } => {
                assert!(
                    files.contains(shards[0]) && files.contains(shards[1]),
                    "{files}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    // An index naming a key its shard lacks.
    let text = std::fs::read_to_string(&index).unwrap();
    let bad = text.replace("block.3.weight", "block.7.weight");
    let bad_index = dir.join("bad.safetensors.index.json");
    std::fs::write(&bad_index, bad).unwrap();
    match WeightStore::open(&[&bad_index]).unwrap_err() {
        Error::MissingWeight { key, files } => {
            assert_eq!(key, "block.7.weight");
            assert!(files.contains(shards[1]), "{files}");
        }
        other => panic!("{other:?}"),
    }
    // An index naming a missing shard.
    let gone = text.replace(
        shards[1],
        "diffusion_pytorch_model-00003-of-00002.safetensors",
    );
    let gone_index = dir.join("gone.safetensors.index.json");
    std::fs::write(&gone_index, gone).unwrap();
    assert!(matches!(
        WeightStore::open(&[&gone_index]),
        Err(Error::Io { path, .. }) if path.ends_with("diffusion_pytorch_model-00003-of-00002.safetensors")
    ));
    // A malformed index, an empty one, and one escaping its folder.
    for (name, body) in [
        ("notjson.index.json", "{"),
        ("nomap.index.json", r#"{"metadata": {}}"#),
        ("empty.index.json", r#"{"weight_map": {}}"#),
        (
            "escape.index.json",
            r#"{"weight_map": {"a": "../x.safetensors"}}"#,
        ),
        (
            "absolute.index.json",
            r#"{"weight_map": {"a": "/x.safetensors"}}"#,
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        match WeightStore::open(&[&path]).unwrap_err() {
            Error::Config { what, .. } => assert_eq!(what, path.display().to_string()),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn a_key_in_two_files_is_an_error() {
    let dir = temp_dir("duplicate");
    let a = write(&dir.join("a.safetensors"), &[raw_f32("x", &[1], &[1.0])]);
    let b = write(&dir.join("b.safetensors"), &[raw_f32("x", &[1], &[2.0])]);
    let err = WeightStore::open(&[&a, &b]).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::DuplicateWeight { .. }));
    assert!(
        text.contains("a.safetensors") && text.contains("b.safetensors") && text.contains('x'),
        "{text}"
    );
}

#[test]
fn variants_choose_the_files() {
    let dir = temp_dir("variants");
    // Default f32 weights and an fp16 variant with different values.
    write(
        &dir.join("diffusion_pytorch_model.safetensors"),
        &[raw_f32("w", &[2], &[1.0, 2.0])],
    );
    write(
        &dir.join("diffusion_pytorch_model.fp16.safetensors"),
        &[raw_f16(
            "w",
            &[2],
            &[f16::from_f32(3.0), f16::from_f32(4.0)],
        )],
    );

    let default = WeightStore::open_folder(&dir, &[Variant::Default]).unwrap();
    assert_eq!(
        default.files().collect::<Vec<_>>(),
        [dir.join("diffusion_pytorch_model.safetensors")]
    );
    assert_eq!(
        default.get(&key("w"), &[2]).unwrap().to_f32_vec(),
        [1.0, 2.0]
    );

    let fp16 = OpenOptions::new()
        .dtype(LoadDType::Stored)
        .open_folder(&dir, &[Variant::Fp16])
        .unwrap();
    let w = fp16.get(&key("w"), &[2]).unwrap();
    assert_eq!(w.dtype(), DType::F16);
    assert_eq!(w.to_f32_vec(), [3.0, 4.0]);
    // Per-layer dtype override: f32 from the same half-precision file.
    let w32 = fp16
        .root()
        .with_dtype(LoadDType::F32)
        .get("w", &[2])
        .unwrap();
    assert_eq!(w32.dtype(), DType::F32);

    // Preference order.
    assert_eq!(
        find_weights(&dir, &[Variant::Fp16, Variant::Default]).unwrap(),
        dir.join("diffusion_pytorch_model.fp16.safetensors")
    );
    assert_eq!(
        find_weights(&dir, &[Variant::Default, Variant::Fp16]).unwrap(),
        dir.join("diffusion_pytorch_model.safetensors")
    );
    // A named variant that is absent: Io naming the folder and the files looked for; with a
    // fallback, the default files.
    let bf16 = Variant::Named("bf16".to_owned());
    match find_weights(&dir, std::slice::from_ref(&bf16)).unwrap_err() {
        Error::Io { path, source } => {
            assert_eq!(path, *dir);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            assert!(
                source
                    .to_string()
                    .contains("diffusion_pytorch_model.bf16.safetensors"),
                "{source}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        find_weights(&dir, &[bf16, Variant::Default]).unwrap(),
        dir.join("diffusion_pytorch_model.safetensors")
    );

    // Only fp16 present: the default is absent, the fallback works.
    let only = temp_dir("variants-only-fp16");
    write(
        &only.join("diffusion_pytorch_model.fp16.safetensors"),
        &[raw_f16("w", &[1], &[f16::ONE])],
    );
    assert!(matches!(
        find_weights(&only, &[Variant::Default]),
        Err(Error::Io { .. })
    ));
    assert!(WeightStore::open_folder(&only, &[Variant::Default, Variant::Fp16]).is_ok());
    // Not a folder.
    assert!(matches!(
        find_weights(only.join("nothing"), &[]),
        Err(Error::Io { .. })
    ));
}

#[test]
fn sharded_fp16_variant_and_transformers_names() {
    let dir = temp_dir("sharded-fp16");
    // The default weights are sharded as well; the fp16 shards hold other values.
    write_sharded(
        &dir,
        [
            "diffusion_pytorch_model-00001-of-00002.safetensors",
            "diffusion_pytorch_model-00002-of-00002.safetensors",
        ],
        "diffusion_pytorch_model.safetensors.index.json",
        four_tensors(1.0),
    );
    let fp16_shards = [
        "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
    ];
    write_sharded(
        &dir,
        fp16_shards,
        "diffusion_pytorch_model.safetensors.index.fp16.json",
        four_tensors(2.0),
    );
    let store = WeightStore::open_folder(&dir, &[Variant::Fp16]).unwrap();
    assert_eq!(
        store.files().collect::<Vec<_>>(),
        [dir.join(fp16_shards[0]), dir.join(fp16_shards[1])]
    );
    assert_eq!(
        store
            .get(&key("block.3.weight"), &[2])
            .unwrap()
            .to_f32_vec(),
        [6.0, -2.0]
    );
    let store = WeightStore::open_folder(&dir, &[]).unwrap();
    assert_eq!(
        store
            .get(&key("block.3.weight"), &[2])
            .unwrap()
            .to_f32_vec(),
        [3.0, -1.0]
    );

    // diffusers' deprecated variant index name is still found.
    let legacy = temp_dir("legacy-index");
    write_sharded(
        &legacy,
        fp16_shards,
        "diffusion_pytorch_model.safetensors.fp16.index.json",
        four_tensors(2.0),
    );
    assert_eq!(
        find_weights(&legacy, &[Variant::Fp16]).unwrap(),
        legacy.join("diffusion_pytorch_model.safetensors.fp16.index.json")
    );

    // A transformers component (text_encoder/): model.safetensors, model.fp16.safetensors.
    let te = temp_dir("text-encoder");
    write(
        &te.join("model.safetensors"),
        &[raw_f32("text_model.final_layer_norm.bias", &[1], &[0.5])],
    );
    write(
        &te.join("model.fp16.safetensors"),
        &[raw_f16(
            "text_model.final_layer_norm.bias",
            &[1],
            &[f16::from_f32(0.25)],
        )],
    );
    let store = WeightStore::open_folder(&te, &[Variant::Fp16]).unwrap();
    assert_eq!(
        store
            .root()
            .push("text_model")
            .push("final_layer_norm")
            .get("bias", &[1])
            .unwrap()
            .to_f32_vec(),
        [0.25]
    );
    assert_eq!(
        find_weights(&te, &[]).unwrap(),
        te.join("model.safetensors")
    );

    // Only pickle files: a clear error.
    let pickle = temp_dir("pickle");
    std::fs::write(pickle.join("diffusion_pytorch_model.bin"), b"PK").unwrap();
    let err = find_weights(&pickle, &[]).unwrap_err().to_string();
    assert!(
        err.contains("diffusion_pytorch_model.bin") && err.contains("not supported"),
        "{err}"
    );
}

#[test]
fn rename_hook_maps_keys_once_at_open() {
    // A CompVis-style single file holding the UNet and the VAE.
    let tensors = [
        raw_f32(
            "model.diffusion_model.input_blocks.0.0.weight",
            &[2, 1],
            &[1.0, 2.0],
        ),
        raw_f32(
            "model.diffusion_model.input_blocks.0.0.bias",
            &[2],
            &[3.0, 4.0],
        ),
        raw_f32("model.diffusion_model.out.2.bias", &[1], &[9.0]),
        raw_f32("first_stage_model.decoder.conv_in.bias", &[1], &[5.0]),
        raw_i64("model_ema.num_updates", &[], &[7]),
    ];
    let dir = temp_dir("rename");
    let path = write(&dir.join("v1-5.safetensors"), &tensors);
    let unet_names: HashMap<&str, &str> = [
        ("input_blocks.0.0.weight", "conv_in.weight"),
        ("input_blocks.0.0.bias", "conv_in.bias"),
        ("out.2.bias", "conv_out.bias"),
    ]
    .into_iter()
    .collect();
    let store = OpenOptions::new()
        .strict(true)
        .rename(move |k| {
            let inner = k.strip_prefix("model.diffusion_model.")?;
            unet_names.get(inner).map(|s| (*s).to_owned())
        })
        .open(&[&path])
        .unwrap();
    // Only the UNet's keys, by their diffusers names.
    assert_eq!(
        store.keys().collect::<Vec<_>>(),
        ["conv_in.bias", "conv_in.weight", "conv_out.bias"]
    );
    assert!(!store.contains(&key("model.diffusion_model.out.2.bias")));
    let info = store.info(&key("conv_in.weight")).unwrap();
    assert_eq!(info.key, "conv_in.weight");
    assert_eq!(
        info.file_key,
        "model.diffusion_model.input_blocks.0.0.weight"
    );
    let conv_in = store.root().push("conv_in");
    assert_eq!(conv_in.get("bias", &[2]).unwrap().to_f32_vec(), [3.0, 4.0]);
    // Errors name both keys.
    let err = conv_in.get("weight", &[1, 2]).unwrap_err();
    match &err {
        Error::WeightShape { key, .. } => {
            assert_eq!(
                key,
                "conv_in.weight (stored as model.diffusion_model.input_blocks.0.0.weight)"
            );
        }
        other => panic!("{other:?}"),
    }
    // Left-out keys are not unused.
    assert_eq!(store.unused_keys(), ["conv_out.bias"]);
    assert!(
        matches!(store.finish(), Err(Error::UnusedWeights { keys }) if keys == ["conv_out.bias"])
    );

    // A map renames the keys it holds and keeps the others.
    let map: HashMap<String, String> = [(
        "first_stage_model.decoder.conv_in.bias".to_owned(),
        "decoder.conv_in.bias".to_owned(),
    )]
    .into_iter()
    .collect();
    let store = OpenOptions::new().rename_map(map).open(&[&path]).unwrap();
    assert!(store.contains(&key("decoder.conv_in.bias")));
    assert!(store.contains(&key("model.diffusion_model.out.2.bias")));
    assert!(!store.contains(&key("first_stage_model.decoder.conv_in.bias")));
    assert_eq!(store.len(), 5);

    // Two keys renamed alike: an error naming both.
    let err = OpenOptions::new()
        .rename(|k| Some(k.rsplit('.').next().unwrap_or(k).to_owned()))
        .open(&[&path])
        .unwrap_err();
    assert!(matches!(err, Error::DuplicateWeight { .. }), "{err:?}");
    assert!(err.to_string().contains("bias"), "{err}");
}

#[test]
fn reshape_hook_views_a_tensor_with_another_shape() {
    // A 1x1 convolution kernel read as a linear weight (CompVis VAE attention).
    let values: Vec<f32> = (0..6).map(|i| i as f32).collect();
    let dir = temp_dir("reshape");
    let path = write(
        &dir.join("vae.safetensors"),
        &[
            raw_f32("attn.q.weight", &[3, 2, 1, 1], &values),
            raw_f32("attn.q.bias", &[3], &[0.0; 3]),
        ],
    );
    let squeeze = |_: &str, shape: &[usize]| match shape {
        [o, i, 1, 1] => Some(vec![*o, *i]),
        _ => None,
    };
    let store = OpenOptions::new().reshape(squeeze).open(&[&path]).unwrap();
    let w = store.get(&key("attn.q.weight"), &[3, 2]).unwrap();
    assert_eq!(w.shape(), [3, 2]);
    assert_eq!(w.to_f32_vec(), values);
    assert_eq!(store.info(&key("attn.q.weight")).unwrap().shape, [3, 2]);
    assert!(matches!(
        store.get(&key("attn.q.weight"), &[3, 2, 1, 1]),
        Err(Error::WeightShape { .. })
    ));
    // A reshape that changes the number of elements is refused at open.
    let err = OpenOptions::new()
        .reshape(|_, _| Some(vec![5]))
        .open(&[&path])
        .unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err:?}");
}

#[test]
fn used_key_tracking_is_thread_safe() {
    let n = 512;
    let tensors: Vec<Raw> = (0..n)
        .map(|i| raw_f32(&format!("layers.{i}.weight"), &[2], &[i as f32, 1.0]))
        .collect();
    let (store, _, _dir) = store_of("threads", &tensors);
    let store = OpenOptions::new()
        .strict(true)
        .open(&store.files().collect::<Vec<_>>())
        .unwrap();
    let threads = 8;
    // Every thread loads the keys i with i % threads == t, except i % 5 == 0; some keys twice.
    std::thread::scope(|s| {
        for t in 0..threads {
            let store = &store;
            s.spawn(move || {
                let layers = store.root().push("layers");
                for i in (t..n).step_by(threads) {
                    if i % 5 == 0 {
                        continue;
                    }
                    let w = layers.index(i).get("weight", &[2]).unwrap();
                    assert_eq!(w.to_f32_vec(), [i as f32, 1.0]);
                    if i % 3 == 0 {
                        layers.index((i + 1) % n).get("weight", &[2]).unwrap();
                    }
                }
            });
        }
    });
    // The same requests, made sequentially.
    let mut used = std::collections::HashSet::new();
    for i in (0..n).filter(|i| i % 5 != 0) {
        used.insert(i);
        if i % 3 == 0 {
            used.insert((i + 1) % n);
        }
    }
    let mut want: Vec<String> = (0..n)
        .filter(|i| !used.contains(i))
        .map(|i| format!("layers.{i}.weight"))
        .collect();
    want.sort();
    assert_eq!(store.unused_keys(), want);
    assert!(!want.is_empty());
    match store.finish().unwrap_err() {
        Error::UnusedWeights { keys } => assert_eq!(keys, want),
        other => panic!("{other:?}"),
    }
}

//! One memory-mapped safetensors file.
//!
//! The format (<https://github.com/huggingface/safetensors>): an 8-byte little-endian header
//! length `n`, `n` bytes of JSON mapping each key to its dtype, shape and byte range, then the
//! data. [`WeightFile::open`] maps the file and has the `safetensors` crate validate the whole
//! header (ranges contiguous, sizes matching dtype and shape, the data covering the file
//! exactly) before any tensor is read, so every read is a checked sub-slice of the mapping.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::weights::derive::Derived;
use crate::weights::tensor::{self, DType, HostTensor, LoadDType};

/// What a file says about one tensor, without reading its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TensorInfo<'a> {
    /// The key it is looked up by (in a [`WeightStore`](super::WeightStore), after renaming).
    pub key: &'a str,
    /// The key in the file.
    pub file_key: &'a str,
    /// The file holding it.
    pub file: &'a Path,
    /// Its shape (in a store, after any derived view and reshape hook).
    pub shape: &'a [usize],
    /// In a store, the view of the stored tensor it is (see
    /// [`OpenOptions::derive`](super::OpenOptions::derive)); `None` for the whole tensor.
    pub derived: Option<Derived>,
    /// Its dtype, or `None` for a dtype that cannot be loaded (an integer buffer, `F64`, ...).
    pub dtype: Option<DType>,
    /// The safetensors name of its dtype (`"F32"`, `"I64"`, ...).
    pub dtype_name: &'a str,
}

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) dtype: Option<DType>,
    pub(crate) dtype_name: String,
    pub(crate) shape: Vec<usize>,
    /// Byte range in the whole file (header included).
    start: usize,
    end: usize,
}

/// A memory-mapped safetensors file whose header has been validated.
///
/// The tensors are read (and converted) only when asked for. Keys are kept sorted.
#[derive(Debug)]
pub struct WeightFile {
    path: PathBuf,
    mmap: Mmap,
    tensors: BTreeMap<String, Stored>,
    metadata: Option<HashMap<String, String>>,
}

impl WeightFile {
    /// Maps `path` and validates its header.
    ///
    /// The file must not be modified while it is open (the usual condition of a memory map;
    /// see [`memmap2::Mmap`]). Tensors with dtypes other than `F32`, `F16` and `BF16` may be
    /// present: they are listed, and are an error only when loaded.
    ///
    /// # Errors
    /// [`Error::Io`] naming `path` if it does not exist, is not a regular file or cannot be
    /// read or mapped; [`Error::SafeTensors`] naming `path` and the parser's message if it is
    /// empty, truncated, or its header is corrupt.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io = |source: std::io::Error| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = crate::files::open_regular(path)?;
        // SAFETY: the map is read-only and private to this value; its contents are only read
        // through bounds-checked slices. As with every file map, a concurrent truncation or
        // rewrite of the file by another process is outside this program's control; the
        // documentation of `open` states the requirement.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::from_mmap(path.to_path_buf(), mmap)
    }

    fn from_mmap(path: PathBuf, mmap: Mmap) -> Result<Self> {
        let invalid = |message: String| Error::SafeTensors {
            path: path.clone(),
            message,
        };
        if mmap.is_empty() {
            return Err(invalid("the file is empty (0 bytes)".to_owned()));
        }
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| invalid(format!("{e} (the file has {} bytes)", mmap.len())))?;
        // read_metadata checked that the 8 length bytes, the header and the data are the
        // whole file.
        let data_start = header_len
            .checked_add(8)
            .ok_or_else(|| invalid("header length overflows".to_owned()))?;
        let mut tensors = BTreeMap::new();
        for (key, info) in metadata.tensors() {
            let (begin, end) = info.data_offsets;
            let (Some(start), Some(end)) =
                (data_start.checked_add(begin), data_start.checked_add(end))
            else {
                return Err(invalid(format!("tensor {key}: data offsets overflow")));
            };
            if start > end || end > mmap.len() {
                return Err(invalid(format!(
                    "tensor {key}: bytes {start}..{end} lie outside the file of {} bytes",
                    mmap.len()
                )));
            }
            let stored = Stored {
                dtype: match info.dtype {
                    safetensors::Dtype::F32 => Some(DType::F32),
                    safetensors::Dtype::F16 => Some(DType::F16),
                    safetensors::Dtype::BF16 => Some(DType::BF16),
                    _ => None,
                },
                dtype_name: info.dtype.to_string(),
                shape: info.shape.clone(),
                start,
                end,
            };
            tensors.insert(key, stored);
        }
        Ok(Self {
            metadata: metadata.metadata().clone(),
            path,
            mmap,
            tensors,
        })
    }

    /// The path the file was opened from.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The number of tensors.
    #[must_use]
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the file holds no tensor.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The header's free-form `__metadata__` strings, if any.
    #[must_use]
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.as_ref()
    }

    /// Whether the file holds `key`.
    #[must_use]
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// The dtype and shape of `key`, or `None` if the file does not hold it.
    #[must_use]
    pub fn info(&self, key: &str) -> Option<TensorInfo<'_>> {
        let (key, stored) = self.tensors.get_key_value(key)?;
        Some(TensorInfo {
            key,
            file_key: key,
            file: &self.path,
            shape: &stored.shape,
            derived: None,
            dtype: stored.dtype,
            dtype_name: &stored.dtype_name,
        })
    }

    /// Checks that every floating-point tensor of the file holds only finite values (no NaN
    /// or infinity), reading one tensor at a time.
    ///
    /// # Errors
    /// [`Error::NonFiniteWeight`] naming the first tensor that does not, and the file.
    pub fn check_finite(&self) -> Result<()> {
        let mut keys: Vec<&str> = self.keys().collect();
        keys.sort_unstable();
        for key in keys {
            let Some(info) = self.info(key) else { continue };
            if info.dtype.is_none() {
                continue;
            }
            let shape = info.shape.to_vec();
            let tensor = self.load(key, &shape, LoadDType::F32)?;
            if !tensor
                .as_f32()
                .is_some_and(|v| v.iter().all(|x| x.is_finite()))
            {
                return Err(Error::NonFiniteWeight {
                    key: key.to_owned(),
                    file: self.path.clone(),
                });
            }
        }
        Ok(())
    }

    /// Reads `key`, checks that its shape is `expected`, and converts it to `dtype`.
    ///
    /// # Errors
    /// [`Error::MissingWeight`] if the file does not hold `key`; [`Error::WeightShape`] if its
    /// shape is not `expected`; [`Error::WeightDType`] if it is not `F32`, `F16` or `BF16`.
    pub fn load(&self, key: &str, expected: &[usize], dtype: LoadDType) -> Result<HostTensor> {
        let stored = self.tensors.get(key).ok_or_else(|| Error::MissingWeight {
            key: key.to_owned(),
            files: self.path.display().to_string(),
        })?;
        self.load_stored(stored, None, &stored.shape, key, expected, dtype)
    }

    pub(crate) fn stored(&self, key: &str) -> Option<&Stored> {
        self.tensors.get(key)
    }

    /// Reads `stored`, or the `derived` view of it, presented with `shape` (the stored or
    /// derived shape, or one of as many elements from a reshape hook); `describe` names the
    /// tensor in errors.
    pub(crate) fn load_stored(
        &self,
        stored: &Stored,
        derived: Option<&Derived>,
        shape: &[usize],
        describe: &str,
        expected: &[usize],
        dtype: LoadDType,
    ) -> Result<HostTensor> {
        if shape != expected {
            return Err(Error::WeightShape {
                key: describe.to_owned(),
                file: self.path.clone(),
                expected: expected.to_vec(),
                found: shape.to_vec(),
            });
        }
        let Some(stored_dtype) = stored.dtype else {
            return Err(Error::WeightDType {
                key: describe.to_owned(),
                file: self.path.clone(),
                dtype: stored.dtype_name.clone(),
            });
        };
        let bytes = self
            .mmap
            .get(stored.start..stored.end)
            .ok_or_else(|| Error::SafeTensors {
                path: self.path.clone(),
                message: format!("tensor {describe}: data lies outside the file"),
            })?;
        let bytes = match derived {
            None => Cow::Borrowed(bytes),
            Some(view) => view
                .bytes(bytes, &stored.shape, stored_dtype.size_in_bytes())
                .ok_or_else(|| Error::SafeTensors {
                    path: self.path.clone(),
                    message: format!(
                        "tensor {describe}: cannot take {view} of {} bytes as shape {:?}",
                        bytes.len(),
                        stored.shape
                    ),
                })?,
        };
        let data = tensor::decode(&bytes, stored_dtype, dtype.resolve(stored_dtype));
        HostTensor::new(shape.to_vec(), data).map_err(|_| Error::SafeTensors {
            path: self.path.clone(),
            message: format!(
                "tensor {describe}: {} bytes of {stored_dtype} do not fill shape {shape:?}",
                bytes.len()
            ),
        })
    }
}

//! A set of safetensors files seen as one checkpoint, with shape-checked loading, used-key
//! tracking and load-time key renaming, reshaping and derived views.
//!
//! The checks follow PyTorch's `Module.load_state_dict(strict=True)` as diffusers and
//! transformers use it: every parameter a network asks for must be present with the shape it
//! expects (`size mismatch for ...`), and keys nobody asked for are reported
//! (`unexpected keys`), an error in strict mode.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::weights::derive::Derived;
use crate::weights::file::{TensorInfo, WeightFile};
use crate::weights::folder::{self, Variant};
use crate::weights::path::{WeightPath, key_starts_with};
use crate::weights::scope::Weights;
use crate::weights::tensor::{HostTensor, LoadDType};

type RenameFn = dyn Fn(&str) -> Option<String> + Send + Sync;
type ReshapeFn = dyn Fn(&str, &[usize]) -> Option<Vec<usize>> + Send + Sync;
type DeriveFn = dyn Fn(&str, &[usize]) -> Option<Vec<(String, Derived)>> + Send + Sync;
type PatchFn = dyn Fn(&str, HostTensor) -> Result<HostTensor> + Send + Sync;

/// How to open a [`WeightStore`]: key renaming, derived views, reshaping, the default load
/// dtype and strict mode.
///
/// ```
/// use std::collections::HashMap;
/// use sd_models::weights::{LoadDType, OpenOptions};
///
/// let options = OpenOptions::new()
///     .rename(|key| key.strip_prefix("model.diffusion_model.").map(str::to_owned))
///     .dtype(LoadDType::Stored)
///     .strict(true);
/// # let _ = options;
/// ```
#[derive(Clone, Default)]
pub struct OpenOptions {
    rename: Option<Arc<RenameFn>>,
    derive: Option<Arc<DeriveFn>>,
    reshape: Option<Arc<ReshapeFn>>,
    patch: Option<Arc<PatchFn>>,
    dtype: LoadDType,
    strict: bool,
}

impl fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenOptions")
            .field("rename", &self.rename.is_some())
            .field("derive", &self.derive.is_some())
            .field("reshape", &self.reshape.is_some())
            .field("patch", &self.patch.is_some())
            .field("dtype", &self.dtype)
            .field("strict", &self.strict)
            .finish()
    }
}

impl OpenOptions {
    /// No renaming, no derived views, no reshaping, loading as `f32`, not strict.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Renames every key of the files, once, at open time: `rename(file_key)` is the key the
    /// store knows the tensor by, or `None` to leave the tensor out (it is then neither
    /// loadable nor reported unused: a checkpoint holding several networks gives each its
    /// own keys). Lookups use the new names; errors name both. Replaces an earlier
    /// [`rename`](Self::rename) or [`rename_map`](Self::rename_map).
    #[must_use]
    pub fn rename(
        mut self,
        rename: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.rename = Some(Arc::new(rename));
        self
    }

    /// Renames the keys found in `map` (file key to store key) and keeps the others as they
    /// are. Replaces an earlier [`rename`](Self::rename) or [`rename_map`](Self::rename_map).
    #[must_use]
    pub fn rename_map<S: std::hash::BuildHasher + Send + Sync + 'static>(
        self,
        map: std::collections::HashMap<String, String, S>,
    ) -> Self {
        self.rename(move |key| Some(map.get(key).cloned().unwrap_or_else(|| key.to_owned())))
    }

    /// Changes every tensor as it is loaded: `patch(store_key, tensor)` is what the network
    /// gets (a LoRA's weights merged in, say, [`crate::lora::LoraPatches::patch`]), in
    /// the tensor's dtype and shape. Replaces an earlier [`patch`](Self::patch).
    #[must_use]
    pub fn patch(
        mut self,
        patch: impl Fn(&str, HostTensor) -> Result<HostTensor> + Send + Sync + 'static,
    ) -> Self {
        self.patch = Some(Arc::new(patch));
        self
    }

    /// Replaces some tensors by [`Derived`] views of them, once, at open time:
    /// `derive(store_key, stored_shape)` is the list of `(key, view)` the tensor is presented
    /// as instead of itself, or `None` to keep it whole. For example OpenCLIP's fused
    /// `in_proj_weight` `[3 D, D]` as the three `[D, D]` rows `q_proj.weight`,
    /// `k_proj.weight` and `v_proj.weight`, or a stored `x @ P` projection as the linear
    /// weight `P^T`. Each derived key is loaded, counted as used and reported unused on its
    /// own; only the bytes of a view are read (a transpose is copied). Applied after renaming
    /// (to the renamed key), before reshaping (which sees the derived shape). Replaces an
    /// earlier [`derive`](Self::derive).
    ///
    /// ```
    /// use sd_models::weights::{Derived, OpenOptions};
    ///
    /// let options = OpenOptions::new().derive(|key, shape| {
    ///     let fused = key.strip_suffix(".in_proj_weight")?;
    ///     let rows = *shape.first()?;
    ///     let part = |name: &str, i| Some((format!("{fused}.{name}.weight"), Derived::chunk(rows, 3, i)?));
    ///     Some(vec![part("q_proj", 0)?, part("k_proj", 1)?, part("v_proj", 2)?])
    /// });
    /// # let _ = options;
    /// ```
    #[must_use]
    pub fn derive(
        mut self,
        derive: impl Fn(&str, &[usize]) -> Option<Vec<(String, Derived)>> + Send + Sync + 'static,
    ) -> Self {
        self.derive = Some(Arc::new(derive));
        self
    }

    /// Views some tensors with another shape of as many elements, once, at open time:
    /// `reshape(store_key, shape)` is the shape to present, or `None` to keep it (for
    /// example a `[out, in, 1, 1]` 1x1 convolution kernel read as a `[out, in]` linear
    /// weight). Applied after renaming and derived views (`shape` is the derived one).
    #[must_use]
    pub fn reshape(
        mut self,
        reshape: impl Fn(&str, &[usize]) -> Option<Vec<usize>> + Send + Sync + 'static,
    ) -> Self {
        self.reshape = Some(Arc::new(reshape));
        self
    }

    /// The dtype [`WeightStore::get`] hands tensors out in (default [`LoadDType::F32`]).
    #[must_use]
    pub fn dtype(mut self, dtype: LoadDType) -> Self {
        self.dtype = dtype;
        self
    }

    /// Whether [`WeightStore::finish`] makes unused keys an error (default `false`).
    #[must_use]
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Opens safetensors files and shard indexes (`*.index.json`, whose shards are opened and
    /// checked against the index) as one store.
    ///
    /// # Errors
    /// [`Error::Io`] naming a file that cannot be read; [`Error::SafeTensors`] naming a file
    /// that is not valid safetensors; [`Error::Config`] for a malformed index;
    /// [`Error::DuplicateWeight`] for a key held by two files (or two keys renamed or derived
    /// alike); [`Error::MissingWeight`] if a shard lacks a key its index places there;
    /// [`Error::Shape`] if a derived view does not apply to its tensor or the reshape hook
    /// changes a tensor's number of elements.
    pub fn open<P: AsRef<Path>>(&self, paths: &[P]) -> Result<WeightStore> {
        let mut files = Vec::new();
        let mut expected = Vec::new();
        for path in paths {
            let path = path.as_ref();
            if folder::is_index(path) {
                let index = folder::read_index(path)?;
                for shard in &index.shards {
                    files.push(WeightFile::open(shard)?);
                }
                expected.extend(index.weight_map);
            } else {
                files.push(WeightFile::open(path)?);
            }
        }
        for (key, shard) in expected {
            let holds = files
                .iter()
                .any(|f| f.path() == shard.as_path() && f.contains(&key));
            if !holds {
                return Err(Error::MissingWeight {
                    key,
                    files: format!("{} (as its index says)", shard.display()),
                });
            }
        }
        self.from_files(files)
    }

    /// Opens the weights of a diffusers or transformers component folder (`unet/`,
    /// `text_encoder/`), the first of `variants` present (see [`find_weights`](super::find_weights)).
    ///
    /// # Errors
    /// Those of [`find_weights`](super::find_weights) and of [`open`](Self::open).
    pub fn open_folder(&self, dir: impl AsRef<Path>, variants: &[Variant]) -> Result<WeightStore> {
        self.open(&[folder::find_weights(dir, variants)?])
    }

    /// Opens a component folder ([`open_folder`](Self::open_folder)), builds what `load`
    /// makes of its store, then ends loading ([`WeightStore::finish`]): a network's
    /// `from_dir`.
    ///
    /// # Errors
    /// Those of [`open_folder`](Self::open_folder), of `load`, and of
    /// [`WeightStore::finish`] in strict mode.
    pub fn load_folder<T>(
        &self,
        dir: impl AsRef<Path>,
        variants: &[Variant],
        load: impl FnOnce(&WeightStore) -> Result<T>,
    ) -> Result<T> {
        let store = self.open_folder(dir, variants)?;
        let loaded = load(&store)?;
        store.finish()?;
        Ok(loaded)
    }

    /// A store over files already open.
    ///
    /// # Errors
    /// [`Error::DuplicateWeight`] for a key held by two files (or two keys renamed or derived
    /// alike); [`Error::Shape`] if a derived view does not apply to its tensor or the reshape
    /// hook changes a tensor's number of elements.
    pub fn from_files(&self, files: Vec<WeightFile>) -> Result<WeightStore> {
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        for (index, file) in files.iter().enumerate() {
            for file_key in file.keys() {
                let key = match &self.rename {
                    Some(rename) => match rename(file_key) {
                        Some(key) => key,
                        None => continue,
                    },
                    None => file_key.to_owned(),
                };
                let Some(stored) = file.stored(file_key) else {
                    continue;
                };
                let views = match &self.derive {
                    Some(derive) => derive(&key, &stored.shape),
                    None => None,
                };
                let views: Vec<(String, Option<Derived>)> = match views {
                    Some(views) => views.into_iter().map(|(k, v)| (k, Some(v))).collect(),
                    None => vec![(key, None)],
                };
                for (key, derived) in views {
                    let base = match derived {
                        Some(view) => view.shape(&stored.shape).ok_or_else(|| Error::Shape {
                            op: "weight derive hook",
                            expected: format!("a tensor to take {view} of, for {key}"),
                            found: format!("{file_key} of shape {:?}", stored.shape),
                        })?,
                        None => stored.shape.clone(),
                    };
                    let shape = match &self.reshape {
                        Some(reshape) => reshape(&key, &base).unwrap_or_else(|| base.clone()),
                        None => base.clone(),
                    };
                    let elements =
                        |s: &[usize]| s.iter().try_fold(1_usize, |n, &d| n.checked_mul(d));
                    if elements(&shape) != elements(&base) {
                        return Err(Error::Shape {
                            op: "weight reshape hook",
                            expected: format!(
                                "a shape of as many elements as {base:?} for {}",
                                describe(&key, file_key, derived.as_ref())
                            ),
                            found: format!("{shape:?}"),
                        });
                    }
                    if let Some(previous) = entries.get(&key) {
                        let other = files
                            .get(previous.file)
                            .map_or(Path::new(""), WeightFile::path);
                        return Err(Error::DuplicateWeight {
                            key: describe(&key, file_key, derived.as_ref()),
                            first: match &previous.derived {
                                Some(view) => format!(
                                    "{} (as {view} of {})",
                                    other.display(),
                                    previous.file_key
                                ),
                                None => format!("{} (as {})", other.display(), previous.file_key),
                            },
                            second: file.path().to_path_buf(),
                        });
                    }
                    entries.insert(
                        key,
                        Entry {
                            file: index,
                            file_key: file_key.to_owned(),
                            derived,
                            shape,
                            used: AtomicBool::new(false),
                        },
                    );
                }
            }
        }
        Ok(WeightStore {
            files,
            entries,
            dtype: self.dtype,
            strict: self.strict,
            patch: self.patch.clone(),
        })
    }
}

/// A key's name in errors: the store key, and the file key when renaming changed it or the
/// view it is of.
fn describe(key: &str, file_key: &str, derived: Option<&Derived>) -> String {
    match derived {
        Some(view) => format!("{key} ({view} of {file_key})"),
        None if key == file_key => key.to_owned(),
        None => format!("{key} (stored as {file_key})"),
    }
}

#[derive(Debug)]
struct Entry {
    /// Index into `WeightStore::files`.
    file: usize,
    file_key: String,
    /// The view of the stored tensor, if derived.
    derived: Option<Derived>,
    /// The shape presented (the stored one unless derived or reshaped).
    shape: Vec<usize>,
    used: AtomicBool,
}

/// Safetensors files seen as one checkpoint: shape-checked loading by key, used-key tracking
/// and strict mode.
///
/// Every method takes `&self` (the used-key flags are atomic), so a store can be shared by
/// threads loading different layers. Keys are looked up by their name after renaming (see
/// [`OpenOptions::rename`]).
///
/// # Example
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("sd-models-doc-store-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let path = dir.join("linear.safetensors");
/// # let w: Vec<u8> = [1.0_f32, 2.0, 3.0, 4.0, 5.0, 6.0].iter().flat_map(|x| x.to_le_bytes()).collect();
/// # let b: Vec<u8> = [0.5_f32, -0.5].iter().flat_map(|x| x.to_le_bytes()).collect();
/// # let tensors = [
/// #     ("proj.weight", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 3], &w)?),
/// #     ("proj.bias", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &b)?),
/// # ];
/// # safetensors::serialize_to_file(tensors, None, &path)?;
/// use sd_models::weights::{OpenOptions, WeightPath};
///
/// let store = OpenOptions::new().strict(true).open(&[&path])?;
/// let proj = WeightPath::root().push("proj");
/// let weight = store.get(&proj.push("weight"), &[2, 3])?;
/// assert_eq!(weight.to_f32_vec(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
/// assert_eq!(store.unused_keys(), ["proj.bias"]);
/// assert!(store.finish().is_err());
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct WeightStore {
    files: Vec<WeightFile>,
    entries: BTreeMap<String, Entry>,
    dtype: LoadDType,
    strict: bool,
    patch: Option<Arc<PatchFn>>,
}

impl fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeightStore")
            .field("files", &self.files().collect::<Vec<_>>())
            .field("keys", &self.entries.len())
            .field("dtype", &self.dtype)
            .field("strict", &self.strict)
            .finish()
    }
}

impl WeightStore {
    /// Opens safetensors files and shard indexes with [`OpenOptions::new`] (no renaming, `f32`,
    /// not strict).
    ///
    /// # Errors
    /// Those of [`OpenOptions::open`].
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        OpenOptions::new().open(paths)
    }

    /// Opens a component folder with [`OpenOptions::new`]; see [`OpenOptions::open_folder`].
    ///
    /// # Errors
    /// Those of [`OpenOptions::open_folder`].
    pub fn open_folder(dir: impl AsRef<Path>, variants: &[Variant]) -> Result<Self> {
        OpenOptions::new().open_folder(dir, variants)
    }

    /// The files, in the order they were opened (shards sorted by name).
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(WeightFile::path)
    }

    /// The open files.
    #[must_use]
    pub fn weight_files(&self) -> &[WeightFile] {
        &self.files
    }

    /// The number of keys.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the store holds no key.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The dtype [`get`](Self::get) hands tensors out in.
    #[must_use]
    pub fn dtype(&self) -> LoadDType {
        self.dtype
    }

    /// Whether [`finish`](Self::finish) makes unused keys an error.
    #[must_use]
    pub fn is_strict(&self) -> bool {
        self.strict
    }

    /// Every key, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The keys at or under `prefix`, segment by segment (`down_blocks.1` does not take
    /// `down_blocks.10.*`), sorted. Does not count as using them.
    #[must_use]
    pub fn keys_with_prefix(&self, prefix: &WeightPath) -> Vec<&str> {
        self.prefixed(prefix.as_str())
            .map(|(k, _)| k.as_str())
            .collect()
    }

    fn prefixed<'s, 'p>(
        &'s self,
        prefix: &'p str,
    ) -> impl Iterator<Item = (&'s String, &'s Entry)> + use<'s, 'p> {
        self.entries
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .filter(move |(k, _)| key_starts_with(k, prefix))
    }

    /// Whether the store holds `key`. Does not count as using it.
    #[must_use]
    pub fn contains(&self, key: &WeightPath) -> bool {
        self.entries.contains_key(key.as_str())
    }

    /// The file, shape and dtype of `key`, or `None` if the store does not hold it. Does not
    /// count as using it.
    #[must_use]
    pub fn info(&self, key: &WeightPath) -> Option<TensorInfo<'_>> {
        let (key, entry) = self.entries.get_key_value(key.as_str())?;
        self.entry_info(key, entry)
    }

    fn entry_info<'a>(&'a self, key: &'a str, entry: &'a Entry) -> Option<TensorInfo<'a>> {
        let file = self.files.get(entry.file)?;
        let stored = file.stored(&entry.file_key)?;
        Some(TensorInfo {
            key,
            file_key: &entry.file_key,
            file: file.path(),
            shape: &entry.shape,
            derived: entry.derived,
            dtype: stored.dtype,
            dtype_name: &stored.dtype_name,
        })
    }

    /// Loads `key`, checking that its shape is `expected`, in the store's dtype
    /// ([`OpenOptions::dtype`]). Counts as using it.
    ///
    /// # Errors
    /// [`Error::MissingWeight`] naming the key and the files if it is absent;
    /// [`Error::WeightShape`] naming the key, the file, the expected and the found shape;
    /// [`Error::WeightDType`] if it is not `F32`, `F16` or `BF16`.
    pub fn get(&self, key: &WeightPath, expected: &[usize]) -> Result<HostTensor> {
        self.get_as(key, expected, self.dtype)
    }

    /// As [`get`](Self::get), in `dtype`.
    ///
    /// # Errors
    /// Those of [`get`](Self::get).
    pub fn get_as(
        &self,
        key: &WeightPath,
        expected: &[usize],
        dtype: LoadDType,
    ) -> Result<HostTensor> {
        self.load(key.as_str(), expected, dtype)?
            .ok_or_else(|| Error::MissingWeight {
                key: key.to_string(),
                files: self.file_list(),
            })
    }

    /// Loads `key` if the store holds it (a layer that only some checkpoints have), checking
    /// its shape; `Ok(None)` if it is absent. Counts as using it when present.
    ///
    /// # Errors
    /// [`Error::WeightShape`] and [`Error::WeightDType`] as [`get`](Self::get).
    pub fn get_optional(&self, key: &WeightPath, expected: &[usize]) -> Result<Option<HostTensor>> {
        self.load(key.as_str(), expected, self.dtype)
    }

    pub(crate) fn load(
        &self,
        key: &str,
        expected: &[usize],
        dtype: LoadDType,
    ) -> Result<Option<HostTensor>> {
        let Some((key, entry)) = self.entries.get_key_value(key) else {
            return Ok(None);
        };
        entry.used.store(true, Ordering::Relaxed);
        let file = self
            .files
            .get(entry.file)
            .ok_or_else(|| Error::MissingWeight {
                key: key.clone(),
                files: self.file_list(),
            })?;
        let stored = file
            .stored(&entry.file_key)
            .ok_or_else(|| Error::MissingWeight {
                key: describe(key, &entry.file_key, entry.derived.as_ref()),
                files: file.path().display().to_string(),
            })?;
        let tensor = file.load_stored(
            stored,
            entry.derived.as_ref(),
            &entry.shape,
            &describe(key, &entry.file_key, entry.derived.as_ref()),
            expected,
            dtype,
        )?;
        match &self.patch {
            Some(patch) => patch(key, tensor).map(Some),
            None => Ok(Some(tensor)),
        }
    }

    /// Marks `key` as used without loading it (a buffer the network recomputes, such as
    /// CLIP's `position_ids`). Returns whether the store holds it.
    pub fn ignore(&self, key: &WeightPath) -> bool {
        self.entries
            .get(key.as_str())
            .inspect(|e| e.used.store(true, Ordering::Relaxed))
            .is_some()
    }

    /// Marks every key at or under `prefix` as used without loading it. Returns how many.
    pub fn ignore_prefix(&self, prefix: &WeightPath) -> usize {
        self.prefixed(prefix.as_str())
            .inspect(|(_, e)| e.used.store(true, Ordering::Relaxed))
            .count()
    }

    /// The keys never requested (by a `get` that found them, or [`ignore`](Self::ignore)),
    /// sorted.
    #[must_use]
    pub fn unused_keys(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(_, e)| !e.used.load(Ordering::Relaxed))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Ends loading: returns the unused keys (for a warning), or, in strict mode, fails if
    /// there are any.
    ///
    /// # Errors
    /// [`Error::UnusedWeights`] listing them, in strict mode.
    pub fn finish(&self) -> Result<Vec<String>> {
        let unused = self.unused_keys();
        if self.strict && !unused.is_empty() {
            return Err(Error::UnusedWeights { keys: unused });
        }
        Ok(unused)
    }

    /// Changes every tensor as it is loaded from now on, as [`OpenOptions::patch`] does.
    pub fn set_patch(
        &mut self,
        patch: impl Fn(&str, HostTensor) -> Result<HostTensor> + Send + Sync + 'static,
    ) {
        self.patch = Some(Arc::new(patch));
    }

    /// A [`Weights`] view at the root, in the store's dtype: what a network's loader starts
    /// from.
    #[must_use]
    pub fn root(&self) -> Weights<'_> {
        Weights::new(self, WeightPath::root(), self.dtype)
    }

    /// The files as a list for error messages.
    fn file_list(&self) -> String {
        let files: Vec<String> = self.files().map(|p| p.display().to_string()).collect();
        if files.is_empty() {
            "no files".to_owned()
        } else {
            files.join(", ")
        }
    }

    /// The distinct segments that follow `prefix` in the keys under it.
    pub(crate) fn children(&self, prefix: &str) -> Vec<&str> {
        let skip = if prefix.is_empty() {
            0
        } else {
            prefix.len() + 1
        };
        let mut seen = HashSet::new();
        let mut children: Vec<&str> = self
            .prefixed(prefix)
            .filter_map(|(k, _)| k.get(skip..))
            .filter_map(|rest| rest.split('.').next())
            .filter(|s| !s.is_empty() && seen.insert(*s))
            .collect();
        children.sort_by(|a, b| match (a.parse::<usize>(), b.parse::<usize>()) {
            (Ok(x), Ok(y)) => x.cmp(&y).then_with(|| a.cmp(b)),
            (Ok(_), Err(_)) => std::cmp::Ordering::Less,
            (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
            (Err(_), Err(_)) => a.cmp(b),
        });
        children
    }
}

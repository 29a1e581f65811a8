//! [`Weights`]: a [`WeightStore`] seen from one key prefix, the handle a layer loads from.
//!
//! A network's loader walks its module tree with it as PyTorch's `state_dict` names it
//! (`w.push("down_blocks").index(0).push("resnets")`), and each layer asks for its own
//! tensors by their last segment and expected shape (`w.get("weight", &[out, in])`), as
//! candle's `VarBuilder` does.

use crate::error::Result;
use crate::weights::file::TensorInfo;
use crate::weights::path::WeightPath;
use crate::weights::store::WeightStore;
use crate::weights::tensor::{HostTensor, LoadDType};

/// A [`WeightStore`] at a key prefix, loading in one dtype. Cheap to clone and to extend.
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("sd-models-doc-weights-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let path = dir.join("model.safetensors");
/// # let w: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
/// # let tensors = [
/// #     ("blocks.0.proj.weight", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 3], &w)?),
/// #     ("blocks.1.proj.weight", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 3], &w)?),
/// # ];
/// # safetensors::serialize_to_file(tensors, None, &path)?;
/// use sd_models::Result;
/// use sd_models::weights::{HostTensor, WeightStore, Weights};
///
/// /// A linear layer; its fields are named after the checkpoint's key segments.
/// struct Linear {
///     weight: HostTensor,
///     bias: Option<HostTensor>,
/// }
///
/// impl Linear {
///     fn load(w: &Weights<'_>, in_features: usize, out_features: usize) -> Result<Self> {
///         Ok(Self {
///             weight: w.get("weight", &[out_features, in_features])?,
///             bias: w.get_optional("bias", &[out_features])?,
///         })
///     }
/// }
///
/// let store = WeightStore::open(&[&path])?;
/// let blocks = store.root().push("blocks");
/// assert_eq!(blocks.children(), ["0", "1"]);
/// let layers = (0..2)
///     .map(|i| Linear::load(&blocks.index(i).push("proj"), 3, 2))
///     .collect::<Result<Vec<_>>>()?;
/// assert!(layers[1].bias.is_none());
/// assert_eq!(layers[1].weight.shape(), [2, 3]);
///
/// // A wrong shape names the key, the file, and both shapes.
/// let err = Linear::load(&blocks.index(0).push("proj"), 2, 3).err().ok_or("no error")?;
/// assert!(err.to_string().contains("blocks.0.proj.weight has shape [2, 3], expected [3, 2]"));
/// assert!(store.finish()?.is_empty());
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Weights<'a> {
    store: &'a WeightStore,
    path: WeightPath,
    dtype: LoadDType,
}

impl<'a> Weights<'a> {
    /// `store` seen from `path`, loading in `dtype`.
    #[must_use]
    pub fn new(store: &'a WeightStore, path: WeightPath, dtype: LoadDType) -> Self {
        Self { store, path, dtype }
    }

    /// The view one name segment down (`"conv1"`, `"resnets"`).
    #[must_use]
    pub fn push(&self, name: &str) -> Self {
        Self {
            store: self.store,
            path: self.path.push(name),
            dtype: self.dtype,
        }
    }

    /// The view one list index down (`.index(0)` after `.push("down_blocks")`).
    #[must_use]
    pub fn index(&self, i: usize) -> Self {
        Self {
            store: self.store,
            path: self.path.index(i),
            dtype: self.dtype,
        }
    }

    /// The same view, loading in `dtype` (for example `f32` for a normalisation layer of a
    /// half-precision network).
    #[must_use]
    pub fn with_dtype(&self, dtype: LoadDType) -> Self {
        Self {
            store: self.store,
            path: self.path.clone(),
            dtype,
        }
    }

    /// The prefix.
    #[must_use]
    pub fn path(&self) -> &WeightPath {
        &self.path
    }

    /// The full key of the tensor `name` under the prefix.
    #[must_use]
    pub fn key(&self, name: &str) -> WeightPath {
        self.path.push(name)
    }

    /// The dtype tensors are handed out in.
    #[must_use]
    pub fn dtype(&self) -> LoadDType {
        self.dtype
    }

    /// The store.
    #[must_use]
    pub fn store(&self) -> &'a WeightStore {
        self.store
    }

    /// Loads the tensor `name` under the prefix, checking that its shape is `expected`.
    /// Counts as using it.
    ///
    /// # Errors
    /// Those of [`WeightStore::get`]: [`MissingWeight`](crate::Error::MissingWeight),
    /// [`WeightShape`](crate::Error::WeightShape), [`WeightDType`](crate::Error::WeightDType).
    pub fn get(&self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        self.store.get_as(&self.key(name), expected, self.dtype)
    }

    /// Loads the tensor `name` if present (a layer only some checkpoints have), checking its
    /// shape; `Ok(None)` if absent.
    ///
    /// # Errors
    /// [`WeightShape`](crate::Error::WeightShape) and
    /// [`WeightDType`](crate::Error::WeightDType) as [`get`](Self::get).
    pub fn get_optional(&self, name: &str, expected: &[usize]) -> Result<Option<HostTensor>> {
        self.store
            .load(self.key(name).as_str(), expected, self.dtype)
    }

    /// Whether the tensor `name` is present under the prefix. Does not count as using it.
    #[must_use]
    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.key(name))
    }

    /// The file, shape and dtype of the tensor `name`, if present. Does not count as using
    /// it.
    #[must_use]
    pub fn info(&self, name: &str) -> Option<TensorInfo<'a>> {
        self.store.info(&self.key(name))
    }

    /// Whether any key is at or under the prefix (an optional sub-module such as
    /// `conv_shortcut` or `upsamplers`).
    #[must_use]
    pub fn exists(&self) -> bool {
        !self.keys().is_empty()
    }

    /// The keys at or under the prefix, sorted. Does not count as using them.
    #[must_use]
    pub fn keys(&self) -> Vec<&'a str> {
        self.store.keys_with_prefix(&self.path)
    }

    /// The distinct segments that follow the prefix in the keys under it, list indices in
    /// numeric order first (`["0", "1", "2", "10", "conv"]`): how many blocks a checkpoint
    /// has.
    #[must_use]
    pub fn children(&self) -> Vec<&'a str> {
        self.store.children(self.path.as_str())
    }

    /// Marks every key at or under the prefix as used without loading it. Returns how many.
    pub fn ignore(&self) -> usize {
        self.store.ignore_prefix(&self.path)
    }
}

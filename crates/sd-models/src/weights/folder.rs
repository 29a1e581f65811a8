//! diffusers and transformers component folders: which file(s) hold the weights.
//!
//! Follows `diffusers/models/modeling_utils.py` (`from_pretrained`, `_fetch_index_file`,
//! `_fetch_index_file_legacy`), `diffusers/utils/hub_utils.py` (`_add_variant`) and
//! `transformers/modeling_utils.py`: a component folder (`unet/`, `vae/`, `text_encoder/`)
//! holds either one file, `diffusion_pytorch_model.safetensors` (diffusers) or
//! `model.safetensors` (transformers), or shards listed by an index
//! (`diffusion_pytorch_model.safetensors.index.json`, `"weight_map"`: key to shard file
//! name). A variant such as `fp16` is inserted before the last extension:
//! `diffusion_pytorch_model.fp16.safetensors`, `diffusion_pytorch_model.safetensors.index.fp16.json`
//! (whose shards are `diffusion_pytorch_model.fp16-00001-of-00002.safetensors`), and the
//! deprecated `diffusion_pytorch_model.safetensors.fp16.index.json`. As in diffusers, an index
//! is preferred to a single file. PyTorch pickle files (`.bin`) are not read.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// The weight file names of diffusers models, then of transformers models.
const BASE_NAMES: [&str; 2] = ["diffusion_pytorch_model", "model"];

/// Which variant of a component's weights to open (`variant=` of diffusers'
/// `from_pretrained`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Variant {
    /// The files without a variant suffix (`diffusion_pytorch_model.safetensors`).
    #[default]
    Default,
    /// The half-precision files (`diffusion_pytorch_model.fp16.safetensors`).
    Fp16,
    /// Another variant suffix (`"bf16"`, `"ema"`, ...).
    Named(String),
}

impl Variant {
    /// The suffix inserted into the file names, or `None` for [`Variant::Default`].
    #[must_use]
    pub fn suffix(&self) -> Option<&str> {
        match self {
            Self::Default => None,
            Self::Fp16 => Some("fp16"),
            Self::Named(name) => Some(name),
        }
    }

    /// The file names to look for, in order of preference, for one base name.
    fn candidates(&self, base: &str) -> Vec<String> {
        match self.suffix() {
            None => vec![
                format!("{base}.safetensors.index.json"),
                format!("{base}.safetensors"),
            ],
            Some(v) => vec![
                format!("{base}.safetensors.index.{v}.json"),
                format!("{base}.safetensors.{v}.index.json"),
                format!("{base}.{v}.safetensors"),
            ],
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.suffix().unwrap_or("default"))
    }
}

/// The weights file of the component folder `dir`: an index for sharded weights, else a
/// single `.safetensors` file. The first of `variants` present wins
/// (`&[Variant::Fp16, Variant::Default]` prefers half precision and falls back to the default
/// files); an empty slice means `&[Variant::Default]`.
///
/// For each variant, with the diffusers base name `diffusion_pytorch_model` and then the
/// transformers one `model`, the candidates are, in order (as diffusers' `from_pretrained`
/// looks for them): `{base}.safetensors.index.json` then `{base}.safetensors` for the
/// default; `{base}.safetensors.index.{v}.json`, the deprecated
/// `{base}.safetensors.{v}.index.json`, then `{base}.{v}.safetensors` for a variant `v`.
/// Shard names (`diffusion_pytorch_model.fp16-00001-of-00002.safetensors`) come from the
/// index's `weight_map`.
///
/// The result can be passed to [`WeightStore::open`](super::WeightStore::open).
///
/// # Errors
/// [`Error::Io`] naming `dir` if it is not a directory or holds none of the candidate files
/// (the message lists them, and mentions `.bin` pickle files, which are not supported).
pub fn find_weights(dir: impl AsRef<Path>, variants: &[Variant]) -> Result<PathBuf> {
    let dir = dir.as_ref();
    let not_found = |message: String| Error::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, message),
    };
    if !dir.is_dir() {
        return Err(not_found("not a directory".to_owned()));
    }
    let default = [Variant::Default];
    let variants = if variants.is_empty() {
        &default[..]
    } else {
        variants
    };
    let mut tried = Vec::new();
    for variant in variants {
        for base in BASE_NAMES {
            for name in variant.candidates(base) {
                let path = dir.join(&name);
                if path.is_file() {
                    return Ok(path);
                }
                tried.push(name);
            }
        }
    }
    let pickles: Vec<String> = BASE_NAMES
        .iter()
        .flat_map(|base| {
            variants.iter().map(move |v| match v.suffix() {
                None => format!("{base}.bin"),
                Some(s) => format!("{base}.{s}.bin"),
            })
        })
        .filter(|name| dir.join(name).is_file())
        .collect();
    let mut message = format!(
        "no safetensors weights for variant {} (looked for {})",
        variants
            .iter()
            .map(Variant::to_string)
            .collect::<Vec<_>>()
            .join(" or "),
        tried.join(", ")
    );
    if !pickles.is_empty() {
        message.push_str(&format!(
            "; found only PyTorch pickle files ({}), which are not supported: convert them to safetensors",
            pickles.join(", ")
        ));
    }
    Err(not_found(message))
}

/// Whether `path` names a shard index rather than a safetensors file (it ends in `.json`).
pub(crate) fn is_index(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// A parsed shard index.
#[derive(Debug)]
pub(crate) struct ShardIndex {
    /// The shard files, sorted, each once.
    pub(crate) shards: Vec<PathBuf>,
    /// Each key and the shard file that holds it.
    pub(crate) weight_map: BTreeMap<String, PathBuf>,
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

/// Reads a `*.safetensors.index.json`; shard names are resolved next to it.
///
/// # Errors
/// [`Error::Io`] if it cannot be read; [`Error::Config`] naming it if it is not JSON, has no
/// `weight_map`, an empty one, or a shard name that is not a plain file name.
pub(crate) fn read_index(path: &Path) -> Result<ShardIndex> {
    let config = |message: String| Error::Config {
        what: path.display().to_string(),
        message,
    };
    let text = crate::files::read_regular_string(path)?;
    let index: IndexFile = serde_json::from_str(&text)
        .map_err(|e| config(format!("not a safetensors shard index: {e}")))?;
    if index.weight_map.is_empty() {
        return Err(config("the weight_map is empty".to_owned()));
    }
    let dir = path.parent().unwrap_or_else(|| Path::new(""));
    let mut weight_map = BTreeMap::new();
    for (key, shard) in index.weight_map {
        let mut components = Path::new(&shard).components();
        let plain = matches!(
            (components.next(), components.next()),
            (Some(Component::Normal(_)), None)
        );
        if !plain {
            return Err(config(format!(
                "weight_map: {key} is in {shard:?}, which is not a file name next to the index"
            )));
        }
        weight_map.insert(key, dir.join(shard));
    }
    let mut shards: Vec<PathBuf> = weight_map.values().cloned().collect();
    shards.sort();
    shards.dedup();
    Ok(ShardIndex { shards, weight_map })
}

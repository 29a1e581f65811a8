//! The two tools every component's mapping uses: [`Shapes`], the file's keys and shapes
//! (what inference reads), and [`Table`], the key map being built (file key to store key).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::weights::Derived;
use crate::weights::WeightPath;

/// How a stored tensor becomes the tensor of a store key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum View {
    /// As stored (a rename).
    Whole,
    /// A 1x1 convolution kernel `[out, in, 1, 1]` (or a 1-D one, `[out, in, 1]`) read as the
    /// linear weight `[out, in]` (diffusers' `conv_attn_to_linear`), through the store's
    /// reshape hook. A weight already 2-D is read as it is.
    Linear,
    /// A [`Derived`] view: rows of a fused projection, or a transpose.
    Derived(Derived),
}

impl fmt::Display for View {
    /// `the whole`, `the linear view`, `rows 0..16`, `the transpose` (of a stored tensor).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            View::Whole => f.write_str("the whole"),
            View::Linear => f.write_str("the linear view"),
            View::Derived(view) => view.fmt(f),
        }
    }
}

/// One tensor of the file mapped to a key of a component's store.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MappedKey {
    /// The key in the file (`model.diffusion_model.input_blocks.0.0.weight`).
    pub file_key: String,
    /// The key in the component's store: the diffusers or transformers name
    /// (`conv_in.weight`).
    pub key: String,
    /// How the stored tensor becomes it.
    pub view: View,
    /// Whether a checkpoint may lack it (CLIP's `position_ids` buffer).
    pub optional: bool,
}

impl MappedKey {
    /// The shape the store presents for a stored tensor of shape `stored`, or `None` if the
    /// view does not apply to it.
    #[must_use]
    pub fn shape(&self, stored: &[usize]) -> Option<Vec<usize>> {
        match self.view {
            View::Whole => Some(stored.to_vec()),
            View::Linear => Some(linear_shape(stored).unwrap_or_else(|| stored.to_vec())),
            View::Derived(view) => view.shape(stored),
        }
    }
}

/// `[out, in]` for a 1x1 kernel `[out, in, 1, 1]` or `[out, in, 1]`; `None` for anything
/// else.
pub(crate) fn linear_shape(shape: &[usize]) -> Option<Vec<usize>> {
    match *shape {
        [o, i, 1] | [o, i, 1, 1] => Some(vec![o, i]),
        _ => None,
    }
}

/// The file's keys and shapes, with the lookups inference needs. `what` names the file in
/// errors.
#[derive(Debug)]
pub(crate) struct Shapes<'a> {
    pub(crate) what: &'a str,
    map: BTreeMap<&'a str, &'a [usize]>,
}

impl<'a> Shapes<'a> {
    pub(crate) fn new(what: &'a str, map: BTreeMap<&'a str, &'a [usize]>) -> Self {
        Self { what, map }
    }

    /// The shape of `key`, if present.
    pub(crate) fn get(&self, key: &str) -> Option<&'a [usize]> {
        self.map.get(key).copied()
    }

    /// The shape of `key`, which inference needs to find `purpose`.
    pub(crate) fn need(&self, key: &str, purpose: &str) -> Result<&'a [usize]> {
        self.get(key).ok_or_else(|| Error::MissingWeight {
            key: format!("{key} (needed to infer {purpose})"),
            files: self.what.to_owned(),
        })
    }

    /// Dimension `dim` of `key`'s shape, of rank `rank`.
    pub(crate) fn dim(&self, key: &str, rank: usize, dim: usize, purpose: &str) -> Result<usize> {
        let shape = self.need(key, purpose)?;
        match shape.get(dim) {
            Some(&d) if shape.len() == rank => Ok(d),
            _ => Err(Error::Shape {
                op: "single-file inference",
                expected: format!("a {rank}-D tensor for {key} (to infer {purpose})"),
                found: format!("shape {shape:?}"),
            }),
        }
    }

    /// The keys at or under `prefix` (whole segments).
    pub(crate) fn under(&self, prefix: &str) -> impl Iterator<Item = &'a str> + use<'a, '_> {
        let (start, len) = (prefix.to_owned(), prefix.len());
        self.map
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .map(|(k, _)| *k)
            .take_while(move |k| k.starts_with(start.as_str()))
            .filter(move |k| {
                k.get(len..)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
            })
    }

    /// Whether any key is at or under `prefix`.
    pub(crate) fn has(&self, prefix: &str) -> bool {
        self.under(prefix).next().is_some()
    }

    /// The numeric segments that follow `prefix` (the indices of a `ModuleList`), sorted.
    pub(crate) fn indices(&self, prefix: &str) -> Vec<usize> {
        let skip = prefix.len() + 1;
        let mut out: Vec<usize> = self
            .under(prefix)
            .filter_map(|k| k.get(skip..))
            .filter_map(|rest| rest.split('.').next())
            .filter_map(|s| s.parse().ok())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Every key.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &'a str> + use<'a, '_> {
        self.map.keys().copied()
    }
}

/// `weight` and `bias`.
pub(crate) const WB: &[&str] = &["weight", "bias"];

/// A component's key map under construction: file key prefix plus a module path on the file
/// side, store path on the other.
#[derive(Debug)]
pub(crate) struct Table {
    prefix: String,
    pub(crate) keys: Vec<MappedKey>,
}

impl Table {
    /// A table whose file keys start with `prefix` (`"model.diffusion_model."`).
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            keys: Vec::new(),
        }
    }

    fn file_key(&self, path: &WeightPath) -> String {
        format!("{}{}", self.prefix, path)
    }

    /// The parameters `params` of the module at `file` (file side) and `key` (store side),
    /// renamed.
    pub(crate) fn module(&mut self, file: &WeightPath, key: &WeightPath, params: &[&str]) {
        self.module_as(file, key, params, View::Whole);
    }

    /// As [`module`](Self::module), the weights read through `view` (biases as they are).
    pub(crate) fn module_as(
        &mut self,
        file: &WeightPath,
        key: &WeightPath,
        params: &[&str],
        view: View,
    ) {
        for &param in params {
            let view = if param == "weight" { view } else { View::Whole };
            self.push(&file.push(param), key.push(param), view);
        }
    }

    /// One tensor.
    pub(crate) fn push(&mut self, file: &WeightPath, key: WeightPath, view: View) {
        self.keys.push(MappedKey {
            file_key: self.file_key(file),
            key: key.as_str().to_owned(),
            view,
            optional: false,
        });
    }

    /// One tensor a checkpoint may lack.
    pub(crate) fn push_optional(&mut self, file: &WeightPath, key: WeightPath) {
        let file_key = self.file_key(file);
        self.keys.push(MappedKey {
            file_key,
            key: key.as_str().to_owned(),
            view: View::Whole,
            optional: true,
        });
    }
}

/// A config value read back for building the key map (after overrides).
pub(crate) struct ConfigReader<'a> {
    pub(crate) what: String,
    pub(crate) map: &'a Map<String, Value>,
}

impl ConfigReader<'_> {
    fn error(&self, message: String) -> Error {
        Error::Config {
            what: self.what.clone(),
            message,
        }
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize> {
        self.map
            .get(key)
            .and_then(Value::as_u64)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| self.error(format!("{key} must be a non-negative integer")))
    }

    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.usize(key),
        }
    }

    pub(crate) fn usizes(&self, key: &str) -> Result<Vec<usize>> {
        let error = || self.error(format!("{key} must be a list of non-negative integers"));
        self.map
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(error)?
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|v| usize::try_from(v).ok())
                    .ok_or_else(error)
            })
            .collect()
    }

    pub(crate) fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let error = || self.error(format!("{key} must be a list of strings"));
        self.map
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(error)?
            .iter()
            .map(|v| v.as_str().ok_or_else(error))
            .collect()
    }

    /// Fails with `message` about `key`.
    pub(crate) fn unsupported(&self, key: &str, message: &str) -> Error {
        self.error(format!("{key}: {message}"))
    }
}

/// Sets `key` to `value`, leaving it absent when it is absent and `value` is the default
/// diffusers assumes for a missing key (so an inferred config equals its preset where the
/// weights agree with it).
pub(crate) fn set(config: &mut Map<String, Value>, key: &str, value: Value, default: &Value) {
    if config.get(key).is_none() && value == *default {
        return;
    }
    config.insert(key.to_owned(), value);
}

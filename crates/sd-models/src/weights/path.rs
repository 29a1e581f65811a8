//! Weight keys built from typed segments.
//!
//! A checkpoint key such as `down_blocks.0.resnets.1.conv1.weight` is a path through the
//! module tree of the reference network (PyTorch's `state_dict` naming): module names and
//! list indices joined with `'.'`. A [`WeightPath`] is built segment by segment
//! (`push` for a name, `index` for a list position), so that network code never assembles
//! keys with `format!`.

use std::fmt;

/// A checkpoint key, or the prefix of one, built from name and index segments.
///
/// The root path is empty; pushing onto it gives a one-segment key. Paths are cheap
/// immutable values: [`push`](Self::push) and [`index`](Self::index) return a new path, so a
/// layer can hand each child its own prefix.
///
/// ```
/// use sd_models::weights::WeightPath;
///
/// let resnet = WeightPath::root().push("down_blocks").index(0).push("resnets").index(1);
/// assert_eq!(resnet.push("conv1").push("weight").to_string(), "down_blocks.0.resnets.1.conv1.weight");
/// assert_eq!(resnet.name(), Some("1"));
/// assert!(resnet.push("conv1").starts_with(&WeightPath::new("down_blocks.0")));
/// assert!(!WeightPath::new("down_blocks.10").starts_with(&WeightPath::new("down_blocks.1")));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WeightPath {
    key: String,
}

impl WeightPath {
    /// The empty path (the root of a checkpoint).
    #[must_use]
    pub fn root() -> Self {
        Self::default()
    }

    /// The path of a whole key or prefix written out (`"text_model.encoder"`); its segments
    /// are the parts between dots.
    #[must_use]
    pub fn new(key: impl Into<String>) -> Self {
        Self { key: key.into() }
    }

    /// This path with the name segment `name` appended (`"conv1"`, `"weight"`).
    ///
    /// An empty `name` appends nothing, so a layer that sits at the root of its checkpoint
    /// can be handed an empty prefix. A `name` with dots appends several segments.
    #[must_use]
    pub fn push(&self, name: &str) -> Self {
        if name.is_empty() {
            return self.clone();
        }
        if self.key.is_empty() {
            return Self::new(name);
        }
        let mut key = String::with_capacity(self.key.len() + 1 + name.len());
        key.push_str(&self.key);
        key.push('.');
        key.push_str(name);
        Self { key }
    }

    /// This path with the list index `i` appended (PyTorch's `ModuleList` position).
    #[must_use]
    pub fn index(&self, i: usize) -> Self {
        self.push(&i.to_string())
    }

    /// The key, segments joined with `'.'`.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.key
    }

    /// Whether this is the root (empty) path.
    #[must_use]
    pub fn is_root(&self) -> bool {
        self.key.is_empty()
    }

    /// The segments, from the root.
    pub fn segments(&self) -> impl DoubleEndedIterator<Item = &str> {
        self.key.split('.').filter(|s| !s.is_empty())
    }

    /// The last segment, or `None` at the root.
    #[must_use]
    pub fn name(&self) -> Option<&str> {
        self.segments().next_back()
    }

    /// The path without its last segment, or `None` at the root.
    #[must_use]
    pub fn parent(&self) -> Option<Self> {
        if self.is_root() {
            return None;
        }
        Some(
            self.key
                .rsplit_once('.')
                .map_or_else(Self::root, |(parent, _)| Self::new(parent)),
        )
    }

    /// Whether `prefix` is this path or an ancestor of it, segment by segment
    /// (`down_blocks.10` does not start with `down_blocks.1`). Every path starts with the
    /// root.
    #[must_use]
    pub fn starts_with(&self, prefix: &WeightPath) -> bool {
        key_starts_with(&self.key, &prefix.key)
    }
}

/// Whether `prefix` is `key` or a whole-segment prefix of it.
pub(crate) fn key_starts_with(key: &str, prefix: &str) -> bool {
    if prefix.is_empty() {
        return true;
    }
    match key.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('.'),
        None => false,
    }
}

impl fmt::Display for WeightPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

impl AsRef<str> for WeightPath {
    fn as_ref(&self) -> &str {
        &self.key
    }
}

impl From<&str> for WeightPath {
    fn from(key: &str) -> Self {
        Self::new(key)
    }
}

impl From<String> for WeightPath {
    fn from(key: String) -> Self {
        Self::new(key)
    }
}

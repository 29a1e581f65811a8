//! Shared by the UNet and VAE tests: a weight source that records every key and shape a
//! network asks for, and the full-size key layouts diffusers' own classes have
//! (fixtures/unet/presets.json), so that building a preset network from random weights also
//! checks that a real checkpoint of it would load, key for key and shape for shape.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

pub mod fixtures;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;

use sd_models::Result;
use sd_models::nn::{RandomWeights, WeightSource};
use sd_models::weights::{HostTensor, WeightPath};

/// [`RandomWeights`] that also records every `(key, shape)` requested.
#[derive(Clone)]
pub struct Recording {
    inner: RandomWeights,
    path: WeightPath,
    pub log: Rc<RefCell<BTreeMap<String, Vec<usize>>>>,
}

impl Recording {
    pub fn new(inner: RandomWeights) -> Self {
        Recording {
            inner,
            path: WeightPath::root(),
            log: Rc::default(),
        }
    }
}

impl WeightSource for Recording {
    fn push(&self, name: &str) -> Self {
        Recording {
            inner: self.inner.push(name),
            path: self.path.push(name),
            log: self.log.clone(),
        }
    }

    fn index(&self, i: usize) -> Self {
        Recording {
            inner: self.inner.index(i),
            path: self.path.index(i),
            log: self.log.clone(),
        }
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let key = self.path.push(name).to_string();
        let previous = self.log.borrow_mut().insert(key.clone(), shape.to_vec());
        assert!(previous.is_none(), "{key} requested twice");
        self.inner.get(name, shape)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// The keys and shapes diffusers' network for preset `name` (`sd15_unet`, ...) holds, and
/// its parameter count.
pub fn preset_layout(name: &str) -> (BTreeMap<String, Vec<usize>>, u64) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/unet/presets.json");
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let entry = &all[name];
    let shapes = entry["shapes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let shape = v
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (k.clone(), shape)
        })
        .collect();
    (shapes, entry["parameters"].as_u64().unwrap())
}

/// Asserts that the recorded layout is diffusers' for preset `name`.
pub fn assert_layout(name: &str, recorded: &BTreeMap<String, Vec<usize>>) {
    let (expected, parameters) = preset_layout(name);
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !recorded.contains_key(*k))
        .collect();
    let extra: Vec<_> = recorded
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{name}: keys diffusers has that were not loaded: {missing:?}; keys loaded that \
         diffusers does not have: {extra:?}"
    );
    for (key, shape) in &expected {
        assert_eq!(&recorded[key], shape, "{name}: shape of {key}");
    }
    let count: usize = recorded.values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(count as u64, parameters, "{name}: parameter count");
    println!(
        "{name}: {} tensors, {count} parameters, as diffusers",
        recorded.len()
    );
}

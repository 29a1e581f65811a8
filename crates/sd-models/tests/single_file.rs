//! Single-file checkpoints (original CompVis key names) against the diffusers layout of the
//! same weights (fixtures/single_file, written by tools/fixtures/generate.py single_file,
//! whose original-name files are checked against diffusers' own conversion functions).
//!
//! - every tensor loaded through the mapping equals, bit for bit, the same key of the
//!   diffusers-layout files, for the UNet, the VAE and the text encoder of an SD 1.x-like
//!   (bf16, OpenAI CLIP, with an EMA copy) and an SD 2.x-like (f16, OpenCLIP) pipeline;
//! - the inferred configs equal the diffusers configs of the tiny models (given the
//!   overrides for what weights cannot show) and, on the real-size key tables of SD 1.5,
//!   SD 1.5 inpainting, SD 2.1 and SD 2 inpainting, the presets exactly, with every key
//!   mapped onto the diffusers state dict's keys and shapes;
//! - strict mode: the unused keys are exactly the documented ignores;
//! - the CLIP text encoder loads from a single file's store as from its folder, with the
//!   same config and the same output, bit for bit;
//! - errors: a missing key is named, a file that is not SD 1.x/2.x cannot be inferred, a
//!   truncated file is the weights module's `SafeTensors` error.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use safetensors::tensor::TensorView;
use sd_core::PredictionType;
use sd_models::backend::DataOps;
use sd_models::clip::ClipTextModel;
use sd_models::weights::compvis::{
    Component, IgnoreReason, ModelKind, SCHEDULE_BUFFERS, SingleFile, SingleFileOptions,
    SingleFilePlan, View,
};
use sd_models::weights::{
    DType, HostData, HostTensor, LoadDType, Variant, WeightFile, WeightPath, WeightStore,
};
use sd_models::{CpuBackend, Error};
use serde_json::{Map, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/single_file")
}

/// A fresh empty directory for one test, removed when dropped.
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
        .join("sd-models-single-file")
        .join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// The networks of an SD 1.x/2.x checkpoint (SDXL adds a second text encoder).
const SD_COMPONENTS: [Component; 3] = [Component::Unet, Component::Vae, Component::TextEncoder];

/// The options a fixture pipeline needs: its overrides.json (head and group counts, which the
/// tiny widths do not share with the real models).
fn options(name: &str) -> SingleFileOptions {
    let text = std::fs::read_to_string(fixtures().join(name).join("overrides.json")).unwrap();
    let overrides: Map<String, Value> = serde_json::from_str(&text).unwrap();
    let mut options = SingleFileOptions::new()
        .dtype(LoadDType::Stored)
        .strict(true);
    for component in Component::ALL {
        if let Some(fields) = overrides.get(component.name()) {
            options = options.override_config(component, fields.clone());
        }
    }
    options
}

/// The elements' bits, whatever the dtype.
fn bits(t: &HostTensor) -> Vec<u32> {
    match t.data() {
        HostData::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
        HostData::F16(v) => v.iter().map(|x| u32::from(x.to_bits())).collect(),
        HostData::BF16(v) => v.iter().map(|x| u32::from(x.to_bits())).collect(),
    }
}

/// Loads every key of `reference` from `single` and compares bits (keys of a dtype that does
/// not load, such as CLIP's integer `position_ids`, by dtype and shape). `transform` maps the
/// reference's bits to the expected ones. Returns the number of keys.
fn assert_same_tensors(
    what: &str,
    single: &WeightStore,
    reference: &WeightStore,
    transform: impl Fn(u32) -> u32,
) -> usize {
    let single_keys: BTreeSet<&str> = single.keys().collect();
    let reference_keys: BTreeSet<&str> = reference.keys().collect();
    assert_eq!(
        single_keys.difference(&reference_keys).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "{what}: keys the diffusers files lack"
    );
    assert_eq!(
        reference_keys.difference(&single_keys).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "{what}: keys the single file lacks"
    );
    for key in &reference_keys {
        let path = WeightPath::new(*key);
        let want = reference.info(&path).unwrap();
        let got = single.info(&path).unwrap();
        assert_eq!(got.shape, want.shape, "{what}: {key}");
        assert_eq!(got.dtype_name, want.dtype_name, "{what}: {key}");
        if want.dtype.is_none() {
            assert!(single.ignore(&path));
            continue;
        }
        let want = reference.get(&path, want.shape).unwrap();
        let got = single.get(&path, want.shape()).unwrap();
        assert_eq!(got.dtype(), want.dtype(), "{what}: {key}");
        let expected: Vec<u32> = bits(&want).into_iter().map(&transform).collect();
        assert!(bits(&got) == expected, "{what}: {key} differs");
    }
    reference_keys.len()
}

fn folder(name: &str, component: &str) -> WeightStore {
    sd_models::weights::OpenOptions::new()
        .dtype(LoadDType::Stored)
        .open_folder(fixtures().join(name).join(component), &[Variant::Default])
        .unwrap()
}

fn ignored_by_reason(file: &SingleFile) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for ignored in file.ignored() {
        *out.entry(format!("{:?}", ignored.reason)).or_default() += 1;
    }
    out
}

#[test]
fn sd1_every_tensor_equals_the_diffusers_layout() {
    let file = options("sd1")
        .open(fixtures().join("sd1/model.safetensors"))
        .unwrap();
    assert_eq!(file.kind(), ModelKind::Sd1);
    let mut counts = Vec::new();
    for component in SD_COMPONENTS {
        let single = file.store(component).unwrap();
        let reference = folder("sd1", component.name());
        let n = assert_same_tensors(component.name(), single, &reference, |b| b);
        assert_eq!(single.dtype(), LoadDType::Stored);
        assert!(single.finish().unwrap().is_empty());
        counts.push((component, n));
    }
    println!("sd1 keys mapped: {counts:?}");
    // Strict: every key used, and the rest the documented ignores.
    assert!(file.unassigned().is_empty(), "{:?}", file.unassigned());
    assert_eq!(file.finish().unwrap(), Vec::<String>::new());
    let unet_keys = file.unet().len();
    let by_reason = ignored_by_reason(&file);
    assert_eq!(by_reason["ScheduleBuffer"], SCHEDULE_BUFFERS.len());
    // The EMA copy of every UNet key, plus `decay` and `num_updates`.
    assert_eq!(by_reason["EmaCopy"], unet_keys + 2);
    assert_eq!(by_reason.len(), 2, "{by_reason:?}");
    let buffers: BTreeSet<&str> = file
        .ignored()
        .iter()
        .filter(|i| i.reason == IgnoreReason::ScheduleBuffer)
        .map(|i| i.key.as_str())
        .collect();
    assert_eq!(buffers, SCHEDULE_BUFFERS.into_iter().collect());
}

#[test]
fn sd1_ema_copy_loads_instead() {
    let file = options("sd1")
        .ema(true)
        .open(fixtures().join("sd1/model.safetensors"))
        .unwrap();
    // The fixture's EMA copy holds the UNet's values negated: the sign bit of each bf16.
    let n = assert_same_tensors("unet (EMA)", file.unet(), &folder("sd1", "unet"), |b| {
        b ^ 0x8000
    });
    assert_eq!(file.unet().dtype(), LoadDType::Stored);
    assert_eq!(
        file.unet()
            .info(&WeightPath::new("conv_in.weight"))
            .unwrap()
            .dtype,
        Some(DType::BF16)
    );
    let by_reason = ignored_by_reason(&file);
    assert_eq!(by_reason["NonEma"], n);
    assert_eq!(by_reason["EmaBookkeeping"], 2);
    assert!(file.unassigned().is_empty());
    let key = file
        .plan()
        .unet
        .keys
        .iter()
        .find(|k| k.key == "down_blocks.0.resnets.0.conv1.weight")
        .unwrap();
    assert_eq!(
        key.file_key,
        "model_ema.diffusion_modelinput_blocks10in_layers2weight"
    );
}

#[test]
fn sd2_every_tensor_equals_the_diffusers_layout() {
    let file = options("sd2")
        .open(fixtures().join("sd2/model.safetensors"))
        .unwrap();
    assert_eq!(file.kind(), ModelKind::Sd2);
    let mut counts = Vec::new();
    for component in SD_COMPONENTS {
        let single = file.store(component).unwrap();
        let reference = folder("sd2", component.name());
        let n = assert_same_tensors(component.name(), single, &reference, |b| b);
        assert!(single.finish().unwrap().is_empty());
        counts.push((component, n));
    }
    println!("sd2 keys mapped: {counts:?}");
    // q, k and v of every layer are row views of the fused projection.
    let text = &file.plan().text_encoder.as_ref().unwrap().keys;
    let derived = text
        .iter()
        .filter(|k| matches!(k.view, View::Derived(_)))
        .count();
    assert_eq!(derived, 23 * 6);
    assert!(file.unassigned().is_empty(), "{:?}", file.unassigned());
    assert_eq!(file.finish().unwrap(), Vec::<String>::new());
    let by_reason = ignored_by_reason(&file);
    assert_eq!(by_reason["ScheduleBuffer"], SCHEDULE_BUFFERS.len());
    assert_eq!(by_reason["EmaCopy"], 2);
    // The 24th layer's 12 tensors (ln_1, attn.in_proj, attn.out_proj, ln_2, c_fc, c_proj).
    assert_eq!(by_reason["OpenClipLastLayers"], 12);
    assert_eq!(by_reason["OpenClipProjection"], 1);
    assert_eq!(by_reason["LogitScale"], 1);
    assert_eq!(by_reason.len(), 5, "{by_reason:?}");
}

#[test]
fn sd2_whole_open_clip_tower_with_its_transposed_projection() {
    let file = options("sd2")
        .full_open_clip(true)
        .open(fixtures().join("sd2/model.safetensors"))
        .unwrap();
    let text = file.text_encoder().unwrap();
    assert_same_tensors(
        "text_encoder_full",
        text,
        &folder("sd2", "text_encoder_full"),
        |b| b,
    );
    let projection = file
        .plan()
        .text_encoder
        .as_ref()
        .unwrap()
        .keys
        .iter()
        .find(|k| k.key == "text_projection.weight")
        .unwrap();
    assert_eq!(
        projection.file_key,
        "cond_stage_model.model.text_projection"
    );
    let config = file.text_encoder_config().unwrap().unwrap();
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("sd2/text_encoder_full/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config.num_hidden_layers, 24);
    assert_eq!(
        Some(config.projection_dim as u64),
        reference["projection_dim"].as_u64()
    );
    let by_reason = ignored_by_reason(&file);
    assert!(!by_reason.contains_key("OpenClipLastLayers"));
    assert!(!by_reason.contains_key("OpenClipProjection"));
}

#[test]
fn the_clip_text_model_loads_from_a_single_file_as_from_its_folder() {
    let cpu = CpuBackend::new();
    let ids = vec![vec![0_u32, 5, 17, 42, 99, 63, 2, 2, 2, 2]];
    for name in ["sd1", "sd2"] {
        let file = options(name)
            .dtype(LoadDType::F32)
            .open(fixtures().join(name).join("model.safetensors"))
            .unwrap();
        let config = file.text_encoder_config().unwrap().unwrap();
        let store = file.text_encoder().unwrap();
        let single = ClipTextModel::load(&cpu, store, config.clone(), LoadDType::F32).unwrap();
        // Strict: the network asked for every key of its store.
        assert!(store.finish().unwrap().is_empty());
        let dir = fixtures().join(name).join("text_encoder");
        let folder = ClipTextModel::from_dir(&cpu, &dir, &[Variant::Default], true).unwrap();
        assert_eq!(folder.config(), &config, "{name}");
        let a = single.forward(&cpu, &ids).unwrap();
        let b = folder.forward(&cpu, &ids).unwrap();
        let bits = |t| -> Vec<u32> {
            cpu.download(t)
                .unwrap()
                .iter()
                .map(|x: &f32| x.to_bits())
                .collect()
        };
        assert_eq!(
            bits(&a.last_hidden_state),
            bits(&b.last_hidden_state),
            "{name}"
        );
    }
}

/// Every field of `inferred` equals the diffusers config's (bookkeeping aside).
fn assert_config_agrees(what: &str, inferred: &Map<String, Value>, reference: &Path) {
    let reference: Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
    let bookkeeping = [
        "architectures",
        "model_type",
        "torch_dtype",
        "transformers_version",
    ];
    let mut compared = 0;
    for (key, value) in inferred {
        if key.starts_with('_') || bookkeeping.contains(&key.as_str()) {
            continue;
        }
        let want = reference
            .get(key)
            .unwrap_or_else(|| panic!("{what}: {key} is not in the diffusers config"));
        let same = match (value.as_f64(), want.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => value == want,
        };
        assert!(same, "{what}: {key} is {value}, diffusers has {want}");
        compared += 1;
    }
    assert!(compared > 8, "{what}: only {compared} fields");
}

#[test]
fn inferred_configs_equal_the_diffusers_configs() {
    for (name, kind) in [("sd1", ModelKind::Sd1), ("sd2", ModelKind::Sd2)] {
        let file = options(name)
            .open(fixtures().join(name).join("model.safetensors"))
            .unwrap();
        assert_eq!(file.kind(), kind);
        for component in SD_COMPONENTS {
            assert_config_agrees(
                &format!("{name} {component}"),
                file.config(component).unwrap(),
                &fixtures()
                    .join(name)
                    .join(component.name())
                    .join("config.json"),
            );
        }
        let te = file.text_encoder_config().unwrap().unwrap();
        assert_eq!(te.num_hidden_layers, if name == "sd1" { 3 } else { 23 });
    }
}

#[test]
fn prediction_type_follows_diffusers_and_can_be_overridden() {
    let sd2 = options("sd2")
        .open(fixtures().join("sd2/model.safetensors"))
        .unwrap();
    assert_eq!(sd2.prediction_type(), PredictionType::VPrediction);
    assert_eq!(sd2.scheduler_config()["prediction_type"], "v_prediction");
    let sd1 = options("sd1")
        .open(fixtures().join("sd1/model.safetensors"))
        .unwrap();
    assert_eq!(sd1.prediction_type(), PredictionType::Epsilon);
    assert_eq!(sd1.scheduler_config()["prediction_type"], "epsilon");
    let base = options("sd2")
        .prediction_type(PredictionType::Epsilon)
        .open(fixtures().join("sd2/model.safetensors"))
        .unwrap();
    assert_eq!(base.scheduler_config()["prediction_type"], "epsilon");
    assert_eq!(base.scheduler_config()["_class_name"], "DDIMScheduler");
}

// --------------------------------------------------------------------------------------------
// Real sizes: the key tables of the presets' models
// --------------------------------------------------------------------------------------------

struct Table {
    diffusers_model_type: String,
    checkpoint: Vec<(String, Vec<usize>)>,
    components: BTreeMap<String, BTreeMap<String, Vec<usize>>>,
}

fn table(name: &str) -> Table {
    let text =
        std::fs::read_to_string(fixtures().join("shapes").join(format!("{name}.json"))).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    let shapes = |v: &Value| -> BTreeMap<String, Vec<usize>> {
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, s)| {
                let shape = s
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize);
                (k.clone(), shape.collect())
            })
            .collect()
    };
    Table {
        diffusers_model_type: json["diffusers_model_type"].as_str().unwrap().to_owned(),
        checkpoint: shapes(&json["checkpoint"]).into_iter().collect(),
        components: Component::ALL
            .iter()
            .filter(|c| json.get(c.name()).is_some())
            .map(|c| (c.name().to_owned(), shapes(&json[c.name()])))
            .collect(),
    }
}

fn plan_of(
    options: &SingleFileOptions,
    tensors: &[(String, Vec<usize>)],
) -> sd_models::Result<SingleFilePlan> {
    options.plan(
        "table",
        tensors.iter().map(|(k, s)| (k.as_str(), s.as_slice())),
    )
}

#[test]
fn real_sizes_infer_the_presets_and_map_onto_diffusers_keys() {
    for (name, kind) in [
        ("sd15", ModelKind::Sd1),
        ("sd15_inpainting", ModelKind::Sd1Inpainting),
        ("sd21", ModelKind::Sd2),
        ("sd2_inpainting", ModelKind::Sd2Inpainting),
        ("sdxl", ModelKind::Sdxl),
    ] {
        let table = table(name);
        let plan = plan_of(&SingleFileOptions::new(), &table.checkpoint).unwrap();
        assert_eq!(plan.text_encoder_2.is_some(), kind.is_xl(), "{name}");
        assert_eq!(plan.kind, kind, "{name}");
        assert_eq!(kind.diffusers_model_type(), table.diffusers_model_type);
        let file_shapes: BTreeMap<&str, &[usize]> = table
            .checkpoint
            .iter()
            .map(|(k, s)| (k.as_str(), s.as_slice()))
            .collect();
        for component in Component::ALL
            .into_iter()
            .filter(|c| table.components.contains_key(c.name()))
        {
            let part = plan.component(component).unwrap();
            // Inference reproduces the preset, field for field.
            assert_eq!(
                part.config,
                kind.preset(component).unwrap(),
                "{name} {component}"
            );
            // Every key lands on a diffusers key, with its shape.
            let want = &table.components[component.name()];
            let got: BTreeMap<&str, Vec<usize>> = part
                .keys
                .iter()
                .map(|k| {
                    (
                        k.key.as_str(),
                        k.shape(file_shapes[k.file_key.as_str()]).unwrap(),
                    )
                })
                .collect();
            assert_eq!(
                got.len(),
                part.keys.len(),
                "{name} {component}: two keys alike"
            );
            let want: BTreeMap<&str, Vec<usize>> =
                want.iter().map(|(k, s)| (k.as_str(), s.clone())).collect();
            assert_eq!(got, want, "{name} {component}");
            println!("{name} {component}: {} keys", part.keys.len());
        }
        let ignored = plan.ignored.len();
        // The schedule buffers and the position ids, OpenCLIP's last layer (12 keys), its
        // projection and temperature (SD 2.x); SDXL's files have neither schedule nor
        // ignored layers, only OpenCLIP's temperature.
        let expected = match kind {
            ModelKind::Sdxl => 1,
            k if k.is_sd2() => SCHEDULE_BUFFERS.len() + 2 + 12 + 2,
            _ => SCHEDULE_BUFFERS.len() + 2,
        };
        assert_eq!(ignored, expected, "{name}: {:?}", plan.ignored);
        assert!(plan.unassigned.is_empty(), "{name}: {:?}", plan.unassigned);
    }
}

#[test]
fn the_version_comes_from_the_cross_attention_width_without_a_text_encoder() {
    for (name, kind) in [("sd15", ModelKind::Sd1), ("sd21", ModelKind::Sd2)] {
        let table = table(name);
        let unet_only: Vec<_> = table
            .checkpoint
            .iter()
            .filter(|(k, _)| !k.starts_with("cond_stage_model."))
            .cloned()
            .collect();
        let plan = plan_of(&SingleFileOptions::new(), &unet_only).unwrap();
        assert_eq!(plan.kind, kind);
        assert!(plan.text_encoder.is_none());
    }
}

// --------------------------------------------------------------------------------------------
// Errors
// --------------------------------------------------------------------------------------------

/// Writes the tensors of `src` that `keep` accepts, plus `extra`, to `dst`.
fn rewrite(src: &Path, dst: &Path, keep: impl Fn(&str) -> bool, extra: &[(&str, Vec<usize>)]) {
    let bytes = std::fs::read(src).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let zeros: Vec<Vec<u8>> = extra
        .iter()
        .map(|(_, shape)| vec![0_u8; shape.iter().product::<usize>() * 4])
        .collect();
    let mut views: Vec<(String, TensorView<'_>)> = tensors
        .tensors()
        .into_iter()
        .filter(|(k, _)| keep(k))
        .collect();
    for ((key, shape), data) in extra.iter().zip(&zeros) {
        views.push((
            (*key).to_owned(),
            TensorView::new(safetensors::Dtype::F32, shape.clone(), data).unwrap(),
        ));
    }
    safetensors::serialize_to_file(views, None, dst).unwrap();
}

#[test]
fn a_missing_unet_key_is_named_in_both_layouts() {
    let dir = temp_dir("missing");
    let path = dir.0.join("model.safetensors");
    let gone = "model.diffusion_model.input_blocks.1.0.out_layers.3.bias";
    rewrite(
        &fixtures().join("sd1/model.safetensors"),
        &path,
        |k| k != gone,
        &[],
    );
    let err = options("sd1").open(&path).unwrap_err();
    let Error::MissingWeight { key, files } = &err else {
        panic!("{err}");
    };
    assert!(key.contains(gone), "{err}");
    assert!(key.contains("down_blocks.0.resnets.0.conv2.bias"), "{err}");
    assert!(files.contains("model.safetensors"), "{err}");

    // A key inference needs: named, and what for.
    let gone = "model.diffusion_model.out.2.weight";
    rewrite(
        &fixtures().join("sd1/model.safetensors"),
        &path,
        |k| k != gone,
        &[],
    );
    let err = options("sd1").open(&path).unwrap_err();
    assert!(
        matches!(&err, Error::MissingWeight { key, .. } if key.contains(gone) && key.contains("out_channels")),
        "{err}"
    );
}

#[test]
fn strict_mode_reports_a_key_of_no_known_role() {
    let dir = temp_dir("unassigned");
    let path = dir.0.join("model.safetensors");
    let extra = "model.diffusion_model.something_new.weight";
    rewrite(
        &fixtures().join("sd1/model.safetensors"),
        &path,
        |_| true,
        &[(extra, vec![2])],
    );
    let file = options("sd1").open(&path).unwrap();
    assert_eq!(file.unassigned(), [extra]);
    for component in SD_COMPONENTS {
        let store = file.store(component).unwrap();
        for key in store.keys().map(str::to_owned).collect::<Vec<_>>() {
            store.ignore(&WeightPath::new(key));
        }
    }
    let err = file.finish().unwrap_err();
    assert!(
        matches!(&err, Error::UnusedWeights { keys } if keys == &[extra]),
        "{err}"
    );
    // Not strict: reported, not an error.
    let file = options("sd1").strict(false).open(&path).unwrap();
    let unused = file.finish().unwrap();
    assert!(unused.contains(&extra.to_owned()));
    assert!(
        unused.iter().any(|k| k == "unet: conv_in.weight"),
        "{unused:?}"
    );
}

#[test]
fn a_file_that_is_no_stable_diffusion_cannot_be_inferred() {
    let dir = temp_dir("random");
    let path = dir.0.join("random.safetensors");
    let data = vec![0_u8; 16];
    let views = [
        (
            "encoder.layer.0.weight",
            TensorView::new(safetensors::Dtype::F32, vec![2, 2], &data).unwrap(),
        ),
        (
            "head.bias",
            TensorView::new(safetensors::Dtype::F32, vec![4], &data).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let err = SingleFile::open(&path).unwrap_err();
    let Error::CannotInfer { file, message } = &err else {
        panic!("{err}");
    };
    assert!(file.contains("random.safetensors"), "{err}");
    assert!(
        message.contains("no UNet") && message.contains("model.diffusion_model."),
        "{err}"
    );

    // SDXL is recognised and refused.
    let sdxl = [
        (
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
                .to_owned(),
            vec![4, 4],
        ),
        ("model.x".to_owned(), vec![1]),
    ];
    let err = plan_of(&SingleFileOptions::new(), &sdxl[..1]).unwrap_err();
    assert!(err.to_string().contains("SDXL"), "{err}");
}

#[test]
fn what_cannot_be_inferred_is_named() {
    // The tiny widths contradict the presets' head and group counts: each field is named.
    let err = SingleFileOptions::new()
        .open(fixtures().join("sd2/model.safetensors"))
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::CannotInfer { .. }), "{err}");
    for field in [
        "unet.attention_head_dim",
        "unet.norm_num_groups",
        "vae.norm_num_groups",
        "text_encoder.num_attention_heads",
    ] {
        assert!(message.contains(field), "{field} not in: {message}");
    }

    // A UNet-only file of a width that is neither 1.x's nor 2.x's: the version is open, until
    // the kind is given.
    let file = WeightFile::open(fixtures().join("sd1/model.safetensors")).unwrap();
    let unet_only: Vec<(String, Vec<usize>)> = file
        .keys()
        .filter(|k| !k.starts_with("cond_stage_model."))
        .map(|k| (k.to_owned(), file.info(k).unwrap().shape.to_vec()))
        .collect();
    let err = plan_of(&options("sd1"), &unet_only).unwrap_err();
    assert!(
        err.to_string().contains("the Stable Diffusion version"),
        "{err}"
    );
    assert!(err.to_string().contains("width is 32"), "{err}");
    let plan = plan_of(&options("sd1").kind(ModelKind::Sd1), &unet_only).unwrap();
    assert_eq!(plan.kind, ModelKind::Sd1);

    // A UNet of 8 input channels (InstructPix2Pix).
    let mut table = table("sd15").checkpoint;
    for (key, shape) in &mut table {
        if key == "model.diffusion_model.input_blocks.0.0.weight" {
            shape[1] = 8;
        }
    }
    let err = plan_of(&SingleFileOptions::new(), &table).unwrap_err();
    assert!(err.to_string().contains("8 input channels"), "{err}");

    // An override that is not an object.
    let err = plan_of(
        &SingleFileOptions::new().override_config(Component::Unet, Value::from(3)),
        &self::table("sd15").checkpoint,
    )
    .unwrap_err();
    assert!(err.to_string().contains("expected a JSON object"), "{err}");
}

#[test]
fn a_truncated_file_is_the_safetensors_error() {
    let dir = temp_dir("truncated");
    let path = dir.0.join("model.safetensors");
    let bytes = std::fs::read(fixtures().join("sd1/model.safetensors")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = SingleFile::open(&path).unwrap_err();
    assert!(
        matches!(&err, Error::SafeTensors { path: p, .. } if p == &path),
        "{err}"
    );
}

#[test]
fn a_fused_projection_of_the_wrong_shape_is_named() {
    let mut table = table("sd21").checkpoint;
    let fused = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias";
    for (key, shape) in &mut table {
        if key == fused {
            shape[0] = 1024;
        }
    }
    let err = plan_of(&SingleFileOptions::new(), &table).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    assert!(err.to_string().contains(fused), "{err}");
    assert!(err.to_string().contains("k_proj.bias"), "{err}");
}

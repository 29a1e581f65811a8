//! Single-file Stable Diffusion 1.x, 2.x and XL checkpoints: one `.safetensors` file with the
//! original CompVis / ldm (SDXL: Stability's sgm) key names, as most users have them, opened as
//! three stores (four for SDXL) in the
//! diffusers and transformers names, with the model kind and the diffusers configs inferred
//! from the tensors' shapes.
//!
//! Follows diffusers' `loaders/single_file_utils.py` (diffusers 0.42):
//! `infer_diffusers_model_type`, `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
//! `conv_attn_to_linear`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`,
//! `create_unet_diffusers_config_from_ldm` and `create_vae_diffusers_config_from_ldm`. The key
//! map is written here once and applied at open time through the store's hooks
//! ([`OpenOptions::rename`], [`OpenOptions::derive`], [`OpenOptions::reshape`]): no layer
//! ever sees an original name.
//!
//! | original keys | component | diffusers / transformers names | how |
//! |---|---|---|---|
//! | `model.diffusion_model.*` | [`Component::Unet`] | `UNet2DConditionModel` | renamed (see the `unet` module) |
//! | `first_stage_model.*` | [`Component::Vae`] | `AutoencoderKL` | renamed; the mid-block attention's 1x1 convolution kernels `[C, C, 1, 1]` read as linear weights `[C, C]` |
//! | `cond_stage_model.transformer.*` | [`Component::TextEncoder`] (SD 1.x) | `CLIPTextModel`, `text_model.*` | renamed (the names are transformers') |
//! | `cond_stage_model.model.*` | [`Component::TextEncoder`] (SD 2.x) | `CLIPTextModel`, `text_model.*` | renamed; fused `attn.in_proj_{weight,bias}` `[3 D, ...]` split into `q_proj`, `k_proj`, `v_proj` by [`Derived`] row views; the last layer, `text_projection` and `logit_scale` ignored |
//! | `conditioner.embedders.0.transformer.*` | [`Component::TextEncoder`] (SDXL) | `CLIPTextModel`, `text_model.*` | renamed (transformers' names) |
//! | `conditioner.embedders.1.model.*` | [`Component::TextEncoder2`] (SDXL) | `CLIPTextModelWithProjection` | as SD 2.x's OpenCLIP, the whole tower, with `text_projection.weight` the transpose of `text_projection` |
//! | `model.diffusion_model.label_emb.0.{0,2}.*` | [`Component::Unet`] (SDXL) | `add_embedding.linear_{1,2}` | renamed; `addition_embed_type: "text_time"`, `projection_class_embeddings_input_dim` from its shape |
//! | `model_ema.*` | ignored, or the UNet with [`SingleFileOptions::ema`] | | ldm's `LitEma` names: `model_ema.` + the UNet key without `model.` and without dots |
//! | `betas`, `alphas_cumprod`, ... | ignored | | the noise schedule, which the scheduler recomputes |
//!
//! ControlNets come in files of their own, opened by [`open_controlnet`] (the `controlnet`
//! module maps their keys, sharing the UNet's encoder map).
//!
//! # What is inferred, and how
//!
//! The kind ([`ModelKind`]) follows `infer_diffusers_model_type`: SDXL for keys under
//! `conditioner.embedders.` or a UNet with `label_emb.0.0` (whose per-level transformer
//! depths, `[1, 2, 10]` in SDXL, are read level by level); else the text encoder's layout
//! (OpenAI CLIP under `cond_stage_model.transformer.` for 1.x, OpenCLIP under
//! `cond_stage_model.model.` for 2.x), or without a text encoder the cross-attention width
//! (`attn2.to_k` is `[C, 768]` in 1.x, `[C, 1024]` in 2.x); a UNet of 9 input channels is
//! an inpainting model. Each component's config starts from the preset of the kind (the
//! `config.json` of [`ModelKind::default_repository`], as diffusers' `from_single_file` uses
//! it, kept in `crates/sd-models/presets/`) and takes from the shapes everything they show:
//! the UNet's channels per level, layers per block, which levels have attention, input and
//! output channels, cross-attention width, linear or convolutional transformer projections
//! and transformer depth; the VAE's channels, layers and latent channels; the text encoder's
//! vocabulary, width, positions, MLP width and layers. Head counts follow from the widths
//! (SD 1.x: 8 heads per UNet level; SD 2.x: 64-wide UNet heads; CLIP and OpenCLIP: 64-wide
//! heads). What the weights cannot show (group-norm groups, epsilons, activations,
//! `sample_size`, `upcast_attention`, the VAE's `scaling_factor`) is the preset's; where the
//! shapes contradict it (a head count or a group count that does not divide a width) the
//! field cannot be inferred: [`SingleFileOptions::override_config`] sets it, and without an
//! override opening fails with an [`Error::Config`] naming every such field.
//!
//! # v-prediction
//!
//! Whether the UNet predicts the noise or the velocity is not in the weights. diffusers'
//! `from_single_file` takes the scheduler config of the default repository of the kind:
//! `stabilityai/stable-diffusion-2-1` (v-prediction) for every 2.x text-to-image file, so a
//! 2.x *base* (512 px, epsilon) checkpoint must be given its config or scheduler (its legacy
//! path guessed epsilon only for `global_step == 875000`). The same is done here:
//! [`ModelKind::default_prediction_type`] is v-prediction for [`ModelKind::Sd2`] and epsilon
//! otherwise, written into the scheduler config ([`SingleFile::scheduler_config`]), and
//! [`SingleFileOptions::prediction_type`] overrides it.
//!
//! # Strict mode
//!
//! Every key of the file is mapped into one component's store, ignored for a documented
//! reason ([`IgnoreReason`], listed by [`SingleFile::ignored`]), or unassigned (keys of no
//! known role, [`SingleFile::unassigned`]). [`SingleFile::finish`] reports the unassigned keys
//! together with the keys each store was never asked for; in strict mode
//! ([`SingleFileOptions::strict`], also passed to each store) they are an error. A key the
//! inferred structure needs and the file lacks is an [`Error::MissingWeight`] at open time,
//! naming the original and the diffusers key.
//!
//! # Example
//!
//! ```no_run
//! use sd_models::weights::compvis::{Component, ModelKind, SingleFile};
//!
//! let file = SingleFile::open("v1-5-pruned-emaonly.safetensors")?;
//! assert_eq!(file.kind(), ModelKind::Sd1);
//! let unet = file.unet(); // diffusers names: `conv_in.weight`, `down_blocks.0.resnets.0.conv1.weight`, ...
//! let config = file.config(Component::Unet); // the UNet2DConditionModel config.json
//! # let _ = (unet, config);
//! // ... each network loads from its store ...
//! file.finish()?;
//! # Ok::<(), sd_models::Error>(())
//! ```

mod controlnet;
mod kind;
mod table;
mod text;
mod unet;
mod vae;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::clip::ClipTextConfig;
use crate::error::{Error, Result};
use crate::weights::{Derived, LoadDType, OpenOptions, WeightFile, WeightStore};
use sd_core::PredictionType;

pub use controlnet::{CONTROLNET_PREFIX, ControlNetFile, open_controlnet};
pub use kind::{Component, ModelKind};
pub use table::{MappedKey, View};

use table::{ConfigReader, Shapes, linear_shape};
use text::TextLayout;

/// The noise-schedule buffers ldm's `DDPM.register_schedule` saves into every checkpoint
/// (`[timesteps]` each). The scheduler recomputes them from its config.
pub const SCHEDULE_BUFFERS: [&str; 12] = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
];

/// The prefix of ldm's EMA copy of the UNet.
const EMA_PREFIX: &str = "model_ema.";

/// Why a key of a single file is not loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IgnoreReason {
    /// `model_ema.*`: the exponential moving average of the UNet's weights and its
    /// bookkeeping (`decay`, `num_updates`), which diffusers skips unless asked for
    /// (`extract_ema`; here [`SingleFileOptions::ema`]).
    EmaCopy,
    /// `model.diffusion_model.*` when the EMA copy is loaded instead.
    NonEma,
    /// `model_ema.decay` and `model_ema.num_updates` when the EMA copy is loaded.
    EmaBookkeeping,
    /// One of [`SCHEDULE_BUFFERS`]: the training noise schedule, which the scheduler
    /// recomputes from its config.
    ScheduleBuffer,
    /// OpenCLIP layers past the one SD 2.x takes its hidden states from (ldm's
    /// `FrozenOpenCLIPEmbedder(layer="penultimate")`): diffusers' config has one layer fewer
    /// than the tower (`SD_2_TEXT_ENCODER_KEYS_TO_IGNORE`).
    OpenClipLastLayers,
    /// OpenCLIP's `text_projection` into the joint image-text space: SD 2.x's text encoder is
    /// a `CLIPTextModel` without it (`SD_2_TEXT_ENCODER_KEYS_TO_IGNORE`).
    OpenClipProjection,
    /// OpenCLIP's `logit_scale`, the contrastive temperature: no text encoder uses it.
    LogitScale,
}

impl fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IgnoreReason::EmaCopy => "the EMA copy of the UNet (not loaded unless asked for)",
            IgnoreReason::NonEma => "the non-EMA UNet (the EMA copy is loaded)",
            IgnoreReason::EmaBookkeeping => "EMA bookkeeping",
            IgnoreReason::ScheduleBuffer => "a noise-schedule buffer (the scheduler recomputes it)",
            IgnoreReason::OpenClipLastLayers => {
                "an OpenCLIP layer after the penultimate one, whose hidden states SD 2.x uses"
            }
            IgnoreReason::OpenClipProjection => {
                "OpenCLIP's text projection (SD 2.x's text encoder has none)"
            }
            IgnoreReason::LogitScale => "OpenCLIP's contrastive temperature",
        })
    }
}

/// A key of the file that is not loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IgnoredKey {
    /// The key in the file.
    pub key: String,
    /// Why.
    pub reason: IgnoreReason,
}

/// How to open a single file: what inference cannot see (the kind, the prediction type,
/// config fields), EMA or not, and the stores' dtype and strictness.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SingleFileOptions {
    dtype: LoadDType,
    strict: bool,
    kind: Option<ModelKind>,
    prediction_type: Option<PredictionType>,
    ema: bool,
    full_open_clip: bool,
    overrides: Vec<(Component, Value)>,
}

impl SingleFileOptions {
    /// Everything inferred, the non-EMA UNet, `f32`, not strict.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The dtype the stores hand tensors out in ([`OpenOptions::dtype`]).
    #[must_use]
    pub fn dtype(mut self, dtype: LoadDType) -> Self {
        self.dtype = dtype;
        self
    }

    /// Whether unused keys are an error: in each store's [`WeightStore::finish`] and in
    /// [`SingleFile::finish`] (default `false`).
    #[must_use]
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// The kind, instead of inferring it: selects the presets (and the default prediction
    /// type); the structure still comes from the weights. For a file whose version neither
    /// its text encoder nor its cross-attention width shows.
    #[must_use]
    pub fn kind(mut self, kind: ModelKind) -> Self {
        self.kind = Some(kind);
        self
    }

    /// What the UNet predicts, instead of [`ModelKind::default_prediction_type`] (epsilon for
    /// an SD 2.x base checkpoint).
    #[must_use]
    pub fn prediction_type(mut self, prediction_type: PredictionType) -> Self {
        self.prediction_type = Some(prediction_type);
        self
    }

    /// Loads the UNet from its EMA copy (`model_ema.*`, diffusers' `extract_ema=True`)
    /// instead of `model.diffusion_model.*` (default `false`).
    #[must_use]
    pub fn ema(mut self, ema: bool) -> Self {
        self.ema = ema;
        self
    }

    /// For an OpenCLIP text encoder (SD 2.x), maps the whole tower, every layer and
    /// `text_projection.weight` (the transpose of the file's `text_projection`), as a
    /// `CLIPTextModelWithProjection`, instead of SD 2.x's text encoder (default `false`).
    #[must_use]
    pub fn full_open_clip(mut self, full: bool) -> Self {
        self.full_open_clip = full;
        self
    }

    /// Sets fields of a component's config over what is inferred (the top-level keys of
    /// `fields`, a JSON object): what the weights cannot show, such as `norm_num_groups` or
    /// head counts. Overrides win over inference; later ones over earlier ones.
    #[must_use]
    pub fn override_config(mut self, component: Component, fields: Value) -> Self {
        self.overrides.push((component, fields));
        self
    }

    /// Opens `path`; see [`SingleFile`].
    ///
    /// # Errors
    /// Those of [`WeightFile::open`] ([`Error::Io`], [`Error::SafeTensors`]) and of
    /// [`plan`](Self::plan).
    pub fn open(&self, path: impl AsRef<Path>) -> Result<SingleFile> {
        let path = path.as_ref();
        let file = WeightFile::open(path)?;
        let what = path.display().to_string();
        let shapes = key_shapes(&file);
        let plan = self.plan(
            &what,
            shapes.iter().map(|(k, s)| (k.as_str(), s.as_slice())),
        )?;
        let unet = self.store_options(&plan.unet).from_files(vec![file])?;
        let open = |c: &Option<ComponentPlan>| {
            c.as_ref()
                .map(|c| self.store_options(c).open(&[path]))
                .transpose()
        };
        let vae = open(&plan.vae)?;
        let text_encoder = open(&plan.text_encoder)?;
        let text_encoder_2 = open(&plan.text_encoder_2)?;
        Ok(SingleFile {
            path: path.to_path_buf(),
            strict: self.strict,
            plan,
            unet,
            vae,
            text_encoder,
            text_encoder_2,
        })
    }

    /// Maps the keys of a single file, given each key and its shape, without opening it: the
    /// kind, the configs, every key's store name, what is ignored and what is unassigned.
    /// `what` names the file in errors.
    ///
    /// # Errors
    /// [`Error::CannotInfer`] if the keys are not a Stable Diffusion 1.x or
    /// 2.x checkpoint's, the version cannot be told, or a config field the weights
    /// contradict has no override (each is named); [`Error::MissingWeight`] naming a key the
    /// inferred structure needs (original and diffusers names); [`Error::Shape`] for a
    /// tensor whose shape does not fit its role; [`Error::Config`] for an override that is
    /// not a JSON object, or an overridden config that is not an SD UNet, VAE or text
    /// encoder.
    pub fn plan<'a>(
        &self,
        what: &str,
        tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    ) -> Result<SingleFilePlan> {
        let shapes = Shapes::new(what, tensors.into_iter().collect());
        plan(&shapes, self)
    }

    fn store_options(&self, component: &ComponentPlan) -> OpenOptions {
        let mut rename: HashMap<String, String> = HashMap::new();
        let mut derive: HashMap<String, Vec<(String, Derived)>> = HashMap::new();
        let mut linear: HashSet<String> = HashSet::new();
        for mapped in &component.keys {
            match mapped.view {
                View::Whole => {
                    rename.insert(mapped.file_key.clone(), mapped.key.clone());
                }
                View::Linear => {
                    rename.insert(mapped.file_key.clone(), mapped.key.clone());
                    linear.insert(mapped.key.clone());
                }
                View::Derived(view) => {
                    // Derived keys keep the file key until the derive hook replaces them by
                    // their views (a file key is never a diffusers name).
                    rename.insert(mapped.file_key.clone(), mapped.file_key.clone());
                    derive
                        .entry(mapped.file_key.clone())
                        .or_default()
                        .push((mapped.key.clone(), view));
                }
            }
        }
        OpenOptions::new()
            .dtype(self.dtype)
            .strict(self.strict)
            .rename(move |key| rename.get(key).cloned())
            .derive(move |key, _| derive.get(key).cloned())
            .reshape(move |key, shape| {
                if linear.contains(key) {
                    linear_shape(shape)
                } else {
                    None
                }
            })
    }
}

/// One component's part of a [`SingleFilePlan`]: its config and its keys.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ComponentPlan {
    /// Which component.
    pub component: Component,
    /// Its diffusers `config.json` (transformers' for the text encoder).
    pub config: Map<String, Value>,
    /// The file's keys mapped into its store.
    pub keys: Vec<MappedKey>,
}

/// How a single file's keys map to the components' stores; see [`SingleFileOptions::plan`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SingleFilePlan {
    /// The model kind.
    pub kind: ModelKind,
    /// What the UNet predicts.
    pub prediction_type: PredictionType,
    /// The UNet.
    pub unet: ComponentPlan,
    /// The VAE, if the file has one.
    pub vae: Option<ComponentPlan>,
    /// The text encoder, if the file has one.
    pub text_encoder: Option<ComponentPlan>,
    /// SDXL's second text encoder, if the file has one.
    pub text_encoder_2: Option<ComponentPlan>,
    /// The scheduler config: the kind's preset, with `prediction_type`.
    pub scheduler: Map<String, Value>,
    /// Keys not loaded, with why.
    pub ignored: Vec<IgnoredKey>,
    /// Keys of no known role, sorted.
    pub unassigned: Vec<String>,
}

impl SingleFilePlan {
    /// A component's part, if the file has it.
    #[must_use]
    pub fn component(&self, component: Component) -> Option<&ComponentPlan> {
        match component {
            Component::Unet => Some(&self.unet),
            Component::Vae => self.vae.as_ref(),
            Component::TextEncoder => self.text_encoder.as_ref(),
            Component::TextEncoder2 => self.text_encoder_2.as_ref(),
        }
    }
}

/// The "cannot infer" error: `message` says what, and from what.
/// Every key of a file with its shape, for inference.
pub(crate) fn key_shapes(file: &WeightFile) -> Vec<(String, Vec<usize>)> {
    file.keys()
        .filter_map(|k| file.info(k).map(|i| (k.to_owned(), i.shape.to_vec())))
        .collect()
}

pub(crate) fn cannot_infer(what: &str, message: String) -> Error {
    Error::CannotInfer {
        file: what.to_string(),
        message,
    }
}

fn plan(shapes: &Shapes<'_>, options: &SingleFileOptions) -> Result<SingleFilePlan> {
    let what = shapes.what;
    check_stable_diffusion(shapes)?;
    let unet_shape = unet::infer(shapes)?;
    let xl_layouts = TextLayout::detect_xl(shapes);
    let xl_file =
        xl_layouts.0.is_some() || xl_layouts.1.is_some() || unet_shape.added_input.is_some();
    let layout = if xl_file {
        xl_layouts.0
    } else {
        TextLayout::detect(shapes)
    };
    let kind = match options.kind {
        Some(kind) => kind,
        None if xl_file => ModelKind::Sdxl,
        None => infer_kind(what, &unet_shape, layout)?,
    };

    // The configs: presets, what the shapes say, overrides.
    let mut unresolved: BTreeMap<Component, Vec<(&'static str, String)>> = BTreeMap::new();
    let mut unet_config = kind.preset(Component::Unet)?;
    unet::apply(
        &unet_shape,
        kind.has_64_wide_heads(),
        &mut unet_config,
        unresolved.entry(Component::Unet).or_default(),
    );
    let mut vae_config = if shapes.has(vae::PREFIX.trim_end_matches('.')) {
        let shape = vae::infer(shapes)?;
        let mut config = kind.preset(Component::Vae)?;
        vae::apply(
            &shape,
            &mut config,
            unresolved.entry(Component::Vae).or_default(),
        );
        Some(config)
    } else {
        None
    };
    let full = options.full_open_clip;
    // A text encoder's config: the preset of its layout (quick GELU for OpenAI CLIP, GELU
    // for OpenCLIP) or of SDXL's encoder, with what the shapes show.
    let mut text_config_of = |layout: TextLayout,
                              component: Component,
                              full: bool|
     -> Result<(TextLayout, usize, usize, Map<String, Value>)> {
        let shape = text::infer(shapes, layout)?;
        let mut config = if kind.is_xl() {
            ModelKind::Sdxl.preset(component)?
        } else {
            ModelKind::new(layout.is_open_clip(), false).preset(Component::TextEncoder)?
        };
        text::apply(
            &shape,
            layout,
            full,
            what,
            &mut config,
            unresolved.entry(component).or_default(),
        )?;
        Ok((layout, shape.layers, shape.hidden_size, config))
    };
    let mut text_config = match layout {
        Some(layout) => Some(text_config_of(layout, Component::TextEncoder, full)?),
        None => None,
    };
    // SDXL's second encoder is the whole OpenCLIP tower with its projection.
    let mut text_config_2 = match xl_layouts.1.filter(|_| kind.is_xl()) {
        Some(layout) => Some(text_config_of(layout, Component::TextEncoder2, true)?),
        None => None,
    };
    let widths: usize = [&text_config, &text_config_2]
        .into_iter()
        .flatten()
        .map(|(_, _, hidden, _)| *hidden)
        .sum();
    let complete = text_config.is_some() && (!kind.is_xl() || text_config_2.is_some());
    if complete && widths != unet_shape.cross_attention_dim {
        return Err(cannot_infer(
            what,
            format!(
                "one model: the text encoder{} {widths} wide but the UNet's cross-attention takes {}",
                if kind.is_xl() {
                    "s are together"
                } else {
                    " is"
                },
                unet_shape.cross_attention_dim
            ),
        ));
    }
    for (component, fields) in &options.overrides {
        let Value::Object(fields) = fields else {
            return Err(Error::Config {
                what: format!("{what}: {component} config override"),
                message: format!("expected a JSON object, found {fields}"),
            });
        };
        let config = match component {
            Component::Unet => Some(&mut unet_config),
            Component::Vae => vae_config.as_mut(),
            Component::TextEncoder => text_config.as_mut().map(|(_, _, _, c)| c),
            Component::TextEncoder2 => text_config_2.as_mut().map(|(_, _, _, c)| c),
        };
        if let Some(config) = config {
            config.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        if let Some(open) = unresolved.get_mut(component) {
            open.retain(|(key, _)| !fields.contains_key(*key));
        }
    }
    check_resolved(what, &unresolved)?;

    // The key maps of the final configs.
    let mut unet_table = unet::keys(&reader(what, Component::Unet, &unet_config))?;
    if options.ema {
        to_ema_names(what, &mut unet_table)?;
    }
    let mut missing = Vec::new();
    let unet = mapped(
        shapes,
        Component::Unet,
        unet_table,
        unet_config,
        &mut missing,
    )?;
    let vae = match vae_config {
        Some(config) => {
            let table = vae::keys(&reader(what, Component::Vae, &config))?;
            Some(mapped(shapes, Component::Vae, table, config, &mut missing)?)
        }
        None => None,
    };
    let mut ignore_rules: Vec<(String, IgnoreReason)> = Vec::new();
    let mut text_plan = |text: Option<(TextLayout, usize, usize, Map<String, Value>)>,
                         component: Component,
                         full: bool|
     -> Result<Option<ComponentPlan>> {
        let Some((layout, file_layers, _, config)) = text else {
            return Ok(None);
        };
        let (table, ignored) =
            text::keys(&reader(what, component, &config), layout, full, file_layers)?;
        ignore_rules.extend(ignored);
        Ok(Some(mapped(
            shapes,
            component,
            table,
            config,
            &mut missing,
        )?))
    };
    let text_encoder = text_plan(text_config, Component::TextEncoder, full)?;
    let text_encoder_2 = text_plan(text_config_2, Component::TextEncoder2, true)?;
    if let Some(first) = missing.first() {
        let more = match missing.len() {
            1 => String::new(),
            n => format!("; and {} more", n - 1),
        };
        return Err(Error::MissingWeight {
            key: format!("{first}{more}"),
            files: what.to_owned(),
        });
    }

    // Every other key: ignored for a reason, or unassigned.
    let mapped_files: HashSet<&str> = [
        Some(&unet),
        vae.as_ref(),
        text_encoder.as_ref(),
        text_encoder_2.as_ref(),
    ]
    .into_iter()
    .flatten()
    .flat_map(|plan| plan.keys.iter().map(|k| k.file_key.as_str()))
    .collect();
    let buffers: BTreeSet<&str> = SCHEDULE_BUFFERS.into_iter().collect();
    let mut ignored = Vec::new();
    let mut unassigned = Vec::new();
    for key in shapes.keys().filter(|k| !mapped_files.contains(k)) {
        let reason = if buffers.contains(key) {
            Some(IgnoreReason::ScheduleBuffer)
        } else if key.starts_with(EMA_PREFIX) {
            Some(if options.ema {
                IgnoreReason::EmaBookkeeping
            } else {
                IgnoreReason::EmaCopy
            })
        } else if options.ema && key.starts_with(unet::PREFIX) {
            Some(IgnoreReason::NonEma)
        } else {
            ignore_rules
                .iter()
                .find(|(rule, _)| {
                    key == rule
                        || key
                            .strip_prefix(rule.as_str())
                            .is_some_and(|rest| rest.starts_with('.'))
                })
                .map(|(_, reason)| *reason)
        };
        match reason {
            Some(reason) => ignored.push(IgnoredKey {
                key: key.to_owned(),
                reason,
            }),
            None => unassigned.push(key.to_owned()),
        }
    }

    let prediction_type = options
        .prediction_type
        .unwrap_or_else(|| kind.default_prediction_type());
    let mut scheduler = kind.scheduler_preset()?;
    scheduler.insert(
        "prediction_type".into(),
        serde_json::to_value(prediction_type).map_err(|e| Error::Config {
            what: format!("{what}: scheduler config"),
            message: e.to_string(),
        })?,
    );
    Ok(SingleFilePlan {
        kind,
        prediction_type,
        unet,
        vae,
        text_encoder,
        text_encoder_2,
        scheduler,
        ignored,
        unassigned,
    })
}

/// The original (ldm / sgm) module path of each module of a UNet, by its diffusers path
/// (`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`), for the UNet whose
/// diffusers `config.json` is `config`: the names kohya's SDXL LoRAs use.
///
/// # Errors
/// [`Error::Config`] for a config that is not a Stable Diffusion UNet's.
pub fn original_unet_module_names(config: &Map<String, Value>) -> Result<HashMap<String, String>> {
    unet::original_module_names(&reader("UNet", Component::Unet, config))
}

/// A component's final config, read back for its key map.
fn reader<'a>(what: &str, component: Component, map: &'a Map<String, Value>) -> ConfigReader<'a> {
    ConfigReader {
        what: format!("{what}: {component} config"),
        map,
    }
}

/// Fails unless the keys have an SD 1.x/2.x text-to-image or inpainting UNet.
fn check_stable_diffusion(shapes: &Shapes<'_>) -> Result<()> {
    let what = shapes.what;
    if !shapes.has(unet::PREFIX.trim_end_matches('.')) {
        let message = if shapes.has("conditioner.embedders") {
            format!(
                "a Stable Diffusion model: the keys are SDXL's text encoders (conditioner.embedders.*) without a UNet (no key starts with {})",
                unet::PREFIX
            )
        } else {
            let first: Vec<&str> = shapes.keys().take(3).collect();
            format!(
                "a Stable Diffusion 1.x or 2.x model: there is no UNet (no key starts with {}); the keys start with {first:?}",
                unet::PREFIX
            )
        };
        return Err(cannot_infer(what, message));
    }
    if shapes.has(&format!("{}label_emb", unet::PREFIX))
        && !shapes.has(&format!("{}label_emb.0.0", unet::PREFIX))
    {
        return Err(cannot_infer(
            what,
            "a Stable Diffusion 1.x or 2.x text-to-image UNet: this one is class-conditioned (label_emb: the x4 upscaler or unCLIP), which is not supported".to_owned(),
        ));
    }
    Ok(())
}

/// Fails naming every config field the weights contradict and no override set.
fn check_resolved(
    what: &str,
    unresolved: &BTreeMap<Component, Vec<(&'static str, String)>>,
) -> Result<()> {
    let open: Vec<String> = unresolved
        .iter()
        .flat_map(|(c, fields)| {
            fields
                .iter()
                .map(move |(k, why)| format!("{c}.{k} ({why})"))
        })
        .collect();
    if open.is_empty() {
        return Ok(());
    }
    Err(cannot_infer(
        what,
        format!(
            "{} from the weights: {}; set them with SingleFileOptions::override_config (the \
             programs' --config-override COMPONENT.KEY=VALUE, e.g. unet.norm_num_groups=32)",
            if open.len() == 1 {
                "a config field"
            } else {
                "config fields"
            },
            open.join("; ")
        ),
    ))
}

/// Points the UNet's map at ldm's EMA copy: `model_ema.` + the key without `model.` and
/// without dots (`LitEma`'s buffer names; diffusers' `extract_ema`).
fn to_ema_names(what: &str, table: &mut table::Table) -> Result<()> {
    let mut seen = HashMap::new();
    for mapped in &mut table.keys {
        let flat = mapped
            .file_key
            .strip_prefix("model.")
            .unwrap_or(&mapped.file_key)
            .replace('.', "");
        let ema = format!("{EMA_PREFIX}{flat}");
        if let Some(other) = seen.insert(ema.clone(), mapped.file_key.clone()) {
            return Err(Error::Config {
                what: format!("{what} (single-file checkpoint)"),
                message: format!(
                    "the UNet keys {other} and {} have the same EMA name {ema}",
                    mapped.file_key
                ),
            });
        }
        mapped.file_key = ema;
    }
    Ok(())
}

/// A component's plan: the keys of `table` the file has (each checked to fit its view); the
/// needed ones it lacks go to `missing`.
fn mapped(
    shapes: &Shapes<'_>,
    component: Component,
    table: table::Table,
    config: Map<String, Value>,
    missing: &mut Vec<String>,
) -> Result<ComponentPlan> {
    let mut keys = Vec::with_capacity(table.keys.len());
    for key in table.keys {
        match shapes.get(&key.file_key) {
            Some(stored) if key.shape(stored).is_none() => {
                return Err(Error::Shape {
                    op: "single-file mapping",
                    expected: format!(
                        "a tensor to take {} of, for {} ({component})",
                        key.view, key.key
                    ),
                    found: format!("{} of shape {stored:?}", key.file_key),
                });
            }
            Some(_) => keys.push(key),
            None if key.optional => {}
            None => missing.push(format!("{} ({component} {})", key.file_key, key.key)),
        }
    }
    Ok(ComponentPlan {
        component,
        config,
        keys,
    })
}

/// The kind the shapes show: the version from the text encoder or the cross-attention width
/// (diffusers' `CHECKPOINT_KEY_NAMES["v2"]` test), inpainting from the UNet's input.
fn infer_kind(what: &str, unet: &unet::UnetShape, layout: Option<TextLayout>) -> Result<ModelKind> {
    let by_text = layout.map(TextLayout::is_open_clip);
    let width = unet.cross_attention_dim;
    let by_width = match width {
        768 => Some(false),
        1024 => Some(true),
        _ => None,
    };
    let name = |sd2: bool| if sd2 { "2.x" } else { "1.x" };
    let sd2 = match (by_text, by_width) {
        (Some(text), Some(width_says)) if text != width_says => {
            return Err(cannot_infer(
                what,
                format!(
                    "the Stable Diffusion version: the text encoder is {}'s but the cross-attention width {width} is {}'s",
                    name(text),
                    name(width_says)
                ),
            ));
        }
        (Some(sd2), _) | (None, Some(sd2)) => sd2,
        (None, None) => {
            return Err(cannot_infer(
                what,
                format!(
                    "the Stable Diffusion version: the file has no text encoder (cond_stage_model.*) and the cross-attention width is {width} (1.x has 768, 2.x 1024); pass the kind with SingleFileOptions::kind (the programs' --kind sd1|sd2)"
                ),
            ));
        }
    };
    let inpainting = match unet.in_channels {
        4 => false,
        9 => true,
        n => {
            return Err(cannot_infer(
                what,
                format!(
                    "a Stable Diffusion 1.x or 2.x model from a UNet of {n} input channels: text-to-image has 4 and inpainting 9 (8 is InstructPix2Pix and 7 the x4 upscaler, which are not supported)"
                ),
            ));
        }
    };
    Ok(ModelKind::new(sd2, inpainting))
}

/// A single-file checkpoint opened as the stores of its components, in the diffusers and
/// transformers names, with the inferred kind and configs; see the [module
/// documentation](self).
#[derive(Debug)]
pub struct SingleFile {
    path: PathBuf,
    strict: bool,
    plan: SingleFilePlan,
    unet: WeightStore,
    vae: Option<WeightStore>,
    text_encoder: Option<WeightStore>,
    text_encoder_2: Option<WeightStore>,
}

impl SingleFile {
    /// Opens `path` with [`SingleFileOptions::new`] (everything inferred, `f32`, not strict).
    ///
    /// # Errors
    /// Those of [`SingleFileOptions::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        SingleFileOptions::new().open(path)
    }

    /// The file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model kind.
    #[must_use]
    pub fn kind(&self) -> ModelKind {
        self.plan.kind
    }

    /// What the UNet predicts (see the module documentation on v-prediction).
    #[must_use]
    pub fn prediction_type(&self) -> PredictionType {
        self.plan.prediction_type
    }

    /// The mapping: configs, every key, ignored and unassigned keys.
    #[must_use]
    pub fn plan(&self) -> &SingleFilePlan {
        &self.plan
    }

    /// The UNet's store (`UNet2DConditionModel` names).
    #[must_use]
    pub fn unet(&self) -> &WeightStore {
        &self.unet
    }

    /// The VAE's store (`AutoencoderKL` names), if the file has a VAE.
    #[must_use]
    pub fn vae(&self) -> Option<&WeightStore> {
        self.vae.as_ref()
    }

    /// The text encoder's store (`CLIPTextModel` names under `text_model.`), if the file has
    /// a text encoder.
    #[must_use]
    pub fn text_encoder(&self) -> Option<&WeightStore> {
        self.text_encoder.as_ref()
    }

    /// SDXL's second text encoder's store (`CLIPTextModelWithProjection` names), if the file
    /// has one.
    #[must_use]
    pub fn text_encoder_2(&self) -> Option<&WeightStore> {
        self.text_encoder_2.as_ref()
    }

    /// A component's store to change, if the file has it (to patch its tensors with
    /// [`WeightStore::set_patch`], say).
    pub fn store_mut(&mut self, component: Component) -> Option<&mut WeightStore> {
        match component {
            Component::Unet => Some(&mut self.unet),
            Component::Vae => self.vae.as_mut(),
            Component::TextEncoder => self.text_encoder.as_mut(),
            Component::TextEncoder2 => self.text_encoder_2.as_mut(),
        }
    }

    /// A component's store, if the file has it.
    #[must_use]
    pub fn store(&self, component: Component) -> Option<&WeightStore> {
        match component {
            Component::Unet => Some(&self.unet),
            Component::Vae => self.vae.as_ref(),
            Component::TextEncoder => self.text_encoder.as_ref(),
            Component::TextEncoder2 => self.text_encoder_2.as_ref(),
        }
    }

    /// A component's config (its diffusers or transformers `config.json`), if the file has
    /// it.
    #[must_use]
    pub fn config(&self, component: Component) -> Option<&Map<String, Value>> {
        self.plan.component(component).map(|c| &c.config)
    }

    /// The scheduler config: the kind's preset `scheduler_config.json` with the
    /// `prediction_type` in use.
    #[must_use]
    pub fn scheduler_config(&self) -> &Map<String, Value> {
        &self.plan.scheduler
    }

    /// The text encoder's config, parsed, if the file has a text encoder.
    ///
    /// # Errors
    /// Those of [`ClipTextConfig::from_json`].
    pub fn text_encoder_config(&self) -> Result<Option<ClipTextConfig>> {
        self.config(Component::TextEncoder)
            .map(|c| {
                ClipTextConfig::from_json(
                    &Value::Object(c.clone()).to_string(),
                    &format!("{}: text_encoder config", self.path.display()),
                )
            })
            .transpose()
    }

    /// The keys not loaded, with why.
    #[must_use]
    pub fn ignored(&self) -> &[IgnoredKey] {
        &self.plan.ignored
    }

    /// The keys of no known role.
    #[must_use]
    pub fn unassigned(&self) -> &[String] {
        &self.plan.unassigned
    }

    /// The unassigned keys, then each store's keys that were never asked for
    /// (`"unet: down_blocks.0..."`).
    #[must_use]
    pub fn unused_keys(&self) -> Vec<String> {
        let mut unused = self.plan.unassigned.clone();
        for component in Component::ALL {
            if let Some(store) = self.store(component) {
                unused.extend(
                    store
                        .unused_keys()
                        .into_iter()
                        .map(|k| format!("{component}: {k}")),
                );
            }
        }
        unused
    }

    /// Ends loading: returns [`unused_keys`](Self::unused_keys) (for a warning), or, in strict
    /// mode, fails if there are any.
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
}

//! Loading a [`StableDiffusion`] pipeline: from a diffusers folder (`model_index.json` and
//! the component folders, as `DiffusionPipeline.from_pretrained` reads them) or from a
//! single-file CompVis checkpoint (as `from_single_file`), whose tokenizer comes from a folder
//! the caller names.

use std::path::{Path, PathBuf};

use sd_schedulers::SchedulerConfig;
use serde_json::Value;

use crate::backend::Backend;
use crate::clip::{ClipTextConfig, ClipTextModel, ClipTokenizer, PadToken};
use crate::controlnet::ControlNetModel;
use crate::error::{Error, Result};
use crate::files::read_regular_string;
use crate::pipeline::StableDiffusion;
use crate::unet::{Unet2DConditionConfig, Unet2DConditionModel};
use crate::vae::{AutoencoderKl, AutoencoderKlConfig};
use crate::weights::compvis::{Component, SingleFileOptions, open_controlnet};
use crate::weights::{LoadDType, Variant, WeightFile, WeightStore, find_weights};

/// Where a pipeline's networks were loaded from, so that they can be loaded again with other
/// LoRAs ([`StableDiffusion::set_loras`]).
#[derive(Debug, Clone)]
pub(crate) enum Origin {
    /// A diffusers folder.
    Folder(PathBuf, LoadOptions),
    /// A single-file checkpoint.
    SingleFile(PathBuf, LoadOptions),
}

/// How to load a pipeline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Prefer the `fp16` variant files (`*.fp16.safetensors`) of each component folder,
    /// falling back to the default files.
    pub fp16_variant: bool,
    /// The precision the weights are handed to the backend in: `F32` (the default) widens
    /// half-precision files; [`LoadDType::Stored`] keeps them as stored, which halves the
    /// weights' memory on the CPU backend (its f32 products widen them as they read them).
    pub weights: LoadDType,
    /// Unused weights, and keys of `model_index.json`, the tokenizer config or the scheduler
    /// config that nothing here knows, are an error (otherwise unused weights are ignored and unknown keys are
    /// listed by [`StableDiffusion::unknown_keys`]).
    pub strict: bool,
    /// Check before loading that every weight is finite (no NaN or infinity), naming the
    /// first tensor that is not: a second pass over the files, off by default for speed. A
    /// generation finds non-finite numbers anyway, at the step where they appear.
    pub check_weights: bool,
    /// The tokenizer folder (`vocab.json`, `merges.txt`, optionally the tokenizer configs).
    /// Required for a single-file checkpoint, which carries no tokenizer; for a diffusers
    /// folder it replaces the folder's `tokenizer/`. For an SDXL single file the second
    /// tokenizer is the `tokenizer_2/` folder beside it if there is one (a diffusers SDXL
    /// folder's `tokenizer/` was given), else this one padding with `!`, as SDXL's.
    pub tokenizer: Option<PathBuf>,
    /// How a single-file checkpoint is read: what inference cannot see (the kind, the
    /// prediction type, config fields such as head or group counts) and EMA or not. Its own
    /// dtype and strictness are replaced by [`weights`](Self::weights) and
    /// [`strict`](Self::strict). Unused for a diffusers folder.
    pub single_file: SingleFileOptions,
}

impl LoadOptions {
    pub(crate) fn variants(&self) -> Vec<Variant> {
        if self.fp16_variant {
            vec![Variant::Fp16, Variant::Default]
        } else {
            vec![Variant::Default]
        }
    }
}

/// A single file's inferred config of `component`, as JSON text.
pub(crate) fn component_config(
    file: &crate::weights::compvis::SingleFile,
    path: &Path,
    component: Component,
) -> Result<String> {
    file.config(component)
        .map(|m| Value::Object(m.clone()).to_string())
        .ok_or_else(|| Error::Config {
            what: path.display().to_string(),
            message: format!("the checkpoint has no {component}"),
        })
}

/// [`WeightFile::check_finite`] on a weight file or on every shard of a sharded index.
fn check_finite(path: &Path) -> Result<()> {
    let store = WeightStore::open(&[path])?;
    store
        .weight_files()
        .iter()
        .try_for_each(WeightFile::check_finite)
}

/// A `sd_schedulers` error as an sd-models one (sd-models' error type has no variant for
/// them yet), naming what was being done.
pub(crate) fn scheduler_error(what: &str, e: sd_schedulers::Error) -> Error {
    Error::Config {
        what: what.to_string(),
        message: e.to_string(),
    }
}

/// The dtype the VAE is loaded in for weights asked in `dtype`: f32 for a VAE that
/// overflows in half precision (`force_upcast`, SDXL's) where the weights would stay in it.
fn vae_dtype(config: &AutoencoderKlConfig, dtype: LoadDType) -> LoadDType {
    if config.force_upcast && dtype == LoadDType::Stored {
        LoadDType::F32
    } else {
        dtype
    }
}

fn scheduler_config(json: &str, what: &str) -> Result<SchedulerConfig> {
    SchedulerConfig::from_json(json).map_err(|e| scheduler_error(what, e))
}

impl<B: Backend> StableDiffusion<B> {
    /// Loads a diffusers Stable Diffusion folder: `model_index.json`, `tokenizer/` (or
    /// [`LoadOptions::tokenizer`]), `text_encoder/`, `unet/`, `vae/` and
    /// `scheduler/scheduler_config.json`.
    ///
    /// # Errors
    /// [`Error::Io`] naming a missing file (`model_index.json`, a config, the weights);
    /// [`Error::Config`] for a malformed `model_index.json` or config; the loading errors of
    /// each network; those of [`StableDiffusion::from_parts`].
    pub fn from_dir(backend: B, dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let index_path = dir.join("model_index.json");
        let index: Value =
            serde_json::from_str(&read_regular_string(&index_path)?).map_err(|e| {
                Error::Config {
                    what: index_path.display().to_string(),
                    message: e.to_string(),
                }
            })?;
        let Some(index) = index.as_object() else {
            return Err(Error::Config {
                what: index_path.display().to_string(),
                message: "not a JSON object".into(),
            });
        };
        // What a Stable Diffusion (or ControlNet) pipeline's model_index.json holds; the
        // safety checker and feature extractor are not used here.
        const KNOWN: [&str; 18] = [
            "_class_name",
            "_diffusers_version",
            "_name_or_path",
            "text_encoder",
            "tokenizer",
            "unet",
            "vae",
            "scheduler",
            "safety_checker",
            "feature_extractor",
            "requires_safety_checker",
            "image_encoder",
            "controlnet",
            // SDXL's.
            "text_encoder_2",
            "tokenizer_2",
            "force_zeros_for_empty_prompt",
            "requires_aesthetics_score",
            "add_watermarker",
        ];
        let mut unknown: Vec<String> = index
            .keys()
            .filter(|k| !KNOWN.contains(&k.as_str()))
            .map(|k| format!("{}: {k}", index_path.display()))
            .collect();
        let variants = options.variants();
        // SDXL: a second text encoder (and tokenizer) named by the index or present.
        let named = |key: &str| {
            index
                .get(key)
                .is_some_and(|v| v.get(0).is_some_and(|c| !c.is_null()))
        };
        let xl = named("text_encoder_2")
            || (!index.contains_key("text_encoder_2") && dir.join("text_encoder_2").is_dir());
        // The SDXL refiner has the second text encoder alone (`text_encoder: [null, null]`).
        let refiner = xl
            && index
                .get("text_encoder")
                .is_some_and(|v| v.get(0).is_some_and(Value::is_null));
        if options.check_weights {
            let components: &[&str] = match (xl, refiner) {
                (true, true) => &["text_encoder_2", "unet", "vae"],
                (true, false) => &["text_encoder", "text_encoder_2", "unet", "vae"],
                _ => &["text_encoder", "unet", "vae"],
            };
            for component in components {
                check_finite(&find_weights(dir.join(component), &variants)?)?;
            }
        }
        let (first_tokenizer, first_encoder) = if refiner {
            ("tokenizer_2", "text_encoder_2")
        } else {
            ("tokenizer", "text_encoder")
        };
        let tokenizer_dir = options
            .tokenizer
            .clone()
            .unwrap_or_else(|| dir.join(first_tokenizer));
        let tokenizer = ClipTokenizer::from_dir(&tokenizer_dir)?;
        let (strict, dtype) = (options.strict, options.weights);
        let text_encoder = ClipTextModel::from_dir_as(
            &backend,
            dir.join(first_encoder),
            &variants,
            strict,
            dtype,
        )?;
        let unet = Unet2DConditionModel::from_dir_as(
            &backend,
            dir.join("unet"),
            &variants,
            strict,
            dtype,
        )?;
        // `force_upcast`: a VAE that overflows in half precision (SDXL's) is kept in f32.
        let vae_config = AutoencoderKlConfig::from_file(dir.join("vae").join("config.json"))?;
        let vae_dtype = vae_dtype(&vae_config, dtype);
        let vae =
            AutoencoderKl::from_dir_as(&backend, dir.join("vae"), &variants, strict, vae_dtype)?;
        let second = if xl && !refiner {
            let tokenizer_2 = ClipTokenizer::from_dir(dir.join("tokenizer_2"))?;
            let text_encoder_2 = ClipTextModel::from_dir_as(
                &backend,
                dir.join("text_encoder_2"),
                &variants,
                strict,
                dtype,
            )?;
            unknown.extend(tokenizer_2.unknown_keys().iter().cloned());
            Some((tokenizer_2, text_encoder_2))
        } else {
            None
        };
        let flag = |key: &str, default: bool| -> Result<bool> {
            match index.get(key) {
                None => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| Error::Config {
                    what: index_path.display().to_string(),
                    message: format!("{key} is not true or false"),
                }),
            }
        };
        let xl_flags = super::XlFlags {
            force_zeros_for_empty_prompt: flag("force_zeros_for_empty_prompt", true)?,
            requires_aesthetics_score: flag("requires_aesthetics_score", false)?,
        };
        let scheduler_path = dir.join("scheduler").join("scheduler_config.json");
        let scheduler = scheduler_config(
            &read_regular_string(&scheduler_path)?,
            &scheduler_path.display().to_string(),
        )?;
        unknown.extend(tokenizer.unknown_keys().iter().cloned());
        unknown.extend(
            scheduler
                .unknown_keys()
                .iter()
                .map(|k| format!("{}: {k}", scheduler_path.display())),
        );
        if strict && !unknown.is_empty() {
            return Err(Error::Config {
                what: dir.display().to_string(),
                message: format!("unknown config key(s) {unknown:?}"),
            });
        }
        let mut pipe = Self::assemble_with(
            backend,
            (tokenizer, text_encoder),
            second,
            xl_flags,
            unet,
            vae,
            scheduler,
        )?;
        pipe.unknown_keys = unknown;
        pipe.origin = Some(Origin::Folder(dir.to_path_buf(), options.clone()));
        Ok(pipe)
    }

    /// Loads a single-file checkpoint (SD 1.x or 2.x, inpainting included, or SDXL) with every
    /// config inferred (see [`crate::weights::compvis`]) except what
    /// [`LoadOptions::single_file`] sets, and the tokenizer from [`LoadOptions::tokenizer`].
    ///
    /// # Errors
    /// [`Error::Config`] if no tokenizer folder is given, or the file has no VAE or text
    /// encoder; those of [`SingleFileOptions::open`] and of loading each network.
    pub fn from_single_file(
        backend: B,
        path: impl AsRef<Path>,
        options: &LoadOptions,
    ) -> Result<Self> {
        let path = path.as_ref();
        let Some(tokenizer_dir) = &options.tokenizer else {
            return Err(Error::Config {
                what: format!("{} (single-file checkpoint)", path.display()),
                message: "a single file carries no tokenizer: give a tokenizer folder \
                          (vocab.json and merges.txt, e.g. a diffusers model's tokenizer/)"
                    .into(),
            });
        };
        let tokenizer = ClipTokenizer::from_dir(tokenizer_dir)?;
        if options.check_weights {
            check_finite(path)?;
        }
        let file = options
            .single_file
            .clone()
            .dtype(options.weights)
            .strict(options.strict)
            .open(path)?;
        let what = |c: &str| format!("{}: {c} config", path.display());
        let config_json = |component: Component| component_config(&file, path, component);
        let missing = |component: Component| Error::Config {
            what: path.display().to_string(),
            message: format!("the checkpoint has no {component}"),
        };
        let unet_config =
            Unet2DConditionConfig::from_json(&config_json(Component::Unet)?, &what("unet"))?;
        let unet = Unet2DConditionModel::load(&backend, file.unet(), unet_config, options.weights)?;
        let vae_config =
            AutoencoderKlConfig::from_json(&config_json(Component::Vae)?, &what("vae"))?;
        let vae_store = file.vae().ok_or_else(|| missing(Component::Vae))?;
        let vae_dtype = vae_dtype(&vae_config, options.weights);
        let vae = AutoencoderKl::load(&backend, vae_store, vae_config, vae_dtype)?;
        let text_config = ClipTextConfig::from_json(
            &config_json(Component::TextEncoder)?,
            &what("text_encoder"),
        )?;
        let text_store = file
            .text_encoder()
            .ok_or_else(|| missing(Component::TextEncoder))?;
        let text_encoder = ClipTextModel::load(&backend, text_store, text_config, options.weights)?;
        let second = if file.kind().is_xl() {
            let config = ClipTextConfig::from_json(
                &config_json(Component::TextEncoder2)?,
                &what("text_encoder_2"),
            )?;
            let store = file
                .text_encoder_2()
                .ok_or_else(|| missing(Component::TextEncoder2))?;
            let encoder = ClipTextModel::load(&backend, store, config, options.weights)?;
            let beside = tokenizer_dir.parent().map(|p| p.join("tokenizer_2"));
            let tokenizer_2 = match beside.filter(|d| d.is_dir()) {
                Some(dir) => ClipTokenizer::from_dir(dir)?,
                None => ClipTokenizer::from_dir_with_pad(tokenizer_dir, PadToken::Exclamation)?,
            };
            Some((tokenizer_2, encoder))
        } else {
            None
        };
        file.finish()?;
        let scheduler = scheduler_config(
            &Value::Object(file.scheduler_config().clone()).to_string(),
            &what("scheduler"),
        )?;
        let mut pipe = Self::assemble_with(
            backend,
            (tokenizer, text_encoder),
            second,
            super::XlFlags::default(),
            unet,
            vae,
            scheduler,
        )?;
        pipe.origin = Some(Origin::SingleFile(path.to_path_buf(), options.clone()));
        Ok(pipe)
    }

    /// Loads `path`: a diffusers folder ([`from_dir`](Self::from_dir)) if it is a directory,
    /// else a single-file checkpoint ([`from_single_file`](Self::from_single_file)).
    ///
    /// # Errors
    /// [`Error::Io`] if `path` does not exist; those of the loader chosen.
    pub fn load(backend: B, path: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.is_dir() {
            Self::from_dir(backend, path, options)
        } else {
            Self::from_single_file(backend, path, options)
        }
    }

    /// Loads a ControlNet from `path`, a diffusers folder (preferring its `fp16` variant with
    /// [`LoadOptions::fp16_variant`]) or a single file of the original releases, and adds it
    /// to the pipeline ([`with_controlnet`](Self::with_controlnet)).
    ///
    /// # Errors
    /// [`Error::Io`] if `path` does not exist; those of
    /// [`ControlNetModel::from_dir_as`], [`ControlNetModel::from_single_file`] (a file that is
    /// not a ControlNet is [`Error::CannotInfer`]) and [`with_controlnet`](Self::with_controlnet).
    pub fn load_controlnet(self, path: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if options.check_weights {
            let file = if meta.is_dir() {
                find_weights(path, &options.variants())?
            } else {
                path.to_path_buf()
            };
            check_finite(&file)?;
        }
        let b = &self.backend;
        let net = if meta.is_dir() {
            ControlNetModel::from_dir_as(
                b,
                path,
                &options.variants(),
                options.strict,
                options.weights,
            )?
        } else {
            let mut file = open_controlnet(path, options.weights, options.strict)?;
            // Groups, heads and epsilons follow the UNet's where the file cannot show them.
            let u = self.unet.config();
            if file.config.block_out_channels == u.block_out_channels {
                file.config.norm_num_groups = u.norm_num_groups;
                file.config.attention_head_dim = u.attention_head_dim.clone();
                file.config.norm_eps = u.norm_eps;
            }
            ControlNetModel::from_file(b, file)?
        };
        self.with_controlnet(net)
    }
}

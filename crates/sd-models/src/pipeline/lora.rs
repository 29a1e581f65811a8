//! LoRAs on a loaded pipeline: the UNet and the text encoder loaded again from the files the
//! pipeline came from (their memory maps, not a copy kept in memory), with the LoRAs' updates
//! merged into the weights as they are read ([`crate::lora`]). Switching LoRAs therefore
//! gives exactly what a fresh load with the new set gives, and setting none restores the
//! model.

use std::sync::Arc;

use crate::backend::Backend;
use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::error::{Error, Result};
use crate::lora::{Lora, LoraPatches, LoraReport, LoraTarget};
use crate::nn::rename_legacy_attention;
use crate::pipeline::StableDiffusion;
use crate::pipeline::load::{Origin, component_config};
use crate::unet::{Unet2DConditionConfig, Unet2DConditionModel};
use crate::weights::OpenOptions;
use crate::weights::compvis::{Component, original_unet_module_names};

/// The UNet, the text encoder and SDXL's second text encoder.
type Networks<B> = (
    Unet2DConditionModel<B>,
    ClipTextModel<B>,
    Option<ClipTextModel<B>>,
);

impl<B: Backend> StableDiffusion<B> {
    /// Applies `loras` (each at its [`Lora::multiplier`]) in place of those applied before,
    /// loading the UNet and the text encoder again from the pipeline's files with the
    /// updates merged; an empty list restores the model. Textual inversion embeddings and
    /// ControlNets stay. Returns how many updates matched a weight, and which did not.
    ///
    /// # Errors
    /// [`Error::Config`] for a pipeline not loaded from files ([`StableDiffusion::from_parts`]),
    /// an update whose shape is not its weight's (a LoRA for another model: named), a
    /// multiplier that is not finite, or, with `strict`, any update or key that matched no
    /// weight; loading errors. The pipeline is unchanged when it fails.
    pub fn set_loras(&mut self, loras: &[Lora], strict: bool) -> Result<LoraReport> {
        let origin = self.origin.clone().ok_or_else(|| Error::Config {
            what: "LoRA".into(),
            message: "the pipeline was not loaded from files (from_parts): load it with \
                      StableDiffusion::load to apply LoRAs"
                .into(),
        })?;
        if self.is_xl() && self.second.is_none() {
            return Err(Error::Config {
                what: "LoRA".into(),
                message: "LoRAs on the SDXL refiner (its one text encoder is the second) are \
                          not supported"
                    .into(),
            });
        }
        let patches = [
            LoraTarget::Unet,
            LoraTarget::TextEncoder,
            LoraTarget::TextEncoder2,
        ]
        .map(|t| LoraPatches::new(loras, t));
        let [unet_patches, text_patches, text_2_patches] = patches;
        let (text_patches, text_2_patches) = (Arc::new(text_patches?), Arc::new(text_2_patches?));
        let ((unet, mut text_encoder, text_encoder_2), unet_patches) =
            self.load_patched(&origin, unet_patches?, &text_patches, &text_2_patches)?;
        let mut report = unet_patches.report();
        let mut parts = vec![text_patches.report()];
        if text_encoder_2.is_some() {
            parts.push(text_2_patches.report());
        } else {
            // No second encoder: its updates matched nothing.
            let second = text_2_patches.report();
            report.unmatched.extend(second.unmatched);
        }
        for part in parts {
            report.matched += part.matched;
            report.unmatched.extend(part.unmatched);
        }
        report.unmatched.sort();
        if strict && !report.unmatched.is_empty() {
            return Err(Error::Config {
                what: "LoRA".into(),
                message: format!(
                    "{} update(s) or key(s) matched no weight: {:?}",
                    report.unmatched.len(),
                    report.unmatched
                ),
            });
        }
        for e in &self.embeddings {
            text_encoder
                .embeddings
                .token_embedding
                .append_rows(&e.vectors)?;
        }
        self.unet = unet;
        self.text_encoder = text_encoder;
        if let (Some(second), Some(encoder)) = (self.second.as_mut(), text_encoder_2) {
            second.1 = encoder;
        }
        Ok(report)
    }

    /// The UNet and text encoders of `origin`, their weights patched as they are read; and
    /// the UNet's patches, matched also by the UNet's original module names (kohya's SDXL
    /// LoRAs name them so), taken from the config read for the UNet.
    fn load_patched(
        &self,
        origin: &Origin,
        unet_patches: LoraPatches,
        text_patches: &Arc<LoraPatches>,
        text_2_patches: &Arc<LoraPatches>,
    ) -> Result<(Networks<B>, Arc<LoraPatches>)> {
        let b = &self.backend;
        let (t, t2) = (text_patches.clone(), text_2_patches.clone());
        let with_aliases = |config: &serde_json::Map<String, serde_json::Value>| -> Result<_> {
            let aliases = original_unet_module_names(config)?;
            Ok(Arc::new(unet_patches.with_aliases(aliases)))
        };
        let xl = self.second.is_some();
        match origin {
            Origin::Folder(dir, options) => {
                let variants = options.variants();
                let dtype = options.weights;
                let unet_dir = dir.join("unet");
                let config_path = unet_dir.join("config.json");
                let text = crate::files::read_regular_string(&config_path)?;
                let map: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(&text).map_err(|e| Error::Config {
                        what: config_path.display().to_string(),
                        message: e.to_string(),
                    })?;
                let config =
                    Unet2DConditionConfig::from_json(&text, &config_path.display().to_string())?;
                let unet_patches = with_aliases(&map)?;
                let u = unet_patches.clone();
                let unet = OpenOptions::new()
                    .rename(|k| Some(rename_legacy_attention(k)))
                    .patch(move |k, x| u.patch(k, x))
                    .load_folder(&unet_dir, &variants, |store| {
                        Unet2DConditionModel::load(b, store, config, dtype)
                    })?;
                let text_dir = dir.join("text_encoder");
                let config = ClipTextConfig::from_file(text_dir.join("config.json"))?;
                let text_encoder = OpenOptions::new()
                    .patch(move |k, x| t.patch(k, x))
                    .load_folder(&text_dir, &variants, |store| {
                        ClipTextModel::load(b, store, config, dtype)
                    })?;
                let text_encoder_2 = if xl {
                    let dir = dir.join("text_encoder_2");
                    let config = ClipTextConfig::from_file(dir.join("config.json"))?;
                    Some(
                        OpenOptions::new()
                            .patch(move |k, x| t2.patch(k, x))
                            .load_folder(&dir, &variants, |store| {
                                ClipTextModel::load(b, store, config, dtype)
                            })?,
                    )
                } else {
                    None
                };
                Ok(((unet, text_encoder, text_encoder_2), unet_patches))
            }
            Origin::SingleFile(path, options) => {
                let mut file = options
                    .single_file
                    .clone()
                    .dtype(options.weights)
                    .open(path)?;
                let missing = |c: Component| Error::Config {
                    what: path.display().to_string(),
                    message: format!("the checkpoint has no {c}"),
                };
                let unet_patches = with_aliases(
                    file.config(Component::Unet)
                        .ok_or_else(|| missing(Component::Unet))?,
                )?;
                let u = unet_patches.clone();
                file.store_mut(Component::Unet)
                    .ok_or_else(|| missing(Component::Unet))?
                    .set_patch(move |k, x| u.patch(k, x));
                file.store_mut(Component::TextEncoder)
                    .ok_or_else(|| missing(Component::TextEncoder))?
                    .set_patch(move |k, x| t.patch(k, x));
                if xl {
                    file.store_mut(Component::TextEncoder2)
                        .ok_or_else(|| missing(Component::TextEncoder2))?
                        .set_patch(move |k, x| t2.patch(k, x));
                }
                let what = |c: &str| format!("{}: {c} config", path.display());
                let config = Unet2DConditionConfig::from_json(
                    &component_config(&file, path, Component::Unet)?,
                    &what("unet"),
                )?;
                let unet = Unet2DConditionModel::load(b, file.unet(), config, options.weights)?;
                let config = ClipTextConfig::from_json(
                    &component_config(&file, path, Component::TextEncoder)?,
                    &what("text_encoder"),
                )?;
                let store = file
                    .text_encoder()
                    .ok_or_else(|| missing(Component::TextEncoder))?;
                let text_encoder = ClipTextModel::load(b, store, config, options.weights)?;
                let text_encoder_2 = if xl {
                    let config = ClipTextConfig::from_json(
                        &component_config(&file, path, Component::TextEncoder2)?,
                        &what("text_encoder_2"),
                    )?;
                    let store = file
                        .text_encoder_2()
                        .ok_or_else(|| missing(Component::TextEncoder2))?;
                    Some(ClipTextModel::load(b, store, config, options.weights)?)
                } else {
                    None
                };
                Ok(((unet, text_encoder, text_encoder_2), unet_patches))
            }
        }
    }
}

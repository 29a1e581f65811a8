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
use crate::weights::compvis::Component;

type Networks<B> = (Unet2DConditionModel<B>, ClipTextModel<B>);

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
        let unet_patches = Arc::new(LoraPatches::new(loras, LoraTarget::Unet)?);
        let text_patches = Arc::new(LoraPatches::new(loras, LoraTarget::TextEncoder)?);
        let (unet, mut text_encoder) = self.load_patched(&origin, &unet_patches, &text_patches)?;
        let mut report = unet_patches.report();
        let text = text_patches.report();
        report.matched += text.matched;
        report.unmatched.extend(text.unmatched);
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
        Ok(report)
    }

    /// The UNet and text encoder of `origin`, their weights patched as they are read.
    fn load_patched(
        &self,
        origin: &Origin,
        unet_patches: &Arc<LoraPatches>,
        text_patches: &Arc<LoraPatches>,
    ) -> Result<Networks<B>> {
        let b = &self.backend;
        let (u, t) = (unet_patches.clone(), text_patches.clone());
        match origin {
            Origin::Folder(dir, options) => {
                let variants = options.variants();
                let dtype = options.weights;
                let unet_dir = dir.join("unet");
                let config = Unet2DConditionConfig::from_file(unet_dir.join("config.json"))?;
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
                Ok((unet, text_encoder))
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
                file.store_mut(Component::Unet)
                    .ok_or_else(|| missing(Component::Unet))?
                    .set_patch(move |k, x| u.patch(k, x));
                file.store_mut(Component::TextEncoder)
                    .ok_or_else(|| missing(Component::TextEncoder))?
                    .set_patch(move |k, x| t.patch(k, x));
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
                Ok((unet, text_encoder))
            }
        }
    }
}

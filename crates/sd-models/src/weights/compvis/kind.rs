//! Which Stable Diffusion model a single file holds, and the diffusers configs of the models
//! people run (the preset JSON files in `crates/sd-models/presets/`).

use std::fmt;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use sd_core::prediction::PredictionType;

/// The Stable Diffusion models a single file can hold, by diffusers' names for them
/// (`infer_diffusers_model_type` in `loaders/single_file_utils.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ModelKind {
    /// Stable Diffusion 1.x (OpenAI CLIP ViT-L/14 text encoder, 768-wide cross-attention):
    /// diffusers' `"v1"`, configured as `stable-diffusion-v1-5/stable-diffusion-v1-5`.
    Sd1,
    /// Stable Diffusion 1.x inpainting (a UNet of 9 input channels: latents, mask, masked
    /// image): diffusers' `"inpainting"`, configured as
    /// `stable-diffusion-v1-5/stable-diffusion-inpainting`.
    Sd1Inpainting,
    /// Stable Diffusion 2.x (OpenCLIP ViT-H/14 text encoder, 1024-wide cross-attention):
    /// diffusers' `"v2"`, configured as `stabilityai/stable-diffusion-2-1` (768 px,
    /// v-prediction).
    Sd2,
    /// Stable Diffusion 2.x inpainting: diffusers' `"inpainting_v2"`, configured as
    /// `stabilityai/stable-diffusion-2-inpainting`.
    Sd2Inpainting,
    /// Stable Diffusion XL (two text encoders under `conditioner.embedders.*`, the UNet's
    /// `label_emb` added embedding): diffusers' `"xl_base"`, configured as
    /// `stabilityai/stable-diffusion-xl-base-1.0`.
    Sdxl,
}

/// A network of a Stable Diffusion pipeline, as a diffusers folder names its subfolder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Component {
    /// `unet/`: the `UNet2DConditionModel` (original keys `model.diffusion_model.*`).
    Unet,
    /// `vae/`: the `AutoencoderKL` (original keys `first_stage_model.*`).
    Vae,
    /// `text_encoder/`: the `CLIPTextModel` (original keys `cond_stage_model.*`, SDXL's
    /// `conditioner.embedders.0.transformer.*`).
    TextEncoder,
    /// `text_encoder_2/`: SDXL's `CLIPTextModelWithProjection` (original keys
    /// `conditioner.embedders.1.model.*`).
    TextEncoder2,
}

impl Component {
    /// The components, in pipeline order.
    pub const ALL: [Component; 4] = [
        Component::Unet,
        Component::Vae,
        Component::TextEncoder,
        Component::TextEncoder2,
    ];

    /// The diffusers subfolder name (`"unet"`, `"vae"`, `"text_encoder"`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The preset files: (kind, unet, vae, text_encoder, scheduler, text_encoder_2).
const PRESETS: [(ModelKind, [&str; 5]); 5] = [
    (
        ModelKind::Sd1,
        [
            include_str!("../../../presets/sd15/unet.json"),
            include_str!("../../../presets/sd15/vae.json"),
            include_str!("../../../presets/sd15/text_encoder.json"),
            include_str!("../../../presets/sd15/scheduler.json"),
            "",
        ],
    ),
    (
        ModelKind::Sd1Inpainting,
        [
            include_str!("../../../presets/sd15_inpainting/unet.json"),
            include_str!("../../../presets/sd15_inpainting/vae.json"),
            include_str!("../../../presets/sd15_inpainting/text_encoder.json"),
            include_str!("../../../presets/sd15_inpainting/scheduler.json"),
            "",
        ],
    ),
    (
        ModelKind::Sd2,
        [
            include_str!("../../../presets/sd21/unet.json"),
            include_str!("../../../presets/sd21/vae.json"),
            include_str!("../../../presets/sd21/text_encoder.json"),
            include_str!("../../../presets/sd21/scheduler.json"),
            "",
        ],
    ),
    (
        ModelKind::Sd2Inpainting,
        [
            include_str!("../../../presets/sd2_inpainting/unet.json"),
            include_str!("../../../presets/sd2_inpainting/vae.json"),
            include_str!("../../../presets/sd2_inpainting/text_encoder.json"),
            include_str!("../../../presets/sd2_inpainting/scheduler.json"),
            "",
        ],
    ),
    (
        ModelKind::Sdxl,
        [
            include_str!("../../../presets/sdxl/unet.json"),
            include_str!("../../../presets/sdxl/vae.json"),
            include_str!("../../../presets/sdxl/text_encoder.json"),
            include_str!("../../../presets/sdxl/scheduler.json"),
            include_str!("../../../presets/sdxl/text_encoder_2.json"),
        ],
    ),
];

impl ModelKind {
    /// Every kind.
    pub const ALL: [ModelKind; 5] = [
        ModelKind::Sd1,
        ModelKind::Sd1Inpainting,
        ModelKind::Sd2,
        ModelKind::Sd2Inpainting,
        ModelKind::Sdxl,
    ];

    /// The kind of a version (`sd2`: 2.x, else 1.x) and UNet input (`inpainting`: 9
    /// channels).
    #[must_use]
    pub fn new(sd2: bool, inpainting: bool) -> Self {
        match (sd2, inpainting) {
            (false, false) => ModelKind::Sd1,
            (false, true) => ModelKind::Sd1Inpainting,
            (true, false) => ModelKind::Sd2,
            (true, true) => ModelKind::Sd2Inpainting,
        }
    }

    /// Whether it is a 2.x model (OpenCLIP text encoder, linear projections in the UNet's
    /// transformers, 64-wide attention heads).
    #[must_use]
    pub fn is_sd2(self) -> bool {
        matches!(self, ModelKind::Sd2 | ModelKind::Sd2Inpainting)
    }

    /// Whether it is SDXL (two text encoders, the UNet's added embedding).
    #[must_use]
    pub fn is_xl(self) -> bool {
        self == ModelKind::Sdxl
    }

    /// Whether its UNet has 64-wide attention heads (SD 2.x and SDXL; SD 1.x has 8 heads
    /// per level).
    #[must_use]
    pub fn has_64_wide_heads(self) -> bool {
        self.is_sd2() || self.is_xl()
    }

    /// Whether it is an inpainting model (a UNet of 9 input channels).
    #[must_use]
    pub fn is_inpainting(self) -> bool {
        matches!(self, ModelKind::Sd1Inpainting | ModelKind::Sd2Inpainting)
    }

    /// diffusers' name for it (`infer_diffusers_model_type`): `"v1"`, `"inpainting"`, `"v2"`,
    /// `"inpainting_v2"`.
    #[must_use]
    pub fn diffusers_model_type(self) -> &'static str {
        match self {
            ModelKind::Sd1 => "v1",
            ModelKind::Sd1Inpainting => "inpainting",
            ModelKind::Sd2 => "v2",
            ModelKind::Sd2Inpainting => "inpainting_v2",
            ModelKind::Sdxl => "xl_base",
        }
    }

    /// The Hub repository whose configs diffusers' `from_single_file` uses for it
    /// (`DIFFUSERS_DEFAULT_PIPELINE_PATHS`), and which the presets follow.
    #[must_use]
    pub fn default_repository(self) -> &'static str {
        match self {
            ModelKind::Sd1 => "stable-diffusion-v1-5/stable-diffusion-v1-5",
            ModelKind::Sd1Inpainting => "stable-diffusion-v1-5/stable-diffusion-inpainting",
            ModelKind::Sd2 => "stabilityai/stable-diffusion-2-1",
            ModelKind::Sd2Inpainting => "stabilityai/stable-diffusion-2-inpainting",
            ModelKind::Sdxl => "stabilityai/stable-diffusion-xl-base-1.0",
        }
    }

    /// What the UNet predicts, as diffusers decides it for a single file: the
    /// `prediction_type` of [`default_repository`](Self::default_repository)'s scheduler
    /// config. That is v-prediction for [`ModelKind::Sd2`] (SD 2.x at 768 px) and epsilon for
    /// the others. The weights do not show it: an SD 2.x *base* (512 px) checkpoint predicts
    /// epsilon and needs [`SingleFileOptions::prediction_type`](super::SingleFileOptions::prediction_type).
    #[must_use]
    pub fn default_prediction_type(self) -> PredictionType {
        match self {
            ModelKind::Sd2 => PredictionType::VPrediction,
            _ => PredictionType::Epsilon,
        }
    }

    fn preset_text(self, index: usize) -> &'static str {
        PRESETS
            .iter()
            .find(|(kind, _)| *kind == self)
            .and_then(|(_, files)| files.get(index).copied())
            .unwrap_or("")
    }

    /// The preset `config.json` of a component: the file of that subfolder of
    /// [`default_repository`](Self::default_repository), as `crates/sd-models/presets/`
    /// holds it.
    ///
    /// # Errors
    /// [`Error::Config`] if the preset is not a JSON object (a broken build), or the kind has
    /// no such component (a second text encoder but for SDXL).
    pub fn preset(self, component: Component) -> Result<Map<String, Value>> {
        let index = match component {
            Component::Unet => 0,
            Component::Vae => 1,
            Component::TextEncoder => 2,
            Component::TextEncoder2 => 4,
        };
        self.parse_preset(index, component.name())
    }

    /// The preset `scheduler_config.json`.
    ///
    /// # Errors
    /// [`Error::Config`] if the preset is not a JSON object (a broken build).
    pub fn scheduler_preset(self) -> Result<Map<String, Value>> {
        self.parse_preset(3, "scheduler")
    }

    fn parse_preset(self, index: usize, name: &str) -> Result<Map<String, Value>> {
        let what = format!("preset {name} config of {self}");
        match serde_json::from_str(self.preset_text(index)) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(Error::Config {
                what,
                message: "not a JSON object".to_owned(),
            }),
            Err(e) => Err(Error::Config {
                what,
                message: e.to_string(),
            }),
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelKind::Sd1 => "Stable Diffusion 1.x",
            ModelKind::Sd1Inpainting => "Stable Diffusion 1.x inpainting",
            ModelKind::Sd2 => "Stable Diffusion 2.x",
            ModelKind::Sd2Inpainting => "Stable Diffusion 2.x inpainting",
            ModelKind::Sdxl => "Stable Diffusion XL",
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_preset_parses_and_names_its_class() {
        for kind in ModelKind::ALL {
            let unet = kind.preset(Component::Unet).unwrap();
            assert_eq!(unet["_class_name"], "UNet2DConditionModel");
            assert_eq!(
                unet["in_channels"],
                if kind.is_inpainting() { 9 } else { 4 }
            );
            let cross = match kind {
                ModelKind::Sdxl => 2048,
                k if k.is_sd2() => 1024,
                _ => 768,
            };
            assert_eq!(unet["cross_attention_dim"], cross);
            assert_eq!(kind.preset(Component::TextEncoder2).is_ok(), kind.is_xl());
            assert_eq!(
                kind.preset(Component::Vae).unwrap()["_class_name"],
                "AutoencoderKL"
            );
            let text = kind.preset(Component::TextEncoder).unwrap();
            assert_eq!(
                text["hidden_act"],
                if kind.is_sd2() { "gelu" } else { "quick_gelu" }
            );
            if kind.is_xl() {
                let text_2 = kind.preset(Component::TextEncoder2).unwrap();
                assert_eq!(text_2["hidden_act"], "gelu");
                assert_eq!(text_2["projection_dim"], 1280);
            }
            let scheduler = kind.scheduler_preset().unwrap();
            let prediction = scheduler
                .get("prediction_type")
                .cloned()
                .unwrap_or_else(|| "epsilon".into());
            assert_eq!(
                prediction,
                serde_json::to_value(kind.default_prediction_type()).unwrap()
            );
        }
    }
}

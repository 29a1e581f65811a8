//! The text encoder's `config.json` (transformers' `CLIPTextConfig`).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The activation of CLIP's MLP (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub enum HiddenAct {
    /// `x * sigmoid(1.702 x)`: OpenAI's CLIP ViT-L/14 (Stable Diffusion 1.x).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact GELU: OpenCLIP ViT-H/14 (Stable Diffusion 2.x).
    #[serde(rename = "gelu")]
    Gelu,
    /// GELU with the tanh approximation.
    #[serde(rename = "gelu_pytorch_tanh", alias = "gelu_new")]
    GeluTanh,
}

/// transformers' `CLIPTextConfig`, with its defaults for missing keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ClipTextConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Output size of `CLIPTextModelWithProjection`'s projection.
    pub projection_dim: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Number of positions (77).
    pub max_position_embeddings: usize,
    /// The MLP activation.
    pub hidden_act: HiddenAct,
    /// Layer norm epsilon.
    pub layer_norm_eps: f64,
    /// Padding token id (informational: the tokenizer pads).
    pub pad_token_id: Option<u32>,
    /// Start token id.
    pub bos_token_id: Option<u32>,
    /// End token id. `2` selects transformers' legacy pooling (the largest id's position), as
    /// Stable Diffusion's configs have it; any other value pools at its first occurrence.
    pub eos_token_id: u32,
    /// Training only.
    pub attention_dropout: f64,
    /// Training only.
    pub dropout: f64,
    /// Training only.
    pub initializer_range: f64,
    /// Training only.
    pub initializer_factor: f64,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: HiddenAct::QuickGelu,
            layer_norm_eps: 1e-5,
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: 49407,
            attention_dropout: 0.0,
            dropout: 0.0,
            initializer_range: 0.02,
            initializer_factor: 1.0,
        }
    }
}

const KNOWN: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "attention_dropout",
    "dropout",
    "initializer_range",
    "initializer_factor",
];

impl ClipTextConfig {
    /// Parses a `config.json`'s text; `what` names it in errors.
    ///
    /// # Errors
    /// [`Error::Config`] for malformed JSON, an unknown key, a wrong value, or an impossible
    /// combination (see [`ClipTextConfig::validate`]).
    pub fn from_json(json: &str, what: &str) -> Result<Self> {
        let config: Self = crate::config::parse(json, what, KNOWN)?;
        config.validate(what)?;
        Ok(config)
    }

    /// Stable Diffusion 1.5's text encoder, OpenAI's CLIP ViT-L/14 text tower
    /// (`presets/sd15/text_encoder.json`): 12 layers of 768, quick GELU.
    ///
    /// ```
    /// let config = sd_models::clip::ClipTextConfig::stable_diffusion_1_5()?;
    /// assert_eq!((config.hidden_size, config.num_hidden_layers), (768, 12));
    /// # Ok::<(), sd_models::Error>(())
    /// ```
    ///
    /// # Errors
    /// None in practice: the preset is parsed and validated like any config.
    pub fn stable_diffusion_1_5() -> Result<Self> {
        Self::from_json(
            include_str!("../../presets/sd15/text_encoder.json"),
            "presets/sd15/text_encoder.json",
        )
    }

    /// Reads a `config.json`.
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read; as [`ClipTextConfig::from_json`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let config: Self = crate::config::read(path, KNOWN)?;
        config.validate(&path.display().to_string())?;
        Ok(config)
    }

    /// Rejects impossible configurations: zero sizes, or a width that the heads do not
    /// divide.
    ///
    /// # Errors
    /// [`Error::Config`] naming the problem.
    pub fn validate(&self, what: &str) -> Result<()> {
        let error = |message: String| Error::Config {
            what: what.to_string(),
            message,
        };
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(error(format!("{name} must be positive")));
            }
        }
        // Far past every CLIP (ViT-bigG: 1280 wide, 32 layers, 49408 tokens, 77 positions),
        // and small enough that building the network cannot overflow before its weights load.
        for (name, v, max) in [
            ("vocab_size", self.vocab_size, 1 << 20),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            ("num_hidden_layers", self.num_hidden_layers, 256),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 14,
            ),
        ] {
            if v > max {
                return Err(error(format!(
                    "{name} = {v} is more than the supported {max}"
                )));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(error(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }

    /// The size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

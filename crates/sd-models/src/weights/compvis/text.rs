//! The text encoder, in transformers' `CLIPTextModel` names (`text_model.embeddings.*`,
//! `text_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2,
//! layer_norm2}`, `text_model.final_layer_norm`), following `convert_ldm_clip_checkpoint`
//! and `convert_open_clip_checkpoint`.
//!
//! SD 1.x stores OpenAI's CLIP ViT-L/14 as transformers saved it, under
//! `cond_stage_model.transformer.` (with or without transformers' `text_model.` level): the
//! names are kept. SD 2.x stores OpenCLIP's ViT-H/14 under `cond_stage_model.model.`:
//! `token_embedding`, `positional_embedding`, `transformer.resblocks.N.{ln_1, attn, ln_2,
//! mlp.c_fc, mlp.c_proj}`, `ln_final`, `text_projection`, `logit_scale`. Its attention keeps
//! the query, key and value projections fused (`attn.in_proj_weight` `[3 D, D]`,
//! `attn.in_proj_bias` `[3 D]`): they are rows `0..D`, `D..2D`, `2D..3D`, presented through
//! [`Derived`] views. SD 2.x takes the hidden states of the penultimate layer (ldm's
//! `FrozenOpenCLIPEmbedder(layer="penultimate")`), so diffusers' config has one layer fewer
//! than the file and the last layer, the projection and the temperature are not loaded
//! (`SD_2_TEXT_ENCODER_KEYS_TO_IGNORE`). The whole tower can be asked for instead
//! ([`SingleFileOptions::full_open_clip`](super::SingleFileOptions::full_open_clip)): every
//! layer, and `text_projection.weight`, the transpose of `text_projection` (OpenCLIP applies
//! it as `x @ P`, a linear layer as `x P_w^T`).

use serde_json::{Map, Value, json};

use crate::error::Result;
use crate::weights::compvis::table::{ConfigReader, Shapes, Table, View, WB};
use crate::weights::compvis::{IgnoreReason, cannot_infer};
use crate::weights::{Derived, WeightPath};

/// The prefix of SD 1.x's text encoder keys.
pub(crate) const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// The prefix of SD 2.x's text encoder keys.
pub(crate) const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// The prefix of SDXL's first text encoder (OpenAI CLIP ViT-L, transformers' names).
pub(crate) const XL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// The prefix of SDXL's second text encoder (OpenCLIP ViT-bigG, OpenCLIP's names).
pub(crate) const XL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";

/// The width of the attention heads of CLIP ViT-L/14 (768 / 12) and OpenCLIP ViT-H/14
/// (1024 / 16).
const HEAD_WIDTH: usize = 64;

/// Which text encoder a file holds, and how its keys start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TextLayout {
    /// OpenAI CLIP in transformers' names under `base` (SD 1.x, SDXL's first encoder);
    /// `text_model` says whether the keys have transformers' `text_model.` level.
    Clip {
        base: &'static str,
        text_model: bool,
    },
    /// OpenCLIP's own names under `base` (SD 2.x, SDXL's second encoder).
    OpenClip { base: &'static str },
}

impl TextLayout {
    /// An OpenAI CLIP text encoder under `base`, if the keys have one.
    fn detect_clip(shapes: &Shapes<'_>, base: &'static str) -> Option<Self> {
        let clip =
            |root: &str| shapes.has(&format!("{base}{root}embeddings.token_embedding.weight"));
        if clip("text_model.") {
            Some(TextLayout::Clip {
                base,
                text_model: true,
            })
        } else if clip("") {
            Some(TextLayout::Clip {
                base,
                text_model: false,
            })
        } else {
            None
        }
    }

    /// An OpenCLIP text encoder under `base`, if the keys have one.
    fn detect_open_clip(shapes: &Shapes<'_>, base: &'static str) -> Option<Self> {
        shapes
            .has(&format!("{base}token_embedding.weight"))
            .then_some(TextLayout::OpenClip { base })
    }

    /// The SD 1.x/2.x text encoder the keys show, if any.
    pub(crate) fn detect(shapes: &Shapes<'_>) -> Option<Self> {
        Self::detect_clip(shapes, CLIP_PREFIX)
            .or_else(|| Self::detect_open_clip(shapes, OPEN_CLIP_PREFIX))
    }

    /// SDXL's two text encoders, as far as the keys have them.
    pub(crate) fn detect_xl(shapes: &Shapes<'_>) -> (Option<Self>, Option<Self>) {
        (
            Self::detect_clip(shapes, XL_CLIP_PREFIX),
            Self::detect_open_clip(shapes, XL_OPEN_CLIP_PREFIX),
        )
    }

    /// The prefix of the file's text encoder keys.
    pub(crate) fn prefix(self) -> String {
        match self {
            TextLayout::Clip {
                base,
                text_model: true,
            } => format!("{base}text_model."),
            TextLayout::Clip { base, .. } | TextLayout::OpenClip { base } => base.to_owned(),
        }
    }

    /// Whether the names are OpenCLIP's.
    pub(crate) fn is_open_clip(self) -> bool {
        matches!(self, TextLayout::OpenClip { .. })
    }

    fn names(self) -> Names {
        match self {
            TextLayout::Clip { .. } => Names {
                token: "embeddings.token_embedding.weight",
                position: "embeddings.position_embedding.weight",
                layers: "encoder.layers",
                fc1: "mlp.fc1.weight",
            },
            TextLayout::OpenClip { .. } => Names {
                token: "token_embedding.weight",
                position: "positional_embedding",
                layers: "transformer.resblocks",
                fc1: "mlp.c_fc.weight",
            },
        }
    }
}

/// The file names inference reads.
struct Names {
    token: &'static str,
    position: &'static str,
    layers: &'static str,
    fc1: &'static str,
}

/// What the weights show about the text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TextShape {
    pub(crate) vocab_size: usize,
    pub(crate) hidden_size: usize,
    pub(crate) max_position_embeddings: usize,
    /// The layers in the file.
    pub(crate) layers: usize,
    pub(crate) intermediate_size: usize,
    /// OpenCLIP's projection width, if the file has one.
    pub(crate) projection: Option<usize>,
}

/// Reads the text encoder's structure from the shapes of its keys.
///
/// # Errors
/// [`MissingWeight`](crate::Error::MissingWeight) naming a key the structure needs;
/// [`CannotInfer`](crate::Error::CannotInfer) if it has no layers.
pub(crate) fn infer(shapes: &Shapes<'_>, layout: TextLayout) -> Result<TextShape> {
    let p = layout.prefix();
    let names = layout.names();
    let key = |name: &str| format!("{p}{name}");
    let token = key(names.token);
    let layers = shapes.indices(&key(names.layers));
    if layers.is_empty() || layers != (0..layers.len()).collect::<Vec<_>>() {
        return Err(cannot_infer(
            shapes.what,
            format!(
                "the text encoder's layers: {}.N are {layers:?}",
                key(names.layers)
            ),
        ));
    }
    let projection = match layout {
        TextLayout::OpenClip { .. } => shapes
            .get(&key("text_projection"))
            .and_then(|s| s.get(1).copied()),
        TextLayout::Clip { .. } => None,
    };
    Ok(TextShape {
        vocab_size: shapes.dim(&token, 2, 0, "the text encoder's vocab_size")?,
        hidden_size: shapes.dim(&token, 2, 1, "the text encoder's hidden_size")?,
        max_position_embeddings: shapes.dim(
            &key(names.position),
            2,
            0,
            "the text encoder's max_position_embeddings",
        )?,
        layers: layers.len(),
        intermediate_size: shapes.dim(
            &format!("{}.0.{}", key(names.layers), names.fc1),
            2,
            0,
            "the text encoder's intermediate_size",
        )?,
        projection,
    })
}

/// Writes what the weights show into the preset `config` (the layers kept: all of CLIP's;
/// OpenCLIP's but the last, or all with `full`), and the fields the weights leave open into
/// `unresolved`.
///
/// # Errors
/// [`CannotInfer`](crate::Error::CannotInfer) for an OpenCLIP tower of one layer
/// (there is no penultimate layer), or `full` without a `text_projection`.
pub(crate) fn apply(
    shape: &TextShape,
    layout: TextLayout,
    full: bool,
    what: &str,
    config: &mut Map<String, Value>,
    unresolved: &mut Vec<(&'static str, String)>,
) -> Result<()> {
    let layers = match layout {
        TextLayout::Clip { .. } => shape.layers,
        TextLayout::OpenClip { .. } if full => {
            let projection = shape.projection.ok_or_else(|| {
                cannot_infer(
                    what,
                    format!(
                        "the projection_dim of the whole OpenCLIP tower: the file has no {}text_projection",
                        layout.prefix()
                    ),
                )
            })?;
            config.insert("projection_dim".into(), json!(projection));
            config.insert(
                "architectures".into(),
                json!(["CLIPTextModelWithProjection"]),
            );
            shape.layers
        }
        TextLayout::OpenClip { .. } => shape.layers.checked_sub(1).filter(|&l| l > 0).ok_or_else(|| {
            cannot_infer(
                what,
                "the text encoder's layers: an OpenCLIP tower of one layer has no penultimate layer for SD 2.x to use".to_owned(),
            )
        })?,
    };
    config.insert("vocab_size".into(), json!(shape.vocab_size));
    config.insert("hidden_size".into(), json!(shape.hidden_size));
    config.insert(
        "max_position_embeddings".into(),
        json!(shape.max_position_embeddings),
    );
    config.insert("intermediate_size".into(), json!(shape.intermediate_size));
    config.insert("num_hidden_layers".into(), json!(layers));
    if shape.hidden_size.is_multiple_of(HEAD_WIDTH) {
        config.insert(
            "num_attention_heads".into(),
            json!(shape.hidden_size / HEAD_WIDTH),
        );
    } else {
        unresolved.push((
            "num_attention_heads",
            format!(
                "hidden_size {} is not a multiple of the {HEAD_WIDTH}-wide heads of CLIP ViT-L/14 and OpenCLIP ViT-H/14",
                shape.hidden_size
            ),
        ));
    }
    Ok(())
}

/// The text encoder's key map for the (final) `config`, and what to ignore (with why): for
/// OpenCLIP, the layers past `num_hidden_layers` and the projection unless `full`, and the
/// temperature.
///
/// # Errors
/// [`Config`](crate::Error::Config) for a config without the sizes.
pub(crate) fn keys(
    config: &ConfigReader<'_>,
    layout: TextLayout,
    full: bool,
    file_layers: usize,
) -> Result<(Table, Vec<(String, IgnoreReason)>)> {
    let layers = config.usize("num_hidden_layers")?;
    let hidden = config.usize("hidden_size")?;
    let prefix = layout.prefix();
    let mut table = Table::new(&prefix);
    let mut ignored = Vec::new();
    let d = WeightPath::new;
    let tm = d("text_model");
    match layout {
        TextLayout::Clip { .. } => {
            let same = |table: &mut Table, name: &WeightPath, params: &[&str]| {
                table.module(name, &tm.push(name.as_str()), params);
            };
            same(&mut table, &d("embeddings.token_embedding"), &["weight"]);
            same(&mut table, &d("embeddings.position_embedding"), &["weight"]);
            table.push_optional(
                &d("embeddings.position_ids"),
                tm.push("embeddings.position_ids"),
            );
            for i in 0..layers {
                let layer = d("encoder.layers").index(i);
                for name in [
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.out_proj",
                    "layer_norm1",
                    "mlp.fc1",
                    "mlp.fc2",
                    "layer_norm2",
                ] {
                    same(&mut table, &layer.push(name), WB);
                }
            }
            same(&mut table, &d("final_layer_norm"), WB);
        }
        TextLayout::OpenClip { .. } => {
            let embeddings = tm.push("embeddings");
            table.module(
                &d("token_embedding"),
                &embeddings.push("token_embedding"),
                &["weight"],
            );
            table.push(
                &d("positional_embedding"),
                embeddings.push("position_embedding.weight"),
                View::Whole,
            );
            for i in 0..layers {
                let file = d("transformer.resblocks").index(i);
                let to = tm.push("encoder.layers").index(i);
                for (open_clip, clip) in [
                    ("ln_1", "layer_norm1"),
                    ("attn.out_proj", "self_attn.out_proj"),
                    ("ln_2", "layer_norm2"),
                    ("mlp.c_fc", "mlp.fc1"),
                    ("mlp.c_proj", "mlp.fc2"),
                ] {
                    table.module(&file.push(open_clip), &to.push(clip), WB);
                }
                for (fused, param) in [("in_proj_weight", "weight"), ("in_proj_bias", "bias")] {
                    for (part, proj) in ["q_proj", "k_proj", "v_proj"].into_iter().enumerate() {
                        let view = Derived::rows(part * hidden, (part + 1) * hidden);
                        table.push(
                            &file.push("attn").push(fused),
                            to.push("self_attn").push(proj).push(param),
                            View::Derived(view),
                        );
                    }
                }
            }
            table.module(&d("ln_final"), &tm.push("final_layer_norm"), WB);
            if full {
                table.push(
                    &d("text_projection"),
                    d("text_projection.weight"),
                    View::Derived(Derived::Transpose),
                );
            } else {
                ignored.push((
                    format!("{prefix}text_projection"),
                    IgnoreReason::OpenClipProjection,
                ));
                for i in layers..file_layers {
                    ignored.push((
                        format!("{prefix}transformer.resblocks.{i}"),
                        IgnoreReason::OpenClipLastLayers,
                    ));
                }
            }
            ignored.push((format!("{prefix}logit_scale"), IgnoreReason::LogitScale));
        }
    }
    Ok((table, ignored))
}

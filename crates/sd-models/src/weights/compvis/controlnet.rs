//! ControlNet single files as lllyasviel released them (ControlNet 1.0 `control_sd15_*`, with
//! keys under `control_model.`; 1.1 `control_v11*` and the SD 2.1 ones, without a prefix):
//! ldm's `ControlNet` module names, mapped to diffusers' `ControlNetModel`, with the config
//! inferred from the shapes, following diffusers' `convert_controlnet_checkpoint` and
//! `create_controlnet_diffusers_config_from_ldm`.
//!
//! | original keys | diffusers names |
//! |---|---|
//! | `time_embed.*`, `input_blocks.*`, `middle_block.*` | as the UNet's (see the `unet` module) |
//! | `input_hint_block.0` | `controlnet_cond_embedding.conv_in` |
//! | `input_hint_block.{2 (j + 1)}` | `controlnet_cond_embedding.blocks.j` (the odd slots are SiLUs) |
//! | the last `input_hint_block.N` | `controlnet_cond_embedding.conv_out` |
//! | `zero_convs.k.0` | `controlnet_down_blocks.k` |
//! | `middle_block_out.0` | `controlnet_mid_block` |
//!
//! The structure comes from the shapes: levels, resnets per level, attention levels,
//! cross-attention width, projections and depth as for a UNet; the hint network's widths from
//! its convolutions. The version follows the cross-attention width (768: SD 1.x, 8 heads per
//! level; 1024: SD 2.x, 64-wide heads); groups, epsilons and activations are SD's defaults.
//! The config is checked when the network is built from it.

use std::collections::HashMap;
use std::path::Path;

use crate::controlnet::ControlNetConfig;
use crate::error::{Error, Result};
use crate::unet::{DownBlockType, PerBlock};
use crate::weights::compvis::table::{Shapes, Table, WB};
use crate::weights::compvis::unet::{encoder_keys, infer_encoder, sd2_heads};
use crate::weights::compvis::{cannot_infer, key_shapes};
use crate::weights::{LoadDType, OpenOptions, WeightFile, WeightPath, WeightStore};

/// The prefix of ControlNet 1.0's keys (1.1 files have none).
pub const CONTROLNET_PREFIX: &str = "control_model.";

/// The cross-attention width of SD 2.x (OpenCLIP ViT-H).
const SD2_CROSS_ATTENTION: usize = 1024;

/// A ControlNet single file opened as a store in diffusers' names, with its inferred config
/// (change what the shapes cannot show, such as the head or group counts of a network that
/// is not SD 1.x's or 2.x's, before loading it with
/// [`ControlNetModel::from_file`](crate::controlnet::ControlNetModel::from_file)).
#[derive(Debug)]
pub struct ControlNetFile {
    /// The weights, in diffusers' names.
    pub store: WeightStore,
    /// The config the shapes show.
    pub config: ControlNetConfig,
}

/// Opens a ControlNet single file: its keys renamed to diffusers', its config inferred.
///
/// # Errors
/// [`Error::Io`] and [`Error::SafeTensors`] for a file that cannot be read;
/// [`Error::CannotInfer`] for a file that is not a ControlNet (a Stable Diffusion checkpoint,
/// say) or whose structure does not fit one, naming what is missing; [`Error::MissingWeight`]
/// for a key the structure needs.
pub fn open_controlnet(
    path: impl AsRef<Path>,
    dtype: LoadDType,
    strict: bool,
) -> Result<ControlNetFile> {
    let path = path.as_ref();
    let file = WeightFile::open(path)?;
    let what = path.display().to_string();
    let shapes = key_shapes(&file);
    let shapes = Shapes::new(
        &what,
        shapes
            .iter()
            .map(|(k, s)| (k.as_str(), s.as_slice()))
            .collect(),
    );
    let (config, table, prefix) = plan(&shapes)?;
    let rename: HashMap<String, String> = table
        .keys
        .into_iter()
        .map(|m| (m.file_key, m.key))
        .collect();
    // A ControlNet 1.0 file may also hold the Stable Diffusion model it was trained with
    // (`model.diffusion_model.*`, `first_stage_model.*`, ...): only `control_model.*` is the
    // ControlNet, as diffusers' converter takes it. Other keys of a ControlNet's own are kept
    // (and reported unused in strict mode).
    let store = OpenOptions::new()
        .rename(move |key| match rename.get(key) {
            Some(mapped) => Some(mapped.clone()),
            None if !prefix.is_empty() && !key.starts_with(prefix) => None,
            None => Some(key.to_owned()),
        })
        .dtype(dtype)
        .strict(strict)
        .from_files(vec![file])?;
    Ok(ControlNetFile { store, config })
}

/// The config and key map of a ControlNet whose keys and shapes are `shapes`.
pub(crate) fn plan(shapes: &Shapes<'_>) -> Result<(ControlNetConfig, Table, &'static str)> {
    let what = shapes.what;
    let prefix = if shapes.has(&format!("{CONTROLNET_PREFIX}input_hint_block")) {
        CONTROLNET_PREFIX
    } else if shapes.has("input_hint_block") {
        ""
    } else {
        let kind = if shapes.has("model.diffusion_model") {
            "a Stable Diffusion checkpoint"
        } else if shapes.has("controlnet_cond_embedding") {
            "a ControlNet in diffusers' names: load the folder with its config.json instead"
        } else {
            "no ControlNet"
        };
        return Err(cannot_infer(
            what,
            format!(
                "a ControlNet: the file has no input_hint_block.* (nor control_model.input_hint_block.*) keys; it is {kind}"
            ),
        ));
    };
    let key = |path: &str| format!("{prefix}{path}");
    let unet = infer_encoder(shapes, prefix)?;

    // The hint network: convolutions at even slots 0, 2, ..., 2 (B + 1).
    let slots = shapes.indices(&key("input_hint_block"));
    let convs = slots.len();
    if convs < 2
        || !(convs - 2).is_multiple_of(2)
        || slots != (0..convs).map(|i| 2 * i).collect::<Vec<_>>()
    {
        return Err(cannot_infer(
            what,
            format!(
                "the hint network: input_hint_block has convolutions at {slots:?}, not at 0, 2, 4, ... with an even number between the first and the last"
            ),
        ));
    }
    let out = |slot: usize, purpose: &str| {
        shapes.dim(
            &key(&format!("input_hint_block.{slot}.weight")),
            4,
            0,
            purpose,
        )
    };
    let conditioning_channels = shapes.dim(
        &key("input_hint_block.0.weight"),
        4,
        1,
        "conditioning_channels",
    )?;
    let mut widths = vec![out(0, "conditioning_embedding_out_channels")?];
    // blocks.(2k + 1) widens to the next width; it sits at slot 2 (2k + 2).
    for k in 0..(convs - 2) / 2 {
        widths.push(out(4 * k + 4, "conditioning_embedding_out_channels")?);
    }

    let sd2 = unet.cross_attention_dim == SD2_CROSS_ATTENTION;
    // The mid block takes the last level's depth.
    let mut depths = unet.depths.clone();
    if let Some(last) = depths.last_mut() {
        *last = unet.mid_depth;
    }
    let channels = &unet.block_out_channels;
    // SD 2.x's 64-wide heads where the widths allow, else SD 1.x's 8 heads (the caller can
    // change what the shapes cannot show).
    let heads: Vec<usize> = match sd2_heads(channels) {
        Some(heads) if sd2 => heads,
        _ => vec![8; channels.len()],
    };
    let config = ControlNetConfig {
        in_channels: unet.in_channels,
        conditioning_channels,
        down_block_types: unet
            .down_attention
            .iter()
            .map(|&a| {
                if a {
                    DownBlockType::CrossAttnDownBlock2D
                } else {
                    DownBlockType::DownBlock2D
                }
            })
            .collect(),
        block_out_channels: channels.clone(),
        layers_per_block: PerBlock::All(unet.layers_per_block),
        cross_attention_dim: PerBlock::All(unet.cross_attention_dim),
        transformer_layers_per_block: match depths.as_slice() {
            [first, rest @ ..] if rest.iter().all(|d| d == first) => {
                PerBlock::All(PerBlock::All(*first))
            }
            _ => PerBlock::Each(depths.iter().map(|&d| PerBlock::All(d)).collect()),
        },
        attention_head_dim: PerBlock::Each(heads),
        use_linear_projection: unet.linear_projection,
        conditioning_embedding_out_channels: widths.clone(),
        ..ControlNetConfig::default()
    };
    let mut table = Table::new(prefix);
    encoder_keys(
        &mut table,
        channels,
        &unet.down_attention,
        unet.layers_per_block,
        &depths,
        false,
    );
    let d = WeightPath::new;
    let hint = d("controlnet_cond_embedding");
    let last = 2 * (convs - 1);
    table.module(&d("input_hint_block.0"), &hint.push("conv_in"), WB);
    for j in 0..convs - 2 {
        table.module(
            &d("input_hint_block").index(2 * (j + 1)),
            &hint.push("blocks").index(j),
            WB,
        );
    }
    table.module(
        &d("input_hint_block").index(last),
        &hint.push("conv_out"),
        WB,
    );
    let zero_convs = config.down_residual_count();
    let found = shapes.indices(&key("zero_convs"));
    if found.len() != zero_convs {
        return Err(Error::CannotInfer {
            file: what.to_string(),
            message: format!(
                "the zero convolutions: {} zero_convs.* for the {zero_convs} skip connections of the inferred blocks",
                found.len()
            ),
        });
    }
    for k in 0..zero_convs {
        table.module(
            &d("zero_convs").index(k).push("0"),
            &d("controlnet_down_blocks").index(k),
            WB,
        );
    }
    table.module(&d("middle_block_out.0"), &d("controlnet_mid_block"), WB);
    Ok((config, table, prefix))
}

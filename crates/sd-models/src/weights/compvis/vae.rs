//! The VAE: ldm's `AutoencoderKL` (keys `first_stage_model.*`) as diffusers'
//! `AutoencoderKL`, following `convert_ldm_vae_checkpoint`, `conv_attn_to_linear` and
//! `create_vae_diffusers_config_from_ldm`.
//!
//! The encoder's `down.{i}.block.{j}` and `down.{i}.downsample.conv` are diffusers'
//! `down_blocks.{i}.resnets.{j}` and `down_blocks.{i}.downsamplers.0.conv`; the decoder's
//! `up.{i}` is numbered from the highest resolution, diffusers' `up_blocks` from the lowest,
//! so `up.{i}` is `up_blocks.{n - 1 - i}`. `mid.block_1`, `mid.block_2` and `mid.attn_1` are
//! `mid_block.resnets.{0,1}` and `mid_block.attentions.0`, whose `norm`, `q`, `k`, `v` and
//! `proj_out` are `group_norm`, `to_q`, `to_k`, `to_v` and `to_out.0`: ldm's are 1x1
//! convolutions (`[C, C, 1, 1]` kernels), diffusers' linear layers (`[C, C]`), read through
//! the store's reshape hook. `nin_shortcut` is `conv_shortcut`, `norm_out` is
//! `conv_norm_out`; `conv_in`, `conv_out`, `quant_conv` and `post_quant_conv` keep their
//! names.

use serde_json::{Map, Value, json};

use crate::error::Result;
use crate::weights::WeightPath;
use crate::weights::compvis::cannot_infer;
use crate::weights::compvis::table::{ConfigReader, Shapes, Table, View, WB};

/// The prefix of the VAE's keys.
pub(crate) const PREFIX: &str = "first_stage_model.";

/// What the weights show about the VAE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VaeShape {
    pub(crate) in_channels: usize,
    pub(crate) out_channels: usize,
    pub(crate) latent_channels: usize,
    pub(crate) block_out_channels: Vec<usize>,
    pub(crate) layers_per_block: usize,
}

fn key(path: &str) -> String {
    format!("{PREFIX}{path}")
}

/// Reads the VAE's structure from the shapes of its keys.
///
/// # Errors
/// [`MissingWeight`](crate::Error::MissingWeight) naming a key the structure needs;
/// [`CannotInfer`](crate::Error::CannotInfer) if the encoder has no levels.
pub(crate) fn infer(shapes: &Shapes<'_>) -> Result<VaeShape> {
    let levels = shapes.indices(&key("encoder.down"));
    if levels.is_empty() || levels != (0..levels.len()).collect::<Vec<_>>() {
        return Err(cannot_infer(
            shapes.what,
            format!("the VAE's levels: encoder.down.N are {levels:?}"),
        ));
    }
    let layers = shapes.indices(&key("encoder.down.0.block")).len();
    let block_out_channels = levels
        .iter()
        .map(|i| {
            shapes.dim(
                &key(&format!("encoder.down.{i}.block.0.conv1.weight")),
                4,
                0,
                "the VAE's block_out_channels",
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(VaeShape {
        in_channels: shapes.dim(
            &key("encoder.conv_in.weight"),
            4,
            1,
            "the VAE's in_channels",
        )?,
        out_channels: shapes.dim(
            &key("decoder.conv_out.weight"),
            4,
            0,
            "the VAE's out_channels",
        )?,
        latent_channels: shapes.dim(
            &key("decoder.conv_in.weight"),
            4,
            1,
            "the VAE's latent_channels",
        )?,
        block_out_channels,
        layers_per_block: layers,
    })
}

/// Writes what the weights show into the preset `config`, and the fields whose preset value
/// the weights contradict into `unresolved`.
pub(crate) fn apply(
    shape: &VaeShape,
    config: &mut Map<String, Value>,
    unresolved: &mut Vec<(&'static str, String)>,
) {
    let n = shape.block_out_channels.len();
    config.insert("in_channels".into(), json!(shape.in_channels));
    config.insert("out_channels".into(), json!(shape.out_channels));
    config.insert("latent_channels".into(), json!(shape.latent_channels));
    config.insert("block_out_channels".into(), json!(shape.block_out_channels));
    config.insert("layers_per_block".into(), json!(shape.layers_per_block));
    config.insert(
        "down_block_types".into(),
        json!(vec!["DownEncoderBlock2D"; n]),
    );
    config.insert("up_block_types".into(), json!(vec!["UpDecoderBlock2D"; n]));
    let groups = config
        .get("norm_num_groups")
        .and_then(Value::as_u64)
        .unwrap_or(32);
    let channels = &shape.block_out_channels;
    if !channels
        .iter()
        .all(|&c| u64::try_from(c).is_ok_and(|c| c.is_multiple_of(groups.max(1))))
    {
        unresolved.push((
            "norm_num_groups",
            format!(
                "block_out_channels {channels:?} do not split into the preset's {groups} groups"
            ),
        ));
    }
}

fn resnet(table: &mut Table, file: &WeightPath, to: &WeightPath, shortcut: bool) {
    for name in ["norm1", "conv1", "norm2", "conv2"] {
        table.module(&file.push(name), &to.push(name), WB);
    }
    if shortcut {
        table.module(&file.push("nin_shortcut"), &to.push("conv_shortcut"), WB);
    }
}

fn mid(table: &mut Table, side: &str) {
    let file = WeightPath::new(side).push("mid");
    let to = WeightPath::new(side).push("mid_block");
    resnet(table, &file.push("block_1"), &to.push("resnets.0"), false);
    let attn = file.push("attn_1");
    let attentions = to.push("attentions.0");
    table.module(&attn.push("norm"), &attentions.push("group_norm"), WB);
    for (ldm, diffusers) in [
        ("q", "to_q"),
        ("k", "to_k"),
        ("v", "to_v"),
        ("proj_out", "to_out.0"),
    ] {
        table.module_as(
            &attn.push(ldm),
            &attentions.push(diffusers),
            WB,
            View::Linear,
        );
    }
    resnet(table, &file.push("block_2"), &to.push("resnets.1"), false);
}

/// The key map of a VAE of the (final) `config`.
///
/// # Errors
/// [`Config`](crate::Error::Config) for a config that is not an SD VAE's.
pub(crate) fn keys(config: &ConfigReader<'_>) -> Result<Table> {
    let channels = config.usizes("block_out_channels")?;
    let layers = config.usize("layers_per_block")?;
    for (key, block) in [
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ] {
        let types = config.strings(key)?;
        if types.len() != channels.len() || types.iter().any(|&t| t != block) {
            return Err(config.unsupported(
                key,
                &format!("only {block}, one per block_out_channels, is mapped"),
            ));
        }
    }
    let Some(&first) = channels.first() else {
        return Err(config.unsupported("block_out_channels", "is empty"));
    };
    let n = channels.len();
    let d = WeightPath::new;
    let mut table = Table::new(PREFIX);
    for side in ["encoder", "decoder"] {
        table.module(&d(side).push("conv_in"), &d(side).push("conv_in"), WB);
    }
    let mut out = first;
    for (i, &ch) in channels.iter().enumerate() {
        let file = d("encoder.down").index(i);
        let to = d("encoder.down_blocks").index(i);
        let block_in = out;
        out = ch;
        for j in 0..layers {
            let resnet_in = if j == 0 { block_in } else { ch };
            resnet(
                &mut table,
                &file.push("block").index(j),
                &to.push("resnets").index(j),
                resnet_in != ch,
            );
        }
        if i + 1 < n {
            table.module(
                &file.push("downsample.conv"),
                &to.push("downsamplers.0.conv"),
                WB,
            );
        }
    }
    mid(&mut table, "encoder");
    mid(&mut table, "decoder");
    let mut out = channels.last().copied().unwrap_or(first);
    for (u, &ch) in channels.iter().rev().enumerate() {
        let file = d("decoder.up").index(n - 1 - u);
        let to = d("decoder.up_blocks").index(u);
        let block_in = out;
        out = ch;
        for j in 0..=layers {
            let resnet_in = if j == 0 { block_in } else { ch };
            resnet(
                &mut table,
                &file.push("block").index(j),
                &to.push("resnets").index(j),
                resnet_in != ch,
            );
        }
        if u + 1 < n {
            table.module(
                &file.push("upsample.conv"),
                &to.push("upsamplers.0.conv"),
                WB,
            );
        }
    }
    for side in ["encoder", "decoder"] {
        table.module(
            &d(side).push("norm_out"),
            &d(side).push("conv_norm_out"),
            WB,
        );
        table.module(&d(side).push("conv_out"), &d(side).push("conv_out"), WB);
    }
    table.module(&d("quant_conv"), &d("quant_conv"), WB);
    table.module(&d("post_quant_conv"), &d("post_quant_conv"), WB);
    Ok(table)
}

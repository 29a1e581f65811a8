//! The UNet: ldm's `openaimodel.UNetModel` (keys `model.diffusion_model.*`) as diffusers'
//! `UNet2DConditionModel`, following `convert_ldm_unet_checkpoint` and
//! `create_unet_diffusers_config_from_ldm`.
//!
//! ldm numbers its blocks flat: `input_blocks.0` is `conv_in`; then, for each level `l` of
//! `n` and each of its `L = layers_per_block` layers `j`, `input_blocks.{1 + l (L+1) + j}`
//! holds a ResBlock (`.0`) and, in attention levels, a SpatialTransformer (`.1`); the last
//! slot of a level, `input_blocks.{(l+1)(L+1)}.0.op`, is its downsampler (all levels but the
//! last). `middle_block.{0,1,2}` are ResBlock, SpatialTransformer, ResBlock. The up path has
//! `L + 1` layers per level: `output_blocks.{u (L+1) + j}` holds a ResBlock (`.0`), a
//! SpatialTransformer (`.1`) in attention levels, and after the level's last layer its
//! upsampler (`.1.conv`, or `.2.conv` after a transformer). Inside a ResBlock, `in_layers.0`,
//! `in_layers.2`, `emb_layers.1`, `out_layers.0`, `out_layers.3` and `skip_connection` are
//! diffusers' `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2` and `conv_shortcut`; a
//! SpatialTransformer already has diffusers' names (`norm`, `proj_in`,
//! `transformer_blocks.N.{attn1,attn2,ff,norm1,norm2,norm3}`, `proj_out`).

use serde_json::{Map, Value, json};

use crate::error::Result;
use crate::weights::WeightPath;
use crate::weights::compvis::cannot_infer;
use crate::weights::compvis::table::{ConfigReader, Shapes, Table, WB, set};

/// The prefix of the UNet's keys.
pub(crate) const PREFIX: &str = "model.diffusion_model.";

/// The width of SD 2.x's attention heads (`num_head_channels: 64` in ldm's v2 configs;
/// diffusers' `attention_head_dim: [5, 10, 20, 20]` counts heads, `channels / 64`).
const SD2_HEAD_WIDTH: usize = 64;

/// What the weights show about the UNet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UnetShape {
    pub(crate) in_channels: usize,
    pub(crate) out_channels: usize,
    pub(crate) block_out_channels: Vec<usize>,
    pub(crate) layers_per_block: usize,
    pub(crate) down_attention: Vec<bool>,
    pub(crate) up_attention: Vec<bool>,
    pub(crate) cross_attention_dim: usize,
    pub(crate) linear_projection: bool,
    /// Transformer blocks per attention layer, per level (1 for levels without attention).
    pub(crate) depths: Vec<usize>,
    /// Transformer blocks of the mid block's attention layer.
    pub(crate) mid_depth: usize,
    /// SDXL's added embedding (`label_emb.0.0`): its input width.
    pub(crate) added_input: Option<usize>,
}

fn key(path: &WeightPath) -> String {
    format!("{PREFIX}{path}")
}

fn key_at(prefix: &str, path: &WeightPath) -> String {
    format!("{prefix}{path}")
}

fn input(i: usize) -> WeightPath {
    WeightPath::new("input_blocks").index(i)
}

fn output(i: usize) -> WeightPath {
    WeightPath::new("output_blocks").index(i)
}

/// Reads the UNet's structure from the shapes of its keys.
///
/// # Errors
/// [`MissingWeight`](crate::Error::MissingWeight) naming a key the structure needs;
/// [`CannotInfer`](crate::Error::CannotInfer) for a block layout that is not a UNet's.
pub(crate) fn infer(shapes: &Shapes<'_>) -> Result<UnetShape> {
    let mut shape = infer_encoder(shapes, PREFIX)?;
    let levels = shape.block_out_channels.len();
    let per = shape.layers_per_block + 1;
    shape.out_channels =
        shapes.dim(&key(&WeightPath::new("out.2.weight")), 4, 0, "out_channels")?;
    shape.up_attention = (0..levels)
        .map(|u| shapes.has(&key(&output(u * per).push("1"))))
        .collect();
    Ok(shape)
}

/// Reads the structure of the encoder half (`time_embed`, `input_blocks`, `middle_block`)
/// under `prefix`, as the UNet and a ControlNet share it; the output channels are the input
/// channels and the up blocks mirror the down blocks.
///
/// # Errors
/// As [`infer`].
pub(crate) fn infer_encoder(shapes: &Shapes<'_>, prefix: &str) -> Result<UnetShape> {
    let key = |path: &WeightPath| key_at(prefix, path);
    let inputs = shapes.indices(&key(&WeightPath::new("input_blocks")));
    let count = inputs.last().map_or(0, |&i| i + 1);
    let downsamplers: Vec<usize> = inputs
        .iter()
        .copied()
        .filter(|&i| shapes.has(&key(&input(i).push("0.op"))))
        .collect();
    let levels = downsamplers.len() + 1;
    let layout = || {
        format!(
            "the UNet's block layout: input_blocks 0..{count} with downsamplers at {downsamplers:?} fit no number of layers per block"
        )
    };
    if count < 2 || !count.is_multiple_of(levels) {
        return Err(cannot_infer(shapes.what, layout()));
    }
    let per = count / levels;
    let expected: Vec<usize> = (1..levels).map(|l| l * per).collect();
    if per < 2 || downsamplers != expected || inputs != (0..count).collect::<Vec<_>>() {
        return Err(cannot_infer(shapes.what, layout()));
    }
    let first = |level: usize| input(1 + level * per);
    let block_out_channels = (0..levels)
        .map(|l| {
            shapes.dim(
                &key(&first(l).push("0.in_layers.2.weight")),
                4,
                0,
                "block_out_channels",
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let conv_in = key(&input(0).push("0.weight"));
    let in_channels = shapes.dim(&conv_in, 4, 1, "in_channels")?;
    let down_attention: Vec<bool> = (0..levels)
        .map(|l| shapes.has(&key(&first(l).push("1"))))
        .collect();
    let up_attention: Vec<bool> = down_attention.iter().rev().copied().collect();
    // The first transformer: of the first attention level, else of the middle block.
    let transformer = down_attention
        .iter()
        .position(|&a| a)
        .map(|l| first(l).push("1"))
        .or_else(|| {
            let mid = WeightPath::new("middle_block.1");
            shapes.has(&key(&mid)).then_some(mid)
        })
        .ok_or_else(|| {
            cannot_infer(
                shapes.what,
                "the UNet's cross-attention width: it has no transformer (no input_blocks.N.1.* or middle_block.1.*)".to_owned(),
            )
        })?;
    let cross_attention_dim = shapes.dim(
        &key(&transformer.push("transformer_blocks.0.attn2.to_k.weight")),
        2,
        1,
        "cross_attention_dim",
    )?;
    let proj_in = key(&transformer.push("proj_in.weight"));
    let linear_projection = shapes.need(&proj_in, "use_linear_projection")?.len() == 2;
    let depth_of = |t: &WeightPath| shapes.indices(&key(&t.push("transformer_blocks"))).len();
    let depths: Vec<usize> = down_attention
        .iter()
        .enumerate()
        .map(|(l, &a)| if a { depth_of(&first(l).push("1")) } else { 1 })
        .collect();
    let mid = WeightPath::new("middle_block.1");
    let mid_depth = if shapes.has(&key(&mid)) {
        depth_of(&mid)
    } else {
        depths.last().copied().unwrap_or(1)
    };
    let added = key(&WeightPath::new("label_emb.0.0.weight"));
    let added_input = match shapes.get(&added) {
        Some(_) => Some(shapes.dim(&added, 2, 1, "projection_class_embeddings_input_dim")?),
        None => None,
    };
    Ok(UnetShape {
        in_channels,
        out_channels: in_channels,
        block_out_channels,
        layers_per_block: per - 1,
        down_attention,
        up_attention,
        cross_attention_dim,
        linear_projection,
        depths,
        mid_depth,
        added_input,
    })
}

/// Writes what the weights show into the preset `config`, and the fields whose preset value
/// the weights contradict (with why) into `unresolved`.
pub(crate) fn apply(
    shape: &UnetShape,
    sd2: bool,
    config: &mut Map<String, Value>,
    unresolved: &mut Vec<(&'static str, String)>,
) {
    let down: Vec<&str> = shape
        .down_attention
        .iter()
        .map(|&a| {
            if a {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up: Vec<&str> = shape
        .up_attention
        .iter()
        .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
        .collect();
    config.insert("in_channels".into(), json!(shape.in_channels));
    config.insert("out_channels".into(), json!(shape.out_channels));
    config.insert("block_out_channels".into(), json!(shape.block_out_channels));
    config.insert("layers_per_block".into(), json!(shape.layers_per_block));
    config.insert("down_block_types".into(), json!(down));
    config.insert("up_block_types".into(), json!(up));
    config.insert(
        "cross_attention_dim".into(),
        json!(shape.cross_attention_dim),
    );
    set(
        config,
        "use_linear_projection",
        json!(shape.linear_projection),
        &json!(false),
    );
    // One depth for all, or one per level (diffusers' mid block takes the last level's).
    let attention_depths: Vec<usize> = shape
        .depths
        .iter()
        .zip(&shape.down_attention)
        .filter(|(_, a)| **a)
        .map(|(d, _)| *d)
        .collect();
    if attention_depths.iter().all(|&d| d == shape.mid_depth) {
        set(
            config,
            "transformer_layers_per_block",
            json!(shape.mid_depth),
            &json!(1),
        );
    } else {
        let mut depths = shape.depths.clone();
        let last_attention = shape.down_attention.last().copied().unwrap_or(false);
        match depths.last_mut() {
            Some(last) if !last_attention => *last = shape.mid_depth,
            Some(last) if *last != shape.mid_depth => unresolved.push((
                "transformer_layers_per_block",
                format!(
                    "the mid block's {} transformer blocks differ from the last level's {last}, which diffusers' config cannot say",
                    shape.mid_depth
                ),
            )),
            _ => {}
        }
        config.insert("transformer_layers_per_block".into(), json!(depths));
    }
    match shape.added_input {
        Some(input) => {
            config.insert("addition_embed_type".into(), json!("text_time"));
            config.insert("projection_class_embeddings_input_dim".into(), json!(input));
            if config
                .get("addition_time_embed_dim")
                .and_then(Value::as_u64)
                .is_none()
            {
                unresolved.push((
                    "addition_time_embed_dim",
                    "the UNet has SDXL's added embedding (label_emb) but the preset no id embedding width".to_owned(),
                ));
            }
        }
        None => {
            if config
                .get("addition_embed_type")
                .is_some_and(|v| !v.is_null())
            {
                config.insert("addition_embed_type".into(), Value::Null);
            }
        }
    }
    let channels = &shape.block_out_channels;
    if sd2 {
        // SD 2.x: 64-wide heads, so `attention_head_dim` (a head count) is channels / 64.
        if let Some(heads) = sd2_heads(channels) {
            config.insert("attention_head_dim".into(), json!(heads));
        } else {
            unresolved.push((
                "attention_head_dim",
                format!(
                    "block_out_channels {channels:?} are not multiples of SD 2.x's {SD2_HEAD_WIDTH}-wide attention heads"
                ),
            ));
        }
    } else {
        // SD 1.x: 8 heads at every level (`num_heads: 8` in ldm's v1 config).
        let heads = config
            .get("attention_head_dim")
            .and_then(Value::as_u64)
            .unwrap_or(8);
        if !channels
            .iter()
            .all(|&c| u64::try_from(c).is_ok_and(|c| c.is_multiple_of(heads.max(1))))
        {
            unresolved.push((
                "attention_head_dim",
                format!("block_out_channels {channels:?} do not split into SD 1.x's {heads} heads"),
            ));
        }
    }
    let groups = config
        .get("norm_num_groups")
        .and_then(Value::as_u64)
        .unwrap_or(32);
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

/// SD 2.x's head counts for blocks of `channels` (64-wide heads), if every width splits into
/// them.
pub(crate) fn sd2_heads(channels: &[usize]) -> Option<Vec<usize>> {
    channels
        .iter()
        .map(|&c| (c > 0 && c.is_multiple_of(SD2_HEAD_WIDTH)).then_some(c / SD2_HEAD_WIDTH))
        .collect()
}

/// The ResBlock sub-modules: (ldm name, diffusers name).
const RESNET: [(&str, &str); 5] = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
];

fn resnet(table: &mut Table, file: &WeightPath, to: &WeightPath, shortcut: bool) {
    for (ldm, diffusers) in RESNET {
        table.module(&file.push(ldm), &to.push(diffusers), WB);
    }
    if shortcut {
        table.module(&file.push("skip_connection"), &to.push("conv_shortcut"), WB);
    }
}

fn transformer(table: &mut Table, file: &WeightPath, to: &WeightPath, depth: usize) {
    let same = |table: &mut Table, name: &str, params: &[&str]| {
        table.module(&file.push(name), &to.push(name), params);
    };
    same(table, "norm", WB);
    same(table, "proj_in", WB);
    for t in 0..depth {
        let block = WeightPath::new("transformer_blocks").index(t);
        for attn in ["attn1", "attn2"] {
            for proj in ["to_q", "to_k", "to_v"] {
                same(table, block.push(attn).push(proj).as_str(), &["weight"]);
            }
            same(table, block.push(attn).push("to_out.0").as_str(), WB);
        }
        for name in ["norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"] {
            same(table, block.push(name).as_str(), WB);
        }
    }
    same(table, "proj_out", WB);
}

/// The key map of a UNet of the (final) `config`.
///
/// # Errors
/// [`Config`](crate::Error::Config) for a config that is not an SD 1.x/2.x UNet's (an
/// unknown block type, a per-block transformer depth, a missing field).
pub(crate) fn keys(config: &ConfigReader<'_>) -> Result<Table> {
    let channels = config.usizes("block_out_channels")?;
    let layers = config.usize("layers_per_block")?;
    let depths = match config.map.get("transformer_layers_per_block") {
        Some(Value::Array(v)) => {
            let depths: Option<Vec<usize>> = v
                .iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect();
            match depths {
                Some(d) if d.len() == channels.len() => d,
                _ => {
                    return Err(config.unsupported(
                        "transformer_layers_per_block",
                        "needs one number per block_out_channels (per-layer lists are not mapped)",
                    ));
                }
            }
        }
        _ => vec![config.usize_or("transformer_layers_per_block", 1)?; channels.len()],
    };
    let added = config
        .map
        .get("addition_embed_type")
        .and_then(Value::as_str)
        == Some("text_time");
    if let Some(mid) = config.map.get("mid_block_type").and_then(Value::as_str)
        && mid != "UNetMidBlock2DCrossAttn"
    {
        return Err(config.unsupported("mid_block_type", "only UNetMidBlock2DCrossAttn is mapped"));
    }
    let attention = |key: &str, with: &str, without: &str| -> Result<Vec<bool>> {
        let types = config.strings(key)?;
        if types.len() != channels.len() {
            return Err(config.unsupported(key, "needs one entry per block_out_channels"));
        }
        types
            .iter()
            .map(|&t| match t {
                _ if t == with => Ok(true),
                _ if t == without => Ok(false),
                _ => Err(config.unsupported(key, &format!("{t} is not mapped"))),
            })
            .collect()
    };
    let down = attention("down_block_types", "CrossAttnDownBlock2D", "DownBlock2D")?;
    let up = attention("up_block_types", "CrossAttnUpBlock2D", "UpBlock2D")?;
    if channels.is_empty() {
        return Err(config.unsupported("block_out_channels", "is empty"));
    }
    let levels = channels.len();
    let per = layers + 1;
    let mut table = Table::new(PREFIX);
    encoder_keys(&mut table, &channels, &down, layers, &depths, added);
    let d = WeightPath::new;
    for (u, &attn) in up.iter().enumerate() {
        let to = d("up_blocks").index(u);
        for j in 0..per {
            let file = output(u * per + j);
            // Every up ResBlock also takes a skip connection: its input is wider than its
            // output, so it always has a shortcut.
            resnet(
                &mut table,
                &file.index(0),
                &to.push("resnets").index(j),
                true,
            );
            if attn {
                transformer(
                    &mut table,
                    &file.index(1),
                    &to.push("attentions").index(j),
                    depths[levels - 1 - u],
                );
            }
        }
        if u + 1 < levels {
            let slot = if attn { 2 } else { 1 };
            table.module(
                &output(u * per + layers).index(slot).push("conv"),
                &to.push("upsamplers.0.conv"),
                WB,
            );
        }
    }
    table.module(&d("out.0"), &d("conv_norm_out"), WB);
    table.module(&d("out.2"), &d("conv_out"), WB);
    Ok(table)
}

/// The key map of the encoder half (`time_embed`, `input_blocks`, `middle_block`, SDXL's
/// `label_emb` when `added`) of a network with `channels` per level, `down` attention levels,
/// `layers` resnets per level and transformers `depths[level]` deep (the mid block's: the
/// last level's): the UNet's and a ControlNet's.
pub(crate) fn encoder_keys(
    table: &mut Table,
    channels: &[usize],
    down: &[bool],
    layers: usize,
    depths: &[usize],
    added: bool,
) {
    let depth = |level: usize| depths.get(level).copied().unwrap_or(1);
    let (levels, per) = (channels.len(), layers + 1);
    let first = channels.first().copied().unwrap_or(0);
    let d = WeightPath::new;
    table.module(&d("time_embed.0"), &d("time_embedding.linear_1"), WB);
    table.module(&d("time_embed.2"), &d("time_embedding.linear_2"), WB);
    if added {
        table.module(&d("label_emb.0.0"), &d("add_embedding.linear_1"), WB);
        table.module(&d("label_emb.0.2"), &d("add_embedding.linear_2"), WB);
    }
    table.module(&input(0).index(0), &d("conv_in"), WB);
    let mut out = first;
    for (level, (&ch, &attn)) in channels.iter().zip(down).enumerate() {
        let (block_in, to) = (out, d("down_blocks").index(level));
        out = ch;
        for j in 0..layers {
            let file = input(1 + level * per + j);
            let resnet_in = if j == 0 { block_in } else { ch };
            resnet(
                table,
                &file.index(0),
                &to.push("resnets").index(j),
                resnet_in != ch,
            );
            if attn {
                transformer(
                    table,
                    &file.index(1),
                    &to.push("attentions").index(j),
                    depth(level),
                );
            }
        }
        if level + 1 < levels {
            table.module(
                &input(1 + level * per + layers).push("0.op"),
                &to.push("downsamplers.0.conv"),
                WB,
            );
        }
    }
    let mid = d("mid_block");
    resnet(table, &d("middle_block.0"), &mid.push("resnets.0"), false);
    transformer(
        table,
        &d("middle_block.1"),
        &mid.push("attentions.0"),
        depth(levels - 1),
    );
    resnet(table, &d("middle_block.2"), &mid.push("resnets.1"), false);
}

/// The original (ldm / sgm) module path of each module of a UNet of `config` (a diffusers
/// `config.json`), by its diffusers path: `down_blocks.1.attentions.0.proj_in` ->
/// `input_blocks.4.1.proj_in`. What kohya's SDXL LoRAs name modules by.
///
/// # Errors
/// As [`keys`]: a config that is not a Stable Diffusion UNet's.
pub(crate) fn original_module_names(
    config: &ConfigReader<'_>,
) -> Result<std::collections::HashMap<String, String>> {
    let table = keys(config)?;
    Ok(table
        .keys
        .iter()
        .filter_map(|k| {
            let module = k.key.strip_suffix(".weight")?;
            let original = k.file_key.strip_prefix(PREFIX)?.strip_suffix(".weight")?;
            Some((module.to_owned(), original.to_owned()))
        })
        .collect())
}

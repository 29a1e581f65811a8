//! LoRA (Hu et al., 2021): low-rank weight updates `W += m * (alpha / rank) * up @ down`,
//! read from the files people share and merged into the UNet and the text encoder as their
//! weights are loaded.
//!
//! | layout | keys | alpha |
//! |---|---|---|
//! | kohya / AUTOMATIC1111 | `lora_unet_<module path, dots as underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`; `lora_te_...` for the text encoder | the `.alpha` tensor, else the rank |
//! | diffusers / PEFT | `unet.<module path>.lora_A.weight` (down), `.lora_B.weight` (up); `text_encoder.` | `lora_alpha` (or the `alpha_pattern` regular expressions, matched as PEFT does) of the `lora_adapter_metadata` diffusers writes, else the rank |
//! | diffusers before PEFT | `unet.<path>.processor.to_q_lora.down.weight` (`to_out_lora` for `to_out.0`), `unet.<path>.lora.down.weight`, `text_encoder.<path>.lora_linear_layer.down.weight` (and `.up.`); attention-processor files without the `unet.` prefix | as for PEFT |
//!
//! Linear layers take `down [r, in]`, `up [out, r]`; convolutions `down [r, in, kh, kw]`,
//! `up [out, r, 1, 1]` (LoCon), the update `up @ down` reshaped to the kernel. A kohya path
//! is matched against the network's own module names (`down_blocks.0.attentions.0.
//! transformer_blocks.0.attn1.to_q` is `down_blocks_0_attentions_0_transformer_blocks_0_
//! attn1_to_q`), never by replacing every `_`, which names such as `transformer_blocks` and
//! `to_q` would break. Updates are computed in `f32` and stored back in the weight's type.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::weights::{HostData, HostTensor, LoadDType, WeightFile};

/// Which network a LoRA module patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    /// The UNet.
    Unet,
    /// The (first) text encoder.
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

/// One low-rank update, as the file names it.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// The network it patches.
    pub target: LoraTarget,
    /// The module as the file names it: a kohya path (`down_blocks_0_..._to_q`) or a
    /// diffusers path (`down_blocks.0....to_q`).
    pub name: String,
    /// Whether `name` is a kohya path (dots replaced by underscores).
    pub kohya: bool,
    /// `[r, in]` or `[r, in, kh, kw]`, in f32.
    pub down: Arc<HostTensor>,
    /// `[out, r]` or `[out, r, 1, 1]`, in f32.
    pub up: Arc<HostTensor>,
    /// `alpha`, if the file gives one (else the rank: scale 1).
    pub alpha: Option<f64>,
    /// Rank-stabilised LoRA (PEFT's `use_rslora`): the scale is `alpha / sqrt(rank)`.
    pub rslora: bool,
}

impl LoraModule {
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.down.shape().first().copied().unwrap_or(0)
    }

    /// `alpha / rank` (`alpha / sqrt(rank)` for rank-stabilised LoRA).
    pub fn scale(&self) -> f64 {
        let r = self.rank().max(1) as f64;
        let alpha = self.alpha.unwrap_or(r);
        if self.rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

/// A LoRA file.
#[derive(Debug, Clone)]
pub struct Lora {
    /// The file.
    pub path: PathBuf,
    /// Its updates.
    pub modules: Vec<LoraModule>,
    /// Keys of the file that are no LoRA update (reported after applying).
    pub unknown: Vec<String>,
    /// The strength it is applied with (AUTOMATIC1111's `<lora:name:multiplier>`).
    pub multiplier: f64,
}

fn invalid(path: &Path, message: String) -> Error {
    Error::Config {
        what: format!("{} (LoRA)", path.display()),
        message,
    }
}

/// `prefix.<module>.<suffix>` split into the target, the module (as the network names it;
/// a kohya path for kohya keys), whether it is a kohya key, and the part.
fn split_key(key: &str) -> Option<(LoraTarget, String, bool, &'static str)> {
    const KOHYA: [(&str, LoraTarget); 4] = [
        ("lora_unet_", LoraTarget::Unet),
        ("lora_te_", LoraTarget::TextEncoder),
        // SDXL's two text encoders.
        ("lora_te1_", LoraTarget::TextEncoder),
        ("lora_te2_", LoraTarget::TextEncoder2),
    ];
    for (prefix, target) in KOHYA {
        if let Some(rest) = key.strip_prefix(prefix) {
            for (suffix, part) in [
                (".lora_down.weight", "down"),
                (".lora_up.weight", "up"),
                (".alpha", "alpha"),
            ] {
                if let Some(module) = rest.strip_suffix(suffix) {
                    return Some((target, module.to_owned(), true, part));
                }
            }
        }
    }
    // diffusers: PEFT's `lora_A`/`lora_B`, and the names diffusers wrote before PEFT
    // (attention processors' `to_q_lora.down`, `lora.down` of other layers,
    // `lora_linear_layer.down` in the text encoder), which its loader still reads. Files of
    // UNet attention processors alone name no network.
    let (target, rest) = if let Some(rest) = key.strip_prefix("unet.") {
        (LoraTarget::Unet, rest)
    } else if let Some(rest) = key.strip_prefix("text_encoder_2.") {
        (LoraTarget::TextEncoder2, rest)
    } else if let Some(rest) = key.strip_prefix("text_encoder.") {
        (LoraTarget::TextEncoder, rest)
    } else if ["down_blocks.", "mid_block.", "up_blocks."]
        .iter()
        .any(|p| key.starts_with(p))
        && key.contains(".processor.")
    {
        (LoraTarget::Unet, key)
    } else {
        return None;
    };
    for (suffix, part) in [
        (".lora_A.weight", "down"),
        (".lora_B.weight", "up"),
        (".lora.down.weight", "down"),
        (".lora.up.weight", "up"),
        (".lora_linear_layer.down.weight", "down"),
        (".lora_linear_layer.up.weight", "up"),
        ("_lora.down.weight", "down"),
        ("_lora.up.weight", "up"),
        (".alpha", "alpha"),
    ] {
        let Some(module) = rest.strip_suffix(suffix) else {
            continue;
        };
        let module = module.replace(".processor.", ".");
        if !suffix.starts_with("_lora") {
            return Some((target, module, false, part));
        }
        // `to_q_lora` and its kin: the projections of an attention processor.
        let (parent, projection) = module.rsplit_once('.')?;
        let projection = match (target, projection) {
            (LoraTarget::Unet, "to_q" | "to_k" | "to_v") => projection,
            (LoraTarget::Unet, "to_out") => "to_out.0",
            (_, "to_q") => "q_proj",
            (_, "to_k") => "k_proj",
            (_, "to_v") => "v_proj",
            (_, "to_out") => "out_proj",
            _ => return None,
        };
        return Some((target, format!("{parent}.{projection}"), false, part));
    }
    None
}

/// The alpha of `module` in PEFT's `alpha_pattern`: that of the first pattern `k` for which
/// `(.*\.)?(k)$` matches the whole module name, as PEFT looks it up.
fn pattern_alpha(
    pattern: &serde_json::Map<String, serde_json::Value>,
    module: &str,
) -> Option<f64> {
    pattern
        .iter()
        .find(|(k, _)| {
            regex::Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).is_ok_and(|re| re.is_match(module))
        })
        .and_then(|(_, v)| v.as_f64())
}

impl Lora {
    /// Reads a LoRA `.safetensors` file of either layout (told from its keys, never from its
    /// name), at multiplier 1.
    ///
    /// # Errors
    /// [`Error::Config`] naming the file for a pickle (`.pt`, `.bin`, `.ckpt`), a file with
    /// no LoRA update, a module with only one of its two matrices, an up and down of
    /// different ranks, or an alpha that is not a finite number; [`Error::Io`] and
    /// [`Error::SafeTensors`] for a file that cannot be read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if let Some(message) = crate::files::pickle_message(path) {
            return Err(invalid(path, message));
        }
        let file = WeightFile::open(path)?;
        type Parts = (Option<HostTensor>, Option<HostTensor>, Option<f64>);
        let mut found: BTreeMap<(LoraTarget, String, bool), Parts> = BTreeMap::new();
        let mut unknown = Vec::new();
        let mut keys: Vec<&str> = file.keys().collect();
        keys.sort_unstable();
        for key in keys {
            let Some((target, module, kohya, part)) = split_key(key) else {
                unknown.push(key.to_owned());
                continue;
            };
            let shape = file.info(key).map(|i| i.shape.to_vec()).unwrap_or_default();
            let tensor = file.load(key, &shape, LoadDType::F32)?;
            let entry = found
                .entry((target, module, kohya))
                .or_insert((None, None, None));
            match part {
                "down" => entry.0 = Some(tensor),
                "up" => entry.1 = Some(tensor),
                _ => {
                    let alpha = tensor
                        .as_f32()
                        .and_then(|v| (v.len() == 1).then(|| f64::from(v[0])))
                        .filter(|a| a.is_finite())
                        .ok_or_else(|| invalid(path, format!("{key} is not one finite number")))?;
                    entry.2 = Some(alpha);
                }
            }
        }
        // PEFT files keep alpha in their metadata: `lora_adapter_metadata`, a JSON object with
        // `<network>.lora_alpha`, `<network>.alpha_pattern` (module name -> alpha) and
        // `<network>.use_rslora`.
        let meta: Option<serde_json::Value> = file
            .metadata()
            .and_then(|m| m.get("lora_adapter_metadata"))
            .and_then(|m| serde_json::from_str(m).ok());
        let network = |target: LoraTarget| match target {
            LoraTarget::Unet => "unet",
            LoraTarget::TextEncoder => "text_encoder",
            LoraTarget::TextEncoder2 => "text_encoder_2",
        };
        let rslora = |target: LoraTarget| {
            meta.as_ref()
                .and_then(|m| m.get(format!("{}.use_rslora", network(target))))
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false)
        };
        let peft_alpha = |target: LoraTarget, name: &str| -> Option<f64> {
            let meta = meta.as_ref()?;
            let network = network(target);
            let pattern = meta.get(format!("{network}.alpha_pattern"))?.as_object();
            pattern
                .and_then(|p| pattern_alpha(p, name))
                .or_else(|| meta.get(format!("{network}.lora_alpha"))?.as_f64())
                .filter(|a| a.is_finite())
        };
        let mut modules = Vec::with_capacity(found.len());
        for ((target, name, kohya), (down, up, alpha)) in found {
            let alpha = alpha.or_else(|| {
                if kohya {
                    None
                } else {
                    peft_alpha(target, &name)
                }
            });
            let (Some(down), Some(up)) = (down, up) else {
                return Err(invalid(
                    path,
                    format!("module {name} lacks its down or its up matrix"),
                ));
            };
            let rank = down.shape().first().copied().unwrap_or(0);
            let up_rank = up.shape().get(1).copied().unwrap_or(0);
            if rank == 0 || rank != up_rank || down.shape().len() < 2 {
                return Err(invalid(
                    path,
                    format!(
                        "module {name}: down {:?} and up {:?} are not of one rank",
                        down.shape(),
                        up.shape()
                    ),
                ));
            }
            let finite =
                |t: &HostTensor| t.as_f32().is_some_and(|v| v.iter().all(|x| x.is_finite()));
            if !finite(&down) || !finite(&up) {
                return Err(invalid(
                    path,
                    format!("module {name} holds NaN or infinity"),
                ));
            }
            modules.push(LoraModule {
                target,
                name,
                kohya,
                down: Arc::new(down),
                up: Arc::new(up),
                alpha,
                rslora: !kohya && rslora(target),
            });
        }
        if modules.is_empty() {
            return Err(invalid(
                path,
                "no LoRA update in it (no lora_down/lora_up or lora_A/lora_B keys)".into(),
            ));
        }
        Ok(Lora {
            path: path.to_path_buf(),
            modules,
            unknown,
            multiplier: 1.0,
        })
    }

    /// The same LoRA at `multiplier`.
    #[must_use]
    pub fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }
}

/// What applying LoRAs matched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoraReport {
    /// Updates applied to a module of the networks.
    pub matched: usize,
    /// Updates (or keys) that matched nothing, as `file: key`: the first thing to look at when
    /// a LoRA seems to do nothing.
    pub unmatched: Vec<String>,
}

/// One update of a module: `scale * up @ down`.
#[derive(Debug)]
struct Update {
    scale: f32,
    down: Arc<HostTensor>,
    up: Arc<HostTensor>,
    key: String,
    used: std::sync::atomic::AtomicBool,
}

/// The updates of some LoRAs for one network, by the module path they name (diffusers
/// paths as they are, kohya paths with dots as underscores), matched as the network's
/// weights are loaded: [`patch`](Self::patch) adds them to the weight of the module it is
/// given, and [`report`](Self::report) then says which matched nothing.
#[derive(Debug, Default)]
pub struct LoraPatches {
    /// Set for the text encoder, whose files name modules under `text_model.` whether or
    /// not its checkpoint does (transformers 5 saves them without).
    text_model: bool,
    by_path: HashMap<String, Vec<Arc<Update>>>,
    by_kohya: HashMap<String, Vec<Arc<Update>>>,
    /// Other names of the network's modules (diffusers path -> path), tried for kohya names:
    /// SDXL's UNet in Stability's names (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`),
    /// as kohya's SDXL scripts name it.
    aliases: HashMap<String, String>,
    unknown: Vec<String>,
}

impl LoraPatches {
    /// The updates of `loras` for `target`.
    ///
    /// # Errors
    /// [`Error::Config`] for a multiplier that is not finite.
    pub fn new(loras: &[Lora], target: LoraTarget) -> Result<Self> {
        let mut patches = LoraPatches {
            text_model: target != LoraTarget::Unet,
            ..LoraPatches::default()
        };
        for lora in loras {
            if !lora.multiplier.is_finite() {
                return Err(invalid(
                    &lora.path,
                    format!("multiplier {} is not a finite number", lora.multiplier),
                ));
            }
            if target == LoraTarget::Unet {
                patches.unknown.extend(
                    lora.unknown
                        .iter()
                        .map(|k| format!("{}: {k}", lora.path.display())),
                );
            }
            for m in lora.modules.iter().filter(|m| m.target == target) {
                // Text encoder modules are looked up under `text_model.`, whichever way the
                // file names them.
                let name = match (patches.text_model, m.kohya) {
                    (true, true) if !m.name.starts_with("text_model_") => {
                        format!("text_model_{}", m.name)
                    }
                    (true, false) if !m.name.starts_with("text_model.") => {
                        format!("text_model.{}", m.name)
                    }
                    _ => m.name.clone(),
                };
                let update = Arc::new(Update {
                    scale: (lora.multiplier * m.scale()) as f32,
                    down: m.down.clone(),
                    up: m.up.clone(),
                    key: format!("{}: {}", lora.path.display(), m.name),
                    used: std::sync::atomic::AtomicBool::new(false),
                });
                let map = if m.kohya {
                    &mut patches.by_kohya
                } else {
                    &mut patches.by_path
                };
                map.entry(name).or_default().push(update);
            }
        }
        Ok(patches)
    }

    /// The same updates, kohya names also matched against `aliases` (diffusers module path ->
    /// another name of the module, such as the original Stability names of SDXL's UNet,
    /// which kohya's SDXL LoRAs use).
    #[must_use]
    pub fn with_aliases(mut self, aliases: HashMap<String, String>) -> Self {
        self.aliases = aliases;
        self
    }

    /// Whether no update applies.
    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty() && self.by_kohya.is_empty()
    }

    /// `tensor` (the store key `key`) with the updates of its module added if it is a
    /// module's `weight`, computed in f32 and stored back in the weight's type.
    ///
    /// # Errors
    /// [`Error::Config`] naming the LoRA key for an update whose shape is not the weight's
    /// (a LoRA for another model).
    pub fn patch(&self, key: &str, tensor: HostTensor) -> Result<HostTensor> {
        let Some(module) = key.strip_suffix(".weight") else {
            return Ok(tensor);
        };
        let full = match self.text_model && !module.starts_with("text_model.") {
            true => format!("text_model.{module}"),
            false => module.to_owned(),
        };
        let alias = self
            .aliases
            .get(&full)
            .and_then(|a| self.by_kohya.get(&a.replace('.', "_")));
        let updates: Vec<&Arc<Update>> = self
            .by_path
            .get(&full)
            .into_iter()
            .chain(self.by_kohya.get(&full.replace('.', "_")))
            .chain(alias)
            .flatten()
            .collect();
        if updates.is_empty() {
            return Ok(tensor);
        }
        let shape = tensor.shape().to_vec();
        let dtype = tensor.dtype();
        let out = shape.first().copied().unwrap_or(0);
        let fan_in: usize = shape.iter().skip(1).product();
        let mut w = tensor.into_f32_vec();
        for u in updates {
            let (down, up) = (u.down.as_f32().unwrap_or(&[]), u.up.as_f32().unwrap_or(&[]));
            let r = u.down.shape().first().copied().unwrap_or(0);
            let down_in: usize = u.down.shape().iter().skip(1).product();
            let up_out = u.up.shape().first().copied().unwrap_or(0);
            if up_out != out || down_in != fan_in || up.len() != out * r || down.len() != r * fan_in
            {
                return Err(Error::Config {
                    what: format!("{} (LoRA)", u.key),
                    message: format!(
                        "its update is [{up_out}, {down_in}] but {module} is {shape:?}: a LoRA \
                         for another model"
                    ),
                });
            }
            // w[o, i] += sum_k (scale * up[o, k]) down[k, i], on the GEMM.
            let scaled: Vec<f32> = up.iter().map(|&x| u.scale * x).collect();
            crate::cpu::add_product(out, fan_in, r, &scaled, down, &mut w)?;
            u.used.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let data = match dtype {
            crate::backend::DType::F32 => HostData::F32(w),
            crate::backend::DType::F16 => {
                HostData::F16(w.iter().map(|&v| half::f16::from_f32(v)).collect())
            }
            crate::backend::DType::BF16 => {
                HostData::BF16(w.iter().map(|&v| half::bf16::from_f32(v)).collect())
            }
        };
        HostTensor::new(shape, data)
    }

    /// What matched after a network was loaded with [`patch`](Self::patch): the updates
    /// used, and those that matched no weight (with the file's keys that are no update).
    pub fn report(&self) -> LoraReport {
        let all = self
            .by_path
            .values()
            .chain(self.by_kohya.values())
            .flatten();
        let mut report = LoraReport::default();
        for u in all {
            if u.used.load(std::sync::atomic::Ordering::Relaxed) {
                report.matched += 1;
            } else {
                report.unmatched.push(u.key.clone());
            }
        }
        report.unmatched.extend(self.unknown.iter().cloned());
        report.unmatched.sort();
        report
    }
}

#[cfg(test)]
mod tests {
    use super::{LoraTarget, pattern_alpha, split_key};

    #[test]
    fn alpha_patterns_match_as_peft_does() {
        let pattern: serde_json::Value = serde_json::json!({
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 1.0,
            "mid_block.*to_k": 3.0,
            "to_v": 5.0,
        });
        let pattern = pattern.as_object().unwrap_or_else(|| unreachable!());
        let cases = [
            (
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                Some(1.0),
            ),
            // A suffix after a dot, never inside a name.
            (
                "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
                Some(5.0),
            ),
            (
                "up_blocks.1.attentions.0.transformer_blocks.0.attn2.xto_v",
                None,
            ),
            // A regular expression.
            (
                "mid_block.attentions.0.transformer_blocks.0.attn1.to_k",
                Some(3.0),
            ),
            (
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
                None,
            ),
        ];
        for (module, want) in cases {
            assert_eq!(pattern_alpha(pattern, module), want, "{module}");
        }
    }

    #[test]
    fn keys_of_every_layout_name_the_network_module() {
        let unet = LoraTarget::Unet;
        let te = LoraTarget::TextEncoder;
        let cases = [
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                Some((unet, "down_blocks_0_attentions_0_proj_in", true, "down")),
            ),
            (
                "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha",
                Some((te, "text_model_encoder_layers_0_mlp_fc1", true, "alpha")),
            ),
            (
                "unet.mid_block.attentions.0.proj_out.lora_B.weight",
                Some((unet, "mid_block.attentions.0.proj_out", false, "up")),
            ),
            (
                "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
                Some((
                    unet,
                    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
                    false,
                    "up",
                )),
            ),
            // An attention-processor file names no network.
            (
                "down_blocks.0.attentions.1.transformer_blocks.0.attn2.processor.to_k_lora.down.weight",
                Some((
                    unet,
                    "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
                    false,
                    "down",
                )),
            ),
            (
                "unet.down_blocks.1.resnets.0.conv1.lora.down.weight",
                Some((unet, "down_blocks.1.resnets.0.conv1", false, "down")),
            ),
            (
                "text_encoder.text_model.encoder.layers.1.self_attn.to_out_lora.down.weight",
                Some((
                    te,
                    "text_model.encoder.layers.1.self_attn.out_proj",
                    false,
                    "down",
                )),
            ),
            (
                "text_encoder.encoder.layers.0.mlp.fc2.lora_linear_layer.up.weight",
                Some((te, "encoder.layers.0.mlp.fc2", false, "up")),
            ),
            ("unet.conv_in.weight", None),
            ("down_blocks.0.resnets.0.conv1.weight", None),
            ("unet.x.processor.to_z_lora.down.weight", None),
        ];
        for (key, want) in cases {
            let got = split_key(key);
            let got = got.as_ref().map(|(t, m, k, p)| (*t, m.as_str(), *k, *p));
            assert_eq!(got, want, "{key}");
        }
    }
}

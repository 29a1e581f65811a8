//! LoRA (Hu et al., 2021): low-rank weight updates `W += m * (alpha / rank) * up @ down`,
//! read from the files people share and merged into the UNet and the text encoder as their
//! weights are loaded.
//!
//! | layout | keys | alpha |
//! |---|---|---|
//! | kohya / AUTOMATIC1111 | `lora_unet_<module path, dots as underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`; `lora_te_...` for the text encoder | the `.alpha` tensor, else the rank |
//! | diffusers / PEFT | `unet.<module path>.lora_A.weight` (down), `.lora_B.weight` (up); `text_encoder.` | `lora_alpha` (or the `alpha_pattern` regular expressions, matched as PEFT does) of the `lora_adapter_metadata` diffusers writes, else the rank |
//! | diffusers before PEFT | `unet.<path>.processor.to_q_lora.down.weight` (`to_out_lora` for `to_out.0`), `unet.<path>.lora.down.weight`, `text_encoder.<path>.lora_linear_layer.down.weight` (and `.up.`); attention-processor files without the `unet.` prefix | as for PEFT |
//! | LyCORIS LoHa | kohya's names (or diffusers' with `unet.`) with `.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b` (and the Tucker cores `.hada_t1`, `.hada_t2` of convolutions) | `.alpha` over the rank of `hada_w1_b`, else 1 |
//! | LyCORIS LoKr | as LoHa with `.lokr_w1` or `.lokr_w1_a` + `.lokr_w1_b`, `.lokr_w2` or `.lokr_w2_a` + `.lokr_w2_b` (and `.lokr_t2`) | `.alpha` over the rank of the decomposed factor (`w2`'s first); none when both factors are full |
//!
//! Linear layers take `down [r, in]`, `up [out, r]`; convolutions `down [r, in, kh, kw]`,
//! `up [out, r, 1, 1]` (LoCon), the update `up @ down` reshaped to the kernel. LoHa's update
//! is the elementwise product `(w1_a @ w1_b) * (w2_a @ w2_b)`, LoKr's the Kronecker product
//! `kron(w1, w2)` (each factor a matrix or a product `a @ b`), both reshaped to the weight, as
//! LyCORIS and AUTOMATIC1111 define them; a Tucker core `t [r, r, kh, kw]` with `a [r, out]`,
//! `b [r, in]` gives the factor `sum_ij t[i, j] a[i, out] b[j, in]`. A kohya path
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

/// One factor of a LyCORIS update, in f32.
#[derive(Debug, Clone)]
pub enum LoraFactor {
    /// A full matrix `[rows, cols]` (or `[rows, c, kh, kw]`).
    Full(Arc<HostTensor>),
    /// `a [rows, r] @ b [r, cols]`.
    Product {
        /// `[rows, r]`.
        a: Arc<HostTensor>,
        /// `[r, cols]` (a convolution's `cols` flattened as `in * kh * kw`).
        b: Arc<HostTensor>,
    },
    /// A Tucker (CP) decomposition of a convolution's factor:
    /// `[out, in, kh, kw] = sum_ij core[i, j] a[i, out] b[j, in]`.
    Tucker {
        /// `[r1, r2, kh, kw]`.
        core: Arc<HostTensor>,
        /// `[r1, out]`.
        a: Arc<HostTensor>,
        /// `[r2, in]`.
        b: Arc<HostTensor>,
    },
}

impl LoraFactor {
    /// The rank of a decomposed factor (`None` for a full matrix).
    pub fn rank(&self) -> Option<usize> {
        match self {
            LoraFactor::Full(_) => None,
            LoraFactor::Product { b, .. } | LoraFactor::Tucker { b, .. } => {
                b.shape().first().copied()
            }
        }
    }

    /// `(rows, cols)` of the factor as a matrix (a convolution's columns are `in * kh * kw`).
    fn dims(&self) -> (usize, usize) {
        let rest = |t: &HostTensor| t.shape().iter().skip(1).product::<usize>();
        let dim = |t: &HostTensor, i: usize| t.shape().get(i).copied().unwrap_or(0);
        match self {
            LoraFactor::Full(t) => (dim(t, 0), rest(t)),
            LoraFactor::Product { a, b } => (dim(a, 0), rest(b)),
            LoraFactor::Tucker { core, a, b } => {
                (dim(a, 1), dim(b, 1) * dim(core, 2) * dim(core, 3))
            }
        }
    }

    /// The factor as a row-major `[rows, cols]` matrix.
    fn matrix(&self) -> Result<Vec<f32>> {
        let values = |t: &HostTensor| t.as_f32().unwrap_or(&[]).to_vec();
        let (rows, cols) = self.dims();
        match self {
            LoraFactor::Full(t) => Ok(values(t)),
            LoraFactor::Product { a, b } => {
                let r = b.shape().first().copied().unwrap_or(0);
                let mut out = vec![0.0; rows * cols];
                crate::cpu::add_product(rows, cols, r, &values(a), &values(b), &mut out)?;
                Ok(out)
            }
            LoraFactor::Tucker { core, a, b } => {
                let dim = |t: &HostTensor, i: usize| t.shape().get(i).copied().unwrap_or(0);
                let (r1, r2) = (dim(core, 0), dim(core, 1));
                let (channels, kernel) = (dim(b, 1), dim(core, 2) * dim(core, 3));
                let (core, a, b) = (values(core), values(a), values(b));
                // temp[i, c, p] = sum_j core[i, j, p] b[j, c]
                let mut temp = vec![0.0f32; r1 * channels * kernel];
                for i in 0..r1 {
                    for j in 0..r2 {
                        let t = &core[(i * r2 + j) * kernel..][..kernel];
                        for c in 0..channels {
                            let bj = b[j * channels + c];
                            let out = &mut temp[(i * channels + c) * kernel..][..kernel];
                            for (o, &tv) in out.iter_mut().zip(t) {
                                *o += tv * bj;
                            }
                        }
                    }
                }
                // out[o, (c, p)] = sum_i a[i, o] temp[i, (c, p)]
                let mut at = vec![0.0f32; rows * r1];
                for i in 0..r1 {
                    for o in 0..rows {
                        at[o * r1 + i] = a[i * rows + o];
                    }
                }
                let mut out = vec![0.0; rows * cols];
                crate::cpu::add_product(rows, cols, r1, &at, &temp, &mut out)?;
                Ok(out)
            }
        }
    }
}

/// How a module's update is made from the file's matrices.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LoraFactors {
    /// LoRA and LoCon: `up @ down`, down `[r, in]` or `[r, in, kh, kw]`, up `[out, r]` or
    /// `[out, r, 1, 1]`.
    LowRank {
        /// `[r, in]` or `[r, in, kh, kw]`.
        down: Arc<HostTensor>,
        /// `[out, r]` or `[out, r, 1, 1]`.
        up: Arc<HostTensor>,
    },
    /// LyCORIS LoHa: `w1 * w2`, elementwise.
    Hadamard {
        /// The first factor.
        w1: LoraFactor,
        /// The second factor.
        w2: LoraFactor,
    },
    /// LyCORIS LoKr: `kron(w1, w2)`.
    Kronecker {
        /// The outer factor `[a, b]`.
        w1: LoraFactor,
        /// The inner factor `[c, d]` (or `[c, d, kh, kw]`).
        w2: LoraFactor,
    },
}

/// One update, as the file names it.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// The network it patches.
    pub target: LoraTarget,
    /// The module as the file names it: a kohya path (`down_blocks_0_..._to_q`) or a
    /// diffusers path (`down_blocks.0....to_q`).
    pub name: String,
    /// Whether `name` is a kohya path (dots replaced by underscores).
    pub kohya: bool,
    /// The matrices, in f32, and how they make the update.
    pub factors: LoraFactors,
    /// `alpha`, if the file gives one (else the rank: scale 1).
    pub alpha: Option<f64>,
    /// Rank-stabilised LoRA (PEFT's `use_rslora`): the scale is `alpha / sqrt(rank)`.
    pub rslora: bool,
}

impl LoraModule {
    /// The rank `alpha` is divided by: LoRA's `r`, LoHa's `hada_w1_b` rows, LoKr's decomposed
    /// factor's (`w2`'s, else `w1`'s); `None` for LoKr with both factors full.
    pub fn rank(&self) -> Option<usize> {
        match &self.factors {
            LoraFactors::LowRank { down, .. } => down.shape().first().copied(),
            LoraFactors::Hadamard { w1, .. } => w1.rank(),
            LoraFactors::Kronecker { w1, w2 } => w2.rank().or_else(|| w1.rank()),
        }
    }

    /// `alpha / rank` (`alpha / sqrt(rank)` for rank-stabilised LoRA); 1 without an alpha or
    /// a rank (LoKr of two full factors), as LyCORIS and AUTOMATIC1111.
    pub fn scale(&self) -> f64 {
        let (Some(r), Some(alpha)) = (self.rank(), self.alpha) else {
            return 1.0;
        };
        let r = r.max(1) as f64;
        if self.rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

/// LyCORIS's parts after the module path: LoHa's Hadamard and LoKr's Kronecker factors.
const LYCORIS_PARTS: [&str; 13] = [
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
];

/// `key` without `.part` for one of LyCORIS's parts.
fn lycoris_part(key: &str) -> Option<(&str, &'static str)> {
    LYCORIS_PARTS.iter().find_map(|&part| {
        key.strip_suffix(part)
            .and_then(|m| m.strip_suffix('.'))
            .map(|m| (m, part))
    })
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
            if let Some((module, part)) = lycoris_part(rest) {
                return Some((target, module.to_owned(), true, part));
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
    if let Some((module, part)) = lycoris_part(rest) {
        return Some((target, module.to_owned(), false, part));
    }
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

/// A LyCORIS factor of module `name` stored whole (`full`) or as `a @ b`, through a Tucker
/// core `core` if the file gives one; its parts taken out of `parts`.
fn factor(
    name: &str,
    parts: &mut HashMap<&'static str, HostTensor>,
    full: Option<&str>,
    a: &str,
    b: &str,
    core: Option<&str>,
) -> std::result::Result<LoraFactor, String> {
    let shape = |t: &HostTensor| t.shape().to_vec();
    if let Some((key, t)) = full.and_then(|k| parts.remove(k).map(|t| (k, t))) {
        if t.shape().len() < 2 {
            return Err(format!("module {name}: {key} is {:?}", shape(&t)));
        }
        return Ok(LoraFactor::Full(Arc::new(t)));
    }
    let (Some(ta), Some(tb)) = (parts.remove(a), parts.remove(b)) else {
        return Err(format!("module {name} lacks {a} or {b}"));
    };
    let (sa, sb) = (shape(&ta), shape(&tb));
    if let Some(tc) = core.and_then(|k| parts.remove(k)) {
        let sc = shape(&tc);
        if sc.len() != 4 || sa.len() != 2 || sb.len() != 2 || sa[0] != sc[0] || sb[0] != sc[1] {
            return Err(format!(
                "module {name}: the Tucker core {sc:?} does not join {a} {sa:?} and {b} {sb:?}"
            ));
        }
        return Ok(LoraFactor::Tucker {
            core: Arc::new(tc),
            a: Arc::new(ta),
            b: Arc::new(tb),
        });
    }
    if sa.len() != 2 || sb.len() < 2 || sa[1] != sb[0] || sa[1] == 0 {
        return Err(format!(
            "module {name}: {a} {sa:?} and {b} {sb:?} are not of one rank"
        ));
    }
    Ok(LoraFactor::Product {
        a: Arc::new(ta),
        b: Arc::new(tb),
    })
}

/// How a module's parts make its update, the parts used taken out of `parts`; the message
/// says what is missing or does not fit.
fn factors_of(
    name: &str,
    parts: &mut HashMap<&'static str, HostTensor>,
) -> std::result::Result<LoraFactors, String> {
    let shape = |t: &HostTensor| t.shape().to_vec();
    if parts.contains_key("down") || parts.contains_key("up") {
        let (Some(down), Some(up)) = (parts.remove("down"), parts.remove("up")) else {
            return Err(format!("module {name} lacks its down or its up matrix"));
        };
        let rank = down.shape().first().copied().unwrap_or(0);
        let up_rank = up.shape().get(1).copied().unwrap_or(0);
        if rank == 0 || rank != up_rank || down.shape().len() < 2 {
            return Err(format!(
                "module {name}: down {:?} and up {:?} are not of one rank",
                shape(&down),
                shape(&up)
            ));
        }
        return Ok(LoraFactors::LowRank {
            down: Arc::new(down),
            up: Arc::new(up),
        });
    }
    let hadamard = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];
    if hadamard.iter().any(|k| parts.contains_key(k)) {
        let w1 = factor(name, parts, None, "hada_w1_a", "hada_w1_b", Some("hada_t1"))?;
        let w2 = factor(name, parts, None, "hada_w2_a", "hada_w2_b", Some("hada_t2"))?;
        if w1.dims() != w2.dims() {
            return Err(format!(
                "module {name}: LoHa's two factors are {:?} and {:?}",
                w1.dims(),
                w2.dims()
            ));
        }
        return Ok(LoraFactors::Hadamard { w1, w2 });
    }
    if !parts.keys().any(|k| k.starts_with("lokr_")) {
        return Err(format!("module {name} lacks its down or its up matrix"));
    }
    let w1 = factor(name, parts, Some("lokr_w1"), "lokr_w1_a", "lokr_w1_b", None)?;
    let w2 = factor(
        name,
        parts,
        Some("lokr_w2"),
        "lokr_w2_a",
        "lokr_w2_b",
        Some("lokr_t2"),
    )?;
    Ok(LoraFactors::Kronecker { w1, w2 })
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
        type Parts = (HashMap<&'static str, HostTensor>, Option<f64>);
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
            let entry = found.entry((target, module, kohya)).or_default();
            if part == "alpha" {
                let alpha = tensor
                    .as_f32()
                    .and_then(|v| (v.len() == 1).then(|| f64::from(v[0])))
                    .filter(|a| a.is_finite())
                    .ok_or_else(|| invalid(path, format!("{key} is not one finite number")))?;
                entry.1 = Some(alpha);
            } else {
                entry.0.insert(part, tensor);
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
        for ((target, name, kohya), (mut parts, alpha)) in found {
            let alpha = alpha.or_else(|| {
                if kohya {
                    None
                } else {
                    peft_alpha(target, &name)
                }
            });
            let finite =
                |t: &HostTensor| t.as_f32().is_some_and(|v| v.iter().all(|x| x.is_finite()));
            if !parts.values().all(finite) {
                return Err(invalid(
                    path,
                    format!("module {name} holds NaN or infinity"),
                ));
            }
            let factors = factors_of(&name, &mut parts).map_err(|m| invalid(path, m))?;
            // Parts no form of update takes (a Tucker core beside a full factor).
            unknown.extend(parts.keys().map(|part| format!("{name}.{part}")));
            modules.push(LoraModule {
                target,
                name,
                kohya,
                factors,
                alpha,
                rslora: !kohya && rslora(target),
            });
        }
        if modules.is_empty() {
            return Err(invalid(
                path,
                "no LoRA update in it (no lora_down/lora_up, lora_A/lora_B, hada_ or lokr_ keys)"
                    .into(),
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

/// One update of a module: `scale` times what its factors make.
#[derive(Debug)]
struct Update {
    scale: f32,
    factors: LoraFactors,
    key: String,
    used: std::sync::atomic::AtomicBool,
}

impl Update {
    /// Adds the update to `w`, the weight of `module` of shape `shape` as a row-major
    /// `[out, fan_in]` f32 matrix.
    fn add_to(&self, w: &mut [f32], module: &str, shape: &[usize]) -> Result<()> {
        let out = shape.first().copied().unwrap_or(0);
        let fan_in: usize = shape.iter().skip(1).product();
        let mismatch = |found: (usize, usize)| Error::Config {
            what: format!("{} (LoRA)", self.key),
            message: format!(
                "its update is [{}, {}] but {module} is {shape:?}: a LoRA for another model",
                found.0, found.1
            ),
        };
        match &self.factors {
            LoraFactors::LowRank { down, up } => {
                let (d, u) = (down.as_f32().unwrap_or(&[]), up.as_f32().unwrap_or(&[]));
                let r = down.shape().first().copied().unwrap_or(0);
                let down_in: usize = down.shape().iter().skip(1).product();
                let up_out = up.shape().first().copied().unwrap_or(0);
                if up_out != out || down_in != fan_in || u.len() != out * r || d.len() != r * fan_in
                {
                    return Err(mismatch((up_out, down_in)));
                }
                // w[o, i] += sum_k (scale * up[o, k]) down[k, i], on the GEMM.
                let scaled: Vec<f32> = u.iter().map(|&x| self.scale * x).collect();
                crate::cpu::add_product(out, fan_in, r, &scaled, d, w)?;
            }
            LoraFactors::Hadamard { w1, w2 } => {
                if w1.dims() != (out, fan_in) {
                    return Err(mismatch(w1.dims()));
                }
                let (m1, m2) = (w1.matrix()?, w2.matrix()?);
                for ((v, a), b) in w.iter_mut().zip(&m1).zip(&m2) {
                    *v += self.scale * a * b;
                }
            }
            LoraFactors::Kronecker { w1, w2 } => {
                let ((a, b), (c, d)) = (w1.dims(), w2.dims());
                if a * c != out || b * d != fan_in {
                    return Err(mismatch((a * c, b * d)));
                }
                let (m1, m2) = (w1.matrix()?, w2.matrix()?);
                // w[i c + k, j d + m] += scale w1[i, j] w2[k, m]: a 4-D w2 [c, d', kh, kw]
                // after a w1 of unit kernel is the same product on the flattened columns.
                for i in 0..a {
                    for k in 0..c {
                        let row = &mut w[(i * c + k) * fan_in..][..fan_in];
                        let inner = &m2[k * d..][..d];
                        for j in 0..b {
                            let x = self.scale * m1[i * b + j];
                            for (v, &y) in row[j * d..][..d].iter_mut().zip(inner) {
                                *v += x * y;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
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
                    factors: m.factors.clone(),
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
        let mut w = tensor.into_f32_vec();
        for u in updates {
            u.add_to(&mut w, module, &shape)?;
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
            // LyCORIS: LoHa and LoKr parts after kohya's (or diffusers') module names.
            (
                "lora_unet_mid_block_resnets_0_conv1.hada_t1",
                Some((unet, "mid_block_resnets_0_conv1", true, "hada_t1")),
            ),
            (
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lokr_w1_a",
                Some((
                    te,
                    "text_model_encoder_layers_0_self_attn_q_proj",
                    true,
                    "lokr_w1_a",
                )),
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w2",
                Some((unet, "down_blocks_0_attentions_0_proj_in", true, "lokr_w2")),
            ),
            (
                "unet.mid_block.attentions.0.proj_out.lokr_w1",
                Some((unet, "mid_block.attentions.0.proj_out", false, "lokr_w1")),
            ),
            ("lora_unet_mid_block_resnets_0_conv1hada_t1", None),
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

//! Seeded mutation fuzzing of every parser of untrusted input: safetensors files, the
//! network, scheduler and tokenizer configs, the tokenizer's vocabulary and merges, the
//! single-file key and shape inference (Stable Diffusion and ControlNet), AUTOMATIC1111's
//! prompt syntax, and PNG images.
//! Each target starts from a valid input of the fixtures, mutates it (bit flips, interesting
//! bytes, insertions, deletions, duplications, truncations, and for JSON numbers replaced by
//! extremes) and requires that the parser returns, `Ok` or a typed error, and never panics.
//!
//! The runs are bounded (CI runs each target `SD_FUZZ_ITERS` times, 600 by default, with a
//! fixed seed, in a few seconds); for a longer search:
//!
//! ```text
//! SD_FUZZ_ITERS=200000 SD_FUZZ_SEED=$RANDOM cargo test --release -p sd-models --test fuzz -- --nocapture
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use sd_models::clip::{ClipTextConfig, ClipTokenizer};
use sd_models::controlnet::ControlNetConfig;
use sd_models::pipeline::{Image, ImageLimits};
use sd_models::unet::{Unet2DConditionConfig, Unet2DConfig};
use sd_models::vae::AutoencoderKlConfig;
use sd_models::weights::compvis::{SingleFileOptions, open_controlnet};
use sd_models::weights::{LoadDType, WeightFile};

use common::fixtures::{root, scratch_dir};

fn iterations() -> usize {
    std::env::var("SD_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600)
}

fn rng(target: &str) -> StdRng {
    let seed: u64 = std::env::var("SD_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let salt = target
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    StdRng::seed_from_u64(seed ^ salt)
}

const INTERESTING: &[u8] = b"\x00\xff\x7f\x80019-.e\"{}[]:,\n ";

/// One to four random edits of `input`.
fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = v.len();
        let at = if len == 0 {
            0
        } else {
            rng.random_range(0..len)
        };
        match rng.random_range(0..7) {
            0 if len > 0 => v[at] ^= 1 << rng.random_range(0..8),
            1 if len > 0 => v[at] = INTERESTING[rng.random_range(0..INTERESTING.len())],
            2 => {
                let n = rng.random_range(1..16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                v.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let end = (at + rng.random_range(1..64)).min(len);
                v.drain(at..end);
            }
            4 if len > 0 => {
                let end = (at + rng.random_range(1..64)).min(len);
                let chunk = v[at..end].to_vec();
                v.splice(at..at, chunk);
            }
            5 => v.truncate(at),
            _ if len > 0 => v[at] = rng.random(),
            _ => {}
        }
    }
    v
}

/// Numbers in JSON text replaced by extremes (or other kinds of values), plus byte edits.
fn mutate_json(rng: &mut StdRng, text: &str) -> Vec<u8> {
    const VALUES: &[&str] = &[
        "0",
        "-1",
        "1e308",
        "-1e308",
        "18446744073709551615",
        "99999999999999999999999",
        "4611686018427387904",
        "0.5",
        "null",
        "[]",
        "{}",
        "true",
        "\"x\"",
        "[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18]",
    ];
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() && rng.random_range(0..6) == 0 {
            while chars
                .peek()
                .is_some_and(|d| d.is_ascii_digit() || *d == '.')
            {
                chars.next();
            }
            out.push_str(VALUES[rng.random_range(0..VALUES.len())]);
        } else {
            out.push(c);
        }
    }
    if rng.random_range(0..2) == 0 {
        mutate(rng, out.as_bytes())
    } else {
        out.into_bytes()
    }
}

/// Runs `parse` on `iterations()` mutants of `seed`; fails on the first panic, naming the
/// input's file (kept for reproduction).
fn fuzz(target: &str, seed: &[u8], json: bool, mut parse: impl FnMut(&[u8])) {
    let mut rng = rng(target);
    let dir = scratch_dir("sd-models-fuzz");
    for i in 0..iterations() {
        let input = if json {
            mutate_json(&mut rng, &String::from_utf8_lossy(seed))
        } else {
            mutate(&mut rng, seed)
        };
        if catch_unwind(AssertUnwindSafe(|| parse(&input))).is_err() {
            let kept = dir.join(format!("{target}-panic-{i}"));
            std::fs::write(&kept, &input).unwrap();
            panic!(
                "{target}: iteration {i} panicked; input kept in {}",
                kept.display()
            );
        }
    }
}

fn read(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Writes `bytes` to a scratch file named `name` and returns its path.
fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch_dir("sd-models-fuzz").join(format!("{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn safetensors_files() {
    let seed = read(root().join("controlnet/single_file/control_sd1.safetensors"));
    fuzz("safetensors", &seed, false, |bytes| {
        let path = scratch("weights.safetensors", bytes);
        if let Ok(file) = WeightFile::open(&path) {
            let keys: Vec<String> = file.keys().map(str::to_owned).collect();
            for key in keys.iter().take(8) {
                let shape = file.info(key).map(|i| i.shape.to_vec()).unwrap_or_default();
                let _ = file.load(key, &shape, LoadDType::F32);
                let _ = file.load(key, &shape, LoadDType::Stored);
            }
        }
        let _ = open_controlnet(&path, LoadDType::F32, true);
    });
}

#[test]
fn network_configs() {
    let unet = read(root().join("unet/sd1/config.json"));
    fuzz("unet-config", &unet, true, |b| {
        let _ = Unet2DConditionConfig::from_json(&String::from_utf8_lossy(b), "config.json");
    });
    let ddpm = read(root().join("unet/ddpm/config.json"));
    fuzz("unet2d-config", &ddpm, true, |b| {
        let _ = Unet2DConfig::from_json(&String::from_utf8_lossy(b), "config.json");
    });
    let vae = read(root().join("vae/kl/config.json"));
    fuzz("vae-config", &vae, true, |b| {
        let _ = AutoencoderKlConfig::from_json(&String::from_utf8_lossy(b), "config.json");
    });
    let clip = read(root().join("pipeline/sd1/text_encoder/config.json"));
    fuzz("clip-config", &clip, true, |b| {
        let _ = ClipTextConfig::from_json(&String::from_utf8_lossy(b), "config.json");
    });
    let controlnet = read(root().join("controlnet/sd1/config.json"));
    fuzz("controlnet-config", &controlnet, true, |b| {
        let _ = ControlNetConfig::from_json(&String::from_utf8_lossy(b), "config.json");
    });
}

#[test]
fn scheduler_configs() {
    let seed = read(root().join("pipeline/sd1/scheduler/scheduler_config.json"));
    let plan = sd_schedulers::Plan::steps(7);
    fuzz("scheduler-config", &seed, true, |b| {
        if let Ok(config) = sd_schedulers::SchedulerConfig::from_json(&String::from_utf8_lossy(b)) {
            for name in ["Euler a", "DPM++ 2M Karras", "DDIM", "UniPC", "LMS"] {
                let _ = sd_schedulers::registry::sampler(name, &config, plan.clone());
            }
        }
    });
}

/// A small vocabulary and merges cut from the real ones, with the special tokens.
fn small_tokenizer_files() -> (String, String) {
    let vocab: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&read(root().join("tokenizer/vocab.json"))).unwrap();
    let small: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .filter(|(k, v)| v.as_u64().is_some_and(|id| id < 600) || k.starts_with("<|"))
        .collect();
    let merges = String::from_utf8(read(root().join("tokenizer/merges.txt"))).unwrap();
    let merges: Vec<&str> = merges.lines().take(300).collect();
    (
        serde_json::Value::Object(small).to_string(),
        merges.join("\n") + "\n",
    )
}

#[test]
fn tokenizer_files() {
    let (vocab, merges) = small_tokenizer_files();
    let dir = scratch_dir("sd-models-fuzz").join(format!("tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = read(root().join("tokenizer/layouts/sd15/tokenizer_config.json"));
    let special = read(root().join("tokenizer/layouts/sd15/special_tokens_map.json"));
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
    let encode = |dir: &Path| {
        if let Ok(t) = ClipTokenizer::from_dir(dir) {
            let _ = t.encode("a photo of a cat, dramatic lighting");
            let _ = t.encode_chunks(&"word ".repeat(100));
        }
    };
    let reset = || {
        write("vocab.json", vocab.as_bytes());
        write("merges.txt", merges.as_bytes());
        write("tokenizer_config.json", &config);
        write("special_tokens_map.json", &special);
    };
    for (target, name, seed, json) in [
        ("vocab", "vocab.json", vocab.as_bytes(), true),
        ("merges", "merges.txt", merges.as_bytes(), false),
        (
            "tokenizer-config",
            "tokenizer_config.json",
            &config[..],
            true,
        ),
        (
            "special-tokens",
            "special_tokens_map.json",
            &special[..],
            true,
        ),
    ] {
        reset();
        fuzz(target, seed, json, |b| {
            write(name, b);
            encode(&dir);
        });
    }
}

#[test]
fn single_file_inference() {
    // The key and shape inference sees only names and shapes: mutate those of a real layout.
    let file = WeightFile::open(root().join("single_file/sd1/model.safetensors")).unwrap();
    let layout: Vec<(String, Vec<usize>)> = file
        .keys()
        .map(|k| (k.to_owned(), file.info(k).unwrap().shape.to_vec()))
        .collect();
    let mut rng = rng("single-file");
    let options = SingleFileOptions::new();
    for i in 0..iterations() {
        let mut mutant = layout.clone();
        for _ in 0..rng.random_range(1..=6) {
            let at = rng.random_range(0..mutant.len());
            match rng.random_range(0..5) {
                0 => {
                    mutant.remove(at);
                }
                1 => {
                    let shape = &mut mutant[at].1;
                    if !shape.is_empty() {
                        let d = rng.random_range(0..shape.len());
                        shape[d] = [0, 1, 3, 7, 1 << 20, usize::MAX][rng.random_range(0..6)];
                    }
                }
                2 => {
                    mutant[at].1.pop();
                }
                3 => {
                    let key = String::from_utf8_lossy(&mutate(&mut rng, mutant[at].0.as_bytes()))
                        .into_owned();
                    mutant[at].0 = key;
                }
                _ => mutant[at].1.push(rng.random_range(0..4)),
            }
        }
        let result = catch_unwind(AssertUnwindSafe(|| {
            let _ = options.plan(
                "model.safetensors",
                mutant.iter().map(|(k, s)| (k.as_str(), s.as_slice())),
            );
        }));
        assert!(
            result.is_ok(),
            "single-file inference panicked at iteration {i}"
        );
    }
}

#[test]
fn weighted_prompts() {
    // Prompts built from the syntax's characters, parsed and chunked with the real vocabulary.
    let dir = root().join("tokenizer");
    let tok = ClipTokenizer::from_files(dir.join("vocab.json"), dir.join("merges.txt")).unwrap();
    let seed = b"a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))). \\(x\\) BREAK z:2)";
    fuzz("weighted-prompt", seed, false, |b| {
        let prompt = String::from_utf8_lossy(b);
        let parts = sd_models::clip::parse_weighted(&prompt);
        if let Ok(chunks) = tok.encode_weighted(&parts) {
            assert!(!chunks.is_empty());
            assert!(
                chunks
                    .iter()
                    .all(|c| c.ids.len() == 77 && c.weights.len() == 77)
            );
        }
    });
}

#[test]
fn png_images() {
    let data = (0..24 * 16 * 3).map(|i| (i * 13 % 256) as u8).collect();
    let seed = Image::new(24, 16, data).unwrap().to_png().unwrap();
    let limits = ImageLimits {
        max_side: 4096,
        max_bytes: 64 << 20,
    };
    fuzz("png", &seed, false, |b| {
        let _ = Image::decode(b, limits);
    });
}

//! Textual inversion against diffusers' `load_textual_inversion` (fixtures/textual_inversion,
//! written by tools/fixtures/generate.py textual_inversion): embeddings in diffusers' layout
//! (one and three vectors, `[dim]` and `[1, dim]`) and AUTOMATIC1111's (`emb_params`,
//! `string_to_param.*` in f16), loaded alone and together: the tokens and ids added, the
//! embedding rows, the prompts as diffusers rewrites them, their ids and the text encoder's
//! output. Then the files diffusers refuses (or, for a pickle, that are refused here), each
//! leaving the pipeline as it was.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use sd_models::backend::DataOps;
use sd_models::backend::conformance::rel_l2;
use sd_models::pipeline::{LoadOptions, Params, StableDiffusion};
use sd_models::{CpuBackend, Error};

use common::fixtures::{read_json, read_tensors, root};

fn dir() -> PathBuf {
    root().join("textual_inversion")
}

fn pipe() -> StableDiffusion<CpuBackend> {
    StableDiffusion::from_dir(
        CpuBackend::new(),
        root().join("pipeline/sd1"),
        &LoadOptions::default(),
    )
    .unwrap()
}

/// The tiny pipeline with a setup's embeddings loaded in its order.
fn setup(meta: &serde_json::Value, name: &str) -> StableDiffusion<CpuBackend> {
    let mut p = pipe();
    for load in meta["setups"][name]["loads"].as_array().unwrap() {
        let file = dir().join(load["file"].as_str().unwrap());
        let tokens = p
            .load_textual_inversion(&file, load["token_argument"].as_str())
            .unwrap();
        let added: Vec<&str> = load["added"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["token"].as_str().unwrap())
            .collect();
        assert_eq!(tokens, added, "{name}: tokens of {file:?}");
        for a in load["added"].as_array().unwrap() {
            let ids = p
                .tokenizer()
                .encode_unpadded(a["token"].as_str().unwrap())
                .unwrap();
            assert_eq!(u64::from(ids[1]), a["id"].as_u64().unwrap(), "{name}: {a}");
        }
    }
    p
}

#[test]
fn embeddings_match_diffusers_load_textual_inversion() {
    let meta = read_json(&dir().join("cases.json"));
    let expected = read_tensors(&dir().join("expected.safetensors"));
    let mut worst: f64 = 0.0;
    for (name, case) in meta["cases"].as_object().unwrap() {
        let p = setup(&meta, case["setup"].as_str().unwrap());
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            p.expand_embeddings(prompt),
            case["converted"].as_str().unwrap(),
            "{name}: the prompt as diffusers rewrites it"
        );
        let ids = p.tokenizer().encode(&p.expand_embeddings(prompt)).unwrap();
        let want: Vec<u32> = expected[&format!("{name}.ids")]
            .1
            .iter()
            .map(|&v| v as u32)
            .collect();
        assert_eq!(ids, want, "{name}: ids");
        let b = p.backend();
        let hidden = b
            .download(&p.encode_prompt(prompt, &Params::default()).unwrap())
            .unwrap();
        let err = rel_l2(&hidden, &expected[&format!("{name}.hidden")].1);
        println!("{name}: relative L2 error {err:.2e}");
        worst = worst.max(err);
        assert!(err < 1e-5, "{name}: relative L2 error {err:e}");
    }
    println!("worst {worst:.2e}");
}

/// The ids of a prompt and its embeddings, to check that a failed load changed nothing.
fn fingerprint(p: &StableDiffusion<CpuBackend>) -> (Vec<u32>, Vec<f32>, usize) {
    let prompt = "a photo of <cat-toy> and emb-one";
    let ids = p.tokenizer().encode(prompt).unwrap();
    let e = p
        .backend()
        .download(&p.encode_prompt(prompt, &Params::default()).unwrap())
        .unwrap();
    (ids, e, p.embeddings().len())
}

#[test]
fn refused_files_are_typed_errors_and_change_nothing() {
    let mut p = pipe();
    p.load_textual_inversion(dir().join("diffusers_single.safetensors"), None)
        .unwrap();
    let before = fingerprint(&p);
    let config_error = |r: sd_models::Result<Vec<String>>, needle: &str| match r {
        Err(e @ Error::Config { .. }) => assert!(e.to_string().contains(needle), "{e}"),
        other => panic!("expected a config error containing {needle:?}, got {other:?}"),
    };
    // Another model's width, two tensors, a pickle (never unpickled).
    config_error(
        p.load_textual_inversion(dir().join("wrong_width.safetensors"), None),
        "24 wide",
    );
    config_error(
        p.load_textual_inversion(dir().join("two_keys.safetensors"), Some("emb-one")),
        "not a textual inversion file",
    );
    config_error(
        p.load_textual_inversion(dir().join("pickle.pt"), Some("emb-p")),
        "convert it",
    );
    // A token already in the vocabulary: the same file twice, or a word of the vocabulary.
    assert!(matches!(
        p.load_textual_inversion(dir().join("diffusers_single.safetensors"), None),
        Err(Error::Tokenizer(_))
    ));
    assert!(matches!(
        p.load_textual_inversion(dir().join("diffusers_multi.safetensors"), Some("cat")),
        Err(Error::Tokenizer(_))
    ));
    assert_eq!(fingerprint(&p), before);
}

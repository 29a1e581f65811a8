//! The CLIP tokenizer against transformers' `CLIPTokenizer`.
//!
//! Fixtures: fixtures/tokenizer/, written by `tools/fixtures/generate.py tokenizer`:
//! `vocab.json` and `merges.txt` (CLIP's vocabulary, derived from open_clip's
//! `bpe_simple_vocab_16e6.txt.gz` as CLIP's SimpleTokenizer builds it), `prompts.json` (the ids
//! transformers gives each prompt, padded and truncated to 77 as diffusers asks, and
//! untruncated, for SD 1.x and SD 2.x padding; the backend pipelines), `layouts.json` and
//! `layouts/` (the config files of diffusers' tokenizer folders and transformers' ids and
//! pipeline for each). Every id must match exactly.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use sd_models::Error;
use sd_models::clip::tokenizer::{ClipTokenizer, LongPrompt, PadToken};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tokenizer")
}

fn load(name: &str) -> Value {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run tools/fixtures/generate.py tokenizer)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
        .collect()
}

/// One prompt of prompts.json.
struct Case {
    prompt: String,
    sd1: Vec<u32>,
    sd2: Vec<u32>,
    sd1_unpadded: Vec<u32>,
    sd2_unpadded: Vec<u32>,
}

fn cases() -> (Value, Vec<Case>) {
    let json = load("prompts.json");
    let cases = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| Case {
            prompt: case["prompt"].as_str().unwrap().to_owned(),
            sd1: ids(&case["sd1"]),
            sd2: ids(&case["sd2"]),
            sd1_unpadded: ids(&case["sd1_unpadded"]),
            sd2_unpadded: ids(&case["sd2_unpadded"]),
        })
        .collect();
    (json, cases)
}

fn sd1() -> ClipTokenizer {
    ClipTokenizer::from_files(fixtures().join("vocab.json"), fixtures().join("merges.txt")).unwrap()
}

fn sd2() -> ClipTokenizer {
    ClipTokenizer::from_files_with_pad(
        fixtures().join("vocab.json"),
        fixtures().join("merges.txt"),
        PadToken::Exclamation,
    )
    .unwrap()
}

/// A scratch folder under the system's temporary directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sd-models-clip-tokenizer-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A folder with the fixture's vocab.json and merges.txt.
    fn with_vocabulary(name: &str) -> Self {
        let scratch = Scratch::new(name);
        for file in ["vocab.json", "merges.txt"] {
            std::fs::copy(fixtures().join(file), scratch.0.join(file)).unwrap();
        }
        scratch
    }

    fn write(&self, file: &str, content: &str) -> PathBuf {
        let path = self.0.join(file);
        std::fs::write(&path, content).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn check_prompts(tokenizer: &ClipTokenizer, cases: &[Case], sd2: bool) {
    let mut failures = Vec::new();
    for case in cases {
        let (padded, unpadded) = if sd2 {
            (&case.sd2, &case.sd2_unpadded)
        } else {
            (&case.sd1, &case.sd1_unpadded)
        };
        let ours = tokenizer.encode(&case.prompt).unwrap();
        if &ours != padded {
            failures.push(format!(
                "{:?}:\n  ours         {ours:?}\n  transformers {padded:?}",
                case.prompt
            ));
        }
        let ours = tokenizer.encode_unpadded(&case.prompt).unwrap();
        if &ours != unpadded {
            failures.push(format!(
                "{:?} (unpadded):\n  ours         {ours:?}\n  transformers {unpadded:?}",
                case.prompt
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn sd1_ids_match_transformers() {
    let (json, cases) = cases();
    assert!(cases.len() >= 60, "{} prompts", cases.len());
    let tokenizer = sd1();
    assert_eq!(
        tokenizer.pad_id() as u64,
        json["pad_ids"]["sd1"].as_u64().unwrap()
    );
    assert_eq!(
        tokenizer.vocab_size() as u64,
        json["vocab_size"].as_u64().unwrap()
    );
    assert_eq!(
        tokenizer.max_length() as u64,
        json["context_length"].as_u64().unwrap()
    );
    check_prompts(&tokenizer, &cases, false);
}

#[test]
fn sd2_ids_match_transformers() {
    let (json, cases) = cases();
    let tokenizer = sd2();
    assert_eq!(
        tokenizer.pad_id() as u64,
        json["pad_ids"]["sd2"].as_u64().unwrap()
    );
    assert_eq!(tokenizer.pad_token(), "!");
    check_prompts(&tokenizer, &cases, true);
}

#[test]
fn a_folder_with_only_the_vocabulary_is_sd1() {
    let (_, cases) = cases();
    let tokenizer = ClipTokenizer::from_dir(fixtures()).unwrap();
    check_prompts(&tokenizer, &cases, false);
    let tokenizer = ClipTokenizer::from_dir_with_pad(fixtures(), PadToken::Exclamation).unwrap();
    check_prompts(&tokenizer, &cases, true);
}

#[test]
fn the_empty_prompt_is_start_end_and_padding() {
    let (_, cases) = cases();
    let empty = cases.iter().find(|c| c.prompt.is_empty()).unwrap();
    for (tokenizer, expected) in [(sd1(), &empty.sd1), (sd2(), &empty.sd2)] {
        let ids = tokenizer.encode("").unwrap();
        assert_eq!(&ids, expected);
        assert_eq!(ids[0], tokenizer.bos_id());
        assert_eq!(ids[1], tokenizer.eos_id());
        assert!(ids[2..].iter().all(|&id| id == tokenizer.pad_id()));
        assert_eq!(tokenizer.encode_chunks("").unwrap(), vec![ids]);
    }
}

/// The rows the chunked mode must give, built from transformers' untruncated ids.
fn expected_chunks(unpadded: &[u32], pad: u32, max_length: usize) -> Vec<Vec<u32>> {
    let (bos, eos) = (unpadded[0], unpadded[unpadded.len() - 1]);
    let content = &unpadded[1..unpadded.len() - 1];
    let row = |chunk: &[u32]| {
        let mut row = vec![bos];
        row.extend_from_slice(chunk);
        row.push(eos);
        row.resize(max_length, pad);
        row
    };
    if content.is_empty() {
        vec![row(&[])]
    } else {
        content.chunks(max_length - 2).map(row).collect()
    }
}

#[test]
fn chunks_of_long_prompts_match_the_untruncated_ids() {
    let (_, cases) = cases();
    let mut multi_chunk = 0;
    for (tokenizer, sd2) in [(sd1(), false), (sd2(), true)] {
        for case in &cases {
            let (padded, unpadded) = if sd2 {
                (&case.sd2, &case.sd2_unpadded)
            } else {
                (&case.sd1, &case.sd1_unpadded)
            };
            let expected = expected_chunks(unpadded, tokenizer.pad_id(), 77);
            let rows = tokenizer.encode_chunks(&case.prompt).unwrap();
            assert_eq!(rows, expected, "{:?}", case.prompt);
            assert_eq!(
                tokenizer
                    .encode_long(&case.prompt, LongPrompt::Chunks)
                    .unwrap(),
                rows
            );
            // Truncation keeps the first chunk, as transformers truncates.
            assert_eq!(&rows[0], padded, "{:?}", case.prompt);
            let truncated = tokenizer
                .encode_long(&case.prompt, LongPrompt::Truncate)
                .unwrap();
            assert_eq!(truncated, vec![padded.clone()]);
            if rows.len() > 1 {
                multi_chunk += 1;
            }
        }
    }
    assert_eq!(LongPrompt::default(), LongPrompt::Truncate);
    assert!(multi_chunk >= 10, "{multi_chunk} prompts over 75 tokens");
}

/// A pipeline's JSON without the vocabulary and merges (replaced by their sizes) and without
/// the decoder (this crate does not decode).
fn comparable_pipeline(mut pipeline: Value) -> Value {
    let model = &mut pipeline["model"];
    for key in ["vocab", "merges"] {
        if let Some(size) = model[key]
            .as_object()
            .map(|o| o.len())
            .or_else(|| model[key].as_array().map(|a| a.len()))
        {
            model[key] = Value::from(size);
        }
    }
    pipeline.as_object_mut().unwrap().remove("decoder");
    pipeline
}

fn check_pipeline(tokenizer: &ClipTokenizer, expected: &Value, name: &str) {
    let ours: Value =
        serde_json::from_str(&tokenizer.pipeline().to_string(false).unwrap()).unwrap();
    let ours = comparable_pipeline(ours);
    let expected = comparable_pipeline(expected.clone());
    assert_eq!(
        ours,
        expected,
        "{name}: ours\n{}\ntransformers\n{}",
        serde_json::to_string_pretty(&ours).unwrap(),
        serde_json::to_string_pretty(&expected).unwrap()
    );
}

#[test]
fn the_pipelines_are_transformers_backend_pipelines() {
    let (json, _) = cases();
    check_pipeline(&sd1(), &json["pipelines"]["sd1"], "sd1");
    check_pipeline(&sd2(), &json["pipelines"]["sd2"], "sd2");
}

#[test]
fn diffusers_folder_layouts_match_transformers() {
    let json = load("layouts.json");
    let prompts: Vec<&str> = json["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let layouts = json["layouts"].as_array().unwrap();
    assert!(layouts.len() >= 5);
    for layout in layouts {
        let name = layout["name"].as_str().unwrap();
        let scratch = Scratch::with_vocabulary(name);
        for file in layout["files"].as_array().unwrap() {
            let file = file.as_str().unwrap();
            std::fs::copy(
                fixtures().join("layouts").join(name).join(file),
                scratch.0.join(file),
            )
            .unwrap();
        }
        let tokenizer = match layout["kwargs"]["pad_token"].as_str() {
            Some(pad) => {
                ClipTokenizer::from_dir_with_pad(&scratch.0, PadToken::Token(pad.to_owned()))
            }
            None => ClipTokenizer::from_dir(&scratch.0),
        }
        .unwrap();
        assert_eq!(
            tokenizer.max_length() as u64,
            layout["model_max_length"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            tokenizer.pad_token(),
            layout["pad_token"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(
            tokenizer.pad_id() as u64,
            layout["pad_id"].as_u64().unwrap(),
            "{name}"
        );
        check_pipeline(&tokenizer, &layout["pipeline"], name);
        let expected = layout["ids"].as_array().unwrap();
        assert_eq!(expected.len(), prompts.len());
        for (prompt, expected) in prompts.iter().zip(expected) {
            assert_eq!(
                tokenizer.encode(prompt).unwrap(),
                ids(expected),
                "{name}: {prompt:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

fn assert_io_error(result: sd_models::Result<ClipTokenizer>, file: &Path) {
    match result {
        Err(Error::Io { path, .. }) => assert_eq!(path, file),
        Err(other) => panic!("expected an I/O error for {}, got {other}", file.display()),
        Ok(_) => panic!("expected an I/O error for {}", file.display()),
    }
}

/// A config error naming `file`, whose message contains `needle`.
fn assert_config_error(result: sd_models::Result<ClipTokenizer>, file: &Path, needle: &str) {
    match result {
        Err(error @ Error::Config { .. }) => {
            let Error::Config { what, message } = &error else {
                unreachable!()
            };
            assert_eq!(Path::new(what), file, "{error}");
            assert!(message.contains(needle), "{error} (expected {needle:?})");
        }
        Err(other) => panic!(
            "expected a config error for {}, got {other}",
            file.display()
        ),
        Ok(_) => panic!("expected a config error for {}", file.display()),
    }
}

#[test]
fn missing_files_are_io_errors_naming_the_file() {
    let scratch = Scratch::new("missing");
    let vocab = scratch.0.join("vocab.json");
    let merges = fixtures().join("merges.txt");
    assert_io_error(ClipTokenizer::from_files(&vocab, &merges), &vocab);

    let vocab = fixtures().join("vocab.json");
    let merges = scratch.0.join("merges.txt");
    assert_io_error(ClipTokenizer::from_files(&vocab, &merges), &merges);

    // A folder without the vocabulary.
    let result = ClipTokenizer::from_dir(&scratch.0);
    assert_io_error(result, &scratch.0.join("vocab.json"));
}

#[test]
fn malformed_vocabularies_are_config_errors_naming_the_file() {
    let scratch = Scratch::new("bad-vocab");
    let merges = fixtures().join("merges.txt");
    for (content, needle) in [
        ("{\"a\": 0,", "not valid JSON"),
        ("[\"a\", \"b\"]", "expected a JSON object"),
        ("{}", "empty"),
        ("{\"a\": \"zero\"}", "\"a\""),
        ("{\"a\": -1}", "\"a\""),
        ("{\"a\": 1.5}", "\"a\""),
        ("{\"a\": 4294967296}", "\"a\""),
    ] {
        let vocab = scratch.write("vocab.json", content);
        assert_config_error(ClipTokenizer::from_files(&vocab, &merges), &vocab, needle);
    }
    let vocab = scratch.0.join("vocab.json");
    std::fs::write(&vocab, [0xff_u8, 0xfe, 0x00]).unwrap();
    assert_config_error(ClipTokenizer::from_files(&vocab, &merges), &vocab, "UTF-8");
}

#[test]
fn malformed_merges_are_config_errors_naming_the_file_and_line() {
    let scratch = Scratch::new("bad-merges");
    let vocab = fixtures().join("vocab.json");
    for (content, needle) in [
        ("#version: 0.2\ni n\nt h e\n", "line 3"),
        ("#version: 0.2\nin\n", "line 2"),
        ("i n\n\nt h\n", "line 2"),
        ("i  n\n", "line 1"),
        ("#version: 0.2\nq zzzzzzzzzz\n", "not in the vocabulary"),
    ] {
        let merges = scratch.write("merges.txt", content);
        assert_config_error(ClipTokenizer::from_files(&vocab, &merges), &merges, needle);
    }
}

#[test]
fn special_tokens_outside_the_vocabulary_are_config_errors() {
    let scratch = Scratch::new("no-special");
    let vocab = scratch.write("vocab.json", "{\"a\": 0, \"b\": 1, \"ab</w>\": 2}");
    let merges = scratch.write("merges.txt", "#version: 0.2\n");
    assert_config_error(
        ClipTokenizer::from_files(&vocab, &merges),
        &vocab,
        "<|startoftext|>",
    );

    let vocab = fixtures().join("vocab.json");
    let merges = fixtures().join("merges.txt");
    let pad = PadToken::Token("<pad>".into());
    assert_config_error(
        ClipTokenizer::from_files_with_pad(&vocab, &merges, pad),
        &vocab,
        "<pad>",
    );
}

#[test]
fn malformed_config_files_are_config_errors_naming_the_file() {
    let scratch = Scratch::with_vocabulary("bad-config");
    let config = scratch.0.join("tokenizer_config.json");
    for (content, needle) in [
        ("{\"model_max_length\": 77", "not valid JSON"),
        ("[77]", "expected a JSON object"),
        ("{\"model_max_length\": \"77\"}", "model_max_length"),
        ("{\"model_max_length\": 2}", "model_max_length"),
        ("{\"model_max_length\": 1e30}", "model_max_length"),
        ("{\"pad_token\": 5}", "pad_token"),
        ("{\"pad_token\": {\"lstrip\": false}}", "content"),
        (
            "{\"eos_token\": {\"content\": \"x\", \"normalized\": 1}}",
            "normalized",
        ),
        ("{\"padding_side\": \"left\"}", "padding_side"),
        (
            "{\"added_tokens_decoder\": {\"x\": {\"content\": \"!\"}}}",
            "token id",
        ),
        ("{\"added_tokens_decoder\": []}", "added_tokens_decoder"),
    ] {
        std::fs::write(&config, content).unwrap();
        assert_config_error(ClipTokenizer::from_dir(&scratch.0), &config, needle);
    }
    // A null pad token leaves nothing to pad with.
    std::fs::write(&config, "{\"pad_token\": null}").unwrap();
    assert_config_error(ClipTokenizer::from_dir(&scratch.0), &config, "pad_token");
    // Special tokens outside the vocabulary.
    std::fs::write(&config, "{\"pad_token\": \"<pad>\"}").unwrap();
    assert_config_error(ClipTokenizer::from_dir(&scratch.0), &config, "<pad>");
    std::fs::write(&config, "{\"additional_special_tokens\": [\"<extra>\"]}").unwrap();
    assert_config_error(ClipTokenizer::from_dir(&scratch.0), &config, "<extra>");

    std::fs::remove_file(&config).unwrap();
    let map = scratch.write("special_tokens_map.json", "{\"pad_token\": [\"!\"]}");
    assert_config_error(ClipTokenizer::from_dir(&scratch.0), &map, "pad_token");
}

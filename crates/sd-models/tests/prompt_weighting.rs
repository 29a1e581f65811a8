//! AUTOMATIC1111's prompt weighting: the parser against the cases A1111's own
//! `parse_prompt_attention` documents (and more: nesting, escapes, numbers, unbalanced
//! brackets, BREAK), the chunking with the real CLIP vocabulary (75 tokens, BREAK, the comma
//! backtrack), and the weighted embeddings against the rule written out here from the
//! unweighted ones.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sd_models::CpuBackend;
use sd_models::backend::{BackendBase, DataOps};
use sd_models::clip::{ClipTokenizer, PromptPart, parse_weighted};
use sd_models::pipeline::{LoadOptions, Params, StableDiffusion};

use common::fixtures::root;

fn t(text: &str, weight: f64) -> PromptPart {
    PromptPart::Text {
        text: text.into(),
        weight,
    }
}

#[test]
fn the_parser_matches_a1111s_documented_cases() {
    let b = PromptPart::Break;
    let cases: Vec<(&str, Vec<PromptPart>)> = vec![
        // The examples of A1111's docstring, with its values to the last bit.
        ("normal text", vec![t("normal text", 1.0)]),
        (
            "an (important) word",
            vec![t("an ", 1.0), t("important", 1.1), t(" word", 1.0)],
        ),
        ("(unbalanced", vec![t("unbalanced", 1.1)]),
        ("\\(literal\\]", vec![t("(literal]", 1.0)]),
        ("(unnecessary)(parens)", vec![t("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            vec![
                t("a ", 1.0),
                t("house", 1.5730000000000004),
                t(" ", 1.1),
                t("on", 1.0),
                t(" a ", 1.1),
                t("hill", 0.55),
                t(", sun, ", 1.1),
                t("sky", 1.4641000000000006),
                t(".", 1.1),
            ],
        ),
        // Nesting and the other brackets.
        ("((word))", vec![t("word", 1.2100000000000002)]),
        ("[word]", vec![t("word", 1.0 / 1.1)]),
        ("[[word]]", vec![t("word", 1.0 / 1.1 / 1.1)]),
        ("(word:1.5)", vec![t("word", 1.5)]),
        ("(word: 0.25 )", vec![t("word", 0.25)]),
        ("(a (b:2) c)", vec![t("a ", 1.1), t("b", 2.2), t(" c", 1.1)]),
        ("(word:+.5)", vec![t("word", 0.5)]),
        // Unbalanced closing brackets and stray colons are text.
        ("a) b]", vec![t("a) b]", 1.0)]),
        ("time: noon", vec![t("time: noon", 1.0)]),
        ("ratio:2)", vec![t("ratio:2)", 1.0)]),
        // A weight that is not a number stays text (A1111 raises on it).
        ("(a:1.2.3)", vec![t("a:1.2.3)", 1.1)]),
        // Escapes.
        ("\\\\ and \\", vec![t("\\ and ", 1.0)]),
        ("(\\(x\\))", vec![t("(x)", 1.1)]),
        // BREAK, a word on its own.
        (
            "a cat BREAK a dog",
            vec![t("a cat", 1.0), b.clone(), t("a dog", 1.0)],
        ),
        (
            "BREAKFAST BREAK",
            vec![t("BREAKFAST", 1.0), b.clone(), t("", 1.0)],
        ),
        (
            "(red BREAK blue)",
            vec![t("red", 1.1), b.clone(), t("blue", 1.1)],
        ),
        // Nothing.
        ("", vec![t("", 1.0)]),
        ("()", vec![t("", 1.0)]),
    ];
    for (prompt, want) in cases {
        assert_eq!(parse_weighted(prompt), want, "{prompt:?}");
    }
}

fn tokenizer() -> ClipTokenizer {
    let dir = root().join("tokenizer");
    ClipTokenizer::from_files(dir.join("vocab.json"), dir.join("merges.txt")).unwrap()
}

#[test]
fn chunks_hold_75_tokens_break_early_and_move_the_text_after_a_recent_comma() {
    let tok = tokenizer();
    let (bos, eos) = (tok.bos_id(), tok.eos_id());
    // Plain text: the same ids as the plain encoding, weight 1 everywhere.
    let chunks = tok
        .encode_weighted(&parse_weighted("a photo of a cat"))
        .unwrap();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].ids, tok.encode("a photo of a cat").unwrap());
    assert!(chunks[0].weights.iter().all(|&w| w == 1.0));
    // Weights follow their tokens; start, end and padding stay 1.
    let chunks = tok
        .encode_weighted(&parse_weighted("a (red:1.5) cat"))
        .unwrap();
    assert_eq!(chunks[0].ids, tok.encode("a red cat").unwrap());
    assert_eq!(&chunks[0].weights[..5], &[1.0, 1.0, 1.5, 1.0, 1.0]);
    // BREAK pads the chunk and starts another.
    let chunks = tok
        .encode_weighted(&parse_weighted("a cat BREAK a dog"))
        .unwrap();
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[0].ids, tok.encode("a cat").unwrap());
    assert_eq!(chunks[1].ids, tok.encode("a dog").unwrap());
    // 80 words: 75 in the first chunk, 5 in the second.
    let words = vec!["cat"; 80].join(" ");
    let chunks = tok.encode_weighted(&parse_weighted(&words)).unwrap();
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[0].ids[76], eos);
    assert!(chunks[0].ids[1..76].iter().all(|&id| id != eos));
    assert_eq!(chunks[1].ids[0], bos);
    assert_eq!(chunks[1].ids[6], eos);
    // A comma among the last 20 tokens of a full chunk: what follows it moves on.
    let prompt = format!(
        "{}, {}",
        vec!["cat"; 60].join(" "),
        vec!["dog"; 20].join(" ")
    );
    let chunks = tok.encode_weighted(&parse_weighted(&prompt)).unwrap();
    assert_eq!(chunks.len(), 2);
    let comma = tok.encode_unpadded(",").unwrap()[1];
    assert_eq!(chunks[0].ids[61], comma);
    assert_eq!(chunks[0].ids[62], eos);
    let dog = tok.encode_unpadded("dog").unwrap()[1];
    assert_eq!(&chunks[1].ids[1..21], &[dog; 20]);
    // The empty prompt is one chunk of padding.
    let chunks = tok.encode_weighted(&parse_weighted("")).unwrap();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].ids, tok.encode("").unwrap());
}

#[test]
fn weighted_embeddings_follow_a1111s_rule() {
    let pipe = StableDiffusion::from_dir(
        CpuBackend::new(),
        root().join("pipeline/sd1"),
        &LoadOptions::default(),
    )
    .unwrap();
    let b = pipe.backend();
    let weighted = Params {
        prompt_weighting: true,
        ..Params::default()
    };
    let plain = Params::default();
    let prompt = "a (red:1.5) fox in [snow]";
    let got = b
        .download(&pipe.encode_prompt(prompt, &weighted).unwrap())
        .unwrap();
    // The rule, from the unweighted embeddings of the same tokens: each token's row times
    // its weight, then the whole rescaled to the unweighted mean.
    let z = b
        .download(&pipe.encode_prompt("a red fox in snow", &plain).unwrap())
        .unwrap();
    let d = z.len() / 77;
    let mut w = vec![1.0_f32; 77];
    w[2] = 1.5; // red
    w[5] = (1.0 / 1.1) as f32; // snow
    let mut want: Vec<f32> = z
        .chunks_exact(d)
        .zip(&w)
        .flat_map(|(row, &w)| row.iter().map(move |v| v * w))
        .collect();
    let mean = |x: &[f32]| x.iter().map(|&v| f64::from(v)).sum::<f64>() / x.len() as f64;
    let factor = (mean(&z) / mean(&want)) as f32;
    want.iter_mut().for_each(|v| *v *= factor);
    assert_eq!(got.len(), want.len());
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0_f32, f32::max);
    assert!(err < 1e-5, "max difference {err}");
    // And the weighting changes them.
    assert!(got.iter().zip(&z).any(|(a, b)| (a - b).abs() > 1e-3));
    // Plain prompts are unchanged by the syntax being on.
    let same = b
        .download(&pipe.encode_prompt("a red fox in snow", &weighted).unwrap())
        .unwrap();
    assert_eq!(same, z);
    // A long weighted prompt is chunked, whatever Params::long_prompt says.
    let long = format!("({})", vec!["fox"; 100].join(" "));
    let e = pipe.encode_prompt(&long, &weighted).unwrap();
    assert_eq!(b.shape(&e)[1], 2 * 77);
    // A full generation reads it too.
    let q = Params {
        prompt: "a (red:1.3) fox BREAK snow".into(),
        negative_prompt: "[blurry]".into(),
        steps: 2,
        prompt_weighting: true,
        width: Some(64),
        height: Some(64),
        ..Params::default()
    };
    let g = pipe
        .txt2img(&q, |_| sd_models::pipeline::Control::Continue)
        .unwrap()
        .into_generation()
        .unwrap();
    assert!(g.pixels.iter().all(|v| v.is_finite()));
}

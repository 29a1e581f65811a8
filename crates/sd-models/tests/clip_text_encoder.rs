//! The CLIP text encoder against transformers (fixtures/clip, written by
//! tools/fixtures/generate.py clip): relative L2 error <= 1e-5 for the last hidden state,
//! every layer's hidden state, the pooled output or projected embeddings, and clip skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use safetensors::SafeTensors;
use sd_models::backend::DataOps;
use sd_models::backend::conformance::rel_l2;
use sd_models::clip::{ClipTextConfig, ClipTextModel};
use sd_models::weights::{DType, LoadDType, Variant};
use sd_models::{CpuBackend, Error};

const RTOL: f64 = 1e-5;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/clip")
        .join(name)
}

fn expected(name: &str) -> (Vec<u8>, Vec<Vec<u32>>) {
    let bytes = std::fs::read(dir(name).join("expected.safetensors")).unwrap();
    let ids: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir(name).join("input_ids.json")).unwrap())
            .unwrap();
    let ids = ids["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    (bytes, ids)
}

fn tensor(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn check(what: &str, got: &[f32], want: &[f32]) {
    let err = rel_l2(got, want);
    assert!(err <= RTOL, "{what}: relative L2 error {err:e}");
    println!("{what}: {err:.1e}");
}

#[test]
fn text_encoders_match_transformers() {
    let cpu = CpuBackend::new();
    for name in ["sd1", "sd2", "eos_first"] {
        let model = ClipTextModel::from_dir(&cpu, dir(name), &[Variant::Default], true).unwrap();
        let (bytes, ids) = expected(name);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let out = model.forward(&cpu, &ids).unwrap();
        check(
            &format!("{name} last_hidden_state"),
            &cpu.download(&out.last_hidden_state).unwrap(),
            &tensor(&st, "last_hidden_state"),
        );
        let all: Vec<f32> = out
            .hidden_states
            .iter()
            .flat_map(|h| cpu.download(h).unwrap())
            .collect();
        check(
            &format!("{name} hidden_states"),
            &all,
            &tensor(&st, "hidden_states"),
        );
        match &out.text_embeds {
            Some(e) => check(
                &format!("{name} text_embeds"),
                &cpu.download(e).unwrap(),
                &tensor(&st, "text_embeds"),
            ),
            None => check(
                &format!("{name} pooled_output"),
                &cpu.download(&out.pooled_output).unwrap(),
                &tensor(&st, "pooled_output"),
            ),
        }
        let skip = model.encode(&cpu, &ids, 1).unwrap();
        check(
            &format!("{name} clip_skip 1"),
            &cpu.download(&skip).unwrap(),
            &tensor(&st, "clip_skip_1"),
        );
        let no_skip = model.encode(&cpu, &ids, 0).unwrap();
        check(
            &format!("{name} clip_skip 0"),
            &cpu.download(&no_skip).unwrap(),
            &tensor(&st, "last_hidden_state"),
        );
    }
}

#[test]
fn half_precision_weights_keep_the_embedding_tables_half() {
    let cpu = CpuBackend::new();
    let (bytes, ids) = expected("sd1");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let want = tensor(&st, "last_hidden_state");
    for (dtype, stored, tol) in [
        (LoadDType::F32, DType::F32, RTOL),
        (LoadDType::F16, DType::F16, 2e-3),
        (LoadDType::BF16, DType::BF16, 2e-2),
    ] {
        let model =
            ClipTextModel::from_dir_as(&cpu, dir("sd1"), &[Variant::Default], true, dtype).unwrap();
        assert_eq!(model.embeddings.token_embedding.dtype(), stored);
        assert_eq!(model.embeddings.position_embedding.dtype(), stored);
        let out = model.forward(&cpu, &ids).unwrap();
        let err = rel_l2(&cpu.download(&out.last_hidden_state).unwrap(), &want);
        assert!(err <= tol, "{dtype:?}: relative L2 error {err:e}");
        println!("{dtype:?} weights: last_hidden_state {err:.1e}");
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let cpu = CpuBackend::new();
    let model = ClipTextModel::from_dir(&cpu, dir("sd1"), &[Variant::Default], true).unwrap();
    let vocab = model.config().vocab_size;
    assert!(matches!(
        model.forward(&cpu, &[vec![0, vocab as u32, 2]]),
        Err(Error::TokenOutOfVocab { id, vocab_size }) if id == vocab as u32 && vocab_size == vocab
    ));
    assert!(matches!(
        model.forward(&cpu, &[vec![1; 78]]),
        Err(Error::Prompt(_))
    ));
    assert!(matches!(model.forward(&cpu, &[]), Err(Error::Prompt(_))));
    assert!(matches!(
        model.forward(&cpu, &[vec![1, 2], vec![1]]),
        Err(Error::Prompt(_))
    ));
    assert!(matches!(
        model.encode(&cpu, &[vec![1, 2]], 3),
        Err(Error::Config { .. })
    ));

    let err = ClipTextConfig::from_json(
        r#"{"hidden_size": 64, "num_attention_heads": 4, "flux_capacitor": 1}"#,
        "config.json",
    )
    .unwrap_err();
    assert!(err.to_string().contains("flux_capacitor"), "{err}");
    let err = ClipTextConfig::from_json(
        r#"{"hidden_size": 66, "num_attention_heads": 4}"#,
        "config.json",
    )
    .unwrap_err();
    assert!(err.to_string().contains("not a multiple"), "{err}");
    let err = ClipTextConfig::from_json(r#"{"hidden_act": "relu6"}"#, "config.json").unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");

    // A folder whose weights are missing names what it looked for.
    let empty = std::env::temp_dir().join(format!("sd-models-clip-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(dir("sd1").join("config.json"), empty.join("config.json")).unwrap();
    let err = ClipTextModel::from_dir(&cpu, &empty, &[Variant::Default], true).unwrap_err();
    std::fs::remove_dir_all(&empty).unwrap();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}

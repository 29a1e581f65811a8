//! LoRA on the tiny pipeline: files in the kohya and PEFT layouts written here, applied and
//! switched without reloading from disk. Applying none restores the model bit for bit, the
//! same set twice gives the same bits, a report names what matched nothing, and a LoRA for
//! another model is an error that leaves the pipeline as it was.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use safetensors::Dtype;
use safetensors::tensor::TensorView;
use sd_models::backend::DataOps;
use sd_models::lora::Lora;
use sd_models::pipeline::{LoadOptions, Params, StableDiffusion};
use sd_models::{CpuBackend, Error};

use common::fixtures::{root, scratch_dir};

fn pipe() -> StableDiffusion<CpuBackend> {
    StableDiffusion::from_dir(
        CpuBackend::new(),
        root().join("pipeline/sd1"),
        &LoadOptions::default(),
    )
    .unwrap()
}

/// Writes a LoRA file of `tensors` (name, shape, values) and returns its path.
fn write_lora(name: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> PathBuf {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((k, s, _), b)| {
            (
                (*k).to_owned(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let dir = scratch_dir("sd-models-lora");
    common::fixtures::write_whole(&dir, name, &safetensors::serialize(views, None).unwrap());
    dir.join(name)
}

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + seed) * 0.37).sin() * 0.5)
        .collect()
}

/// What the pipeline computes: the text embeddings of a prompt and the UNet's prediction.
fn outputs(p: &StableDiffusion<CpuBackend>) -> (Vec<f32>, Vec<f32>) {
    let b = p.backend();
    let text = p.encode_prompt("a red fox", &Params::default()).unwrap();
    let x = b.upload(&values(4 * 8 * 8, 1.0), &[1, 4, 8, 8]).unwrap();
    let y = p.unet().forward(b, &x, &[500.0], &text).unwrap();
    (b.download(&text).unwrap(), b.download(&y).unwrap())
}

fn kohya() -> PathBuf {
    let r = 2;
    write_lora(
        "kohya.safetensors",
        &[
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                vec![r, 16],
                values(r * 16, 2.0),
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
                vec![16, r],
                values(16 * r, 3.0),
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
                vec![],
                vec![1.0],
            ),
            (
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                vec![r, 16],
                values(r * 16, 4.0),
            ),
            (
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
                vec![16, r],
                values(16 * r, 5.0),
            ),
            (
                "lora_unet_not_a_module.lora_down.weight",
                vec![r, 16],
                values(r * 16, 6.0),
            ),
            (
                "lora_unet_not_a_module.lora_up.weight",
                vec![16, r],
                values(16 * r, 7.0),
            ),
        ],
    )
}

#[test]
fn loras_switch_without_reloading_and_none_restores_the_model() {
    let mut p = pipe();
    let base = outputs(&p);
    let lora = Lora::open(kohya()).unwrap();
    assert_eq!(lora.modules.len(), 3);
    let report = p.set_loras(std::slice::from_ref(&lora), false).unwrap();
    assert_eq!(report.matched, 2);
    assert_eq!(report.unmatched.len(), 1);
    assert!(report.unmatched[0].ends_with("not_a_module"), "{report:?}");
    let with = outputs(&p);
    assert_ne!(
        with.0, base.0,
        "the text encoder's LoRA changes the embeddings"
    );
    assert_ne!(with.1, base.1, "the UNet's LoRA changes the prediction");
    // The same set again gives the same bits; a fresh load with it too; none restores.
    p.set_loras(std::slice::from_ref(&lora), false).unwrap();
    assert_eq!(outputs(&p), with);
    let mut fresh = pipe();
    fresh.set_loras(std::slice::from_ref(&lora), false).unwrap();
    assert_eq!(outputs(&fresh), with);
    p.set_loras(&[], false).unwrap();
    assert_eq!(outputs(&p), base);
    // A multiplier of 0 changes nothing either.
    p.set_loras(&[lora.clone().with_multiplier(0.0)], false)
        .unwrap();
    assert_eq!(outputs(&p), base);
    // Strict: what matched nothing is an error, and the pipeline is as it was.
    match p.set_loras(std::slice::from_ref(&lora), true) {
        Err(Error::Config { message, .. }) => {
            assert!(message.contains("not_a_module"), "{message}")
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    assert_eq!(outputs(&p), base);
}

#[test]
fn peft_names_and_two_loras_add_up() {
    let r = 3;
    let peft = write_lora(
        "peft.safetensors",
        &[
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
                vec![r, 16],
                values(r * 16, 2.0),
            ),
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight",
                vec![16, r],
                values(16 * r, 3.0),
            ),
        ],
    );
    let mut p = pipe();
    let base = outputs(&p);
    let a = Lora::open(&peft).unwrap();
    // The update is linear in the multiplier: +m then -m cancels (up to rounding).
    let report = p
        .set_loras(
            &[
                a.clone().with_multiplier(0.8),
                a.clone().with_multiplier(-0.8),
            ],
            true,
        )
        .unwrap();
    assert_eq!(report.matched, 2);
    let cancelled = outputs(&p).1;
    let diff = cancelled
        .iter()
        .zip(&base.1)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0_f32, f32::max);
    assert!(diff < 1e-5, "{diff}");
    p.set_loras(&[a.with_multiplier(0.8)], true).unwrap();
    assert_ne!(outputs(&p).1, base.1);
}

#[test]
fn bad_loras_are_typed_errors_that_change_nothing() {
    let mut p = pipe();
    let base = outputs(&p);
    // Another model's shapes (an SD 2-sized update on this UNet).
    let wide = write_lora(
        "wide.safetensors",
        &[
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
                vec![2, 1024],
                values(2 * 1024, 1.0),
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight",
                vec![16, 2],
                values(32, 2.0),
            ),
        ],
    );
    let e = p
        .set_loras(&[Lora::open(&wide).unwrap()], false)
        .unwrap_err();
    assert!(e.to_string().contains("another model"), "{e}");
    assert_eq!(outputs(&p), base);
    // Ranks that differ, a lone matrix, a non-finite alpha, no update at all, a pickle.
    let bad = |name: &str, tensors: &[(&str, Vec<usize>, Vec<f32>)]| {
        let e = Lora::open(write_lora(name, tensors)).unwrap_err();
        assert!(matches!(e, Error::Config { .. }), "{name}: {e}");
        e.to_string()
    };
    let e = bad(
        "ranks.safetensors",
        &[
            ("lora_unet_x.lora_down.weight", vec![2, 16], values(32, 1.0)),
            ("lora_unet_x.lora_up.weight", vec![16, 3], values(48, 1.0)),
        ],
    );
    assert!(e.contains("rank"), "{e}");
    bad(
        "lone.safetensors",
        &[("lora_unet_x.lora_down.weight", vec![2, 16], values(32, 1.0))],
    );
    bad(
        "alpha.safetensors",
        &[
            ("lora_unet_x.lora_down.weight", vec![2, 16], values(32, 1.0)),
            ("lora_unet_x.lora_up.weight", vec![16, 2], values(32, 1.0)),
            ("lora_unet_x.alpha", vec![], vec![f32::NAN]),
        ],
    );
    bad(
        "none.safetensors",
        &[("something", vec![2], vec![1.0, 2.0])],
    );
    let e = Lora::open(root().join("textual_inversion/pickle.pt")).unwrap_err();
    assert!(e.to_string().contains("pickle"), "{e}");
    // A multiplier that is not a number.
    let lora = Lora::open(kohya()).unwrap().with_multiplier(f64::NAN);
    assert!(p.set_loras(&[lora], false).is_err());
    assert_eq!(outputs(&p), base);
}

/// A reference folder's inputs and outputs (`cases.json`, `expected.safetensors`: the
/// text encoder's ids, the UNet's inputs, and each case's outputs).
struct Reference {
    meta: serde_json::Value,
    expected: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Reference {
    fn read(dir: &std::path::Path) -> Self {
        use common::fixtures::{read_json, read_tensors};
        Reference {
            meta: read_json(&dir.join("cases.json")),
            expected: read_tensors(&dir.join("expected.safetensors")),
        }
    }

    /// The text encoder's last hidden state for the ids and the UNet's output for the inputs.
    fn run(&self, p: &StableDiffusion<CpuBackend>) -> (Vec<f32>, Vec<f32>) {
        let b = p.backend();
        let input = |name: &str| {
            let (shape, v) = &self.expected[name];
            b.upload(v, shape).unwrap()
        };
        let ids: Vec<u32> = self.expected["inputs.ids"]
            .1
            .iter()
            .map(|&v| v as u32)
            .collect();
        let t = self.meta["timestep"].as_f64().unwrap();
        let hidden = p
            .text_encoder()
            .encode(b, std::slice::from_ref(&ids), 0)
            .unwrap();
        let y = p
            .unet()
            .forward(
                b,
                &input("inputs.sample"),
                &[t],
                &input("inputs.encoder_hidden_states"),
            )
            .unwrap();
        (b.download(&hidden).unwrap(), b.download(&y).unwrap())
    }

    /// The relative errors of `(hidden, unet)` against `case`'s outputs.
    fn errors(&self, case: &str, (h, y): &(Vec<f32>, Vec<f32>)) -> (f64, f64) {
        use sd_models::backend::conformance::rel_l2;
        (
            rel_l2(h, &self.expected[&format!("{case}.text_hidden")].1),
            rel_l2(y, &self.expected[&format!("{case}.unet_out")].1),
        )
    }
}

/// diffusers' `load_lora_weights` + `fuse_lora` on the tiny pipeline (fixtures/lora, written
/// by tools/fixtures/generate.py lora): the UNet's prediction and the text encoder's output
/// after fusing, against ours after `set_loras` with the same multipliers.
#[test]
fn fused_loras_match_diffusers() {
    let dir = root().join("lora");
    let reference = Reference::read(&dir);
    let meta = &reference.meta;
    let mut p = pipe();
    let (eh, ey) = reference.errors("base", &reference.run(&p));
    assert!(eh < 1e-5 && ey < 1e-5);
    for case in ["peft", "kohya", "two"] {
        let c = &meta["cases"][case];
        let scale = c["fuse_lora"]["lora_scale"].as_f64().unwrap();
        let weights = c["set_adapters"]["adapter_weights"].as_array();
        let loras: Vec<Lora> = c["loads"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let w = weights.map_or(1.0, |w| w[i].as_f64().unwrap());
                Lora::open(dir.join(l["file"].as_str().unwrap()))
                    .unwrap()
                    .with_multiplier(w * scale)
            })
            .collect();
        let report = p.set_loras(&loras, true).unwrap();
        let (eh, ey) = reference.errors(case, &reference.run(&p));
        println!(
            "{case}: {} updates; text {eh:.2e}, unet {ey:.2e}",
            report.matched
        );
        assert!(eh < 1e-5 && ey < 1e-5, "{case}: text {eh:e}, unet {ey:e}");
    }
    // The PEFT file with transformers 4's `text_encoder.text_model.` paths fuses the same.
    let old = Lora::open(dir.join("peft_unet_te_text_model.safetensors"))
        .unwrap()
        .with_multiplier(0.7);
    assert_eq!(p.set_loras(&[old], true).unwrap().matched, 43);
    let (eh, ey) = reference.errors("peft", &reference.run(&p));
    assert!(eh < 1e-5 && ey < 1e-5);
    // So does the same file under the names diffusers wrote before PEFT (attention
    // processors' `to_q_lora`, `lora.down`, `lora_linear_layer`), which diffusers fuses to the
    // same weights (checked by the fixture script).
    assert_eq!(meta["diffusers_old"]["same_fused_weights_as"], "peft");
    let old = Lora::open(dir.join("diffusers_old.safetensors"))
        .unwrap()
        .with_multiplier(0.7);
    let peft = Lora::open(dir.join("peft_unet_te.safetensors")).unwrap();
    let names = |l: &Lora| -> Vec<(String, Option<f64>)> {
        l.modules
            .iter()
            .map(|m| (m.name.clone(), m.alpha))
            .collect()
    };
    assert_eq!(names(&old), names(&peft));
    assert_eq!(p.set_loras(&[old], true).unwrap().matched, 43);
    let (eh, ey) = reference.errors("peft", &reference.run(&p));
    assert!(eh < 1e-5 && ey < 1e-5);
    // The files diffusers refuses are refused here too, leaving the pipeline as it was.
    let before = reference.run(&p);
    let wrong = Lora::open(dir.join("wrong_shape.safetensors")).unwrap();
    assert!(p.set_loras(&[wrong], false).is_err());
    assert!(Lora::open(dir.join("rank_mismatch.safetensors")).is_err());
    assert_eq!(reference.run(&p), before);
}

/// LyCORIS LoHa and LoKr files in kohya's names (fixtures/lora/lycoris, written by
/// tools/fixtures/generate.py lycoris): the Hadamard and Kronecker updates, flat and Tucker
/// convolutions, LoKr with full and decomposed factors, alone, at a multiplier and together,
/// against the reference's merged networks (diffusers' LoKr loading and PEFT's LoHa layers
/// where they take the file, the float64 formula elsewhere).
#[test]
fn lycoris_loha_and_lokr_match_the_reference() {
    let dir = root().join("lora/lycoris");
    let reference = Reference::read(&dir);
    let (meta, expected) = (&reference.meta, &reference.expected);
    let mut p = pipe();
    let (eh, ey) = reference.errors("base", &reference.run(&p));
    assert!(eh < 1e-5 && ey < 1e-5);
    let cases = meta["cases"].as_object().unwrap();
    assert!(cases.len() >= 4);
    for (case, c) in cases {
        let loras: Vec<Lora> = c["loads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                Lora::open(dir.join(l["file"].as_str().unwrap()))
                    .unwrap()
                    .with_multiplier(l["multiplier"].as_f64().unwrap())
            })
            .collect();
        let report = p.set_loras(&loras, true).unwrap();
        let (eh, ey) = reference.errors(case, &reference.run(&p));
        let moved = sd_models::backend::conformance::rel_l2(
            &expected["base.unet_out"].1,
            &expected[&format!("{case}.unet_out")].1,
        );
        println!(
            "{case}: {} updates; text {eh:.2e}, unet {ey:.2e} (the LoRA moves it {moved:.2e})",
            report.matched
        );
        assert!(eh < 1e-5 && ey < 1e-5, "{case}: text {eh:e}, unet {ey:e}");
    }
    // Factors that do not fit: typed errors, the pipeline as it was.
    let before = reference.run(&p);
    let e = Lora::open(dir.join("bad_hadamard.safetensors")).unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e}");
    let wrong = Lora::open(dir.join("lokr_wrong_shape.safetensors")).unwrap();
    let e = p.set_loras(&[wrong], false).unwrap_err();
    assert!(e.to_string().contains("another model"), "{e}");
    assert_eq!(reference.run(&p), before);
}

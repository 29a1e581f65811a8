//! The embedded digits model (`assets/digits`) through [`PixelDiffusion`]: an honest quality
//! test, and the pixel pipeline's behaviour.
//!
//! Quality: a k-nearest-neighbour classifier (k = 5, Euclidean, as scikit-learn's
//! `KNeighborsClassifier(n_neighbors=5)`) fitted on the 1,437 real training digits must label
//! at least 90% of the generated samples, brought back to 8x8, as the digit asked for; and
//! the samples must not be copies of training digits: few of them come closer to a training
//! digit than real digits the model never saw do (thresholds from `evaluate.py`, in
//! `assets/digits/evaluation.json`). Two samplers are tried: DPM-Solver++ (2M, 20 steps,
//! deterministic) and Euler ancestral (30 steps, stochastic).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use sd_models::CpuBackend;
use sd_models::Error;
use sd_models::pipeline::{
    ClassGuidance, Control, Outcome, PixelDiffusion, PixelParams, PixelSamples, SamplerChoice,
};
use serde_json::Value;

fn assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/digits")
}

fn pipe() -> PixelDiffusion<CpuBackend> {
    PixelDiffusion::from_dir(CpuBackend::new(), assets()).unwrap()
}

fn evaluation() -> Value {
    let text = std::fs::read_to_string(assets().join("evaluation.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn number(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_f64()
        .unwrap_or_else(|| panic!("evaluation.json has no number at {path:?}"))
}

/// scikit-learn's digits (`tools/digits/export_data.py`) and the held-out split of
/// `split.json`.
struct Digits {
    train: Vec<([f64; 64], u8)>,
    test: Vec<([f64; 64], u8)>,
}

fn digits() -> Digits {
    let bytes = std::fs::read(assets().join("digits.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let images = file.tensor("images").unwrap();
    let labels = file.tensor("labels").unwrap();
    assert_eq!(images.shape(), [1797, 64]);
    assert_eq!(labels.shape(), [1797]);
    let split: Value =
        serde_json::from_str(&std::fs::read_to_string(assets().join("split.json")).unwrap())
            .unwrap();
    let test: Vec<usize> = split["test_indices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(test.len(), 360);
    let mut d = Digits {
        train: Vec::new(),
        test: Vec::new(),
    };
    for (i, (img, &label)) in images
        .data()
        .chunks_exact(64)
        .zip(labels.data())
        .enumerate()
    {
        let mut x = [0.0; 64];
        for (v, &b) in x.iter_mut().zip(img) {
            *v = f64::from(b);
        }
        if test.binary_search(&i).is_ok() {
            d.test.push((x, label));
        } else {
            d.train.push((x, label));
        }
    }
    assert_eq!(d.train.len(), 1437);
    d
}

fn dist2(a: &[f64; 64], b: &[f64; 64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// The k = 5 vote (uniform weights; a tie goes to the smallest label, as scikit-learn's
/// mode does) and the distance to the nearest training digit.
fn classify(train: &[([f64; 64], u8)], x: &[f64; 64]) -> (u8, f64) {
    let mut d: Vec<(f64, u8)> = train.iter().map(|(t, l)| (dist2(t, x), *l)).collect();
    d.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut votes = [0_usize; 10];
    for &(_, l) in &d[..5] {
        votes[l as usize] += 1;
    }
    let best = (0..10)
        .max_by_key(|&c| (votes[c], std::cmp::Reverse(c)))
        .unwrap();
    (best as u8, d[0].0.sqrt())
}

/// Samples `[N, 1, 16, 16]` in [-1, 1] back in scikit-learn's 8x8, 0..16 space: clamp,
/// 2x2 average pooling, `(x + 1) * 8` (the inverse of the training mapping).
fn to_8x8(samples: &PixelSamples) -> Vec<[f64; 64]> {
    assert_eq!(&samples.shape[1..], [1, 16, 16]);
    samples
        .values
        .chunks_exact(256)
        .map(|s| {
            let mut out = [0.0; 64];
            for (i, o) in out.iter_mut().enumerate() {
                let (y, x) = (i / 8 * 2, i % 8 * 2);
                let sum: f64 = [(0, 0), (0, 1), (1, 0), (1, 1)]
                    .iter()
                    .map(|(dy, dx)| f64::from(s[(y + dy) * 16 + x + dx].clamp(-1.0, 1.0)))
                    .sum();
                *o = (sum / 4.0 + 1.0) * 8.0;
            }
            out
        })
        .collect()
}

#[test]
fn knn_on_held_out_real_digits_matches_scikit_learn() {
    let d = digits();
    let correct = d
        .test
        .iter()
        .filter(|(x, l)| classify(&d.train, x).0 == *l)
        .count();
    let accuracy = correct as f64 / d.test.len() as f64;
    let sklearn = number(&evaluation(), &["real_heldout_knn_accuracy"]);
    println!("kNN (k=5) on the 360 held-out real digits: {accuracy:.4} (scikit-learn {sklearn})");
    assert!((accuracy - sklearn).abs() < 1e-4);
}

fn quality(sampler: &str, steps: usize, per_class: usize) {
    quality_of(&pipe(), sampler, steps, per_class);
}

fn quality_of(pipe: &PixelDiffusion<CpuBackend>, sampler: &str, steps: usize, per_class: usize) {
    let d = digits();
    let e = evaluation();
    let classes: Vec<u32> = (0..10)
        .flat_map(|c| std::iter::repeat_n(c, per_class))
        .collect();
    let params = PixelParams {
        classes: classes.clone(),
        steps,
        sampler: SamplerChoice::Name(sampler.into()),
        seed: 2026,
        ..PixelParams::default()
    };
    let samples = pipe
        .sample(&params, |_| Control::Continue)
        .unwrap()
        .into_generation()
        .unwrap();
    let results: Vec<(u8, f64)> = to_8x8(&samples)
        .iter()
        .map(|x| classify(&d.train, x))
        .collect();
    let n = results.len() as f64;
    let mut per_class_correct = [0_usize; 10];
    for ((label, _), &asked) in results.iter().zip(&classes) {
        if u32::from(*label) == asked {
            per_class_correct[asked as usize] += 1;
        }
    }
    let accuracy = per_class_correct.iter().sum::<usize>() as f64 / n;
    let mut nn: Vec<f64> = results.iter().map(|r| r.1).collect();
    nn.sort_by(f64::total_cmp);
    let median = nn[nn.len() / 2];
    let threshold = number(&e, &["copy_check", "proposed_threshold"]);
    let hard = number(&e, &["copy_check", "proposed_hard_copy_threshold"]);
    let below = nn.iter().filter(|&&v| v < threshold).count() as f64 / n;
    let below_hard = nn.iter().filter(|&&v| v < hard).count() as f64 / n;
    let accept = &["suggested_acceptance"];
    let min_accuracy = number(&e, &[accept[0], "class_accuracy_min"]);
    let max_below = number(&e, &[accept[0], "fraction_below_copy_threshold_max"]);
    let max_below_hard = number(&e, &[accept[0], "fraction_below_hard_copy_threshold_max"]);
    let min_median = number(&e, &[accept[0], "median_nn_distance_min"]);
    println!(
        "{sampler}, {steps} steps, {} samples: class accuracy {accuracy:.3} (per class {:?}); \
         nearest training digit: median {median:.2}, {:.1}% under {threshold}, {:.1}% under {hard}, \
         min {:.2}",
        results.len(),
        per_class_correct,
        100.0 * below,
        100.0 * below_hard,
        nn[0]
    );
    assert!(
        accuracy >= min_accuracy,
        "{accuracy} < {min_accuracy} of the samples labelled as asked"
    );
    assert!(
        below <= max_below,
        "{below} of the samples closer than {threshold}"
    );
    assert!(
        below_hard <= max_below_hard,
        "{below_hard} of the samples closer than {hard}"
    );
    assert!(
        median >= min_median,
        "median distance {median} < {min_median}"
    );
}

#[test]
fn generated_digits_are_the_class_asked_for_and_not_copies_dpm_solver() {
    quality("DPM++ 2M", 20, 30);
}

#[test]
fn generated_digits_are_the_class_asked_for_and_not_copies_euler_ancestral() {
    quality("Euler a", 30, 30);
}

fn few(sampler: &str) -> PixelParams {
    PixelParams {
        classes: vec![3, 1, 4, 1, 5],
        steps: 4,
        sampler: SamplerChoice::Name(sampler.into()),
        seed: 9,
        ..PixelParams::default()
    }
}

fn run(params: &PixelParams) -> PixelSamples {
    match pipe().sample(params, |_| Control::Continue).unwrap() {
        Outcome::Finished(s) => s,
        other => panic!("not finished: {other:?}"),
    }
}

#[test]
fn same_seed_same_samples_whatever_the_network_batch() {
    for sampler in ["DDPM", "Euler a", "DPM++ 2M"] {
        let whole = run(&few(sampler));
        let again = run(&few(sampler));
        assert_eq!(
            whole,
            PixelSamples {
                denoising: whole.denoising,
                ..again
            }
        );
        let pieces = run(&PixelParams {
            max_batch: 2,
            ..few(sampler)
        });
        // Only the GEMMs' blocking sees the batch size: rounding-level differences.
        let diff = whole
            .values
            .iter()
            .zip(&pieces.values)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0_f32, f32::max);
        assert!(
            diff < 1e-4,
            "{sampler}: max_batch changed the result by {diff}"
        );
        assert_eq!(whole.shape, [5, 1, 16, 16]);
        assert!(whole.values.iter().all(|v| v.is_finite()));
        let other_seed = run(&PixelParams {
            seed: 10,
            ..few(sampler)
        });
        assert_ne!(whole.values, other_seed.values);
    }
}

#[test]
fn the_class_changes_the_sample() {
    let a = run(&few("DDIM"));
    let b = run(&PixelParams {
        classes: vec![3, 1, 4, 1, 6],
        ..few("DDIM")
    });
    let image = 256;
    assert_eq!(a.values[..4 * image], b.values[..4 * image]);
    assert_ne!(a.values[4 * image..], b.values[4 * image..]);
}

/// Classifier-free guidance mixes the prediction for the class with the null class's: at
/// scale 1 it is the conditional sample, at scale 0 the sample of the null class (the
/// embedded model has no learned null class, so digit 7 stands in for one), and between
/// them it is neither.
#[test]
fn class_guidance_mixes_the_class_and_the_null_class() {
    let guided = |scale| {
        run(&PixelParams {
            guidance: Some(ClassGuidance {
                scale,
                null_class: 7,
            }),
            ..few("DDIM")
        })
    };
    let max_diff = |a: &PixelSamples, b: &PixelSamples| {
        a.values
            .iter()
            .zip(&b.values)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0_f32, f32::max)
    };
    let plain = run(&few("DDIM"));
    let sevens = run(&PixelParams {
        classes: vec![7; 5],
        ..few("DDIM")
    });
    // The guided batch is twice as large: only the GEMMs' blocking differs.
    assert!(max_diff(&guided(1.0), &plain) < 1e-4);
    assert!(max_diff(&guided(0.0), &sevens) < 1e-4);
    let mid = guided(3.0);
    assert!(max_diff(&mid, &plain) > 1e-2 && max_diff(&mid, &sevens) > 1e-2);
    // A null class the network does not have, or a scale that is not finite, is refused.
    for g in [
        ClassGuidance {
            scale: 2.0,
            null_class: 10,
        },
        ClassGuidance {
            scale: f32::NAN,
            null_class: 9,
        },
    ] {
        let e = pipe()
            .sample(
                &PixelParams {
                    guidance: Some(g),
                    ..few("DDIM")
                },
                |_| Control::Continue,
            )
            .unwrap_err();
        assert!(
            matches!(&e, Error::Config { what, .. } if what == "guidance"),
            "{e}"
        );
    }
}

#[test]
fn the_callback_sees_every_step_and_can_stop_or_cancel() {
    let p = pipe();
    let mut seen = Vec::new();
    let outcome = p
        .sample(&few("DDIM"), |progress| {
            assert_eq!(progress.latents.len(), 5 * 256);
            assert_eq!(progress.pred_original.len(), 5 * 256);
            seen.push(progress.step);
            Control::Continue
        })
        .unwrap();
    assert!(outcome.is_finished());
    assert_eq!(seen, [0, 1, 2, 3]);
    match p
        .sample(&few("DDIM"), |progress| {
            if progress.step == 1 {
                Control::Stop
            } else {
                Control::Continue
            }
        })
        .unwrap()
    {
        Outcome::Stopped(s) => assert_eq!(s.steps_run, 2),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        p.sample(&few("DDIM"), |_| Control::Cancel).unwrap(),
        Outcome::Cancelled { steps_run: 1 }
    );
}

#[test]
fn bad_parameters_are_typed_errors_naming_them() {
    let p = pipe();
    let cases: Vec<(PixelParams, &str)> = vec![
        (
            PixelParams {
                classes: vec![],
                ..few("DDIM")
            },
            "classes",
        ),
        (
            PixelParams {
                classes: vec![2, 10],
                ..few("DDIM")
            },
            "classes",
        ),
        (
            PixelParams {
                steps: 0,
                ..few("DDIM")
            },
            "steps",
        ),
        (
            PixelParams {
                size: Some((18, 16)),
                ..few("DDIM")
            },
            "height",
        ),
        (
            PixelParams {
                sampler: SamplerChoice::Name("no such sampler".into()),
                ..few("DDIM")
            },
            "sampler",
        ),
    ];
    for (params, what) in cases {
        match p.sample(&params, |_| Control::Continue) {
            Err(Error::Config { what: w, message }) => {
                assert_eq!(w, what, "{message}");
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    assert!(matches!(
        PixelDiffusion::from_dir(CpuBackend::new(), assets().join("missing")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn samples_become_grey_images() {
    let s = run(&few("DDIM"));
    let images = s.to_images().unwrap();
    assert_eq!(images.len(), 5);
    assert_eq!((images[0].width(), images[0].height()), (16, 16));
    let unit = s.to_unit();
    let px = images[0].pixel(3, 2).unwrap();
    assert_eq!(px[0], px[1]);
    assert_eq!(px[1], px[2]);
    assert_eq!(f32::from(px[0]), (unit[2 * 16 + 3] * 255.0).round());
}

/// The same bar for a model trained by this library (`train-digits`): the folder in
/// `SD_DIGITS_MODEL`. Run it with
/// `SD_DIGITS_MODEL=digits-rust cargo test --release -p sd-models --test digits -- --ignored trained`.
#[test]
#[ignore = "needs a model trained by train-digits (SD_DIGITS_MODEL=folder)"]
fn a_model_trained_by_train_digits_meets_the_bar() {
    let dir = std::env::var_os("SD_DIGITS_MODEL")
        .expect("SD_DIGITS_MODEL: the folder train-digits wrote");
    let pipe = PixelDiffusion::from_dir(CpuBackend::new(), PathBuf::from(dir)).unwrap();
    quality_of(&pipe, "DPM++ 2M", 20, 30);
}

//! The replay harness: runs a sampler on the stand-in model from a diffusers trajectory's
//! starting point, with the noise diffusers drew, and compares every step.
//!
//! Fixtures: fixtures/samplers/<group>.{json,safetensors}, written by
//! `tools/fixtures/generate.py samplers:<group>`. Tolerance: the largest error of any sample
//! along the trajectory, relative to the trajectory's largest magnitude, is at most 1e-5; so
//! is the largest error of the predicted x0, relative to the larger of the trajectory's and
//! the predicted x0's largest magnitudes (at high noise the x0 estimate divides by
//! sqrt(alpha_bar), which magnifies float32 rounding of the sample, in diffusers as here);
//! timesteps, sigmas and init_noise_sigma match to 1e-5 of their largest magnitude (diffusers
//! keeps them in float32 and computes the training sigmas in float32, which cancels near
//! t = 0; sd-core's own tests hold the formulas to 1e-6 against diffusers run in float64).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use safetensors::SafeTensors;
use sd_schedulers::{Plan, ReplayNoise, Sampler, SchedulerConfig};
use serde_json::Value;

/// The trajectory tolerance: max error relative to the trajectory's max magnitude.
pub const TRAJECTORY_RTOL: f64 = 1e-5;
/// Timesteps, sigmas, init_noise_sigma: error relative to the largest magnitude.
pub const SCHEDULE_RTOL: f64 = 1e-5;

/// One recorded case of a group, as the JSON holds it.
pub struct Case {
    pub name: String,
    pub class_name: String,
    pub config: SchedulerConfig,
    pub step_kwargs: Value,
    pub learned_variance: bool,
    pub strength: Option<f64>,
    json: Value,
}

impl Case {
    /// A step argument diffusers was given (`eta`, `s_churn`, ...), if any.
    pub fn kwarg(&self, key: &str) -> Option<f64> {
        self.step_kwargs.get(key).and_then(Value::as_f64)
    }

    /// A boolean step argument.
    pub fn kwarg_bool(&self, key: &str) -> Option<bool> {
        self.step_kwargs.get(key).and_then(Value::as_bool)
    }
}

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/samplers")
}

/// The stand-in model: `0.8 x cos(0.0031 t) + 0.2 sin(2 x + 0.0057 t)` element-wise; with a
/// learned variance, each sample of the batch gets `0.5 tanh(x)` channels appended.
pub fn model(x: &[f32], t: f64, learned_variance: bool, batch: usize) -> Vec<f32> {
    let f = |x: f32| {
        let x = f64::from(x);
        (0.8 * x * (t * 0.0031).cos() + 0.2 * (2.0 * x + t * 0.0057).sin()) as f32
    };
    if !learned_variance {
        return x.iter().map(|&v| f(v)).collect();
    }
    let per = x.len() / batch;
    let mut out = Vec::with_capacity(2 * x.len());
    for sample in x.chunks_exact(per) {
        out.extend(sample.iter().map(|&v| f(v)));
        out.extend(sample.iter().map(|&v| (0.5 * f64::from(v).tanh()) as f32));
    }
    out
}

fn tensor(tensors: &SafeTensors<'_>, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
    let view = tensors.tensor(name).ok()?;
    let data = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Some((view.shape().to_vec(), data))
}

fn rel_check(what: &str, actual: &[f64], expected: &[f64]) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: length ({actual:?} vs {expected:?})"
    );
    let scale = expected
        .iter()
        .fold(0.0_f64, |m, e| m.max(e.abs()))
        .max(1e-12);
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= SCHEDULE_RTOL * scale,
            "{what}[{i}]: got {a}, diffusers {e}"
        );
    }
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Replays every case of `group`, building each sampler with `build`; returns how many runs
/// were checked. Prints each run's worst error.
pub fn replay_group(
    group: &str,
    build: impl Fn(&Case, &SchedulerConfig, Plan) -> sd_schedulers::Result<Box<dyn Sampler>>,
) -> usize {
    let dir = fixtures_dir();
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{group}.json"))).expect("fixture json"),
    )
    .unwrap();
    let bytes = std::fs::read(dir.join(format!("{group}.safetensors"))).expect("fixture tensors");
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let batch = json["shape"][0].as_u64().unwrap() as usize;
    let mut runs = 0;
    for c in json["cases"].as_array().unwrap() {
        let case = Case {
            name: c["name"].as_str().unwrap().to_string(),
            class_name: c["class_name"].as_str().unwrap().to_string(),
            config: SchedulerConfig::from_json(c["config"].as_str().unwrap()).unwrap(),
            step_kwargs: c["step_kwargs"].clone(),
            learned_variance: c["learned_variance"].as_bool().unwrap(),
            strength: c["strength"].as_f64(),
            json: c.clone(),
        };
        for run in c["runs"].as_array().unwrap() {
            replay_run(&case, run, &tensors, batch, &build);
            runs += 1;
        }
    }
    runs
}

fn replay_run(
    case: &Case,
    run: &Value,
    tensors: &SafeTensors<'_>,
    batch: usize,
    build: &impl Fn(&Case, &SchedulerConfig, Plan) -> sd_schedulers::Result<Box<dyn Sampler>>,
) {
    let key = run["key"].as_str().unwrap();
    let plan = if let Some(ts) = case.json["custom_timesteps"].as_array() {
        Plan::timesteps(ts.iter().map(|v| v.as_u64().unwrap() as usize).collect())
    } else if let Some(s) = case.json["custom_sigmas"].as_array() {
        Plan::sigmas(s.iter().map(|v| v.as_f64().unwrap()).collect())
    } else {
        Plan::steps(run["steps"].as_u64().unwrap() as usize)
    }
    .with_batch_size(batch);
    let mut sampler = build(case, &case.config, plan).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(sampler.class_name(), case.class_name, "{key}");

    rel_check(
        &format!("{key} timesteps"),
        sampler.timesteps(),
        &f64s(&run["timesteps"]),
    );
    if let Some(expected) = run["sigmas"].as_array() {
        let expected: Vec<f64> = expected.iter().map(|v| v.as_f64().unwrap()).collect();
        let actual = sampler
            .sigmas()
            .unwrap_or_else(|| panic!("{key}: the sampler has no sigmas"));
        rel_check(&format!("{key} sigmas"), actual, &expected);
    }
    rel_check(
        &format!("{key} init_noise_sigma"),
        &[sampler.init_noise_sigma()],
        &[run["init_noise_sigma"].as_f64().unwrap()],
    );

    let (shape, samples) = tensor(tensors, &format!("{key}/samples")).unwrap();
    let per_step: usize = shape[1..].iter().product();
    let (_, preds) = tensor(tensors, &format!("{key}/pred_original_sample")).unwrap();
    let noise = match tensor(tensors, &format!("{key}/noise")) {
        Some((shape, data)) => {
            let per: usize = shape[1..].iter().product();
            data.chunks_exact(per).map(<[f32]>::to_vec).collect()
        }
        None => Vec::new(),
    };
    let mut noise = ReplayNoise::new(noise);
    let scale = run["max_abs"].as_f64().unwrap();

    let start = run["start_index"].as_u64().unwrap() as usize;
    let mut sample: Vec<f32> = samples[..per_step].to_vec();
    if let Some(strength) = case.strength {
        assert_eq!(
            sampler.start_index(strength).unwrap(),
            start,
            "{key} start index"
        );
        let (_, clean) = tensor(tensors, &format!("{key}/clean")).unwrap();
        let (_, eps) = tensor(tensors, &format!("{key}/add_noise_noise")).unwrap();
        let mut noised = vec![0.0; clean.len()];
        sampler.add_noise(&clean, &eps, start, &mut noised).unwrap();
        let err = max_err(&noised, &sample) / scale;
        assert!(err <= TRAJECTORY_RTOL, "{key}: add_noise error {err:e}");
        sample = noised;
    }

    let timesteps = sampler.timesteps().to_vec();
    let mut input = vec![0.0_f32; sample.len()];
    let (mut worst, mut worst_x0) = (0.0_f64, 0.0_f64);
    let x0_scale = preds.iter().fold(scale, |m, &v| {
        if v.is_nan() {
            m
        } else {
            m.max(f64::from(v).abs())
        }
    });
    for (k, i) in (start..timesteps.len()).enumerate() {
        sampler.scale_model_input(&sample, i, &mut input).unwrap();
        let output = model(&input, timesteps[i], case.learned_variance, batch);
        let out = sampler
            .step(i, &output, &sample, &mut noise)
            .unwrap_or_else(|e| panic!("{key} step {i}: {e}"));
        let expected = &samples[(k + 1) * per_step..(k + 2) * per_step];
        worst = worst.max(max_err(&out.prev_sample, expected) / scale);
        assert!(
            worst <= TRAJECTORY_RTOL,
            "{key} step {i}: sample error {worst:e} of the trajectory's max |x| {scale}"
        );
        if run["has_pred_original_sample"].as_bool().unwrap() {
            let expected = &preds[k * per_step..(k + 1) * per_step];
            worst_x0 = worst_x0.max(max_err(&out.pred_original_sample, expected) / x0_scale);
            assert!(
                worst_x0 <= TRAJECTORY_RTOL,
                "{key} step {i}: predicted x0 error {worst_x0:e}"
            );
        }
        sample = out.prev_sample;
    }
    assert_eq!(
        noise.used(),
        run["noise_draws"].as_u64().unwrap() as usize,
        "{key}: noise tensors drawn"
    );
    println!(
        "{key}: {} steps, max error {worst:.1e} (x0 {worst_x0:.1e}) of max |x| {scale:.3}",
        timesteps.len() - start
    );
}

/// The largest absolute difference; a non-finite value where the other side differs (a NaN
/// anywhere, or infinities that are not equal) counts as an infinite error, so that a NaN
/// cannot hide from `f64::max`.
fn max_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            if x.is_finite() && y.is_finite() {
                (f64::from(x) - f64::from(y)).abs()
            } else if x == y {
                0.0
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
}

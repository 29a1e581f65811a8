//! sd-core against the values diffusers computes (fixtures/core, written by
//! tools/fixtures/generate.py). Tolerances (see tests/common): relative error <= 1e-6
//! element-wise against diffusers run in float64; <= 1e-5 of the largest magnitude against
//! diffusers as it ships, in float32.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use sd_core::sigmas::{interp_linear, sigma_to_t};
use sd_core::{
    BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing, VarianceType, exponential_sigmas,
    karras_sigmas,
};
use serde_json::Value;

fn config_f64(config: &Value, key: &str, default: f64) -> f64 {
    config.get(key).and_then(Value::as_f64).unwrap_or(default)
}

/// The schedule a diffusers config describes (with diffusers' defaults).
fn schedule_from_config(config: &Value) -> NoiseSchedule {
    let beta_start = config_f64(config, "beta_start", 0.0001);
    let beta_end = config_f64(config, "beta_end", 0.02);
    let num_train = config_f64(config, "num_train_timesteps", 1000.0) as usize;
    let beta_schedule = match config["beta_schedule"].as_str().unwrap() {
        "linear" => BetaSchedule::Linear {
            beta_start,
            beta_end,
        },
        "scaled_linear" => BetaSchedule::ScaledLinear {
            beta_start,
            beta_end,
        },
        "squaredcos_cap_v2" => BetaSchedule::SquaredcosCapV2 { max_beta: 0.999 },
        "exp" => BetaSchedule::Exp { max_beta: 0.999 },
        "laplace" => BetaSchedule::Laplace { max_beta: 0.999 },
        "sigmoid" => BetaSchedule::Sigmoid {
            beta_start,
            beta_end,
        },
        other => panic!("no mapping for beta_schedule {other}"),
    };
    let schedule = NoiseSchedule::new(&beta_schedule, num_train).unwrap();
    if config
        .get("rescale_betas_zero_snr")
        .and_then(Value::as_bool)
        == Some(true)
    {
        schedule.rescale_zero_terminal_snr().unwrap()
    } else {
        schedule
    }
}

fn sd_schedule() -> NoiseSchedule {
    NoiseSchedule::new(&BetaSchedule::STABLE_DIFFUSION, 1000).unwrap()
}

#[test]
fn every_beta_schedule_matches_diffusers() {
    let fixture = fixture("schedules.json");
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let schedule = schedule_from_config(&case["config"]);
        for precision in ["f64", "f32"] {
            let expected = &case[precision];
            assert_matches(
                &format!("{name} betas"),
                schedule.betas(),
                &f64s(&expected["betas"]),
                precision,
            );
            assert_matches(
                &format!("{name} alphas_cumprod"),
                schedule.alphas_cumprod(),
                &f64s(&expected["alphas_cumprod"]),
                precision,
            );
        }
    }
}

#[test]
fn cosine_schedule_uses_real_division() {
    // An integer division of i / T makes every beta 1 - abar(0) / abar(0) = 0 (or the cap).
    let betas = BetaSchedule::SquaredcosCapV2 { max_beta: 0.999 }
        .betas(1000)
        .unwrap();
    assert!(betas[0] > 0.0 && betas[0] < 1e-4, "first beta {}", betas[0]);
    assert!(betas.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(betas[999], 0.999, "the last beta is capped");
}

/// diffusers' timesteps with numpy's spurious trailing value (the timestep -1) dropped.
fn drop_negative(values: Vec<i64>) -> Vec<usize> {
    values
        .into_iter()
        .filter(|&t| t >= 0)
        .map(|t| t as usize)
        .collect()
}

#[test]
fn timestep_spacing_matches_diffusers() {
    let fixture = fixture("timesteps.json");
    let cases = fixture["cases"].as_array().unwrap();
    let mut spurious = 0;
    for case in cases {
        let spacing: TimestepSpacing = serde_json::from_value(case["spacing"].clone()).unwrap();
        let t = case["num_train_timesteps"].as_u64().unwrap() as usize;
        let n = case["num_inference_steps"].as_u64().unwrap() as usize;
        let offset = case["steps_offset"].as_u64().unwrap() as usize;
        let what = format!("{spacing:?} T={t} n={n} offset={offset}");

        let integer = i64s(&case["integer"]);
        if integer.len() != n {
            spurious += 1;
            assert_eq!(integer.len(), n + 1, "{what}");
            assert_eq!(integer[n], -1, "{what}: the spurious value");
        }
        assert_eq!(
            spacing.timesteps(t, n, offset).unwrap(),
            drop_negative(integer),
            "{what} integer"
        );

        let fractional: Vec<f64> = f64s(&case["fractional"])
            .into_iter()
            .filter(|&t| t >= 0.0)
            .collect();
        assert_eq!(
            spacing.fractional_timesteps(t, n, offset).unwrap(),
            fractional,
            "{what} fractional"
        );

        assert_eq!(
            spacing.multistep_timesteps(t, n, offset, t).unwrap(),
            drop_negative(i64s(&case["multistep"])),
            "{what} multistep"
        );
    }
    assert!(
        spurious > 0,
        "the fixtures cover numpy's spurious trailing value"
    );
}

#[test]
fn trailing_and_linspace_edge_cases() {
    // The cases two well-known Rust crates get wrong.
    assert_eq!(
        TimestepSpacing::Trailing.timesteps(1000, 3, 0).unwrap(),
        [999, 666, 332]
    );
    // linspace rounds (ties to even) rather than truncating 499.5 to 499.
    assert_eq!(
        TimestepSpacing::Linspace.timesteps(1000, 3, 0).unwrap(),
        [999, 500, 0]
    );
    assert_eq!(
        TimestepSpacing::Trailing
            .timesteps(1000, 61, 0)
            .unwrap()
            .len(),
        61
    );
}

/// Against diffusers' float64 run only: in float32 its posterior coefficients cancel at
/// t = 1 (`1 - alpha_bar`), where they are largest.
#[test]
fn posterior_matches_ddpm_step() {
    let fixture = fixture("posterior.json");
    let schedule = sd_schedule();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let precision = "f64";
        let rtol = RTOL_F64;
        let t = case["t"].as_u64().unwrap() as usize;
        let prev = case["prev_t"].as_i64().unwrap();
        let prev = (prev >= 0).then_some(prev as usize);
        let what = format!("t={t} prev={prev:?} {precision}");
        let p = schedule.posterior(t, prev).unwrap();

        let check = |name: &str, actual: f64, expected: &Value| {
            assert_rel(
                &format!("{what} {name}"),
                &[actual],
                &[expected.as_f64().unwrap()],
                rtol,
            );
        };
        check("x0 coefficient", p.x0, &case["x0_coefficient"]);
        check("xt coefficient", p.xt, &case["xt_coefficient"]);
        let v = &case["get_variance"];
        // What diffusers' _get_variance returns for each type.
        check("fixed_small", p.variance, &v["fixed_small"]);
        check(
            "fixed_small_log",
            p.std_dev(VarianceType::FixedSmallLog, 0.0),
            &v["fixed_small_log"],
        );
        check("fixed_large", p.beta, &v["fixed_large"]);
        check(
            "fixed_large_log",
            p.log_variance(VarianceType::FixedLargeLog, 0.0),
            &v["fixed_large_log"],
        );
        for (value, expected) in case["learned_range_log_variance"].as_object().unwrap() {
            let value: f64 = value.parse().unwrap();
            check(
                &format!("learned_range({value})"),
                p.log_variance(VarianceType::LearnedRange, value),
                expected,
            );
        }
    }
}

#[test]
fn forward_process_velocity_snr_and_x0_match_diffusers() {
    let fixture = fixture("forward.json");
    let schedule = sd_schedule();
    let timesteps: Vec<usize> = i64s(&fixture["timesteps"])
        .into_iter()
        .map(|t| t as usize)
        .collect();
    let x0 = f64s(&fixture["x0"]);
    let noise = f64s(&fixture["noise"]);
    let model_output = f64s(&fixture["model_output"]);
    let sample_len = x0.len() / timesteps.len();

    // float64 data against diffusers in float64.
    let expected = &fixture["f64"];
    let mut noisy = vec![0.0; x0.len()];
    schedule
        .add_noise_batch(&x0, &noise, &timesteps, &mut noisy)
        .unwrap();
    assert_rel_max(
        "add_noise f64",
        &noisy,
        &f64s(&expected["add_noise"]),
        RTOL_F64,
    );
    let mut velocity = vec![0.0; x0.len()];
    for (i, &t) in timesteps.iter().enumerate() {
        let range = i * sample_len..(i + 1) * sample_len;
        sd_core::velocity(
            &x0[range.clone()],
            &noise[range.clone()],
            schedule.alpha_bar(t).unwrap(),
            &mut velocity[range],
        )
        .unwrap();
    }
    assert_rel_max(
        "velocity f64",
        &velocity,
        &f64s(&expected["velocity"]),
        RTOL_F64,
    );

    // float32 data against diffusers as it ships.
    let expected = &fixture["f32"];
    let (x0_32, noise_32) = (
        x0.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        noise.iter().map(|&v| v as f32).collect::<Vec<_>>(),
    );
    let mut noisy_32 = vec![0.0_f32; x0.len()];
    schedule
        .add_noise_batch(&x0_32, &noise_32, &timesteps, &mut noisy_32)
        .unwrap();
    assert_rel_max(
        "add_noise f32",
        &widen(&noisy_32),
        &f64s(&expected["add_noise"]),
        RTOL_F32,
    );

    let mut velocity_32 = vec![0.0_f32; x0.len()];
    for (i, &t) in timesteps.iter().enumerate() {
        let range = i * sample_len..(i + 1) * sample_len;
        sd_core::velocity(
            &x0_32[range.clone()],
            &noise_32[range.clone()],
            schedule.alpha_bar(t).unwrap(),
            &mut velocity_32[range],
        )
        .unwrap();
    }
    assert_rel_max(
        "velocity f32",
        &widen(&velocity_32),
        &f64s(&expected["velocity"]),
        RTOL_F32,
    );

    // compute_snr rounds to float32 at its end; its float64 run is accurate to that rounding.
    // (Its float32 run cancels in `1 - alpha_bar` at t = 0, where the SNR is largest.)
    let snr: Vec<f64> = timesteps
        .iter()
        .map(|&t| f64::from(schedule.snr(t).unwrap() as f32))
        .collect();
    assert_rel("snr", &snr, &f64s(&fixture["f64"]["snr"]), RTOL_F64);

    // The predicted x0 of DDPMScheduler.step at t = 500, sample x0[0], output model_output[0],
    // in f64 and on f32 data.
    let alpha_bar = schedule.alpha_bar(500).unwrap();
    let model_output_32: Vec<f32> = model_output.iter().map(|&v| v as f32).collect();
    for (name, prediction_type) in [
        ("epsilon", PredictionType::Epsilon),
        ("sample", PredictionType::Sample),
        ("v_prediction", PredictionType::VPrediction),
    ] {
        let mut x0_hat = vec![0.0; sample_len];
        prediction_type
            .to_x0(
                &model_output[..sample_len],
                &x0[..sample_len],
                alpha_bar,
                &mut x0_hat,
            )
            .unwrap();
        assert_rel_max(
            &format!("{name} x0 f64"),
            &x0_hat,
            &f64s(&fixture["f64"]["pred_original_sample_t500"][name]),
            RTOL_F64,
        );
        let mut x0_hat_32 = vec![0.0_f32; sample_len];
        prediction_type
            .to_x0(
                &model_output_32[..sample_len],
                &x0_32[..sample_len],
                alpha_bar,
                &mut x0_hat_32,
            )
            .unwrap();
        assert_rel_max(
            &format!("{name} x0 f32"),
            &widen(&x0_hat_32),
            &f64s(&fixture["f32"]["pred_original_sample_t500"][name]),
            RTOL_F32,
        );
    }
}

#[test]
fn sigmas_match_euler_discrete() {
    let fixture = fixture("sigmas.json");
    let schedule = sd_schedule();
    let train_sigmas = schedule.sigmas();
    let log_sigmas = schedule.log_sigmas();
    for precision in ["f64", "f32"] {
        assert_matches(
            "train sigmas",
            &train_sigmas,
            &f64s(&fixture["train_sigmas"][precision]),
            precision,
        );
    }
    for case in fixture["cases"].as_array().unwrap() {
        let spacing: TimestepSpacing = serde_json::from_value(case["spacing"].clone()).unwrap();
        let n = case["num_inference_steps"].as_u64().unwrap() as usize;
        let variant = case["variant"].as_str().unwrap();
        let timesteps = spacing.fractional_timesteps(1000, n, 1).unwrap();
        let plain: Vec<f64> = timesteps
            .iter()
            .map(|&t| interp_linear(&train_sigmas, t).unwrap())
            .collect();
        let (sigmas, timesteps) = match variant {
            "plain" => (plain, timesteps),
            _ => {
                let (min, max) = (plain[n - 1], plain[0]);
                let sigmas = if variant == "karras" {
                    karras_sigmas(min, max, n, 7.0).unwrap()
                } else {
                    exponential_sigmas(min, max, n).unwrap()
                };
                let ts = sigmas
                    .iter()
                    .map(|&s| sigma_to_t(s, &log_sigmas).unwrap())
                    .collect();
                (sigmas, ts)
            }
        };
        // Euler appends a final sigma of 0 and stores everything in float32.
        let sigmas: Vec<f64> = sigmas
            .into_iter()
            .chain([0.0])
            .map(|s| f64::from(s as f32))
            .collect();
        let timesteps: Vec<f64> = timesteps.into_iter().map(|t| f64::from(t as f32)).collect();
        // One linspace step lands on t = 0 alone, where diffusers' float32 sigma is itself off
        // by 1.3e-5 (it cancels in 1 - alpha_bar); its float64 run is matched to 1e-6.
        let precisions: &[&str] = if n == 1 && spacing == TimestepSpacing::Linspace {
            &["f64"]
        } else {
            &["f64", "f32"]
        };
        for &precision in precisions {
            let what = format!("{spacing:?} n={n} {variant}");
            let expected = &case[precision];
            assert_matches(
                &format!("{what} sigmas"),
                &sigmas,
                &f64s(&expected["sigmas"]),
                precision,
            );
            assert_matches(
                &format!("{what} timesteps"),
                &timesteps,
                &f64s(&expected["timesteps"]),
                precision,
            );
        }
    }
}

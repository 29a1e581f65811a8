//! DDPM against diffusers' DDPMScheduler trajectories (see tests/common), and the cases the
//! fixtures cannot hold (see tools/fixtures/sampler_cases/ddpm.py).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sd_core::{PredictionType, VarianceType};
use sd_schedulers::config::BetaScheduleName;
use sd_schedulers::ddpm::Ddpm;
use sd_schedulers::{Error, NoNoise, Plan, ReplayNoise, Sampler, SchedulerConfig};

#[test]
fn ddpm_matches_diffusers() {
    let runs = common::replay_group("ddpm", |_case, config, plan| {
        Ok(Box::new(Ddpm::new(config, plan)?))
    });
    assert!(runs >= 30, "{runs} runs");
}

fn config(variance_type: VarianceType) -> SchedulerConfig {
    let mut config = SchedulerConfig::stable_diffusion_v1();
    config.variance_type = Some(variance_type);
    config
}

/// One step from x_t = 0.3 (batch of 2 samples of 2 values) with the model output
/// `[eps, eps, v, v]` per sample and noise 1, against the formulas written out here.
fn one_learned_step(variance_type: VarianceType, v: f32) -> (Vec<f32>, Vec<f32>) {
    let plan = Plan::steps(10).with_batch_size(2);
    let mut ddpm = Ddpm::new(&config(variance_type), plan).unwrap();
    let sample = [0.3_f32; 4];
    let eps = 0.2_f32;
    let output = [eps, eps, v, v, eps, eps, v, v];
    let mut noise = ReplayNoise::new(vec![vec![1.0; 4]]);
    let out = ddpm.step(0, &output, &sample, &mut noise).unwrap();
    (out.prev_sample, out.pred_original_sample)
}

#[test]
fn learned_variance_is_the_model_s_variance() {
    // SD 1.5, 10 steps: 901 -> 801.
    let schedule = sd_schedulers::config::BaseConfig::diffusers_default(Default::default())
        .resolve(&config(VarianceType::Learned))
        .noise_schedule()
        .unwrap();
    let (a_t, a_s) = (
        schedule.alpha_bar(901).unwrap(),
        schedule.alpha_bar(801).unwrap(),
    );
    let x0 = (0.3 - (1.0 - a_t).sqrt() * 0.2) / a_t.sqrt();
    let beta = 1.0 - a_t / a_s;
    let mean =
        a_s.sqrt() * beta / (1.0 - a_t) * x0 + (a_t / a_s).sqrt() * (1.0 - a_s) / (1.0 - a_t) * 0.3;

    let (prev, x0_out) = one_learned_step(VarianceType::Learned, 0.04);
    for (&p, &x) in prev.iter().zip(&x0_out) {
        assert!(
            (f64::from(p) - (mean + 0.2)).abs() < 1e-5,
            "{p} vs {}",
            mean + 0.2
        );
        assert!((f64::from(x) - x0).abs() < 1e-5);
    }
    // learned_range with v = 1 is fixed_large, with v = -1 fixed_small.
    let (large, _) = one_learned_step(VarianceType::LearnedRange, 1.0);
    let (small, _) = one_learned_step(VarianceType::LearnedRange, -1.0);
    let var_small = (1.0 - a_s) / (1.0 - a_t) * beta;
    for (&l, &s) in large.iter().zip(&small) {
        assert!((f64::from(l) - (mean + beta.sqrt())).abs() < 1e-5);
        assert!((f64::from(s) - (mean + var_small.sqrt())).abs() < 1e-5);
    }
    // A negative learned variance has no square root, as in diffusers.
    let (nan, _) = one_learned_step(VarianceType::Learned, -0.04);
    assert!(nan.iter().all(|v| v.is_nan()));
}

#[test]
fn fixed_large_log_is_fixed_large() {
    // diffusers returns NaN here (the square root of ln(beta)); see the module docs.
    let run = |vt| {
        let mut ddpm = Ddpm::new(&config(vt), 10).unwrap();
        let mut noise = ReplayNoise::new(vec![vec![1.0; 4]]);
        ddpm.step(0, &[0.2; 4], &[0.3; 4], &mut noise)
            .unwrap()
            .prev_sample
    };
    let (log, plain) = (
        run(VarianceType::FixedLargeLog),
        run(VarianceType::FixedLarge),
    );
    for (a, b) in log.iter().zip(&plain) {
        assert!(a.is_finite() && (a - b).abs() < 1e-6, "{a} vs {b}");
    }
}

#[test]
fn learned_output_must_hold_the_variance() {
    let mut ddpm = Ddpm::new(&config(VarianceType::LearnedRange), 10).unwrap();
    let err = ddpm
        .step(0, &[0.0; 4], &[0.0; 4], &mut NoNoise)
        .unwrap_err();
    assert!(matches!(err, Error::LengthMismatch { .. }), "{err}");
    // A fixed variance takes an output of the sample's size.
    let mut ddpm = Ddpm::new(&config(VarianceType::FixedSmall), 10).unwrap();
    let err = ddpm
        .step(0, &[0.0; 8], &[0.0; 4], &mut NoNoise)
        .unwrap_err();
    assert!(matches!(err, Error::LengthMismatch { .. }), "{err}");
}

#[test]
fn rejects_what_diffusers_rejects() {
    let sd = SchedulerConfig::stable_diffusion_v1();
    for plan in [
        Plan::timesteps(vec![500, 500, 100]),
        Plan::timesteps(vec![100, 500]),
        Plan::timesteps(vec![1000, 500]),
        Plan::timesteps(vec![]),
        Plan::sigmas(vec![14.6, 1.0, 0.0]),
        Plan::steps(10).with_batch_size(0),
    ] {
        let err = Ddpm::new(&sd, plan.clone()).unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { .. }),
            "{plan:?}: {err}"
        );
    }
    let mut exp = sd.clone();
    exp.beta_schedule = Some(BetaScheduleName::Exp);
    assert!(matches!(
        Ddpm::new(&exp, 10).unwrap_err(),
        Error::InvalidConfig { .. }
    ));
    assert!(matches!(Ddpm::new(&sd, 0).unwrap_err(), Error::Core(_)));
    assert!(matches!(Ddpm::new(&sd, 1001).unwrap_err(), Error::Core(_)));
}

#[test]
fn steps_must_come_in_order() {
    let mut config = SchedulerConfig::stable_diffusion_v1();
    config.prediction_type = Some(PredictionType::VPrediction);
    let mut ddpm = Ddpm::new(&config, 10).unwrap();
    let mut noise = ReplayNoise::new(vec![vec![0.5; 4]; 3]);
    ddpm.step(3, &[0.1; 4], &[0.2; 4], &mut noise).unwrap();
    let err = ddpm.step(5, &[0.1; 4], &[0.2; 4], &mut noise).unwrap_err();
    assert!(
        matches!(
            err,
            Error::StepOutOfOrder {
                expected: 4,
                found: 5
            }
        ),
        "{err}"
    );
    ddpm.reset();
    ddpm.step(0, &[0.1; 4], &[0.2; 4], &mut noise).unwrap();
    // The stochastic step needs noise.
    let mut ddpm = Ddpm::new(&config, 10).unwrap();
    assert!(matches!(
        ddpm.step(0, &[0.1; 4], &[0.2; 4], &mut NoNoise)
            .unwrap_err(),
        Error::Noise(_)
    ));
    assert!(matches!(
        ddpm.step(10, &[0.1; 4], &[0.2; 4], &mut NoNoise)
            .unwrap_err(),
        Error::StepOutOfRange { .. }
    ));
}

#[test]
fn epsilon_at_zero_terminal_snr_is_clipped_not_nan() {
    // diffusers: x0 = (x - eps) / 0 = +-inf at t = 999, clipped to +-1 (clip_sample defaults
    // to true for DDPM).
    let mut config = SchedulerConfig::default();
    config.rescale_betas_zero_snr = Some(true);
    config.timestep_spacing = Some(sd_core::TimestepSpacing::Trailing);
    let mut ddpm = Ddpm::new(&config, 10).unwrap();
    let mut noise = ReplayNoise::new(vec![vec![0.0; 4]]);
    let out = ddpm
        .step(
            0,
            &[0.1, 0.5, -0.2, 0.3],
            &[0.4, -0.3, -0.5, 0.1],
            &mut noise,
        )
        .unwrap();
    assert_eq!(out.pred_original_sample, [1.0, -1.0, -1.0, -1.0]);
    assert!(out.prev_sample.iter().all(|v| v.is_finite()));
}

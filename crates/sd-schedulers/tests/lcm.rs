//! LCM against diffusers' LCMScheduler trajectories (see tests/common).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sd_schedulers::lcm::{Lcm, LcmOptions};
use sd_schedulers::{Error, NoNoise, Plan, ReplayNoise, Sampler, SchedulerConfig};

/// The `set_timesteps` arguments of the cases that pass them (see sampler_cases/lcm.py).
fn options(case: &str) -> LcmOptions {
    let mut options = LcmOptions::default();
    match case {
        "sd15_strength_0.6" => options.strength = 0.6,
        "sd15_strength_0.6_original_steps_30" => {
            options.strength = 0.6;
            options.original_inference_steps = Some(30);
        }
        "sd15_custom_timesteps_strength_0.5" => options.strength = 0.5,
        _ => {}
    }
    options
}

#[test]
fn lcm_matches_diffusers() {
    let runs = common::replay_group("lcm", |case, config, plan| {
        Ok(Box::new(Lcm::with_options(
            config,
            plan,
            options(&case.name),
        )?))
    });
    assert!(runs >= 35, "{runs} runs");
}

#[test]
fn timesteps_follow_the_distillation_schedule() {
    let sd = SchedulerConfig::stable_diffusion_v1();
    let lcm = Lcm::new(&sd, 4).unwrap();
    assert_eq!(lcm.train_timesteps(), [999, 759, 499, 259]);
    let lcm = Lcm::with_options(&sd, 4, LcmOptions::strength(0.6)).unwrap();
    assert_eq!(lcm.train_timesteps(), [599, 459, 299, 159]);
    assert_eq!(lcm.start_index(1.0).unwrap(), 0);
}

#[test]
fn the_last_step_returns_the_denoised_sample() {
    let sd = SchedulerConfig::stable_diffusion_v1();
    let mut lcm = Lcm::new(&sd, Plan::timesteps(vec![999, 499])).unwrap();
    let mut noise = ReplayNoise::new(vec![vec![0.0; 2]]);
    let x = [0.4_f32, -0.3];
    let first = lcm.step(0, &[0.1, 0.2], &x, &mut noise).unwrap();
    let last = lcm
        .step(1, &[0.1, 0.2], &first.prev_sample, &mut NoNoise)
        .unwrap();
    assert_eq!(last.prev_sample, last.pred_original_sample);
    let (c_skip, c_out) = lcm.boundary_scalings(499);
    assert!((c_skip - 0.25 / (4990.0f64.powi(2) + 0.25)).abs() < 1e-15);
    assert!((c_out - 4990.0 / (4990.0f64.powi(2) + 0.25).sqrt()).abs() < 1e-15);
}

#[test]
fn rejects_what_diffusers_rejects() {
    let sd = SchedulerConfig::stable_diffusion_v1();
    let mut too_many = sd.clone();
    too_many.original_inference_steps = Some(1001);
    for (config, plan, options) in [
        // More steps than distillation steps.
        (&sd, Plan::steps(51), LcmOptions::default()),
        // More steps than original steps x strength.
        (&sd, Plan::steps(40), LcmOptions::strength(0.5)),
        (&sd, Plan::steps(0), LcmOptions::default()),
        (&too_many, Plan::steps(4), LcmOptions::default()),
        (&sd, Plan::timesteps(vec![499, 999]), LcmOptions::default()),
        (&sd, Plan::timesteps(vec![1000, 999]), LcmOptions::default()),
        (
            &sd,
            Plan::timesteps(vec![999, 499]),
            LcmOptions::strength(0.2),
        ),
        (&sd, Plan::sigmas(vec![1.0, 0.0]), LcmOptions::default()),
    ] {
        let err = Lcm::with_options(config, plan.clone(), options).unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { .. }),
            "{plan:?}: {err}"
        );
    }
    assert!(matches!(
        Lcm::with_options(&sd, 4, LcmOptions::strength(1.5)).unwrap_err(),
        Error::Strength(_)
    ));
}

#[test]
fn steps_must_come_in_order() {
    let sd = SchedulerConfig::stable_diffusion_v1();
    let mut lcm = Lcm::new(&sd, 4).unwrap();
    let mut noise = ReplayNoise::new(vec![vec![0.5; 2]; 2]);
    lcm.step(1, &[0.1; 2], &[0.2; 2], &mut noise).unwrap();
    let err = lcm.step(1, &[0.1; 2], &[0.2; 2], &mut noise).unwrap_err();
    assert!(
        matches!(
            err,
            Error::StepOutOfOrder {
                expected: 2,
                found: 1
            }
        ),
        "{err}"
    );
    // Every step but the last is stochastic.
    lcm.reset();
    assert!(matches!(
        lcm.step(0, &[0.1; 2], &[0.2; 2], &mut NoNoise).unwrap_err(),
        Error::Noise(_)
    ));
}

//! Euler ancestral against diffusers' EulerAncestralDiscreteScheduler trajectories (see
//! tests/common).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sd_schedulers::euler_ancestral::EulerAncestral;
use sd_schedulers::{Error, NoNoise, Plan, ReplayNoise, Sampler, SchedulerConfig};

#[test]
fn euler_ancestral_matches_diffusers() {
    let runs = common::replay_group("euler_ancestral", |_, config, plan| {
        Ok(Box::new(EulerAncestral::new(config, plan)?))
    });
    assert!(runs >= 25, "{runs} runs");
}

#[test]
fn rejects_what_diffusers_does_not_support() {
    let mut config = SchedulerConfig::stable_diffusion_v1();
    config.prediction_type = Some(sd_schedulers::sd_core::PredictionType::Sample);
    let err = EulerAncestral::new(&config, 10).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                key: "prediction_type",
                ..
            }
        ),
        "{err}"
    );
    let config = SchedulerConfig::stable_diffusion_v1();
    let err = EulerAncestral::new(&config, Plan::sigmas(vec![10.0, 1.0, 0.0])).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { key: "steps", .. }),
        "{err}"
    );
}

#[test]
fn every_step_draws_noise_and_steps_come_in_order() {
    let config = SchedulerConfig::stable_diffusion_v1();
    let mut sampler = EulerAncestral::new(&config, 4).unwrap();
    let x = vec![0.5_f32; 8];
    let err = sampler.step(0, &x, &x, &mut NoNoise).unwrap_err();
    assert!(matches!(err, Error::Noise(_)), "{err}");
    sampler.reset();
    let mut noise = ReplayNoise::new(vec![vec![0.1; 8]; 4]);
    let mut sample = x.clone();
    for i in 0..4 {
        sample = sampler
            .step(i, &x, &sample, &mut noise)
            .unwrap()
            .prev_sample;
    }
    assert_eq!(noise.used(), 4);
    let err = sampler.step(1, &x, &sample, &mut noise).unwrap_err();
    assert!(
        matches!(
            err,
            Error::StepOutOfRange { .. } | Error::StepOutOfOrder { .. }
        ),
        "{err}"
    );
}

//! KDPM2 ancestral against diffusers' KDPM2AncestralDiscreteScheduler trajectories (see
//! tests/common).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sd_schedulers::kdpm2_ancestral::Kdpm2Ancestral;
use sd_schedulers::{Error, NoNoise, Plan, ReplayNoise, Sampler, SchedulerConfig};

#[test]
fn kdpm2_ancestral_matches_diffusers() {
    let runs = common::replay_group("kdpm2_ancestral", |_, config, plan| {
        Ok(Box::new(Kdpm2Ancestral::new(config, plan)?))
    });
    assert!(runs >= 27, "{runs} runs");
}

#[test]
fn rejects_what_diffusers_does_not_support() {
    let mut config = SchedulerConfig::stable_diffusion_v1();
    config.prediction_type = Some(sd_schedulers::sd_core::PredictionType::Sample);
    let err = Kdpm2Ancestral::new(&config, 10).unwrap_err();
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
    let err = Kdpm2Ancestral::new(&config, Plan::sigmas(vec![10.0, 1.0, 0.0])).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { key: "steps", .. }),
        "{err}"
    );
}

#[test]
fn noise_is_drawn_in_second_halves_only() {
    let config = SchedulerConfig::stable_diffusion_v1();
    let mut sampler = Kdpm2Ancestral::new(&config, 3).unwrap();
    assert_eq!(sampler.timesteps().len(), 5);
    let x = vec![0.5_f32; 8];
    // The first half is deterministic; the second needs noise.
    let first = sampler.step(0, &x, &x, &mut NoNoise).unwrap();
    let err = sampler
        .step(1, &x, &first.prev_sample, &mut NoNoise)
        .unwrap_err();
    assert!(matches!(err, Error::Noise(_)), "{err}");
    sampler.reset();
    let mut noise = ReplayNoise::new(vec![vec![0.1; 8]; 2]);
    let mut sample = x.clone();
    for i in 0..5 {
        sample = sampler
            .step(i, &x, &sample, &mut noise)
            .unwrap()
            .prev_sample;
    }
    assert_eq!(noise.used(), 2);
    assert!(sample.iter().all(|v| v.is_finite()));
}

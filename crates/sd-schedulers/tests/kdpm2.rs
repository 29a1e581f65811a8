//! KDPM2 against diffusers' KDPM2DiscreteScheduler trajectories (see tests/common).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sd_schedulers::kdpm2::Kdpm2;
use sd_schedulers::{Error, NoNoise, Plan, Sampler, SchedulerConfig};

#[test]
fn kdpm2_matches_diffusers() {
    let runs = common::replay_group("kdpm2", |_, config, plan| {
        Ok(Box::new(Kdpm2::new(config, plan)?))
    });
    assert!(runs >= 29, "{runs} runs");
}

#[test]
fn rejects_what_diffusers_does_not_support() {
    let mut config = SchedulerConfig::stable_diffusion_v1();
    config.prediction_type = Some(sd_schedulers::sd_core::PredictionType::Sample);
    let err = Kdpm2::new(&config, 10).unwrap_err();
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
    let err = Kdpm2::new(&config, Plan::timesteps(vec![999, 500, 10])).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { key: "steps", .. }),
        "{err}"
    );
}

#[test]
fn the_model_input_scale_follows_the_half_step() {
    let config = SchedulerConfig::stable_diffusion_v1();
    let mut sampler = Kdpm2::new(&config, 4).unwrap();
    assert_eq!(sampler.timesteps().len(), 7);
    assert_eq!(sampler.sigmas().unwrap().len(), 10);
    let x = vec![0.5_f32; 8];
    let s = sampler.sigmas().unwrap().to_vec();
    let first_half = sampler.model_input_scale(0).unwrap();
    assert_eq!(first_half, 1.0 / (s[0] * s[0] + 1.0).sqrt());
    let out = sampler.step(0, &x, &x, &mut NoNoise).unwrap();
    // The second half sees the sample at the midpoint sqrt(s0 s1).
    let mid = sampler.model_input_scale(1).unwrap();
    let expected = (s[0] * s[1]).sqrt();
    assert!((1.0 / (mid * mid) - 1.0 - expected * expected).abs() < 1e-3 * expected * expected);
    let err = sampler
        .step(2, &x, &out.prev_sample, &mut NoNoise)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::StepOutOfOrder {
                expected: 1,
                found: 2
            }
        ),
        "{err}"
    );
    sampler.reset();
    assert_eq!(
        sampler.model_input_scale(1).unwrap(),
        1.0 / (s[1] * s[1] + 1.0).sqrt()
    );
}

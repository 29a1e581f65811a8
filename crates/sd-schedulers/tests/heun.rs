//! Heun against diffusers' HeunDiscreteScheduler trajectories (see tests/common).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sd_schedulers::heun::Heun;
use sd_schedulers::{Error, NoNoise, Plan, Sampler, SchedulerConfig};

#[test]
fn heun_matches_diffusers() {
    let runs = common::replay_group("heun", |_, config, plan| {
        Ok(Box::new(Heun::new(config, plan)?))
    });
    assert!(runs >= 40, "{runs} runs");
}

#[test]
fn interleaves_the_schedule() {
    let config = SchedulerConfig::stable_diffusion_v1();
    let sampler = Heun::new(&config, 3).unwrap();
    let (t, s) = (sampler.timesteps(), sampler.sigmas().unwrap());
    assert_eq!(t.len(), 5);
    assert_eq!(s.len(), 6);
    assert_eq!((t[1], t[3]), (t[2], t[4]));
    assert_eq!((s[1], s[3]), (s[2], s[4]));
    assert_eq!(s[5], 0.0);
    assert_eq!(sampler.order(), 2);
    // img2img at strength 0.7 of 3 steps runs the last 2: from model evaluation 2.
    assert_eq!(sampler.start_index(0.7).unwrap(), 2);
}

#[test]
fn rejects_what_diffusers_does_not_support() {
    let mut config = SchedulerConfig::stable_diffusion_v1();
    config.use_karras_sigmas = Some(true);
    let err = Heun::new(&config, Plan::timesteps(vec![999, 500, 10])).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
    let config = SchedulerConfig::stable_diffusion_v1();
    let err = Heun::new(&config, Plan::sigmas(vec![10.0, 1.0, 0.0])).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { key: "sigmas", .. }),
        "{err}"
    );
    let err = Heun::new(&config, Plan::timesteps(vec![])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                key: "timesteps",
                ..
            }
        ),
        "{err}"
    );
    let mut laplace = config;
    laplace.beta_schedule = Some(sd_schedulers::config::BetaScheduleName::Laplace);
    let err = Heun::new(&laplace, 10).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                key: "beta_schedule",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn steps_must_come_in_order_and_reset_restarts_with_a_predictor() {
    let config = SchedulerConfig::stable_diffusion_v1();
    let mut sampler = Heun::new(&config, 5).unwrap();
    let x = vec![0.5_f32; 8];
    let first = sampler.step(0, &x, &x, &mut NoNoise).unwrap();
    let err = sampler
        .step(2, &x, &first.prev_sample, &mut NoNoise)
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
    // A reset in the middle of a step drops the pending predictor.
    sampler.reset();
    assert_eq!(sampler.step(0, &x, &x, &mut NoNoise).unwrap(), first);
}

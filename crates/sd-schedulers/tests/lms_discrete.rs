//! LMS against diffusers' LMSDiscreteScheduler trajectories (see tests/common).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sd_schedulers::lms_discrete::{LmsDiscrete, LmsOptions};
use sd_schedulers::{Error, NoNoise, Plan, Sampler, SchedulerConfig};

#[test]
fn lms_matches_diffusers() {
    let runs = common::replay_group("lms_discrete", |case, config, plan| {
        let mut options = LmsOptions::default();
        if let Some(order) = case.kwarg("order") {
            options.order = order as usize;
        }
        Ok(Box::new(LmsDiscrete::with_options(config, plan, options)?))
    });
    assert!(runs >= 39, "{runs} runs");
}

#[test]
fn rejects_what_diffusers_does_not_support() {
    let config = SchedulerConfig::stable_diffusion_v1();
    let err = LmsDiscrete::new(&config, Plan::timesteps(vec![999, 500, 10])).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { key: "steps", .. }),
        "{err}"
    );
    let err = LmsDiscrete::with_options(&config, 10, LmsOptions::order(0)).unwrap_err();
    assert!(
        matches!(err, Error::InvalidConfig { key: "order", .. }),
        "{err}"
    );
    let mut beta = config.clone();
    beta.use_beta_sigmas = Some(true);
    let err = LmsDiscrete::new(&beta, 10).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                key: "use_beta_sigmas",
                ..
            }
        ),
        "{err}"
    );
    let mut both = config.clone();
    both.use_karras_sigmas = Some(true);
    both.use_exponential_sigmas = Some(true);
    assert!(LmsDiscrete::new(&both, 10).is_err());
    let mut exp = config;
    exp.beta_schedule = Some(sd_schedulers::config::BetaScheduleName::Exp);
    let err = LmsDiscrete::new(&exp, 10).unwrap_err();
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
fn steps_must_come_in_order_and_reset_clears_the_history() {
    let config = SchedulerConfig::stable_diffusion_v1();
    let mut sampler = LmsDiscrete::new(&config, 10).unwrap();
    let x = vec![0.5_f32; 8];
    let first = sampler.step(0, &x, &x, &mut NoNoise).unwrap();
    let second = sampler
        .step(1, &x, &first.prev_sample, &mut NoNoise)
        .unwrap();
    let err = sampler
        .step(3, &x, &second.prev_sample, &mut NoNoise)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::StepOutOfOrder {
                expected: 2,
                found: 3
            }
        ),
        "{err}"
    );
    // After a reset the run starts afresh, with no history: the same first step again.
    sampler.reset();
    assert_eq!(sampler.step(0, &x, &x, &mut NoNoise).unwrap(), first);
}

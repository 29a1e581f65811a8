//! DEIS against diffusers' DEISMultistepScheduler trajectories (see tests/common), and its
//! typed errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sd_schedulers::deis::Deis;
use sd_schedulers::{Error, NoNoise, Plan, Sampler, SchedulerConfig};

#[test]
fn deis_matches_diffusers() {
    let runs = common::replay_group("deis", |_case, config, plan| {
        Ok(Box::new(Deis::new(config, plan)?))
    });
    assert!(runs >= 55, "{runs} runs");
}

#[test]
fn rejects_what_diffusers_does_not_implement() {
    for (json, key) in [
        (r#"{"algorithm_type": "sde-dpmsolver++"}"#, "algorithm_type"),
        (r#"{"solver_order": 0}"#, "solver_order"),
        (r#"{"use_beta_sigmas": true}"#, "use_beta_sigmas"),
        (r#"{"beta_schedule": "sigmoid"}"#, "beta_schedule"),
    ] {
        let config = SchedulerConfig::from_json(json).unwrap();
        match Deis::new(&config, 10) {
            Err(Error::InvalidConfig { key: k, .. }) => assert_eq!(k, key, "{json}"),
            other => panic!("{json}: expected InvalidConfig, got {other:?}"),
        }
    }
    let config = SchedulerConfig::stable_diffusion_v1();
    assert!(matches!(
        Deis::new(&config, Plan::sigmas(vec![14.6, 1.0, 0.0])),
        Err(Error::InvalidConfig { key: "steps", .. })
    ));
}

#[test]
fn steps_run_in_order_and_reset_starts_over() {
    let config = SchedulerConfig::stable_diffusion_v1();
    let mut sampler = Deis::new(&config, 5).unwrap();
    let x = vec![0.5_f32; 8];
    let eps = vec![0.1_f32; 8];
    let first = sampler.step(0, &eps, &x, &mut NoNoise).unwrap();
    let err = sampler
        .step(3, &eps, &first.prev_sample, &mut NoNoise)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::StepOutOfOrder {
                expected: 1,
                found: 3
            }
        ),
        "{err}"
    );
    sampler.reset();
    assert_eq!(sampler.step(0, &eps, &x, &mut NoNoise).unwrap(), first);
}

#[test]
fn higher_orders_run_as_third_order() {
    let mut config = SchedulerConfig::stable_diffusion_v1();
    config.solver_order = Some(3);
    let mut third = Deis::new(&config, 8).unwrap();
    config.solver_order = Some(5);
    let mut fifth = Deis::new(&config, 8).unwrap();
    let mut a = vec![0.7_f32; 4];
    let mut b = a.clone();
    for i in 0..8 {
        let out: Vec<f32> = a.iter().map(|v| 0.9 * v).collect();
        a = third.step(i, &out, &a, &mut NoNoise).unwrap().prev_sample;
        b = fifth.step(i, &out, &b, &mut NoNoise).unwrap().prev_sample;
    }
    assert_eq!(a, b);
}

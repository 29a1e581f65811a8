//! DPM-Solver single-step against diffusers' DPMSolverSinglestepScheduler trajectories (see
//! tests/common), and the configurations it rejects.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sd_schedulers::dpm_solver_singlestep::DpmSolverSinglestep;
use sd_schedulers::{Error, NoNoise, Plan, Sampler, SchedulerConfig};

#[test]
fn dpm_solver_singlestep_matches_diffusers() {
    let runs = common::replay_group("dpm_solver_singlestep", |_case, config, plan| {
        Ok(Box::new(DpmSolverSinglestep::new(config, plan)?))
    });
    assert!(runs >= 71, "{runs} runs");
}

fn json(text: &str) -> SchedulerConfig {
    SchedulerConfig::from_json(text).unwrap()
}

fn invalid_key(result: sd_schedulers::Result<DpmSolverSinglestep>) -> &'static str {
    match result {
        Err(Error::InvalidConfig { key, .. }) => key,
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn rejects_what_diffusers_rejects_or_lacks() {
    let new = |text: &str| DpmSolverSinglestep::new(&json(text), 10);
    assert_eq!(
        invalid_key(new(
            r#"{"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}"#
        )),
        "algorithm_type"
    );
    assert_eq!(
        invalid_key(new(r#"{"algorithm_type": "dpmsolver"}"#)),
        "final_sigmas_type"
    );
    assert_eq!(
        invalid_key(new(
            r#"{"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "thresholding": true}"#
        )),
        "thresholding"
    );
    assert_eq!(invalid_key(new(r#"{"solver_order": 4}"#)), "solver_order");
    assert_eq!(invalid_key(new(r#"{"solver_order": 0}"#)), "solver_order");
    assert_eq!(
        invalid_key(DpmSolverSinglestep::new(
            &json(r#"{"use_exponential_sigmas": true}"#),
            Plan::timesteps(vec![900, 500, 100])
        )),
        "use_exponential_sigmas"
    );
    assert_eq!(
        invalid_key(DpmSolverSinglestep::new(
            &json("{}"),
            Plan::sigmas(vec![1.0, 0.0])
        )),
        "sigmas"
    );
}

#[test]
fn ignores_the_keys_the_class_lacks_and_switches_on_lower_order_final() {
    // No timestep_spacing, steps_offset or rescale_betas_zero_snr in this class.
    let plain = DpmSolverSinglestep::new(&json("{}"), 10).unwrap();
    let other = json(
        r#"{"timestep_spacing": "trailing", "steps_offset": 1, "rescale_betas_zero_snr": true,
            "use_lu_lambdas": true}"#,
    );
    let ignoring = DpmSolverSinglestep::new(&other, 10).unwrap();
    assert_eq!(plain.timesteps(), ignoring.timesteps());
    assert_eq!(plain.sigmas(), ignoring.sigmas());
    // The final sigma 0 switches lower_order_final on and makes the last step first order.
    assert_eq!(plain.order_list(), [1, 2, 1, 2, 1, 2, 1, 2, 1, 1]);
    let sigma_min = json(r#"{"final_sigmas_type": "sigma_min", "solver_order": 3}"#);
    let full = DpmSolverSinglestep::new(&sigma_min, 9).unwrap();
    assert_eq!(full.order_list(), [1, 2, 3, 1, 2, 3, 1, 2, 3]);
    // 10 is not a multiple of 3: switched on.
    let uneven = DpmSolverSinglestep::new(&sigma_min, 10).unwrap();
    assert_eq!(uneven.order_list(), [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]);
}

#[test]
fn steps_come_in_order() {
    let mut sampler = DpmSolverSinglestep::new(&json(r#"{"solver_order": 3}"#), 9).unwrap();
    let x = vec![0.3_f32; 8];
    let out = common::model(&x, sampler.timesteps()[3], false, 1);
    let next = sampler.step(3, &out, &x, &mut NoNoise).unwrap().prev_sample;
    let err = sampler.step(5, &out, &next, &mut NoNoise).unwrap_err();
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
    sampler.reset();
    assert!(sampler.step(5, &out, &next, &mut NoNoise).is_ok());
}

//! UniPC against diffusers' UniPCMultistepScheduler trajectories (see tests/common), and its
//! typed errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sd_schedulers::unipc::UniPc;
use sd_schedulers::{Error, NoNoise, Plan, Sampler, SchedulerConfig};

#[test]
fn unipc_matches_diffusers() {
    let runs = common::replay_group("unipc", |_case, config, plan| {
        Ok(Box::new(UniPc::new(config, plan)?))
    });
    assert!(runs >= 70, "{runs} runs");
}

fn sd15(json: &str) -> SchedulerConfig {
    let mut config = SchedulerConfig::stable_diffusion_v1();
    let extra = SchedulerConfig::from_json(json).unwrap();
    config.solver_type = extra.solver_type;
    config.solver_order = extra.solver_order;
    config.predict_x0 = extra.predict_x0;
    config.lower_order_final = extra.lower_order_final;
    config.final_sigmas_type = extra.final_sigmas_type;
    config.solver_p = extra.solver_p;
    config.shift_terminal = extra.shift_terminal;
    config.use_flow_sigmas = extra.use_flow_sigmas;
    config
}

fn invalid_key(result: sd_schedulers::Result<UniPc>) -> &'static str {
    match result {
        Err(Error::InvalidConfig { key, .. }) => key,
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn rejects_what_diffusers_cannot_run() {
    let cases = [
        (
            r#"{"solver_p": {"_class_name": "DPMSolverMultistepScheduler"}}"#,
            "solver_p",
        ),
        (r#"{"solver_order": 4}"#, "solver_order"),
        (r#"{"solver_order": 0}"#, "solver_order"),
        (r#"{"shift_terminal": 0.1}"#, "shift_terminal"),
        (r#"{"use_flow_sigmas": true}"#, "use_flow_sigmas"),
        // Not finite in diffusers at the last step to sigma = 0.
        (r#"{"solver_type": "bh1"}"#, "solver_type"),
        (r#"{"predict_x0": false}"#, "predict_x0"),
        (r#"{"lower_order_final": false}"#, "lower_order_final"),
    ];
    for (json, key) in cases {
        assert_eq!(invalid_key(UniPc::new(&sd15(json), 10)), key, "{json}");
    }
    // The same with the smallest training sigma as the final one are fine, and so is a null
    // solver_p.
    for json in [
        r#"{"solver_type": "bh1", "final_sigmas_type": "sigma_min"}"#,
        r#"{"predict_x0": false, "final_sigmas_type": "sigma_min"}"#,
        r#"{"lower_order_final": false, "solver_order": 3, "final_sigmas_type": "sigma_min"}"#,
        r#"{"solver_p": null, "solver_order": 1, "lower_order_final": false}"#,
    ] {
        UniPc::new(&sd15(json), 10).unwrap();
    }
    let config = SchedulerConfig::stable_diffusion_v1();
    assert_eq!(
        invalid_key(UniPc::new(&config, Plan::sigmas(vec![14.6, 1.0, 0.0]))),
        "steps"
    );
    assert_eq!(
        invalid_key(UniPc::new(&config, Plan::timesteps(vec![999, 500]))),
        "steps"
    );
}

#[test]
fn steps_run_in_order_and_reset_starts_over() {
    let config = SchedulerConfig::stable_diffusion_v1();
    let mut sampler = UniPc::new(&config, 5).unwrap();
    let x = vec![0.5_f32; 8];
    let eps = vec![0.1_f32; 8];
    let first = sampler.step(0, &eps, &x, &mut NoNoise).unwrap();
    let err = sampler
        .step(2, &eps, &first.prev_sample, &mut NoNoise)
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
    let again = sampler.step(0, &eps, &x, &mut NoNoise).unwrap();
    assert_eq!(first, again);
}

#[test]
fn exponential_first_timestep_is_the_last_training_step() {
    // diffusers truncates sigma_to_t(sigma_max), mathematically T - 1, after computing it from
    // its float32 training sigmas, which gives 998 for SD 1.5's schedule (998.9999997) and 999
    // for others; here it is T - 1 = 999 whatever the schedule.
    let mut config = SchedulerConfig::stable_diffusion_v1();
    config.use_exponential_sigmas = Some(true);
    let sampler = UniPc::new(&config, 10).unwrap();
    assert_eq!(sampler.timesteps()[0], 999.0);
}

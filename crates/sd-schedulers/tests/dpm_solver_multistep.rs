//! DPM-Solver multistep against diffusers' DPMSolverMultistepScheduler trajectories (see
//! tests/common), and the configurations it rejects.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use rand::SeedableRng;
use sd_schedulers::dpm_solver_multistep::DpmSolverMultistep;
use sd_schedulers::dpm_solver_singlestep::DpmSolverSinglestep;
use sd_schedulers::{Error, NoNoise, Plan, RngNoise, Sampler, SchedulerConfig};

#[test]
fn dpm_solver_multistep_matches_diffusers() {
    let runs = common::replay_group("dpm_solver_multistep", |_case, config, plan| {
        Ok(Box::new(DpmSolverMultistep::new(config, plan)?))
    });
    assert!(runs >= 84, "{runs} runs");
}

fn json(text: &str) -> SchedulerConfig {
    SchedulerConfig::from_json(text).unwrap()
}

fn invalid_key(result: sd_schedulers::Result<DpmSolverMultistep>) -> &'static str {
    match result {
        Err(Error::InvalidConfig { key, .. }) => key,
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn rejects_what_diffusers_rejects_or_lacks() {
    let new = |text: &str| DpmSolverMultistep::new(&json(text), 10);
    // The noise-prediction algorithms need the sigma_min final sigma; "deis" is checked
    // before it is mapped to dpmsolver++.
    assert_eq!(
        invalid_key(new(r#"{"algorithm_type": "dpmsolver"}"#)),
        "final_sigmas_type"
    );
    assert_eq!(
        invalid_key(new(r#"{"algorithm_type": "sde-dpmsolver"}"#)),
        "final_sigmas_type"
    );
    assert_eq!(
        invalid_key(new(r#"{"algorithm_type": "deis"}"#)),
        "final_sigmas_type"
    );
    assert!(new(r#"{"algorithm_type": "deis", "final_sigmas_type": "sigma_min"}"#).is_ok());
    assert_eq!(
        invalid_key(new(
            r#"{"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3}"#
        )),
        "solver_order"
    );
    assert_eq!(invalid_key(new(r#"{"solver_order": 4}"#)), "solver_order");
    assert_eq!(invalid_key(new(r#"{"solver_order": 0}"#)), "solver_order");
    assert_eq!(
        invalid_key(new(
            r#"{"variance_type": "learned_range", "prediction_type": "v_prediction"}"#
        )),
        "variance_type"
    );
    assert_eq!(
        invalid_key(new(r#"{"use_beta_sigmas": true}"#)),
        "use_beta_sigmas"
    );
    assert_eq!(
        invalid_key(new(r#"{"use_flow_sigmas": true}"#)),
        "use_flow_sigmas"
    );
    assert_eq!(
        invalid_key(new(
            r#"{"use_karras_sigmas": true, "use_exponential_sigmas": true}"#
        )),
        "use_exponential_sigmas"
    );
    assert_eq!(
        invalid_key(new(r#"{"beta_schedule": "sigmoid"}"#)),
        "beta_schedule"
    );

    let sd15 = SchedulerConfig::stable_diffusion_v1();
    let custom = Plan::timesteps(vec![999, 500, 10]);
    let karras = json(r#"{"use_karras_sigmas": true}"#);
    let lu = json(r#"{"use_lu_lambdas": true}"#);
    assert_eq!(
        invalid_key(DpmSolverMultistep::new(&karras, custom.clone())),
        "use_karras_sigmas"
    );
    assert_eq!(
        invalid_key(DpmSolverMultistep::new(&lu, custom)),
        "use_lu_lambdas"
    );
    assert_eq!(
        invalid_key(DpmSolverMultistep::new(
            &sd15,
            Plan::sigmas(vec![14.6, 1.0, 0.0])
        )),
        "sigmas"
    );
    assert_eq!(
        invalid_key(DpmSolverMultistep::new(&sd15, Plan::timesteps(vec![]))),
        "timesteps"
    );
    assert!(matches!(
        DpmSolverMultistep::new(&sd15, 0),
        Err(Error::Core(_))
    ));
    assert!(matches!(
        DpmSolverMultistep::new(&sd15, 1001),
        Err(Error::Core(_))
    ));
}

#[test]
fn reads_diffusers_written_configs() {
    // diffusers writes lambda_min_clipped as -Infinity; clip_sample is not a key of the class.
    let config = json(
        r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "clip_sample": true, "variance_type": "fixed_small", "use_karras_sigmas": true}"#,
    );
    let sampler = DpmSolverMultistep::new(&config, 20).unwrap();
    assert_eq!(sampler.timesteps().len(), 20);
    assert_eq!(sampler.timesteps()[0], 999.0);
    assert_eq!(sampler.sigmas().unwrap().len(), 21);
    assert_eq!(*sampler.sigmas().unwrap().last().unwrap(), 0.0);
}

/// Runs `sampler` from `start` on the stand-in model, returning the final sample.
fn run(sampler: &mut dyn Sampler, start: usize, x: &[f32], seed: u64) -> Vec<f32> {
    let mut noise = RngNoise(rand::rngs::StdRng::seed_from_u64(seed));
    let mut sample = x.to_vec();
    for i in start..sampler.timesteps().len() {
        let t = sampler.timesteps()[i];
        let output = common::model(&sample, t, false, 1);
        sample = sampler
            .step(i, &output, &sample, &mut noise)
            .unwrap()
            .prev_sample;
    }
    sample
}

#[test]
fn steps_come_in_order_and_reset_starts_a_new_run() {
    let config = json(r#"{"solver_order": 3}"#);
    let mut sampler = DpmSolverMultistep::new(&config, 10).unwrap();
    let x: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
    let fresh = run(&mut sampler, 0, &x, 0);

    // Out of order: an error, and the run is left as it was.
    let mut sampler = DpmSolverMultistep::new(&config, 10).unwrap();
    let out = common::model(&x, sampler.timesteps()[0], false, 1);
    let first = sampler.step(0, &out, &x, &mut NoNoise).unwrap().prev_sample;
    let err = sampler.step(2, &out, &first, &mut NoNoise).unwrap_err();
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
    let err = sampler.step(10, &out, &first, &mut NoNoise).unwrap_err();
    assert!(
        matches!(err, Error::StepOutOfRange { index: 10, len: 10 }),
        "{err}"
    );

    // After reset, a run from the start repeats a fresh sampler's exactly: the history of
    // the abandoned run is not used.
    sampler.reset();
    assert_eq!(run(&mut sampler, 0, &x, 0), fresh);
    // A run may start anywhere (image-to-image), at first order.
    sampler.reset();
    let mut other = DpmSolverMultistep::new(&config, 10).unwrap();
    assert_eq!(run(&mut sampler, 4, &x, 0), run(&mut other, 4, &x, 0));
}

#[test]
fn stochastic_steps_need_noise_and_fail_without_changing_state() {
    let config = json(r#"{"algorithm_type": "sde-dpmsolver++"}"#);
    let mut sampler = DpmSolverMultistep::new(&config, 8).unwrap();
    let x: Vec<f32> = (0..16).map(|i| (i as f32 * 0.7).cos()).collect();
    let out = common::model(&x, sampler.timesteps()[0], false, 1);
    assert!(matches!(
        sampler.step(0, &out, &x, &mut NoNoise),
        Err(Error::Noise(_))
    ));
    // The failed step did not count: the same index goes through with noise, and the whole
    // run matches a fresh sampler's with the same noise.
    let mut fresh = DpmSolverMultistep::new(&config, 8).unwrap();
    assert_eq!(run(&mut sampler, 0, &x, 3), run(&mut fresh, 0, &x, 3));
}

#[test]
fn learned_variance_takes_twice_the_output() {
    let config = json(r#"{"variance_type": "learned_range"}"#);
    let mut sampler = DpmSolverMultistep::new(&config, Plan::steps(5).with_batch_size(2)).unwrap();
    let x = vec![0.5_f32; 16];
    let t = sampler.timesteps()[0];
    let short = common::model(&x, t, false, 2);
    let err = sampler.step(0, &short, &x, &mut NoNoise).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LengthMismatch {
                expected: 32,
                found: 16,
                ..
            }
        ),
        "{err}"
    );
    let long = common::model(&x, t, true, 2);
    // Only the mean half counts: the same step as the plain output gives.
    let with = sampler.step(0, &long, &x, &mut NoNoise).unwrap();
    let mut plain =
        DpmSolverMultistep::new(&json("{}"), Plan::steps(5).with_batch_size(2)).unwrap();
    assert_eq!(with, plain.step(0, &short, &x, &mut NoNoise).unwrap());
}

#[test]
fn first_order_is_the_same_in_both_classes() {
    // Order 1 is DPM-Solver-1 (DDIM in lambda) for both classes, on the same linspace steps.
    let config = json(r#"{"solver_order": 1, "beta_schedule": "scaled_linear"}"#);
    let x: Vec<f32> = (0..16).map(|i| (i as f32 * 0.3).sin() * 2.0).collect();
    let mut multi = DpmSolverMultistep::new(&config, 12).unwrap();
    let mut single = DpmSolverSinglestep::new(&config, 12).unwrap();
    assert_eq!(multi.timesteps(), single.timesteps());
    assert_eq!(run(&mut multi, 0, &x, 0), run(&mut single, 0, &x, 0));
}

#[test]
fn cosine_with_karras_runs_without_a_reference() {
    // diffusers repeats the first timestep here and its timestep lookup then starts at the
    // second index and runs past the end; steps are indices here, so the run completes.
    let config = json(r#"{"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": true}"#);
    let mut sampler = DpmSolverMultistep::new(&config, 10).unwrap();
    // Truncated, not rounded: [999, 998, 998, 998, 997, 995, 983, 894, 259, 0] (diffusers'
    // first one is 998, a float32 logarithm's last bit away).
    let ts = sampler.timesteps();
    assert_eq!(ts[1..4], [998.0, 998.0, 998.0]);
    assert!(ts.windows(2).all(|w| w[0] >= w[1]), "{ts:?}");
    let x = vec![0.25_f32; 8];
    assert!(run(&mut sampler, 0, &x, 0).iter().all(|v| v.is_finite()));
}

//! PNDM against diffusers' PNDMScheduler trajectories (see tests/common).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sd_core::PredictionType;
use sd_schedulers::pndm::Pndm;
use sd_schedulers::{Error, NoNoise, Plan, Sampler, SchedulerConfig};

#[test]
fn pndm_matches_diffusers() {
    let runs = common::replay_group("pndm", |_case, config, plan| {
        Ok(Box::new(Pndm::new(config, plan)?))
    });
    assert!(runs >= 30, "{runs} runs");
}

#[test]
fn timesteps_repeat_as_in_diffusers() {
    let sd = SchedulerConfig::stable_diffusion_v1();
    let plms = Pndm::new(&sd, 5).unwrap();
    assert_eq!(plms.train_timesteps(), [801, 601, 601, 401, 201, 1]);
    let mut prk_config = sd.clone();
    prk_config.skip_prk_steps = Some(false);
    let prk = Pndm::new(&prk_config, 5).unwrap();
    assert_eq!(
        prk.train_timesteps(),
        [
            801, 701, 701, 601, 601, 501, 501, 401, 401, 301, 301, 201, 201, 1
        ]
    );
    assert_eq!(prk.num_inference_steps(), 5);
}

#[test]
fn the_x0_estimate_is_the_ddim_target() {
    // x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps for the first step (eps = output).
    let sd = SchedulerConfig::stable_diffusion_v1();
    let mut pndm = Pndm::new(&sd, 10).unwrap();
    let schedule = sd_schedulers::config::BaseConfig::diffusers_default(Default::default())
        .resolve(&sd)
        .noise_schedule()
        .unwrap();
    let (eps, x) = ([0.3_f32, -0.2], [1.1_f32, -0.7]);
    let out = pndm.step(0, &eps, &x, &mut NoNoise).unwrap();
    let (a_t, a_p) = (
        schedule.alpha_bar(901).unwrap(),
        schedule.alpha_bar(801).unwrap(),
    );
    for i in 0..2 {
        let x0 = (f64::from(x[i]) - (1.0 - a_t).sqrt() * f64::from(eps[i])) / a_t.sqrt();
        let prev = a_p.sqrt() * x0 + (1.0 - a_p).sqrt() * f64::from(eps[i]);
        assert!((f64::from(out.pred_original_sample[i]) - x0).abs() < 1e-5);
        assert!((f64::from(out.prev_sample[i]) - prev).abs() < 1e-5);
    }
}

#[test]
fn rejects_what_diffusers_rejects() {
    let sd = SchedulerConfig::stable_diffusion_v1();
    let mut sample = sd.clone();
    sample.prediction_type = Some(PredictionType::Sample);
    let mut prk = sd.clone();
    prk.skip_prk_steps = Some(false);
    for (config, plan) in [
        (&sample, Plan::steps(10)),
        (&prk, Plan::steps(3)),
        (&sd, Plan::timesteps(vec![999, 500])),
        (&sd, Plan::sigmas(vec![1.0, 0.0])),
    ] {
        let err = Pndm::new(config, plan).unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
    }
    assert!(matches!(Pndm::new(&sd, 0).unwrap_err(), Error::Core(_)));
}

#[test]
fn steps_must_come_in_order_and_reset_forgets_the_history() {
    let sd = SchedulerConfig::stable_diffusion_v1();
    let mut pndm = Pndm::new(&sd, 10).unwrap();
    let (out, x) = ([0.1_f32; 4], [0.5_f32; 4]);
    let first = pndm.step(0, &out, &x, &mut NoNoise).unwrap();
    pndm.step(1, &out, &first.prev_sample, &mut NoNoise)
        .unwrap();
    let err = pndm.step(3, &out, &x, &mut NoNoise).unwrap_err();
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
    // A sample of another size than the run's history is an error, not a panic.
    let err = pndm
        .step(2, &[0.1; 2], &[0.5; 2], &mut NoNoise)
        .unwrap_err();
    assert!(matches!(err, Error::LengthMismatch { .. }), "{err}");
    pndm.reset();
    let again = pndm.step(0, &out, &x, &mut NoNoise).unwrap();
    assert_eq!(again, first);
}

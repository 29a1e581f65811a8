//! TCD against diffusers' TCDScheduler trajectories (see tests/common).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sd_schedulers::tcd::{Tcd, TcdOptions};
use sd_schedulers::{Error, NoNoise, Plan, ReplayNoise, Sampler, SchedulerConfig};

#[test]
fn tcd_matches_diffusers() {
    let runs = common::replay_group("tcd", |case, config, plan| {
        let mut options = TcdOptions::default();
        options.eta = case.kwarg("eta").unwrap_or(options.eta);
        // The `set_timesteps` arguments of the cases that pass them (see sampler_cases/tcd.py).
        match case.name.as_str() {
            "sd15_strength_0.6" => options.strength = 0.6,
            "sd15_custom_timesteps_strength_0.5" => options.strength = 0.5,
            "sd15_set_timesteps_original_steps_20" => options.original_inference_steps = Some(20),
            _ => {}
        }
        Ok(Box::new(Tcd::with_options(config, plan, options)?))
    });
    assert!(runs >= 35, "{runs} runs");
}

#[test]
fn gamma_zero_is_deterministic_and_the_last_step_stops_at_t_0() {
    let sd = SchedulerConfig::stable_diffusion_v1();
    let mut tcd = Tcd::with_options(&sd, 4, TcdOptions::eta(0.0)).unwrap();
    let mut x = vec![0.4_f32, -0.3];
    for i in 0..4 {
        x = tcd
            .step(i, &[0.1, 0.2], &x, &mut NoNoise)
            .unwrap()
            .prev_sample;
    }
    assert!(x.iter().all(|v| v.is_finite()));
    // The last step of a stochastic run draws no noise either.
    let mut tcd = Tcd::new(&sd, Plan::timesteps(vec![999, 499])).unwrap();
    let mut noise = ReplayNoise::new(vec![vec![0.0; 2]]);
    let first = tcd.step(0, &[0.1, 0.2], &[0.4, -0.3], &mut noise).unwrap();
    tcd.step(1, &[0.1, 0.2], &first.prev_sample, &mut NoNoise)
        .unwrap();
}

#[test]
fn rejects_what_diffusers_rejects() {
    let sd = SchedulerConfig::stable_diffusion_v1();
    for (plan, options) in [
        (Plan::steps(4), TcdOptions::eta(1.5)),
        (Plan::steps(4), TcdOptions::eta(-0.1)),
        (Plan::steps(51), TcdOptions::default()),
        (Plan::timesteps(vec![499, 999]), TcdOptions::default()),
        (Plan::sigmas(vec![1.0, 0.0]), TcdOptions::default()),
    ] {
        let err = Tcd::with_options(&sd, plan.clone(), options).unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig { .. }),
            "{plan:?}: {err}"
        );
    }
    let mut options = TcdOptions::default();
    options.original_inference_steps = Some(8);
    assert!(matches!(
        Tcd::with_options(&sd, 10, options).unwrap_err(),
        Error::InvalidConfig { .. }
    ));
}

#[test]
fn steps_must_come_in_order() {
    let sd = SchedulerConfig::stable_diffusion_v1();
    let mut tcd = Tcd::new(&sd, 4).unwrap();
    let mut noise = ReplayNoise::new(vec![vec![0.5; 2]; 2]);
    tcd.step(0, &[0.1; 2], &[0.2; 2], &mut noise).unwrap();
    let err = tcd.step(2, &[0.1; 2], &[0.2; 2], &mut noise).unwrap_err();
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
}

#[test]
fn the_step_maps_x0_and_eps_to_the_intermediate_timestep() {
    // gamma = 0.3, 4 steps: 999 -> s = floor(0.7 * 759) = 531; the last step goes to s = 0.
    let sd = SchedulerConfig::stable_diffusion_v1();
    let schedule = sd_schedulers::config::BaseConfig::diffusers_default(Default::default())
        .resolve(&sd)
        .noise_schedule()
        .unwrap();
    let mut tcd = Tcd::new(&sd, 4).unwrap();
    let (eps, x) = ([0.3_f32, -0.2], [1.1_f32, -0.7]);
    let mut noise = ReplayNoise::new(vec![vec![0.0; 2]]);
    let out = tcd.step(0, &eps, &x, &mut noise).unwrap();
    let (a_t, a_s, a_prev) = (
        schedule.alpha_bar(999).unwrap(),
        schedule.alpha_bar(531).unwrap(),
        schedule.alpha_bar(759).unwrap(),
    );
    for i in 0..2 {
        let x0 = (f64::from(x[i]) - (1.0 - a_t).sqrt() * f64::from(eps[i])) / a_t.sqrt();
        let x_s = a_s.sqrt() * x0 + (1.0 - a_s).sqrt() * f64::from(eps[i]);
        // With zero noise, x_prev = sqrt(abar_prev / abar_s) x_s.
        let prev = (a_prev / a_s).sqrt() * x_s;
        assert!((f64::from(out.pred_original_sample[i]) - x0).abs() < 1e-5);
        assert!((f64::from(out.prev_sample[i]) - prev).abs() < 1e-5, "{i}");
    }
}

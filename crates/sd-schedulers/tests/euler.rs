//! Euler against diffusers' EulerDiscreteScheduler trajectories (see tests/common).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sd_schedulers::{Euler, EulerOptions};

#[test]
fn euler_matches_diffusers() {
    let runs = common::replay_group("euler", |case, config, plan| {
        let mut options = EulerOptions::default();
        options.s_churn = case.kwarg("s_churn").unwrap_or(options.s_churn);
        options.s_tmin = case.kwarg("s_tmin").unwrap_or(options.s_tmin);
        options.s_tmax = case.kwarg("s_tmax").unwrap_or(options.s_tmax);
        options.s_noise = case.kwarg("s_noise").unwrap_or(options.s_noise);
        Ok(Box::new(Euler::with_options(config, plan, options)?))
    });
    assert!(runs >= 30, "{runs} runs");
}

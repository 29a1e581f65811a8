//! DDIM against diffusers' DDIMScheduler trajectories (see tests/common).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sd_schedulers::{Ddim, DdimOptions};

#[test]
fn ddim_matches_diffusers() {
    let runs = common::replay_group("ddim", |case, config, plan| {
        let mut options = DdimOptions::eta(case.kwarg("eta").unwrap_or(0.0));
        options.use_clipped_model_output =
            case.kwarg_bool("use_clipped_model_output").unwrap_or(false);
        Ok(Box::new(Ddim::with_options(config, plan, options)?))
    });
    assert!(runs >= 20, "{runs} runs");
}

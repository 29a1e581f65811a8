//! Impossible input is a typed error naming what was wrong, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sd_core::{BetaSchedule, Error, LossWeighting, NoiseSchedule, PredictionType, TimestepSpacing};

fn sd() -> NoiseSchedule {
    NoiseSchedule::new(&BetaSchedule::STABLE_DIFFUSION, 1000).unwrap()
}

#[test]
fn zero_steps() {
    assert_eq!(
        TimestepSpacing::Leading.timesteps(1000, 0, 1),
        Err(Error::Zero {
            what: "num_inference_steps"
        })
    );
    assert_eq!(
        NoiseSchedule::new(&BetaSchedule::STABLE_DIFFUSION, 0),
        Err(Error::Zero {
            what: "num_train_timesteps"
        })
    );
    assert!(matches!(
        NoiseSchedule::from_betas(vec![]),
        Err(Error::Zero { .. })
    ));
}

#[test]
fn more_inference_than_training_steps() {
    for spacing in [
        TimestepSpacing::Linspace,
        TimestepSpacing::Leading,
        TimestepSpacing::Trailing,
    ] {
        let expected = Error::TooManyInferenceSteps {
            num_inference_steps: 11,
            num_train_timesteps: 10,
        };
        assert_eq!(spacing.timesteps(10, 11, 0), Err(expected.clone()));
        assert_eq!(
            spacing.fractional_timesteps(10, 11, 0),
            Err(expected.clone())
        );
        assert_eq!(spacing.multistep_timesteps(10, 11, 0, 10), Err(expected));
    }
}

#[test]
fn betas_outside_the_open_unit_interval() {
    for (bad, index) in [(0.0, 1), (1.0, 1), (-0.1, 1), (f64::NAN, 1), (1.5, 1)] {
        let err = NoiseSchedule::from_betas(vec![0.1, bad, 0.2]).unwrap_err();
        match err {
            Error::BetaOutOfRange { index: i, value } => {
                assert_eq!(i, index);
                assert!(value.is_nan() || value == bad);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // A linear schedule that starts at 0 is caught too, and the message names the index.
    let err = NoiseSchedule::new(
        &BetaSchedule::Linear {
            beta_start: 0.0,
            beta_end: 0.02,
        },
        10,
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "beta[0] = 0 lies outside (0, 1)");
    assert!(matches!(
        BetaSchedule::SquaredcosCapV2 { max_beta: 1.0 }.betas(10),
        Err(Error::InvalidParameter {
            name: "max_beta",
            ..
        })
    ));
}

#[test]
fn slices_of_different_lengths() {
    let s = sd();
    let mut out = [0.0_f32; 3];
    let err = s
        .add_noise(&[1.0_f32; 3], &[1.0; 4], 10, &mut out)
        .unwrap_err();
    assert_eq!(
        err,
        Error::LengthMismatch {
            what: "y",
            expected: 3,
            found: 4
        }
    );
    assert!(matches!(
        PredictionType::Epsilon.to_x0(&[1.0_f64; 2], &[1.0; 2], 0.5, &mut [0.0; 3]),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        s.add_noise_batch(&[1.0_f32; 10], &[1.0; 10], &[1, 2, 3], &mut [0.0; 10]),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        s.loss(
            PredictionType::Epsilon,
            LossWeighting::Uniform,
            &[1.0_f32; 4],
            &[1.0; 4],
            &[]
        ),
        Err(Error::Zero { .. })
    ));
}

#[test]
fn timesteps_outside_the_schedule() {
    let s = sd();
    assert_eq!(
        s.alpha_bar(1000),
        Err(Error::TimestepOutOfRange {
            timestep: 1000.0,
            num_train_timesteps: 1000
        })
    );
    assert!(s.posterior(1000, Some(999)).is_err());
    assert!(s.add_noise(&[0.0_f32], &[0.0], 1000, &mut [0.0]).is_err());
    assert!(sd_core::timestep_from_uniform(1.5, 1000).is_err());
    assert_eq!(sd_core::timestep_from_uniform(0.9999999999, 1000), Ok(999));
    assert!(
        TimestepSpacing::Trailing
            .multistep_timesteps(1000, 10, 0, 1001)
            .is_err()
    );
}

#[test]
fn sigma_ramps_reject_bad_ranges() {
    assert!(sd_core::karras_sigmas(0.0, 14.6, 10, 7.0).is_err());
    assert!(sd_core::karras_sigmas(1.0, 0.5, 10, 7.0).is_err());
    assert!(sd_core::karras_sigmas(0.03, 14.6, 0, 7.0).is_err());
    assert!(sd_core::exponential_sigmas(0.03, f64::INFINITY, 10).is_err());
    assert!(sd_core::sigma_to_t(1.0, &[0.0]).is_err());
}

#[test]
fn training_example_and_loss() {
    let s = sd();
    let x0 = [0.5_f32, -0.5, 1.0, 0.0];
    let eps = [0.1_f32, 0.2, -0.3, 0.4];
    let (mut x_t, mut target) = ([0.0_f32; 4], [0.0_f32; 4]);
    s.training_example(
        PredictionType::Epsilon,
        &x0,
        &eps,
        500,
        &mut x_t,
        &mut target,
    )
    .unwrap();
    assert_eq!(target, eps);
    // A perfect prediction has zero loss; a wrong one has the MSE times the weight.
    let zero = s
        .loss(
            PredictionType::Epsilon,
            LossWeighting::Uniform,
            &target,
            &eps,
            &[500],
        )
        .unwrap();
    assert_eq!(zero, 0.0);
    let off = [0.0_f32; 4];
    let uniform = s
        .loss(
            PredictionType::Epsilon,
            LossWeighting::Uniform,
            &off,
            &eps,
            &[500],
        )
        .unwrap();
    assert!((uniform - 0.075).abs() < 1e-7, "{uniform}");
    let weighted = s
        .loss(
            PredictionType::Epsilon,
            LossWeighting::MinSnr { gamma: 5.0 },
            &off,
            &eps,
            &[10],
        )
        .unwrap();
    let snr = s.snr(10).unwrap();
    assert!(snr > 5.0);
    assert!((weighted - 0.075 * 5.0 / snr).abs() < 1e-7, "{weighted}");
}

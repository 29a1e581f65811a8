//! Identities that hold whatever the schedule, timestep or data, checked on random inputs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use sd_core::sigmas::{interp_log_linear, sigma_to_t};
use sd_core::{
    BetaSchedule, LossWeighting, NoiseSchedule, PredictionType, TimestepSpacing, karras_sigmas,
};

fn schedules() -> impl Strategy<Value = NoiseSchedule> {
    let kinds = prop_oneof![
        Just(BetaSchedule::STABLE_DIFFUSION),
        Just(BetaSchedule::Linear {
            beta_start: 1e-4,
            beta_end: 0.02
        }),
        Just(BetaSchedule::SquaredcosCapV2 { max_beta: 0.999 }),
        Just(BetaSchedule::Sigmoid {
            beta_start: 1e-4,
            beta_end: 0.02
        }),
    ];
    (kinds, 2_usize..1200).prop_map(|(kind, t)| NoiseSchedule::new(&kind, t).unwrap())
}

fn prediction_types() -> impl Strategy<Value = PredictionType> {
    prop_oneof![
        Just(PredictionType::Epsilon),
        Just(PredictionType::Sample),
        Just(PredictionType::VPrediction),
    ]
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

proptest! {
    /// Averaging the posterior q(x_s | x_t, x_0) over q(x_t | x_0) gives back q(x_s | x_0):
    /// mean `sqrt(abar_s) x_0` and variance `1 - abar_s`.
    #[test]
    fn posterior_of_a_noised_sample_is_the_forward_marginal(
        schedule in schedules(), t_frac in 0.0_f64..1.0, s_frac in 0.0_f64..1.0, x0 in -3.0_f64..3.0,
    ) {
        let n = schedule.num_train_timesteps();
        let t = 1 + ((n - 1) as f64 * t_frac) as usize;
        let s = ((t as f64 * s_frac) as usize).min(t - 1);
        let p = schedule.posterior(t, Some(s)).unwrap();
        let (abar_t, abar_s) = (schedule.alpha_bar(t).unwrap(), schedule.alpha_bar(s).unwrap());
        let mean = p.x0 * x0 + p.xt * abar_t.sqrt() * x0;
        prop_assert!(close(mean, abar_s.sqrt() * x0, 1e-9), "mean {mean} vs {}", abar_s.sqrt() * x0);
        let variance = p.xt * p.xt * (1.0 - abar_t) + p.variance;
        prop_assert!(close(variance, 1.0 - abar_s, 1e-9), "variance {variance} vs {}", 1.0 - abar_s);
    }

    /// The last step goes to the clean sample: the posterior mean is x_0 itself.
    #[test]
    fn posterior_to_the_clean_sample_is_x0(schedule in schedules(), t_frac in 0.0_f64..1.0) {
        let t = ((schedule.num_train_timesteps() - 1) as f64 * t_frac) as usize;
        let p = schedule.posterior(t, None).unwrap();
        prop_assert!(close(p.x0, 1.0, 1e-12) && p.xt.abs() < 1e-12, "{p:?}");
    }

    /// What the network should output (the training target), converted back, gives x_0 and eps.
    #[test]
    fn x0_eps_and_v_round_trip(
        prediction_type in prediction_types(),
        alpha_bar in 1e-3_f64..0.999,
        x0 in prop::collection::vec(-3.0_f64..3.0, 1..40),
        seed in prop::collection::vec(-3.0_f64..3.0, 40),
    ) {
        let eps = &seed[..x0.len()];
        let mut x_t = vec![0.0; x0.len()];
        sd_core::ForwardCoefficients::from_alpha_bar(alpha_bar).apply(&x0, eps, &mut x_t).unwrap();
        let mut target = vec![0.0; x0.len()];
        prediction_type.target(&x0, eps, alpha_bar, &mut target).unwrap();
        let mut x0_back = vec![0.0; x0.len()];
        prediction_type.to_x0(&target, &x_t, alpha_bar, &mut x0_back).unwrap();
        let mut eps_back = vec![0.0; x0.len()];
        prediction_type.to_eps(&target, &x_t, alpha_bar, &mut eps_back).unwrap();
        for i in 0..x0.len() {
            prop_assert!(close(x0_back[i], x0[i], 1e-9), "x0 {} vs {}", x0_back[i], x0[i]);
            // eps from an x0 prediction divides by sqrt(1 - abar): allow for it.
            prop_assert!(close(eps_back[i], eps[i], 1e-9 / (1.0 - alpha_bar).sqrt()), "eps {} vs {}", eps_back[i], eps[i]);
        }
    }

    /// The k-diffusion conversion (on x = x_t / sqrt(abar)) agrees with the alpha-bar one.
    #[test]
    fn sigma_and_alpha_bar_conversions_agree(
        prediction_type in prediction_types(), alpha_bar in 1e-3_f64..0.999,
        model in -3.0_f64..3.0, x_t in -3.0_f64..3.0,
    ) {
        let a = prediction_type.x0_coefficients(alpha_bar);
        let sigma = sd_core::sigmas::sigma_from_alpha_bar(alpha_bar);
        let k = prediction_type.x0_coefficients_sigma(sigma);
        let via_alpha = a.model * model + a.sample * x_t;
        let via_sigma = k.model * model + k.sample * (x_t / alpha_bar.sqrt());
        prop_assert!(close(via_alpha, via_sigma, 1e-9), "{via_alpha} vs {via_sigma}");
    }

    /// The VP pair of a sigma has unit norm, alpha_t = sqrt(alpha_bar), and lambda = -ln(sigma).
    #[test]
    fn vp_coefficients_of_a_sigma(alpha_bar in 1e-4_f64..0.9999) {
        let sigma = sd_core::sigmas::sigma_from_alpha_bar(alpha_bar);
        let vp = sd_core::VpCoefficients::from_sigma(sigma);
        prop_assert!(close(vp.alpha_t * vp.alpha_t + vp.sigma_t * vp.sigma_t, 1.0, 1e-12));
        prop_assert!(close(vp.alpha_t, alpha_bar.sqrt(), 1e-12));
        prop_assert!(close(vp.lambda(), -sigma.ln(), 1e-9));
    }

    /// sigma_to_t inverts the log-linear interpolation of the training sigmas.
    #[test]
    fn sigma_to_t_inverts_log_linear_interpolation(schedule in schedules(), t_frac in 0.0_f64..1.0) {
        let sigmas = schedule.sigmas();
        let t = (sigmas.len() - 1) as f64 * t_frac;
        let sigma = interp_log_linear(&sigmas, t).unwrap();
        let back = sigma_to_t(sigma, &schedule.log_sigmas()).unwrap();
        prop_assert!((back - t).abs() < 1e-6, "{back} vs {t}");
    }

    /// Karras sigmas run from sigma_max down to sigma_min.
    #[test]
    fn karras_ramp_ends_and_decreases(min in 1e-3_f64..1.0, span in 1.0_f64..100.0, n in 2_usize..200) {
        let max = min * span;
        let s = karras_sigmas(min, max, n, 7.0).unwrap();
        prop_assert!(close(s[0], max, 1e-12) && close(s[n - 1], min, 1e-12));
        prop_assert!(s.windows(2).all(|w| w[0] >= w[1]));
    }

    /// Every spacing gives exactly n distinct timesteps, largest first, inside the schedule.
    #[test]
    fn spacings_give_n_decreasing_timesteps_in_range(
        train in 1_usize..2000, n_frac in 0.0_f64..1.0, offset in 0_usize..2,
    ) {
        let n = 1 + ((train - 1) as f64 * n_frac) as usize;
        for spacing in [TimestepSpacing::Linspace, TimestepSpacing::Leading, TimestepSpacing::Trailing] {
            let ts = spacing.timesteps(train, n, offset).unwrap();
            prop_assert_eq!(ts.len(), n, "{:?}", spacing);
            prop_assert!(ts.windows(2).all(|w| w[0] > w[1]), "{:?} {:?}", spacing, ts);
            let limit = if spacing == TimestepSpacing::Leading { train + offset } else { train };
            prop_assert!(ts[0] < limit, "{:?} {:?}", spacing, ts);
            let ms = spacing.multistep_timesteps(train, n, offset, train).unwrap();
            prop_assert!(ms.len() <= n && ms.windows(2).all(|w| w[0] >= w[1]), "{:?} {:?}", spacing, ms);
        }
    }

    /// The zero-terminal-SNR rescale keeps the first alpha-bar and zeroes the last.
    #[test]
    fn zero_terminal_snr_rescale(schedule in schedules()) {
        let rescaled = schedule.rescale_zero_terminal_snr().unwrap();
        let (a, b) = (schedule.alphas_cumprod(), rescaled.alphas_cumprod());
        prop_assert!(close(b[0], a[0], 1e-12));
        prop_assert_eq!(b[b.len() - 1], 0.0);
        prop_assert!(b.windows(2).all(|w| w[0] > w[1]));
    }

    /// Min-SNR-gamma never weighs more than the uniform loss for epsilon and v.
    #[test]
    fn min_snr_weights(snr in 1e-4_f64..1e4, gamma in 0.5_f64..20.0) {
        let w = LossWeighting::MinSnr { gamma };
        let eps = w.weight(snr, PredictionType::Epsilon);
        prop_assert!(eps > 0.0 && eps <= 1.0);
        prop_assert!(close(eps, (snr.min(gamma)) / snr, 1e-12));
        prop_assert!(w.weight(snr, PredictionType::VPrediction) < 1.0);
        prop_assert!(close(w.weight(snr, PredictionType::Sample), snr.min(gamma), 1e-12));
    }
}

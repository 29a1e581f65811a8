//! Prints Stable Diffusion's noise schedule as a sampler sees it and noises a sample along it.
//!
//! ```text
//! cargo run --release --example schedule -- [STEPS] [SPACING]
//! ```
//!
//! STEPS defaults to 10 and SPACING (leading, trailing or linspace) to leading, with
//! Stable Diffusion 1.x's `steps_offset = 1`.

use std::process::ExitCode;

use sd_core::{BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let steps: usize = match args.next() {
        Some(s) => s
            .parse()
            .map_err(|_| format!("STEPS must be a whole number, found {s:?}"))?,
        None => 10,
    };
    let spacing = match args.next().as_deref() {
        None | Some("leading") => TimestepSpacing::Leading,
        Some("trailing") => TimestepSpacing::Trailing,
        Some("linspace") => TimestepSpacing::Linspace,
        Some(other) => {
            return Err(format!(
                "SPACING must be leading, trailing or linspace, found {other:?}"
            ));
        }
    };

    let schedule =
        NoiseSchedule::new(&BetaSchedule::STABLE_DIFFUSION, 1000).map_err(|e| e.to_string())?;
    let timesteps = spacing
        .timesteps(1000, steps, 1)
        .map_err(|e| e.to_string())?;
    let sigmas = schedule.sigmas();

    // A small "image": a smooth ramp, and fixed pseudo-random noise.
    let x0: Vec<f32> = (0..64).map(|i| (i as f32 / 63.0) * 2.0 - 1.0).collect();
    let eps: Vec<f32> = (0..64u32)
        .map(|i| {
            let h = i.wrapping_mul(2_654_435_761).rotate_left(13) as f32 / u32::MAX as f32;
            (h - 0.5) * 3.4
        })
        .collect();

    println!("Stable Diffusion schedule: scaled_linear 0.00085..0.012, 1000 training steps");
    println!("{steps} inference steps, {spacing:?} spacing (steps_offset 1)\n");
    println!(
        "{:>5} {:>5} {:>10} {:>10} {:>10} {:>12} {:>10}",
        "step", "t", "alpha_bar", "SNR", "sigma", "|x_t - x0|", "x0 error"
    );
    let mut x_t = vec![0.0_f32; x0.len()];
    let mut x0_hat = vec![0.0_f32; x0.len()];
    for (i, &t) in timesteps.iter().enumerate() {
        let alpha_bar = schedule.alpha_bar(t).map_err(|e| e.to_string())?;
        schedule
            .add_noise(&x0, &eps, t, &mut x_t)
            .map_err(|e| e.to_string())?;
        // An oracle network that predicts the noise exactly recovers x0.
        PredictionType::Epsilon
            .to_x0(&eps, &x_t, alpha_bar, &mut x0_hat)
            .map_err(|e| e.to_string())?;
        let distance = rms(x_t.iter().zip(&x0).map(|(a, b)| a - b));
        let error = x0_hat
            .iter()
            .zip(&x0)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0_f32, f32::max);
        println!(
            "{:>5} {:>5} {:>10.6} {:>10.4} {:>10.4} {:>12.4} {:>10.2e}",
            i,
            t,
            alpha_bar,
            schedule.snr(t).map_err(|e| e.to_string())?,
            sigmas[t],
            distance,
            error
        );
    }
    Ok(())
}

fn rms(values: impl Iterator<Item = f32>) -> f32 {
    let (sum, n) = values.fold((0.0_f64, 0usize), |(s, n), v| (s + f64::from(v * v), n + 1));
    (sum / n.max(1) as f64).sqrt() as f32
}

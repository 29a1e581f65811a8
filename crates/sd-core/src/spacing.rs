//! Which training timesteps a sampler visits, exactly as diffusers computes them
//! (Lin et al., 2023, table 2, names the three spacings).
//!
//! For `T` training and `n` inference steps:
//!
//! | spacing | timesteps, in the order they are visited |
//! |---|---|
//! | `linspace` | `round(linspace(0, T - 1, n))`, reversed |
//! | `leading` | `i * (T / n) + steps_offset` for `i = n-1, ..., 0` (integer division) |
//! | `trailing` | `round(T - i * T / n) - 1` for `i = 0, ..., n-1` |
//!
//! Rounding is numpy's, to the nearest even integer on ties (`linspace(0, 999, 3)` visits
//! 500, not 499); trailing with 3 of 1000 steps gives `[999, 666, 332]`. The
//! k-diffusion samplers do not round `linspace` (they interpolate the sigmas at fractional
//! timesteps: [`TimestepSpacing::fractional_timesteps`]) and the multistep solvers
//! (DPM-Solver, UniPC, DEIS) space `n + 1` points and drop the last
//! ([`TimestepSpacing::multistep_timesteps`]).
//!
//! One deliberate difference: numpy's `arange(T, 0, -T/n)`, which diffusers uses for
//! `trailing`, sometimes returns a spurious extra value near 0 through rounding (for example
//! with `n = 61` of 1000), which diffusers turns into the timestep `-1` and, through negative
//! indexing, into the last alpha-bar. Here that value is dropped, so every other timestep
//! agrees with diffusers and there are exactly the timesteps asked for.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, check_nonzero};
use crate::sigmas::numpy_linspace;

/// How inference timesteps are spread over the training timesteps (diffusers'
/// `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TimestepSpacing {
    /// Evenly from `T - 1` down to 0, rounded.
    Linspace,
    /// Multiples of `T / n` (integer division) plus `steps_offset`, from the largest down;
    /// the spacing of Stable Diffusion 1.x's configs (with `steps_offset = 1`).
    #[default]
    Leading,
    /// Evenly from `T - 1` down, ending one step short of 0 (recommended by Lin et al.).
    Trailing,
}

/// `steps_offset` is 0 or 1 in every released config; past `T` it only makes timesteps
/// outside the schedule (and, far enough, overflows).
fn check_offset(num_train_timesteps: usize, steps_offset: usize) -> Result<()> {
    if steps_offset > num_train_timesteps {
        return Err(Error::InvalidParameter {
            name: "steps_offset",
            value: steps_offset as f64,
            reason: "must not exceed num_train_timesteps",
        });
    }
    Ok(())
}

fn check_steps(num_train_timesteps: usize, num_inference_steps: usize) -> Result<()> {
    check_nonzero("num_train_timesteps", num_train_timesteps)?;
    check_nonzero("num_inference_steps", num_inference_steps)?;
    if num_inference_steps > num_train_timesteps {
        return Err(Error::TooManyInferenceSteps {
            num_inference_steps,
            num_train_timesteps,
        });
    }
    Ok(())
}

/// `np.round(np.arange(start, 0, -step)) - 1`, with the spurious values numpy's floating
/// arange can add near 0 dropped (see the module documentation).
fn trailing(start: usize, step: f64) -> Vec<usize> {
    let start = start as f64;
    // numpy fills a float arange as `first + i * (second - first)`.
    let delta = (start - step) - start;
    let len = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    (0..len)
        .map(|i| (start + i as f64 * delta).round_ties_even() - 1.0)
        .filter(|&t| t >= 0.0)
        .map(|t| t as usize)
        .collect()
}

/// `np.arange(0, count) * step_ratio + steps_offset`, from the largest down.
fn leading(count: usize, step_ratio: usize, steps_offset: usize) -> Vec<usize> {
    (0..count)
        .rev()
        .map(|i| i * step_ratio + steps_offset)
        .collect()
}

/// `np.linspace(0, last, count).round()`, from the largest down.
fn linspace_rounded(last: f64, count: usize) -> Vec<usize> {
    numpy_linspace(0.0, last, count)
        .into_iter()
        .rev()
        .map(|t| t.round_ties_even() as usize)
        .collect()
}

impl TimestepSpacing {
    /// The integer timesteps visited by DDPM, DDIM, PNDM, LCM and the other samplers that
    /// index the training schedule directly, in visiting order (largest first).
    ///
    /// `leading` adds `steps_offset`, so with an offset its first timestep can reach `T`;
    /// as in diffusers, it is the sampler that looks the timestep up that reports it.
    ///
    /// # Errors
    /// [`Error::Zero`] for zero steps, [`Error::TooManyInferenceSteps`] for `n > T`,
    /// [`Error::InvalidParameter`] for a `steps_offset` above `T`.
    pub fn timesteps(
        self,
        num_train_timesteps: usize,
        num_inference_steps: usize,
        steps_offset: usize,
    ) -> Result<Vec<usize>> {
        check_steps(num_train_timesteps, num_inference_steps)?;
        check_offset(num_train_timesteps, steps_offset)?;
        let (t, n) = (num_train_timesteps, num_inference_steps);
        Ok(match self {
            TimestepSpacing::Linspace => linspace_rounded((t - 1) as f64, n),
            TimestepSpacing::Leading => leading(n, t / n, steps_offset),
            TimestepSpacing::Trailing => trailing(t, t as f64 / n as f64),
        })
    }

    /// The timesteps of the k-diffusion samplers (LMS, Euler, Euler ancestral, Heun, KDPM2),
    /// which may be fractional: as [`TimestepSpacing::timesteps`], except that `linspace` is
    /// not rounded (it is evaluated in `f32`, as diffusers does, and widened).
    ///
    /// # Errors
    /// As [`TimestepSpacing::timesteps`].
    pub fn fractional_timesteps(
        self,
        num_train_timesteps: usize,
        num_inference_steps: usize,
        steps_offset: usize,
    ) -> Result<Vec<f64>> {
        match self {
            TimestepSpacing::Linspace => {
                check_steps(num_train_timesteps, num_inference_steps)?;
                Ok(
                    numpy_linspace(0.0, (num_train_timesteps - 1) as f64, num_inference_steps)
                        .into_iter()
                        .rev()
                        .map(|t| f64::from(t as f32))
                        .collect(),
                )
            }
            _ => Ok(self
                .timesteps(num_train_timesteps, num_inference_steps, steps_offset)?
                .into_iter()
                .map(|t| t as f64)
                .collect()),
        }
    }

    /// The timesteps of the multistep solvers (DPM-Solver, UniPC, DEIS), which space `n + 1`
    /// points and drop the last (the final step goes to the clean sample instead).
    ///
    /// `last_timestep` (at most `T`, normally `T`) is where the schedule starts: DPM-Solver
    /// lowers it to skip timesteps whose log-SNR is below `lambda_min_clipped`, and then
    /// `trailing` yields fewer than `n` timesteps, as in diffusers.
    ///
    /// # Errors
    /// As [`TimestepSpacing::timesteps`]; [`Error::InvalidParameter`] for `last_timestep`
    /// of 0 or above `T`.
    pub fn multistep_timesteps(
        self,
        num_train_timesteps: usize,
        num_inference_steps: usize,
        steps_offset: usize,
        last_timestep: usize,
    ) -> Result<Vec<usize>> {
        check_steps(num_train_timesteps, num_inference_steps)?;
        check_offset(num_train_timesteps, steps_offset)?;
        if last_timestep == 0 || last_timestep > num_train_timesteps {
            return Err(Error::InvalidParameter {
                name: "last_timestep",
                value: last_timestep as f64,
                reason: "must lie in 1..=num_train_timesteps",
            });
        }
        let n = num_inference_steps;
        Ok(match self {
            TimestepSpacing::Linspace => {
                let mut ts = linspace_rounded((last_timestep - 1) as f64, n + 1);
                ts.pop();
                ts
            }
            TimestepSpacing::Leading => {
                let mut ts = leading(n + 1, last_timestep / (n + 1), steps_offset);
                ts.pop();
                ts
            }
            TimestepSpacing::Trailing => {
                trailing(last_timestep, num_train_timesteps as f64 / n as f64)
            }
        })
    }
}

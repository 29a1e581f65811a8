//! Beta schedules and the quantities derived from them in closed form.
//!
//! A schedule of `T` betas `beta_t` (the variance added at step `t` of the forward process)
//! defines
//!
//! ```text
//! alpha_t     = 1 - beta_t
//! alpha_bar_t = prod_{s <= t} alpha_s          (alphas_cumprod)
//! SNR(t)      = alpha_bar_t / (1 - alpha_bar_t)
//! ```
//!
//! The schedules are those of diffusers' `beta_schedule` config key: `linear` (Ho et al.,
//! 2020), `scaled_linear` (latent diffusion: linear in `sqrt(beta)`), `squaredcos_cap_v2`
//! (Nichol & Dhariwal, 2021: `alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2)`, `s = 0.008`,
//! betas capped at `max_beta`), `exp`, `laplace` and `sigmoid`, plus betas given outright
//! (`trained_betas`). [`NoiseSchedule::rescale_zero_terminal_snr`] implements Lin et al.,
//! 2023, Algorithm 1. Everything is computed in `f64`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, check_nonzero};

/// How the betas of a schedule are made; the names follow diffusers' `beta_schedule`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BetaSchedule {
    /// `beta_t` evenly spaced from `beta_start` to `beta_end` (`"linear"`).
    Linear {
        /// The first beta.
        beta_start: f64,
        /// The last beta.
        beta_end: f64,
    },
    /// `sqrt(beta_t)` evenly spaced from `sqrt(beta_start)` to `sqrt(beta_end)`
    /// (`"scaled_linear"`, the schedule of Stable Diffusion 1.x and 2.x).
    ScaledLinear {
        /// The first beta.
        beta_start: f64,
        /// The last beta.
        beta_end: f64,
    },
    /// The cosine schedule (`"squaredcos_cap_v2"`): `beta_t = min(1 - alpha_bar((t+1)/T) /
    /// alpha_bar(t/T), max_beta)` with `alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)`.
    SquaredcosCapV2 {
        /// The cap on each beta (diffusers uses 0.999).
        max_beta: f64,
    },
    /// `alpha_bar(t) = exp(-12 t)` discretised like the cosine schedule (`"exp"`).
    Exp {
        /// The cap on each beta (diffusers uses 0.999).
        max_beta: f64,
    },
    /// The Laplace schedule (`"laplace"`) discretised like the cosine schedule, with
    /// `lambda(t) = -sign(0.5 - t) ln(1 - 2|0.5 - t| + 1e-6) / 2` and
    /// `alpha_bar(t) = sqrt(e^lambda / (1 + e^lambda))`, as diffusers defines it.
    Laplace {
        /// The cap on each beta (diffusers uses 0.999).
        max_beta: f64,
    },
    /// `beta_t = sigmoid(x_t) (beta_end - beta_start) + beta_start` with `x_t` evenly spaced
    /// in `[-6, 6]` (`"sigmoid"`, GeoDiff).
    Sigmoid {
        /// The smallest beta, approached at `t = 0`.
        beta_start: f64,
        /// The largest beta, approached at `t = T - 1`.
        beta_end: f64,
    },
    /// Betas given outright (diffusers' `trained_betas`); their number sets `T`.
    Trained(Vec<f64>),
}

impl BetaSchedule {
    /// Stable Diffusion 1.x and 2.x: `scaled_linear` from 0.00085 to 0.012.
    pub const STABLE_DIFFUSION: BetaSchedule = BetaSchedule::ScaledLinear {
        beta_start: 0.00085,
        beta_end: 0.012,
    };

    /// The betas of this schedule for `num_train_timesteps` steps (ignored by
    /// [`BetaSchedule::Trained`], whose length is its own).
    ///
    /// # Errors
    /// [`Error::Zero`] if there are no timesteps, [`Error::BetaOutOfRange`] if a beta falls
    /// outside (0, 1), [`Error::InvalidParameter`] for a `max_beta` outside (0, 1).
    pub fn betas(&self, num_train_timesteps: usize) -> Result<Vec<f64>> {
        const MAX_TRAIN_TIMESTEPS: usize = 1_000_000;
        let n = num_train_timesteps;
        let betas = match self {
            BetaSchedule::Trained(betas) => betas.clone(),
            _ if n == 0 => {
                return Err(Error::Zero {
                    what: "num_train_timesteps",
                });
            }
            _ if n > MAX_TRAIN_TIMESTEPS => {
                return Err(Error::InvalidParameter {
                    name: "num_train_timesteps",
                    value: n as f64,
                    reason: "more than the 1,000,000 steps any schedule is trained with",
                });
            }
            BetaSchedule::Linear {
                beta_start,
                beta_end,
            } => torch_linspace(*beta_start, *beta_end, n),
            BetaSchedule::ScaledLinear {
                beta_start,
                beta_end,
            } => torch_linspace(beta_start.sqrt(), beta_end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            BetaSchedule::SquaredcosCapV2 { max_beta } => betas_for_alpha_bar(n, *max_beta, |t| {
                let c = ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos();
                c * c
            })?,
            BetaSchedule::Exp { max_beta } => {
                betas_for_alpha_bar(n, *max_beta, |t| (t * -12.0).exp())?
            }
            BetaSchedule::Laplace { max_beta } => betas_for_alpha_bar(n, *max_beta, |t| {
                let lambda = -0.5 * (0.5 - t).signum() * (1.0 - 2.0 * (0.5 - t).abs() + 1e-6).ln();
                let snr = lambda.exp();
                (snr / (1.0 + snr)).sqrt()
            })?,
            BetaSchedule::Sigmoid {
                beta_start,
                beta_end,
            } => torch_linspace(-6.0, 6.0, n)
                .into_iter()
                .map(|x| 1.0 / (1.0 + (-x).exp()) * (beta_end - beta_start) + beta_start)
                .collect(),
        };
        check_nonzero("number of betas", betas.len())?;
        for (index, &value) in betas.iter().enumerate() {
            // Written so that NaN fails too.
            if !(value > 0.0 && value < 1.0) {
                return Err(Error::BetaOutOfRange { index, value });
            }
        }
        Ok(betas)
    }
}

/// `torch.linspace(start, end, n)`: evenly spaced, computed from the nearer end so that both
/// ends are exact.
fn torch_linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f64
            } else {
                end - step * (n - 1 - i) as f64
            }
        })
        .collect()
}

/// Discretises a continuous `alpha_bar(t)`, `t` in `[0, 1]`, into `n` betas:
/// `beta_i = min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta)`.
fn betas_for_alpha_bar(
    n: usize,
    max_beta: f64,
    alpha_bar: impl Fn(f64) -> f64,
) -> Result<Vec<f64>> {
    if !(max_beta > 0.0 && max_beta < 1.0) {
        return Err(Error::InvalidParameter {
            name: "max_beta",
            value: max_beta,
            reason: "must lie in (0, 1)",
        });
    }
    Ok((0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta)
        })
        .collect())
}

/// A discrete noise schedule: the betas and, in closed form, the alphas and alpha-bars.
///
/// Index `t` runs over the training timesteps `0..T`; `alpha_bar(t)` is the fraction of the
/// signal's variance left after `t + 1` steps of the forward process.
///
/// ```
/// use sd_core::{BetaSchedule, NoiseSchedule};
///
/// let schedule = NoiseSchedule::new(&BetaSchedule::STABLE_DIFFUSION, 1000)?;
/// assert_eq!(schedule.num_train_timesteps(), 1000);
/// assert!((schedule.alphas_cumprod()[999] - 0.004_68).abs() < 1e-4);
/// # Ok::<(), sd_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    betas: Vec<f64>,
    alphas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// Builds the schedule of `beta_schedule` over `num_train_timesteps` steps.
    ///
    /// # Errors
    /// As [`BetaSchedule::betas`].
    pub fn new(beta_schedule: &BetaSchedule, num_train_timesteps: usize) -> Result<Self> {
        Self::from_betas(beta_schedule.betas(num_train_timesteps)?)
    }

    /// Builds the schedule from its betas.
    ///
    /// # Errors
    /// [`Error::Zero`] for no betas, [`Error::BetaOutOfRange`] for a beta outside (0, 1).
    pub fn from_betas(betas: Vec<f64>) -> Result<Self> {
        BetaSchedule::Trained(betas)
            .betas(0)
            .map(Self::from_valid_betas)
    }

    fn from_valid_betas(betas: Vec<f64>) -> Self {
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = alphas
            .iter()
            .scan(1.0, |acc, a| {
                *acc *= a;
                Some(*acc)
            })
            .collect();
        NoiseSchedule {
            betas,
            alphas,
            alphas_cumprod,
        }
    }

    /// Rescales the schedule so that its terminal SNR is zero (Lin et al., 2023, "Common
    /// Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1; diffusers'
    /// `rescale_betas_zero_snr`): `sqrt(alpha_bar)` is shifted so that its last value is 0 and
    /// scaled so that its first value is unchanged.
    ///
    /// The last beta becomes exactly 1 and the last alpha-bar exactly 0, so the last sigma is
    /// infinite: samplers that need a finite one clamp it themselves, as diffusers does.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a schedule of fewer than two steps, which has no
    /// first value to keep apart from its last.
    pub fn rescale_zero_terminal_snr(&self) -> Result<NoiseSchedule> {
        let sqrt_ab: Vec<f64> = self.alphas_cumprod.iter().map(|a| a.sqrt()).collect();
        let (first, last) = (sqrt_ab[0], sqrt_ab[sqrt_ab.len() - 1]);
        if sqrt_ab.len() < 2 || first.is_nan() || first <= last {
            return Err(Error::InvalidParameter {
                name: "num_train_timesteps",
                value: sqrt_ab.len() as f64,
                reason: "a zero-terminal-SNR rescale needs a decreasing alpha-bar over at least two steps",
            });
        }
        let scale = first / (first - last);
        let alphas_cumprod: Vec<f64> = sqrt_ab
            .iter()
            .map(|s| {
                let s = (s - last) * scale;
                s * s
            })
            .collect();
        // Back to betas, as the reference does; alpha-bar is then the cumulative product of
        // the new alphas again.
        let betas = std::iter::once(alphas_cumprod[0])
            .chain(alphas_cumprod.windows(2).map(|w| w[1] / w[0]))
            .map(|alpha| 1.0 - alpha)
            .collect();
        Ok(Self::from_valid_betas(betas))
    }

    /// The number of training timesteps `T`.
    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// The betas, `beta_t` for `t` in `0..T`.
    pub fn betas(&self) -> &[f64] {
        &self.betas
    }

    /// The alphas, `alpha_t = 1 - beta_t`.
    pub fn alphas(&self) -> &[f64] {
        &self.alphas
    }

    /// The alpha-bars (`alphas_cumprod`), `alpha_bar_t = prod_{s <= t} alpha_s`.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// `alpha_bar_t`.
    ///
    /// # Errors
    /// [`Error::TimestepOutOfRange`] unless `t < T`.
    pub fn alpha_bar(&self, t: usize) -> Result<f64> {
        self.alphas_cumprod
            .get(t)
            .copied()
            .ok_or(Error::TimestepOutOfRange {
                timestep: t as f64,
                num_train_timesteps: self.num_train_timesteps(),
            })
    }

    /// `alpha_bar` of a "previous" timestep, where `None` stands for the clean sample before
    /// the first step, whose alpha-bar is 1.
    ///
    /// # Errors
    /// [`Error::TimestepOutOfRange`] unless `t < T`.
    pub fn alpha_bar_or_one(&self, t: Option<usize>) -> Result<f64> {
        t.map_or(Ok(1.0), |t| self.alpha_bar(t))
    }

    /// The signal-to-noise ratio `SNR(t) = alpha_bar_t / (1 - alpha_bar_t)`.
    ///
    /// # Errors
    /// [`Error::TimestepOutOfRange`] unless `t < T`.
    pub fn snr(&self, t: usize) -> Result<f64> {
        self.alpha_bar(t).map(|a| a / (1.0 - a))
    }
}

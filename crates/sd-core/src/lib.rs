//! The mathematics of denoising diffusion, for any Rust tensor library.
//!
//! sd-core holds what every implementation of Stable Diffusion, or of the DDPM it grew from
//! (Ho et al., 2020, "Denoising Diffusion Probabilistic Models"), computes outside its
//! networks: the noise schedule, the forward process, the posterior, the conversions between
//! what a network predicts and the clean sample, the training objective, the noise levels of
//! the k-diffusion samplers and the spacing of inference timesteps. It matches Hugging Face
//! diffusers, whose values its tests replay.
//!
//! It works on plain slices (`&[f32]`, `&[f64]`, in place where that saves a copy), so that
//! candle, burn, tch or ndarray users can call it on their tensors' memory without a copy.
//! Coefficients are computed in `f64` and applied in the slice's type.
//!
//! | module | what | reference |
//! |---|---|---|
//! | [`schedule`] | beta schedules, alphas, alpha-bar, SNR, zero terminal SNR | Ho et al. 2020; Nichol & Dhariwal 2021; Lin et al. 2023 |
//! | [`forward`] | q(x_t \| x_0): `x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps` | Ho et al. eq. 4 |
//! | [`posterior`] | q(x_{t-1} \| x_t, x_0): mean coefficients, variance, variance types | Ho et al. eqs. 6-7 |
//! | [`prediction`] | epsilon / sample / v_prediction, conversions, velocity | Salimans & Ho 2022 |
//! | [`training`] | timestep sampling, targets, MSE, min-SNR-gamma | Ho et al. Alg. 1; Hang et al. 2023 |
//! | [`sigmas`] | `sigma_t = sqrt((1 - abar) / abar)`, interpolation, Karras and exponential ramps | Karras et al. 2022 |
//! | [`spacing`] | leading, trailing and linspace timesteps | diffusers; Lin et al. 2023 |
//! | [`ops`] | the weighted sums of slices every update is made of | |
//!
//! # Example
//!
//! Noise a sample to the middle of Stable Diffusion's schedule, then recover it from the
//! noise, as a perfect epsilon-predicting network would let a sampler do:
//!
//! ```
//! use sd_core::{BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing};
//!
//! let schedule = NoiseSchedule::new(&BetaSchedule::STABLE_DIFFUSION, 1000)?;
//! let timesteps = TimestepSpacing::Leading.timesteps(1000, 50, 1)?;
//! assert_eq!(&timesteps[..3], &[981, 961, 941]);
//!
//! let x0 = [0.5_f32, -1.0, 0.25, 2.0];
//! let eps = [0.1_f32, 0.3, -1.2, 0.7];
//! let t = 500;
//! let mut x_t = [0.0_f32; 4];
//! schedule.add_noise(&x0, &eps, t, &mut x_t)?;
//!
//! let mut recovered = [0.0_f32; 4];
//! PredictionType::Epsilon.to_x0(&eps, &x_t, schedule.alpha_bar(t)?, &mut recovered)?;
//! for (a, b) in recovered.iter().zip(&x0) {
//!     assert!((a - b).abs() < 1e-5);
//! }
//! # Ok::<(), sd_core::Error>(())
//! ```
#![warn(missing_docs)]

pub mod error;
pub mod forward;
pub mod ops;
pub mod posterior;
pub mod prediction;
pub mod real;
pub mod schedule;
pub mod sigmas;
pub mod spacing;
pub mod training;

pub use error::{Error, Result};

pub use forward::ForwardCoefficients;
pub use posterior::{PosteriorCoefficients, VarianceType};
pub use prediction::{Conversion, PredictionType, velocity};
pub use real::Real;
pub use schedule::{BetaSchedule, NoiseSchedule};
pub use sigmas::{VpCoefficients, exponential_sigmas, karras_sigmas, sigma_to_t};
pub use spacing::TimestepSpacing;
pub use training::{LossWeighting, mse, timestep_from_uniform};

//! Samplers for Stable Diffusion, at parity with Hugging Face diffusers.
//!
//! Each sampler is built ready to run from a diffusers `scheduler_config.json` (any model's:
//! switching samplers keeps the model's beta schedule, prediction type and offsets) and a
//! number of steps, and steps plain `f32` slices, so any tensor library can drive it. All
//! schedule mathematics (betas, alpha-bar, sigmas, timestep spacing) comes from [`sd_core`];
//! a sampler adds only its update rule. Stochastic samplers take their noise from the caller
//! ([`NoiseSource`]), so every run can be replayed.
//!
//! # Example
//!
//! A full sampling loop with a stand-in for the network:
//!
//! ```
//! use rand::SeedableRng;
//! use sd_schedulers::{Euler, NoiseSource, RngNoise, Sampler, SchedulerConfig};
//!
//! let config = SchedulerConfig::stable_diffusion_v1();
//! let mut sampler = Euler::new(&config, 20)?;
//! let mut rng = RngNoise(rand::rngs::StdRng::seed_from_u64(0));
//!
//! // Start from noise at the sampler's initial noise level.
//! let mut sample = vec![0.0_f32; 4 * 8 * 8];
//! rng.fill(&mut sample)?;
//! let sigma = sampler.init_noise_sigma() as f32;
//! sample.iter_mut().for_each(|x| *x *= sigma);
//!
//! let mut model_input = vec![0.0_f32; sample.len()];
//! for i in 0..sampler.timesteps().len() {
//!     sampler.scale_model_input(&sample, i, &mut model_input)?;
//!     let t = sampler.timesteps()[i];
//!     // A stand-in network: predicts the noise of a clean sample equal to 0.5 everywhere.
//!     let model_output: Vec<f32> = model_input.iter().map(|&x| x * 0.9 - 0.1 + 0.0 * t as f32).collect();
//!     sample = sampler.step(i, &model_output, &sample, &mut rng)?.prev_sample;
//! }
//! assert!(sample.iter().all(|x| x.is_finite()));
//! # Ok::<(), sd_schedulers::Error>(())
//! ```
#![warn(missing_docs)]

mod common;
pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod deis;
pub mod dpm_solver_multistep;
pub mod dpm_solver_singlestep;
pub mod error;
pub mod euler;
pub mod euler_ancestral;
pub mod heun;
pub mod kdpm2;
pub mod kdpm2_ancestral;
pub mod lcm;
pub mod lms_discrete;
pub mod noise;
pub mod pndm;
pub mod registry;
pub mod sampler;
pub mod tcd;
pub mod unipc;

pub use config::SchedulerConfig;
pub use ddim::{Ddim, DdimOptions};
pub use ddpm::Ddpm;
pub use deis::Deis;
pub use dpm_solver_multistep::DpmSolverMultistep;
pub use dpm_solver_singlestep::DpmSolverSinglestep;
pub use error::{Error, Result};
pub use euler::{Euler, EulerOptions};
pub use euler_ancestral::EulerAncestral;
pub use heun::Heun;
pub use kdpm2::Kdpm2;
pub use kdpm2_ancestral::Kdpm2Ancestral;
pub use lcm::{Lcm, LcmOptions};
pub use lms_discrete::{LmsDiscrete, LmsOptions};
pub use noise::{NoNoise, NoiseSource, ReplayNoise, RngNoise};
pub use pndm::Pndm;
pub use registry::{from_config, sampler};
pub use sampler::{Plan, Sampler, StepOutput, Steps};
pub use tcd::{Tcd, TcdOptions};
pub use unipc::UniPc;

pub use sd_core;

/// The README's programs (sd-core's and this crate's), run as doctests so that they cannot
/// rot.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeExamples;

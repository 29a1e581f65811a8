//! Samplers for Stable Diffusion, at parity with Hugging Face diffusers.
//!
//! This crate will hold one sampler per file (DDPM, DDIM, PNDM, LMS, Euler, Euler ancestral,
//! Heun, KDPM2, DPM-Solver, UniPC, DEIS, LCM, TCD), each built ready to use from a diffusers
//! `scheduler_config.json` and a step count, stepping plain slices. All schedule mathematics
//! (betas, alpha-bar, sigmas, timestep spacing) comes from [`sd_core`].
//!
//! It is an empty shell until the samplers issue lands.
#![warn(missing_docs)]

pub use sd_core;

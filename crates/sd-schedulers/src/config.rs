//! diffusers' `scheduler_config.json`, field for field.
//!
//! One [`SchedulerConfig`] holds every key of every supported class, each optional. A sampler
//! reads the keys its class knows and takes diffusers' class default for each missing one, so
//! any model's scheduler config builds any sampler, as diffusers' `from_config` does:
//! switching from the model's own sampler keeps its beta schedule, prediction type and
//! offsets. Keys that no supported class knows are kept in [`SchedulerConfig::unknown`] and
//! reported by [`SchedulerConfig::unknown_keys`], not rejected. diffusers writes `-Infinity`
//! and `NaN` into some configs (`lambda_min_clipped`); [`SchedulerConfig::from_json`]
//! accepts them.

use std::collections::BTreeMap;

use sd_core::{BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing, VarianceType};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};

/// The beta schedule names of diffusers' `beta_schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BetaScheduleName {
    /// `"linear"`.
    Linear,
    /// `"scaled_linear"`.
    ScaledLinear,
    /// `"squaredcos_cap_v2"`.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
    /// `"sigmoid"` (DDPM only).
    Sigmoid,
    /// `"laplace"` (DDPM only).
    Laplace,
    /// `"exp"` (Heun only).
    Exp,
}

/// DPM-Solver's `algorithm_type` (DEIS's `"deis"` too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AlgorithmType {
    /// `"dpmsolver"`: the noise-prediction solver.
    #[serde(rename = "dpmsolver")]
    DpmSolver,
    /// `"dpmsolver++"`: the data-prediction solver (the default).
    #[serde(rename = "dpmsolver++")]
    DpmSolverPlusPlus,
    /// `"sde-dpmsolver"`.
    #[serde(rename = "sde-dpmsolver")]
    SdeDpmSolver,
    /// `"sde-dpmsolver++"`.
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPlusPlus,
    /// `"deis"`.
    #[serde(rename = "deis")]
    Deis,
}

/// The second-order update of the multistep solvers (`solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SolverType {
    /// DPM-Solver's midpoint update.
    Midpoint,
    /// DPM-Solver's Heun update.
    Heun,
    /// DEIS's log-rho update.
    Logrho,
    /// UniPC's B(h) = h.
    Bh1,
    /// UniPC's B(h) = e^h - 1.
    Bh2,
}

/// The noise level of the last step (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FinalSigmasType {
    /// The last step goes to sigma = 0.
    #[default]
    Zero,
    /// The last step goes to the smallest training sigma.
    SigmaMin,
}

/// How Euler interpolates its sigmas (`interpolation_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum InterpolationType {
    /// `np.interp` of the training sigmas at the timesteps.
    #[default]
    Linear,
    /// Evenly in log-sigma between the extremes.
    LogLinear,
}

/// Whether the network takes a timestep or `ln(sigma) / 4` (`timestep_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TimestepType {
    /// Training timesteps.
    #[default]
    Discrete,
    /// `0.25 ln(sigma)` (EDM-style, with v-prediction).
    Continuous,
}

/// Every key of the supported classes' `scheduler_config.json`, each optional; see the module
/// documentation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SchedulerConfig {
    /// The class the config was written for, e.g. `"PNDMScheduler"`.
    #[serde(
        rename = "_class_name",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub class_name: Option<String>,
    /// The diffusers version that wrote it.
    #[serde(
        rename = "_diffusers_version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub diffusers_version: Option<String>,

    /// The number of training timesteps `T`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_train_timesteps: Option<usize>,
    /// The first beta.
    #[serde(
        default,
        deserialize_with = "lenient_f64",
        skip_serializing_if = "Option::is_none"
    )]
    pub beta_start: Option<f64>,
    /// The last beta.
    #[serde(
        default,
        deserialize_with = "lenient_f64",
        skip_serializing_if = "Option::is_none"
    )]
    pub beta_end: Option<f64>,
    /// The beta schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_schedule: Option<BetaScheduleName>,
    /// Betas given outright.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained_betas: Option<Vec<f64>>,
    /// Rescale to zero terminal SNR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rescale_betas_zero_snr: Option<bool>,
    /// What the network predicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<PredictionType>,
    /// How inference timesteps are spaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Added to `leading` timesteps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_offset: Option<usize>,

    /// DDPM's variance type; DPM-Solver's `learned`/`learned_range` marker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variance_type: Option<VarianceType>,
    /// Clip the predicted x0 to `[-clip_sample_range, clip_sample_range]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_sample: Option<bool>,
    /// The clipping range.
    #[serde(
        default,
        deserialize_with = "lenient_f64",
        skip_serializing_if = "Option::is_none"
    )]
    pub clip_sample_range: Option<f64>,
    /// Dynamic thresholding of the predicted x0 (Saharia et al., 2022).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholding: Option<bool>,
    /// The percentile of dynamic thresholding.
    #[serde(
        default,
        deserialize_with = "lenient_f64",
        skip_serializing_if = "Option::is_none"
    )]
    pub dynamic_thresholding_ratio: Option<f64>,
    /// The largest threshold of dynamic thresholding.
    #[serde(
        default,
        deserialize_with = "lenient_f64",
        skip_serializing_if = "Option::is_none"
    )]
    pub sample_max_value: Option<f64>,
    /// Whether the final alpha-bar is 1 (else alpha-bar at t = 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_alpha_to_one: Option<bool>,
    /// PNDM: skip the Runge-Kutta warm-up (PLMS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_prk_steps: Option<bool>,

    /// Use the Karras et al. noise levels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_karras_sigmas: Option<bool>,
    /// Use exponentially spaced noise levels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_exponential_sigmas: Option<bool>,
    /// Use beta-distributed noise levels (not supported here; an error if true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_beta_sigmas: Option<bool>,
    /// DPM-Solver: lambda-uniform steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_lu_lambdas: Option<bool>,
    /// Flow-matching sigmas (not supported here; an error if true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_flow_sigmas: Option<bool>,
    /// Flow-matching shift.
    #[serde(
        default,
        deserialize_with = "lenient_f64",
        skip_serializing_if = "Option::is_none"
    )]
    pub flow_shift: Option<f64>,
    /// Dynamic shifting (flow models; not supported here; an error if true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_dynamic_shifting: Option<bool>,
    /// Time shift type of dynamic shifting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_shift_type: Option<String>,
    /// The smallest sigma of a Karras or exponential ramp.
    #[serde(
        default,
        deserialize_with = "lenient_f64",
        skip_serializing_if = "Option::is_none"
    )]
    pub sigma_min: Option<f64>,
    /// The largest sigma of a Karras or exponential ramp.
    #[serde(
        default,
        deserialize_with = "lenient_f64",
        skip_serializing_if = "Option::is_none"
    )]
    pub sigma_max: Option<f64>,
    /// Euler's sigma interpolation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpolation_type: Option<InterpolationType>,
    /// Discrete timesteps or `ln(sigma) / 4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_type: Option<TimestepType>,
    /// The last noise level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_sigmas_type: Option<FinalSigmasType>,

    /// The order of a multistep solver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver_order: Option<usize>,
    /// DPM-Solver's / DEIS's algorithm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm_type: Option<AlgorithmType>,
    /// The second-order update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver_type: Option<SolverType>,
    /// Lower the order in the last steps (fewer than 15 steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lower_order_final: Option<bool>,
    /// DPM-Solver: an Euler last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub euler_at_final: Option<bool>,
    /// DPM-Solver: clip lambda(t) below this (the cosine schedule needs -5.1).
    #[serde(
        default,
        deserialize_with = "lenient_f64",
        skip_serializing_if = "Option::is_none"
    )]
    pub lambda_min_clipped: Option<f64>,
    /// UniPC: predict x0 (UniPC with data prediction).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predict_x0: Option<bool>,
    /// UniPC: steps whose corrector is disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_corrector: Option<Vec<usize>>,
    /// UniPC: the solver of the predictor (not supported here; must be null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver_p: Option<serde_json::Value>,
    /// UniPC: shift of the terminal sigma (flow models).
    #[serde(
        default,
        deserialize_with = "lenient_f64",
        skip_serializing_if = "Option::is_none"
    )]
    pub shift_terminal: Option<f64>,

    /// LCM/TCD: the step count of the distillation schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_inference_steps: Option<usize>,
    /// LCM/TCD: the timestep scaling of the consistency boundary conditions.
    #[serde(
        default,
        deserialize_with = "lenient_f64",
        skip_serializing_if = "Option::is_none"
    )]
    pub timestep_scaling: Option<f64>,

    /// Keys no supported class knows, kept as they were.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// An `f64` that may be written as a number, as `"Infinity"`/`"-Infinity"`/`"NaN"`, or
/// (after [`SchedulerConfig::from_json`]'s rewrite) as those words bare, or null.
fn lenient_f64<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Lenient {
        Number(f64),
        Word(String),
    }
    match Option::<Lenient>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Lenient::Number(v)) => Ok(Some(v)),
        Some(Lenient::Word(w)) => match w.as_str() {
            "Infinity" | "inf" => Ok(Some(f64::INFINITY)),
            "-Infinity" | "-inf" => Ok(Some(f64::NEG_INFINITY)),
            "NaN" | "nan" => Ok(Some(f64::NAN)),
            other => Err(serde::de::Error::custom(format!(
                "expected a number, found {other:?}"
            ))),
        },
    }
}

/// Quotes the bare `Infinity`, `-Infinity` and `NaN` tokens Python's json module writes, so
/// that a strict JSON parser accepts them (as strings, which [`lenient_f64`] reads).
fn quote_non_finite(json: &str) -> String {
    let mut out = String::with_capacity(json.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = json;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        let word = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|w| rest.starts_with(w));
        if let Some(word) = word {
            out.push('"');
            out.push_str(word);
            out.push('"');
            rest = &rest[word.len()..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json`'s text.
    ///
    /// # Errors
    /// [`Error::Json`] for malformed JSON or a value of the wrong type or an unknown name
    /// (say `"beta_schedule": "quadratic"`).
    pub fn from_json(json: &str) -> Result<Self> {
        Ok(serde_json::from_str(&quote_non_finite(json))?)
    }

    /// Reads a `scheduler_config.json` file.
    ///
    /// # Errors
    /// [`Error::Json`] as [`SchedulerConfig::from_json`], or if the file cannot be read
    /// (the message names the path).
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        // Only a regular file: reading a FIFO or a device would block or never end.
        match std::fs::metadata(path) {
            Ok(meta) if !meta.is_file() => {
                return Err(Error::Json(serde::de::Error::custom(format!(
                    "cannot read {}: not a regular file",
                    path.display()
                ))));
            }
            _ => {}
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Json(serde::de::Error::custom(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        })?;
        Self::from_json(&text)
    }

    /// The keys of this config that no supported sampler knows (reported, not fatal).
    pub fn unknown_keys(&self) -> Vec<&str> {
        self.unknown.keys().map(String::as_str).collect()
    }

    /// Stable Diffusion 1.x's scheduler config (`PNDMScheduler`, scaled_linear 0.00085 to
    /// 0.012, `steps_offset` 1, `skip_prk_steps`, `set_alpha_to_one` false).
    pub fn stable_diffusion_v1() -> Self {
        SchedulerConfig {
            class_name: Some("PNDMScheduler".into()),
            num_train_timesteps: Some(1000),
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some(BetaScheduleName::ScaledLinear),
            clip_sample: Some(false),
            set_alpha_to_one: Some(false),
            skip_prk_steps: Some(true),
            steps_offset: Some(1),
            ..Default::default()
        }
    }
}

/// The keys every sampler shares, resolved against a class's defaults.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BaseConfig {
    /// `num_train_timesteps`.
    pub num_train_timesteps: usize,
    /// `beta_start`.
    pub beta_start: f64,
    /// `beta_end`.
    pub beta_end: f64,
    /// `beta_schedule`.
    pub beta_schedule: BetaScheduleName,
    /// `trained_betas`.
    pub trained_betas: Option<Vec<f64>>,
    /// `rescale_betas_zero_snr`.
    pub rescale_betas_zero_snr: bool,
    /// `prediction_type`.
    pub prediction_type: PredictionType,
    /// `timestep_spacing`.
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset`.
    pub steps_offset: usize,
}

impl BaseConfig {
    /// diffusers' most common class defaults: linear 0.0001 to 0.02 over 1000 steps, epsilon,
    /// `linspace` spacing, no offset.
    pub const fn diffusers_default(timestep_spacing: TimestepSpacing) -> Self {
        BaseConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaScheduleName::Linear,
            trained_betas: None,
            rescale_betas_zero_snr: false,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing,
            steps_offset: 0,
        }
    }

    /// These defaults overridden by the keys `config` has.
    pub fn resolve(mut self, config: &SchedulerConfig) -> Self {
        let c = config;
        self.num_train_timesteps = c.num_train_timesteps.unwrap_or(self.num_train_timesteps);
        self.beta_start = c.beta_start.unwrap_or(self.beta_start);
        self.beta_end = c.beta_end.unwrap_or(self.beta_end);
        self.beta_schedule = c.beta_schedule.unwrap_or(self.beta_schedule);
        if c.trained_betas.is_some() {
            self.trained_betas.clone_from(&c.trained_betas);
        }
        self.rescale_betas_zero_snr = c
            .rescale_betas_zero_snr
            .unwrap_or(self.rescale_betas_zero_snr);
        self.prediction_type = c.prediction_type.unwrap_or(self.prediction_type);
        self.timestep_spacing = c.timestep_spacing.unwrap_or(self.timestep_spacing);
        self.steps_offset = c.steps_offset.unwrap_or(self.steps_offset);
        self
    }

    /// The noise schedule these keys describe (zero-terminal-SNR rescaled if asked).
    ///
    /// # Errors
    /// [`Error::Core`] for an impossible schedule.
    pub fn noise_schedule(&self) -> Result<NoiseSchedule> {
        let (beta_start, beta_end) = (self.beta_start, self.beta_end);
        let schedule = match &self.trained_betas {
            Some(betas) => BetaSchedule::Trained(betas.clone()),
            None => match self.beta_schedule {
                BetaScheduleName::Linear => BetaSchedule::Linear {
                    beta_start,
                    beta_end,
                },
                BetaScheduleName::ScaledLinear => BetaSchedule::ScaledLinear {
                    beta_start,
                    beta_end,
                },
                BetaScheduleName::SquaredcosCapV2 => {
                    BetaSchedule::SquaredcosCapV2 { max_beta: 0.999 }
                }
                BetaScheduleName::Sigmoid => BetaSchedule::Sigmoid {
                    beta_start,
                    beta_end,
                },
                BetaScheduleName::Laplace => BetaSchedule::Laplace { max_beta: 0.999 },
                BetaScheduleName::Exp => BetaSchedule::Exp { max_beta: 0.999 },
            },
        };
        let schedule = NoiseSchedule::new(&schedule, self.num_train_timesteps)?;
        if self.rescale_betas_zero_snr {
            Ok(schedule.rescale_zero_terminal_snr()?)
        } else {
            Ok(schedule)
        }
    }

    /// Rejects a beta schedule that the class does not implement (diffusers raises
    /// `NotImplementedError`).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the schedule.
    pub fn require_schedule(
        &self,
        sampler: &'static str,
        allowed: &[BetaScheduleName],
    ) -> Result<()> {
        if self.trained_betas.is_none() && !allowed.contains(&self.beta_schedule) {
            return Err(Error::InvalidConfig {
                sampler,
                key: "beta_schedule",
                value: format!("{:?}", self.beta_schedule),
                reason: "this sampler does not implement that schedule",
            });
        }
        Ok(())
    }
}

/// The x0 post-processing keys: clipping and dynamic thresholding.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct ThresholdConfig {
    /// `thresholding`.
    pub thresholding: bool,
    /// `dynamic_thresholding_ratio`.
    pub dynamic_thresholding_ratio: f64,
    /// `sample_max_value`.
    pub sample_max_value: f64,
    /// `clip_sample`.
    pub clip_sample: bool,
    /// `clip_sample_range`.
    pub clip_sample_range: f64,
}

impl ThresholdConfig {
    /// The keys of `config`, with diffusers' defaults (0.995, 1.0, 1.0) and `clip_sample`
    /// defaulting to `clip_default` (true for DDPM and DDIM, false elsewhere).
    pub fn resolve(config: &SchedulerConfig, clip_default: bool) -> Self {
        ThresholdConfig {
            thresholding: config.thresholding.unwrap_or(false),
            dynamic_thresholding_ratio: config.dynamic_thresholding_ratio.unwrap_or(0.995),
            sample_max_value: config.sample_max_value.unwrap_or(1.0),
            clip_sample: config.clip_sample.unwrap_or(clip_default),
            clip_sample_range: config.clip_sample_range.unwrap_or(1.0),
        }
    }
}

/// The keys that choose the noise levels of the k-diffusion family.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub struct SigmaConfig {
    /// `use_karras_sigmas`.
    pub use_karras_sigmas: bool,
    /// `use_exponential_sigmas`.
    pub use_exponential_sigmas: bool,
    /// `sigma_min`.
    pub sigma_min: Option<f64>,
    /// `sigma_max`.
    pub sigma_max: Option<f64>,
    /// `final_sigmas_type`.
    pub final_sigmas_type: FinalSigmasType,
}

impl SigmaConfig {
    /// The keys of `config`; rejects what is not implemented here (`use_beta_sigmas`, which
    /// needs scipy's beta quantiles, flow sigmas and dynamic shifting) and more than one ramp.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the key.
    pub fn resolve(config: &SchedulerConfig, sampler: &'static str) -> Result<Self> {
        for (key, value) in [
            ("use_beta_sigmas", config.use_beta_sigmas),
            ("use_flow_sigmas", config.use_flow_sigmas),
            ("use_dynamic_shifting", config.use_dynamic_shifting),
        ] {
            if value == Some(true) {
                return Err(Error::InvalidConfig {
                    sampler,
                    key,
                    value: "true".into(),
                    reason: "not supported by sd-schedulers",
                });
            }
        }
        let s = SigmaConfig {
            use_karras_sigmas: config.use_karras_sigmas.unwrap_or(false),
            use_exponential_sigmas: config.use_exponential_sigmas.unwrap_or(false),
            sigma_min: config.sigma_min,
            sigma_max: config.sigma_max,
            final_sigmas_type: config.final_sigmas_type.unwrap_or_default(),
        };
        if s.use_karras_sigmas && s.use_exponential_sigmas {
            return Err(Error::InvalidConfig {
                sampler,
                key: "use_exponential_sigmas",
                value: "true".into(),
                reason: "only one of use_karras_sigmas and use_exponential_sigmas can be set",
            });
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_non_finite_numbers_and_keeps_unknown_keys() {
        let config = SchedulerConfig::from_json(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                "beta_schedule": "scaled_linear", "note": "Infinity stays a string", "foo": 3}"#,
        )
        .unwrap();
        assert_eq!(config.lambda_min_clipped, Some(f64::NEG_INFINITY));
        assert_eq!(config.beta_schedule, Some(BetaScheduleName::ScaledLinear));
        assert_eq!(config.unknown_keys(), ["foo", "note"]);
        assert_eq!(config.unknown["note"], "Infinity stays a string");
    }

    #[test]
    fn rejects_impossible_values() {
        let err = SchedulerConfig::from_json(r#"{"beta_schedule": "quadratic"}"#).unwrap_err();
        assert!(err.to_string().contains("quadratic"), "{err}");
        assert!(SchedulerConfig::from_json(r#"{"solver_order": -1}"#).is_err());
    }
}

//! Samplers by name: diffusers' class names (`"DPMSolverMultistepScheduler"`, as a
//! `scheduler_config.json`'s `_class_name` holds them) and the names people know from the
//! common UIs (`"Euler a"`, `"DPM++ 2M Karras"`, ...), each a class plus config overrides.
//!
//! The model's config stays the base, so switching the sampler keeps its beta schedule,
//! prediction type and offsets, as diffusers' `from_config` does.

use crate::config::{AlgorithmType, SchedulerConfig};
use crate::error::{Error, Result};
use crate::sampler::{Plan, Sampler};
use crate::{
    Ddim, Ddpm, Deis, DpmSolverMultistep, DpmSolverSinglestep, Euler, EulerAncestral, Heun, Kdpm2,
    Kdpm2Ancestral, Lcm, LmsDiscrete, Pndm, Tcd, UniPc,
};

/// The diffusers classes implemented here.
pub const CLASS_NAMES: [&str; 15] = [
    Ddpm::CLASS_NAME,
    Ddim::CLASS_NAME,
    Pndm::CLASS_NAME,
    LmsDiscrete::CLASS_NAME,
    Euler::CLASS_NAME,
    EulerAncestral::CLASS_NAME,
    Heun::CLASS_NAME,
    Kdpm2::CLASS_NAME,
    Kdpm2Ancestral::CLASS_NAME,
    DpmSolverMultistep::CLASS_NAME,
    DpmSolverSinglestep::CLASS_NAME,
    UniPc::CLASS_NAME,
    Deis::CLASS_NAME,
    Lcm::CLASS_NAME,
    Tcd::CLASS_NAME,
];

/// A UI name: the class and how it changes the model's config.
struct UiName {
    name: &'static str,
    class_name: &'static str,
    karras: bool,
    apply: fn(&mut SchedulerConfig),
}

fn keep(_: &mut SchedulerConfig) {}

fn dpm_2m(c: &mut SchedulerConfig) {
    c.algorithm_type = Some(AlgorithmType::DpmSolverPlusPlus);
    c.solver_order = Some(2);
}

fn dpm_2m_sde(c: &mut SchedulerConfig) {
    c.algorithm_type = Some(AlgorithmType::SdeDpmSolverPlusPlus);
    c.solver_order = Some(2);
}

fn plms(c: &mut SchedulerConfig) {
    c.skip_prk_steps = Some(true);
}

const UI_NAMES: &[UiName] = &[
    UiName {
        name: "DDPM",
        class_name: Ddpm::CLASS_NAME,
        karras: false,
        apply: keep,
    },
    UiName {
        name: "DDIM",
        class_name: Ddim::CLASS_NAME,
        karras: false,
        apply: keep,
    },
    UiName {
        name: "PLMS",
        class_name: Pndm::CLASS_NAME,
        karras: false,
        apply: plms,
    },
    UiName {
        name: "PNDM",
        class_name: Pndm::CLASS_NAME,
        karras: false,
        apply: keep,
    },
    UiName {
        name: "LMS",
        class_name: LmsDiscrete::CLASS_NAME,
        karras: false,
        apply: keep,
    },
    UiName {
        name: "LMS Karras",
        class_name: LmsDiscrete::CLASS_NAME,
        karras: true,
        apply: keep,
    },
    UiName {
        name: "Euler",
        class_name: Euler::CLASS_NAME,
        karras: false,
        apply: keep,
    },
    UiName {
        name: "Euler Karras",
        class_name: Euler::CLASS_NAME,
        karras: true,
        apply: keep,
    },
    UiName {
        name: "Euler a",
        class_name: EulerAncestral::CLASS_NAME,
        karras: false,
        apply: keep,
    },
    UiName {
        name: "Heun",
        class_name: Heun::CLASS_NAME,
        karras: false,
        apply: keep,
    },
    UiName {
        name: "Heun Karras",
        class_name: Heun::CLASS_NAME,
        karras: true,
        apply: keep,
    },
    UiName {
        name: "DPM2",
        class_name: Kdpm2::CLASS_NAME,
        karras: false,
        apply: keep,
    },
    UiName {
        name: "DPM2 Karras",
        class_name: Kdpm2::CLASS_NAME,
        karras: true,
        apply: keep,
    },
    UiName {
        name: "DPM2 a",
        class_name: Kdpm2Ancestral::CLASS_NAME,
        karras: false,
        apply: keep,
    },
    UiName {
        name: "DPM2 a Karras",
        class_name: Kdpm2Ancestral::CLASS_NAME,
        karras: true,
        apply: keep,
    },
    UiName {
        name: "DPM++ 2M",
        class_name: DpmSolverMultistep::CLASS_NAME,
        karras: false,
        apply: dpm_2m,
    },
    UiName {
        name: "DPM++ 2M Karras",
        class_name: DpmSolverMultistep::CLASS_NAME,
        karras: true,
        apply: dpm_2m,
    },
    UiName {
        name: "DPM++ 2M SDE",
        class_name: DpmSolverMultistep::CLASS_NAME,
        karras: false,
        apply: dpm_2m_sde,
    },
    UiName {
        name: "DPM++ 2M SDE Karras",
        class_name: DpmSolverMultistep::CLASS_NAME,
        karras: true,
        apply: dpm_2m_sde,
    },
    UiName {
        name: "DPM++ 2S",
        class_name: DpmSolverSinglestep::CLASS_NAME,
        karras: false,
        apply: dpm_2m,
    },
    UiName {
        name: "DPM++ 2S Karras",
        class_name: DpmSolverSinglestep::CLASS_NAME,
        karras: true,
        apply: dpm_2m,
    },
    UiName {
        name: "UniPC",
        class_name: UniPc::CLASS_NAME,
        karras: false,
        apply: keep,
    },
    UiName {
        name: "UniPC Karras",
        class_name: UniPc::CLASS_NAME,
        karras: true,
        apply: keep,
    },
    UiName {
        name: "DEIS",
        class_name: Deis::CLASS_NAME,
        karras: false,
        apply: keep,
    },
    UiName {
        name: "LCM",
        class_name: Lcm::CLASS_NAME,
        karras: false,
        apply: keep,
    },
    UiName {
        name: "TCD",
        class_name: Tcd::CLASS_NAME,
        karras: false,
        apply: keep,
    },
];

/// Every name [`sampler`] accepts: the UI names, then the class names.
pub fn names() -> Vec<&'static str> {
    UI_NAMES.iter().map(|u| u.name).chain(CLASS_NAMES).collect()
}

fn normalise(name: &str) -> String {
    name.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Builds the sampler called `name` (a UI name or a diffusers class name, case and spacing
/// ignored) from a model's scheduler config.
///
/// ```
/// use sd_schedulers::{Sampler, SchedulerConfig, registry};
///
/// let config = SchedulerConfig::stable_diffusion_v1();
/// let sampler = registry::sampler("DPM++ 2M Karras", &config, 20)?;
/// assert_eq!(sampler.class_name(), "DPMSolverMultistepScheduler");
/// assert_eq!(sampler.timesteps().len(), 20);
/// # Ok::<(), sd_schedulers::Error>(())
/// ```
///
/// # Errors
/// [`Error::UnknownSampler`] listing the known names; the sampler's own construction errors.
pub fn sampler(
    name: &str,
    config: &SchedulerConfig,
    plan: impl Into<Plan>,
) -> Result<Box<dyn Sampler>> {
    let wanted = normalise(name);
    if let Some(ui) = UI_NAMES.iter().find(|u| normalise(u.name) == wanted) {
        let mut config = config.clone();
        (ui.apply)(&mut config);
        if ui.karras {
            config.use_karras_sigmas = Some(true);
            config.use_exponential_sigmas = Some(false);
        }
        return by_class(ui.class_name, &config, plan.into());
    }
    match CLASS_NAMES.iter().find(|c| normalise(c) == wanted) {
        Some(class_name) => by_class(class_name, config, plan.into()),
        None => Err(unknown(name)),
    }
}

/// Builds the sampler the config itself names (`_class_name`), as a model folder's
/// `scheduler/scheduler_config.json` describes its default sampler.
///
/// # Errors
/// [`Error::UnknownSampler`] if the config names no class or one not implemented here.
pub fn from_config(config: &SchedulerConfig, plan: impl Into<Plan>) -> Result<Box<dyn Sampler>> {
    match &config.class_name {
        Some(name) => sampler(name, config, plan),
        None => Err(unknown("(no _class_name in the config)")),
    }
}

fn unknown(name: &str) -> Error {
    Error::UnknownSampler {
        name: name.to_string(),
        known: names().join(", "),
    }
}

fn by_class(class_name: &str, config: &SchedulerConfig, plan: Plan) -> Result<Box<dyn Sampler>> {
    Ok(match class_name {
        Ddpm::CLASS_NAME => Box::new(Ddpm::new(config, plan)?),
        Ddim::CLASS_NAME => Box::new(Ddim::new(config, plan)?),
        Pndm::CLASS_NAME => Box::new(Pndm::new(config, plan)?),
        LmsDiscrete::CLASS_NAME => Box::new(LmsDiscrete::new(config, plan)?),
        Euler::CLASS_NAME => Box::new(Euler::new(config, plan)?),
        EulerAncestral::CLASS_NAME => Box::new(EulerAncestral::new(config, plan)?),
        Heun::CLASS_NAME => Box::new(Heun::new(config, plan)?),
        Kdpm2::CLASS_NAME => Box::new(Kdpm2::new(config, plan)?),
        Kdpm2Ancestral::CLASS_NAME => Box::new(Kdpm2Ancestral::new(config, plan)?),
        DpmSolverMultistep::CLASS_NAME => Box::new(DpmSolverMultistep::new(config, plan)?),
        DpmSolverSinglestep::CLASS_NAME => Box::new(DpmSolverSinglestep::new(config, plan)?),
        UniPc::CLASS_NAME => Box::new(UniPc::new(config, plan)?),
        Deis::CLASS_NAME => Box::new(Deis::new(config, plan)?),
        Lcm::CLASS_NAME => Box::new(Lcm::new(config, plan)?),
        Tcd::CLASS_NAME => Box::new(Tcd::new(config, plan)?),
        other => return Err(unknown(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_builds_from_sd15_and_sd21_configs() {
        let sd15 = SchedulerConfig::stable_diffusion_v1();
        let mut sd21 = sd15.clone();
        sd21.prediction_type = Some(sd_core::PredictionType::VPrediction);
        for config in [&sd15, &sd21] {
            for name in names() {
                let s = sampler(name, config, 10).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(s.num_inference_steps() > 0, "{name}");
            }
        }
    }

    #[test]
    fn ui_names_apply_their_options() {
        let config = SchedulerConfig::stable_diffusion_v1();
        let karras = sampler("dpm++ 2m  karras", &config, 10).unwrap();
        let plain = sampler("DPM++ 2M", &config, 10).unwrap();
        assert_eq!(karras.class_name(), DpmSolverMultistep::CLASS_NAME);
        assert_ne!(karras.sigmas(), plain.sigmas());
        assert_eq!(
            sampler("Euler a", &config, 10).unwrap().class_name(),
            EulerAncestral::CLASS_NAME
        );
        // The model's config names PNDM: from_config builds it.
        assert_eq!(
            from_config(&config, 10).unwrap().class_name(),
            Pndm::CLASS_NAME
        );
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let err = sampler("Euler b", &SchedulerConfig::default(), 10)
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(
            text.contains("Euler b") && text.contains("DPM++ 2M Karras"),
            "{text}"
        );
        assert!(from_config(&SchedulerConfig::default(), 10).is_err());
    }
}

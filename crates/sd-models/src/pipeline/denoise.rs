//! The one denoising loop every pipeline runs, and the pieces it calls.
//!
//! ```text
//! for each step i in `start..end`:
//!     x_in   = sampler.scale_model_input(x, i)
//!     eps    = predict(i, t_i, x_in)           guidance, a NoisePredictor (UNet, ControlNets)
//!     x      = sampler.step(i, eps, x)
//!     after_step(i, x)                         inpainting's blend of the known region
//!     callback(progress)                       continue, stop or cancel
//! ```
//!
//! What differs between tasks and models sits outside the loop: prompt encoding gives a
//! [`Conditioning`], and noise prediction is a [`NoisePredictor`]: a UNet alone
//! ([`Unet2DConditionModel`]) or a UNet joined by ControlNets ([`ControlledUnet`]), which add
//! residuals to its skip connections (diffusers' `StableDiffusionControlNetPipeline`).

use sd_schedulers::{NoiseSource, Sampler};

use crate::backend::Backend;
use crate::controlnet::{
    ControlHint, ControlInput, ControlNetModel, ControlNetOutput, ControlScale,
};
use crate::error::{Error, Result};
use crate::pipeline::generate::{Control, Progress};
use crate::pipeline::load::scheduler_error;
use crate::unet::{Unet2DConditionModel, UnetConditioning};

/// What the prompt (and the task) give the noise predictor at every step. New models add
/// fields here (as SDXL's pooled text embeddings and size ids), not new loops.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Conditioning<T> {
    /// The text embeddings `[B, L, D]`; with guidance, `B = 2N`: the negative prompt's `N`
    /// entries, then the prompt's.
    pub context: T,
    /// Channels joined to the latents before the UNet, `[B, extra, h, w]`: an inpainting
    /// UNet's mask and masked-image latents. ControlNets see the latents alone.
    pub concat: Option<T>,
    /// Whether the batch is the unconditional half followed by the conditional half
    /// (classifier-free guidance).
    pub guided: bool,
    /// SDXL's pooled text embeddings and micro-conditioning ids, for UNets with
    /// `addition_embed_type: "text_time"`.
    pub added: Option<AddedConditioning<T>>,
}

/// SDXL's added conditioning for each entry of the batch (in the order of
/// [`Conditioning::context`]).
#[derive(Debug, Clone)]
pub struct AddedConditioning<T> {
    /// The pooled text embeddings `[B, D]` (the second text encoder's projection).
    pub text_embeds: T,
    /// The micro-conditioning ids, `K` per entry (`K = 6`: original size, crop top-left and
    /// target size, each as (height, width); 5 for the refiner, with an aesthetic score in
    /// place of the target size).
    pub time_ids: Vec<f64>,
}

impl<T> Conditioning<T> {
    /// Text embeddings alone, with or without guidance halves.
    pub fn new(context: T, guided: bool) -> Self {
        Conditioning {
            context,
            concat: None,
            guided,
            added: None,
        }
    }

    /// With SDXL's added conditioning.
    #[must_use]
    pub fn with_added(mut self, added: AddedConditioning<T>) -> Self {
        self.added = Some(added);
        self
    }

    /// With channels joined to the latents before the UNet (an inpainting UNet's).
    #[must_use]
    pub fn with_concat(mut self, concat: T) -> Self {
        self.concat = Some(concat);
        self
    }
}

/// Where in the run a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPosition {
    /// The step, counted from 0 among the steps run.
    pub index: usize,
    /// The number of steps run.
    pub total: usize,
}

/// One noise prediction: the model output for the latents at a timestep.
pub trait NoisePredictor<B: Backend> {
    /// The prediction for `latents [B, C, h, w]` (scaled by the sampler) at `timestep`.
    ///
    /// # Errors
    /// The networks' errors.
    fn predict(
        &self,
        backend: &B,
        latents: &B::Tensor,
        timestep: f64,
        cond: &Conditioning<B::Tensor>,
        step: StepPosition,
    ) -> Result<B::Tensor>;
}

fn unet_input<B: Backend>(
    backend: &B,
    latents: &B::Tensor,
    cond: &Conditioning<B::Tensor>,
) -> Result<B::Tensor> {
    match &cond.concat {
        Some(extra) => backend.concat(&[latents, extra], 1),
        None => Ok(latents.clone()),
    }
}

impl<B: Backend> NoisePredictor<B> for Unet2DConditionModel<B> {
    fn predict(
        &self,
        backend: &B,
        latents: &B::Tensor,
        timestep: f64,
        cond: &Conditioning<B::Tensor>,
        _step: StepPosition,
    ) -> Result<B::Tensor> {
        let x = unet_input(backend, latents, cond)?;
        let extra = added_inputs(cond);
        self.forward_with(backend, &x, &[timestep], &cond.context, &extra)
    }
}

/// The UNet inputs of `cond`'s added conditioning (none for SD 1.x/2.x).
fn added_inputs<B: Backend>(cond: &Conditioning<B::Tensor>) -> UnetConditioning<'_, B> {
    match &cond.added {
        Some(a) => UnetConditioning {
            text_embeds: Some(&a.text_embeds),
            time_ids: Some(&a.time_ids),
            ..UnetConditioning::default()
        },
        None => UnetConditioning::default(),
    }
}

/// A ControlNet taking part in a generation: the network, its control image's embedding and
/// when and how strongly it acts.
#[derive(Debug, Clone)]
pub struct ActiveControl<'a, B: Backend> {
    /// The network.
    pub model: &'a ControlNetModel<B>,
    /// The control image's embedding (computed once per generation).
    pub hint: ControlHint<B::Tensor>,
    /// `controlnet_conditioning_scale`.
    pub scale: f32,
    /// The fraction of the steps after which it starts acting (`control_guidance_start`).
    pub start: f64,
    /// The fraction of the steps after which it stops (`control_guidance_end`).
    pub end: f64,
}

impl<B: Backend> ActiveControl<'_, B> {
    /// Whether it acts at `step`: diffusers' `controlnet_keep`, 0 when
    /// `i / n < start` or `(i + 1) / n > end`.
    pub fn acts_at(&self, step: StepPosition) -> bool {
        let n = step.total.max(1) as f64;
        let i = step.index as f64;
        !(i / n < self.start || (i + 1.0) / n > self.end)
    }
}

/// A UNet joined by ControlNets, whose residuals (summed over the networks) it adds to its
/// skip connections. In guess mode the ControlNets see only the conditional half of a guided
/// batch, and the unconditional half gets no residual.
#[derive(Debug, Clone)]
pub struct ControlledUnet<'a, B: Backend> {
    /// The UNet.
    pub unet: &'a Unet2DConditionModel<B>,
    /// The ControlNets.
    pub controls: Vec<ActiveControl<'a, B>>,
    /// diffusers' `guess_mode` (the pipelines force it on when their first ControlNet has
    /// `global_pool_conditions`, as diffusers does).
    pub guess_mode: bool,
}

impl<B: Backend> ControlledUnet<'_, B> {
    /// The summed residuals for `latents` at this step, or `None` when no ControlNet acts.
    fn residuals(
        &self,
        backend: &B,
        latents: &B::Tensor,
        timestep: f64,
        cond: &Conditioning<B::Tensor>,
        step: StepPosition,
    ) -> Result<Option<ControlNetOutput<B::Tensor>>> {
        let half = self.guess_mode && cond.guided;
        let (x, context, added) = if half {
            let b = backend.shape(latents).first().copied().unwrap_or(0);
            if b == 0 || b % 2 != 0 {
                return Err(Error::Shape {
                    op: "ControlledUnet",
                    expected: "a guided batch of unconditional and conditional halves".into(),
                    found: format!("{:?}", backend.shape(latents)),
                });
            }
            let added = match &cond.added {
                Some(a) => Some(AddedConditioning {
                    text_embeds: backend.slice(&a.text_embeds, 0, b / 2, b / 2)?,
                    time_ids: a.time_ids[a.time_ids.len() / 2..].to_vec(),
                }),
                None => None,
            };
            (
                backend.slice(latents, 0, b / 2, b / 2)?,
                backend.slice(&cond.context, 0, b / 2, b / 2)?,
                added,
            )
        } else {
            (latents.clone(), cond.context.clone(), cond.added.clone())
        };
        let mut sum: Option<ControlNetOutput<B::Tensor>> = None;
        for control in self.controls.iter().filter(|c| c.acts_at(step)) {
            let scale = ControlScale {
                scale: control.scale,
                guess_mode: self.guess_mode,
            };
            let mut input = ControlInput::new(&control.hint, scale);
            if let Some(a) = &added {
                input.text_embeds = Some(&a.text_embeds);
                input.time_ids = Some(&a.time_ids);
            }
            let out = control
                .model
                .forward(backend, &x, &[timestep], &context, &input)?;
            sum = Some(match sum {
                None => out,
                Some(acc) => ControlNetOutput {
                    down: acc
                        .down
                        .iter()
                        .zip(&out.down)
                        .map(|(a, b)| backend.add(a, b))
                        .collect::<Result<_>>()?,
                    mid: backend.add(&acc.mid, &out.mid)?,
                },
            });
        }
        let Some(sum) = sum else {
            return Ok(None);
        };
        if !half {
            return Ok(Some(sum));
        }
        // The unconditional half gets zeros.
        let pad = |r: &B::Tensor| -> Result<B::Tensor> {
            let shape = backend.shape(r).to_vec();
            let zeros = backend.upload(&vec![0.0; shape.iter().product()], &shape)?;
            let zeros = backend.cast(&zeros, backend.dtype(r))?;
            backend.concat(&[&zeros, r], 0)
        };
        Ok(Some(ControlNetOutput {
            down: sum.down.iter().map(pad).collect::<Result<_>>()?,
            mid: pad(&sum.mid)?,
        }))
    }
}

impl<B: Backend> NoisePredictor<B> for ControlledUnet<'_, B> {
    fn predict(
        &self,
        backend: &B,
        latents: &B::Tensor,
        timestep: f64,
        cond: &Conditioning<B::Tensor>,
        step: StepPosition,
    ) -> Result<B::Tensor> {
        let residuals = self.residuals(backend, latents, timestep, cond, step)?;
        let x = unet_input(backend, latents, cond)?;
        let mut extra = added_inputs(cond);
        if let Some(r) = &residuals {
            extra.down_residuals = Some(&r.down);
            extra.mid_residual = Some(&r.mid);
        }
        self.unet
            .forward_with(backend, &x, &[timestep], &cond.context, &extra)
    }
}

/// How the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoopEnd {
    /// Every step ran.
    Finished,
    /// The callback stopped it.
    Stopped,
    /// The callback cancelled it.
    Cancelled,
}

/// The latents after the loop.
pub(crate) struct Denoised {
    pub latents: Vec<f32>,
    pub steps_run: usize,
    pub end: LoopEnd,
}

/// The model side of a step: the output the sampler takes for the scaled latents.
pub(crate) type Predict<'a> = dyn FnMut(StepPosition, f64, &[f32]) -> Result<Vec<f32>> + 'a;

/// What runs after each step on the new latents (inpainting's blend).
pub(crate) type AfterStep<'a> = dyn FnMut(&dyn Sampler, usize, &mut [f32]) -> Result<()> + 'a;

/// The sampler, its noise and the latents' shape, for [`denoise`].
pub(crate) struct Run<'a> {
    pub sampler: &'a mut dyn Sampler,
    pub noise: &'a mut dyn NoiseSource,
    /// The first step run (image tasks skip the first ones).
    pub start: usize,
    /// The step after the last one run (the schedule's length, or less with diffusers'
    /// `denoising_end`).
    pub end: usize,
    /// `[N, C, h, w]`.
    pub shape: [usize; 4],
    /// Stop with [`Error::NonFinite`] when a step's latents are not all finite.
    pub check_finite: bool,
}

/// Runs the steps from `run.start` on `latents`; `predict(step, t, x)` gives the model output
/// the sampler takes for the scaled latents `x`, `after_step(sampler, i, x)` may change the
/// new latents.
pub(crate) fn denoise(
    run: Run<'_>,
    mut latents: Vec<f32>,
    predict: &mut Predict<'_>,
    after_step: &mut AfterStep<'_>,
    callback: &mut dyn FnMut(&Progress<'_>) -> Control,
) -> Result<Denoised> {
    let Run {
        sampler,
        noise,
        start,
        end,
        shape,
        check_finite,
    } = run;
    let timesteps = sampler.timesteps().to_vec();
    let end = end.min(timesteps.len());
    let total = end.saturating_sub(start);
    let mut scaled = vec![0.0; latents.len()];
    let mut steps_run = 0;
    for (i, &t) in timesteps.iter().enumerate().take(end).skip(start) {
        sampler
            .scale_model_input(&latents, i, &mut scaled)
            .map_err(|e| scheduler_error("scale_model_input", e))?;
        let position = StepPosition {
            index: i - start,
            total,
        };
        let model_output = predict(position, t, &scaled)?;
        if model_output.len() % latents.len().max(1) != 0 {
            return Err(Error::Shape {
                op: "denoising loop",
                expected: format!("a model output of {} values", latents.len()),
                found: format!("{}", model_output.len()),
            });
        }
        let step = sampler
            .step(i, &model_output, &latents, noise)
            .map_err(|e| scheduler_error("sampler step", e))?;
        latents = step.prev_sample;
        after_step(&*sampler, i, &mut latents)?;
        if check_finite && !crate::pipeline::generate::all_finite(&latents) {
            return Err(Error::NonFinite {
                stage: "after the denoising step",
                step: Some(i - start),
            });
        }
        steps_run += 1;
        let control = callback(&Progress {
            step: steps_run - 1,
            steps: total,
            timestep: t,
            latents: &latents,
            pred_original: &step.pred_original_sample,
            latent_shape: shape,
        });
        match control {
            Control::Continue => {}
            Control::Stop => {
                return Ok(Denoised {
                    latents,
                    steps_run,
                    end: if steps_run == total {
                        LoopEnd::Finished
                    } else {
                        LoopEnd::Stopped
                    },
                });
            }
            Control::Cancel => {
                return Ok(Denoised {
                    latents,
                    steps_run,
                    end: LoopEnd::Cancelled,
                });
            }
        }
    }
    Ok(Denoised {
        latents,
        steps_run,
        end: LoopEnd::Finished,
    })
}

//! Training diffusers' `UNet2DModel` (the pixel-space DDPM) with this library alone: the
//! parameters as named `f32` tensors ([`Parameters`]), one step of the denoising objective
//! with AdamW ([`DdpmTrainer::step`]), an exponential moving average of the weights, and
//! checkpoints written as a diffusers `DDPMPipeline` folder that the pipelines (and
//! diffusers) load.
//!
//! Each step builds the network from the current parameters on a fresh [`Autodiff`] tape
//! (an upload of the weights, small next to the passes), runs its unchanged forward code,
//! and takes the gradient of
//!
//! ```text
//! L = 1/B sum_b w(t_b) mean( (model(x_t_b, t_b, label_b) - target_b)^2 )
//! ```
//!
//! with `x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`, the target by the
//! scheduler's prediction type (sd-core's `training_example`) and `w` the weighting (1, or
//! min-SNR-gamma).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use sd_core::{LossWeighting, NoiseSchedule, PredictionType};
use sd_schedulers::SchedulerConfig;
use sd_schedulers::config::BaseConfig;

use crate::backend::DataOps;
use crate::cpu::CpuBackend;
use crate::error::{Error, Result};
use crate::nn::ClassLabels;
use crate::nn::source::{WatchedSource, WeightSource};
use crate::train::autodiff::Autodiff;
use crate::train::optim::{self, AdamW, AdamWState};
use crate::unet::{Unet2DConfig, Unet2DModel};
use crate::weights::{DType, HostData, HostTensor, WeightPath};

/// A network's parameters by their diffusers names, in the order the network loads them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parameters {
    order: Vec<String>,
    values: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Parameters {
    /// The parameters a network takes from `source` (as `f32`), found by building it once.
    ///
    /// # Errors
    /// The network's loading errors.
    pub fn capture<S: WeightSource>(source: &S, config: &Unet2DConfig) -> Result<Self> {
        let captured = Arc::new(Mutex::new(Parameters::default()));
        let out = captured.clone();
        let recorder = WatchedSource::new(source.clone(), move |key, t| {
            let mut out = out.lock().unwrap_or_else(PoisonError::into_inner);
            out.order.push(key.to_owned());
            out.values.insert(
                key.to_owned(),
                (t.shape().to_vec(), t.clone().into_f32_vec()),
            );
        });
        Unet2DModel::from_source(&CpuBackend::new(), &recorder, config.clone())?;
        let params = captured
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Ok(params)
    }

    /// The names, in load order.
    pub fn names(&self) -> &[String] {
        &self.order
    }

    /// A parameter's shape and values.
    pub fn get(&self, name: &str) -> Option<(&[usize], &[f32])> {
        self.values
            .get(name)
            .map(|(s, v)| (s.as_slice(), v.as_slice()))
    }

    /// A parameter's values, to change them.
    pub fn values_mut(&mut self, name: &str) -> Option<&mut Vec<f32>> {
        self.values.get_mut(name).map(|(_, v)| v)
    }

    /// The number of values.
    pub fn count(&self) -> usize {
        self.values.values().map(|(_, v)| v.len()).sum()
    }

    /// The parameters as a [`WeightSource`] for building a network.
    pub fn source(&self) -> ParameterSource<'_> {
        ParameterSource {
            params: self,
            path: WeightPath::root(),
        }
    }

    /// Writes them as a safetensors file (`f32`, diffusers' names), replacing `path`.
    ///
    /// # Errors
    /// [`Error::Io`] for a file that cannot be written.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_f32_tensors(path, &self.entries(""), None)
    }

    /// `(prefix + name, shape, values)` in load order.
    fn entries(&self, prefix: &str) -> Vec<(String, Vec<usize>, &[f32])> {
        self.order
            .iter()
            .filter_map(|n| {
                self.values
                    .get(n)
                    .map(|(s, v)| (format!("{prefix}{n}"), s.clone(), v.as_slice()))
            })
            .collect()
    }
}

/// Writes `f32` tensors (and string metadata) as a safetensors file at `path`: written beside
/// and renamed over it, so that an interrupted write never leaves a torn file.
fn write_f32_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let bad = |message: String| Error::Config {
        what: path.display().to_string(),
        message,
    };
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let data = safetensors::serialize(views, metadata).map_err(|e| bad(e.to_string()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    std::io::Write::write_all(&mut file, &data).map_err(io(&tmp))?;
    // On disk before it replaces the previous file.
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// [`Parameters`] as a [`WeightSource`].
#[derive(Debug, Clone)]
pub struct ParameterSource<'a> {
    params: &'a Parameters,
    path: WeightPath,
}

impl WeightSource for ParameterSource<'_> {
    fn push(&self, name: &str) -> Self {
        ParameterSource {
            params: self.params,
            path: self.path.push(name),
        }
    }

    fn index(&self, i: usize) -> Self {
        self.push(&i.to_string())
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let key = self.path.push(name).to_string();
        let (s, v) = self.params.values.get(&key).ok_or_else(|| Error::Config {
            what: "parameters".into(),
            message: format!("no parameter {key}"),
        })?;
        if s.as_slice() != shape {
            return Err(Error::Shape {
                op: "parameters",
                expected: format!("{key} of shape {shape:?}"),
                found: format!("{s:?}"),
            });
        }
        HostTensor::new(s.clone(), HostData::F32(v.clone()))
    }

    fn describe(&self) -> String {
        if self.path.is_root() {
            "parameters".into()
        } else {
            self.path.to_string()
        }
    }
}

/// How [`DdpmTrainer`] trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainOptions {
    /// The optimiser.
    pub adamw: AdamW,
    /// The gradients' norm is clipped to this (`None`: not clipped).
    pub clip_grad_norm: Option<f64>,
    /// The weighting of the per-sample losses.
    pub weighting: LossWeighting,
    /// The EMA's largest decay (train.py's 0.999); `None` keeps no EMA.
    pub ema_max_decay: Option<f64>,
}

impl Default for TrainOptions {
    /// `tools/digits/train.py`'s: AdamW without weight decay, clipping at 1, uniform
    /// weighting, EMA up to 0.999.
    fn default() -> Self {
        TrainOptions {
            adamw: AdamW {
                weight_decay: 0.0,
                ..AdamW::default()
            },
            clip_grad_norm: Some(1.0),
            weighting: LossWeighting::Uniform,
            ema_max_decay: Some(0.999),
        }
    }
}

/// One batch: clean samples `x0 [B, C, H, W]`, their noise, timesteps and class labels.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// `[B, C, H, W]` clean samples.
    pub x0: &'a [f32],
    /// `[B, C, H, W]` noise.
    pub noise: &'a [f32],
    /// `B` training timesteps.
    pub timesteps: &'a [usize],
    /// `B` class labels for a class-conditional network (empty otherwise).
    pub labels: &'a [u32],
    /// `[B, C, H, W]`.
    pub shape: [usize; 4],
}

/// The `format` of the files [`DdpmTrainer::save_state`] writes.
const STATE_FORMAT: &str = "sd-models ddpm trainer state 1";

/// Label dropout for classifier-free guidance: each label is replaced by `null_label` with
/// probability `probability`, deciding by `uniform()` (a draw from [0, 1)) per label, so that
/// the network also learns the unconditional prediction. A network trained so has one class
/// embedding more than the data has classes, the last one by convention the null class (as
/// `train-digits --label-dropout` writes it). Nothing is drawn when `probability` is 0.
pub fn drop_labels(
    labels: &mut [u32],
    probability: f64,
    null_label: u32,
    mut uniform: impl FnMut() -> f64,
) {
    if probability <= 0.0 {
        return;
    }
    for l in labels {
        if uniform() < probability {
            *l = null_label;
        }
    }
}

/// Trains a `UNet2DModel` on the CPU backend; see the module documentation.
#[derive(Debug, Clone)]
pub struct DdpmTrainer {
    config: Unet2DConfig,
    /// The weights being trained.
    pub params: Parameters,
    /// Their exponential moving average.
    pub ema: Option<Parameters>,
    states: BTreeMap<String, AdamWState>,
    schedule: NoiseSchedule,
    prediction: PredictionType,
    options: TrainOptions,
    /// Optimiser steps taken.
    pub steps: u64,
}

/// What one step did.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// The (weighted) loss before the update.
    pub loss: f64,
    /// The gradients' norm before clipping.
    pub grad_norm: f64,
    /// Wall time of the network's forward pass (recording the tape).
    pub forward: std::time::Duration,
    /// Wall time of the backward pass (the tape walked in reverse).
    pub backward: std::time::Duration,
}

impl DdpmTrainer {
    /// A trainer for a network of `config` starting from `params`, with the noise schedule
    /// and prediction type of `scheduler`.
    ///
    /// # Errors
    /// [`Error::Core`] for an impossible schedule.
    pub fn new(
        config: Unet2DConfig,
        params: Parameters,
        scheduler: &SchedulerConfig,
        options: TrainOptions,
    ) -> Result<Self> {
        let base =
            BaseConfig::diffusers_default(sd_core::TimestepSpacing::Leading).resolve(scheduler);
        let schedule = base.noise_schedule().map_err(|e| Error::Config {
            what: "scheduler".into(),
            message: e.to_string(),
        })?;
        Ok(DdpmTrainer {
            ema: options.ema_max_decay.map(|_| params.clone()),
            config,
            params,
            states: BTreeMap::new(),
            schedule,
            prediction: base.prediction_type,
            options,
            steps: 0,
        })
    }

    /// The training timesteps of the schedule.
    pub fn num_train_timesteps(&self) -> usize {
        self.schedule.alphas_cumprod().len()
    }

    /// The batch's images and labels against the network: its channel count, its
    /// `sample_size` (the size a dataset must have been prepared at), and labels in range
    /// (and present only for a class-conditional network).
    fn check_batch(&self, batch: &Batch<'_>) -> Result<()> {
        let [b, c, h, w] = batch.shape;
        let shape_error = |expected: String, found: String| Error::Shape {
            op: "DdpmTrainer::step",
            expected,
            found,
        };
        if b == 0 {
            return Err(shape_error("a batch of samples".into(), "none".into()));
        }
        if c != self.config.in_channels {
            return Err(shape_error(
                format!(
                    "images of {} channels (the network's in_channels)",
                    self.config.in_channels
                ),
                format!("{c} channels"),
            ));
        }
        if let Some(size) = &self.config.sample_size {
            let (sh, sw) = size.height_width();
            if (h, w) != (sh, sw) {
                return Err(shape_error(
                    format!("images of {sh}x{sw} (the network's sample_size)"),
                    format!("{h}x{w}"),
                ));
            }
        }
        match self.config.num_class_embeds {
            Some(classes) => {
                if batch.labels.len() != b {
                    return Err(shape_error(
                        format!("{b} class labels (the network is class-conditional)"),
                        format!("{}", batch.labels.len()),
                    ));
                }
                if let Some(&bad) = batch.labels.iter().find(|&&l| l as usize >= classes) {
                    return Err(shape_error(
                        format!("class labels below {classes} (num_class_embeds)"),
                        format!("{bad}"),
                    ));
                }
            }
            None if !batch.labels.is_empty() => {
                return Err(shape_error(
                    "no class labels (the network is unconditional)".into(),
                    format!("{}", batch.labels.len()),
                ));
            }
            None => {}
        }
        Ok(())
    }

    /// Writes everything needed to go on training as if never stopped (the weights, their
    /// EMA, AdamW's moments and step counts, the steps taken) as one safetensors file,
    /// written beside and renamed over `path`, with the caller's `settings` (for instance
    /// the JSON of what decides its data and schedule) kept with them, for
    /// [`load_state`](Self::load_state) to return.
    ///
    /// # Errors
    /// [`Error::Io`] for a file that cannot be written.
    pub fn save_state(&self, path: &Path, settings: &str) -> Result<()> {
        let mut tensors = self.params.entries("params/");
        if let Some(ema) = &self.ema {
            tensors.extend(ema.entries("ema/"));
        }
        let mut adam_steps = BTreeMap::new();
        for name in self.params.names() {
            if let (Some(state), Some((shape, _))) = (self.states.get(name), self.params.get(name))
            {
                tensors.push((format!("exp_avg/{name}"), shape.to_vec(), &state.exp_avg));
                tensors.push((
                    format!("exp_avg_sq/{name}"),
                    shape.to_vec(),
                    &state.exp_avg_sq,
                ));
                adam_steps.insert(name.clone(), state.step);
            }
        }
        let metadata = [
            ("format".to_owned(), STATE_FORMAT.to_owned()),
            ("steps".to_owned(), self.steps.to_string()),
            ("settings".to_owned(), settings.to_owned()),
            (
                "adam_steps".to_owned(),
                serde_json::to_string(&adam_steps).unwrap_or_default(),
            ),
        ]
        .into_iter()
        .collect();
        write_f32_tensors(path, &tensors, Some(metadata))
    }

    /// Replaces the weights, EMA, optimiser state and step count with those
    /// [`save_state`](Self::save_state) wrote at `path`, after checking that the file holds
    /// every parameter of this trainer's network at its shape (and an EMA exactly when this
    /// trainer keeps one); on an error nothing changes. Returns the settings saved with them.
    ///
    /// # Errors
    /// [`Error::Io`] for a file that cannot be read; [`Error::Config`] naming the file and
    /// the key for anything missing, misshapen or of another format.
    pub fn load_state(&mut self, path: &Path) -> Result<String> {
        let bad = |message: String| Error::Config {
            what: path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a training state: {e}")))?;
        let file = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a training state: {e}")))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(STATE_FORMAT) {
            return Err(bad(format!(
                "not a training state of format {STATE_FORMAT:?}"
            )));
        }
        let steps: u64 = meta
            .get("steps")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no step count".into()))?;
        let adam_steps: BTreeMap<String, u64> = meta
            .get("adam_steps")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("no optimiser step counts".into()))?;
        let tensor = |key: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let t = file
                .tensor(key)
                .map_err(|_| bad(format!("no tensor {key}")))?;
            if t.dtype() != safetensors::Dtype::F32 || t.shape() != shape {
                return Err(bad(format!(
                    "{key} is {:?} {:?}, expected F32 {shape:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(HostTensor::new(
                shape.to_vec(),
                crate::weights::decode(t.data(), DType::F32, DType::F32),
            )?
            .into_f32_vec())
        };
        let has_ema = file.names().iter().any(|n| n.starts_with("ema/"));
        if has_ema != self.ema.is_some() {
            return Err(bad(format!(
                "the state {} an EMA of the weights and this trainer {}",
                if has_ema { "has" } else { "has no" },
                if self.ema.is_some() {
                    "keeps one"
                } else {
                    "keeps none"
                }
            )));
        }
        let settings = meta.get("settings").cloned().unwrap_or_default();
        let mut params = self.params.clone();
        let mut ema = self.ema.clone();
        let mut states = BTreeMap::new();
        for name in self.params.names() {
            let shape = self
                .params
                .get(name)
                .map(|(s, _)| s.to_vec())
                .unwrap_or_default();
            if let Some(v) = params.values_mut(name) {
                *v = tensor(&format!("params/{name}"), &shape)?;
            }
            if let Some(v) = ema.as_mut().and_then(|e| e.values_mut(name)) {
                *v = tensor(&format!("ema/{name}"), &shape)?;
            }
            if let Some(&step) = adam_steps.get(name) {
                states.insert(
                    name.clone(),
                    AdamWState {
                        exp_avg: tensor(&format!("exp_avg/{name}"), &shape)?,
                        exp_avg_sq: tensor(&format!("exp_avg_sq/{name}"), &shape)?,
                        step,
                    },
                );
            }
        }
        self.params = params;
        self.ema = ema;
        self.states = states;
        self.steps = steps;
        Ok(settings)
    }

    /// One optimiser step on `batch` at learning rate `lr`.
    ///
    /// # Errors
    /// [`Error::Shape`] for a batch whose parts disagree, or whose images or labels the
    /// network does not take (channels, `sample_size`, classes); [`Error::NonFinite`] when the loss
    /// or a gradient is not finite (the parameters are then left as they were); the
    /// network's errors.
    pub fn step(&mut self, batch: Batch<'_>, lr: f64) -> Result<StepReport> {
        let [b, c, h, w] = batch.shape;
        let per = c * h * w;
        let n = b * per;
        if batch.x0.len() != n || batch.noise.len() != n || batch.timesteps.len() != b {
            return Err(Error::Shape {
                op: "DdpmTrainer::step",
                expected: format!("x0 and noise of {n} values and {b} timesteps"),
                found: format!(
                    "{}, {} and {}",
                    batch.x0.len(),
                    batch.noise.len(),
                    batch.timesteps.len()
                ),
            });
        }
        self.check_batch(&batch)?;
        // x_t and the target, per sample.
        let mut x_t = vec![0.0f32; n];
        let mut target = vec![0.0f32; n];
        for (i, &t) in batch.timesteps.iter().enumerate() {
            let r = i * per..(i + 1) * per;
            self.schedule.training_example(
                self.prediction,
                &batch.x0[r.clone()],
                &batch.noise[r.clone()],
                t,
                &mut x_t[r.clone()],
                &mut target[r],
            )?;
        }
        let ad = Autodiff::new(CpuBackend::new());
        let unet = Unet2DModel::from_source(
            &ad,
            &ad.named_source(self.params.source()),
            self.config.clone(),
        )?;
        let x = ad.upload(&x_t, &batch.shape)?;
        let timesteps: Vec<f64> = batch.timesteps.iter().map(|&t| t as f64).collect();
        let labels = (!batch.labels.is_empty()).then_some(ClassLabels::Ids(batch.labels));
        let started = std::time::Instant::now();
        let out = unet.forward(&ad, &x, &timesteps, labels)?;
        let forward = started.elapsed();
        let pred = ad.download(&out)?;
        // The weighted loss and its gradient.
        let mut loss = 0.0f64;
        let mut dpred = vec![0.0f32; n];
        for (i, &t) in batch.timesteps.iter().enumerate() {
            let wgt = self
                .options
                .weighting
                .weight(self.schedule.snr(t)?, self.prediction);
            let r = i * per..(i + 1) * per;
            let (l, g) = super::grad::mse_loss(&pred[r.clone()], &target[r.clone()])?;
            loss += wgt * f64::from(l) / b as f64;
            let scale = (wgt / b as f64) as f32;
            for (d, gv) in dpred[r].iter_mut().zip(g) {
                *d = gv * scale;
            }
        }
        if !loss.is_finite() {
            return Err(Error::NonFinite {
                stage: "training loss",
                step: Some(self.steps as usize),
            });
        }
        let seed = ad.inner().upload(&dpred, &batch.shape)?;
        let started = std::time::Instant::now();
        let grads = ad.backward(&out, &seed)?;
        let backward = started.elapsed();
        let mut named: Vec<(String, Vec<f32>)> = grads
            .named()
            .map(|(name, g)| Ok((name.to_owned(), ad.inner().download(g)?)))
            .collect::<Result<_>>()?;
        let mut refs: Vec<&mut [f32]> = named.iter_mut().map(|(_, g)| g.as_mut_slice()).collect();
        let grad_norm = match self.options.clip_grad_norm {
            Some(max) => optim::clip_grad_norm(&mut refs, max),
            None => optim::clip_grad_norm(&mut refs, f64::INFINITY),
        };
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite {
                stage: "training gradients",
                step: Some(self.steps as usize),
            });
        }
        // Every gradient fits its parameter before any is changed.
        for (name, g) in &named {
            let len = self.params.get(name).map(|(_, v)| v.len());
            if len.is_some_and(|l| l != g.len()) {
                return Err(Error::Shape {
                    op: "DdpmTrainer::step",
                    expected: format!("a gradient of {name}'s {} values", len.unwrap_or(0)),
                    found: format!("{}", g.len()),
                });
            }
        }
        for (name, g) in &named {
            let Some(p) = self.params.values_mut(name) else {
                continue;
            };
            let state = self.states.entry(name.clone()).or_default();
            self.options.adamw.step(lr, p, g, state)?;
        }
        self.steps += 1;
        if let (Some(ema), Some(max)) = (&mut self.ema, self.options.ema_max_decay) {
            let decay = optim::ema_decay(self.steps, max);
            for name in self.params.order.clone() {
                if let (Some(e), Some((_, p))) = (ema.values_mut(&name), self.params.get(&name)) {
                    optim::ema_update(e, p, decay);
                }
            }
        }
        Ok(StepReport {
            loss,
            grad_norm,
            forward,
            backward,
        })
    }
}

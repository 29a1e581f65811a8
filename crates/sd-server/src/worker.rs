//! The one thread that owns the pipeline: it takes jobs from the bounded queue one at a time,
//! runs each image from its own seed, keeps the progress that `/sdapi/v1/progress` reports,
//! and stops a job when its client goes away, when `/sdapi/v1/interrupt` asks, or at
//! shutdown.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sd_models::Backend;
use sd_models::lora::Lora;
use sd_models::pipeline::{Control, Image, Mask, Outcome, Params, Progress, StableDiffusion};
use tokio::sync::{mpsc, oneshot};

/// What a job starts from.
#[derive(Debug)]
pub(crate) enum Input {
    /// Text-to-image.
    Text,
    /// Image-to-image, or inpainting with a mask.
    Image {
        image: Image,
        strength: f64,
        mask: Option<Mask>,
    },
}

/// One request's work: every image generated alone from its seed.
#[derive(Debug)]
pub(crate) struct JobSpec {
    pub kind: &'static str,
    pub params: Params,
    pub seeds: Vec<u64>,
    pub input: Input,
    /// `<lora:NAME:WEIGHT>` tags of the prompt.
    pub loras: Vec<(String, f64)>,
}

/// Flags a job's client and the server set.
#[derive(Debug, Default)]
pub(crate) struct JobControl {
    /// Stop without an answer (the client left, or the server is stopping).
    pub cancel: AtomicBool,
    /// Stop and answer with what is done (`/sdapi/v1/interrupt`).
    pub interrupt: AtomicBool,
}

/// A job's images.
#[derive(Debug)]
pub(crate) struct JobOutput {
    pub images: Vec<Image>,
    pub interrupted: bool,
}

/// Why a job gave no images.
#[derive(Debug)]
pub(crate) enum JobError {
    /// The request cannot be done (told before or at the start of the work).
    BadRequest(String),
    /// Cancelled.
    Cancelled,
    /// Something failed while generating.
    Failed(String),
}

/// A queued job.
pub(crate) struct Job {
    pub spec: JobSpec,
    pub control: Arc<JobControl>,
    pub reply: oneshot::Sender<Result<JobOutput, JobError>>,
}

/// Where the running job is.
#[derive(Debug, Default, Clone)]
pub(crate) struct ProgressNow {
    pub job: String,
    pub job_count: usize,
    pub job_no: usize,
    pub step: usize,
    pub steps: usize,
    pub started: Option<Instant>,
    pub timestamp: String,
    pub interrupted: bool,
}

/// What the handlers and the worker share.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub progress: Mutex<ProgressNow>,
    pub current: Mutex<Option<Arc<JobControl>>>,
    pub queued: AtomicUsize,
    pub served: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    pub shutting_down: AtomicBool,
    pub lora_dir: Option<PathBuf>,
    pub log: bool,
}

impl Shared {
    pub(crate) fn progress(&self) -> std::sync::MutexGuard<'_, ProgressNow> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn current(&self) -> std::sync::MutexGuard<'_, Option<Arc<JobControl>>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `YYYYMMDDhhmmss` of now, UTC.
fn timestamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}{:02}{:02}{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Runs jobs until the queue closes.
pub(crate) fn run<B: Backend>(
    mut pipe: StableDiffusion<B>,
    mut jobs: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
) {
    let mut loras: Vec<(String, f64)> = Vec::new();
    let mut number = 0u64;
    while let Some(job) = jobs.blocking_recv() {
        number += 1;
        shared.queued.fetch_sub(1, Ordering::SeqCst);
        let Job {
            spec,
            control,
            reply,
        } = job;
        if control.cancel.load(Ordering::SeqCst) || shared.shutting_down.load(Ordering::SeqCst) {
            shared.cancelled.fetch_add(1, Ordering::SeqCst);
            let _ = reply.send(Err(JobError::Cancelled));
            continue;
        }
        *shared.current() = Some(control.clone());
        *shared.progress() = ProgressNow {
            job: spec.kind.to_owned(),
            job_count: spec.seeds.len(),
            steps: spec.params.steps,
            started: Some(Instant::now()),
            timestamp: timestamp(),
            ..ProgressNow::default()
        };
        let t0 = Instant::now();
        if shared.log {
            let p = &spec.params;
            eprintln!(
                "job {number}: {} of {} image(s), {}x{}, {} steps, seed {}",
                spec.kind,
                spec.seeds.len(),
                p.width.unwrap_or(0),
                p.height.unwrap_or(0),
                p.steps,
                spec.seeds.first().copied().unwrap_or(0)
            );
        }
        // A panic in the pipeline fails this job, not the server.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            execute(&mut pipe, &spec, &control, &shared, &mut loras)
        }))
        .unwrap_or_else(|_| {
            Err(JobError::Failed(
                "the generation failed unexpectedly (an internal error)".into(),
            ))
        });
        if shared.log {
            let secs = t0.elapsed().as_secs_f64();
            match &result {
                Ok(out) if out.interrupted => {
                    eprintln!("job {number}: interrupted after {secs:.1} s")
                }
                Ok(_) => eprintln!("job {number}: done in {secs:.1} s"),
                Err(JobError::Cancelled) => eprintln!("job {number}: cancelled after {secs:.1} s"),
                Err(JobError::BadRequest(m) | JobError::Failed(m)) => {
                    eprintln!("job {number}: failed: {m}");
                }
            }
        }
        *shared.current() = None;
        *shared.progress() = ProgressNow::default();
        let counter = match &result {
            Ok(_) => &shared.served,
            Err(JobError::Cancelled) => &shared.cancelled,
            Err(_) => &shared.failed,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        let _ = reply.send(result);
    }
}

/// The request's errors are the client's; the rest are the server's.
fn job_error(e: sd_models::Error) -> JobError {
    use sd_models::Error;
    match e {
        Error::Config { .. }
        | Error::Shape { .. }
        | Error::Tokenizer(_)
        | Error::Prompt(_)
        | Error::TokenOutOfVocab { .. } => JobError::BadRequest(e.to_string()),
        other => JobError::Failed(other.to_string()),
    }
}

/// Applies the job's LoRAs (when they differ from those applied), then makes every image.
fn execute<B: Backend>(
    pipe: &mut StableDiffusion<B>,
    spec: &JobSpec,
    control: &JobControl,
    shared: &Shared,
    applied: &mut Vec<(String, f64)>,
) -> Result<JobOutput, JobError> {
    if spec.loras != *applied {
        let mut files = Vec::with_capacity(spec.loras.len());
        for (name, weight) in &spec.loras {
            let dir = shared.lora_dir.as_ref().ok_or_else(|| {
                JobError::BadRequest(format!(
                    "the prompt asks for <lora:{name}>, and the server has no LoRA folder \
                     (--lora-dir)"
                ))
            })?;
            // A file name of letters, digits, `_`, `-` and inner dots: nothing that can
            // leave the folder (no separator, no drive, no `..`).
            let plain = !name.is_empty()
                && !name.starts_with('.')
                && !name.contains("..")
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '));
            if !plain {
                return Err(JobError::BadRequest(format!(
                    "<lora:{name}>: a LoRA is named by its file name (letters, digits, _ - .), \
                     without a path"
                )));
            }
            let path = dir.join(format!("{name}.safetensors"));
            if !path.is_file() {
                return Err(JobError::BadRequest(format!(
                    "<lora:{name}>: no such LoRA in the server's LoRA folder"
                )));
            }
            let lora = Lora::open(&path).map_err(|e| {
                JobError::BadRequest(format!(
                    "<lora:{name}>: {}",
                    e.to_string()
                        .replace(&dir.display().to_string(), "<lora dir>",)
                ))
            })?;
            files.push(lora.with_multiplier(*weight));
        }
        // On failure the pipeline keeps the LoRAs it had.
        pipe.set_loras(&files, false).map_err(job_error)?;
        applied.clone_from(&spec.loras);
    }
    let mut images = Vec::with_capacity(spec.seeds.len());
    let mut params = spec.params.clone();
    for (k, &seed) in spec.seeds.iter().enumerate() {
        params.seed = seed;
        let callback = |p: &Progress<'_>| {
            {
                let mut now = shared.progress();
                now.job_no = k;
                now.step = p.step + 1;
                now.steps = p.steps;
            }
            if control.cancel.load(Ordering::SeqCst) || shared.shutting_down.load(Ordering::SeqCst)
            {
                Control::Cancel
            } else if control.interrupt.load(Ordering::SeqCst) {
                Control::Stop
            } else {
                Control::Continue
            }
        };
        let outcome = match &spec.input {
            Input::Text => pipe.txt2img(&params, callback),
            Input::Image {
                image,
                strength,
                mask: None,
            } => pipe.img2img(&params, image, *strength, callback),
            Input::Image {
                image,
                strength,
                mask: Some(mask),
            } => pipe.inpaint(&params, image, mask, *strength, callback),
        }
        .map_err(job_error)?;
        match outcome {
            Outcome::Finished(g) => images.extend(g.images),
            Outcome::Stopped(g) => images.extend(g.images),
            Outcome::Cancelled { .. } => return Err(JobError::Cancelled),
        }
        if control.cancel.load(Ordering::SeqCst) {
            return Err(JobError::Cancelled);
        }
        if control.interrupt.load(Ordering::SeqCst) {
            shared.progress().interrupted = true;
            return Ok(JobOutput {
                images,
                interrupted: true,
            });
        }
    }
    Ok(JobOutput {
        images,
        interrupted: false,
    })
}

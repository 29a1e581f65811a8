//! An HTTP server that keeps one [`StableDiffusion`] pipeline loaded and speaks the two APIs
//! existing clients use: AUTOMATIC1111's web UI API (`/sdapi/v1/txt2img`, `img2img`,
//! `progress`, `interrupt`, `samplers`, `sd-models`, `options`) and OpenAI's
//! `/v1/images/generations`, plus `/health`.
//!
//! Requests run one at a time on a thread that owns the pipeline, from a bounded queue: a
//! full queue answers 503 with `Retry-After`; a client that disconnects cancels its request;
//! sizes, steps and image counts past the [`ServerOptions`] limits answer 400 with the
//! reason, before any work. Images arrive and leave as base64 PNG; uploaded images are
//! decoded within [`ImageLimits`], so that a small file
//! claiming gigapixels is refused before it is decoded. An optional API key is checked on
//! every request (`Authorization: Bearer KEY`, or HTTP basic auth with KEY as the password,
//! as AUTOMATIC1111's `--api-auth` clients send it).
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use sd_models::CpuBackend;
//! use sd_models::pipeline::{LoadOptions, StableDiffusion};
//! use sd_server::{App, ServerOptions};
//!
//! let pipe = StableDiffusion::load(CpuBackend::new(), "stable-diffusion-v1-5", &LoadOptions::default())
//!     .map_err(std::io::Error::other)?;
//! let app = App::new(pipe, ServerOptions::new("stable-diffusion-v1-5"));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7860").await?;
//! app.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod api;
mod worker;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sd_models::Backend;
use sd_models::pipeline::{
    ControlImage, Image, ImageLimits, Limits, Mask, Params, SamplerChoice, StableDiffusion,
};
use tokio::sync::{mpsc, oneshot};

use crate::api::{
    ControlNetUnit, GenerationInfo, Health, ImagesResponse, Img2ImgRequest, ModelItem, OpenAiImage,
    OpenAiRequest, OpenAiResponse, ProgressResponse, ProgressState, SamplerItem, Txt2ImgRequest,
};
use crate::worker::{Input, Job, JobControl, JobError, JobSpec, Shared};

/// What the server accepts and how it runs.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The model's name, reported by `/sdapi/v1/sd-models` and `/sdapi/v1/options`.
    pub model_name: String,
    /// Where the model was loaded from (reported).
    pub model_path: String,
    /// The largest width or height a request may ask for (default 2048).
    pub max_side: usize,
    /// The most steps (default 150).
    pub max_steps: usize,
    /// The most images one request may ask for, `batch_size * n_iter` or `n` (default 8).
    pub max_images: usize,
    /// Requests that may wait while one runs (default 8); more answer 503.
    pub queue: usize,
    /// Checked on every request when set.
    pub api_key: Option<String>,
    /// The largest request body in bytes (default 32 MiB).
    pub body_limit: usize,
    /// Where `<lora:NAME:WEIGHT>` finds `NAME.safetensors`.
    pub lora_dir: Option<PathBuf>,
    /// What an uploaded image may decode to.
    pub image_limits: ImageLimits,
    /// Seconds a client is told to wait when the queue is full.
    pub retry_after: u64,
    /// Write a line to standard error when a job starts, ends, fails or is cancelled.
    pub log: bool,
}

impl ServerOptions {
    /// The defaults, for a model called `model_name`.
    pub fn new(model_name: impl Into<String>) -> Self {
        let model_name = model_name.into();
        ServerOptions {
            model_path: model_name.clone(),
            model_name,
            max_side: 2048,
            max_steps: 150,
            max_images: 8,
            queue: 8,
            api_key: None,
            body_limit: 32 << 20,
            lora_dir: None,
            image_limits: ImageLimits {
                max_side: 8192,
                max_bytes: 256 << 20,
            },
            retry_after: 10,
            log: false,
        }
    }
}

/// The state every handler sees.
struct AppState {
    options: ServerOptions,
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
    samplers: Vec<String>,
    default_size: (usize, usize),
    size_multiple: usize,
    /// The pipeline's ControlNets: each request gives one unit each.
    controlnets: usize,
}

/// The server: a router over the pipeline's worker thread.
pub struct App {
    state: Arc<AppState>,
    /// `None` if the thread could not be started (every job is then answered 503).
    worker: Option<std::thread::JoinHandle<()>>,
}

/// An error answer: a status and a JSON body `{"error": kind, "detail": message}` (the
/// `detail` field, as AUTOMATIC1111's FastAPI errors carry it).
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    detail: String,
    retry_after: Option<u64>,
    /// Shaped as OpenAI's clients read errors: `{"error": {"message", "type", ...}}`.
    openai: bool,
}

impl ApiError {
    fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: detail.into(),
            retry_after: None,
            openai: false,
        }
    }

    fn bad(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }

    /// The same error for an OpenAI client.
    fn openai(mut self) -> Self {
        self.openai = true;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let reason = self.status.canonical_reason().unwrap_or("error");
        let body = if self.openai {
            let kind = match self.status {
                StatusCode::UNAUTHORIZED => "authentication_error",
                StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => "invalid_request_error",
                _ => "server_error",
            };
            serde_json::json!({
                "error": {"message": self.detail, "type": kind, "param": null, "code": null},
            })
        } else {
            serde_json::json!({"error": reason, "detail": self.detail})
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer, Basic realm=\"sd-server\""),
            );
        }
        response
    }
}

/// Cancels its job when dropped: when the handler's future is dropped because the client
/// went away, the worker stops the job at its next step.
struct CancelOnDrop(Option<Arc<JobControl>>);

impl CancelOnDrop {
    /// Answered: nothing to cancel any more.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(job) = &self.0 {
            job.cancel.store(true, Ordering::SeqCst);
        }
    }
}

impl App {
    /// Starts the worker thread that owns `pipe`; [`router`](Self::router) or
    /// [`serve`](Self::serve) then answer requests.
    pub fn new<B: Backend>(pipe: StableDiffusion<B>, options: ServerOptions) -> Self {
        let (tx, rx) = mpsc::channel(options.queue.max(1));
        let shared = Arc::new(Shared {
            lora_dir: options.lora_dir.clone(),
            log: options.log,
            ..Shared::default()
        });
        let state = Arc::new(AppState {
            samplers: sd_schedulers::registry::names()
                .into_iter()
                .map(str::to_owned)
                .collect(),
            default_size: pipe.default_size(),
            size_multiple: pipe.size_multiple(),
            controlnets: pipe.controlnets().len(),
            options,
            shared: shared.clone(),
            jobs: tx,
        });
        let worker = std::thread::Builder::new()
            .name("sd-server-worker".into())
            .spawn(move || worker::run(pipe, rx, shared));
        // Spawning fails only when the system is out of threads: the queue's receiver is
        // then gone, and every job is answered 503 rather than the server panicking.
        let worker = worker.ok();
        App { state, worker }
    }

    /// The routes, with the body limit and the API key check.
    pub fn router(&self) -> Router {
        let state = self.state.clone();
        Router::new()
            .route("/health", get(health))
            .route("/sdapi/v1/txt2img", post(txt2img))
            .route("/sdapi/v1/img2img", post(img2img))
            .route("/sdapi/v1/progress", get(progress))
            .route("/sdapi/v1/interrupt", post(interrupt))
            .route("/sdapi/v1/samplers", get(samplers))
            .route("/sdapi/v1/schedulers", get(schedulers))
            .route("/sdapi/v1/scripts", get(scripts))
            .route("/sdapi/v1/sd-models", get(sd_models_list))
            .route("/sdapi/v1/options", get(get_options).post(set_options))
            .route("/v1/images/generations", post(openai_generations))
            .fallback(not_found)
            .layer(middleware::from_fn_with_state(state.clone(), authorize))
            .layer(DefaultBodyLimit::max(state.options.body_limit))
            .with_state(state)
    }

    /// Serves on `listener` until `shutdown` completes; then the running and queued jobs are
    /// cancelled, the answers in flight sent, and the worker thread joined.
    ///
    /// # Errors
    /// The listener's I/O errors.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let shared = self.state.shared.clone();
        let stop = async move {
            shutdown.await;
            shared.shutting_down.store(true, Ordering::SeqCst);
            if let Some(job) = shared.current().as_ref() {
                job.cancel.store(true, Ordering::SeqCst);
            }
        };
        let router = self.router();
        let App { state, worker } = self;
        axum::serve(listener, router)
            .with_graceful_shutdown(stop)
            .await?;
        // Closing the queue ends the worker once it has answered what it holds.
        drop(state);
        let Some(worker) = worker else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || worker.join())
            .await
            .map_err(std::io::Error::other)?
            .map_err(|_| std::io::Error::other("the worker thread panicked"))
    }
}

/// Checks the API key, when one is set.
async fn authorize(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(key) = &state.options.api_key else {
        return Ok(next.run(request).await);
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let ok = if let Some(token) = given.strip_prefix("Bearer ") {
        constant_time_eq(token.trim().as_bytes(), key.as_bytes())
    } else if let Some(basic) = given.strip_prefix("Basic ") {
        STANDARD
            .decode(basic.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .is_some_and(|pair| {
                let password = pair.split_once(':').map_or("", |(_, p)| p);
                constant_time_eq(password.as_bytes(), key.as_bytes())
                    || constant_time_eq(pair.as_bytes(), key.as_bytes())
            })
    } else {
        false
    };
    if ok {
        return Ok(next.run(request).await);
    }
    let e = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "a valid API key is needed (Authorization: Bearer KEY)",
    );
    Err(if request.uri().path().starts_with("/v1/") {
        e.openai()
    } else {
        e
    })
}

/// Equality whose time does not depend on where the bytes first differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(state): State<Arc<AppState>>) -> Json<Health> {
    let s = &state.shared;
    Json(Health {
        status: "ok".into(),
        served: s.served.load(Ordering::SeqCst),
        cancelled: s.cancelled.load(Ordering::SeqCst),
        failed: s.failed.load(Ordering::SeqCst),
        queued: s.queued.load(Ordering::SeqCst),
        busy: s.current().is_some(),
    })
}

/// A JSON body: malformed JSON or fields of the wrong type answer 400 with the reason.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<(T, serde_json::Value), ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the body is not JSON: {e}")))?;
    let typed = serde_json::from_value(value.clone())
        .map_err(|e| ApiError::bad(format!("the request does not fit: {e}")))?;
    Ok((typed, value))
}

/// A random seed in AUTOMATIC1111's range.
fn random_seed() -> u64 {
    rand::random::<u32>().into()
}

/// The longest prompt (and negative prompt) a request may send, in bytes: far past the text
/// encoder's 75-token chunks, short enough that parsing and encoding stay cheap.
const MAX_PROMPT_BYTES: usize = 8192;

/// The most `<lora:...>` tags in one prompt.
const MAX_LORAS: usize = 8;

/// The most CLIP layers a request may skip (`CLIP_stop_at_last_layers - 1`).
const MAX_CLIP_SKIP: usize = 11;

/// A request's work: its parameters, each image's seed and the prompt's LoRA tags.
struct Planned {
    params: Params,
    seeds: Vec<u64>,
    loras: Vec<(String, f64)>,
}

/// The parameters of a txt2img-like request after the limits are checked.
fn plan(state: &AppState, r: &Txt2ImgRequest, size: (usize, usize)) -> Result<Planned, ApiError> {
    let o = &state.options;
    let images = r.batch_size.saturating_mul(r.n_iter);
    if images == 0 || images > o.max_images {
        return Err(ApiError::bad(format!(
            "batch_size * n_iter = {images}: between 1 and {} images per request",
            o.max_images
        )));
    }
    if r.steps == 0 || r.steps > o.max_steps {
        return Err(ApiError::bad(format!(
            "steps = {}: between 1 and {}",
            r.steps, o.max_steps
        )));
    }
    let (w, h) = size;
    for (what, v) in [("width", w), ("height", h)] {
        if v == 0 || v > o.max_side || v % state.size_multiple != 0 {
            return Err(ApiError::bad(format!(
                "{what} = {v}: a multiple of {} up to {}",
                state.size_multiple, o.max_side
            )));
        }
    }
    if !r.cfg_scale.is_finite() || r.cfg_scale.abs() > 1000.0 {
        return Err(ApiError::bad(format!(
            "cfg_scale = {} is out of range",
            r.cfg_scale
        )));
    }
    let karras = match r.scheduler.as_deref() {
        None => false,
        Some(s) if s.eq_ignore_ascii_case("automatic") => false,
        Some(s) if s.eq_ignore_ascii_case("karras") => true,
        Some(s) => {
            return Err(ApiError::bad(format!(
                "scheduler {s:?}: \"automatic\" or \"karras\" (GET /sdapi/v1/schedulers)"
            )));
        }
    };
    let sampler = match &r.sampler_name {
        None => SamplerChoice::Model,
        Some(name) if karras && !name.contains("Karras") => {
            SamplerChoice::Name(format!("{name} Karras"))
        }
        Some(name) => SamplerChoice::Name(name.clone()),
    };
    if let SamplerChoice::Name(name) = &sampler {
        let known = state.samplers.iter().any(|s| {
            s.split_whitespace().eq(name.split_whitespace()) || s.eq_ignore_ascii_case(name)
        });
        if !known {
            return Err(ApiError::bad(format!(
                "unknown sampler {name:?} (GET /sdapi/v1/samplers lists them)"
            )));
        }
    }
    let clip_skip = r
        .override_settings
        .get("CLIP_stop_at_last_layers")
        .and_then(serde_json::Value::as_u64)
        .map_or(0, |v| v.saturating_sub(1).min(u64::MAX >> 1) as usize);
    if clip_skip > MAX_CLIP_SKIP {
        return Err(ApiError::bad(format!(
            "CLIP_stop_at_last_layers = {}: at most {}",
            clip_skip + 1,
            MAX_CLIP_SKIP + 1
        )));
    }
    for (what, text) in [
        ("prompt", &r.prompt),
        ("negative_prompt", &r.negative_prompt),
    ] {
        if text.len() > MAX_PROMPT_BYTES {
            return Err(ApiError::bad(format!(
                "{what} is {} bytes; at most {MAX_PROMPT_BYTES}",
                text.len()
            )));
        }
    }
    let controls = control_images(state, r, size)?;
    let (prompt, loras) = sd_models::clip::extract_loras(&r.prompt);
    if loras.len() > MAX_LORAS {
        return Err(ApiError::bad(format!(
            "{} <lora:...> tags; at most {MAX_LORAS}",
            loras.len()
        )));
    }
    let first = if r.seed < 0 {
        random_seed()
    } else {
        r.seed as u64
    };
    let seeds = (0..images as u64).map(|k| first.wrapping_add(k)).collect();
    let params = Params {
        prompt,
        negative_prompt: r.negative_prompt.clone(),
        steps: r.steps,
        guidance_scale: r.cfg_scale,
        sampler,
        width: Some(w),
        height: Some(h),
        num_images: 1,
        clip_skip,
        // AUTOMATIC1111 reads its weighting syntax.
        prompt_weighting: true,
        controls,
        limits: Limits {
            max_side: o.max_side,
            max_pixels: o.max_side.saturating_mul(o.max_side),
            max_images: o.max_images,
            max_steps: o.max_steps,
        },
        ..Params::default()
    };
    Ok(Planned {
        params,
        seeds,
        loras,
    })
}

/// The control images of the ControlNet extension's units (`alwayson_scripts.controlnet.args`,
/// the enabled ones), one for each of the server's ControlNets, resized to the output.
fn control_images(
    state: &AppState,
    r: &Txt2ImgRequest,
    (w, h): (usize, usize),
) -> Result<Vec<ControlImage>, ApiError> {
    // The extension's name, whatever its case (clients send "ControlNet").
    let script = r
        .alwayson_scripts
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("controlnet"))
        .map(|(_, v)| v);
    let units: Vec<ControlNetUnit> = match script.and_then(|c| c.get("args")) {
        None => Vec::new(),
        Some(args) => serde_json::from_value(args.clone())
            .map_err(|e| ApiError::bad(format!("alwayson_scripts.controlnet.args: {e}")))?,
    };
    let units: Vec<ControlNetUnit> = units.into_iter().filter(|u| u.enabled).collect();
    if units.len() != state.controlnets {
        return Err(ApiError::bad(format!(
            "{} ControlNet units (alwayson_scripts.controlnet.args) for the server's {} \
             ControlNets: one each",
            units.len(),
            state.controlnets
        )));
    }
    units
        .iter()
        .enumerate()
        .map(|(k, u)| {
            if let Some(m) = u
                .module
                .as_deref()
                .filter(|m| !m.eq_ignore_ascii_case("none"))
            {
                return Err(ApiError::bad(format!(
                    "ControlNet unit {k}: preprocessor {m:?} is not run by the server; send the \
                     control image itself with module \"none\""
                )));
            }
            let text = u
                .image
                .as_deref()
                .ok_or_else(|| ApiError::bad(format!("ControlNet unit {k} has no image")))?;
            let image = decode_image(state, &format!("ControlNet unit {k}"), text)?;
            Ok(ControlImage {
                image: resized(image, w, h)?,
                scale: u.weight,
                start: u.guidance_start,
                end: u.guidance_end,
            })
        })
        .collect()
}

/// A place in the queue, taken before a request's inputs are decoded, so that a full queue
/// answers 503 before any work.
fn reserve(state: &AppState) -> Result<mpsc::Permit<'_, Job>, ApiError> {
    state.jobs.try_reserve().map_err(|e| {
        let full = matches!(e, mpsc::error::TrySendError::Full(()));
        let detail = if full {
            format!("the queue is full ({} waiting)", state.options.queue)
        } else {
            "the worker has stopped".into()
        };
        ApiError {
            retry_after: full.then_some(state.options.retry_after),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, detail)
        }
    })
}

/// Queues the planned work as a job in its reserved place and waits for its answer; the job
/// is cancelled if this future is dropped.
async fn submit(
    state: &AppState,
    permit: mpsc::Permit<'_, Job>,
    kind: &'static str,
    planned: &Planned,
    input: Input,
) -> Result<worker::JobOutput, ApiError> {
    let spec = JobSpec {
        kind,
        params: planned.params.clone(),
        seeds: planned.seeds.clone(),
        input,
        loras: planned.loras.clone(),
    };
    if state.shared.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ));
    }
    let control = Arc::new(JobControl::default());
    let mut guard = CancelOnDrop(Some(control.clone()));
    let (reply, answer) = oneshot::channel();
    state.shared.queued.fetch_add(1, Ordering::SeqCst);
    permit.send(Job {
        spec,
        control,
        reply,
    });
    let result = answer.await;
    guard.disarm();
    match result {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(JobError::BadRequest(m))) => Err(ApiError::bad(m)),
        Ok(Err(JobError::Failed(m))) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m)),
        Ok(Err(JobError::Cancelled)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the request was cancelled (the server is stopping)",
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the worker stopped without answering",
        )),
    }
}

fn png_base64(image: &Image) -> Result<String, ApiError> {
    let png = image
        .to_png()
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(STANDARD.encode(png))
}

/// An uploaded image: base64 (a `data:` URL prefix allowed) of a PNG or JPEG, decoded
/// within the server's image limits.
fn decode_image(state: &AppState, what: &str, text: &str) -> Result<Image, ApiError> {
    let data = match text.split_once(";base64,") {
        Some((prefix, data)) if prefix.starts_with("data:") => data,
        _ => text,
    };
    let bytes = STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::bad(format!("{what} is not base64: {e}")))?;
    Image::decode(&bytes, state.options.image_limits)
        .map_err(|e| ApiError::bad(format!("{what}: {e}")))
}

/// `image` at `w x h` (AUTOMATIC1111's resize mode 0, "just resize").
fn resized(image: Image, w: usize, h: usize) -> Result<Image, ApiError> {
    if (image.width(), image.height()) == (w, h) {
        return Ok(image);
    }
    let (iw, ih) = (image.width() as u32, image.height() as u32);
    let rgb = image::RgbImage::from_raw(iw, ih, image.into_raw())
        .ok_or_else(|| ApiError::bad("an image whose size does not match its pixels"))?;
    let out = image::imageops::resize(
        &rgb,
        w as u32,
        h as u32,
        image::imageops::FilterType::Lanczos3,
    );
    Image::new(w, h, out.into_raw()).map_err(|e| ApiError::bad(e.to_string()))
}

fn info(
    state: &AppState,
    r: &Txt2ImgRequest,
    params: &Params,
    seeds: &[u64],
    interrupted: bool,
) -> String {
    let sampler_name = match &params.sampler {
        SamplerChoice::Name(n) => n.clone(),
        _ => "model default".into(),
    };
    let info = GenerationInfo {
        prompt: params.prompt.clone(),
        all_prompts: vec![params.prompt.clone(); seeds.len()],
        negative_prompt: params.negative_prompt.clone(),
        seed: seeds.first().copied().unwrap_or(0),
        all_seeds: seeds.to_vec(),
        width: params.width.unwrap_or(0),
        height: params.height.unwrap_or(0),
        sampler_name,
        cfg_scale: r.cfg_scale,
        steps: r.steps,
        batch_size: r.batch_size,
        interrupted,
        sd_model_name: state.options.model_name.clone(),
    };
    serde_json::to_string(&info).unwrap_or_default()
}

async fn txt2img(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Json<ImagesResponse>, ApiError> {
    let (r, raw): (Txt2ImgRequest, _) = parse(&body)?;
    let permit = reserve(&state)?;
    let (dw, dh) = state.default_size;
    let planned = plan(&state, &r, (r.width.unwrap_or(dw), r.height.unwrap_or(dh)))?;
    answer(&state, permit, "txt2img", &r, raw, planned, Input::Text).await
}

/// Runs a planned AUTOMATIC1111 request and answers with its images and `info`.
#[allow(clippy::too_many_arguments)]
async fn answer(
    state: &AppState,
    permit: mpsc::Permit<'_, Job>,
    kind: &'static str,
    request: &Txt2ImgRequest,
    raw: serde_json::Value,
    planned: Planned,
    input: Input,
) -> Result<Json<ImagesResponse>, ApiError> {
    let out = submit(state, permit, kind, &planned, input).await?;
    let images = out
        .images
        .iter()
        .map(png_base64)
        .collect::<Result<_, _>>()?;
    Ok(Json(ImagesResponse {
        images,
        parameters: raw,
        info: info(
            state,
            request,
            &planned.params,
            &planned.seeds,
            out.interrupted,
        ),
    }))
}

async fn img2img(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Json<ImagesResponse>, ApiError> {
    let (r, raw): (Img2ImgRequest, _) = parse(&body)?;
    let first = r
        .init_images
        .first()
        .ok_or_else(|| ApiError::bad("init_images is empty: img2img needs an image"))?;
    let permit = reserve(&state)?;
    let image = decode_image(&state, "init_images[0]", first)?;
    let c = &r.common;
    // The size asked for, else the image's rounded down to the model's multiple.
    let m = state.size_multiple;
    let size = (
        c.width.unwrap_or((image.width() / m * m).max(m)),
        c.height.unwrap_or((image.height() / m * m).max(m)),
    );
    let planned = plan(&state, c, size)?;
    if !(0.0..=1.0).contains(&r.denoising_strength) {
        return Err(ApiError::bad(format!(
            "denoising_strength = {} is outside [0, 1]",
            r.denoising_strength
        )));
    }
    let image = resized(image, size.0, size.1)?;
    let mask = match &r.mask {
        Some(text) if !text.is_empty() => {
            let m = resized(decode_image(&state, "mask", text)?, size.0, size.1)?;
            let m = if r.inpainting_mask_invert == 1 {
                let inverted: Vec<u8> = m.as_raw().iter().map(|v| 255 - v).collect();
                Image::new(size.0, size.1, inverted).map_err(|e| ApiError::bad(e.to_string()))?
            } else {
                m
            };
            Some(Mask::from_image(&m))
        }
        _ => None,
    };
    let input = Input::Image {
        image,
        strength: r.denoising_strength,
        mask,
    };
    answer(&state, permit, "img2img", c, raw, planned, input).await
}

async fn progress(
    State(state): State<Arc<AppState>>,
    Query(_query): Query<std::collections::HashMap<String, String>>,
) -> Json<ProgressResponse> {
    let now = state.shared.progress().clone();
    let total = (now.job_count * now.steps).max(1);
    let done = now.job_no * now.steps + now.step;
    let fraction = if now.job.is_empty() {
        0.0
    } else {
        (done as f64 / total as f64).clamp(0.0, 1.0)
    };
    let elapsed = now.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let eta = if fraction > 0.0 {
        elapsed / fraction - elapsed
    } else {
        0.0
    };
    Json(ProgressResponse {
        progress: fraction,
        eta_relative: eta,
        state: ProgressState {
            skipped: false,
            interrupted: now.interrupted,
            job: now.job,
            job_count: now.job_count,
            job_timestamp: now.timestamp,
            job_no: now.job_no,
            sampling_step: now.step,
            sampling_steps: now.steps,
        },
        current_image: None,
        textinfo: None,
    })
}

async fn interrupt(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    if let Some(job) = state.shared.current().as_ref() {
        job.interrupt.store(true, Ordering::SeqCst);
    }
    Json(serde_json::json!({}))
}

/// The samplers by their UI names (diffusers' class names are accepted too, but not listed).
async fn samplers(State(state): State<Arc<AppState>>) -> Json<Vec<SamplerItem>> {
    Json(
        state
            .samplers
            .iter()
            .filter(|name| !name.ends_with("Scheduler"))
            .map(|name| SamplerItem {
                name: name.clone(),
                aliases: Vec::new(),
                options: serde_json::Map::new(),
            })
            .collect(),
    )
}

/// The noise schedules a request's `scheduler` may name (AUTOMATIC1111 1.9+).
async fn schedulers() -> Json<serde_json::Value> {
    Json(serde_json::json!([
        {"name": "automatic", "label": "Automatic", "aliases": null, "default_rho": -1,
         "need_inner_model": false},
        {"name": "karras", "label": "Karras", "aliases": null, "default_rho": 7.0,
         "need_inner_model": false},
    ]))
}

/// The scripts a request may drive: the ControlNet extension's units when the server has
/// ControlNets.
async fn scripts(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let names: Vec<&str> = if state.controlnets > 0 {
        vec!["controlnet"]
    } else {
        Vec::new()
    };
    Json(serde_json::json!({"txt2img": names, "img2img": names}))
}

/// FastAPI's answer for an unknown route.
async fn not_found() -> (StatusCode, Json<serde_json::Value>) {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({"detail": "Not Found"})),
    )
}

async fn sd_models_list(State(state): State<Arc<AppState>>) -> Json<Vec<ModelItem>> {
    let o = &state.options;
    Json(vec![ModelItem {
        title: o.model_name.clone(),
        model_name: o.model_name.clone(),
        hash: None,
        sha256: None,
        filename: o.model_path.clone(),
        config: None,
    }])
}

async fn get_options(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "sd_model_checkpoint": state.options.model_name,
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
    }))
}

/// Accepted and ignored: the server has one model and no settings to change.
async fn set_options(body: axum::body::Bytes) -> Result<Json<serde_json::Value>, ApiError> {
    let _: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("the body is not JSON: {e}")))?;
    Ok(Json(serde_json::json!({})))
}

async fn openai_generations(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Json<OpenAiResponse>, ApiError> {
    openai_answer(&state, &body).await.map_err(ApiError::openai)
}

async fn openai_answer(state: &AppState, body: &[u8]) -> Result<Json<OpenAiResponse>, ApiError> {
    let (r, _): (OpenAiRequest, _) = parse(body)?;
    let permit = reserve(state)?;
    if let Some(format) = r.response_format.as_deref()
        && format != "b64_json"
    {
        return Err(ApiError::bad(format!(
            "response_format {format:?}: only \"b64_json\" (the server keeps no files to link)"
        )));
    }
    let size = match r.size.as_deref() {
        None | Some("auto") => state.default_size,
        Some(text) => text
            .split_once('x')
            .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)))
            .ok_or_else(|| ApiError::bad(format!("size {text:?} is not WIDTHxHEIGHT")))?,
    };
    let request = Txt2ImgRequest {
        prompt: r.prompt.clone(),
        batch_size: r.n,
        ..Txt2ImgRequest::default()
    };
    let planned = plan(state, &request, size)?;
    let out = submit(state, permit, "txt2img", &planned, Input::Text).await?;
    let data = out
        .images
        .iter()
        .map(|image| {
            Ok(OpenAiImage {
                b64_json: png_base64(image)?,
                revised_prompt: planned.params.prompt.clone(),
            })
        })
        .collect::<Result<_, ApiError>>()?;
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    Ok(Json(OpenAiResponse { created, data }))
}

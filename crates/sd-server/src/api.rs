//! The JSON of the two APIs: AUTOMATIC1111's web UI (`/sdapi/v1/...`, the fields its clients
//! send and read, with its names and defaults) and OpenAI's image generations. Unknown fields
//! are ignored, as AUTOMATIC1111's own server ignores them.

use serde::{Deserialize, Serialize};

/// `POST /sdapi/v1/txt2img` (and the common part of img2img).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Txt2ImgRequest {
    /// The prompt; `<lora:NAME:WEIGHT>` tags are taken out and applied from the server's LoRA
    /// folder.
    pub prompt: String,
    /// The negative prompt.
    pub negative_prompt: String,
    /// The seed of the first image; -1 draws one (reported back in `info`).
    pub seed: i64,
    /// A sampler by its UI name (`"Euler a"`, `"DPM++ 2M Karras"`, ...); the model's own if
    /// absent.
    pub sampler_name: Option<String>,
    /// The noise schedule of newer AUTOMATIC1111 versions: `"Karras"` appends ` Karras` to
    /// the sampler name; `"Automatic"` (or absent) keeps it.
    pub scheduler: Option<String>,
    /// Images per batch.
    pub batch_size: usize,
    /// Batches.
    pub n_iter: usize,
    /// Inference steps.
    pub steps: usize,
    /// Classifier-free guidance scale.
    pub cfg_scale: f64,
    /// Width in pixels (the model's default if absent).
    pub width: Option<usize>,
    /// Height in pixels (the model's default if absent).
    pub height: Option<usize>,
    /// CLIP layers to skip, from `override_settings.CLIP_stop_at_last_layers` (1: none).
    pub override_settings: serde_json::Map<String, serde_json::Value>,
    /// Scripts' arguments; `controlnet.args` (the ControlNet extension's units) drives the
    /// server's ControlNets.
    pub alwayson_scripts: serde_json::Map<String, serde_json::Value>,
}

/// One unit of the ControlNet extension's `alwayson_scripts.controlnet.args`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ControlNetUnit {
    /// Whether the unit acts.
    pub enabled: bool,
    /// The control image, base64 (the extension also calls it `input_image`).
    #[serde(alias = "input_image")]
    pub image: Option<String>,
    /// The preprocessor: only `"none"` (the image is the control image itself).
    pub module: Option<String>,
    /// The residuals' scale.
    pub weight: f64,
    /// The fraction of the steps before which it does not act.
    pub guidance_start: f64,
    /// The fraction of the steps after which it stops acting.
    pub guidance_end: f64,
}

impl Default for ControlNetUnit {
    fn default() -> Self {
        ControlNetUnit {
            enabled: true,
            image: None,
            module: None,
            weight: 1.0,
            guidance_start: 0.0,
            guidance_end: 1.0,
        }
    }
}

impl Default for Txt2ImgRequest {
    fn default() -> Self {
        Txt2ImgRequest {
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: -1,
            sampler_name: None,
            scheduler: None,
            batch_size: 1,
            n_iter: 1,
            steps: 20,
            cfg_scale: 7.0,
            width: None,
            height: None,
            override_settings: serde_json::Map::new(),
            alwayson_scripts: serde_json::Map::new(),
        }
    }
}

/// `POST /sdapi/v1/img2img`: the txt2img fields and the input image (and mask).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Img2ImgRequest {
    /// The fields shared with txt2img.
    #[serde(flatten)]
    pub common: Txt2ImgRequest,
    /// The input images as base64 PNG or JPEG (a `data:` URL prefix is accepted); the first
    /// is used.
    pub init_images: Vec<String>,
    /// How much to change the image, in [0, 1].
    pub denoising_strength: f64,
    /// An inpainting mask as base64 (white is repainted); absent for image-to-image.
    pub mask: Option<String>,
    /// 1 repaints the black part of the mask instead.
    pub inpainting_mask_invert: u8,
}

impl Default for Img2ImgRequest {
    fn default() -> Self {
        Img2ImgRequest {
            common: Txt2ImgRequest::default(),
            init_images: Vec::new(),
            denoising_strength: 0.75,
            mask: None,
            inpainting_mask_invert: 0,
        }
    }
}

/// The answer to txt2img and img2img.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImagesResponse {
    /// The images, base64 PNG.
    pub images: Vec<String>,
    /// The request as it was sent.
    pub parameters: serde_json::Value,
    /// A JSON object as a string (as AUTOMATIC1111 sends it): the seeds and settings used.
    pub info: String,
}

/// What `info` holds (the fields clients read).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerationInfo {
    /// The prompt (without its LoRA tags).
    pub prompt: String,
    /// The prompt of every image.
    pub all_prompts: Vec<String>,
    /// The negative prompt.
    pub negative_prompt: String,
    /// The first image's seed.
    pub seed: u64,
    /// Every image's seed (each image is generated alone from its seed, so any of them
    /// reproduces its image).
    pub all_seeds: Vec<u64>,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// The sampler.
    pub sampler_name: String,
    /// Guidance scale.
    pub cfg_scale: f64,
    /// Steps asked for.
    pub steps: usize,
    /// Images per batch.
    pub batch_size: usize,
    /// Whether `/sdapi/v1/interrupt` stopped the job early (the images are then those of the
    /// steps run).
    pub interrupted: bool,
    /// The model's name.
    pub sd_model_name: String,
}

/// `GET /sdapi/v1/progress`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgressResponse {
    /// The running job's progress in [0, 1] (0 when idle).
    pub progress: f64,
    /// Seconds left, estimated from the time so far.
    pub eta_relative: f64,
    /// Where the job is.
    pub state: ProgressState,
    /// A preview image (not produced: always `null`).
    pub current_image: Option<String>,
    /// Free text (`null`).
    pub textinfo: Option<String>,
}

/// The `state` of a progress answer, with AUTOMATIC1111's names.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProgressState {
    /// Never set (no skip endpoint).
    pub skipped: bool,
    /// Whether the running job was interrupted.
    pub interrupted: bool,
    /// The job's name (`""` when idle).
    pub job: String,
    /// Images in the running job.
    pub job_count: usize,
    /// When the job started, `YYYYMMDDhhmmss` (UTC).
    pub job_timestamp: String,
    /// The image being made, from 0.
    pub job_no: usize,
    /// The step of that image.
    pub sampling_step: usize,
    /// Its steps.
    pub sampling_steps: usize,
}

/// One entry of `GET /sdapi/v1/samplers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SamplerItem {
    /// The UI name.
    pub name: String,
    /// Other names.
    pub aliases: Vec<String>,
    /// Options (none).
    pub options: serde_json::Map<String, serde_json::Value>,
}

/// One entry of `GET /sdapi/v1/sd-models`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelItem {
    /// `"name"` (AUTOMATIC1111 appends a hash; none is computed).
    pub title: String,
    /// The model's name.
    pub model_name: String,
    /// Not computed.
    pub hash: Option<String>,
    /// Not computed.
    pub sha256: Option<String>,
    /// Where it was loaded from.
    pub filename: String,
    /// No separate config file.
    pub config: Option<String>,
}

/// `POST /v1/images/generations` (OpenAI).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct OpenAiRequest {
    /// The prompt.
    pub prompt: String,
    /// Images (1 to the server's limit).
    pub n: usize,
    /// `"WIDTHxHEIGHT"`; the model's default if absent.
    pub size: Option<String>,
    /// `"b64_json"` (the default here); `"url"` is refused, as the server keeps no files.
    pub response_format: Option<String>,
    /// Ignored: the loaded model answers.
    pub model: Option<String>,
}

impl Default for OpenAiRequest {
    fn default() -> Self {
        OpenAiRequest {
            prompt: String::new(),
            n: 1,
            size: None,
            response_format: None,
            model: None,
        }
    }
}

/// OpenAI's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenAiResponse {
    /// Unix time.
    pub created: u64,
    /// One entry per image.
    pub data: Vec<OpenAiImage>,
}

/// One image of OpenAI's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenAiImage {
    /// Base64 PNG.
    pub b64_json: String,
    /// The prompt as used.
    pub revised_prompt: String,
}

/// `GET /health`: the server's counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    /// `"ok"`.
    pub status: String,
    /// Jobs finished (or interrupted) and answered.
    pub served: u64,
    /// Jobs cancelled: by a client that disconnected, or at shutdown.
    pub cancelled: u64,
    /// Jobs that failed.
    pub failed: u64,
    /// Jobs waiting.
    pub queued: usize,
    /// Whether a job is running.
    pub busy: bool,
}

//! Diffusion pipelines: Stable Diffusion text-to-image, image-to-image, inpainting and outpainting over
//! any [`Backend`], with any sampler of `sd-schedulers`.
//!
//! Follows diffusers 0.42's `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline` and
//! `StableDiffusionInpaintPipeline` (`diffusers/pipelines/stable_diffusion/`): prompt
//! encoding with classifier-free guidance (the unconditional and conditional halves in one
//! batched UNet pass, unconditional first), guidance rescale (Lin et al. 2023,
//! `rescale_noise_cfg`), image-to-image from part-way through the schedule
//! (`get_timesteps`, `add_noise` at the first step run), inpainting with a 9-channel
//! inpainting UNet (latents, mask, masked-image latents) or, for an ordinary UNet, by
//! blending the known region back after every step, noised to the next step's level.
//! Outpainting is inpainting of a border added around the image ([`outpaint_canvas`]).
//!
//! [`PixelDiffusion`] samples pixel-space models (diffusers' `DDPMPipeline`, with class
//! labels and any sampler), such as the embedded digits model.
//!
//! # Randomness
//!
//! Every random value comes from one [`NoiseSource`](sd_schedulers::NoiseSource), standard
//! normal, drawn in the order diffusers draws from its one `generator` (so that diffusers'
//! noise, recorded, can be replayed with [`sd_schedulers::ReplayNoise`]):
//!
//! 1. image tasks that encode the image: the VAE posterior sample of the image
//!    (`[1, 4, h, w]`, repeated for each image);
//! 2. the initial noise `[N, 4, h, w]` (all images of the batch, image after image);
//! 3. inpainting: the VAE posterior sample of the masked image (`[1, 4, h, w]`; drawn also
//!    for an ordinary UNet, which does not use it, as diffusers does);
//! 4. each step of a stochastic sampler, `[N, 4, h, w]`.
//!
//! With [`Params::seed`] the source is [`rand::rngs::StdRng`] seeded with it (ChaCha12 in
//! `rand` 0.9), so a seed gives the same image on every run and with any number of threads.
//!
//! # Example
//!
//! ```no_run
//! use sd_models::CpuBackend;
//! use sd_models::pipeline::{Control, LoadOptions, Params, StableDiffusion};
//!
//! let pipe = StableDiffusion::load(CpuBackend::new(), "stable-diffusion-v1-5", &LoadOptions::default())?;
//! let params = Params { prompt: "a red fox in the snow".into(), steps: 25, seed: 42, ..Params::default() };
//! let outcome = pipe.txt2img(&params, |_| Control::Continue)?;
//! let images = outcome.into_generation().map(|g| g.images).unwrap_or_default();
//! # let _ = images;
//! # Ok::<(), sd_models::Error>(())
//! ```

mod denoise;
mod generate;
pub mod image;
mod load;
mod lora;
mod pixel;

pub use denoise::{
    ActiveControl, AddedConditioning, Conditioning, ControlledUnet, NoisePredictor, StepPosition,
};
pub use generate::{
    Control, ControlImage, Generation, Limits, Outcome, Params, Progress, PromptEmbeds,
    SamplerChoice, SdxlParams, Task, Timings,
};
pub use image::{Image, ImageLimits, Margins, Mask, outpaint_canvas};
pub use load::LoadOptions;
pub use pixel::{ClassGuidance, PixelDiffusion, PixelParams, PixelSamples};

use sd_schedulers::SchedulerConfig;

use crate::backend::Backend;
use crate::clip::{ClipTextModel, ClipTokenizer, TextualInversion};
use crate::controlnet::ControlNetModel;
use crate::error::{Error, Result};
use crate::unet::Unet2DConditionModel;
use crate::vae::AutoencoderKl;

/// A Stable Diffusion 1.x / 2.x or SDXL pipeline: tokenizer, text encoder (SDXL: two of
/// each), UNet, VAE and the model's scheduler config (the base every sampler is built from).
#[derive(Debug)]
pub struct StableDiffusion<B: Backend> {
    backend: B,
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel<B>,
    /// SDXL's second tokenizer and text encoder (`tokenizer_2`, `text_encoder_2`).
    second: Option<(ClipTokenizer, ClipTextModel<B>)>,
    /// SDXL pipeline settings of `model_index.json`.
    xl: XlFlags,
    unet: Unet2DConditionModel<B>,
    vae: AutoencoderKl<B>,
    scheduler: SchedulerConfig,
    controlnets: Vec<ControlNetModel<B>>,
    unknown_keys: Vec<String>,
    embeddings: Vec<TextualInversion>,
    origin: Option<load::Origin>,
}

/// SDXL pipeline settings (`model_index.json`'s keys of `StableDiffusionXLPipeline`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct XlFlags {
    /// `force_zeros_for_empty_prompt`.
    pub force_zeros_for_empty_prompt: bool,
    /// `requires_aesthetics_score` (the refiner): 5 ids, an aesthetic score in place of the
    /// target size.
    pub requires_aesthetics_score: bool,
}

impl Default for XlFlags {
    fn default() -> Self {
        XlFlags {
            force_zeros_for_empty_prompt: true,
            requires_aesthetics_score: false,
        }
    }
}

impl XlFlags {
    /// Micro-conditioning ids per image.
    pub fn time_id_count(self) -> usize {
        if self.requires_aesthetics_score { 5 } else { 6 }
    }
}

impl<B: Backend> StableDiffusion<B> {
    /// A pipeline from its parts.
    ///
    /// # Errors
    /// [`Error::Config`] if the parts do not fit together: the UNet's cross-attention width
    /// is not the text encoder's width, its input channels are neither the VAE's latent
    /// channels nor those plus 1 + latent channels (inpainting), or its output channels are
    /// not the latent channels.
    pub fn from_parts(
        backend: B,
        tokenizer: ClipTokenizer,
        text_encoder: ClipTextModel<B>,
        unet: Unet2DConditionModel<B>,
        vae: AutoencoderKl<B>,
        scheduler: SchedulerConfig,
    ) -> Result<Self> {
        Self::assemble(
            backend,
            (tokenizer, text_encoder),
            None,
            unet,
            vae,
            scheduler,
        )
    }

    /// An SDXL pipeline from its parts: the first tokenizer and text encoder (CLIP ViT-L),
    /// the second (OpenCLIP ViT-bigG with its projection; its tokenizer pads with `!`), the
    /// UNet with `addition_embed_type: "text_time"`, the VAE and the scheduler config, with
    /// diffusers' defaults for `force_zeros_for_empty_prompt` (on) and
    /// `requires_aesthetics_score` (off).
    ///
    /// # Errors
    /// As [`StableDiffusion::from_parts`], and [`Error::Config`] if the UNet's
    /// cross-attention width is not the two encoders' widths together, the second encoder
    /// has no projection, or the UNet's `projection_class_embeddings_input_dim` is not the
    /// projection's width plus 6 micro-conditioning embeddings.
    pub fn from_parts_xl(
        backend: B,
        first: (ClipTokenizer, ClipTextModel<B>),
        second: (ClipTokenizer, ClipTextModel<B>),
        unet: Unet2DConditionModel<B>,
        vae: AutoencoderKl<B>,
        scheduler: SchedulerConfig,
    ) -> Result<Self> {
        Self::assemble(backend, first, Some(second), unet, vae, scheduler)
    }

    fn assemble(
        backend: B,
        first: (ClipTokenizer, ClipTextModel<B>),
        second: Option<(ClipTokenizer, ClipTextModel<B>)>,
        unet: Unet2DConditionModel<B>,
        vae: AutoencoderKl<B>,
        scheduler: SchedulerConfig,
    ) -> Result<Self> {
        let flags = XlFlags::default();
        Self::assemble_with(backend, first, second, flags, unet, vae, scheduler)
    }

    pub(crate) fn assemble_with(
        backend: B,
        (tokenizer, text_encoder): (ClipTokenizer, ClipTextModel<B>),
        second: Option<(ClipTokenizer, ClipTextModel<B>)>,
        xl: XlFlags,
        unet: Unet2DConditionModel<B>,
        vae: AutoencoderKl<B>,
        scheduler: SchedulerConfig,
    ) -> Result<Self> {
        let pipe = StableDiffusion {
            backend,
            tokenizer,
            text_encoder,
            second,
            xl,
            unet,
            vae,
            scheduler,
            controlnets: Vec::new(),
            unknown_keys: Vec::new(),
            embeddings: Vec::new(),
            origin: None,
        };
        pipe.check_parts()?;
        Ok(pipe)
    }

    fn check_parts(&self) -> Result<()> {
        let u = self.unet.config();
        let latent = self.vae.config().latent_channels;
        let fail = |message: String| {
            Err(Error::Config {
                what: "pipeline".into(),
                message,
            })
        };
        let first = self.text_encoder.config().hidden_size;
        let cross = u.cross_attention_dim(0);
        match u.text_time_dims() {
            None => {
                if self.second.is_some() {
                    return fail(
                        "a second text encoder was given, but the UNet is not SDXL's (no \
                         addition_embed_type \"text_time\")"
                            .into(),
                    );
                }
                if cross != Some(first) {
                    return fail(format!(
                        "the UNet's cross_attention_dim {cross:?} is not the text encoder's \
                         hidden_size {first}"
                    ));
                }
            }
            Some((input, time_dim)) => {
                // SDXL: the base has both encoders, the refiner
                // (`requires_aesthetics_score`) the second alone; the last one pools.
                let (widths, pooling) = match &self.second {
                    Some((_, te2)) => (first + te2.config().hidden_size, te2),
                    None if self.xl.requires_aesthetics_score => (first, &self.text_encoder),
                    None => {
                        return fail(
                            "the UNet is SDXL's (addition_embed_type \"text_time\"): it needs \
                             the second text encoder and tokenizer (text_encoder_2/, \
                             tokenizer_2/)"
                                .into(),
                        );
                    }
                };
                if cross != Some(widths) {
                    return fail(format!(
                        "the UNet's cross_attention_dim {cross:?} is not the text encoders' \
                         hidden sizes together ({widths}): a text encoder of another model"
                    ));
                }
                if pooling.text_projection.is_none() {
                    return fail(
                        "SDXL's last text encoder has no text_projection \
                         (CLIPTextModelWithProjection), which gives the pooled embedding"
                            .into(),
                    );
                }
                let pooled = pooling.config().projection_dim;
                let ids = self.xl.time_id_count();
                if input != pooled + ids * time_dim {
                    return fail(format!(
                        "the UNet's projection_class_embeddings_input_dim {input} is not the \
                         pooled embedding's {pooled} plus {ids} micro-conditioning ids of \
                         {time_dim}"
                    ));
                }
            }
        }
        if u.in_channels != latent && u.in_channels != 2 * latent + 1 {
            return fail(format!(
                "the UNet's in_channels {} is neither the VAE's latent_channels {latent} nor \
                 {} (inpainting)",
                u.in_channels,
                2 * latent + 1
            ));
        }
        if u.out_channels != latent {
            return fail(format!(
                "the UNet's out_channels {} is not the VAE's latent_channels {latent}",
                u.out_channels
            ));
        }
        Ok(())
    }

    /// The same pipeline with another UNet (an inpainting UNet, say).
    ///
    /// # Errors
    /// As [`StableDiffusion::from_parts`].
    pub fn with_unet(mut self, unet: Unet2DConditionModel<B>) -> Result<Self> {
        self.unet = unet;
        // LoRAs reload the UNet from the pipeline's files, which no longer hold this one.
        self.origin = None;
        self.check_parts()?;
        Ok(self)
    }

    /// The same pipeline with one more ControlNet (diffusers'
    /// `StableDiffusionControlNetPipeline`, or its multi-ControlNet form): every generation
    /// then takes one control image per ControlNet ([`Params::controls`](generate::Params)),
    /// in the order they were added, for every task (text-to-image, image-to-image,
    /// inpainting).
    ///
    /// # Errors
    /// [`Error::Config`] if the ControlNet does not fit the UNet: another cross-attention
    /// width, block widths or resnets per block (its residuals would not match the skip
    /// connections), input channels other than the latents', or a hint network that does not
    /// downsample by the VAE's factor.
    pub fn with_controlnet(mut self, controlnet: ControlNetModel<B>) -> Result<Self> {
        let c = controlnet.config();
        let u = self.unet.config();
        let k = self.controlnets.len();
        let fail = |message: String| {
            Err(Error::Config {
                what: format!("ControlNet {k}"),
                message,
            })
        };
        let per_block = |v: &crate::unet::PerBlock<usize>, blocks: usize| -> Vec<Option<usize>> {
            (0..blocks).map(|i| v.get(i)).collect()
        };
        let blocks = u.block_out_channels.len();
        if c.cross_attention_dim.get(0) != u.cross_attention_dim(0) {
            return fail(format!(
                "its cross_attention_dim {:?} is not the UNet's {:?}",
                c.cross_attention_dim.get(0),
                u.cross_attention_dim(0)
            ));
        }
        if c.block_out_channels != u.block_out_channels
            || per_block(&c.layers_per_block, blocks) != per_block(&u.layers_per_block, blocks)
        {
            return fail(format!(
                "its blocks (block_out_channels {:?}, layers_per_block {:?}) are not the \
                 UNet's ({:?}, {:?}): its residuals would not fit the skip connections",
                c.block_out_channels, c.layers_per_block, u.block_out_channels, u.layers_per_block
            ));
        }
        let latent = self.vae.config().latent_channels;
        if c.in_channels != latent {
            return fail(format!(
                "its in_channels {} is not the VAE's latent_channels {latent}",
                c.in_channels
            ));
        }
        if c.hint_downsample_factor() != self.vae_scale_factor() {
            return fail(format!(
                "its hint network downsamples by {} (conditioning_embedding_out_channels {:?}), \
                 the VAE by {}",
                c.hint_downsample_factor(),
                c.conditioning_embedding_out_channels,
                self.vae_scale_factor()
            ));
        }
        if c.conditioning_channels != 3 {
            return fail(format!(
                "it takes {} channels: the pipelines give RGB control images",
                c.conditioning_channels
            ));
        }
        self.controlnets.push(controlnet);
        Ok(self)
    }

    /// The config keys loading found and nothing here knows (`model_index.json`'s, the
    /// tokenizer config's, the scheduler config's), each as `file: key`, for a warning;
    /// strict loading refuses them.
    pub fn unknown_keys(&self) -> &[String] {
        &self.unknown_keys
    }

    /// Adds a textual inversion embedding ([`TextualInversion::open`]): its tokens to the
    /// tokenizer and its vectors to the text encoder's embedding table, so that prompts can
    /// name it (`a photo of <cat-toy>`). SDXL takes files with `clip_l` and `clip_g`
    /// vectors: each half goes to its encoder (the refiner, with the second encoder alone,
    /// takes `clip_g`), as diffusers' `load_textual_inversion` called for each. Returns the
    /// tokens added.
    ///
    /// # Errors
    /// Those of [`TextualInversion::open`]; [`Error::Config`] for vectors of another width
    /// than the text encoder's, an SDXL file on another model or a one-encoder file on SDXL;
    /// [`Error::Tokenizer`] for a token already in the vocabulary. Nothing is changed when it
    /// fails.
    pub fn load_textual_inversion(
        &mut self,
        path: impl AsRef<std::path::Path>,
        token: Option<&str>,
    ) -> Result<Vec<String>> {
        let path = path.as_ref();
        let ti = TextualInversion::open(path, token)?;
        let config_error = |message: String| Error::Config {
            what: format!("{} (textual inversion)", path.display()),
            message,
        };
        // The vectors for the `text_encoder` slot, and for SDXL's second encoder.
        let (first, second) = match (&ti.second, self.is_xl(), self.second.is_some()) {
            (None, false, _) => ((&ti.vectors, ti.dim), None),
            (Some(g), true, true) => ((&ti.vectors, ti.dim), Some((&g.0, g.1))),
            // The refiner: the second encoder alone, in the first slot.
            (Some(g), true, false) => ((&g.0, g.1), None),
            (Some(_), false, _) => {
                return Err(config_error(
                    "an SDXL embedding (clip_l and clip_g vectors) on a model with one text \
                     encoder"
                        .into(),
                ));
            }
            (None, true, _) => {
                return Err(config_error(format!(
                    "an embedding of {}-wide vectors for one text encoder; SDXL's files hold \
                     clip_l and clip_g vectors for its two",
                    ti.dim
                )));
            }
        };
        let tokens = ti.tokens();
        let tokenizer = add_embedding_tokens(&self.tokenizer, &self.text_encoder, &tokens, first)
            .map_err(|e| with_path(e, path))?;
        let tokenizer_2 = match (&self.second, second) {
            (Some((t, encoder)), Some(vectors)) => Some(
                add_embedding_tokens(t, encoder, &tokens, vectors)
                    .map_err(|e| with_path(e, path))?,
            ),
            _ => None,
        };
        // Every check passed: the vectors join the tables.
        self.text_encoder
            .embeddings
            .token_embedding
            .append_rows(first.0)?;
        if let (Some((t, encoder)), Some(vectors), Some(new)) =
            (self.second.as_mut(), second, tokenizer_2)
        {
            encoder.embeddings.token_embedding.append_rows(vectors.0)?;
            *t = new;
        }
        self.tokenizer = tokenizer;
        self.embeddings.push(ti);
        Ok(tokens)
    }

    /// The textual inversion embeddings loaded, in order.
    pub fn embeddings(&self) -> &[TextualInversion] {
        &self.embeddings
    }

    /// `prompt` with each multi-vector embedding's token standing for all of its tokens
    /// ([`TextualInversion::expand`]), as the pipelines read prompts.
    pub fn expand_embeddings(&self, prompt: &str) -> String {
        self.embeddings
            .iter()
            .fold(prompt.to_owned(), |p, e| e.expand(&p))
    }

    /// The ControlNets, in the order of [`with_controlnet`](Self::with_controlnet).
    pub fn controlnets(&self) -> &[ControlNetModel<B>] {
        &self.controlnets
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// The text encoder.
    pub fn text_encoder(&self) -> &ClipTextModel<B> {
        &self.text_encoder
    }

    /// SDXL's second tokenizer and text encoder (the refiner's one encoder is
    /// [`text_encoder`](Self::text_encoder)).
    pub fn text_encoder_2(&self) -> Option<(&ClipTokenizer, &ClipTextModel<B>)> {
        self.second.as_ref().map(|(t, e)| (t, e))
    }

    /// Whether this is an SDXL pipeline (a UNet with the `"text_time"` added embedding): the
    /// base model, or the refiner (`requires_aesthetics_score`, the second text encoder
    /// alone, held as [`text_encoder`](Self::text_encoder)).
    pub fn is_xl(&self) -> bool {
        self.unet.config().text_time_dims().is_some()
    }

    /// SDXL's `force_zeros_for_empty_prompt`: an empty negative prompt (and second negative
    /// prompt) gives zero embeddings rather than the encoding of `""` (on by default, as
    /// in SDXL's `model_index.json`).
    pub fn force_zeros_for_empty_prompt(&self) -> bool {
        self.xl.force_zeros_for_empty_prompt
    }

    /// Sets [`force_zeros_for_empty_prompt`](Self::force_zeros_for_empty_prompt).
    pub fn set_force_zeros_for_empty_prompt(&mut self, on: bool) {
        self.xl.force_zeros_for_empty_prompt = on;
    }

    /// The UNet.
    pub fn unet(&self) -> &Unet2DConditionModel<B> {
        &self.unet
    }

    /// The VAE.
    pub fn vae(&self) -> &AutoencoderKl<B> {
        &self.vae
    }

    /// The model's scheduler config.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    /// Whether the UNet is an inpainting UNet (latents, mask and masked-image latents in).
    pub fn is_inpainting(&self) -> bool {
        self.unet.config().in_channels != self.vae.config().latent_channels
    }

    /// Pixels per latent pixel (diffusers' `vae_scale_factor`, 8 for Stable Diffusion).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().downsample_factor()
    }

    /// What the width and height must be a multiple of: the VAE's scale factor (8 for
    /// Stable Diffusion, as diffusers checks). The UNet takes latents of any size.
    pub fn size_multiple(&self) -> usize {
        self.vae_scale_factor().max(1)
    }

    /// How many images of `width x height` pixels one network call takes when
    /// [`Params::max_batch`](generate::Params) is 0 (8 of 512x512, at least one).
    pub fn images_per_call(&self, width: usize, height: usize) -> usize {
        let f = self.vae_scale_factor().max(1);
        generate::images_per_call(height / f, width / f)
    }

    /// The default image size (width, height): the UNet's `sample_size` times
    /// [`vae_scale_factor`](Self::vae_scale_factor), as diffusers (512 for SD 1.5).
    pub fn default_size(&self) -> (usize, usize) {
        let (h, w) = self
            .unet
            .config()
            .sample_size
            .as_ref()
            .map_or((64, 64), |s| s.height_width());
        let f = self.vae_scale_factor();
        (w * f, h * f)
    }
}

/// `tokenizer` with `tokens` added, checked against `encoder`: the vectors (`values`,
/// `width`) must be the encoder's width and the new ids its next rows.
fn add_embedding_tokens<B: Backend>(
    tokenizer: &ClipTokenizer,
    encoder: &ClipTextModel<B>,
    tokens: &[String],
    (_, width): (&Vec<f32>, usize),
) -> Result<ClipTokenizer> {
    let hidden = encoder.config().hidden_size;
    if width != hidden {
        return Err(Error::Config {
            what: "textual inversion".into(),
            message: format!(
                "its vectors are {width} wide; this text encoder's are {hidden} (an embedding \
                 for another model)"
            ),
        });
    }
    let first = encoder.embeddings.token_embedding.rows();
    // On a copy, so that a failure leaves the tokenizer as it was.
    let mut tokenizer = tokenizer.clone();
    let ids = tokenizer.add_tokens(tokens)?;
    if ids
        .iter()
        .enumerate()
        .any(|(i, &id)| id as usize != first + i)
    {
        return Err(Error::Tokenizer(format!(
            "the tokenizer gave {tokens:?} the ids {ids:?}, not the text encoder's next rows \
             from {first} (a tokenizer and text encoder that do not belong together)"
        )));
    }
    Ok(tokenizer)
}

/// `e` naming the embedding file where it names no file.
fn with_path(e: Error, path: &std::path::Path) -> Error {
    match e {
        Error::Config { what, message } if what == "textual inversion" => Error::Config {
            what: format!("{} (textual inversion)", path.display()),
            message,
        },
        other => other,
    }
}

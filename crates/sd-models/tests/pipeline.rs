//! The pipelines on the tiny SD-1.x-like fixture pipeline (`generate.py pipeline`): parity
//! with diffusers' own outputs given the noise it drew, and the behaviour the pipelines
//! promise (determinism, guidance, strength, masks, the callback, typed errors).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use sd_models::CpuBackend;
use sd_models::Error;
use sd_models::controlnet::{ControlNetConfig, ControlNetModel};
use sd_models::pipeline::{
    Control, Generation, Image, LoadOptions, Margins, Mask, Outcome, Params, SamplerChoice,
    StableDiffusion, Task,
};
use sd_models::unet::Unet2DConditionModel;
use sd_models::weights::Variant;

use common::fixtures::PipelineCase;

fn root() -> PathBuf {
    common::fixtures::root().join("pipeline")
}

fn pipe() -> StableDiffusion<CpuBackend> {
    StableDiffusion::from_dir(
        CpuBackend::new(),
        root().join("sd1"),
        &LoadOptions::default(),
    )
    .unwrap()
}

fn inpaint_pipe() -> StableDiffusion<CpuBackend> {
    let p = pipe();
    let unet = Unet2DConditionModel::from_dir(
        p.backend(),
        root().join("inpaint_unet"),
        &[Variant::Default],
        true,
    )
    .unwrap();
    p.with_unet(unet).unwrap()
}

fn params(prompt: &str) -> Params {
    Params {
        prompt: prompt.into(),
        steps: 4,
        guidance_scale: 7.5,
        seed: 7,
        // The fixture's own sampler, PNDM (PLMS), evaluates the model 5 times for 4 steps.
        sampler: SamplerChoice::Name("DDIM".into()),
        ..Params::default()
    }
}

fn finished(o: Outcome) -> Generation {
    match o {
        Outcome::Finished(g) => g,
        other => panic!("not finished: {other:?}"),
    }
}

fn go(_: &sd_models::pipeline::Progress<'_>) -> Control {
    Control::Continue
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn mean_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

// ---------------------------------------------------------------------------------------------
// Parity with diffusers
// ---------------------------------------------------------------------------------------------

fn case(name: &str) -> PipelineCase {
    PipelineCase::read(name)
}

/// Runs `c` on `pipe` with diffusers' noise and compares the images: max 1e-4, mean 1e-5.
fn check(c: &PipelineCase, pipe: &StableDiffusion<CpuBackend>, task: Task<'_>) {
    let mut noise = c.noise();
    let g = finished(
        pipe.generate(&c.params(), task, &mut noise, &mut go)
            .unwrap(),
    );
    assert_eq!(
        noise.used(),
        c.noise_count(),
        "every noise tensor diffusers drew is used, in order"
    );
    let expected = c.expected();
    let (max, mean) = (
        max_diff(&g.pixels, &expected),
        mean_diff(&g.pixels, &expected),
    );
    println!("{}: max {max:.2e} mean {mean:.2e}", c.meta["sampler"]);
    assert!(max < 1e-4 && mean < 1e-5, "max {max}, mean {mean}");
}

#[test]
fn txt2img_matches_diffusers_pndm() {
    let c = case("txt2img_pndm");
    let mut p = c.params();
    p.sampler = SamplerChoice::Model;
    let mut noise = c.noise();
    let g = finished(
        pipe()
            .generate(&p, Task::TextToImage, &mut noise, &mut go)
            .unwrap(),
    );
    let expected = c.expected();
    let (max, mean) = (
        max_diff(&g.pixels, &expected),
        mean_diff(&g.pixels, &expected),
    );
    println!("pndm: max {max:.2e} mean {mean:.2e}");
    assert!(
        g.timings.image_encoding.is_zero(),
        "text-to-image encodes no image: {:?}",
        g.timings
    );
    assert!(max < 1e-4 && mean < 1e-5, "max {max}, mean {mean}");
}

#[test]
fn txt2img_matches_diffusers_euler_ancestral_with_rescale_and_two_images() {
    let c = case("txt2img_euler_a");
    check(&c, &pipe(), Task::TextToImage);
}

#[test]
fn images_in_batches_of_one_match_diffusers_too() {
    // Two images with guidance, the UNet and VAE seeing one image (two UNet entries) a call.
    for name in ["txt2img_euler_a", "controlnet_txt2img"] {
        let c = case(name);
        let p = if c.controlnet_dirs().is_empty() {
            pipe()
        } else {
            controlnet_pipe(&c)
        };
        let mut params = c.params();
        assert_eq!(params.num_images, 2, "{name}");
        params.max_batch = 1;
        let mut noise = c.noise();
        let g = finished(
            p.generate(&params, Task::TextToImage, &mut noise, &mut go)
                .unwrap(),
        );
        let expected = c.expected();
        let (max, mean) = (
            max_diff(&g.pixels, &expected),
            mean_diff(&g.pixels, &expected),
        );
        println!("{name} in batches of 1: max {max:.2e} mean {mean:.2e}");
        assert!(max < 1e-4 && mean < 1e-5, "{name}: max {max}, mean {mean}");
    }
}

#[test]
fn img2img_matches_diffusers_ddim() {
    let c = case("img2img_ddim");
    let image = c.image().unwrap();
    check(
        &c,
        &pipe(),
        Task::ImageToImage {
            image: &image,
            strength: c.strength(),
        },
    );
}

#[test]
fn inpaint_blend_matches_diffusers_euler() {
    let c = case("inpaint_blend_euler");
    let (image, mask) = (c.image().unwrap(), c.mask().unwrap());
    check(
        &c,
        &pipe(),
        Task::Inpaint {
            image: &image,
            mask: &mask,
            strength: c.strength(),
        },
    );
}

#[test]
fn inpaint_with_inpainting_unet_matches_diffusers_ddim() {
    let c = case("inpaint_unet9_ddim");
    let (image, mask) = (c.image().unwrap(), c.mask().unwrap());
    check(
        &c,
        &inpaint_pipe(),
        Task::Inpaint {
            image: &image,
            mask: &mask,
            strength: c.strength(),
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Behaviour
// ---------------------------------------------------------------------------------------------

/// The tiny pipeline with a case's UNet and ControlNets.
fn controlnet_pipe(c: &PipelineCase) -> StableDiffusion<CpuBackend> {
    let mut p = pipe();
    if let Some(dir) = c.unet_dir() {
        let unet = Unet2DConditionModel::from_dir(p.backend(), dir, &[Variant::Default], true);
        p = p.with_unet(unet.unwrap()).unwrap();
    }
    for dir in c.controlnet_dirs() {
        let net = ControlNetModel::from_dir(p.backend(), dir, &[Variant::Default], true).unwrap();
        p = p.with_controlnet(net).unwrap();
    }
    p
}

#[test]
fn controlnet_pipelines_match_diffusers() {
    for name in [
        "controlnet_txt2img",
        "controlnet_two",
        "controlnet_guess",
        "controlnet_window",
        "controlnet_window_two",
        "controlnet_pool",
        "controlnet_img2img",
        "controlnet_inpaint",
        "controlnet_inpaint_unet9",
    ] {
        println!("{name}");
        let c = case(name);
        let p = controlnet_pipe(&c);
        let (image, mask) = (c.image(), c.mask());
        let task = match (&image, &mask) {
            (None, _) => Task::TextToImage,
            (Some(image), None) => Task::ImageToImage {
                image,
                strength: c.strength(),
            },
            (Some(image), Some(mask)) => Task::Inpaint {
                image,
                mask,
                strength: c.strength(),
            },
        };
        check(&c, &p, task);
        // Each control image is embedded once, not at every step.
        assert!(p.controlnets().iter().all(|n| n.hints_embedded() == 1));
    }
}

#[test]
fn a_controlnet_single_file_gives_the_folders_images() {
    let c = case("controlnet_txt2img");
    let file = common::fixtures::root().join("controlnet/single_file/control_sd1.safetensors");
    let p = pipe()
        .load_controlnet(&file, &LoadOptions::default())
        .unwrap();
    check(&c, &p, Task::TextToImage);
    // A Stable Diffusion checkpoint is not a ControlNet.
    let sd = common::fixtures::root().join("single_file/sd1/model.safetensors");
    let e = pipe()
        .load_controlnet(&sd, &LoadOptions::default())
        .unwrap_err();
    assert!(matches!(e, Error::CannotInfer { .. }), "{e}");
}

#[test]
fn controlnet_bad_inputs_are_typed_errors() {
    let c = case("controlnet_txt2img");
    let p = controlnet_pipe(&c);
    let mut q = c.params();
    q.steps = 1;
    // One control image per ControlNet.
    let mut two = q.clone();
    two.controls.push(two.controls[0].clone());
    assert_eq!(config_field(p.txt2img(&two, go).unwrap_err()).0, "controls");
    // A control image of another size than the output.
    let mut small = q.clone();
    small.controls[0].image = Image::filled(32, 64, [0, 0, 0]).unwrap();
    let e = p.txt2img(&small, go).unwrap_err();
    assert!(
        matches!(e, Error::Shape { .. }) && e.to_string().contains("32x64"),
        "{e}"
    );
    // Scales that are not numbers, windows that are empty or outside [0, 1].
    for (scale, start, end, what) in [
        (f64::NAN, 0.0, 1.0, "controls[0].scale"),
        (1e300, 0.0, 1.0, "controls[0].scale"),
        (1.0, 0.5, 0.5, "controls[0].start"),
        (1.0, 0.7, 0.2, "controls[0].start"),
        (1.0, -0.1, 1.0, "controls[0].start"),
    ] {
        let mut bad = q.clone();
        bad.controls[0].scale = scale;
        bad.controls[0].start = start;
        bad.controls[0].end = end;
        assert_eq!(config_field(p.txt2img(&bad, go).unwrap_err()).0, what);
    }
    // A ControlNet that does not fit the UNet.
    let mut config = ControlNetConfig::for_unet(pipe().unet().config());
    config.block_out_channels = vec![8, 16];
    let other = ControlNetModel::random(p.backend(), config, 0).unwrap();
    let e = pipe().with_controlnet(other).unwrap_err();
    assert!(e.to_string().contains("block_out_channels"), "{e}");
    let mut config = ControlNetConfig::for_unet(pipe().unet().config());
    config.cross_attention_dim = sd_models::unet::PerBlock::All(24);
    let other = ControlNetModel::random(p.backend(), config, 0).unwrap();
    let e = pipe().with_controlnet(other).unwrap_err();
    assert!(e.to_string().contains("cross_attention_dim"), "{e}");
    let mut config = ControlNetConfig::for_unet(pipe().unet().config());
    config.conditioning_embedding_out_channels = vec![4, 8];
    let other = ControlNetModel::random(p.backend(), config, 0).unwrap();
    let e = pipe().with_controlnet(other).unwrap_err();
    assert!(e.to_string().contains("downsamples by 2"), "{e}");
}

fn test_image() -> Image {
    let c = case("img2img_ddim");
    c.image().unwrap()
}

#[test]
fn shapes_and_several_images_per_prompt() {
    let p = pipe();
    assert_eq!(p.default_size(), (64, 64));
    let mut q = params("a fox");
    q.width = Some(128);
    q.height = Some(64);
    q.num_images = 3;
    let g = finished(p.txt2img(&q, go).unwrap());
    assert_eq!(g.images.len(), 3);
    assert!(
        g.images
            .iter()
            .all(|i| (i.width(), i.height()) == (128, 64))
    );
    assert_eq!(g.latent_shape, [3, 4, 8, 16]);
    assert_eq!(g.pixels.len(), 3 * 3 * 64 * 128);
    assert_eq!(g.steps_run, 4);
    // The first image of a batch is the image of a batch of one (the noise is drawn image
    // after image), for a deterministic sampler.
    q.num_images = 1;
    q.sampler = SamplerChoice::Name("DDIM".into());
    let one = finished(p.txt2img(&q, go).unwrap());
    q.num_images = 2;
    let two = finished(p.txt2img(&q, go).unwrap());
    assert!(max_diff(&one.pixels, &two.pixels[..one.pixels.len()]) < 1e-4);
}

#[test]
fn same_seed_same_bytes_with_any_thread_count_and_seeds_differ() {
    let p = pipe();
    let mut q = params("a lighthouse");
    q.sampler = SamplerChoice::Name("Euler a".into());
    let run = |threads: usize, q: &Params| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| finished(p.txt2img(q, go).unwrap()))
    };
    let a = run(1, &q);
    let b = run(2, &q);
    let c = run(2, &q);
    assert_eq!(a.images, b.images);
    assert_eq!(a.latents, b.latents);
    assert_eq!(b.latents, c.latents);
    q.seed += 1;
    let d = run(2, &q);
    assert_ne!(a.images, d.images);
    assert!(mean_diff(&a.pixels, &d.pixels) > 1e-3);
}

#[test]
fn guidance_negative_prompt_rescale_and_clip_skip_change_the_result() {
    let p = pipe();
    let base = params("a red fox");
    let g0 = finished(p.txt2img(&base, go).unwrap());
    let variants = [
        Params {
            guidance_scale: 1.0,
            ..base.clone()
        },
        Params {
            guidance_scale: 3.0,
            ..base.clone()
        },
        Params {
            negative_prompt: "blurry, low quality".into(),
            ..base.clone()
        },
        Params {
            guidance_rescale: 0.7,
            ..base.clone()
        },
        Params {
            clip_skip: 1,
            ..base.clone()
        },
        Params {
            prompt: "a blue whale".into(),
            ..base.clone()
        },
    ];
    for v in &variants {
        let g = finished(p.txt2img(v, go).unwrap());
        let d = mean_diff(&g0.latents, &g.latents);
        assert!(d > 1e-4, "{v:?} changed the latents by only {d}");
    }
}

#[test]
fn long_prompts_truncate_or_chunk() {
    let p = pipe();
    let long = "a very long prompt about foxes ".repeat(20);
    let mut q = params(&long);
    let truncated = finished(p.txt2img(&q, go).unwrap());
    q.long_prompt = sd_models::clip::LongPrompt::Chunks;
    let chunked = finished(p.txt2img(&q, go).unwrap());
    assert!(mean_diff(&truncated.latents, &chunked.latents) > 1e-5);
}

#[test]
fn img2img_strength_zero_is_the_vae_round_trip_and_one_starts_from_noise() {
    let p = pipe();
    let image = test_image();
    let q = params("a watercolour");
    let zero = finished(p.img2img(&q, &image, 0.0, go).unwrap());
    assert_eq!(zero.steps_run, 0);
    // The round trip by hand: encode (posterior sample with the same seed), decode.
    let b = p.backend();
    use sd_models::backend::{BackendBase, DataOps};
    let x = b.upload(&image.to_chw_signed(), &[1, 3, 64, 64]).unwrap();
    let dist = p.vae().encode(b, &x).unwrap();
    let mut rng = sd_schedulers::RngNoise(
        <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(q.seed),
    );
    let mut eps = vec![0.0; 4 * 8 * 8];
    sd_schedulers::NoiseSource::fill(&mut rng, &mut eps).unwrap();
    let z = dist
        .sample(b, &b.upload(&eps, b.shape(&dist.mean)).unwrap())
        .unwrap();
    let z = p.vae().scale_latents(b, &z).unwrap();
    let (_, round_trip) = p
        .decode_latents(&b.download(&z).unwrap(), [1, 4, 8, 8], false)
        .unwrap();
    assert!(max_diff(&zero.pixels, &round_trip) < 1e-5);

    // Strength 1 runs every step; the image matters much less than at strength 0.3.
    let other = Image::filled(64, 64, [20, 200, 90]).unwrap();
    let strong = finished(p.img2img(&q, &image, 1.0, go).unwrap());
    assert_eq!(strong.steps_run, 4);
    let strong_other = finished(p.img2img(&q, &other, 1.0, go).unwrap());
    let weak = finished(p.img2img(&q, &image, 0.3, go).unwrap());
    assert_eq!(weak.steps_run, 1);
    let weak_other = finished(p.img2img(&q, &other, 0.3, go).unwrap());
    let d_strong = mean_diff(&strong.latents, &strong_other.latents);
    let d_weak = mean_diff(&weak.latents, &weak_other.latents);
    assert!(
        d_strong < d_weak,
        "strength 1: {d_strong}, strength 0.3: {d_weak}"
    );
}

#[test]
fn blend_inpainting_keeps_the_known_region() {
    let p = pipe();
    let image = test_image();
    // Repaint the right half; the left half, in latent pixels, must be the image's latents.
    let mut m = vec![0u8; 64 * 64];
    for y in 0..64 {
        for x in 32..64 {
            m[y * 64 + x] = 255;
        }
    }
    let mask = Mask::new(64, 64, m).unwrap();
    let q = params("a cat");
    let g = finished(p.inpaint(&q, &image, &mask, 1.0, go).unwrap());
    // The image's latents, with the same first draw (the posterior sample).
    let zero = finished(p.img2img(&q, &image, 0.0, go).unwrap());
    for ch in 0..4 {
        for y in 0..8 {
            for x in 0..8 {
                let i = (ch * 8 + y) * 8 + x;
                if x < 4 {
                    assert_eq!(g.latents[i], zero.latents[i], "known latent {ch},{y},{x}");
                }
            }
        }
    }
    assert!(
        mean_diff(&g.latents, &zero.latents) > 1e-3,
        "the masked half changed"
    );
}

#[test]
fn outpaint_extends_the_canvas() {
    let p = inpaint_pipe();
    let image = test_image();
    let q = params("a landscape");
    let g = finished(
        p.outpaint(
            &q,
            &image,
            Margins {
                left: 32,
                top: 0,
                right: 32,
                bottom: 64,
            },
            go,
        )
        .unwrap(),
    );
    assert_eq!((g.images[0].width(), g.images[0].height()), (128, 128));
    // A margin that leaves the canvas off the multiple of 8 is refused.
    let err = p.outpaint(&q, &image, Margins::uniform(3), go).unwrap_err();
    assert!(err.to_string().contains("70"), "{err}");
}

#[test]
fn the_callback_sees_every_step_and_can_stop_or_cancel() {
    let p = pipe();
    let q = params("a fox");
    let mut seen = Vec::new();
    let outcome = p
        .txt2img(&q, |s| {
            assert_eq!(s.steps, 4);
            assert_eq!(s.pred_original.len(), s.latents.len());
            seen.push(s.timestep);
            if s.step == 1 {
                Control::Stop
            } else {
                Control::Continue
            }
        })
        .unwrap();
    assert_eq!(seen.len(), 2);
    match outcome {
        Outcome::Stopped(g) => {
            assert_eq!(g.steps_run, 2);
            assert_eq!(g.images.len(), 1);
        }
        other => panic!("{other:?}"),
    }
    let cancelled = p.txt2img(&q, |_| Control::Cancel).unwrap();
    assert_eq!(cancelled, Outcome::Cancelled { steps_run: 1 });
    // A preview of the predicted x0 decodes.
    let mut preview = None;
    p.txt2img(&q, |s| {
        preview = Some((s.pred_original.to_vec(), s.latent_shape));
        Control::Cancel
    })
    .unwrap();
    let (x0, shape) = preview.unwrap();
    let (images, _) = p.decode_latents(&x0, shape, false).unwrap();
    assert_eq!((images[0].width(), images[0].height()), (64, 64));
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

fn config_field(err: Error) -> (String, String) {
    match err {
        Error::Config { what, message } => (what, message),
        other => panic!("not a config error: {other:?}"),
    }
}

#[test]
fn bad_inputs_are_typed_errors_naming_the_value() {
    let p = pipe();
    let image = test_image();
    let mut q = params("x");
    q.width = Some(100);
    let (what, message) = config_field(p.txt2img(&q, go).unwrap_err());
    assert_eq!(what, "width");
    assert!(message.contains("100"), "{message}");
    // Any multiple of 8 runs, including sizes the UNet's downsampling does not divide.
    q.width = Some(72);
    q.height = Some(40);
    q.steps = 1;
    let g = p.txt2img(&q, go).unwrap().into_generation().unwrap();
    assert_eq!((g.images[0].width(), g.images[0].height()), (72, 40));
    assert!(g.pixels.iter().all(|v| v.is_finite()));
    q.width = None;
    q.height = None;
    q.steps = 0;
    assert_eq!(config_field(p.txt2img(&q, go).unwrap_err()).0, "steps");
    q.steps = 4;
    for s in [-0.1, 1.5, f64::NAN] {
        let (what, message) = config_field(p.img2img(&q, &image, s, go).unwrap_err());
        assert_eq!(what, "strength");
        assert!(message.contains(&s.to_string()), "{message}");
    }
    let small = Mask::new(32, 32, vec![255; 32 * 32]).unwrap();
    assert!(matches!(
        p.inpaint(&q, &image, &small, 1.0, go).unwrap_err(),
        Error::Shape { .. }
    ));
    q.height = Some(128);
    assert_eq!(
        config_field(p.img2img(&q, &image, 0.5, go).unwrap_err()).0,
        "height"
    );
    q.height = None;
    q.sampler = SamplerChoice::Name("Euler b".into());
    let (what, message) = config_field(p.txt2img(&q, go).unwrap_err());
    assert_eq!(what, "sampler");
    assert!(message.contains("Euler b"), "{message}");
}

#[test]
fn missing_files_and_tokenizers_are_typed_errors() {
    let missing = root().join("no-such-model");
    match StableDiffusion::load(CpuBackend::new(), &missing, &LoadOptions::default()) {
        Err(Error::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("{other:?}"),
    }
    // A folder without model_index.json.
    match StableDiffusion::from_dir(
        CpuBackend::new(),
        root().join("inpaint_unet"),
        &LoadOptions::default(),
    ) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("model_index.json")),
        other => panic!("{other:?}"),
    }
    // A single file needs a tokenizer folder.
    let single = root().join("../single_file/sd1/model.safetensors");
    let (what, message) = config_field(
        StableDiffusion::from_single_file(CpuBackend::new(), &single, &LoadOptions::default())
            .unwrap_err(),
    );
    assert!(what.contains("model.safetensors"), "{what}");
    assert!(message.contains("tokenizer"), "{message}");
}

#[test]
fn fp16_variant_files_are_preferred() {
    // A copy of the pipeline whose UNet exists only as the fp16 variant.
    let dir = std::env::temp_dir().join(format!("sd-pipeline-fp16-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for entry in [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ] {
        let from = root().join("sd1").join(entry);
        let to = dir.join(entry);
        if from.is_dir() {
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(&from).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        } else {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(&from, &to).unwrap();
        }
    }
    std::fs::rename(
        dir.join("unet/diffusion_pytorch_model.safetensors"),
        dir.join("unet/diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    assert!(StableDiffusion::from_dir(CpuBackend::new(), &dir, &LoadOptions::default()).is_err());
    let options = LoadOptions {
        fp16_variant: true,
        ..LoadOptions::default()
    };
    let p = StableDiffusion::from_dir(CpuBackend::new(), &dir, &options).unwrap();
    let q = params("a fox");
    let a = finished(p.txt2img(&q, go).unwrap());
    let b = finished(pipe().txt2img(&q, go).unwrap());
    assert_eq!(a.images, b.images);
    // Kept in f16 in memory, the same weights give the same image: the backend widens them
    // exactly as it reads them.
    let half = LoadOptions {
        fp16_variant: true,
        weights: sd_models::weights::LoadDType::Stored,
        ..LoadOptions::default()
    };
    let p = StableDiffusion::from_dir(CpuBackend::new(), &dir, &half).unwrap();
    let c = finished(p.txt2img(&q, go).unwrap());
    assert_eq!(a.images, c.images);
    assert_eq!(a.latents, c.latents);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Random weights with a NaN in the UNet's output bias.
#[derive(Clone)]
struct NanBias {
    inner: sd_models::nn::RandomWeights,
    path: String,
}

impl sd_models::nn::WeightSource for NanBias {
    fn push(&self, name: &str) -> Self {
        NanBias {
            inner: self.inner.push(name),
            path: format!("{}.{name}", self.path),
        }
    }

    fn index(&self, i: usize) -> Self {
        NanBias {
            inner: self.inner.index(i),
            path: format!("{}.{i}", self.path),
        }
    }

    fn get(
        &self,
        name: &str,
        shape: &[usize],
    ) -> sd_models::Result<sd_models::weights::HostTensor> {
        if self.path == ".conv_out" && name == "bias" {
            let values = vec![f32::NAN; shape.iter().product()];
            return sd_models::weights::HostTensor::from_f32(shape.to_vec(), values);
        }
        self.inner.get(name, shape)
    }

    fn describe(&self) -> String {
        self.path.clone()
    }
}

#[test]
fn non_finite_values_stop_the_generation_naming_the_step() {
    let p = pipe();
    let source = NanBias {
        inner: sd_models::nn::RandomWeights::new(3),
        path: String::new(),
    };
    let unet =
        Unet2DConditionModel::from_source(p.backend(), &source, p.unet().config().clone()).unwrap();
    let p = p.with_unet(unet).unwrap();
    let mut q = params("a fox");
    q.steps = 2;
    match p.txt2img(&q, go) {
        Err(e @ Error::NonFinite { .. }) => {
            assert!(matches!(e, Error::NonFinite { step: Some(0), .. }), "{e}");
            assert!(e.to_string().contains("at step 0"), "{e}");
        }
        other => panic!("expected NonFinite, got {other:?}"),
    }
    // Asked to, it goes on to the end (and to the black image diffusers would give).
    q.keep_non_finite = true;
    let g = finished(p.txt2img(&q, go).unwrap());
    assert_eq!(g.steps_run, 2);
    // A guidance scale finite in f64 but not in f32.
    let mut q = params("a fox");
    q.guidance_scale = 1e300;
    assert_eq!(
        config_field(pipe().txt2img(&q, go).unwrap_err()).0,
        "guidance_scale"
    );
}

#[test]
fn an_inpainting_model_asked_for_text_to_image_says_so() {
    let p = inpaint_pipe();
    let e = p.txt2img(&params("a fox"), go).unwrap_err();
    let (what, message) = config_field(e);
    assert_eq!(what, "task");
    assert!(message.contains("inpainting model"), "{message}");
    let e = p
        .img2img(&params("a fox"), &test_image(), 0.5, go)
        .unwrap_err();
    assert_eq!(config_field(e).0, "task");
}

#[test]
fn sizes_counts_and_margins_past_the_limits_are_errors_before_any_work() {
    let p = pipe();
    let mut q = params("x");
    // Sizes that used to reach a chunks(0) or wrap: the limit names the value.
    for (w, h, what) in [
        (1usize << 62, 64, "width"),
        (64, usize::MAX - 7, "height"),
        (4096, 8192, "height"),
    ] {
        q.width = Some(w);
        q.height = Some(h);
        let (field, message) = config_field(p.txt2img(&q, go).unwrap_err());
        assert_eq!(field, what, "{message}");
        assert!(message.contains("max_side limit"), "{message}");
    }
    q.width = None;
    q.height = None;
    q.num_images = usize::MAX;
    assert_eq!(config_field(p.txt2img(&q, go).unwrap_err()).0, "num_images");
    q.num_images = 1;
    q.steps = 1 << 40;
    assert_eq!(config_field(p.txt2img(&q, go).unwrap_err()).0, "steps");
    // Outpainting margins near usize::MAX neither wrap nor allocate.
    let q = params("x");
    let e = p
        .outpaint(&q, &test_image(), Margins::uniform(usize::MAX / 2), go)
        .unwrap_err();
    assert_eq!(config_field(e).0, "outpaint margins");
    let e = p
        .outpaint(&q, &test_image(), Margins::uniform(4096), go)
        .unwrap_err();
    assert_eq!(config_field(e).0, "width");
    // The limits are the caller's to lower (or raise).
    let mut q = params("x");
    q.limits.max_side = 32;
    assert_eq!(config_field(p.txt2img(&q, go).unwrap_err()).0, "width");
    q.limits.max_side = 64;
    q.limits.max_pixels = 64 * 32;
    assert_eq!(config_field(p.txt2img(&q, go).unwrap_err()).0, "pixels");
}

#[test]
fn config_values_past_any_real_model_are_errors_not_aborts() {
    use sd_models::unet::Unet2DConditionConfig;
    let base = std::fs::read_to_string(root().join("sd1/unet/config.json")).unwrap();
    for (key, value) in [
        ("layers_per_block", serde_json::json!(1_000_000_000_000_u64)),
        ("block_out_channels", serde_json::json!([16, 1_u64 << 40])),
        ("sample_size", serde_json::json!(1_u64 << 62)),
    ] {
        let mut json: serde_json::Value = serde_json::from_str(&base).unwrap();
        json[key] = value;
        let e = Unet2DConditionConfig::from_json(&json.to_string(), "config.json").unwrap_err();
        assert!(
            e.to_string().contains("more than the supported"),
            "{key}: {e}"
        );
    }
    let e = sd_schedulers::SchedulerConfig::from_json(
        r#"{"_class_name": "DDIMScheduler", "num_train_timesteps": 1000000000000}"#,
    )
    .and_then(|c| {
        sd_schedulers::registry::from_config(&c, sd_schedulers::Plan::steps(10)).map(|_| ())
    })
    .unwrap_err();
    assert!(e.to_string().contains("num_train_timesteps"), "{e}");
}

/// Copies `from` into `to`, folders included.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn non_finite_weights_are_found_by_check_weights_or_at_the_first_stage_they_reach() {
    // The tiny pipeline with one NaN in the VAE decoder's output bias.
    let dir = common::fixtures::scratch_dir("sd-models-nan-weights").join("sd1");
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&root().join("sd1"), &dir);
    let vae = dir.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&vae).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.data().to_vec(), v.shape().to_vec(), v.dtype()))
        .collect();
    let key = "decoder.conv_out.bias";
    let t = tensors.iter_mut().find(|t| t.0 == key).unwrap();
    match t.3 {
        safetensors::Dtype::F32 => t.1[..4].copy_from_slice(&f32::NAN.to_le_bytes()),
        safetensors::Dtype::F16 => t.1[..2].copy_from_slice(&[0x00, 0x7e]),
        safetensors::Dtype::BF16 => t.1[..2].copy_from_slice(&[0xc0, 0x7f]),
        other => panic!("{key} is {other:?}"),
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, d, s, dt)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), d).unwrap(),
            )
        })
        .collect();
    std::fs::write(&vae, safetensors::serialize(views, None).unwrap()).unwrap();

    let checked = LoadOptions {
        check_weights: true,
        ..LoadOptions::default()
    };
    match StableDiffusion::from_dir(CpuBackend::new(), &dir, &checked) {
        Err(Error::NonFiniteWeight { key: k, file }) => {
            assert_eq!(k, key);
            assert_eq!(file, vae);
        }
        other => panic!("expected NonFiniteWeight, got {:?}", other.err()),
    }
    // Unchecked, it loads, and the generation stops where the NaN first shows.
    let p = StableDiffusion::from_dir(CpuBackend::new(), &dir, &LoadOptions::default()).unwrap();
    let mut q = params("a fox");
    q.steps = 1;
    match p.txt2img(&q, go) {
        Err(Error::NonFinite { stage, step }) => {
            assert_eq!((stage, step), ("after decoding", None));
        }
        other => panic!("expected NonFinite, got {other:?}"),
    }
}

#[test]
fn unknown_config_keys_are_listed_or_rejected_in_strict_mode() {
    let dir = common::fixtures::scratch_dir("sd-models-unknown-scheduler-key").join("sd1");
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&root().join("sd1"), &dir);
    let path = dir.join("scheduler/scheduler_config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["not_a_scheduler_key"] = serde_json::json!(3);
    std::fs::write(&path, json.to_string()).unwrap();
    let index = dir.join("model_index.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    json["not_a_component"] = serde_json::json!(["x", "Y"]);
    std::fs::write(&index, json.to_string()).unwrap();
    let tokenizer = dir.join("tokenizer/tokenizer_config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tokenizer).unwrap()).unwrap();
    json["not_a_tokenizer_key"] = serde_json::json!(true);
    std::fs::write(&tokenizer, json.to_string()).unwrap();
    let p = StableDiffusion::from_dir(CpuBackend::new(), &dir, &LoadOptions::default()).unwrap();
    assert_eq!(p.scheduler_config().unknown_keys(), ["not_a_scheduler_key"]);
    let unknown = p.unknown_keys().join(" ");
    assert!(
        unknown.contains("model_index.json: not_a_component")
            && unknown.contains("tokenizer_config.json: not_a_tokenizer_key")
            && unknown.contains("scheduler_config.json: not_a_scheduler_key"),
        "{unknown}"
    );
    let strict = LoadOptions {
        strict: true,
        ..LoadOptions::default()
    };
    let e = StableDiffusion::from_dir(CpuBackend::new(), &dir, &strict).unwrap_err();
    assert!(e.to_string().contains("not_a_scheduler_key"), "{e}");
}

//! SDXL on the tiny SDXL pipeline of `generate.py sdxl` (`fixtures/sdxl`): the UNet with its
//! `"text_time"` added embedding, the two text encoders, and the pipelines end to end with
//! diffusers' noise replayed, against diffusers' own outputs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use sd_models::backend::DataOps;
use sd_models::backend::conformance::rel_l2;
use sd_models::controlnet::ControlNetModel;
use sd_models::pipeline::{Control, LoadOptions, Outcome, Params, StableDiffusion, Task};
use sd_models::unet::{Unet2DConditionModel, UnetConditioning};
use sd_models::weights::Variant;
use sd_models::{CpuBackend, Error};

use common::fixtures::{PipelineCase, read_json, read_tensors};

fn dir() -> PathBuf {
    common::fixtures::root().join("sdxl")
}

fn pipe() -> StableDiffusion<CpuBackend> {
    StableDiffusion::from_dir(
        CpuBackend::new(),
        dir().join("base"),
        &LoadOptions::default(),
    )
    .unwrap()
}

#[test]
fn unet_with_text_time_matches_diffusers() {
    let b = CpuBackend::new();
    let unet =
        Unet2DConditionModel::from_dir(&b, dir().join("base/unet"), &[Variant::Default], true)
            .unwrap();
    let meta = read_json(&dir().join("unet.json"));
    let t = read_tensors(&dir().join("unet.safetensors"));
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let prefix = if name == "main" {
            String::new()
        } else {
            format!("{name}.")
        };
        let input = |k: &str| {
            let (shape, v) = &t[&format!("{prefix}inputs.{k}")];
            (shape.clone(), v.clone())
        };
        let (ss, sv) = input("sample");
        let (hs, hv) = input("encoder_hidden_states");
        let (ts, tv) = input("text_embeds");
        let (_, ids) = input("time_ids");
        let ids: Vec<f64> = ids.iter().map(|&v| f64::from(v)).collect();
        let sample = b.upload(&sv, &ss).unwrap();
        let hidden = b.upload(&hv, &hs).unwrap();
        let text = b.upload(&tv, &ts).unwrap();
        for (key, timestep) in meta["timesteps"].as_object().unwrap() {
            let extra = UnetConditioning {
                text_embeds: Some(&text),
                time_ids: Some(&ids),
                ..UnetConditioning::default()
            };
            let y = unet
                .forward_with(&b, &sample, &[timestep.as_f64().unwrap()], &hidden, &extra)
                .unwrap();
            let got = b.download(&y).unwrap();
            let expected = &t[&format!("{prefix}{key}.out")].1;
            let e = rel_l2(&got, expected);
            println!("{name} {key}: {e:.2e}");
            assert!(e < 1e-5, "{name} {key}: {e:e}");
        }
        // The added conditioning is required, and checked.
        let err = unet
            .forward(&b, &sample, &[999.0], &hidden)
            .expect_err("text_time without its inputs");
        assert!(matches!(err, Error::Shape { .. }), "{err}");
        let short = &ids[..ids.len() - 1];
        let extra = UnetConditioning {
            text_embeds: Some(&text),
            time_ids: Some(short),
            ..UnetConditioning::default()
        };
        assert!(matches!(
            unet.forward_with(&b, &sample, &[999.0], &hidden, &extra),
            Err(Error::Shape { .. })
        ));
    }
}

#[test]
fn dual_text_encoding_matches_diffusers() {
    let mut p = pipe();
    assert!(p.is_xl());
    let meta = read_json(&dir().join("text.json"));
    let t = read_tensors(&dir().join("text.safetensors"));
    let b = *p.backend();
    let close = |got: &<CpuBackend as sd_models::backend::BackendBase>::Tensor, key: &str| {
        let e = rel_l2(&b.download(got).unwrap(), &t[key].1);
        assert!(e < 1e-5, "{key}: {e:e}");
    };
    let ids = |key: &str| -> Vec<u32> { t[key].1.iter().map(|&v| v as u32).collect() };
    for (name, case) in meta["cases"].as_object().unwrap() {
        let a = &case["args"];
        let params = Params {
            clip_skip: a["clip_skip"].as_u64().unwrap_or(0) as usize,
            ..Params::default()
        };
        let prompt = a["prompt"].as_str().unwrap();
        let (t1, t2) = (p.tokenizer(), p.text_encoder_2().unwrap().0);
        assert_eq!(t1.encode(prompt).unwrap(), ids(&format!("{name}.ids_1")));
        let prompt_2 = a["prompt_2"].as_str().unwrap_or(prompt);
        assert_eq!(t2.encode(prompt_2).unwrap(), ids(&format!("{name}.ids_2")));
        let e = p
            .encode_prompt_pair(prompt, a["prompt_2"].as_str(), &params)
            .unwrap();
        close(&e.context, &format!("{name}.prompt_embeds"));
        close(
            e.pooled.as_ref().unwrap(),
            &format!("{name}.pooled_prompt_embeds"),
        );
        // The negative prompt: without clip_skip, as diffusers.
        if case["negative_zeros"].as_bool() == Some(false) {
            let negative = a["negative_prompt"].as_str().unwrap();
            let e = p
                .encode_prompt_pair(
                    negative,
                    a["negative_prompt_2"].as_str(),
                    &Params::default(),
                )
                .unwrap();
            close(&e.context, &format!("{name}.negative_prompt_embeds"));
            close(
                e.pooled.as_ref().unwrap(),
                &format!("{name}.negative_pooled_prompt_embeds"),
            );
        }
        println!("{name}: ok");
    }
    // Zeros for an empty negative prompt: the default, and what the fixture records.
    assert!(p.force_zeros_for_empty_prompt());
    assert!(
        t["negative_none.negative_prompt_embeds"]
            .1
            .iter()
            .all(|&v| v == 0.0)
    );
    p.set_force_zeros_for_empty_prompt(false);
    assert!(!p.force_zeros_for_empty_prompt());
}

fn finished(o: Outcome) -> sd_models::pipeline::Generation {
    match o {
        Outcome::Finished(g) => g,
        _ => panic!("not finished"),
    }
}

/// Runs the case `name` of `fixtures/sdxl/cases` with diffusers' noise; compares the images.
fn check(name: &str, p: &StableDiffusion<CpuBackend>) {
    let c = PipelineCase::read_in("sdxl/cases", name);
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
    let mut noise = c.noise();
    let g = finished(
        p.generate(&c.params(), task, &mut noise, &mut |_| Control::Continue)
            .unwrap(),
    );
    assert_eq!(noise.used(), c.noise_count(), "{name}: noise used in order");
    let expected = c.expected();
    let max = g
        .pixels
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let mean = g
        .pixels
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / expected.len() as f32;
    println!("{name}: max {max:.2e} mean {mean:.2e}");
    assert!(max < 1e-4 && mean < 1e-5, "{name}: max {max}, mean {mean}");
}

#[test]
fn sdxl_pipelines_match_diffusers() {
    let p = pipe();
    for name in ["txt2img_euler", "txt2img_micro", "img2img", "inpaint"] {
        check(name, &p);
    }
}

#[test]
fn sdxl_controlnet_matches_diffusers() {
    let c = PipelineCase::read_in("sdxl/cases", "controlnet");
    let mut p = pipe();
    for d in c.controlnet_dirs() {
        let net = ControlNetModel::from_dir(p.backend(), d, &[Variant::Default], true).unwrap();
        p = p.with_controlnet(net).unwrap();
    }
    check("controlnet", &p);
}

/// The tiny SDXL single file (the base folder's weights in Stability's names, written and
/// checked with diffusers' own conversion by the fixture script) loads into the same networks
/// as the folder: bit-identical outputs.
#[test]
fn sdxl_single_file_gives_the_folders_outputs() {
    use sd_models::weights::compvis::{Component, ModelKind, SingleFileOptions};
    let path = dir().join("single_file/sdxl.safetensors");
    // What the tiny widths do not show (SDXL's heads are 64 wide, its groups 32).
    let options = SingleFileOptions::new()
        .override_config(
            Component::Unet,
            serde_json::json!({"attention_head_dim": [2, 4], "norm_num_groups": 8, "addition_time_embed_dim": 8, "sample_size": 8}),
        )
        .override_config(Component::Vae, serde_json::json!({"norm_num_groups": 4}))
        .override_config(
            Component::TextEncoder,
            serde_json::json!({"num_attention_heads": 2}),
        )
        .override_config(
            Component::TextEncoder2,
            serde_json::json!({"num_attention_heads": 2}),
        );
    let file = options.clone().open(&path).unwrap();
    assert_eq!(file.kind(), ModelKind::Sdxl);
    assert!(file.unassigned().is_empty(), "{:?}", file.unassigned());
    let load = LoadOptions {
        tokenizer: Some(dir().join("base/tokenizer")),
        single_file: options,
        strict: true,
        ..LoadOptions::default()
    };
    let single = StableDiffusion::from_single_file(CpuBackend::new(), &path, &load).unwrap();
    let folder = pipe();
    assert!(single.is_xl());
    let params = Params {
        steps: 2,
        guidance_scale: 5.0,
        seed: 3,
        prompt: "a red fox".into(),
        width: Some(64),
        height: Some(64),
        sampler: sd_models::pipeline::SamplerChoice::Name("EulerDiscreteScheduler".into()),
        ..Params::default()
    };
    let run = |p: &StableDiffusion<CpuBackend>| {
        finished(p.txt2img(&params, |_| Control::Continue).unwrap()).pixels
    };
    assert_eq!(run(&single), run(&folder));
}

/// Parts that do not belong together, a missing second encoder and sizes the VAE cannot take
/// are typed errors naming the problem.
#[test]
fn mismatched_parts_and_bad_sizes_are_typed_errors() {
    use sd_models::clip::{ClipTextModel, ClipTokenizer};
    use sd_models::vae::AutoencoderKl;
    use sd_schedulers::SchedulerConfig;
    let b = CpuBackend::new();
    let v = [Variant::Default];
    let base = dir().join("base");
    let sd1 = common::fixtures::root().join("pipeline/sd1");
    let unet = || Unet2DConditionModel::from_dir(&b, base.join("unet"), &v, true).unwrap();
    let vae = || AutoencoderKl::from_dir(&b, base.join("vae"), &v, true).unwrap();
    let scheduler =
        || SchedulerConfig::from_file(base.join("scheduler/scheduler_config.json")).unwrap();
    let tokenizer = || ClipTokenizer::from_dir(base.join("tokenizer")).unwrap();
    let te = |d: &std::path::Path| ClipTextModel::from_dir(&b, d, &v, true).unwrap();
    let message = |e: Error| match e {
        Error::Config { message, .. } => message,
        other => panic!("not a config error: {other}"),
    };
    // An SDXL UNet with one (SD 1.5) text encoder.
    let e = StableDiffusion::from_parts(
        b,
        tokenizer(),
        te(&sd1.join("text_encoder")),
        unet(),
        vae(),
        scheduler(),
    )
    .unwrap_err();
    assert!(message(e).contains("text_encoder_2"));
    // An SD 1.5 text encoder in the second place: no projection, and the widths do not add up.
    let e = StableDiffusion::from_parts_xl(
        b,
        (tokenizer(), te(&base.join("text_encoder"))),
        (tokenizer(), te(&sd1.join("text_encoder"))),
        unet(),
        vae(),
        scheduler(),
    )
    .unwrap_err();
    assert!(message(e).contains("cross_attention_dim"));
    // A folder whose text_encoder_2 is missing.
    let broken = common::fixtures::scratch_dir("sdxl-missing-te2");
    for entry in walk(&base) {
        let rel = entry.strip_prefix(&base).unwrap();
        if rel.starts_with("text_encoder_2") {
            continue;
        }
        let to = broken.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &to).unwrap();
    }
    let e = StableDiffusion::from_dir(b, &broken, &LoadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("text_encoder_2"), "{e}");
    // Sizes the VAE cannot take.
    let p = pipe();
    let params = Params {
        width: Some(60),
        height: Some(64),
        steps: 1,
        ..Params::default()
    };
    let e = p.txt2img(&params, |_| Control::Continue).unwrap_err();
    assert!(
        matches!(&e, Error::Config { what, .. } if what.contains("width")),
        "{e}"
    );
    // A one-encoder (SD 1.x) embedding is refused on SDXL, and changes nothing.
    let mut p = pipe();
    let ti = common::fixtures::root().join("textual_inversion");
    let file = std::fs::read_dir(&ti)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|f| f.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    assert!(p.load_textual_inversion(&file, Some("<x>")).is_err());
    assert!(p.embeddings().is_empty());
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The refiner: the second text encoder alone, aesthetic-score ids, image-to-image.
#[test]
fn sdxl_refiner_matches_diffusers() {
    let p = StableDiffusion::from_dir(
        CpuBackend::new(),
        dir().join("refiner"),
        &LoadOptions::default(),
    )
    .unwrap();
    assert!(p.is_xl() && p.text_encoder_2().is_none());
    assert!(!p.force_zeros_for_empty_prompt());
    check("refiner", &p);
    // LoRAs are refused on it, leaving it as it was.
    let mut p = p;
    let lora = common::fixtures::root().join("lora/kohya.safetensors");
    let lora = sd_models::lora::Lora::open(lora).unwrap();
    assert!(p.set_loras(&[lora], false).is_err());
}

/// SDXL LoRAs: kohya's (the UNet in Stability's original module names, `lora_te1_` /
/// `lora_te2_`) and diffusers / PEFT's (`unet.`, `text_encoder.`, `text_encoder_2.`),
/// against diffusers' `load_lora_weights` + `fuse_lora`.
#[test]
fn sdxl_loras_match_diffusers() {
    let lora_dir = dir().join("lora");
    let meta = read_json(&lora_dir.join("cases.json"));
    let expected = read_tensors(&lora_dir.join("expected.safetensors"));
    let inputs = read_tensors(&dir().join("unet.safetensors"));
    let mut p = pipe();
    let b = *p.backend();
    let up = |k: &str| {
        let (s, v) = &inputs[k];
        b.upload(v, s).unwrap()
    };
    let (sample, hidden, text) = (
        up("inputs.sample"),
        up("inputs.encoder_hidden_states"),
        up("inputs.text_embeds"),
    );
    let ids: Vec<f64> = inputs["inputs.time_ids"]
        .1
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    for case in ["kohya", "peft"] {
        let c = &meta["cases"][case];
        let scale = c["fuse_lora"]["lora_scale"].as_f64().unwrap();
        let lora = sd_models::lora::Lora::open(lora_dir.join(c["file"].as_str().unwrap()))
            .unwrap()
            .with_multiplier(scale);
        let report = p.set_loras(&[lora], true).unwrap();
        let extra = UnetConditioning {
            text_embeds: Some(&text),
            time_ids: Some(&ids),
            ..UnetConditioning::default()
        };
        let y = p
            .unet()
            .forward_with(&b, &sample, &[999.0], &hidden, &extra)
            .unwrap();
        let ey = rel_l2(
            &b.download(&y).unwrap(),
            &expected[&format!("{case}.unet_out")].1,
        );
        let e = p
            .encode_prompt_pair("a red fox in the snow", None, &Params::default())
            .unwrap();
        let et = rel_l2(
            &b.download(&e.context).unwrap(),
            &expected[&format!("{case}.prompt_embeds")].1,
        );
        let ep = rel_l2(
            &b.download(e.pooled.as_ref().unwrap()).unwrap(),
            &expected[&format!("{case}.pooled_prompt_embeds")].1,
        );
        println!(
            "{case}: {} updates; unet {ey:.2e} text {et:.2e} pooled {ep:.2e}",
            report.matched
        );
        assert!(
            ey < 1e-5 && et < 1e-5 && ep < 1e-5,
            "{case}: {ey} {et} {ep}"
        );
    }
}

/// Base to refiner (diffusers' "ensemble of experts"): the base stops at `denoising_end` with
/// its latents undecoded, the refiner starts from them at `denoising_start` (no noise added),
/// and the same latents with a strength instead are noised as an image's; every stage with
/// diffusers' noise replayed, against diffusers' latents and images.
#[test]
fn sdxl_base_to_refiner_handoff_matches_diffusers() {
    let base = pipe();
    let refiner = StableDiffusion::from_dir(
        CpuBackend::new(),
        dir().join("refiner"),
        &LoadOptions::default(),
    )
    .unwrap();
    for name in ["handoff", "handoff_heun"] {
        let cases = dir().join("cases");
        let meta = read_json(&cases.join(format!("{name}.json")));
        let tensors = read_tensors(&cases.join(format!("{name}.safetensors")));
        let (shape, base_latents) = &tensors["base.latents"];
        let shape: [usize; 4] = shape.as_slice().try_into().unwrap();
        for stage in meta["stages"].as_array().unwrap() {
            let label = stage["stage"].as_str().unwrap();
            let a = &stage["args"];
            let count = stage["noise_tensors"].as_u64().unwrap() as usize;
            let mut noise = sd_schedulers::ReplayNoise::new(
                (0..count)
                    .map(|k| tensors[&format!("{label}.noise.{k}")].1.clone())
                    .collect(),
            );
            let params = Params {
                prompt: a["prompt"].as_str().unwrap().into(),
                steps: a["num_inference_steps"].as_u64().unwrap() as usize,
                guidance_scale: a["guidance_scale"].as_f64().unwrap(),
                sampler: sd_models::pipeline::SamplerChoice::Name(
                    stage["sampler"].as_str().unwrap().into(),
                ),
                denoising_end: a["denoising_end"].as_f64(),
                denoising_start: a["denoising_start"].as_f64(),
                latents_only: label == "base",
                ..Params::default()
            };
            let (p, task) = if label == "base" {
                (&base, Task::TextToImage)
            } else {
                let task = Task::Latents {
                    latents: base_latents,
                    shape,
                    strength: a["strength"].as_f64().unwrap(),
                };
                (&refiner, task)
            };
            let mut steps = Vec::new();
            let g = finished(
                p.generate(&params, task, &mut noise, &mut |s| {
                    steps.push(s.timestep);
                    Control::Continue
                })
                .unwrap(),
            );
            let what = format!("{name}/{label}");
            assert_eq!(noise.used(), count, "{what}: noise used in order");
            let expected_steps: Vec<f64> = stage["unet_timesteps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_f64().unwrap())
                .collect();
            assert_eq!(steps.len(), expected_steps.len(), "{what}: steps run");
            for (ours, theirs) in steps.iter().zip(&expected_steps) {
                assert!(
                    (ours - theirs).abs() < 1e-3,
                    "{what}: {steps:?} {expected_steps:?}"
                );
            }
            let (ours, expected) = if label == "base" {
                assert!(
                    g.images.is_empty() && g.pixels.is_empty(),
                    "{what}: decoded"
                );
                (g.latents, base_latents.clone())
            } else {
                let image = &tensors[&format!("{label}.image")];
                (g.pixels, common::fixtures::channels_first(image))
            };
            assert_eq!(ours.len(), expected.len(), "{what}");
            let max = ours
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            println!("{what}: {} steps, max {max:.2e}", steps.len());
            assert!(max < 1e-4, "{what}: max {max}");
        }
    }
}

/// The handoff's options are checked before any work: fractions outside (0, 1), a start not
/// before the end, a start for text-to-image or inpainting, latents of another shape.
#[test]
fn handoff_options_are_checked() {
    let p = pipe();
    let params = Params {
        prompt: "a fox".into(),
        steps: 2,
        width: Some(64),
        height: Some(64),
        ..Params::default()
    };
    fn go(_: &sd_models::pipeline::Progress<'_>) -> Control {
        Control::Continue
    }
    for (start, end, what) in [
        (None, Some(0.0), "denoising_end"),
        (None, Some(1.0), "denoising_end"),
        (None, Some(f64::NAN), "denoising_end"),
        (Some(1.5), None, "denoising_start"),
        (Some(0.8), Some(0.5), "denoising_start"),
    ] {
        let bad = Params {
            denoising_start: start,
            denoising_end: end,
            ..params.clone()
        };
        let latents = vec![0.0; 4 * 8 * 8];
        let err = p
            .img2img_latents(&bad, &latents, [1, 4, 8, 8], 0.5, go)
            .unwrap_err();
        assert!(
            matches!(&err, Error::Config { what: w, .. } if w == what),
            "{start:?} {end:?}: {err}"
        );
    }
    let start_only = Params {
        denoising_start: Some(0.5),
        ..params.clone()
    };
    let err = p.txt2img(&start_only, go).unwrap_err();
    assert!(
        matches!(&err, Error::Config { what, .. } if what == "denoising_start"),
        "{err}"
    );
    let image = sd_models::pipeline::Image::filled(64, 64, [9, 9, 9]).unwrap();
    let mask = sd_models::pipeline::Mask::from_image(&image);
    let err = p.inpaint(&start_only, &image, &mask, 1.0, go).unwrap_err();
    assert!(
        matches!(&err, Error::Config { what, .. } if what == "denoising_start"),
        "{err}"
    );
    // Latents of another channel count, count, or of fewer values than their shape.
    for (shape, len) in [
        ([1, 3, 8, 8], 3 * 64),
        ([3, 4, 8, 8], 3 * 4 * 64),
        ([1, 4, 8, 8], 4 * 64 - 1),
        ([1, 4, 0, 8], 0),
        ([1, 4, usize::MAX, 8], 4),
    ] {
        let err = p
            .img2img_latents(&params, &vec![0.0; len], shape, 0.5, go)
            .unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{shape:?}: {err}");
    }
    // A width that differs from the latents'.
    let wide = Params {
        width: Some(128),
        ..params.clone()
    };
    let err = p
        .img2img_latents(&wide, &vec![0.0; 4 * 64], [1, 4, 8, 8], 0.5, go)
        .unwrap_err();
    assert!(
        matches!(&err, Error::Config { what, .. } if what == "width"),
        "{err}"
    );
}

/// SDXL textual inversion: a file with `clip_l` and `clip_g` vectors, each half in its text
/// encoder (the refiner takes `clip_g` alone), against diffusers' `load_textual_inversion`
/// called for each encoder and `encode_prompt`; an SDXL file on an SD 1.x model is refused.
#[test]
fn sdxl_textual_inversion_matches_diffusers() {
    let ti_dir = dir().join("textual_inversion");
    let meta = read_json(&ti_dir.join("cases.json"));
    let t = read_tensors(&ti_dir.join("expected.safetensors"));
    let file = ti_dir.join("xl_style.safetensors");
    let token = meta["token"].as_str().unwrap();
    let mut base = pipe();
    let mut refiner = StableDiffusion::from_dir(
        CpuBackend::new(),
        dir().join("refiner"),
        &LoadOptions::default(),
    )
    .unwrap();
    // The file's name is the default token; the fixture names it.
    for p in [&mut base, &mut refiner] {
        let tokens = p.load_textual_inversion(&file, Some(token)).unwrap();
        assert_eq!(tokens, [token.to_owned(), format!("{token}_1")]);
        // Twice is an error (the token is taken) that changes nothing.
        assert!(p.load_textual_inversion(&file, Some(token)).is_err());
    }
    let ids = |key: &str| -> Vec<u32> { t[key].1.iter().map(|&v| v as u32).collect() };
    for (key, case) in meta["cases"].as_object().unwrap() {
        let p = if case["pipeline"] == "base" {
            &base
        } else {
            &refiner
        };
        let prompt = case["prompt"].as_str().unwrap();
        let expanded = p.expand_embeddings(prompt);
        let t2 = match p.text_encoder_2() {
            Some((t2, _)) => {
                assert_eq!(
                    p.tokenizer().encode(&expanded).unwrap(),
                    ids(&format!("{key}.ids_1"))
                );
                t2
            }
            None => p.tokenizer(),
        };
        assert_eq!(t2.encode(&expanded).unwrap(), ids(&format!("{key}.ids_2")));
        let e = p
            .encode_prompt_pair(prompt, None, &Params::default())
            .unwrap();
        let b = p.backend();
        for (got, name) in [
            (&e.context, "prompt_embeds"),
            (e.pooled.as_ref().unwrap(), "pooled_prompt_embeds"),
        ] {
            let err = rel_l2(&b.download(got).unwrap(), &t[&format!("{key}.{name}")].1);
            println!("{key}.{name}: {err:.2e}");
            assert!(err < 1e-5, "{key}.{name}: {err:e}");
        }
    }
    // An SDXL embedding on a one-encoder model: refused, nothing changed.
    let mut sd1 = StableDiffusion::from_dir(
        CpuBackend::new(),
        common::fixtures::root().join("pipeline/sd1"),
        &LoadOptions::default(),
    )
    .unwrap();
    let e = sd1.load_textual_inversion(&file, None).unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e}");
    assert!(sd1.embeddings().is_empty());
}

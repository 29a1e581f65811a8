//! Reading `fixtures/` (written by tools/fixtures): safetensors of f32 tensors, the JSON
//! beside them, the UNet cases' class labels and the pipeline cases (diffusers' arguments,
//! the noise it drew, its images). Shared by sd-models' tests and, through `#[path]`, by
//! sd-cuda's end-to-end tests, so that both read a case the same way.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sd_models::nn::ClassLabels;
use sd_models::pipeline::{ControlImage, Image, Mask, Params, SamplerChoice, SdxlParams};
use sd_schedulers::ReplayNoise;

/// The repository's `fixtures/`: `SD_FIXTURES` if set, else where it was at build time, else
/// `fixtures` in the working directory (a test binary copied to another machine, run from
/// the repository root there).
pub fn root() -> PathBuf {
    if let Some(dir) = std::env::var_os("SD_FIXTURES") {
        return PathBuf::from(dir);
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    if built.is_dir() {
        built
    } else {
        PathBuf::from("fixtures")
    }
}

/// A folder of the system's temporary directory for files a test writes, the same for every
/// run (so that runs do not leave one each behind).
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(name);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// Writes `bytes` to `dir/name` through a file of this process's own renamed into place, so
/// that a test in another process writing the same file never leaves half of it to be read.
pub fn write_whole(dir: &Path, name: &str, bytes: &[u8]) {
    let part = dir.join(format!("{name}.{}", std::process::id()));
    std::fs::write(&part, bytes).unwrap_or_else(|e| panic!("{}: {e}", part.display()));
    std::fs::rename(&part, dir.join(name)).unwrap();
}

/// A tensor's shape and values.
pub type Tensor = (Vec<usize>, Vec<f32>);

/// The f32 tensors of a safetensors file, by name.
pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(
                v.dtype(),
                safetensors::Dtype::F32,
                "{}: {k}",
                path.display()
            );
            let data = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (k, (v.shape().to_vec(), data))
        })
        .collect()
}

/// A JSON file.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// A JSON array of numbers.
pub fn numbers(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// A UNet case's class labels (`class_ids` or `class_timesteps` in its case.json), owned.
pub struct Labels {
    ids: Option<Vec<u32>>,
    timesteps: Option<Vec<f64>>,
}

impl Labels {
    /// The labels of `case`, if it has any.
    pub fn of(case: &serde_json::Value) -> Self {
        Labels {
            ids: case
                .get("class_ids")
                .map(|v| numbers(v).into_iter().map(|x| x as u32).collect()),
            timesteps: case.get("class_timesteps").map(numbers),
        }
    }

    /// As the networks take them.
    pub fn get<T>(&self) -> Option<ClassLabels<'_, T>> {
        match (&self.ids, &self.timesteps) {
            (Some(ids), _) => Some(ClassLabels::Ids(ids)),
            (_, Some(t)) => Some(ClassLabels::Timesteps(t)),
            _ => None,
        }
    }
}

/// diffusers' `[B, H, W, C]` images as `[B, C, H, W]`, the pipelines' layout.
pub fn channels_first((shape, v): &Tensor) -> Vec<f32> {
    let [b, h, w, c] = shape[..] else {
        panic!("image shape {shape:?}")
    };
    let mut out = vec![0.0; v.len()];
    for n in 0..b {
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    out[((n * c + ch) * h + y) * w + x] = v[((n * h + y) * w + x) * c + ch];
                }
            }
        }
    }
    out
}

/// One pipeline case of `fixtures/pipeline/cases`: what diffusers was asked, the noise it
/// drew, its inputs and its images.
pub struct PipelineCase {
    /// The case's JSON: `args`, `sampler`, `noise_tensors`, ...
    pub meta: serde_json::Value,
    /// Its tensors: `noise.K`, `image`, and `input`/`mask` where it has them.
    pub tensors: HashMap<String, Tensor>,
}

impl PipelineCase {
    /// The case `name`.
    pub fn read(name: &str) -> Self {
        Self::read_in("pipeline/cases", name)
    }

    /// The case `name` of the cases folder `dir` (relative to `fixtures/`).
    pub fn read_in(dir: &str, name: &str) -> Self {
        let dir = root().join(dir);
        PipelineCase {
            meta: read_json(&dir.join(format!("{name}.json"))),
            tensors: read_tensors(&dir.join(format!("{name}.safetensors"))),
        }
    }

    /// How many noise tensors diffusers drew.
    pub fn noise_count(&self) -> usize {
        self.meta["noise_tensors"].as_u64().unwrap() as usize
    }

    /// diffusers' noise, to replay in order.
    pub fn noise(&self) -> ReplayNoise {
        ReplayNoise::new(
            (0..self.noise_count())
                .map(|k| self.tensors[&format!("noise.{k}")].1.clone())
                .collect(),
        )
    }

    /// diffusers' arguments as ours (64x64, the case's sampler by name).
    pub fn params(&self) -> Params {
        let a = &self.meta["args"];
        Params {
            prompt: a["prompt"].as_str().unwrap().into(),
            negative_prompt: a["negative_prompt"].as_str().unwrap_or("").into(),
            steps: a["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: a["guidance_scale"].as_f64().unwrap(),
            guidance_rescale: a["guidance_rescale"].as_f64().unwrap_or(0.0),
            num_images: a["num_images_per_prompt"].as_u64().unwrap_or(1) as usize,
            sampler: SamplerChoice::Name(self.meta["sampler"].as_str().unwrap().into()),
            width: Some(64),
            height: Some(64),
            controls: self.controls(),
            guess_mode: a["guess_mode"].as_bool().unwrap_or(false),
            sdxl: self.sdxl_params(),
            ..Params::default()
        }
    }

    /// SDXL's arguments of the case (diffusers' defaults where it gives none).
    pub fn sdxl_params(&self) -> SdxlParams {
        let a = &self.meta["args"];
        let size = |key: &str| {
            a[key].as_array().map(|v| {
                (
                    v[0].as_u64().unwrap() as usize,
                    v[1].as_u64().unwrap() as usize,
                )
            })
        };
        let text = |key: &str| a[key].as_str().map(str::to_owned);
        let d = SdxlParams::default();
        SdxlParams {
            prompt_2: text("prompt_2"),
            negative_prompt_2: text("negative_prompt_2"),
            original_size: size("original_size"),
            crops_coords_top_left: size("crops_coords_top_left").unwrap_or((0, 0)),
            target_size: size("target_size"),
            negative_original_size: size("negative_original_size"),
            negative_crops_coords_top_left: size("negative_crops_coords_top_left")
                .unwrap_or((0, 0)),
            negative_target_size: size("negative_target_size"),
            aesthetic_score: a["aesthetic_score"].as_f64().unwrap_or(d.aesthetic_score),
            negative_aesthetic_score: a["negative_aesthetic_score"]
                .as_f64()
                .unwrap_or(d.negative_aesthetic_score),
        }
    }

    /// A ControlNet case's ControlNet folders, in order (empty for other cases).
    pub fn controlnet_dirs(&self) -> Vec<PathBuf> {
        self.meta["controlnets"]
            .as_array()
            .map(|a| a.iter().map(|d| root().join(d.as_str().unwrap())).collect())
            .unwrap_or_default()
    }

    /// The UNet folder a ControlNet case names (relative to `fixtures/`).
    pub fn unet_dir(&self) -> Option<PathBuf> {
        self.meta["unet"].as_str().map(|d| root().join(d))
    }

    /// A ControlNet case's control images with their scales and guidance windows (diffusers'
    /// arguments: one number for every net, or a list with one each).
    pub fn controls(&self) -> Vec<ControlImage> {
        let a = &self.meta["args"];
        let nth = |key: &str, k: usize, default: f64| match &a[key] {
            serde_json::Value::Array(v) => v[k].as_f64().unwrap(),
            serde_json::Value::Null => default,
            v => v.as_f64().unwrap(),
        };
        let Some(names) = self.meta["control_images"].as_array() else {
            return Vec::new();
        };
        names
            .iter()
            .enumerate()
            .map(|(k, name)| {
                let (shape, v) = &self.tensors[name.as_str().unwrap()];
                let image =
                    Image::new(shape[1], shape[0], v.iter().map(|&x| x as u8).collect()).unwrap();
                ControlImage {
                    image,
                    scale: nth("controlnet_conditioning_scale", k, 1.0),
                    start: nth("control_guidance_start", k, 0.0),
                    end: nth("control_guidance_end", k, 1.0),
                }
            })
            .collect()
    }

    /// The image-to-image or inpainting strength (a case with an input image must give it).
    pub fn strength(&self) -> f64 {
        let strength = self.meta["args"]["strength"].as_f64();
        match strength {
            Some(s) => s,
            None if self.tensors.contains_key("input") => {
                panic!("a case with an input image and no strength")
            }
            None => 1.0,
        }
    }

    /// The input image, where the case has one.
    pub fn image(&self) -> Option<Image> {
        self.tensors.get("input").map(|(shape, v)| {
            Image::new(shape[1], shape[0], v.iter().map(|&x| x as u8).collect()).unwrap()
        })
    }

    /// The inpainting mask, where the case has one.
    pub fn mask(&self) -> Option<Mask> {
        self.tensors.get("mask").map(|(shape, v)| {
            Mask::new(shape[1], shape[0], v.iter().map(|&x| x as u8).collect()).unwrap()
        })
    }

    /// diffusers' images, `[B, 3, H, W]`.
    pub fn expected(&self) -> Vec<f32> {
        channels_first(&self.tensors["image"])
    }
}

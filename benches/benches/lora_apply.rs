//! Merging a rank-64 LoRA into SD 1.5's UNet: the time `LoraPatches::patch` takes to add
//! `scale * up @ down` to every weight a typical LoRA touches (every transformer's attention
//! projections, feed-forward and `proj_in`/`proj_out`: 16 transformers, 192 modules), with
//! random values, f32 weights, on the CPU backend's GEMM with all of rayon's threads. This is the arithmetic of `StableDiffusion::set_loras`; the
//! reload that goes with it is measured too: an SD 1.5-sized UNet with random weights is
//! written once as an f16 safetensors file (1.7 GB, in the target directory), then loaded
//! from it into f32 with and without the LoRA merged as its weights are read, which is what
//! switching LoRAs costs.
//!
//! ```text
//! cargo bench -p sd-benches --bench lora_apply             # the merge and the reload
//! cargo bench -p sd-benches --bench lora_apply -- merge    # the merge only
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sd_models::backend::DType;
use sd_models::lora::{Lora, LoraFactors, LoraModule, LoraPatches, LoraTarget};
use sd_models::nn::{RandomWeights, WeightSource};
use sd_models::unet::{Unet2DConditionConfig, Unet2DConditionModel};
use sd_models::weights::{HostData, HostTensor, LoadDType, OpenOptions, Variant, WeightPath};

/// Random weights that keep a copy of every tensor handed out, by its full key.
#[derive(Clone)]
struct Recording {
    inner: RandomWeights,
    path: WeightPath,
    seen: Arc<Mutex<Vec<(String, HostTensor)>>>,
}

impl WeightSource for Recording {
    fn push(&self, name: &str) -> Self {
        Recording {
            inner: self.inner.push(name),
            path: self.path.push(name),
            seen: self.seen.clone(),
        }
    }

    fn index(&self, i: usize) -> Self {
        Recording {
            inner: self.inner.index(i),
            path: self.path.index(i),
            seen: self.seen.clone(),
        }
    }

    fn get(&self, name: &str, shape: &[usize]) -> sd_models::Result<HostTensor> {
        let t = self.inner.get(name, shape)?;
        let key = self.path.push(name).as_str().to_owned();
        self.seen.lock().unwrap().push((key, t.clone()));
        Ok(t)
    }

    fn describe(&self) -> String {
        self.path.as_str().to_owned()
    }
}

/// Writes SD 1.5's UNet with random f16 weights to `dir` unless it is there.
fn write_unet(dir: &Path, config: &Unet2DConditionConfig) {
    let file = dir.join("diffusion_pytorch_model.safetensors");
    if file.exists() {
        return;
    }
    std::fs::create_dir_all(dir).unwrap();
    let source = Recording {
        inner: RandomWeights::new(3).with_dtype(DType::F16),
        path: WeightPath::root(),
        seen: Arc::default(),
    };
    let cpu = sd_models::CpuBackend::new();
    drop(Unet2DConditionModel::from_source(&cpu, &source, config.clone()).unwrap());
    let seen = std::mem::take(&mut *source.seen.lock().unwrap());
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = seen
        .into_iter()
        .map(|(k, t)| {
            let HostData::F16(v) = t.data() else {
                panic!("{k} is not f16")
            };
            let b = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (k, t.shape().to_vec(), b)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, shape, b)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F16, shape.clone(), b)
                    .unwrap();
            (k.clone(), view)
        })
        .collect();
    let part = dir.join("partial.safetensors");
    safetensors::serialize_to_file(views, None, &part).unwrap();
    std::fs::rename(part, file).unwrap();
}

/// The median of 3 loads of the UNet in `dir` into f32, `patches` merged if given.
fn time_load(dir: &Path, config: &Unet2DConditionConfig, patches: Option<Arc<LoraPatches>>) -> f64 {
    let cpu = sd_models::CpuBackend::new();
    let mut times: Vec<f64> = (0..3)
        .map(|_| {
            let mut options = OpenOptions::new();
            if let Some(p) = patches.clone() {
                options = options.patch(move |k, x| p.patch(k, x));
            }
            let t0 = Instant::now();
            let unet = options
                .load_folder(dir, &[Variant::Default], |store| {
                    Unet2DConditionModel::load(&cpu, store, config.clone(), LoadDType::F32)
                })
                .unwrap();
            let t = t0.elapsed().as_secs_f64();
            drop(unet);
            t
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[1]
}

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32) * 0.618 + seed).sin() * 0.05)
        .collect()
}

fn main() {
    let rank = 64;
    // (prefix, channels) of SD 1.5's 16 transformers.
    let mut blocks = Vec::new();
    for (b, c) in [(0, 320), (1, 640), (2, 1280)] {
        for a in 0..2 {
            blocks.push((format!("down_blocks.{b}.attentions.{a}"), c));
        }
    }
    for (b, c) in [(1, 1280), (2, 640), (3, 320)] {
        for a in 0..3 {
            blocks.push((format!("up_blocks.{b}.attentions.{a}"), c));
        }
    }
    blocks.push(("mid_block.attentions.0".into(), 1280));
    // Every module: (path, out, in).
    let mut modules: Vec<(String, usize, usize)> = Vec::new();
    for (prefix, c) in &blocks {
        let c = *c;
        let t = format!("{prefix}.transformer_blocks.0");
        for (name, out, inp) in [
            ("attn1.to_q", c, c),
            ("attn1.to_k", c, c),
            ("attn1.to_v", c, c),
            ("attn1.to_out.0", c, c),
            ("attn2.to_q", c, c),
            ("attn2.to_k", c, 768),
            ("attn2.to_v", c, 768),
            ("attn2.to_out.0", c, c),
            ("ff.net.0.proj", 8 * c, c),
            ("ff.net.2", c, 4 * c),
        ] {
            modules.push((format!("{t}.{name}"), out, inp));
        }
        modules.push((format!("{prefix}.proj_in"), c, c));
        modules.push((format!("{prefix}.proj_out"), c, c));
    }
    let lora = Lora {
        path: "random".into(),
        modules: modules
            .iter()
            .enumerate()
            .map(|(i, (name, out, inp))| LoraModule {
                target: LoraTarget::Unet,
                name: name.clone(),
                kohya: false,
                factors: LoraFactors::LowRank {
                    down: Arc::new(
                        HostTensor::from_f32(vec![rank, *inp], values(rank * inp, i as f32))
                            .unwrap(),
                    ),
                    up: Arc::new(
                        HostTensor::from_f32(vec![*out, rank], values(out * rank, 0.5 + i as f32))
                            .unwrap(),
                    ),
                },
                alpha: Some(32.0),
                rslora: false,
            })
            .collect(),
        unknown: Vec::new(),
        multiplier: 0.8,
    };
    let patches = LoraPatches::new(std::slice::from_ref(&lora), LoraTarget::Unet).unwrap();
    let weights: Vec<(String, HostTensor)> = modules
        .iter()
        .map(|(name, out, inp)| {
            (
                format!("{name}.weight"),
                HostTensor::from_f32(vec![*out, *inp], values(out * inp, 0.25)).unwrap(),
            )
        })
        .collect();
    let params: usize = modules.iter().map(|(_, o, i)| o * i).sum();
    let flop = 2.0 * (params * rank) as f64;
    let mut times = Vec::new();
    for _ in 0..3 {
        let copies = weights.clone();
        let t0 = Instant::now();
        for (key, w) in copies {
            std::hint::black_box(patches.patch(&key, w).unwrap());
        }
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let t = times[1];
    let threads = rayon::current_num_threads();
    let roof = match sd_benches::fma_peak(threads).0 {
        Some(peak) => format!(
            ", {:.0}% of the f32 FMA peak ({peak:.0} GFLOP/s)",
            100.0 * flop / t / 1e9 / peak
        ),
        None => String::new(),
    };
    println!(
        "lora    rank {rank}, {} modules, {:.1} M weights, {threads} threads: {:.3} s ({:.2} GFLOP, {:.1} GFLOP/s{roof}), median of 3",
        modules.len(),
        params as f64 / 1e6,
        t,
        flop / 1e9,
        flop / t / 1e9
    );

    if std::env::args().any(|a| a == "merge") {
        return;
    }
    let config = Unet2DConditionConfig::stable_diffusion_1_5().unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/lora-bench-unet");
    write_unet(&dir, &config);
    let plain = time_load(&dir, &config, None);
    let patches =
        Arc::new(LoraPatches::new(std::slice::from_ref(&lora), LoraTarget::Unet).unwrap());
    let merged = time_load(&dir, &config, Some(patches.clone()));
    let report = patches.report();
    assert_eq!(report.matched, modules.len(), "{:?}", report.unmatched);
    println!(
        "reload  SD 1.5 UNet from f16 safetensors into f32: {plain:.3} s plain, {merged:.3} s with the LoRA merged (+{:.3} s), median of 3",
        merged - plain
    );
    println!(
        "memory  kept to undo a LoRA: none (switching re-reads the memory-mapped file); the LoRA itself: {:.1} MB in f32",
        lora.modules
            .iter()
            .map(|m| match &m.factors {
                LoraFactors::LowRank { down, up } => 4 * (down.len() + up.len()),
                _ => 0,
            })
            .sum::<usize>() as f64
            / 1e6
    );
}

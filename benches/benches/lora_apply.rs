//! Merging a rank-64 LoRA into SD 1.5's UNet: the time `LoraPatches::patch` takes to add
//! `scale * up @ down` to every weight a typical LoRA touches (every transformer's attention
//! projections, feed-forward and `proj_in`/`proj_out`: 16 transformers, 192 modules), with
//! random values, f32 weights. This is the arithmetic of `StableDiffusion::set_loras`; the
//! reload of the weights from their files that goes with it is measured by `networks`.
//!
//! ```text
//! cargo bench -p sd-benches --bench lora_apply
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Instant;

use sd_models::lora::{Lora, LoraModule, LoraPatches, LoraTarget};
use sd_models::weights::HostTensor;

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
                down: Arc::new(
                    HostTensor::from_f32(vec![rank, *inp], values(rank * inp, i as f32)).unwrap(),
                ),
                up: Arc::new(
                    HostTensor::from_f32(vec![*out, rank], values(out * rank, 0.5 + i as f32))
                        .unwrap(),
                ),
                alpha: Some(32.0),
                rslora: false,
            })
            .collect(),
        unknown: Vec::new(),
        multiplier: 0.8,
    };
    let patches = LoraPatches::new(&[lora], LoraTarget::Unet).unwrap();
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
    println!(
        "lora    rank {rank}, {} modules, {:.1} M weights: {:.3} s ({:.2} GFLOP, {:.1} GFLOP/s), median of 3",
        modules.len(),
        params as f64 / 1e6,
        t,
        flop / 1e9,
        flop / t / 1e9
    );
}

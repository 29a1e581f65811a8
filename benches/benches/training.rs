//! One training step of the digits `UNet2DModel` (the network `train-digits` trains, 1.1 M
//! parameters, 16x16 images) on the CPU backend: the forward pass recorded on the autodiff
//! tape and the backward pass, each timed, with the forward's operations and the backward's
//! rules broken down, and the products' work against the machine's FMA roof.
//!
//! ```text
//! cargo bench -p sd-benches --bench training                 # batch 128, 5 steps
//! cargo bench -p sd-benches --bench training -- --batch 32 --steps 3
//! ```
//!
//! The issue this measures asks a backward pass to cost about twice its forward pass (its
//! products do twice the forward's work: the input's and the weights' gradients). The
//! weights are random (seed 0), the inputs `sd_benches::data`; the time does not
//! depend on either. The forward runs through [`Profiled`], which adds a lock and a clock
//! read per operation (a few hundred per pass).

// A benchmark: a failure should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use sd_benches::{Profiled, data, median, peak_rss};
use sd_models::CpuBackend;
use sd_models::backend::DataOps;
use sd_models::nn::{ClassLabels, RandomWeights};
use sd_models::train::autodiff::{Autodiff, RuleTime};
use sd_models::unet::{Unet2DConfig, Unet2DModel};

/// The digits' side (the training data's images).
const SIDE: usize = 16;

struct Options {
    batch: usize,
    steps: usize,
}

fn options() -> Options {
    let mut o = Options {
        batch: 128,
        steps: 5,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a positive number"))
        };
        match a.as_str() {
            "--batch" => o.batch = value("--batch").max(1),
            "--steps" => o.steps = value("--steps").max(1),
            // cargo bench passes --bench.
            _ => {}
        }
    }
    o
}

/// What one step took.
struct Step {
    forward: Duration,
    backward: Duration,
    forward_ops: Vec<(&'static str, sd_benches::OpStats)>,
    rules: Vec<RuleTime>,
    product_flops: u64,
}

fn step(config: &Unet2DConfig, batch: usize) -> Step {
    let profiled = Profiled::new(CpuBackend::new(), true);
    let ad = Autodiff::new(profiled.clone());
    let unet =
        Unet2DModel::from_source(&ad, &ad.named_source(RandomWeights::new(0)), config.clone())
            .unwrap();
    let (c, s) = (config.in_channels, SIDE);
    let shape = [batch, c, s, s];
    let x = ad.upload(&data(batch * c * s * s, 0.1), &shape).unwrap();
    let timesteps: Vec<f64> = (0..batch).map(|i| ((i * 37) % 1000) as f64).collect();
    let labels: Vec<u32> = (0..batch).map(|i| (i % 10) as u32).collect();
    let labels = config.num_class_embeds.map(|_| ClassLabels::Ids(&labels));
    profiled.reset();
    let t0 = Instant::now();
    let out = unet.forward(&ad, &x, &timesteps, labels).unwrap();
    let forward = t0.elapsed();
    let forward_ops: Vec<_> = profiled.stats().into_iter().collect();
    let product_flops = profiled.total_flops();
    let seed = ad
        .inner()
        .upload(&data(batch * c * s * s, 0.2), &shape)
        .unwrap();
    let t0 = Instant::now();
    let grads = ad.backward(&out, &seed).unwrap();
    let backward = t0.elapsed();
    Step {
        forward,
        backward,
        forward_ops,
        rules: grads.profile().to_vec(),
        product_flops,
    }
}

fn main() {
    let o = options();
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../assets/digits/unet/config.json"
    );
    let config = Unet2DConfig::from_file(dir).unwrap();
    let threads = rayon::current_num_threads();
    let (fma, _) = sd_benches::fma_peak(threads);
    let fma_text = fma.map_or("n/a".into(), |g| format!("{g:.1} GFLOP/s"));
    println!("peak    AVX-512 f32 FMA loop {fma_text} ({threads} threads)");
    println!(
        "digits UNet2DModel, batch {} of {SIDE}x{SIDE}, {} steps after one warm-up",
        o.batch, o.steps
    );
    step(&config, o.batch);
    let steps: Vec<Step> = (0..o.steps).map(|_| step(&config, o.batch)).collect();
    let mut f: Vec<Duration> = steps.iter().map(|s| s.forward).collect();
    let mut b: Vec<Duration> = steps.iter().map(|s| s.backward).collect();
    let (f, b) = (median(&mut f), median(&mut b));
    // The backward's products do twice the forward's work (input and weight gradients).
    let flops = steps[0].product_flops as f64;
    let rate = |work: f64, t: Duration| work / t.as_secs_f64() / 1e9;
    let roof = |g: f64| {
        fma.map_or(String::new(), |p| {
            format!(", {:.0}% of the FMA roof", 100.0 * g / p)
        })
    };
    let (gf, gb) = (rate(flops, f), rate(2.0 * flops, b));
    println!(
        "forward  {:>8.1} ms (median)  products {:.2} GFLOP, {gf:.1} GFLOP/s{}",
        f.as_secs_f64() * 1e3,
        flops / 1e9,
        roof(gf)
    );
    println!(
        "backward {:>8.1} ms (median)  products {:.2} GFLOP, {gb:.1} GFLOP/s{}",
        b.as_secs_f64() * 1e3,
        2.0 * flops / 1e9,
        roof(gb)
    );
    println!(
        "backward / forward {:.2}; step {:.1} ms; peak RSS {} MB",
        b.as_secs_f64() / f.as_secs_f64(),
        (f + b).as_secs_f64() * 1e3,
        peak_rss().map_or("n/a".into(), |r| (r >> 20).to_string())
    );
    // The last step's breakdowns.
    let last = steps.last().unwrap();
    let mut ops = last.forward_ops.clone();
    ops.sort_by_key(|(_, s)| std::cmp::Reverse(s.time));
    println!("\nforward, by operation (last step):");
    for (name, s) in ops.iter().take(12) {
        let g = if s.flops > 0 {
            format!("{:.1} GFLOP/s", rate(s.flops as f64, s.time))
        } else {
            String::new()
        };
        println!(
            "  {name:<22} {:>4} calls {:>8.1} ms  {g}",
            s.calls,
            s.time.as_secs_f64() * 1e3
        );
    }
    println!("\nbackward, by rule (last step):");
    for r in last.rules.iter().take(12) {
        println!(
            "  {:<22} {:>4} calls {:>8.1} ms",
            r.op,
            r.calls,
            r.time.as_secs_f64() * 1e3
        );
    }
}

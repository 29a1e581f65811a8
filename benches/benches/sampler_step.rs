//! One step of every sampler on Stable Diffusion latents (4x64x64 for 512 px, 4x128x128 for
//! 1024 px), against a plain copy of the same bytes.
//!
//! A step reads the model output and the sample and writes the next sample (and the x0
//! estimate): it is memory-bound. Criterion reports each step's time and its throughput in
//! sample bytes per second; `copy` is `copy_from_slice` of one sample, the floor any step
//! that touches the sample at all must pay. Run: `cargo bench -p sd-benches --bench sampler_step`.

// A benchmark fails loudly, like a test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::SeedableRng;
use sd_schedulers::{RngNoise, SchedulerConfig, registry};

fn bench(c: &mut Criterion) {
    let config = SchedulerConfig::stable_diffusion_v1();
    for (label, len) in [("4x64x64", 4 * 64 * 64), ("4x128x128", 4 * 128 * 128)] {
        let mut group = c.benchmark_group(format!("sampler_step/{label}"));
        group.throughput(Throughput::Bytes((len * 4) as u64));
        let sample: Vec<f32> = (0..len).map(|i| ((i as f32) * 0.013).sin()).collect();
        let model_output: Vec<f32> = (0..len).map(|i| ((i as f32) * 0.007).cos()).collect();
        let mut dst = vec![0.0_f32; len];
        group.bench_function("copy", |b| {
            b.iter(|| dst.copy_from_slice(black_box(&sample)));
        });
        for name in registry::CLASS_NAMES {
            let mut sampler =
                registry::sampler(name, &config, 20).expect("builds from SD 1.5's config");
            // Step 5 of the run: multistep history is warm. The steps before it run once here.
            let steps = 5.min(sampler.timesteps().len() - 1);
            let mut rng = RngNoise(rand::rngs::StdRng::seed_from_u64(0));
            let (mut prev, mut x0) = (vec![0.0_f32; len], vec![0.0_f32; len]);
            group.bench_with_input(BenchmarkId::new("step", name), &steps, |b, &steps| {
                // Only the measured step is timed; the run up to it is replayed before each.
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        sampler.reset();
                        for i in 0..steps {
                            sampler
                                .step_into(i, &model_output, &sample, &mut rng, &mut prev, &mut x0)
                                .expect("step");
                        }
                        let start = Instant::now();
                        sampler
                            .step_into(
                                steps,
                                black_box(&model_output),
                                black_box(&sample),
                                &mut rng,
                                &mut prev,
                                &mut x0,
                            )
                            .expect("step");
                        total += start.elapsed();
                    }
                    total
                });
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);

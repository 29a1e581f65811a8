//! Trains the class-conditional digits model (`assets/digits`) from scratch with this library
//! alone, on the CPU: the same network, data, objective and optimiser as
//! `tools/digits/train.py`, and writes a `DDPMPipeline` folder that the `digits` program
//! samples:
//!
//! ```text
//! cargo run --release --example train-digits -- --quick --out digits-quick
//! cargo run --release --example digits -- --model digits-quick -o quick.png
//! ```
//!
//! Without `--quick` it runs train.py's 200 epochs of batch 128 (2,400 steps). The folder is
//! rewritten with the EMA weights every `--checkpoint-every` steps and at the end, with the
//! whole training state beside them (`training_state.safetensors`, with the run's settings): a run
//! that was stopped goes on from its last checkpoint with `--resume`, to the same weights as
//! if it had never stopped. An existing folder is never replaced without `--overwrite`.
//!
//! `--label-dropout 0.1` trains for classifier-free guidance: the network gets an eleventh,
//! "no digit" class (10) that replaces a tenth of the labels, and the `digits` program can then
//! guide with `--guidance 3`.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, StandardNormal};
use sd_models::nn::RandomWeights;
use sd_models::train::ddpm::{Batch, DdpmTrainer, Parameters, TrainOptions, drop_labels};
use sd_models::train::optim;
use sd_models::unet::Unet2DConfig;
use sd_schedulers::SchedulerConfig;

/// Trains the digits model.
#[derive(Debug, Parser)]
struct Cli {
    /// The output folder (unet/ and scheduler/, as assets/digits).
    #[arg(long, short, default_value = "digits-rust")]
    out: PathBuf,
    /// Replace the output folder if it exists.
    #[arg(long)]
    overwrite: bool,
    /// A short run (8 epochs of batch 64, 184 steps) that finishes in a few minutes.
    #[arg(long)]
    quick: bool,
    /// Epochs (train.py: 200).
    #[arg(long)]
    epochs: Option<usize>,
    /// Batch size (train.py: 128).
    #[arg(long)]
    batch_size: Option<usize>,
    /// The peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// The seed of the initial weights, the data order, the noise and the timesteps.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Write the folder every this many steps (0: only at the end).
    #[arg(long, default_value_t = 200)]
    checkpoint_every: usize,
    /// The folder with the network's config and the data (assets/digits).
    #[arg(long, default_value = "assets/digits")]
    assets: PathBuf,
    /// Go on from the checkpoint in the output folder (same settings as the run that wrote
    /// it).
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// The probability of replacing a label by the null class (10), for classifier-free
    /// guidance (0: train.py's purely conditional training).
    #[arg(long, default_value_t = 0.0)]
    label_dropout: f64,
}

/// What must be equal for a run to resume another: everything that decides its steps.
fn settings(epochs: usize, batch_size: usize, cli: &Cli) -> serde_json::Value {
    serde_json::json!({
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": cli.lr,
        "warmup": cli.warmup,
        "seed": cli.seed,
        "label_dropout": cli.label_dropout,
    })
}

/// The state file beside the weights (with the run's settings inside).
const STATE: &str = "training_state.safetensors";

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The training split in model space: `[n, 1, 16, 16]` values in [-1, 1] and the labels.
fn training_data(assets: &Path) -> Result<(Vec<f32>, Vec<u32>), Box<dyn Error>> {
    let bytes = std::fs::read(assets.join("digits.safetensors"))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)?;
    let images = file.tensor("images")?;
    let labels = file.tensor("labels")?;
    let (count, pixels) = match images.shape() {
        [n, 64] => (*n, images.data()),
        other => return Err(format!("images of shape {other:?}; expected [n, 64]").into()),
    };
    if labels.data().len() != count {
        return Err("as many labels as images are needed".into());
    }
    let split: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(assets.join("split.json"))?)?;
    let train: Vec<usize> = split["train_indices"]
        .as_array()
        .ok_or("split.json has no train_indices")?
        .iter()
        .filter_map(|v| v.as_u64().map(|i| i as usize))
        .filter(|&i| i < count)
        .collect();
    let mut x = Vec::with_capacity(train.len() * 256);
    let mut y = Vec::with_capacity(train.len());
    for &i in &train {
        let img = &pixels[i * 64..(i + 1) * 64];
        // value / 8 - 1, nearest 2x to 16x16 (tools/digits/common.py).
        for row in 0..16 {
            for col in 0..16 {
                x.push(f32::from(img[(row / 2) * 8 + col / 2]) / 8.0 - 1.0);
            }
        }
        y.push(u32::from(labels.data()[i]));
    }
    Ok((x, y))
}

/// Writes `params` as a `DDPMPipeline` folder at `out` with the network's config (`None`:
/// the assets' file, copied as it is).
fn write_folder(
    out: &Path,
    assets: &Path,
    config: Option<&serde_json::Value>,
    params: &Parameters,
) -> Result<(), Box<dyn Error>> {
    let unet = out.join("unet");
    let scheduler = out.join("scheduler");
    std::fs::create_dir_all(&unet)?;
    std::fs::create_dir_all(&scheduler)?;
    match config {
        Some(config) => std::fs::write(
            unet.join("config.json"),
            serde_json::to_string_pretty(config)? + "\n",
        )?,
        None => {
            std::fs::copy(assets.join("unet/config.json"), unet.join("config.json"))?;
        }
    }
    std::fs::copy(
        assets.join("scheduler/scheduler_config.json"),
        scheduler.join("scheduler_config.json"),
    )?;
    // Written beside and renamed: an interrupted write never leaves a torn file.
    params.save(&unet.join("diffusion_pytorch_model.safetensors"))?;
    Ok(())
}

/// A checkpoint: the folder (EMA weights), then the state to resume from, with `settings`.
fn checkpoint(
    out: &Path,
    assets: &Path,
    config: Option<&serde_json::Value>,
    trainer: &DdpmTrainer,
    settings: &serde_json::Value,
) -> Result<(), Box<dyn Error>> {
    write_folder(
        out,
        assets,
        config,
        trainer.ema.as_ref().unwrap_or(&trainer.params),
    )?;
    trainer.save_state(&out.join(STATE), &settings.to_string())?;
    Ok(())
}

fn run(cli: Cli) -> Result<(), Box<dyn Error>> {
    if cli.out.exists() && !cli.overwrite && !cli.resume {
        return Err(format!(
            "{} exists; pass --overwrite to replace it or --resume to go on from its checkpoint",
            cli.out.display()
        )
        .into());
    }
    let epochs = cli.epochs.unwrap_or(if cli.quick { 8 } else { 200 });
    let batch_size = cli.batch_size.unwrap_or(if cli.quick { 64 } else { 128 });
    if epochs == 0 || batch_size == 0 {
        return Err("--epochs and --batch-size must be at least 1".into());
    }
    if !(0.0..1.0).contains(&cli.label_dropout) {
        return Err("--label-dropout must be in [0, 1)".into());
    }
    let settings = settings(epochs, batch_size, &cli);
    let (data, labels) = training_data(&cli.assets)?;
    let n = labels.len();
    let classes = labels.iter().max().map_or(0, |&m| m + 1);
    // With label dropout the network gets one class more: the null class.
    let mut config_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        cli.assets.join("unet/config.json"),
    )?)?;
    let changed_config = (cli.label_dropout > 0.0).then(|| {
        config_json["num_class_embeds"] = serde_json::json!(classes + 1);
        config_json.clone()
    });
    let config = Unet2DConfig::from_json(&config_json.to_string(), "unet/config.json")?;
    let scheduler = SchedulerConfig::from_json(&std::fs::read_to_string(
        cli.assets.join("scheduler/scheduler_config.json"),
    )?)?;
    let params = Parameters::capture(&RandomWeights::new(cli.seed), &config)?;
    eprintln!(
        "training {} parameters on {n} digits: {epochs} epochs of batch {batch_size}",
        params.count()
    );
    let mut trainer = DdpmTrainer::new(config, params, &scheduler, TrainOptions::default())?;
    let resume_from = if cli.resume {
        let saved = trainer
            .load_state(&cli.out.join(STATE))
            .map_err(|e| format!("--resume: {e}"))?;
        let saved: serde_json::Value = serde_json::from_str(&saved)?;
        if saved != settings {
            return Err(format!(
                "--resume: the checkpoint was made with {saved}, this run asks for {settings}"
            )
            .into());
        }
        eprintln!("resuming after step {}", trainer.steps);
        trainer.steps as usize
    } else {
        0
    };
    let per_epoch = n.div_ceil(batch_size);
    let total = epochs * per_epoch;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cli.seed);
    let bar = ProgressBar::new(total as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} steps  {msg}  [{elapsed} < {eta}, {per_sec}]",
    )?);
    let t0 = Instant::now();
    // Seconds in the forward and the backward passes of the steps taken.
    let mut passes = (0.0f64, 0.0f64);
    let mut order: Vec<usize> = (0..n).collect();
    let steps = trainer.num_train_timesteps();
    let mut step = 0;
    for _epoch in 0..epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(batch_size) {
            let b = chunk.len();
            let mut x0 = Vec::with_capacity(b * 256);
            let mut y = Vec::with_capacity(b);
            for &i in chunk {
                x0.extend_from_slice(&data[i * 256..(i + 1) * 256]);
                y.push(labels[i]);
            }
            let noise: Vec<f32> = (0..b * 256)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect();
            let timesteps = (0..b)
                .map(|_| sd_core::timestep_from_uniform(rand::Rng::random::<f64>(&mut rng), steps))
                .collect::<Result<Vec<_>, _>>()?;
            drop_labels(&mut y, cli.label_dropout, classes, || {
                rand::Rng::random::<f64>(&mut rng)
            });
            // A resumed run draws what the steps it skips drew, so that the steps after
            // are those of a run that never stopped.
            if step < resume_from {
                step += 1;
                if step == resume_from {
                    bar.set_position(step as u64);
                    bar.reset_eta();
                }
                continue;
            }
            let lr = optim::warmup_cosine_lr(step, cli.warmup, total, cli.lr);
            let batch = Batch {
                x0: &x0,
                noise: &noise,
                timesteps: &timesteps,
                labels: &y,
                shape: [b, 1, 16, 16],
            };
            let report = match trainer.step(batch, lr) {
                Ok(r) => r,
                Err(e) => {
                    bar.abandon();
                    return Err(format!(
                        "step {step}: {e} (the last checkpoint in {} is kept)",
                        cli.out.display()
                    )
                    .into());
                }
            };
            step += 1;
            passes.0 += report.forward.as_secs_f64();
            passes.1 += report.backward.as_secs_f64();
            bar.set_message(format!("loss {:.4}", report.loss));
            bar.inc(1);
            // Where no bar is drawn (a log file), a line now and then.
            if bar.is_hidden() && (step % 50 == 0 || step == total) {
                let secs = t0.elapsed().as_secs_f64();
                let rate = (step - resume_from) as f64 / secs;
                eprintln!(
                    "step {step}/{total} loss {:.4} lr {lr:.2e} {rate:.2} steps/s, {:.0} s left",
                    report.loss,
                    (total - step) as f64 / rate
                );
            }
            if cli.checkpoint_every > 0 && step % cli.checkpoint_every == 0 {
                checkpoint(
                    &cli.out,
                    &cli.assets,
                    changed_config.as_ref(),
                    &trainer,
                    &settings,
                )?;
            }
        }
    }
    bar.finish();
    checkpoint(
        &cli.out,
        &cli.assets,
        changed_config.as_ref(),
        &trainer,
        &settings,
    )?;
    eprintln!(
        "trained {} steps in {:.1} s (forward passes {:.1} s, backward {:.1} s: {:.2}x the \
         forward); wrote {} (EMA weights)",
        step - resume_from,
        t0.elapsed().as_secs_f64(),
        passes.0,
        passes.1,
        passes.1 / passes.0.max(1e-9),
        cli.out.display()
    );
    Ok(())
}

//! An HTTP server that keeps a Stable Diffusion model loaded and answers AUTOMATIC1111's web
//! UI API and OpenAI's image API ([`sd_server`]):
//!
//! ```text
//! cargo run --release --example server -- -m stable-diffusion-v1-5 [--port 7860] [--api-key KEY]
//! curl -s localhost:7860/sdapi/v1/txt2img -d '{"prompt": "a red fox", "steps": 20}'
//! ```
//!
//! It listens on 127.0.0.1 unless `--listen` says otherwise, runs one request at a time from a
//! bounded queue, and stops on Ctrl-C or SIGTERM, cancelling the request that runs.

use std::error::Error;
use std::path::PathBuf;

use clap::Parser;
use sd_models::CpuBackend;
use sd_models::cpu::CpuPrecision;
use sd_models::pipeline::{LoadOptions, StableDiffusion};
use sd_models::weights::LoadDType;
use sd_server::{App, ServerOptions};

/// The server.
#[derive(Debug, Parser)]
struct Cli {
    /// The model: a diffusers folder or a single .safetensors checkpoint.
    #[arg(long, short)]
    model: PathBuf,
    /// The tokenizer folder (for a single-file checkpoint).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The address to listen on (the loopback interface by default: pass 0.0.0.0 to serve
    /// other machines, with an --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    listen: String,
    /// The port (AUTOMATIC1111's by default).
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// Require this key on every request (`Authorization: Bearer KEY`, or basic auth with it
    /// as the password).
    #[arg(long)]
    api_key: Option<String>,
    /// The largest width or height a request may ask for.
    #[arg(long, default_value_t = 2048)]
    max_side: usize,
    /// The most steps a request may ask for.
    #[arg(long, default_value_t = 150)]
    max_steps: usize,
    /// The most images per request.
    #[arg(long, default_value_t = 8)]
    max_images: usize,
    /// Requests that may wait while one runs; more are answered 503.
    #[arg(long, default_value_t = 8)]
    queue: usize,
    /// The largest request body, in MiB.
    #[arg(long, default_value_t = 32)]
    max_body_mib: usize,
    /// Where `<lora:NAME:WEIGHT>` in prompts finds NAME.safetensors.
    #[arg(long)]
    lora_dir: Option<PathBuf>,
    /// A ControlNet (folder or file) driven by the ControlNet extension's units of each
    /// request (`alwayson_scripts.controlnet.args`, module "none"). Repeatable.
    #[arg(long = "controlnet")]
    controlnets: Vec<PathBuf>,
    /// Keep half-precision weights in half precision (half the memory).
    #[arg(long)]
    fp16: bool,
    /// Multiply in bf16 (AVX512-BF16).
    #[arg(long)]
    bf16: bool,
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn Error>> {
    let precision = if cli.bf16 {
        CpuPrecision::Bf16
    } else {
        CpuPrecision::F32
    };
    let backend = CpuBackend::new().with_precision(precision)?;
    let options = LoadOptions {
        fp16_variant: cli.fp16,
        tokenizer: cli.tokenizer.clone(),
        weights: if cli.fp16 {
            LoadDType::Stored
        } else {
            LoadDType::F32
        },
        ..LoadOptions::default()
    };
    let t0 = std::time::Instant::now();
    let mut pipe = StableDiffusion::load(backend, &cli.model, &options)?;
    for net in &cli.controlnets {
        pipe = pipe.load_controlnet(net, &options)?;
    }
    let name = cli
        .model
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    eprintln!("loaded {name} in {:.1} s", t0.elapsed().as_secs_f64());
    let mut server = ServerOptions::new(name);
    server.model_path = cli.model.display().to_string();
    server.max_side = cli.max_side;
    server.max_steps = cli.max_steps;
    server.max_images = cli.max_images;
    server.queue = cli.queue;
    server.api_key = cli.api_key.clone();
    server.body_limit = cli.max_body_mib << 20;
    server.lora_dir = cli.lora_dir.clone();
    server.log = true;
    let app = App::new(pipe, server);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((cli.listen.as_str(), cli.port)).await?;
        eprintln!("listening on http://{}", listener.local_addr()?);
        if cli.api_key.is_none() && cli.listen != "127.0.0.1" && cli.listen != "localhost" {
            eprintln!("warning: listening beyond this machine without --api-key");
        }
        app.serve(listener, shutdown_signal()).await?;
        eprintln!("stopped");
        Ok(())
    })
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    eprintln!("shutting down: cancelling the running request");
}

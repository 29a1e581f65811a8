//! Text-to-image with a Stable Diffusion 1.x / 2.x model on the CPU:
//!
//! ```text
//! cargo run --release --example txt2img -- --model stable-diffusion-v1-5 \
//!     --prompt "a red fox in the snow" --steps 25 --seed 42 --output fox.png
//! ```

#[path = "sd_cli.rs"]
mod sd_cli;

use clap::Parser;
use sd_models::Backend;
use sd_models::pipeline::{Outcome, StableDiffusion};

/// Text-to-image.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    common: sd_cli::Common,
    /// Width in pixels (default: the model's).
    #[arg(long)]
    width: Option<usize>,
    /// Height in pixels (default: the model's).
    #[arg(long)]
    height: Option<usize>,
}

impl sd_cli::Job for &Cli {
    fn run<B: Backend>(
        self,
        pipe: &StableDiffusion<B>,
    ) -> Result<Outcome, Box<dyn std::error::Error>> {
        let mut params = self.common.params();
        params.width = self.width;
        params.height = self.height;
        let (bar, callback) = sd_cli::progress_bar();
        let outcome = pipe.txt2img(&params, callback)?;
        bar.finish();
        Ok(outcome)
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    sd_cli::report(cli.common.run(&cli))
}

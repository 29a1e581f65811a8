//! Text-to-image with a Stable Diffusion 1.x / 2.x model on the CPU:
//!
//! ```text
//! cargo run --release --example txt2img -- --model stable-diffusion-v1-5 \
//!     --prompt "a red fox in the snow" --steps 25 --seed 42 --output fox.png
//! ```

#[path = "sd_cli.rs"]
mod sd_cli;

use clap::Parser;

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let outputs = cli.common.outputs()?;
    let pipe = cli.common.load()?;
    let mut params = cli.common.params();
    params.width = cli.width;
    params.height = cli.height;
    let (bar, callback) = sd_cli::progress_bar();
    let outcome = pipe.txt2img(&params, callback)?;
    bar.finish();
    sd_cli::finish(outcome, &outputs, cli.common.overwrite)
}

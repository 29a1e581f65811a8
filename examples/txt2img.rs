//! Text-to-image with a Stable Diffusion 1.x / 2.x / XL model (SDXL is told from the folder or
//! file, and defaults to 1024x1024) on the CPU:
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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    sd_cli::report(cli.common.run(&sd_cli::Work::TextToImage {
        width: cli.width,
        height: cli.height,
    }))
}

//! Outpainting: the canvas extended by margins and the new border painted in:
//!
//! ```text
//! cargo run --release --example outpaint -- --model stable-diffusion-inpainting \
//!     --image photo.png --left 128 --right 128 --prompt "a wide landscape" --output wide.png
//! ```
//!
//! The extended size must be a multiple of 8.

#[path = "sd_cli.rs"]
mod sd_cli;

use std::path::PathBuf;

use clap::Parser;
use sd_models::pipeline::Margins;

/// Outpainting.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    common: sd_cli::Common,
    /// The input image (PNG); resized down to a multiple of 64 if it is not one.
    #[arg(long, short)]
    image: PathBuf,
    /// Pixels added on the left.
    #[arg(long, default_value_t = 0)]
    left: usize,
    /// Pixels added at the top.
    #[arg(long, default_value_t = 0)]
    top: usize,
    /// Pixels added on the right.
    #[arg(long, default_value_t = 0)]
    right: usize,
    /// Pixels added at the bottom.
    #[arg(long, default_value_t = 0)]
    bottom: usize,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    sd_cli::report(cli.common.run(&sd_cli::Work::Outpaint {
        image: cli.image.clone(),
        margins: Margins {
            left: cli.left,
            top: cli.top,
            right: cli.right,
            bottom: cli.bottom,
        },
    }))
}

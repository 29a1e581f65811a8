//! Outpainting: the canvas extended by margins and the new border painted in:
//!
//! ```text
//! cargo run --release --example outpaint -- --model stable-diffusion-inpainting \
//!     --image photo.png --left 128 --right 128 --prompt "a wide landscape" --output wide.png
//! ```
//!
//! The extended size must be a multiple of 64 (for SD 1.x and 2.x).

#[path = "sd_cli.rs"]
mod sd_cli;

use std::path::PathBuf;

use clap::Parser;
use sd_models::Backend;
use sd_models::pipeline::{Margins, Outcome, StableDiffusion};

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

impl sd_cli::Job for &Cli {
    fn run<B: Backend>(
        self,
        pipe: &StableDiffusion<B>,
    ) -> Result<Outcome, Box<dyn std::error::Error>> {
        let image = sd_cli::load_image(&self.image, pipe.size_multiple())?;
        let margins = Margins {
            left: self.left,
            top: self.top,
            right: self.right,
            bottom: self.bottom,
        };
        let params = self.common.params();
        let (bar, callback) = sd_cli::progress_bar();
        let outcome = pipe.outpaint(&params, &image, margins, callback)?;
        bar.finish();
        Ok(outcome)
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    sd_cli::report(cli.common.run(&cli))
}

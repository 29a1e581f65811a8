//! Image-to-image: an image changed towards a prompt, by `--strength` (0 keeps it, 1
//! replaces it):
//!
//! ```text
//! cargo run --release --example img2img -- --model stable-diffusion-v1-5 \
//!     --image photo.png --strength 0.6 --prompt "a watercolour" --output painted.png
//! ```

#[path = "sd_cli.rs"]
mod sd_cli;

use std::path::PathBuf;

use clap::Parser;
use sd_models::Backend;
use sd_models::pipeline::{Outcome, StableDiffusion};

/// Image-to-image.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    common: sd_cli::Common,
    /// The input image (PNG); resized down to a multiple of 64 if it is not one.
    #[arg(long, short)]
    image: PathBuf,
    /// How much to change the image, in [0, 1].
    #[arg(long, default_value_t = 0.75)]
    strength: f64,
}

impl sd_cli::Job for &Cli {
    fn run<B: Backend>(
        self,
        pipe: &StableDiffusion<B>,
    ) -> Result<Outcome, Box<dyn std::error::Error>> {
        let image = sd_cli::load_image(&self.image, pipe.size_multiple())?;
        let params = self.common.params();
        let (bar, callback) = sd_cli::progress_bar();
        let outcome = pipe.img2img(&params, &image, self.strength, callback)?;
        bar.finish();
        Ok(outcome)
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    sd_cli::report(cli.common.run(&cli))
}

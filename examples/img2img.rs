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

/// Image-to-image.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    common: sd_cli::Common,
    /// The input image (PNG); resized down to a multiple of 8 if it is not one.
    #[arg(long, short)]
    image: PathBuf,
    /// How much to change the image, in [0, 1].
    #[arg(long, default_value_t = 0.75)]
    strength: f64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    sd_cli::report(cli.common.run(&sd_cli::Work::ImageToImage {
        image: cli.image.clone(),
        strength: cli.strength,
    }))
}

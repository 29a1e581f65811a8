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
    /// The input image (PNG); resized down to a multiple of 64 if it is not one.
    #[arg(long, short)]
    image: PathBuf,
    /// How much to change the image, in [0, 1].
    #[arg(long, default_value_t = 0.75)]
    strength: f64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let outputs = cli.common.outputs()?;
    let pipe = cli.common.load()?;
    let image = sd_cli::load_image(&cli.image, pipe.size_multiple())?;
    let params = cli.common.params();
    let (bar, callback) = sd_cli::progress_bar();
    let outcome = pipe.img2img(&params, &image, cli.strength, callback)?;
    bar.finish();
    sd_cli::finish(outcome, &outputs, cli.common.overwrite)
}

//! Inpainting: the white part of a mask repainted, with an inpainting model (9-channel UNet)
//! or any model (the known region blended back at every step):
//!
//! ```text
//! cargo run --release --example inpaint -- --model stable-diffusion-inpainting \
//!     --image photo.png --mask mask.png --prompt "a cat on a bench" --output cat.png
//! ```

#[path = "sd_cli.rs"]
mod sd_cli;

use std::path::PathBuf;

use clap::Parser;

/// Inpainting.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    common: sd_cli::Common,
    /// The input image (PNG); resized down to a multiple of 64 if it is not one.
    #[arg(long, short)]
    image: PathBuf,
    /// The mask (PNG; white is repainted), resized to the image's size.
    #[arg(long)]
    mask: PathBuf,
    /// How much to change the masked region, in [0, 1] (1: from pure noise).
    #[arg(long, default_value_t = 1.0)]
    strength: f64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let outputs = cli.common.outputs()?;
    let pipe = cli.common.load()?;
    let image = sd_cli::load_image(&cli.image, pipe.size_multiple())?;
    let mask = sd_cli::load_mask(&cli.mask, image.width(), image.height())?;
    let params = cli.common.params();
    let (bar, callback) = sd_cli::progress_bar();
    let outcome = pipe.inpaint(&params, &image, &mask, cli.strength, callback)?;
    bar.finish();
    sd_cli::finish(outcome, &outputs, cli.common.overwrite)
}

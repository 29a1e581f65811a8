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
    /// The input image (PNG); resized down to a multiple of 8 if it is not one.
    #[arg(long, short)]
    image: PathBuf,
    /// The mask (PNG; white is repainted), resized to the image's size.
    #[arg(long)]
    mask: PathBuf,
    /// How much to change the masked region, in [0, 1] (1: from pure noise).
    #[arg(long, default_value_t = 1.0)]
    strength: f64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    sd_cli::report(cli.common.run(&sd_cli::Work::Inpaint {
        image: cli.image.clone(),
        mask: cli.mask.clone(),
        strength: cli.strength,
    }))
}

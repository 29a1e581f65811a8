//! ControlNet: text-to-image (or image-to-image, or inpainting) that follows control images
//! (edges, depth, pose, scribbles) through one or more ControlNets:
//!
//! ```text
//! cargo run --release --example controlnet -- --model stable-diffusion-v1-5 \
//!     --control control_v11p_sd15_canny.safetensors --control-image photo.png --canny \
//!     --prompt "a house in the mountains, oil painting" --output house.png
//! ```
//!
//! Repeat `--control` and `--control-image` for several ControlNets; `--control-scale`,
//! `--control-start` and `--control-end` take one value for all or one each. With `--image`
//! the run is image-to-image (`--strength`), with `--image` and `--mask` inpainting.

#[path = "sd_cli.rs"]
mod sd_cli;

use std::path::PathBuf;

use clap::Parser;

/// ControlNet.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    common: sd_cli::Common,
    #[command(flatten)]
    controls: sd_cli::ControlArgs,
    /// The width in pixels (default: the first control image's, rounded down to a multiple
    /// of 8).
    #[arg(long)]
    width: Option<usize>,
    /// The height in pixels (default: the first control image's, rounded down to a
    /// multiple of 8).
    #[arg(long)]
    height: Option<usize>,
    /// An input image: image-to-image, or inpainting with `--mask`.
    #[arg(long, short)]
    image: Option<PathBuf>,
    /// The inpainting mask (white is repainted), with `--image`.
    #[arg(long, requires = "image")]
    mask: Option<PathBuf>,
    /// How much to change the input image, in [0, 1] (default 0.75 for image-to-image, 1
    /// for inpainting).
    #[arg(long)]
    strength: Option<f64>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let work = match (cli.image.clone(), cli.mask.clone()) {
        (None, _) => sd_cli::Work::TextToImage {
            width: cli.width,
            height: cli.height,
        },
        (Some(image), None) => sd_cli::Work::ImageToImage {
            image,
            strength: cli.strength.unwrap_or(0.75),
        },
        (Some(image), Some(mask)) => sd_cli::Work::Inpaint {
            image,
            mask,
            strength: cli.strength.unwrap_or(1.0),
        },
    };
    sd_cli::report(cli.common.run_controlled(&work, Some(&cli.controls)))
}

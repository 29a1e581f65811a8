//! Images in and out: PNG round trips, atomic saving that never replaces a file unasked,
//! decoding limits, and files that are not images, each a typed error naming the file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use sd_models::Error;
use sd_models::pipeline::{Image, ImageLimits};

fn picture() -> Image {
    let data = (0..40 * 24 * 3).map(|i| (i * 7 % 256) as u8).collect();
    Image::new(40, 24, data).unwrap()
}

#[test]
fn png_round_trips_and_saving_never_replaces_unasked() {
    let dir = common::fixtures::scratch_dir("sd-models-image-io");
    let path = dir.join("round.png");
    let _ = std::fs::remove_file(&path);
    let image = picture();
    image.save_new(&path).unwrap();
    assert_eq!(Image::open(&path).unwrap(), image);
    // An existing file stays as it is without replace...
    let other = Image::filled(8, 8, [1, 2, 3]).unwrap();
    match other.save_new(&path) {
        Err(Error::Io { path: p, source }) => {
            assert_eq!(p, path);
            assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists);
        }
        r => panic!("expected AlreadyExists, got {r:?}"),
    }
    assert_eq!(Image::open(&path).unwrap(), image);
    // ... and is replaced whole with it.
    other.save(&path).unwrap();
    assert_eq!(Image::open(&path).unwrap(), other);
    // No temporary file is left beside it.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn decoding_stays_within_the_limits_and_bad_files_are_typed_errors() {
    let png = picture().to_png().unwrap();
    assert_eq!(
        Image::decode(&png, ImageLimits::default()).unwrap(),
        picture()
    );
    let small = ImageLimits {
        max_side: 32,
        ..ImageLimits::default()
    };
    assert!(matches!(Image::decode(&png, small), Err(Error::Io { .. })));
    let tight = ImageLimits {
        max_bytes: 100,
        ..ImageLimits::default()
    };
    assert!(matches!(Image::decode(&png, tight), Err(Error::Io { .. })));
    // Truncated and foreign bytes.
    assert!(Image::decode(&png[..png.len() / 2], ImageLimits::default()).is_err());
    assert!(Image::decode(b"not an image at all", ImageLimits::default()).is_err());
    // A missing file and a folder, named.
    let e = Image::open("/no/such/picture.png").unwrap_err();
    assert!(e.to_string().contains("picture.png"), "{e}");
    let e = Image::open(std::env::temp_dir()).unwrap_err();
    assert!(e.to_string().contains("folder"), "{e}");
}

//! Host images and masks: 8-bit RGB pictures and grey masks, with the conversions diffusers'
//! `VaeImageProcessor` makes (`diffusers/image_processor.py`: `pil_to_numpy`, `normalize`,
//! `denormalize`, `numpy_to_pil`; the mask processor's `convert_to_grayscale` and
//! `binarize`), and the canvas of outpainting.
//!
//! Nothing here resizes: the pipelines need sizes that are multiples of 8 and say so; callers
//! resize (the examples do, with Lanczos as diffusers' default `resample`). Images are read
//! from PNG and JPEG files within [`ImageLimits`], and written as PNG atomically
//! ([`Image::save`]): an existing file is never left half-written.

use std::path::Path;

use crate::error::{Error, Result};

/// An 8-bit RGB image, rows top to bottom, pixels interleaved (`[H, W, 3]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    width: usize,
    height: usize,
    data: Vec<u8>,
}

impl Image {
    /// An image of `width x height` from its `[H, W, 3]` bytes.
    ///
    /// # Errors
    /// [`Error::Shape`] if `data` does not hold `width * height * 3` values or a side is 0.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 || data.len() != width * height * 3 {
            return Err(Error::Shape {
                op: "Image::new",
                expected: format!("{width} x {height} x 3 = {} bytes", width * height * 3),
                found: format!("{} bytes", data.len()),
            });
        }
        Ok(Image {
            width,
            height,
            data,
        })
    }

    /// One colour everywhere.
    ///
    /// # Errors
    /// [`Error::Shape`] for a side of 0.
    pub fn filled(width: usize, height: usize, rgb: [u8; 3]) -> Result<Self> {
        Self::new(width, height, rgb.repeat(width * height))
    }

    /// The width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// The `[H, W, 3]` bytes.
    pub fn as_raw(&self) -> &[u8] {
        &self.data
    }

    /// The `[H, W, 3]` bytes, consuming the image.
    pub fn into_raw(self) -> Vec<u8> {
        self.data
    }

    /// The pixel at column `x`, row `y`.
    pub fn pixel(&self, x: usize, y: usize) -> Option<[u8; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y * self.width + x) * 3;
        Some([self.data[i], self.data[i + 1], self.data[i + 2]])
    }

    /// The image as the VAE takes it: `[3, H, W]` values in `[-1, 1]` (`v / 255 * 2 - 1`, as
    /// diffusers' `pil_to_numpy` then `normalize`).
    pub fn to_chw_signed(&self) -> Vec<f32> {
        let plane = self.width * self.height;
        let mut out = vec![0.0; 3 * plane];
        for (p, px) in self.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + p] = f32::from(px[c]) / 255.0 * 2.0 - 1.0;
            }
        }
        out
    }

    /// The image as a ControlNet takes it: `[3, H, W]` values in `[0, 1]` (`v / 255`, as
    /// diffusers' control image processor, which does not normalise).
    pub fn to_chw_unit(&self) -> Vec<f32> {
        let plane = self.width * self.height;
        let mut out = vec![0.0; 3 * plane];
        for (p, px) in self.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + p] = f32::from(px[c]) / 255.0;
            }
        }
        out
    }

    /// An image from `[3, H, W]` values in `[0, 1]` (clamped), rounded as diffusers'
    /// `numpy_to_pil` does (`(v * 255).round()`).
    ///
    /// # Errors
    /// [`Error::Shape`] if `values` does not hold `3 * width * height` values.
    pub fn from_chw_unit(values: &[f32], width: usize, height: usize) -> Result<Self> {
        let plane = width * height;
        if values.len() != 3 * plane || plane == 0 {
            return Err(Error::Shape {
                op: "Image::from_chw_unit",
                expected: format!("[3, {height}, {width}]"),
                found: format!("{} values", values.len()),
            });
        }
        let mut data = vec![0; 3 * plane];
        for p in 0..plane {
            for c in 0..3 {
                data[p * 3 + c] = (values[c * plane + p].clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
        Self::new(width, height, data)
    }
}

/// How large an image file may decode to, checked before its pixels are read (a small file
/// can claim to be gigapixels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// The largest width or height in pixels (default 16384).
    pub max_side: u32,
    /// The most memory decoding may take, in bytes (default 1 GiB).
    pub max_bytes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_side: 16384,
            max_bytes: 1 << 30,
        }
    }
}

fn image_error(path: &Path, e: image::ImageError) -> Error {
    let kind = match &e {
        image::ImageError::Limits(_) => std::io::ErrorKind::OutOfMemory,
        image::ImageError::IoError(io) => io.kind(),
        _ => std::io::ErrorKind::InvalidData,
    };
    Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(kind, e.to_string()),
    }
}

impl Image {
    /// Reads a PNG or JPEG file (only a regular file; the format from its contents) as 8-bit
    /// RGB, within the default [`ImageLimits`].
    ///
    /// # Errors
    /// [`Error::Io`] naming the file: missing, not a regular file, not a PNG or JPEG, corrupt,
    /// or larger than the limits.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, ImageLimits::default())
    }

    /// As [`open`](Self::open), within `limits`.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub fn open_with(path: impl AsRef<Path>, limits: ImageLimits) -> Result<Self> {
        let path = path.as_ref();
        let file = crate::files::open_regular(path)?;
        let reader = image::ImageReader::new(std::io::BufReader::new(file))
            .with_guessed_format()
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Self::decode_reader(reader, limits).map_err(|e| image_error(path, e))
    }

    /// Decodes a PNG or JPEG file's bytes, within `limits`.
    ///
    /// # Errors
    /// [`Error::Io`] (naming `"<memory>"`) for bytes that are not a PNG or JPEG within the
    /// limits.
    pub fn decode(bytes: &[u8], limits: ImageLimits) -> Result<Self> {
        let what = Path::new("<memory>");
        let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|source| Error::Io {
                path: what.to_path_buf(),
                source,
            })?;
        Self::decode_reader(reader, limits).map_err(|e| image_error(what, e))
    }

    fn decode_reader<R: std::io::BufRead + std::io::Seek>(
        mut reader: image::ImageReader<R>,
        limits: ImageLimits,
    ) -> std::result::Result<Self, image::ImageError> {
        let mut l = image::Limits::default();
        l.max_image_width = Some(limits.max_side);
        l.max_image_height = Some(limits.max_side);
        l.max_alloc = Some(limits.max_bytes);
        reader.limits(l);
        let rgb = reader.decode()?.to_rgb8();
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        Image::new(w, h, rgb.into_raw()).map_err(|e| {
            image::ImageError::Parameter(image::error::ParameterError::from_kind(
                image::error::ParameterErrorKind::Generic(e.to_string()),
            ))
        })
    }

    /// The image as PNG bytes.
    ///
    /// # Errors
    /// [`Error::Io`] (naming `"<memory>"`) if encoding fails.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.write_png(&mut std::io::Cursor::new(&mut bytes))
            .map_err(|source| Error::Io {
                path: "<memory>".into(),
                source,
            })?;
        Ok(bytes)
    }

    fn write_png<W: std::io::Write + std::io::Seek>(&self, out: &mut W) -> std::io::Result<()> {
        let buffer = image::RgbImage::from_raw(
            u32::try_from(self.width).map_err(std::io::Error::other)?,
            u32::try_from(self.height).map_err(std::io::Error::other)?,
            self.data.clone(),
        )
        .ok_or_else(|| std::io::Error::other("image buffer of the wrong size"))?;
        buffer
            .write_to(out, image::ImageFormat::Png)
            .map_err(std::io::Error::other)
    }

    /// Writes the image as a PNG file, replacing an existing one atomically: the new file is
    /// written and flushed to the disk beside it first, so a failure (a full disk) leaves the
    /// old file whole and no partial file behind.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        self.save_png(path.as_ref(), true)
    }

    /// As [`save`](Self::save), but never replaces a file: an existing one (even one that
    /// appears while writing) is an error and stays as it is.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file (`AlreadyExists` if it exists).
    pub fn save_new(&self, path: impl AsRef<Path>) -> Result<()> {
        self.save_png(path.as_ref(), false)
    }

    fn save_png(&self, path: &Path, replace: bool) -> Result<()> {
        let png = self.to_png()?;
        crate::files::write_atomic(path, replace, |w| w.write_all(&png))
    }
}

/// A grey inpainting mask: white (at least 128, i.e. `>= 0.5` after `/ 255`) is repainted,
/// black is kept, as diffusers' mask processor binarizes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    width: usize,
    height: usize,
    data: Vec<u8>,
}

impl Mask {
    /// A mask of `width x height` from its `[H, W]` grey bytes.
    ///
    /// # Errors
    /// [`Error::Shape`] if `data` does not hold `width * height` values or a side is 0.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if width == 0 || height == 0 || data.len() != width * height {
            return Err(Error::Shape {
                op: "Mask::new",
                expected: format!("{width} x {height} = {} bytes", width * height),
                found: format!("{} bytes", data.len()),
            });
        }
        Ok(Mask {
            width,
            height,
            data,
        })
    }

    /// The grey levels of an RGB image, as PIL's `convert("L")` computes them (ITU-R 601-2
    /// luma in 16-bit fixed point), which diffusers' mask processor applies.
    pub fn from_image(image: &Image) -> Self {
        let data = image
            .as_raw()
            .chunks_exact(3)
            .map(|p| {
                let l = u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471;
                ((l + 0x8000) >> 16) as u8
            })
            .collect();
        Mask {
            width: image.width(),
            height: image.height(),
            data,
        }
    }

    /// The width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// The `[H, W]` grey bytes.
    pub fn as_raw(&self) -> &[u8] {
        &self.data
    }

    /// Whether the pixel at column `x`, row `y` is repainted (false outside the mask).
    pub fn repaints(&self, x: usize, y: usize) -> bool {
        x < self.width && y < self.height && self.data[y * self.width + x] >= 128
    }

    /// The binarized mask at full size, `[H, W]`: 1 where repainted, else 0.
    pub fn binary(&self) -> Vec<f32> {
        self.data
            .iter()
            .map(|&v| if v >= 128 { 1.0 } else { 0.0 })
            .collect()
    }

    /// The binarized mask resized to `width x height` by nearest neighbour, as PyTorch's
    /// `interpolate(mode="nearest")` (source index `floor(i * in / out)`), which diffusers
    /// uses to bring the mask to the latents' size.
    pub fn binary_nearest(&self, width: usize, height: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(width * height);
        for y in 0..height {
            let sy = (y * self.height / height.max(1)).min(self.height - 1);
            for x in 0..width {
                let sx = (x * self.width / width.max(1)).min(self.width - 1);
                out.push(if self.data[sy * self.width + sx] >= 128 {
                    1.0
                } else {
                    0.0
                });
            }
        }
        out
    }
}

/// How far outpainting extends each side of the canvas, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Margins {
    /// Columns added on the left.
    pub left: usize,
    /// Rows added at the top.
    pub top: usize,
    /// Columns added on the right.
    pub right: usize,
    /// Rows added at the bottom.
    pub bottom: usize,
}

impl Margins {
    /// The same margin on every side.
    pub fn uniform(m: usize) -> Self {
        Margins {
            left: m,
            top: m,
            right: m,
            bottom: m,
        }
    }
}

/// The canvas of outpainting: `image` in the middle of a larger picture whose new border
/// repeats the image's edge pixels (a neutral start for the VAE, which sees the border when
/// the UNet blends the known region), and the mask that repaints exactly that border.
///
/// # Errors
/// [`Error::Config`] if every margin is 0 (nothing to outpaint).
pub fn outpaint_canvas(image: &Image, margins: Margins) -> Result<(Image, Mask)> {
    if margins == Margins::default() {
        return Err(Error::Config {
            what: "outpaint margins".into(),
            message: "every margin is 0: there is nothing to fill".into(),
        });
    }
    let overflow = || Error::Config {
        what: "outpaint margins".into(),
        message: format!("{margins:?} overflow the canvas size"),
    };
    let width = image
        .width()
        .checked_add(margins.left)
        .and_then(|w| w.checked_add(margins.right))
        .ok_or_else(overflow)?;
    let height = image
        .height()
        .checked_add(margins.top)
        .and_then(|h| h.checked_add(margins.bottom))
        .ok_or_else(overflow)?;
    width
        .checked_mul(height)
        .and_then(|p| p.checked_mul(3))
        .ok_or_else(overflow)?;
    let mut data = Vec::with_capacity(width * height * 3);
    let mut mask = Vec::with_capacity(width * height);
    for y in 0..height {
        let sy = y.saturating_sub(margins.top).min(image.height() - 1);
        let inside_y = y >= margins.top && y < margins.top + image.height();
        for x in 0..width {
            let sx = x.saturating_sub(margins.left).min(image.width() - 1);
            let inside = inside_y && x >= margins.left && x < margins.left + image.width();
            let i = (sy * image.width() + sx) * 3;
            data.extend_from_slice(&image.as_raw()[i..i + 3]);
            mask.push(if inside { 0 } else { 255 });
        }
    }
    Ok((
        Image::new(width, height, data)?,
        Mask::new(width, height, mask)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_and_unit_conversions_round_trip() {
        let img = Image::new(2, 1, vec![0, 128, 255, 10, 20, 30]).unwrap();
        let signed = img.to_chw_signed();
        assert_eq!(signed[0], -1.0);
        assert_eq!(signed[2 * 2], 1.0);
        let unit: Vec<f32> = signed.iter().map(|v| v / 2.0 + 0.5).collect();
        assert_eq!(Image::from_chw_unit(&unit, 2, 1).unwrap(), img);
    }

    #[test]
    fn masks_binarize_at_half_and_resize_nearest() {
        let m = Mask::new(4, 2, vec![0, 127, 128, 255, 255, 0, 0, 0]).unwrap();
        assert_eq!(m.binary(), [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
        assert_eq!(m.binary_nearest(2, 1), [0.0, 1.0]);
        let grey = Mask::from_image(&Image::new(1, 1, vec![255, 255, 255]).unwrap());
        assert_eq!(grey.as_raw(), [255]);
    }

    #[test]
    fn outpaint_canvas_repeats_edges_and_masks_the_border() {
        let img = Image::new(1, 1, vec![1, 2, 3]).unwrap();
        let margins = Margins {
            left: 1,
            top: 0,
            right: 2,
            bottom: 1,
        };
        let (canvas, mask) = outpaint_canvas(&img, margins).unwrap();
        assert_eq!((canvas.width(), canvas.height()), (4, 2));
        assert!(canvas.as_raw().chunks(3).all(|p| p == [1, 2, 3]));
        assert_eq!(mask.as_raw(), [255, 0, 255, 255, 255, 255, 255, 255]);
        assert!(outpaint_canvas(&img, Margins::default()).is_err());
    }
}

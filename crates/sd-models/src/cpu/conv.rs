//! 2-D convolution for the CPU backend. With AVX-512 and whole blocks of 32 input channels
//! (every 3x3 convolution of Stable Diffusion), a direct convolution on a channel-blocked
//! copy of the input ([`super::packed::blocked`]); otherwise an implicit GEMM per image (the
//! weights, packed once, times the unfolded input, packed tile by tile straight from the
//! image: no im2col buffer).

use super::math::dispatch;
use super::packed::blocked::{BAND_BYTES, Direct, convolve, runs_direct};
use super::packed::pack::{ConvGeom, pack_conv_b};
use super::packed::{ASource, BSource, Product, Start, run};
use super::{CpuBackend, CpuTensor, PackLayout, PackedData, contiguous, threads};
use crate::backend::{Conv2dParams, ConvOps};
use crate::error::{Error, Result};

impl ConvOps for CpuBackend {
    fn prepare_conv_weight(&self, weight: CpuTensor) -> Result<CpuTensor> {
        if weight.shape().len() != 4 {
            return Err(Error::Shape {
                op: "prepare_conv_weight",
                expected: "[O, C, kh, kw]".into(),
                found: format!("{:?}", weight.shape()),
            });
        }
        let s = weight.shape();
        let layout = if runs_direct(self.isa(), s[1], s[2], s[3]) {
            PackLayout::Taps {
                nr: self.isa().nr(),
            }
        } else {
            PackLayout::Rows {
                mr: self.isa().mr(),
            }
        };
        let packed = weight.prepacked(layout, self.precision());
        weight.discard();
        packed
    }

    fn conv2d(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: Option<&CpuTensor>,
        params: Conv2dParams,
    ) -> Result<CpuTensor> {
        self.conv(x, weight, bias, params, 1)
    }

    fn upsample_nearest2x_conv2d(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: Option<&CpuTensor>,
        params: Conv2dParams,
    ) -> Result<CpuTensor> {
        self.conv(x, weight, bias, params, 2)
    }
}

impl CpuBackend {
    /// A convolution of `x` upsampled `up` times by nearest neighbour (1: not upsampled).
    fn conv(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: Option<&CpuTensor>,
        params: Conv2dParams,
        up: usize,
    ) -> Result<CpuTensor> {
        let (sx, sw) = (x.shape().to_vec(), weight.shape().to_vec());
        let shape_ok = sx.len() == 4 && sw.len() == 4 && sx[1] == sw[1];
        let out_size = if shape_ok {
            params.output_size(sx[2] * up, sx[3] * up, sw[2], sw[3])
        } else {
            None
        };
        let Some((ho, wo)) = out_size else {
            return Err(Error::Shape {
                op: "conv2d",
                expected: format!(
                    "x [N, C, H, W] and weight [O, C, kh, kw] giving a non-empty output with {params:?}"
                ),
                found: format!("x {sx:?}, weight {sw:?}"),
            });
        };
        let (n, c, h, w) = (sx[0], sx[1], sx[2], sx[3]);
        let (o, kh, kw) = (sw[0], sw[2], sw[3]);
        if let Some(b) = bias
            && b.shape() != [o]
        {
            return Err(Error::Shape {
                op: "conv2d",
                expected: format!("bias [{o}]"),
                found: format!("{:?}", b.shape()),
            });
        }
        let xa = x.to_f32_array();
        let xs = contiguous(&xa, "conv2d")?;
        let bias = bias.map(CpuTensor::to_f32_array);
        let bias = match &bias {
            Some(b) => Some(contiguous(b, "conv2d")?),
            None => None,
        };
        let pixels = ho * wo;
        let isa = self.isa();
        let precision = self.precision();
        // The whole batch's geometry; the implicit GEMM's products take one image each but
        // for small images.
        let batch = ConvGeom {
            c,
            h,
            w,
            up,
            kh,
            kw,
            params,
            ho,
            wo,
            images: n,
        };
        if runs_direct(isa, c, kh, kw) {
            let packed = weight.packed_taps(isa, precision, o, batch.k())?;
            // Every value is written by the bands' transpositions.
            let mut out = super::pool::take(n * o * pixels);
            // SAFETY: the weight was packed for `isa` (which the backend checked) in
            // `precision`, for this geometry's K; the bias holds `o` values (checked above).
            unsafe {
                convolve(
                    isa,
                    &Direct {
                        x: xs,
                        geom: batch,
                        o,
                        weight: packed.panels(),
                        bias,
                        precision,
                    },
                    BAND_BYTES,
                    &mut out,
                );
            }
            return CpuTensor::from_vec(&[n, o, ho, wo], out);
        }
        // Images whose pixels fill less than two column tiles go through one product for
        // the whole batch: the tiles are full and each weight, read from memory once, meets
        // every image. Measured on the UNet's 4x4 layers (1280 channels, batch 2): 15-20%
        // faster; on its 8x8 layers it was 5-10% slower, so larger images keep a product
        // each.
        let together = n > 1 && pixels < 2 * isa.nr();
        let geom = ConvGeom {
            images: if together { n } else { 1 },
            ..batch
        };
        let packed = weight.packed_rows(isa, precision, o, geom.k())?;
        // Every value is written by the product.
        let mut out = super::pool::take(n * o * pixels);
        let plane = c * h * w;
        let product = |b| Product {
            m: o,
            n: geom.n(),
            k: geom.k(),
            a: ASource::Packed(packed.panels(), geom.k()),
            b: BSource::Conv(b, geom),
            start: bias.map_or(Start::Zero, Start::RowBias),
            precision,
        };
        if together {
            // The unfolded input is a few column tiles: packed once here, not by every task
            // (the tasks split the rows, and with 4x4 images packing cost as much as the
            // products).
            let (k, cols, nr) = (geom.k(), geom.n(), isa.nr());
            let mut unfolded = vec![0.0; cols.div_ceil(nr) * k * nr];
            for (strip, dst) in unfolded.chunks_exact_mut(k * nr).enumerate() {
                let j = strip * nr;
                dispatch!(
                    isa,
                    pack_conv_b(xs, &geom, 0, k, j, nr.min(cols - j), nr, dst)
                );
            }
            let unfolded = PackedData::in_precision(unfolded, k, nr, precision);
            let p = Product {
                b: BSource::Packed(unfolded.panels()),
                ..product(xs)
            };
            // C is `[o, n * pixels]`, then each image's columns move to their place.
            let mut c_all = super::pool::take(n * o * pixels);
            // SAFETY: the product writes `[o, n * pixels]` into `c_all`; the weights were
            // packed for `isa`, which the backend checked is supported, and the input in
            // its precision for its `nr`; the bias holds `o` values (checked above).
            unsafe { run(isa, &[p], &[c_all.as_mut_ptr()], n * pixels, threads()) };
            for (img, dst) in out.chunks_exact_mut(o * pixels).enumerate() {
                for (row, d) in dst.chunks_exact_mut(pixels).enumerate() {
                    let at = (row * n + img) * pixels;
                    d.copy_from_slice(&c_all[at..at + pixels]);
                }
            }
            super::pool::give(c_all);
        } else {
            let products: Vec<Product<'_>> = (0..n)
                .map(|img| product(&xs[img * plane..(img + 1) * plane]))
                .collect();
            let outputs: Vec<*mut f32> = out
                .chunks_mut(o * pixels)
                .map(<[f32]>::as_mut_ptr)
                .collect();
            // SAFETY: each product writes its own image's `[o, ho * wo]` block of `out`; the
            // weights were packed for `isa`, which the backend checked is supported; the
            // input slices hold `[c, h, w]` images and the bias `o` values (checked above).
            unsafe { run(isa, &products, &outputs, pixels, threads()) };
        }
        CpuTensor::from_vec(&[n, o, ho, wo], out)
    }
}

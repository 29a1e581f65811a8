//! 2-D convolution for the CPU backend: one GEMM per image over an unfolded input (im2col),
//! or a plain GEMM for 1x1 stride-1 kernels.

use super::gemm::{Layout, sgemm, threads};
use super::{CpuBackend, CpuTensor, contiguous};
use crate::backend::{Conv2dParams, ConvOps};
use crate::error::{Error, Result};

/// Unfolds one image `[C, H, W]` into `[C * kh * kw, Ho * Wo]` columns.
#[allow(clippy::too_many_arguments)]
fn im2col(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    p: Conv2dParams,
    ho: usize,
    wo: usize,
    col: &mut [f32],
) {
    let (sh, sw) = p.stride;
    let (ph, pw) = p.padding;
    for ci in 0..c {
        for ki in 0..kh {
            for kj in 0..kw {
                let row = ((ci * kh + ki) * kw + kj) * ho * wo;
                for oy in 0..ho {
                    let iy = (oy * sh + ki) as isize - ph as isize;
                    let dst = &mut col[row + oy * wo..row + (oy + 1) * wo];
                    if iy < 0 || iy >= h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &x[(ci * h + iy as usize) * w..(ci * h + iy as usize + 1) * w];
                    for (ox, d) in dst.iter_mut().enumerate() {
                        let ix = (ox * sw + kj) as isize - pw as isize;
                        *d = if ix < 0 || ix >= w as isize {
                            0.0
                        } else {
                            src[ix as usize]
                        };
                    }
                }
            }
        }
    }
}

impl ConvOps for CpuBackend {
    fn conv2d(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: Option<&CpuTensor>,
        params: Conv2dParams,
    ) -> Result<CpuTensor> {
        let (sx, sw) = (x.shape().to_vec(), weight.shape().to_vec());
        let shape_ok = sx.len() == 4 && sw.len() == 4 && sx[1] == sw[1];
        let out_size = if shape_ok {
            params.output_size(sx[2], sx[3], sw[2], sw[3])
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
        let (xa, wa) = (x.to_f32_array(), weight.to_f32_array());
        let (xs, ws) = (contiguous(&xa, "conv2d")?, contiguous(&wa, "conv2d")?);
        let bias = bias.map(CpuTensor::to_f32_array);
        let bias = match &bias {
            Some(b) => Some(contiguous(b, "conv2d")?),
            None => None,
        };
        let k = c * kh * kw;
        let direct = kh == 1 && kw == 1 && params == Conv2dParams::new(1, 0);
        let mut col = if direct {
            Vec::new()
        } else {
            vec![0.0_f32; k * ho * wo]
        };
        let mut out = vec![0.0_f32; n * o * ho * wo];
        for (img, dst) in out.chunks_mut(o * ho * wo).enumerate() {
            let src = &xs[img * c * h * w..(img + 1) * c * h * w];
            if let Some(b) = bias {
                for (row, &bv) in dst.chunks_mut(ho * wo).zip(b) {
                    row.fill(bv);
                }
            }
            let cols: &[f32] = if direct {
                src
            } else {
                im2col(src, c, h, w, kh, kw, params, ho, wo, &mut col);
                &col
            };
            sgemm(
                o,
                ho * wo,
                k,
                ws,
                Layout::RowMajor,
                cols,
                Layout::RowMajor,
                dst,
                bias.is_some(),
                threads(),
            )?;
        }
        CpuTensor::from_vec(&[n, o, ho, wo], out)
    }
}

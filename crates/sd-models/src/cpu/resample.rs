//! Nearest-neighbour upsampling for the CPU backend.

use super::{CpuBackend, CpuTensor, contiguous, par_chunks_mut};
use crate::backend::{ResampleOps, nearest_index};
use crate::error::{Error, Result};

impl ResampleOps for CpuBackend {
    fn upsample_nearest2x(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let s = x.shape().to_vec();
        if s.len() != 4 {
            return Err(Error::Shape {
                op: "upsample_nearest2x",
                expected: "[N, C, H, W]".into(),
                found: format!("{s:?}"),
            });
        }
        let (h, w) = (s[2], s[3]);
        let a = x.to_f32_array();
        let xs = contiguous(&a, "upsample_nearest2x")?;
        let mut out = super::pool::take(xs.len() * 4);
        par_chunks_mut(&mut out, 4 * h * w, |plane, dst| {
            let src = &xs[plane * h * w..(plane + 1) * h * w];
            for y in 0..2 * h {
                let row = &src[(y / 2) * w..(y / 2 + 1) * w];
                for (x, d) in dst[y * 2 * w..(y + 1) * 2 * w].iter_mut().enumerate() {
                    *d = row[x / 2];
                }
            }
        });
        CpuTensor::from_vec(&[s[0], s[1], 2 * h, 2 * w], out)
    }

    fn upsample_nearest(&self, x: &CpuTensor, size: (usize, usize)) -> Result<CpuTensor> {
        let s = x.shape().to_vec();
        let (h, w) = match s[..] {
            [_, _, h, w] if h > 0 && w > 0 && size.0 > 0 && size.1 > 0 => (h, w),
            _ => {
                return Err(Error::Shape {
                    op: "upsample_nearest",
                    expected: format!("a non-empty [N, C, H, W] resized to a non-empty {size:?}"),
                    found: format!("{s:?}"),
                });
            }
        };
        let (ho, wo) = size;
        let a = x.to_f32_array();
        let xs = contiguous(&a, "upsample_nearest")?;
        let columns: Vec<usize> = (0..wo).map(|j| nearest_index(j, w, wo)).collect();
        let mut out = super::pool::take(s[0] * s[1] * ho * wo);
        par_chunks_mut(&mut out, ho * wo, |plane, dst| {
            let src = &xs[plane * h * w..(plane + 1) * h * w];
            for (y, dst_row) in dst.chunks_exact_mut(wo).enumerate() {
                let r = nearest_index(y, h, ho);
                let row = &src[r * w..(r + 1) * w];
                for (d, &c) in dst_row.iter_mut().zip(&columns) {
                    *d = row[c];
                }
            }
        });
        CpuTensor::from_vec(&[s[0], s[1], ho, wo], out)
    }
}

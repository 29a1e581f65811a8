//! Nearest-neighbour upsampling for the CPU backend.

use super::{CpuBackend, CpuTensor, contiguous, par_chunks_mut};
use crate::backend::ResampleOps;
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
}

//! Nearest-neighbour upsampling for the CUDA backend (kernels in `kernels/resample.cu`).
//! Mirrors sd-models' `cpu/resample.rs`.

use sd_models::backend::ResampleOps;
use sd_models::{Error, Result};

use crate::data::u32_arg;
use crate::device::{CudaBackend, float, launch};
use crate::kernels::Kernel;
use crate::tensor::CudaTensor;

impl ResampleOps for CudaBackend {
    fn upsample_nearest2x(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let s = x.shape().to_vec();
        if s.len() != 4 {
            return Err(Error::Shape {
                op: "upsample_nearest2x",
                expected: "[N, C, H, W]".into(),
                found: format!("{s:?}"),
            });
        }
        let out = self.alloc(&[s[0], s[1], 2 * s[2], 2 * s[3]], x.dtype)?;
        if out.is_empty() {
            return Ok(out);
        }
        let bits = float(x.dtype)?.bits();
        let (o, i) = (out.ptr(), x.ptr());
        let (planes, h, w) = (u32_arg(s[0] * s[1])?, u32_arg(s[2])?, u32_arg(s[3])?);
        // upsample_nearest2x_{bits}(T* out, const T* in, u32 planes, u32 h, u32 w)
        launch!(
            self,
            Kernel::UpsampleNearest2x(bits),
            self.cfg_1d(out.len()),
            o,
            i,
            planes,
            h,
            w
        )?;
        Ok(out)
    }
}

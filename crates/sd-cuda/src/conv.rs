//! 2-D convolution for the CUDA backend: an implicit GEMM (kernels in `kernels/conv.cu`),
//! on tensor cores for f16/bf16, with no unfolded input in memory. Mirrors sd-models'
//! `cpu/conv.rs`, whose shape rules and errors it repeats.
//!
//! When the output alone gives too few blocks to fill the device (16 x 16 and 8 x 8 images
//! at 1280 channels), the reduction over `K = C * kh * kw` is split across blocks into an f32
//! workspace that `conv_finalize` sums in a fixed order, so results are deterministic.

use cudarc::driver::{DeviceRepr, LaunchConfig};
use sd_models::backend::{Conv2dParams, ConvOps};
use sd_models::{Error, Result};

use crate::data::u32_arg;
use crate::device::{CudaBackend, MAX_ELEMENTS, float, launch, promote};
use crate::kernels::{Kernel, Taps, geometry};
use crate::tensor::CudaTensor;

/// `ConvParams` of conv.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ConvParams {
    pub(crate) n: u32,
    pub(crate) c: u32,
    pub(crate) h: u32,
    pub(crate) w: u32,
    pub(crate) o: u32,
    pub(crate) kh: u32,
    pub(crate) kw: u32,
    pub(crate) ho: u32,
    pub(crate) wo: u32,
    pub(crate) sh: u32,
    pub(crate) sw: u32,
    pub(crate) ph: u32,
    pub(crate) pw: u32,
    pub(crate) k: u32,
    pub(crate) p: u32,
    pub(crate) k_tiles_per_split: u32,
    pub(crate) has_bias: u32,
}

// SAFETY: plain `#[repr(C)]` u32 fields, the layout of the CUDA struct (checked by the
// kernel-compilation test).
unsafe impl DeviceRepr for ConvParams {}

/// How a GEMM of `m x p x k` is tiled: the grid and the split of K.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvPlan {
    /// Blocks along the pixels (x) and the output channels (y).
    pub(crate) grid: (u32, u32),
    /// Number of K splits (grid z).
    pub(crate) splits: u32,
    /// K-tiles per split.
    pub(crate) k_tiles_per_split: u32,
}

/// Tiles `M x P` by `(bm, bn)` and splits K (in tiles of `bk`) when the tiles alone would
/// leave half the SMs idle, aiming at two blocks per SM: each split keeps at least 4
/// K-tiles, at most 16 splits, and the workspace (`splits * M * P` floats) stays within the
/// element limit.
pub(crate) fn plan(
    m: usize,
    p: usize,
    k: usize,
    tile: (usize, usize, usize),
    sms: usize,
) -> ConvPlan {
    let (bm, bn, bk) = tile;
    let (gx, gy) = (p.div_ceil(bn), m.div_ceil(bm));
    let blocks = gx * gy;
    let k_tiles = k.div_ceil(bk).max(1);
    let target = 2 * sms;
    let mut splits = 1;
    if 2 * blocks <= sms && k_tiles >= 8 {
        splits = target.div_ceil(blocks).min(k_tiles / 4).clamp(1, 16);
        while splits > 1 && splits * m * p > MAX_ELEMENTS {
            splits -= 1;
        }
    }
    let per = k_tiles.div_ceil(splits);
    // Every split non-empty.
    let splits = k_tiles.div_ceil(per);
    ConvPlan {
        grid: (
            u32::try_from(gx).unwrap_or(u32::MAX),
            u32::try_from(gy).unwrap_or(u32::MAX),
        ),
        splits: u32::try_from(splits).unwrap_or(1),
        k_tiles_per_split: u32::try_from(per).unwrap_or(u32::MAX),
    }
}

impl ConvOps for CudaBackend {
    fn conv2d(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
        params: Conv2dParams,
    ) -> Result<CudaTensor> {
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
        let dtype = promote(x.dtype, weight.dtype);
        let ty = float(dtype)?;
        let (x, weight) = (self.to_dtype(x, dtype)?, self.to_dtype(weight, dtype)?);
        let bias = match bias {
            Some(b) => Some(self.to_dtype(b, dtype)?),
            None => None,
        };
        let out = self.alloc(&[n, o, ho, wo], dtype)?;
        let (k, p) = (c * kh * kw, n * ho * wo);
        if out.is_empty() {
            return Ok(out);
        }
        if k == 0 {
            // No input channels: the output is the bias (or zero).
            self.zero(&out)?;
            return match &bias {
                Some(b) => Ok(self.binary_add_channel_bias(&out, b)?),
                None => Ok(out),
            };
        }
        let taps = Taps::of(kh, kw);
        let (kernel, tile, threads) = match ty.half() {
            Some(half) => (
                Kernel::ConvTensorCore { dtype: half, taps },
                geometry::CONV_TC_TILE,
                geometry::CONV_TC_THREADS,
            ),
            None => (
                Kernel::ConvF32(taps),
                geometry::CONV_F32_TILE,
                geometry::CONV_F32_THREADS,
            ),
        };
        let pl = plan(o, p, k, tile, self.sm_count() as usize);
        let cp = ConvParams {
            n: u32_arg(n)?,
            c: u32_arg(c)?,
            h: u32_arg(h)?,
            w: u32_arg(w)?,
            o: u32_arg(o)?,
            kh: u32_arg(kh)?,
            kw: u32_arg(kw)?,
            ho: u32_arg(ho)?,
            wo: u32_arg(wo)?,
            sh: u32_arg(params.stride.0)?,
            sw: u32_arg(params.stride.1)?,
            ph: u32_arg(params.padding.0)?,
            pw: u32_arg(params.padding.1)?,
            k: u32_arg(k)?,
            p: u32_arg(p)?,
            k_tiles_per_split: pl.k_tiles_per_split,
            has_bias: u32::from(bias.is_some()),
        };
        if pl.grid.1 > 65_535 {
            return Err(Error::Unsupported(format!(
                "conv2d with {o} output channels"
            )));
        }
        let workspace = if pl.splits > 1 {
            Some(self.scratch_f32(pl.splits as usize * o * p)?)
        } else {
            None
        };
        let (op, xp, wp) = (out.ptr(), x.ptr(), weight.ptr());
        let wsp = workspace.as_ref().map_or(0, CudaTensor::ptr);
        let bp = bias.as_ref().map_or(0, CudaTensor::ptr);
        let cfg = LaunchConfig {
            grid_dim: (pl.grid.0, pl.grid.1, pl.splits),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // conv_tc_{t}_{taps} / conv_f32_{taps}(T* out, float* ws, const T* x, const T* w,
        //                                       const T* bias, ConvParams p)
        launch!(self, kernel, cfg, op, wsp, xp, wp, bp, cp)?;
        if pl.splits > 1 {
            let splits = pl.splits;
            // conv_finalize_{t}(T* out, const float* ws, const T* bias, ConvParams p, u32 splits)
            launch!(
                self,
                Kernel::ConvFinalize(ty),
                self.cfg_1d(out.len()),
                op,
                wsp,
                bp,
                cp,
                splits
            )?;
        }
        Ok(out)
    }
}

impl CudaBackend {
    /// `out + bias` with `bias [O]` broadcast over `[N, O, H, W]`.
    fn binary_add_channel_bias(&self, out: &CudaTensor, bias: &CudaTensor) -> Result<CudaTensor> {
        use sd_models::backend::{DataOps, ElementwiseOps};
        let b = self.reshape(bias, &[1, bias.len(), 1, 1])?;
        self.add(out, &b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_layout() {
        assert_eq!(std::mem::size_of::<ConvParams>(), 17 * 4);
    }

    #[test]
    fn plans_fill_an_h100() {
        let sms = 132;
        // 64x64x320 -> 320, 3x3, batch 1: 3 x 32 tiles, no split.
        let p = plan(320, 64 * 64, 320 * 9, geometry::CONV_TC_TILE, sms);
        assert_eq!((p.grid, p.splits), ((32, 3), 1));
        // 8x8x1280 -> 1280: 10 tiles, K = 11520 (360 K-tiles): split.
        let p = plan(1280, 64, 1280 * 9, geometry::CONV_TC_TILE, sms);
        assert_eq!(p.grid, (1, 10));
        assert!(p.splits > 1 && p.splits <= 16);
        assert!(p.splits * p.k_tiles_per_split >= 360);
        assert!(
            (p.splits - 1) * p.k_tiles_per_split < 360,
            "every split has work"
        );
        // Few K-tiles: never split.
        let p = plan(4, 64, 4 * 9, geometry::CONV_TC_TILE, sms);
        assert_eq!(p.splits, 1);
    }

    #[test]
    fn plan_covers_k_exactly() {
        for k in [1usize, 31, 32, 33, 288, 2880, 11_520, 100_000] {
            for (m, p) in [(4usize, 64usize), (1280, 64), (320, 4096)] {
                let pl = plan(m, p, k, geometry::CONV_TC_TILE, 132);
                let k_tiles = k.div_ceil(32) as u32;
                assert!(pl.splits >= 1);
                assert!(pl.splits * pl.k_tiles_per_split >= k_tiles);
                assert!((pl.splits - 1) * pl.k_tiles_per_split < k_tiles);
            }
        }
    }
}

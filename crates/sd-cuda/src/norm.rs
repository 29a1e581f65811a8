//! Normalisation layers for the CUDA backend (kernels in `kernels/norm.cu`): group norm,
//! optionally fused with SiLU, and layer norm. Mirrors sd-models' `cpu/norm.rs`, whose shape
//! rules and errors it repeats.

use cudarc::driver::LaunchConfig;
use sd_models::backend::NormOps;
use sd_models::{Error, Result};

use crate::activation::warp_per_row;
use crate::data::u32_arg;
use crate::device::{CudaBackend, float, launch};
use crate::kernels::{Kernel, geometry};
use crate::tensor::CudaTensor;

/// The most chunks a group is split into (the merge loop of `group_norm_apply`).
const MAX_CHUNKS: usize = 64;

/// Splits groups of `group_len` values into chunks so that about four blocks per SM run, each
/// chunk at least 1024 values: returns (chunk length, chunks), every chunk non-empty.
pub(crate) fn group_chunks(group_len: usize, groups_total: usize, sms: usize) -> (usize, usize) {
    let wanted = (4 * sms).div_ceil(groups_total.max(1));
    let by_size = group_len.div_ceil(1024);
    let chunks = wanted.min(by_size).clamp(1, MAX_CHUNKS);
    let chunk_len = group_len.div_ceil(chunks).max(1);
    (chunk_len, group_len.div_ceil(chunk_len).max(1))
}

fn check_params(op: &'static str, gamma: &CudaTensor, beta: &CudaTensor, c: usize) -> Result<()> {
    if gamma.shape() != [c] || beta.shape() != [c] {
        return Err(Error::Shape {
            op,
            expected: format!("gamma and beta [{c}]"),
            found: format!("{:?} and {:?}", gamma.shape(), beta.shape()),
        });
    }
    Ok(())
}

impl CudaBackend {
    fn group_norm_impl(
        &self,
        x: &CudaTensor,
        groups: usize,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
        silu: bool,
    ) -> Result<CudaTensor> {
        let shape = x.shape().to_vec();
        if shape.len() < 2 || groups == 0 || !shape[1].is_multiple_of(groups) {
            return Err(Error::Shape {
                op: "group_norm",
                expected: format!("[N, C, ...] with C a multiple of {groups}"),
                found: format!("{shape:?}"),
            });
        }
        let (n, c) = (shape[0], shape[1]);
        check_params("group_norm", gamma, beta, c)?;
        let t = float(x.dtype)?;
        let out = self.alloc(&shape, x.dtype)?;
        if out.is_empty() {
            return Ok(out);
        }
        let (gamma, beta) = (
            self.to_dtype(gamma, x.dtype)?,
            self.to_dtype(beta, x.dtype)?,
        );
        let spatial: usize = shape[2..].iter().product();
        let cpg = c / groups;
        let group_len = cpg * spatial;
        let groups_total = n * groups;
        if groups_total > 65_535 {
            return Err(Error::Unsupported(format!(
                "group_norm over {groups_total} groups (at most 65535)"
            )));
        }
        let (chunk_len, chunks) = group_chunks(group_len, groups_total, self.sm_count() as usize);
        let partial = self.scratch_f32(groups_total * chunks * 3)?;
        let cfg = LaunchConfig {
            grid_dim: (u32_arg(chunks)?, u32_arg(groups_total)?, 1),
            block_dim: (geometry::NORM_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (pp, xp, op, gp, bp) = (partial.ptr(), x.ptr(), out.ptr(), gamma.ptr(), beta.ptr());
        let (glen, clen, nchunks) = (u32_arg(group_len)?, u32_arg(chunk_len)?, u32_arg(chunks)?);
        let (g32, cpg32, sp32, silu32) = (
            u32_arg(groups)?,
            u32_arg(cpg)?,
            u32_arg(spatial)?,
            u32::from(silu),
        );
        // group_norm_stats_{t}(float* partial, const T* x, u32 group_len, u32 chunk_len,
        //                      u32 chunks)
        launch!(
            self,
            Kernel::GroupNormStats(t),
            cfg,
            pp,
            xp,
            glen,
            clen,
            nchunks
        )?;
        // group_norm_apply_{t}(T* out, const T* x, const float* partial, const T* gamma,
        //                      const T* beta, u32 groups, u32 channels_per_group, u32 spatial,
        //                      u32 chunk_len, u32 chunks, float eps, u32 silu)
        launch!(
            self,
            Kernel::GroupNormApply(t),
            cfg,
            op,
            xp,
            pp,
            gp,
            bp,
            g32,
            cpg32,
            sp32,
            clen,
            nchunks,
            eps,
            silu32
        )?;
        Ok(out)
    }
}

impl NormOps for CudaBackend {
    fn group_norm(
        &self,
        x: &CudaTensor,
        groups: usize,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        self.group_norm_impl(x, groups, gamma, beta, eps, false)
    }

    fn group_norm_silu(
        &self,
        x: &CudaTensor,
        groups: usize,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        self.group_norm_impl(x, groups, gamma, beta, eps, true)
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        let shape = x.shape().to_vec();
        let c = shape.last().copied().unwrap_or(0);
        check_params("layer_norm", gamma, beta, c)?;
        let t = float(x.dtype)?;
        if c == 0 || x.is_empty() {
            // Nothing to normalise (a rank-0 tensor keeps its value, as on the CPU).
            return Ok(x.clone());
        }
        let out = self.alloc(&shape, x.dtype)?;
        let (gamma, beta) = (
            self.to_dtype(gamma, x.dtype)?,
            self.to_dtype(beta, x.dtype)?,
        );
        let rows = out.len() / c;
        let (op, xp, gp, bp) = (out.ptr(), x.ptr(), gamma.ptr(), beta.ptr());
        let (r, c32) = (u32_arg(rows)?, u32_arg(c)?);
        // layer_norm_{t}(T* out, const T* x, const T* gamma, const T* beta, u32 rows,
        //                u32 cols, float eps)
        launch!(
            self,
            Kernel::LayerNorm(t),
            warp_per_row(rows)?,
            op,
            xp,
            gp,
            bp,
            r,
            c32,
            eps
        )?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::group_chunks;

    #[test]
    fn chunks_cover_each_group() {
        for (len, groups) in [
            (40_960usize, 32usize),
            (2560, 32),
            (1, 1),
            (1 << 20, 32),
            (100, 64),
        ] {
            let (cl, ch) = group_chunks(len, groups, 132);
            assert!((1..=64).contains(&ch));
            assert!(cl * ch >= len, "covered");
            assert!(cl * (ch - 1) < len, "no empty chunk");
        }
        // SD's 64x64x320 group: 10 channels x 4096 values, 32 groups: split up.
        assert!(group_chunks(40_960, 32, 132).1 > 1);
    }
}

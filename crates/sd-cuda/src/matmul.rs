//! Matrix products for the CUDA backend, on cuBLAS (`cublasGemmStridedBatchedEx`, f32
//! accumulation for every storage type, tensor cores for f16/bf16). Mirrors sd-models'
//! `cpu/matmul.rs`.
//!
//! cuBLAS is column-major and our tensors row-major; a row-major `X [r, c]` is the
//! column-major `X^T`, so `C = A B` is computed as `C^T = B^T A^T` with the operands
//! swapped and no copies.

use std::ffi::{c_int, c_longlong, c_void};

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use sd_models::backend::MatmulOps;
use sd_models::{Error, Result};

use crate::device::{CudaBackend, float, promote};
use crate::error::CudaError;
use crate::kernels::Float;
use crate::tensor::CudaTensor;

fn c_int_arg(v: usize) -> std::result::Result<c_int, CudaError> {
    c_int::try_from(v).map_err(|_| CudaError::Unsupported(format!("GEMM size {v} past i32")))
}

fn c_long_arg(v: usize) -> std::result::Result<c_longlong, CudaError> {
    c_longlong::try_from(v).map_err(|_| CudaError::Unsupported(format!("GEMM stride {v} past i64")))
}

/// One GEMM, row-major: for each of `batch` problems, `C [m, n] = A [m, k] B'` where `B'` is
/// `B [k, n]`, or `B [n, k]` transposed when `b_transposed`. Strides are in elements between
/// consecutive problems (0: the operand is shared).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gemm {
    pub(crate) dtype: Float,
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) batch: usize,
    pub(crate) a: u64,
    pub(crate) stride_a: usize,
    pub(crate) b: u64,
    pub(crate) b_transposed: bool,
    pub(crate) stride_b: usize,
    pub(crate) c: u64,
    pub(crate) stride_c: usize,
}

impl CudaBackend {
    /// Runs `g` on cuBLAS. The pointers must address buffers holding the operands.
    pub(crate) fn gemm(&self, g: Gemm) -> std::result::Result<(), CudaError> {
        if g.m == 0 || g.n == 0 || g.k == 0 || g.batch == 0 {
            return Err(CudaError::Unsupported("an empty GEMM".into()));
        }
        let ty = match g.dtype {
            Float::F32 => cudaDataType::CUDA_R_32F,
            Float::F16 => cudaDataType::CUDA_R_16F,
            Float::BF16 => cudaDataType::CUDA_R_16BF,
        };
        let (alpha, beta) = (1.0_f32, 0.0_f32);
        // Column-major: C^T [n, m] = B'^T [n, k] A^T [k, m].
        let (trans_b, ld_b) = if g.b_transposed {
            (cublasOperation_t::CUBLAS_OP_T, g.k)
        } else {
            (cublasOperation_t::CUBLAS_OP_N, g.n)
        };
        let (m, n, k) = (c_int_arg(g.n)?, c_int_arg(g.m)?, c_int_arg(g.k)?);
        let (lda, ldb, ldc) = (c_int_arg(ld_b)?, c_int_arg(g.k)?, c_int_arg(g.n)?);
        let (sa, sb, sc) = (
            c_long_arg(g.stride_b)?,
            c_long_arg(g.stride_a)?,
            c_long_arg(g.stride_c)?,
        );
        let batch = c_int_arg(g.batch)?;
        self.with_blas(|blas| {
            // SAFETY: the caller passes pointers to live buffers of the sizes the GEMM reads
            // and writes; alpha and beta are host f32 (CUBLAS_COMPUTE_32F); the handle's
            // stream is the backend's.
            unsafe {
                cudarc::cublas::result::gemm_strided_batched_ex(
                    *blas.handle(),
                    trans_b,
                    cublasOperation_t::CUBLAS_OP_N,
                    m,
                    n,
                    k,
                    (&alpha as *const f32).cast::<c_void>(),
                    g.b as usize as *const c_void,
                    ty,
                    lda,
                    sa,
                    g.a as usize as *const c_void,
                    ty,
                    ldb,
                    sb,
                    (&beta as *const f32).cast::<c_void>(),
                    g.c as usize as *mut c_void,
                    ty,
                    ldc,
                    sc,
                    batch,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                )
            }
            .map_err(|e| CudaError::cublas("cublasGemmStridedBatchedEx", e))
        })
    }
}

impl MatmulOps for CudaBackend {
    fn matmul(&self, a: &CudaTensor, b: &CudaTensor) -> Result<CudaTensor> {
        let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
        let ok = sa.len() >= 2
            && sb.len() >= 2
            && sa[sa.len() - 1] == sb[sb.len() - 2]
            && (sb.len() == 2 || sb[..sb.len() - 2] == sa[..sa.len() - 2]);
        if !ok {
            return Err(Error::Shape {
                op: "matmul",
                expected: "a [..., m, k] and b [..., k, n] (same batch) or [k, n]".into(),
                found: format!("a {sa:?}, b {sb:?}"),
            });
        }
        let (m, k, n) = (sa[sa.len() - 2], sa[sa.len() - 1], sb[sb.len() - 1]);
        let batch: usize = sa[..sa.len() - 2].iter().product();
        let dtype = promote(a.dtype, b.dtype);
        let (a, b) = (self.to_dtype(a, dtype)?, self.to_dtype(b, dtype)?);
        let mut shape = sa[..sa.len() - 2].to_vec();
        shape.extend([m, n]);
        let out = self.alloc(&shape, dtype)?;
        if out.is_empty() {
            return Ok(out);
        }
        if k == 0 {
            self.zero(&out)?;
            return Ok(out);
        }
        let shared = sb.len() == 2;
        self.gemm(Gemm {
            dtype: float(dtype)?,
            // A shared right operand: the batch is one taller matrix.
            m: if shared { batch * m } else { m },
            n,
            k,
            batch: if shared { 1 } else { batch },
            a: a.ptr(),
            stride_a: m * k,
            b: b.ptr(),
            b_transposed: false,
            stride_b: k * n,
            c: out.ptr(),
            stride_c: m * n,
        })?;
        Ok(out)
    }

    fn linear(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let (sx, sw) = (x.shape().to_vec(), weight.shape().to_vec());
        let ok = !sx.is_empty() && sw.len() == 2 && sx[sx.len() - 1] == sw[1];
        if !ok {
            return Err(Error::Shape {
                op: "linear",
                expected: format!("x [..., in] with weight [out, in]; weight is {sw:?}"),
                found: format!("x {sx:?}"),
            });
        }
        let (out_f, in_f) = (sw[0], sw[1]);
        if let Some(b) = bias
            && b.shape() != [out_f]
        {
            return Err(Error::Shape {
                op: "linear",
                expected: format!("bias [{out_f}]"),
                found: format!("{:?}", b.shape()),
            });
        }
        let rows: usize = sx[..sx.len() - 1].iter().product();
        let dtype = promote(x.dtype, weight.dtype);
        let (x, w) = (self.to_dtype(x, dtype)?, self.to_dtype(weight, dtype)?);
        let mut shape = sx[..sx.len() - 1].to_vec();
        shape.push(out_f);
        let out = self.alloc(&shape, dtype)?;
        if out.is_empty() {
            return Ok(out);
        }
        if in_f == 0 {
            self.zero(&out)?;
        } else {
            self.gemm(Gemm {
                dtype: float(dtype)?,
                m: rows,
                n: out_f,
                k: in_f,
                batch: 1,
                a: x.ptr(),
                stride_a: 0,
                b: w.ptr(),
                b_transposed: true,
                stride_b: 0,
                c: out.ptr(),
                stride_c: 0,
            })?;
        }
        if let Some(b) = bias {
            self.add_bias_rows(&out, b, rows, out_f)?;
        }
        Ok(out)
    }
}

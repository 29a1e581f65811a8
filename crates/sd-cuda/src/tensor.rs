//! The tensor of the CUDA backend: a contiguous row-major array in device memory.

use std::sync::Arc;

use sd_models::backend::DType;

use crate::pool::DeviceBuffer;

/// A tensor in device memory: f32, f16 or bf16, contiguous and row-major, its data at the
/// start of a pooled buffer (so 256-byte aligned). Cloning shares the buffer; tensors are
/// never written after they are made, so sharing is safe.
#[derive(Clone)]
pub struct CudaTensor {
    pub(crate) buf: Arc<DeviceBuffer>,
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: DType,
}

impl CudaTensor {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The storage type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device address of the first element.
    pub(crate) fn ptr(&self) -> u64 {
        self.buf.ptr()
    }

    /// The same data under another shape of the same size (checked by the caller).
    pub(crate) fn with_shape(&self, shape: &[usize]) -> CudaTensor {
        CudaTensor {
            buf: Arc::clone(&self.buf),
            shape: shape.to_vec(),
            dtype: self.dtype,
        }
    }
}

impl std::fmt::Debug for CudaTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaTensor")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .field("ptr", &format_args!("{:#x}", self.ptr()))
            .field("buffer_bytes", &self.buf.bytes())
            .finish()
    }
}

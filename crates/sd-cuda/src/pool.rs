//! A caching allocator: device buffers are kept when their tensor is dropped and handed out
//! again for the next request of the same size class, so a denoising loop allocates device
//! memory only in its first step.
//!
//! Reuse is safe because the backend runs everything on one stream: a buffer goes back to
//! the pool once its last use is enqueued, and whatever is enqueued after that (its next
//! owner's work) runs after that use on the stream. Downloads synchronise the stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::error::{CudaError, Result};

/// Allocation counters of a backend's pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Device allocations made (calls to the driver's allocator).
    pub device_allocations: u64,
    /// Requests served from the cache.
    pub reuses: u64,
    /// Bytes held by live tensors (rounded to size classes).
    pub live_bytes: usize,
    /// Bytes cached for reuse.
    pub cached_bytes: usize,
}

/// The size class of a request: a multiple of 256 bytes up to 4 KiB, then 8 classes per
/// power of two (at most 12.5% more than asked for).
pub(crate) fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    if bytes <= 4096 {
        return bytes.div_ceil(256) * 256;
    }
    let top = usize::BITS - 1 - bytes.leading_zeros(); // floor(log2(bytes)) >= 12
    let step = 1usize << (top - 3);
    bytes.div_ceil(step) * step
}

#[derive(Debug, Default)]
struct State {
    free: HashMap<usize, Vec<CudaSlice<u8>>>,
    stats: PoolStats,
}

/// The pool of one backend.
#[derive(Debug)]
pub(crate) struct Pool {
    stream: Arc<CudaStream>,
    state: Mutex<State>,
}

impl Pool {
    pub(crate) fn new(stream: Arc<CudaStream>) -> Self {
        Pool {
            stream,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A buffer of at least `bytes` bytes (uninitialised).
    pub(crate) fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer> {
        let class = size_class(bytes);
        {
            let mut st = self.state();
            if let Some(slice) = st.free.get_mut(&class).and_then(Vec::pop) {
                st.stats.reuses += 1;
                st.stats.cached_bytes -= class;
                st.stats.live_bytes += class;
                return Ok(self.wrap(slice, class));
            }
        }
        // SAFETY: the memory is uninitialised; every user writes a buffer before reading it.
        let slice = match unsafe { self.stream.alloc::<u8>(class) } {
            Ok(s) => s,
            Err(_) => {
                // Out of memory with buffers cached for other sizes: free them and retry.
                self.release_cached();
                // SAFETY: as above.
                unsafe { self.stream.alloc::<u8>(class) }
                    .map_err(|e| CudaError::driver("cuMemAlloc", e))?
            }
        };
        let mut st = self.state();
        st.stats.device_allocations += 1;
        st.stats.live_bytes += class;
        Ok(self.wrap(slice, class))
    }

    fn wrap(self: &Arc<Self>, slice: CudaSlice<u8>, class: usize) -> DeviceBuffer {
        let ptr = {
            let (ptr, _sync) = slice.device_ptr(&self.stream);
            ptr
        };
        DeviceBuffer {
            slice: Some(slice),
            ptr,
            bytes: class,
            pool: Arc::clone(self),
        }
    }

    /// Frees every cached buffer (stream-ordered).
    pub(crate) fn release_cached(&self) {
        // One guard for both: a buffer given back in between would otherwise be counted out.
        let free = {
            let mut st = self.state();
            st.stats.cached_bytes = 0;
            std::mem::take(&mut st.free)
        };
        // The driver frees in the current context: make it this pool's on this thread. A
        // failure here leaves the context's error to the next driver call.
        let ctx = self.stream.context();
        ctx.record_err(ctx.bind_to_thread());
        drop(free);
    }

    pub(crate) fn stats(&self) -> PoolStats {
        self.state().stats
    }

    fn give_back(&self, slice: CudaSlice<u8>, class: usize) {
        let mut st = self.state();
        st.stats.live_bytes -= class;
        st.stats.cached_bytes += class;
        st.free.entry(class).or_default().push(slice);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.release_cached();
    }
}

/// A device allocation owned by one or more tensors; back to the pool when dropped.
#[derive(Debug)]
pub(crate) struct DeviceBuffer {
    slice: Option<CudaSlice<u8>>,
    ptr: u64,
    bytes: usize,
    pool: Arc<Pool>,
}

impl DeviceBuffer {
    /// The device address (256-byte aligned).
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The usable size in bytes.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Some(slice) = self.slice.take() {
            self.pool.give_back(slice, self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes() {
        assert_eq!(size_class(0), 256);
        assert_eq!(size_class(1), 256);
        assert_eq!(size_class(256), 256);
        assert_eq!(size_class(257), 512);
        assert_eq!(size_class(4096), 4096);
        assert_eq!(size_class(4097), 4096 + 512);
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(size_class((1 << 20) + 1), (1 << 20) + (1 << 17));
        for b in [1usize, 300, 5000, 123_457, 10_000_000, 1 << 30] {
            let c = size_class(b);
            assert!(c >= b && c as f64 <= b as f64 * 1.125 + 256.0, "{b} -> {c}");
            assert_eq!(c % 256, 0, "classes keep 256-byte alignment of sizes");
        }
    }
}

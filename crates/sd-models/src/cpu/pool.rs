//! Reuse of large activation buffers.
//!
//! A network allocates the same large outputs in every forward pass. Fresh allocations of
//! this size come straight from the kernel (glibc maps anything over its threshold, at most
//! 32 MiB, and unmaps it on free), and touching their pages for the first time costs about a
//! third of a millisecond per MiB, more than some of the operations that fill them. So
//! buffers of at least [`MIN_LEN`] values are kept when their tensor is dropped and handed
//! out again by [`take`]; at most [`MAX_BYTES`] are kept.

use std::sync::Mutex;

/// The smallest buffer worth keeping (1 MiB of f32); smaller ones stay with the allocator,
/// which reuses them without faults.
pub(crate) const MIN_LEN: usize = 1 << 18;
/// The most bytes of free buffers kept.
const MAX_BYTES: usize = 256 << 20;

#[derive(Default)]
struct Pool {
    free: Vec<Vec<f32>>,
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: Vec::new(),
    bytes: 0,
});

/// A buffer of `len` values whose contents are unspecified: the caller writes every one.
pub(crate) fn take(len: usize) -> Vec<f32> {
    if len >= MIN_LEN
        && let Ok(mut pool) = POOL.lock()
    {
        // The smallest kept buffer that holds `len` without wasting more than half of it.
        let best = pool
            .free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len && v.capacity() <= 2 * len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        if let Some(i) = best {
            let mut v = pool.free.swap_remove(i);
            pool.bytes -= v.capacity() * 4;
            drop(pool);
            if v.len() >= len {
                v.truncate(len);
            } else {
                v.resize(len, 0.0);
            }
            return v;
        }
        // A miss: the kept buffers are of other sizes (another network's, or another image
        // size's). Fresh memory plus kept memory stays within the cap: the oldest kept
        // buffers go back to the allocator first.
        let mut freed = Vec::new();
        while pool.bytes + len * 4 > MAX_BYTES && !pool.free.is_empty() {
            let v = pool.free.remove(0);
            pool.bytes -= v.capacity() * 4;
            freed.push(v);
        }
        drop(pool);
        drop(freed);
    }
    vec![0.0; len]
}

/// A buffer of `len` zeros.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    let mut v = take(len);
    v.fill(0.0);
    v
}

/// A buffer holding a copy of `src`.
pub(crate) fn copy_of(src: &[f32]) -> Vec<f32> {
    let mut v = take(src.len());
    v.copy_from_slice(src);
    v
}

/// Keeps `v` for a later [`take`] if it is large and there is room.
pub(crate) fn give(v: Vec<f32>) {
    let bytes = v.capacity() * 4;
    if v.capacity() < MIN_LEN {
        return;
    }
    if let Ok(mut pool) = POOL.lock()
        && pool.bytes + bytes <= MAX_BYTES
    {
        pool.bytes += bytes;
        pool.free.push(v);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_returned_buffer_is_handed_out_again() {
        let mut v = take(MIN_LEN + 123);
        assert_eq!(v.len(), MIN_LEN + 123);
        v[7] = 3.0;
        let ptr = v.as_ptr();
        give(v);
        let w = take(MIN_LEN + 100);
        assert_eq!(w.len(), MIN_LEN + 100);
        // Another test may have taken it first; when it is the same buffer, it is whole.
        if w.as_ptr() == ptr {
            assert_eq!(w[7], 3.0);
        }
        let z = zeroed(MIN_LEN + 5);
        assert!(z.iter().all(|&x| x == 0.0));
        let small = take(10);
        assert_eq!(small.len(), 10);
    }
}

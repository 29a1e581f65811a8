//! Derived tensors: a key of the store that is a view of a stored tensor, computed when it is
//! loaded.
//!
//! Some layouts store in one tensor what the network loads as several, or store it transposed:
//! OpenCLIP's fused attention input projection `in_proj_weight` `[3 D, D]` holds the query,
//! key and value weights that transformers' `CLIPAttention` loads as `q_proj`, `k_proj` and
//! `v_proj` (`[D, D]` each, rows `0..D`, `D..2D`, `2D..3D`), and its `text_projection` is
//! applied as `x @ P` where a linear layer's weight is `P^T` (diffusers'
//! `convert_open_clip_checkpoint` slices and transposes them). A [`Derived`] view names such a
//! tensor without copying the file: [`OpenOptions::derive`](super::OpenOptions::derive)
//! attaches views to store keys at open time, and the store reads only the bytes a view needs.

use std::borrow::Cow;
use std::fmt;

/// How a store key is computed from a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Derived {
    /// Rows `start..end` along dimension 0: shape `[end - start, ...rest]`, the bytes of those
    /// rows read as they are.
    Rows {
        /// The first row.
        start: usize,
        /// One past the last row.
        end: usize,
    },
    /// The transpose of a 2-D tensor: shape `[cols, rows]`.
    Transpose,
}

impl Derived {
    /// The rows `start..end` of dimension 0.
    #[must_use]
    pub fn rows(start: usize, end: usize) -> Self {
        Self::Rows { start, end }
    }

    /// The `i`-th of `n` equal parts along dimension 0 of a tensor with `len` rows (the query,
    /// key and value of a fused `[3 D, D]` projection are parts 0, 1 and 2 of 3), or `None`
    /// if `n` does not divide `len` or `i >= n`.
    #[must_use]
    pub fn chunk(len: usize, n: usize, i: usize) -> Option<Self> {
        if n == 0 || i >= n || !len.is_multiple_of(n) {
            return None;
        }
        let size = len / n;
        Some(Self::rows(i * size, (i + 1) * size))
    }

    /// The shape of the view of a tensor of shape `stored`, or `None` if the view does not
    /// apply to it (rows out of range or reversed, or a tensor with no dimension; a
    /// transpose of a tensor that is not 2-D).
    #[must_use]
    pub fn shape(&self, stored: &[usize]) -> Option<Vec<usize>> {
        match *self {
            Self::Rows { start, end } => {
                let (&rows, rest) = stored.split_first()?;
                if start > end || end > rows {
                    return None;
                }
                let mut shape = Vec::with_capacity(stored.len());
                shape.push(end - start);
                shape.extend_from_slice(rest);
                Some(shape)
            }
            Self::Transpose => match *stored {
                [rows, cols] => Some(vec![cols, rows]),
                _ => None,
            },
        }
    }

    /// The bytes of the view, from the little-endian `bytes` of a tensor of shape `stored`
    /// with elements of `element` bytes: a sub-slice for rows, a copy for a transpose. `None`
    /// if the view does not apply (see [`shape`](Self::shape)) or `bytes` does not hold the
    /// tensor.
    pub(crate) fn bytes<'a>(
        &self,
        bytes: &'a [u8],
        stored: &[usize],
        element: usize,
    ) -> Option<Cow<'a, [u8]>> {
        let elements = stored.iter().try_fold(1_usize, |n, &d| n.checked_mul(d))?;
        if elements.checked_mul(element)? != bytes.len() {
            return None;
        }
        match *self {
            Self::Rows { start, end } => {
                self.shape(stored)?;
                let row: usize = stored.iter().skip(1).product::<usize>() * element;
                bytes.get(start * row..end * row).map(Cow::Borrowed)
            }
            Self::Transpose => {
                let [rows, cols] = *stored else {
                    return None;
                };
                let mut out = vec![0_u8; bytes.len()];
                for (r, row) in bytes.chunks_exact(cols * element).enumerate().take(rows) {
                    for (c, value) in row.chunks_exact(element).enumerate() {
                        let at = (c * rows + r) * element;
                        out.get_mut(at..at + element)?.copy_from_slice(value);
                    }
                }
                Some(Cow::Owned(out))
            }
        }
    }
}

impl fmt::Display for Derived {
    /// `rows 0..16` or `the transpose` (of the stored key, in messages).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rows { start, end } => write!(f, "rows {start}..{end}"),
            Self::Transpose => f.write_str("the transpose"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn bytes(values: &[u16]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn rows_are_a_sub_slice() {
        let data = bytes(&(0..12).collect::<Vec<_>>());
        let view = Derived::chunk(6, 3, 1).unwrap();
        assert_eq!(view, Derived::rows(2, 4));
        assert_eq!(view.shape(&[6, 2]), Some(vec![2, 2]));
        let out = view.bytes(&data, &[6, 2], 2).unwrap();
        assert!(matches!(out, Cow::Borrowed(_)));
        assert_eq!(&*out, &bytes(&[4, 5, 6, 7])[..]);
        // A 1-D bias.
        assert_eq!(
            &*Derived::rows(3, 6).bytes(&data[..12], &[6], 2).unwrap(),
            &bytes(&[3, 4, 5])[..]
        );
    }

    #[test]
    fn transpose_moves_every_element() {
        let data = bytes(&[0, 1, 2, 10, 11, 12]);
        assert_eq!(Derived::Transpose.shape(&[2, 3]), Some(vec![3, 2]));
        let out = Derived::Transpose.bytes(&data, &[2, 3], 2).unwrap();
        assert_eq!(&*out, &bytes(&[0, 10, 1, 11, 2, 12])[..]);
    }

    #[test]
    fn views_that_do_not_apply_are_none() {
        assert_eq!(Derived::rows(2, 7).shape(&[6, 2]), None);
        assert_eq!(Derived::rows(3, 2).shape(&[6, 2]), None);
        assert_eq!(Derived::rows(0, 0).shape(&[]), None);
        assert_eq!(Derived::Transpose.shape(&[2, 3, 1]), None);
        assert_eq!(Derived::chunk(7, 3, 0), None);
        assert_eq!(Derived::chunk(6, 3, 3), None);
        // Bytes that do not hold the tensor.
        assert!(Derived::rows(0, 1).bytes(&[0; 3], &[2, 1], 2).is_none());
        assert!(Derived::Transpose.bytes(&[0; 8], &[2, 3], 2).is_none());
    }
}

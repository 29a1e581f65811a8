//! Host tensors: what weight loading hands to a backend, which uploads them.
//!
//! A [`HostTensor`] is a shape and a contiguous row-major buffer of `f32`, `f16` or `bf16`
//! values (safetensors' `F32`, `F16` and `BF16`, little-endian in the file). Loading converts
//! to the [`DType`] the caller asks for through a [`LoadDType`]: `f32` for the reference
//! precision, or the stored half dtype to halve memory.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};

pub use crate::backend::DType;

/// The dtype a loaded weight is handed out in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LoadDType {
    /// Convert to `f32` (the default; exact for `F16` and `BF16` files).
    #[default]
    F32,
    /// Keep the dtype of the file (`F32`, `F16` or `BF16`), with no conversion.
    Stored,
    /// Convert to `f16` (rounding to nearest; exact for `F16` files).
    F16,
    /// Convert to `bf16` (rounding to nearest; exact for `BF16` files).
    BF16,
}

impl LoadDType {
    /// The dtype a weight stored as `stored` is handed out in.
    #[must_use]
    pub fn resolve(self, stored: DType) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Stored => stored,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
        }
    }
}

impl From<DType> for LoadDType {
    fn from(dtype: DType) -> Self {
        match dtype {
            DType::F32 => Self::F32,
            DType::F16 => Self::F16,
            DType::BF16 => Self::BF16,
        }
    }
}

/// The elements of a [`HostTensor`], in one of the three dtypes.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    /// `f32` elements.
    F32(Vec<f32>),
    /// `f16` elements.
    F16(Vec<f16>),
    /// `bf16` elements.
    BF16(Vec<bf16>),
}

impl HostData {
    /// The dtype of the elements.
    #[must_use]
    pub fn dtype(&self) -> DType {
        match self {
            Self::F32(_) => DType::F32,
            Self::F16(_) => DType::F16,
            Self::BF16(_) => DType::BF16,
        }
    }

    /// The number of elements.
    #[must_use]
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
            Self::BF16(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A tensor in host memory: a shape and row-major (C-order) elements of one [`DType`].
///
/// The shape's product always equals the number of elements.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    shape: Vec<usize>,
    data: HostData,
}

impl HostTensor {
    /// A tensor of `shape` holding `data`.
    ///
    /// # Errors
    /// [`Error::Shape`] if the product of `shape` is not the number of elements.
    pub fn new(shape: Vec<usize>, data: HostData) -> Result<Self> {
        let elements = shape.iter().try_fold(1_usize, |n, &d| n.checked_mul(d));
        if elements != Some(data.len()) {
            return Err(Error::Shape {
                op: "HostTensor::new",
                expected: format!("{} elements for shape {shape:?}", display_count(elements)),
                found: format!("{} elements", data.len()),
            });
        }
        Ok(Self { shape, data })
    }

    /// An `f32` tensor of `shape`.
    ///
    /// # Errors
    /// [`Error::Shape`] if the product of `shape` is not `data.len()`.
    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        Self::new(shape, HostData::F32(data))
    }

    /// The shape.
    #[must_use]
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The dtype of the elements.
    #[must_use]
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// The number of elements.
    #[must_use]
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no elements (a zero in its shape).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The size of the elements in bytes.
    #[must_use]
    pub fn size_in_bytes(&self) -> usize {
        self.len() * self.dtype().size_in_bytes()
    }

    /// The elements.
    #[must_use]
    pub fn data(&self) -> &HostData {
        &self.data
    }

    /// The shape and the elements, by value.
    #[must_use]
    pub fn into_parts(self) -> (Vec<usize>, HostData) {
        (self.shape, self.data)
    }

    /// The elements if they are `f32`.
    #[must_use]
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            HostData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The elements if they are `f16`.
    #[must_use]
    pub fn as_f16(&self) -> Option<&[f16]> {
        match &self.data {
            HostData::F16(v) => Some(v),
            _ => None,
        }
    }

    /// The elements if they are `bf16`.
    #[must_use]
    pub fn as_bf16(&self) -> Option<&[bf16]> {
        match &self.data {
            HostData::BF16(v) => Some(v),
            _ => None,
        }
    }

    /// The elements converted to `f32` (exact from every dtype).
    #[must_use]
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::F16(v) => map_par(v, |x| x.to_f32()),
            HostData::BF16(v) => map_par(v, |x| x.to_f32()),
        }
    }

    /// The elements converted to `f32`, without a copy when they already are.
    #[must_use]
    pub fn into_f32_vec(self) -> Vec<f32> {
        match self.data {
            HostData::F32(v) => v,
            _ => self.to_f32_vec(),
        }
    }

    /// The same tensor with its elements converted to `dtype` (rounding to nearest when
    /// narrowing; no copy when the dtype is already `dtype`).
    #[must_use]
    pub fn to_dtype(self, dtype: DType) -> Self {
        if self.dtype() == dtype {
            return self;
        }
        let data = match dtype {
            DType::F32 => HostData::F32(self.to_f32_vec()),
            DType::F16 => HostData::F16(match &self.data {
                HostData::F32(v) => map_par(v, |&x| f16::from_f32(x)),
                HostData::BF16(v) => map_par(v, |x| f16::from_f32(x.to_f32())),
                HostData::F16(v) => v.clone(),
            }),
            DType::BF16 => HostData::BF16(match &self.data {
                HostData::F32(v) => map_par(v, |&x| bf16::from_f32(x)),
                HostData::F16(v) => map_par(v, |x| bf16::from_f32(x.to_f32())),
                HostData::BF16(v) => v.clone(),
            }),
        };
        Self {
            shape: self.shape,
            data,
        }
    }

    /// The same elements under another shape with the same number of elements.
    ///
    /// # Errors
    /// [`Error::Shape`] if the product of `shape` is not the number of elements.
    pub fn reshape(self, shape: Vec<usize>) -> Result<Self> {
        Self::new(shape, self.data)
    }
}

fn display_count(elements: Option<usize>) -> String {
    elements.map_or_else(|| "more than usize::MAX".to_owned(), |n| n.to_string())
}

/// Elements per parallel block of a conversion; smaller tensors convert on one thread.
const BLOCK: usize = 1 << 16;

/// `f` applied to every element, in parallel blocks for large slices.
fn map_par<A: Sync, B: Send + Copy + Default>(src: &[A], f: impl Fn(&A) -> B + Sync) -> Vec<B> {
    let mut out = vec![B::default(); src.len()];
    if src.len() <= BLOCK {
        out.iter_mut().zip(src).for_each(|(o, x)| *o = f(x));
    } else {
        out.par_chunks_mut(BLOCK)
            .zip(src.par_chunks(BLOCK))
            .for_each(|(o, s)| o.iter_mut().zip(s).for_each(|(o, x)| *o = f(x)));
    }
    out
}

/// Decodes little-endian `bytes` stored as `stored` into elements of `target`.
///
/// `bytes.len()` is a multiple of the stored element size (the safetensors header validation
/// guarantees it); a trailing partial element would be ignored.
pub(crate) fn decode(bytes: &[u8], stored: DType, target: DType) -> HostData {
    match (stored, target) {
        (DType::F32, DType::F32) => HostData::F32(decode_chunks(bytes, f32::from_le_bytes)),
        (DType::F32, DType::F16) => HostData::F16(decode_chunks(bytes, |b: [u8; 4]| {
            f16::from_f32(f32::from_le_bytes(b))
        })),
        (DType::F32, DType::BF16) => HostData::BF16(decode_chunks(bytes, |b: [u8; 4]| {
            bf16::from_f32(f32::from_le_bytes(b))
        })),
        (DType::F16, DType::F32) => HostData::F32(decode_chunks(bytes, |b: [u8; 2]| {
            f16::from_le_bytes(b).to_f32()
        })),
        (DType::F16, DType::F16) => HostData::F16(decode_chunks(bytes, f16::from_le_bytes)),
        (DType::F16, DType::BF16) => HostData::BF16(decode_chunks(bytes, |b: [u8; 2]| {
            bf16::from_f32(f16::from_le_bytes(b).to_f32())
        })),
        (DType::BF16, DType::F32) => HostData::F32(decode_chunks(bytes, |b: [u8; 2]| {
            bf16::from_le_bytes(b).to_f32()
        })),
        (DType::BF16, DType::F16) => HostData::F16(decode_chunks(bytes, |b: [u8; 2]| {
            f16::from_f32(bf16::from_le_bytes(b).to_f32())
        })),
        (DType::BF16, DType::BF16) => HostData::BF16(decode_chunks(bytes, bf16::from_le_bytes)),
    }
}

/// `f` applied to every `N`-byte element of `bytes` (unaligned reads: safetensors data need
/// not be aligned in a memory map).
fn decode_chunks<const N: usize, T: Send + Copy + Default>(
    bytes: &[u8],
    f: impl Fn([u8; N]) -> T + Sync,
) -> Vec<T> {
    let (chunks, _partial) = bytes.as_chunks::<N>();
    map_par(chunks, |&b| f(b))
}

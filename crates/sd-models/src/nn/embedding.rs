//! A lookup table (PyTorch's `nn.Embedding`), kept on the host: looking up a few token ids
//! is cheaper there than a gather on the device, and the result is uploaded once. The table
//! stays in the precision it was loaded in (half the memory for f16 or bf16 weights: CLIP's
//! token table is 146 MiB in f32); rows are widened to f32 as they are read.

use crate::error::{Error, Result};
use crate::nn::source::WeightSource;
use crate::weights::{DType, HostData};

/// A table of `rows` vectors of `dim` values; key `weight` `[rows, dim]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// `[rows, dim]`, row-major, in the dtype it was loaded in.
    table: HostData,
    rows: usize,
    dim: usize,
}

impl Embedding {
    /// Loads `weight` `[rows, dim]` from `w`.
    ///
    /// # Errors
    /// A missing or misshapen weight.
    pub fn load<S: WeightSource>(w: &S, rows: usize, dim: usize) -> Result<Self> {
        let (_, table) = w.get("weight", &[rows, dim])?.into_parts();
        Ok(Embedding { table, rows, dim })
    }

    /// The dtype the table is kept in.
    pub fn dtype(&self) -> DType {
        self.table.dtype()
    }

    /// The number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The length of each vector.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Appends row `index` to `out`, in f32.
    ///
    /// # Errors
    /// [`Error::TokenOutOfVocab`] for an index past the table.
    pub fn push_row(&self, index: u32, out: &mut Vec<f32>) -> Result<()> {
        let range = self.row(index)?;
        match &self.table {
            HostData::F32(t) => out.extend_from_slice(&t[range]),
            HostData::F16(t) => out.extend(t[range].iter().map(|v| v.to_f32())),
            HostData::BF16(t) => out.extend(t[range].iter().map(|v| v.to_f32())),
        }
        Ok(())
    }

    /// Adds row `index` to `out` (`dim` values), in f32.
    ///
    /// # Errors
    /// [`Error::TokenOutOfVocab`] for an index past the table; [`Error::Shape`] if `out`
    /// does not hold `dim` values.
    pub fn add_row(&self, index: u32, out: &mut [f32]) -> Result<()> {
        let range = self.row(index)?;
        if out.len() != self.dim {
            return Err(Error::Shape {
                op: "embedding row",
                expected: format!("[{}]", self.dim),
                found: format!("[{}]", out.len()),
            });
        }
        match &self.table {
            HostData::F32(t) => out.iter_mut().zip(&t[range]).for_each(|(o, v)| *o += v),
            HostData::F16(t) => out
                .iter_mut()
                .zip(&t[range])
                .for_each(|(o, v)| *o += v.to_f32()),
            HostData::BF16(t) => out
                .iter_mut()
                .zip(&t[range])
                .for_each(|(o, v)| *o += v.to_f32()),
        }
        Ok(())
    }

    /// Appends rows (`values` holds whole rows of `dim`, in f32), stored in the table's
    /// dtype: new tokens' vectors (textual inversion).
    ///
    /// # Errors
    /// [`Error::Shape`] if `values` is not a whole number of rows.
    pub fn append_rows(&mut self, values: &[f32]) -> Result<()> {
        if self.dim == 0 || !values.len().is_multiple_of(self.dim) {
            return Err(Error::Shape {
                op: "embedding rows",
                expected: format!("rows of {}", self.dim),
                found: format!("{} values", values.len()),
            });
        }
        match &mut self.table {
            HostData::F32(t) => t.extend_from_slice(values),
            HostData::F16(t) => t.extend(values.iter().map(|&v| half::f16::from_f32(v))),
            HostData::BF16(t) => t.extend(values.iter().map(|&v| half::bf16::from_f32(v))),
        }
        self.rows += values.len() / self.dim;
        Ok(())
    }

    /// The values of row `index` in the table.
    fn row(&self, index: u32) -> Result<std::ops::Range<usize>> {
        let i = index as usize;
        if i >= self.rows {
            return Err(Error::TokenOutOfVocab {
                id: index,
                vocab_size: self.rows,
            });
        }
        Ok(i * self.dim..(i + 1) * self.dim)
    }
}

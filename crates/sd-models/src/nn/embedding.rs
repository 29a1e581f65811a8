//! A lookup table (PyTorch's `nn.Embedding`), kept on the host: looking up a few token ids
//! is cheaper there than a gather on the device, and the result is uploaded once.

use crate::error::{Error, Result};
use crate::nn::source::WeightSource;

/// A table of `rows` vectors of `dim` values; key `weight` `[rows, dim]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// `[rows, dim]`, row-major, in f32.
    pub weight: Vec<f32>,
    rows: usize,
    dim: usize,
}

impl Embedding {
    /// Loads `weight` `[rows, dim]` from `w`.
    ///
    /// # Errors
    /// A missing or misshapen weight.
    pub fn load<S: WeightSource>(w: &S, rows: usize, dim: usize) -> Result<Self> {
        Ok(Embedding {
            weight: w.get("weight", &[rows, dim])?.into_f32_vec(),
            rows,
            dim,
        })
    }

    /// The number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The length of each vector.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Appends row `index` to `out`.
    ///
    /// # Errors
    /// [`Error::TokenOutOfVocab`] for an index past the table.
    pub fn push_row(&self, index: u32, out: &mut Vec<f32>) -> Result<()> {
        let i = index as usize;
        if i >= self.rows {
            return Err(Error::TokenOutOfVocab {
                id: index,
                vocab_size: self.rows,
            });
        }
        out.extend_from_slice(&self.weight[i * self.dim..(i + 1) * self.dim]);
        Ok(())
    }
}

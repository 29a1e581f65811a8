//! Textual inversion embeddings (Gal et al., 2022): learned vectors for a new token, read from
//! the files people share, as diffusers' `load_textual_inversion` reads them.
//!
//! | layout | keys | token |
//! |---|---|---|
//! | diffusers (`learned_embeds.safetensors`) | one key, the token itself: `{"<cat-toy>": [dim] or [n, dim]}` | the key, unless one is given |
//! | AUTOMATIC1111 | `emb_params` `[n, dim]`, or `string_to_param.*` | the one given, else the file's name |
//! | SDXL (AUTOMATIC1111, ComfyUI, diffusers' documentation) | `clip_l` `[n, 768]` for the first text encoder, `clip_g` `[n, 1280]` for the second | the one given, else the file's name |
//!
//! A file of `n` vectors adds the tokens `tok`, `tok_1`, ..., `tok_{n-1}`, and a prompt's
//! `tok` stands for all of them ([`TextualInversion::expand`], diffusers'
//! `maybe_convert_prompt`). Only safetensors files are read: `.pt`, `.bin` and `.ckpt`
//! pickles are refused, never unpickled.

use std::path::Path;

use crate::error::{Error, Result};
use crate::weights::{LoadDType, WeightFile};

/// A textual inversion embedding: its token and vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct TextualInversion {
    /// The token a prompt names it by.
    pub token: String,
    /// `count x dim` values, row by row.
    pub vectors: Vec<f32>,
    /// The number of vectors (tokens it takes in a prompt).
    pub count: usize,
    /// The width of each vector (the text encoder's `hidden_size`).
    pub dim: usize,
    /// SDXL files: the second text encoder's vectors (`clip_g`, `count x width` values) and
    /// their width; [`vectors`](Self::vectors) are then the first encoder's (`clip_l`).
    pub second: Option<(Vec<f32>, usize)>,
}

fn invalid(path: &Path, message: String) -> Error {
    Error::Config {
        what: format!("{} (textual inversion)", path.display()),
        message,
    }
}

impl TextualInversion {
    /// Reads an embedding file of either layout; `token` names the embedding (for the
    /// diffusers layout it replaces the file's token; for AUTOMATIC1111's, whose files carry
    /// none, the default is the file's name without its extension).
    ///
    /// # Errors
    /// [`Error::Config`] naming the file for a pickle (`.pt`, `.bin`, `.ckpt`, `.pth`), a
    /// file of neither layout, vectors that are not `[dim]` or `[n, dim]`, or values that are
    /// not finite; [`Error::Io`] and [`Error::SafeTensors`] for a file that cannot be read.
    pub fn open(path: impl AsRef<Path>, token: Option<&str>) -> Result<Self> {
        let path = path.as_ref();
        if let Some(message) = crate::files::pickle_message(path) {
            return Err(invalid(path, message));
        }
        let file = WeightFile::open(path)?;
        let mut keys: Vec<&str> = file.keys().collect();
        keys.sort_unstable();
        let stem = || {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        if keys[..] == ["clip_g", "clip_l"] {
            let (first, count, dim) = read_vectors(&file, path, "clip_l")?;
            let (second, count_2, dim_2) = read_vectors(&file, path, "clip_g")?;
            if count != count_2 {
                return Err(invalid(
                    path,
                    format!("clip_l holds {count} vectors and clip_g {count_2}"),
                ));
            }
            return Ok(TextualInversion {
                token: token.map_or_else(stem, str::to_owned),
                vectors: first,
                count,
                dim,
                second: Some((second, dim_2)),
            });
        }
        let (key, name) = match keys[..] {
            ["emb_params"] => ("emb_params", token.map_or_else(stem, str::to_owned)),
            [key] if key.starts_with("string_to_param") => {
                (key, token.map_or_else(stem, str::to_owned))
            }
            [key] => (key, token.map_or_else(|| key.to_owned(), str::to_owned)),
            _ => {
                return Err(invalid(
                    path,
                    format!(
                        "not a textual inversion file: expected one tensor (the token, \
                         `emb_params` or `string_to_param.*`) or SDXL's `clip_l` and `clip_g`, \
                         found {} keys",
                        keys.len()
                    ),
                ));
            }
        };
        let (vectors, count, dim) = read_vectors(&file, path, key)?;
        Ok(TextualInversion {
            token: name,
            vectors,
            count,
            dim,
            second: None,
        })
    }

    /// The tokens it adds: its token, then `token_1` ... for each further vector.
    pub fn tokens(&self) -> Vec<String> {
        (0..self.count)
            .map(|i| {
                if i == 0 {
                    self.token.clone()
                } else {
                    format!("{}_{i}", self.token)
                }
            })
            .collect()
    }

    /// `prompt` with every occurrence of the token standing for all of its tokens (diffusers'
    /// `maybe_convert_prompt`): `<frog>` becomes `<frog> <frog>_1 <frog>_2`. As in diffusers,
    /// only where the prompt spells the token exactly, and never for a token with capitals
    /// (diffusers looks it up lowercased, and misses it); elsewhere the token still matches,
    /// case-insensitively, as its first vector alone.
    pub fn expand(&self, prompt: &str) -> String {
        if self.count < 2 || self.token != self.token.to_lowercase() {
            return prompt.to_owned();
        }
        prompt.replace(&self.token, &self.tokens().join(" "))
    }
}

/// The `[dim]` or `[n, dim]` vectors of `key`: their values, count and width.
fn read_vectors(file: &WeightFile, path: &Path, key: &str) -> Result<(Vec<f32>, usize, usize)> {
    let info = file
        .info(key)
        .ok_or_else(|| invalid(path, format!("{key} cannot be read")))?;
    let (count, dim) = match *info.shape {
        [dim] => (1, dim),
        [n, dim] => (n, dim),
        ref other => {
            return Err(invalid(
                path,
                format!("{key} has shape {other:?}; expected [dim] or [n, dim]"),
            ));
        }
    };
    if count == 0 || dim == 0 {
        return Err(invalid(path, format!("{key} holds no vector")));
    }
    let shape = info.shape.to_vec();
    let vectors = file.load(key, &shape, LoadDType::F32)?.into_f32_vec();
    if !vectors.iter().all(|v| v.is_finite()) {
        return Err(invalid(path, format!("{key} holds NaN or infinite values")));
    }
    Ok((vectors, count, dim))
}

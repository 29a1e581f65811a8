//! AUTOMATIC1111's prompt weighting (`modules/prompt_parser.py::parse_prompt_attention` and
//! `sd_hijack_clip.py`'s chunking), the syntax most shared prompts are written in:
//!
//! | syntax | weight of the text inside |
//! |---|---|
//! | `(word)` | x1.1 (nested: `((word))` x1.21) |
//! | `[word]` | /1.1 |
//! | `(word:1.5)` | x1.5 |
//! | `\(` `\)` `\[` `\]` `\\` | the literal character |
//! | `BREAK` | no weight: the next text starts a new 75-token chunk |
//!
//! Unbalanced brackets apply to the end of the prompt. [`parse_weighted`] is the parser (a
//! pure function); [`ClipTokenizer::encode_weighted`] tokenizes each part separately and
//! fills 75-token chunks with one weight per token, moving the text after a recent comma to
//! the next chunk rather than cutting a phrase (A1111's `comma_padding_backtrack`, 20
//! tokens); [`apply_weights`] multiplies the text encoder's output by the weights and restores
//! its mean, chunk by chunk, as A1111 does.
//!
//! Two of A1111's quirks are not copied: a weight that is not a number (`(a:1.2.3)`, on which
//! A1111 raises) is read as text, and `BREAK` inside brackets still breaks (A1111 scales its
//! marker and then tokenizes the word).

use crate::clip::tokenizer::ClipTokenizer;
use crate::error::Result;

/// One piece of a parsed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptPart {
    /// Text and its weight.
    Text {
        /// The text, brackets and escapes removed.
        text: String,
        /// Its weight (1 for plain text).
        weight: f64,
    },
    /// `BREAK`: start a new chunk.
    Break,
}

/// A1111's weight for `(...)`.
pub const ROUND_BRACKET: f64 = 1.1;
/// A1111's weight for `[...]`.
pub const SQUARE_BRACKET: f64 = 1.0 / 1.1;

/// A token of the weighting syntax.
enum Piece<'a> {
    Escaped(&'a str),
    Open(bool),
    /// The number, and the whole match (`:1.5)` with any white space).
    CloseWeight(&'a str, &'a str),
    Close(bool),
    Text(&'a str),
}

/// Splits `text` as A1111's `re_attention` does.
fn pieces(text: &str) -> Vec<Piece<'_>> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        match bytes[i] {
            b'\\' => {
                // `\(`, `\)`, `\[`, `\]`, `\\`, or a lone backslash.
                let len = match bytes.get(i + 1) {
                    Some(b'(' | b')' | b'[' | b']' | b'\\') => 2,
                    _ => 1,
                };
                out.push(Piece::Escaped(&rest[1..len]));
                i += len;
            }
            b'(' => {
                out.push(Piece::Open(true));
                i += 1;
            }
            b'[' => {
                out.push(Piece::Open(false));
                i += 1;
            }
            b')' => {
                out.push(Piece::Close(true));
                i += 1;
            }
            b']' => {
                out.push(Piece::Close(false));
                i += 1;
            }
            b':' => {
                // `:\s*([+-]?[.\d]+)\s*\)`, else a lone `:`.
                let after = rest[1..].trim_start();
                let number_len = after
                    .bytes()
                    .enumerate()
                    .take_while(|&(j, c)| {
                        c.is_ascii_digit() || c == b'.' || (j == 0 && (c == b'+' || c == b'-'))
                    })
                    .count();
                let number = &after[..number_len];
                let tail = after[number_len..].trim_start();
                if number.bytes().any(|c| c.is_ascii_digit() || c == b'.') && tail.starts_with(')')
                {
                    let consumed = rest.len() - tail.len() + 1;
                    out.push(Piece::CloseWeight(number, &rest[..consumed]));
                    i += consumed;
                } else {
                    out.push(Piece::Text(&rest[..1]));
                    i += 1;
                }
            }
            _ => {
                let len = rest
                    .find(['\\', '(', ')', '[', ']', ':'])
                    .unwrap_or(rest.len());
                out.push(Piece::Text(&rest[..len]));
                i += len;
            }
        }
    }
    out
}

/// Splits `text` at each `BREAK` word with the white space around it (A1111's
/// `\s*\bBREAK\b\s*`).
fn split_breaks(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut search = 0;
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    while let Some(found) = text[search..].find("BREAK") {
        let at = search + found;
        let end = at + "BREAK".len();
        let before = text[..at].chars().next_back();
        let after = text[end..].chars().next();
        if word(before) || word(after) {
            search = end;
            continue;
        }
        let left = text[start..at].trim_end_matches(char::is_whitespace);
        parts.push(left);
        let rest = &text[end..];
        start = end + (rest.len() - rest.trim_start_matches(char::is_whitespace).len());
        search = start;
    }
    parts.push(&text[start..]);
    parts
}

/// Parses AUTOMATIC1111's weighting syntax into text pieces with weights and breaks; see
/// the module documentation. Runs of equal weight are merged; an empty prompt is one empty
/// piece of weight 1.
///
/// ```
/// use sd_models::clip::prompt::{PromptPart, parse_weighted};
///
/// let parts = parse_weighted("an (important) word");
/// assert_eq!(parts[1], PromptPart::Text { text: "important".into(), weight: 1.1 });
/// ```
#[must_use]
pub fn parse_weighted(prompt: &str) -> Vec<PromptPart> {
    let mut res: Vec<PromptPart> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<PromptPart>, from: usize, by: f64| {
        for part in &mut res[from..] {
            if let PromptPart::Text { weight, .. } = part {
                *weight *= by;
            }
        }
    };
    let text = |t: &str| PromptPart::Text {
        text: t.to_owned(),
        weight: 1.0,
    };
    for piece in pieces(prompt) {
        match piece {
            Piece::Escaped(t) => res.push(text(t)),
            Piece::Open(true) => round.push(res.len()),
            Piece::Open(false) => square.push(res.len()),
            Piece::CloseWeight(number, whole) => match (number.parse::<f64>(), round.last()) {
                (Ok(w), Some(_)) => {
                    let from = round.pop().unwrap_or(0);
                    multiply(&mut res, from, w);
                }
                // Not a number, or no bracket open: the characters are text.
                _ => res.push(text(whole)),
            },
            Piece::Close(true) if !round.is_empty() => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, ROUND_BRACKET);
            }
            Piece::Close(false) if !square.is_empty() => {
                let from = square.pop().unwrap_or(0);
                multiply(&mut res, from, SQUARE_BRACKET);
            }
            Piece::Close(true) => res.push(text(")")),
            Piece::Close(false) => res.push(text("]")),
            Piece::Text(t) => {
                for (i, part) in split_breaks(t).into_iter().enumerate() {
                    if i > 0 {
                        res.push(PromptPart::Break);
                    }
                    res.push(text(part));
                }
            }
        }
    }
    for from in round {
        multiply(&mut res, from, ROUND_BRACKET);
    }
    for from in square {
        multiply(&mut res, from, SQUARE_BRACKET);
    }
    if res.is_empty() {
        res.push(text(""));
    }
    // Merge runs of equal weight.
    let mut merged: Vec<PromptPart> = Vec::with_capacity(res.len());
    for part in res {
        match (merged.last_mut(), part) {
            (
                Some(PromptPart::Text { text, weight }),
                PromptPart::Text {
                    text: next,
                    weight: w,
                },
            ) if *weight == w => text.push_str(&next),
            (_, part) => merged.push(part),
        }
    }
    merged
}

/// AUTOMATIC1111's LoRA tags, `<lora:NAME>` or `<lora:NAME:MULTIPLIER>`, taken out of a
/// prompt: the prompt without them, and each name with its multiplier (1 if not given). A
/// tag whose multiplier is not a number stays in the prompt as text.
///
/// ```
/// use sd_models::clip::prompt::extract_loras;
///
/// let (prompt, loras) = extract_loras("a castle <lora:watercolor:0.7>, dusk");
/// assert_eq!(prompt, "a castle , dusk");
/// assert_eq!(loras, [("watercolor".to_string(), 0.7)]);
/// ```
#[must_use]
pub fn extract_loras(prompt: &str) -> (String, Vec<(String, f64)>) {
    let mut text = String::with_capacity(prompt.len());
    let mut loras = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        let Some(len) = rest[start..].find('>') else {
            break;
        };
        let inner = &rest[start + "<lora:".len()..start + len];
        let (name, multiplier) = match inner.rsplit_once(':') {
            Some((name, m)) => (name, m.trim().parse::<f64>().ok()),
            None => (inner, Some(1.0)),
        };
        let name = name.trim();
        match multiplier {
            Some(m) if !name.is_empty() && m.is_finite() => {
                text.push_str(&rest[..start]);
                loras.push((name.to_owned(), m));
            }
            _ => text.push_str(&rest[..=start + len]),
        }
        rest = &rest[start + len + 1..];
    }
    text.push_str(rest);
    (text, loras)
}

/// One chunk of a weighted prompt: `max_length` ids (start, up to `max_length - 2` tokens,
/// end, padding) and the weight of each.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedChunk {
    /// The ids, as [`ClipTokenizer::encode`] pads them.
    pub ids: Vec<u32>,
    /// One weight per id (1 for the start, end and padding).
    pub weights: Vec<f32>,
}

/// How many tokens back A1111 looks for a comma before cutting a chunk
/// (`comma_padding_backtrack`).
pub const COMMA_BACKTRACK: usize = 20;

impl ClipTokenizer {
    /// A parsed prompt ([`parse_weighted`]) as chunks of `max_length` ids with a weight per
    /// id, as AUTOMATIC1111 fills them: each piece tokenized on its own, 75 tokens a chunk, a
    /// `BREAK` starting a new one, and the text after a comma among a full chunk's last
    /// [`COMMA_BACKTRACK`] tokens moved to the next. At least one chunk.
    ///
    /// # Errors
    /// [`Error::Tokenizer`](crate::Error::Tokenizer) if the `tokenizers` pipeline fails.
    pub fn encode_weighted(&self, parts: &[PromptPart]) -> Result<Vec<WeightedChunk>> {
        let window = self.max_length() - 2;
        let comma = self.token_id(",</w>");
        let mut chunks = Vec::new();
        let mut tokens: Vec<u32> = Vec::new();
        let mut weights: Vec<f32> = Vec::new();
        let mut last_comma: Option<usize> = None;
        let finish =
            |tokens: &mut Vec<u32>, weights: &mut Vec<f32>, chunks: &mut Vec<WeightedChunk>| {
                let mut w = vec![1.0_f32; self.max_length()];
                w[1..=weights.len()].copy_from_slice(weights);
                chunks.push(WeightedChunk {
                    ids: self.row(tokens),
                    weights: w,
                });
                tokens.clear();
                weights.clear();
            };
        for part in parts {
            let (text, weight) = match part {
                PromptPart::Break => {
                    finish(&mut tokens, &mut weights, &mut chunks);
                    last_comma = None;
                    continue;
                }
                PromptPart::Text { text, weight } => (text, *weight as f32),
            };
            for token in self.content_ids(text)? {
                if Some(token) == comma {
                    last_comma = Some(tokens.len());
                } else if tokens.len() == window
                    && let Some(at) = last_comma.filter(|&c| tokens.len() - c <= COMMA_BACKTRACK)
                {
                    // Move what follows the comma to the next chunk.
                    let moved: Vec<u32> = tokens.split_off(at + 1);
                    let moved_weights: Vec<f32> = weights.split_off(at + 1);
                    finish(&mut tokens, &mut weights, &mut chunks);
                    tokens = moved;
                    weights = moved_weights;
                    last_comma = None;
                }
                if tokens.len() == window {
                    finish(&mut tokens, &mut weights, &mut chunks);
                    last_comma = None;
                }
                tokens.push(token);
                weights.push(weight);
            }
        }
        if !tokens.is_empty() || chunks.is_empty() {
            finish(&mut tokens, &mut weights, &mut chunks);
        }
        Ok(chunks)
    }
}

/// Applies a chunk's weights to the text encoder's output for it, `hidden [L, D]` with one
/// weight per row, as AUTOMATIC1111 does: every row multiplied by its weight, then the whole
/// scaled so that its mean is the unweighted mean.
pub fn apply_weights(hidden: &mut [f32], weights: &[f32]) {
    let rows = weights.len().max(1);
    let d = hidden.len() / rows;
    let mean = |x: &[f32]| x.iter().map(|&v| f64::from(v)).sum::<f64>() / x.len().max(1) as f64;
    let original = mean(hidden);
    for (row, &w) in hidden.chunks_exact_mut(d.max(1)).zip(weights) {
        row.iter_mut().for_each(|v| *v *= w);
    }
    let new = mean(hidden);
    if new != 0.0 && new.is_finite() {
        let factor = (original / new) as f32;
        hidden.iter_mut().for_each(|v| *v *= factor);
    }
}

//! The CLIP text side: the tokenizer, AUTOMATIC1111's prompt weighting, the text encoder and
//! its configuration.

pub mod config;
pub mod prompt;
pub mod text_encoder;
pub mod textual_inversion;
pub mod tokenizer;

pub use config::{ClipTextConfig, HiddenAct};
pub use prompt::{PromptPart, WeightedChunk, apply_weights, extract_loras, parse_weighted};
pub use text_encoder::{ClipTextModel, ClipTextOutput};
pub use textual_inversion::TextualInversion;
pub use tokenizer::{ClipTokenizer, LongPrompt, PadToken};

//! The CLIP text side: the tokenizer, the text encoder and its configuration.

pub mod config;
pub mod text_encoder;
pub mod tokenizer;

pub use config::{ClipTextConfig, HiddenAct};
pub use text_encoder::{ClipTextModel, ClipTextOutput};
pub use tokenizer::{ClipTokenizer, LongPrompt, PadToken};

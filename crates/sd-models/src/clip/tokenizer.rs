//! The CLIP tokenizer of Stable Diffusion, with the ids of transformers' `CLIPTokenizer`.
//!
//! Follows `transformers/models/clip/tokenization_clip.py` (transformers 5.23), which builds a
//! Hugging Face `tokenizers` pipeline; this module builds the same pipeline with the Rust
//! `tokenizers` crate from a diffusers `tokenizer/` folder's `vocab.json` and `merges.txt`
//! (no `tokenizer.json` needed):
//!
//! 1. normalizer: Unicode NFC, every run of whitespace (`\s+`) replaced by one space,
//!    lower-casing;
//! 2. pre-tokenizer: the split pattern [`PRE_TOKENIZER_PATTERN`] (the pieces are the matches;
//!    what lies between them, whitespace, is dropped), then byte-level mapping (GPT-2's byte
//!    to character table and split pattern, no prefix space);
//! 3. model: byte-pair encoding with `</w>` appended to the last piece of each word and
//!    `<|endoftext|>` as the unknown token;
//! 4. post-processor: `<|startoftext|>` before and `<|endoftext|>` after the prompt;
//! 5. truncation to 77 ids (75 from the prompt) and padding to 77 with the pad token, as
//!    diffusers asks for (`padding="max_length", max_length=tokenizer.model_max_length,
//!    truncation=True`).
//!
//! That normalizer is all the text clean-up there is: unlike OpenAI's and open_clip's
//! `SimpleTokenizer`, transformers runs no `ftfy` and does not unescape HTML entities
//! (`&amp;` stays four characters), so neither does this module. On plain text the ids are
//! those of open_clip's tokenizer (the fixtures check it).
//!
//! The special tokens (start, end, unknown, pad) are registered as added tokens, as
//! transformers does: typed inside a prompt, `<|endoftext|>` and `<|startoftext|>` become the
//! special ids, not the byte-pair pieces of their text. Whether the match also ignores case
//! (`<|EndOfText|>`) depends on the folder's `special_tokens_map.json` and
//! `tokenizer_config.json` (their `"normalized"` flags), and [`ClipTokenizer::from_dir`]
//! resolves them as transformers does. A consequence worth knowing: Stable Diffusion 2.x pads
//! with `!` (id 0), which makes `!` a special token too, so in an SD 2.x prompt every `!` is
//! id 0 on its own (`"wow!!"` is `wow`, `!`, `!`), where SD 1.x keeps `!!` as one token.
//!
//! Prompts longer than 75 tokens are truncated by default, as in diffusers; with
//! [`LongPrompt::Chunks`] they are cut into 75-token chunks, each wrapped in start and end
//! tokens and padded to 77 (the ComfyUI and AUTOMATIC1111 way of feeding long prompts to the
//! text encoder, one row per chunk; AUTOMATIC1111's back-off to the last comma is not done).
//!
//! # Example
//!
//! ```
//! use sd_models::clip::tokenizer::{ClipTokenizer, LongPrompt, PadToken};
//!
//! # let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tokenizer");
//! // `dir` holds vocab.json and merges.txt, as a diffusers model's `tokenizer/` folder does.
//! let sd1 = ClipTokenizer::from_dir(&dir)?;
//! let ids = sd1.encode("a photo of a cat")?;
//! assert_eq!(ids.len(), 77);
//! assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
//! assert_eq!(ids[7], 49407); // SD 1.x pads with <|endoftext|>
//!
//! let sd2 = ClipTokenizer::from_files_with_pad(
//!     dir.join("vocab.json"),
//!     dir.join("merges.txt"),
//!     PadToken::Exclamation,
//! )?;
//! assert_eq!(sd2.encode("a photo of a cat")?[7], 0); // SD 2.x pads with "!", id 0
//!
//! // A long prompt: one 77-id row per 75 tokens instead of truncation.
//! let long = "a red apple, ".repeat(30);
//! assert_eq!(sd1.encode_long(&long, LongPrompt::Chunks)?.len(), 2);
//! assert_eq!(sd1.encode_long(&long, LongPrompt::Truncate)?.len(), 1);
//! # Ok::<(), sd_models::Error>(())
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// The sequence length of every Stable Diffusion CLIP text encoder (`model_max_length` of
/// their tokenizers, `max_position_embeddings` of the encoders).
pub const CONTEXT_LENGTH: usize = 77;

/// The start token, prepended to every prompt (id 49406 in CLIP's vocabulary).
pub const START_OF_TEXT: &str = "<|startoftext|>";

/// The end token, appended to every prompt; also the unknown token and SD 1.x's pad token (id
/// 49407 in CLIP's vocabulary).
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// The suffix the byte-pair model appends to the last piece of a word.
pub const END_OF_WORD_SUFFIX: &str = "</w>";

/// CLIP's pre-tokenisation pattern (transformers' `tokenization_clip.py`, after OpenAI's
/// `SimpleTokenizer`): the special tokens, English contractions, runs of letters, single
/// digits, runs of other non-space characters.
pub const PRE_TOKENIZER_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The special-token roles of transformers' tokenizers (`SPECIAL_TOKENS_ATTRIBUTES`), in the
/// order transformers registers them.
const ROLES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];
const BOS: usize = 0;
const EOS: usize = 1;
const UNK: usize = 2;
const PAD: usize = 4;

/// The token a tokenizer pads with: the one real difference between the SD 1.x and SD 2.x
/// tokenizers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PadToken {
    /// `<|endoftext|>` (id 49407): Stable Diffusion 1.x, and transformers' default.
    #[default]
    EndOfText,
    /// `!` (id 0): Stable Diffusion 2.x (open_clip pads with zeros), and SDXL's second
    /// tokenizer.
    Exclamation,
    /// Any token of the vocabulary, by its text.
    Token(String),
}

impl PadToken {
    /// The token's text.
    pub fn content(&self) -> &str {
        match self {
            PadToken::EndOfText => END_OF_TEXT,
            PadToken::Exclamation => "!",
            PadToken::Token(token) => token,
        }
    }
}

/// The longest `model_max_length` accepted (CLIP's is 77; a longer window is another model).
const MAX_MODEL_LENGTH: usize = 4096;

/// What [`ClipTokenizer::encode_long`] does with a prompt longer than the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LongPrompt {
    /// Keep the first `max_length - 2` tokens (75), as diffusers and transformers do: one row.
    #[default]
    Truncate,
    /// Cut the prompt into chunks of `max_length - 2` tokens, each wrapped in start and end
    /// tokens and padded: one row per chunk (at least one).
    Chunks,
}

/// transformers' CLIP tokenizer; see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    pad_token: String,
    max_length: usize,
    unknown_keys: Vec<String>,
}

/// tokenizer_config.json keys transformers writes that change nothing for CLIP's tokenizer
/// here (besides the special tokens, `added_tokens_decoder`, `model_max_length` and the
/// sides, which are read).
const IGNORED_CONFIG_KEYS: [&str; 23] = [
    "add_prefix_space",
    "backend",
    "add_bos_token",
    "add_eos_token",
    "auto_map",
    "chat_template",
    "clean_up_tokenization_spaces",
    "do_lower_case",
    "errors",
    "from_slow",
    "legacy",
    "model_input_names",
    "name_or_path",
    "processor_class",
    "special_tokens_map_file",
    "split_special_tokens",
    "tokenizer_class",
    "tokenizer_file",
    "use_fast",
    "_commit_hash",
    "max_length",
    "stride",
    "truncation_strategy",
];

impl ClipTokenizer {
    /// Builds the SD 1.x tokenizer (padded with `<|endoftext|>`, 77 ids) from a `vocab.json`
    /// (token to id) and a `merges.txt` (one merge per line, `#version` lines skipped), as
    /// transformers' `CLIPTokenizer` does from a folder holding only those two files.
    ///
    /// # Errors
    /// [`Error::Io`] for a file that cannot be read; [`Error::Config`], naming the file (and
    /// the line of `merges.txt`), for a file that is not a valid vocabulary or merge list or
    /// lacks one of the special tokens; [`Error::Tokenizer`] if the `tokenizers` library
    /// rejects the pipeline.
    pub fn from_files(vocab: impl AsRef<Path>, merges: impl AsRef<Path>) -> Result<Self> {
        Self::build(
            vocab.as_ref(),
            merges.as_ref(),
            SpecialTokens::default(),
            "the defaults",
        )
    }

    /// As [`ClipTokenizer::from_files`], padded with `pad`; `PadToken::Exclamation` gives the
    /// SD 2.x tokenizer. The pad token is registered as a special token, as transformers'
    /// `pad_token=` argument does (see the module documentation for what that means for `!`).
    ///
    /// # Errors
    /// As [`ClipTokenizer::from_files`]; [`Error::Config`] if `pad` is not in the vocabulary.
    pub fn from_files_with_pad(
        vocab: impl AsRef<Path>,
        merges: impl AsRef<Path>,
        pad: PadToken,
    ) -> Result<Self> {
        let mut special = SpecialTokens::default();
        special.set_pad(pad);
        Self::build(
            vocab.as_ref(),
            merges.as_ref(),
            special,
            "the pad token argument",
        )
    }

    /// Builds the tokenizer of a diffusers `tokenizer/` (or `tokenizer_2/`) folder:
    /// `vocab.json` and `merges.txt`, and, when present, `tokenizer_config.json` and
    /// `special_tokens_map.json` for the special tokens (the pad token among them, with their
    /// flags) and `model_max_length`, resolved as transformers 5.23's `from_pretrained`
    /// resolves them: `special_tokens_map.json` is read only when `tokenizer_config.json` has
    /// no `added_tokens_decoder`, and then overrides it. Absent files mean transformers'
    /// defaults, except that a missing `model_max_length` means 77 (transformers would leave
    /// it unbounded). A `tokenizer.json` in the folder is not read.
    ///
    /// # Errors
    /// As [`ClipTokenizer::from_files`]; [`Error::Io`] for a config file that exists but
    /// cannot be read, [`Error::Config`] (naming the file) for one that is not valid JSON or
    /// holds an unusable value: a special token that is not a string or token object or is
    /// outside the vocabulary, a `model_max_length` that is not an integer of at least 3, a
    /// padding or truncation side other than `"right"`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_dir_inner(dir.as_ref(), None)
    }

    /// As [`ClipTokenizer::from_dir`], with the folder's pad token replaced by `pad`, as
    /// transformers' `from_pretrained(dir, pad_token=...)` does.
    ///
    /// # Errors
    /// As [`ClipTokenizer::from_dir`].
    pub fn from_dir_with_pad(dir: impl AsRef<Path>, pad: PadToken) -> Result<Self> {
        Self::from_dir_inner(dir.as_ref(), Some(pad))
    }

    fn from_dir_inner(dir: &Path, pad: Option<PadToken>) -> Result<Self> {
        let special = SpecialTokens::from_dir(dir, pad)?;
        Self::build(
            &dir.join("vocab.json"),
            &dir.join("merges.txt"),
            special,
            "the tokenizer config files",
        )
    }

    fn build(
        vocab_path: &Path,
        merges_path: &Path,
        special: SpecialTokens,
        special_source: &str,
    ) -> Result<Self> {
        let vocab = read_vocab(vocab_path)?;
        let merges = read_merges(merges_path, &vocab)?;
        // A problem with a special token is reported against the config file that set it, or
        // against the vocabulary.
        let at =
            |source: &Option<PathBuf>| source.clone().unwrap_or_else(|| vocab_path.to_path_buf());
        let in_vocab = |content: &str, source: &Option<PathBuf>| -> Result<u32> {
            vocab.get(content).copied().ok_or_else(|| {
                let from = match source {
                    Some(_) => "this file".to_owned(),
                    None => special_source.to_owned(),
                };
                config_error(
                    &at(source),
                    format!(
                        "special token {content:?} (from {from}) is not in the vocabulary {}",
                        vocab_path.display()
                    ),
                )
            })
        };
        let role = |index: usize| -> Result<(String, u32)> {
            let role = &special.roles[index];
            let content = role
                .value
                .as_ref()
                .map(SpecialValue::content)
                .ok_or_else(|| {
                    config_error(
                        &at(&role.source),
                        format!("{} is null: CLIP needs it", role.name),
                    )
                })?;
            Ok((content.to_owned(), in_vocab(content, &role.source)?))
        };
        let ((bos, bos_id), (eos, eos_id), (unk, _), (pad, pad_id)) =
            (role(BOS)?, role(EOS)?, role(UNK)?, role(PAD)?);
        for role in &special.roles {
            if let Some(value) = &role.value {
                in_vocab(value.content(), &role.source)?;
            }
        }
        for token in &special.decoder {
            in_vocab(&token.content, &special.decoder_source)?;
        }
        for (value, source) in &special.extra {
            in_vocab(value.content(), &Some(source.clone()))?;
        }
        let added = special.registrations();

        let model = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(unk)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(END_OF_WORD_SUFFIX.to_owned())
            .fuse_unk(false)
            .build()
            .map_err(|e| tokenizer_error("building the byte-pair model", e))?;
        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(ReplacePattern::Regex(r"\s+".to_owned()), " ")
                .map_err(|e| tokenizer_error("building the normalizer", e))?
                .into(),
            Lowercase.into(),
        ]);
        let pre_tokenizer = PreTokenizerSequence::new(vec![
            Split::new(
                SplitPattern::Regex(PRE_TOKENIZER_PATTERN.to_owned()),
                SplitDelimiterBehavior::Removed,
                true,
            )
            .map_err(|e| tokenizer_error("building the pre-tokenizer", e))?
            .into(),
            ByteLevel::new(false, true, true).into(),
        ]);
        let post_processor = RobertaProcessing::new((eos, eos_id), (bos, bos_id))
            .trim_offsets(false)
            .add_prefix_space(false);

        let mut tokenizer = Tokenizer::new(model);
        // The normalizer goes first: added tokens marked `normalized` are matched in
        // normalized text.
        tokenizer
            .with_normalizer(Some(normalizer))
            .map_err(|e| tokenizer_error("setting the normalizer", e))?;
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_post_processor(Some(post_processor));
        tokenizer
            .add_tokens(added)
            .map_err(|e| tokenizer_error("adding the special tokens", e))?;

        Ok(ClipTokenizer {
            tokenizer,
            bos_id,
            eos_id,
            pad_id,
            pad_token: pad,
            max_length: special.max_length,
            unknown_keys: special.unknown,
        })
    }

    /// The ids of a prompt as diffusers feeds them to the text encoder: start token, at most
    /// `max_length - 2` tokens of the prompt (the rest is dropped), end token, then the pad
    /// token up to `max_length` (77). The empty prompt (diffusers' unconditional input) is
    /// start, end and padding.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the `tokenizers` pipeline fails on the text.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let content = self.content_ids(prompt)?;
        let kept = content.len().min(self.max_length - 2);
        Ok(self.row(&content[..kept]))
    }

    /// Adds `tokens` to the vocabulary as new, normalized tokens (as transformers'
    /// `add_tokens` does for textual inversion), returning their ids, which follow the
    /// existing ones in order.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] for a token already in the vocabulary
    /// (named), an empty token, or a failure of the `tokenizers` pipeline; nothing is added
    /// then.
    pub fn add_tokens(&mut self, tokens: &[String]) -> Result<Vec<u32>> {
        let mut seen = std::collections::HashSet::new();
        for t in tokens {
            if t.trim().is_empty() {
                return Err(Error::Tokenizer("an empty token cannot be added".into()));
            }
            if self.tokenizer.token_to_id(t).is_some() || !seen.insert(t) {
                return Err(Error::Tokenizer(format!(
                    "token {t:?} is already in the vocabulary (give the embedding another token)"
                )));
            }
        }
        let added: Vec<AddedToken> = tokens
            .iter()
            .map(|t| AddedToken::from(t.clone(), false))
            .collect();
        self.tokenizer
            .add_tokens(added)
            .map_err(|e| tokenizer_error("adding tokens", e))?;
        tokens
            .iter()
            .map(|t| {
                self.tokenizer
                    .token_to_id(t)
                    .ok_or_else(|| Error::Tokenizer(format!("token {t:?} was not added")))
            })
            .collect()
    }

    /// The id of a vocabulary entry (`",</w>"`), if the vocabulary has it.
    pub(crate) fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The keys of the folder's tokenizer_config.json that nothing here knows, as
    /// `file: key` (for a warning).
    pub fn unknown_keys(&self) -> &[String] {
        &self.unknown_keys
    }

    /// The number of tokens of a prompt, without start and end tokens: more than
    /// `max_length - 2` (75) are cut by [`encode`](Self::encode) and [`LongPrompt::Truncate`].
    ///
    /// # Errors
    /// As [`ClipTokenizer::encode`].
    pub fn token_count(&self, prompt: &str) -> Result<usize> {
        Ok(self.content_ids(prompt)?.len())
    }

    /// The ids of a prompt with start and end tokens, neither truncated nor padded.
    ///
    /// # Errors
    /// As [`ClipTokenizer::encode`].
    pub fn encode_unpadded(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode_fast(prompt, true)
            .map_err(|e| tokenizer_error("encoding", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// A prompt in chunks of `max_length - 2` (75) tokens, each wrapped in start and end tokens
    /// and padded to `max_length`: one row per chunk, and one row (start, end, padding) for a
    /// prompt without tokens. A prompt that fits gives one row, equal to
    /// [`ClipTokenizer::encode`]'s.
    ///
    /// # Errors
    /// As [`ClipTokenizer::encode`].
    pub fn encode_chunks(&self, prompt: &str) -> Result<Vec<Vec<u32>>> {
        let content = self.content_ids(prompt)?;
        if content.is_empty() {
            return Ok(vec![self.row(&[])]);
        }
        Ok(content
            .chunks(self.max_length - 2)
            .map(|chunk| self.row(chunk))
            .collect())
    }

    /// The rows of `max_length` ids for a prompt: one, truncated, for
    /// [`LongPrompt::Truncate`] (the default, as diffusers); one per 75 tokens for
    /// [`LongPrompt::Chunks`].
    ///
    /// # Errors
    /// As [`ClipTokenizer::encode`].
    pub fn encode_long(&self, prompt: &str, long: LongPrompt) -> Result<Vec<Vec<u32>>> {
        match long {
            LongPrompt::Truncate => Ok(vec![self.encode(prompt)?]),
            LongPrompt::Chunks => self.encode_chunks(prompt),
        }
    }

    /// The number of ids in a row: the config's `model_max_length`, 77 by default.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id of the start token (49406 in CLIP's vocabulary).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The id of the end token (49407 in CLIP's vocabulary).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The id rows are padded with: 49407 for SD 1.x, 0 for SD 2.x.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The text of the pad token.
    pub fn pad_token(&self) -> &str {
        &self.pad_token
    }

    /// The number of tokens in the vocabulary (49408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The id of a token's text, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The `tokenizers` pipeline itself (transformers' `backend_tokenizer`), without padding
    /// or truncation, which [`ClipTokenizer::encode`] applies.
    pub fn pipeline(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The prompt's token ids, without start and end tokens.
    pub(crate) fn content_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode_fast(prompt, false)
            .map_err(|e| tokenizer_error("encoding", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Start, `content`, end, padding to `max_length` (`content` is at most `max_length - 2`).
    pub(crate) fn row(&self, content: &[u32]) -> Vec<u32> {
        let mut row = Vec::with_capacity(self.max_length.max(content.len() + 2));
        row.push(self.bos_id);
        row.extend_from_slice(content);
        row.push(self.eos_id);
        row.resize(self.max_length.max(row.len()), self.pad_id);
        row
    }
}

/// A special token as transformers holds it before registering it: a plain string (which
/// becomes a special, non-normalized added token) or a token with its own flags.
#[derive(Debug, Clone)]
enum SpecialValue {
    Text(String),
    Added(AddedToken),
}

impl SpecialValue {
    fn content(&self) -> &str {
        match self {
            SpecialValue::Text(text) => text,
            SpecialValue::Added(token) => &token.content,
        }
    }
}

/// One special-token role (`bos_token`, ...) and the file that set it.
#[derive(Debug, Clone)]
struct Role {
    name: &'static str,
    /// `None` where the role is unset or null.
    value: Option<SpecialValue>,
    /// The config file that set the value; `None` for the defaults and the pad argument.
    source: Option<PathBuf>,
}

/// The special tokens and the sequence length, from the config files or the defaults.
#[derive(Debug, Clone)]
struct SpecialTokens {
    /// One per entry of [`ROLES`], in that order.
    roles: Vec<Role>,
    /// `added_tokens_decoder` of tokenizer_config.json, by id.
    decoder: Vec<AddedToken>,
    /// The file holding `decoder`.
    decoder_source: Option<PathBuf>,
    /// `additional_special_tokens` / `extra_special_tokens`, with the file of each.
    extra: Vec<(SpecialValue, PathBuf)>,
    max_length: usize,
    /// tokenizer_config.json keys nothing here knows, as `file: key`.
    unknown: Vec<String>,
}

impl Default for SpecialTokens {
    /// transformers' `CLIPTokenizer` defaults.
    fn default() -> Self {
        let text = |s: &str| Some(SpecialValue::Text(s.to_owned()));
        let roles = ROLES
            .iter()
            .enumerate()
            .map(|(i, &name)| {
                let value = match i {
                    BOS => text(START_OF_TEXT),
                    EOS | UNK | PAD => text(END_OF_TEXT),
                    _ => None,
                };
                Role {
                    name,
                    value,
                    source: None,
                }
            })
            .collect();
        SpecialTokens {
            roles,
            decoder: Vec::new(),
            decoder_source: None,
            extra: Vec::new(),
            max_length: CONTEXT_LENGTH,
            unknown: Vec::new(),
        }
    }
}

impl SpecialTokens {
    fn set_pad(&mut self, pad: PadToken) {
        self.roles[PAD].value = Some(SpecialValue::Text(pad.content().to_owned()));
        self.roles[PAD].source = None;
    }

    /// Reads a folder's tokenizer_config.json and special_tokens_map.json, as transformers'
    /// `_from_pretrained` merges them into the tokenizer's arguments.
    fn from_dir(dir: &Path, pad: Option<PadToken>) -> Result<Self> {
        let mut special = SpecialTokens::default();
        let config_path = dir.join("tokenizer_config.json");
        let config = read_optional_json_object(&config_path)?;
        let mut has_decoder = false;
        if let Some(config) = &config {
            let read = [
                "added_tokens_decoder",
                "additional_special_tokens",
                "extra_special_tokens",
                "model_max_length",
                "padding_side",
                "truncation_side",
            ];
            special.unknown = config
                .keys()
                .filter(|k| {
                    !ROLES.contains(&k.as_str())
                        && !read.contains(&k.as_str())
                        && !IGNORED_CONFIG_KEYS.contains(&k.as_str())
                })
                .map(|k| format!("{}: {k}", config_path.display()))
                .collect();
            if let Some(decoder) = config.get("added_tokens_decoder") {
                has_decoder = true;
                special.decoder = parse_added_tokens_decoder(&config_path, decoder)?;
                special.decoder_source = Some(config_path.clone());
            }
            special.read_roles(&config_path, config, false)?;
            special.read_extra(&config_path, config)?;
            if let Some(value) = config.get("model_max_length") {
                special.max_length = value
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|&n| (3..=MAX_MODEL_LENGTH).contains(&n))
                    .ok_or_else(|| {
                        config_error(
                            &config_path,
                            format!(
                                "model_max_length must be an integer from 3 to {MAX_MODEL_LENGTH}, found {value}"
                            ),
                        )
                    })?;
            }
            for key in ["padding_side", "truncation_side"] {
                if let Some(side) = config
                    .get(key)
                    .filter(|side| side.as_str() != Some("right"))
                {
                    return Err(config_error(
                        &config_path,
                        format!("{key} {side} is not supported (only \"right\")"),
                    ));
                }
            }
        }
        // transformers reads special_tokens_map.json only for configs without an
        // added_tokens_decoder (the files of transformers < 4.34).
        if !has_decoder {
            let map_path = dir.join("special_tokens_map.json");
            if let Some(map) = read_optional_json_object(&map_path)? {
                special.read_roles(&map_path, &map, true)?;
                special.read_extra(&map_path, &map)?;
            }
        }
        // from_pretrained's own argument wins over both files.
        if let Some(pad) = pad {
            special.set_pad(pad);
        }
        Ok(special)
    }

    /// The roles a config file sets. In special_tokens_map.json a token object is special
    /// (transformers forces `special=True`); in tokenizer_config.json it keeps its flag.
    fn read_roles(
        &mut self,
        path: &Path,
        object: &Map<String, Value>,
        force_special: bool,
    ) -> Result<()> {
        for role in &mut self.roles {
            if let Some(json) = object.get(role.name) {
                role.value = parse_special_value(path, role.name, json, force_special)?;
                role.source = Some(path.to_path_buf());
            }
        }
        Ok(())
    }

    /// `additional_special_tokens` and `extra_special_tokens` (lists, or objects of named
    /// tokens), appended without repeating a token.
    fn read_extra(&mut self, path: &Path, object: &Map<String, Value>) -> Result<()> {
        for key in ["additional_special_tokens", "extra_special_tokens"] {
            let values: Vec<&Value> = match object.get(key) {
                None | Some(Value::Null) => continue,
                Some(Value::Array(list)) => list.iter().collect(),
                Some(Value::Object(named)) => named.values().collect(),
                Some(other) => {
                    return Err(config_error(
                        path,
                        format!("{key} must be a list, found {other}"),
                    ));
                }
            };
            for json in values {
                let Some(value) = parse_special_value(path, key, json, true)? else {
                    continue;
                };
                if !self
                    .extra
                    .iter()
                    .any(|(v, _)| v.content() == value.content())
                {
                    self.extra.push((value, path.to_path_buf()));
                }
            }
        }
        Ok(())
    }

    /// The added tokens, in the order transformers registers them (TokenizersBackend's
    /// constructor): the `added_tokens_decoder` entries by id, then each role and extra
    /// token whose text is not among them (a plain string as a special, non-normalized
    /// token; a token identical to one already listed only once); the named roles are
    /// special. Registering a text again replaces its flags. (transformers also replaces a
    /// role by the decoder's token of the same text; skipping those texts here has the same
    /// effect.)
    fn registrations(&self) -> Vec<AddedToken> {
        let mut tokens = self.decoder.clone();
        let decoded: HashSet<String> = tokens.iter().map(|t| t.content.clone()).collect();
        let values = self
            .roles
            .iter()
            .filter_map(|role| role.value.as_ref())
            .chain(self.extra.iter().map(|(value, _)| value));
        for value in values {
            if decoded.contains(value.content()) {
                continue;
            }
            match value {
                SpecialValue::Text(text) => tokens.push(AddedToken::from(text.clone(), true)),
                SpecialValue::Added(token) => {
                    if !tokens.contains(token) {
                        tokens.push(token.clone());
                    }
                }
            }
        }
        let named: HashSet<&str> = self
            .roles
            .iter()
            .filter_map(|role| role.value.as_ref().map(SpecialValue::content))
            .collect();
        for token in &mut tokens {
            if named.contains(token.content.as_str()) {
                token.special = true;
            }
        }
        tokens
    }
}

/// A special token in a config file: a string, a token object (`{"content": ..., "lstrip":
/// ..., "normalized": ..., ...}`, with or without `"__type": "AddedToken"`), or null.
fn parse_special_value(
    path: &Path,
    key: &str,
    json: &Value,
    force_special: bool,
) -> Result<Option<SpecialValue>> {
    match json {
        Value::Null => Ok(None),
        Value::String(text) => Ok(Some(SpecialValue::Text(text.clone()))),
        Value::Object(object) => {
            let default_special = if force_special { Some(true) } else { None };
            let token = parse_added_token(path, key, object, default_special)?;
            Ok(Some(SpecialValue::Added(token)))
        }
        other => Err(config_error(
            path,
            format!("{key} must be a string or a token object, found {other}"),
        )),
    }
}

/// `added_tokens_decoder`: an object from id to token object.
fn parse_added_tokens_decoder(path: &Path, json: &Value) -> Result<Vec<AddedToken>> {
    let Value::Object(entries) = json else {
        return Err(config_error(
            path,
            format!("added_tokens_decoder must be an object, found {json}"),
        ));
    };
    let mut tokens = Vec::with_capacity(entries.len());
    for (id, entry) in entries {
        let key = format!("added_tokens_decoder[{id:?}]");
        let id: u32 = id
            .parse()
            .map_err(|_| config_error(path, format!("{key}: the key is not a token id")))?;
        let Value::Object(object) = entry else {
            return Err(config_error(
                path,
                format!("{key} must be a token object, found {entry}"),
            ));
        };
        tokens.push((id, parse_added_token(path, &key, object, None)?));
    }
    tokens.sort_by_key(|(id, _)| *id);
    Ok(tokens.into_iter().map(|(_, token)| token).collect())
}

/// A token object with tokenizers' `AddedToken` defaults for missing flags: not special,
/// normalized unless special, no stripping, not single-word. `force_special` overrides the
/// object's `special`.
fn parse_added_token(
    path: &Path,
    key: &str,
    object: &Map<String, Value>,
    force_special: Option<bool>,
) -> Result<AddedToken> {
    let content = object
        .get("content")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            config_error(
                path,
                format!("{key}: a token object needs a string \"content\""),
            )
        })?;
    let flag = |name: &str| -> Result<Option<bool>> {
        match object.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(config_error(
                path,
                format!("{key}: \"{name}\" must be true or false, found {other}"),
            )),
        }
    };
    let special = match force_special {
        Some(special) => special,
        None => flag("special")?.unwrap_or(false),
    };
    let mut token = AddedToken::from(content, special);
    token.normalized = flag("normalized")?.unwrap_or(!special);
    token.lstrip = flag("lstrip")?.unwrap_or(false);
    token.rstrip = flag("rstrip")?.unwrap_or(false);
    token.single_word = flag("single_word")?.unwrap_or(false);
    Ok(token)
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = crate::files::read_regular(path)?;
    String::from_utf8(bytes).map_err(|e| config_error(path, format!("not UTF-8 text: {e}")))
}

fn read_optional_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.exists() {
        return Ok(None);
    }
    match serde_json::from_str(&read_text(path)?) {
        Ok(Value::Object(object)) => Ok(Some(object)),
        Ok(other) => Err(config_error(
            path,
            format!("expected a JSON object, found {}", json_kind(&other)),
        )),
        Err(e) => Err(config_error(path, format!("not valid JSON: {e}"))),
    }
}

/// vocab.json: a JSON object from token text to id.
fn read_vocab(path: &Path) -> Result<Vocab> {
    let json: Value = serde_json::from_str(&read_text(path)?)
        .map_err(|e| config_error(path, format!("not valid JSON: {e}")))?;
    let Value::Object(entries) = json else {
        return Err(config_error(
            path,
            format!(
                "expected a JSON object from token to id, found {}",
                json_kind(&json)
            ),
        ));
    };
    if entries.is_empty() {
        return Err(config_error(path, "the vocabulary is empty"));
    }
    entries
        .into_iter()
        .map(|(token, id)| {
            let id = id
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    config_error(
                        path,
                        format!("token {token:?} has id {id}, not a 32-bit unsigned integer"),
                    )
                })?;
            Ok((token, id))
        })
        .collect()
}

/// merges.txt: one merge per line, two tokens separated by one space, ranked by order;
/// `#version` lines are skipped. Both tokens and their concatenation must be in the
/// vocabulary.
fn read_merges(path: &Path, vocab: &Vocab) -> Result<Merges> {
    let text = read_text(path)?;
    let mut merges = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.starts_with("#version") {
            continue;
        }
        let line_error =
            |message: String| config_error(path, format!("line {}: {message}", index + 1));
        let mut parts = line.split(' ');
        let (Some(first), Some(second), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(line_error(format!(
                "expected two tokens separated by one space, found {line:?}"
            )));
        };
        let merged = format!("{first}{second}");
        for token in [first, second, merged.as_str()] {
            if !vocab.contains_key(token) {
                return Err(line_error(format!(
                    "the merge {line:?} uses {token:?}, which is not in the vocabulary"
                )));
            }
        }
        merges.push((first.to_owned(), second.to_owned()));
    }
    Ok(merges)
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn config_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Config {
        what: path.display().to_string(),
        message: message.into(),
    }
}

fn tokenizer_error(what: &str, error: tokenizers::Error) -> Error {
    Error::Tokenizer(format!("{what}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_token_texts() {
        assert_eq!(PadToken::default(), PadToken::EndOfText);
        assert_eq!(PadToken::EndOfText.content(), END_OF_TEXT);
        assert_eq!(PadToken::Exclamation.content(), "!");
        assert_eq!(PadToken::Token("x".into()).content(), "x");
    }

    #[test]
    fn strings_become_special_unnormalized_tokens_and_the_last_registration_wins() {
        let mut special = SpecialTokens::default();
        let normalized = AddedToken::from(END_OF_TEXT, false);
        special.roles[EOS].value = Some(SpecialValue::Added(normalized.clone()));
        let tokens = special.registrations();
        let contents: Vec<&str> = tokens.iter().map(|t| t.content.as_str()).collect();
        // bos (string), eos (object), unk and pad (strings: registered again, the flags of
        // the last registration win).
        assert_eq!(
            contents,
            [START_OF_TEXT, END_OF_TEXT, END_OF_TEXT, END_OF_TEXT]
        );
        assert!(tokens[1].normalized && tokens[1].special);
        assert!(!tokens[3].normalized && tokens[3].special);
    }
}

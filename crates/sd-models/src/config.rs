//! Reading model config files (`config.json` of diffusers and transformers components) with
//! every key checked: a key the model does not know is an error naming it and the file, not
//! something silently ignored. Keys that every transformers or diffusers config may carry
//! (bookkeeping, generation defaults) are known and ignored.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Keys any diffusers or transformers config may carry that say nothing about the network.
const BOOKKEEPING: &[&str] = &[
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "_commit_hash",
    "_use_default_values",
    "architectures",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "model_type",
    // transformers 4.x wrote every PretrainedConfig attribute.
    "add_cross_attention",
    "bad_words_ids",
    "begin_suppress_tokens",
    "chunk_size_feed_forward",
    "cross_attention_hidden_size",
    "decoder_start_token_id",
    "diversity_penalty",
    "do_sample",
    "early_stopping",
    "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty",
    "finetuning_task",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "gradient_checkpointing",
    "id2label",
    "is_decoder",
    "is_encoder_decoder",
    "label2id",
    "length_penalty",
    "max_length",
    "min_length",
    "no_repeat_ngram_size",
    "num_beam_groups",
    "num_beams",
    "num_return_sequences",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "prefix",
    "problem_type",
    "pruned_heads",
    "remove_invalid_values",
    "repetition_penalty",
    "return_dict",
    "return_dict_in_generate",
    "sep_token_id",
    "suppress_tokens",
    "task_specific_params",
    "temperature",
    "tf_legacy_loss",
    "tie_encoder_decoder",
    "tie_word_embeddings",
    "tokenizer_class",
    "top_k",
    "top_p",
    "torchscript",
    "typical_p",
    "use_bfloat16",
    "use_cache",
];

/// Parses a config's JSON text into `T`, after checking that every key is one of `known` or a
/// bookkeeping key. `what` names the config in errors (usually its path).
///
/// # Errors
/// [`Error::Config`] for malformed JSON, an unknown key, or a value of the wrong type.
pub(crate) fn parse<T: DeserializeOwned>(json: &str, what: &str, known: &[&str]) -> Result<T> {
    let config_error = |message: String| Error::Config {
        what: what.to_string(),
        message,
    };
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| config_error(e.to_string()))?;
    let Some(map) = value.as_object() else {
        return Err(config_error("expected a JSON object".into()));
    };
    let unknown: Vec<&str> = map
        .keys()
        .map(String::as_str)
        .filter(|k| !known.contains(k) && !BOOKKEEPING.contains(k))
        .collect();
    if !unknown.is_empty() {
        return Err(config_error(format!("unknown key(s) {unknown:?}")));
    }
    serde_json::from_value(value).map_err(|e| config_error(e.to_string()))
}

/// The largest sizes a network config may ask for: far past every released model, and small
/// enough that building the network cannot overflow or exhaust memory before loading its
/// weights fails.
pub(crate) const MAX_BLOCKS: usize = 16;
/// See [`MAX_BLOCKS`].
pub(crate) const MAX_CHANNELS: usize = 1 << 16;
/// See [`MAX_BLOCKS`].
pub(crate) const MAX_LAYERS: usize = 64;
/// See [`MAX_BLOCKS`].
pub(crate) const MAX_SAMPLE_SIZE: usize = 1 << 16;

/// Checks a network's block count, widths, layers per block and sample size against the
/// bounds above; `layers` and `sample` may be empty.
///
/// # Errors
/// [`Error::Config`] naming the key, its value and the bound.
pub(crate) fn check_network_bounds(
    what: &str,
    channels: &[usize],
    layers: &[usize],
    sample: &[usize],
) -> Result<()> {
    let error = |key: &str, value: usize, max: usize| {
        Err(Error::Config {
            what: what.to_string(),
            message: format!("{key} = {value} is more than the supported {max}"),
        })
    };
    if channels.len() > MAX_BLOCKS {
        return error("the number of blocks", channels.len(), MAX_BLOCKS);
    }
    if let Some(&c) = channels.iter().find(|&&c| c > MAX_CHANNELS) {
        return error("block_out_channels", c, MAX_CHANNELS);
    }
    if let Some(&l) = layers.iter().find(|&&l| l > MAX_LAYERS) {
        return error("layers_per_block", l, MAX_LAYERS);
    }
    if let Some(&s) = sample.iter().find(|&&s| s > MAX_SAMPLE_SIZE) {
        return error("sample_size", s, MAX_SAMPLE_SIZE);
    }
    Ok(())
}

/// Reads and parses a config file; see [`parse`].
///
/// # Errors
/// [`Error::Io`] if the file cannot be read; as [`parse`].
pub(crate) fn read<T: DeserializeOwned>(path: &Path, known: &[&str]) -> Result<T> {
    let text = crate::files::read_regular_string(path)?;
    parse(&text, &path.display().to_string(), known)
}

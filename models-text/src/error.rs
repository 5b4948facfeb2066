//! Typed errors of the text-encoding crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading a text encoder or a tokenizer, or while
/// tokenizing prompts.
///
/// Every variant names the file or the configuration key at fault, so that a message read in
/// a log says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file could not be read (missing, unreadable).
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or a key has the wrong type.
    #[error("{path}: invalid config: {message}")]
    ConfigParse {
        /// The config file (or `<memory>` when parsed from a string).
        path: PathBuf,
        /// serde_json's message, which names the key and the line.
        message: String,
    },
    /// `config.json` asks for something this crate does not implement, or holds a value
    /// that cannot be right (zero heads, …).
    #[error("unsupported config: `{key}` = {value}: {reason}")]
    UnsupportedConfig {
        /// The config key at fault, e.g. `feed_forward_proj`.
        key: &'static str,
        /// Its value as written in the file.
        value: String,
        /// What is supported instead.
        reason: String,
    },
    /// A tokenizer file could not be loaded: malformed JSON or protobuf, a value of the wrong
    /// type, or a definition the `tokenizers` crate rejects.
    #[error("{path}: cannot load tokenizer: {message}")]
    TokenizerLoad {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong (the `tokenizers` crate's message, or the key or byte at fault).
        message: String,
    },
    /// A folder holds none of the tokenizer files.
    #[error("no tokenizer in {dir}: looked for {looked_for}")]
    NoTokenizer {
        /// The folder.
        dir: PathBuf,
        /// The files looked for.
        looked_for: &'static str,
    },
    /// The folder's tokenizer is of a class this crate does not build.
    #[error("{path}: unsupported tokenizer {class}: only CLIPTokenizer and T5Tokenizer are built")]
    UnsupportedTokenizer {
        /// The file naming the class (`tokenizer_config.json` or `tokenizer.json`).
        path: PathBuf,
        /// The class or model found.
        class: String,
    },
    /// A line of `merges.txt` is not a merge of two vocabulary tokens.
    #[error("{path}, line {line}: bad merge: {reason}")]
    BadMerges {
        /// The merges file.
        path: PathBuf,
        /// The line, counted from 1 (the `#version` line included).
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The tokenizer lacks a special token the pipeline needs.
    #[error(
        "the tokenizer has no `{token}` token (T5 tokenizers define `<pad>` and `</s>`, CLIP \
         tokenizers `<|startoftext|>` and `<|endoftext|>`)"
    )]
    MissingSpecialToken {
        /// The token, e.g. `<pad>`.
        token: String,
    },
    /// Tokenizing a prompt failed inside the `tokenizers` crate.
    #[error("cannot tokenize prompt #{index}: {message}")]
    Tokenize {
        /// Index of the prompt in the batch.
        index: usize,
        /// The `tokenizers` crate's message.
        message: String,
    },
    /// A tokenizer setting was invalid (e.g. `max_length` 0).
    #[error("invalid tokenizer setting `{key}`: {reason}")]
    InvalidTokenizerSetting {
        /// The setting, e.g. `max_length`.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// A token id is outside the text encoder's vocabulary (tokenizer and encoder do not
    /// belong together).
    #[error(
        "prompt #{index} has token id {id}, but the text encoder's vocabulary has {vocab_size} \
         entries: the tokenizer and the text encoder do not belong together"
    )]
    TokenOutOfVocab {
        /// Index of the prompt in the batch.
        index: usize,
        /// The token id.
        id: u32,
        /// `vocab_size` of the text encoder.
        vocab_size: usize,
    },
    /// A sequence the text encoder cannot take: empty, or longer than its position table.
    #[error(
        "a sequence of {length} tokens: the text encoder takes 1 to {max_position_embeddings} \
         (`max_position_embeddings`)"
    )]
    SequenceLength {
        /// The sequence length given.
        length: usize,
        /// The encoder's `max_position_embeddings`.
        max_position_embeddings: usize,
    },
    /// Loading the weights failed (missing or unused key, wrong shape, unreadable or pickle
    /// file); the inner error names the key or the file.
    #[error("loading text-encoder weights: {0}")]
    Weights(#[from] weights::WeightError),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, TextError>;

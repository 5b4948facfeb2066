//! The tokenization step of the PixArt pipelines: preprocess, tokenize, truncate and pad
//! (see [`PromptTokenizer`]).

use std::path::{Path, PathBuf};

use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::error::{Result, TextError};

/// Maximum sequence length of PixArt-α's text encoding (`max_sequence_length` default).
pub const PIXART_ALPHA_MAX_LENGTH: usize = 120;
/// Maximum sequence length of PixArt-Σ's text encoding (`max_sequence_length` default).
pub const PIXART_SIGMA_MAX_LENGTH: usize = 300;

/// T5's padding token.
pub const PAD_TOKEN: &str = "<pad>";

/// PixArt's `_text_preprocessing(text, clean_caption=False)`: Python's `text.lower().strip()`.
///
/// `lower()` is Unicode full lowercasing; Rust's [`str::to_lowercase`] is the same mapping,
/// final sigma included (the two may differ on characters added in a Unicode version one of
/// them does not know yet). `strip()` removes what Python's `str.isspace` calls whitespace:
/// Unicode `White_Space` plus the ASCII separators U+001C..U+001F, which Rust's
/// [`str::trim`] would keep.
pub fn preprocess_prompt(text: &str) -> String {
    let is_py_space = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    text.to_lowercase().trim_matches(is_py_space).to_string()
}

/// transformers' `clean_up_tokenization` (T5's `tokenizer_config.json` has
/// `clean_up_tokenization_spaces: true`): removes the space before `.`, `?`, `!`, `,` and a
/// few English contractions, in that order.
pub fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

/// What was cut from one prompt that did not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// Index of the prompt in the batch.
    pub index: usize,
    /// Number of tokens (with `</s>`) before truncation.
    pub num_tokens_untruncated: usize,
    /// The cut-off tokens decoded, as diffusers logs them: ids
    /// `untruncated[max_length − 1 .. len − 1]` (the final `</s>` excluded), decoded with
    /// special tokens kept and tokenization spaces cleaned up.
    pub removed_text: String,
    /// The maximum length that was applied.
    pub max_length: usize,
}

impl Truncation {
    /// diffusers' warning text, as it logs it for a batch of this one prompt (the removed
    /// part in a Python list repr).
    pub fn message(&self) -> String {
        format!(
            "The following part of your input was truncated because T5 can only handle \
             sequences up to {} tokens: [{}]",
            self.max_length,
            python_str_repr(&self.removed_text)
        )
    }
}

/// Python's `repr` of a string, for the ASCII control characters and quotes that matter in a
/// log line (other non-printable characters are rare in prompts and printed as they are).
fn python_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Token ids and attention masks of a batch of prompts, each padded or cut to `max_length`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompts {
    /// `[batch][max_length]` token ids.
    pub input_ids: Vec<Vec<u32>>,
    /// `[batch][max_length]`: 1 on real tokens (including a `<pad>` or `</s>` typed in the
    /// prompt), 0 on padding.
    pub attention_mask: Vec<Vec<u32>>,
    /// One entry per prompt that was longer than `max_length`.
    pub truncations: Vec<Truncation>,
    /// The length every row has.
    pub max_length: usize,
}

impl TokenizedPrompts {
    /// Number of prompts.
    pub fn batch_size(&self) -> usize {
        self.input_ids.len()
    }

    /// The ids, row-major `[batch · max_length]`, as `i64` (what an `Int` tensor takes).
    pub fn input_ids_flat(&self) -> Vec<i64> {
        self.input_ids.iter().flatten().map(|&x| x as i64).collect()
    }

    /// The mask, row-major `[batch · max_length]`, as `bool` (`true` = real token).
    pub fn attention_mask_flat(&self) -> Vec<bool> {
        self.attention_mask.iter().flatten().map(|&x| x != 0).collect()
    }
}

/// A T5 tokenizer (`tokenizer.json`) set up the way the PixArt pipelines call it: padding
/// and truncation to a fixed `max_length`, `</s>` appended by the file's post-processor.
///
/// `PixArtAlphaPipeline.encode_prompt` (and PixArt-Σ's, which is the same) does, with
/// `clean_caption=False`:
///
/// 1. `_text_preprocessing`: `text.lower().strip()` ([`preprocess_prompt`]);
/// 2. `tokenizer(text, padding="max_length", max_length=L, truncation=True,
///    add_special_tokens=True)`: ids, `</s>` appended, cut to `L` (the last kept token is
///    still `</s>`), padded with `<pad>` (id 0) to `L`, and an attention mask of 1s on the
///    real tokens ([`PromptTokenizer::tokenize`]); `L` = 120 for PixArt-α, 300 for PixArt-Σ;
/// 3. a warning naming the cut-off text when a prompt was longer than `L`.
///
/// # Which tokenizer definition is used
///
/// transformers 5's `T5Tokenizer` ignores the normalizer, pre-tokenizer and decoder stored in
/// `tokenizer.json` and rebuilds them from the vocabulary (a `Precompiled` charsmap if there
/// is one, `WhitespaceSplit` + `Metaspace`). This crate loads `tokenizer.json` with the
/// `tokenizers` crate as it is, so it agrees with transformers only for files whose stored
/// pipeline is the rebuilt one — true for the fixture, whose file was built to match and is
/// checked id for id (`tests/tokenizer.rs`), and for the `tokenizer.json` that transformers 5
/// writes when it saves a T5 tokenizer (it saves its rebuilt backend). A checkpoint that ships
/// only `spiece.model` needs a `tokenizer.json` made once that way.
///
/// # The truncation warning
///
/// diffusers logs `"The following part of your input was truncated because T5 can only
/// handle sequences up to {L} tokens: {removed}"`. Here the tokenizer **returns** what was cut
/// ([`Truncation`], in [`TokenizedPrompts::truncations`]) so that the pipeline or a test can
/// see it, and [`encode_prompts`](crate::encode_prompts) emits it with `log::warn!` (target
/// `models_text::encode`), one line per truncated prompt. diffusers decodes the cut-off part of the
/// whole batch at once (so a shorter prompt in the same batch shows as a run of `<pad>`);
/// here each prompt reports its own part only.
#[derive(Clone)]
pub struct PromptTokenizer {
    /// The file as loaded, with no truncation or padding (to measure what gets cut).
    plain: Tokenizer,
    /// The same with truncation and padding to `max_length`.
    fixed: Tokenizer,
    max_length: usize,
    pad_id: u32,
    path: PathBuf,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("path", &self.path)
            .field("max_length", &self.max_length)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

impl PromptTokenizer {
    /// Loads `tokenizer.json` and pads/truncates to `max_length`
    /// ([`PIXART_ALPHA_MAX_LENGTH`] or [`PIXART_SIGMA_MAX_LENGTH`]).
    ///
    /// Errors: the file is missing or unreadable ([`TextError::Io`]), the `tokenizers` crate
    /// rejects it ([`TextError::TokenizerLoad`]), it has no `<pad>` token
    /// ([`TextError::MissingSpecialToken`]), or `max_length` is 0.
    pub fn from_file(path: impl AsRef<Path>, max_length: usize) -> Result<Self> {
        let path = path.as_ref();
        // Read it ourselves first: a missing file then says "cannot read <path>".
        let bytes = std::fs::read(path)
            .map_err(|source| TextError::Io { path: path.to_path_buf(), source })?;
        let plain = Tokenizer::from_bytes(&bytes).map_err(|e| TextError::TokenizerLoad {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_tokenizer(plain, max_length, path.to_path_buf())
    }

    /// Loads `<dir>/tokenizer.json`, e.g. the `tokenizer/` folder of a diffusers pipeline.
    pub fn from_dir(dir: impl AsRef<Path>, max_length: usize) -> Result<Self> {
        Self::from_file(dir.as_ref().join("tokenizer.json"), max_length)
    }

    fn from_tokenizer(mut plain: Tokenizer, max_length: usize, path: PathBuf) -> Result<Self> {
        if max_length == 0 {
            return Err(TextError::InvalidTokenizerSetting {
                key: "max_length",
                reason: "must be at least 1 (room for `</s>`)".into(),
            });
        }
        let pad_id = plain
            .token_to_id(PAD_TOKEN)
            .ok_or_else(|| TextError::MissingSpecialToken { token: PAD_TOKEN.into() })?;
        // Whatever the file says about truncation and padding, the pipeline's call decides.
        plain.with_padding(None);
        plain
            .with_truncation(None)
            .map_err(|e| TextError::TokenizerLoad { path: path.clone(), message: e.to_string() })?;
        let mut fixed = plain.clone();
        fixed
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| TextError::InvalidTokenizerSetting {
                key: "max_length",
                reason: e.to_string(),
            })?;
        fixed.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: PAD_TOKEN.into(),
        }));
        Ok(Self { plain, fixed, max_length, pad_id, path })
    }

    /// Returns the same tokenizer with another `max_length`.
    pub fn with_max_length(&self, max_length: usize) -> Result<Self> {
        Self::from_tokenizer(self.plain.clone(), max_length, self.path.clone())
    }

    /// The length every tokenized row has.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id of `<pad>`.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The underlying `tokenizers` tokenizer, as loaded (no padding, no truncation).
    pub fn inner(&self) -> &Tokenizer {
        &self.plain
    }

    /// Preprocesses ([`preprocess_prompt`]) and tokenizes each prompt, padded and cut to
    /// `max_length`, and reports what was cut (see [`PromptTokenizer`]).
    pub fn tokenize<S: AsRef<str>>(&self, prompts: &[S]) -> Result<TokenizedPrompts> {
        let mut out = TokenizedPrompts {
            input_ids: Vec::with_capacity(prompts.len()),
            attention_mask: Vec::with_capacity(prompts.len()),
            truncations: Vec::new(),
            max_length: self.max_length,
        };
        for (index, prompt) in prompts.iter().enumerate() {
            let text = preprocess_prompt(prompt.as_ref());
            let err = |e: tokenizers::Error| TextError::Tokenize { index, message: e.to_string() };
            let enc = self.fixed.encode(text.as_str(), true).map_err(err)?;
            debug_assert_eq!(enc.get_ids().len(), self.max_length);
            out.input_ids.push(enc.get_ids().to_vec());
            out.attention_mask.push(enc.get_attention_mask().to_vec());
            let untruncated = self.plain.encode(text.as_str(), true).map_err(err)?;
            let ids = untruncated.get_ids();
            // diffusers: warn when the untruncated ids are at least as long and differ.
            if ids.len() > self.max_length {
                let removed = &ids[self.max_length - 1..ids.len() - 1];
                let removed_text = self.plain.decode(removed, false).map_err(err)?;
                out.truncations.push(Truncation {
                    index,
                    num_tokens_untruncated: ids.len(),
                    removed_text: clean_up_tokenization(&removed_text),
                    max_length: self.max_length,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_is_python_lower_strip() {
        assert_eq!(preprocess_prompt("  A Photo\tof a CAT\n"), "a photo\tof a cat");
        // U+001F is whitespace to Python's str.strip, not to Rust's str::trim.
        assert_eq!(preprocess_prompt("\u{1f}x\u{1c}"), "x");
        // U+00A0 and U+3000 are whitespace to both.
        assert_eq!(preprocess_prompt("\u{a0}ＡＢ\u{3000}"), "ａｂ");
        // Final sigma, as Python's str.lower.
        assert_eq!(preprocess_prompt("ΟΔΟΣ"), "οδος");
    }

    #[test]
    fn python_repr_quotes_like_python() {
        assert_eq!(python_str_repr("a b"), "'a b'");
        assert_eq!(python_str_repr("it's"), "\"it's\"");
        assert_eq!(python_str_repr("it's \"x\""), "'it\\'s \"x\"'");
        assert_eq!(python_str_repr("a\tb\\"), "'a\\tb\\\\'");
    }

    #[test]
    fn clean_up_matches_transformers() {
        assert_eq!(clean_up_tokenization("a , b . c ! d ? e n't"), "a, b. c! d? en't");
    }
}

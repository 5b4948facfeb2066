//! The tokenization step of the PixArt and Stable Diffusion pipelines: preprocess, tokenize,
//! truncate and pad (see [`PromptTokenizer`]), with the tokenizer built from whatever files the
//! folder holds.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::error::{Result, TextError};
use crate::sentencepiece_model::SentencePieceModel;
use crate::tokenization_clip::{ClipBpe, build_clip_tokenizer, clip_decoded_text};
use crate::tokenization_t5::{T5Source, build_t5_tokenizer};
use crate::tokenizer_config::{SpecialTokens, TokenizerConfigFiles};

/// Maximum sequence length of PixArt-α's text encoding (`max_sequence_length` default).
pub const PIXART_ALPHA_MAX_LENGTH: usize = 120;
/// Maximum sequence length of PixArt-Σ's text encoding (`max_sequence_length` default).
pub const PIXART_SIGMA_MAX_LENGTH: usize = 300;

/// The sequence length of the SD pipelines' CLIP tokenizers (`model_max_length` in their
/// `tokenizer_config.json`; CLIP's position table has 77 rows).
pub const CLIP_MAX_LENGTH: usize = 77;

/// T5's padding token.
pub const PAD_TOKEN: &str = "<pad>";

/// The files [`PromptTokenizer::from_dir`] looks for, in its order of preference.
pub const TOKENIZER_FILES: &str =
    "tokenizer.json, or vocab.json + merges.txt (CLIP), or spiece.model (T5)";

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

/// Which tokenizer a folder holds, and so which pipeline's conventions
/// [`PromptTokenizer::tokenize`] follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// T5 (`T5Tokenizer`, a SentencePiece Unigram), as the PixArt pipelines call it: the prompt
    /// lowercased and stripped first, `</s>` appended, padded with `<pad>`.
    T5,
    /// CLIP (`CLIPTokenizer`, a byte-level BPE), as the Stable Diffusion pipelines call it: the
    /// prompt as it is, `<|startoftext|> … <|endoftext|>`, padded with the folder's pad token to
    /// `model_max_length` (77).
    Clip,
}

impl TokenizerKind {
    /// The encoder's name as diffusers writes it in its truncation warning.
    pub fn encoder_name(self) -> &'static str {
        match self {
            TokenizerKind::T5 => "T5",
            TokenizerKind::Clip => "CLIP",
        }
    }
}

/// What was cut from one prompt that did not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// Index of the prompt in the batch.
    pub index: usize,
    /// Number of tokens (with the special tokens) before truncation.
    pub num_tokens_untruncated: usize,
    /// The cut-off tokens decoded, as diffusers logs them: ids
    /// `untruncated[max_length − 1 .. len − 1]` (the final eos excluded), decoded with
    /// special tokens kept, as the tokenizer decodes (T5: tokenization spaces cleaned up when
    /// `clean_up_tokenization_spaces`; CLIP: `</w>` as spaces, stripped).
    pub removed_text: String,
    /// The maximum length that was applied.
    pub max_length: usize,
    /// The tokenizer's kind (the warning names the encoder).
    pub kind: TokenizerKind,
}

impl Truncation {
    /// diffusers' warning text, as it logs it for a batch of this one prompt (the removed
    /// part in a Python list repr).
    pub fn message(&self) -> String {
        format!(
            "The following part of your input was truncated because {} can only handle \
             sequences up to {} tokens: [{}]",
            self.kind.encoder_name(),
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
    /// `[batch][max_length]`: 1 on real tokens (including special tokens typed in the
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

/// A tokenizer set up the way the diffusion pipelines call it: padding and truncation to a
/// fixed `max_length`, the special tokens added by the post-processor.
///
/// # T5 (PixArt)
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
/// # CLIP (Stable Diffusion 1.x/2.x, SDXL)
///
/// `StableDiffusionPipeline.encode_prompt` (SDXL's, for each of its two tokenizers) does
/// `tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
/// truncation=True)`: no preprocessing, `<|startoftext|>` first and `<|endoftext|>` last (kept
/// when cut: 75 text tokens at most), padded with the folder's pad token (`<|endoftext|>` in SD
/// 1.5, `!` = id 0 in SD 2.x and SDXL's `tokenizer_2`); the same warning when a prompt was cut.
/// [`PromptTokenizer::clip_from_dir`] takes `max_length` from the folder.
///
/// # Which files, and which tokenizer definition
///
/// [`PromptTokenizer::from_dir`] reads the folder as transformers 5.24's
/// `AutoTokenizer.from_pretrained` does: `tokenizer_config.json`'s `tokenizer_class` picks
/// CLIP or T5 (without it, the files do: a BPE `tokenizer.json` or `vocab.json` + `merges.txt`
/// mean CLIP, a Unigram `tokenizer.json` or `spiece.model` mean T5); the vocabulary comes from
/// `tokenizer.json` when there is one, else from the slow files; and the normalizer,
/// pre-tokenizer, post-processor and decoder are **rebuilt** as transformers' `CLIPTokenizer` /
/// `T5Tokenizer` build them (see `tokenization_clip.rs`, `tokenization_t5.rs`), ignoring those
/// stored in `tokenizer.json`, with the special and added tokens of the configuration files
/// resolved as transformers resolves them (`tokenizer_config.rs`). So any folder that loads in
/// transformers gives its ids. Checked id for id against transformers 5.24 on the fixtures
/// (`tests/integration/tokenizer.rs`, `tests/integration/tokenizer_files.rs`).
///
/// [`PromptTokenizer::from_file`] loads one `tokenizer.json` as it is (T5, for files whose
/// stored pipeline is transformers' own, such as those transformers 5 writes).
///
/// # The truncation warning
///
/// diffusers logs `"The following part of your input was truncated because T5 can only
/// handle sequences up to {L} tokens: {removed}"` (`CLIP` for the SD pipelines). Here the
/// tokenizer **returns** what was cut ([`Truncation`], in [`TokenizedPrompts::truncations`]) so
/// that the pipeline or a test can see it, and [`encode_prompts`](crate::encode_prompts) emits
/// it with `log::warn!` (target `models_text::encode`), one line per truncated prompt. diffusers
/// decodes the cut-off part of the whole batch at once (so a shorter prompt in the same batch
/// shows as a run of padding); here each prompt reports its own part only.
#[derive(Clone)]
pub struct PromptTokenizer {
    /// The tokenizer as built, with no truncation or padding (to measure what gets cut).
    plain: Tokenizer,
    /// The same with truncation and padding to `max_length`.
    fixed: Tokenizer,
    max_length: usize,
    kind: TokenizerKind,
    pad_token: String,
    pad_id: u32,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    model_max_length: Option<usize>,
    /// Whether the removed text is cleaned up (`clean_up_tokenization_spaces`, and for CLIP
    /// also transformers' BPE override).
    clean_up: bool,
    path: PathBuf,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("max_length", &self.max_length)
            .field("pad_token", &self.pad_token)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

/// The settings a tokenizer is wrapped with, besides the tokenizer itself.
struct Settings {
    kind: TokenizerKind,
    pad_token: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    model_max_length: Option<usize>,
    clean_up: bool,
}

fn read_tokenizer_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| TextError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text)
        .map_err(|e| TextError::TokenizerLoad { path: path.to_path_buf(), message: e.to_string() })
}

/// `tokenizer_class` → kind (`…Fast` names the same class in transformers 5).
fn kind_of_class(class: &str, path: &Path) -> Result<TokenizerKind> {
    match class.strip_suffix("Fast").unwrap_or(class) {
        "CLIPTokenizer" => Ok(TokenizerKind::Clip),
        "T5Tokenizer" => Ok(TokenizerKind::T5),
        other => Err(TextError::UnsupportedTokenizer {
            path: path.to_path_buf(),
            class: other.to_string(),
        }),
    }
}

impl PromptTokenizer {
    /// Loads one `tokenizer.json` as it is, as a T5 tokenizer, and pads/truncates to
    /// `max_length` ([`PIXART_ALPHA_MAX_LENGTH`] or [`PIXART_SIGMA_MAX_LENGTH`]); the removed
    /// text of a truncation is cleaned up as T5's configuration asks.
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
        let settings = Settings {
            kind: TokenizerKind::T5,
            pad_token: PAD_TOKEN.into(),
            bos_token: None,
            eos_token: Some("</s>".into()),
            model_max_length: None,
            clean_up: true,
        };
        Self::from_tokenizer(plain, max_length, path.to_path_buf(), settings)
    }

    /// Loads the tokenizer of a folder (e.g. a diffusers pipeline's `tokenizer/`), CLIP or
    /// T5, from `tokenizer.json` or the slow files, exactly as transformers 5.24 would (see
    /// [`PromptTokenizer`]), padded and cut to `max_length`.
    ///
    /// # Errors
    /// [`TextError::NoTokenizer`] naming the folder and the files looked for when it has none
    /// of them; [`TextError::UnsupportedTokenizer`] for a `tokenizer_class` other than CLIP's
    /// or T5's; [`TextError::Io`] naming a missing half (`merges.txt` beside `vocab.json`);
    /// [`TextError::BadMerges`] naming the line of a bad merge; [`TextError::TokenizerLoad`]
    /// naming the file for anything else malformed; `max_length` 0.
    pub fn from_dir(dir: impl AsRef<Path>, max_length: usize) -> Result<Self> {
        let dir = dir.as_ref();
        let files = TokenizerConfigFiles::read(dir)?;
        let json_path = dir.join("tokenizer.json");
        let (vocab_path, merges_path) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let spiece_path = dir.join("spiece.model");
        let json = if json_path.is_file() { Some(read_tokenizer_json(&json_path)?) } else { None };
        let kind = match files.tokenizer_class() {
            Some(class) => kind_of_class(class, &files.config_path)?,
            None => match &json {
                Some(j) => match j.pointer("/model/type").and_then(Value::as_str) {
                    Some("BPE") => TokenizerKind::Clip,
                    Some("Unigram") => TokenizerKind::T5,
                    other => {
                        return Err(TextError::UnsupportedTokenizer {
                            path: json_path,
                            class: format!("a {} model", other.unwrap_or("model without type")),
                        });
                    }
                },
                None if vocab_path.is_file() || merges_path.is_file() => TokenizerKind::Clip,
                None if spiece_path.is_file() => TokenizerKind::T5,
                None => {
                    return Err(TextError::NoTokenizer {
                        dir: dir.to_path_buf(),
                        looked_for: TOKENIZER_FILES,
                    });
                }
            },
        };
        let added = json.as_ref().and_then(|j| j.get("added_tokens")).and_then(Value::as_array);
        let mut specials =
            SpecialTokens::resolve(&files, added.map(|a| (json_path.as_path(), a.as_slice())))?;
        let (tokenizer, source) = match kind {
            TokenizerKind::Clip => {
                let (bpe, source) = match &json {
                    Some(j) => (ClipBpe::from_tokenizer_json(j, &json_path)?, json_path.clone()),
                    None if vocab_path.is_file() || merges_path.is_file() => {
                        (ClipBpe::from_files(&vocab_path, &merges_path)?, vocab_path.clone())
                    }
                    None => {
                        return Err(TextError::NoTokenizer {
                            dir: dir.to_path_buf(),
                            looked_for: "tokenizer.json, or vocab.json + merges.txt (CLIP)",
                        });
                    }
                };
                (build_clip_tokenizer(bpe, &mut specials, &source)?, source)
            }
            TokenizerKind::T5 => {
                let extra_ids = files.integer("extra_ids")?.unwrap_or(100);
                let (t5, source) = match &json {
                    Some(j) => (
                        T5Source::from_tokenizer_json(j, &json_path, &specials)?,
                        json_path.clone(),
                    ),
                    None if spiece_path.is_file() => {
                        let model = SentencePieceModel::from_file(&spiece_path)?;
                        (
                            T5Source::from_spiece(&model, extra_ids, &spiece_path)?,
                            spiece_path.clone(),
                        )
                    }
                    None => {
                        return Err(TextError::NoTokenizer {
                            dir: dir.to_path_buf(),
                            looked_for: "tokenizer.json, or spiece.model (T5)",
                        });
                    }
                };
                (build_t5_tokenizer(t5, &mut specials, extra_ids, &source)?, source)
            }
        };
        let content = |key: &str| specials.get(key).map(|t| t.content().to_string());
        let clean_up = files.clean_up_tokenization_spaces()
            && (kind == TokenizerKind::T5 || files.clean_up_for_bpe());
        let settings = Settings {
            kind,
            pad_token: content("pad_token").unwrap_or_else(|| PAD_TOKEN.into()),
            bos_token: content("bos_token"),
            eos_token: content("eos_token"),
            model_max_length: files.model_max_length(),
            clean_up,
        };
        Self::from_tokenizer(tokenizer, max_length, source, settings)
    }

    /// A CLIP tokenizer folder (SD's `tokenizer/`, SDXL's `tokenizer_2/`) padded and cut to its
    /// `model_max_length` ([`CLIP_MAX_LENGTH`] when the folder does not say), as the SD
    /// pipelines call it.
    ///
    /// # Errors
    /// As [`PromptTokenizer::from_dir`]; [`TextError::UnsupportedTokenizer`] when the folder
    /// holds a T5 tokenizer.
    pub fn clip_from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tok = Self::from_dir(dir, CLIP_MAX_LENGTH)?;
        if tok.kind != TokenizerKind::Clip {
            return Err(TextError::UnsupportedTokenizer {
                path: dir.to_path_buf(),
                class: "T5Tokenizer (a CLIP tokenizer was expected)".into(),
            });
        }
        match tok.model_max_length {
            Some(n) if n != CLIP_MAX_LENGTH => tok.with_max_length(n),
            _ => Ok(tok),
        }
    }

    fn from_tokenizer(
        mut plain: Tokenizer,
        max_length: usize,
        path: PathBuf,
        settings: Settings,
    ) -> Result<Self> {
        if max_length == 0 {
            return Err(TextError::InvalidTokenizerSetting {
                key: "max_length",
                reason: "must be at least 1 (room for the end-of-sequence token)".into(),
            });
        }
        let pad_id = plain
            .token_to_id(&settings.pad_token)
            .ok_or_else(|| TextError::MissingSpecialToken { token: settings.pad_token.clone() })?;
        let bos_id = settings.bos_token.as_deref().and_then(|t| plain.token_to_id(t));
        let eos_id = settings.eos_token.as_deref().and_then(|t| plain.token_to_id(t));
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
            pad_token: settings.pad_token.clone(),
        }));
        Ok(Self {
            plain,
            fixed,
            max_length,
            kind: settings.kind,
            pad_token: settings.pad_token,
            pad_id,
            bos_id,
            eos_id,
            model_max_length: settings.model_max_length,
            clean_up: settings.clean_up,
            path,
        })
    }

    /// Returns the same tokenizer with another `max_length`.
    pub fn with_max_length(&self, max_length: usize) -> Result<Self> {
        let settings = Settings {
            kind: self.kind,
            pad_token: self.pad_token.clone(),
            bos_token: None,
            eos_token: None,
            model_max_length: self.model_max_length,
            clean_up: self.clean_up,
        };
        let mut out =
            Self::from_tokenizer(self.plain.clone(), max_length, self.path.clone(), settings)?;
        out.bos_id = self.bos_id;
        out.eos_id = self.eos_id;
        Ok(out)
    }

    /// The length every tokenized row has.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// CLIP or T5.
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// `model_max_length` of `tokenizer_config.json`, if the folder has one (77 for SD's CLIP
    /// tokenizers).
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    /// The padding token (`<pad>` for T5; `<|endoftext|>` or `!` for CLIP).
    pub fn pad_token(&self) -> &str {
        &self.pad_token
    }

    /// The id of the padding token.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The id of the beginning-of-sequence token (`<|startoftext|>`; T5 has none).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The id of the end-of-sequence token (`</s>`, `<|endoftext|>`).
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// The file the vocabulary was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying `tokenizers` tokenizer, as built (no padding, no truncation).
    pub fn inner(&self) -> &Tokenizer {
        &self.plain
    }

    /// The pipeline's preprocessing of a prompt: [`preprocess_prompt`] for T5 (PixArt), none
    /// for CLIP (the SD pipelines tokenize the prompt as given).
    pub fn preprocess(&self, prompt: &str) -> String {
        match self.kind {
            TokenizerKind::T5 => preprocess_prompt(prompt),
            TokenizerKind::Clip => prompt.to_string(),
        }
    }

    /// Preprocesses ([`PromptTokenizer::preprocess`]) and tokenizes each prompt, padded and
    /// cut to `max_length`, and reports what was cut (see [`PromptTokenizer`]).
    pub fn tokenize<S: AsRef<str>>(&self, prompts: &[S]) -> Result<TokenizedPrompts> {
        let mut out = TokenizedPrompts {
            input_ids: Vec::with_capacity(prompts.len()),
            attention_mask: Vec::with_capacity(prompts.len()),
            truncations: Vec::new(),
            max_length: self.max_length,
        };
        for (index, prompt) in prompts.iter().enumerate() {
            let text = self.preprocess(prompt.as_ref());
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
                let decoded = self.plain.decode(removed, false).map_err(err)?;
                let decoded = match self.kind {
                    TokenizerKind::T5 => decoded,
                    TokenizerKind::Clip => clip_decoded_text(&decoded),
                };
                let removed_text =
                    if self.clean_up { clean_up_tokenization(&decoded) } else { decoded };
                out.truncations.push(Truncation {
                    index,
                    num_tokens_untruncated: ids.len(),
                    removed_text,
                    max_length: self.max_length,
                    kind: self.kind,
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

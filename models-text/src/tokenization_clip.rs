//! The CLIP tokenizer as transformers 5.24's `CLIPTokenizer.__init__`
//! (`models/clip/tokenization_clip.py`) builds it, from `vocab.json` + `merges.txt` or from the
//! vocabulary and merges of a `tokenizer.json`.
//!
//! | part | transformers 5.24 |
//! |---|---|
//! | model | `BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk)` |
//! | normalizer | `Sequence[NFC, Replace(Regex(r"\s+"), " "), Lowercase]` |
//! | pre-tokenizer | `Sequence[Split(Regex(`[`CLIP_PATTERN`]`), "removed", invert=True), ByteLevel(add_prefix_space=False)]` |
//! | post-processor | `RobertaProcessing((eos, eos_id), (bos, bos_id), trim_offsets=False, add_prefix_space=False)`: `<bos> … <eos>` |
//! | decoder | `ByteLevel`, then `</w>` → `" "` and `strip()` (its wrapped `decode`) |
//!
//! In transformers 5 `CLIPTokenizer` *is* the `tokenizers`-backed class (the Python "slow"
//! `CLIPTokenizer` of transformers 4, which split CJK characters one by one and could run
//! `ftfy`, is gone); this builds the same pipeline with the same Rust library, so the only
//! room for a difference is the regex engine (`onig` in Python's `tokenizers`, `fancy-regex`
//! here), checked on the fixture prompts (`tests/integration/tokenizer_files.rs`). A `tokenizer.json` is
//! not loaded as it is: like transformers, only its vocabulary and merges are taken and the
//! pipeline above is rebuilt around them.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

use crate::error::{Result, TextError};
use crate::tokenizer_config::SpecialTokens;

/// transformers 5.24's CLIP pre-tokenisation pattern: the two special tokens, English
/// contractions, runs of letters, single digits, runs of other non-space characters.
pub const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The vocabulary and merges of a CLIP BPE.
pub(crate) struct ClipBpe {
    pub vocab: HashMap<String, u32>,
    pub merges: Vec<(String, String)>,
}

fn load_err(path: &Path, message: impl Into<String>) -> TextError {
    TextError::TokenizerLoad { path: path.to_path_buf(), message: message.into() }
}

fn vocab_from_object(
    map: &serde_json::Map<String, Value>,
    path: &Path,
) -> Result<HashMap<String, u32>> {
    map.iter()
        .map(|(token, id)| {
            let id = id.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| {
                load_err(path, format!("vocabulary entry {token:?}: the id {id} is not a token id"))
            })?;
            Ok((token.clone(), id))
        })
        .collect()
}

/// Checks what `tokenizers`' BPE builder checks, naming the merge: both halves and their
/// concatenation are in the vocabulary.
fn check_merge(vocab: &HashMap<String, u32>, a: &str, b: &str) -> std::result::Result<(), String> {
    for token in [a, b, &format!("{a}{b}")] {
        if !vocab.contains_key(token) {
            return Err(format!("token {token:?} is not in the vocabulary"));
        }
    }
    Ok(())
}

impl ClipBpe {
    /// Reads `vocab.json` (`{token: id}`) and `merges.txt` (an optional `#version` line, then
    /// one `left right` pair per line, as `tokenizers` reads it: exactly one space, no blank
    /// lines).
    ///
    /// # Errors
    /// [`TextError::Io`] for a missing file; [`TextError::TokenizerLoad`] for a `vocab.json`
    /// that is not an object of integer ids; [`TextError::BadMerges`] naming the file and the
    /// line of a merge that does not parse or names a token outside the vocabulary.
    pub(crate) fn from_files(vocab_path: &Path, merges_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(vocab_path)
            .map_err(|source| TextError::Io { path: vocab_path.to_path_buf(), source })?;
        let vocab = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(map)) => vocab_from_object(&map, vocab_path)?,
            Ok(_) => return Err(load_err(vocab_path, "expected a JSON object of token → id")),
            Err(e) => return Err(load_err(vocab_path, e.to_string())),
        };
        let text = std::fs::read_to_string(merges_path)
            .map_err(|source| TextError::Io { path: merges_path.to_path_buf(), source })?;
        let mut merges = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.starts_with("#version") {
                continue;
            }
            let bad = |reason: String| TextError::BadMerges {
                path: merges_path.to_path_buf(),
                line: i + 1,
                reason,
            };
            let parts: Vec<&str> = line.split(' ').collect();
            let [a, b] = parts.as_slice() else {
                return Err(bad(format!(
                    "expected two tokens separated by one space, found {line:?}"
                )));
            };
            check_merge(&vocab, a, b).map_err(bad)?;
            merges.push((a.to_string(), b.to_string()));
        }
        Ok(Self { vocab, merges })
    }

    /// The `model.vocab` and `model.merges` of a `tokenizer.json` whose model is a BPE
    /// (merges as `"left right"` strings or `[left, right]` pairs).
    pub(crate) fn from_tokenizer_json(json: &Value, path: &Path) -> Result<Self> {
        let model = json.get("model").ok_or_else(|| load_err(path, "no `model`"))?;
        let vocab = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or_else(|| load_err(path, "`model.vocab` must be an object of token → id"))?;
        let vocab = vocab_from_object(vocab, path)?;
        let list = model
            .get("merges")
            .and_then(Value::as_array)
            .ok_or_else(|| load_err(path, "`model.merges` must be a list"))?;
        let mut merges = Vec::with_capacity(list.len());
        for (i, m) in list.iter().enumerate() {
            let pair: Option<(String, String)> = match m {
                Value::String(s) => {
                    let parts: Vec<&str> = s.split(' ').collect();
                    match parts.as_slice() {
                        [a, b] => Some((a.to_string(), b.to_string())),
                        _ => None,
                    }
                }
                Value::Array(p) => match p.as_slice() {
                    [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                    _ => None,
                },
                _ => None,
            };
            let (a, b) = pair
                .ok_or_else(|| load_err(path, format!("`model.merges[{i}]` is not a pair: {m}")))?;
            check_merge(&vocab, &a, &b)
                .map_err(|e| load_err(path, format!("`model.merges[{i}]`: {e}")))?;
            merges.push((a, b));
        }
        Ok(Self { vocab, merges })
    }
}

/// The named token `key` (`bos_token`, …) as a string.
fn content<'a>(specials: &'a SpecialTokens, key: &str) -> Option<&'a str> {
    specials.get(key).map(|t| t.content())
}

/// Builds the tokenizer `CLIPTokenizer.__init__` builds; `specials` are the folder's special
/// tokens ([`SpecialTokens::resolve`]), completed here with CLIP's defaults (`<|endoftext|>`
/// for unk, eos and pad, `<|startoftext|>` for bos).
pub(crate) fn build_clip_tokenizer(
    bpe: ClipBpe,
    specials: &mut SpecialTokens,
    path: &Path,
) -> Result<Tokenizer> {
    specials.set_default("bos_token", "<|startoftext|>");
    specials.set_default("eos_token", "<|endoftext|>");
    specials.set_default("unk_token", "<|endoftext|>");
    specials.set_default("pad_token", "<|endoftext|>");
    let unk = content(specials, "unk_token").unwrap_or("<|endoftext|>").to_string();
    let model = BPE::builder()
        .vocab_and_merges(bpe.vocab.into_iter().collect::<Vocab>(), bpe.merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .fuse_unk(false)
        .unk_token(unk)
        .build()
        .map_err(|e| load_err(path, e.to_string()))?;
    let mut tokenizer = Tokenizer::new(model);
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
        .map_err(|e| load_err(path, e.to_string()))?;
    tokenizer
        .with_normalizer(Some(Sequence::new(vec![NFC.into(), whitespace.into(), Lowercase.into()])))
        .map_err(|e| load_err(path, e.to_string()))?;
    let split =
        Split::new(SplitPattern::Regex(CLIP_PATTERN.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(|e| load_err(path, e.to_string()))?;
    tokenizer.with_pre_tokenizer(Some(PreSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    // `additional_special_tokens` stands in for `extra_special_tokens` when that is absent.
    let extra = specials.extra.clone().or_else(|| specials.additional.clone()).unwrap_or_default();
    tokenizer
        .add_tokens(specials.tokens_to_add(&extra))
        .map_err(|e| load_err(path, e.to_string()))?;
    let id = |key: &str| -> Result<(String, u32)> {
        let token = content(specials, key).unwrap_or_default().to_string();
        let id = tokenizer
            .token_to_id(&token)
            .or_else(|| content(specials, "unk_token").and_then(|u| tokenizer.token_to_id(u)))
            .ok_or_else(|| TextError::MissingSpecialToken { token: token.clone() })?;
        Ok((token, id))
    };
    let (eos, bos) = (id("eos_token")?, id("bos_token")?);
    tokenizer.with_post_processor(Some(
        RobertaProcessing::new(eos, bos).trim_offsets(false).add_prefix_space(false),
    ));
    Ok(tokenizer)
}

/// transformers' `CLIPTokenizer.decode` of a token list: the byte-level decoding, each `</w>`
/// a space, the ends stripped (Python's `str.strip`).
pub(crate) fn clip_decoded_text(decoded: &str) -> String {
    let is_py_space = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    decoded.replace("</w>", " ").trim_matches(is_py_space).to_string()
}

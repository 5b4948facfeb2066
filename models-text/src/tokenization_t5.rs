//! The T5 tokenizer as transformers 5.24 builds it (`models/t5/tokenization_t5.py`,
//! `T5Tokenizer.__init__`, fed by `TokenizersBackend._convert_from_sentencepiece`, the
//! `SentencePieceExtractor` and `T5Converter.convert_from_spm` of
//! `convert_slow_tokenizer.py`), from `spiece.model` or from the vocabulary and charsmap of a
//! `tokenizer.json`.
//!
//! | part | transformers 5.24 |
//! |---|---|
//! | model | `Unigram(vocab, unk_id=2, byte_fallback=False)`; from `spiece.model` the vocabulary is the pieces with their scores followed by `<extra_id_{extra_ids-1}>` … `<extra_id_0>` (score 0) |
//! | normalizer | `Precompiled(charsmap)` when the model has a charsmap, none otherwise |
//! | pre-tokenizer | `Sequence[WhitespaceSplit, Metaspace("▁", prepend_scheme="always", split=True)]` |
//! | post-processor | `TemplateProcessing("$A </s>")` with `</s>` = the eos id |
//! | decoder | `Metaspace("▁", "always", split=True)` |
//! | added tokens | the special tokens (`</s>`, `<unk>`, `<pad>` by default) and the sentinels `<extra_id_N>` |
//!
//! # Which implementation this equals
//!
//! transformers 5's `T5Tokenizer` is `tokenizers`-backed only (there is no SentencePiece-backed
//! T5 class any more), and the above is what its `from_pretrained` runs on a folder with only
//! `spiece.model` (it needs `protobuf` to read the file; this crate reads it itself,
//! `sentencepiece_model.rs`). That is **not** what `sentencepiece.SentencePieceProcessor`
//! gives: transformers ignores the model's `add_dummy_prefix`, `remove_extra_whitespaces` and
//! `escape_whitespaces` flags and `SpmConverter`'s own normalizer (it splits on Unicode
//! whitespace instead), matches `<pad>`/`</s>`/`<unk>` typed in the text as special tokens,
//! and hard-codes `unk_id` 2. The fixture records where the two differ
//! (`tools/fixtures/README.md`); this crate follows transformers.

use std::path::Path;

use serde_json::Value;
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Result, TextError};
use crate::sentencepiece_model::{PieceType, SentencePieceModel};
use crate::tokenizer_config::{SpecialTokens, TokenValue};

/// `T5Tokenizer`'s hard-coded unknown id.
pub const T5_UNK_ID: usize = 2;

fn load_err(path: &Path, message: impl Into<String>) -> TextError {
    TextError::TokenizerLoad { path: path.to_path_buf(), message: message.into() }
}

/// What the T5 tokenizer is built from.
pub(crate) struct T5Source {
    /// `(piece, score)` in id order.
    pub vocab: Vec<(String, f64)>,
    /// The `Precompiled` normalizer of the model's charsmap.
    pub normalizer: Option<Precompiled>,
    /// The `additional_special_tokens` argument `T5Tokenizer.__init__` receives.
    pub additional_special_tokens: Option<Vec<TokenValue>>,
}

impl T5Source {
    /// From `spiece.model`: the pieces, the sentinels appended (`T5Converter.convert_from_spm`),
    /// and the control and user-defined pieces as `additional_special_tokens`
    /// (`SentencePieceExtractor.extract`: not normalized, special for control pieces).
    pub(crate) fn from_spiece(
        model: &SentencePieceModel,
        extra_ids: i64,
        path: &Path,
    ) -> Result<Self> {
        let mut vocab = model.vocab_scores();
        vocab.extend((0..extra_ids.max(0)).rev().map(|i| (format!("<extra_id_{i}>"), 0.0)));
        let added = model
            .pieces
            .iter()
            .filter(|p| matches!(p.piece_type, PieceType::Control | PieceType::UserDefined))
            .map(|p| {
                let special = p.piece_type == PieceType::Control;
                TokenValue::Added(AddedToken::from(p.piece.clone(), special).normalized(false))
            })
            .collect();
        let normalizer = match &model.precompiled_charsmap {
            Some(bytes) => Some(
                Precompiled::from(bytes)
                    .map_err(|e| load_err(path, format!("precompiled charsmap: {e}")))?,
            ),
            None => None,
        };
        Ok(Self { vocab, normalizer, additional_special_tokens: Some(added) })
    }

    /// From a `tokenizer.json` whose model is a Unigram: `model.vocab` (`[piece, score]`
    /// pairs) and the `Precompiled` normalizer's charsmap, alone or in a `Sequence`.
    pub(crate) fn from_tokenizer_json(
        json: &Value,
        path: &Path,
        specials: &SpecialTokens,
    ) -> Result<Self> {
        let list = json
            .pointer("/model/vocab")
            .and_then(Value::as_array)
            .ok_or_else(|| load_err(path, "`model.vocab` must be a list of [piece, score]"))?;
        let mut vocab = Vec::with_capacity(list.len());
        for (i, entry) in list.iter().enumerate() {
            let pair = entry.as_array().map(Vec::as_slice);
            let Some([Value::String(piece), score]) = pair else {
                return Err(load_err(path, format!("`model.vocab[{i}]` is not [piece, score]")));
            };
            let score = score.as_f64().ok_or_else(|| {
                load_err(path, format!("`model.vocab[{i}]`: the score is not a number"))
            })?;
            vocab.push((piece.clone(), score));
        }
        let normalizer = match json.get("normalizer") {
            None | Some(Value::Null) => None,
            Some(n) => precompiled_normalizer(n, path)?,
        };
        Ok(Self { vocab, normalizer, additional_special_tokens: specials.additional.clone() })
    }
}

/// The `Precompiled` normalizer (decoded by the `tokenizers` crate's own deserializer),
/// looked for at the top or inside a `Sequence`, as transformers does; any other normalizer
/// is dropped, as transformers drops it.
fn precompiled_normalizer(normalizer: &Value, path: &Path) -> Result<Option<Precompiled>> {
    let candidates: Vec<&Value> = match normalizer.get("type").and_then(Value::as_str) {
        Some("Sequence") => normalizer
            .get("normalizers")
            .and_then(Value::as_array)
            .map(|v| v.iter().collect())
            .unwrap_or_default(),
        _ => vec![normalizer],
    };
    for n in candidates {
        if n.get("type").and_then(Value::as_str) == Some("Precompiled")
            && n.get("precompiled_charsmap").is_some()
        {
            // From text: its deserializer borrows the base64 string.
            let p: Precompiled = serde_json::from_str(&n.to_string())
                .map_err(|e| load_err(path, format!("`normalizer`: {e}")))?;
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// Builds the tokenizer `T5Tokenizer.__init__` builds; `specials` are the folder's special
/// tokens, completed here with T5's defaults (`</s>`, `<unk>`, `<pad>`) and its sentinel
/// logic: the `additional_special_tokens` argument gets `<extra_id_0..extra_ids>` unless it
/// already holds sentinels (then their number must be `extra_ids`); it becomes the extra
/// special tokens only if the files gave no `extra_special_tokens`.
pub(crate) fn build_t5_tokenizer(
    source: T5Source,
    specials: &mut SpecialTokens,
    extra_ids: i64,
    path: &Path,
) -> Result<Tokenizer> {
    specials.set_default("eos_token", "</s>");
    specials.set_default("unk_token", "<unk>");
    specials.set_default("pad_token", "<pad>");
    let sentinels = || (0..extra_ids.max(0)).map(|i| TokenValue::Str(format!("<extra_id_{i}>")));
    let additional = match source.additional_special_tokens {
        Some(mut list) => {
            let n = list.iter().filter(|t| t.content().contains("<extra_id_")).count();
            if n < 1 {
                list.extend(sentinels());
            } else if extra_ids > 0 && extra_ids as usize != n {
                return Err(load_err(
                    path,
                    format!(
                        "`extra_ids` is {extra_ids} but `additional_special_tokens` holds {n} \
                         <extra_id_N> tokens (transformers refuses this too)"
                    ),
                ));
            }
            list
        }
        None => sentinels().collect(),
    };
    let extra = specials.extra.clone().unwrap_or(additional);

    let model = Unigram::from(source.vocab, Some(T5_UNK_ID), false)
        .map_err(|e| load_err(path, format!("Unigram model: {e}")))?;
    let mut tokenizer = Tokenizer::new(model);
    if let Some(normalizer) = source.normalizer {
        tokenizer.with_normalizer(Some(normalizer)).map_err(|e| load_err(path, e.to_string()))?;
    }
    tokenizer.with_pre_tokenizer(Some(PreSequence::new(vec![
        WhitespaceSplit.into(),
        Metaspace::new('▁', PrependScheme::Always, true).into(),
    ])));
    tokenizer.with_decoder(Some(MetaspaceDecoder::new('▁', PrependScheme::Always, true)));
    tokenizer
        .add_tokens(specials.tokens_to_add(&extra))
        .map_err(|e| load_err(path, e.to_string()))?;
    let eos = specials.get("eos_token").map(|t| t.content().to_string()).unwrap_or_default();
    let eos_id = tokenizer
        .token_to_id(&eos)
        .ok_or_else(|| TextError::MissingSpecialToken { token: eos.clone() })?;
    let template = TemplateProcessing::builder()
        .try_single("$A </s>")
        .and_then(|b| b.try_pair("$A </s> $B </s>"))
        .map_err(|e| load_err(path, e.to_string()))?
        .special_tokens(vec![("</s>".to_string(), eos_id)])
        .build()
        .map_err(|e| load_err(path, e.to_string()))?;
    tokenizer.with_post_processor(Some(template));
    Ok(tokenizer)
}

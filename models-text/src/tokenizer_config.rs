//! The configuration files of a tokenizer folder (`tokenizer_config.json`,
//! `special_tokens_map.json`, `added_tokens.json`, and the `added_tokens` of a
//! `tokenizer.json`) and how transformers 5.24 turns them into the special and added tokens of
//! the tokenizer (`PreTrainedTokenizerBase._from_pretrained` and `__init__`,
//! `TokenizersBackend.__init__`).
//!
//! The result matters for the ids: an added token is matched in the raw text (or, when
//! `normalized`, in the normalized text) before the model sees it, so `<|endoftext|>` typed in
//! a prompt is one token, and SD 2's / SDXL's pad token `!` (id 0) splits every `!` out of a
//! prompt. transformers' order and its equality rules decide which flags a token ends up with
//! when the files name it more than once (SD 1.5's files name `<|endoftext|>` as eos and unk
//! with `normalized: true` and as pad by a plain string: the string, added last, wins and the
//! token is not normalized). This module reproduces that sequence and hands it to the
//! `tokenizers` crate's `add_tokens`, the same code transformers' backend runs.
//!
//! Not reproduced: model-specific special tokens (other `*_token` keys) are taken in the
//! files' key order sorted by name (JSON objects are read into sorted maps), which differs
//! from transformers only if two of them share a content with different flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tokenizers::AddedToken;

use crate::error::{Result, TextError};

/// transformers' `SPECIAL_TOKENS_ATTRIBUTES`, in its order.
pub(crate) const SPECIAL_TOKENS_ATTRIBUTES: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// A special token as the files give it: a plain string, or an `AddedToken` with its flags.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TokenValue {
    /// A string (becomes `AddedToken(content, special=True)` when added).
    Str(String),
    /// An `AddedToken`.
    Added(AddedToken),
}

impl TokenValue {
    pub(crate) fn content(&self) -> &str {
        match self {
            TokenValue::Str(s) => s,
            TokenValue::Added(t) => &t.content,
        }
    }
}

/// `AddedToken(**obj)` as Python's `tokenizers` builds it: missing flags are false, except
/// `normalized`, which defaults to `not special`. `special_override` replaces `special`.
fn added_token_from_object(
    obj: &Map<String, Value>,
    special_override: Option<bool>,
    path: &Path,
    key: &str,
) -> Result<AddedToken> {
    let bad = |message: String| TextError::TokenizerLoad { path: path.to_path_buf(), message };
    let content = obj
        .get("content")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("`{key}`: an added token needs a string `content`")))?;
    let flag = |name: &str| -> Result<Option<bool>> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(bad(format!("`{key}`: `{name}` must be a boolean, not {other}"))),
        }
    };
    let special = match special_override {
        Some(s) => s,
        None => flag("special")?.unwrap_or(false),
    };
    Ok(AddedToken {
        content: content.to_string(),
        single_word: flag("single_word")?.unwrap_or(false),
        lstrip: flag("lstrip")?.unwrap_or(false),
        rstrip: flag("rstrip")?.unwrap_or(false),
        normalized: flag("normalized")?.unwrap_or(!special),
        special,
    })
}

/// A token value of `tokenizer_config.json` after transformers' `convert_added_tokens`: a
/// string, or a `{"__type": "AddedToken", …}` object (special unless it says otherwise:
/// false). `None` for `null`.
fn config_token(value: &Value, path: &Path, key: &str) -> Result<Option<TokenValue>> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(TokenValue::Str(s.clone()))),
        Value::Object(obj) => {
            Ok(Some(TokenValue::Added(added_token_from_object(obj, None, path, key)?)))
        }
        other => Err(TextError::TokenizerLoad {
            path: path.to_path_buf(),
            message: format!("`{key}` must be a string or an added token, not {other}"),
        }),
    }
}

fn read_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|source| TextError::Io { path: path.to_path_buf(), source })?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(TextError::TokenizerLoad {
            path: path.to_path_buf(),
            message: "expected a JSON object".into(),
        }),
        Err(e) => {
            Err(TextError::TokenizerLoad { path: path.to_path_buf(), message: e.to_string() })
        }
    }
}

/// The JSON configuration files of a tokenizer folder, as read (each optional).
#[derive(Debug, Clone)]
pub(crate) struct TokenizerConfigFiles {
    /// `tokenizer_config.json` (empty when absent).
    pub config: Map<String, Value>,
    /// Its path (for messages).
    pub config_path: PathBuf,
    /// `special_tokens_map.json`.
    pub special_tokens_map: Option<(PathBuf, Map<String, Value>)>,
    /// `added_tokens.json` (`{token: id}`).
    pub added_tokens: Option<(PathBuf, Map<String, Value>)>,
}

impl TokenizerConfigFiles {
    /// Reads whichever of the files `dir` holds.
    pub(crate) fn read(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_object(&config_path)?.unwrap_or_default();
        let stm_path = dir.join("special_tokens_map.json");
        let special_tokens_map = read_json_object(&stm_path)?.map(|m| (stm_path, m));
        let at_path = dir.join("added_tokens.json");
        let added_tokens = read_json_object(&at_path)?.map(|m| (at_path, m));
        Ok(Self { config, config_path, special_tokens_map, added_tokens })
    }

    /// `tokenizer_class`, if the config names one.
    pub(crate) fn tokenizer_class(&self) -> Option<&str> {
        self.config.get("tokenizer_class").and_then(Value::as_str)
    }

    /// `model_max_length`, if set (transformers' "very large integer" default otherwise).
    pub(crate) fn model_max_length(&self) -> Option<usize> {
        self.config.get("model_max_length").and_then(Value::as_u64).map(|n| n as usize)
    }

    /// `clean_up_tokenization_spaces` (transformers 5 default: false).
    pub(crate) fn clean_up_tokenization_spaces(&self) -> bool {
        self.config.get("clean_up_tokenization_spaces").and_then(Value::as_bool).unwrap_or(false)
    }

    /// `clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output` (default
    /// false): without it transformers 5 skips the clean-up for BPE models (CLIP).
    pub(crate) fn clean_up_for_bpe(&self) -> bool {
        self.config
            .get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// An integer setting (e.g. T5's `extra_ids`).
    pub(crate) fn integer(&self, key: &'static str) -> Result<Option<i64>> {
        match self.config.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| TextError::TokenizerLoad {
                path: self.config_path.clone(),
                message: format!("`{key}` must be an integer, not {v}"),
            }),
        }
    }
}

/// The special and added tokens of a tokenizer, as `PreTrainedTokenizerBase._from_pretrained`
/// hands them to the tokenizer class.
#[derive(Debug, Clone, Default)]
pub(crate) struct SpecialTokens {
    /// The named special tokens (`bos_token`, …, then model-specific `*_token`s), as given.
    pub named: Vec<(String, TokenValue)>,
    /// `extra_special_tokens` (formerly `additional_special_tokens`), if the files give any.
    pub extra: Option<Vec<TokenValue>>,
    /// The legacy `additional_special_tokens` left beside `extra_special_tokens` (T5's
    /// `__init__` parameter; see `tokenization_t5`).
    pub additional: Option<Vec<TokenValue>>,
    /// `added_tokens_decoder`: id → token, sorted by id.
    pub added_tokens_decoder: BTreeMap<u32, AddedToken>,
}

impl SpecialTokens {
    /// Resolves the files' tokens (`_from_pretrained`). `tokenizer_json_added` holds the
    /// `added_tokens` of the folder's `tokenizer.json`, if it has one (used when the config
    /// has no `added_tokens_decoder`, as transformers does).
    pub(crate) fn resolve(
        files: &TokenizerConfigFiles,
        tokenizer_json_added: Option<(&Path, &[Value])>,
    ) -> Result<Self> {
        let path = files.config_path.as_path();
        let mut config = files.config.clone();
        config.remove("tokenizer_class");
        // V5: `additional_special_tokens` becomes `extra_special_tokens`.
        let extra_truthy = |c: &Map<String, Value>| {
            c.get("extra_special_tokens").is_some_and(|v| match v {
                Value::Null => false,
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
                _ => true,
            })
        };
        if config.contains_key("additional_special_tokens") && !extra_truthy(&config) {
            let v = config.remove("additional_special_tokens").unwrap_or(Value::Null);
            config.insert("extra_special_tokens".into(), v);
        }

        let mut decoder: BTreeMap<u32, AddedToken> = BTreeMap::new();
        let mut by_content: BTreeMap<String, AddedToken> = BTreeMap::new();
        // Values set by special_tokens_map.json, already AddedTokens (special) or strings.
        let mut overrides: BTreeMap<String, Value> = BTreeMap::new();
        let mut override_tokens: BTreeMap<String, TokenValue> = BTreeMap::new();
        let mut extra_from_map: Vec<TokenValue> = Vec::new();
        if let Some(atd) = config.get("added_tokens_decoder") {
            let atd = atd.as_object().ok_or_else(|| TextError::TokenizerLoad {
                path: path.to_path_buf(),
                message: "`added_tokens_decoder` must be an object of id → token".into(),
            })?;
            for (idx, token) in atd {
                let id: u32 = idx.parse().map_err(|_| TextError::TokenizerLoad {
                    path: path.to_path_buf(),
                    message: format!("`added_tokens_decoder`: `{idx}` is not a token id"),
                })?;
                let obj = token.as_object().ok_or_else(|| TextError::TokenizerLoad {
                    path: path.to_path_buf(),
                    message: format!("`added_tokens_decoder.{idx}` must be an object"),
                })?;
                let t = added_token_from_object(obj, None, path, "added_tokens_decoder")?;
                by_content.insert(t.content.clone(), t.clone());
                decoder.insert(id, t);
            }
        } else {
            // Legacy: special_tokens_map.json overrides the config's named tokens.
            if let Some((stm_path, stm)) = &files.special_tokens_map {
                for (key, value) in stm {
                    if key == "extra_special_tokens" {
                        if let Value::Array(list) = value {
                            for v in list {
                                let t =
                                    match v {
                                        Value::Object(o) => TokenValue::Added(
                                            added_token_from_object(o, Some(true), stm_path, key)?,
                                        ),
                                        other => match config_token(other, stm_path, key)? {
                                            Some(t) => t,
                                            None => continue,
                                        },
                                    };
                                if !extra_from_map.contains(&t) {
                                    extra_from_map.push(t);
                                }
                            }
                        }
                        continue;
                    }
                    match value {
                        Value::Object(o) => {
                            let t = added_token_from_object(o, Some(true), stm_path, key)?;
                            override_tokens.insert(key.clone(), TokenValue::Added(t));
                        }
                        other => {
                            overrides.insert(key.clone(), other.clone());
                        }
                    }
                }
            }
            // added_tokens.json: {token: id}; special when a named or extra token says so.
            if let Some((at_path, at)) = &files.added_tokens {
                let mut special: Vec<String> = Vec::new();
                for key in SPECIAL_TOKENS_ATTRIBUTES {
                    if let Some(t) = override_tokens.get(key) {
                        special.push(t.content().to_string());
                    } else if let Some(Value::String(s)) = overrides.get(key).or(config.get(key)) {
                        special.push(s.clone());
                    }
                }
                if let Some(Value::Array(list)) = config.get("extra_special_tokens") {
                    special.extend(list.iter().filter_map(|v| v.as_str().map(str::to_string)));
                }
                special.extend(extra_from_map.iter().map(|t| t.content().to_string()));
                for (content, id) in at {
                    let id = id.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(|| {
                        TextError::TokenizerLoad {
                            path: at_path.clone(),
                            message: format!("`{content}`: the id must be an integer"),
                        }
                    })?;
                    let is_special = special.contains(content);
                    let t = AddedToken::from(content.clone(), is_special)
                        .normalized(!is_special)
                        .special(is_special);
                    by_content.insert(content.clone(), t.clone());
                    decoder.insert(id, t);
                }
            }
            // tokenizer.json's own added tokens.
            if let Some((tj_path, added)) = tokenizer_json_added {
                for entry in added {
                    let obj = entry.as_object().ok_or_else(|| TextError::TokenizerLoad {
                        path: tj_path.to_path_buf(),
                        message: "`added_tokens` entries must be objects".into(),
                    })?;
                    let id = obj
                        .get("id")
                        .and_then(Value::as_u64)
                        .and_then(|i| u32::try_from(i).ok())
                        .ok_or_else(|| TextError::TokenizerLoad {
                            path: tj_path.to_path_buf(),
                            message: "an `added_tokens` entry has no integer `id`".into(),
                        })?;
                    let t = added_token_from_object(obj, None, tj_path, "added_tokens")?;
                    by_content.insert(t.content.clone(), t.clone());
                    decoder.insert(id, t);
                }
            }
        }

        // The named tokens: config values, overridden by special_tokens_map.json, then mapped
        // onto the added token of the same content (`added_tokens_map`).
        let mut named: Vec<(String, TokenValue)> = Vec::new();
        let mut keys: Vec<String> =
            SPECIAL_TOKENS_ATTRIBUTES.iter().map(|s| s.to_string()).collect();
        // Model-specific `*_token` keys holding a string (transformers pops them before the
        // conversion of AddedToken objects, so only strings qualify).
        for (key, value) in config.iter().chain(overrides.iter()) {
            if key.ends_with("_token")
                && !SPECIAL_TOKENS_ATTRIBUTES.contains(&key.as_str())
                && value.is_string()
                && !keys.contains(key)
            {
                keys.push(key.clone());
            }
        }
        for key in keys {
            let value = if let Some(t) = override_tokens.get(&key) {
                Some(t.clone())
            } else if let Some(v) = overrides.get(&key) {
                config_token(v, path, &key)?
            } else if let Some(v) = config.get(&key) {
                config_token(v, path, &key)?
            } else {
                None
            };
            let Some(mut value) = value else { continue };
            let is_standard = SPECIAL_TOKENS_ATTRIBUTES.contains(&key.as_str());
            if is_standard && let Some(t) = by_content.get(value.content()) {
                value = TokenValue::Added(t.clone());
            }
            named.push((key, value));
        }

        // Present (even `null` or empty) means the class's `additional_special_tokens`
        // argument is not used as the extra tokens.
        let mut extra = match config.get("extra_special_tokens") {
            Some(Value::Array(list)) => {
                let mut out = Vec::new();
                for v in list {
                    if let Some(t) = config_token(v, path, "extra_special_tokens")? {
                        out.push(t);
                    }
                }
                Some(out)
            }
            Some(_) => Some(Vec::new()),
            None => None,
        };
        if !extra_from_map.is_empty() {
            let list = extra.get_or_insert_with(Vec::new);
            for t in extra_from_map {
                if !list.contains(&t) {
                    list.push(t);
                }
            }
        }
        let additional = match overrides
            .get("additional_special_tokens")
            .or_else(|| config.get("additional_special_tokens"))
        {
            Some(Value::Array(list)) => {
                let mut out = Vec::new();
                for v in list {
                    if let Some(t) = config_token(v, path, "additional_special_tokens")? {
                        out.push(t);
                    }
                }
                Some(out)
            }
            _ => None,
        };
        Ok(Self { named, extra, additional, added_tokens_decoder: decoder })
    }

    /// The named token `key`, if set.
    pub(crate) fn get(&self, key: &str) -> Option<&TokenValue> {
        self.named.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Sets `key` when the files did not (a tokenizer class's `__init__` default).
    pub(crate) fn set_default(&mut self, key: &str, value: &str) {
        if self.get(key).is_none() {
            let pos = SPECIAL_TOKENS_ATTRIBUTES.iter().position(|k| *k == key);
            let at = self
                .named
                .iter()
                .position(|(k, _)| {
                    let kp = SPECIAL_TOKENS_ATTRIBUTES.iter().position(|a| a == k);
                    match (kp, pos) {
                        (Some(a), Some(b)) => a > b,
                        (None, _) => true,
                        _ => false,
                    }
                })
                .unwrap_or(self.named.len());
            self.named.insert(at, (key.to_string(), TokenValue::Str(value.to_string())));
        }
    }

    /// The tokens `TokenizersBackend.__init__` adds to a fresh backend, in its order: the
    /// `added_tokens_decoder` by id, then each named special token and each extra special
    /// token not already there (a string never equals an `AddedToken`; two `AddedToken`s
    /// are equal when every flag is), strings made `AddedToken(s, special=True)` and named
    /// tokens marked special.
    pub(crate) fn tokens_to_add(&self, extra: &[TokenValue]) -> Vec<AddedToken> {
        let mut to_add: Vec<TokenValue> =
            self.added_tokens_decoder.values().cloned().map(TokenValue::Added).collect();
        let encoder: Vec<String> = to_add.iter().map(|t| t.content().to_string()).collect();
        for value in self.named.iter().map(|(_, v)| v).chain(extra) {
            if !encoder.iter().any(|c| c == value.content()) && !to_add.contains(value) {
                to_add.push(value.clone());
            }
        }
        let named: Vec<&str> = self.named.iter().map(|(_, v)| v.content()).collect();
        to_add
            .into_iter()
            .map(|t| match t {
                TokenValue::Str(s) => AddedToken::from(s, true),
                TokenValue::Added(mut t) => {
                    if !t.special && named.contains(&t.content.as_str()) {
                        t.special = true;
                    }
                    t
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(config: Value, stm: Option<Value>) -> TokenizerConfigFiles {
        TokenizerConfigFiles {
            config: config.as_object().unwrap().clone(),
            config_path: "tokenizer_config.json".into(),
            special_tokens_map: stm
                .map(|v| ("special_tokens_map.json".into(), v.as_object().unwrap().clone())),
            added_tokens: None,
        }
    }

    #[test]
    fn sd15_files_end_with_an_unnormalized_endoftext() {
        // transformers 5.24 on SD 1.5's tokenizer files: bos and eos from the map
        // (normalized), then pad as a plain string, which overrides eos's flags.
        let t = serde_json::json!({"content": "<|endoftext|>", "normalized": true});
        let b = serde_json::json!({"content": "<|startoftext|>", "normalized": true});
        let f = files(
            serde_json::json!({"pad_token": "<|endoftext|>"}),
            Some(serde_json::json!({"bos_token": b, "eos_token": t, "unk_token": t,
                                    "pad_token": "<|endoftext|>"})),
        );
        let s = SpecialTokens::resolve(&f, None).unwrap();
        let added = s.tokens_to_add(&[]);
        let summary: Vec<(&str, bool, bool)> =
            added.iter().map(|t| (t.content.as_str(), t.normalized, t.special)).collect();
        assert_eq!(
            summary,
            [
                ("<|startoftext|>", true, true),
                ("<|endoftext|>", true, true),
                ("<|endoftext|>", false, true)
            ]
        );
    }

    #[test]
    fn added_tokens_decoder_wins_over_strings() {
        let f = files(
            serde_json::json!({
                "added_tokens_decoder": {"0": {"content": "!", "special": true, "normalized": false}},
                "pad_token": "!", "bos_token": "<s>"
            }),
            None,
        );
        let s = SpecialTokens::resolve(&f, None).unwrap();
        let added = s.tokens_to_add(&[]);
        let contents: Vec<&str> = added.iter().map(|t| t.content.as_str()).collect();
        assert_eq!(contents, ["!", "<s>"]);
        assert!(!added[1].normalized && added[1].special);
    }

    #[test]
    fn defaults_keep_attribute_order() {
        let mut s = SpecialTokens::default();
        s.set_default("pad_token", "<pad>");
        s.set_default("eos_token", "</s>");
        s.set_default("unk_token", "<unk>");
        let keys: Vec<&str> = s.named.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["eos_token", "unk_token", "pad_token"]);
    }
}

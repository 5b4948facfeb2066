//! The T5 configuration: `config.json` as transformers writes it ([`T5Config`]), and the
//! validated architecture the Burn modules are built from ([`T5EncoderConfig`]).
//!
//! A transformers `config.json` carries dozens of keys; [`T5Config`] reads the ones that
//! change what the encoder computes, with transformers' defaults for missing ones, and
//! ignores the rest (dropout, generation settings, `dtype`, …). STYLE.md asks not to
//! deserialize foreign JSON straight into a `#[derive(Config)]` struct, so the two are
//! separate and [`T5Config::encoder_config`] checks everything on the way.

use std::path::Path;

use burn::config::Config;
use serde::Deserialize;

use crate::error::TextError;

/// `config.json` of a transformers `T5EncoderModel` (or `T5Model`, whose encoder half is
/// used), as far as the encoder is concerned.
///
/// Defaults are those of transformers 5's `T5Config`. Unknown keys are ignored: a
/// transformers config holds many keys (generation, decoder, dtype) that do not change the
/// encoder.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct T5Config {
    /// `model_type`; only `"t5"` is accepted.
    pub model_type: Option<String>,
    /// Number of token embeddings.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub d_model: usize,
    /// Width of one attention head (not necessarily `d_model / num_heads`).
    pub d_kv: usize,
    /// Inner width of the feed-forward layers.
    pub d_ff: usize,
    /// Number of encoder blocks.
    pub num_layers: usize,
    /// Number of attention heads.
    pub num_heads: usize,
    /// Number of relative-position buckets (half for each direction in the encoder).
    pub relative_attention_num_buckets: usize,
    /// Distance from which all relative positions share the last bucket.
    pub relative_attention_max_distance: usize,
    /// `eps` of the RMS-style layer norms.
    pub layer_norm_epsilon: f64,
    /// `"relu"` (original T5) or `"gated-gelu"` (T5 v1.1); the form is `[gated-]ACT`.
    pub feed_forward_proj: String,
    /// Saved by transformers next to `feed_forward_proj`; when present it wins over the
    /// activation derived from `feed_forward_proj`, exactly as in transformers.
    pub dense_act_fn: Option<String>,
    /// Saved by transformers next to `feed_forward_proj`; when present it wins over the
    /// gating derived from `feed_forward_proj`, exactly as in transformers.
    pub is_gated_act: Option<bool>,
    /// Must be `false`: a decoder stack is causal and has cross-attention.
    pub is_decoder: bool,
}

impl Default for T5Config {
    fn default() -> Self {
        // transformers 5.24 `T5Config` defaults.
        Self {
            model_type: None,
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".to_string(),
            dense_act_fn: None,
            is_gated_act: None,
            is_decoder: false,
        }
    }
}

impl T5Config {
    /// Reads `config.json` (not yet validated: see [`T5Config::encoder_config`]).
    pub fn from_file(path: impl AsRef<Path>) -> crate::Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| TextError::Io { path: path.to_path_buf(), source })?;
        Self::from_json_str(&text).map_err(|e| match e {
            TextError::ConfigParse { message, .. } => {
                TextError::ConfigParse { path: path.to_path_buf(), message }
            }
            other => other,
        })
    }

    /// Parses the text of a `config.json` (not yet validated).
    pub fn from_json_str(text: &str) -> crate::Result<Self> {
        let parse_error =
            |message: String| TextError::ConfigParse { path: "<memory>".into(), message };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| parse_error(e.to_string()))?;
        serde_json::from_value(value.clone()).map_err(|e| {
            // serde_json does not say which key held the bad value: find it by parsing each
            // key alone.
            let bad_key = value.as_object().and_then(|map| {
                map.iter().find(|(k, v)| {
                    let one = serde_json::json!({ k.as_str(): v });
                    serde_json::from_value::<T5Config>(one).is_err()
                })
            });
            match bad_key {
                Some((k, _)) => parse_error(format!("key `{k}`: {e}")),
                None => parse_error(e.to_string()),
            }
        })
    }

    /// The feed-forward variant, resolved the way transformers' `T5Config.__post_init__`
    /// does: `feed_forward_proj` = `[gated-]ACT` gives the gating and the activation
    /// (`gated-gelu` means `gelu_new`, the tanh GELU); saved `is_gated_act` and
    /// `dense_act_fn` keys override them.
    pub fn feed_forward(&self) -> crate::Result<T5FeedForward> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let (gated, act) = match parts.as_slice() {
            [act] => (false, *act),
            ["gated", act] => (true, *act),
            _ => {
                return Err(TextError::UnsupportedConfig {
                    key: "feed_forward_proj",
                    value: format!("{:?}", self.feed_forward_proj),
                    reason: "expected `ACT` or `gated-ACT`, e.g. \"relu\" or \"gated-gelu\"".into(),
                });
            }
        };
        let act = if self.feed_forward_proj == "gated-gelu" { "gelu_new" } else { act };
        let gated = self.is_gated_act.unwrap_or(gated);
        let (key, act) = match &self.dense_act_fn {
            Some(a) => ("dense_act_fn", a.as_str()),
            None => ("feed_forward_proj", act),
        };
        let activation = match act {
            "gelu_new" => T5Activation::GeluNew,
            "relu" => T5Activation::Relu,
            other => {
                return Err(TextError::UnsupportedConfig {
                    key,
                    value: format!("{other:?}"),
                    reason: "supported feed-forwards are \"gated-gelu\" (T5 v1.1: gelu_new, the \
                             tanh GELU) and \"relu\" (original T5)"
                        .into(),
                });
            }
        };
        Ok(T5FeedForward { gated, activation })
    }

    /// Validates the configuration and returns the architecture of the encoder.
    ///
    /// Errors name the key: an unsupported `model_type`, `is_decoder: true`, a feed-forward
    /// other than gated-gelu or relu, a zero size, or a relative-position setting whose
    /// logarithmic buckets would be empty.
    pub fn encoder_config(&self) -> crate::Result<T5EncoderConfig> {
        if let Some(mt) = &self.model_type
            && mt != "t5"
        {
            return Err(TextError::UnsupportedConfig {
                key: "model_type",
                value: format!("{mt:?}"),
                reason: "only \"t5\" is implemented".into(),
            });
        }
        if self.is_decoder {
            return Err(TextError::UnsupportedConfig {
                key: "is_decoder",
                value: "true".into(),
                reason: "only the (bidirectional) encoder stack is implemented".into(),
            });
        }
        let positive = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(TextError::UnsupportedConfig {
                    key,
                    value: "0".into(),
                    reason: "must be positive".into(),
                });
            }
        }
        // Bidirectional buckets: half per direction, a quarter exact, a quarter logarithmic
        // up to max_distance. Fewer than 4 buckets, or max_distance <= the exact range, make
        // the logarithmic part empty or divide by log(1) = 0.
        let nb = self.relative_attention_num_buckets;
        if nb < 4 {
            return Err(TextError::UnsupportedConfig {
                key: "relative_attention_num_buckets",
                value: nb.to_string(),
                reason: "must be at least 4 (two directions, exact and logarithmic buckets)".into(),
            });
        }
        if self.relative_attention_max_distance <= nb / 4 {
            return Err(TextError::UnsupportedConfig {
                key: "relative_attention_max_distance",
                value: self.relative_attention_max_distance.to_string(),
                reason: format!(
                    "must exceed relative_attention_num_buckets / 4 = {} (the exact range)",
                    nb / 4
                ),
            });
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon >= 0.0) {
            return Err(TextError::UnsupportedConfig {
                key: "layer_norm_epsilon",
                value: self.layer_norm_epsilon.to_string(),
                reason: "must be finite and non-negative".into(),
            });
        }
        Ok(T5EncoderConfig {
            vocab_size: self.vocab_size,
            d_model: self.d_model,
            d_kv: self.d_kv,
            d_ff: self.d_ff,
            num_layers: self.num_layers,
            num_heads: self.num_heads,
            relative_attention_num_buckets: nb,
            relative_attention_max_distance: self.relative_attention_max_distance,
            layer_norm_epsilon: self.layer_norm_epsilon,
            feed_forward: self.feed_forward()?,
        })
    }
}

/// Activation of the T5 feed-forward (transformers' `dense_act_fn`).
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum T5Activation {
    /// `gelu_new`: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, the tanh GELU of T5 v1.1.
    GeluNew,
    /// `relu`, original T5.
    Relu,
}

/// Which feed-forward a T5 block has.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub struct T5FeedForward {
    /// `true`: `wo(act(wi_0 x) · wi_1 x)` (T5 v1.1); `false`: `wo(act(wi x))`.
    pub gated: bool,
    /// The activation.
    pub activation: T5Activation,
}

/// The architecture of a T5 encoder stack, validated (see [`T5Config::encoder_config`]).
///
/// `init` builds randomly initialised modules, for tests; use
/// [`T5EncoderModel::from_pretrained`](crate::T5EncoderModel::from_pretrained) to load
/// weights.
#[derive(Config, Debug)]
pub struct T5EncoderConfig {
    /// Number of token embeddings.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub d_model: usize,
    /// Width of one attention head.
    pub d_kv: usize,
    /// Inner width of the feed-forward layers.
    pub d_ff: usize,
    /// Number of blocks.
    pub num_layers: usize,
    /// Number of attention heads.
    pub num_heads: usize,
    /// Number of relative-position buckets.
    pub relative_attention_num_buckets: usize,
    /// Distance from which relative positions share the last bucket.
    pub relative_attention_max_distance: usize,
    /// `eps` of the layer norms.
    pub layer_norm_epsilon: f64,
    /// The feed-forward variant.
    pub feed_forward: T5FeedForward,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gated_gelu_means_gelu_new() {
        let c = T5Config::from_json_str(r#"{"feed_forward_proj": "gated-gelu"}"#).unwrap();
        let ff = c.feed_forward().unwrap();
        assert_eq!(ff, T5FeedForward { gated: true, activation: T5Activation::GeluNew });
        let c = T5Config::from_json_str("{}").unwrap();
        let ff = c.feed_forward().unwrap();
        assert_eq!(ff, T5FeedForward { gated: false, activation: T5Activation::Relu });
    }

    #[test]
    fn saved_act_keys_override_like_transformers() {
        // transformers 5.24: T5Config.from_dict({'feed_forward_proj': 'gated-gelu',
        // 'dense_act_fn': 'relu'}) has dense_act_fn 'relu' and is_gated_act True.
        let c = T5Config::from_json_str(
            r#"{"feed_forward_proj": "gated-gelu", "dense_act_fn": "relu"}"#,
        )
        .unwrap();
        let ff = c.feed_forward().unwrap();
        assert_eq!(ff, T5FeedForward { gated: true, activation: T5Activation::Relu });
        let c = T5Config::from_json_str(
            r#"{"feed_forward_proj": "gated-gelu", "is_gated_act": false}"#,
        )
        .unwrap();
        assert!(!c.feed_forward().unwrap().gated);
    }

    #[test]
    fn unsupported_activation_names_the_key() {
        let c = T5Config::from_json_str(r#"{"feed_forward_proj": "gated-silu"}"#).unwrap();
        let e = c.encoder_config().unwrap_err().to_string();
        assert!(e.contains("`feed_forward_proj`") && e.contains("silu"), "{e}");
        let c = T5Config::from_json_str(
            r#"{"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_fast"}"#,
        )
        .unwrap();
        let e = c.encoder_config().unwrap_err().to_string();
        assert!(e.contains("`dense_act_fn`") && e.contains("gelu_fast"), "{e}");
        let c = T5Config::from_json_str(r#"{"feed_forward_proj": "a-b-c"}"#).unwrap();
        let e = c.encoder_config().unwrap_err().to_string();
        assert!(e.contains("`feed_forward_proj`"), "{e}");
    }

    #[test]
    fn other_bad_settings_name_the_key() {
        for (json, key) in [
            (r#"{"model_type": "umt5"}"#, "`model_type`"),
            (r#"{"is_decoder": true}"#, "`is_decoder`"),
            (r#"{"num_heads": 0}"#, "`num_heads`"),
            (r#"{"relative_attention_num_buckets": 2}"#, "`relative_attention_num_buckets`"),
            (r#"{"relative_attention_max_distance": 8}"#, "`relative_attention_max_distance`"),
        ] {
            let e = T5Config::from_json_str(json).unwrap().encoder_config().unwrap_err();
            assert!(e.to_string().contains(key), "{json}: {e}");
        }
    }

    #[test]
    fn wrong_type_is_a_parse_error_naming_the_key() {
        let e = T5Config::from_json_str(r#"{"d_model": "big"}"#).unwrap_err().to_string();
        assert!(e.contains("invalid config") && e.contains("`d_model`"), "{e}");
    }
}

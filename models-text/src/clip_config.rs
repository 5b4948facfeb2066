//! The CLIP text configuration: `config.json` as transformers writes it ([`CLIPTextConfig`]),
//! and the validated architecture the Burn modules are built from ([`CLIPTextModelConfig`]).
//!
//! As for T5 (see `config.rs`), the foreign JSON is read into a serde struct with
//! transformers' defaults and checked on the way to the `#[derive(Config)]` struct; unknown
//! keys (dropout, initialiser settings, `dtype`, `architectures`, …) are ignored.

use std::path::Path;

use burn::config::Config;
use serde::Deserialize;

use crate::error::TextError;

/// `config.json` of a transformers `CLIPTextModel` or `CLIPTextModelWithProjection`
/// (`model_type` `"clip_text_model"`), as far as the text encoder is concerned.
///
/// Defaults are transformers 5.24's `CLIPTextConfig` (openai/clip-vit-base-patch32's text
/// tower). `eos_token_id` and `layer_norm_eps` are kept as raw JSON values because
/// transformers accepts types (a list, `null`) that the encoder cannot use; they are checked
/// in [`CLIPTextConfig::model_config`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct CLIPTextConfig {
    /// `model_type`; only `"clip_text_model"` is accepted (a full `"clip"` config nests the
    /// text tower under `text_config`).
    pub model_type: Option<String>,
    /// Number of token embeddings.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Inner width of the MLPs.
    pub intermediate_size: usize,
    /// Width of `text_projection`'s output (used by `CLIPTextModelWithProjection` only).
    pub projection_dim: Option<usize>,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads (`hidden_size / num_attention_heads` per head).
    pub num_attention_heads: usize,
    /// Rows of the position table: the longest sequence the encoder takes.
    pub max_position_embeddings: usize,
    /// The MLP activation: `"quick_gelu"` (OpenAI CLIP, SD 1.x) or `"gelu"` (OpenCLIP, SD 2.x,
    /// SDXL).
    pub hidden_act: String,
    /// `eps` of the layer norms (a JSON number; `null` is refused).
    pub layer_norm_eps: serde_json::Value,
    /// Padding id (not used by the encoder; kept for callers).
    pub pad_token_id: Option<i64>,
    /// Beginning-of-sequence id (not used by the encoder; kept for callers).
    pub bos_token_id: Option<i64>,
    /// End-of-sequence id: decides where the pooled output is taken (see
    /// [`CLIPPooling`]). A JSON integer; a list or `null` is refused.
    pub eos_token_id: serde_json::Value,
}

impl Default for CLIPTextConfig {
    fn default() -> Self {
        // transformers 5.24 `CLIPTextConfig` defaults.
        Self {
            model_type: None,
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: Some(512),
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".to_string(),
            layer_norm_eps: serde_json::json!(1e-5),
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: serde_json::json!(49407),
        }
    }
}

impl CLIPTextConfig {
    /// Reads `config.json` (not yet validated: see [`CLIPTextConfig::model_config`]).
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
                    serde_json::from_value::<CLIPTextConfig>(one).is_err()
                })
            });
            match bad_key {
                Some((k, _)) => parse_error(format!("key `{k}`: {e}")),
                None => parse_error(e.to_string()),
            }
        })
    }

    /// How the pooled output is taken, as transformers 5.24's `CLIPTextModel.forward` decides
    /// it from `eos_token_id`.
    pub fn pooling(&self) -> crate::Result<CLIPPooling> {
        let unsupported = |reason: &str| TextError::UnsupportedConfig {
            key: "eos_token_id",
            value: self.eos_token_id.to_string(),
            reason: reason.into(),
        };
        let id = self.eos_token_id.as_i64().ok_or_else(|| {
            unsupported(
                "must be one integer: transformers compares `input_ids` with it to find the \
                 pooled position",
            )
        })?;
        Ok(match id {
            2 => CLIPPooling::ArgmaxInputIds,
            id if id >= 0 => CLIPPooling::FirstEos(id),
            _ => return Err(unsupported("must not be negative")),
        })
    }

    /// Validates the configuration and returns the architecture of the text encoder.
    ///
    /// `with_projection`: whether `text_projection` is built (`CLIPTextModelWithProjection`),
    /// which then needs `projection_dim`.
    ///
    /// Errors name the key: an unsupported `model_type` or `hidden_act`, a zero size,
    /// `hidden_size` not divisible by `num_attention_heads`, a `layer_norm_eps` that is not a
    /// finite non-negative number, an `eos_token_id` that is not one integer.
    pub fn model_config(&self, with_projection: bool) -> crate::Result<CLIPTextModelConfig> {
        if let Some(mt) = &self.model_type
            && mt != "clip_text_model"
        {
            return Err(TextError::UnsupportedConfig {
                key: "model_type",
                value: format!("{mt:?}"),
                reason: "only \"clip_text_model\" (a CLIPTextModel or CLIPTextModelWithProjection \
                         folder) is implemented"
                    .into(),
            });
        }
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
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
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(TextError::UnsupportedConfig {
                key: "num_attention_heads",
                value: self.num_attention_heads.to_string(),
                reason: format!("must divide hidden_size = {}", self.hidden_size),
            });
        }
        let hidden_act = match self.hidden_act.as_str() {
            "quick_gelu" => CLIPActivation::QuickGelu,
            "gelu" => CLIPActivation::Gelu,
            other => {
                return Err(TextError::UnsupportedConfig {
                    key: "hidden_act",
                    value: format!("{other:?}"),
                    reason: "supported activations are \"quick_gelu\" (x·σ(1.702x), OpenAI CLIP, \
                             SD 1.x) and \"gelu\" (exact erf GELU, OpenCLIP, SD 2.x and SDXL)"
                        .into(),
                });
            }
        };
        let layer_norm_eps =
            self.layer_norm_eps.as_f64().filter(|e| e.is_finite() && *e >= 0.0).ok_or_else(
                || TextError::UnsupportedConfig {
                    key: "layer_norm_eps",
                    value: self.layer_norm_eps.to_string(),
                    reason: "must be a finite non-negative number".into(),
                },
            )?;
        let projection_dim = if with_projection {
            match self.projection_dim {
                Some(d) if d > 0 => Some(d),
                other => {
                    return Err(TextError::UnsupportedConfig {
                        key: "projection_dim",
                        value: other.map_or("null".into(), |d| d.to_string()),
                        reason: "CLIPTextModelWithProjection needs a positive projection width"
                            .into(),
                    });
                }
            }
        } else {
            None
        };
        Ok(CLIPTextModelConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            max_position_embeddings: self.max_position_embeddings,
            hidden_act,
            layer_norm_eps,
            pooling: self.pooling()?,
            projection_dim,
        })
    }
}

/// The MLP activation of a CLIP encoder layer (transformers' `hidden_act`).
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum CLIPActivation {
    /// `quick_gelu`: `x·σ(1.702·x)` (transformers' `QuickGELUActivation`), OpenAI CLIP (SD 1.x).
    QuickGelu,
    /// `gelu`: the exact, erf-based GELU (`nn.functional.gelu`), OpenCLIP (SD 2.x, SDXL).
    Gelu,
}

/// Where the pooled output (`pooler_output`) is read from `last_hidden_state`, per sequence.
///
/// transformers 5.24, `CLIPTextModel.forward`: configs saved before transformers PR #24773
/// carry `eos_token_id: 2` (SD 1.5's and SD 2's `text_encoder/config.json` do), and for them
/// the pooled position is `argmax(input_ids)` — the eos token happens to have the largest id
/// in CLIP's vocabulary; with any other `eos_token_id` it is the first position holding it.
/// Ties of the maximum and sequences without an eos resolve as `torch.argmax` does: the first
/// maximal position, position 0 when no token equals the eos.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum CLIPPooling {
    /// Legacy configs (`eos_token_id == 2`): the first position of the largest id.
    ArgmaxInputIds,
    /// The first position whose id is this eos id (0 if none is).
    FirstEos(i64),
}

/// The architecture of a CLIP text encoder, validated (see
/// [`CLIPTextConfig::model_config`]).
///
/// `init` builds randomly initialised modules, for tests; use
/// [`CLIPTextModel::from_pretrained`](crate::CLIPTextModel::from_pretrained) or
/// [`CLIPTextModelWithProjection::from_pretrained`](crate::CLIPTextModelWithProjection::from_pretrained)
/// to load weights.
#[derive(Config, Debug)]
pub struct CLIPTextModelConfig {
    /// Number of token embeddings.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Inner width of the MLPs.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Rows of the position table.
    pub max_position_embeddings: usize,
    /// The MLP activation.
    pub hidden_act: CLIPActivation,
    /// `eps` of the layer norms.
    pub layer_norm_eps: f64,
    /// Where the pooled output is taken.
    pub pooling: CLIPPooling,
    /// Width of `text_projection` (`Some` for `CLIPTextModelWithProjection`).
    pub projection_dim: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_transformers() {
        let c = CLIPTextConfig::from_json_str("{}").unwrap();
        let m = c.model_config(true).unwrap();
        assert_eq!((m.vocab_size, m.hidden_size, m.num_hidden_layers), (49408, 512, 12));
        assert_eq!(m.hidden_act, CLIPActivation::QuickGelu);
        assert_eq!(m.pooling, CLIPPooling::FirstEos(49407));
        assert_eq!(m.projection_dim, Some(512));
        assert_eq!(m.layer_norm_eps, 1e-5);
    }

    #[test]
    fn legacy_eos_pools_at_argmax() {
        let c = CLIPTextConfig::from_json_str(r#"{"eos_token_id": 2}"#).unwrap();
        assert_eq!(c.pooling().unwrap(), CLIPPooling::ArgmaxInputIds);
        let c = CLIPTextConfig::from_json_str(r#"{"eos_token_id": 3}"#).unwrap();
        assert_eq!(c.pooling().unwrap(), CLIPPooling::FirstEos(3));
    }

    #[test]
    fn bad_settings_name_the_key() {
        for (json, key) in [
            (r#"{"hidden_act": "gelu_new"}"#, "`hidden_act`"),
            (r#"{"hidden_act": "relu"}"#, "`hidden_act`"),
            (r#"{"model_type": "clip"}"#, "`model_type`"),
            (r#"{"num_attention_heads": 3}"#, "`num_attention_heads`"),
            (r#"{"num_hidden_layers": 0}"#, "`num_hidden_layers`"),
            (r#"{"eos_token_id": [2, 3]}"#, "`eos_token_id`"),
            (r#"{"eos_token_id": null}"#, "`eos_token_id`"),
            (r#"{"layer_norm_eps": null}"#, "`layer_norm_eps`"),
            (r#"{"projection_dim": null}"#, "`projection_dim`"),
        ] {
            let e = CLIPTextConfig::from_json_str(json).unwrap().model_config(true).unwrap_err();
            assert!(e.to_string().contains(key), "{json}: {e}");
        }
        // The plain text model does not need projection_dim.
        let c = CLIPTextConfig::from_json_str(r#"{"projection_dim": null}"#).unwrap();
        c.model_config(false).unwrap();
    }

    #[test]
    fn wrong_type_is_a_parse_error_naming_the_key() {
        let e = CLIPTextConfig::from_json_str(r#"{"hidden_size": "big"}"#).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("invalid config") && e.contains("`hidden_size`"), "{e}");
    }
}

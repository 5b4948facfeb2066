//! `AutoencoderKLConfig`: diffusers' `config.json` of an `AutoencoderKL`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::VaeError;

/// The block type of every encoder down block that this crate computes.
pub const DOWN_ENCODER_BLOCK_2D: &str = "DownEncoderBlock2D";
/// The block type of every decoder up block that this crate computes.
pub const UP_DECODER_BLOCK_2D: &str = "UpDecoderBlock2D";

/// `sample_size` of a diffusers VAE: one number or `[height, width]`. It only sets the tile size
/// of diffusers' tiled decoding, which this crate does not do; it is kept so a config round-trips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    /// A square sample size.
    Square(usize),
    /// `[height, width]`.
    HeightWidth([usize; 2]),
}

/// The configuration of diffusers' `AutoencoderKL`, read from its `config.json`.
///
/// Field names and defaults are diffusers' (`AutoencoderKL.__init__` in
/// `diffusers/models/autoencoders/autoencoder_kl.py`): a key missing from the file takes
/// diffusers' default. Keys starting with `_` (`_class_name`, `_diffusers_version`,
/// `_name_or_path`) are metadata and ignored; any other unknown key is an error naming it.
/// [`validate`](Self::validate) rejects the settings this crate does not compute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoencoderKLConfig {
    /// Channels of the image (3 for RGB).
    pub in_channels: usize,
    /// Channels of the decoded image (3 for RGB).
    pub out_channels: usize,
    /// One entry per encoder block; only `"DownEncoderBlock2D"` is supported.
    pub down_block_types: Vec<String>,
    /// One entry per decoder block; only `"UpDecoderBlock2D"` is supported.
    pub up_block_types: Vec<String>,
    /// Output channels of each encoder block; the decoder uses them reversed. With `n` blocks
    /// the VAE up/down-samples by `2^(n-1)`.
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder block; decoder blocks have one more.
    pub layers_per_block: usize,
    /// Activation; only `"silu"` (also spelled `"swish"`) is supported.
    pub act_fn: String,
    /// Channels of the latent.
    pub latent_channels: usize,
    /// Groups of every GroupNorm (all with eps 1e-6); must divide every channel count.
    pub norm_num_groups: usize,
    /// Tile size of diffusers' tiled decoding; unused here.
    pub sample_size: SampleSize,
    /// Latents are stored multiplied by this: [`decode_latents`] divides by it.
    ///
    /// [`decode_latents`]: crate::AutoencoderKL::decode_latents
    pub scaling_factor: f64,
    /// Latents are stored shifted by this (SD3, Flux): [`decode_latents`] adds it back after
    /// the division. `null` or absent means no shift.
    ///
    /// [`decode_latents`]: crate::AutoencoderKL::decode_latents
    pub shift_factor: Option<f64>,
    /// Per-channel latent mean used by some pipelines (SDXL-style); only `null` is supported.
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent std used by some pipelines (SDXL-style); only `null` is supported.
    pub latents_std: Option<Vec<f64>>,
    /// Whether diffusers upcasts a half-precision VAE to float32. Here the VAE computes in the
    /// backend's float type; choose a float32 backend for the same effect.
    pub force_upcast: bool,
    /// Whether the encoder ends with the 1×1 `quant_conv`.
    pub use_quant_conv: bool,
    /// Whether the decoder starts with the 1×1 `post_quant_conv`.
    pub use_post_quant_conv: bool,
    /// Whether the encoder's and decoder's mid blocks have their self-attention.
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    /// diffusers' defaults.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec![DOWN_ENCODER_BLOCK_2D.to_owned()],
            up_block_types: vec![UP_DECODER_BLOCK_2D.to_owned()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".to_owned(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: SampleSize::Square(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl AutoencoderKLConfig {
    /// Reads and validates a diffusers `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, VaeError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| VaeError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and validates the text of a diffusers `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, VaeError> {
        Self::parse(text, Path::new("<string>"))
    }

    fn parse(text: &str, path: &Path) -> Result<Self, VaeError> {
        let config_error = |e: serde_json::Error| VaeError::Config {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let mut map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).map_err(config_error)?;
        map.retain(|key, _| !key.starts_with('_'));
        let config: Self =
            serde_json::from_value(serde_json::Value::Object(map)).map_err(config_error)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that this crate computes what the config describes; the error names the key.
    pub fn validate(&self) -> Result<(), VaeError> {
        let unsupported = |key, message: String| Err(VaeError::Unsupported { key, message });
        let n = self.block_out_channels.len();
        if n == 0 {
            return unsupported("block_out_channels", "must have at least one entry".into());
        }
        if self.down_block_types.len() != n {
            return unsupported(
                "down_block_types",
                format!("has {} entries, block_out_channels has {n}", self.down_block_types.len()),
            );
        }
        if self.up_block_types.len() != n {
            return unsupported(
                "up_block_types",
                format!("has {} entries, block_out_channels has {n}", self.up_block_types.len()),
            );
        }
        if let Some(t) = self.down_block_types.iter().find(|t| *t != DOWN_ENCODER_BLOCK_2D) {
            return unsupported(
                "down_block_types",
                format!("`{t}` (only `{DOWN_ENCODER_BLOCK_2D}` is supported)"),
            );
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != UP_DECODER_BLOCK_2D) {
            return unsupported(
                "up_block_types",
                format!("`{t}` (only `{UP_DECODER_BLOCK_2D}` is supported)"),
            );
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return unsupported(
                "act_fn",
                format!("`{}` (only `silu`/`swish` is supported)", self.act_fn),
            );
        }
        for (key, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            if value == 0 {
                return unsupported(key, "must be positive".into());
            }
        }
        if let Some(&c) =
            self.block_out_channels.iter().find(|&&c| c == 0 || c % self.norm_num_groups != 0)
        {
            return unsupported(
                "norm_num_groups",
                format!(
                    "{} does not divide the block channel count {c} (block_out_channels {:?})",
                    self.norm_num_groups, self.block_out_channels
                ),
            );
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return unsupported(
                "scaling_factor",
                format!("{} (must be finite and non-zero)", self.scaling_factor),
            );
        }
        if self.shift_factor.is_some_and(|s| !s.is_finite()) {
            return unsupported("shift_factor", "must be finite or null".into());
        }
        if self.latents_mean.is_some() {
            return unsupported("latents_mean", "only null is supported".into());
        }
        if self.latents_std.is_some() {
            return unsupported("latents_std", "only null is supported".into());
        }
        Ok(())
    }

    /// How much the decoder up-samples (and the encoder down-samples): `2^(blocks - 1)`.
    pub fn spatial_scale(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_diffusers_defaults() {
        let c = AutoencoderKLConfig::from_json_str("{}").unwrap();
        assert_eq!(c, AutoencoderKLConfig::default());
        assert_eq!(c.block_out_channels, [64]);
        assert_eq!(c.layers_per_block, 1);
        assert_eq!(c.norm_num_groups, 32);
        assert_eq!(c.spatial_scale(), 1);
    }

    #[test]
    fn metadata_keys_are_ignored_and_sample_size_takes_both_forms() {
        let c = AutoencoderKLConfig::from_json_str(
            r#"{"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1",
                "sample_size": [64, 96], "shift_factor": null}"#,
        )
        .unwrap();
        assert_eq!(c.sample_size, SampleSize::HeightWidth([64, 96]));
        let c = AutoencoderKLConfig::from_json_str(r#"{"sample_size": 512}"#).unwrap();
        assert_eq!(c.sample_size, SampleSize::Square(512));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = AutoencoderKLConfig::from_json_str(r#"{"norm_typ": "group"}"#).unwrap_err();
        assert!(err.to_string().contains("norm_typ"), "{err}");
    }

    #[test]
    fn unsupported_settings_name_the_key() {
        for (json, key) in [
            (r#"{"act_fn": "gelu"}"#, "act_fn"),
            (r#"{"up_block_types": ["AttnUpDecoderBlock2D"]}"#, "up_block_types"),
            (r#"{"block_out_channels": [64, 64]}"#, "down_block_types"),
            (r#"{"block_out_channels": [48], "norm_num_groups": 32}"#, "norm_num_groups"),
            (r#"{"latents_mean": [0.0, 0.0, 0.0, 0.0]}"#, "latents_mean"),
            (r#"{"scaling_factor": 0.0}"#, "scaling_factor"),
        ] {
            let err = AutoencoderKLConfig::from_json_str(json).unwrap_err();
            assert!(
                matches!(&err, VaeError::Unsupported { key: k, .. } if *k == key),
                "{json}: {err}"
            );
            assert!(err.to_string().contains(key), "{err}");
        }
    }
}

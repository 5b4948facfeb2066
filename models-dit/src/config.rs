//! Model configurations, read from a diffusers `config.json` (serde, with diffusers' defaults
//! for absent keys) or built from a named preset.
//!
//! `_class_name` selects the model: `PixArtTransformer2DModel`, `DiTTransformer2DModel`, or the
//! legacy `Transformer2DModel` of the original checkpoints, which diffusers remaps by
//! `norm_type` (`ada_norm_single` → PixArt, `ada_norm_zero` → DiT) and so do we.

use std::path::Path;

use parallel_core::{ModelDesc, ModelFamily};
use serde::Deserialize;

use crate::error::{DitError, Result};

/// The class names this crate implements (`Transformer2DModel` is remapped by `norm_type`).
pub const KNOWN_CLASSES: [&str; 5] = [
    "PixArtTransformer2DModel",
    "DiTTransformer2DModel",
    "Transformer2DModel",
    crate::sd3::CLASS_NAME,
    crate::flux::CLASS_NAME,
];

/// The named presets (real checkpoints' configs).
pub const PRESETS: [&str; 10] = [
    "PixArt-XL-2-512x512",
    "PixArt-XL-2-1024-MS",
    "PixArt-Sigma-XL-2-1024-MS",
    "DiT-XL-2-256",
    "DiT-XL-2-512",
    "SD3-medium",
    "SD3.5-medium",
    "SD3.5-large",
    "FLUX.1-dev",
    "FLUX.1-schnell",
];

fn d_true() -> bool {
    true
}
fn d_heads() -> usize {
    16
}
fn d_head_dim() -> usize {
    72
}
fn d_in() -> usize {
    4
}
fn d_layers() -> usize {
    28
}
fn d_patch() -> usize {
    2
}
fn d_gelu_tanh() -> String {
    "gelu-approximate".into()
}
fn d_some_1000() -> Option<usize> {
    Some(1000)
}
fn d_pixart_out() -> Option<usize> {
    Some(8)
}
fn d_pixart_cross() -> Option<usize> {
    Some(1152)
}
fn d_pixart_sample() -> usize {
    128
}
fn d_ada_single() -> String {
    "ada_norm_single".into()
}
fn d_eps_1e6() -> f64 {
    1e-6
}
fn d_attention_type() -> Option<String> {
    Some("default".into())
}
fn d_dit_sample() -> usize {
    32
}
fn d_ada_zero() -> String {
    "ada_norm_zero".into()
}
fn d_eps_1e5() -> f64 {
    1e-5
}

/// Configuration of [`PixArtTransformer2DModel`](crate::PixArtTransformer2DModel), with
/// diffusers 0.42's defaults for absent keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PixArtConfig {
    /// Attention heads (16).
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Channels per head (72).
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    /// Latent channels in (4).
    #[serde(default = "d_in")]
    pub in_channels: usize,
    /// Channels out (8: learned sigma); `null` means `in_channels`.
    #[serde(default = "d_pixart_out")]
    pub out_channels: Option<usize>,
    /// Transformer blocks (28).
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    /// Width of the text embeddings the blocks cross-attend to after the caption projection
    /// (1152); `null`: no cross-attention.
    #[serde(default = "d_pixart_cross")]
    pub cross_attention_dim: Option<usize>,
    /// Whether q, k, v projections have a bias (true).
    #[serde(default = "d_true")]
    pub attention_bias: bool,
    /// Latent size the model was trained at (128); sets the position-embedding base grid.
    #[serde(default = "d_pixart_sample")]
    pub sample_size: usize,
    /// Patch size (2).
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    /// Feed-forward activation: `gelu-approximate` (tanh) or `gelu`.
    #[serde(default = "d_gelu_tanh")]
    pub activation_fn: String,
    /// Timestep embedding table size (1000); must be set.
    #[serde(default = "d_some_1000")]
    pub num_embeds_ada_norm: Option<usize>,
    /// Attention upcast to f32 (no effect in f32 compute).
    #[serde(default)]
    pub upcast_attention: bool,
    /// Must be `ada_norm_single`.
    #[serde(default = "d_ada_single")]
    pub norm_type: String,
    /// Must be false (no learned LayerNorm scale).
    #[serde(default)]
    pub norm_elementwise_affine: bool,
    /// LayerNorm eps of the blocks (1e-6).
    #[serde(default = "d_eps_1e6")]
    pub norm_eps: f64,
    /// Position-embedding interpolation scale; `null`/absent: `max(sample_size / 64, 1)`.
    #[serde(default)]
    pub interpolation_scale: Option<f64>,
    /// Resolution and aspect-ratio conditioning; `null`/absent: `sample_size == 128`.
    #[serde(default)]
    pub use_additional_conditions: Option<bool>,
    /// Width of the text encoder's embeddings (4096 for T5-XXL); `null`: no caption projection.
    #[serde(default)]
    pub caption_channels: Option<usize>,
    /// Must be `default`.
    #[serde(default = "d_attention_type")]
    pub attention_type: Option<String>,
    /// Legacy `Transformer2DModel` keys that select other architectures; must be unset/false.
    #[serde(flatten)]
    pub legacy: LegacyKeys,
}

/// Configuration of [`DiTTransformer2DModel`](crate::DiTTransformer2DModel), with diffusers
/// 0.42's defaults for absent keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DiTConfig {
    /// Attention heads (16).
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Channels per head (72).
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    /// Latent channels in (4).
    #[serde(default = "d_in")]
    pub in_channels: usize,
    /// Channels out; `null`/absent means `in_channels` (the real checkpoints say 8).
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Transformer blocks (28).
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    /// Whether q, k, v projections have a bias (true).
    #[serde(default = "d_true")]
    pub attention_bias: bool,
    /// Latent size (32); the latent must be square.
    #[serde(default = "d_dit_sample")]
    pub sample_size: usize,
    /// Patch size (2).
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    /// Feed-forward activation: `gelu-approximate` (tanh) or `gelu`.
    #[serde(default = "d_gelu_tanh")]
    pub activation_fn: String,
    /// Number of classes (1000); the class table has one more row, the null class.
    #[serde(default = "d_some_1000")]
    pub num_embeds_ada_norm: Option<usize>,
    /// Attention upcast to f32 (no effect in f32 compute).
    #[serde(default)]
    pub upcast_attention: bool,
    /// Must be `ada_norm_zero`.
    #[serde(default = "d_ada_zero")]
    pub norm_type: String,
    /// Must be false.
    #[serde(default)]
    pub norm_elementwise_affine: bool,
    /// Eps of the LayerNorm before the feed-forward (`norm3`, 1e-5); `norm1` inside
    /// adaLN-Zero is fixed at 1e-6.
    #[serde(default = "d_eps_1e5")]
    pub norm_eps: f64,
    /// Legacy `Transformer2DModel` keys that select other architectures; must be unset/false.
    #[serde(flatten)]
    pub legacy: LegacyKeys,
}

/// Keys of the legacy `Transformer2DModel` config that would select another architecture.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct LegacyKeys {
    /// Must be false.
    #[serde(default)]
    pub only_cross_attention: Option<bool>,
    /// Must be false.
    #[serde(default)]
    pub double_self_attention: Option<bool>,
    /// Must be null (discrete inputs).
    #[serde(default)]
    pub num_vector_embeds: Option<usize>,
}

/// A configuration of either model, as selected by `_class_name`.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    /// `PixArtTransformer2DModel` (PixArt-α, PixArt-Σ).
    PixArt(PixArtConfig),
    /// `DiTTransformer2DModel` (class-conditional DiT).
    DiT(DiTConfig),
    /// `SD3Transformer2DModel` (Stable Diffusion 3 / 3.5, an MMDiT).
    SD3(crate::sd3::SD3Config),
    /// `FluxTransformer2DModel` (FLUX.1-dev / schnell, an MMDiT).
    Flux(crate::flux::FluxConfig),
}

impl ModelConfig {
    /// Parses a diffusers `config.json` text; `location` names it in errors.
    pub fn from_json(text: &str, location: &str) -> Result<Self> {
        let bad = |reason: String| DitError::Config { location: location.into(), reason };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let class = value
            .get("_class_name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("no `_class_name` string".into()))?;
        if class == crate::flux::CLASS_NAME {
            return Ok(ModelConfig::Flux(crate::flux::FluxConfig::from_value(value, location)?));
        }
        if class == crate::sd3::CLASS_NAME {
            return Ok(ModelConfig::SD3(crate::sd3::SD3Config::from_value(value, location)?));
        }
        let norm_type = value.get("norm_type").and_then(|v| v.as_str());
        let is_pixart = match (class, norm_type) {
            ("PixArtTransformer2DModel", _) => true,
            ("DiTTransformer2DModel", _) => false,
            ("Transformer2DModel", Some("ada_norm_single")) => true,
            ("Transformer2DModel", Some("ada_norm_zero")) => false,
            ("Transformer2DModel", other) => {
                return Err(bad(format!(
                    "`_class_name` Transformer2DModel with `norm_type` {other:?} is neither \
                     PixArt (`ada_norm_single`) nor DiT (`ada_norm_zero`)"
                )));
            }
            (name, _) => {
                return Err(DitError::UnknownClass {
                    location: location.into(),
                    name: name.into(),
                    known: KNOWN_CLASSES.iter().map(|s| s.to_string()).collect(),
                });
            }
        };
        let config = if is_pixart {
            ModelConfig::PixArt(serde_json::from_value(value).map_err(|e| bad(format!("{e}")))?)
        } else {
            ModelConfig::DiT(serde_json::from_value(value).map_err(|e| bad(format!("{e}")))?)
        };
        config.validate(location)?;
        Ok(config)
    }

    /// Reads `path` (a `config.json`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| DitError::Io { path: path.to_path_buf(), source })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Reads `folder/config.json`.
    pub fn from_folder(folder: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(folder.as_ref().join("config.json"))
    }

    /// A named preset (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self> {
        Ok(match name {
            "PixArt-XL-2-512x512" => ModelConfig::PixArt(PixArtConfig::pixart_xl_2_512x512()),
            "PixArt-XL-2-1024-MS" => ModelConfig::PixArt(PixArtConfig::pixart_xl_2_1024_ms()),
            "PixArt-Sigma-XL-2-1024-MS" => {
                ModelConfig::PixArt(PixArtConfig::pixart_sigma_xl_2_1024_ms())
            }
            "DiT-XL-2-256" => ModelConfig::DiT(DiTConfig::dit_xl_2_256()),
            "DiT-XL-2-512" => ModelConfig::DiT(DiTConfig::dit_xl_2_512()),
            "SD3-medium" => ModelConfig::SD3(crate::sd3::SD3Config::sd3_medium()),
            "SD3.5-medium" => ModelConfig::SD3(crate::sd3::SD3Config::sd35_medium()),
            "SD3.5-large" => ModelConfig::SD3(crate::sd3::SD3Config::sd35_large()),
            "FLUX.1-dev" => ModelConfig::Flux(crate::flux::FluxConfig::flux1_dev()),
            "FLUX.1-schnell" => ModelConfig::Flux(crate::flux::FluxConfig::flux1_schnell()),
            _ => {
                return Err(DitError::UnknownPreset {
                    name: name.into(),
                    known: PRESETS.iter().map(|s| s.to_string()).collect(),
                });
            }
        })
    }

    /// Checks that this crate computes what diffusers computes for these settings.
    pub fn validate(&self, location: &str) -> Result<()> {
        match self {
            ModelConfig::PixArt(c) => c.validate(location),
            ModelConfig::DiT(c) => c.validate(location),
            ModelConfig::SD3(c) => c.validate(location),
            ModelConfig::Flux(c) => c.validate(location),
        }
    }

    /// The class name.
    pub fn class_name(&self) -> &'static str {
        match self {
            ModelConfig::PixArt(_) => "PixArtTransformer2DModel",
            ModelConfig::DiT(_) => "DiTTransformer2DModel",
            ModelConfig::SD3(_) => crate::sd3::CLASS_NAME,
            ModelConfig::Flux(_) => crate::flux::CLASS_NAME,
        }
    }

    /// What strategies validate against.
    pub fn desc(&self) -> ModelDesc {
        match self {
            ModelConfig::PixArt(c) => c.desc(),
            ModelConfig::DiT(c) => c.desc(),
            ModelConfig::SD3(c) => c.desc(),
            ModelConfig::Flux(c) => c.desc(),
        }
    }

    /// Every parameter, with its tensor-parallel placement and block (see
    /// [`PixArtConfig::params`]).
    pub fn params(&self, elem_bytes: usize) -> Vec<parallel_core::ParamInfo> {
        match self {
            ModelConfig::PixArt(c) => c.params(elem_bytes),
            ModelConfig::DiT(c) => c.params(elem_bytes),
            ModelConfig::SD3(c) => c.params(elem_bytes),
            ModelConfig::Flux(c) => c.params(elem_bytes),
        }
    }
}

fn check(ok: bool, location: &str, reason: impl FnOnce() -> String) -> Result<()> {
    if ok { Ok(()) } else { Err(DitError::Config { location: location.into(), reason: reason() }) }
}

/// The settings both classes share, for [`check_common`].
struct Common<'a> {
    heads: usize,
    head_dim: usize,
    layers: usize,
    patch: usize,
    activation_fn: &'a str,
    affine: bool,
    legacy: &'a LegacyKeys,
}

fn check_common(location: &str, c: Common<'_>) -> Result<()> {
    let Common { heads, head_dim, layers, patch, activation_fn, affine, legacy } = c;
    check(heads > 0 && head_dim > 0, location, || {
        "`num_attention_heads` and `attention_head_dim` must be positive".into()
    })?;
    check(layers > 0, location, || "`num_layers` must be positive".into())?;
    check(patch > 0, location, || "`patch_size` must be positive".into())?;
    check(matches!(activation_fn, "gelu" | "gelu-approximate"), location, || {
        format!("`activation_fn` `{activation_fn}` is not supported (gelu, gelu-approximate)")
    })?;
    check(!affine, location, || {
        "`norm_elementwise_affine` true is not supported (no released checkpoint uses it)".into()
    })?;
    check(legacy.only_cross_attention != Some(true), location, || {
        "`only_cross_attention` true is not supported".into()
    })?;
    check(legacy.double_self_attention != Some(true), location, || {
        "`double_self_attention` true is not supported".into()
    })?;
    check(legacy.num_vector_embeds.is_none(), location, || {
        "`num_vector_embeds` (discrete inputs) is not supported".into()
    })
}

impl PixArtConfig {
    /// PixArt-α at 512 px (`PixArt-alpha/PixArt-XL-2-512x512`): no interpolation scale and no
    /// additional conditions in its config, so both are derived (1, false).
    pub fn pixart_xl_2_512x512() -> Self {
        PixArtConfig {
            num_attention_heads: 16,
            attention_head_dim: 72,
            in_channels: 4,
            out_channels: Some(8),
            num_layers: 28,
            cross_attention_dim: Some(1152),
            attention_bias: true,
            sample_size: 64,
            patch_size: 2,
            activation_fn: "gelu-approximate".into(),
            num_embeds_ada_norm: Some(1000),
            upcast_attention: false,
            norm_type: "ada_norm_single".into(),
            norm_elementwise_affine: false,
            norm_eps: 1e-6,
            interpolation_scale: None,
            use_additional_conditions: None,
            caption_channels: Some(4096),
            attention_type: Some("default".into()),
            legacy: LegacyKeys::default(),
        }
    }

    /// PixArt-α at 1024 px, multi-scale (`PixArt-alpha/PixArt-XL-2-1024-MS`): derived
    /// interpolation scale 2 and resolution/aspect-ratio conditions.
    pub fn pixart_xl_2_1024_ms() -> Self {
        PixArtConfig { sample_size: 128, ..Self::pixart_xl_2_512x512() }
    }

    /// PixArt-Σ at 1024 px (`PixArt-alpha/PixArt-Sigma-XL-2-1024-MS`): interpolation scale 2
    /// and no additional conditions, both written in its config.
    pub fn pixart_sigma_xl_2_1024_ms() -> Self {
        PixArtConfig {
            sample_size: 128,
            interpolation_scale: Some(2.0),
            use_additional_conditions: Some(false),
            ..Self::pixart_xl_2_512x512()
        }
    }

    /// `num_attention_heads · attention_head_dim`.
    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Output channels (`out_channels`, or `in_channels` when null).
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// The interpolation scale diffusers uses: the config value, else
    /// `max(sample_size / 64, 1)` (integer division).
    pub fn interpolation_scale(&self) -> f64 {
        self.interpolation_scale.unwrap_or((self.sample_size / 64).max(1) as f64)
    }

    /// Whether resolution/aspect-ratio conditions are used: the config value, else
    /// `sample_size == 128`.
    pub fn use_additional_conditions(&self) -> bool {
        self.use_additional_conditions.unwrap_or(self.sample_size == 128)
    }

    /// The position embedding's base grid, `sample_size / patch_size`.
    pub fn base_size(&self) -> usize {
        self.sample_size / self.patch_size
    }

    fn common(&self) -> Common<'_> {
        Common {
            heads: self.num_attention_heads,
            head_dim: self.attention_head_dim,
            layers: self.num_layers,
            patch: self.patch_size,
            activation_fn: &self.activation_fn,
            affine: self.norm_elementwise_affine,
            legacy: &self.legacy,
        }
    }

    /// Checks that the settings are ones this crate computes exactly like diffusers.
    pub fn validate(&self, location: &str) -> Result<()> {
        check_common(location, self.common())?;
        check(self.norm_type == "ada_norm_single", location, || {
            format!("PixArt needs `norm_type` ada_norm_single, not `{}`", self.norm_type)
        })?;
        check(self.num_embeds_ada_norm.is_some(), location, || {
            "`num_embeds_ada_norm` must be set for ada_norm_single".into()
        })?;
        check(matches!(self.attention_type.as_deref(), None | Some("default")), location, || {
            format!("`attention_type` {:?} is not supported (default)", self.attention_type)
        })?;
        let h = self.hidden_size();
        check(h.is_multiple_of(4), location, || {
            format!("hidden size {h} must be divisible by 4 for the 2-D sin-cos position embedding")
        })?;
        check(!self.use_additional_conditions() || h.is_multiple_of(3), location, || {
            format!("hidden size {h} must be divisible by 3 with `use_additional_conditions`")
        })?;
        check(self.base_size() > 0, location, || "`sample_size` below `patch_size`".into())?;
        check(self.interpolation_scale() > 0.0, location, || {
            "`interpolation_scale` must be positive".into()
        })?;
        if let Some(c) = self.cross_attention_dim {
            check(self.caption_channels.is_none() || c == h, location, || {
                format!(
                    "`cross_attention_dim` {c} must equal the hidden size {h}: the caption \
                     projection outputs the hidden size"
                )
            })?;
        }
        Ok(())
    }

    /// What strategies validate against.
    pub fn desc(&self) -> ModelDesc {
        ModelDesc {
            class_name: "PixArtTransformer2DModel".into(),
            family: ModelFamily::Dit,
            num_layers: self.num_layers,
            num_heads: self.num_attention_heads,
            head_dim: self.attention_head_dim,
            hidden_size: self.hidden_size(),
            ff_inner: 4 * self.hidden_size(),
            patch_size: self.patch_size,
            in_channels: self.in_channels,
            out_channels: self.out_channels(),
            cross_attention: self.cross_attention_dim.is_some(),
            row_granularity: self.patch_size,
            sample_size: self.sample_size,
            heads_per_level: vec![self.num_attention_heads],
            feature_sites: Vec::new(),
            joint_layers: Vec::new(),
        }
    }
}

impl DiTConfig {
    /// DiT-XL/2 at 256 px (`facebook/DiT-XL-2-256`), 1000 ImageNet classes.
    pub fn dit_xl_2_256() -> Self {
        DiTConfig {
            num_attention_heads: 16,
            attention_head_dim: 72,
            in_channels: 4,
            out_channels: Some(8),
            num_layers: 28,
            attention_bias: true,
            sample_size: 32,
            patch_size: 2,
            activation_fn: "gelu-approximate".into(),
            num_embeds_ada_norm: Some(1000),
            upcast_attention: false,
            norm_type: "ada_norm_zero".into(),
            norm_elementwise_affine: false,
            norm_eps: 1e-5,
            legacy: LegacyKeys::default(),
        }
    }

    /// DiT-XL/2 at 512 px (`facebook/DiT-XL-2-512`).
    pub fn dit_xl_2_512() -> Self {
        DiTConfig { sample_size: 64, ..Self::dit_xl_2_256() }
    }

    /// `num_attention_heads · attention_head_dim`.
    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Output channels (`out_channels`, or `in_channels` when null).
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Number of classes; the null class (for guidance) is this index.
    pub fn num_classes(&self) -> usize {
        self.num_embeds_ada_norm.unwrap_or(0)
    }

    /// The position embedding's base grid, `sample_size / patch_size`.
    pub fn base_size(&self) -> usize {
        self.sample_size / self.patch_size
    }

    fn common(&self) -> Common<'_> {
        Common {
            heads: self.num_attention_heads,
            head_dim: self.attention_head_dim,
            layers: self.num_layers,
            patch: self.patch_size,
            activation_fn: &self.activation_fn,
            affine: self.norm_elementwise_affine,
            legacy: &self.legacy,
        }
    }

    /// Checks that the settings are ones this crate computes exactly like diffusers.
    pub fn validate(&self, location: &str) -> Result<()> {
        check_common(location, self.common())?;
        check(self.norm_type == "ada_norm_zero", location, || {
            format!("DiT needs `norm_type` ada_norm_zero, not `{}`", self.norm_type)
        })?;
        check(self.num_embeds_ada_norm.is_some(), location, || {
            "`num_embeds_ada_norm` (the number of classes) must be set for ada_norm_zero".into()
        })?;
        let h = self.hidden_size();
        check(h.is_multiple_of(4), location, || {
            format!("hidden size {h} must be divisible by 4 for the 2-D sin-cos position embedding")
        })?;
        check(self.base_size() > 0, location, || "`sample_size` below `patch_size`".into())
    }

    /// What strategies validate against.
    pub fn desc(&self) -> ModelDesc {
        ModelDesc {
            class_name: "DiTTransformer2DModel".into(),
            family: ModelFamily::Dit,
            num_layers: self.num_layers,
            num_heads: self.num_attention_heads,
            head_dim: self.attention_head_dim,
            hidden_size: self.hidden_size(),
            ff_inner: 4 * self.hidden_size(),
            patch_size: self.patch_size,
            in_channels: self.in_channels,
            out_channels: self.out_channels(),
            cross_attention: false,
            row_granularity: self.patch_size,
            sample_size: self.sample_size,
            heads_per_level: vec![self.num_attention_heads],
            feature_sites: Vec::new(),
            joint_layers: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_and_missing_keys_take_diffusers_defaults() {
        let c = ModelConfig::from_json(
            r#"{"_class_name": "PixArtTransformer2DModel", "sample_size": 128,
                "interpolation_scale": null, "use_additional_conditions": null,
                "attention_head_dim": 6, "num_attention_heads": 4}"#,
            "test",
        )
        .unwrap();
        let ModelConfig::PixArt(c) = c else { panic!() };
        assert_eq!(c.interpolation_scale(), 2.0);
        assert!(c.use_additional_conditions());
        assert_eq!(c.out_channels(), 8);
        assert_eq!(c.num_layers, 28);
        let c = PixArtConfig { sample_size: 64, ..c };
        assert_eq!(c.interpolation_scale(), 1.0);
        assert!(!c.use_additional_conditions());
        let c = PixArtConfig { sample_size: 16, ..c };
        assert_eq!(c.interpolation_scale(), 1.0);
    }

    #[test]
    fn legacy_transformer2d_is_remapped_by_norm_type() {
        let c = ModelConfig::from_json(
            r#"{"_class_name": "Transformer2DModel", "norm_type": "ada_norm_zero",
                "num_vector_embeds": null, "only_cross_attention": false,
                "use_linear_projection": false}"#,
            "t",
        )
        .unwrap();
        assert_eq!(c.class_name(), "DiTTransformer2DModel");
        let ModelConfig::DiT(d) = c else { panic!() };
        assert_eq!(d.norm_eps, 1e-5);
        assert_eq!(d.out_channels(), 4);
        let c = ModelConfig::from_json(
            r#"{"_class_name": "Transformer2DModel", "norm_type": "ada_norm_single",
                "caption_channels": 4096, "sample_size": 64}"#,
            "t",
        )
        .unwrap();
        assert_eq!(c.class_name(), "PixArtTransformer2DModel");
        let err = ModelConfig::from_json(
            r#"{"_class_name": "Transformer2DModel", "norm_type": "layer_norm"}"#,
            "t",
        )
        .unwrap_err();
        assert!(err.to_string().contains("layer_norm"), "{err}");
    }
}

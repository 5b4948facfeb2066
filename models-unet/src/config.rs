//! `UNet2DConditionModel`'s `config.json`, read with diffusers 0.42's defaults and normalised
//! to one value per block (diffusers accepts an int or a per-block list for several keys).
//!
//! Keys this crate does not read are ignored, as diffusers ignores keys it does not know
//! (`_diffusers_version`, `dropout` at inference, …). Keys that select an architecture this
//! crate does not implement are refused with an error naming the key and the value
//! ([`UnetError::Config`]): class and extra embeddings other than SDXL's `text_time`,
//! `time_cond_proj_dim` (LCM), `encoder_hid_dim` (IP adapters, Kandinsky), dual or
//! cross-only attention, `scale_shift` resnets, Fourier time embeddings, other block types.

use std::path::Path;

use parallel_core::{FeatureSite, ModelDesc, ModelFamily};
use serde_json::{Map, Value};

use crate::error::{Result, UnetError};

/// The diffusers class this crate implements.
pub const CLASS_NAME: &str = "UNet2DConditionModel";

/// The named presets: real checkpoints' configs with random weights (benchmarks).
pub const PRESETS: [&str; 3] = ["sd15", "sd21", "sdxl-base"];

/// The kind of a down or up block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Resnets only (`DownBlock2D`, `UpBlock2D`).
    Plain,
    /// Resnets each followed by a `Transformer2DModel` (`CrossAttnDownBlock2D`,
    /// `CrossAttnUpBlock2D`).
    CrossAttn,
}

/// SDXL's `addition_embed_type = "text_time"`: pooled text embeddings and the six size /
/// crop numbers (`time_ids`), embedded and added to the timestep embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeConfig {
    /// Sinusoidal width of each `time_ids` number (`addition_time_embed_dim`, 256).
    pub time_embed_dim: usize,
    /// Input width of `add_embedding`: text embeds + 6 · `time_embed_dim`
    /// (`projection_class_embeddings_input_dim`, 2816).
    pub input_dim: usize,
}

impl TextTimeConfig {
    /// Width of the pooled text embeddings (`text_embeds`).
    pub fn text_embeds_dim(&self) -> usize {
        self.input_dim - 6 * self.time_embed_dim
    }
}

/// A validated `UNet2DConditionModel` configuration, one entry per block where diffusers
/// allows an int or a list.
#[derive(Debug, Clone, PartialEq)]
pub struct UNet2DConditionConfig {
    /// Default latent size (64 for SD 1.5, 96 for SD 2.1-v, 128 for SDXL).
    pub sample_size: usize,
    /// Latent channels in (4).
    pub in_channels: usize,
    /// Channels out (4).
    pub out_channels: usize,
    /// Whether the input is mapped `2x − 1` first.
    pub center_input_sample: bool,
    /// Sinusoidal embeddings `[cos, sin]` (true) or `[sin, cos]`.
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the timestep embedding (0).
    pub freq_shift: f64,
    /// Down blocks, finest first.
    pub down_block_types: Vec<BlockKind>,
    /// Whether there is a `UNetMidBlock2DCrossAttn` (`mid_block_type: null` leaves it out).
    pub mid_block: bool,
    /// Up blocks, coarsest first.
    pub up_block_types: Vec<BlockKind>,
    /// Output channels of each down block (finest first).
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more each, in reverse order).
    pub layers_per_block: Vec<usize>,
    /// `output_scale_factor` of the mid block's resnets (1).
    pub mid_block_scale_factor: f64,
    /// Groups of every GroupNorm (32).
    pub norm_num_groups: usize,
    /// Eps of the resnets' GroupNorms and `conv_norm_out` (1e-5); transformer GroupNorms use
    /// 1e-6 (hard-coded in diffusers).
    pub norm_eps: f64,
    /// Width of the text embeddings cross-attended to (768, 1024, 2048).
    pub cross_attention_dim: usize,
    /// Transformer blocks inside each down block's `Transformer2DModel`s.
    pub transformer_layers_per_block: Vec<usize>,
    /// The same for the up blocks (coarsest first): `reverse_transformer_layers_per_block`,
    /// or the down blocks' list reversed.
    pub reverse_transformer_layers_per_block: Vec<usize>,
    /// Attention heads per down block (`num_attention_heads`, else `attention_head_dim`,
    /// which SD 1.x/2.x configs use for the number of heads).
    pub num_attention_heads: Vec<usize>,
    /// Linear `proj_in`/`proj_out` (SD 2.x, SDXL) instead of 1×1 convolutions (SD 1.x).
    pub use_linear_projection: bool,
    /// Attention computed in float32 for half inputs (SD 2.1); float32 compute already is.
    pub upcast_attention: bool,
    /// SDXL's added text/time conditioning.
    pub addition: Option<TextTimeConfig>,
    /// `output_scale_factor` of the down and up blocks' resnets (1).
    pub resnet_out_scale_factor: f64,
    /// Width of the timestep embedding (`time_embedding_dim`, default 4 · first channels).
    pub time_embed_dim: usize,
    /// Kernel of `conv_in` (3).
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out` (3).
    pub conv_out_kernel: usize,
}

fn cfg_err(location: &str, reason: impl Into<String>) -> UnetError {
    UnetError::Config { location: location.to_string(), reason: reason.into() }
}

/// Reads keys of one config object, naming the key in every error.
struct Keys<'a> {
    map: &'a Map<String, Value>,
    location: &'a str,
}

impl Keys<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn err(&self, key: &str, what: &str, value: &Value) -> UnetError {
        cfg_err(self.location, format!("`{key}` must be {what}, found {value}"))
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| self.err(key, "a non-negative integer", v)),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(key, "a number", v)),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, "true or false", v)),
        }
    }

    fn str_list(&self, key: &str, default: &[&str]) -> Result<Vec<String>> {
        match self.get(key) {
            None => Ok(default.iter().map(|s| s.to_string()).collect()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| self.err(key, "a list of names", v))
                })
                .collect(),
            Some(v) => Err(self.err(key, "a list of block names", v)),
        }
    }

    /// An int (repeated `n` times) or a list of `n` ints.
    fn per_block(&self, key: &str, default: usize, n: usize) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(vec![default; n]),
            Some(Value::Array(items)) => {
                if items.len() != n {
                    return Err(cfg_err(
                        self.location,
                        format!(
                            "`{key}` has {} entries but there are {n} down blocks",
                            items.len()
                        ),
                    ));
                }
                items
                    .iter()
                    .map(|v| match v.as_u64() {
                        Some(x) => Ok(x as usize),
                        None if v.is_array() => Err(cfg_err(
                            self.location,
                            format!("`{key}` per resnet layer (a list of lists) is not supported"),
                        )),
                        None => Err(self.err(key, "a list of non-negative integers", v)),
                    })
                    .collect()
            }
            Some(v) => v
                .as_u64()
                .map(|x| vec![x as usize; n])
                .ok_or_else(|| self.err(key, "an integer or a list of integers", v)),
        }
    }

    /// A key that must be absent, `null`, or equal to `allowed`.
    fn refuse_unless(&self, key: &str, allowed: &Value, why: &str) -> Result<()> {
        match self.get(key) {
            None => Ok(()),
            Some(v) if v == allowed => Ok(()),
            Some(v) => Err(cfg_err(
                self.location,
                format!("`{key}` = {v} is not supported ({why}); this crate implements {allowed}"),
            )),
        }
    }

    /// A key that must be absent or `null`.
    fn refuse_set(&self, key: &str, why: &str) -> Result<()> {
        match self.get(key) {
            None => Ok(()),
            Some(v) => Err(cfg_err(
                self.location,
                format!("`{key}` = {v} is not supported ({why}); it must be absent or null"),
            )),
        }
    }
}

impl UNet2DConditionConfig {
    /// Reads `folder/config.json`.
    pub fn from_folder(folder: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(folder.as_ref().join("config.json"))
    }

    /// Reads a `config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| UnetError::Io { path: path.to_path_buf(), source })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses a config; `location` names it in errors.
    pub fn from_json(json: &str, location: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(json)
            .map_err(|e| cfg_err(location, format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(cfg_err(location, "not a JSON object"));
        };
        Self::from_map(&map, location)
    }

    fn from_map(map: &Map<String, Value>, location: &str) -> Result<Self> {
        let k = Keys { map, location };
        if let Some(class) = k.get("_class_name")
            && class.as_str() != Some(CLASS_NAME)
        {
            return Err(cfg_err(
                location,
                format!("`_class_name` = {class}: this crate implements {CLASS_NAME}"),
            ));
        }
        // Architectures this crate does not implement: refuse, naming the key.
        k.refuse_set("class_embed_type", "class embeddings")?;
        k.refuse_set("num_class_embeds", "class embeddings")?;
        k.refuse_set("time_cond_proj_dim", "guidance-distilled timestep conditioning (LCM)")?;
        k.refuse_set("encoder_hid_dim", "encoder hidden-state projections")?;
        k.refuse_set("encoder_hid_dim_type", "encoder hidden-state projections")?;
        k.refuse_set("time_embedding_act_fn", "an activation after the timestep embedding")?;
        k.refuse_set("timestep_post_act", "an activation inside the timestep embedding")?;
        k.refuse_set("cross_attention_norm", "a norm of the text embeddings in attention")?;
        k.refuse_set("num_attention_heads", "diffusers itself refuses it; use attention_head_dim")?;
        k.refuse_unless("dual_cross_attention", &Value::Bool(false), "dual cross-attention")?;
        k.refuse_unless("only_cross_attention", &Value::Bool(false), "cross-only attention")?;
        k.refuse_unless(
            "resnet_time_scale_shift",
            &"default".into(),
            "time embedding as scale/shift",
        )?;
        k.refuse_unless(
            "resnet_skip_time_act",
            &Value::Bool(false),
            "no SiLU before time_emb_proj",
        )?;
        k.refuse_unless("time_embedding_type", &"positional".into(), "Fourier time embeddings")?;
        k.refuse_unless("act_fn", &"silu".into(), "other activations")?;
        k.refuse_unless("attention_type", &"default".into(), "gated attention (GLIGEN)")?;
        k.refuse_unless("class_embeddings_concat", &Value::Bool(false), "class embeddings")?;
        k.refuse_unless("downsample_padding", &1.into(), "other down-sampling padding")?;
        k.refuse_unless("mid_block_only_cross_attention", &Value::Bool(false), "cross-only")?;

        let down_names = k.str_list(
            "down_block_types",
            &[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
        )?;
        let up_names = k.str_list(
            "up_block_types",
            &["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        )?;
        let kind = |key: &str, name: &str, plain: &str, cross: &str| -> Result<BlockKind> {
            if name == plain {
                Ok(BlockKind::Plain)
            } else if name == cross {
                Ok(BlockKind::CrossAttn)
            } else {
                Err(cfg_err(
                    location,
                    format!("`{key}` has `{name}`; this crate implements {plain} and {cross}"),
                ))
            }
        };
        let down_block_types = down_names
            .iter()
            .map(|n| kind("down_block_types", n, "DownBlock2D", "CrossAttnDownBlock2D"))
            .collect::<Result<Vec<_>>>()?;
        let up_block_types = up_names
            .iter()
            .map(|n| kind("up_block_types", n, "UpBlock2D", "CrossAttnUpBlock2D"))
            .collect::<Result<Vec<_>>>()?;
        let n = down_block_types.len();
        if n == 0 || up_block_types.len() != n {
            return Err(cfg_err(
                location,
                format!(
                    "`down_block_types` ({n}) and `up_block_types` ({}) must be non-empty and as \
                     long as each other",
                    up_block_types.len()
                ),
            ));
        }
        let mid_block = match map.get("mid_block_type") {
            None => true,
            Some(Value::Null) => false,
            Some(v) if v.as_str() == Some("UNetMidBlock2DCrossAttn") => true,
            Some(v) => {
                return Err(cfg_err(
                    location,
                    format!(
                        "`mid_block_type` = {v} is not supported; this crate implements \
                         UNetMidBlock2DCrossAttn (or null)"
                    ),
                ));
            }
        };
        let block_out_channels = match k.get("block_out_channels") {
            None => vec![320, 640, 1280, 1280],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|x| x as usize)
                        .ok_or_else(|| k.err("block_out_channels", "a list of integers", v))
                })
                .collect::<Result<_>>()?,
            Some(v) => return Err(k.err("block_out_channels", "a list of integers", v)),
        };
        if block_out_channels.len() != n {
            return Err(cfg_err(
                location,
                format!(
                    "`block_out_channels` has {} entries but there are {n} down blocks",
                    block_out_channels.len()
                ),
            ));
        }
        let cross_attention_dim = match k.get("cross_attention_dim") {
            None => 1280,
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                k.err("cross_attention_dim", "an integer (per-block lists are not supported)", v)
            })?,
        };
        // `num_attention_heads` is refused above (as diffusers does): the heads come from
        // `attention_head_dim`.
        let num_attention_heads = k.per_block("attention_head_dim", 8, n)?;
        let transformer_layers_per_block = k.per_block("transformer_layers_per_block", 1, n)?;
        let reverse_transformer_layers_per_block =
            match k.get("reverse_transformer_layers_per_block") {
                None => transformer_layers_per_block.iter().rev().copied().collect(),
                Some(_) => k.per_block("reverse_transformer_layers_per_block", 1, n)?,
            };
        let addition = match k.get("addition_embed_type") {
            None => None,
            Some(v) if v.as_str() == Some("text_time") => {
                let time_embed_dim = k.usize_or("addition_time_embed_dim", 0)?;
                let input_dim = k.usize_or("projection_class_embeddings_input_dim", 0)?;
                if time_embed_dim == 0 || input_dim <= 6 * time_embed_dim {
                    return Err(cfg_err(
                        location,
                        format!(
                            "`addition_embed_type` text_time needs `addition_time_embed_dim` > 0 \
                             and `projection_class_embeddings_input_dim` > 6 · it (found \
                             {time_embed_dim} and {input_dim})"
                        ),
                    ));
                }
                Some(TextTimeConfig { time_embed_dim, input_dim })
            }
            Some(v) => {
                return Err(cfg_err(
                    location,
                    format!(
                        "`addition_embed_type` = {v} is not supported; this crate implements \
                         \"text_time\" (SDXL) or null"
                    ),
                ));
            }
        };
        if map.get("norm_num_groups").is_some_and(Value::is_null) {
            return Err(cfg_err(
                location,
                "`norm_num_groups` = null (no output norm) is not supported",
            ));
        }
        let config = UNet2DConditionConfig {
            sample_size: k.usize_or("sample_size", 64)?,
            in_channels: k.usize_or("in_channels", 4)?,
            out_channels: k.usize_or("out_channels", 4)?,
            center_input_sample: k.bool_or("center_input_sample", false)?,
            flip_sin_to_cos: k.bool_or("flip_sin_to_cos", true)?,
            freq_shift: k.f64_or("freq_shift", 0.0)?,
            down_block_types,
            mid_block,
            up_block_types,
            layers_per_block: k.per_block("layers_per_block", 2, n)?,
            mid_block_scale_factor: k.f64_or("mid_block_scale_factor", 1.0)?,
            norm_num_groups: k.usize_or("norm_num_groups", 32)?,
            norm_eps: k.f64_or("norm_eps", 1e-5)?,
            cross_attention_dim,
            transformer_layers_per_block,
            reverse_transformer_layers_per_block,
            num_attention_heads,
            use_linear_projection: k.bool_or("use_linear_projection", false)?,
            upcast_attention: k.bool_or("upcast_attention", false)?,
            addition,
            resnet_out_scale_factor: k.f64_or("resnet_out_scale_factor", 1.0)?,
            time_embed_dim: k.usize_or("time_embedding_dim", 4 * block_out_channels[0])?,
            conv_in_kernel: k.usize_or("conv_in_kernel", 3)?,
            conv_out_kernel: k.usize_or("conv_out_kernel", 3)?,
            block_out_channels,
        };
        config.validate(location)?;
        Ok(config)
    }

    /// Checks sizes diffusers would reject or this crate cannot split evenly.
    pub fn validate(&self, location: &str) -> Result<()> {
        let bad = |reason: String| Err(cfg_err(location, reason));
        let g = self.norm_num_groups;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if g == 0 || c == 0 || !c.is_multiple_of(g) {
                return bad(format!(
                    "`block_out_channels`[{i}] = {c} is not a positive multiple of \
                     `norm_num_groups` = {g}"
                ));
            }
            let heads = self.num_attention_heads[i];
            if heads == 0 || !c.is_multiple_of(heads) {
                return bad(format!(
                    "{c} channels of down block {i} are not divisible by its {heads} attention \
                     heads (`attention_head_dim`)"
                ));
            }
        }
        for (key, k) in
            [("conv_in_kernel", self.conv_in_kernel), ("conv_out_kernel", self.conv_out_kernel)]
        {
            if k.is_multiple_of(2) {
                return bad(format!("`{key}` = {k} must be odd"));
            }
        }
        if self.layers_per_block.contains(&0) {
            return bad("`layers_per_block` must be at least 1".into());
        }
        Ok(())
    }

    /// Number of resolution levels with a down-sampler (all down blocks but the last).
    pub fn num_downsamplers(&self) -> usize {
        self.down_block_types.len() - 1
    }

    /// Latent rows covered by one row of the coarsest feature map (`2^downsamplers`).
    pub fn row_granularity(&self) -> usize {
        1 << self.num_downsamplers()
    }

    /// Transformer blocks over the whole U-Net (down, mid, up), each with one self-attention.
    pub fn num_transformer_blocks(&self) -> usize {
        let n = self.down_block_types.len();
        let cross = |kind: &BlockKind| *kind == BlockKind::CrossAttn;
        let down: usize = self
            .down_block_types
            .iter()
            .zip(self.layers_per_block.iter().zip(&self.transformer_layers_per_block))
            .filter(|(kind, _)| cross(kind))
            .map(|(_, (resnets, layers))| resnets * layers)
            .sum();
        let mid = if self.mid_block { self.transformer_layers_per_block[n - 1] } else { 0 };
        let up: usize = self
            .up_block_types
            .iter()
            .zip(self.layers_per_block.iter().rev().zip(&self.reverse_transformer_layers_per_block))
            .filter(|(kind, _)| cross(kind))
            .map(|(_, (resnets, layers))| (resnets + 1) * layers)
            .sum();
        down + mid + up
    }

    /// The seam sites of a forward, in order ([`ModelDesc::feature_sites`]): per resnet
    /// `norm1`, `conv1`, `norm2`, `conv2` and its reduce (its 1×1 shortcut has none); per
    /// transformer its GroupNorm and per layer a self-attention and three reduces; each down-sampler's conv at its input
    /// resolution and each up-sampler's after the interpolation; `conv_norm_out`, `conv_out`.
    /// `conv_in` reads the whole latent and is no site. `models-unet`'s tests hold this
    /// list against the sites a forward passes.
    pub fn feature_sites(&self) -> Vec<FeatureSite> {
        let ch = &self.block_out_channels;
        let n = ch.len();
        let groups = self.norm_num_groups;
        let mut sites = Vec::new();
        let resnet = |sites: &mut Vec<FeatureSite>, c_in: usize, c_out: usize, scale: usize| {
            sites.push(FeatureSite::GroupNorm { channels: c_in, groups, scale });
            sites.push(FeatureSite::Conv { channels: c_in, halo: 1, scale });
            sites.push(FeatureSite::GroupNorm { channels: c_out, groups, scale });
            sites.push(FeatureSite::Conv { channels: c_out, halo: 1, scale });
            sites.push(FeatureSite::Reduce { channels: c_out, scale });
        };
        let transformer =
            |sites: &mut Vec<FeatureSite>, channels: usize, heads: usize, layers, scale| {
                sites.push(FeatureSite::GroupNorm { channels, groups, scale });
                for _ in 0..layers {
                    sites.push(FeatureSite::SelfAttention { channels, heads, scale });
                    // attn1, attn2 and the feed-forward's row-parallel outputs.
                    for _ in 0..3 {
                        sites.push(FeatureSite::Reduce { channels, scale });
                    }
                }
            };
        let mut scale = 1;
        let mut out = ch[0];
        for (i, &channels) in ch.iter().enumerate() {
            let input = out;
            out = channels;
            for j in 0..self.layers_per_block[i] {
                resnet(&mut sites, if j == 0 { input } else { out }, out, scale);
                if self.down_block_types[i] == BlockKind::CrossAttn {
                    let layers = self.transformer_layers_per_block[i];
                    transformer(&mut sites, out, self.num_attention_heads[i], layers, scale);
                }
            }
            if i + 1 < n {
                sites.push(FeatureSite::Conv { channels: out, halo: 1, scale });
                scale *= 2;
            }
        }
        if self.mid_block {
            let c = ch[n - 1];
            resnet(&mut sites, c, c, scale);
            let layers = self.transformer_layers_per_block[n - 1];
            transformer(&mut sites, c, self.num_attention_heads[n - 1], layers, scale);
            resnet(&mut sites, c, c, scale);
        }
        let mut out = ch[n - 1];
        for i in 0..n {
            let level = n - 1 - i;
            let prev = out;
            out = ch[level];
            let skip_last = ch[level.saturating_sub(1)];
            let layers = self.layers_per_block[level] + 1;
            for j in 0..layers {
                let skip = if j == layers - 1 { skip_last } else { out };
                let c_in = if j == 0 { prev } else { out };
                resnet(&mut sites, c_in + skip, out, scale);
                if self.up_block_types[i] == BlockKind::CrossAttn {
                    let t = self.reverse_transformer_layers_per_block[i];
                    transformer(&mut sites, out, self.num_attention_heads[level], t, scale);
                }
            }
            if i + 1 < n {
                scale /= 2;
                sites.push(FeatureSite::Conv { channels: out, halo: 1, scale });
            }
        }
        sites.push(FeatureSite::GroupNorm { channels: ch[0], groups, scale });
        if self.conv_out_kernel > 1 {
            let halo = self.conv_out_kernel / 2;
            sites.push(FeatureSite::Conv { channels: ch[0], halo, scale });
        }
        sites
    }

    /// What strategies validate against.
    pub fn desc(&self) -> ModelDesc {
        let last = self.block_out_channels.len() - 1;
        let heads = self.num_attention_heads[last];
        let channels = self.block_out_channels[last];
        ModelDesc {
            class_name: CLASS_NAME.into(),
            family: ModelFamily::Unet,
            num_layers: self.num_transformer_blocks(),
            num_heads: heads,
            head_dim: channels / heads,
            hidden_size: channels,
            ff_inner: 4 * channels,
            patch_size: 1,
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            cross_attention: true,
            row_granularity: self.row_granularity(),
            sample_size: self.sample_size,
            heads_per_level: self.num_attention_heads.clone(),
            feature_sites: self.feature_sites(),
            joint_layers: Vec::new(),
        }
    }

    /// A named preset ([`PRESETS`]): the real checkpoint's `unet/config.json`.
    pub fn preset(name: &str) -> Result<Self> {
        Self::from_json(Self::preset_json(name)?, &format!("preset {name}"))
    }

    /// The `config.json` text of a named preset (the keys that matter), as diffusers writes
    /// it: what a benchmark writes into a random-weight folder.
    pub fn preset_json(name: &str) -> Result<&'static str> {
        match name {
            "sd15" => Ok(SD15_JSON),
            "sd21" => Ok(SD21_JSON),
            "sdxl-base" => Ok(SDXL_BASE_JSON),
            _ => Err(UnetError::UnknownPreset {
                name: name.into(),
                known: PRESETS.iter().map(|s| s.to_string()).collect(),
            }),
        }
    }
}

/// `stable-diffusion-v1-5/stable-diffusion-v1-5` `unet/config.json` (the keys that matter).
const SD15_JSON: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

/// `stabilityai/stable-diffusion-2-1` `unet/config.json` (768 px, v-prediction).
const SD21_JSON: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 1024,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
  "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
  "norm_num_groups": 32, "num_class_embeds": null, "only_cross_attention": false,
  "out_channels": 4, "sample_size": 96, "upcast_attention": true, "use_linear_projection": true,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

/// `stabilityai/stable-diffusion-xl-base-1.0` `unet/config.json`.
const SDXL_BASE_JSON: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
  "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
  "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
  "center_input_sample": false, "class_embed_type": null, "class_embeddings_concat": false,
  "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
  "cross_attention_norm": null,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
  "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1,
  "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
  "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false,
  "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
  "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false,
  "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": null,
  "time_embedding_act_fn": null, "time_embedding_dim": null, "time_embedding_type": "positional",
  "timestep_post_act": null, "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "upcast_attention": null, "use_linear_projection": true
}"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_with_real_sizes() {
        let sd = UNet2DConditionConfig::preset("sd15").unwrap();
        assert_eq!(sd.num_attention_heads, vec![8; 4]);
        assert_eq!(sd.row_granularity(), 8);
        // 2 per cross-attn down block (3), 1 mid, 3 per cross-attn up block (3).
        assert_eq!(sd.num_transformer_blocks(), 6 + 1 + 9);
        let xl = UNet2DConditionConfig::preset("sdxl-base").unwrap();
        assert_eq!(xl.reverse_transformer_layers_per_block, vec![10, 2, 1]);
        assert_eq!(xl.addition.unwrap().text_embeds_dim(), 1280);
        // down: 2·2 + 2·10, mid 10, up: 3·10 + 3·2.
        assert_eq!(xl.num_transformer_blocks(), 24 + 10 + 36);
        assert_eq!(xl.row_granularity(), 4);
        let v = UNet2DConditionConfig::preset("sd21").unwrap();
        assert!(v.use_linear_projection && v.upcast_attention);
    }

    #[test]
    fn unsupported_keys_are_named() {
        for (key, value) in [
            ("class_embed_type", "\"timestep\""),
            ("time_cond_proj_dim", "256"),
            ("addition_embed_type", "\"text\""),
            ("resnet_time_scale_shift", "\"scale_shift\""),
            ("num_attention_heads", "8"),
            ("only_cross_attention", "true"),
            ("mid_block_type", "\"UNetMidBlock2DSimpleCrossAttn\""),
            ("encoder_hid_dim_type", "\"text_proj\""),
        ] {
            let json = format!("{{\"{key}\": {value}}}");
            let err = UNet2DConditionConfig::from_json(&json, "cfg").unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let err = UNet2DConditionConfig::from_json(
            r#"{"down_block_types": ["AttnDownBlock2D"], "up_block_types": ["UpBlock2D"],
                "block_out_channels": [32]}"#,
            "cfg",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("AttnDownBlock2D"), "{err}");
        let err = UNet2DConditionConfig::from_json(r#"{"attention_head_dim": 7}"#, "cfg")
            .unwrap_err()
            .to_string();
        assert!(err.contains("attention heads"), "{err}");
    }
}

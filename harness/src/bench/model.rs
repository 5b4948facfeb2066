//! The model a benchmark runs: a diffusers folder as it is, or a named preset of the real
//! size with random weights, written once to a folder so that every rank of every
//! configuration (and PyTorch, in `tools/bench/pytorch_timing.py`) loads the *same* weights,
//! sliced by each strategy's load plan.
//!
//! Why a folder and not [`DitModel::preset`](models_dit::DitModel::preset): random weights drawn on each rank differ
//! between ranks (and a tensor-parallel shard drawn on its own is not a slice of the serial
//! model's weights), so outputs could not be compared with serial. A folder written from a
//! seeded generator is loaded by every rank exactly as a real checkpoint would be.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use models_dit::{DiTConfig, ModelConfig, PixArtConfig, WEIGHTS_FILE};
use models_unet::{UNet2DConditionConfig, UnetModel};
use serde_json::{Value, json};

use super::{BenchError, Result};
use crate::DenoiserConfig;

/// The resolved model of a benchmark: the folder every rank loads and its configuration.
#[derive(Debug, Clone)]
pub struct BenchModel {
    /// What the configuration named (a preset or a folder).
    pub name: String,
    /// The denoiser folder (`config.json` + weights).
    pub dir: PathBuf,
    /// Its configuration (a DiT-family transformer or a U-Net).
    pub config: DenoiserConfig,
    /// Whether the weights are random (a preset written by the bench).
    pub random_weights: bool,
}

impl BenchModel {
    /// Resolves `model`: a name of [`models_dit::PRESETS`] (random weights `N(0, 0.02²)`
    /// from `seed`, with `layers` transformer blocks instead of the preset's when given,
    /// written under `cache` unless already there), a name of [`models_unet::PRESETS`]
    /// (random weights as [`write_random_unet_folder`] draws them), or a folder (a
    /// transformer or U-Net folder, or a pipeline folder whose `transformer/` or `unet/` is
    /// used).
    ///
    /// # Errors
    /// An unknown name that is not a folder (listing the presets), `layers` given with a
    /// folder or a U-Net preset, or a folder or file that cannot be read or written.
    pub fn resolve(model: &str, layers: Option<usize>, seed: u64, cache: &Path) -> Result<Self> {
        if models_unet::PRESETS.contains(&model) {
            if layers.is_some() {
                return Err(BenchError::config(
                    "layers",
                    "applies to the transformer presets (a stack of equal blocks); a U-Net \
                     preset runs whole",
                ));
            }
            let dir = cache.join(format!("{model}-unet-seed{seed}"));
            if !dir.join(DONE).exists() {
                write_random_unet_folder(&dir, model, seed)?;
            }
            let config =
                DenoiserConfig::from_folder(&dir).map_err(|e| BenchError::config("model", e))?;
            return Ok(BenchModel { name: model.into(), dir, config, random_weights: true });
        }
        if models_dit::PRESETS.contains(&model) {
            let mut config =
                ModelConfig::preset(model).map_err(|e| BenchError::config("model", e))?;
            if let Some(l) = layers {
                if l == 0 {
                    return Err(BenchError::config("layers", "must be at least 1"));
                }
                match &mut config {
                    ModelConfig::PixArt(c) => c.num_layers = l,
                    ModelConfig::DiT(c) => c.num_layers = l,
                    ModelConfig::SD3(c) => {
                        c.num_layers = l;
                        c.dual_attention_layers.retain(|&d| d < l);
                    }
                    // FLUX's 19 : 38 double- to single-stream blocks, kept: a third double.
                    ModelConfig::Flux(c) => {
                        c.num_layers = l.div_ceil(3);
                        c.num_single_layers = l - l.div_ceil(3);
                    }
                }
            }
            let layers = config.desc().num_layers;
            let dir = cache.join(format!("{model}-L{layers}-seed{seed}"));
            if !dir.join(DONE).exists() {
                write_random_folder(&dir, &config, seed)?;
            }
            let config = DenoiserConfig::Dit(config);
            return Ok(BenchModel { name: model.into(), dir, config, random_weights: true });
        }
        let path = PathBuf::from(model);
        if !path.is_dir() {
            return Err(BenchError::config(
                "model",
                format!(
                    "`{model}` is neither a preset ({}, {}) nor a folder",
                    models_dit::PRESETS.join(", "),
                    models_unet::PRESETS.join(", ")
                ),
            ));
        }
        if layers.is_some() {
            return Err(BenchError::config(
                "layers",
                "only a preset's layer count can be changed, not a folder's",
            ));
        }
        let dir = if path.join("transformer/config.json").exists() {
            path.join("transformer")
        } else if path.join("unet/config.json").exists() {
            path.join("unet")
        } else {
            path
        };
        let config =
            DenoiserConfig::from_folder(&dir).map_err(|e| BenchError::config("model", e))?;
        Ok(BenchModel { name: model.into(), dir, config, random_weights: false })
    }

    /// Parameters of the whole model (from the weights file's header for a U-Net).
    pub fn num_params(&self) -> u64 {
        match &self.config {
            DenoiserConfig::Dit(c) => c.params(1).iter().map(|p| p.bytes()).sum(),
            DenoiserConfig::Unet(_) => {
                weights::WeightStore::open(&self.dir, models_unet::WEIGHTS_FILE)
                    .map(|store| {
                        store
                            .keys()
                            .filter_map(|k| store.meta(k).ok())
                            .map(|m| m.shape.iter().product::<usize>() as u64)
                            .sum()
                    })
                    .unwrap_or(0)
            }
        }
    }

    /// The model's class, as diffusers names it.
    pub fn class_name(&self) -> String {
        self.config.desc().class_name
    }
}

/// Writes preset `name` of [`models_unet::PRESETS`] as a diffusers U-Net folder with random
/// weights from `seed`: convolution and linear weights `N(0, 1/fan_in)`, biases 0, norm
/// weights 1 (what `UnetModel::random` draws, so activations keep their scale through the
/// real depth). The parameter list comes from a model built once with random weights (held
/// for the moment: 3.4 GB for SD 1.5, 10 GB for SDXL in float32).
pub fn write_random_unet_folder(dir: &Path, name: &str, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
    let json =
        UNet2DConditionConfig::preset_json(name).map_err(|e| BenchError::config("model", e))?;
    let path = dir.join("config.json");
    std::fs::write(&path, json).map_err(|e| BenchError::io(&path, e))?;
    let config = UNet2DConditionConfig::preset(name).map_err(|e| BenchError::config("model", e))?;
    let tensors: Vec<(String, Vec<usize>)> = {
        let model = UnetModel::<crate::CpuBackend>::random(
            &config,
            &parallel_core::LoadPlan::full(),
            &Default::default(),
        )
        .map_err(|e| BenchError::Model(e.to_string()))?;
        model.params().iter().map(|p| (p.name.clone(), p.shape.clone())).collect()
    };
    let path = dir.join(models_unet::WEIGHTS_FILE);
    write_safetensors(&path, &tensors, |name, out| {
        if name.ends_with(".bias") {
            out.fill(0.0);
        } else if is_norm_weight(name, &tensors) {
            out.fill(1.0);
        } else {
            let shape = &tensors.iter().find(|(n, _)| n == name).expect("listed").1;
            let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
            fill_normal(seed, name, 1.0 / (fan_in as f64).sqrt(), out);
        }
    })
    .map_err(|e| BenchError::io(&path, e))?;
    std::fs::write(dir.join(DONE), b"").map_err(|e| BenchError::io(dir, e))
}

/// A one-dimensional `weight` is a norm's scale (linear and convolution weights have ≥ 2
/// dimensions).
fn is_norm_weight(name: &str, tensors: &[(String, Vec<usize>)]) -> bool {
    tensors.iter().any(|(n, shape)| n == name && shape.len() == 1)
}

/// The file marking a completely written random-weight folder.
const DONE: &str = "bench-complete";

/// Writes `config` as a diffusers transformer folder with random weights from `seed`, then
/// checks that the folder reads back as `config`.
pub fn write_random_folder(dir: &Path, config: &ModelConfig, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
    let json = config_json(config);
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).expect("json"))
        .map_err(|e| BenchError::io(&path, e))?;
    let back = ModelConfig::from_folder(dir).map_err(|e| BenchError::Model(e.to_string()))?;
    if &back != config {
        return Err(BenchError::Model(format!(
            "{} does not read back as the preset: {back:?}",
            path.display()
        )));
    }
    let tensors: Vec<(String, Vec<usize>)> =
        config.params(4).into_iter().map(|p| (p.name, p.shape)).collect();
    let path = dir.join(WEIGHTS_FILE);
    write_safetensors(&path, &tensors, |name, out| fill_normal(seed, name, 0.02, out))
        .map_err(|e| BenchError::io(&path, e))?;
    std::fs::write(dir.join(DONE), b"").map_err(|e| BenchError::io(dir, e))
}

/// A diffusers `config.json` of a configuration (the keys diffusers writes).
pub fn config_json(config: &ModelConfig) -> Value {
    match config {
        ModelConfig::PixArt(c) => pixart_json(c),
        ModelConfig::DiT(c) => dit_json(c),
        ModelConfig::SD3(c) => json!({
            "_class_name": "SD3Transformer2DModel",
            "sample_size": c.sample_size,
            "patch_size": c.patch_size,
            "in_channels": c.in_channels,
            "num_layers": c.num_layers,
            "attention_head_dim": c.attention_head_dim,
            "num_attention_heads": c.num_attention_heads,
            "joint_attention_dim": c.joint_attention_dim,
            "caption_projection_dim": c.caption_projection_dim,
            "pooled_projection_dim": c.pooled_projection_dim,
            "out_channels": c.out_channels,
            "pos_embed_max_size": c.pos_embed_max_size,
            "dual_attention_layers": c.dual_attention_layers,
            "qk_norm": c.qk_norm,
        }),
        ModelConfig::Flux(c) => json!({
            "_class_name": "FluxTransformer2DModel",
            "patch_size": c.patch_size,
            "in_channels": c.in_channels,
            "out_channels": c.out_channels,
            "num_layers": c.num_layers,
            "num_single_layers": c.num_single_layers,
            "attention_head_dim": c.attention_head_dim,
            "num_attention_heads": c.num_attention_heads,
            "joint_attention_dim": c.joint_attention_dim,
            "pooled_projection_dim": c.pooled_projection_dim,
            "guidance_embeds": c.guidance_embeds,
            "axes_dims_rope": c.axes_dims_rope,
        }),
    }
}

fn pixart_json(c: &PixArtConfig) -> Value {
    json!({
        "_class_name": "PixArtTransformer2DModel",
        "num_attention_heads": c.num_attention_heads,
        "attention_head_dim": c.attention_head_dim,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "num_layers": c.num_layers,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "cross_attention_dim": c.cross_attention_dim,
        "attention_bias": c.attention_bias,
        "sample_size": c.sample_size,
        "patch_size": c.patch_size,
        "activation_fn": c.activation_fn,
        "num_embeds_ada_norm": c.num_embeds_ada_norm,
        "upcast_attention": c.upcast_attention,
        "norm_type": c.norm_type,
        "norm_elementwise_affine": c.norm_elementwise_affine,
        "norm_eps": c.norm_eps,
        "interpolation_scale": c.interpolation_scale,
        "use_additional_conditions": c.use_additional_conditions,
        "caption_channels": c.caption_channels,
        "attention_type": c.attention_type,
    })
}

fn dit_json(c: &DiTConfig) -> Value {
    json!({
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": c.num_attention_heads,
        "attention_head_dim": c.attention_head_dim,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "num_layers": c.num_layers,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "attention_bias": c.attention_bias,
        "sample_size": c.sample_size,
        "patch_size": c.patch_size,
        "activation_fn": c.activation_fn,
        "num_embeds_ada_norm": c.num_embeds_ada_norm,
        "upcast_attention": c.upcast_attention,
        "norm_type": c.norm_type,
        "norm_elementwise_affine": c.norm_elementwise_affine,
        "norm_eps": c.norm_eps,
    })
}

/// Streams a float32 safetensors file: the header, then each tensor's values from `fill`
/// (called once per tensor with a buffer of its element count), so no more than one tensor
/// is held in memory.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    mut fill: impl FnMut(&str, &mut [f32]),
) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            name.clone(),
            json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes] }),
        );
        offset += bytes;
    }
    let mut text = serde_json::to_string(&Value::Object(header)).expect("json");
    // The data starts 8-aligned, as the safetensors writer does it.
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    out.write_all(&(text.len() as u64).to_le_bytes())?;
    out.write_all(text.as_bytes())?;
    let mut buf = Vec::new();
    for (name, shape) in tensors {
        buf.clear();
        buf.resize(shape.iter().product(), 0.0f32);
        fill(name, &mut buf);
        for chunk in buf.chunks(1 << 16) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            out.write_all(&bytes)?;
        }
    }
    out.flush()
}

/// Fills `out` with `N(0, std²)` values drawn from a generator seeded by `seed` and `name`,
/// so that a tensor's values do not depend on which other tensors were drawn before it.
pub fn fill_normal(seed: u64, name: &str, std: f64, out: &mut [f32]) {
    let mut rng = Rng::new(seed ^ fnv1a(name.as_bytes()));
    for v in out {
        *v = (rng.normal() * std) as f32;
    }
}

/// `n` standard-normal values from `seed` and `stream` (inputs of a benchmark).
pub fn normal_values(seed: u64, stream: &str, n: usize) -> Vec<f32> {
    let mut out = vec![0.0; n];
    fill_normal(seed, stream, 1.0, &mut out);
    out
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// SplitMix64 with Box–Muller normals: small, fast and the same on every platform.
struct Rng {
    state: u64,
    spare: Option<f64>,
}

impl Rng {
    fn new(seed: u64) -> Self {
        Rng { state: seed, spare: None }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u, v) = (self.uniform(), self.uniform());
        let r = (-2.0 * u.ln()).sqrt();
        let t = std::f64::consts::TAU * v;
        self.spare = Some(r * t.sin());
        r * t.cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normals_are_deterministic_and_standard() {
        let a = normal_values(7, "x", 20_000);
        assert_eq!(a, normal_values(7, "x", 20_000));
        assert_ne!(a[..8], normal_values(7, "y", 8)[..]);
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "{mean} {var}");
    }

    #[test]
    fn a_written_preset_reads_back_and_loads() {
        let dir = std::env::temp_dir().join(format!("bench-model-test-{}", std::process::id()));
        let m = BenchModel::resolve("DiT-XL-2-256", Some(1), 3, &dir).unwrap();
        assert_eq!(m.config.desc().num_layers, 1);
        let model = models_dit::DitModel::<crate::CpuBackend>::load(
            &m.dir,
            &parallel_core::LoadPlan::full(),
            &Default::default(),
        )
        .unwrap();
        use parallel_core::Denoiser;
        assert_eq!(model.param_bytes(), m.num_params() * 4);
        std::fs::remove_dir_all(&dir).ok();
    }
}

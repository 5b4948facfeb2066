//! TOML configuration of `harness run` (and the shared parts of `forward` and `bench`).
//!
//! Unknown keys are rejected, and every error names the file and the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use parallel_core::{LinkModel, OptionValue, StrategyConfig, StrategyOptions};
use serde::Deserialize;

use crate::error::{HarnessError, Result};

/// The backend the ranks compute on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Burn's Flex CPU backend (rayon + SIMD): ranks are threads with their own pools.
    #[default]
    Cpu,
    /// Burn's CUDA backend, rank `r` on GPU `r` (feature `cuda`).
    Cuda,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
        })
    }
}

/// The communicator the ranks talk through (`--comm`, `parallel.comm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CommKind {
    /// NCCL where it can work — CUDA, a harness built with the `nccl` feature, a GPU per rank
    /// (in one process) or one process per rank (under a launcher) — else the built-in one.
    #[default]
    Auto,
    /// The built-in communicator: in-process queues for ranks that are threads, TCP between
    /// processes.
    Builtin,
    /// NCCL (crate `comm-nccl`; CUDA, the `nccl` feature, one GPU per rank): an error where
    /// it cannot work, instead of falling back.
    Nccl,
}

impl std::fmt::Display for CommKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CommKind::Auto => "auto",
            CommKind::Builtin => "builtin",
            CommKind::Nccl => "nccl",
        })
    }
}

/// The dtype the denoiser computes in (`--dtype`, `parallel.dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DtypeKind {
    /// float32 (default): weights stored in any float dtype are widened while loading.
    #[default]
    F32,
    /// float16: weights converted while loading; the text encoders, the VAE, the latents and
    /// the scheduler stay float32 (the noise prediction is widened before guidance).
    F16,
    /// bfloat16, the same way.
    Bf16,
}

impl DtypeKind {
    /// Burn's dtype.
    pub fn dtype(self) -> burn::tensor::DType {
        match self {
            DtypeKind::F32 => burn::tensor::DType::F32,
            DtypeKind::F16 => burn::tensor::DType::F16,
            DtypeKind::Bf16 => burn::tensor::DType::BF16,
        }
    }
}

impl std::fmt::Display for DtypeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DtypeKind::F32 => "f32",
            DtypeKind::F16 => "f16",
            DtypeKind::Bf16 => "bf16",
        })
    }
}

/// How the work is split: the strategy, the world size and its options.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParallelConfig {
    /// Registered strategy name (`harness list` shows them).
    pub strategy: String,
    /// Ranks (threads on the CPU backend).
    pub world_size: usize,
    /// Seconds any communication wait may block before it fails.
    pub timeout_secs: u64,
    /// Threads of each rank's pool (default: cores / world size, at least 1).
    pub threads_per_rank: Option<usize>,
    /// Where ranks compute: `cpu` (Flex; ranks are threads) or `cuda` (one GPU per rank,
    /// `cuda:rank`; needs the `cuda` feature).
    pub backend: BackendKind,
    /// The denoiser's compute dtype: `f32` (default), `f16`, `bf16`; its weights are
    /// converted while loading.
    pub dtype: DtypeKind,
    /// The communicator: `auto` (default: NCCL where it can work), `builtin`, `nccl`.
    pub comm: CommKind,
    /// The strategy's own options (`harness list` shows them).
    pub options: BTreeMap<String, toml::Value>,
    /// A link model for the in-process transport: a preset (`nvlink-a100`, `nvlink-h100`,
    /// `pcie4`, `pcie5`, `ib100`, `eth25`) or `bandwidth=…,latency=…`, optionally with
    /// `,dilation=F` (see `parallel_core::LinkModel::parse`). `None`: instant transfers.
    pub link: Option<String>,
    /// Decode with the VAE split by rows over every rank of the run (halo rows exchanged
    /// before every 3×3 conv, group-norm statistics merged, the mid-block attention over all
    /// pixels; exact), the image gathered to rank 0; else rank 0 decodes alone.
    pub vae_parallel: bool,
    /// Classifier-free-guidance parallelism: 2 splits the guidance batch `[negative,
    /// positive]` over two groups of `world_size / 2` ranks, each running `strategy` on its
    /// half (one exchange of the noise prediction per step); 1 (default) does not.
    pub cfg_degree: usize,
    /// Data parallelism: `dp_degree` replicas of `world_size / dp_degree` ranks, each
    /// generating its own image (replica `r` from seed `seed + r`), sharing nothing per step
    /// (in one process they share the weights). 1 (default): one image.
    pub dp_degree: usize,
    /// Set from the environment, not the file: this process's place in a multi-process
    /// world (`harness launch`, torchrun-style variables; see [`crate::multiprocess`]).
    /// `None`: every rank is a thread of this process.
    #[serde(skip)]
    pub process: Option<crate::multiprocess::ProcessEnv>,
    /// CUDA: the GPU of rank `i` is `devices[i mod len]` (empty, the default: GPU `i mod
    /// visible GPUs`; under a launcher `i` is the process's `LOCAL_RANK`). See
    /// [`crate::devices`].
    pub devices: Vec<usize>,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            strategy: "serial".into(),
            world_size: 1,
            timeout_secs: 600,
            threads_per_rank: None,
            backend: BackendKind::Cpu,
            dtype: DtypeKind::F32,
            comm: CommKind::Auto,
            options: BTreeMap::new(),
            link: None,
            vae_parallel: false,
            cfg_degree: 1,
            dp_degree: 1,
            process: None,
            devices: Vec::new(),
        }
    }
}

impl ParallelConfig {
    /// The split of a typed strategy config over `world_size` ranks (other settings at their
    /// defaults): what a library user writes instead of a name and option strings.
    ///
    /// ```
    /// use strategy_pipefusion::PipeFusionConfig;
    /// let p = harness::ParallelConfig::with_strategy(
    ///     &PipeFusionConfig::default().with_num_pipeline_patch(2),
    ///     2,
    /// );
    /// assert_eq!((p.strategy.as_str(), p.world_size), ("pipefusion", 2));
    /// assert_eq!(p.options["num_pipeline_patch"].as_integer(), Some(2));
    /// ```
    pub fn with_strategy(strategy: &dyn StrategyConfig, world_size: usize) -> Self {
        let options = strategy.options();
        let options = options.iter().map(|(k, v)| (k.to_string(), toml_value(v))).collect();
        ParallelConfig {
            strategy: strategy.name().to_string(),
            world_size,
            options,
            ..ParallelConfig::default()
        }
    }

    /// Checks the settings that need no files.
    pub fn check(&self) -> Result<()> {
        let bad = |key: &str| HarnessError::config(key, "must be at least 1");
        if self.strategy.is_empty() {
            return Err(HarnessError::config("parallel.strategy", "no strategy named"));
        }
        if self.world_size == 0 {
            return Err(bad("parallel.world_size"));
        }
        if self.timeout_secs == 0 {
            return Err(bad("parallel.timeout_secs"));
        }
        if self.threads_per_rank == Some(0) {
            return Err(bad("parallel.threads_per_rank"));
        }
        if self.dp_degree == 0 || !self.world_size.is_multiple_of(self.dp_degree) {
            return Err(HarnessError::config(
                "parallel.dp_degree (--dp-degree)",
                format!(
                    "{} does not divide the {} ranks: the world is dp_degree × cfg_degree × \
                     the strategy's group (here dp {} × cfg {} × ?)",
                    self.dp_degree, self.world_size, self.dp_degree, self.cfg_degree
                ),
            ));
        }
        parallel_core::cfg::cfg_mesh(self.replica_size(), self.cfg_degree).map_err(|e| {
            let reason = match e {
                parallel_core::ParallelError::Mesh(m) => m,
                other => other.to_string(),
            };
            HarnessError::config("parallel.cfg_degree (--cfg-degree)", reason)
        })?;
        self.link_model()?;
        if let Some(p) = &self.process {
            if self.link.is_some() {
                return Err(HarnessError::config(
                    "parallel.link (--link)",
                    "a link model times the in-process transport; between processes the link is \
                     real (drop the link model, or run without harness launch)",
                ));
            }
            if self.world_size != p.world_size {
                return Err(HarnessError::config(
                    "parallel.world_size (--world-size)",
                    format!(
                        "{} disagrees with the launcher's WORLD_SIZE {}",
                        self.world_size, p.world_size
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The ranks of one group of the inner strategy: `world_size / (dp_degree ·
    /// cfg_degree)`.
    pub fn group_size(&self) -> usize {
        self.replica_size() / self.cfg_degree.max(1)
    }

    /// The ranks of one data-parallel replica: `world_size / dp_degree`.
    pub fn replica_size(&self) -> usize {
        self.world_size / self.dp_degree.max(1)
    }

    /// This rank's strategy from `registry`, composed with the cfg degree.
    ///
    /// # Errors
    /// What [`Registry::create_with_cfg`](parallel_core::Registry::create_with_cfg) refuses.
    pub fn create_strategy<B: burn::tensor::backend::Backend>(
        &self,
        registry: &parallel_core::Registry<B>,
        comm: parallel_core::Comm<B>,
        options: &StrategyOptions,
    ) -> parallel_core::Result<Box<dyn parallel_core::ParallelStrategy<B>>> {
        registry.create_with_cfg(&self.strategy, comm, options, self.cfg_degree)
    }

    /// The link model `link` names, if any.
    ///
    /// # Errors
    /// A specification that does not parse, naming `parallel.link` and the part at fault.
    pub fn link_model(&self) -> Result<Option<LinkModel>> {
        self.link
            .as_deref()
            .map(|spec| {
                LinkModel::parse(spec)
                    .map_err(|e| HarnessError::config("parallel.link (--link)", e.to_string()))
            })
            .transpose()
    }

    /// The options as the registry takes them; a value of an unsupported TOML type names
    /// its key.
    pub fn strategy_options(&self) -> Result<StrategyOptions> {
        let mut opts = StrategyOptions::new(self.strategy.clone());
        for (key, value) in &self.options {
            let v = option_value(value).ok_or_else(|| HarnessError::Config {
                location: "[parallel.options]".into(),
                reason: format!(
                    "option `{key}` must be a number, boolean or string, not {}",
                    value.type_str()
                ),
            })?;
            opts.set(key.clone(), v);
        }
        Ok(opts)
    }

    /// Sets a strategy option from a `key=value` string ([`OptionValue::parse`]).
    pub fn set_option(&mut self, assignment: &str) -> Result<()> {
        let Some((key, value)) = assignment.split_once('=') else {
            return Err(HarnessError::Config {
                location: "--strategy-option".into(),
                reason: format!("`{assignment}` is not of the form key=value"),
            });
        };
        self.options.insert(key.trim().to_string(), toml_value(&OptionValue::parse(value)));
        Ok(())
    }
}

/// A strategy option's value as TOML.
fn toml_value(v: &OptionValue) -> toml::Value {
    match v {
        OptionValue::Int(i) => toml::Value::Integer(*i),
        OptionValue::Float(f) => toml::Value::Float(*f),
        OptionValue::Bool(b) => toml::Value::Boolean(*b),
        OptionValue::Str(s) => toml::Value::String(s.clone()),
    }
}

/// A strategy option's value from TOML: integers, floats, booleans and strings; `None` for
/// the other TOML types (arrays, tables, dates), which no strategy option takes.
pub fn option_value(v: &toml::Value) -> Option<OptionValue> {
    Some(match v {
        toml::Value::Integer(i) => OptionValue::Int(*i),
        toml::Value::Float(f) => OptionValue::Float(*f),
        toml::Value::Boolean(b) => OptionValue::Bool(*b),
        toml::Value::String(s) => OptionValue::Str(s.clone()),
        _ => return None,
    })
}

/// Settings of one text-to-image run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// A diffusers pipeline folder (`model_index.json` and its class's components, see
    /// [`PIPELINE_CLASSES`](crate::pipeline::PIPELINE_CLASSES)). Relative paths are relative
    /// to the config file.
    pub model: PathBuf,
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (classifier-free guidance's unconditional half). Absent: `""`,
    /// except for SDXL with `force_zeros_for_empty_prompt`, whose unconditional embeddings
    /// are then zeros (as diffusers' `negative_prompt=None`).
    pub negative_prompt: Option<String>,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale (≤ 1 turns guidance off); absent: the pipeline
    /// class's diffusers default (PixArt 4.5, SD 7.5, SDXL 5.0).
    pub guidance_scale: Option<f64>,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Image height in pixels (default: the transformer's sample size × 8).
    pub height: Option<usize>,
    /// Image width in pixels (default: the transformer's sample size × 8).
    pub width: Option<usize>,
    /// Scheduler (`harness list`); default: the pipeline folder's own.
    pub scheduler: Option<String>,
    /// Initial latents from a safetensors file (tensor `latents`), instead of seeded noise.
    pub latents: Option<PathBuf>,
    /// Where the PNG goes (empty: nowhere; the decoded image is still in the
    /// [`RunReport`](crate::RunReport)).
    pub output: PathBuf,
    /// Where to save the final latents (safetensors, tensor `latents`), if anywhere.
    pub save_latents: Option<PathBuf>,
    /// Maximum text tokens (default: 120 for PixArt-α, 300 for PixArt-Σ).
    pub max_sequence_length: Option<usize>,
    /// Batch generation: a prompt file (one per line, or JSONL with `prompt`, optional
    /// `negative_prompt`, `seed`; see [`crate::batch`]); images go to `output_dir`.
    pub prompts: Option<PathBuf>,
    /// Images of every prompt (seeds counting up). Default 1.
    pub images_per_prompt: usize,
    /// Where batch generation writes `00000.png`, `00001.png`, … and `metadata.jsonl`.
    pub output_dir: Option<PathBuf>,
    /// The parallel split.
    pub parallel: ParallelConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            model: PathBuf::new(),
            prompt: String::new(),
            negative_prompt: None,
            steps: 20,
            guidance_scale: None,
            seed: 0,
            height: None,
            width: None,
            scheduler: None,
            latents: None,
            output: PathBuf::from("out.png"),
            save_latents: None,
            max_sequence_length: None,
            prompts: None,
            images_per_prompt: 1,
            output_dir: None,
            parallel: ParallelConfig::default(),
        }
    }
}

/// Reads a TOML file into `T`, rejecting unknown keys; errors name the file and the key.
pub fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| HarnessError::Io { path: path.to_path_buf(), reason: e.to_string() })?;
    parse_toml(&text, &path.display().to_string())
}

/// Parses TOML text into `T`; `location` names the source in errors.
pub fn parse_toml<T: for<'de> Deserialize<'de>>(text: &str, location: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| HarnessError::Config {
        location: location.to_string(),
        reason: e.message().to_string()
            + &e.span()
                .map(|s| {
                    let line = text[..s.start].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default(),
    })
}

/// `base.join(rel)` with `.` dropped and `dir/..` folded where `dir` is a plain name, so that
/// `configs/../out/demo.png` reads `out/demo.png` (paths through symlinks are not resolved).
pub fn lexical_join(base: &Path, rel: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in base.join(rel).components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() { PathBuf::from(".") } else { out }
}

impl RunConfig {
    /// Reads a run config; relative paths in it become relative to the file's folder.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut cfg: RunConfig = read_toml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = lexical_join(base, p);
            }
        };
        rebase(&mut cfg.model);
        rebase(&mut cfg.output);
        if let Some(p) = cfg.latents.as_mut() {
            rebase(p);
        }
        for p in [cfg.prompts.as_mut(), cfg.output_dir.as_mut()].into_iter().flatten() {
            rebase(p);
        }
        if let Some(p) = cfg.save_latents.as_mut() {
            rebase(p);
        }
        Ok(cfg)
    }

    /// Checks the settings that need no files.
    pub fn check(&self) -> Result<()> {
        let bad = |key: &str, reason: String| HarnessError::Config { location: key.into(), reason };
        if self.model.as_os_str().is_empty() {
            return Err(bad("model", "no model folder given (set `model` or --model)".into()));
        }
        if self.steps == 0 {
            return Err(bad("steps", "must be at least 1".into()));
        }
        self.parallel.check()?;
        if self.guidance_scale.is_some_and(|g| !g.is_finite()) {
            return Err(bad("guidance_scale", "must be a finite number".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_names_the_key_and_line() {
        let e =
            parse_toml::<RunConfig>("prompt = \"a cat\"\nstpes = 4\n", "demo.toml").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("demo.toml") && msg.contains("stpes") && msg.contains("line 2"),
            "{msg}"
        );
    }

    #[test]
    fn relative_paths_fold_parent_dirs() {
        let p = lexical_join(Path::new("configs"), Path::new("../out/demo.png"));
        assert_eq!(p, PathBuf::from("out/demo.png"));
        let p = lexical_join(Path::new("./configs"), Path::new("../../x"));
        assert_eq!(p, PathBuf::from("../x"));
        assert_eq!(lexical_join(Path::new(""), Path::new("a")), PathBuf::from("a"));
    }

    #[test]
    fn nested_typo_is_named() {
        let e = parse_toml::<RunConfig>("[parallel]\nworld_sise = 2\n", "x.toml").unwrap_err();
        assert!(e.to_string().contains("world_sise"), "{e}");
    }

    #[test]
    fn options_keep_their_types() {
        let cfg: RunConfig = parse_toml(
            "[parallel]\nstrategy = \"usp\"\nworld_size = 4\n[parallel.options]\nulysses_degree = 2\n",
            "x",
        )
        .unwrap();
        let o = cfg.parallel.strategy_options().unwrap();
        assert_eq!(o.usize("ulysses_degree", 0).unwrap(), 2);
    }
}

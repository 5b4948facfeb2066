//! `harness bench`: every strategy side by side on one model — latency, speed-up, memory,
//! communication and quality.
//!
//! # What runs
//! For each resolution, first the **serial baseline**: the `serial` strategy on one rank
//! with `serial_threads` threads (default 1: "1 rank on 1 core"). Then, for each world
//! size `N > 1` and each strategy (with its options), the strategy on `N` in-process
//! [`LocalComm`](parallel_core::LocalComm) ranks, each rank with `threads_per_rank` threads
//! of its own rayon pool (default `cores / N`, so N ranks on N cores compare with 1 rank on
//! 1 core). World size 1 in `world_sizes` adds serial on `cores` threads (intra-op
//! threading, for comparison). A configuration a strategy refuses (USP on 2 ranks, heads
//! not divisible …) is reported as not run, with the strategy's reason.
//!
//! Every configuration runs `warmup_runs` untimed requests, then `repetitions` timed ones,
//! all with the same seed: the same latents and random text. See [`run`] for what is timed
//! and how communication is counted.
//!
//! # What is reported (per configuration)
//! - latency per image (median over the timed requests of the slowest rank's wall time of
//!   `denoise`) and per step (that divided by the steps), and each step's median time;
//! - speed-up over the serial baseline (its latency over this one), and the speed-up per
//!   core used (`N × threads_per_rank`);
//! - parameter bytes and strategy buffer bytes per rank (exact, from the model and the
//!   strategy);
//! - **peak resident memory**: `VmHWM` of the process, reset (`/proc/self/clear_refs` `5`)
//!   before the configuration loads its model, read after its last request. All ranks of a
//!   configuration share the process, so this is the peak of the whole world (all N ranks'
//!   models, buffers and activations together), plus what the process already held (the
//!   `rss_before` column; memory an allocator kept from an earlier configuration can show
//!   there);
//! - communication per step per rank, measured (every step of the last request, whose
//!   boundaries the sampler marks; what a request sends once at its end, PipeFusion's final
//!   broadcast, falls in its last step) and from the strategy's formula
//!   ([`expected_comm`](parallel_core::ParallelStrategy::expected_comm) for each step), with
//!   their ratio (1.00 when the strategy counts what it sends);
//! - the final latents' PSNR (peak: the serial latents' range), max absolute error and
//!   relative L2 against serial's;
//! - the other processes' CPU use during the configuration, in cores (from `/proc/stat`
//!   minus this process's own time): the machine may be shared, and a number measured
//!   while others compute is marked as such.
//!
//! Output: a table on stdout, a JSON file ([`BenchReport`]), and an SVG chart of latency
//! per step and speed-up per strategy and world size ([`report::write_svg`]).
//!
//! # Configuration
//! A TOML file (`configs/bench.toml`) whose keys are [`BenchConfig`]'s, unknown keys
//! rejected, and flags ([`BenchArgs`]) that override them.
//!
//! # Backend
//! The CPU backend ([`CpuBackend`](crate::CpuBackend)) only, for now: the ranks' thread
//! pools are what makes "N ranks on N cores" comparable with "1 rank on 1 core". A CUDA run
//! would time one GPU per rank instead, with the same report.

pub mod model;
pub mod report;
pub mod run;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::tensor::Tensor;
use parallel_core::{OptionValue, Registry, StrategyOptions};
use serde::{Deserialize, Serialize};

use crate::CpuBackend as B;
pub use model::BenchModel;
pub use run::{RankOutcome, RunSpec};

/// What can go wrong in a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A bad configuration value, naming its key.
    #[error("bench config `{key}`: {reason}")]
    Config {
        /// The key (or flag).
        key: String,
        /// What is wrong and what to change.
        reason: String,
    },
    /// A file that cannot be read or written.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        reason: String,
    },
    /// The model cannot be prepared.
    #[error("model: {0}")]
    Model(String),
    /// The chart cannot be drawn.
    #[error("chart: {0}")]
    Chart(String),
}

impl BenchError {
    /// A configuration error at `key`.
    pub fn config(key: impl Into<String>, reason: impl ToString) -> Self {
        BenchError::Config { key: key.into(), reason: reason.to_string() }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, reason: impl ToString) -> Self {
        BenchError::Io { path: path.as_ref().to_path_buf(), reason: reason.to_string() }
    }
}

/// The result type of this module.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;

/// A strategy to benchmark, with its options, as written in the config: a name
/// (`"ulysses"`) or a table (`{ name = "distrifusion", warmup_steps = 1, label = "df-w1" }`:
/// every key but `name` and `label` is an option of the strategy).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum StrategyEntry {
    /// A strategy with its default options.
    Name(String),
    /// A strategy with options (and an optional label).
    Table(toml::Table),
}

/// A strategy to benchmark, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct StrategySpec {
    /// The label in the table and chart (the name, with options when given).
    pub label: String,
    /// The registered name.
    pub name: String,
    /// Its options.
    pub options: StrategyOptions,
    /// The options as given, for the report.
    pub option_text: BTreeMap<String, String>,
}

impl StrategySpec {
    /// A strategy with its default options.
    pub fn named(name: &str) -> Self {
        StrategySpec {
            label: name.into(),
            name: name.into(),
            options: StrategyOptions::new(name),
            option_text: BTreeMap::new(),
        }
    }

    /// Sets option `key` (a label without options gets them appended).
    pub fn set(&mut self, key: &str, value: OptionValue) {
        self.option_text.insert(key.into(), value.to_string());
        self.options.set(key, value);
    }

    fn default_label(&self) -> String {
        if self.option_text.is_empty() {
            return self.name.clone();
        }
        let opts: Vec<String> = self.option_text.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}[{}]", self.name, opts.join(","))
    }

    fn from_entry(entry: &StrategyEntry, index: usize) -> Result<Self> {
        let key = format!("strategies[{index}]");
        match entry {
            StrategyEntry::Name(n) => Ok(Self::named(n)),
            StrategyEntry::Table(t) => {
                let name = match t.get("name") {
                    Some(toml::Value::String(s)) => s.clone(),
                    _ => return Err(BenchError::config(key, "a table needs `name = \"...\"`")),
                };
                let mut spec = Self::named(&name);
                let mut label = None;
                for (k, v) in t {
                    match (k.as_str(), v) {
                        ("name", _) => {}
                        ("label", toml::Value::String(s)) => label = Some(s.clone()),
                        ("label", _) => {
                            return Err(BenchError::config(format!("{key}.label"), "a string"));
                        }
                        _ => spec.set(
                            k,
                            crate::config::option_value(v).ok_or_else(|| {
                                BenchError::config(
                                    format!("{key}.{k}"),
                                    "an integer, float, boolean or string",
                                )
                            })?,
                        ),
                    }
                }
                spec.label = label.unwrap_or_else(|| spec.default_label());
                Ok(spec)
            }
        }
    }
}

/// The benchmark configuration (`configs/bench.toml`). Every key is optional.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BenchConfig {
    /// A preset of [`models_dit::PRESETS`] (random weights of the real size) or a folder
    /// (a transformer folder or a pipeline folder). Default `PixArt-XL-2-512x512`.
    pub model: String,
    /// A preset with this many transformer blocks instead of its own (to fit a time budget;
    /// reported). Default: the preset's.
    pub layers: Option<usize>,
    /// Square image sizes in pixels; the latent is `size / 8` (the VAE's factor). Default
    /// `[512]`.
    pub resolutions: Vec<usize>,
    /// Denoising steps per request. Default 4.
    pub steps: usize,
    /// World sizes of the parallel strategies (1 adds serial on all cores). Default `[2]`.
    pub world_sizes: Vec<usize>,
    /// Strategies and their options. Default: every registered strategy but `serial`.
    pub strategies: Vec<StrategyEntry>,
    /// Timed requests per configuration (the median is reported). Default 3.
    pub repetitions: usize,
    /// Untimed requests before them. Default 1.
    pub warmup_runs: usize,
    /// Threads of each rank. Default `cores / world size` (at least 1).
    pub threads_per_rank: Option<usize>,
    /// Threads of the serial baseline. Default 1.
    pub serial_threads: usize,
    /// Cores to share between the ranks. Default: the machine's available parallelism.
    pub cores: Option<usize>,
    /// Seed of the random weights and inputs. Default 0.
    pub seed: u64,
    /// Classifier-free guidance scale (> 1: two images per evaluation). Default 4.5.
    pub guidance_scale: f64,
    /// Tokens of the random caption. Default 120 (PixArt-α's).
    pub text_tokens: usize,
    /// Where random-weight presets are written (relative paths here and below are relative
    /// to the working directory). Default `target/bench/models`.
    pub model_cache: PathBuf,
    /// The JSON report. Default `target/bench/bench.json`.
    pub json: PathBuf,
    /// The SVG chart. Default `target/bench/bench.svg`.
    pub svg: PathBuf,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            model: "PixArt-XL-2-512x512".into(),
            layers: None,
            resolutions: vec![512],
            steps: 4,
            world_sizes: vec![2],
            strategies: Vec::new(),
            repetitions: 3,
            warmup_runs: 1,
            threads_per_rank: None,
            serial_threads: 1,
            cores: None,
            seed: 0,
            guidance_scale: 4.5,
            text_tokens: 120,
            model_cache: "target/bench/models".into(),
            json: "target/bench/bench.json".into(),
            svg: "target/bench/bench.svg".into(),
        }
    }
}

impl BenchConfig {
    /// Reads a TOML file; an unknown key or a bad value is an error naming it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| BenchError::io(path, e))?;
        Self::from_toml(&text).map_err(|e| match e {
            BenchError::Config { key, reason } => {
                BenchError::config(format!("{}: {key}", path.display()), reason)
            }
            e => e,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            let key = e.span().map_or_else(String::new, |s| text[s].to_string());
            BenchError::config(key, e.message())
        })
    }

    /// Applies the flags that were given.
    pub fn apply(&mut self, args: &BenchArgs) -> Result<()> {
        if let Some(m) = &args.model {
            self.model = m.clone();
        }
        if args.layers.is_some() {
            self.layers = args.layers;
        }
        if !args.resolutions.is_empty() {
            self.resolutions = args.resolutions.clone();
        }
        if let Some(s) = args.steps {
            self.steps = s;
        }
        if !args.world_sizes.is_empty() {
            self.world_sizes = args.world_sizes.clone();
        }
        if !args.strategies.is_empty() {
            self.strategies =
                args.strategies.iter().map(|s| StrategyEntry::Name(s.clone())).collect();
        }
        if let Some(r) = args.repetitions {
            self.repetitions = r;
        }
        if let Some(w) = args.warmup_runs {
            self.warmup_runs = w;
        }
        if args.threads_per_rank.is_some() {
            self.threads_per_rank = args.threads_per_rank;
        }
        if let Some(t) = args.serial_threads {
            self.serial_threads = t;
        }
        if args.cores.is_some() {
            self.cores = args.cores;
        }
        if let Some(s) = args.seed {
            self.seed = s;
        }
        if let Some(p) = &args.json {
            self.json = p.clone();
        }
        if let Some(p) = &args.svg {
            self.svg = p.clone();
        }
        Ok(())
    }

    /// The strategies, resolved, with `--option strategy.key=value` flags applied.
    pub fn strategy_specs(
        &self,
        registry: &Registry<B>,
        flags: &[String],
    ) -> Result<Vec<StrategySpec>> {
        let mut specs: Vec<StrategySpec> = if self.strategies.is_empty() {
            registry
                .names()
                .into_iter()
                .filter(|n| *n != "serial")
                .map(StrategySpec::named)
                .collect()
        } else {
            self.strategies
                .iter()
                .enumerate()
                .map(|(i, e)| StrategySpec::from_entry(e, i))
                .collect::<Result<_>>()?
        };
        for flag in flags {
            let bad =
                || BenchError::config("--option", format!("`{flag}`: expected strategy.key=value"));
            let (lhs, value) = flag.split_once('=').ok_or_else(bad)?;
            let (name, key) = lhs.split_once('.').ok_or_else(bad)?;
            let mut hit = false;
            for s in specs.iter_mut().filter(|s| s.name == name) {
                let relabel = s.label == s.default_label();
                s.set(key, OptionValue::parse(value));
                if relabel {
                    s.label = s.default_label();
                }
                hit = true;
            }
            if !hit {
                return Err(BenchError::config(
                    "--option",
                    format!("`{flag}`: `{name}` is not benchmarked"),
                ));
            }
        }
        for (i, s) in specs.iter().enumerate() {
            registry
                .check_options(&s.name, &s.options)
                .map_err(|e| BenchError::config(format!("strategies[{i}]"), e))?;
        }
        Ok(specs)
    }

    /// Checks the values that need no model.
    pub fn check(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(BenchError::config("steps", "must be at least 1"));
        }
        if self.repetitions == 0 {
            return Err(BenchError::config("repetitions", "must be at least 1"));
        }
        if self.resolutions.is_empty() {
            return Err(BenchError::config("resolutions", "give at least one size in pixels"));
        }
        if let Some(&r) = self.resolutions.iter().find(|&&r| r == 0 || !r.is_multiple_of(8)) {
            return Err(BenchError::config(
                "resolutions",
                format!("{r} is not a positive multiple of 8 (the VAE factor)"),
            ));
        }
        if self.world_sizes.contains(&0) {
            return Err(BenchError::config("world_sizes", "world sizes must be at least 1"));
        }
        if self.threads_per_rank == Some(0) || self.serial_threads == 0 || self.cores == Some(0) {
            return Err(BenchError::config("threads_per_rank", "thread counts must be at least 1"));
        }
        Ok(())
    }
}

/// The flags of `harness bench`; each overrides the config file's key of the same name.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BenchArgs {
    /// The TOML config (e.g. `configs/bench.toml`); without it, the defaults.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// A model preset (random weights of the real size) or a folder.
    #[arg(long)]
    pub model: Option<String>,
    /// Transformer blocks of a preset (fewer than the real model, to save time).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Square image sizes in pixels, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub resolutions: Vec<usize>,
    /// Denoising steps per request.
    #[arg(long)]
    pub steps: Option<usize>,
    /// World sizes, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub world_sizes: Vec<usize>,
    /// Strategies, comma-separated (replaces the config's list).
    #[arg(long, value_delimiter = ',')]
    pub strategies: Vec<String>,
    /// A strategy option, `strategy.key=value` (repeatable).
    #[arg(long = "option", value_name = "STRATEGY.KEY=VALUE")]
    pub options: Vec<String>,
    /// Timed requests per configuration.
    #[arg(long)]
    pub repetitions: Option<usize>,
    /// Untimed requests before them.
    #[arg(long)]
    pub warmup_runs: Option<usize>,
    /// Threads per rank (default: cores / world size).
    #[arg(long)]
    pub threads_per_rank: Option<usize>,
    /// Threads of the serial baseline (default 1).
    #[arg(long)]
    pub serial_threads: Option<usize>,
    /// Cores shared by the ranks (default: all).
    #[arg(long)]
    pub cores: Option<usize>,
    /// Seed of the weights and inputs.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where to write the JSON report.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where to write the SVG chart.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

/// The machine a report was measured on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    /// CPU model (`/proc/cpuinfo`).
    pub cpu: String,
    /// Available parallelism of the process.
    pub available_cores: usize,
    /// The 1-, 5- and 15-minute load averages when the benchmark started.
    pub load_average: [f64; 3],
}

/// The model of a report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    /// The preset or folder given.
    pub name: String,
    /// The class.
    pub class_name: String,
    /// Transformer blocks.
    pub layers: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Attention heads.
    pub heads: usize,
    /// Parameters of the whole model.
    pub params: u64,
    /// Whether the weights are random (a preset).
    pub random_weights: bool,
    /// The folder every rank loaded.
    pub dir: PathBuf,
}

/// One configuration's measurements; `error` is set (and the numbers empty) when it did
/// not run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ConfigResult {
    /// The label (strategy, with its options).
    pub label: String,
    /// The registered strategy.
    pub strategy: String,
    /// Its options as given.
    pub options: BTreeMap<String, String>,
    /// Ranks.
    pub world_size: usize,
    /// Threads of each rank.
    pub threads_per_rank: usize,
    /// Image size in pixels.
    pub resolution: usize,
    /// Latent height and width.
    pub latent: [usize; 2],
    /// Image tokens.
    pub tokens: usize,
    /// Denoiser evaluations' batch (2 with guidance).
    pub batch: usize,
    /// Steps per request.
    pub steps: usize,
    /// Why it did not run.
    pub error: Option<String>,
    /// Wall time of each timed request, seconds.
    pub request_seconds: Vec<f64>,
    /// Median request time, seconds: the latency per image.
    pub latency_per_image_s: f64,
    /// That divided by the steps, milliseconds.
    pub latency_per_step_ms: f64,
    /// Median time of each step over the timed requests (rank 0), milliseconds.
    pub step_ms: Vec<f64>,
    /// Median time of the steady steps (after the strategy's warmup steps, before the last
    /// step, which also drains a pipeline), milliseconds; all steps where there are none.
    pub steady_step_ms: f64,
    /// Serial baseline latency over this one.
    pub speedup: Option<f64>,
    /// The serial baseline's steady step time over this one's.
    pub steady_speedup: Option<f64>,
    /// Speed-up per core used (`world_size × threads_per_rank`).
    pub speedup_per_core: Option<f64>,
    /// Parameter bytes of each rank.
    pub param_bytes: Vec<u64>,
    /// Strategy buffer bytes of each rank after the last request.
    pub buffer_bytes: Vec<u64>,
    /// Resident memory of the process when the configuration started, bytes.
    pub rss_before_bytes: u64,
    /// Peak resident memory of the process during the configuration (all ranks), bytes.
    pub peak_rss_bytes: u64,
    /// Measured bytes sent per step by each rank (averaged over the request's steps).
    pub comm_bytes_per_step: Vec<f64>,
    /// The formula's bytes per step for each rank, over the same steps.
    pub comm_formula_bytes_per_step: Vec<f64>,
    /// Measured over formula, per rank (`None` where the formula says 0 and bytes moved).
    pub comm_ratio: Vec<Option<f64>>,
    /// Bytes sent by kind over the whole request, per rank.
    pub comm_bytes_by_kind: Vec<BTreeMap<String, u64>>,
    /// The formula, in words (rank 0's).
    pub formula: String,
    /// PSNR of the final latents against serial's, dB (infinite → `None` with zero error).
    pub psnr_db: Option<f64>,
    /// Max absolute error of the final latents against serial's.
    pub max_abs_error: Option<f64>,
    /// Relative L2 error against serial's.
    pub rel_l2: Option<f64>,
    /// CPU used by other processes during the configuration, in cores.
    pub other_load_cores: f64,
}

/// A whole benchmark: what ran where, and every configuration's measurements.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BenchReport {
    /// The machine.
    pub machine: Machine,
    /// The model.
    pub model: ModelInfo,
    /// Cores shared by the ranks.
    pub cores: usize,
    /// Timed requests per configuration.
    pub repetitions: usize,
    /// Untimed requests before them.
    pub warmup_runs: usize,
    /// Guidance scale.
    pub guidance_scale: f64,
    /// Random caption tokens.
    pub text_tokens: usize,
    /// Seed.
    pub seed: u64,
    /// Every configuration, in the order run.
    pub results: Vec<ConfigResult>,
}

impl From<BenchError> for crate::HarnessError {
    fn from(e: BenchError) -> Self {
        match e {
            BenchError::Config { key, reason } => {
                crate::HarnessError::config(format!("bench config `{key}`"), reason)
            }
            BenchError::Io { path, reason } => crate::HarnessError::io(path, reason),
            BenchError::Model(m) => crate::HarnessError::config("bench model", m),
            BenchError::Chart(m) => crate::HarnessError::config("bench svg", m),
        }
    }
}

/// `harness bench`: reads the config, applies the flags, runs, prints the table and writes
/// the JSON and SVG.
pub fn run_cli(args: &BenchArgs) -> Result<BenchReport> {
    let mut config = match &args.config {
        Some(p) => BenchConfig::from_file(p)?,
        None => BenchConfig::default(),
    };
    config.apply(args)?;
    let registry = crate::registry::<B>();
    let specs = config.strategy_specs(&registry, &args.options)?;
    let report = run_bench(&config, &specs, &registry, |line| eprintln!("{line}"))?;
    println!("{}", report::table(&report));
    report::write_json(&report, &config.json)?;
    report::write_svg(&report, &config.svg)?;
    eprintln!("wrote {} and {}", config.json.display(), config.svg.display());
    Ok(report)
}

/// Runs every configuration of `config` over `specs`; `progress` gets a line per
/// configuration as it ends.
pub fn run_bench(
    config: &BenchConfig,
    specs: &[StrategySpec],
    registry: &Registry<B>,
    mut progress: impl FnMut(String),
) -> Result<BenchReport> {
    config.check()?;
    let machine = Machine {
        cpu: cpu_model(),
        available_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_average: load_average(),
    };
    let cores = config.cores.unwrap_or(machine.available_cores);
    let model =
        BenchModel::resolve(&config.model, config.layers, config.seed, &config.model_cache)?;
    let desc = model.config.desc();
    let mut results = Vec::new();
    for &px in &config.resolutions {
        let latent = (px / 8, px / 8);
        let base = RunSpec {
            strategy: "serial".into(),
            options: StrategyOptions::new("serial"),
            world_size: 1,
            threads_per_rank: config.serial_threads,
            latent,
            steps: config.steps,
            warmup_runs: config.warmup_runs,
            repetitions: config.repetitions,
            seed: config.seed,
            guidance_scale: config.guidance_scale,
            text_tokens: config.text_tokens,
            strategy_warmup_steps: 0,
        };
        let (serial, reference) =
            measure(registry, &model, &StrategySpec::named("serial"), &base, px, None);
        progress(report::line(&serial));
        let Some(reference) = reference else {
            results.push(serial);
            continue;
        };
        let serial_latency = serial.latency_per_image_s;
        let serial_steady = serial.steady_step_ms;
        results.push(serial);
        let mut runs: Vec<(StrategySpec, RunSpec)> = Vec::new();
        for &n in &config.world_sizes {
            let threads = config.threads_per_rank.unwrap_or((cores / n).max(1));
            if n == 1 {
                if threads != config.serial_threads {
                    let spec = RunSpec { threads_per_rank: threads, ..base.clone() };
                    runs.push((StrategySpec::named("serial"), spec));
                }
                continue;
            }
            for s in specs {
                let warmup = strategy_warmup(registry, s);
                let spec = RunSpec {
                    strategy: s.name.clone(),
                    options: s.options.clone(),
                    world_size: n,
                    threads_per_rank: threads,
                    strategy_warmup_steps: warmup,
                    ..base.clone()
                };
                runs.push((s.clone(), spec));
            }
        }
        for (s, spec) in runs {
            let (mut r, _) = measure(registry, &model, &s, &spec, px, Some(&reference));
            if r.error.is_none() && r.latency_per_image_s > 0.0 {
                let speedup = serial_latency / r.latency_per_image_s;
                r.speedup = Some(speedup);
                r.steady_speedup = Some(serial_steady / r.steady_step_ms.max(1e-9));
                r.speedup_per_core = Some(
                    speedup * config.serial_threads as f64
                        / (r.world_size * r.threads_per_rank) as f64,
                );
            }
            progress(report::line(&r));
            results.push(r);
        }
    }
    for r in results.iter_mut().filter(|r| r.strategy == "serial" && r.world_size == 1) {
        if r.error.is_none() && r.threads_per_rank == config.serial_threads {
            r.speedup = Some(1.0);
            r.steady_speedup = Some(1.0);
            r.speedup_per_core = Some(1.0);
        }
    }
    // Serial on more threads: its speed-up over the one-thread baseline.
    let baselines: BTreeMap<usize, (f64, f64)> = results
        .iter()
        .filter(|r| r.strategy == "serial" && r.threads_per_rank == config.serial_threads)
        .map(|r| (r.resolution, (r.latency_per_image_s, r.steady_step_ms)))
        .collect();
    for r in results
        .iter_mut()
        .filter(|r| r.strategy == "serial" && r.threads_per_rank != config.serial_threads)
    {
        if let (Some((b, steady)), None) = (baselines.get(&r.resolution), &r.error) {
            let s = b / r.latency_per_image_s;
            r.speedup = Some(s);
            r.steady_speedup = Some(steady / r.steady_step_ms.max(1e-9));
            r.speedup_per_core = Some(s * config.serial_threads as f64 / r.threads_per_rank as f64);
        }
    }
    let _ = desc;
    Ok(BenchReport {
        machine,
        model: ModelInfo {
            name: model.name.clone(),
            class_name: model.config.class_name().into(),
            layers: model.config.desc().num_layers,
            hidden_size: model.config.desc().hidden_size,
            heads: model.config.desc().num_heads,
            params: model.num_params(),
            random_weights: model.random_weights,
            dir: model.dir.clone(),
        },
        cores,
        repetitions: config.repetitions,
        warmup_runs: config.warmup_runs,
        guidance_scale: config.guidance_scale,
        text_tokens: config.text_tokens,
        seed: config.seed,
        results,
    })
}

/// The strategy's warmup steps: its `warmup_steps` option, or that option's documented
/// default; 0 for strategies without one.
fn strategy_warmup(registry: &Registry<B>, s: &StrategySpec) -> usize {
    let default = registry
        .info(&s.name)
        .ok()
        .and_then(|i| i.options.iter().find(|o| o.key == "warmup_steps").map(|o| o.default))
        .and_then(|d| d.parse().ok())
        .unwrap_or(0);
    s.options.usize("warmup_steps", default).unwrap_or(default)
}

/// Runs one configuration and turns its ranks' outcomes into a [`ConfigResult`]; also
/// returns rank 0's final latents.
fn measure(
    registry: &Registry<B>,
    model: &BenchModel,
    s: &StrategySpec,
    spec: &RunSpec,
    px: usize,
    reference: Option<&Tensor<B, 4>>,
) -> (ConfigResult, Option<Tensor<B, 4>>) {
    let desc = model.config.desc();
    let mut r = ConfigResult {
        label: if spec.world_size == 1 && spec.threads_per_rank > 1 {
            format!("serial({} threads)", spec.threads_per_rank)
        } else {
            s.label.clone()
        },
        strategy: s.name.clone(),
        options: s.option_text.clone(),
        world_size: spec.world_size,
        threads_per_rank: spec.threads_per_rank,
        resolution: px,
        latent: [spec.latent.0, spec.latent.1],
        tokens: desc
            .tokens(parallel_core::LatentGrid { height: spec.latent.0, width: spec.latent.1 })
            .len(),
        batch: spec.batch(),
        steps: spec.steps,
        ..ConfigResult::default()
    };
    let cpu_before = CpuTimes::now();
    r.rss_before_bytes = reset_peak_rss();
    let outcomes = run::run_configuration(registry, &model.dir, &model.config, spec);
    r.peak_rss_bytes = peak_rss();
    r.other_load_cores = cpu_before.other_cores_since();
    let mut ok = Vec::new();
    for (rank, o) in outcomes.into_iter().enumerate() {
        match o {
            Ok(o) => ok.push(o),
            Err(e) => {
                if r.error.is_none() {
                    r.error = Some(format!("rank {rank}: {e}"));
                }
            }
        }
    }
    if r.error.is_some() {
        return (r, None);
    }
    // Latency of a request: the slowest rank's.
    let reps = ok[0].request_times.len();
    let per_request: Vec<f64> = (0..reps)
        .map(|i| ok.iter().map(|o| o.request_times[i].as_secs_f64()).fold(0.0, f64::max))
        .collect();
    r.latency_per_image_s = median(&per_request);
    r.latency_per_step_ms = r.latency_per_image_s * 1e3 / spec.steps as f64;
    r.request_seconds = per_request;
    r.step_ms = (0..spec.steps)
        .map(|s| {
            let v: Vec<f64> = ok[0]
                .step_times
                .iter()
                .filter_map(|t| t.get(s).map(Duration::as_secs_f64))
                .collect();
            median(&v) * 1e3
        })
        .collect();
    r.steady_step_ms = steady(&r.step_ms, spec.strategy_warmup_steps);
    r.param_bytes = ok.iter().map(|o| o.param_bytes).collect();
    r.buffer_bytes = ok.iter().map(|o| o.buffer_bytes).collect();
    r.formula = ok[0].formula.clone();
    for o in &ok {
        let (measured, expected) = run::totals(o);
        let steps = o.step_comm.len().max(1) as f64;
        r.comm_bytes_per_step.push((measured * o.elem_bytes) as f64 / steps);
        r.comm_formula_bytes_per_step.push((expected * o.elem_bytes) as f64 / steps);
        r.comm_ratio.push(match (measured, expected) {
            (0, 0) => Some(1.0),
            (_, 0) => None,
            (m, e) => Some(m as f64 / e as f64),
        });
        r.comm_bytes_by_kind.push(
            run::bytes_by_kind(o).into_iter().map(|(k, b)| (k.name().to_string(), b)).collect(),
        );
    }
    let output = ok.swap_remove(0).output;
    if let Some(reference) = reference {
        let q = quality(&output, reference);
        r.psnr_db = q.psnr.is_finite().then_some(q.psnr);
        r.max_abs_error = Some(q.max_abs);
        r.rel_l2 = Some(q.rel_l2);
    } else {
        r.psnr_db = None;
        r.max_abs_error = Some(0.0);
        r.rel_l2 = Some(0.0);
    }
    (r, Some(output))
}

/// Errors of an output against a reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quality {
    /// PSNR in dB with the reference's range as the peak (infinite when equal).
    pub psnr: f64,
    /// Largest absolute difference.
    pub max_abs: f64,
    /// `‖a − b‖ / ‖b‖`.
    pub rel_l2: f64,
}

/// The errors of `a` against the reference `b` ([`metrics::compare`]).
pub fn quality(a: &Tensor<B, 4>, b: &Tensor<B, 4>) -> Quality {
    let values = |t: &Tensor<B, 4>| -> Vec<f32> {
        t.clone().into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default()
    };
    let c = metrics::compare(&values(a), &values(b));
    Quality { psnr: c.psnr, max_abs: c.max_abs, rel_l2: c.rel_l2 }
}

/// The median of the steps after `warmup` and before the last (all steps where none).
fn steady(step_ms: &[f64], warmup: usize) -> f64 {
    let n = step_ms.len();
    let inner = &step_ms[warmup.min(n)..n.saturating_sub(1).max(warmup.min(n))];
    median(if inner.is_empty() { step_ms } else { inner })
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

/// A `/proc/self/status` field in bytes (`VmHWM`, `VmRSS`); 0 where unreadable.
fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        })
        .map_or(0, |kb| kb * 1024)
}

/// Resets the process's peak resident set to its current size (Linux `clear_refs` 5);
/// returns the current resident set size.
fn reset_peak_rss() -> u64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    status_bytes("VmRSS:")
}

/// The process's peak resident set since the last reset.
fn peak_rss() -> u64 {
    status_bytes("VmHWM:")
}

fn load_average() -> [f64; 3] {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut v = s.split_whitespace().map(|x| x.parse().unwrap_or(0.0));
    [v.next().unwrap_or(0.0), v.next().unwrap_or(0.0), v.next().unwrap_or(0.0)]
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Busy CPU time of the machine and of this process, to tell how much others used.
struct CpuTimes {
    at: Instant,
    machine_busy: u64,
    own: u64,
}

impl CpuTimes {
    /// Clock ticks per second of `/proc` times (the Linux `USER_HZ`, 100 on every common
    /// configuration).
    const HZ: f64 = 100.0;

    fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let v: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // user nice system idle iowait irq softirq steal …
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        let own = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                // Fields after the parenthesised command name; utime and stime are 14 and 15.
                let rest = s.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .unwrap_or(0);
        CpuTimes { at: Instant::now(), machine_busy: total.saturating_sub(idle), own }
    }

    /// Cores' worth of CPU other processes used since `self`.
    fn other_cores_since(&self) -> f64 {
        let now = CpuTimes::now();
        let secs = now.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let others = (now.machine_busy - self.machine_busy.min(now.machine_busy)) as f64
            - (now.own - self.own.min(now.own)) as f64;
        (others / Self::HZ / secs).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_rejects_unknown_keys_naming_them() {
        let e = BenchConfig::from_toml("stepz = 3").unwrap_err().to_string();
        assert!(e.contains("stepz"), "{e}");
    }

    #[test]
    fn strategy_tables_become_options_and_labels() {
        let c = BenchConfig::from_toml(
            r#"strategies = ["ulysses", { name = "distrifusion", warmup_steps = 1 }, { name = "pipefusion", label = "pf", num_pipeline_patch = 4 }]"#,
        )
        .unwrap();
        let specs = c.strategy_specs(&crate::registry::<B>(), &[]).unwrap();
        let labels: Vec<&str> = specs.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["ulysses", "distrifusion[warmup_steps=1]", "pf"]);
        assert_eq!(specs[1].options.usize("warmup_steps", 9).unwrap(), 1);
        let e = c
            .strategy_specs(&crate::registry::<B>(), &["ulysses.nope=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        let specs = c
            .strategy_specs(&crate::registry::<B>(), &["distrifusion.warmup_steps=2".into()])
            .unwrap();
        assert_eq!(specs[1].label, "distrifusion[warmup_steps=2]");
    }

    #[test]
    fn warmup_comes_from_the_option_or_its_documented_default() {
        let r = crate::registry::<B>();
        assert_eq!(strategy_warmup(&r, &StrategySpec::named("distrifusion")), 4);
        assert_eq!(strategy_warmup(&r, &StrategySpec::named("pipefusion")), 1);
        assert_eq!(strategy_warmup(&r, &StrategySpec::named("ring")), 0);
        let mut s = StrategySpec::named("distrifusion");
        s.set("warmup_steps", OptionValue::Int(2));
        assert_eq!(strategy_warmup(&r, &s), 2);
    }

    #[test]
    fn steady_steps_skip_warmup_and_the_last_step() {
        assert_eq!(steady(&[9.0, 5.0, 5.0, 7.0], 1), 5.0);
        assert_eq!(steady(&[9.0, 7.0], 1), 8.0);
        assert_eq!(steady(&[4.0, 6.0], 0), 4.0);
        assert_eq!(steady(&[3.0], 4), 3.0);
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}

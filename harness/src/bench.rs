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
//! Every report also records the machine ([`Machine`]): the CPU model and its SIMD flags
//! (`avx2`, `avx512f`, `fma`, … from `/proc/cpuinfo`, as `lscpu` names them), the cores
//! available and the load average when the benchmark started.
//!
//! Output: a table on stdout (its header names the CPU and its SIMD flags), a JSON file
//! ([`BenchReport`]), and an SVG chart of latency per step and speed-up per strategy and
//! world size ([`report::write_svg`]).
//!
//! # Configuration
//! A TOML file (`configs/bench.toml`) whose keys are [`BenchConfig`]'s, unknown keys
//! rejected, and flags ([`BenchArgs`]) that override them.
//!
//! # Code
//! This module runs the configurations and gathers their results; [`run`] runs one
//! configuration on its ranks, [`model`] prepares the model, [`report`] writes the table,
//! JSON and chart. The rest is private and re-exported here: the flags (`args.rs`), the
//! config (`config.rs`), the report's types (`results.rs`), medians and errors
//! (`stats.rs`), and what `/proc` says about the machine and the process (`system.rs`).
//!
//! # Backend
//! The CPU backend ([`CpuBackend`](crate::CpuBackend)) only, for now: the ranks' thread
//! pools are what makes "N ranks on N cores" comparable with "1 rank on 1 core". A CUDA run
//! would time one GPU per rank instead, with the same report.

mod args;
mod config;
pub mod model;
pub mod report;
mod results;
pub mod run;
mod stats;
mod system;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burn::tensor::Tensor;
use parallel_core::{Registry, StrategyOptions};

use crate::CpuBackend as B;
pub use args::BenchArgs;
pub use config::{BenchConfig, StrategyEntry, StrategySpec};
pub use model::BenchModel;
pub use results::{BenchReport, ConfigResult, Machine, ModelInfo};
pub use run::{RankOutcome, RunSpec};
pub use stats::{Quality, quality};
use stats::{median, steady};
pub(crate) use system::resident_bytes;
use system::{CpuTimes, cpu_model, cpu_simd_flags, load_average, peak_rss, reset_peak_rss};

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

/// `harness bench`, and with `--report DIR` its page.
///
/// # Errors
/// As [`run_cli`], and a page that cannot be written.
pub fn run_cli_with_report(args: &BenchArgs) -> crate::Result<BenchReport> {
    let report = run_cli(args)?;
    if let Some(dir) = &args.report {
        let page = crate::report::write_bench_report(dir, &report)?;
        eprintln!("report: {}", page.display());
    }
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
    let links = config.link_models()?;
    let machine = Machine {
        cpu: cpu_model(),
        simd_flags: cpu_simd_flags(),
        available_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_average: load_average(),
    };
    let cores = config.cores.unwrap_or(machine.available_cores);
    let model =
        BenchModel::resolve(&config.model, config.layers, config.seed, &config.model_cache)?;
    let desc = model.config.desc();
    // A U-Net reads CLIP's 77 tokens, whatever the transformer setting.
    let text_tokens =
        if desc.family == parallel_core::ModelFamily::Unet { 77 } else { config.text_tokens };
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
            text_tokens,
            strategy_warmup_steps: 0,
            link: None,
            cfg_degree: 1,
            dtype: config.dtype.dtype(),
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
            // Strategy-major: a strategy's runs under every link model follow each other, so
            // that drift over a long sweep (allocator warm-up, other load) affects them alike.
            for s in specs {
                for link in &links {
                    let warmup = strategy_warmup(registry, s);
                    let spec = RunSpec {
                        strategy: s.name.clone(),
                        options: s.options.clone(),
                        world_size: n,
                        threads_per_rank: threads,
                        strategy_warmup_steps: warmup,
                        link: link.clone(),
                        cfg_degree: s.cfg_degree,
                        ..base.clone()
                    };
                    let mut s = s.clone();
                    if let (Some(l), true) = (link, links.len() > 1) {
                        s.label = format!("{} @{}", s.label, l.name);
                    }
                    runs.push((s, spec));
                }
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
    Ok(BenchReport {
        machine,
        model: ModelInfo {
            name: model.name.clone(),
            class_name: model.class_name(),
            layers: desc.num_layers,
            hidden_size: desc.hidden_size,
            heads: desc.num_heads,
            params: model.num_params(),
            random_weights: model.random_weights,
            dir: model.dir.clone(),
        },
        cores,
        repetitions: config.repetitions,
        warmup_runs: config.warmup_runs,
        guidance_scale: config.guidance_scale,
        text_tokens,
        dtype: config.dtype.to_string(),
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
        strategy: s.composed_name(),
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
        link: spec.link.as_ref().map(parallel_core::LinkModel::describe),
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
        let steps = o.step_comm.len().max(1) as f64;
        let wait: f64 = o.step_comm.iter().map(|s| s.wait().as_secs_f64()).sum();
        r.wait_ms_per_step.push(wait * 1e3 / steps);
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

#[cfg(test)]
mod tests {
    use parallel_core::OptionValue;

    use super::*;

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
}

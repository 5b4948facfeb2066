//! What a benchmark reports, as written to its JSON file: the machine, the model, and
//! every configuration's measurements.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The machine a report was measured on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    /// CPU model (`/proc/cpuinfo`).
    pub cpu: String,
    /// The CPU's SIMD flags as `/proc/cpuinfo` and `lscpu` name them (`avx2`, `avx512f`,
    /// `fma`, …; Arm: `asimd`, `sve`, …), in their order; empty where unknown (and in
    /// reports written before they were recorded).
    #[serde(default)]
    pub simd_flags: Vec<String>,
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
    /// The link model transfers were timed by (`None`: instant).
    #[serde(default)]
    pub link: Option<String>,
    /// Per rank, the time blocked on communication per step, milliseconds (mean over the
    /// last request's steps).
    #[serde(default)]
    pub wait_ms_per_step: Vec<f64>,
    /// PSNR of the final latents against serial's, dB (infinite → `None` with zero error).
    pub psnr_db: Option<f64>,
    /// Max absolute error of the final latents against serial's.
    pub max_abs_error: Option<f64>,
    /// Relative L2 error against serial's.
    pub rel_l2: Option<f64>,
    /// CPU used by other processes during the configuration, in cores.
    pub other_load_cores: f64,
}

fn default_dtype() -> String {
    "f32".into()
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
    /// The denoiser's compute dtype (`f32` in reports written before it was recorded).
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Seed.
    pub seed: u64,
    /// Every configuration, in the order run.
    pub results: Vec<ConfigResult>,
}

//! The flags of `harness bench`.

use std::path::PathBuf;

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
    /// The denoiser's compute dtype (f32, f16, bf16; weights converted while loading).
    #[arg(long, value_enum)]
    pub dtype: Option<crate::DtypeKind>,
    /// Where to write the JSON report.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where to write the SVG chart.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Also write the report page here (`DIR/index.html`: table and charts).
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// A link model to run every parallel configuration under (repeatable; `none` for
    /// instant transfers): a preset (nvlink-a100, nvlink-h100, pcie4, pcie5, ib100, eth25) or
    /// bandwidth=…,latency=…, optionally ,dilation=F.
    #[arg(long = "link", value_name = "SPEC")]
    pub links: Vec<String>,
}

//! The `harness` command line: `run`, `forward`, `list`. See the library docs for the flow.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use harness::config::BackendKind;
use harness::{HarnessError, ParallelConfig, RunConfig};

/// Parallel diffusion inference: prompt → image on N ranks with any strategy.
#[derive(Debug, Parser)]
#[command(name = "harness", version, about)]
struct Cli {
    /// More log output (-v: info, -vv: debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Keep the C allocator's defaults (by default glibc is set for tensor-sized blocks, see
    /// `kernels::tune_allocator`: a few percent faster on CPU, same peak memory).
    #[arg(long, global = true)]
    default_allocator: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Text to image: settings from a TOML file, each overridable by a flag.
    Run(Box<RunArgs>),
    /// One denoiser evaluation on a file of diffusers forward inputs; writes `sample`.
    Forward(Box<ForwardArgs>),
    /// Known models, strategies (with their options) and schedulers.
    List,
    /// Every strategy side by side: latency, speed-up, memory, communication, quality.
    Bench(Box<harness::bench::BenchArgs>),
    /// Image quality: FID (as pytorch-fid), PSNR and SSIM (as scikit-image).
    #[command(subcommand)]
    Eval(harness::eval::EvalCommand),
    /// One process per rank, as torchrun: `harness launch --nproc-per-node 2 -- run …`.
    Launch(harness::multiprocess::LaunchArgs),
}

/// The parallel split, shared by `run` and `forward`.
#[derive(Debug, Args)]
struct ParallelArgs {
    /// Strategy name (`harness list`).
    #[arg(long)]
    strategy: Option<String>,
    /// Ranks.
    #[arg(long)]
    world_size: Option<usize>,
    /// Seconds a communication wait may block before it fails.
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// Threads of each rank's pool (default: cores / world size).
    #[arg(long)]
    threads_per_rank: Option<usize>,
    /// Backend of the ranks.
    #[arg(long, value_enum)]
    backend: Option<BackendKind>,
    /// The denoiser's compute dtype (weights converted while loading).
    #[arg(long, value_enum)]
    dtype: Option<harness::DtypeKind>,
    /// Strategy option `warmup_steps` (distrifusion, pipefusion).
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// Strategy option `num_pipeline_patch` (pipefusion).
    #[arg(long)]
    num_pipeline_patch: Option<usize>,
    /// Strategy option `ulysses_degree` (usp; pipefusion: ranks of each stage).
    #[arg(long)]
    ulysses_degree: Option<usize>,
    /// Strategy option `ring_degree` (usp; pipefusion: ring positions of each stage).
    #[arg(long)]
    ring_degree: Option<usize>,
    /// Strategy option `blocks_per_stage` (pipefusion), e.g. "2,2".
    #[arg(long)]
    blocks_per_stage: Option<String>,
    /// Any strategy option, `key=value` (repeatable).
    #[arg(long = "strategy-option", value_name = "KEY=VALUE")]
    strategy_option: Vec<String>,
    /// Time transfers by a link model: a preset (nvlink-a100, nvlink-h100, pcie4, pcie5,
    /// ib100, eth25) or bandwidth=…,latency=…, optionally ,dilation=F.
    #[arg(long, value_name = "SPEC")]
    link: Option<String>,
    /// The communicator: auto (NCCL where it can work: CUDA, the `nccl` feature, a GPU per
    /// rank), builtin (threads: in-process; processes: TCP), nccl (an error where it cannot).
    #[arg(long, value_name = "KIND")]
    comm: Option<harness::config::CommKind>,
    /// CUDA: the GPU of each rank, `devices[rank mod len]`, e.g. "0,1" (default: rank mod
    /// visible GPUs).
    #[arg(long, value_name = "IDS")]
    devices: Option<String>,
    /// Decode with the VAE split by rows over every rank (exact), not on rank 0 alone.
    #[arg(long)]
    vae_parallel: bool,
    /// 2: split the guidance batch over two groups of world-size / 2 ranks, each running
    /// the strategy on its half (CFG parallelism).
    #[arg(long)]
    cfg_degree: Option<usize>,
    /// Data parallelism: replicas of world-size / N ranks, each generating its own image
    /// (seed + replica index), written as OUTPUT-0.png, OUTPUT-1.png, ….
    #[arg(long)]
    dp_degree: Option<usize>,
}

impl ParallelArgs {
    fn apply(&self, p: &mut ParallelConfig) -> harness::Result<()> {
        if let Some(v) = &self.strategy {
            p.strategy = v.clone();
        }
        if let Some(v) = self.world_size {
            p.world_size = v;
        }
        if let Some(v) = self.timeout_secs {
            p.timeout_secs = v;
        }
        if let Some(v) = self.threads_per_rank {
            p.threads_per_rank = Some(v);
        }
        if let Some(v) = self.backend {
            p.backend = v;
        }
        if let Some(v) = self.dtype {
            p.dtype = v;
        }
        if let Some(v) = self.comm {
            p.comm = v;
        }
        if let Some(v) = &self.link {
            p.link = Some(v.clone());
        }
        if self.vae_parallel {
            p.vae_parallel = true;
        }
        if let Some(v) = &self.devices {
            p.devices = harness::devices::parse_devices(v)?;
        }
        if let Some(v) = self.cfg_degree {
            p.cfg_degree = v;
        }
        if let Some(v) = self.dp_degree {
            p.dp_degree = v;
        }
        let int = |v: usize| toml::Value::Integer(v as i64);
        for (key, value) in [
            ("warmup_steps", self.warmup_steps.map(int)),
            ("num_pipeline_patch", self.num_pipeline_patch.map(int)),
            ("ulysses_degree", self.ulysses_degree.map(int)),
            ("ring_degree", self.ring_degree.map(int)),
            ("blocks_per_stage", self.blocks_per_stage.clone().map(toml::Value::String)),
        ] {
            if let Some(v) = value {
                p.options.insert(key.to_string(), v);
            }
        }
        for a in &self.strategy_option {
            p.set_option(a)?;
        }
        Ok(())
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    /// A TOML run config (`configs/demo.toml`); its relative paths are relative to it.
    config: Option<PathBuf>,
    /// A diffusers PixArt pipeline folder.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    prompt: Option<String>,
    /// The negative prompt.
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Denoising steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (≤ 1: off).
    #[arg(long)]
    guidance_scale: Option<f64>,
    /// Seed of the initial noise.
    #[arg(long)]
    seed: Option<u64>,
    /// Image height in pixels.
    #[arg(long)]
    height: Option<usize>,
    /// Image width in pixels.
    #[arg(long)]
    width: Option<usize>,
    /// Scheduler: dpm_solver_multistep, ddim, euler, flow_match_euler or a diffusers class.
    #[arg(long)]
    scheduler: Option<String>,
    /// Initial latents: a safetensors file with tensor `latents`.
    #[arg(long, value_name = "FILE")]
    latents: Option<PathBuf>,
    /// The PNG to write.
    #[arg(long, value_name = "FILE.png")]
    output: Option<PathBuf>,
    /// Also write the final latents (tensor `latents`) here.
    #[arg(long, value_name = "FILE")]
    save_latents: Option<PathBuf>,
    /// Text tokens per prompt (default: 120 for PixArt-α, 300 for PixArt-Σ).
    #[arg(long)]
    max_sequence_length: Option<usize>,
    /// Batch generation: a prompt file (one per line, or JSONL with `prompt`, optional
    /// `negative_prompt`, `seed`); needs --output-dir.
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// Images of every prompt (seeds counting up from the prompt's).
    #[arg(long)]
    images_per_prompt: Option<usize>,
    /// Where batch generation writes 00000.png, … and metadata.jsonl.
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    parallel: ParallelArgs,
}

impl RunArgs {
    fn config(&self) -> harness::Result<RunConfig> {
        let mut c = match &self.config {
            Some(path) => RunConfig::from_file(path)?,
            None => RunConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => {$(
                if let Some(v) = &self.$f {
                    c.$f = v.clone();
                }
            )*};
        }
        set!(model, prompt, steps, seed, output, images_per_prompt);
        macro_rules! set_opt {
            ($($f:ident),*) => {$(
                if let Some(v) = &self.$f {
                    c.$f = Some(v.clone());
                }
            )*};
        }
        set_opt!(
            negative_prompt,
            guidance_scale,
            height,
            width,
            scheduler,
            latents,
            save_latents,
            max_sequence_length,
            prompts,
            output_dir
        );
        self.parallel.apply(&mut c.parallel)?;
        Ok(c)
    }
}

#[derive(Debug, Args)]
struct ForwardArgs {
    /// A transformer or U-Net folder, or a pipeline folder (its `transformer/` or `unet/`).
    #[arg(long)]
    model: PathBuf,
    /// Safetensors file of diffusers forward inputs (`hidden_states`, `timestep`, … for a
    /// transformer; `sample`, `timestep`, `encoder_hidden_states`, … for a U-Net).
    #[arg(long, value_name = "FILE.safetensors")]
    inputs: PathBuf,
    /// Where `sample` is written.
    #[arg(long, value_name = "FILE.safetensors")]
    output: PathBuf,
    #[command(flatten)]
    parallel: ParallelArgs,
}

fn init_logger(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    // Our crates at the chosen level, dependencies (Burn, CubeCL, tokenizers) at warnings.
    const OURS: [&str; 16] = [
        "harness",
        "parallel_core",
        "strategy_tensor",
        "strategy_ulysses",
        "strategy_ring",
        "strategy_distrifusion",
        "strategy_pipefusion",
        "models_dit",
        "models_unet",
        "models_vae",
        "models_text",
        "schedulers",
        "weights",
        "quality",
        "kernels",
        "metrics",
    ];
    let filter = std::iter::once("warn".to_string())
        .chain(OURS.iter().map(|c| format!("{c}={level}")))
        .collect::<Vec<_>>()
        .join(",");
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(filter))
        .format(|buf, record| {
            writeln!(buf, "{}: {}", record.level().as_str().to_lowercase(), record.args())
        })
        .try_init();
}

fn run(cli: Cli) -> harness::Result<()> {
    match cli.command {
        Command::Run(args) => {
            let mut cfg = args.config()?;
            under_launcher(&mut cfg.parallel, args.parallel.world_size)?;
            let options = harness::RunOptions { decode: true, progress: !args.no_progress };
            let report = harness::run_with_options(&cfg, &options)?;
            for r in &report.ranks {
                log::info!(
                    "rank {}: sent {} ({} elements expected over the request: {}); params {} B, \
                     buffers {} B",
                    r.rank,
                    r.comm,
                    r.expected.total(),
                    r.expected.formula,
                    r.param_bytes,
                    r.buffer_bytes
                );
            }
            println!("{}", report.summary());
        }
        Command::Forward(args) => {
            let mut parallel = ParallelConfig::default();
            args.parallel.apply(&mut parallel)?;
            under_launcher(&mut parallel, args.parallel.world_size)?;
            let report = harness::forward(&args.model, &args.inputs, &args.output, &parallel)?;
            println!("{}", report.summary());
        }
        Command::List => print!("{}", harness::list::list_text()),
        Command::Bench(args) => {
            harness::bench::run_cli_with_report(&args)?;
        }
        Command::Eval(cmd) => harness::eval::run_cli(&cmd)?,
        Command::Launch(args) => {
            harness::multiprocess::launch(&args)?;
        }
    }
    Ok(())
}

/// Under a launcher (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` set), this process
/// runs one rank of the launcher's world; `--world-size`, if given, must agree.
fn under_launcher(p: &mut ParallelConfig, flag: Option<usize>) -> harness::Result<()> {
    let Some(env) = harness::multiprocess::process_env(|k| std::env::var(k).ok())? else {
        return Ok(());
    };
    if let Some(w) = flag
        && w != env.world_size
    {
        return Err(HarnessError::config(
            "--world-size",
            format!("{w} disagrees with the launcher's WORLD_SIZE {}", env.world_size),
        ));
    }
    if std::env::var(harness::multiprocess::LIFELINE).is_ok_and(|v| v == "1") {
        harness::multiprocess::watch_launcher(env.rank);
    }
    p.world_size = env.world_size;
    p.process = Some(env);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logger(cli.verbose);
    if !cli.default_allocator {
        let tuned = kernels::tune_allocator();
        log::debug!("C allocator tuned for tensor-sized blocks: {tuned}");
    }
    match run(cli) {
        Ok(()) | Err(HarnessError::WorkerDone { .. }) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

fn report(e: &HarnessError) {
    eprintln!("error: {e}");
}

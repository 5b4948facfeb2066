//! # conformance: every strategy against the serial path
//!
//! One suite, run against every strategy (opendal's behaviour-test idea): each registered
//! strategy × world sizes 1, 2 and 4 (and the USP mesh 2 × 2) × every DiT fixture
//! (PixArt-α, PixArt-α 1024-MS with added conditions, PixArt-Σ, DiT; square, wide, tall,
//! uneven-row and class-label cases) must equal the serial model, and its measured
//! communication must equal its own formula, exactly.
//!
//! The library holds what the test files share: fixture discovery, running a strategy on N
//! [`LocalComm`](parallel_core::LocalComm) ranks, a guided sampler implementing
//! [`DenoiseLoop`] for multi-step runs, and the comparison metrics. The serial reference is
//! the model itself run with [`Serial`](parallel_core::Serial) seams — whose equality to
//! diffusers is `models-dit`'s own test — never a number the strategy produced.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burn::tensor::{Int, Tensor, TensorData};
use parallel_core::{
    CommStats, DenoiseLoop, Denoiser, DenoiserInput, ExpectedComm, LaunchOptions, ModelDesc,
    ParallelError, ParallelStrategy, Registry, RequestInfo, Result, Serial, StepKind,
    StrategyOptions, launch,
};
use schedulers::{Schedule, Scheduler, SchedulerState};

/// The backend of the suite (Flex, the CPU backend).
pub type B = burn_flex::Flex;

/// The fixture models of `fixtures/dit/`.
pub const MODELS: [&str; 4] = ["pixart-alpha", "pixart-alpha-ms", "pixart-sigma", "dit"];

/// `fixtures/` of the repository.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// The folder of a fixture model.
pub fn model_dir(model: &str) -> PathBuf {
    fixtures().join("dit").join(model)
}

/// The case files of a fixture model, sorted.
pub fn cases(model: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(model_dir(model).join("cases"))
        .expect("fixture cases")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

/// A case's inputs.
pub fn read_input(path: &Path) -> DenoiserInput<B> {
    harness::read_denoiser_input::<B>(path, &Default::default()).expect("fixture case").0
}

/// Every strategy with the registry it is created from.
pub fn registry() -> Registry<B> {
    let mut r = Registry::new();
    strategy_tensor::register(&mut r);
    strategy_ulysses::register(&mut r);
    strategy_ring::register(&mut r);
    strategy_distrifusion::register(&mut r);
    strategy_pipefusion::register(&mut r);
    r
}

/// Relative L2 error `‖a − b‖ / ‖b‖` ([`metrics::compare`]).
pub fn rel_l2(a: &Tensor<B, 4>, b: &Tensor<B, 4>) -> f64 {
    metrics::compare(&values(a), &values(b)).rel_l2
}

/// `max |a − b| / max |b|`.
pub fn max_rel(a: &Tensor<B, 4>, b: &Tensor<B, 4>) -> f64 {
    metrics::compare(&values(a), &values(b)).max_rel
}

/// PSNR of `a` against the reference `b`, with the reference's value range as the peak.
pub fn psnr(a: &Tensor<B, 4>, b: &Tensor<B, 4>) -> f64 {
    metrics::compare(&values(a), &values(b)).psnr
}

fn values(t: &Tensor<B, 4>) -> Vec<f32> {
    t.clone().into_data().convert::<f32>().to_vec::<f32>().expect("f32")
}

/// What one rank reports after a run.
pub struct RankReport {
    /// The rank's output (noise prediction or final latents).
    pub output: Tensor<B, 4>,
    /// What it sent.
    pub stats: CommStats,
    /// What its strategy's formula says it sends per step.
    pub expected: ExpectedComm,
    /// Parameter bytes of its model.
    pub param_bytes: u64,
    /// Buffer bytes of its strategy after the run.
    pub buffer_bytes: u64,
}

/// The model description of a fixture folder (before any weight is read).
pub fn desc(dir: &Path) -> ModelDesc {
    models_dit::ModelConfig::from_folder(dir).expect("config").desc()
}

/// The serial model's output on `input`.
pub fn serial_forward(dir: &Path, input: &DenoiserInput<B>) -> Tensor<B, 4> {
    let model =
        models_dit::DitModel::<B>::load(dir, &parallel_core::LoadPlan::full(), &Default::default())
            .expect("load");
    model.forward_rows(input, 0..input.grid().height, &mut Serial).expect("serial forward")
}

fn options() -> LaunchOptions<B> {
    LaunchOptions::default().with_timeout(Duration::from_secs(60))
}

fn request_of(input: &DenoiserInput<B>, steps: usize, images: usize) -> RequestInfo {
    RequestInfo {
        steps,
        grid: input.grid(),
        batch: input.batch(),
        images,
        text_tokens: input.encoder_hidden_states.as_ref().map_or(0, |t| t.dims()[1]),
    }
}

/// Builds the strategy and loads the model on one rank, as the harness does: the strategy
/// validates and gives its load plan before any weight is read.
fn setup(
    name: &str,
    opts: &StrategyOptions,
    comm: parallel_core::Comm<B>,
    dir: &Path,
    request: &RequestInfo,
) -> Result<(Box<dyn ParallelStrategy<B>>, models_dit::DitModel<B>)> {
    let strategy = registry().create(name, comm.clone(), opts)?;
    let d = desc(dir);
    strategy.validate(&d, request)?;
    let plan = strategy.load_plan(&d)?;
    let model = models_dit::DitModel::<B>::load(dir, &plan, &comm.device())
        .map_err(|e| ParallelError::Model(e.to_string()))?;
    Ok((strategy, model))
}

/// One denoiser evaluation of strategy `name` on `n` ranks.
pub fn forward_on_ranks(
    name: &str,
    opts: &StrategyOptions,
    n: usize,
    dir: &Path,
    input: &DenoiserInput<B>,
) -> Vec<Result<RankReport>> {
    launch(n, &options(), |comm| {
        let request = request_of(input, 1, input.batch());
        let (mut strategy, model) = setup(name, opts, comm.clone(), dir, &request)?;
        let d = model.desc().clone();
        strategy.begin_request(&d, &request)?;
        comm.reset_stats();
        let output = strategy.forward(&model, input, 0)?;
        Ok(RankReport {
            output,
            stats: comm.stats(),
            expected: strategy.expected_comm(&d, &request, StepKind::Warmup)?,
            param_bytes: model.param_bytes(),
            buffer_bytes: strategy.buffer_bytes(),
        })
    })
}

/// A classifier-free-guided DPM-Solver++ sampler over a fixture case: the case's batch of
/// two is the guidance pair (entry 0 unconditional, entry 1 conditional), the latent is the
/// case's first `hidden_states` entry. Keeps one scheduler state per region of rows.
pub struct GuidedSampler {
    cond: DenoiserInput<B>,
    schedule: Schedule,
    guidance: f64,
    latent_channels: usize,
    states: HashMap<(usize, usize), SchedulerState<B, 4>>,
    height: usize,
    /// Comm stats snapshots taken at each step's first `model_input` call.
    pub snapshots: Vec<CommStats>,
    comm: Option<parallel_core::Comm<B>>,
}

impl GuidedSampler {
    /// A sampler of `steps` steps with guidance scale 4.5 over `case`'s conditioning.
    pub fn new(case: &DenoiserInput<B>, steps: usize, latent_channels: usize) -> Self {
        let config = fixtures().join("pipeline/pixart-alpha-tiny/scheduler/scheduler_config.json");
        let schedule = Scheduler::from_file(&config)
            .expect("scheduler config")
            .set_timesteps(steps)
            .expect("timesteps");
        GuidedSampler {
            cond: case.clone(),
            schedule,
            guidance: 4.5,
            latent_channels,
            states: HashMap::new(),
            height: case.grid().height,
            snapshots: Vec::new(),
            comm: None,
        }
    }

    /// Records `comm`'s stats at the start of every step.
    pub fn watch(mut self, comm: parallel_core::Comm<B>) -> Self {
        self.comm = Some(comm);
        self
    }

    /// The initial latents: the case's first sample, scaled by the initial noise sigma.
    pub fn initial_latents(&self) -> Tensor<B, 4> {
        self.cond.hidden_states.clone().narrow(0, 0, 1).mul_scalar(self.schedule.init_noise_sigma())
    }
}

impl DenoiseLoop<B> for GuidedSampler {
    fn num_steps(&self) -> usize {
        self.schedule.len()
    }

    fn model_input(&mut self, step: usize, latents: &Tensor<B, 4>) -> Result<DenoiserInput<B>> {
        if let Some(c) = &self.comm
            && self.snapshots.len() == step
        {
            self.snapshots.push(c.stats());
        }
        let x = Tensor::cat(vec![latents.clone(), latents.clone()], 0);
        let x = self.schedule.scale_model_input(x, step);
        let t = self.schedule.timestep(step) as f32;
        let mut input = self.cond.clone();
        input.hidden_states = x;
        input.timestep = Tensor::from_data(TensorData::new(vec![t, t], [2]), &latents.device());
        Ok(input)
    }

    fn step(
        &mut self,
        step: usize,
        region: Range<usize>,
        noise_pred: Tensor<B, 4>,
        latents: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let uncond = noise_pred.clone().narrow(0, 0, 1);
        let cond = noise_pred.narrow(0, 1, 1);
        let guided = uncond.clone() + (cond - uncond).mul_scalar(self.guidance);
        let eps = guided.narrow(1, 0, self.latent_channels);
        let key = (region.start, region.end);
        let whole = (0, self.height);
        if !self.states.contains_key(&key) {
            // A region seen for the first time continues the whole latent's state if the
            // whole latent was stepped before (PipeFusion after its warmup).
            let state = match self.states.get(&whole) {
                Some(w) => w.narrow(2, region.clone()),
                None => self.schedule.new_state(),
            };
            self.states.insert(key, state);
        }
        let state = self.states.get_mut(&key).expect("inserted");
        Ok(self.schedule.step(state, step, eps, latents))
    }
}

/// Class labels as an int tensor (for DiT tests that build inputs by hand).
pub fn labels(values: &[i64]) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), &Default::default())
}

/// A multi-step run of strategy `name` on `n` ranks over a fixture case; `repeat` runs the
/// same request that many times on the same strategy instance (to test state reset).
pub fn denoise_on_ranks(
    name: &str,
    opts: &StrategyOptions,
    n: usize,
    dir: &Path,
    case: &DenoiserInput<B>,
    steps: usize,
    repeat: usize,
) -> Vec<Result<(Vec<RankReport>, Vec<CommStats>)>> {
    launch(n, &options(), |comm| {
        let request = request_of(case, steps, 1);
        let (mut strategy, model) = setup(name, opts, comm.clone(), dir, &request)?;
        let d = model.desc().clone();
        let mut reports = Vec::new();
        let mut snapshots = Vec::new();
        for _ in 0..repeat.max(1) {
            let mut sampler = GuidedSampler::new(case, steps, d.in_channels).watch(comm.clone());
            strategy.begin_request(&d, &request)?;
            comm.reset_stats();
            let latents = sampler.initial_latents();
            let output = strategy.denoise(&model, &mut sampler, latents)?;
            let stats = comm.stats();
            snapshots = sampler.snapshots.clone();
            snapshots.push(stats.clone());
            reports.push(RankReport {
                output,
                stats,
                expected: strategy.expected_comm(&d, &request, StepKind::Steady)?,
                param_bytes: model.param_bytes(),
                buffer_bytes: strategy.buffer_bytes(),
            });
        }
        Ok((reports, snapshots))
    })
}

/// The serial sampler's final latents for a case.
pub fn serial_denoise(dir: &Path, case: &DenoiserInput<B>, steps: usize) -> Tensor<B, 4> {
    let r = denoise_on_ranks("serial", &StrategyOptions::new("serial"), 1, dir, case, steps, 1);
    let (mut reports, _) = r.into_iter().next().expect("one rank").expect("serial run");
    reports.remove(0).output
}

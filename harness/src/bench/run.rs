//! Running one benchmark configuration on N in-process ranks: what is timed, what is
//! counted.
//!
//! Every rank builds its strategy from the registry, validates it, loads its part of the
//! model under the strategy's load plan, and then runs `warmup + repetitions` identical
//! requests (same seed, same latents and text) through [`ParallelStrategy::denoise`](parallel_core::ParallelStrategy::denoise) with a
//! [`BenchSampler`] (classifier-free guidance, DPM-Solver++ — PixArt's scheduler — one
//! state per region of rows). Per request:
//!
//! - **timed**: from a barrier of all ranks to the end of `denoise` (the final latents on
//!   every rank), the slowest rank; loading, validation and `begin_request` are not timed.
//!   The sampler stamps the start of each step (on rank 0) for per-step times.
//! - **counted**: the rank's [`CommStats`] snapshot at the start of every step (the first
//!   `model_input` call of the step), so each step's traffic is set beside
//!   [`ParallelStrategy::expected_comm`](parallel_core::ParallelStrategy::expected_comm) for that step's kind (warmup or steady, by the
//!   strategy's `warmup_steps` option or its documented default). Traffic after the last
//!   step's start beyond that step's formula is reported apart, as per-request traffic
//!   (PipeFusion's final broadcast of the latents).

use std::collections::HashMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use burn::tensor::{Int, Tensor, TensorData};
use models_dit::{DitModel, ModelConfig};
use parallel_core::{
    Comm, CommStats, DenoiseLoop, Denoiser, DenoiserInput, LaunchOptions, ModelDesc, OpKind,
    ParallelError, Registry, RequestInfo, StepKind, StrategyOptions, launch,
};
use schedulers::{Schedule, SchedulerState};

use super::model::normal_values;
use crate::CpuBackend as B;

/// One configuration: a strategy with its options on `world_size` ranks of
/// `threads_per_rank` threads, at one latent size.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Registered strategy name.
    pub strategy: String,
    /// Its options.
    pub options: StrategyOptions,
    /// Ranks.
    pub world_size: usize,
    /// Threads of each rank's pool.
    pub threads_per_rank: usize,
    /// Latent height and width.
    pub latent: (usize, usize),
    /// Denoising steps per request.
    pub steps: usize,
    /// Untimed requests before the timed ones.
    pub warmup_runs: usize,
    /// Timed requests.
    pub repetitions: usize,
    /// Seed of the latents and text.
    pub seed: u64,
    /// Classifier-free guidance scale (> 1: a batch of two per evaluation).
    pub guidance_scale: f64,
    /// Text tokens of the (random) caption, for models that cross-attend.
    pub text_tokens: usize,
    /// Warmup steps of the strategy (for the per-step formula's kind).
    pub strategy_warmup_steps: usize,
}

impl RunSpec {
    /// The batch of one denoiser evaluation.
    pub fn batch(&self) -> usize {
        if self.guidance_scale > 1.0 { 2 } else { 1 }
    }

    /// The request every rank is told about.
    pub fn request(&self, desc: &ModelDesc) -> RequestInfo {
        RequestInfo {
            steps: self.steps,
            grid: parallel_core::LatentGrid { height: self.latent.0, width: self.latent.1 },
            batch: self.batch(),
            images: 1,
            text_tokens: if desc.cross_attention { self.text_tokens } else { 0 },
        }
    }
}

/// What one rank measured over all its timed requests.
#[derive(Debug, Clone)]
pub struct RankOutcome {
    /// Wall time of each timed request on this rank.
    pub request_times: Vec<Duration>,
    /// Per timed request, the time of each step (rank 0's stamps; empty on other ranks).
    pub step_times: Vec<Vec<Duration>>,
    /// Per step of the last request, what this rank sent; the last entry runs to the end of
    /// the request.
    pub step_comm: Vec<CommStats>,
    /// Per step, the formula's elements.
    pub step_expected: Vec<u64>,
    /// The formula of a steady step, in words.
    pub formula: String,
    /// Bytes of one element of the compute dtype.
    pub elem_bytes: u64,
    /// Parameter bytes this rank holds.
    pub param_bytes: u64,
    /// Buffer bytes of the strategy after the last request.
    pub buffer_bytes: u64,
    /// The final latents of the last request.
    pub output: Tensor<B, 4>,
}

/// Runs `spec` over the model in `dir` on `spec.world_size` ranks; returns each rank's
/// outcome in rank order.
pub fn run_configuration(
    registry: &Registry<B>,
    dir: &std::path::Path,
    config: &ModelConfig,
    spec: &RunSpec,
) -> Vec<Result<RankOutcome, ParallelError>> {
    let options = LaunchOptions::<B>::default()
        .with_threads_per_rank(spec.threads_per_rank)
        .with_timeout(Duration::from_secs(1800));
    let desc = config.desc();
    launch(spec.world_size, &options, |comm| {
        let request = spec.request(&desc);
        let mut strategy = registry.create(&spec.strategy, comm.clone(), &spec.options)?;
        strategy.validate(&desc, &request)?;
        let plan = strategy.load_plan(&desc)?;
        let model = DitModel::<B>::load(dir, &plan, &comm.device())
            .map_err(|e| ParallelError::Model(e.to_string()))?;
        let inputs = BenchInputs::new(config, spec, &comm.device());
        let mut outcome = RankOutcome {
            request_times: Vec::new(),
            step_times: Vec::new(),
            step_comm: Vec::new(),
            step_expected: Vec::new(),
            formula: strategy.expected_comm(&desc, &request, StepKind::Steady)?.formula,
            elem_bytes: 4,
            param_bytes: model.param_bytes(),
            buffer_bytes: 0,
            output: Tensor::zeros([1, 1, 1, 1], &comm.device()),
        };
        for run in 0..spec.warmup_runs + spec.repetitions {
            let mut sampler = BenchSampler::new(&inputs, comm.clone());
            strategy.begin_request(&desc, &request)?;
            comm.barrier()?;
            comm.reset_stats();
            let start = Instant::now();
            let latents = strategy.denoise(&model, &mut sampler, inputs.latents.clone())?;
            // Flex computes eagerly; reading the result back is the explicit sync.
            let data = latents.clone().into_data();
            let elapsed = start.elapsed();
            let end_stats = comm.stats();
            if run < spec.warmup_runs {
                continue;
            }
            outcome.request_times.push(elapsed);
            let mut steps: Vec<Duration> = sampler.starts.windows(2).map(|w| w[1] - w[0]).collect();
            if let Some(last) = sampler.starts.last() {
                steps.push(start + elapsed - *last);
            }
            if comm.rank() == 0 {
                outcome.step_times.push(steps);
            }
            let mut snaps = sampler.snapshots;
            snaps.push(end_stats);
            outcome.step_comm = snaps.windows(2).map(|w| w[1].since(&w[0])).collect();
            outcome.elem_bytes = (data.bytes.len() / data.num_elements().max(1)) as u64;
            outcome.output = latents;
        }
        outcome.step_expected = (0..spec.steps)
            .map(|s| {
                let kind = if s < spec.strategy_warmup_steps {
                    StepKind::Warmup
                } else {
                    StepKind::Steady
                };
                strategy.expected_comm(&desc, &request, kind).map(|e| e.total())
            })
            .collect::<Result<_, _>>()?;
        outcome.buffer_bytes = strategy.buffer_bytes();
        Ok(outcome)
    })
}

/// The inputs of every request of a configuration, the same on every rank: latents and
/// text (or class labels) drawn from the seed, not from the backend's generator.
pub struct BenchInputs {
    /// Initial latents `[1, C, h, w]`, scaled by the scheduler's initial sigma.
    pub latents: Tensor<B, 4>,
    template: DenoiserInput<B>,
    schedule: Schedule,
    guidance_scale: f64,
    latent_channels: usize,
}

impl BenchInputs {
    /// Draws the inputs of `spec` for a model of `config`.
    pub fn new(config: &ModelConfig, spec: &RunSpec, device: &burn::tensor::Device<B>) -> Self {
        let desc = config.desc();
        let (h, w) = spec.latent;
        let batch = spec.batch();
        let schedule = schedulers::Scheduler::new(schedulers::SchedulerConfig::DpmSolverMultistep(
            schedulers::DpmSolverMultistepConfig::pixart(),
        ))
        .and_then(|s| s.set_timesteps(spec.steps))
        .expect("PixArt's DPM-Solver++ schedule");
        let n = desc.in_channels * h * w;
        let latents = Tensor::<B, 4>::from_data(
            TensorData::new(normal_values(spec.seed, "latents", n), [1, desc.in_channels, h, w]),
            device,
        )
        .mul_scalar(schedule.init_noise_sigma());
        let mut template = DenoiserInput::new(
            Tensor::zeros([batch, desc.in_channels, h, w], device),
            Tensor::zeros([batch], device),
        );
        match config {
            ModelConfig::PixArt(c) => {
                let (t, ch) = (spec.text_tokens, c.caption_channels.unwrap_or(desc.hidden_size));
                let text = normal_values(spec.seed, "text", batch * t * ch);
                template.encoder_hidden_states =
                    Some(Tensor::from_data(TensorData::new(text, [batch, t, ch]), device));
                template.encoder_attention_mask = Some(Tensor::ones([batch, t], device));
                if c.use_additional_conditions() {
                    let (hp, wp) = ((h * 8) as f32, (w * 8) as f32);
                    let res: Vec<f32> = (0..batch).flat_map(|_| [hp, wp]).collect();
                    let ar: Vec<f32> = vec![hp / wp; batch];
                    template.added_cond.insert(
                        "resolution".into(),
                        Tensor::from_data(TensorData::new(res, [batch, 2]), device),
                    );
                    template.added_cond.insert(
                        "aspect_ratio".into(),
                        Tensor::from_data(TensorData::new(ar, [batch, 1]), device),
                    );
                }
            }
            ModelConfig::DiT(c) => {
                // Guidance pairs the null class (unconditional) with class 207.
                let null = c.num_classes() as i64;
                let labels: Vec<i64> =
                    if batch == 2 { vec![null, 207 % null] } else { vec![207 % null] };
                template.class_labels =
                    Some(Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [batch]), device));
            }
        }
        BenchInputs {
            latents,
            template,
            schedule,
            guidance_scale: spec.guidance_scale,
            latent_channels: desc.in_channels,
        }
    }
}

/// The sampler side of a benchmark request: what PixArt's pipeline does around each
/// transformer call (guidance `u + g·(c − u)`, epsilon half of a learned-sigma output,
/// DPM-Solver++ per region of rows), with random conditioning, plus the step stamps and
/// communication snapshots the benchmark reports.
pub struct BenchSampler<'a> {
    inputs: &'a BenchInputs,
    comm: Comm<B>,
    states: HashMap<(usize, usize), SchedulerState<B, 4>>,
    height: usize,
    /// Start of each step (first `model_input` call of the step).
    pub starts: Vec<Instant>,
    /// The rank's communication counters at the start of each step.
    pub snapshots: Vec<CommStats>,
}

impl<'a> BenchSampler<'a> {
    /// A sampler over `inputs` that snapshots `comm`'s counters.
    pub fn new(inputs: &'a BenchInputs, comm: Comm<B>) -> Self {
        BenchSampler {
            inputs,
            comm,
            states: HashMap::new(),
            height: inputs.latents.dims()[2],
            starts: Vec::new(),
            snapshots: Vec::new(),
        }
    }
}

impl DenoiseLoop<B> for BenchSampler<'_> {
    fn num_steps(&self) -> usize {
        self.inputs.schedule.len()
    }

    fn model_input(
        &mut self,
        step: usize,
        latents: &Tensor<B, 4>,
    ) -> parallel_core::Result<DenoiserInput<B>> {
        if self.snapshots.len() == step {
            self.snapshots.push(self.comm.stats());
            self.starts.push(Instant::now());
        }
        let schedule = &self.inputs.schedule;
        let batch = self.inputs.template.batch();
        let x = if batch == 2 {
            Tensor::cat(vec![latents.clone(), latents.clone()], 0)
        } else {
            latents.clone()
        };
        let t = schedule.timestep(step) as f32;
        let mut input = self.inputs.template.clone();
        input.hidden_states = schedule.scale_model_input(x, step);
        input.timestep =
            Tensor::from_data(TensorData::new(vec![t; batch], [batch]), &latents.device());
        Ok(input)
    }

    fn step(
        &mut self,
        step: usize,
        region: Range<usize>,
        noise_pred: Tensor<B, 4>,
        latents: Tensor<B, 4>,
    ) -> parallel_core::Result<Tensor<B, 4>> {
        let guided = if noise_pred.dims()[0] == 2 {
            let uncond = noise_pred.clone().narrow(0, 0, 1);
            let cond = noise_pred.narrow(0, 1, 1);
            uncond.clone() + (cond - uncond).mul_scalar(self.inputs.guidance_scale)
        } else {
            noise_pred
        };
        let eps = guided.narrow(1, 0, self.inputs.latent_channels);
        let key = (region.start, region.end);
        if !self.states.contains_key(&key) {
            // A region seen first continues the whole latent's state (PipeFusion after its
            // synchronous warmup), else starts fresh.
            let state = match self.states.get(&(0, self.height)) {
                Some(w) => w.narrow(2, region.clone()),
                None => self.inputs.schedule.new_state(),
            };
            self.states.insert(key, state);
        }
        let state = self.states.get_mut(&key).expect("inserted");
        Ok(self.inputs.schedule.step(state, step, eps, latents))
    }
}

/// Elements the formula expects over steps `0..n − 1` and what was measured there, all
/// kinds together (the last step is left out: it also carries per-request traffic).
pub fn bracketed(outcome: &RankOutcome) -> (u64, u64) {
    let n = outcome.step_comm.len().min(outcome.step_expected.len());
    let k = if n > 1 { n - 1 } else { n };
    let measured = outcome.step_comm[..k].iter().map(CommStats::total_elements).sum();
    let expected = outcome.step_expected[..k].iter().sum();
    (measured, expected)
}

/// Elements sent after the last step's formula: per-request traffic.
pub fn per_request_elements(outcome: &RankOutcome) -> i64 {
    match (outcome.step_comm.last(), outcome.step_expected.last()) {
        (Some(m), Some(e)) if outcome.step_comm.len() > 1 => m.total_elements() as i64 - *e as i64,
        _ => 0,
    }
}

/// Bytes sent per kind over the whole last request.
pub fn bytes_by_kind(outcome: &RankOutcome) -> Vec<(OpKind, u64)> {
    OpKind::ALL
        .into_iter()
        .map(|k| (k, outcome.step_comm.iter().map(|s| s.get(k).bytes).sum()))
        .filter(|(_, b)| *b > 0)
        .collect()
}

//! Running one benchmark configuration on N in-process ranks: what is timed, what is
//! counted.
//!
//! Every rank builds its strategy from the registry, validates it, loads its part of the
//! model under the strategy's load plan, and then runs `warmup + repetitions` identical
//! requests (same seed, same latents and text) through [`ParallelStrategy::denoise`](parallel_core::ParallelStrategy::denoise) with the
//! toolkit's [`Sampler`] (classifier-free guidance, DPM-Solver++ — PixArt's scheduler — one
//! state per region of rows). Per request:
//!
//! - **timed**: from a barrier of all ranks to the end of `denoise` (the final latents on
//!   every rank), the slowest rank; loading, validation and `begin_request` are not timed.
//!   The sampler stamps the start of each step (on rank 0) for per-step times.
//! - **counted**: the rank's [`CommStats`] snapshot at the start of every step (the first
//!   `model_input` call of the step), so each step's traffic is set beside
//!   [`ParallelStrategy::expected_comm`](parallel_core::ParallelStrategy::expected_comm) for that step (`StepKind::Denoise(i)`); the last step's formula
//!   includes what a request sends once at its end (PipeFusion's final broadcast).

use std::time::{Duration, Instant};

use burn::tensor::{Int, Tensor, TensorData};
use models_dit::ModelConfig;
use parallel_core::{
    CommStats, Denoiser, DenoiserInput, LaunchOptions, ModelDesc, OpKind, ParallelError, Registry,
    RequestInfo, StepKind, StrategyOptions, launch,
};
use schedulers::Schedule;

use super::model::normal_values;
use crate::CpuBackend as B;
use crate::DenoiserConfig;
use crate::sampler::{Sampler, SamplerSettings};

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
    /// Warmup steps of the strategy (which steps are steady).
    pub strategy_warmup_steps: usize,
    /// The denoiser's compute dtype.
    pub dtype: burn::tensor::DType,
    /// The link model transfers are timed by (`None`: instant).
    pub link: Option<parallel_core::LinkModel>,
    /// CFG parallelism around the strategy (1: none, 2: the guidance halves on two groups).
    pub cfg_degree: usize,
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
            text_tokens: if desc.cross_attention || desc.family == parallel_core::ModelFamily::MmDit
            {
                self.text_tokens
            } else {
                0
            },
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
    config: &DenoiserConfig,
    spec: &RunSpec,
) -> Vec<Result<RankOutcome, ParallelError>> {
    let mut options = LaunchOptions::<B>::default()
        .with_threads_per_rank(spec.threads_per_rank)
        .with_timeout(Duration::from_secs(1800));
    options.link = spec.link.clone();
    let desc = config.desc();
    // Replicated weights once per process, as a user's in-process run has them.
    let models = crate::SharedModels::<B>::new();
    launch(spec.world_size, &options, |comm| {
        let request = spec.request(&desc);
        let mut strategy = registry.create_with_cfg(
            &spec.strategy,
            comm.clone(),
            &spec.options,
            spec.cfg_degree,
        )?;
        strategy.validate(&desc, &request)?;
        let plan = strategy.load_plan(&desc)?;
        let model = models
            .get_or_load(&plan, &comm.device(), || {
                config.load_as::<B>(dir, &plan, spec.dtype, &comm.device())
            })
            .map_err(|e| ParallelError::Model(e.to_string()))?;
        let inputs = BenchInputs::new(config, spec, &comm.device());
        let mut outcome = RankOutcome {
            request_times: Vec::new(),
            step_times: Vec::new(),
            step_comm: Vec::new(),
            step_expected: Vec::new(),
            formula: strategy
                .expected_comm(&desc, &request, StepKind::Denoise(spec.steps - 1))?
                .formula,
            elem_bytes: 4,
            param_bytes: model.param_bytes(),
            buffer_bytes: 0,
            output: Tensor::zeros([1, 1, 1, 1], &comm.device()),
        };
        for run in 0..spec.warmup_runs + spec.repetitions {
            let mut sampler = inputs.sampler()?.watch(comm.clone());
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
            let starts: Vec<Instant> = sampler.step_starts().iter().flatten().copied().collect();
            let mut steps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
            if let Some(last) = starts.last() {
                steps.push(start + elapsed - *last);
            }
            if comm.rank() == 0 {
                outcome.step_times.push(steps);
            }
            let mut snaps = sampler.snapshots().to_vec();
            snaps.push(end_stats);
            outcome.step_comm = snaps.windows(2).map(|w| w[1].since(&w[0])).collect();
            outcome.elem_bytes = (data.bytes.len() / data.num_elements().max(1)) as u64;
            outcome.output = latents;
        }
        outcome.step_expected = (0..spec.steps)
            .map(|s| {
                strategy.expected_comm(&desc, &request, StepKind::Denoise(s)).map(|e| e.total())
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
    settings: SamplerSettings,
}

impl BenchInputs {
    /// Draws the inputs of `spec` for a model of `config`.
    pub fn new(config: &DenoiserConfig, spec: &RunSpec, device: &burn::tensor::Device<B>) -> Self {
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
        let mut additional_conditions = None;
        match config {
            DenoiserConfig::Unet(c) => {
                // CLIP's 77 tokens (the request's text tokens), and SDXL's pooled text and
                // size/crop conditions (the image size, no crop).
                let (t, ch) = (spec.text_tokens, c.cross_attention_dim);
                let text = normal_values(spec.seed, "text", batch * t * ch);
                template.encoder_hidden_states =
                    Some(Tensor::from_data(TensorData::new(text, [batch, t, ch]), device));
                if let Some(add) = &c.addition {
                    let n = add.text_embeds_dim();
                    let pooled = normal_values(spec.seed, "text_embeds", batch * n);
                    template.added_cond.insert(
                        "text_embeds".into(),
                        Tensor::from_data(TensorData::new(pooled, [batch, n]), device),
                    );
                    let (hp, wp) = ((h * 8) as f32, (w * 8) as f32);
                    let ids: Vec<f32> =
                        (0..batch).flat_map(|_| [hp, wp, 0.0, 0.0, hp, wp]).collect();
                    template.added_cond.insert(
                        "time_ids".into(),
                        Tensor::from_data(TensorData::new(ids, [batch, 6]), device),
                    );
                }
            }
            DenoiserConfig::Dit(ModelConfig::PixArt(c)) => {
                let (t, ch) = (spec.text_tokens, c.caption_channels.unwrap_or(desc.hidden_size));
                let text = normal_values(spec.seed, "text", batch * t * ch);
                template.encoder_hidden_states =
                    Some(Tensor::from_data(TensorData::new(text, [batch, t, ch]), device));
                template.encoder_attention_mask = Some(Tensor::ones([batch, t], device));
                if c.use_additional_conditions() {
                    additional_conditions = Some((h * 8, w * 8));
                }
            }
            DenoiserConfig::Dit(ModelConfig::SD3(c)) => {
                // The joined CLIP + T5 text (the request's text tokens) and the pooled
                // CLIP embeddings.
                let (t, ch) = (spec.text_tokens, c.joint_attention_dim);
                let text = normal_values(spec.seed, "text", batch * t * ch);
                template.encoder_hidden_states =
                    Some(Tensor::from_data(TensorData::new(text, [batch, t, ch]), device));
                let n = c.pooled_projection_dim;
                let pooled = normal_values(spec.seed, "pooled_projections", batch * n);
                template.added_cond.insert(
                    "pooled_projections".into(),
                    Tensor::from_data(TensorData::new(pooled, [batch, n]), device),
                );
            }
            DenoiserConfig::Dit(ModelConfig::Flux(c)) => {
                // T5's tokens (the request's text tokens), the pooled CLIP-L embedding and
                // FLUX.1-dev's guidance 3.5.
                let (t, ch) = (spec.text_tokens, c.joint_attention_dim);
                let text = normal_values(spec.seed, "text", batch * t * ch);
                template.encoder_hidden_states =
                    Some(Tensor::from_data(TensorData::new(text, [batch, t, ch]), device));
                let n = c.pooled_projection_dim;
                let pooled = normal_values(spec.seed, "pooled_projections", batch * n);
                template.added_cond.insert(
                    "pooled_projections".into(),
                    Tensor::from_data(TensorData::new(pooled, [batch, n]), device),
                );
                if c.guidance_embeds {
                    template.added_cond.insert(
                        "guidance".into(),
                        Tensor::from_data(TensorData::new(vec![3.5f32; batch], [batch, 1]), device),
                    );
                }
            }
            DenoiserConfig::Dit(ModelConfig::DiT(c)) => {
                // Guidance pairs the null class (unconditional) with class 207.
                let null = c.num_classes() as i64;
                let labels: Vec<i64> =
                    if batch == 2 { vec![null, 207 % null] } else { vec![207 % null] };
                template.class_labels =
                    Some(Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [batch]), device));
            }
        }
        let settings = SamplerSettings {
            guidance_scale: spec.guidance_scale,
            images: 1,
            latent_channels: desc.in_channels,
            out_channels: desc.out_channels,
            additional_conditions,
        };
        BenchInputs { latents, template, schedule, settings }
    }

    /// The sampler of one request (PixArt's pipeline around each transformer call: guidance,
    /// the epsilon half of a learned-sigma output, DPM-Solver++ per region of rows).
    pub fn sampler(&self) -> Result<Sampler<B>, ParallelError> {
        Sampler::with_conditioning(
            self.schedule.clone(),
            self.settings.clone(),
            self.template.clone(),
        )
    }
}

/// Elements measured and expected by the formula over every step of the last request, all
/// kinds together.
pub fn totals(outcome: &RankOutcome) -> (u64, u64) {
    let measured = outcome.step_comm.iter().map(CommStats::total_elements).sum();
    (measured, outcome.step_expected.iter().sum())
}

/// Bytes sent per kind over the whole last request.
pub fn bytes_by_kind(outcome: &RankOutcome) -> Vec<(OpKind, u64)> {
    OpKind::ALL
        .into_iter()
        .map(|k| (k, outcome.step_comm.iter().map(|s| s.get(k).bytes).sum()))
        .filter(|(_, b)| *b > 0)
        .collect()
}

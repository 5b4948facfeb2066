//! `harness run`: a prompt in, an image out, on one rank or N ranks with any strategy.
//!
//! [`RunPlan::new`] does every check that needs no weights, on the calling thread, so that a
//! bad setting fails at once: the config, the pipeline folder, the strategy name and its
//! options, the image size, the scheduler, the initial latents. [`RunPlan::execute`] then
//! launches the ranks; each rank:
//!
//! 1. builds its strategy from the [registry](crate::registry) and `validate`s it against the
//!    transformer's [`ModelDesc`] and the request — before any weight is read;
//! 2. loads the transformer under the strategy's `load_plan` (a tensor-parallel rank reads
//!    only its slices, a pipeline stage only its blocks);
//! 3. rank 0 loads the VAE (so a broken VAE fails before the denoising, not after it),
//!    tokenizes and T5-encodes the prompts, drops the encoder, and **broadcasts** the
//!    embeddings and mask. One rank encodes because a real T5-XXL is ~19 GB in float32: one
//!    copy per rank would multiply that by the world size, for a tensor of a few hundred KB
//!    that a broadcast moves in microseconds; and the broadcast is what works unchanged when
//!    ranks are processes on other hosts;
//! 4. builds identical initial latents from the host values of the plan (seeded noise or
//!    `--latents`), times `init_noise_sigma`;
//! 5. `begin_request`, resets the communication counters (the text broadcast is not the
//!    strategy's traffic), and runs `strategy.denoise` with a [`Sampler`], which drives the
//!    progress bar on rank 0;
//! 6. rank 0 decodes with the VAE and writes the PNG (and the final latents if asked); with
//!    `vae_parallel` every rank decodes a band of rows (exact seams) and sends it to rank 0.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parallel_core::{
    Comm, CommStats, ExpectedComm, LatentGrid, ModelDesc, RequestInfo, StrategyOptions,
};
use schedulers::Schedule;

use crate::config::{BackendKind, RunConfig};
use crate::error::{HarnessError, Result};
use crate::launch::{launch_options, launch_ranks};
use crate::pipeline::{PipelineFolder, PipelineKind, PromptEmbeds};
use crate::sampler::{Sampler, SamplerSettings};
use crate::shared::SharedModels;

/// How a run reports and what it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    /// Decode the final latents with the VAE and write the PNG (`false`: latents only, as a
    /// benchmark of the denoising wants).
    pub decode: bool,
    /// Show a progress bar on rank 0 (drawn on stderr, only when it is a terminal).
    pub progress: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { decode: true, progress: true }
    }
}

/// A host copy of a tensor: its shape and row-major values.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// The shape.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub values: Vec<f32>,
}

impl HostTensor {
    /// The host copy of `t`.
    pub fn from_tensor<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Self> {
        let shape = t.dims().to_vec();
        let values = t.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| {
            HarnessError::Parallel(parallel_core::ParallelError::Model(format!(
                "cannot read a tensor back to the host: {e:?}"
            )))
        })?;
        Ok(HostTensor { shape, values })
    }

    /// This tensor on `device`.
    pub fn to_tensor<B: Backend, const D: usize>(&self, device: &B::Device) -> Tensor<B, D> {
        Tensor::from_data(TensorData::new(self.values.clone(), self.shape.clone()), device)
    }

    /// `max|self − reference| / max|reference|` ([`metrics::compare`]).
    pub fn max_rel_error(&self, reference: &[f32]) -> f64 {
        metrics::compare(&self.values, reference).max_rel
    }

    /// `‖self − reference‖₂ / ‖reference‖₂` ([`metrics::compare`]).
    pub fn rel_l2_error(&self, reference: &[f32]) -> f64 {
        metrics::compare(&self.values, reference).rel_l2
    }
}

/// What one rank reports.
#[derive(Debug, Clone, PartialEq)]
pub struct RankReport {
    /// The rank.
    pub rank: usize,
    /// What it sent during the denoising (see [`CommStats`] for the rule).
    pub comm: CommStats,
    /// Bytes of the transformer parameters it holds.
    pub param_bytes: u64,
    /// Bytes of its strategy's buffers after the request.
    pub buffer_bytes: u64,
    /// The elements the strategy's formula expects this rank to send over the request
    /// (every step's, summed).
    pub expected: ExpectedComm,
}

/// The result of [`run`].
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The strategy's registered name (`cfg2×name` with CFG parallelism).
    pub strategy: String,
    /// Ranks.
    pub world_size: usize,
    /// The backend.
    pub backend: BackendKind,
    /// Threads of each rank's pool.
    pub threads_per_rank: usize,
    /// The scheduler's diffusers class.
    pub scheduler: String,
    /// Image height and width in pixels.
    pub image_size: (usize, usize),
    /// The request as the strategy saw it.
    pub request: RequestInfo,
    /// What the strategies validated against.
    pub model: ModelDesc,
    /// The final latents, `[1, channels, height / 8, width / 8]`.
    pub latents: HostTensor,
    /// The PNG written, if any (replica 0's with data parallelism).
    pub image: Option<PathBuf>,
    /// Every replica's PNG, in replica order (data parallelism; else `image` alone).
    pub images: Vec<PathBuf>,
    /// Data-parallel replicas (each generated its own image).
    pub replicas: usize,
    /// The decoded image (rank 0's), when the run decoded.
    pub decoded: Option<models_vae::RgbImage>,
    /// The latents file written, if any.
    pub saved_latents: Option<PathBuf>,
    /// Wall time of each denoising step on rank 0 (from the first `model_input` call of one
    /// step to that of the next; pipelined strategies overlap steps, so these are
    /// approximate there — their sum is exact).
    pub step_times: Vec<Duration>,
    /// Wall time of the whole denoising loop on rank 0.
    pub denoise_time: Duration,
    /// Wall time of rank 0 from launch to the start of the denoising (weights, text).
    pub setup_time: Duration,
    /// Wall time of the VAE decode and PNG on rank 0.
    pub decode_time: Duration,
    /// Wall time of the whole run, planning included.
    pub total_time: Duration,
    /// Every rank's counters, by rank.
    pub ranks: Vec<RankReport>,
}

impl RunReport {
    /// Denoising steps per second.
    pub fn steps_per_second(&self) -> f64 {
        self.request.steps as f64 / self.denoise_time.as_secs_f64().max(1e-9)
    }

    /// The one-line summary `harness run` prints.
    pub fn summary(&self) -> String {
        let (h, w) = self.image_size;
        let target = match (&self.image, &self.saved_latents) {
            (Some(_), _) if self.images.len() > 1 => {
                // A folder and a count, not every file of a batch.
                let dirs: std::collections::BTreeSet<&std::path::Path> =
                    self.images.iter().filter_map(|p| p.parent()).collect();
                let place = match (dirs.len(), self.images.first(), self.images.last()) {
                    (1, _, _) => {
                        let d = dirs.first().map(|d| d.display().to_string()).unwrap_or_default();
                        format!(" in {}", if d.is_empty() { ".".into() } else { d })
                    }
                    (_, Some(a), Some(b)) => format!(": {} … {}", a.display(), b.display()),
                    _ => String::new(),
                };
                let replicas = if self.replicas > 1 {
                    format!(" ({} data-parallel replicas)", self.replicas)
                } else {
                    String::new()
                };
                format!(" → {} images{replicas}{place}", self.images.len())
            }
            (Some(p), _) => format!(" → {}", p.display()),
            (None, Some(p)) => format!(" → {}", p.display()),
            (None, None) => String::new(),
        };
        format!(
            "{h}×{w}, {} steps in {:.2} s ({:.2} steps/s; {:.2} s total), strategy {} on {} \
             rank{} ({}, {} thread{} each){target}",
            self.request.steps,
            self.denoise_time.as_secs_f64(),
            self.steps_per_second(),
            self.total_time.as_secs_f64(),
            self.strategy,
            self.world_size,
            if self.world_size == 1 { "" } else { "s" },
            self.backend,
            self.threads_per_rank,
            if self.threads_per_rank == 1 { "" } else { "s" },
        )
    }
}

/// A run checked and resolved on the calling thread, ready to [`execute`](RunPlan::execute).
#[derive(Debug, Clone)]
pub struct RunPlan {
    /// The settings (paths as given, flags applied).
    pub config: RunConfig,
    /// The pipeline folder.
    pub folder: PipelineFolder,
    /// The strategy options, checked against the strategy's declared keys.
    pub strategy_options: StrategyOptions,
    /// The schedule of the request.
    pub schedule: Schedule,
    /// What the sampler needs.
    pub settings: SamplerSettings,
    /// Every image of the run, in order ([`crate::batch`]).
    pub requests: Vec<crate::batch::Request>,
    /// The request as strategies see it.
    pub request: RequestInfo,
    /// Image height and width in pixels.
    pub image_size: (usize, usize),
    /// Text tokens per prompt.
    pub max_sequence_length: usize,
    /// Initial latents before `init_noise_sigma`: seeded noise or the `--latents` tensor.
    pub initial: HostTensor,
    /// FLUX.1-dev's guidance scale, given to the transformer as its `guidance` input (the
    /// request then has no CFG batch); `None` for every other model.
    pub embedded_guidance: Option<f64>,
}

impl RunPlan {
    /// Checks everything that needs no weights; see the [module docs](self).
    ///
    /// # Errors
    /// Each names the setting, file or tensor at fault.
    pub fn new(config: &RunConfig) -> Result<Self> {
        config.check()?;
        let registry = crate::registry::<crate::CpuBackend>();
        let strategy_options = config.parallel.strategy_options()?;
        registry.check_options(&config.parallel.strategy, &strategy_options)?;
        let folder = PipelineFolder::open(&config.model)?;
        let desc = folder.denoiser_config.desc();
        let default = folder.default_image_size();
        let height = config.height.unwrap_or(default);
        let width = config.width.unwrap_or(default);
        let unit = folder.vae_scale_factor() * desc.patch_size;
        for (key, v) in [("height", height), ("width", width)] {
            if v == 0 || !v.is_multiple_of(unit) {
                return Err(HarnessError::config(
                    key,
                    format!(
                        "{v} px is not a positive multiple of {unit} (the VAE's {}× up-sampling \
                         × the denoiser's patch size {}); try {}",
                        folder.vae_scale_factor(),
                        desc.patch_size,
                        (v / unit).max(1) * unit
                    ),
                ));
            }
        }
        let scale = folder.vae_scale_factor();
        let grid = LatentGrid { height: height / scale, width: width / scale };
        let n = config.parallel.replica_size();
        if config.parallel.dp_degree > 1 && config.latents.is_some() {
            return Err(HarnessError::config(
                "parallel.dp_degree (--dp-degree)",
                format!(
                    "--latents gives one initial noise, so the {} replicas would all draw the \
                     same image; drop --latents (replica r starts from seed + r) or use \
                     --dp-degree 1",
                    config.parallel.dp_degree
                ),
            ));
        }
        if config.parallel.vae_parallel && grid.height < n {
            return Err(HarnessError::config(
                "parallel.vae_parallel",
                format!(
                    "a {height} px image is {} latent rows, fewer than the {n} ranks its decode \
                     would be split over; use a taller image or fewer ranks",
                    grid.height
                ),
            ));
        }
        let scheduler = folder.scheduler(config.scheduler.as_deref())?;
        let schedule = if scheduler.uses_dynamic_shifting() {
            // FLUX: the shift follows the image's packed tokens (2×2 latent pixels each).
            let tokens = (grid.height / 2) * (grid.width / 2);
            let mu = schedulers::flux_mu(scheduler.config(), tokens);
            scheduler.set_timesteps_dynamic(config.steps, mu)?
        } else {
            scheduler.set_timesteps(config.steps)?
        };
        let flux = folder.class.kind == PipelineKind::Flux;
        let max_sequence_length = match (folder.class.kind, config.max_sequence_length) {
            (PipelineKind::PixArt | PipelineKind::StableDiffusion3 | PipelineKind::Flux, n) => {
                n.unwrap_or(folder.default_max_sequence_length())
            }
            (_, None) => folder.default_max_sequence_length(),
            (_, Some(_)) => {
                return Err(HarnessError::config(
                    "max_sequence_length",
                    format!(
                        "applies to the PixArt, SD3 and FLUX pipelines (T5's tokens); a {} \
                         takes its CLIP tokenizer's length (77)",
                        folder.class.name
                    ),
                ));
            }
        };
        if max_sequence_length == 0 {
            return Err(HarnessError::config("max_sequence_length", "must be at least 1"));
        }
        let guidance_scale = config.guidance_scale.unwrap_or(folder.class.guidance_scale);
        // FLUX.1-dev embeds its guidance (the transformer's `guidance` input), no CFG batch;
        // schnell has none.
        let embedded_guidance = match &folder.denoiser_config {
            crate::model::DenoiserConfig::Dit(models_dit::ModelConfig::Flux(c))
                if c.guidance_embeds =>
            {
                Some(guidance_scale)
            }
            _ => None,
        };
        let settings = SamplerSettings {
            guidance_scale: if flux { 1.0 } else { guidance_scale },
            images: 1,
            latent_channels: desc.in_channels,
            out_channels: desc.out_channels,
            additional_conditions: folder.uses_additional_conditions().then_some((height, width)),
        };
        if config.parallel.cfg_degree == 2 && !settings.guidance() {
            return Err(HarnessError::config(
                "parallel.cfg_degree (--cfg-degree)",
                format!(
                    "2 splits the guidance batch [negative, positive] over two rank groups, but \
                     guidance is off (guidance scale {} ≤ 1: one evaluation per step); set \
                     --guidance-scale above 1 or use --cfg-degree 1",
                    settings.guidance_scale
                ),
            ));
        }
        let request = RequestInfo {
            steps: schedule.len(),
            grid,
            batch: settings.batch(),
            images: settings.images,
            // SD3's joint text: CLIP's 77 tokens, then T5's.
            text_tokens: match folder.class.kind {
                PipelineKind::StableDiffusion3 => {
                    models_text::CLIP_MAX_LENGTH + max_sequence_length
                }
                _ => max_sequence_length,
            },
        };
        let shape = vec![1, desc.in_channels, grid.height, grid.width];
        let initial = match &config.latents {
            Some(path) => read_latents(path, &shape)?,
            None => HostTensor {
                values: crate::noise::gaussian(config.seed, shape.iter().product()),
                shape,
            },
        };
        let requests = crate::batch::requests(config)?;
        let dp = config.parallel.dp_degree.max(1);
        if requests.len() < dp {
            return Err(HarnessError::config(
                "parallel.dp_degree (--dp-degree)",
                format!(
                    "{dp} replicas but the run draws {} image(s): every replica needs one; use \
                     more images (--images-per-prompt, --prompts) or fewer replicas",
                    requests.len()
                ),
            ));
        }
        let mut dirs: Vec<PathBuf> = requests
            .iter()
            .flat_map(|r| [r.output.as_ref(), r.save_latents.as_ref()])
            .flatten()
            .filter_map(|p| p.parent().map(|d| d.to_path_buf()))
            .collect();
        dirs.extend(config.output_dir.clone().filter(|_| config.prompts.is_some()));
        dirs.sort();
        dirs.dedup();
        for dir in dirs.iter().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                HarnessError::io(dir, format!("cannot create the output folder: {e}"))
            })?;
        }
        Ok(RunPlan {
            config: config.clone(),
            folder,
            strategy_options,
            schedule,
            settings,
            request,
            image_size: (height, width),
            max_sequence_length,
            initial,
            requests,
            embedded_guidance,
        })
    }

    /// Runs the plan on backend `B`, rank `r` on `devices[r % len]` (empty: the default
    /// device).
    pub fn execute<B: Backend>(
        &self,
        options: &RunOptions,
        devices: Vec<B::Device>,
    ) -> Result<RunReport> {
        let start = Instant::now();
        let parallel = &self.config.parallel;
        let launch = launch_options::<B>(parallel, devices)?;
        let threads = launch.threads_per_rank.unwrap_or(1);
        let models = SharedModels::<B>::new();
        let dp = parallel.dp_degree;
        let outputs = launch_ranks(parallel, &launch, |comm| {
            if dp == 1 {
                return rank_main::<B>(comm, self, options, &models, start, 0);
            }
            // Replicas are the outermost axis: ranks r·m .. (r+1)·m form replica r.
            let mesh = parallel_core::Mesh::new(
                comm.size(),
                &[(parallel_core::Axis::Data, dp), (parallel_core::Axis::Tensor, comm.size() / dp)],
            )?;
            let replica = mesh.coord(comm.rank(), parallel_core::Axis::Data);
            let group = comm.split(&mesh, &[parallel_core::Axis::Tensor])?;
            let mut out = rank_main::<B>(group, self, options, &models, start, replica)?;
            if parallel.process.is_some() {
                // One rank per process: world rank 0 writes every replica's metadata.
                out.written = gather_written(&comm, &out.written)?;
            }
            Ok(out)
        })?;
        drop(models);
        let mut ranks = Vec::with_capacity(outputs.len());
        let mut first = None;
        let mut written = Vec::new();
        for out in outputs {
            ranks.push(out.report);
            written.extend(out.written);
            if let Some(r0) = out.rank0
                && first.is_none()
            {
                first = Some(r0);
            }
        }
        written.sort_by_key(|w| w.index);
        let images: Vec<PathBuf> = written.iter().filter_map(|w| w.image.clone()).collect();
        if let Some(dir) = &self.config.output_dir
            && self.config.prompts.is_some()
        {
            self.write_metadata(dir, &written)?;
        }
        let r0 = first.ok_or_else(|| {
            HarnessError::Parallel(parallel_core::ParallelError::Model(
                "rank 0 returned no result".into(),
            ))
        })?;
        let desc = self.folder.denoiser_config.desc();
        let strategy = if parallel.cfg_degree == 2 {
            format!("cfg2×{}", parallel.strategy)
        } else {
            parallel.strategy.clone()
        };
        Ok(RunReport {
            strategy,
            world_size: parallel.world_size,
            backend: parallel.backend,
            threads_per_rank: threads,
            scheduler: self.schedule.class_name().to_string(),
            image_size: self.image_size,
            request: self.request.clone(),
            model: desc,
            latents: r0.latents,
            image: r0.image,
            images,
            replicas: dp,
            decoded: r0.decoded,
            saved_latents: r0.saved_latents,
            step_times: r0.step_times,
            denoise_time: r0.denoise_time,
            setup_time: r0.setup_time,
            decode_time: r0.decode_time,
            total_time: start.elapsed(),
            ranks,
        })
    }
}

impl RunPlan {
    /// `DIR/metadata.jsonl`: one line per image, in index order.
    fn write_metadata(&self, dir: &std::path::Path, written: &[Written]) -> Result<()> {
        let p = &self.config.parallel;
        let mut text = String::new();
        for w in written {
            let r = &self.requests[w.index];
            let line = serde_json::json!({
                "index": r.index,
                "file": w.image.as_ref().and_then(|p| p.file_name()).map(|f| f.to_string_lossy().to_string()),
                "prompt": r.prompt,
                "negative_prompt": r.negative_prompt,
                "seed": r.seed,
                "strategy": p.strategy,
                "world_size": p.world_size,
                "cfg_degree": p.cfg_degree,
                "dp_degree": p.dp_degree,
                "steps": self.request.steps,
                "scheduler": self.schedule.class_name(),
                "guidance_scale": self.settings.guidance_scale,
                "size": [self.image_size.0, self.image_size.1],
                "seconds": w.seconds,
                "rss_mib": (w.rss_bytes as f64 / (1u64 << 20) as f64 * 10.0).round() / 10.0,
            });
            text.push_str(&line.to_string());
            text.push('\n');
        }
        let path = dir.join("metadata.jsonl");
        std::fs::write(&path, text).map_err(|e| HarnessError::io(&path, e.to_string()))
    }
}

/// Reads tensor `latents` of a safetensors file and checks its shape.
fn read_latents(path: &std::path::Path, shape: &[usize]) -> Result<HostTensor> {
    if !path.is_file() {
        return Err(HarnessError::config(
            format!("--latents {}", path.display()),
            "no such file (a safetensors file with tensor `latents`)",
        ));
    }
    let mut tensors = weights::read_tensors(path)?;
    let Some(t) = tensors.remove("latents") else {
        let names: Vec<String> = tensors.keys().cloned().collect();
        return Err(HarnessError::config(
            format!("--latents {}", path.display()),
            format!(
                "no tensor named `latents` (the file has: {})",
                if names.is_empty() { "nothing".into() } else { names.join(", ") }
            ),
        ));
    };
    if t.shape != shape {
        return Err(HarnessError::config(
            format!("--latents {}", path.display()),
            format!(
                "tensor `latents` has shape {:?}, this request needs {shape:?} \
                 ([1, latent channels, height / 8, width / 8])",
                t.shape
            ),
        ));
    }
    if let Some(i) = t.values.iter().position(|v| !v.is_finite()) {
        return Err(HarnessError::config(
            format!("--latents {}", path.display()),
            format!("tensor `latents` has a non-finite value at index {i}"),
        ));
    }
    Ok(HostTensor { shape: t.shape, values: t.values.iter().map(|&v| v as f32).collect() })
}

struct Rank0 {
    latents: HostTensor,
    image: Option<PathBuf>,
    decoded: Option<models_vae::RgbImage>,
    saved_latents: Option<PathBuf>,
    step_times: Vec<Duration>,
    denoise_time: Duration,
    setup_time: Duration,
    decode_time: Duration,
}

/// What one request wrote, for the batch's `metadata.jsonl`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Written {
    index: usize,
    image: Option<PathBuf>,
    seconds: f64,
    /// The process's resident memory after the request (every rank's, in-process).
    rss_bytes: u64,
}

/// Every rank's [`Written`] records, on world rank 0 (empty elsewhere): in a multi-process
/// world each replica's rank 0 holds its own, and they travel as JSON bytes (one `f32` per
/// byte, exact) through two all-gathers, lengths first.
fn gather_written<B: Backend>(comm: &Comm<B>, mine: &[Written]) -> Result<Vec<Written>> {
    let bytes = serde_json::to_vec(mine).map_err(|e| {
        HarnessError::Parallel(parallel_core::ParallelError::Model(format!(
            "metadata of rank {}: {e}",
            comm.rank()
        )))
    })?;
    let device = comm.device();
    let len = Tensor::<B, 1>::from_data(TensorData::new(vec![bytes.len() as f32], [1]), &device);
    let lens: Vec<f32> = comm.all_gather(len, 0)?.into_data().to_vec().unwrap_or_default();
    let values: Vec<f32> = bytes.iter().map(|&b| f32::from(b)).collect();
    let n = values.len();
    let all =
        comm.all_gather(Tensor::<B, 1>::from_data(TensorData::new(values, [n]), &device), 0)?;
    if comm.rank() != 0 {
        return Ok(Vec::new());
    }
    let all: Vec<f32> = all.into_data().to_vec().unwrap_or_default();
    let mut out = Vec::new();
    let mut at = 0;
    for (rank, &l) in lens.iter().enumerate() {
        let l = l as usize;
        let text: Vec<u8> =
            all.get(at..at + l).unwrap_or_default().iter().map(|&v| v as u8).collect();
        at += l;
        let part: Vec<Written> = serde_json::from_slice(&text).map_err(|e| {
            HarnessError::Parallel(parallel_core::ParallelError::Model(format!(
                "metadata from rank {rank} does not decode: {e}"
            )))
        })?;
        out.extend(part);
    }
    Ok(out)
}

struct RankOutput {
    report: RankReport,
    /// The first request's result (on a replica's rank 0).
    rank0: Option<Rank0>,
    /// Every request this replica's rank 0 wrote.
    written: Vec<Written>,
}

/// The flow of one rank; see the [module docs](self). `comm` is this rank's replica (the
/// world without data parallelism); the replica serves every `dp_degree`-th request.
fn rank_main<B: Backend>(
    comm: Comm<B>,
    plan: &RunPlan,
    options: &RunOptions,
    models: &SharedModels<B>,
    start: Instant,
    replica: usize,
) -> Result<RankOutput> {
    let rank = comm.rank();
    let device = comm.device();
    let cfg = &plan.config;
    let desc = plan.folder.denoiser_config.desc();
    let registry = crate::registry::<B>();
    let mut strategy =
        cfg.parallel.create_strategy(&registry, comm.clone(), &plan.strategy_options)?;
    strategy.validate(&desc, &plan.request)?;
    let load_plan = strategy.load_plan(&desc)?;
    let model = models.get_or_load(&load_plan, &device, || {
        let dtype = cfg.parallel.dtype.dtype();
        plan.folder.load_denoiser_as::<B>(&load_plan, dtype, &device)
    })?;

    // A split decode needs the VAE on every rank.
    let vae_parallel = options.decode && cfg.parallel.vae_parallel && comm.size() > 1;
    let (encoder, vae) = if rank == 0 {
        let vae = if options.decode { Some(plan.folder.load_vae::<B>(&device)?) } else { None };
        (Some(plan.folder.load_text::<B>(plan.max_sequence_length, &device)?), vae)
    } else if vae_parallel {
        (None, Some(plan.folder.load_vae::<B>(&device)?))
    } else {
        (None, None)
    };

    let dp = cfg.parallel.dp_degree.max(1);
    let mine: Vec<&crate::batch::Request> =
        plan.requests.iter().filter(|r| r.index % dp == replica).collect();
    let single = plan.requests.len() == 1;
    let shows = rank == 0 && replica == 0 && options.progress;
    let images_bar = (shows && !single).then(|| images_bar(mine.len(), dp));
    let mut first: Option<(RankReport, Option<Rank0>)> = None;
    let mut written = Vec::new();
    for request in mine {
        let t_request = Instant::now();
        let text = match &encoder {
            Some(encoder) => Some(encoder.encode(
                &request.prompt,
                request.negative_prompt.as_deref(),
                plan.settings.guidance(),
                plan.image_size,
            )?),
            None => None,
        };
        let mut text = share_text(&comm, text)?;
        if let Some(g) = plan.embedded_guidance {
            let g = Tensor::from_data(TensorData::new(vec![g as f32], [1, 1]), &device);
            text.added_cond.insert("guidance".into(), g);
        }
        let mut sampler =
            Sampler::new(plan.schedule.clone(), plan.settings.clone(), Some(text), &device)?
                .watch(comm.clone());
        if plan.folder.class.kind == PipelineKind::Flux {
            sampler = sampler.with_timestep_divisor(1000.0);
        }
        if shows && single {
            sampler = sampler.with_progress(progress_bar(plan.schedule.len()));
        }
        let initial = if cfg.latents.is_some() {
            // Only a one-image run takes --latents (the plan refuses it otherwise).
            plan.initial.to_tensor::<B, 4>(&device)
        } else {
            let shape = plan.initial.shape.clone();
            HostTensor {
                values: crate::noise::gaussian(request.seed, shape.iter().product()),
                shape,
            }
            .to_tensor::<B, 4>(&device)
        };
        let latents = sampler.initial_latents(initial);

        // A fresh state for every request: one request never reads another's.
        strategy.begin_request(&desc, &plan.request)?;
        comm.reset_stats();
        let setup_time = start.elapsed();
        let t0 = Instant::now();
        let latents = strategy.denoise(&model, &mut sampler, latents)?;
        let denoise_time = t0.elapsed();
        let report = RankReport {
            rank: comm.world_rank(),
            comm: comm.stats(),
            param_bytes: parallel_core::Denoiser::param_bytes(&model),
            buffer_bytes: strategy.buffer_bytes(),
            expected: strategy.expected_request_comm(&desc, &plan.request)?,
        };
        let t1 = Instant::now();
        let split_sample = match (&vae, vae_parallel) {
            (Some(vae), true) => decode_split(&comm, vae, &latents)?,
            _ => None,
        };
        if rank != 0 {
            first.get_or_insert((report, None));
            continue;
        }
        let end = t0 + denoise_time;
        let starts: Vec<Instant> = sampler.step_starts().iter().map(|s| s.unwrap_or(end)).collect();
        let step_times = (0..starts.len())
            .map(|i| starts.get(i + 1).copied().unwrap_or(end).saturating_duration_since(starts[i]))
            .collect();
        if let Some(bar) = sampler.progress() {
            bar.finish_and_clear();
        }
        let mut saved_latents = None;
        if let Some(path) = &request.save_latents {
            weights::write_tensors(path, &[("latents", latents.clone())])?;
            saved_latents = Some(path.clone());
        }
        let (mut image, mut decoded) = (None, None);
        if let Some(vae) = &vae {
            let sample = match split_sample {
                Some(sample) => sample,
                None => vae.decode_latents(latents.clone())?,
            };
            let rgb = models_vae::to_image(sample)?;
            if let Some(path) = &request.output {
                models_vae::save_png(&rgb, path)?;
                image = Some(path.clone());
            }
            decoded = Some(rgb);
        }
        let decode_time = t1.elapsed();
        written.push(Written {
            index: request.index,
            image: image.clone(),
            seconds: t_request.elapsed().as_secs_f64(),
            rss_bytes: crate::bench::resident_bytes(),
        });
        if let Some(bar) = &images_bar {
            bar.inc(1);
        }
        if first.is_none() {
            let r0 = Rank0 {
                latents: HostTensor::from_tensor(latents)?,
                image,
                decoded,
                saved_latents,
                step_times,
                denoise_time,
                setup_time,
                decode_time,
            };
            first = Some((report, Some(r0)));
        }
    }
    drop(encoder);
    if let Some(bar) = images_bar {
        bar.finish_and_clear();
    }
    let (report, rank0) = first.ok_or_else(|| {
        HarnessError::config(
            "parallel.dp_degree (--dp-degree)",
            format!(
                "replica {replica} has no image to draw: the run draws {} image(s) for {dp} \
                 replicas; draw at least as many images as replicas",
                plan.requests.len()
            ),
        )
    })?;
    Ok(RankOutput { report, rank0, written })
}

/// The images bar of batch generation on rank 0 of replica 0, on stderr.
fn images_bar(images: usize, replicas: usize) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(images as u64), ProgressDrawTarget::stderr());
    let template = if replicas > 1 {
        format!(
            "{{spinner}} images of replica 0 (of {replicas}) [{{bar:32}}] {{pos}}/{{len}}, {{elapsed}} elapsed, eta {{eta}}"
        )
    } else {
        "{spinner} images [{bar:32}] {pos}/{len}, {elapsed} elapsed, eta {eta}".to_string()
    };
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Replica `r`'s file of `path` with `dp` replicas: `path` itself for one, else
/// `STEM-r.EXT` (`out/demo.png` → `out/demo-0.png`, `out/demo-1.png`, …).
pub fn replica_path(path: &std::path::Path, r: usize, dp: usize) -> PathBuf {
    if dp <= 1 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{r}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{r}"),
    };
    path.with_file_name(name)
}

/// The decode split by latent rows over every rank ([`models_vae::banded`], exact seams),
/// the bands sent to rank 0: `Some(image)` there, `None` elsewhere.
fn decode_split<B: Backend>(
    comm: &Comm<B>,
    vae: &models_vae::AutoencoderKL<B>,
    latents: &Tensor<B, 4>,
) -> Result<Option<Tensor<B, 4>>> {
    let z = vae.unscale_latents(latents.clone());
    let height = z.dims()[2];
    let bands = parallel_core::split::balanced(height, comm.size());
    let mut seams = parallel_core::split::ExactRows::new(comm, bands.clone(), height, "vae")?;
    let mine = vae.decode_rows(z, bands[comm.rank()].clone(), &mut seams)?;
    let tag = parallel_core::Tag::new("vae-image");
    if comm.rank() != 0 {
        comm.send(mine, 0, tag)?;
        return Ok(None);
    }
    let mut parts = vec![mine];
    for src in 1..comm.size() {
        parts.push(comm.recv(src, tag)?);
    }
    Ok(Some(Tensor::cat(parts, 2)))
}

/// The progress bar of rank 0, on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(steps: usize) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} denoising [{bar:32}] {pos}/{len} steps, {elapsed} elapsed, eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Rank 0's prompt embeddings on every rank. First a header the other ranks cannot know:
/// the embeddings' shape, whether there is a mask, and the width of each added condition
/// (in name order; 0 when absent); then the tensors.
fn share_text<B: Backend>(
    comm: &Comm<B>,
    text: Option<PromptEmbeds<B>>,
) -> Result<PromptEmbeds<B>> {
    /// The added conditions a pipeline may carry, in a fixed order.
    const ADDED: [&str; 3] = ["text_embeds", "time_ids", "pooled_projections"];
    if comm.size() == 1 {
        return text.ok_or_else(|| HarnessError::config("prompt", "rank 0 encoded no text"));
    }
    let device = comm.device();
    let header: Tensor<B, 1> = match &text {
        Some(t) => {
            let d = t.embeds.dims();
            let mut h = vec![d[0] as f32, d[1] as f32, d[2] as f32, t.mask.is_some() as u8 as f32];
            h.extend(
                ADDED.iter().map(|k| t.added_cond.get(*k).map_or(0.0, |v| v.dims()[1] as f32)),
            );
            Tensor::from_data(TensorData::new(h, [4 + ADDED.len()]), &device)
        }
        None => Tensor::zeros([4 + ADDED.len()], &device),
    };
    let h = HostTensor::from_tensor(comm.broadcast(header, 0)?)?.values;
    let [b, l, d] = [h[0] as usize, h[1] as usize, h[2] as usize];
    let (embeds, mask, mut added) = match text {
        Some(t) => (t.embeds, t.mask, t.added_cond),
        None => (Tensor::zeros([b, l, d], &device), None, Default::default()),
    };
    let embeds = comm.broadcast(embeds, 0)?;
    let mask = if h[3] > 0.0 {
        Some(comm.broadcast(mask.unwrap_or_else(|| Tensor::zeros([b, l], &device)), 0)?)
    } else {
        None
    };
    let mut added_cond = std::collections::BTreeMap::new();
    for (i, key) in ADDED.iter().enumerate() {
        let width = h[4 + i] as usize;
        if width > 0 {
            let t = added.remove(*key).unwrap_or_else(|| Tensor::zeros([b, width], &device));
            added_cond.insert(key.to_string(), comm.broadcast(t, 0)?);
        }
    }
    Ok(PromptEmbeds { embeds, mask, added_cond })
}

/// Runs `config` on the backend it names; see the [module docs](self).
pub fn run(config: &RunConfig) -> Result<RunReport> {
    run_with_options(config, &RunOptions::default())
}

/// [`run`] with explicit [`RunOptions`].
pub fn run_with_options(config: &RunConfig, options: &RunOptions) -> Result<RunReport> {
    let plan = RunPlan::new(config)?;
    match config.parallel.backend {
        BackendKind::Cpu => plan.execute::<crate::CpuBackend>(options, Vec::new()),
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                let devices = crate::devices::cuda_devices(&config.parallel)?.into_iter().collect();
                plan.execute::<crate::CudaBackend>(options, devices)
            }
            #[cfg(not(feature = "cuda"))]
            {
                Err(crate::error::no_cuda())
            }
        }
    }
}

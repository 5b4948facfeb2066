//! The library's front door: a PixArt pipeline folder, a strategy by value, a prompt in, an
//! image out — the few lines a program using this toolkit writes (`examples/astronaut.rs`).
//!
//! ```no_run
//! use strategy_pipefusion::PipeFusionConfig;
//!
//! # fn main() -> Result<(), harness::HarnessError> {
//! let pipe = harness::PixArtPipeline::from_folder("fixtures/pipeline/pixart-alpha-tiny")?
//!     .with_strategy(&PipeFusionConfig::default().with_num_pipeline_patch(2), 2);
//! let out = pipe.generate(&harness::Prompt::new("An astronaut riding a green horse").seed(42))?;
//! out.save("astronaut.png")?;
//! # Ok(()) }
//! ```
//!
//! Each [`generate`](PixArtPipeline::generate) is one request of [`run`](crate::run): it
//! checks everything on the calling thread first, launches the ranks (threads on the CPU, one
//! GPU each with `--features cuda` and [`BackendKind::Cuda`]), loads the weights each rank
//! needs under its strategy's plan, denoises, and decodes on rank 0. The weights are read
//! again per call (a pipeline held across requests is the batch-generation work's).

use std::path::{Path, PathBuf};

use parallel_core::StrategyConfig;

use crate::config::{BackendKind, ParallelConfig, RunConfig};
use crate::error::{HarnessError, Result};
use crate::pipeline::PipelineFolder;
use crate::run::{RunOptions, RunReport, run_with_options};

/// A diffusers `PixArtAlphaPipeline` / `PixArtSigmaPipeline` folder and how to split it.
#[derive(Debug, Clone)]
pub struct PixArtPipeline {
    config: RunConfig,
}

/// One request: the prompt and the sampling settings (diffusers' call arguments).
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (empty by default, as diffusers').
    pub negative_prompt: String,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Denoising steps (default 20).
    pub steps: usize,
    /// Classifier-free guidance scale (default 4.5; ≤ 1 turns guidance off).
    pub guidance_scale: f64,
    /// Image height and width in pixels (default: the transformer's sample size × 8).
    pub size: Option<(usize, usize)>,
}

impl Prompt {
    /// `prompt` with the defaults: seed 0, 20 steps, guidance 4.5, the model's size.
    pub fn new(prompt: impl Into<String>) -> Self {
        let d = RunConfig::default();
        Prompt {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            seed: d.seed,
            steps: d.steps,
            guidance_scale: 4.5,
            size: None,
        }
    }

    /// This request with seed `seed`.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// This request with `steps` denoising steps.
    pub fn steps(mut self, steps: usize) -> Self {
        self.steps = steps;
        self
    }

    /// This request with guidance scale `g`.
    pub fn guidance_scale(mut self, g: f64) -> Self {
        self.guidance_scale = g;
        self
    }

    /// This request with a negative prompt.
    pub fn negative_prompt(mut self, text: impl Into<String>) -> Self {
        self.negative_prompt = text.into();
        self
    }

    /// This request at `height × width` pixels.
    pub fn size(mut self, height: usize, width: usize) -> Self {
        self.size = Some((height, width));
        self
    }
}

/// What [`PixArtPipeline::generate`] made.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The image, decoded on rank 0.
    pub image: models_vae::RgbImage,
    /// The run: final latents, step times, communication and memory per rank.
    pub report: RunReport,
}

impl Generated {
    /// Writes the image as a PNG.
    ///
    /// # Errors
    /// The file cannot be written (naming it).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        Ok(models_vae::save_png(&self.image, path.as_ref())?)
    }
}

impl PixArtPipeline {
    /// The pipeline in `folder` (`model_index.json`, `transformer/`, `text_encoder/`,
    /// `tokenizer/`, `vae/`, `scheduler/`), serial on the CPU until told otherwise.
    ///
    /// # Errors
    /// A folder that is not such a pipeline, naming what is missing.
    pub fn from_folder(folder: impl AsRef<Path>) -> Result<Self> {
        let folder = folder.as_ref();
        PipelineFolder::open(folder)?;
        Ok(PixArtPipeline {
            config: RunConfig {
                model: folder.to_path_buf(),
                output: PathBuf::new(),
                ..RunConfig::default()
            },
        })
    }

    /// This pipeline split by `strategy` over `world_size` ranks.
    pub fn with_strategy(mut self, strategy: &dyn StrategyConfig, world_size: usize) -> Self {
        let parallel = ParallelConfig {
            backend: self.config.parallel.backend,
            threads_per_rank: self.config.parallel.threads_per_rank,
            ..ParallelConfig::with_strategy(strategy, world_size)
        };
        self.config.parallel = parallel;
        self
    }

    /// This pipeline on `backend` (CUDA needs the `cuda` feature and one GPU per rank).
    pub fn with_backend(mut self, backend: BackendKind) -> Self {
        self.config.parallel.backend = backend;
        self
    }

    /// This pipeline with `threads` threads per rank (CPU).
    pub fn with_threads_per_rank(mut self, threads: usize) -> Self {
        self.config.parallel.threads_per_rank = Some(threads);
        self
    }

    /// The run config every request starts from.
    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    /// One image for `prompt`.
    ///
    /// # Errors
    /// Any error of [`run`](crate::run), naming the setting, file, tensor, degree or rank at
    /// fault.
    pub fn generate(&self, prompt: &Prompt) -> Result<Generated> {
        let mut cfg = self.config.clone();
        cfg.prompt = prompt.prompt.clone();
        cfg.negative_prompt = Some(prompt.negative_prompt.clone());
        cfg.seed = prompt.seed;
        cfg.steps = prompt.steps;
        cfg.guidance_scale = Some(prompt.guidance_scale);
        if let Some((h, w)) = prompt.size {
            cfg.height = Some(h);
            cfg.width = Some(w);
        }
        let mut report = run_with_options(&cfg, &RunOptions { decode: true, progress: false })?;
        let image = report.decoded.take().ok_or_else(|| {
            HarnessError::Parallel(parallel_core::ParallelError::Model(
                "rank 0 decoded no image".into(),
            ))
        })?;
        Ok(Generated { image, report })
    }
}

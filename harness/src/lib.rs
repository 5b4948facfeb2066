//! # harness
//!
//! Composes a model, a strategy and a scheduler at runtime: the PixArt text-to-image
//! pipeline on one rank or on N ranks with any registered strategy, one-forward checks
//! against diffusers, and the `harness` binary (`run`, `forward`, `list`).
//!
//! ## The flow of `harness run`
//!
//! ```text
//! RunConfig (TOML + flags)                                     config
//!   └─ RunPlan::new — on the calling thread, no weights read:  run
//!        config checks, strategy name and options (registry), pipeline folder layout,
//!        transformer config → ModelDesc, image size vs VAE factor × patch, scheduler and
//!        timesteps, initial latents (seeded noise or --latents, shape-checked)
//!   └─ RunPlan::execute — parallel_core::launch, one thread (or GPU) per rank:
//!        registry.create → strategy.validate(desc, request) → load_plan → load transformer
//!        rank 0: load VAE, tokenize + T5-encode, broadcast embeddings + mask
//!        identical latents × init_noise_sigma on every rank
//!        begin_request, reset comm counters, strategy.denoise(model, Sampler, latents)
//!        rank 0: VAE decode → PNG (+ --save-latents)
//!   └─ RunReport: final latents, step times, comm counters, parameter and buffer bytes
//!        per rank, expected communication from each strategy's formula
//! ```
//!
//! The [`Sampler`] is the pipeline's side of [`DenoiseLoop`](parallel_core::DenoiseLoop):
//! classifier-free guidance (batch `[negative, positive]`), `scale_model_input`, timesteps,
//! added conditions, and one scheduler state per region of latent rows (PipeFusion steps
//! patches separately on its last stage).
//!
//! Every error is a [`HarnessError`] naming the key, file, tensor or degree at fault. A
//! failing rank ends every other rank's waits, and the error reported is the failing rank's
//! own, not the others' "peer failed" ([`launch_ranks`]).
//!
//! ## Library use (for benchmarks and tests)
//!
//! ```no_run
//! # fn main() -> Result<(), harness::HarnessError> {
//! let mut cfg = harness::RunConfig::from_file("configs/demo.toml".as_ref())?;
//! cfg.parallel.strategy = "ulysses".into();
//! cfg.parallel.world_size = 2;
//! let plan = harness::RunPlan::new(&cfg)?;
//! let report = plan.execute::<harness::CpuBackend>(
//!     &harness::RunOptions { decode: false, progress: false },
//!     Vec::new(),
//! )?;
//! println!("{} ({} B sent by rank 0)", report.summary(), report.ranks[0].comm.total_bytes());
//! # Ok(()) }
//! ```
//!
//! ## Backends and strategies
//!
//! The backend is chosen here, once: [`CpuBackend`] (Flex, with its rayon and SIMD kernels)
//! and, behind the `cuda` feature, `CudaBackend`. Strategies are registered explicitly by
//! [`registry`], one line per strategy crate, each behind a cargo feature of this crate
//! (`tensor`, `ulysses` (also `usp`), `ring`, `distrifusion` (also `naive_patch`),
//! `pipefusion`; all on by default).

pub mod batch;
pub mod bench;
pub mod config;
pub mod devices;
pub mod error;
pub mod eval;
pub mod forward;
pub mod generate;
pub mod inputs;
pub mod launch;
pub mod list;
pub mod model;
pub mod multiprocess;
pub mod noise;
pub mod pipeline;
pub mod report;
pub mod run;
pub mod sampler;
pub mod shared;

use burn::tensor::backend::Backend;
use parallel_core::Registry;

pub use config::{BackendKind, DtypeKind, ParallelConfig, RunConfig};
pub use error::{HarnessError, Result};
pub use forward::{ForwardReport, forward};
pub use generate::{Generated, PixArtPipeline, Prompt};
pub use inputs::read_denoiser_input;
pub use launch::launch_ranks;
pub use model::{AnyDenoiser, DenoiserConfig};
pub use pipeline::{PipelineFolder, PromptEmbeds, TextEncoder};
pub use run::{HostTensor, RankReport, RunOptions, RunPlan, RunReport, run, run_with_options};
pub use sampler::{Sampler, SamplerSettings};
pub use shared::SharedModels;

/// The CPU backend: Burn's Flex, the embedded default and the test backend.
pub type CpuBackend = burn_flex::Flex;

/// The CUDA backend (feature `cuda`).
#[cfg(feature = "cuda")]
pub type CudaBackend = burn_cuda::Cuda;

/// Every strategy this binary was built with: `serial`, plus one `register` line per
/// strategy crate enabled by its cargo feature.
pub fn registry<B: Backend>() -> Registry<B> {
    #[allow(unused_mut)]
    let mut registry = Registry::new();
    #[cfg(feature = "tensor")]
    strategy_tensor::register(&mut registry);
    #[cfg(feature = "ulysses")]
    strategy_ulysses::register(&mut registry);
    #[cfg(feature = "ring")]
    strategy_ring::register(&mut registry);
    #[cfg(feature = "distrifusion")]
    strategy_distrifusion::register(&mut registry);
    #[cfg(feature = "pipefusion")]
    strategy_pipefusion::register(&mut registry);
    registry
}

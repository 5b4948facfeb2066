//! `harness forward`: one denoiser evaluation (a DiT-family transformer or a U-Net), under
//! any strategy, for checking against diffusers.
//!
//! The inputs file holds tensors named like the model's diffusers forward arguments (see
//! [`read_denoiser_input`](crate::inputs::read_denoiser_input): `hidden_states`, … for a
//! transformer; `sample`, `timestep`, `encoder_hidden_states`, `text_embeds`, `time_ids` for
//! a U-Net); the output file gets `sample`. If the inputs file also holds the reference output
//! (`sample` for a transformer, `out` for a U-Net), the relative L2 error against it is
//! reported.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use parallel_core::{Comm, RequestInfo, StepKind};

use crate::config::{BackendKind, ParallelConfig};
use crate::error::{HarnessError, Result};
use crate::launch::{launch_options, launch_ranks};
use crate::model::DenoiserConfig;
use crate::run::{HostTensor, RankReport};

/// The denoiser folder of `model`: the folder itself if it has a `config.json`, else its
/// `transformer/` or `unet/` (a pipeline folder).
pub fn transformer_folder(model: &Path) -> Result<PathBuf> {
    if model.join("config.json").is_file() {
        return Ok(model.to_path_buf());
    }
    for sub in ["transformer", "unet"] {
        if model.join(sub).join("config.json").is_file() {
            return Ok(model.join(sub));
        }
    }
    if !model.is_dir() {
        Err(HarnessError::io(model, "no such model folder (--model)"))
    } else {
        Err(HarnessError::io(
            model,
            "neither a model folder (config.json + weights) nor a pipeline folder with a \
             transformer/ or unet/ (--model)",
        ))
    }
}

/// The result of [`forward`].
#[derive(Debug, Clone)]
pub struct ForwardReport {
    /// The noise prediction, `[batch, out_channels, height, width]`.
    pub sample: HostTensor,
    /// Where it was written.
    pub output: PathBuf,
    /// `‖sample − reference‖₂ / ‖reference‖₂` when the inputs file holds a `sample`.
    pub rel_l2: Option<f64>,
    /// The strategy.
    pub strategy: String,
    /// Ranks.
    pub world_size: usize,
    /// Every rank's counters.
    pub ranks: Vec<RankReport>,
    /// Wall time of the forward on rank 0 (loading excluded; its waits for the other ranks
    /// included).
    pub forward_time: std::time::Duration,
}

impl ForwardReport {
    /// The line `harness forward` prints.
    pub fn summary(&self) -> String {
        let check = match self.rel_l2 {
            Some(e) => format!("; relative L2 error vs the inputs' reference output: {e:.3e}"),
            None => String::new(),
        };
        format!(
            "wrote `sample` {:?} to {} (strategy {} on {} rank{}; forward {:.3} s){check}",
            self.sample.shape,
            self.output.display(),
            self.strategy,
            self.world_size,
            if self.world_size == 1 { "" } else { "s" },
            self.forward_time.as_secs_f64(),
        )
    }
}

/// One forward of the denoiser at `model` on the inputs file, under `parallel`; writes
/// `sample` to `output`.
pub fn forward(
    model: &Path,
    inputs: &Path,
    output: &Path,
    parallel: &ParallelConfig,
) -> Result<ForwardReport> {
    parallel.check()?;
    let folder = transformer_folder(model)?;
    let config = DenoiserConfig::from_folder(&folder)?;
    let options = parallel.strategy_options()?;
    crate::registry::<crate::CpuBackend>().check_options(&parallel.strategy, &options)?;
    if !inputs.is_file() {
        return Err(HarnessError::io(inputs, "no such inputs file (--inputs)"));
    }
    let job = Job { folder, config, options, inputs, output, parallel };
    let (sample, rel_l2, forward_time, ranks) = match parallel.backend {
        BackendKind::Cpu => job.execute::<crate::CpuBackend>(Vec::new())?,
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                let devices = crate::devices::cuda_devices(parallel)?;
                job.execute::<crate::CudaBackend>(devices)?
            }
            #[cfg(not(feature = "cuda"))]
            {
                return Err(crate::error::no_cuda());
            }
        }
    };
    Ok(ForwardReport {
        sample,
        output: output.to_path_buf(),
        rel_l2,
        strategy: parallel.strategy.clone(),
        world_size: parallel.world_size,
        ranks,
        forward_time,
    })
}

struct Job<'a> {
    folder: PathBuf,
    config: DenoiserConfig,
    options: parallel_core::StrategyOptions,
    inputs: &'a Path,
    output: &'a Path,
    parallel: &'a ParallelConfig,
}

type RankResult = (RankReport, Option<(HostTensor, Option<f64>, std::time::Duration)>);

impl Job<'_> {
    fn execute<B: Backend>(
        &self,
        devices: Vec<B::Device>,
    ) -> Result<(HostTensor, Option<f64>, std::time::Duration, Vec<RankReport>)> {
        let launch = launch_options::<B>(self.parallel, devices)?;
        let outputs = launch_ranks(self.parallel, &launch, |comm| self.rank(comm))?;
        let mut ranks = Vec::new();
        let mut result = None;
        for (report, r0) in outputs {
            ranks.push(report);
            result = result.or(r0);
        }
        let (sample, rel, took) = result.ok_or_else(|| {
            HarnessError::Parallel(parallel_core::ParallelError::Model(
                "rank 0 returned no result".into(),
            ))
        })?;
        Ok((sample, rel, took, ranks))
    }

    fn rank<B: Backend>(&self, comm: Comm<B>) -> Result<RankResult> {
        let device = comm.device();
        let desc = self.config.desc();
        let (input, reference) =
            crate::inputs::read_denoiser_input::<B>(self.inputs, desc.family, &device)?;
        let dims = input.hidden_states.dims();
        if dims[1] != desc.in_channels {
            return Err(HarnessError::config(
                format!("--inputs {}", self.inputs.display()),
                format!(
                    "the latents have shape {dims:?}, but {} takes {} latent channels",
                    desc.class_name, desc.in_channels
                ),
            ));
        }
        if self.parallel.dp_degree != 1 {
            return Err(HarnessError::config(
                "parallel.dp_degree (--dp-degree)",
                "applies to `harness run` (replicas generating different images); a forward is \
                 one evaluation of one input",
            ));
        }
        let mut request = RequestInfo::for_forward(&input);
        if self.parallel.cfg_degree == 2 {
            // The inputs' batch is the guidance pair(s): negatives first, then positives.
            if !request.batch.is_multiple_of(2) {
                return Err(HarnessError::config(
                    format!("--inputs {}", self.inputs.display()),
                    format!(
                        "parallel.cfg_degree 2 splits the batch into its negative and positive \
                         halves, but the inputs have a batch of {}",
                        request.batch
                    ),
                ));
            }
            request.images = request.batch / 2;
        }
        let registry = crate::registry::<B>();
        let mut strategy = self.parallel.create_strategy(&registry, comm.clone(), &self.options)?;
        strategy.validate(&desc, &request)?;
        let plan = strategy.load_plan(&desc)?;
        let model =
            self.config.load_as::<B>(&self.folder, &plan, self.parallel.dtype.dtype(), &device)?;
        strategy.begin_request(&desc, &request)?;
        comm.reset_stats();
        let started = std::time::Instant::now();
        // Written and compared in float32 whatever the compute dtype.
        let sample = strategy.forward(&model, &input, 0)?.cast(burn::tensor::DType::F32);
        let took = started.elapsed();
        let report = RankReport {
            rank: comm.rank(),
            comm: comm.stats(),
            param_bytes: parallel_core::Denoiser::param_bytes(&model),
            buffer_bytes: strategy.buffer_bytes(),
            expected: strategy.expected_comm(&desc, &request, StepKind::Forward)?,
        };
        if comm.rank() != 0 {
            return Ok((report, None));
        }
        // A FLUX inputs file holds packed tokens: write the sample packed like it.
        let packed =
            crate::inputs::flux_grid(&weights::read_tensors(self.inputs)?, self.inputs)?.is_some();
        if packed {
            let p = models_dit::flux::pack_latents(sample.clone());
            weights::write_tensors(self.output, &[("sample", p)])?;
        } else {
            weights::write_tensors(self.output, &[("sample", sample.clone())])?;
        }
        let sample = HostTensor::from_tensor(sample)?;
        let rel = match reference {
            Some(r) => {
                let r = HostTensor::from_tensor(r)?;
                if r.shape != sample.shape {
                    return Err(HarnessError::config(
                        format!("--inputs {}", self.inputs.display()),
                        format!(
                            "its reference output has shape {:?}, the model's output is {:?}",
                            r.shape, sample.shape
                        ),
                    ));
                }
                Some(sample.rel_l2_error(&r.values))
            }
            None => None,
        };
        Ok((report, Some((sample, rel, took))))
    }
}

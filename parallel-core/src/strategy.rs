//! The `ParallelStrategy` contract: one instance per rank, owning its state across steps.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::comm::{Comm, OpKind};
use crate::error::{ParallelError, Result};
use crate::model::{Denoiser, DenoiserInput, LatentGrid, LoadPlan, ModelDesc};
use crate::seams::Serial;

/// What a request is, told to a strategy before its first step.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestInfo {
    /// Denoising steps of the request.
    pub steps: usize,
    /// The latent grid.
    pub grid: LatentGrid,
    /// Batch of one denoiser evaluation (2 × images with classifier-free guidance).
    pub batch: usize,
    /// Images of the request (the latents' batch).
    pub images: usize,
    /// Text tokens of the cross-attention context (0 without text).
    pub text_tokens: usize,
}

impl RequestInfo {
    /// The request of a lone forward on `input` (one step; images = batch).
    pub fn for_forward<B: Backend>(input: &DenoiserInput<B>) -> Self {
        RequestInfo {
            steps: 1,
            grid: input.grid(),
            batch: input.batch(),
            images: input.batch(),
            text_tokens: input.encoder_hidden_states.as_ref().map_or(0, |t| t.dims()[1]),
        }
    }
}

/// The request a strategy instance serves, kept from `begin_request` so that `forward` and
/// `denoise` use the request the strategy validated (never one rebuilt from a tensor).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CurrentRequest(Option<RequestInfo>);

impl CurrentRequest {
    /// Starts serving `request`.
    pub fn begin(&mut self, request: &RequestInfo) {
        self.0 = Some(request.clone());
    }

    /// The request, or an error naming `strategy` when `begin_request` was not called.
    pub fn get(&self, strategy: &str) -> Result<&RequestInfo> {
        self.0.as_ref().ok_or_else(|| ParallelError::State {
            strategy: strategy.into(),
            reason: "forward or denoise before begin_request: tell the strategy the request \
                     first"
                .into(),
        })
    }

    /// The request, after checking that `input` is one of its evaluations (same latent
    /// grid and batch).
    pub fn check_input<B: Backend>(
        &self,
        strategy: &str,
        input: &DenoiserInput<B>,
    ) -> Result<&RequestInfo> {
        let request = self.get(strategy)?;
        if input.grid() != request.grid || input.batch() != request.batch {
            return Err(ParallelError::State {
                strategy: strategy.into(),
                reason: format!(
                    "the input has latent {} and batch {}, but the request began with {} and \
                     batch {}",
                    input.grid(),
                    input.batch(),
                    request.grid,
                    request.batch
                ),
            });
        }
        Ok(request)
    }
}

/// The sampler side of a denoising loop, provided by the pipeline: it turns latents into a
/// denoiser input and takes a scheduler step. Regions let a strategy step a band of latent
/// rows on its own (PipeFusion's last stage steps each patch as it completes); the pipeline
/// keeps one scheduler state per region.
pub trait DenoiseLoop<B: Backend> {
    /// Denoising steps.
    fn num_steps(&self) -> usize;

    /// The denoiser input of step `step` for the *full* latents (guidance batch, scaled
    /// model input, timestep, text). It must depend on nothing but its arguments: a
    /// strategy may call it more than once per step (PipeFusion's stages do, for the
    /// conditioning).
    fn model_input(&mut self, step: usize, latents: &Tensor<B, 4>) -> Result<DenoiserInput<B>>;

    /// Guidance and the scheduler step for latent rows `region`: `noise_pred` is the
    /// denoiser output for those rows (guidance batch included), `latents` their current
    /// value; returns their next value.
    fn step(
        &mut self,
        step: usize,
        region: Range<usize>,
        noise_pred: Tensor<B, 4>,
        latents: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>>;
}

/// Memory a strategy instance holds on its rank, beyond activations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryReport {
    /// Bytes of the model parameters this rank holds.
    pub param_bytes: u64,
    /// Bytes of the strategy's buffers across steps (stale K/V, pipeline queues).
    pub buffer_bytes: u64,
}

/// The communication a strategy expects per denoising step on this rank, from its formula
/// and the real shapes, to be set beside the measured [`CommStats`](crate::CommStats).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpectedComm {
    /// Elements sent per operation kind.
    pub elements: BTreeMap<OpKind, u64>,
    /// The formula, in words, with its terms' values.
    pub formula: String,
}

impl ExpectedComm {
    /// Nothing sent.
    pub fn none(formula: impl Into<String>) -> Self {
        ExpectedComm { elements: BTreeMap::new(), formula: formula.into() }
    }

    /// Adds `elements` of `kind`.
    pub fn add(&mut self, kind: OpKind, elements: u64) {
        *self.elements.entry(kind).or_default() += elements;
    }

    /// Elements of every kind together.
    pub fn total(&self) -> u64 {
        self.elements.values().sum()
    }

    /// Elements of `kind` (0 when none are expected).
    pub fn get(&self, kind: OpKind) -> u64 {
        self.elements.get(&kind).copied().unwrap_or(0)
    }
}

/// Which evaluation an expected-communication query is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// A lone [`forward`](ParallelStrategy::forward) call, outside a denoising loop (a
    /// PipeFusion forward runs the stages synchronously and broadcasts the prediction,
    /// where its denoising steps pass patches along).
    Forward,
    /// Step `i` (0-based) of [`denoise`](ParallelStrategy::denoise), from the start of the
    /// step (its first `model_input` call) to the start of the next; the last step also
    /// carries what the request sends once at its end (PipeFusion's final broadcast).
    Denoise(usize),
}

impl StepKind {
    /// Whether step `i` of a strategy with `warmup_steps` synchronous steps is a warmup step
    /// (`Forward` counts as one: a lone forward is synchronous in every strategy).
    pub fn is_warmup(self, warmup_steps: usize) -> bool {
        match self {
            StepKind::Forward => true,
            StepKind::Denoise(i) => i < warmup_steps,
        }
    }

    /// Whether this is the last step of a request of `steps` steps.
    pub fn is_last(self, steps: usize) -> bool {
        matches!(self, StepKind::Denoise(i) if i + 1 == steps)
    }
}

/// A way of splitting every denoising step over the ranks of a group.
///
/// # Implementing
/// - `validate` rejects, before any work, a model or request the degrees cannot run, with a
///   message that says what to change (heads divisible by the degree, rows divisible, …).
/// - `load_plan` says what this rank must load: a strategy that shards or drops weights
///   decides it here, so a rank never holds what it will not use.
/// - `begin_request` **resets all state kept across steps** (stale buffers, step counters,
///   queues): one request must never read another's.
/// - `forward` returns the complete noise prediction on every rank; `denoise` may be
///   overridden where the schedule must interleave model and scheduler (PipeFusion).
/// - Everything the instance keeps lives in the instance: no global state.
pub trait ParallelStrategy<B: Backend>: Send {
    /// The registered name.
    fn name(&self) -> &str;

    /// The world communicator this instance runs on.
    fn comm(&self) -> &Comm<B>;

    /// Checks the model and the request against the strategy's degrees.
    fn validate(&self, model: &ModelDesc, request: &RequestInfo) -> Result<()>;

    /// What this rank loads.
    fn load_plan(&self, model: &ModelDesc) -> Result<LoadPlan> {
        let _ = model;
        Ok(LoadPlan::full())
    }

    /// Resets every piece of cross-step state for a new request.
    fn begin_request(&mut self, model: &ModelDesc, request: &RequestInfo) -> Result<()>;

    /// One denoiser evaluation at step `step` of the current request: the full noise
    /// prediction `[batch, out_channels, height, width]`, on every rank.
    fn forward(
        &mut self,
        model: &dyn Denoiser<B>,
        input: &DenoiserInput<B>,
        step: usize,
    ) -> Result<Tensor<B, 4>>;

    /// The whole denoising loop from `latents`; returns the final latents on every rank.
    /// The default evaluates [`forward`](ParallelStrategy::forward) and steps the whole
    /// latent as one region.
    fn denoise(
        &mut self,
        model: &dyn Denoiser<B>,
        sampler: &mut dyn DenoiseLoop<B>,
        latents: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let mut latents = latents;
        let height = latents.dims()[2];
        for step in 0..sampler.num_steps() {
            let input = sampler.model_input(step, &latents)?;
            let noise = self.forward(model, &input, step)?;
            latents = sampler.step(step, 0..height, noise, latents)?;
        }
        Ok(latents)
    }

    /// Whether this rank calls [`DenoiseLoop::step`] in [`denoise`](ParallelStrategy::denoise)
    /// (and so needs the noise predictions): every rank in the default loop; PipeFusion's
    /// last stage only. A composition that exchanges predictions (CFG parallelism) counts its
    /// traffic by it.
    fn steps_latents(&self) -> bool {
        true
    }

    /// Bytes of this instance's buffers (parameters are the model's to report).
    fn buffer_bytes(&self) -> u64 {
        0
    }

    /// The elements this rank is expected to send in `step` of `request` (a lone forward or
    /// one denoising step), from the strategy's formula and the real shapes, computed
    /// independently of the communicator's counters it is set beside.
    fn expected_comm(
        &self,
        model: &ModelDesc,
        request: &RequestInfo,
        step: StepKind,
    ) -> Result<ExpectedComm>;

    /// The elements expected over the whole of [`denoise`](ParallelStrategy::denoise): the
    /// sum of [`expected_comm`](ParallelStrategy::expected_comm) over its steps; the formula
    /// is that of the last step.
    fn expected_request_comm(
        &self,
        model: &ModelDesc,
        request: &RequestInfo,
    ) -> Result<ExpectedComm> {
        let mut total = ExpectedComm::none("");
        for i in 0..request.steps {
            let step = self.expected_comm(model, request, StepKind::Denoise(i))?;
            for (kind, n) in step.elements {
                total.add(kind, n);
            }
            total.formula = step.formula;
        }
        Ok(total)
    }
}

/// The serial reference: one rank, the model as written, no communication.
pub struct SerialStrategy<B: Backend> {
    comm: Comm<B>,
}

impl<B: Backend> SerialStrategy<B> {
    /// The registered name.
    pub const NAME: &'static str = "serial";

    /// A serial strategy on a world of one rank.
    pub fn new(comm: Comm<B>) -> Result<Self> {
        if comm.size() != 1 {
            return Err(ParallelError::Unsupported {
                strategy: Self::NAME.into(),
                reason: format!(
                    "it runs on one rank, but the world has {}; use --world-size 1 or a \
                     parallel strategy",
                    comm.size()
                ),
            });
        }
        Ok(SerialStrategy { comm })
    }
}

impl<B: Backend> fmt::Debug for SerialStrategy<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SerialStrategy")
    }
}

impl<B: Backend> ParallelStrategy<B> for SerialStrategy<B> {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn comm(&self) -> &Comm<B> {
        &self.comm
    }

    fn validate(&self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        model.check_whole_grid(request.grid)
    }

    fn begin_request(&mut self, _model: &ModelDesc, _request: &RequestInfo) -> Result<()> {
        Ok(())
    }

    fn forward(
        &mut self,
        model: &dyn Denoiser<B>,
        input: &DenoiserInput<B>,
        _step: usize,
    ) -> Result<Tensor<B, 4>> {
        model.forward_rows(input, 0..input.grid().height, &mut Serial)
    }

    fn expected_comm(
        &self,
        _model: &ModelDesc,
        _request: &RequestInfo,
        _step: StepKind,
    ) -> Result<ExpectedComm> {
        Ok(ExpectedComm::none("serial: nothing"))
    }
}

//! # strategy-distrifusion: displaced patch parallelism (DistriFusion), and naive patch
//!
//! ## Algorithm
//! The latent is split by rows over the `N` ranks (token rows for a DiT; balanced, longer
//! bands first). Each rank runs the whole model on its band. In self-attention a rank's
//! queries need the keys and values of every token:
//!
//! - **warmup steps** (`step < warmup_steps`) are synchronous: in every layer the ranks
//!   all-gather their fresh K and V, attend over the full, fresh sequence, and keep the
//!   gathered K/V in the layer's buffer. A warmup step equals the serial model.
//! - **after warmup** a rank attends with its *own* fresh K/V and the *other* ranks' K/V from
//!   the previous step (the layer's buffer, one step stale). Right after computing its fresh
//!   K/V it starts an asynchronous all-gather of them, and waits on that handle only at the
//!   same layer of the next step, when it refreshes the buffer: the exchange overlaps a
//!   whole step of compute. The gathers run on a communicator of their own (a split of the
//!   world: its own stream), so the output gather that ends a step does not wait for them.
//!   The last step starts none (nobody would read them).
//!
//! The bands' outputs are all-gathered at the end of every step, so the noise prediction is
//! complete on every rank and the scheduler steps identically everywhere.
//!
//! **Staleness.** After warmup, the attention of rank `r`'s tokens to rank `j ≠ r`'s tokens
//! uses `K_j, V_j` from step `t−1`. Between adjacent steps the activations change little
//! (the premise of the method), so the error is small; it is reported as PSNR against
//! serial, not hidden. With `warmup_steps ≥ steps` the output equals serial.
//!
//! **Warmup default: 4** — the setting of the DistriFusion paper. The latents move fastest
//! in the first steps (from pure noise), where a one-step-stale K/V differs most from the
//! fresh one; a few synchronous steps remove most of the error at a cost of
//! `4/steps` of the exchanges being on the critical path.
//!
//! **Naive patch** (`naive_patch`): each rank denoises its rows alone, attending only to its
//! own tokens, with no exchange but the output gather: the baseline whose seams show in
//! the image and which DistriFusion beats.
//!
//! ## Constraints
//! At least one token row per rank. Any head count. (U-Net: the conv-halo and group-norm
//! seams are where this strategy will act; the DiT path uses self-attention only.)
//!
//! ## Config keys
//! `distrifusion`: `warmup_steps` (default 4). `naive_patch`: none.
//!
//! ## Communication and memory (per denoising step, per rank `r`)
//! `B` batch, `hs = H·d` hidden size, `L` layers, `n_r` the rank's tokens, `p` all tokens:
//!
//! ```text
//! all_gather (K/V) = L · 2·B·n_r·hs·(N − 1)     (= 2·(p/N)·hs·(N−1)·L, warmup or not;
//!                                               none in the last step after warmup)
//! all_gather (output) = B · C_out · (band rows · patch) · W · (N − 1)
//! buffer = L · 2·B·p·hs elements                (full K and V of every layer)
//! ```
//! Naive patch sends only the output gather and holds no buffer.
//!
//! The buffers and pending gathers belong to the strategy instance and are dropped by
//! `begin_request`: one request never reads another's stale K/V.

use std::ops::Range;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use parallel_core::attention::sdpa;
use parallel_core::split::{output_gather_elements, row_partition, row_split_forward};
use parallel_core::{
    AttentionSite, Comm, CurrentRequest, Denoiser, DenoiserInput, ExpectedComm, ModelDesc,
    ModelFamily, NoOptions, OpKind, OptionInfo, OptionValue, ParallelError, ParallelStrategy,
    Pending, Reference, Registry, RequestInfo, Result, Seams, Serial, StepKind, StrategyConfig,
    StrategyInfo, StrategyOptions, SuiteCase,
};

/// The registered name of DistriFusion.
pub const NAME: &str = "distrifusion";
/// The registered name of the naive-patch baseline.
pub const NAIVE_NAME: &str = "naive_patch";
/// The default number of synchronous warmup steps (the DistriFusion paper's).
pub const DEFAULT_WARMUP_STEPS: usize = 4;

/// When a layer's asynchronous K/V gather was started and when it was waited on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatherEvent {
    /// The layer.
    pub layer: usize,
    /// The step whose fresh K/V the gather carries.
    pub started: usize,
    /// The step that waited on it.
    pub waited: usize,
}

/// Per-request state: the K/V buffers and the pending gathers of every layer.
struct State<B: Backend> {
    /// Per layer: `[2, B, H, p, d]`, K and V of every token (fresh on the own band after
    /// this step's attention; others' from the previous step).
    buffers: Vec<Option<Tensor<B, 5>>>,
    /// Per layer: the gather started at `(step, handle)`.
    pending: Vec<Option<(usize, Pending<B, 5>)>>,
    events: Vec<GatherEvent>,
}

impl<B: Backend> State<B> {
    fn new() -> Self {
        State { buffers: Vec::new(), pending: Vec::new(), events: Vec::new() }
    }

    fn slot(&mut self, layer: usize) {
        if self.buffers.len() <= layer {
            self.buffers.resize_with(layer + 1, || None);
            self.pending.resize_with(layer + 1, || None);
        }
    }
}

/// DistriFusion's options, as a typed value (the keys of `harness list`, TOML and flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DistriFusionConfig {
    /// Synchronous steps (fresh K/V everywhere) first, ≥ 1.
    pub warmup_steps: usize,
}

impl Default for DistriFusionConfig {
    fn default() -> Self {
        DistriFusionConfig { warmup_steps: DEFAULT_WARMUP_STEPS }
    }
}

impl DistriFusionConfig {
    /// This config with `w` warmup steps.
    pub fn with_warmup_steps(mut self, w: usize) -> Self {
        self.warmup_steps = w;
        self
    }

    /// The config of registry options.
    pub fn from_options(opts: &StrategyOptions) -> Result<Self> {
        Ok(DistriFusionConfig { warmup_steps: opts.usize("warmup_steps", DEFAULT_WARMUP_STEPS)? })
    }
}

impl StrategyConfig for DistriFusionConfig {
    fn name(&self) -> &'static str {
        NAME
    }

    fn options(&self) -> StrategyOptions {
        StrategyOptions::new(NAME).with("warmup_steps", OptionValue::Int(self.warmup_steps as i64))
    }
}

/// The strategy's config for library users (it takes no options).
pub const NAIVE_CONFIG: NoOptions = NoOptions(NAIVE_NAME);

/// DistriFusion over the whole world.
pub struct DistriFusion<B: Backend> {
    world: Comm<B>,
    /// The world again as a communicator of its own, for the K/V gathers: a stream apart
    /// from the output gathers, so a step's end does not wait for the gathers it started.
    kv: Comm<B>,
    warmup_steps: usize,
    state: State<B>,
    request: CurrentRequest,
}

impl<B: Backend> DistriFusion<B> {
    /// DistriFusion over `world` as `config` says.
    ///
    /// # Errors
    /// `warmup_steps = 0`: step 0 has no previous step whose K/V could be stale, so it is
    /// synchronous whatever is asked; say 1.
    pub fn new(world: Comm<B>, config: &DistriFusionConfig) -> Result<Self> {
        let warmup_steps = config.warmup_steps;
        if warmup_steps == 0 {
            return Err(ParallelError::BadOption {
                strategy: NAME.into(),
                key: "warmup_steps".into(),
                reason: "must be ≥ 1: step 0 has no previous step's K/V to reuse".into(),
            });
        }
        let kv = world.split_members(world.members())?;
        Ok(DistriFusion {
            world,
            kv,
            warmup_steps,
            state: State::new(),
            request: CurrentRequest::default(),
        })
    }

    /// The configured warmup steps.
    pub fn warmup_steps(&self) -> usize {
        self.warmup_steps
    }

    /// Every asynchronous gather of this request: when it started and when it was waited.
    pub fn gather_events(&self) -> &[GatherEvent] {
        &self.state.events
    }
}

struct DfSeams<'a, B: Backend> {
    comm: &'a Comm<B>,
    state: &'a mut State<B>,
    step: usize,
    sync: bool,
    /// The request's last step: nobody would read a gather started now.
    last: bool,
}

impl<B: Backend> Seams<B> for DfSeams<'_, B> {
    fn self_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let layer = site.layer;
        self.state.slot(layer);
        let fresh: Tensor<B, 5> = Tensor::stack(vec![k, v], 0);
        // Refresh the buffer with last step's gather, if one is pending for this layer.
        if let Some((started, pending)) = self.state.pending[layer].take() {
            self.state.buffers[layer] = Some(pending.wait()?);
            self.state.events.push(GatherEvent { layer, started, waited: self.step });
        }
        let kv = match (&self.state.buffers[layer], self.sync) {
            // Warmup, or no stale K/V yet: gather the fresh K/V of every rank now.
            (None, _) | (_, true) => {
                let full = self.comm.all_gather(fresh, 3)?;
                self.state.buffers[layer] = Some(full.clone());
                full
            }
            (Some(buffer), false) => {
                let own: Range<usize> = site.tokens.clone();
                let dims = buffer.dims();
                let mixed = buffer.clone().slice_assign(
                    [0..dims[0], 0..dims[1], 0..dims[2], own, 0..dims[4]],
                    fresh.clone(),
                );
                if !self.last {
                    let pending = self.comm.all_gather_async(fresh, 3)?;
                    self.state.pending[layer] = Some((self.step, pending));
                }
                self.state.buffers[layer] = Some(mixed.clone());
                mixed
            }
        };
        let k_full = kv.clone().narrow(0, 0, 1).squeeze_dim::<4>(0);
        let v_full = kv.narrow(0, 1, 1).squeeze_dim::<4>(0);
        Ok(sdpa(q, k_full, v_full, None))
    }
}

/// The description of `distrifusion` for the registry.
pub fn info() -> StrategyInfo {
    StrategyInfo {
        name: NAME,
        summary: "image rows split; others' K/V one step stale, gathered asynchronously after warmup",
        options: vec![OptionInfo {
            key: "warmup_steps",
            default: "4",
            doc: "synchronous steps (fresh K/V everywhere) before the stale, overlapped ones (≥ 1)",
        }],
        suite: vec![
            SuiteCase::new(&[1, 2, 4], Reference::DisplacedPatches { warmup_steps: 4 }),
            SuiteCase::new(&[2, 4], Reference::DisplacedPatches { warmup_steps: 1 })
                .with("warmup_steps", OptionValue::Int(1)),
            SuiteCase::new(&[2, 4], Reference::DisplacedPatches { warmup_steps: 2 })
                .with("warmup_steps", OptionValue::Int(2)),
        ],
    }
}

/// The description of `naive_patch` for the registry.
pub fn naive_info() -> StrategyInfo {
    StrategyInfo {
        name: NAIVE_NAME,
        summary: "image rows split, each rank attends only to its own rows (the baseline; seams show)",
        options: vec![],
        suite: vec![SuiteCase::new(&[1, 2, 4], Reference::LocalPatches)],
    }
}

/// Registers `distrifusion` and `naive_patch`.
pub fn register<B: Backend>(registry: &mut Registry<B>) {
    registry.register(info(), |comm, opts: &StrategyOptions| {
        Ok(Box::new(DistriFusion::new(comm, &DistriFusionConfig::from_options(opts)?)?))
    });
    registry.register(naive_info(), |comm, _| Ok(Box::new(NaivePatch::new(comm))));
}

fn buffer_bytes_of<B: Backend>(state: &State<B>) -> u64 {
    state
        .buffers
        .iter()
        .flatten()
        .map(|t| (t.shape().num_elements() * t.dtype().size()) as u64)
        .sum()
}

impl<B: Backend> ParallelStrategy<B> for DistriFusion<B> {
    fn name(&self) -> &str {
        NAME
    }

    fn comm(&self) -> &Comm<B> {
        &self.world
    }

    fn validate(&self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        model.require_family(
            NAME,
            ModelFamily::Dit,
            "stale conv halos and group-norm statistics of a U-Net are not implemented yet",
        )?;
        row_partition(NAME, model, request.grid, self.world.size()).map(|_| ())
    }

    fn begin_request(&mut self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        self.validate(model, request)?;
        // A request that ended early (an error, or forwards outside a loop) may leave gathers
        // in flight: wait them out, every rank alike, so the stream stays in step.
        for (_, pending) in
            std::mem::replace(&mut self.state, State::new()).pending.into_iter().flatten()
        {
            pending.wait()?;
        }
        self.request.begin(request);
        Ok(())
    }

    fn forward(
        &mut self,
        model: &dyn Denoiser<B>,
        input: &DenoiserInput<B>,
        step: usize,
    ) -> Result<Tensor<B, 4>> {
        let steps = self.request.check_input(NAME, input)?.steps;
        let sync = step < self.warmup_steps;
        let last = step + 1 >= steps;
        let mut seams = DfSeams { comm: &self.kv, state: &mut self.state, step, sync, last };
        row_split_forward(NAME, model, input, &self.world, &mut seams)
    }

    fn buffer_bytes(&self) -> u64 {
        buffer_bytes_of(&self.state)
    }

    fn expected_comm(
        &self,
        model: &ModelDesc,
        request: &RequestInfo,
        step: StepKind,
    ) -> Result<ExpectedComm> {
        // Warmup steps gather the fresh K/V synchronously, the others asynchronously (the
        // same volume); the last step of a loop after warmup starts no gather, nobody would
        // read it.
        let n = self.world.size();
        let r = self.world.rank();
        let parts = row_partition(NAME, model, request.grid, n)?;
        let cols = request.grid.width / model.patch_size;
        let n_r = parts[r].len() * cols;
        let (b, hs, l) = (request.batch, model.hidden_size, model.num_layers);
        let gathers = !step.is_last(request.steps) || step.is_warmup(self.warmup_steps);
        let mut e = ExpectedComm::none(format!(
            "distrifusion: L·2·B·n_r·hs·(N−1){} + output gather; L={l} B={b} n_r={n_r} hs={hs} \
             N={n}",
            if gathers { "" } else { " (none: the last step starts no gather)" }
        ));
        if gathers {
            e.add(OpKind::AllGather, (l * 2 * b * n_r * hs * (n - 1)) as u64);
        }
        e.add(OpKind::AllGather, output_gather_elements(model, request.grid, b, &parts[r], n));
        Ok(e)
    }
}

/// The buffer DistriFusion holds per rank, in elements: `L · 2 · B · p · hs`.
pub fn buffer_elements(model: &ModelDesc, request: &RequestInfo) -> u64 {
    let p = model.tokens(request.grid).len();
    (model.num_layers * 2 * request.batch * p * model.hidden_size) as u64
}

/// Naive patch parallelism: every rank attends only to its own rows.
pub struct NaivePatch<B: Backend> {
    world: Comm<B>,
    request: CurrentRequest,
}

impl<B: Backend> NaivePatch<B> {
    /// Naive patch over the whole world.
    pub fn new(world: Comm<B>) -> Self {
        NaivePatch { world, request: CurrentRequest::default() }
    }
}

impl<B: Backend> ParallelStrategy<B> for NaivePatch<B> {
    fn name(&self) -> &str {
        NAIVE_NAME
    }

    fn comm(&self) -> &Comm<B> {
        &self.world
    }

    fn validate(&self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        row_partition(NAIVE_NAME, model, request.grid, self.world.size()).map(|_| ())
    }

    fn begin_request(&mut self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        self.validate(model, request)?;
        self.request.begin(request);
        Ok(())
    }

    fn forward(
        &mut self,
        model: &dyn Denoiser<B>,
        input: &DenoiserInput<B>,
        _step: usize,
    ) -> Result<Tensor<B, 4>> {
        self.request.check_input(NAIVE_NAME, input)?;
        // The serial seams attend to the local tokens only: exactly the naive split.
        row_split_forward(NAIVE_NAME, model, input, &self.world, &mut Serial)
    }

    fn expected_comm(
        &self,
        model: &ModelDesc,
        request: &RequestInfo,
        _step: StepKind,
    ) -> Result<ExpectedComm> {
        let n = self.world.size();
        let r = self.world.rank();
        let parts = row_partition(NAIVE_NAME, model, request.grid, n)?;
        let mut e = ExpectedComm::none("naive patch: output gather only");
        e.add(
            OpKind::AllGather,
            output_gather_elements(model, request.grid, request.batch, &parts[r], n),
        );
        Ok(e)
    }
}

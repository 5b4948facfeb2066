//! # strategy-tensor: tensor parallelism (Megatron-style) for DiT and U-Net
//!
//! ## Shard plan
//! Every rank holds all tokens and `1/N` of every transformer block:
//!
//! | parameter | placement | why |
//! |---|---|---|
//! | `attn1.to_q/k/v`, `attn2.to_q/k/v` (weights and biases) | column-parallel (output features, i.e. heads, split) | each rank computes its `H/N` heads end to end |
//! | `ff.net.0.proj` (weight and bias) | column-parallel | the GELU is element-wise, so each rank's slice of the hidden layer is complete |
//! | `attn1.to_out.0`, `attn2.to_out.0`, `ff.net.2` (weights) | row-parallel (input features split) | consumes the local heads / hidden slice; the partial outputs are all-reduced |
//! | their biases | replicated, added **once, after** the all-reduce | adding them before would count them `N` times |
//! | patch/position embedding, timestep/class/caption embeddings, adaLN tables, norms, final layer | replicated | small (no `hs²` or `hs·ff` matrices) and needed whole by every rank; sharding them would add communication for no memory worth saving |
//!
//! **On a U-Net** (distrifuser's split) the transformer blocks are split the same way (the
//! GEGLU projection column-parallel in two chunks: this rank's columns of the value half and
//! of the gate half), and so is every resnet: `conv1` and `time_emb_proj` column-parallel
//! (output channels), `norm2` over the local channels' whole groups, `conv2` row-parallel
//! (input channels) with one all-reduce of its output and its bias added once after.
//! `norm1`, shortcuts, samplers, `conv_in`/`conv_out`, embeddings and the transformers'
//! `proj_in`/`proj_out` are replicated.
//!
//! The model reads only its own slices from the safetensors files (a rank never holds the
//! full weights of a sharded layer, not even while loading): the strategy hands it a
//! [`LoadPlan`] with `tensor_shard = Shard { rank, world: N }`.
//!
//! ## Constraints
//! Heads and the feed-forward width divisible by `N`; on a U-Net the heads of every level and
//! the GroupNorm groups too (checked before any work, naming the number at fault).
//!
//! ## Config keys
//! None: `harness run --strategy tensor --world-size N`.
//!
//! ## Communication (per denoising step, per rank `r`)
//! One all-reduce after every row-parallel projection, of `B · p · hs` elements (the whole
//! token stream), counted as a ring all-reduce, `2·size·(N−1)/N`:
//!
//! ```text
//! all_reduce = L · k · (2 · B·p·hs · (N − 1)/N)    k = 3 with cross-attention (PixArt), 2 without (DiT)
//! ```
//! On a U-Net, one ring all-reduce per reduce site ([`ModelDesc::feature_sites`]: three per
//! transformer layer, one per resnet) of `B · C · h_s · w_s` (the map at that resolution):
//!
//! ```text
//! all_reduce = Σ_reduce 2 · B·C·h_s·w_s · (N − 1)/N
//! ```
//!
//! No output gather: every rank computes every token. Parameters per rank:
//! `(sharded block parameters)/N + replicated parameters`.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use parallel_core::comm::all_reduce_elements;
use parallel_core::{
    Comm, CurrentRequest, Denoiser, DenoiserInput, ExpectedComm, FeatureSite, LoadPlan, ModelDesc,
    ModelFamily, NoOptions, OpKind, ParallelError, ParallelStrategy, ReduceSite, Reference,
    Registry, RequestInfo, Result, Seams, Shard, StepKind, StrategyInfo, SuiteCase,
};

/// The registered name.
pub const NAME: &str = "tensor";

/// The strategy's config for library users (it takes no options).
pub const CONFIG: NoOptions = NoOptions(NAME);

/// Tensor parallelism over the whole world.
pub struct TensorParallel<B: Backend> {
    world: Comm<B>,
    request: CurrentRequest,
}

impl<B: Backend> TensorParallel<B> {
    /// Tensor parallelism over every rank of `world`.
    pub fn new(world: Comm<B>) -> Self {
        TensorParallel { world, request: CurrentRequest::default() }
    }

    /// This rank's shard.
    pub fn shard(&self) -> Shard {
        Shard { rank: self.world.rank(), world: self.world.size() }
    }
}

struct TpSeams<'a, B: Backend> {
    comm: &'a Comm<B>,
}

impl<B: Backend> Seams<B> for TpSeams<'_, B> {
    fn reduce_partial(
        &mut self,
        _site: &ReduceSite,
        partial: Tensor<B, 3>,
    ) -> Result<Tensor<B, 3>> {
        Ok(self.comm.all_reduce_sum(partial)?)
    }
}

/// The description for the registry.
pub fn info() -> StrategyInfo {
    StrategyInfo {
        name: NAME,
        summary: "heads and MLP columns split; all-reduce after each row-parallel projection (fresh K/V, P/N weights)",
        options: vec![],
        suite: vec![SuiteCase::new(&[1, 2, 4], Reference::Serial)],
    }
}

/// Registers `tensor`.
pub fn register<B: Backend>(registry: &mut Registry<B>) {
    registry.register(info(), |comm, _| Ok(Box::new(TensorParallel::new(comm))));
}

impl<B: Backend> ParallelStrategy<B> for TensorParallel<B> {
    fn name(&self) -> &str {
        NAME
    }

    fn comm(&self) -> &Comm<B> {
        &self.world
    }

    fn validate(&self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        let n = self.world.size();
        let unsupported =
            |reason: String| ParallelError::Unsupported { strategy: NAME.into(), reason };
        if model.family == ModelFamily::Unet {
            for site in &model.feature_sites {
                if let FeatureSite::SelfAttention { heads, channels, .. } = site
                    && !heads.is_multiple_of(n)
                {
                    return Err(unsupported(format!(
                        "a transformer of {} has {heads} attention heads ({channels} channels), \
                         not divisible by {n} ranks; use a world size that divides every \
                         attention level's heads",
                        model.class_name
                    )));
                }
                if let FeatureSite::GroupNorm { groups, channels, .. } = site
                    && !groups.is_multiple_of(n)
                {
                    return Err(unsupported(format!(
                        "a GroupNorm of {} has {groups} groups of {channels} channels, not \
                         divisible by {n} ranks (a resnet's norm2 is split by whole groups)",
                        model.class_name
                    )));
                }
            }
            return model.check_whole_grid(request.grid);
        }
        if !model.num_heads.is_multiple_of(n) {
            return Err(unsupported(format!(
                "{} has {} attention heads, not divisible by {n} ranks; use a world size that \
                 divides {}",
                model.class_name, model.num_heads, model.num_heads
            )));
        }
        if !model.ff_inner.is_multiple_of(n) {
            return Err(unsupported(format!(
                "the feed-forward width {} of {} is not divisible by {n} ranks",
                model.ff_inner, model.class_name
            )));
        }
        model.check_grid(request.grid)
    }

    fn load_plan(&self, model: &ModelDesc) -> Result<LoadPlan> {
        let _ = model;
        Ok(LoadPlan { tensor_shard: Some(self.shard()), ..LoadPlan::full() })
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
        self.request.check_input(NAME, input)?;
        let mut seams = TpSeams { comm: &self.world };
        model.forward_rows(input, 0..input.grid().height, &mut seams)
    }

    fn expected_comm(
        &self,
        model: &ModelDesc,
        request: &RequestInfo,
        _step: StepKind,
    ) -> Result<ExpectedComm> {
        // Every evaluation, warmup or not, forward or step, moves the same all-reduces.
        let (n, r) = (self.world.size(), self.world.rank());
        if model.family == ModelFamily::Unet {
            // A side of the map `scale` latent rows per row: halved, rounding up, per level.
            let side = |len: usize, scale: usize| {
                (0..scale.trailing_zeros()).fold(len, |l, _| l.div_ceil(2))
            };
            let mut e = ExpectedComm::none(format!(
                "tensor (U-Net): Σ_reduce ring all-reduce of B·C·h_s·w_s; B={} N={n}",
                request.batch
            ));
            for site in &model.feature_sites {
                if let FeatureSite::Reduce { channels, scale } = *site {
                    let map = side(request.grid.height, scale) * side(request.grid.width, scale);
                    let size = (request.batch * channels * map) as u64;
                    e.add(OpKind::AllReduce, all_reduce_elements(size, r as u64, n as u64));
                }
            }
            return Ok(e);
        }
        let p = model.tokens(request.grid).len();
        let size = (request.batch * p * model.hidden_size) as u64;
        if model.family == ModelFamily::MmDit {
            // Per block: the image stream's attention and MLP outputs (+ the dual attention's),
            // and the text stream's where its output is used.
            let text = (request.batch * request.text_tokens * model.hidden_size) as u64;
            let ring = |size| all_reduce_elements(size, r as u64, n as u64);
            let mut e = ExpectedComm::none(format!(
                "tensor (MMDiT): ring all-reduce of B·p·hs per image reduce (2 per block, +1 \
                 with dual attention) and of B·T·hs per text reduce (2 per block where its \
                 output is used); a single-stream block: one of B·(p + T)·hs (B·p·hs in the \
                 last); L={} B={} p={p} T={} hs={} N={n}",
                model.num_layers, request.batch, request.text_tokens, model.hidden_size
            ));
            for layer in &model.joint_layers {
                if layer.single_stream {
                    // One packed output projection over the block's whole stream.
                    let text = if layer.text_out { request.text_tokens } else { 0 };
                    let stream = (request.batch * (p + text) * model.hidden_size) as u64;
                    e.add(OpKind::AllReduce, ring(stream));
                    continue;
                }
                let image = 2 + u64::from(layer.image_attention);
                e.add(OpKind::AllReduce, image * ring(size));
                if layer.text_out {
                    e.add(OpKind::AllReduce, 2 * ring(text));
                }
            }
            return Ok(e);
        }
        let k = if model.cross_attention { 3 } else { 2 };
        let mut e = ExpectedComm::none(format!(
            "tensor: L·k·ring all-reduce of B·p·hs; L={} k={k} B={} p={p} hs={} N={n}",
            model.num_layers, request.batch, model.hidden_size
        ));
        e.add(
            OpKind::AllReduce,
            model.num_layers as u64 * k * all_reduce_elements(size, r as u64, n as u64),
        );
        Ok(e)
    }
}

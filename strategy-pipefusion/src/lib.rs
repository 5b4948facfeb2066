//! # strategy-pipefusion: displaced patch pipeline parallelism (PipeFusion)
//!
//! ## Algorithm
//! The `L` transformer blocks are split into `N` contiguous **stages**, one per rank
//! (`blocks_per_stage`, else as even as possible, earlier stages longer). A rank loads
//! only its own blocks — plus the patch embedding on the first stage and the final layer
//! on the last; the small conditioning embeddings (timestep, caption, class) are
//! replicated, since every block reads them. The latent is split by token rows into `M`
//! **patches** (`num_pipeline_patch`, balanced, longer first: an uneven last patch is
//! fine).
//!
//! Each stage keeps, per own layer, a K/V buffer of the *full* sequence. A stage runs its
//! blocks on one patch at a time: the patch's fresh K/V overwrite their slice of the buffer
//! and attention reads the whole buffer — patches earlier in this step are fresh, later ones
//! one step stale. A stage sends each patch's activations to the next stage; the last stage
//! finishes the patch (final layer, guidance, the scheduler step on that patch's rows with
//! that region's own scheduler state) and sends the updated latent patch to stage 0 for the
//! next step, so the pipeline flows across diffusion steps without emptying:
//!
//! ```text
//! M = 4 patches, N = 3 stages; (t, m) = step t, patch m; time runs right
//! stage 0: (t,0) (t,1) (t,2) (t,3) (t+1,0) (t+1,1) ...
//! stage 1:       (t,0) (t,1) (t,2) (t,3)   (t+1,0) ...
//! stage 2:             (t,0) (t,1) (t,2)   (t,3)   (t+1,0) ...
//!                        └─ latent patch (t,0) → stage 0, needed for (t+1,0)
//! ```
//!
//! The first `warmup_steps` (≥ 1, default 1, the setting of the PipeFusion paper and xDiT)
//! run synchronously on the whole latent through all stages, which fills every buffer with
//! fresh K/V. Every message is tagged with what it is (kind, step, patch) and checked on
//! arrival: a mismatch is an error naming both, never a silent mix-up. After the last step
//! the last stage broadcasts the final latents so that every rank returns them.
//!
//! A single [`forward`](ParallelStrategy::forward) (no scheduler) runs synchronously and
//! broadcasts the noise prediction from the last stage: it equals serial.
//!
//! ## PipeFusion × Ulysses (`ulysses_degree = u > 1`)
//! As xDiT lays it out: the `N` ranks form `N/u` stages of `u` ranks each (the mesh
//! `pipefusion × ulysses`, Ulysses innermost, so a stage's ranks are neighbours). Every patch
//! (and the whole latent in a synchronous step) is split again by token rows over the stage's
//! `u` ranks; at every self-attention the stage's ranks exchange q/k/v by all-to-all (scatter
//! heads, gather the patch's tokens), each attends with `H/u` heads over its K/V buffer of the
//! full sequence — so the buffer is **sharded by heads**, `[2, B, H/u, p, d]` — and the output
//! returns to the token split. Rank `j` of a stage passes its rows' activations to rank `j` of
//! the next; the last stage's ranks all-gather their rows of the patch's noise prediction, each
//! steps the patch (identically) and sends it back to rank `j` of stage 0. The definition is
//! PipeFusion's: Ulysses attention is exact, so which K/V are fresh or stale does not change.
//!
//! ## PipeFusion × Ring and × USP (`ring_degree = r > 1`)
//! A stage may also be a ring of `r` positions, each a Ulysses group of `u` ranks (USP; `u`
//! may be 1): the mesh `pipefusion × ring × ulysses`, a stage's `u·r` ranks neighbours, and
//! every patch split by token rows over them in stage order, so ring position `i` holds the
//! rows of its Ulysses group (its *superband* of the patch). The K/V buffer is sharded by ring
//! position as well: position `i` keeps, per own layer, the K/V of its superband of **every**
//! patch, concatenated in patch order (`[2, B, H/u, p_i, d]`, `Σ p_i = p`), so a patch's fresh
//! K/V overwrite a slot of the local buffer and a patch pass attends its queries to every
//! position's whole buffer round the ring (as xDiT's ring attention does with its K/V cache);
//! attention over keys does not depend on their order, so the buffer's order is free.
//!
//! The synchronous warmup step splits the *whole* latent over the stage instead (position
//! `i` holds superband `i` of the latent, not of every patch), so its buffers are not its
//! own K/V: as the blocks pass round the ring, each position keeps the tokens of every
//! block its buffer holds ([`RingAttention::attend_visiting`]) — every token passes every
//! position once, so the buffers fill with no transfer of their own. The definition (and
//! the conformance reference) is PipeFusion's: ring attention is exact.
//!
//! ## MMDiT (SD3, SD3.5, FLUX.1)
//! An MMDiT's staged stream is its text tokens followed by the pass's image tokens (see
//! `models-dit`'s staged interface), so every pass — the synchronous one and each patch —
//! carries the whole text stream from stage to stage and recomputes it: at every joint
//! attention the pass's text queries, keys and values are fresh, joined once to the image K/V
//! the buffers give (never buffered, never sent round a ring), as xDiT's "joint tensors". The
//! buffers are kept per attention *site*, so SD3.5's second (image-only) attention of a
//! dual-attention block has its own. With Ulysses the text's heads are sliced locally and
//! its output all-gathered over heads. The definition (and the conformance reference) is
//! PipeFusion's with the text fresh: each patch runs the whole text stream against the
//! image K/V of earlier patches fresh and later ones one step stale.
//!
//! ## Constraints
//! `L ≥ N/(u·r)` (every stage holds at least one block); `1 ≤ M ≤ token rows`, and every
//! patch has at least `u·r` token rows; `u` divides the heads, `u·r` divides `N`;
//! `warmup_steps ≥ 1` (the buffers must be full before stale reads).
//!
//! ## Config keys
//! `num_pipeline_patch` (M, default = the number of stages), `warmup_steps` (default 1),
//! `blocks_per_stage` (comma-separated counts, e.g. `"10,9,9"`; default even),
//! `ulysses_degree` (Ulysses ranks of each stage, default 1), `ring_degree` (ring positions
//! of each stage, default 1); stages = `N / (ulysses_degree · ring_degree)`.
//!
//! ## Communication (per denoising step, per rank `s`)
//! `B` the model batch (guidance included), `Bi` the image batch, `p` tokens, `hs` hidden:
//!
//! ```text
//! stage s < N−1: send = B · (T + p) · hs    (every patch's activations, once; no factor L;
//!                                           T: an MMDiT's text tokens per pass, else 0)
//! stage N−1:     send = Bi · C · H · W      (every updated latent patch back to stage 0)
//! per request, once: broadcast of the final latents from the last stage (Bi·C·H·W·(N−1))
//! ```
//! In a synchronous step the same volumes move as one message each. With `u > 1` a rank
//! sends its rows' share of the activations (`B · n · hs`), and adds per own layer and patch
//! (token count `T`, its rows `n`) the Ulysses all-to-alls `3·B·H·n·d·(u−1)/u + B·(H/u)·d·(T−n)`,
//! and on the last stage the all-gather of its rows of the prediction
//! (`B·C_out·rows·W·(u·r−1)`). With `r > 1`, per own layer and pass, ring position `i` sends
//! `2·B·(H/u)·d·Σ_(j≠i+1) m_j`, `m_j` being position `j`'s tokens of the pass in a
//! synchronous step and of its buffers (`p_j`) in a patch pass: a patch pass circulates the
//! whole sharded buffer, `M` times a step — the price of holding `1/r` of it.
//! Memory: the K/V buffers hold `L_s · 2 · B · p · hs / (u·r)` elements on a rank of stage
//! `s` (own layers only); parameters ≈ block parameters / (N/(u·r)) + the replicated
//! embeddings.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use parallel_core::attention::{joint_sdpa, sdpa};
use parallel_core::split::balanced;
use parallel_core::{
    AttentionSite, Axis, Comm, CurrentRequest, DenoiseLoop, Denoiser, DenoiserInput, ExpectedComm,
    JointOutput, LoadPlan, Mesh, ModelDesc, ModelFamily, OpKind, OptionInfo, OptionValue,
    ParallelError, ParallelStrategy, PendingSend, Reference, Registry, RequestInfo, Result, Seams,
    StagedDenoiser, StepKind, StrategyConfig, StrategyInfo, StrategyOptions, SuiteCase, Tag,
    TextQkv,
};
use strategy_ring::RingAttention;

/// The registered name.
pub const NAME: &str = "pipefusion";
/// Default synchronous warmup steps.
pub const DEFAULT_WARMUP_STEPS: usize = 1;

const ACT: &str = "activations";
const ACT_SYNC: &str = "activations_sync";
const LATENT: &str = "latent_patch";
const LATENT_SYNC: &str = "latent_sync";

/// PipeFusion's options, as a typed value (the keys of `harness list`, TOML and flags).
///
/// ```
/// use parallel_core::StrategyConfig;
/// let c = strategy_pipefusion::PipeFusionConfig::default().with_num_pipeline_patch(2);
/// assert_eq!(c.name(), "pipefusion");
/// let back = strategy_pipefusion::PipeFusionConfig::from_options(&c.options()).unwrap();
/// assert_eq!(back, c);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipeFusionConfig {
    /// Patches `M` the latent is split into (`None`: the world size).
    pub num_pipeline_patch: Option<usize>,
    /// Synchronous whole-latent steps first (≥ 1).
    pub warmup_steps: usize,
    /// Blocks of each stage (`None`: as even as possible, earlier stages longer).
    pub blocks_per_stage: Option<Vec<usize>>,
    /// Ulysses ranks of each stage, splitting every patch again (1: none).
    pub ulysses_degree: usize,
    /// Ring positions of each stage (each a Ulysses group), splitting every patch again
    /// (1: none). A stage has `ulysses_degree × ring_degree` ranks.
    pub ring_degree: usize,
}

impl Default for PipeFusionConfig {
    fn default() -> Self {
        PipeFusionConfig {
            num_pipeline_patch: None,
            warmup_steps: DEFAULT_WARMUP_STEPS,
            blocks_per_stage: None,
            ulysses_degree: 1,
            ring_degree: 1,
        }
    }
}

impl PipeFusionConfig {
    /// This config with `m` patches.
    pub fn with_num_pipeline_patch(mut self, m: usize) -> Self {
        self.num_pipeline_patch = Some(m);
        self
    }

    /// This config with `w` warmup steps.
    pub fn with_warmup_steps(mut self, w: usize) -> Self {
        self.warmup_steps = w;
        self
    }

    /// This config with explicit block counts per stage.
    pub fn with_blocks_per_stage(mut self, counts: Vec<usize>) -> Self {
        self.blocks_per_stage = Some(counts);
        self
    }

    /// This config with stages of `u` Ulysses ranks.
    pub fn with_ulysses_degree(mut self, u: usize) -> Self {
        self.ulysses_degree = u;
        self
    }

    /// This config with stages of `r` ring positions.
    pub fn with_ring_degree(mut self, r: usize) -> Self {
        self.ring_degree = r;
        self
    }

    /// The config of registry options (the one parser of PipeFusion's option values).
    pub fn from_options(opts: &StrategyOptions) -> Result<Self> {
        let blocks = match opts.string("blocks_per_stage", "")?.as_str() {
            "" => None,
            s => Some(
                s.split(',')
                    .map(|x| x.trim().parse::<usize>())
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| {
                        bad("blocks_per_stage", format!("`{s}` is not a list of counts: {e}"))
                    })?,
            ),
        };
        Ok(PipeFusionConfig {
            num_pipeline_patch: opts.opt_usize("num_pipeline_patch")?,
            warmup_steps: opts.usize("warmup_steps", DEFAULT_WARMUP_STEPS)?,
            blocks_per_stage: blocks,
            ulysses_degree: opts.usize("ulysses_degree", 1)?,
            ring_degree: opts.usize("ring_degree", 1)?,
        })
    }
}

impl StrategyConfig for PipeFusionConfig {
    fn name(&self) -> &'static str {
        NAME
    }

    fn options(&self) -> StrategyOptions {
        let mut o = StrategyOptions::new(NAME)
            .with("warmup_steps", OptionValue::Int(self.warmup_steps as i64));
        if let Some(m) = self.num_pipeline_patch {
            o.set("num_pipeline_patch", OptionValue::Int(m as i64));
        }
        if let Some(b) = &self.blocks_per_stage {
            let text: Vec<String> = b.iter().map(usize::to_string).collect();
            o.set("blocks_per_stage", OptionValue::Str(text.join(",")));
        }
        if self.ulysses_degree != 1 {
            o.set("ulysses_degree", OptionValue::Int(self.ulysses_degree as i64));
        }
        if self.ring_degree != 1 {
            o.set("ring_degree", OptionValue::Int(self.ring_degree as i64));
        }
        o
    }
}

/// PipeFusion over its group: `N/(u·r)` stages of `r` ring positions × `u` Ulysses ranks.
pub struct PipeFusion<B: Backend> {
    world: Comm<B>,
    /// The stages at this rank's (ring, Ulysses) coordinate, in order: rank `s` is stage `s`.
    pipe: Comm<B>,
    /// This rank's stage: its `u·r` ranks (rank `i·u + j` at ring position `i`, Ulysses `j`).
    stage: Comm<B>,
    /// This rank's Ulysses group within the stage.
    ulysses: Comm<B>,
    /// The ring over this stage's Ulysses groups (one rank: no ring).
    ring: RingAttention<B>,
    /// Stage passes this request (sync or patch): each one's ring messages are tagged by it.
    passes: u32,
    links: Links<B>,
    patches: Option<usize>,
    warmup_steps: usize,
    blocks_per_stage: Option<Vec<usize>>,
    /// Per attention site of the own blocks (a block's, and SD3.5's second attention of a
    /// dual-attention block): `[2, B, H/u, p_i, d]`, the image K/V of this rank's ring
    /// position's rows of every patch (with `r = 1`: every token, `p`).
    buffers: BTreeMap<usize, Tensor<B, 5>>,
    /// Sends started and not yet waited on (waited as they complete, all by the end).
    sending: VecDeque<PendingSend>,
    request: CurrentRequest,
}

/// The pipeline's links, each a 2-rank communicator of its own (its own stream, as NCCL
/// gives a split communicator): activations from the previous stage and to the next, and
/// latent patches from the last stage back to stage 0. Separate streams are what keeps the
/// cycle s → s+1 → … → last → 0 from deadlocking under rendezvous sends: a patch sent back
/// to stage 0 does not hold up the next patch's activations arriving.
struct Links<B: Backend> {
    /// `{s − 1, s}`: this stage is rank 1 (`None` on stage 0). Stages are counted along
    /// `pipe` (the stages at one Ulysses coordinate).
    prev: Option<Comm<B>>,
    /// `{s, s + 1}`: this stage is rank 0 (`None` on the last stage).
    next: Option<Comm<B>>,
    /// `{0, N − 1}` on those two stages (`None` elsewhere, and for one stage).
    latent: Option<Comm<B>>,
}

impl<B: Backend> Links<B> {
    /// Every rank makes its splits in the same order: activation links, then the latent one.
    fn new(world: &Comm<B>) -> Result<Self> {
        let (s, n) = (world.rank(), world.size());
        let w = world.members();
        let prev = if s > 0 { Some(world.split_members(&[w[s - 1], w[s]])?) } else { None };
        let next = if s + 1 < n { Some(world.split_members(&[w[s], w[s + 1]])?) } else { None };
        let latent = if n > 1 && (s == 0 || s + 1 == n) {
            Some(world.split_members(&[w[0], w[n - 1]])?)
        } else {
            None
        };
        Ok(Links { prev, next, latent })
    }
}

fn missing_link(which: &str) -> ParallelError {
    ParallelError::State { strategy: NAME.into(), reason: format!("no {which} link on this stage") }
}

impl<B: Backend> PipeFusion<B> {
    /// PipeFusion over `world` as `config` says.
    ///
    /// # Errors
    /// A bad option, naming its key: no warmup step, no patch, block counts that are not one
    /// positive count per stage.
    pub fn new(world: Comm<B>, config: &PipeFusionConfig) -> Result<Self> {
        let PipeFusionConfig {
            num_pipeline_patch: patches,
            warmup_steps,
            blocks_per_stage,
            ulysses_degree: u,
            ring_degree: r,
        } = config.clone();
        let size = world.size();
        for (key, degree) in [("ulysses_degree", u), ("ring_degree", r)] {
            if degree == 0 || !size.is_multiple_of(degree) {
                return Err(bad(
                    key,
                    format!(
                        "{degree} does not divide the {size} ranks (stages × ulysses_degree × \
                         ring_degree = ranks)"
                    ),
                ));
            }
        }
        if !size.is_multiple_of(u * r) {
            return Err(bad(
                "ring_degree",
                format!(
                    "ulysses_degree {u} × ring_degree {r} = {} does not divide the {size} ranks \
                     (stages × ulysses_degree × ring_degree = ranks)",
                    u * r
                ),
            ));
        }
        let mesh = Mesh::new(
            size,
            &[(Axis::PipeFusion, size / (u * r)), (Axis::Ring, r), (Axis::Ulysses, u)],
        )
        .map_err(|e| bad("ulysses_degree", e.to_string()))?;
        let pipe = world.split(&mesh, &[Axis::PipeFusion])?;
        let stage = world.split(&mesh, &[Axis::Ring, Axis::Ulysses])?;
        let ulysses = world.split(&mesh, &[Axis::Ulysses])?;
        let ring = RingAttention::new(world.split(&mesh, &[Axis::Ring])?);
        let n = pipe.size();
        if warmup_steps == 0 {
            return Err(bad(
                "warmup_steps",
                "must be ≥ 1: the K/V buffers are filled by a synchronous step".into(),
            ));
        }
        if patches == Some(0) {
            return Err(bad("num_pipeline_patch", "must be ≥ 1".into()));
        }
        if let Some(b) = &blocks_per_stage
            && (b.len() != n || b.contains(&0))
        {
            return Err(bad(
                "blocks_per_stage",
                format!("needs {n} positive counts (one per stage), got {b:?}"),
            ));
        }
        let links = Links::new(&pipe)?;
        Ok(PipeFusion {
            world,
            pipe,
            stage,
            ulysses,
            ring,
            passes: 0,
            links,
            sending: VecDeque::new(),
            patches,
            warmup_steps,
            blocks_per_stage,
            buffers: BTreeMap::new(),
            request: CurrentRequest::default(),
        })
    }

    /// The number of patches (default: the number of stages).
    pub fn num_patches(&self) -> usize {
        self.patches.unwrap_or(self.pipe.size())
    }

    /// Ulysses ranks of each stage's ring positions (the Ulysses degree).
    pub fn ulysses_degree(&self) -> usize {
        self.ulysses.size()
    }

    /// Ring positions of each stage (the ring degree).
    pub fn ring_degree(&self) -> usize {
        self.ring.comm().size()
    }

    /// The blocks of every stage.
    pub fn stages(&self, model: &ModelDesc) -> Result<Vec<Range<usize>>> {
        let n = self.pipe.size();
        let l = model.num_layers;
        match &self.blocks_per_stage {
            Some(counts) => {
                if counts.iter().sum::<usize>() != l {
                    return Err(bad(
                        "blocks_per_stage",
                        format!(
                            "{counts:?} sums to {} but {} has {l} blocks",
                            counts.iter().sum::<usize>(),
                            model.class_name
                        ),
                    ));
                }
                let mut start = 0;
                Ok(counts
                    .iter()
                    .map(|c| {
                        let r = start..start + c;
                        start += c;
                        r
                    })
                    .collect())
            }
            None => {
                if l < n {
                    return Err(ParallelError::Unsupported {
                        strategy: NAME.into(),
                        reason: format!(
                            "{} has {l} transformer blocks, fewer than the {n} pipeline stages; \
                             use at most {l} ranks",
                            model.class_name
                        ),
                    });
                }
                Ok(balanced(l, n))
            }
        }
    }

    fn patch_rows(&self, model: &ModelDesc, request: &RequestInfo) -> Result<Vec<Range<usize>>> {
        model.check_grid(request.grid)?;
        let rows = model.tokens(request.grid).rows;
        let m = self.num_patches();
        if m > rows {
            return Err(bad(
                "num_pipeline_patch",
                format!(
                    "{m} patches but the latent has only {rows} token rows (height {}); use at \
                     most {rows}",
                    request.grid.height
                ),
            ));
        }
        let (u, r) = (self.ulysses_degree(), self.ring_degree());
        let patches = balanced(rows, m);
        if let Some(short) = patches.iter().find(|p| p.len() < u * r) {
            return Err(bad(
                "num_pipeline_patch",
                format!(
                    "{m} patches of the latent's {rows} token rows leave a patch of {} rows, \
                     fewer than the {} ranks of a stage (ulysses_degree {u} × ring_degree {r}) \
                     that split every patch; use at most {} patches",
                    short.len(),
                    u * r,
                    rows / (u * r)
                ),
            ));
        }
        Ok(patches)
    }

    fn is_last(&self) -> bool {
        self.pipe.rank() + 1 == self.pipe.size()
    }

    /// The group rank of the last stage's first rank: the root of the final broadcast.
    fn root(&self) -> usize {
        (self.pipe.size() - 1) * self.stage.size()
    }

    /// How token rows `rows` (a patch, or the whole latent) are split over this stage.
    fn split(&self, rows: &Range<usize>, cols: usize) -> PassSplit {
        let u = self.ulysses_degree();
        let parts = balanced(rows.len(), self.stage.size());
        let i = self.ring.comm().rank();
        let at = |p: &Range<usize>| rows.start + p.start..rows.start + p.end;
        let group = &parts[i * u..(i + 1) * u];
        PassSplit {
            mine: at(&parts[self.stage.rank()]),
            ulysses_tokens: group.iter().map(|p| p.len() * cols).collect(),
            ring_rows: (0..self.ring_degree())
                .map(|o| at(&(parts[o * u].start..parts[(o + 1) * u - 1].end)))
                .collect(),
        }
    }

    /// Token ranges of what ring position `i`'s K/V buffers hold, in buffer order: its rows
    /// of every patch.
    fn buffer_pieces(patches: &[PassSplit], i: usize, cols: usize) -> Vec<Range<usize>> {
        patches.iter().map(|p| p.ring_rows[i].start * cols..p.ring_rows[i].end * cols).collect()
    }

    /// Runs this stage's blocks on this rank's token rows `mine` of patch `patch` (token
    /// rows), reading and refreshing the buffers.
    fn run_stage(
        &mut self,
        model: &dyn StagedDenoiser<B>,
        hidden: Tensor<B, 3>,
        split: &PassSplit,
        pass: Pass,
        cond: &parallel_core::Conditioning,
    ) -> Result<Tensor<B, 3>> {
        let blocks = model.held_blocks();
        self.ring.begin_forward(self.passes);
        self.passes += 1;
        let mut seams = PfSeams {
            buffers: &mut self.buffers,
            ulysses: (self.ulysses.size() > 1).then_some(&self.ulysses),
            ulysses_tokens: split.ulysses_tokens.clone(),
            ring: (self.ring.comm().size() > 1).then_some(&mut self.ring),
            pass,
        };
        let mut h = hidden;
        for i in blocks {
            h = model.block(i, h, split.mine.clone(), cond, &mut seams)?;
        }
        Ok(h)
    }

    /// The prediction of this rank's rows, gathered over the stage: the patch's.
    fn gather_noise(&self, noise: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        if self.stage.size() == 1 {
            return Ok(noise);
        }
        Ok(self.stage.all_gather(noise, 2)?)
    }

    fn staged<'m>(&self, model: &'m dyn Denoiser<B>) -> Result<&'m dyn StagedDenoiser<B>> {
        model.staged().ok_or_else(|| ParallelError::Unsupported {
            strategy: NAME.into(),
            reason: format!(
                "{} is not a stack of transformer blocks; PipeFusion needs a DiT",
                model.desc().class_name
            ),
        })
    }

    /// One synchronous pass of the whole latent through the pipeline; the noise prediction
    /// on the last stage (`None` elsewhere).
    fn sync_pass(
        &mut self,
        model: &dyn StagedDenoiser<B>,
        input: &DenoiserInput<B>,
        step: usize,
    ) -> Result<Option<Tensor<B, 4>>> {
        let (s, n) = (self.pipe.rank(), self.pipe.size());
        let cond = model.condition(input)?;
        let cols = cond.grid.cols;
        let split = self.split(&(0..cond.grid.rows), cols);
        let request = self.request.get(NAME)?.clone();
        let patches: Vec<PassSplit> =
            self.patch_rows(model.desc(), &request)?.iter().map(|p| self.split(p, cols)).collect();
        let pass = Pass::Sync {
            origins: split.ring_rows.iter().map(|r| r.start * cols..r.end * cols).collect(),
            pieces: Self::buffer_pieces(&patches, self.ring.comm().rank(), cols),
        };
        let tag = Tag::new(ACT_SYNC).step(step as u32);
        let hidden = if s == 0 {
            model.embed(input, split.mine.clone(), &cond)?
        } else {
            self.prev()?.recv(0, tag.layer(s as u32))?
        };
        let hidden = self.run_stage(model, hidden, &split, pass, &cond)?;
        if s + 1 < n {
            self.next()?.send(hidden, 1, tag.layer(s as u32 + 1))?;
            Ok(None)
        } else {
            Ok(Some(self.gather_noise(model.head(hidden, split.mine, &cond)?)?))
        }
    }

    fn prev(&self) -> Result<&Comm<B>> {
        self.links.prev.as_ref().ok_or_else(|| missing_link("previous-stage"))
    }

    fn next(&self) -> Result<&Comm<B>> {
        self.links.next.as_ref().ok_or_else(|| missing_link("next-stage"))
    }

    fn latent(&self) -> Result<&Comm<B>> {
        self.links.latent.as_ref().ok_or_else(|| missing_link("latent"))
    }

    /// Keeps a started send; waits on those already complete.
    fn sent(&mut self, send: PendingSend) -> Result<()> {
        self.sending.push_back(send);
        while self.sending.front().is_some_and(PendingSend::is_ready) {
            if let Some(done) = self.sending.pop_front() {
                done.wait()?;
            }
        }
        Ok(())
    }

    /// Waits on every send started.
    fn drain(&mut self) -> Result<()> {
        while let Some(send) = self.sending.pop_front() {
            send.wait()?;
        }
        Ok(())
    }
}

fn bad(key: &str, reason: String) -> ParallelError {
    ParallelError::BadOption { strategy: NAME.into(), key: key.into(), reason }
}

/// How one pass's token rows (a patch, or the whole latent) are split over a stage.
struct PassSplit {
    /// This rank's token rows.
    mine: Range<usize>,
    /// Tokens of each member of this rank's Ulysses group, in group order.
    ulysses_tokens: Vec<usize>,
    /// Token rows of each ring position (its Ulysses group's rows together), in ring order.
    ring_rows: Vec<Range<usize>>,
}

/// What a stage pass does with the K/V buffers.
enum Pass {
    /// The whole latent, fresh: attention over every token's fresh K/V, and the buffers
    /// rebuilt from them.
    Sync {
        /// Tokens of each ring position's K/V block in this pass, in ring order.
        origins: Vec<Range<usize>>,
        /// Tokens this rank's buffers hold, in buffer order.
        pieces: Vec<Range<usize>>,
    },
    /// One patch: its fresh K/V replace their slot of the buffers, starting at `offset`;
    /// attention reads the whole buffer (of every ring position).
    Patch {
        /// The patch's first token in this rank's buffers.
        offset: usize,
    },
}

struct PfSeams<'a, B: Backend> {
    /// By attention site (`AttentionSite::layer`).
    buffers: &'a mut BTreeMap<usize, Tensor<B, 5>>,
    /// The Ulysses group (`None` with one Ulysses rank).
    ulysses: Option<&'a Comm<B>>,
    /// Tokens of every Ulysses group member's share of the pass, in group order.
    ulysses_tokens: Vec<usize>,
    /// The ring over the stage's Ulysses groups (`None` with one ring position).
    ring: Option<&'a mut RingAttention<B>>,
    pass: Pass,
}

impl<B: Backend> PfSeams<'_, B> {
    /// Attention of this rank's image tokens (and, for an MMDiT, of the text stream) at
    /// `site`: the image K/V through the buffers as the pass says, the text's — fresh in
    /// every pass, whole on every rank of the stage — joined once (never buffered, never
    /// sent round a ring).
    fn attend(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        text: Option<TextQkv<B>>,
    ) -> Result<JointOutput<B>> {
        let PfSeams { buffers, ulysses, ulysses_tokens, ring, pass } = self;
        let heads = q.dims()[1] / ulysses.map_or(1, |g| g.size());
        let (q, k, v) = match ulysses {
            // [B, 3, H, n, d]: one all-to-all for q, k and v (scatter heads, gather the
            // Ulysses group's tokens in group order).
            Some(group) => {
                let qkv = Tensor::stack::<5>(vec![q, k, v], 1);
                let qkv = group.all_to_all(qkv, 2, 3)?;
                let part = |i| qkv.clone().narrow(1, i, 1).squeeze_dim::<4>(1);
                (part(0), part(1), part(2))
            }
            None => (q, k, v),
        };
        // The text stream is whole on every rank of the stage: this rank's heads of it.
        let text = text.map(|t| match ulysses {
            Some(group) => {
                let mine = |x: Tensor<B, 4>| x.narrow(1, group.rank() * heads, heads);
                TextQkv { q: t.q.map(mine), k: mine(t.k), v: mine(t.v) }
            }
            None => t,
        });
        let attend = |q, k, v, text: Option<TextQkv<B>>| match text {
            Some(text) => joint_sdpa(q, k, v, text),
            None => (sdpa(q, k, v, None), None),
        };
        let layer = site.layer;
        let (image, text) = match pass {
            Pass::Sync { origins, pieces } => match ring {
                // Attention round the ring; from every block that passes, keep the tokens
                // this rank's buffers hold.
                Some(ring) => {
                    let mut kept: Vec<(usize, Tensor<B, 5>)> = Vec::new();
                    let mut keep = |origin: usize, kv: &Tensor<B, 5>| -> Result<()> {
                        let block = &origins[origin];
                        let mut offset = 0;
                        for piece in pieces.iter() {
                            let (a, b) = (piece.start.max(block.start), piece.end.min(block.end));
                            if a < b {
                                let part = kv.clone().narrow(3, a - block.start, b - a);
                                kept.push((offset + a - piece.start, part));
                            }
                            offset += piece.len();
                        }
                        Ok(())
                    };
                    let out = match text {
                        Some(text) => {
                            ring.attend_joint_visiting(layer, q, k, v, text, &mut keep)?
                        }
                        None => (ring.attend_visiting(layer, q, k, v, &mut keep)?, None),
                    };
                    kept.sort_by_key(|(offset, _)| *offset);
                    buffers
                        .insert(layer, Tensor::cat(kept.into_iter().map(|(_, t)| t).collect(), 3));
                    out
                }
                // One ring position: the buffers hold every token in order, all fresh.
                None => {
                    buffers.insert(layer, Tensor::stack(vec![k.clone(), v.clone()], 0));
                    attend(q, k, v, text)
                }
            },
            Pass::Patch { offset } => {
                let fresh: Tensor<B, 5> = Tensor::stack(vec![k, v], 0);
                let n = fresh.dims()[3];
                let kv = match buffers.remove(&layer) {
                    Some(buffer) if !(*offset == 0 && n == buffer.dims()[3]) => {
                        let d = buffer.dims();
                        let at = *offset..*offset + n;
                        buffer.slice_assign([0..d[0], 0..d[1], 0..d[2], at, 0..d[4]], fresh)
                    }
                    // The patch is everything this rank's buffers hold (one patch).
                    Some(_) => fresh,
                    None => {
                        return Err(ParallelError::State {
                            strategy: NAME.into(),
                            reason: format!(
                                "attention site {layer} has no K/V buffer yet: a patch step ran \
                                 before a warmup step"
                            ),
                        });
                    }
                };
                buffers.insert(layer, kv.clone());
                let k_all = kv.clone().narrow(0, 0, 1).squeeze_dim::<4>(0);
                let v_all = kv.narrow(0, 1, 1).squeeze_dim::<4>(0);
                match (ring, text) {
                    (Some(ring), Some(text)) => ring.attend_joint(layer, q, k_all, v_all, text)?,
                    (Some(ring), None) => (ring.attend(layer, q, k_all, v_all)?, None),
                    (None, text) => attend(q, k_all, v_all, text),
                }
            }
        };
        match ulysses {
            // Back to the token split: scatter the group's tokens by share, gather heads;
            // every head of the text output to every rank of the group.
            Some(group) => Ok((
                group.all_to_all_sizes(image, 2, ulysses_tokens, 1)?,
                text.map(|t| group.all_gather(t, 1)).transpose()?,
            )),
            None => Ok((image, text)),
        }
    }
}

impl<B: Backend> Seams<B> for PfSeams<'_, B> {
    fn self_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        Ok(self.attend(site, q, k, v, None)?.0)
    }

    fn joint_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        text: TextQkv<B>,
    ) -> Result<JointOutput<B>> {
        self.attend(site, q, k, v, Some(text))
    }
}

/// The description for the registry.
pub fn info() -> StrategyInfo {
    StrategyInfo {
        name: NAME,
        summary: "layers split into stages, latent into M patches pipelined across steps (stale K/V of later patches)",
        options: vec![
            OptionInfo {
                key: "num_pipeline_patch",
                default: "world size",
                doc: "patches M the latent is split into (token rows)",
            },
            OptionInfo {
                key: "warmup_steps",
                default: "1",
                doc: "synchronous whole-latent steps that fill the K/V buffers (≥ 1)",
            },
            OptionInfo {
                key: "blocks_per_stage",
                default: "even",
                doc: "comma-separated block counts per stage, e.g. \"10,9,9\"",
            },
            OptionInfo {
                key: "ulysses_degree",
                default: "1",
                doc: "Ulysses ranks of each stage, splitting every patch again by token rows \
                      (PipeFusion × Ulysses; must divide the heads and the ranks)",
            },
            OptionInfo {
                key: "ring_degree",
                default: "1",
                doc: "ring positions of each stage, splitting every patch again by token rows \
                      (PipeFusion × Ring; × ulysses_degree: PipeFusion × USP)",
            },
        ],
        suite: suite(),
    }
}

/// The conformance cases: one patch, which must equal serial exactly (every patch is the
/// whole latent, so no K/V is ever stale); the default `M = N`; `M = 2N`; two warmup steps;
/// stages that are Ulysses groups, rings and both.
fn suite() -> Vec<SuiteCase> {
    let case = |sizes: &[usize], patches: usize, warmup: usize| {
        SuiteCase::new(sizes, Reference::PipelinedPatches { patches, warmup_steps: warmup })
    };
    let m = |c: SuiteCase, patches: i64| c.with("num_pipeline_patch", OptionValue::Int(patches));
    let u = OptionValue::Int;
    vec![
        m(SuiteCase::new(&[1, 2, 4], Reference::Serial), 1),
        case(&[2], 2, 1),
        case(&[4], 4, 1),
        m(case(&[2], 4, 1), 4),
        m(case(&[4], 8, 1), 8),
        m(case(&[2, 4], 4, 2), 4).with("warmup_steps", OptionValue::Int(2)),
        // PipeFusion × Ulysses: 2 stages of 2 Ulysses ranks.
        m(SuiteCase::new(&[4], Reference::Serial), 1).with("ulysses_degree", u(2)),
        m(case(&[4], 2, 1), 2).with("ulysses_degree", u(2)),
        // PipeFusion × Ring: 2 stages of a 2-rank ring; with 4 patches a ring position's
        // buffer holds rows of every patch, which the whole-latent warmup splits otherwise.
        m(SuiteCase::new(&[4], Reference::Serial), 1).with("ring_degree", u(2)),
        m(case(&[4], 4, 1), 4).with("ring_degree", u(2)),
        // PipeFusion × USP: 2 stages of 2 ring positions × 2 Ulysses ranks.
        m(case(&[8], 2, 1), 2).with("ulysses_degree", u(2)).with("ring_degree", u(2)),
    ]
}

/// Registers `pipefusion`.
pub fn register<B: Backend>(registry: &mut Registry<B>) {
    registry.register(info(), |comm, opts: &StrategyOptions| {
        Ok(Box::new(PipeFusion::new(comm, &PipeFusionConfig::from_options(opts)?)?))
    });
}

impl<B: Backend> ParallelStrategy<B> for PipeFusion<B> {
    fn name(&self) -> &str {
        NAME
    }

    fn comm(&self) -> &Comm<B> {
        &self.world
    }

    fn validate(&self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        model.require_one_of(
            NAME,
            &[ModelFamily::Dit, ModelFamily::MmDit],
            "it pipelines a stack of transformer blocks over patches of image tokens",
        )?;
        let u = self.ulysses_degree();
        if !model.num_heads.is_multiple_of(u) {
            return Err(bad(
                "ulysses_degree",
                format!(
                    "{} has {} attention heads, not divisible by ulysses_degree {u} (each rank \
                     of a stage attends with heads / ulysses_degree)",
                    model.class_name, model.num_heads
                ),
            ));
        }
        self.stages(model)?;
        self.patch_rows(model, request)?;
        Ok(())
    }

    fn load_plan(&self, model: &ModelDesc) -> Result<LoadPlan> {
        let stages = self.stages(model)?;
        let s = self.pipe.rank();
        Ok(LoadPlan {
            tensor_shard: None,
            blocks: Some(stages[s].clone()),
            skip_embed: s != 0,
            skip_head: !self.is_last(),
        })
    }

    fn begin_request(&mut self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        self.validate(model, request)?;
        // A request that ended early may leave sends in flight: wait them out.
        self.drain()?;
        self.buffers.clear();
        self.request.begin(request);
        Ok(())
    }

    fn forward(
        &mut self,
        model: &dyn Denoiser<B>,
        input: &DenoiserInput<B>,
        step: usize,
    ) -> Result<Tensor<B, 4>> {
        self.request.check_input(NAME, input)?;
        let staged = self.staged(model)?;
        let out = self.sync_pass(staged, input, step)?;
        let last = self.root();
        let template = match out {
            Some(t) => t,
            None => {
                let grid = input.grid();
                let d = model.desc();
                Tensor::zeros(
                    [input.batch(), d.out_channels, grid.height, grid.width],
                    &input.hidden_states.device(),
                )
            }
        };
        Ok(self.world.broadcast(template, last)?)
    }

    fn denoise(
        &mut self,
        model: &dyn Denoiser<B>,
        sampler: &mut dyn DenoiseLoop<B>,
        latents: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let staged = self.staged(model)?;
        let (s, n) = (self.pipe.rank(), self.pipe.size());
        let root = self.root();
        let p = model.desc().patch_size;
        let cols = model.desc().tokens(self.request.get(NAME)?.grid).cols;
        let request = self.request.get(NAME)?.clone();
        let [images, _, height, width] = latents.dims();
        if (images, height, width) != (request.images, request.grid.height, request.grid.width) {
            return Err(ParallelError::State {
                strategy: NAME.into(),
                reason: format!(
                    "latents {:?} are not those of the request ({} images of {})",
                    latents.dims(),
                    request.images,
                    request.grid
                ),
            });
        }
        let patches = self.patch_rows(model.desc(), &request)?;
        let splits: Vec<PassSplit> = patches.iter().map(|r| self.split(r, cols)).collect();
        // Where each patch's K/V go in this rank's buffers.
        let offsets: Vec<usize> = Self::buffer_pieces(&splits, self.ring.comm().rank(), cols)
            .iter()
            .scan(0, |at, piece| {
                let offset = *at;
                *at += piece.len();
                Some(offset)
            })
            .collect();
        let mut latents = latents;
        let steps = sampler.num_steps();
        for step in 0..steps {
            let input = sampler.model_input(step, &latents)?;
            // After the last step the last stage broadcasts the latents: nothing goes back.
            let back = n > 1 && step + 1 < steps;
            if step < self.warmup_steps {
                let tag = Tag::new(LATENT_SYNC).step(step as u32);
                if let Some(noise) = self.sync_pass(staged, &input, step)? {
                    latents = sampler.step(step, 0..height, noise, latents)?;
                    if back {
                        self.latent()?.send(latents.clone(), 0, tag)?;
                    }
                } else if s == 0 && back {
                    latents = self.latent()?.recv(1, tag)?;
                }
                continue;
            }
            let cond = staged.condition(&input)?;
            for (m, rows) in patches.iter().enumerate() {
                let lat_rows = rows.start * p..rows.end * p;
                let split = &splits[m];
                let act = Tag::new(ACT).step(step as u32).patch(m as u32);
                let hidden = if s == 0 {
                    // The latent patch of the previous step arrives from the last stage
                    // (after a synchronous step, stage 0 already holds the whole latent).
                    if n > 1 && step > self.warmup_steps {
                        let tag = Tag::new(LATENT).step(step as u32 - 1).patch(m as u32);
                        let patch: Tensor<B, 4> = self.latent()?.recv(1, tag)?;
                        latents = assign_rows(latents, lat_rows.clone(), patch);
                    }
                    let input = sampler.model_input(step, &latents)?;
                    staged.embed(&input, split.mine.clone(), &cond)?
                } else {
                    self.prev()?.recv(0, act.layer(s as u32))?
                };
                let pass = Pass::Patch { offset: offsets[m] };
                let hidden = self.run_stage(staged, hidden, split, pass, &cond)?;
                if s + 1 < n {
                    // Started, not waited: the next stage takes it when it gets to it.
                    let send = self.next()?.send_async(hidden, 1, act.layer(s as u32 + 1))?;
                    self.sent(send)?;
                    continue;
                }
                let noise = self.gather_noise(staged.head(hidden, split.mine.clone(), &cond)?)?;
                let current = latents.clone().narrow(2, lat_rows.start, lat_rows.len());
                let next = sampler.step(step, lat_rows.clone(), noise, current)?;
                latents = assign_rows(latents, lat_rows.clone(), next.clone());
                if back {
                    let tag = Tag::new(LATENT).step(step as u32).patch(m as u32);
                    let send = self.latent()?.send_async(next, 0, tag)?;
                    self.sent(send)?;
                }
            }
        }
        self.drain()?;
        Ok(self.world.broadcast(latents, root)?)
    }

    /// Only the last stage steps the latents (and broadcasts them at the end).
    fn steps_latents(&self) -> bool {
        self.is_last()
    }

    fn buffer_bytes(&self) -> u64 {
        self.buffers.values().map(|t| (t.shape().num_elements() * t.dtype().size()) as u64).sum()
    }

    fn expected_comm(
        &self,
        model: &ModelDesc,
        request: &RequestInfo,
        step: StepKind,
    ) -> Result<ExpectedComm> {
        let (s, n) = (self.pipe.rank(), self.pipe.size());
        let (u, r) = (self.ulysses_degree(), self.ring_degree());
        let tokens = model.tokens(request.grid);
        let g = request.grid;
        let b = request.batch;
        let mut e = ExpectedComm::none(format!(
            "pipefusion: stage < N−1 sends its rows' activations B·(T+n)·hs (B={b}, hs={}, \
             T={} text tokens of an MMDiT); {}; no factor L{}",
            model.hidden_size,
            if model.family == ModelFamily::MmDit { request.text_tokens } else { 0 },
            match step {
                StepKind::Forward => "the last stage broadcasts the prediction (B·C_out·H·W·(N−1))",
                StepKind::Denoise(_) => {
                    "the last stage sends the latent (Bi·C·H·W) to stage 0 after every step but \
                     the last, after which it broadcasts it (·(N−1))"
                }
            },
            if u * r > 1 {
                format!(
                    "; × Ulysses u={u} × Ring r={r}: per own layer and pass 3·B·H·n·d·(u−1)/u + \
                     B·(H/u)·d·(T_g−n) all-to-all, ring L_s·2·B·(H/u)·d·Σ_(j≠i+1) m_j (m_j: ring \
                     position j's tokens of the pass, or of its buffers in a patch pass), the \
                     last stage all-gathers its rows of the prediction (·(u·r−1)), an MMDiT's \
                     text output all-gathered over heads L_text·B·(H/u)·T·d·(u−1)"
                )
            } else {
                String::new()
            }
        ));
        if self.world.size() == 1 {
            return Ok(e);
        }
        // The passes of this step: the whole latent (a synchronous step) or every patch.
        let passes: Vec<Range<usize>> = if step.is_warmup(self.warmup_steps) {
            std::iter::once(0..tokens.rows).collect()
        } else {
            self.patch_rows(model, request)?
        };
        let own = self.stages(model)?[s].clone();
        // Attention calls of the own blocks (SD3.5's dual-attention blocks have two), and
        // those whose text output the Ulysses group gathers.
        let layers = match model.joint_layers.is_empty() {
            true => own.len(),
            false => {
                own.clone().map(|i| 1 + usize::from(model.joint_layers[i].image_attention)).sum()
            }
        };
        let text_layers =
            own.clone().filter(|&i| model.joint_layers.get(i).is_some_and(|j| j.text_out)).count();
        // An MMDiT's stage passes carry the whole text stream beside the image tokens.
        let text = if model.family == ModelFamily::MmDit { request.text_tokens } else { 0 };
        let (h, d) = (model.num_heads, model.head_dim);
        let cols = tokens.cols;
        let stage = self.stage.size();
        // In a patch pass every ring position sends its whole buffer round the ring.
        let patches: Vec<PassSplit> =
            self.patch_rows(model, request)?.iter().map(|p| self.split(p, cols)).collect();
        let buffered: Vec<usize> = (0..r)
            .map(|o| Self::buffer_pieces(&patches, o, cols).iter().map(|t| t.len()).sum())
            .collect();
        let sync = step.is_warmup(self.warmup_steps);
        for rows in &passes {
            let split = self.split(rows, cols);
            let mine_tokens = split.mine.len() * cols;
            if u > 1 {
                let group_tokens: usize = split.ulysses_tokens.iter().sum();
                let there = 3 * b * h * mine_tokens * d * (u - 1) / u;
                let back = b * (h / u) * d * (group_tokens - mine_tokens);
                e.add(OpKind::AllToAll, (layers * (there + back)) as u64);
                let text_out = text_layers * b * (h / u) * text * d * (u - 1);
                e.add(OpKind::AllGather, text_out as u64);
            }
            if r > 1 {
                let blocks: Vec<usize> = if sync {
                    split.ring_rows.iter().map(|t| t.len() * cols).collect()
                } else {
                    buffered.clone()
                };
                let i = self.ring.comm().rank();
                let per_layer = RingAttention::<B>::sent_per_layer(&blocks, i, b * (h / u) * d);
                e.add(OpKind::Send, per_layer * layers as u64);
            }
            if s + 1 < n {
                e.add(OpKind::Send, (b * (text + mine_tokens) * model.hidden_size) as u64);
            } else if stage > 1 {
                let rows = split.mine.len() * model.patch_size;
                e.add(
                    OpKind::AllGather,
                    (b * model.out_channels * rows * g.width * (stage - 1)) as u64,
                );
            }
        }
        let root = self.world.rank() == self.root();
        let others = (self.world.size() - 1) as u64;
        match step {
            StepKind::Forward if root => {
                let pred = b * model.out_channels * g.height * g.width;
                e.add(OpKind::Broadcast, pred as u64 * others);
            }
            StepKind::Forward => {}
            StepKind::Denoise(_) => {
                let latent = (request.images * model.in_channels * g.height * g.width) as u64;
                if step.is_last(request.steps) {
                    if root {
                        e.add(OpKind::Broadcast, latent * others);
                    }
                } else if s + 1 == n && n > 1 {
                    e.add(OpKind::Send, latent);
                }
            }
        }
        Ok(e)
    }
}

/// `full` with latent rows `rows` replaced by `part`.
fn assign_rows<B: Backend>(
    full: Tensor<B, 4>,
    rows: Range<usize>,
    part: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, c, _, w] = full.dims();
    full.slice_assign([0..b, 0..c, rows, 0..w], part)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_flex::Flex;
    use parallel_core::{LaunchOptions, LocalComm, ModelFamily};

    fn desc(layers: usize) -> ModelDesc {
        ModelDesc {
            class_name: "Test".into(),
            family: ModelFamily::Dit,
            num_layers: layers,
            num_heads: 4,
            head_dim: 8,
            hidden_size: 32,
            ff_inner: 128,
            patch_size: 2,
            in_channels: 4,
            out_channels: 8,
            cross_attention: true,
            row_granularity: 2,
            sample_size: 16,
            heads_per_level: vec![4],
            feature_sites: Vec::new(),
            joint_layers: Vec::new(),
        }
    }

    fn rank(n: usize, r: usize) -> Comm<Flex> {
        LocalComm::create(n, &LaunchOptions::default()).swap_remove(r)
    }

    #[test]
    fn stages_are_even_or_explicit() {
        let p = PipeFusion::new(rank(3, 0), &PipeFusionConfig::default()).unwrap();
        assert_eq!(p.stages(&desc(28)).unwrap(), vec![0..10, 10..19, 19..28]);
        let p = PipeFusion::new(
            rank(3, 0),
            &PipeFusionConfig::default().with_blocks_per_stage(vec![4, 12, 12]),
        )
        .unwrap();
        assert_eq!(p.stages(&desc(28)).unwrap(), vec![0..4, 4..16, 16..28]);
        let e = p.stages(&desc(27)).unwrap_err().to_string();
        assert!(e.contains("blocks_per_stage") && e.contains("27 blocks"), "{e}");
    }

    #[test]
    fn load_plans_keep_embed_on_the_first_stage_and_head_on_the_last() {
        let plan = |r| {
            PipeFusion::new(rank(3, r), &PipeFusionConfig::default())
                .unwrap()
                .load_plan(&desc(6))
                .unwrap()
        };
        assert_eq!(
            plan(0),
            LoadPlan { tensor_shard: None, blocks: Some(0..2), skip_embed: false, skip_head: true }
        );
        assert_eq!(
            plan(1),
            LoadPlan { tensor_shard: None, blocks: Some(2..4), skip_embed: true, skip_head: true }
        );
        assert_eq!(
            plan(2),
            LoadPlan { tensor_shard: None, blocks: Some(4..6), skip_embed: true, skip_head: false }
        );
    }

    #[test]
    fn ulysses_stages_are_neighbouring_ranks() {
        let config = PipeFusionConfig::default().with_ulysses_degree(2);
        let plan = |r| PipeFusion::new(rank(4, r), &config).unwrap().load_plan(&desc(6)).unwrap();
        // Ranks 0, 1: stage 0 (blocks 0..3, the embedding); ranks 2, 3: stage 1 (the head).
        for r in [0, 1] {
            assert_eq!(plan(r).blocks, Some(0..3));
            assert!(!plan(r).skip_embed && plan(r).skip_head);
        }
        for r in [2, 3] {
            assert_eq!(plan(r).blocks, Some(3..6));
            assert!(plan(r).skip_embed && !plan(r).skip_head);
        }
        let p = PipeFusion::new(rank(4, 3), &config).unwrap();
        assert_eq!((p.num_patches(), p.root()), (2, 2));
        let e = PipeFusion::new(rank(3, 0), &config).err().unwrap().to_string();
        assert!(e.contains("ulysses_degree") && e.contains("does not divide the 3 ranks"), "{e}");
        let request = RequestInfo {
            steps: 1,
            grid: parallel_core::LatentGrid { height: 16, width: 16 },
            batch: 1,
            images: 1,
            text_tokens: 0,
        };
        let mut three_heads = desc(6);
        three_heads.num_heads = 3;
        let e = p.validate(&three_heads, &request).unwrap_err().to_string();
        assert!(e.contains("3 attention heads") && e.contains("ulysses_degree 2"), "{e}");
        // 8 token rows in 8 patches of 1 row cannot be split over 2 ranks each.
        let p = PipeFusion::new(rank(4, 0), &config.clone().with_num_pipeline_patch(8)).unwrap();
        let e = p.validate(&desc(6), &request).unwrap_err().to_string();
        assert!(e.contains("fewer than the 2 ranks of a stage") && e.contains("at most 4"), "{e}");
    }

    #[test]
    fn ring_positions_buffer_their_rows_of_every_patch() {
        // 8 ranks: 2 stages × ring 2 × Ulysses 2; rank 6 = stage 1, ring position 1, Ulysses 0.
        let config = PipeFusionConfig::default().with_ulysses_degree(2).with_ring_degree(2);
        let p = PipeFusion::new(rank(8, 6), &config).unwrap();
        assert_eq!((p.ulysses_degree(), p.ring_degree(), p.pipe.rank()), (2, 2, 1));
        assert_eq!((p.stage.rank(), p.ring.comm().rank(), p.ulysses.rank()), (2, 1, 0));
        // A patch of 8 token rows (3 columns) over the stage's 4 ranks: 2 rows each.
        let split = p.split(&(8..16), 3);
        assert_eq!(split.mine, 12..14);
        assert_eq!(split.ulysses_tokens, vec![6, 6]);
        assert_eq!(split.ring_rows, vec![8..12, 12..16]);
        // Two patches of 8 rows: position 1 buffers rows 4..8 and 12..16 (as tokens).
        let patches = [p.split(&(0..8), 3), split];
        assert_eq!(PipeFusion::<Flex>::buffer_pieces(&patches, 1, 3), vec![12..24, 36..48]);
        assert_eq!(PipeFusion::<Flex>::buffer_pieces(&patches, 0, 3), vec![0..12, 24..36]);
        let e = PipeFusion::new(rank(6, 0), &config).err().unwrap().to_string();
        assert!(e.contains("ring_degree") && e.contains("= 4 does not divide the 6 ranks"), "{e}");
    }

    #[test]
    fn bad_options_name_their_key() {
        let e = PipeFusion::new(rank(2, 0), &PipeFusionConfig::default().with_warmup_steps(0))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("warmup_steps"), "{e}");
        let e =
            PipeFusion::new(rank(2, 0), &PipeFusionConfig::default().with_num_pipeline_patch(0))
                .err()
                .unwrap()
                .to_string();
        assert!(e.contains("num_pipeline_patch"), "{e}");
        let e = PipeFusion::new(
            rank(2, 0),
            &PipeFusionConfig::default().with_blocks_per_stage(vec![3]),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("blocks_per_stage") && e.contains("2 positive counts"), "{e}");
        let p =
            PipeFusion::new(rank(2, 0), &PipeFusionConfig::default().with_num_pipeline_patch(9))
                .unwrap();
        let request = RequestInfo {
            steps: 1,
            grid: parallel_core::LatentGrid { height: 16, width: 16 },
            batch: 1,
            images: 1,
            text_tokens: 0,
        };
        let e = p.validate(&desc(4), &request).unwrap_err().to_string();
        assert!(e.contains("9 patches") && e.contains("only 8 token rows"), "{e}");
    }
}

//! # parallel-core
//!
//! The contracts of the parallel diffusion toolkit. Every strategy crate and every model
//! crate depends on this crate alone, never on each other:
//!
//! ```text
//! parallel-core  <- strategy-*              (a strategy never imports a model)
//! parallel-core  <- models-dit, models-unet (a model never imports a strategy)
//! everything     <- harness                 (composes model × strategy × scheduler)
//! ```
//!
//! Three contracts:
//!
//! 1. **Communicator** ([`comm`]): a group of ranks exchanging tensors — all-gather,
//!    all-to-all, all-reduce (sum), broadcast, tagged send/recv, a paired `send_recv` for
//!    ring neighbours, barrier, async forms returning a handle to wait on, and sub-groups
//!    over a [`Mesh`] of named axes (cfg, pipefusion, ring, ulysses, tensor), under NCCL's
//!    rules (a communicator is a stream; a send completes only when its receive is posted;
//!    every started operation is waited on). [`LocalComm`] runs N ranks as N threads of one
//!    process (the embedded default; every strategy is tested this way on a CPU), counts
//!    the bytes it moves off each rank per link ([`CommStats`]), and can time transfers by
//!    a [`LinkModel`] (bandwidth, latency, dilation) so that overlap shows on one CPU. No
//!    wait hangs: a timeout, or a failed peer, ends it with an error naming the operation
//!    and the rank.
//! 2. **Model seams** ([`seams`]): the places where a strategy may act inside a model written
//!    once for one device, each with a serial default:
//!
//!    | seam | used by |
//!    |---|---|
//!    | self-attention over image tokens | Ulysses, Ring, DistriFusion, PipeFusion, naive patch |
//!    | reduce after a row-parallel projection | tensor parallel |
//!    | conv halo rows | DistriFusion on a U-Net |
//!    | group-norm statistics | DistriFusion on a U-Net |
//!
//!    Models also expose a [`ModelDesc`] to validate against, their stages
//!    ([`StagedDenoiser`]: embed a band of rows, run block `i`, head of a band) and their
//!    parameters' placement under tensor parallelism ([`ParamInfo`], [`Sharding`]); a
//!    strategy says what a rank loads with a [`LoadPlan`].
//! 3. **[`ParallelStrategy`]**: one instance per rank, owning all state kept across steps
//!    (reset by `begin_request`), validating degrees before any work, running one denoiser
//!    evaluation or the whole loop ([`DenoiseLoop`]), and reporting its buffers and expected
//!    communication ([`ExpectedComm`]). A [`Registry`] maps names to constructors; an
//!    unknown name is an error that lists the known ones.
//!
//! # Adding a strategy crate
//!
//! 1. `cargo new --lib strategy-foo`, add it to the workspace, depend on `parallel-core`
//!    and `burn` only.
//! 2. Write `struct Foo<B: Backend>` holding its `Comm<B>` (split sub-groups with
//!    [`Comm::split`] over a [`Mesh`]) and its per-request state, and implement
//!    [`ParallelStrategy`]: `validate` (an error that says what to change), `load_plan`,
//!    `begin_request` (reset everything, keep the request in a [`CurrentRequest`]),
//!    `forward` (use the model's [`StagedDenoiser`] stages or pass your own [`Seams`]
//!    implementation to [`Denoiser::forward_rows`]), and `expected_comm` (your
//!    communication formula per [`StepKind`], from the real shapes).
//! 3. Export `pub const NAME`, `pub fn info() -> StrategyInfo` (its options, documented,
//!    and the [`SuiteCase`]s with the [`Reference`] the conformance suite holds it to), a
//!    typed config implementing [`StrategyConfig`], and
//!    `pub fn register<B: Backend>(r: &mut Registry<B>)`.
//! 4. Add one line (behind a cargo feature) to `harness::registry()`, the one registration
//!    list: the conformance suite iterates it, so the strategy is tested by registering.
//!
//! The repository's `docs/ARCHITECTURE.md` is the map of crates, contracts and bars.

pub mod attention;
pub mod cfg;
pub mod comm;
pub mod error;
pub mod mesh;
pub mod model;
pub mod registry;
pub mod seams;
pub mod split;
pub mod strategy;

pub use cfg::CfgParallel;
pub use comm::{
    Clock, Comm, CommStats, Communicator, Connector, LaunchOptions, Link, LinkModel, LinkSpecError,
    LocalComm, ManualClock, OpKind, OpStats, Pending, PendingSend, ProcessGroup, Tag, TcpComm,
    TcpWorld, Transport, WallClock, WorldExit, launch, launch_loopback, launch_process,
};
pub use error::{CommError, ParallelError, Result};
/// Zero rows around a band (re-exported from `kernels`, where the convolutions use it).
pub use kernels::pad_rows;
pub use mesh::{Axis, Mesh};
pub use model::{
    Conditioning, Denoiser, DenoiserInput, FeatureSite, JointLayer, LatentGrid, LoadPlan,
    ModelDesc, ModelFamily, ParamInfo, Shard, Sharding, StagedDenoiser, TokenGrid,
};
pub use registry::{
    NoOptions, OptionInfo, OptionValue, Reference, Registry, StrategyConfig, StrategyCtor,
    StrategyInfo, StrategyOptions, SuiteCase,
};
pub use seams::{
    AttentionSite, GroupNormMode, GroupNormStats, Halo, JointOutput, Projection, ReduceSite,
    RowSite, Seams, Serial, TextQkv, group_norm,
};
pub use strategy::{
    CurrentRequest, DenoiseLoop, ExpectedComm, MemoryReport, ParallelStrategy, RequestInfo,
    SerialStrategy, StepKind,
};

//! Typed errors of the toolkit's contracts.

use std::time::Duration;

use crate::comm::Tag;

/// An error raised by a [`Communicator`](crate::comm::Communicator).
///
/// Every variant names the operation (`op`, e.g. `"all_gather #12 on group [0, 1]"`) and the
/// rank that observed it, so that a failure on one rank of many can be traced to its cause.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    /// A wait went past the communicator's timeout.
    #[error(
        "{op} on rank {rank} timed out after {waited:?} waiting for rank(s) {missing:?}{blocked} \
         (raise the communicator timeout if the work between collectives is that long)"
    )]
    Timeout {
        /// The operation that waited.
        op: String,
        /// The rank that waited (world numbering).
        rank: usize,
        /// How long it waited.
        waited: Duration,
        /// The ranks it was waiting for (world numbering).
        missing: Vec<usize>,
        /// What those ranks are blocked on, in words (empty when unknown).
        blocked: String,
    },
    /// Another rank of the world failed (returned an error or panicked).
    #[error("{op} on rank {rank} aborted: rank {failed_rank} failed: {reason}")]
    PeerFailed {
        /// The operation that was running or about to run.
        op: String,
        /// The rank that observed the failure (world numbering).
        rank: usize,
        /// The rank that failed (world numbering).
        failed_rank: usize,
        /// What the failed rank reported.
        reason: String,
    },
    /// A rank that this operation needs has already finished its work and left.
    #[error("{op} on rank {rank} can never complete: rank {peer} has already left the group")]
    PeerLeft {
        /// The operation.
        op: String,
        /// The rank that observed it (world numbering).
        rank: usize,
        /// The rank that left (world numbering).
        peer: usize,
    },
    /// Ranks called different collectives at the same position of their sequence.
    #[error(
        "collective mismatch on group {group:?}: rank {rank} called {ours} but rank {other_rank} called {theirs}"
    )]
    Mismatch {
        /// The group's members (world numbering).
        group: Vec<usize>,
        /// This rank (world numbering).
        rank: usize,
        /// What this rank called.
        ours: String,
        /// The other rank (world numbering).
        other_rank: usize,
        /// What the other rank called.
        theirs: String,
    },
    /// A point-to-point message arrived with a different tag than the receiver expected.
    #[error("message mismatch: rank {rank} expected {expected} from rank {src} but received {got}")]
    TagMismatch {
        /// The receiving rank (world numbering).
        rank: usize,
        /// The sending rank (world numbering).
        src: usize,
        /// The tag the receiver asked for.
        expected: Tag,
        /// The tag that arrived.
        got: Tag,
    },
    /// A handle of a started operation was dropped without being waited on: the operation
    /// still runs when its peers reach it, but nobody takes its result (see the rules in
    /// [`comm`](crate::comm)).
    #[error(
        "{op} on rank {rank} was dropped before it was waited on; wait on every operation you \
         start (its data may still be in flight, and the communicator is unusable after it)"
    )]
    Abandoned {
        /// The dropped operation.
        op: String,
        /// The rank that dropped it (world numbering).
        rank: usize,
    },
    /// Tensor shapes or dtypes do not fit the operation.
    #[error("{op} on rank {rank}: {detail}")]
    Shape {
        /// The operation.
        op: String,
        /// The rank (world numbering).
        rank: usize,
        /// What is wrong, with the shapes involved.
        detail: String,
    },
    /// A connection between two ranks of a multi-process world failed.
    #[error("{op} on rank {rank}: the connection to rank {peer} failed: {detail}")]
    Transport {
        /// The operation.
        op: String,
        /// The rank (world numbering).
        rank: usize,
        /// The rank at the other end (world numbering).
        peer: usize,
        /// The socket error.
        detail: String,
    },
    /// The communication library (NCCL) reported an error of its own: a failed call, or an
    /// asynchronous error of the communicator (a peer's connection lost, a system error).
    #[error("{op} on rank {rank}: {library}: {detail}")]
    Library {
        /// The operation.
        op: String,
        /// The rank (world numbering).
        rank: usize,
        /// The library (`"NCCL"`, `"CUDA"`).
        library: &'static str,
        /// Its error, in its words.
        detail: String,
    },
    /// A multi-process world could not be formed at its rendezvous.
    #[error("rendezvous at {addr} (rank {rank}): {detail}")]
    Rendezvous {
        /// The master address (`MASTER_ADDR:MASTER_PORT`).
        addr: String,
        /// The rank that failed to join.
        rank: usize,
        /// What went wrong, naming the rank or setting at fault.
        detail: String,
    },
    /// A rank index outside the group, or a group that cannot be formed.
    #[error("{op} on rank {rank}: {detail}")]
    InvalidRank {
        /// The operation.
        op: String,
        /// The rank (world numbering).
        rank: usize,
        /// What is wrong.
        detail: String,
    },
}

/// An error of a parallel strategy, a model seam or the model description.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParallelError {
    /// Communication failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// The strategy cannot run this model with these degrees; the message says what to change.
    #[error("strategy `{strategy}` cannot run this configuration: {reason}")]
    Unsupported {
        /// The strategy's registered name.
        strategy: String,
        /// What is wrong and what to change.
        reason: String,
    },
    /// A strategy option (config key) has a bad value.
    #[error("strategy `{strategy}`: option `{key}`: {reason}")]
    BadOption {
        /// The strategy's registered name.
        strategy: String,
        /// The config key at fault.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// No strategy is registered under this name.
    #[error("unknown strategy `{name}`; known strategies: {}", known.join(", "))]
    UnknownStrategy {
        /// The name asked for.
        name: String,
        /// The registered names.
        known: Vec<String>,
    },
    /// The model was asked for something it does not have or cannot do.
    #[error("model: {0}")]
    Model(String),
    /// A mesh's degrees do not multiply to the world size, or an axis is repeated.
    #[error("mesh: {0}")]
    Mesh(String),
    /// A strategy's internal state was used out of order (e.g. a step before `begin_request`).
    #[error("strategy `{strategy}`: {reason}")]
    State {
        /// The strategy's registered name.
        strategy: String,
        /// What went wrong.
        reason: String,
    },
    /// The denoising loop's sampler (guidance, scheduler) was misused, or met a non-finite
    /// value.
    #[error("sampler{}: {reason}", rank.map(|r| format!(" on rank {r}")).unwrap_or_default())]
    Sampler {
        /// The rank (world numbering), where known.
        rank: Option<usize>,
        /// What went wrong, naming the step and rows.
        reason: String,
    },
    /// A rank's work failed; this is what a launcher reports for a rank that panicked.
    #[error("rank {rank} failed: {reason}")]
    RankFailed {
        /// The rank (world numbering).
        rank: usize,
        /// The panic message or error.
        reason: String,
    },
}

/// Result alias of the toolkit's contracts.
pub type Result<T, E = ParallelError> = std::result::Result<T, E>;

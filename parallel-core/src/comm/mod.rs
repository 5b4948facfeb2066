//! The communicator contract: a group of ranks that exchange tensors.
//!
//! Two layers:
//! - [`Communicator`] is the small object-safe trait an implementation writes (`LocalComm`
//!   here, NCCL later). It moves backend float primitives of any rank and is async-first:
//!   every operation is *issued* and returns a handle to wait on.
//! - [`Comm`] is what strategies hold: a cheap clonable handle with typed `Tensor<B, D>`
//!   methods, blocking and async forms, and sub-group splitting over a [`Mesh`].
//!
//! # The rules (NCCL's)
//!
//! What passes on [`LocalComm`] must not deadlock on NCCL, so `LocalComm` enforces NCCL's
//! semantics rather than a friendlier superset:
//!
//! 1. **A communicator is a stream.** The operations a rank issues on one communicator
//!    (one group; every [`Comm::split`] is a communicator of its own) execute in the order
//!    they were issued: an operation cannot start before the rank's previous one on that
//!    communicator has completed. Waiting on a handle is a separate matter: issuing is not
//!    waiting, so a rank may issue, compute and wait later (that is how strategies overlap).
//! 2. **Collectives** are matched by their position among each member's collectives on the
//!    communicator; members that call different collectives at the same position get
//!    [`CommError::Mismatch`].
//! 3. **A point-to-point send completes only when its receive is posted**, and runs when
//!    both are at the front of their ranks' streams (no buffering to lean on). A send and a
//!    receive issued together in one group ([`Comm::send_recv`], [`Comm::send_recv_async`],
//!    NCCL's `ncclGroupStart`/`ncclGroupEnd`) are at the front together, which is what lets
//!    ring neighbours exchange without deadlock. Two ranks that each send to the other and
//!    then receive, on one communicator and not grouped, deadlock — as on NCCL — and the
//!    wait ends with [`CommError::Timeout`] naming the operation, the peer, the tag and what
//!    the peer is blocked on. Pairs of ranks are matched in issue order; every message
//!    carries a [`Tag`] that the receiver checks on arrival ([`CommError::TagMismatch`]).
//! 4. **Every started operation is waited on.** Dropping an un-waited handle cannot recall
//!    the operation (it still runs when its peers reach it, as on NCCL), and it is an error:
//!    the rank's next call on that communicator fails with [`CommError::Abandoned`] naming the
//!    dropped operation.
//! 5. **No wait hangs:** after the communicator's timeout it fails with
//!    [`CommError::Timeout`], at once with [`CommError::PeerFailed`] when any rank of the
//!    world has failed (see [`Communicator::abort`]), or with [`CommError::PeerLeft`] when a
//!    rank it needs has finished. Time spent transferring under a link model is not a hang
//!    and does not count against the timeout.
//! 6. Results are identical on every rank (all-reduce sums each ring chunk in ring order).
//!
//! # Counted by the transport
//!
//! Communication is counted where data moves, by the implementation ([`CommStats`]: bytes
//! off each rank per operation kind and per destination, and time blocked), independently of
//! the strategies' formulas it is set beside.

mod link;
mod local;
mod rendezvous;
mod stats;
mod store;
mod tcp;
mod transport;

pub use link::{Clock, Link, LinkModel, LinkSpecError, ManualClock, PRESETS, Preset, WallClock};
pub use local::{LaunchOptions, LocalComm, check_split, launch};
pub use rendezvous::{Rendezvous, rendezvous, rendezvous_error};
pub use stats::{CommStats, OpKind, OpStats, all_reduce_elements, ring_chunks};
pub use store::{StoreClient, StoreServer};
pub use tcp::{
    ProcessGroup, TcpComm, TcpWorld, free_loopback_port, join, launch_loopback, launch_process,
};
pub use transport::{Connector, Transport, WorldExit};

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};

use crate::error::CommError;
use crate::mesh::{Axis, Mesh};

/// What a point-to-point message is: checked by the receiver on arrival.
///
/// `kind` names the payload (`"activations"`, `"latent_patch"`, `"kv"`, …); `step`, `patch`
/// and `layer` place it. Fields a strategy does not use stay 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag {
    /// What the payload is.
    pub kind: &'static str,
    /// Denoising step.
    pub step: u32,
    /// Patch (or ring block) index.
    pub patch: u32,
    /// Layer (or stage) index.
    pub layer: u32,
}

impl Tag {
    /// A tag of `kind` with every position 0.
    pub const fn new(kind: &'static str) -> Self {
        Tag { kind, step: 0, patch: 0, layer: 0 }
    }

    /// This tag at denoising step `step`.
    pub const fn step(mut self, step: u32) -> Self {
        self.step = step;
        self
    }

    /// This tag for patch `patch`.
    pub const fn patch(mut self, patch: u32) -> Self {
        self.patch = patch;
        self
    }

    /// This tag for layer `layer`.
    pub const fn layer(mut self, layer: u32) -> Self {
        self.layer = layer;
        self
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(step={}, patch={}, layer={})", self.kind, self.step, self.patch, self.layer)
    }
}

/// A started operation of a [`Communicator`], to be waited on.
///
/// Dropping one without waiting is an error of the rank (rule 4 of the [module docs](self)).
pub trait Completion<T>: Send {
    /// Blocks until the operation completes (or fails, or times out).
    fn wait(self: Box<Self>) -> Result<T, CommError>;
    /// Whether [`wait`](Completion::wait) would return without blocking.
    fn is_ready(&self) -> bool;
}

/// A started operation returning a float primitive.
pub struct RawPending<B: Backend>(pub Box<dyn Completion<FloatTensor<B>>>);

/// A started send.
pub struct RawPendingSend(pub Box<dyn Completion<()>>);

/// One operation of a point-to-point group ([`Communicator::start_group`]).
pub enum P2pOp<B: Backend> {
    /// Send `tensor` to group rank `dst`, tagged.
    Send {
        /// The payload.
        tensor: FloatTensor<B>,
        /// The receiver (group rank).
        dst: usize,
        /// What it is.
        tag: Tag,
    },
    /// Receive the next message from group rank `src`, which must carry `tag`.
    Recv {
        /// The sender (group rank).
        src: usize,
        /// What it must be.
        tag: Tag,
    },
}

/// The handle of one operation of a started group, in the group's order.
pub enum P2pHandle<B: Backend> {
    /// A send's completion.
    Send(RawPendingSend),
    /// A receive's message.
    Recv(RawPending<B>),
}

/// The object-safe contract an implementation writes. Strategies use [`Comm`].
///
/// Tensors are backend float primitives of any rank; `dim` arguments index their dims.
/// Ranks are *group* ranks (`0..size()`) unless the name says `world`. Implementations
/// follow the rules of the [module docs](self).
pub trait Communicator<B: Backend>: Send + Sync {
    /// This rank's index in the group.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// World ranks of the group's members, indexed by group rank.
    fn members(&self) -> &[usize];
    /// The device this rank computes on.
    fn device(&self) -> B::Device;
    /// How long a wait may block before it fails with [`CommError::Timeout`].
    fn timeout(&self) -> Duration;
    /// Starts an all-gather: every rank's tensor, concatenated along `dim` in rank order.
    /// Sizes along `dim` may differ between ranks; all other dims must agree.
    fn start_all_gather(&self, t: FloatTensor<B>, dim: usize) -> Result<RawPending<B>, CommError>;
    /// Starts an all-to-all: splits `t` along `scatter_dim` into `size()` chunks of
    /// `scatter_sizes` (which sum to that dim and are the same on every rank), sends chunk
    /// `j` to rank `j`, and concatenates the received chunks along `gather_dim` in rank
    /// order. Sizes along `gather_dim` may differ between ranks.
    fn start_all_to_all(
        &self,
        t: FloatTensor<B>,
        scatter_dim: usize,
        scatter_sizes: Vec<usize>,
        gather_dim: usize,
    ) -> Result<RawPending<B>, CommError>;
    /// Starts a sum all-reduce. Shapes must agree; every rank gets the same bits.
    fn start_all_reduce(&self, t: FloatTensor<B>) -> Result<RawPending<B>, CommError>;
    /// Starts a broadcast of `root`'s tensor; other ranks pass a tensor of the same shape
    /// (its values are ignored).
    fn start_broadcast(&self, t: FloatTensor<B>, root: usize) -> Result<RawPending<B>, CommError>;
    /// Starts a group of point-to-point operations, issued together (NCCL's group): they are
    /// at the front of this rank's stream at once, so a send and a receive in one group
    /// cannot block each other.
    fn start_group(&self, ops: Vec<P2pOp<B>>) -> Result<Vec<P2pHandle<B>>, CommError>;
    /// Blocks until every rank of the group has reached the barrier.
    fn barrier(&self) -> Result<(), CommError>;
    /// A communicator over a subset of the world. Every member must call it, with the same
    /// `members` (world ranks, in the new group's rank order), the same number of times.
    fn split(&self, members: &[usize]) -> Result<Box<dyn Communicator<B>>, CommError>;
    /// Marks this rank failed: every other rank's waits end with [`CommError::PeerFailed`].
    fn abort(&self, reason: &str);
    /// What the transport moved off this rank so far, over every group of its world.
    fn stats(&self) -> CommStats;
    /// Zeroes this rank's counters.
    fn reset_stats(&self);
}

/// A started typed operation; [`wait`](Pending::wait) for its result. Dropping it without
/// waiting is an error of the rank (rule 4 of the [module docs](self)).
pub struct Pending<B: Backend, const D: usize> {
    raw: RawPending<B>,
    /// The waiting rank (world numbering), for errors.
    rank: usize,
}

impl<B: Backend, const D: usize> Pending<B, D> {
    /// Blocks until the operation completes.
    pub fn wait(self) -> Result<Tensor<B, D>, CommError> {
        let p = self.raw.0.wait()?;
        let rank = p.shape().num_dims();
        if rank != D {
            return Err(CommError::Shape {
                op: "a received tensor".into(),
                rank: self.rank,
                detail: format!("expected a {D}-d tensor, got shape {:?}", p.shape().as_slice()),
            });
        }
        Ok(float_tensor(p))
    }

    /// Whether [`wait`](Pending::wait) would return without blocking.
    pub fn is_ready(&self) -> bool {
        self.raw.0.is_ready()
    }
}

/// A started send; [`wait`](PendingSend::wait) for its completion (its receive posted and
/// the data moved).
pub struct PendingSend(RawPendingSend);

impl PendingSend {
    /// Blocks until the send completes.
    pub fn wait(self) -> Result<(), CommError> {
        self.0.0.wait()
    }

    /// Whether [`wait`](PendingSend::wait) would return without blocking.
    pub fn is_ready(&self) -> bool {
        self.0.0.is_ready()
    }
}

fn float_tensor<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// A rank's handle on a group: typed collectives, point-to-point, sub-groups.
///
/// Cheap to clone; clones share the group. What this rank sent is counted by the transport
/// across every group of its world ([`stats`](Comm::stats)).
#[derive(Clone)]
pub struct Comm<B: Backend> {
    inner: Arc<dyn Communicator<B>>,
}

impl<B: Backend> fmt::Debug for Comm<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Comm")
            .field("rank", &self.rank())
            .field("members", &self.members())
            .finish()
    }
}

impl<B: Backend> Comm<B> {
    /// Wraps an implementation.
    pub fn new(inner: Box<dyn Communicator<B>>) -> Self {
        Comm { inner: Arc::from(inner) }
    }

    /// This rank's index in the group.
    pub fn rank(&self) -> usize {
        self.inner.rank()
    }

    /// Number of ranks in the group.
    pub fn size(&self) -> usize {
        self.inner.size()
    }

    /// This rank's index in the world.
    pub fn world_rank(&self) -> usize {
        self.inner.members()[self.inner.rank()]
    }

    /// World ranks of the members, by group rank.
    pub fn members(&self) -> &[usize] {
        self.inner.members()
    }

    /// The device this rank computes on.
    pub fn device(&self) -> B::Device {
        self.inner.device()
    }

    /// The timeout of every wait.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout()
    }

    /// What the transport moved off this rank, over every group of its world (see
    /// [`CommStats`]).
    pub fn stats(&self) -> CommStats {
        self.inner.stats()
    }

    /// Zeroes this rank's counters.
    pub fn reset_stats(&self) {
        self.inner.reset_stats()
    }

    /// Concatenation along `dim` of every rank's `t`, in rank order.
    pub fn all_gather<const D: usize>(
        &self,
        t: Tensor<B, D>,
        dim: usize,
    ) -> Result<Tensor<B, D>, CommError> {
        self.all_gather_async(t, dim)?.wait()
    }

    /// Starts an [`all_gather`](Comm::all_gather); the result is collected by `wait`.
    pub fn all_gather_async<const D: usize>(
        &self,
        t: Tensor<B, D>,
        dim: usize,
    ) -> Result<Pending<B, D>, CommError> {
        Ok(self.pending(self.inner.start_all_gather(primitive(t), dim)?))
    }

    /// All-to-all: scatter `scatter_dim` in `size()` equal chunks, gather along `gather_dim`.
    ///
    /// # Errors
    /// [`CommError::Shape`] when `scatter_dim` is not divisible by the group size.
    pub fn all_to_all<const D: usize>(
        &self,
        t: Tensor<B, D>,
        scatter_dim: usize,
        gather_dim: usize,
    ) -> Result<Tensor<B, D>, CommError> {
        self.all_to_all_async(t, scatter_dim, gather_dim)?.wait()
    }

    /// Starts an [`all_to_all`](Comm::all_to_all).
    pub fn all_to_all_async<const D: usize>(
        &self,
        t: Tensor<B, D>,
        scatter_dim: usize,
        gather_dim: usize,
    ) -> Result<Pending<B, D>, CommError> {
        let n = self.size();
        let len = t.dims().get(scatter_dim).copied().unwrap_or(0);
        if !len.is_multiple_of(n) {
            return Err(CommError::Shape {
                op: format!("all_to_all on group {:?}", self.members()),
                rank: self.world_rank(),
                detail: format!(
                    "dim {scatter_dim} of shape {:?} must be divisible by the group size {n}",
                    t.dims()
                ),
            });
        }
        self.all_to_all_sizes_async(t, scatter_dim, &vec![len / n; n], gather_dim)
    }

    /// All-to-all with explicit chunk sizes along `scatter_dim` (chunk `j` goes to rank `j`;
    /// every rank passes the same sizes): the return pass of a sequence split whose ranks
    /// hold different numbers of tokens.
    pub fn all_to_all_sizes<const D: usize>(
        &self,
        t: Tensor<B, D>,
        scatter_dim: usize,
        scatter_sizes: &[usize],
        gather_dim: usize,
    ) -> Result<Tensor<B, D>, CommError> {
        self.all_to_all_sizes_async(t, scatter_dim, scatter_sizes, gather_dim)?.wait()
    }

    /// Starts an [`all_to_all_sizes`](Comm::all_to_all_sizes).
    pub fn all_to_all_sizes_async<const D: usize>(
        &self,
        t: Tensor<B, D>,
        scatter_dim: usize,
        scatter_sizes: &[usize],
        gather_dim: usize,
    ) -> Result<Pending<B, D>, CommError> {
        let dims = t.dims();
        let bad = |detail: String| CommError::Shape {
            op: format!("all_to_all on group {:?}", self.members()),
            rank: self.world_rank(),
            detail,
        };
        if scatter_dim >= D || gather_dim >= D {
            return Err(bad(format!(
                "dims {scatter_dim} and {gather_dim} must index shape {dims:?}"
            )));
        }
        if scatter_sizes.len() != self.size()
            || scatter_sizes.iter().sum::<usize>() != dims[scatter_dim]
        {
            return Err(bad(format!(
                "chunk sizes {scatter_sizes:?} must be {} values summing to dim {scatter_dim} of \
                 shape {dims:?}",
                self.size()
            )));
        }
        let raw = self.inner.start_all_to_all(
            primitive(t),
            scatter_dim,
            scatter_sizes.to_vec(),
            gather_dim,
        )?;
        Ok(self.pending(raw))
    }

    /// Sum over ranks; identical bits on every rank.
    pub fn all_reduce_sum<const D: usize>(
        &self,
        t: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, CommError> {
        self.all_reduce_sum_async(t)?.wait()
    }

    /// Starts an [`all_reduce_sum`](Comm::all_reduce_sum).
    pub fn all_reduce_sum_async<const D: usize>(
        &self,
        t: Tensor<B, D>,
    ) -> Result<Pending<B, D>, CommError> {
        Ok(self.pending(self.inner.start_all_reduce(primitive(t))?))
    }

    /// `root`'s tensor on every rank; other ranks pass a tensor of the same shape.
    pub fn broadcast<const D: usize>(
        &self,
        t: Tensor<B, D>,
        root: usize,
    ) -> Result<Tensor<B, D>, CommError> {
        self.broadcast_async(t, root)?.wait()
    }

    /// Starts a [`broadcast`](Comm::broadcast).
    pub fn broadcast_async<const D: usize>(
        &self,
        t: Tensor<B, D>,
        root: usize,
    ) -> Result<Pending<B, D>, CommError> {
        Ok(self.pending(self.inner.start_broadcast(primitive(t), root)?))
    }

    /// Sends `t` to group rank `dst`, tagged; returns when the receiver has taken it (its
    /// receive was posted).
    pub fn send<const D: usize>(
        &self,
        t: Tensor<B, D>,
        dst: usize,
        tag: Tag,
    ) -> Result<(), CommError> {
        self.send_async(t, dst, tag)?.wait()
    }

    /// Starts a send; wait on it before the request ends (rule 4).
    pub fn send_async<const D: usize>(
        &self,
        t: Tensor<B, D>,
        dst: usize,
        tag: Tag,
    ) -> Result<PendingSend, CommError> {
        let op = P2pOp::Send { tensor: primitive(t), dst, tag };
        match self.inner.start_group(vec![op])?.pop() {
            Some(P2pHandle::Send(s)) => Ok(PendingSend(s)),
            _ => Err(self.broken_group("send")),
        }
    }

    /// Receives the next message from group rank `src`, which must carry `tag`.
    pub fn recv<const D: usize>(&self, src: usize, tag: Tag) -> Result<Tensor<B, D>, CommError> {
        self.recv_async(src, tag)?.wait()
    }

    /// Starts a receive; `wait` checks the tag.
    pub fn recv_async<const D: usize>(
        &self,
        src: usize,
        tag: Tag,
    ) -> Result<Pending<B, D>, CommError> {
        match self.inner.start_group(vec![P2pOp::Recv { src, tag }])?.pop() {
            Some(P2pHandle::Recv(raw)) => Ok(self.pending(raw)),
            _ => Err(self.broken_group("recv")),
        }
    }

    /// Sends `t` to `dst` and receives from `src` as one group: ring neighbours exchanging
    /// with `send_recv` never deadlock.
    pub fn send_recv<const D: usize>(
        &self,
        t: Tensor<B, D>,
        dst: usize,
        send_tag: Tag,
        src: usize,
        recv_tag: Tag,
    ) -> Result<Tensor<B, D>, CommError> {
        let (send, recv) = self.send_recv_async(t, dst, send_tag, src, recv_tag)?;
        send.wait()?;
        recv.wait()
    }

    /// Starts [`send_recv`](Comm::send_recv)'s group; wait on both handles.
    pub fn send_recv_async<const D: usize>(
        &self,
        t: Tensor<B, D>,
        dst: usize,
        send_tag: Tag,
        src: usize,
        recv_tag: Tag,
    ) -> Result<(PendingSend, Pending<B, D>), CommError> {
        let ops = vec![
            P2pOp::Send { tensor: primitive(t), dst, tag: send_tag },
            P2pOp::Recv { src, tag: recv_tag },
        ];
        let mut handles = self.inner.start_group(ops)?.into_iter();
        match (handles.next(), handles.next()) {
            (Some(P2pHandle::Send(s)), Some(P2pHandle::Recv(raw))) => {
                Ok((PendingSend(s), self.pending(raw)))
            }
            _ => Err(self.broken_group("send_recv")),
        }
    }

    fn pending<const D: usize>(&self, raw: RawPending<B>) -> Pending<B, D> {
        Pending { raw, rank: self.world_rank() }
    }

    fn broken_group(&self, op: &str) -> CommError {
        CommError::InvalidRank {
            op: op.into(),
            rank: self.world_rank(),
            detail: "the communicator returned handles that do not match the group".into(),
        }
    }

    /// Blocks until every rank of the group arrives.
    pub fn barrier(&self) -> Result<(), CommError> {
        self.inner.barrier()
    }

    /// The sub-group of this rank along `axes` of `mesh`: the ranks that share this rank's
    /// coordinates on every other axis. Every rank of the world must make the same calls.
    /// The sub-group is a communicator (a stream) of its own.
    pub fn split(&self, mesh: &Mesh, axes: &[Axis]) -> Result<Comm<B>, CommError> {
        if mesh.world_size() != self.size() {
            return Err(CommError::InvalidRank {
                op: "split".into(),
                rank: self.world_rank(),
                detail: format!(
                    "mesh {mesh} has {} ranks but this group has {}",
                    mesh.world_size(),
                    self.size()
                ),
            });
        }
        let local: Vec<usize> = mesh.group(self.rank(), axes);
        let members: Vec<usize> = local.iter().map(|&r| self.members()[r]).collect();
        self.split_members(&members)
    }

    /// The sub-group of the given world ranks (this rank among them), a communicator of its
    /// own: calling it twice with the same members gives two independent streams.
    pub fn split_members(&self, members: &[usize]) -> Result<Comm<B>, CommError> {
        Ok(Comm { inner: Arc::from(self.inner.split(members)?) })
    }

    /// Marks this rank failed, so that every other rank's waits end with an error.
    pub fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
}

//! The communicator contract: a group of ranks that exchange tensors.
//!
//! Two layers:
//! - [`Communicator`] is the small object-safe trait an implementation writes (`LocalComm`
//!   here, NCCL later). It moves backend float primitives of any rank and is async-first:
//!   every operation *starts* and returns a [`RawPending`] to wait on.
//! - [`Comm`] is what strategies hold: a cheap clonable handle with typed
//!   `Tensor<B, D>` methods, blocking and async forms, sub-group splitting over a
//!   [`Mesh`], and the **communication accounting** (see [`CommStats`]), done
//!   here once so every implementation counts by the same rule.
//!
//! # Requirements of an implementation
//! - Collectives are matched by their position in each rank's sequence of calls on the group;
//!   ranks that call different collectives at the same position get
//!   [`CommError::Mismatch`].
//! - Every wait ends: after the communicator's timeout with [`CommError::Timeout`], at once
//!   with [`CommError::PeerFailed`] when any rank of the world has failed (see
//!   [`Communicator::abort`]), or with [`CommError::PeerLeft`] when a rank it needs has
//!   finished.
//! - Point-to-point messages carry a [`Tag`] that the receiver checks on arrival; a mismatch
//!   is [`CommError::TagMismatch`] naming both tags, never a silent mix-up.
//! - `send` must not wait for the matching `recv` to be *posted* before it can complete, or
//!   `send_recv` between ring neighbours could deadlock (`LocalComm` buffers; NCCL groups
//!   the send and the receive).
//! - Results are identical on every rank (all-reduce sums in rank order).

mod local;
mod stats;

pub use local::{LaunchOptions, LocalComm, launch};
pub use stats::{CommStats, OpKind, OpStats, all_reduce_elements, ring_chunks};

use std::fmt;
use std::sync::{Arc, Mutex};
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

/// The object-safe contract an implementation writes. Strategies use [`Comm`].
///
/// Tensors are backend float primitives of any rank; `dim` arguments index their dims.
/// Ranks are *group* ranks (`0..size()`) unless the name says `world`.
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
    /// Starts a sum all-reduce. Shapes must agree; the sum is taken in rank order, so
    /// every rank gets the same bits.
    fn start_all_reduce(&self, t: FloatTensor<B>) -> Result<RawPending<B>, CommError>;
    /// Starts a broadcast of `root`'s tensor; other ranks pass a tensor of the same shape
    /// (its values are ignored).
    fn start_broadcast(&self, t: FloatTensor<B>, root: usize) -> Result<RawPending<B>, CommError>;
    /// Starts sending `t` to `dst` with `tag`.
    fn start_send(
        &self,
        t: FloatTensor<B>,
        dst: usize,
        tag: Tag,
    ) -> Result<RawPendingSend, CommError>;
    /// Starts receiving the next message from `src`; waiting checks that it carries `tag`.
    fn start_recv(&self, src: usize, tag: Tag) -> Result<RawPending<B>, CommError>;
    /// Blocks until every rank of the group has reached the barrier.
    fn barrier(&self) -> Result<(), CommError>;
    /// A communicator over a subset of the world. Every member must call it, with the same
    /// `members` (world ranks, in the new group's rank order), the same number of times.
    fn split(&self, members: &[usize]) -> Result<Box<dyn Communicator<B>>, CommError>;
    /// Marks this rank failed: every other rank's waits end with [`CommError::PeerFailed`].
    fn abort(&self, reason: &str);
}

/// A started typed operation; [`wait`](Pending::wait) for its result.
pub struct Pending<B: Backend, const D: usize> {
    raw: RawPending<B>,
}

impl<B: Backend, const D: usize> Pending<B, D> {
    /// Blocks until the operation completes.
    pub fn wait(self) -> Result<Tensor<B, D>, CommError> {
        self.raw.0.wait().map(float_tensor)
    }

    /// Whether [`wait`](Pending::wait) would return without blocking.
    pub fn is_ready(&self) -> bool {
        self.raw.0.is_ready()
    }
}

/// A started send; [`wait`](PendingSend::wait) for its completion.
pub struct PendingSend(RawPendingSend);

impl PendingSend {
    /// Blocks until the send completes.
    pub fn wait(self) -> Result<(), CommError> {
        self.0.0.wait()
    }
}

fn float_tensor<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// A rank's handle on a group: typed collectives, accounting, sub-groups.
///
/// Cheap to clone; clones share the group and the rank's counters. The counters are shared
/// by every group this rank belongs to (a sub-group made by [`split`](Comm::split) adds to
/// the same [`CommStats`]), so [`stats`](Comm::stats) is everything this rank sent.
#[derive(Clone)]
pub struct Comm<B: Backend> {
    inner: Arc<dyn Communicator<B>>,
    stats: Arc<Mutex<CommStats>>,
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
    /// Wraps an implementation, with fresh counters.
    pub fn new(inner: Box<dyn Communicator<B>>) -> Self {
        Comm { inner: Arc::from(inner), stats: Arc::new(Mutex::new(CommStats::default())) }
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

    /// A snapshot of what this rank has sent (see [`CommStats`] for the rule).
    pub fn stats(&self) -> CommStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Zeroes this rank's counters (shared with its sub-groups).
    pub fn reset_stats(&self) {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = CommStats::default();
    }

    fn record(&self, kind: OpKind, elements: u64, t: &FloatTensor<B>) {
        let elem = t.dtype().size() as u64;
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).record(kind, elements, elem);
    }

    fn others(&self) -> u64 {
        self.size() as u64 - 1
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
        let p = primitive(t);
        self.record(OpKind::AllGather, p.shape().num_elements() as u64 * self.others(), &p);
        Ok(Pending { raw: self.inner.start_all_gather(p, dim)? })
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
        self.all_to_all_sizes(t, scatter_dim, &vec![len / n; n], gather_dim)
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
        let p = primitive(t);
        let shape = p.shape();
        let bad = |detail: String| CommError::Shape {
            op: format!("all_to_all on group {:?}", self.members()),
            rank: self.world_rank(),
            detail,
        };
        if scatter_dim >= shape.num_dims() || gather_dim >= shape.num_dims() {
            return Err(bad(format!(
                "dims {scatter_dim} and {gather_dim} must index shape {:?}",
                shape.as_slice()
            )));
        }
        if scatter_sizes.len() != self.size()
            || scatter_sizes.iter().sum::<usize>() != shape[scatter_dim]
        {
            return Err(bad(format!(
                "chunk sizes {scatter_sizes:?} must be {} values summing to dim {scatter_dim} of \
                 shape {:?}",
                self.size(),
                shape.as_slice()
            )));
        }
        let local = shape.num_elements() as u64;
        let own = (local / shape[scatter_dim].max(1) as u64) * scatter_sizes[self.rank()] as u64;
        self.record(OpKind::AllToAll, local - own, &p);
        self.inner
            .start_all_to_all(p, scatter_dim, scatter_sizes.to_vec(), gather_dim)?
            .0
            .wait()
            .map(float_tensor)
    }

    /// Sum over ranks; identical bits on every rank.
    pub fn all_reduce_sum<const D: usize>(
        &self,
        t: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, CommError> {
        let p = primitive(t);
        let sent = all_reduce_elements(
            p.shape().num_elements() as u64,
            self.rank() as u64,
            self.size() as u64,
        );
        self.record(OpKind::AllReduce, sent, &p);
        self.inner.start_all_reduce(p)?.0.wait().map(float_tensor)
    }

    /// `root`'s tensor on every rank; other ranks pass a tensor of the same shape.
    pub fn broadcast<const D: usize>(
        &self,
        t: Tensor<B, D>,
        root: usize,
    ) -> Result<Tensor<B, D>, CommError> {
        let p = primitive(t);
        let sent =
            if self.rank() == root { p.shape().num_elements() as u64 * self.others() } else { 0 };
        self.record(OpKind::Broadcast, sent, &p);
        self.inner.start_broadcast(p, root)?.0.wait().map(float_tensor)
    }

    /// Sends `t` to group rank `dst`, tagged.
    pub fn send<const D: usize>(
        &self,
        t: Tensor<B, D>,
        dst: usize,
        tag: Tag,
    ) -> Result<(), CommError> {
        self.send_async(t, dst, tag)?.wait()
    }

    /// Starts a send; the tensor may be reused by the caller at once.
    pub fn send_async<const D: usize>(
        &self,
        t: Tensor<B, D>,
        dst: usize,
        tag: Tag,
    ) -> Result<PendingSend, CommError> {
        let p = primitive(t);
        self.record(OpKind::Send, p.shape().num_elements() as u64, &p);
        Ok(PendingSend(self.inner.start_send(p, dst, tag)?))
    }

    /// Receives the next message from group rank `src`, which must carry `tag`.
    pub fn recv<const D: usize>(&self, src: usize, tag: Tag) -> Result<Tensor<B, D>, CommError> {
        self.recv_async(src, tag)?.wait_checked(self, src)
    }

    /// Starts a receive; `wait` checks the tag (and nothing else: use [`Comm::recv`] for a
    /// rank check of the result).
    pub fn recv_async<const D: usize>(
        &self,
        src: usize,
        tag: Tag,
    ) -> Result<Pending<B, D>, CommError> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).record(OpKind::Recv, 0, 0);
        Ok(Pending { raw: self.inner.start_recv(src, tag)? })
    }

    /// Sends `t` to `dst` and receives from `src` at once: ring neighbours exchanging with
    /// `send_recv` never deadlock.
    pub fn send_recv<const D: usize>(
        &self,
        t: Tensor<B, D>,
        dst: usize,
        send_tag: Tag,
        src: usize,
        recv_tag: Tag,
    ) -> Result<Tensor<B, D>, CommError> {
        let send = self.send_async(t, dst, send_tag)?;
        let recv = self.recv_async::<D>(src, recv_tag)?;
        send.wait()?;
        recv.wait_checked(self, src)
    }

    /// Blocks until every rank of the group arrives.
    pub fn barrier(&self) -> Result<(), CommError> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).record(OpKind::Barrier, 0, 0);
        self.inner.barrier()
    }

    /// The sub-group of this rank along `axes` of `mesh`: the ranks that share this rank's
    /// coordinates on every other axis. Every rank of the world must make the same calls.
    /// The sub-group shares this rank's counters.
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

    /// The sub-group of the given world ranks (this rank among them).
    pub fn split_members(&self, members: &[usize]) -> Result<Comm<B>, CommError> {
        Ok(Comm { inner: Arc::from(self.inner.split(members)?), stats: self.stats.clone() })
    }

    /// Marks this rank failed, so that every other rank's waits end with an error.
    pub fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
}

impl<B: Backend, const D: usize> Pending<B, D> {
    fn wait_checked(self, comm: &Comm<B>, src: usize) -> Result<Tensor<B, D>, CommError> {
        let p = self.raw.0.wait()?;
        let rank = p.shape().num_dims();
        if rank != D {
            return Err(CommError::Shape {
                op: format!("recv from rank {}", comm.members().get(src).copied().unwrap_or(src)),
                rank: comm.world_rank(),
                detail: format!(
                    "expected a {D}-d tensor, received shape {:?}",
                    p.shape().as_slice()
                ),
            });
        }
        Ok(float_tensor(p))
    }
}

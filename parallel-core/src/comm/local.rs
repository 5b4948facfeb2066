//! `LocalComm`: N ranks as N threads of one process, each with its own device value.
//!
//! The embedded default: every strategy runs and is tested with N ranks on one CPU. Data
//! moves between ranks as backend primitives (`B::float_to_device` onto the receiver's
//! device), collectives are matched by sequence number per group, sends are buffered (so
//! `send_recv` cannot deadlock), and every wait polls the world's failure state so that one
//! rank's error or panic ends every other rank's waits within a few milliseconds.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, Slice, TensorMetadata};

use super::{Comm, Communicator, Completion, RawPending, RawPendingSend, Tag};
use crate::error::{CommError, ParallelError};

/// How often a blocked wait re-checks the world's failure state.
const POLL: Duration = Duration::from_millis(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A rank that panicked while holding a lock has already been marked failed; the data
    // behind the lock is still consistent (every critical section is panic-free).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct Status {
    failed: Option<(usize, String)>,
    left: Vec<bool>,
}

/// Groups of a world by (members, how many times each member split onto them).
type GroupMap<B> = HashMap<(Vec<usize>, u64), Arc<Group<B>>>;

struct World<B: Backend> {
    timeout: Duration,
    status: Mutex<Status>,
    groups: Mutex<GroupMap<B>>,
}

impl<B: Backend> World<B> {
    fn fail(&self, rank: usize, reason: String) {
        {
            let mut s = lock(&self.status);
            if s.failed.is_none() {
                s.failed = Some((rank, reason));
            }
        }
        self.wake_all();
    }

    fn leave(&self, rank: usize) {
        lock(&self.status).left[rank] = true;
        self.wake_all();
    }

    fn wake_all(&self) {
        for g in lock(&self.groups).values() {
            g.cv.notify_all();
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum OpDesc {
    AllGather { dim: usize },
    AllToAll { scatter: usize, sizes: Vec<usize>, gather: usize },
    AllReduce,
    Broadcast { root: usize },
    Barrier,
}

impl fmt::Display for OpDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpDesc::AllGather { dim } => write!(f, "all_gather(dim={dim})"),
            OpDesc::AllToAll { scatter, sizes, gather } => {
                write!(f, "all_to_all(scatter_dim={scatter}, sizes={sizes:?}, gather_dim={gather})")
            }
            OpDesc::AllReduce => write!(f, "all_reduce"),
            OpDesc::Broadcast { root } => write!(f, "broadcast(root={root})"),
            OpDesc::Barrier => write!(f, "barrier"),
        }
    }
}

struct Slot<B: Backend> {
    op: OpDesc,
    first: usize,
    data: Vec<Option<FloatTensor<B>>>,
    joined: Vec<bool>,
    done: usize,
    broken: Option<CommError>,
}

struct Message<B: Backend> {
    tag: Tag,
    tensor: FloatTensor<B>,
}

struct GroupState<B: Backend> {
    slots: HashMap<u64, Slot<B>>,
    mail: HashMap<(usize, usize), VecDeque<Message<B>>>,
}

struct Group<B: Backend> {
    members: Vec<usize>,
    state: Mutex<GroupState<B>>,
    cv: Condvar,
}

struct RankGroup<B: Backend> {
    world: Arc<World<B>>,
    group: Arc<Group<B>>,
    rank: usize,
    device: B::Device,
    seq: AtomicU64,
    /// Per world rank: how many times it split onto each member set (shared by all of
    /// that rank's communicators), so repeated splits get distinct groups.
    splits: Arc<Mutex<HashMap<Vec<usize>, u64>>>,
}

/// A rank of a [`launch`]ed (or [`LocalComm::create`]d) in-process world.
pub struct LocalComm<B: Backend> {
    inner: Arc<RankGroup<B>>,
}

/// Settings of an in-process world.
#[derive(Debug, Clone)]
pub struct LaunchOptions<B: Backend> {
    /// The timeout of every wait.
    pub timeout: Duration,
    /// Devices, by rank (`devices[rank % len]`); empty means the backend's default device.
    pub devices: Vec<B::Device>,
    /// Threads of each rank's own rayon pool; `None` shares the global pool.
    pub threads_per_rank: Option<usize>,
}

impl<B: Backend> Default for LaunchOptions<B> {
    fn default() -> Self {
        LaunchOptions {
            timeout: Duration::from_secs(300),
            devices: Vec::new(),
            threads_per_rank: None,
        }
    }
}

impl<B: Backend> LaunchOptions<B> {
    /// These options with another timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// These options with a rayon pool of `threads` threads per rank.
    pub fn with_threads_per_rank(mut self, threads: usize) -> Self {
        self.threads_per_rank = Some(threads);
        self
    }
}

impl<B: Backend> LocalComm<B> {
    /// The `size` ranks of a new world, as [`Comm`] handles, rank order.
    ///
    /// Prefer [`launch`], which also marks a rank failed when it errors or panics and
    /// marks it gone when it finishes. Whoever drives these handles by hand must call
    /// [`Comm::abort`] when a rank's work fails, or the other ranks only learn of it
    /// through their timeout.
    pub fn create(size: usize, options: &LaunchOptions<B>) -> Vec<Comm<B>> {
        create_world(size, options).1
    }
}

fn create_world<B: Backend>(
    size: usize,
    options: &LaunchOptions<B>,
) -> (Arc<World<B>>, Vec<Comm<B>>) {
    {
        let world = Arc::new(World {
            timeout: options.timeout,
            status: Mutex::new(Status { failed: None, left: vec![false; size] }),
            groups: Mutex::new(HashMap::new()),
        });
        let members: Vec<usize> = (0..size).collect();
        let group = Arc::new(Group::new(members.clone()));
        lock(&world.groups).insert((members, 0), group.clone());
        let comms = (0..size)
            .map(|rank| {
                let device = if options.devices.is_empty() {
                    B::Device::default()
                } else {
                    options.devices[rank % options.devices.len()].clone()
                };
                let inner = Arc::new(RankGroup {
                    world: world.clone(),
                    group: group.clone(),
                    rank,
                    device,
                    seq: AtomicU64::new(0),
                    splits: Arc::new(Mutex::new(HashMap::new())),
                });
                Comm::new(Box::new(LocalComm { inner }))
            })
            .collect();
        (world, comms)
    }
}

/// Runs `f` on `size` ranks, one thread each, and returns every rank's result in rank order.
///
/// A rank whose `f` returns an error or panics is marked failed, so every other rank's
/// pending and next waits fail with [`CommError::PeerFailed`] naming it (no hang); a rank
/// whose `f` returns is marked gone, so a rank waiting for it fails with
/// [`CommError::PeerLeft`]. A panic is reported as [`ParallelError::RankFailed`].
pub fn launch<B, T, F>(
    size: usize,
    options: &LaunchOptions<B>,
    f: F,
) -> Vec<Result<T, ParallelError>>
where
    B: Backend,
    T: Send,
    F: Fn(Comm<B>) -> Result<T, ParallelError> + Sync,
{
    let (world, comms) = create_world(size, options);
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let f = &f;
                let world = world.clone();
                let threads = options.threads_per_rank;
                std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .spawn_scoped(scope, move || {
                        let work = || catch_unwind(AssertUnwindSafe(|| f(comm)));
                        let outcome = match threads {
                            Some(n) => match rayon::ThreadPoolBuilder::new()
                                .num_threads(n.max(1))
                                .thread_name(move |i| format!("rank-{rank}-worker-{i}"))
                                .build()
                            {
                                Ok(pool) => pool.install(work),
                                Err(e) => Ok(Err(ParallelError::RankFailed {
                                    rank,
                                    reason: format!("cannot build a thread pool of {n}: {e}"),
                                })),
                            },
                            None => work(),
                        };
                        match outcome {
                            Ok(Ok(v)) => {
                                world.leave(rank);
                                Ok(v)
                            }
                            Ok(Err(e)) => {
                                world.fail(rank, e.to_string());
                                Err(e)
                            }
                            Err(panic) => {
                                let reason = panic_message(panic.as_ref());
                                world.fail(rank, format!("panicked: {reason}"));
                                Err(ParallelError::RankFailed { rank, reason })
                            }
                        }
                    })
                    .expect("spawning a rank thread")
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|p| {
                    Err(ParallelError::RankFailed { rank, reason: panic_message(p.as_ref()) })
                })
            })
            .collect()
    })
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

impl<B: Backend> Group<B> {
    fn new(members: Vec<usize>) -> Self {
        Group {
            members,
            state: Mutex::new(GroupState { slots: HashMap::new(), mail: HashMap::new() }),
            cv: Condvar::new(),
        }
    }
}

impl<B: Backend> RankGroup<B> {
    fn world_rank(&self) -> usize {
        self.group.members[self.rank]
    }

    fn size(&self) -> usize {
        self.group.members.len()
    }

    fn op_name(&self, what: impl fmt::Display) -> String {
        format!("{what} on group {:?}", self.group.members)
    }

    /// Fails at once if any rank of the world has failed.
    fn check_world(&self, op: &str) -> Result<(), CommError> {
        let s = lock(&self.world.status);
        match &s.failed {
            Some((failed_rank, reason)) => Err(CommError::PeerFailed {
                op: op.to_string(),
                rank: self.world_rank(),
                failed_rank: *failed_rank,
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Blocks until `ready` yields, the world fails, a needed rank leaves, or the timeout.
    /// `missing` lists the group ranks still awaited.
    fn wait_until<R>(
        &self,
        op: &str,
        mut ready: impl FnMut(&mut GroupState<B>) -> Option<Result<R, CommError>>,
        missing: impl Fn(&GroupState<B>) -> Vec<usize>,
    ) -> Result<R, CommError> {
        let start = Instant::now();
        let timeout = self.world.timeout;
        let mut g = lock(&self.group.state);
        loop {
            if let Some(r) = ready(&mut g) {
                return r;
            }
            self.check_world(op)?;
            let missing_world: Vec<usize> =
                missing(&g).into_iter().map(|r| self.group.members[r]).collect();
            {
                let s = lock(&self.world.status);
                if let Some(&peer) = missing_world.iter().find(|&&r| s.left[r]) {
                    return Err(CommError::PeerLeft {
                        op: op.to_string(),
                        rank: self.world_rank(),
                        peer,
                    });
                }
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(CommError::Timeout {
                    op: op.to_string(),
                    rank: self.world_rank(),
                    waited,
                    missing: missing_world,
                });
            }
            let slice = POLL.min(timeout - waited);
            g = self.group.cv.wait_timeout(g, slice).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Joins collective number `seq` with `data`; a different op at the same position is a
    /// mismatch that breaks the slot for every rank.
    fn join(&self, op: OpDesc, data: Option<FloatTensor<B>>) -> Result<u64, CommError> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let name = self.op_name(format_args!("{op} #{seq}"));
        self.check_world(&name)?;
        let n = self.size();
        let mut g = lock(&self.group.state);
        let slot = g.slots.entry(seq).or_insert_with(|| Slot {
            op: op.clone(),
            first: self.rank,
            data: (0..n).map(|_| None).collect(),
            joined: vec![false; n],
            done: 0,
            broken: None,
        });
        slot.joined[self.rank] = true;
        slot.data[self.rank] = data;
        if slot.op != op && slot.broken.is_none() {
            slot.broken = Some(CommError::Mismatch {
                group: self.group.members.clone(),
                rank: self.world_rank(),
                ours: format!("{op} (collective #{seq})"),
                other_rank: self.group.members[slot.first],
                theirs: format!("{} (collective #{seq})", slot.op),
            });
        }
        let broken = slot.broken.clone();
        drop(g);
        self.group.cv.notify_all();
        match broken {
            Some(e) => Err(e),
            None => Ok(seq),
        }
    }

    /// Waits for every rank to join collective `seq`, then takes a copy of the contributions.
    fn collect(&self, seq: u64, op: &OpDesc) -> Result<Vec<Option<FloatTensor<B>>>, CommError> {
        let name = self.op_name(format_args!("{op} #{seq}"));
        let n = self.size();
        let rank = self.rank;
        let result = self.wait_until(
            &name,
            |g| {
                let slot = g.slots.get(&seq)?;
                if let Some(e) = &slot.broken {
                    return Some(Err(e.clone()));
                }
                if slot.joined.iter().all(|&j| j) { Some(Ok(slot.data.clone())) } else { None }
            },
            |g| match g.slots.get(&seq) {
                Some(slot) => (0..n).filter(|&r| !slot.joined[r]).collect(),
                None => (0..n).filter(|&r| r != rank).collect(),
            },
        );
        self.release(seq);
        result
    }

    /// Marks this rank done with slot `seq`; the last one removes it.
    fn release(&self, seq: u64) {
        let n = self.size();
        let mut g = lock(&self.group.state);
        if let Some(slot) = g.slots.get_mut(&seq) {
            slot.done += 1;
            if slot.done >= n {
                g.slots.remove(&seq);
            }
        }
    }

    fn shape_error(&self, op: &OpDesc, seq: u64, detail: String) -> CommError {
        CommError::Shape {
            op: self.op_name(format_args!("{op} #{seq}")),
            rank: self.world_rank(),
            detail,
        }
    }

    fn to_device(&self, t: FloatTensor<B>) -> FloatTensor<B> {
        B::float_to_device(t, &self.device)
    }

    /// The result of a completed collective for this rank.
    fn finish(
        &self,
        seq: u64,
        op: &OpDesc,
        data: Vec<Option<FloatTensor<B>>>,
    ) -> Result<FloatTensor<B>, CommError> {
        let n = self.size();
        let shapes: Vec<Shape> = data
            .iter()
            .map(|d| d.as_ref().map(|t| t.shape()).unwrap_or_else(|| Shape::new([0usize; 0])))
            .collect();
        let tensors = || data.iter().map(|d| d.clone().expect("every rank contributed"));
        let same_rank =
            |shapes: &[Shape]| shapes.iter().all(|s| s.num_dims() == shapes[0].num_dims());
        match op {
            OpDesc::AllGather { dim } => {
                let d = *dim;
                let ok = same_rank(&shapes)
                    && d < shapes[0].num_dims()
                    && shapes
                        .iter()
                        .all(|s| (0..s.num_dims()).all(|i| i == d || s[i] == shapes[0][i]));
                if !ok {
                    return Err(self.shape_error(
                        op,
                        seq,
                        format!("shapes must agree except along dim {d}; got {}", show(&shapes)),
                    ));
                }
                let parts: Vec<_> = tensors().map(|t| self.to_device(t)).collect();
                Ok(B::float_cat(parts, d))
            }
            OpDesc::AllToAll { scatter, sizes, gather } => {
                let (s, g) = (*scatter, *gather);
                let nd = shapes[0].num_dims();
                let ok = same_rank(&shapes)
                    && s < nd
                    && g < nd
                    && shapes.iter().all(|x| (0..nd).all(|i| i == g || x[i] == shapes[0][i]))
                    && sizes.len() == n
                    && sizes.iter().sum::<usize>() == shapes[0][s];
                if !ok {
                    return Err(self.shape_error(
                        op,
                        seq,
                        format!(
                            "dim {s} must split into the chunk sizes {sizes:?} and shapes must \
                             agree except along dim {g}; got {}",
                            show(&shapes)
                        ),
                    ));
                }
                let start: usize = sizes[..self.rank].iter().sum();
                let (start, end) = (start as isize, (start + sizes[self.rank]) as isize);
                let parts: Vec<_> = tensors()
                    .map(|t| {
                        let slices: Vec<Slice> = (0..nd)
                            .map(|i| {
                                if i == s { Slice::new(start, Some(end), 1) } else { Slice::full() }
                            })
                            .collect();
                        self.to_device(B::float_slice(t, &slices))
                    })
                    .collect();
                Ok(B::float_cat(parts, g))
            }
            OpDesc::AllReduce => {
                if !shapes.iter().all(|s| s == &shapes[0]) {
                    return Err(self.shape_error(
                        op,
                        seq,
                        format!("shapes must agree; got {}", show(&shapes)),
                    ));
                }
                let mut it = tensors().map(|t| self.to_device(t));
                let first = it.next().expect("a group has at least one rank");
                Ok(it.fold(first, B::float_add))
            }
            OpDesc::Broadcast { root } => {
                if !shapes.iter().all(|s| s == &shapes[*root]) {
                    return Err(self.shape_error(
                        op,
                        seq,
                        format!("every rank must pass the root's shape; got {}", show(&shapes)),
                    ));
                }
                let t = data[*root].clone().expect("the root contributed");
                Ok(self.to_device(t))
            }
            OpDesc::Barrier => unreachable!("barriers have no tensor result"),
        }
    }
}

fn show(shapes: &[Shape]) -> String {
    let v: Vec<String> =
        shapes.iter().enumerate().map(|(r, s)| format!("rank {r}: {:?}", s.as_slice())).collect();
    v.join(", ")
}

struct CollectiveWait<B: Backend> {
    rg: Option<Arc<RankGroup<B>>>,
    seq: u64,
    op: OpDesc,
}

impl<B: Backend> Completion<FloatTensor<B>> for CollectiveWait<B> {
    fn wait(mut self: Box<Self>) -> Result<FloatTensor<B>, CommError> {
        let rg = self.rg.take().expect("waited once");
        let data = rg.collect(self.seq, &self.op)?;
        rg.finish(self.seq, &self.op, data)
    }

    fn is_ready(&self) -> bool {
        let Some(rg) = &self.rg else { return true };
        let g = lock(&rg.group.state);
        g.slots.get(&self.seq).is_some_and(|s| s.broken.is_some() || s.joined.iter().all(|&j| j))
    }
}

impl<B: Backend> Drop for CollectiveWait<B> {
    fn drop(&mut self) {
        // A handle dropped without waiting still releases its slot.
        if let Some(rg) = self.rg.take() {
            rg.release(self.seq);
        }
    }
}

struct Ready<T>(Option<T>);

impl<T: Send> Completion<T> for Ready<T> {
    fn wait(mut self: Box<Self>) -> Result<T, CommError> {
        Ok(self.0.take().expect("waited once"))
    }
    fn is_ready(&self) -> bool {
        true
    }
}

struct RecvWait<B: Backend> {
    rg: Arc<RankGroup<B>>,
    src: usize,
    tag: Tag,
}

impl<B: Backend> Completion<FloatTensor<B>> for RecvWait<B> {
    fn wait(self: Box<Self>) -> Result<FloatTensor<B>, CommError> {
        let rg = &self.rg;
        let key = (self.src, rg.rank);
        let src_world = rg.group.members[self.src];
        let op = rg.op_name(format_args!("recv {} from rank {src_world}", self.tag));
        let msg = rg.wait_until(
            &op,
            |g| g.mail.get_mut(&key).and_then(|q| q.pop_front()).map(Ok),
            |_| vec![self.src],
        )?;
        if msg.tag != self.tag {
            return Err(CommError::TagMismatch {
                rank: rg.world_rank(),
                src: src_world,
                expected: self.tag,
                got: msg.tag,
            });
        }
        Ok(rg.to_device(msg.tensor))
    }

    fn is_ready(&self) -> bool {
        let g = lock(&self.rg.group.state);
        g.mail.get(&(self.src, self.rg.rank)).is_some_and(|q| !q.is_empty())
    }
}

impl<B: Backend> LocalComm<B> {
    fn check_peer(&self, op: &str, peer: usize) -> Result<(), CommError> {
        if peer >= self.inner.size() {
            return Err(CommError::InvalidRank {
                op: op.to_string(),
                rank: self.inner.world_rank(),
                detail: format!("rank {peer} is outside a group of {}", self.inner.size()),
            });
        }
        Ok(())
    }

    fn start(&self, op: OpDesc, t: FloatTensor<B>) -> Result<RawPending<B>, CommError> {
        let seq = self.inner.join(op.clone(), Some(t))?;
        Ok(RawPending(Box::new(CollectiveWait { rg: Some(self.inner.clone()), seq, op })))
    }
}

impl<B: Backend> Communicator<B> for LocalComm<B> {
    fn rank(&self) -> usize {
        self.inner.rank
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn members(&self) -> &[usize] {
        &self.inner.group.members
    }

    fn device(&self) -> B::Device {
        self.inner.device.clone()
    }

    fn timeout(&self) -> Duration {
        self.inner.world.timeout
    }

    fn start_all_gather(&self, t: FloatTensor<B>, dim: usize) -> Result<RawPending<B>, CommError> {
        self.start(OpDesc::AllGather { dim }, t)
    }

    fn start_all_to_all(
        &self,
        t: FloatTensor<B>,
        scatter_dim: usize,
        scatter_sizes: Vec<usize>,
        gather_dim: usize,
    ) -> Result<RawPending<B>, CommError> {
        self.start(
            OpDesc::AllToAll { scatter: scatter_dim, sizes: scatter_sizes, gather: gather_dim },
            t,
        )
    }

    fn start_all_reduce(&self, t: FloatTensor<B>) -> Result<RawPending<B>, CommError> {
        self.start(OpDesc::AllReduce, t)
    }

    fn start_broadcast(&self, t: FloatTensor<B>, root: usize) -> Result<RawPending<B>, CommError> {
        self.check_peer("broadcast", root)?;
        self.start(OpDesc::Broadcast { root }, t)
    }

    fn start_send(
        &self,
        t: FloatTensor<B>,
        dst: usize,
        tag: Tag,
    ) -> Result<RawPendingSend, CommError> {
        let rg = &self.inner;
        let op = rg.op_name(format_args!("send {tag} to rank {dst}"));
        self.check_peer(&op, dst)?;
        rg.check_world(&op)?;
        lock(&rg.group.state)
            .mail
            .entry((rg.rank, dst))
            .or_default()
            .push_back(Message { tag, tensor: t });
        rg.group.cv.notify_all();
        Ok(RawPendingSend(Box::new(Ready(Some(())))))
    }

    fn start_recv(&self, src: usize, tag: Tag) -> Result<RawPending<B>, CommError> {
        let op = self.inner.op_name(format_args!("recv {tag} from rank {src}"));
        self.check_peer(&op, src)?;
        self.inner.check_world(&op)?;
        Ok(RawPending(Box::new(RecvWait { rg: self.inner.clone(), src, tag })))
    }

    fn barrier(&self) -> Result<(), CommError> {
        let seq = self.inner.join(OpDesc::Barrier, None)?;
        self.inner.collect(seq, &OpDesc::Barrier).map(|_| ())
    }

    fn split(&self, members: &[usize]) -> Result<Box<dyn Communicator<B>>, CommError> {
        let rg = &self.inner;
        let me = rg.world_rank();
        let world_size = lock(&rg.world.status).left.len();
        let mut sorted = members.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let invalid =
            |detail: String| CommError::InvalidRank { op: "split".into(), rank: me, detail };
        if sorted.len() != members.len() || members.is_empty() {
            return Err(invalid(format!("members {members:?} must be distinct and non-empty")));
        }
        if let Some(&bad) = members.iter().find(|&&m| m >= world_size) {
            return Err(invalid(format!("rank {bad} is outside a world of {world_size}")));
        }
        let Some(rank) = members.iter().position(|&m| m == me) else {
            return Err(invalid(format!("this rank is not among the members {members:?}")));
        };
        let nth = {
            let mut splits = lock(&rg.splits);
            let c = splits.entry(members.to_vec()).or_insert(0);
            *c += 1;
            *c
        };
        let group = lock(&rg.world.groups)
            .entry((members.to_vec(), nth))
            .or_insert_with(|| Arc::new(Group::new(members.to_vec())))
            .clone();
        let inner = Arc::new(RankGroup {
            world: rg.world.clone(),
            group,
            rank,
            device: rg.device.clone(),
            seq: AtomicU64::new(0),
            splits: rg.splits.clone(),
        });
        Ok(Box::new(LocalComm { inner }))
    }

    fn abort(&self, reason: &str) {
        self.inner.world.fail(self.inner.world_rank(), reason.to_string());
    }
}

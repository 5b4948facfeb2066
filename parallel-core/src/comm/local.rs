//! `LocalComm`: N ranks as N threads of one process, each with its own device value, under
//! NCCL's rules (see the [`comm`](super) module docs).
//!
//! # How it works
//! Each group (communicator) keeps, per member, the **stream** of operations it issued: a
//! queue of *units* (a collective, a single send or receive, or a group of sends and
//! receives issued together). Only the unit at the front of a member's stream may execute.
//! A collective executes when it is at the front of every member's stream; a send executes
//! with the receive it matches (the first pending receive from this rank at the front of
//! the receiver's stream, pairs in issue order). Executing an operation moves its data (the
//! contributions are shared with every participant, each computes its own result when it
//! waits), **counts the bytes that leave each rank per destination** ([`CommStats`]), and,
//! under a [`LinkModel`], schedules the transfers on their links. A unit leaves the front of
//! its stream when all its operations have executed; the next one becomes ready at the time
//! the last of them completes.
//!
//! Times are logical: an operation's start is the latest of its participants' ready times
//! (when their previous unit completed, or when they issued it) and of its links' free
//! times, and its completion is start + modelled transfer time. Execution itself happens as
//! soon as the data is there (whichever rank's call finds it ready); a wait then blocks until
//! the clock reaches the completion time. Without a link model every transfer is instant.
//!
//! Every wait polls the world's failure state, so that one rank's error or panic ends every
//! other rank's waits within a few milliseconds.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, Slice, TensorMetadata};

use super::link::{Clock, LinkModel, WallClock};
use super::transport::Transport;
use super::{
    Comm, CommStats, Communicator, Completion, OpKind, P2pHandle, P2pOp, RawPending,
    RawPendingSend, Tag,
};
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
    clock: Arc<dyn Clock>,
    link: Option<LinkModel>,
    /// Per directed link (world ranks): when it is free again.
    busy: Mutex<HashMap<(usize, usize), Duration>>,
    /// Per world rank: what the transport moved off it.
    stats: Vec<Mutex<CommStats>>,
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

    /// Schedules `bytes` over `src → dst` no earlier than `earliest`; returns when they have
    /// arrived, and counts them.
    fn transfer(
        &self,
        kind: OpKind,
        (src, dst): (usize, usize),
        (elements, elem_bytes): (u64, u64),
        earliest: Duration,
    ) -> Duration {
        lock(&self.stats[src]).moved(kind, dst, elements, elem_bytes);
        let Some(model) = &self.link else { return earliest };
        let mut busy = lock(&self.busy);
        let free = busy.entry((src, dst)).or_insert(Duration::ZERO);
        let start = earliest.max(*free);
        let end = start + model.link(src, dst).transfer_time(elements * elem_bytes, model.dilation);
        *free = end;
        end
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

impl OpDesc {
    fn kind(&self) -> OpKind {
        match self {
            OpDesc::AllGather { .. } => OpKind::AllGather,
            OpDesc::AllToAll { .. } => OpKind::AllToAll,
            OpDesc::AllReduce => OpKind::AllReduce,
            OpDesc::Broadcast { .. } => OpKind::Broadcast,
            OpDesc::Barrier => OpKind::Barrier,
        }
    }
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

enum Body<B: Backend> {
    Coll { seq: u64, desc: OpDesc, data: Option<FloatTensor<B>> },
    Send { dst: usize, tag: Tag, data: Option<FloatTensor<B>> },
    Recv { src: usize, tag: Tag },
}

/// What an executed operation gives its waiter.
enum Out<B: Backend> {
    /// Every member's contribution, in group order (collectives).
    Parts(Arc<Vec<Option<FloatTensor<B>>>>),
    /// A received message.
    Message(FloatTensor<B>),
    /// A completed send or barrier.
    Nothing,
}

enum OpState<B: Backend> {
    Pending,
    Done { at: Duration, out: Out<B> },
    Failed(CommError),
}

struct Op<B: Backend> {
    /// The issuing group rank.
    rank: usize,
    label: String,
    body: Body<B>,
    state: OpState<B>,
    /// Dropped without being waited on: removed once executed.
    abandoned: bool,
}

struct Unit {
    ops: Vec<u64>,
    /// When it was issued.
    issued: Duration,
    /// The latest completion of its executed operations.
    done: Duration,
}

struct GroupState<B: Backend> {
    ops: HashMap<u64, Op<B>>,
    /// Per group rank, its issued units not yet retired, in issue order.
    streams: Vec<VecDeque<Unit>>,
    /// Per group rank, when its previous unit completed.
    ready: Vec<Duration>,
    /// Per group rank, the collectives it has issued.
    coll_seq: Vec<u64>,
    /// Per group rank, the label of an operation it dropped un-waited.
    poisoned: Vec<Option<String>>,
    next_id: u64,
}

struct Group<B: Backend> {
    members: Vec<usize>,
    state: Mutex<GroupState<B>>,
    cv: Condvar,
}

impl<B: Backend> Group<B> {
    fn new(members: Vec<usize>) -> Self {
        let n = members.len();
        Group {
            members,
            state: Mutex::new(GroupState {
                ops: HashMap::new(),
                streams: (0..n).map(|_| VecDeque::new()).collect(),
                ready: vec![Duration::ZERO; n],
                coll_seq: vec![0; n],
                poisoned: vec![None; n],
                next_id: 0,
            }),
            cv: Condvar::new(),
        }
    }
}

struct RankGroup<B: Backend> {
    world: Arc<World<B>>,
    group: Arc<Group<B>>,
    rank: usize,
    device: B::Device,
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
    /// Transfers take the time this model gives them (`None`: instant).
    pub link: Option<LinkModel>,
    /// The clock of the link model (`None`: the wall clock).
    pub clock: Option<Arc<dyn Clock>>,
    /// The transport that forms the world (`None`: [`LocalComm`] in process, TCP between
    /// processes); see [`Transport`].
    pub transport: Option<Arc<dyn Transport<B>>>,
}

impl<B: Backend> Default for LaunchOptions<B> {
    fn default() -> Self {
        LaunchOptions {
            timeout: Duration::from_secs(300),
            devices: Vec::new(),
            threads_per_rank: None,
            link: None,
            clock: None,
            transport: None,
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

    /// These options with transfers timed by `link`.
    pub fn with_link(mut self, link: LinkModel) -> Self {
        self.link = Some(link);
        self
    }

    /// These options with the link model on `clock` (tests: a [`ManualClock`]).
    ///
    /// [`ManualClock`]: super::ManualClock
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// These options with the world formed by `transport` (see [`Transport`]).
    pub fn with_transport(mut self, transport: Arc<dyn Transport<B>>) -> Self {
        self.transport = Some(transport);
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
    let world = Arc::new(World {
        timeout: options.timeout,
        status: Mutex::new(Status { failed: None, left: vec![false; size] }),
        groups: Mutex::new(HashMap::new()),
        clock: options.clock.clone().unwrap_or_else(|| Arc::new(WallClock::default())),
        link: options.link.clone(),
        busy: Mutex::new(HashMap::new()),
        stats: (0..size).map(|_| Mutex::new(CommStats::default())).collect(),
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
                splits: Arc::new(Mutex::new(HashMap::new())),
            });
            Comm::new(Box::new(LocalComm { inner }))
        })
        .collect();
    (world, comms)
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
    if let Some(transport) = &options.transport {
        return launch_on(transport.as_ref(), size, options, f);
    }
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
                    .spawn_scoped(scope, move || match run_rank(rank, threads, || f(comm)) {
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
                    })
                    .expect("spawning a rank thread")
            })
            .collect();
        join_ranks(handles)
    })
}

/// [`launch`] on a [`Transport`]: each rank's thread connects, runs `f`, and on failure
/// aborts its communicator so that the other ranks' waits end.
fn launch_on<B, T, F>(
    transport: &dyn Transport<B>,
    size: usize,
    options: &LaunchOptions<B>,
    f: F,
) -> Vec<Result<T, ParallelError>>
where
    B: Backend,
    T: Send,
    F: Fn(Comm<B>) -> Result<T, ParallelError> + Sync,
{
    let connector = match transport.world(size, options) {
        Ok(c) => c,
        Err(e) => return (0..size).map(|_| Err(ParallelError::Comm(e.clone()))).collect(),
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let (f, connector) = (&f, connector.clone());
                let threads = options.threads_per_rank;
                std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .spawn_scoped(scope, move || {
                        let comm = connector.connect(rank)?;
                        let mine = comm.clone();
                        match run_rank(rank, threads, || f(comm)) {
                            Ok(Ok(v)) => Ok(v),
                            Ok(Err(e)) => {
                                mine.abort(&e.to_string());
                                Err(e)
                            }
                            Err(panic) => {
                                let reason = panic_message(panic.as_ref());
                                mine.abort(&format!("panicked: {reason}"));
                                Err(ParallelError::RankFailed { rank, reason })
                            }
                        }
                    })
                    .expect("spawning a rank thread")
            })
            .collect();
        join_ranks(handles)
    })
}

/// Every rank thread's result in rank order; a thread that panicked outside its rank's
/// catch is [`ParallelError::RankFailed`].
pub(super) fn join_ranks<T>(
    handles: Vec<std::thread::ScopedJoinHandle<'_, Result<T, ParallelError>>>,
) -> Vec<Result<T, ParallelError>> {
    handles
        .into_iter()
        .enumerate()
        .map(|(rank, h)| {
            h.join().unwrap_or_else(|p| {
                Err(ParallelError::RankFailed { rank, reason: panic_message(p.as_ref()) })
            })
        })
        .collect()
}

/// What running one rank's work gave: its own result, or the payload of its panic.
pub(super) type RankOutcome<T> =
    Result<Result<T, ParallelError>, Box<dyn std::any::Any + Send + 'static>>;

/// Runs rank `rank`'s `work` on a rayon pool of `threads` threads (`None`: the global pool),
/// catching a panic. Both transports' launchers run their ranks through it.
pub(super) fn run_rank<T: Send>(
    rank: usize,
    threads: Option<usize>,
    work: impl FnOnce() -> Result<T, ParallelError> + Send,
) -> RankOutcome<T> {
    let work = move || catch_unwind(AssertUnwindSafe(work));
    match threads {
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
    }
}

/// Checks the members of a [`Communicator::split`] made by world rank `me` of a world of
/// `world_size`; this rank's index among them. For every implementation of the contract.
///
/// # Errors
/// [`CommError::InvalidRank`]: members repeated, empty, outside the world, or without `me`.
pub fn check_split(me: usize, world_size: usize, members: &[usize]) -> Result<usize, CommError> {
    let mut sorted = members.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let invalid = |detail: String| CommError::InvalidRank { op: "split".into(), rank: me, detail };
    if sorted.len() != members.len() || members.is_empty() {
        return Err(invalid(format!("members {members:?} must be distinct and non-empty")));
    }
    if let Some(&bad) = members.iter().find(|&&m| m >= world_size) {
        return Err(invalid(format!("rank {bad} is outside a world of {world_size}")));
    }
    members
        .iter()
        .position(|&m| m == me)
        .ok_or_else(|| invalid(format!("this rank is not among the members {members:?}")))
}

/// The `nth` time (from 1) this rank splits onto `members`, counted in `splits`.
pub(super) fn next_split(splits: &Mutex<HashMap<Vec<usize>, u64>>, members: &[usize]) -> u64 {
    let mut splits = lock(splits);
    let c = splits.entry(members.to_vec()).or_insert(0);
    *c += 1;
    *c
}

pub(super) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Elements and element size of a tensor.
fn size_of<B: Backend>(t: &FloatTensor<B>) -> (u64, u64) {
    (t.shape().num_elements() as u64, t.dtype().size() as u64)
}

/// The `n` ring chunks of `size` elements, as (start, len): larger ones first.
pub(super) fn chunks(size: usize, n: usize) -> Vec<(usize, usize)> {
    let mut start = 0;
    (0..n)
        .map(|i| {
            let len = size / n + usize::from(i < size % n);
            start += len;
            (start - len, len)
        })
        .collect()
}

impl<B: Backend> GroupState<B> {
    fn pending(&self, id: u64) -> bool {
        self.ops.get(&id).is_some_and(|op| matches!(op.state, OpState::Pending))
    }

    /// When rank `r`'s front unit became ready.
    fn ready_at(&self, r: usize) -> Duration {
        let issued = self.streams[r].front().map_or(Duration::ZERO, |u| u.issued);
        issued.max(self.ready[r])
    }

    /// Marks `id` done at `at` with `out` (and its unit's completion).
    fn finish(&mut self, id: u64, at: Duration, out: Out<B>) {
        let Some(op) = self.ops.get_mut(&id) else { return };
        let r = op.rank;
        if op.abandoned {
            self.ops.remove(&id);
        } else {
            op.state = OpState::Done { at, out };
        }
        if let Some(u) = self.streams[r].front_mut() {
            u.done = u.done.max(at);
        }
    }

    fn fail(&mut self, id: u64, e: CommError, now: Duration) {
        let Some(op) = self.ops.get_mut(&id) else { return };
        let r = op.rank;
        if op.abandoned {
            self.ops.remove(&id);
        } else {
            op.state = OpState::Failed(e);
        }
        if let Some(u) = self.streams[r].front_mut() {
            u.done = u.done.max(now);
        }
    }

    /// The first pending operation of rank `r`'s front unit matching `pred`.
    fn front_op(&self, r: usize, pred: impl Fn(&Body<B>) -> bool) -> Option<u64> {
        let unit = self.streams[r].front()?;
        unit.ops.iter().copied().find(|&id| {
            self.ops
                .get(&id)
                .is_some_and(|op| matches!(op.state, OpState::Pending) && pred(&op.body))
        })
    }

    /// What rank `r` is blocked on, in words.
    fn front_label(&self, r: usize) -> String {
        match self.streams[r].front() {
            None => "nothing issued".into(),
            Some(u) => {
                let labels: Vec<&str> = u
                    .ops
                    .iter()
                    .filter(|&&id| self.pending(id))
                    .filter_map(|id| self.ops.get(id).map(|o| o.label.as_str()))
                    .collect();
                if labels.is_empty() { "a completed operation".into() } else { labels.join(" + ") }
            }
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

    fn check_peer(&self, op: &str, peer: usize) -> Result<(), CommError> {
        if peer >= self.size() {
            return Err(CommError::InvalidRank {
                op: op.to_string(),
                rank: self.world_rank(),
                detail: format!("rank {peer} is outside a group of {}", self.size()),
            });
        }
        Ok(())
    }

    fn poisoned(&self, g: &GroupState<B>) -> Result<(), CommError> {
        match &g.poisoned[self.rank] {
            Some(op) => Err(CommError::Abandoned { op: op.clone(), rank: self.world_rank() }),
            None => Ok(()),
        }
    }

    /// Issues one unit of operations on this rank's stream; returns their ids.
    fn issue(&self, bodies: Vec<(String, OpKind, Body<B>)>) -> Result<Vec<u64>, CommError> {
        let first = bodies.first().map(|b| b.0.clone()).unwrap_or_default();
        self.check_world(&first)?;
        let now = self.world.clock.now();
        let mut g = lock(&self.group.state);
        self.poisoned(&g)?;
        let mut ids = Vec::with_capacity(bodies.len());
        {
            let mut stats = lock(&self.world.stats[self.world_rank()]);
            for (label, kind, mut body) in bodies {
                if let Body::Coll { seq, .. } = &mut body {
                    *seq = g.coll_seq[self.rank];
                    g.coll_seq[self.rank] += 1;
                }
                let id = g.next_id;
                g.next_id += 1;
                stats.called(kind);
                g.ops.insert(
                    id,
                    Op { rank: self.rank, label, body, state: OpState::Pending, abandoned: false },
                );
                ids.push(id);
            }
        }
        g.streams[self.rank].push_back(Unit { ops: ids.clone(), issued: now, done: now });
        self.progress(&mut g);
        drop(g);
        self.group.cv.notify_all();
        Ok(ids)
    }

    /// Executes everything that can execute, and retires completed front units.
    fn progress(&self, g: &mut GroupState<B>) {
        let n = self.size();
        loop {
            let mut changed = false;
            for r in 0..n {
                let Some(unit) = g.streams[r].front() else { continue };
                for id in unit.ops.clone() {
                    if !g.pending(id) {
                        continue;
                    }
                    changed |= match &g.ops[&id].body {
                        Body::Coll { seq, .. } => {
                            let seq = *seq;
                            self.try_collective(g, seq)
                        }
                        Body::Send { dst, .. } => {
                            let dst = *dst;
                            // Pairs match in issue order: the first pending send to `dst` of
                            // this unit with the first pending receive from `r` of dst's.
                            let first = g.front_op(
                                r,
                                |b| matches!(b, Body::Send { dst: d, .. } if *d == dst),
                            );
                            let recv = g.front_op(
                                dst,
                                |b| matches!(b, Body::Recv { src, .. } if *src == r),
                            );
                            match (first, recv) {
                                (Some(s), Some(v)) if s == id => {
                                    self.execute_p2p(g, s, v);
                                    true
                                }
                                _ => false,
                            }
                        }
                        Body::Recv { .. } => false,
                    };
                }
            }
            for r in 0..n {
                while let Some(u) = g.streams[r].front() {
                    if u.ops.iter().any(|&id| g.pending(id)) {
                        break;
                    }
                    let done = u.done;
                    g.ready[r] = g.ready[r].max(done);
                    g.streams[r].pop_front();
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
    }

    /// Executes collective `seq` if it is at the front of every member's stream.
    fn try_collective(&self, g: &mut GroupState<B>, seq: u64) -> bool {
        let n = self.size();
        let mut ids = Vec::with_capacity(n);
        for m in 0..n {
            match g.front_op(m, |b| matches!(b, Body::Coll { seq: s, .. } if *s == seq)) {
                Some(id) => ids.push(id),
                None => return false,
            }
        }
        let descs: Vec<OpDesc> = ids
            .iter()
            .map(|id| match &g.ops[id].body {
                Body::Coll { desc, .. } => desc.clone(),
                _ => unreachable!("a collective's id"),
            })
            .collect();
        let first = descs[0].clone();
        let now = self.world.clock.now();
        if let Some(m) = (1..n).find(|&m| descs[m] != first) {
            let theirs = descs[m].clone();
            for (r, id) in ids.iter().enumerate() {
                let (ours, other, other_rank) = if r == m {
                    (theirs.clone(), first.clone(), self.group.members[0])
                } else {
                    (descs[r].clone(), theirs.clone(), self.group.members[m])
                };
                let e = CommError::Mismatch {
                    group: self.group.members.clone(),
                    rank: self.group.members[r],
                    ours: format!("{ours} (collective #{seq})"),
                    other_rank,
                    theirs: format!("{other} (collective #{seq})"),
                };
                g.fail(*id, e, now);
            }
            return true;
        }
        let parts: Vec<Option<FloatTensor<B>>> = ids
            .iter()
            .map(|id| match g.ops.get_mut(id).map(|o| &mut o.body) {
                Some(Body::Coll { data, .. }) => data.take(),
                _ => None,
            })
            .collect();
        if let Err(detail) = validate::<B>(&first, &parts, n) {
            for (r, id) in ids.iter().enumerate() {
                let e = CommError::Shape {
                    op: self.op_name(format_args!("{first} #{seq}")),
                    rank: self.group.members[r],
                    detail: detail.clone(),
                };
                g.fail(*id, e, now);
            }
            return true;
        }
        let start = (0..n).map(|m| g.ready_at(m)).max().unwrap_or(now);
        let done = self.move_collective(&first, &parts, start);
        let parts = Arc::new(parts);
        for id in ids {
            g.finish(id, done, Out::Parts(parts.clone()));
        }
        true
    }

    /// The transfers of a collective, as the algorithm moves them: counted per link and
    /// scheduled under the link model. Returns when the last one arrives.
    fn move_collective(
        &self,
        desc: &OpDesc,
        parts: &[Option<FloatTensor<B>>],
        start: Duration,
    ) -> Duration {
        let n = self.size();
        let w = &self.group.members;
        let kind = desc.kind();
        let world = &self.world;
        let mut done = start;
        let size = |r: usize| parts[r].as_ref().map(size_of::<B>).unwrap_or((0, 0));
        match desc {
            OpDesc::Barrier => {
                if let Some(m) = &world.link {
                    done = start + m.link.transfer_time(0, m.dilation);
                }
            }
            OpDesc::AllGather { .. } => {
                for r in 0..n {
                    for j in (0..n).filter(|&j| j != r) {
                        done = done.max(world.transfer(kind, (w[r], w[j]), size(r), start));
                    }
                }
            }
            OpDesc::Broadcast { root } => {
                for j in (0..n).filter(|j| j != root) {
                    done = done.max(world.transfer(kind, (w[*root], w[j]), size(*root), start));
                }
            }
            OpDesc::AllToAll { scatter, sizes, .. } => {
                for r in 0..n {
                    let (elements, eb) = size(r);
                    let dim = parts[r].as_ref().map_or(1, |t| t.shape()[*scatter]).max(1) as u64;
                    for j in (0..n).filter(|&j| j != r) {
                        let chunk = elements / dim * sizes[j] as u64;
                        done = done.max(world.transfer(kind, (w[r], w[j]), (chunk, eb), start));
                    }
                }
            }
            OpDesc::AllReduce => {
                // Ring: reduce-scatter then all-gather, 2(N − 1) synchronous steps; at step k
                // rank r sends chunk (r − k) (reduce-scatter) or (r + 1 − k) (all-gather) to
                // rank r + 1.
                let (elements, eb) = size(0);
                let c = chunks(elements as usize, n);
                let mut t = start;
                for step in 0..2 * (n.saturating_sub(1)) {
                    let mut end = t;
                    for r in 0..n {
                        let k = step % (n - 1);
                        let chunk =
                            if step < n - 1 { (r + n - k) % n } else { (r + 1 + n - k) % n };
                        let bytes = (c[chunk].1 as u64, eb);
                        end = end.max(world.transfer(kind, (w[r], w[(r + 1) % n]), bytes, t));
                    }
                    t = end;
                }
                done = t;
            }
        }
        done
    }

    /// Executes the send `s` with the receive `v` it matches.
    fn execute_p2p(&self, g: &mut GroupState<B>, s: u64, v: u64) {
        let now = self.world.clock.now();
        let (src, send_tag, data) = match g.ops.get_mut(&s) {
            Some(Op { rank, body: Body::Send { tag, data, .. }, .. }) => (*rank, *tag, data.take()),
            _ => return,
        };
        let (dst, recv_tag) = match g.ops.get(&v) {
            Some(Op { rank, body: Body::Recv { tag, .. }, .. }) => (*rank, *tag),
            _ => return,
        };
        if send_tag != recv_tag {
            let e = CommError::TagMismatch {
                rank: self.group.members[dst],
                src: self.group.members[src],
                expected: recv_tag,
                got: send_tag,
            };
            g.fail(s, e.clone(), now);
            g.fail(v, e, now);
            return;
        }
        let Some(data) = data else { return };
        let start = g.ready_at(src).max(g.ready_at(dst));
        let link = (self.group.members[src], self.group.members[dst]);
        let done = self.world.transfer(OpKind::Send, link, size_of::<B>(&data), start);
        g.finish(s, done, Out::Nothing);
        g.finish(v, done, Out::Message(data));
    }

    /// The ranks `id` waits for, and what they are blocked on.
    fn missing(&self, g: &GroupState<B>, id: u64) -> (Vec<usize>, String) {
        let n = self.size();
        let Some(op) = g.ops.get(&id) else { return (Vec::new(), String::new()) };
        let peers: Vec<usize> = match &op.body {
            Body::Coll { seq, .. } => (0..n)
                .filter(|&m| {
                    g.front_op(m, |b| matches!(b, Body::Coll { seq: s, .. } if s == seq)).is_none()
                })
                .collect(),
            Body::Send { dst, .. } => vec![*dst],
            Body::Recv { src, .. } => vec![*src],
        };
        let blocked: Vec<String> = peers
            .iter()
            .map(|&p| format!("rank {} is at: {}", self.group.members[p], g.front_label(p)))
            .collect();
        let own = if g.streams[self.rank].front().is_some_and(|u| !u.ops.contains(&id)) {
            format!("; this rank's earlier operation is not done: {}", g.front_label(self.rank))
        } else {
            String::new()
        };
        let text = if blocked.is_empty() { own } else { format!(" ({}){own}", blocked.join("; ")) };
        (peers.iter().map(|&p| self.group.members[p]).collect(), text)
    }

    /// Blocks until operation `id` has completed; its outcome.
    fn wait(&self, id: u64) -> Result<Out<B>, CommError> {
        let started = Instant::now();
        let timeout = self.world.timeout;
        let clock = &self.world.clock;
        let mut g = lock(&self.group.state);
        let result = loop {
            self.progress(&mut g);
            let Some(op) = g.ops.get(&id) else {
                break Err(CommError::InvalidRank {
                    op: "wait".into(),
                    rank: self.world_rank(),
                    detail: "the operation is unknown (already waited?)".into(),
                });
            };
            let label = op.label.clone();
            match &op.state {
                OpState::Done { at, .. } => {
                    let at = *at;
                    if clock.now() >= at {
                        match g.ops.remove(&id).map(|o| o.state) {
                            Some(OpState::Done { out, .. }) => break Ok(out),
                            _ => unreachable!("checked above"),
                        }
                    }
                    drop(g);
                    clock.sleep_until(at, POLL);
                    g = lock(&self.group.state);
                }
                OpState::Failed(_) => match g.ops.remove(&id).map(|o| o.state) {
                    Some(OpState::Failed(e)) => break Err(e),
                    _ => unreachable!("checked above"),
                },
                OpState::Pending => {
                    if let Err(e) = self.check_world(&label) {
                        break Err(e);
                    }
                    let (missing, blocked) = self.missing(&g, id);
                    {
                        let s = lock(&self.world.status);
                        if let Some(&peer) = missing.iter().find(|&&r| s.left[r]) {
                            break Err(CommError::PeerLeft {
                                op: label,
                                rank: self.world_rank(),
                                peer,
                            });
                        }
                    }
                    let waited = started.elapsed();
                    if waited >= timeout {
                        break Err(CommError::Timeout {
                            op: label,
                            rank: self.world_rank(),
                            waited,
                            missing,
                            blocked,
                        });
                    }
                    let slice = POLL.min(timeout - waited);
                    g = self.group.cv.wait_timeout(g, slice).unwrap_or_else(|e| e.into_inner()).0;
                }
            }
        };
        drop(g);
        self.group.cv.notify_all();
        lock(&self.world.stats[self.world_rank()]).waited(started.elapsed());
        result
    }

    fn is_ready(&self, id: u64) -> bool {
        let mut g = lock(&self.group.state);
        self.progress(&mut g);
        match g.ops.get(&id).map(|o| &o.state) {
            Some(OpState::Done { at, .. }) => self.world.clock.now() >= *at,
            Some(OpState::Failed(_)) | None => true,
            Some(OpState::Pending) => false,
        }
    }

    /// A handle of `id` dropped un-waited: the operation runs on, its result is dropped,
    /// and this rank's next call on the group fails naming it.
    fn abandon(&self, id: u64) {
        let mut g = lock(&self.group.state);
        let Some(op) = g.ops.get_mut(&id) else { return };
        let label = op.label.clone();
        if matches!(op.state, OpState::Pending) {
            op.abandoned = true;
        } else {
            g.ops.remove(&id);
        }
        let r = self.rank;
        if g.poisoned[r].is_none() {
            g.poisoned[r] = Some(label);
        }
    }

    /// This rank's result of a completed collective.
    fn result(&self, desc: &OpDesc, out: Out<B>) -> Result<FloatTensor<B>, CommError> {
        let parts = match out {
            Out::Parts(p) => p,
            Out::Message(t) => return Ok(self.to_device(t)),
            Out::Nothing => {
                return Err(CommError::InvalidRank {
                    op: desc.to_string(),
                    rank: self.world_rank(),
                    detail: "the operation has no tensor result".into(),
                });
            }
        };
        let n = self.size();
        let tensors =
            || parts.iter().map(|d| d.clone().expect("validated: every rank contributed"));
        Ok(match desc {
            OpDesc::AllGather { dim } => {
                B::float_cat(tensors().map(|t| self.to_device(t)).collect(), *dim)
            }
            OpDesc::AllToAll { scatter, sizes, gather } => {
                let start: usize = sizes[..self.rank].iter().sum();
                let (start, end) = (start as isize, (start + sizes[self.rank]) as isize);
                let parts: Vec<_> = tensors()
                    .map(|t| {
                        let nd = t.shape().num_dims();
                        let slices: Vec<Slice> = (0..nd)
                            .map(|i| {
                                if i == *scatter {
                                    Slice::new(start, Some(end), 1)
                                } else {
                                    Slice::full()
                                }
                            })
                            .collect();
                        // The slice of a head or token range is a strided view; the
                        // concatenation below would copy it element by element.
                        kernels::contiguous_primitive::<B>(
                            self.to_device(B::float_slice(t, &slices)),
                        )
                    })
                    .collect();
                B::float_cat(parts, *gather)
            }
            OpDesc::AllReduce => {
                // Chunk c is summed along the ring from rank c: x_c + x_{c+1} + … + x_{c−1},
                // as the reduce-scatter does it; every rank gets those same chunks.
                let shape = parts[0].as_ref().expect("validated").shape();
                let size = shape.num_elements();
                let flat: Vec<FloatTensor<B>> = tensors()
                    .map(|t| B::float_reshape(self.to_device(t), Shape::new([size])))
                    .collect();
                let reduced: Vec<FloatTensor<B>> = chunks(size, n)
                    .into_iter()
                    .enumerate()
                    .filter(|(_, (_, len))| *len > 0)
                    .map(|(c, (start, len))| {
                        let slice = |t: &FloatTensor<B>| {
                            B::float_slice(
                                t.clone(),
                                &[Slice::new(start as isize, Some((start + len) as isize), 1)],
                            )
                        };
                        let mut acc = slice(&flat[c]);
                        for i in 1..n {
                            acc = B::float_add(acc, slice(&flat[(c + i) % n]));
                        }
                        acc
                    })
                    .collect();
                B::float_reshape(B::float_cat(reduced, 0), shape)
            }
            OpDesc::Broadcast { root } => self.to_device(parts[*root].clone().expect("validated")),
            OpDesc::Barrier => {
                return Err(CommError::InvalidRank {
                    op: "barrier".into(),
                    rank: self.world_rank(),
                    detail: "a barrier has no tensor result".into(),
                });
            }
        })
    }

    fn to_device(&self, t: FloatTensor<B>) -> FloatTensor<B> {
        B::float_to_device(t, &self.device)
    }
}

/// Checks that the contributions fit the collective.
fn validate<B: Backend>(
    op: &OpDesc,
    parts: &[Option<FloatTensor<B>>],
    n: usize,
) -> Result<(), String> {
    if matches!(op, OpDesc::Barrier) {
        return Ok(());
    }
    let shapes: Vec<Shape> = parts
        .iter()
        .map(|d| d.as_ref().map(|t| t.shape()).unwrap_or_else(|| Shape::new([0usize; 0])))
        .collect();
    if parts.iter().any(Option::is_none) {
        return Err("a rank contributed no tensor".into());
    }
    let same_rank = shapes.iter().all(|s| s.num_dims() == shapes[0].num_dims());
    let nd = shapes[0].num_dims();
    let ok = match op {
        OpDesc::AllGather { dim } => {
            same_rank
                && *dim < nd
                && shapes.iter().all(|s| (0..nd).all(|i| i == *dim || s[i] == shapes[0][i]))
        }
        OpDesc::AllToAll { scatter, sizes, gather } => {
            same_rank
                && *scatter < nd
                && *gather < nd
                && shapes.iter().all(|x| (0..nd).all(|i| i == *gather || x[i] == shapes[0][i]))
                && sizes.len() == n
                && sizes.iter().sum::<usize>() == shapes[0][*scatter]
        }
        OpDesc::AllReduce => shapes.iter().all(|s| s == &shapes[0]),
        OpDesc::Broadcast { root } => shapes.iter().all(|s| s == &shapes[*root]),
        OpDesc::Barrier => true,
    };
    if ok {
        return Ok(());
    }
    let show: Vec<String> =
        shapes.iter().enumerate().map(|(r, s)| format!("rank {r}: {:?}", s.as_slice())).collect();
    let want = match op {
        OpDesc::AllGather { dim } => format!("shapes must agree except along dim {dim}"),
        OpDesc::AllToAll { scatter, sizes, gather } => format!(
            "dim {scatter} must split into the chunk sizes {sizes:?} and shapes must agree \
             except along dim {gather}"
        ),
        OpDesc::AllReduce => "shapes must agree".into(),
        OpDesc::Broadcast { .. } => "every rank must pass the root's shape".into(),
        OpDesc::Barrier => String::new(),
    };
    Err(format!("{want}; got {}", show.join(", ")))
}

/// The handle of one issued operation.
struct Handle<B: Backend> {
    rg: Arc<RankGroup<B>>,
    id: u64,
    desc: Option<OpDesc>,
    waited: bool,
}

impl<B: Backend> Drop for Handle<B> {
    fn drop(&mut self) {
        if !self.waited {
            self.rg.abandon(self.id);
        }
    }
}

impl<B: Backend> Completion<FloatTensor<B>> for Handle<B> {
    fn wait(mut self: Box<Self>) -> Result<FloatTensor<B>, CommError> {
        self.waited = true;
        let out = self.rg.wait(self.id)?;
        match &self.desc {
            Some(d) => self.rg.result(d, out),
            None => match out {
                Out::Message(t) => Ok(self.rg.to_device(t)),
                _ => Err(CommError::InvalidRank {
                    op: "recv".into(),
                    rank: self.rg.world_rank(),
                    detail: "no message".into(),
                }),
            },
        }
    }

    fn is_ready(&self) -> bool {
        self.rg.is_ready(self.id)
    }
}

/// The handle of an issued send (or barrier): completion only.
struct Done<B: Backend>(Handle<B>);

impl<B: Backend> Completion<()> for Done<B> {
    fn wait(mut self: Box<Self>) -> Result<(), CommError> {
        self.0.waited = true;
        self.0.rg.wait(self.0.id).map(|_| ())
    }

    fn is_ready(&self) -> bool {
        self.0.rg.is_ready(self.0.id)
    }
}

impl<B: Backend> LocalComm<B> {
    fn start(&self, desc: OpDesc, t: FloatTensor<B>) -> Result<RawPending<B>, CommError> {
        let rg = &self.inner;
        let seq = lock(&rg.group.state).coll_seq[rg.rank];
        let label = rg.op_name(format_args!("{desc} #{seq}"));
        let body = Body::Coll { seq: 0, desc: desc.clone(), data: Some(t) };
        let id = rg.issue(vec![(label, desc.kind(), body)])?[0];
        Ok(RawPending(Box::new(Handle { rg: rg.clone(), id, desc: Some(desc), waited: false })))
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
        self.inner.check_peer("broadcast", root)?;
        self.start(OpDesc::Broadcast { root }, t)
    }

    fn start_group(&self, ops: Vec<P2pOp<B>>) -> Result<Vec<P2pHandle<B>>, CommError> {
        let rg = &self.inner;
        let mut bodies = Vec::with_capacity(ops.len());
        let mut sends = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                P2pOp::Send { tensor, dst, tag } => {
                    let label = rg.op_name(format_args!("send {tag} to rank {dst}"));
                    rg.check_peer(&label, dst)?;
                    bodies.push((label, OpKind::Send, Body::Send { dst, tag, data: Some(tensor) }));
                    sends.push(true);
                }
                P2pOp::Recv { src, tag } => {
                    let label = rg.op_name(format_args!("recv {tag} from rank {src}"));
                    rg.check_peer(&label, src)?;
                    bodies.push((label, OpKind::Recv, Body::Recv { src, tag }));
                    sends.push(false);
                }
            }
        }
        let ids = rg.issue(bodies)?;
        Ok(ids
            .into_iter()
            .zip(sends)
            .map(|(id, send)| {
                let h = Handle { rg: rg.clone(), id, desc: None, waited: false };
                if send {
                    P2pHandle::Send(RawPendingSend(Box::new(Done(h))))
                } else {
                    P2pHandle::Recv(RawPending(Box::new(h)))
                }
            })
            .collect())
    }

    fn barrier(&self) -> Result<(), CommError> {
        let rg = &self.inner;
        let seq = lock(&rg.group.state).coll_seq[rg.rank];
        let label = rg.op_name(format_args!("barrier #{seq}"));
        let body = Body::Coll { seq: 0, desc: OpDesc::Barrier, data: None };
        let id = rg.issue(vec![(label, OpKind::Barrier, body)])?[0];
        let h = Handle { rg: rg.clone(), id, desc: None, waited: false };
        Box::new(Done(h)).wait()
    }

    fn split(&self, members: &[usize]) -> Result<Box<dyn Communicator<B>>, CommError> {
        let rg = &self.inner;
        let world_size = lock(&rg.world.status).left.len();
        let rank = check_split(rg.world_rank(), world_size, members)?;
        let nth = next_split(&rg.splits, members);
        let group = lock(&rg.world.groups)
            .entry((members.to_vec(), nth))
            .or_insert_with(|| Arc::new(Group::new(members.to_vec())))
            .clone();
        let inner = Arc::new(RankGroup {
            world: rg.world.clone(),
            group,
            rank,
            device: rg.device.clone(),
            splits: rg.splits.clone(),
        });
        Ok(Box::new(LocalComm { inner }))
    }

    fn abort(&self, reason: &str) {
        self.inner.world.fail(self.inner.world_rank(), reason.to_string());
    }

    fn stats(&self) -> CommStats {
        lock(&self.inner.world.stats[self.inner.world_rank()]).clone()
    }

    fn reset_stats(&self) {
        *lock(&self.inner.world.stats[self.inner.world_rank()]) = CommStats::default();
    }
}

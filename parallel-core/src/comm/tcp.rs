//! `TcpComm`: one rank per process, the ranks joined over TCP — what gloo is to PyTorch: the
//! CPU transport of a multi-process world, under the same [`Communicator`] contract and the
//! same rules as [`LocalComm`](super::LocalComm), so that a run launched as N processes
//! (`harness launch`) computes what the same run on N in-process ranks computes, bit for bit.
//!
//! # Joining a world
//! [`join`] (or [`launch_process`], which also reports the rank's outcome to the others) is
//! called by every process with its [`ProcessGroup`]: rank 0 hosts the rendezvous store
//! ([`StoreServer`](super::StoreServer)) at the master address; every rank opens a data
//! port on the interface through which it reaches the store, publishes it under `rank/{r}`
//! (a key written once, so a second process with the same rank is refused), checks every
//! other rank's record (its `WORLD_SIZE` must be this rank's: the mismatch names both), and
//! connects to the lower ranks' data ports (the higher ranks connect to it): a full mesh of
//! TCP connections, one per pair. Every step has the timeout as its deadline, and a rank
//! that never arrives is named.
//!
//! # How it works
//! Each communicator (the world, every [`Comm::split`]) is a **stream**: a worker thread of
//! this process executes the operations issued on it one after another, in issue order, as a
//! CUDA stream runs NCCL's kernels; a handle is filled when its operation completes.
//! Collectives run over point-to-point messages as the counted algorithms move them:
//! all-gather, all-to-all and broadcast send each part straight to its destination, and the
//! all-reduce is a ring (reduce-scatter then all-gather over `2(N − 1)` steps, chunk `c`
//! summed from rank `c` on, the order [`LocalComm`](super::LocalComm) sums in, so both give
//! the same bits). A reader thread per peer connection files every arriving message under
//! its communicator and sender; a receive takes the next one and checks what it is (the
//! collective and its position, or the point-to-point [`Tag`]). A point-to-point send
//! completes when the receiver's stream reaches the matching receive, which answers with an
//! acknowledgement — NCCL's rule 3, so that two ranks that each send before they receive
//! time out here as they would hang there.
//!
//! # Failures
//! A rank whose work fails sends every peer an abort with its reason ([`TcpWorld::abort`]);
//! one that finishes sends a goodbye ([`TcpWorld::finish`]); a connection that closes without
//! either (the process was killed, or crashed) marks that rank failed with "connection lost".
//! Every wait polls that state, so every other rank's next or pending wait fails at once with
//! [`CommError::PeerFailed`] naming the rank, or [`CommError::PeerLeft`] — never a hang. Socket
//! writes time out too, so a peer that stops reading cannot block a sender forever.
//!
//! Across processes no rank can see what another is blocked on, so [`CommError::Timeout`]s of
//! this transport say who was waited for but not what they were doing.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Slice, Tensor, TensorData, TensorMetadata, TensorPrimitive};

use super::local::{
    LaunchOptions, check_split, chunks, join_ranks, next_split, panic_message, run_rank,
};
use super::rendezvous::{rendezvous, rendezvous_error};
use super::store::StoreServer;
use super::transport::WorldExit;
use super::{
    Comm, CommStats, Communicator, Completion, OpKind, P2pHandle, P2pOp, RawPending,
    RawPendingSend, Tag,
};
use crate::error::{CommError, ParallelError};

/// How long a failed socket write waits for the reader thread to report why the peer
/// went away (the peer's failure, not the write's socket error).
const LOST_GRACE: Duration = Duration::from_millis(500);
/// How often a blocked wait re-checks the world's failure state.
const POLL: Duration = Duration::from_millis(10);
/// First bytes of a data connection's hello.
const MAGIC: &[u8; 8] = b"PDIFFTCP";

const DATA: u8 = 1;
const ACK: u8 = 2;
const ABORT: u8 = 3;
const BYE: u8 = 4;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// This process's place in a multi-process world (torchrun's `RANK`, `WORLD_SIZE` and
/// `MASTER_ADDR:MASTER_PORT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessGroup {
    /// This process's rank (world numbering).
    pub rank: usize,
    /// Ranks of the world, over every process and machine.
    pub world_size: usize,
    /// Where rank 0 hosts the rendezvous store.
    pub master: SocketAddr,
}

/// A tensor as it travels: dtype, dims and the raw little-endian element bytes.
#[derive(Clone)]
struct Wire {
    dtype: DType,
    dims: Vec<usize>,
    bytes: Vec<u8>,
}

fn dtype_code(d: DType) -> Option<u8> {
    Some(match d {
        DType::F32 | DType::Flex32 => 1,
        DType::F64 => 2,
        DType::F16 => 3,
        DType::BF16 => 4,
        _ => return None,
    })
}

fn code_dtype(c: u8) -> Option<DType> {
    Some(match c {
        1 => DType::F32,
        2 => DType::F64,
        3 => DType::F16,
        4 => DType::BF16,
        _ => return None,
    })
}

fn to_wire<B: Backend>(t: FloatTensor<B>) -> Wire {
    let dims = t.shape().as_slice().to_vec();
    let n: usize = dims.iter().product();
    let flat = B::float_reshape(t, Shape::new([n]));
    let data = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(flat)).into_data();
    Wire { dtype: data.dtype, dims, bytes: data.into_bytes().to_vec() }
}

fn from_wire<B: Backend>(w: Wire, device: &B::Device) -> FloatTensor<B> {
    B::float_from_data(TensorData::from_bytes_vec(w.bytes, w.dims, w.dtype), device)
}

/// One message filed by a reader thread.
struct Message {
    /// What the sender says it is (the collective and its position, or a tag).
    desc: String,
    wire: Wire,
}

#[derive(Default)]
struct State {
    /// Messages by (communicator, sender's world rank), in arrival order.
    inbox: HashMap<(u64, usize), VecDeque<Message>>,
    /// Acknowledged sends by (communicator, receiver's world rank).
    acks: HashMap<(u64, usize), u64>,
    failed: Option<(usize, String)>,
    left: Vec<bool>,
}

/// What every communicator of this process shares: the connections and what arrived.
struct Shared {
    rank: usize,
    size: usize,
    timeout: Duration,
    /// Write halves of the connections, by world rank (`None`: this rank).
    peers: Vec<Option<Mutex<TcpStream>>>,
    state: Mutex<State>,
    cv: Condvar,
    stats: Mutex<CommStats>,
    /// How many times this rank split onto each member set.
    splits: Mutex<HashMap<Vec<usize>, u64>>,
}

impl Shared {
    fn fail(&self, rank: usize, reason: String) {
        {
            let mut s = lock(&self.state);
            if s.failed.is_none() {
                s.failed = Some((rank, reason));
            }
        }
        self.cv.notify_all();
    }

    fn frame(
        &self,
        dst: usize,
        kind: u8,
        comm: u64,
        desc: &str,
        wire: Option<&Wire>,
    ) -> io::Result<()> {
        if dst == self.rank {
            // To itself (a ring of one): filed at once, as the reader thread would.
            match (kind, wire) {
                (DATA, Some(w)) => {
                    let m = Message { desc: desc.to_string(), wire: w.clone() };
                    lock(&self.state).inbox.entry((comm, dst)).or_default().push_back(m);
                }
                (ACK, _) => *lock(&self.state).acks.entry((comm, dst)).or_default() += 1,
                _ => {}
            }
            self.cv.notify_all();
            return Ok(());
        }
        let Some(Some(stream)) = self.peers.get(dst) else {
            return Err(io::Error::other(format!("no connection to rank {dst}")));
        };
        let mut head = Vec::with_capacity(64 + desc.len());
        head.push(kind);
        head.extend_from_slice(&comm.to_le_bytes());
        head.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        head.extend_from_slice(desc.as_bytes());
        if let Some(w) = wire {
            head.push(dtype_code(w.dtype).unwrap_or(0));
            head.push(w.dims.len() as u8);
            for &d in &w.dims {
                head.extend_from_slice(&(d as u64).to_le_bytes());
            }
            head.extend_from_slice(&(w.bytes.len() as u64).to_le_bytes());
        }
        let mut s = lock(stream);
        s.write_all(&head)?;
        if let Some(w) = wire {
            s.write_all(&w.bytes)?;
        }
        Ok(())
    }

    fn check_world(&self, op: &str) -> Result<(), CommError> {
        match &lock(&self.state).failed {
            Some((failed_rank, reason)) => Err(CommError::PeerFailed {
                op: op.to_string(),
                rank: self.rank,
                failed_rank: *failed_rank,
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// A socket error while talking to `peer`: the peer's failure if the reader has seen it.
    /// A write to a peer that just died (broken pipe, reset) races its reader thread, which
    /// sees the closed connection within moments: wait up to [`LOST_GRACE`] for it, so the
    /// error names the lost rank the same way whichever side noticed first.
    fn lost(&self, op: &str, peer: usize, e: &io::Error) -> CommError {
        let started = Instant::now();
        let mut s = lock(&self.state);
        while s.failed.is_none() && !s.left[peer] && started.elapsed() < LOST_GRACE {
            let left = LOST_GRACE.saturating_sub(started.elapsed());
            s = self.cv.wait_timeout(s, left).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        drop(s);
        self.check_world(op).err().unwrap_or_else(|| CommError::Transport {
            op: op.to_string(),
            rank: self.rank,
            peer,
            detail: e.to_string(),
        })
    }

    /// Waits until `pick` finds what it wants in the state (it is polled on every arrival),
    /// the world fails, `peer` leaves, or the timeout passes; `blocked` explains a timeout.
    fn wait_for<R>(
        &self,
        peer: usize,
        op: &str,
        blocked: &str,
        mut pick: impl FnMut(&mut State) -> Option<R>,
    ) -> Result<R, CommError> {
        let started = Instant::now();
        let mut s = lock(&self.state);
        loop {
            if let Some(r) = pick(&mut s) {
                return Ok(r);
            }
            if let Some((failed_rank, reason)) = &s.failed {
                return Err(CommError::PeerFailed {
                    op: op.to_string(),
                    rank: self.rank,
                    failed_rank: *failed_rank,
                    reason: reason.clone(),
                });
            }
            if s.left[peer] {
                return Err(CommError::PeerLeft { op: op.to_string(), rank: self.rank, peer });
            }
            let waited = started.elapsed();
            if waited >= self.timeout {
                return Err(CommError::Timeout {
                    op: op.to_string(),
                    rank: self.rank,
                    waited,
                    missing: vec![peer],
                    blocked: blocked.to_string(),
                });
            }
            s = self
                .cv
                .wait_timeout(s, POLL.min(self.timeout - waited))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for the next message of communicator `comm` from world rank `src`.
    fn take(&self, comm: u64, src: usize, op: &str) -> Result<Message, CommError> {
        self.wait_for(src, op, "", |s| s.inbox.get_mut(&(comm, src)).and_then(VecDeque::pop_front))
    }

    /// Waits for `dst` to acknowledge one send of communicator `comm`.
    fn take_ack(&self, comm: u64, dst: usize, op: &str) -> Result<(), CommError> {
        let blocked = " (its receive was not posted: a send completes when the receiver's stream \
                       reaches the matching receive)";
        self.wait_for(dst, op, blocked, |s| {
            let n = s.acks.get_mut(&(comm, dst)).filter(|n| **n > 0)?;
            *n -= 1;
            Some(())
        })
    }

    fn read_loop(self: Arc<Self>, peer: usize, mut stream: TcpStream) {
        loop {
            match read_frame(&mut stream) {
                Ok((DATA, comm, desc, Some(wire))) => {
                    lock(&self.state)
                        .inbox
                        .entry((comm, peer))
                        .or_default()
                        .push_back(Message { desc, wire });
                }
                Ok((ACK, comm, _, _)) => {
                    *lock(&self.state).acks.entry((comm, peer)).or_default() += 1;
                }
                // The frame's communicator field names the failure's origin (0: the sender
                // itself; r + 1: rank r, whose failure the sender passes on), so every rank
                // names the root cause whichever abort reaches it first.
                Ok((ABORT, origin, reason, _)) => {
                    let origin = if origin == 0 { peer } else { (origin - 1) as usize };
                    self.fail(origin.min(self.size - 1), reason)
                }
                Ok((BYE, _, _, _)) => lock(&self.state).left[peer] = true,
                Ok((kind, ..)) => {
                    self.fail(
                        peer,
                        format!("sent a frame of unknown kind {kind} (a different build?)"),
                    );
                    return;
                }
                Err(e) => {
                    let gone = lock(&self.state).left[peer];
                    if !gone {
                        self.fail(
                            peer,
                            format!(
                                "connection lost ({e}) without a goodbye: the process of rank {peer} \
                                 died or was killed"
                            ),
                        );
                    }
                    self.cv.notify_all();
                    return;
                }
            }
            self.cv.notify_all();
        }
    }
}

fn read_exact<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

type Frame = (u8, u64, String, Option<Wire>);

fn read_frame(r: &mut impl Read) -> io::Result<Frame> {
    let [kind] = read_exact::<1>(r)?;
    let comm = u64::from_le_bytes(read_exact::<8>(r)?);
    let len = u32::from_le_bytes(read_exact::<4>(r)?) as usize;
    let mut desc = vec![0u8; len];
    r.read_exact(&mut desc)?;
    let desc = String::from_utf8_lossy(&desc).into_owned();
    if kind != DATA {
        return Ok((kind, comm, desc, None));
    }
    let [code, nd] = read_exact::<2>(r)?;
    let dtype = code_dtype(code).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, format!("unknown dtype code {code}"))
    })?;
    let dims = (0..nd)
        .map(|_| read_exact::<8>(r).map(|b| u64::from_le_bytes(b) as usize))
        .collect::<io::Result<Vec<_>>>()?;
    let n = u64::from_le_bytes(read_exact::<8>(r)?) as usize;
    let expected = dims.iter().product::<usize>() * dtype.size();
    if n != expected {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a tensor of shape {dims:?} ({dtype:?}) announced {n} bytes"),
        ));
    }
    let mut bytes = vec![0u8; n];
    r.read_exact(&mut bytes)?;
    Ok((kind, comm, desc, Some(Wire { dtype, dims, bytes })))
}

/// A rank's handle on its multi-process world: report how its work ended.
///
/// Dropping it without [`finish`](TcpWorld::finish) or [`abort`](TcpWorld::abort) closes the
/// connections as a crash would: the peers see "connection lost" naming this rank.
pub struct TcpWorld {
    shared: Arc<Shared>,
    /// Rank 0 hosts the store for as long as the world lives.
    _store: Option<StoreServer>,
    reported: bool,
}

impl Drop for TcpWorld {
    fn drop(&mut self) {
        if self.reported {
            return;
        }
        for s in self.shared.peers.iter().flatten() {
            let _ = lock(s).shutdown(Shutdown::Both);
        }
    }
}

impl std::fmt::Debug for TcpWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpWorld")
            .field("rank", &self.shared.rank)
            .field("size", &self.shared.size)
            .finish()
    }
}

impl TcpWorld {
    /// This rank finished: tells every peer (a peer still waiting for it fails with
    /// [`CommError::PeerLeft`]) and closes the connections.
    pub fn finish(self) {
        self.close(BYE, 0, "");
    }

    /// This rank failed: every peer's waits end with [`CommError::PeerFailed`] naming it and
    /// `reason`.
    pub fn abort(self, reason: &str) {
        self.shared.fail(self.shared.rank, reason.to_string());
        self.close(ABORT, 0, reason);
    }

    /// This rank stops because rank `origin` failed with `reason` (this rank's own error was
    /// only that): every peer's waits end naming `origin`, as they would had its own abort
    /// reached them first.
    pub fn abort_for(self, origin: usize, reason: &str) {
        self.shared.fail(origin, reason.to_string());
        self.close(ABORT, origin as u64 + 1, reason);
    }

    fn close(mut self, kind: u8, origin: u64, text: &str) {
        self.reported = true;
        for dst in 0..self.shared.size {
            if self.shared.peers[dst].is_some() {
                let _ = self.shared.frame(dst, kind, origin, text, None);
                if let Some(Some(s)) = self.shared.peers.get(dst) {
                    let _ = lock(s).shutdown(Shutdown::Write);
                }
            }
        }
    }
}

impl WorldExit for TcpWorld {
    fn finish(self: Box<Self>) {
        TcpWorld::finish(*self)
    }

    fn abort(self: Box<Self>, origin: usize, reason: &str) {
        if origin == self.shared.rank {
            TcpWorld::abort(*self, reason)
        } else {
            self.abort_for(origin, reason)
        }
    }
}

/// Joins the multi-process world of `group`: rendezvous at the master address, then a TCP
/// connection to every other rank (see the [module docs](self)). The returned [`Comm`] is the
/// world's communicator; report the rank's outcome on the [`TcpWorld`] when its work ends.
///
/// `options.timeout` is the deadline of every rendezvous step and of every wait;
/// `options.devices[rank % len]` is the rank's device; a link model does not apply (the link
/// is real) and is ignored.
///
/// # Errors
/// [`CommError::Rendezvous`]: `RANK ≥ WORLD_SIZE`, the store's port in use (rank 0), the store
/// unreachable, a rank that never arrives (named), a second process with the same rank, a
/// `WORLD_SIZE` that differs between ranks (both named).
pub fn join<B: Backend>(
    group: &ProcessGroup,
    options: &LaunchOptions<B>,
) -> Result<(Comm<B>, TcpWorld), CommError> {
    let (rank, size) = (group.rank, group.world_size);
    // The data port, opened on the interface through which this machine reaches the store
    // (the address other ranks can reach this one at), is this rank's record.
    let mut listener: Option<TcpListener> = None;
    let met = rendezvous(group, options.timeout, "tcp", |client| {
        let io_err =
            |e: io::Error| rendezvous_error(group, format!("the store connection failed: {e}"));
        let ip = client.local_addr().map_err(io_err)?.ip();
        let l = TcpListener::bind(SocketAddr::new(ip, 0)).map_err(|e| {
            rendezvous_error(group, format!("cannot open a data port on {ip}: {e}"))
        })?;
        let addr = l.local_addr().map_err(io_err)?;
        listener = Some(l);
        Ok(addr.to_string().into_bytes())
    })?;
    let listener = listener.expect("the payload opened the data port");
    let mut addrs: Vec<Option<SocketAddr>> = vec![None; size];
    for (p, payload) in met.payloads.iter().enumerate() {
        let text = String::from_utf8_lossy(payload);
        addrs[p] = Some(text.parse().map_err(|_| {
            rendezvous_error(group, format!("rank {p}'s record {text:?} is malformed"))
        })?);
    }
    let (store, deadline) = (met.server, met.deadline);
    drop(met.client);
    let streams = connect_mesh(group, &listener, &addrs, deadline)?;
    let shared = Arc::new(Shared {
        rank,
        size,
        timeout: options.timeout,
        peers: streams
            .iter()
            .map(|s| s.as_ref().and_then(|s| s.try_clone().ok()).map(Mutex::new))
            .collect(),
        state: Mutex::new(State { left: vec![false; size], ..State::default() }),
        cv: Condvar::new(),
        stats: Mutex::new(CommStats::default()),
        splits: Mutex::new(HashMap::new()),
    });
    for (peer, s) in streams.into_iter().enumerate() {
        let Some(s) = s else { continue };
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("tcp-rank{rank}-from{peer}"))
            .spawn(move || shared.read_loop(peer, s))
            .map_err(|e| rendezvous_error(group, format!("cannot start a reader thread: {e}")))?;
    }
    let device = if options.devices.is_empty() {
        B::Device::default()
    } else {
        options.devices[rank % options.devices.len()].clone()
    };
    let members: Vec<usize> = (0..size).collect();
    let comm = TcpComm::open(shared.clone(), 0, members, device)
        .map_err(|e| rendezvous_error(group, format!("cannot start the stream thread: {e}")))?;
    Ok((Comm::new(Box::new(comm)), TcpWorld { shared, _store: store, reported: false }))
}

/// The full mesh: connect to every lower rank, accept every higher one.
fn connect_mesh(
    group: &ProcessGroup,
    listener: &TcpListener,
    addrs: &[Option<SocketAddr>],
    deadline: Instant,
) -> Result<Vec<Option<TcpStream>>, CommError> {
    let (rank, size) = (group.rank, group.world_size);
    let timeout = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let mut streams: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
    for p in 0..rank {
        let addr = addrs[p].expect("every record was read");
        let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
            rendezvous_error(group, format!("cannot connect to rank {p} at {addr}: {e}"))
        })?;
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&(rank as u64).to_le_bytes());
        hello.extend_from_slice(&(size as u64).to_le_bytes());
        s.write_all(&hello)
            .map_err(|e| rendezvous_error(group, format!("cannot greet rank {p}: {e}")))?;
        streams[p] = Some(s);
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| rendezvous_error(group, format!("data port: {e}")))?;
    while streams.iter().enumerate().any(|(p, s)| p > rank && s.is_none()) {
        match listener.accept() {
            Ok((mut s, from)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut hello = [0u8; 24];
                let ok = s.read_exact(&mut hello).is_ok() && &hello[..8] == MAGIC;
                let peer = u64::from_le_bytes(hello[8..16].try_into().unwrap_or([0; 8])) as usize;
                let theirs =
                    u64::from_le_bytes(hello[16..24].try_into().unwrap_or([0; 8])) as usize;
                if !ok || peer <= rank || peer >= size || theirs != size || streams[peer].is_some()
                {
                    // Not one of ours (a port scanner, a stale run): ignore it.
                    log_stray(rank, from);
                    continue;
                }
                streams[peer] = Some(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> =
                        (rank + 1..size).filter(|&p| streams[p].is_none()).collect();
                    return Err(rendezvous_error(
                        group,
                        format!(
                            "rank(s) {missing:?} published their records but never connected to \
                             rank {rank}'s data port"
                        ),
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(rendezvous_error(group, format!("data port: {e}"))),
        }
    }
    for s in streams.iter().flatten() {
        let setup = s
            .set_nonblocking(false)
            .and_then(|()| s.set_nodelay(true))
            .and_then(|()| s.set_read_timeout(None))
            .and_then(|()| {
                s.set_write_timeout(Some(
                    deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(60)),
                ))
            });
        setup.map_err(|e| rendezvous_error(group, format!("socket options: {e}")))?;
    }
    Ok(streams)
}

fn log_stray(rank: usize, from: SocketAddr) {
    log::warn!("rank {rank}: ignored a connection from {from} that is not a rank of this world");
}

/// FNV-1a over the members and the split count: every member derives the same id.
fn comm_id(members: &[usize], nth: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in members.iter().map(|&m| m as u64).chain([u64::MAX, nth]) {
        for b in v.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h | 1
}

type Job = Box<dyn FnOnce() + Send>;

/// A result slot filled by the stream's worker; filled with an error if the job is lost.
struct Slot<T> {
    value: Mutex<Option<Result<T, CommError>>>,
    cv: Condvar,
}

struct Promise<T> {
    slot: Option<Arc<Slot<T>>>,
    op: String,
    rank: usize,
}

impl<T> Promise<T> {
    fn fill(mut self, r: Result<T, CommError>) {
        if let Some(slot) = self.slot.take() {
            *lock(&slot.value) = Some(r);
            slot.cv.notify_all();
        }
    }
}

impl<T> Drop for Promise<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            *lock(&slot.value) = Some(Err(CommError::InvalidRank {
                op: self.op.clone(),
                rank: self.rank,
                detail: "the communicator's stream stopped before this operation ran".into(),
            }));
            slot.cv.notify_all();
        }
    }
}

struct Handle<T> {
    slot: Arc<Slot<T>>,
    op: String,
    poisoned: Arc<Mutex<Option<String>>>,
    shared: Arc<Shared>,
    waited: bool,
}

impl<T> Drop for Handle<T> {
    fn drop(&mut self) {
        if !self.waited {
            lock(&self.poisoned).get_or_insert_with(|| self.op.clone());
        }
    }
}

impl<T: Send> Completion<T> for Handle<T> {
    fn wait(mut self: Box<Self>) -> Result<T, CommError> {
        self.waited = true;
        let started = Instant::now();
        let mut v = lock(&self.slot.value);
        let r = loop {
            if let Some(r) = v.take() {
                break r;
            }
            v = self.slot.cv.wait_timeout(v, POLL).unwrap_or_else(|e| e.into_inner()).0;
        };
        drop(v);
        lock(&self.shared.stats).waited(started.elapsed());
        r
    }

    fn is_ready(&self) -> bool {
        lock(&self.slot.value).is_some()
    }
}

/// The executing side of one communicator: runs on its stream's worker thread.
struct Stream<B: Backend> {
    shared: Arc<Shared>,
    id: u64,
    members: Vec<usize>,
    rank: usize,
    device: B::Device,
}

/// A rank of a multi-process world on one communicator (see the [module docs](self)).
pub struct TcpComm<B: Backend> {
    stream: Arc<Stream<B>>,
    jobs: Mutex<mpsc::Sender<Job>>,
    poisoned: Arc<Mutex<Option<String>>>,
    coll_seq: Mutex<u64>,
}

impl<B: Backend> TcpComm<B> {
    fn open(
        shared: Arc<Shared>,
        id: u64,
        members: Vec<usize>,
        device: B::Device,
    ) -> io::Result<Self> {
        let me = shared.rank;
        let rank = members.iter().position(|&m| m == me).unwrap_or(0);
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new().name(format!("tcp-rank{me}-stream")).spawn(move || {
            for job in rx {
                // A panicking job fills its promises with errors as they drop.
                let _ = catch_unwind(AssertUnwindSafe(job));
            }
        })?;
        Ok(TcpComm {
            stream: Arc::new(Stream { shared, id, members, rank, device }),
            jobs: Mutex::new(tx),
            poisoned: Arc::new(Mutex::new(None)),
            coll_seq: Mutex::new(0),
        })
    }

    fn world_rank(&self) -> usize {
        self.stream.shared.rank
    }

    fn op_name(&self, what: impl std::fmt::Display) -> String {
        format!("{what} on group {:?}", self.stream.members)
    }

    fn check_peer(&self, op: &str, peer: usize) -> Result<(), CommError> {
        if peer >= self.stream.members.len() {
            return Err(CommError::InvalidRank {
                op: op.to_string(),
                rank: self.world_rank(),
                detail: format!("rank {peer} is outside a group of {}", self.stream.members.len()),
            });
        }
        Ok(())
    }

    /// Checks the world and this stream, counts the call; the next collective's position.
    fn admit(&self, op: &str, kind: OpKind) -> Result<(), CommError> {
        self.stream.shared.check_world(op)?;
        if let Some(dropped) = lock(&self.poisoned).clone() {
            return Err(CommError::Abandoned { op: dropped, rank: self.world_rank() });
        }
        lock(&self.stream.shared.stats).called(kind);
        Ok(())
    }

    fn next_seq(&self) -> u64 {
        let mut s = lock(&self.coll_seq);
        *s += 1;
        *s - 1
    }

    fn handle<T>(&self, op: &str) -> (Promise<T>, Handle<T>) {
        let slot = Arc::new(Slot { value: Mutex::new(None), cv: Condvar::new() });
        let promise =
            Promise { slot: Some(slot.clone()), op: op.to_string(), rank: self.world_rank() };
        let handle = Handle {
            slot,
            op: op.to_string(),
            poisoned: self.poisoned.clone(),
            shared: self.stream.shared.clone(),
            waited: false,
        };
        (promise, handle)
    }

    fn submit(&self, job: Job) -> Result<(), CommError> {
        lock(&self.jobs).send(job).map_err(|_| CommError::InvalidRank {
            op: "issue".into(),
            rank: self.world_rank(),
            detail: "the communicator's stream thread has stopped".into(),
        })
    }

    /// Issues a collective: `run` executes it on the stream.
    fn collective(
        &self,
        kind: OpKind,
        what: String,
        run: impl FnOnce(&Stream<B>, &str, &str) -> Result<FloatTensor<B>, CommError> + Send + 'static,
    ) -> Result<Handle<FloatTensor<B>>, CommError> {
        let seq = self.next_seq();
        let desc = format!("{what} #{seq}");
        let op = self.op_name(&desc);
        self.admit(&op, kind)?;
        let (promise, handle) = self.handle(&op);
        let stream = self.stream.clone();
        self.submit(Box::new(move || {
            let r = stream.shared.check_world(&op).and_then(|()| run(&stream, &desc, &op));
            promise.fill(r);
        }))?;
        Ok(handle)
    }
}

impl<B: Backend> Stream<B> {
    fn size(&self) -> usize {
        self.members.len()
    }

    fn send(
        &self,
        kind: OpKind,
        j: usize,
        desc: &str,
        wire: &Wire,
        op: &str,
    ) -> Result<(), CommError> {
        let dst = self.members[j];
        let elements = wire.dims.iter().product::<usize>() as u64;
        lock(&self.shared.stats).moved(kind, dst, elements, wire.dtype.size() as u64);
        self.shared
            .frame(dst, DATA, self.id, desc, Some(wire))
            .map_err(|e| self.shared.lost(op, dst, &e))
    }

    /// The next message from group rank `j`, which must be `desc` of this collective.
    fn recv(&self, j: usize, desc: &str, op: &str) -> Result<Wire, CommError> {
        let m = self.shared.take(self.id, self.members[j], op)?;
        if m.desc != desc {
            return Err(CommError::Mismatch {
                group: self.members.clone(),
                rank: self.shared.rank,
                ours: desc.to_string(),
                other_rank: self.members[j],
                theirs: m.desc,
            });
        }
        Ok(m.wire)
    }

    fn tensor(&self, w: Wire) -> FloatTensor<B> {
        from_wire::<B>(w, &self.device)
    }

    fn shape_error(&self, op: &str, detail: String) -> CommError {
        CommError::Shape { op: op.to_string(), rank: self.shared.rank, detail }
    }

    fn all_gather(
        &self,
        t: FloatTensor<B>,
        dim: usize,
        desc: &str,
        op: &str,
    ) -> Result<FloatTensor<B>, CommError> {
        let n = self.size();
        let own = t.shape().as_slice().to_vec();
        if dim >= own.len() {
            return Err(self.shape_error(op, format!("dim {dim} must index shape {own:?}")));
        }
        let wire = to_wire::<B>(t.clone());
        for j in (0..n).filter(|&j| j != self.rank) {
            self.send(OpKind::AllGather, j, desc, &wire, op)?;
        }
        let mut parts = Vec::with_capacity(n);
        for j in 0..n {
            if j == self.rank {
                parts.push(t.clone());
                continue;
            }
            let w = self.recv(j, desc, op)?;
            let fits = w.dims.len() == own.len()
                && (0..own.len()).all(|i| i == dim || w.dims[i] == own[i]);
            if !fits {
                return Err(self.shape_error(
                    op,
                    format!(
                        "shapes must agree except along dim {dim}: rank {}: {:?}, rank {}: {own:?}",
                        self.members[j], w.dims, self.shared.rank
                    ),
                ));
            }
            parts.push(self.tensor(w));
        }
        Ok(B::float_cat(parts, dim))
    }

    fn all_to_all(
        &self,
        t: FloatTensor<B>,
        (scatter, sizes, gather): (usize, &[usize], usize),
        desc: &str,
        op: &str,
    ) -> Result<FloatTensor<B>, CommError> {
        let n = self.size();
        let own = t.shape().as_slice().to_vec();
        let nd = own.len();
        if scatter >= nd
            || gather >= nd
            || sizes.len() != n
            || sizes.iter().sum::<usize>() != own[scatter]
        {
            return Err(self.shape_error(
                op,
                format!("dim {scatter} of shape {own:?} must split into the chunk sizes {sizes:?}"),
            ));
        }
        let mut start = 0;
        let chunks: Vec<FloatTensor<B>> = sizes
            .iter()
            .map(|&len| {
                let slices: Vec<Slice> = (0..nd)
                    .map(|i| {
                        if i == scatter {
                            Slice::new(start as isize, Some((start + len) as isize), 1)
                        } else {
                            Slice::full()
                        }
                    })
                    .collect();
                start += len;
                B::float_slice(t.clone(), &slices)
            })
            .collect();
        for j in (0..n).filter(|&j| j != self.rank) {
            self.send(OpKind::AllToAll, j, desc, &to_wire::<B>(chunks[j].clone()), op)?;
        }
        let mine = chunks[self.rank].shape().as_slice().to_vec();
        let mut parts = Vec::with_capacity(n);
        for (j, chunk) in chunks.into_iter().enumerate() {
            if j == self.rank {
                parts.push(chunk);
                continue;
            }
            let w = self.recv(j, desc, op)?;
            let fits = w.dims.len() == nd && (0..nd).all(|i| i == gather || w.dims[i] == mine[i]);
            if !fits {
                return Err(self.shape_error(
                    op,
                    format!(
                        "rank {} sent a chunk of shape {:?}, which does not stack with this rank's \
                         {mine:?} along dim {gather}",
                        self.members[j], w.dims
                    ),
                ));
            }
            parts.push(self.tensor(w));
        }
        Ok(B::float_cat(parts, gather))
    }

    fn all_reduce(
        &self,
        t: FloatTensor<B>,
        desc: &str,
        op: &str,
    ) -> Result<FloatTensor<B>, CommError> {
        let n = self.size();
        if n == 1 {
            return Ok(t);
        }
        let shape = t.shape();
        let size = shape.num_elements();
        let flat = B::float_reshape(t, Shape::new([size]));
        let ranges = chunks(size, n);
        let slice = |(start, len): (usize, usize)| {
            (len > 0).then(|| {
                B::float_slice(
                    flat.clone(),
                    &[Slice::new(start as isize, Some((start + len) as isize), 1)],
                )
            })
        };
        let mut parts: Vec<Option<FloatTensor<B>>> = ranges.iter().map(|&r| slice(r)).collect();
        let dtype = flat.dtype();
        let empty = || Wire { dtype, dims: vec![0], bytes: Vec::new() };
        let (r, next, prev) = (self.rank, (self.rank + 1) % n, (self.rank + n - 1) % n);
        // Reduce-scatter: at step k rank r sends chunk r − k and adds its own to chunk r − 1 − k.
        for k in 0..n - 1 {
            let out = (r + n - k) % n;
            let into = (r + 2 * n - 1 - k) % n;
            let step = format!("{desc} reduce-scatter {k}");
            let wire = parts[out].clone().map_or_else(empty, to_wire::<B>);
            self.send(OpKind::AllReduce, next, &step, &wire, op)?;
            let w = self.recv_shaped(prev, &step, op, ranges[into].1)?;
            if let Some(own) = parts[into].take() {
                parts[into] = Some(B::float_add(self.tensor(w), own));
            }
        }
        // All-gather: at step k rank r sends chunk r + 1 − k and receives chunk r − k.
        for k in 0..n - 1 {
            let out = (r + 1 + n - k) % n;
            let into = (r + n - k) % n;
            let step = format!("{desc} all-gather {k}");
            let wire = parts[out].clone().map_or_else(empty, to_wire::<B>);
            self.send(OpKind::AllReduce, next, &step, &wire, op)?;
            let w = self.recv_shaped(prev, &step, op, ranges[into].1)?;
            if ranges[into].1 > 0 {
                parts[into] = Some(self.tensor(w));
            }
        }
        let reduced: Vec<FloatTensor<B>> = parts.into_iter().flatten().collect();
        Ok(B::float_reshape(B::float_cat(reduced, 0), shape))
    }

    /// A ring chunk from group rank `j`: `len` elements (the shapes of all ranks agree).
    fn recv_shaped(&self, j: usize, desc: &str, op: &str, len: usize) -> Result<Wire, CommError> {
        let w = self.recv(j, desc, op)?;
        if w.dims.iter().product::<usize>() != len {
            return Err(self.shape_error(
                op,
                format!(
                    "shapes must agree: rank {} holds a different number of elements",
                    self.members[j]
                ),
            ));
        }
        Ok(w)
    }

    fn broadcast(
        &self,
        t: FloatTensor<B>,
        root: usize,
        desc: &str,
        op: &str,
    ) -> Result<FloatTensor<B>, CommError> {
        if self.rank == root {
            let wire = to_wire::<B>(t.clone());
            for j in (0..self.size()).filter(|&j| j != root) {
                self.send(OpKind::Broadcast, j, desc, &wire, op)?;
            }
            return Ok(t);
        }
        let own = t.shape().as_slice().to_vec();
        let w = self.recv(root, desc, op)?;
        if w.dims != own {
            return Err(self.shape_error(
                op,
                format!(
                    "shapes must agree: root rank {} has {:?}, this rank {own:?}",
                    self.members[root], w.dims
                ),
            ));
        }
        Ok(self.tensor(w))
    }
}

fn tag_desc(tag: &Tag) -> String {
    format!("p2p {} {} {} {}", tag.kind, tag.step, tag.patch, tag.layer)
}

/// The tag a message says it carries (the kind string leaked: this runs only on a mismatch,
/// once, before the error ends the rank).
fn parse_tag(desc: &str) -> Option<Tag> {
    let mut p = desc.split(' ');
    if p.next()? != "p2p" {
        return None;
    }
    let kind: &'static str = Box::leak(p.next()?.to_string().into_boxed_str());
    Some(Tag {
        kind,
        step: p.next()?.parse().ok()?,
        patch: p.next()?.parse().ok()?,
        layer: p.next()?.parse().ok()?,
    })
}

enum GroupOp<B: Backend> {
    Send { tensor: FloatTensor<B>, dst: usize, tag: Tag, done: Promise<()>, op: String },
    Recv { src: usize, tag: Tag, done: Promise<FloatTensor<B>>, op: String },
}

impl<B: Backend> Stream<B> {
    /// A group of sends and receives: every send's data goes out first, then the receives are
    /// taken (each acknowledged), then the sends wait for their acknowledgements.
    fn run_group(&self, ops: Vec<GroupOp<B>>) {
        let mut waiting = Vec::new();
        let mut receives = Vec::new();
        for o in ops {
            match o {
                GroupOp::Send { tensor, dst, tag, done, op } => {
                    let r = self.shared.check_world(&op).and_then(|()| {
                        self.send(OpKind::Send, dst, &tag_desc(&tag), &to_wire::<B>(tensor), &op)
                    });
                    match r {
                        Ok(()) => waiting.push((dst, done, op)),
                        Err(e) => done.fill(Err(e)),
                    }
                }
                r @ GroupOp::Recv { .. } => receives.push(r),
            }
        }
        for o in receives {
            let GroupOp::Recv { src, tag, done, op } = o else { continue };
            let from = self.members[src];
            let r = self.shared.take(self.id, from, &op).and_then(|m| {
                if m.desc != tag_desc(&tag) {
                    return Err(match parse_tag(&m.desc) {
                        Some(got) => CommError::TagMismatch {
                            rank: self.shared.rank,
                            src: from,
                            expected: tag,
                            got,
                        },
                        None => CommError::Mismatch {
                            group: self.members.clone(),
                            rank: self.shared.rank,
                            ours: format!("recv {tag}"),
                            other_rank: from,
                            theirs: m.desc,
                        },
                    });
                }
                self.shared
                    .frame(from, ACK, self.id, "", None)
                    .map_err(|e| self.shared.lost(&op, from, &e))?;
                Ok(self.tensor(m.wire))
            });
            done.fill(r);
        }
        for (dst, done, op) in waiting {
            done.fill(self.shared.take_ack(self.id, self.members[dst], &op));
        }
    }
}

impl<B: Backend> Communicator<B> for TcpComm<B> {
    fn rank(&self) -> usize {
        self.stream.rank
    }

    fn size(&self) -> usize {
        self.stream.members.len()
    }

    fn members(&self) -> &[usize] {
        &self.stream.members
    }

    fn device(&self) -> B::Device {
        self.stream.device.clone()
    }

    fn timeout(&self) -> Duration {
        self.stream.shared.timeout
    }

    fn start_all_gather(&self, t: FloatTensor<B>, dim: usize) -> Result<RawPending<B>, CommError> {
        let h = self.collective(
            OpKind::AllGather,
            format!("all_gather(dim={dim})"),
            move |s, desc, op| s.all_gather(t, dim, desc, op),
        )?;
        Ok(RawPending(Box::new(h)))
    }

    fn start_all_to_all(
        &self,
        t: FloatTensor<B>,
        scatter_dim: usize,
        scatter_sizes: Vec<usize>,
        gather_dim: usize,
    ) -> Result<RawPending<B>, CommError> {
        let what = format!(
            "all_to_all(scatter={scatter_dim}, sizes={scatter_sizes:?}, gather={gather_dim})"
        );
        let h = self.collective(OpKind::AllToAll, what, move |s, desc, op| {
            s.all_to_all(t, (scatter_dim, &scatter_sizes, gather_dim), desc, op)
        })?;
        Ok(RawPending(Box::new(h)))
    }

    fn start_all_reduce(&self, t: FloatTensor<B>) -> Result<RawPending<B>, CommError> {
        let h = self.collective(OpKind::AllReduce, "all_reduce".into(), move |s, desc, op| {
            s.all_reduce(t, desc, op)
        })?;
        Ok(RawPending(Box::new(h)))
    }

    fn start_broadcast(&self, t: FloatTensor<B>, root: usize) -> Result<RawPending<B>, CommError> {
        self.check_peer("broadcast", root)?;
        let h = self.collective(
            OpKind::Broadcast,
            format!("broadcast(root={root})"),
            move |s, desc, op| s.broadcast(t, root, desc, op),
        )?;
        Ok(RawPending(Box::new(h)))
    }

    fn start_group(&self, ops: Vec<P2pOp<B>>) -> Result<Vec<P2pHandle<B>>, CommError> {
        let mut jobs = Vec::with_capacity(ops.len());
        let mut handles = Vec::with_capacity(ops.len());
        let mut labels = Vec::with_capacity(ops.len());
        for o in &ops {
            let (label, peer) = match o {
                P2pOp::Send { dst, tag, .. } => {
                    (self.op_name(format_args!("send {tag} to rank {dst}")), *dst)
                }
                P2pOp::Recv { src, tag } => {
                    (self.op_name(format_args!("recv {tag} from rank {src}")), *src)
                }
            };
            self.check_peer(&label, peer)?;
            labels.push(label);
        }
        for (o, op) in ops.into_iter().zip(labels) {
            match o {
                P2pOp::Send { tensor, dst, tag } => {
                    self.admit(&op, OpKind::Send)?;
                    let (done, h) = self.handle::<()>(&op);
                    jobs.push(GroupOp::Send { tensor, dst, tag, done, op });
                    handles.push(P2pHandle::Send(RawPendingSend(Box::new(h))));
                }
                P2pOp::Recv { src, tag } => {
                    self.admit(&op, OpKind::Recv)?;
                    let (done, h) = self.handle::<FloatTensor<B>>(&op);
                    jobs.push(GroupOp::Recv { src, tag, done, op });
                    handles.push(P2pHandle::Recv(RawPending(Box::new(h))));
                }
            }
        }
        let stream = self.stream.clone();
        self.submit(Box::new(move || stream.run_group(jobs)))?;
        Ok(handles)
    }

    fn barrier(&self) -> Result<(), CommError> {
        let seq = self.next_seq();
        let desc = format!("barrier #{seq}");
        let op = self.op_name(&desc);
        self.admit(&op, OpKind::Barrier)?;
        let (promise, handle) = self.handle::<()>(&op);
        let stream = self.stream.clone();
        self.submit(Box::new(move || {
            let run = || -> Result<(), CommError> {
                stream.shared.check_world(&op)?;
                let none = Wire { dtype: DType::F32, dims: vec![0], bytes: Vec::new() };
                let me = stream.rank;
                for j in (0..stream.size()).filter(|&j| j != me) {
                    stream
                        .shared
                        .frame(stream.members[j], DATA, stream.id, &desc, Some(&none))
                        .map_err(|e| stream.shared.lost(&op, stream.members[j], &e))?;
                }
                for j in (0..stream.size()).filter(|&j| j != me) {
                    stream.recv(j, &desc, &op)?;
                }
                Ok(())
            };
            promise.fill(run());
        }))?;
        Box::new(handle).wait()
    }

    fn split(&self, members: &[usize]) -> Result<Box<dyn Communicator<B>>, CommError> {
        let shared = &self.stream.shared;
        check_split(shared.rank, shared.size, members)?;
        let nth = next_split(&shared.splits, members);
        let comm = TcpComm::open(
            shared.clone(),
            comm_id(members, nth),
            members.to_vec(),
            self.stream.device.clone(),
        )
        .map_err(|e| CommError::InvalidRank {
            op: "split".into(),
            rank: shared.rank,
            detail: format!("cannot start the stream thread: {e}"),
        })?;
        Ok(Box::new(comm))
    }

    fn abort(&self, reason: &str) {
        let shared = &self.stream.shared;
        shared.fail(shared.rank, reason.to_string());
        for dst in (0..shared.size).filter(|&d| d != shared.rank) {
            let _ = shared.frame(dst, ABORT, 0, reason, None);
        }
    }

    fn stats(&self) -> CommStats {
        lock(&self.stream.shared.stats).clone()
    }

    fn reset_stats(&self) {
        *lock(&self.stream.shared.stats) = CommStats::default();
    }
}

/// Runs `f` as rank `group.rank` of a multi-process world: [`join`]s it, runs `f` on a rayon
/// pool of `options.threads_per_rank` threads (if set), and tells the other ranks how it
/// ended — a goodbye when `f` returns, an abort with the error when it fails or panics, so
/// that every other rank's waits end (see the [module docs](self)).
///
/// # Errors
/// The rendezvous's error, or `f`'s; a panic is [`ParallelError::RankFailed`].
pub fn launch_process<B, T, F>(
    group: &ProcessGroup,
    options: &LaunchOptions<B>,
    f: F,
) -> Result<T, ParallelError>
where
    B: Backend,
    T: Send,
    F: FnOnce(Comm<B>) -> Result<T, ParallelError> + Send,
{
    let (comm, world): (Comm<B>, Box<dyn WorldExit>) = match &options.transport {
        Some(transport) => transport.join(group, options)?,
        None => {
            let (comm, world) = join(group, options)?;
            (comm, Box::new(world))
        }
    };
    let rank = group.rank;
    match run_rank(rank, options.threads_per_rank, move || f(comm)) {
        Ok(Ok(v)) => {
            world.finish();
            Ok(v)
        }
        Ok(Err(e)) => {
            match &e {
                // Only an echo of another rank's failure: pass that one on.
                ParallelError::Comm(CommError::PeerFailed { failed_rank, reason, .. })
                    if *failed_rank != rank =>
                {
                    world.abort(*failed_rank, reason)
                }
                ParallelError::RankFailed { reason, .. } => world.abort(rank, reason),
                other => world.abort(rank, &other.to_string()),
            }
            Err(e)
        }
        Err(panic) => {
            let reason = panic_message(panic.as_ref());
            world.abort(rank, &format!("panicked: {reason}"));
            Err(ParallelError::RankFailed { rank, reason })
        }
    }
}

/// Runs `f` on `size` ranks as threads of this process, each joined to the others over TCP
/// on loopback exactly as separate processes would be (its own rendezvous, connections and
/// streams): the multi-process transport, tested in one process. Results in rank order.
///
/// # Errors
/// Per rank, as [`launch_process`]; no free loopback port for the store.
pub fn launch_loopback<B, T, F>(
    size: usize,
    options: &LaunchOptions<B>,
    f: F,
) -> Vec<Result<T, ParallelError>>
where
    B: Backend,
    T: Send,
    F: Fn(Comm<B>) -> Result<T, ParallelError> + Sync,
{
    let master = match free_loopback_port() {
        Ok(a) => a,
        Err(e) => {
            return (0..size)
                .map(|rank| {
                    Err(ParallelError::RankFailed {
                        rank,
                        reason: format!("no free loopback port: {e}"),
                    })
                })
                .collect();
        }
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let f = &f;
                let group = ProcessGroup { rank, world_size: size, master };
                scope.spawn(move || launch_process(&group, options, f))
            })
            .collect();
        join_ranks(handles)
    })
}

/// A loopback address with a port that was free a moment ago.
pub fn free_loopback_port() -> io::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    l.local_addr()
}

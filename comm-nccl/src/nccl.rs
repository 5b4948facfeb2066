//! [`NcclComm`]: the communicator contract on NCCL, over Burn's CUDA tensors.
//!
//! # How a tensor reaches NCCL
//!
//! Burn's `Cuda` backend is a fusion backend over CubeCL. An input is resolved into its
//! CubeCL tensor (which flushes the pending fused work), made contiguous, and the rank's
//! CubeCL client is synchronised, so every kernel that writes it has finished; the device
//! address comes from the client's resource of its handle (kept alive, with the tensor, until
//! NCCL is done). Outputs are allocated contiguous by the same client, written by NCCL, and
//! registered back into the fusion client as initialised tensors. CubeCL's streams are
//! private, so NCCL runs on a stream of this communicator's own; a handle's `wait` returns
//! only once that stream has passed the operation, so Burn's next kernels read finished data.
//! All of it happens on the rank's thread: CubeCL's stream is the calling thread's.
//!
//! # No hang
//!
//! Before each collective the ranks all-gather a small record of what they are about to do
//! ([`crate::wire`]): a different collective, a rank out of step, shapes that do not fit are
//! errors on every rank instead of NCCL garbage. A point-to-point payload is preceded by a
//! header with its tag and shape. Every wait polls the operation's CUDA event with the
//! communicator's deadline, the communicator's asynchronous error
//! (`ncclCommGetAsyncError`: a peer's connection lost) and the world's failure flag (a rank
//! of this process that failed, or — across processes — an abort a rank published in the
//! rendezvous store); a blocking NCCL call (initialisation, a group's first connection) is
//! watched by a watchdog thread with the same deadline. Whichever fires, the communicator is
//! aborted (`ncclCommAbort`, which also releases a call blocked in NCCL) and the wait fails
//! with [`CommError::Timeout`], [`CommError::PeerFailed`] or [`CommError::Library`]; every
//! later call on it fails at once.
//!
//! # Limits
//!
//! - Issuing blocks the host for the record exchange (and, for a point-to-point group, the
//!   header exchange): an operation is in flight only from its payload on. A cycle across two
//!   communicators that real stream concurrency would resolve (a send on one blocks until
//!   its receiver, which waits on a collective on the other) ends in a timeout here.
//! - NCCL refuses two ranks of one communicator on one GPU: in-process worlds need a GPU per
//!   rank ([`NcclTransport`] checks).
//! - Nothing here has run on a GPU yet (the machines this project was built on have none):
//!   the code follows the sources of Burn 0.21, CubeCL 0.10 and cudarc 0.19 (see
//!   docs/ARCHITECTURE.md, the communicator's "On GPUs"), CI compiles it, and
//!   `examples/nccl_check.rs` is the check to run on the first GPU.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{DType, Shape, Slice, TensorMetadata};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_fusion::stream::OperationStreams;
use burn_fusion::{NoOp, get_client};
use burn_ir::{BackendIr, InitOperationIr, OperationIr};
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result as nccl, sys};
use parallel_core::comm::{
    Completion, P2pHandle, P2pOp, RawPending, RawPendingSend, StoreClient, all_reduce_elements,
    check_split,
};
use parallel_core::{CommError, CommStats, Communicator, OpKind};

use crate::wire::{self, Collective, HEADER_WORDS, Header, META_WORDS, Meta};

/// Burn's CUDA backend (fusion over CubeCL), the backend this communicator moves.
pub type Cuda = burn_cuda::Cuda;
type Inner = CubeBackend<CudaRuntime, f32, i32, u8>;
type Prim = FloatTensor<Cuda>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// NCCL's words for an error code.
pub(crate) fn nccl_text(e: &nccl::NcclError) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
    let s = unsafe { sys::ncclGetErrorString(e.0) };
    if s.is_null() {
        format!("{:?}", e.0)
    } else {
        // SAFETY: non-null, NUL-terminated, static.
        unsafe { std::ffi::CStr::from_ptr(s) }.to_string_lossy().into_owned()
    }
}

/// How a world's ranks learn that one of them failed.
#[derive(Default)]
pub(crate) struct Failures {
    first: Mutex<Option<(usize, String)>>,
}

impl Failures {
    pub(crate) fn fail(&self, rank: usize, reason: &str) {
        lock(&self.first).get_or_insert_with(|| (rank, reason.to_string()));
    }

    fn get(&self) -> Option<(usize, String)> {
        lock(&self.first).clone()
    }
}

/// The store key under which a failing rank of a multi-process world publishes its abort.
pub(crate) const ABORT_KEY: &str = "nccl/abort";

/// What every communicator of one rank's world shares: the failure flag, the counters, and
/// (multi-process) the store through which aborts travel.
pub(crate) struct World {
    pub(crate) size: usize,
    pub(crate) failures: Arc<Failures>,
    pub(crate) stats: Mutex<CommStats>,
    pub(crate) store: Option<Mutex<StoreClient>>,
    last_poll: Mutex<Option<Instant>>,
}

impl World {
    pub(crate) fn new(size: usize, failures: Arc<Failures>, store: Option<StoreClient>) -> Self {
        World {
            size,
            failures,
            stats: Mutex::new(CommStats::default()),
            store: store.map(Mutex::new),
            last_poll: Mutex::new(None),
        }
    }

    /// The first failure this rank knows of, polling the store at most every 200 ms.
    fn failure(&self) -> Option<(usize, String)> {
        if let Some(f) = self.failures.get() {
            return Some(f);
        }
        let store = self.store.as_ref()?;
        {
            let mut last = lock(&self.last_poll);
            if last.is_some_and(|t| t.elapsed() < Duration::from_millis(200)) {
                return None;
            }
            *last = Some(Instant::now());
        }
        let got = lock(store).get(ABORT_KEY, Duration::ZERO).ok().flatten()?;
        let text = String::from_utf8_lossy(&got).into_owned();
        let (who, reason) = text.split_once(' ').unwrap_or(("0", text.as_str()));
        let who = who.parse().unwrap_or(0);
        self.failures.fail(who, reason);
        Some((who, reason.to_string()))
    }

    /// Marks rank `origin` failed here and, across processes, in the store.
    pub(crate) fn publish(&self, origin: usize, reason: &str) {
        self.failures.fail(origin, reason);
        if let Some(store) = &self.store {
            let _ = lock(store).set_once(ABORT_KEY, format!("{origin} {reason}").as_bytes());
        }
    }
}

/// An `ncclComm_t`, used by the rank's thread and (to abort it) its watchdog.
struct RawComm(sys::ncclComm_t);
// SAFETY: NCCL communicators may be used from any thread; every call on this one is
// serialised by `State` (see `Shared::call`), except `ncclCommAbort` releasing a blocked call,
// which NCCL allows.
unsafe impl Send for RawComm {}
unsafe impl Sync for RawComm {}

#[derive(Default)]
struct State {
    /// Collectives issued, for the records.
    seq: u32,
    /// Once set, every call fails with it (the communicator is aborted).
    dead: Option<CommError>,
    /// A dropped, un-waited operation (rule 4).
    abandoned: Option<String>,
    /// A blocking NCCL call in progress: its name and deadline (the watchdog's business).
    busy: Option<(String, Instant)>,
    /// Whether `ncclCommAbort` was called.
    aborted: bool,
}

struct Shared {
    comm: RawComm,
    rank: usize,
    members: Vec<usize>,
    device: CudaDevice,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    timeout: Duration,
    world: Arc<World>,
    state: Mutex<State>,
    splits: Mutex<HashMap<Vec<usize>, u64>>,
    finished: AtomicBool,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.finished.store(true, Ordering::Release);
        let s = lock(&self.state);
        if !s.aborted {
            // SAFETY: the communicator is no longer used by anyone (last reference).
            unsafe {
                let _ = if s.dead.is_some() {
                    nccl::comm_abort(self.comm.0)
                } else {
                    nccl::comm_destroy(self.comm.0)
                };
            }
        }
    }
}

fn driver_err(op: &str, rank: usize, e: impl std::fmt::Debug) -> CommError {
    CommError::Library { op: op.into(), rank, library: "CUDA", detail: format!("{e:?}") }
}

impl Shared {
    fn world_rank(&self) -> usize {
        self.members[self.rank]
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    /// Aborts the communicator (once) and records `err` as the answer to every later call.
    /// Called with the state lock held, so no other NCCL call on it is starting.
    fn kill(&self, s: &mut State, err: CommError) -> CommError {
        if s.dead.is_none() {
            s.dead = Some(err.clone());
        }
        if !s.aborted {
            s.aborted = true;
            // SAFETY: under the state lock; a call blocked in NCCL is released by it.
            unsafe {
                let _ = nccl::comm_abort(self.comm.0);
            }
        }
        s.dead.clone().unwrap_or(err)
    }

    /// Starts operation `name`: fails at once when the communicator is dead, an operation was
    /// abandoned, or a rank of the world failed. Returns the op's name and, for a collective,
    /// its sequence number (point-to-point groups, which only some ranks issue, take none).
    fn begin(&self, name: &str, collective: bool) -> Result<(String, u32), CommError> {
        let mut s = lock(&self.state);
        if let Some(e) = &s.dead {
            return Err(e.clone());
        }
        if let Some(op) = &s.abandoned {
            return Err(CommError::Abandoned { op: op.clone(), rank: self.world_rank() });
        }
        let seq = s.seq;
        let op = if collective {
            format!("{name} #{seq} on group {:?}", self.members)
        } else {
            format!("{name} on group {:?}", self.members)
        };
        if let Some((failed_rank, reason)) = self.world.failure() {
            let e = CommError::PeerFailed { op, rank: self.world_rank(), failed_rank, reason };
            return Err(self.kill(&mut s, e));
        }
        if collective {
            s.seq = s.seq.wrapping_add(1);
        }
        Ok((op, seq))
    }

    /// Runs one NCCL call that may block (a group end, an enqueue), under the watchdog.
    fn call<T>(
        &self,
        op: &str,
        f: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> Result<T, nccl::NcclError>,
    ) -> Result<T, CommError> {
        {
            let mut s = lock(&self.state);
            if let Some(e) = &s.dead {
                return Err(e.clone());
            }
            s.busy = Some((op.to_string(), Instant::now() + self.timeout));
        }
        self.ctx.bind_to_thread().map_err(|e| driver_err(op, self.world_rank(), e))?;
        let r = f(self.comm.0, self.stream.cu_stream() as sys::cudaStream_t);
        let mut s = lock(&self.state);
        s.busy = None;
        if let Some(e) = &s.dead {
            return Err(e.clone());
        }
        r.map_err(|e| {
            let err = CommError::Library {
                op: op.into(),
                rank: self.world_rank(),
                library: "NCCL",
                detail: nccl_text(&e),
            };
            self.kill(&mut s, err)
        })
    }

    /// An event after everything issued so far on the stream.
    fn mark(&self, op: &str) -> Result<CudaEvent, CommError> {
        self.stream.record_event(None).map_err(|e| driver_err(op, self.world_rank(), e))
    }

    /// Waits until `event` passes: polls it, the communicator's asynchronous error, the
    /// world's failure flag and the deadline.
    fn wait_event(&self, op: &str, event: &CudaEvent, missing: &[usize]) -> Result<(), CommError> {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let mut spins = 0u32;
        loop {
            match event.try_is_complete() {
                Ok(true) => {
                    lock(&self.world.stats).waited(start.elapsed());
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => {
                    let mut s = lock(&self.state);
                    return Err(self.kill(&mut s, driver_err(op, self.world_rank(), e)));
                }
            }
            let mut s = lock(&self.state);
            if let Some(e) = &s.dead {
                return Err(e.clone());
            }
            let mut async_err = sys::ncclResult_t::ncclSuccess;
            // SAFETY: under the state lock, on a live communicator.
            let polled = unsafe { sys::ncclCommGetAsyncError(self.comm.0, &mut async_err) };
            let bad = |r: sys::ncclResult_t| {
                !matches!(r, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress)
            };
            if bad(polled) || bad(async_err) {
                let code = if bad(async_err) { async_err } else { polled };
                let e = CommError::Library {
                    op: op.into(),
                    rank: self.world_rank(),
                    library: "NCCL",
                    detail: format!(
                        "asynchronous error: {} (a peer's process or connection was lost?)",
                        nccl_text(&nccl::NcclError(code))
                    ),
                };
                return Err(self.kill(&mut s, e));
            }
            if let Some((failed_rank, reason)) = self.world.failure() {
                let e = CommError::PeerFailed {
                    op: op.into(),
                    rank: self.world_rank(),
                    failed_rank,
                    reason,
                };
                return Err(self.kill(&mut s, e));
            }
            if Instant::now() >= deadline {
                let e = CommError::Timeout {
                    op: op.into(),
                    rank: self.world_rank(),
                    waited: start.elapsed(),
                    missing: missing.to_vec(),
                    blocked: String::new(),
                };
                return Err(self.kill(&mut s, e));
            }
            drop(s);
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    fn others(&self) -> Vec<usize> {
        self.members.iter().copied().filter(|&m| m != self.world_rank()).collect()
    }

    /// The collective's records of every rank, checked to agree.
    fn exchange(&self, op: &str, meta: Meta) -> Result<Vec<Meta>, CommError> {
        let rank = self.world_rank();
        let words =
            meta.encode().map_err(|detail| CommError::Shape { op: op.into(), rank, detail })?;
        let n = self.size();
        let send: CudaSlice<u32> =
            self.stream.clone_htod(&words[..]).map_err(|e| driver_err(op, rank, e))?;
        let mut recv: CudaSlice<u32> =
            self.stream.alloc_zeros(n * META_WORDS).map_err(|e| driver_err(op, rank, e))?;
        {
            let (src, _g1) = send.device_ptr(&self.stream);
            let (dst, _g2) = recv.device_ptr_mut(&self.stream);
            self.call(op, |comm, stream| unsafe {
                // SAFETY: both buffers live on this stream for the call.
                nccl::all_gather(
                    src as *const _,
                    dst as *mut _,
                    META_WORDS,
                    sys::ncclDataType_t::ncclUint32,
                    comm,
                    stream,
                )
            })?;
        }
        let done = self.mark(op)?;
        self.wait_event(op, &done, &self.others())?;
        let all = self.stream.clone_dtoh(&recv).map_err(|e| driver_err(op, rank, e))?;
        let records: Vec<Vec<u32>> = all.chunks(META_WORDS).map(<[u32]>::to_vec).collect();
        wire::agree(op, &self.members, self.rank, &records)
    }

    fn count(&self, kind: OpKind, sent: &[(usize, u64)], elem_bytes: u64) {
        let mut st = lock(&self.world.stats);
        st.called(kind);
        for &(dst, elements) in sent {
            st.moved(kind, dst, elements, elem_bytes);
        }
    }
}

/// A Burn CUDA tensor staged for NCCL: contiguous, its producers finished, its address.
struct Staged {
    cube: CubeTensor<CudaRuntime>,
    ptr: u64,
    _keep: KeepAlive,
}

/// The CubeCL resource of a buffer NCCL uses, held until the operation has completed.
struct KeepAlive(#[allow(dead_code)] Box<dyn Any>);
// SAFETY: only held (never used) until the operation completes, then dropped.
unsafe impl Send for KeepAlive {}

fn stage(t: Prim, op: &str, rank: usize) -> Result<Staged, CommError> {
    let client = t.client.clone();
    let cube = into_contiguous(client.resolve_tensor_float::<Inner>(t));
    cubecl::future::block_on(cube.client.sync()).map_err(|e| driver_err(op, rank, e))?;
    address(cube, op, rank)
}

fn address(cube: CubeTensor<CudaRuntime>, op: &str, rank: usize) -> Result<Staged, CommError> {
    let res = cube.client.get_resource(cube.handle.clone()).map_err(|e| driver_err(op, rank, e))?;
    let ptr = res.resource().ptr;
    Ok(Staged { cube, ptr, _keep: KeepAlive(Box::new(res)) })
}

/// A new contiguous CUDA tensor of `shape` like `like`, for NCCL to write.
fn output(
    like: &CubeTensor<CudaRuntime>,
    shape: Shape,
    op: &str,
    rank: usize,
) -> Result<Staged, CommError> {
    let cube =
        empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, like.dtype);
    address(cube, op, rank)
}

/// A new contiguous CUDA tensor of `shape` and dtype code `code` on `device`.
fn output_on(
    device: &CudaDevice,
    shape: Shape,
    code: u32,
    op: &str,
    rank: usize,
) -> Result<Staged, CommError> {
    let dtype = match code {
        1 => DType::F32,
        2 => DType::F16,
        _ => DType::BF16,
    };
    let client = <CudaRuntime as cubecl::Runtime>::client(device);
    address(empty_device_contiguous_dtype(client, device.clone(), shape, dtype), op, rank)
}

/// A finished output, back in Burn's fusion client.
fn into_burn(cube: CubeTensor<CudaRuntime>) -> Prim {
    let shape = cube.shape();
    let dtype = cube.dtype;
    let client = get_client::<Inner>(&cube.device);
    let handle = <Inner as BackendIr>::float_tensor_handle(cube);
    let desc = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
    client
        .register(OperationStreams::default(), OperationIr::Init(desc), NoOp::<Inner>::new())
        .remove(0)
}

fn nccl_dtype(t: &Prim, op: &str, rank: usize) -> Result<(sys::ncclDataType_t, u32), CommError> {
    let code = wire::dtype_code(t.dtype()).ok_or_else(|| CommError::Shape {
        op: op.into(),
        rank,
        detail: format!("NCCL moves f32, f16 and bf16 tensors here, not {:?}", t.dtype()),
    })?;
    let dt = match code {
        1 => sys::ncclDataType_t::ncclFloat32,
        2 => sys::ncclDataType_t::ncclFloat16,
        _ => sys::ncclDataType_t::ncclBfloat16,
    };
    Ok((dt, code))
}

/// One transfer of a point-to-point group: is it a send, the peer (group rank), the device
/// address, elements, dtype.
type Transfer = (bool, usize, u64, usize, sys::ncclDataType_t);

/// Issues `transfers` as one NCCL group (closed on every path).
///
/// # Safety
/// Every address must hold its elements, alive until the group's work has completed.
unsafe fn group(
    transfers: &[Transfer],
    comm: sys::ncclComm_t,
    stream: sys::cudaStream_t,
) -> Result<nccl::NcclStatus, nccl::NcclError> {
    nccl::group_start()?;
    let mut r = Ok(nccl::NcclStatus::Success);
    for &(is_send, peer, p, count, dt) in transfers {
        r = r.and_then(|_| {
            // SAFETY: the caller's.
            unsafe {
                if is_send {
                    nccl::send(p as *const _, count, dt, peer as i32, comm, stream)
                } else {
                    nccl::recv(p as *mut _, count, dt, peer as i32, comm, stream)
                }
            }
        });
    }
    let end = nccl::group_end();
    r.and(end)
}

fn elems(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn narrow(t: Prim, dim: usize, start: usize, len: usize) -> Prim {
    let nd = t.shape().num_dims();
    let slices: Vec<Slice> = (0..nd)
        .map(|d| {
            if d == dim {
                Slice::new(start as isize, Some((start + len) as isize), 1)
            } else {
                Slice::full()
            }
        })
        .collect();
    Cuda::float_slice(t, &slices)
}

/// A started operation: finished when its event passes; then `finish` builds the result.
struct Handle<T> {
    shared: Arc<Shared>,
    op: String,
    event: Option<CudaEvent>,
    missing: Vec<usize>,
    keep: Vec<Staged>,
    finish: Option<Box<dyn FnOnce(Vec<Staged>) -> T + Send>>,
}

// SAFETY: the event and the staged buffers are only touched by the thread that waits, and
// CUDA events and device memory may be used from any thread of the process.
unsafe impl<T> Send for Handle<T> {}

impl<T> Drop for Handle<T> {
    fn drop(&mut self) {
        if self.finish.is_some() {
            let mut s = lock(&self.shared.state);
            s.abandoned.get_or_insert_with(|| self.op.clone());
            // The buffers must outlive NCCL's use of them: wait (bounded) before freeing.
            drop(s);
            if let Some(ev) = &self.event {
                let _ = self.shared.wait_event(&self.op, ev, &self.missing);
            }
        }
    }
}

impl<T> Completion<T> for Handle<T> {
    fn wait(mut self: Box<Self>) -> Result<T, CommError> {
        let finish = self.finish.take().expect("a handle is waited once");
        if let Some(ev) = self.event.take() {
            self.shared.wait_event(&self.op, &ev, &self.missing)?;
        }
        Ok(finish(std::mem::take(&mut self.keep)))
    }

    fn is_ready(&self) -> bool {
        self.event.as_ref().is_none_or(|e| e.try_is_complete().unwrap_or(true))
    }
}

/// One rank's NCCL communicator over a group of the world (see the [module docs](self)).
pub struct NcclComm {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.shared.rank)
            .field("members", &self.shared.members)
            .field("device", &self.shared.device)
            .finish()
    }
}

/// The watchdog of a communicator: aborts it when a blocking call overstays its deadline or
/// a rank of the world failed, so that the call returns. Ends with the communicator.
fn watch(shared: Weak<Shared>) {
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let Some(sh) = shared.upgrade() else { return };
        if sh.finished.load(Ordering::Acquire) {
            return;
        }
        let mut s = lock(&sh.state);
        if s.aborted {
            return;
        }
        let Some((op, deadline)) = s.busy.clone() else { continue };
        if let Some((failed_rank, reason)) = sh.world.failure() {
            let e = CommError::PeerFailed { op, rank: sh.world_rank(), failed_rank, reason };
            sh.kill(&mut s, e);
            return;
        }
        if Instant::now() >= deadline {
            let e = CommError::Timeout {
                op: op.clone(),
                rank: sh.world_rank(),
                waited: sh.timeout,
                missing: sh.others(),
                blocked: " (blocked inside NCCL)".into(),
            };
            sh.kill(&mut s, e);
            return;
        }
    }
}

impl NcclComm {
    /// Initialises group rank `rank` of `members` (world ranks) on `device` from the group's
    /// NCCL unique id, blocking until every member has called it or `timeout` passes.
    ///
    /// # Errors
    /// [`CommError::Library`] (the CUDA context, NCCL's initialisation), or
    /// [`CommError::Timeout`] when a member never initialises.
    pub(crate) fn init(
        id: sys::ncclUniqueId,
        rank: usize,
        members: Vec<usize>,
        device: CudaDevice,
        timeout: Duration,
        world: Arc<World>,
    ) -> Result<NcclComm, CommError> {
        let me = members[rank];
        let op = format!("NCCL initialisation of group {members:?}");
        let ctx = CudaContext::new(device.index).map_err(|e| driver_err(&op, me, e))?;
        ctx.bind_to_thread().map_err(|e| driver_err(&op, me, e))?;
        let stream = ctx.new_stream().map_err(|e| driver_err(&op, me, e))?;
        // ncclCommInitRank blocks until every member calls it: watched by a thread that gives
        // up at the deadline (NCCL's handle is only ours once it returns, so it cannot be
        // aborted; the rank fails and its process exits, which releases NCCL).
        let (tx, rx) = std::sync::mpsc::channel();
        let size = members.len();
        let ctx2 = ctx.clone();
        std::thread::Builder::new()
            .name(format!("nccl-init-rank{me}"))
            .spawn(move || {
                let _ = ctx2.bind_to_thread();
                let mut comm: sys::ncclComm_t = std::ptr::null_mut();
                // SAFETY: `comm` is written by NCCL; the id is the group's.
                let r = unsafe { nccl::comm_init_rank(&mut comm, size as i32, id, rank as i32) };
                let _ = tx.send(r.map(|_| RawComm(comm)));
            })
            .map_err(|e| driver_err(&op, me, e))?;
        let comm = match rx.recv_timeout(timeout) {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(CommError::Library {
                    op,
                    rank: me,
                    library: "NCCL",
                    detail: nccl_text(&e),
                });
            }
            Err(_) => {
                return Err(CommError::Timeout {
                    op,
                    rank: me,
                    waited: timeout,
                    missing: members.iter().copied().filter(|&m| m != me).collect(),
                    blocked: " (not every member reached NCCL's initialisation)".into(),
                });
            }
        };
        let shared = Arc::new(Shared {
            comm,
            rank,
            members,
            device,
            ctx,
            stream,
            timeout,
            world,
            state: Mutex::new(State::default()),
            splits: Mutex::new(HashMap::new()),
            finished: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name(format!("nccl-watchdog-rank{me}"))
            .spawn(move || watch(weak))
            .map_err(|e| driver_err("NCCL watchdog", me, e))?;
        Ok(NcclComm { shared })
    }

    fn pending(
        &self,
        op: String,
        event: CudaEvent,
        keep: Vec<Staged>,
        finish: impl FnOnce(Vec<Staged>) -> Prim + Send + 'static,
    ) -> RawPending<Cuda> {
        RawPending(Box::new(Handle {
            shared: self.shared.clone(),
            op,
            event: Some(event),
            missing: self.shared.others(),
            keep,
            finish: Some(Box::new(finish)),
        }))
    }

    /// The whole tensor as one contiguous NCCL buffer, same op, every rank: all-reduce and
    /// broadcast.
    fn same_shape(
        &self,
        name: &str,
        what: Collective,
        t: Prim,
        kind: OpKind,
    ) -> Result<RawPending<Cuda>, CommError> {
        let sh = &self.shared;
        let rank = sh.world_rank();
        let (op, seq) = sh.begin(name, true)?;
        let (dt, code) = nccl_dtype(&t, &op, rank)?;
        let shape = t.shape().as_slice().to_vec();
        sh.exchange(&op, Meta { op: what, seq, dtype: code, shape: shape.clone() })?;
        let input = stage(t, &op, rank)?;
        let out = output(&input.cube, Shape::from(shape.clone()), &op, rank)?;
        let n = elems(&shape);
        let (src, dst) = (input.ptr, out.ptr);
        sh.call(&op, |comm, stream| unsafe {
            // SAFETY: contiguous buffers of `n` elements, alive until the handle completes.
            match what {
                Collective::Broadcast { root } => nccl::broadcast(
                    src as *const _,
                    dst as *mut _,
                    n,
                    dt,
                    root as i32,
                    comm,
                    stream,
                ),
                _ => nccl::all_reduce(
                    src as *const _,
                    dst as *mut _,
                    n,
                    dt,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                ),
            }
        })?;
        let event = sh.mark(&op)?;
        let size = sh.size() as u64;
        let elem = input.cube.dtype.size() as u64;
        let sent: Vec<(usize, u64)> = match what {
            Collective::Broadcast { root } if root == sh.rank => {
                sh.others().into_iter().map(|d| (d, n as u64)).collect()
            }
            Collective::Broadcast { .. } => Vec::new(),
            _ => vec![(
                sh.members[(sh.rank + 1) % sh.size()],
                all_reduce_elements(n as u64, sh.rank as u64, size),
            )],
        };
        sh.count(kind, &sent, elem);
        Ok(self.pending(op, event, vec![input, out], |mut keep| into_burn(keep.remove(1).cube)))
    }
}

impl Communicator<Cuda> for NcclComm {
    fn rank(&self) -> usize {
        self.shared.rank
    }

    fn size(&self) -> usize {
        self.shared.size()
    }

    fn members(&self) -> &[usize] {
        &self.shared.members
    }

    fn device(&self) -> CudaDevice {
        self.shared.device.clone()
    }

    fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    fn start_all_gather(&self, t: Prim, dim: usize) -> Result<RawPending<Cuda>, CommError> {
        let sh = &self.shared;
        let rank = sh.world_rank();
        let (op, seq) = sh.begin("all_gather", true)?;
        let (dt, code) = nccl_dtype(&t, &op, rank)?;
        let shape = t.shape().as_slice().to_vec();
        if dim >= shape.len() {
            return Err(CommError::Shape {
                op,
                rank,
                detail: format!("dim {dim} of a tensor of shape {shape:?}"),
            });
        }
        let metas = sh.exchange(
            &op,
            Meta { op: Collective::AllGather { dim }, seq, dtype: code, shape: shape.clone() },
        )?;
        let sizes = wire::sizes_along(&metas, dim);
        // Gathered along dim 0 of the tensor with `dim` moved first, then moved back.
        let front = if dim == 0 { t } else { Cuda::float_swap_dims(t, 0, dim) };
        let mut fshape = shape.clone();
        fshape.swap(0, dim);
        let inner = elems(&fshape[1..]);
        let input = stage(front, &op, rank)?;
        let total: usize = sizes.iter().sum();
        let mut oshape = fshape.clone();
        oshape[0] = total;
        let out = output(&input.cube, Shape::from(oshape), &op, rank)?;
        let esize = input.cube.dtype.size();
        let mine = sizes[sh.rank] * inner;
        let (src, dst) = (input.ptr, out.ptr);
        if sizes.iter().all(|&s| s == sizes[0]) {
            sh.call(&op, |comm, stream| unsafe {
                // SAFETY: `dst` holds size × `mine` elements.
                nccl::all_gather(src as *const _, dst as *mut _, mine, dt, comm, stream)
            })?;
        } else {
            let offsets: Vec<usize> =
                sizes.iter().scan(0, |acc, &s| Some(std::mem::replace(acc, *acc + s))).collect();
            let me = sh.rank;
            let mut plan: Vec<Transfer> = Vec::new();
            for (j, (&s, &o)) in sizes.iter().zip(&offsets).enumerate() {
                if j != me {
                    plan.push((true, j, src, mine, dt));
                    plan.push((false, j, dst + (o * inner * esize) as u64, s * inner, dt));
                }
            }
            // SAFETY: each receive writes its rank's slot of `dst`.
            sh.call(&op, |comm, stream| unsafe { group(&plan, comm, stream) })?;
            let at = dst + (offsets[me] * inner * esize) as u64;
            // SAFETY: both ranges lie in live buffers; ordered on this stream.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    at,
                    src,
                    mine * esize,
                    sh.stream.cu_stream(),
                )
            }
            .map_err(|e| driver_err(&op, rank, e))?;
        }
        let event = sh.mark(&op)?;
        let sent: Vec<(usize, u64)> = sh.others().into_iter().map(|d| (d, mine as u64)).collect();
        sh.count(OpKind::AllGather, &sent, esize as u64);
        Ok(self.pending(op, event, vec![input, out], move |mut keep| {
            let g = into_burn(keep.remove(1).cube);
            if dim == 0 { g } else { Cuda::float_swap_dims(g, 0, dim) }
        }))
    }

    fn start_all_to_all(
        &self,
        t: Prim,
        scatter_dim: usize,
        scatter_sizes: Vec<usize>,
        gather_dim: usize,
    ) -> Result<RawPending<Cuda>, CommError> {
        let sh = &self.shared;
        let rank = sh.world_rank();
        let (op, seq) = sh.begin("all_to_all", true)?;
        let (dt, code) = nccl_dtype(&t, &op, rank)?;
        let shape = t.shape().as_slice().to_vec();
        let n = sh.size();
        if scatter_dim >= shape.len()
            || gather_dim >= shape.len()
            || scatter_sizes.len() != n
            || scatter_sizes.iter().sum::<usize>() != shape[scatter_dim]
        {
            return Err(CommError::Shape {
                op,
                rank,
                detail: format!(
                    "scatter dim {scatter_dim} into {scatter_sizes:?} and gather dim {gather_dim} \
                     of a tensor of shape {shape:?} over {n} ranks"
                ),
            });
        }
        let what = Collective::AllToAll {
            scatter: scatter_dim,
            gather: gather_dim,
            sizes: wire::fingerprint(&scatter_sizes),
        };
        let metas = sh.exchange(&op, Meta { op: what, seq, dtype: code, shape: shape.clone() })?;
        let incoming = wire::all_to_all_incoming(&metas, sh.rank, scatter_dim, &scatter_sizes);
        let me = sh.rank;
        let mut start = 0;
        let mut own: Option<Prim> = None;
        let mut sends: Vec<(usize, Staged)> = Vec::new();
        for (j, &len) in scatter_sizes.iter().enumerate() {
            let chunk = narrow(t.clone(), scatter_dim, start, len);
            start += len;
            if j == me {
                own = Some(chunk);
            } else {
                sends.push((j, stage(chunk, &op, rank)?));
            }
        }
        let like = match sends.first() {
            Some((_, s)) => s.cube.clone(),
            None => {
                let t0 = t.client.clone().resolve_tensor_float::<Inner>(t.clone());
                into_contiguous(t0)
            }
        };
        let mut recvs: Vec<(usize, Staged)> = Vec::new();
        for (j, s) in incoming.iter().enumerate() {
            if j != me {
                recvs.push((j, output(&like, Shape::from(s.clone()), &op, rank)?));
            }
        }
        let esize = like.dtype.size();
        let plan: Vec<Transfer> = sends
            .iter()
            .map(|(j, s)| (true, *j, s.ptr, elems(s.cube.shape().as_slice()), dt))
            .chain(
                recvs.iter().map(|(j, s)| (false, *j, s.ptr, elems(s.cube.shape().as_slice()), dt)),
            )
            .collect();
        // SAFETY: every buffer is contiguous and alive until the handle completes.
        sh.call(&op, |comm, stream| unsafe { group(&plan, comm, stream) })?;
        let event = sh.mark(&op)?;
        let sent: Vec<(usize, u64)> =
            plan.iter().filter(|t| t.0).map(|&(_, j, _, c, _)| (sh.members[j], c as u64)).collect();
        sh.count(OpKind::AllToAll, &sent, esize as u64);
        let order: Vec<Option<usize>> =
            (0..n).map(|j| if j == me { None } else { Some(j) }).collect();
        let n_sends = sends.len();
        let mut keep: Vec<Staged> = sends.into_iter().map(|(_, s)| s).collect();
        keep.extend(recvs.into_iter().map(|(_, s)| s));
        let own = own.expect("this rank's chunk");
        Ok(self.pending(op, event, keep, move |keep| {
            let mut received: Vec<Option<Prim>> =
                keep.into_iter().skip(n_sends).map(|s| Some(into_burn(s.cube))).collect();
            let mut own = Some(own);
            let mut k = 0;
            let parts: Vec<Prim> = order
                .iter()
                .map(|j| match j {
                    None => own.take().expect("once"),
                    Some(_) => {
                        k += 1;
                        received[k - 1].take().expect("once")
                    }
                })
                .collect();
            Cuda::float_cat(parts, gather_dim)
        }))
    }

    fn start_all_reduce(&self, t: Prim) -> Result<RawPending<Cuda>, CommError> {
        self.same_shape("all_reduce", Collective::AllReduce, t, OpKind::AllReduce)
    }

    fn start_broadcast(&self, t: Prim, root: usize) -> Result<RawPending<Cuda>, CommError> {
        if root >= self.shared.size() {
            return Err(CommError::InvalidRank {
                op: "broadcast".into(),
                rank: self.shared.world_rank(),
                detail: format!("root {root} outside a group of {}", self.shared.size()),
            });
        }
        self.same_shape("broadcast", Collective::Broadcast { root }, t, OpKind::Broadcast)
    }

    fn start_group(&self, ops: Vec<P2pOp<Cuda>>) -> Result<Vec<P2pHandle<Cuda>>, CommError> {
        let sh = &self.shared;
        let rank = sh.world_rank();
        let (op, _) = sh.begin("p2p group", false)?;
        let n = sh.size();
        // Phase 1: headers (tag, dtype, shape) both ways, so receivers can check and allocate.
        let mut send_hdr: Vec<(usize, CudaSlice<u32>)> = Vec::new();
        let mut recv_hdr: Vec<(usize, CudaSlice<u32>)> = Vec::new();
        for o in &ops {
            match o {
                P2pOp::Send { tensor, dst, tag } => {
                    if *dst >= n || *dst == sh.rank {
                        return Err(CommError::InvalidRank {
                            op,
                            rank,
                            detail: format!("send to group rank {dst} of {n} (not itself)"),
                        });
                    }
                    let (_, code) = nccl_dtype(tensor, &op, rank)?;
                    let h = Header::new(*tag, code, tensor.shape().as_slice())
                        .encode()
                        .map_err(|detail| CommError::Shape { op: op.clone(), rank, detail })?;
                    let buf = sh.stream.clone_htod(&h[..]).map_err(|e| driver_err(&op, rank, e))?;
                    send_hdr.push((*dst, buf));
                }
                P2pOp::Recv { src, .. } => {
                    if *src >= n || *src == sh.rank {
                        return Err(CommError::InvalidRank {
                            op,
                            rank,
                            detail: format!("receive from group rank {src} of {n} (not itself)"),
                        });
                    }
                    let buf = sh
                        .stream
                        .alloc_zeros(HEADER_WORDS)
                        .map_err(|e| driver_err(&op, rank, e))?;
                    recv_hdr.push((*src, buf));
                }
            }
        }
        let peers: Vec<usize> = ops
            .iter()
            .map(|o| match o {
                P2pOp::Send { dst, .. } => sh.members[*dst],
                P2pOp::Recv { src, .. } => sh.members[*src],
            })
            .collect();
        {
            let u32_ = sys::ncclDataType_t::ncclUint32;
            let mut plan: Vec<Transfer> = send_hdr
                .iter()
                .map(|(d, b)| (true, *d, b.device_ptr(&sh.stream).0, HEADER_WORDS, u32_))
                .collect();
            for (s, b) in recv_hdr.iter_mut() {
                plan.push((false, *s, b.device_ptr_mut(&sh.stream).0, HEADER_WORDS, u32_));
            }
            // SAFETY: header buffers of HEADER_WORDS words, alive for the call and the wait.
            sh.call(&op, |comm, stream| unsafe { group(&plan, comm, stream) })?;
        }
        let done = sh.mark(&op)?;
        sh.wait_event(&op, &done, &peers)?;
        // Phase 2: check the tags, allocate, move the payloads.
        let mut headers = Vec::new();
        for (src, buf) in &recv_hdr {
            let words = sh.stream.clone_dtoh(buf).map_err(|e| driver_err(&op, rank, e))?;
            let h = Header::decode(&words).ok_or_else(|| CommError::Shape {
                op: op.clone(),
                rank,
                detail: format!(
                    "rank {} sent something that is not a message header",
                    sh.members[*src]
                ),
            })?;
            headers.push(h);
        }
        let mut headers = headers.into_iter();
        // (is it a send, peer, buffer)
        let mut staged: Vec<(bool, usize, Staged)> = Vec::with_capacity(ops.len());
        for o in ops {
            match o {
                P2pOp::Send { tensor, dst, .. } => {
                    staged.push((true, dst, stage(tensor, &op, rank)?));
                }
                P2pOp::Recv { src, tag } => {
                    let h = headers.next().expect("one header per receive");
                    if !h.is(&tag) {
                        let e = CommError::TagMismatch {
                            rank,
                            src: sh.members[src],
                            expected: tag,
                            got: h.tag(&tag),
                        };
                        let mut s = lock(&sh.state);
                        return Err(sh.kill(&mut s, e));
                    }
                    let out =
                        output_on(&sh.device, Shape::from(h.shape.clone()), h.dtype, &op, rank)?;
                    staged.push((false, src, out));
                }
            }
        }
        let plan: Vec<Transfer> = staged
            .iter()
            .map(|(is_send, peer, s)| {
                let dt = match wire::dtype_code(s.cube.dtype) {
                    Some(2) => sys::ncclDataType_t::ncclFloat16,
                    Some(3) => sys::ncclDataType_t::ncclBfloat16,
                    _ => sys::ncclDataType_t::ncclFloat32,
                };
                (*is_send, *peer, s.ptr, elems(s.cube.shape().as_slice()), dt)
            })
            .collect();
        // SAFETY: contiguous payload buffers, alive until their handles complete.
        sh.call(&op, |comm, stream| unsafe { group(&plan, comm, stream) })?;
        let mut handles = Vec::with_capacity(staged.len());
        for (is_send, peer, buf) in staged {
            let event = sh.mark(&op)?;
            let esize = buf.cube.dtype.size() as u64;
            let count = elems(buf.cube.shape().as_slice()) as u64;
            let missing = vec![sh.members[peer]];
            if is_send {
                sh.count(OpKind::Send, &[(sh.members[peer], count)], esize);
                let h: Handle<()> = Handle {
                    shared: sh.clone(),
                    op: op.clone(),
                    event: Some(event),
                    missing,
                    keep: vec![buf],
                    finish: Some(Box::new(|_| ())),
                };
                handles.push(P2pHandle::Send(RawPendingSend(Box::new(h))));
            } else {
                sh.count(OpKind::Recv, &[], esize);
                let h: Handle<Prim> = Handle {
                    shared: sh.clone(),
                    op: op.clone(),
                    event: Some(event),
                    missing,
                    keep: vec![buf],
                    finish: Some(Box::new(|mut keep| into_burn(keep.remove(0).cube))),
                };
                handles.push(P2pHandle::Recv(RawPending(Box::new(h))));
            }
        }
        Ok(handles)
    }

    fn barrier(&self) -> Result<(), CommError> {
        let sh = &self.shared;
        let (op, seq) = sh.begin("barrier", true)?;
        sh.exchange(&op, Meta { op: Collective::Barrier, seq, dtype: 0, shape: Vec::new() })?;
        lock(&sh.world.stats).called(OpKind::Barrier);
        Ok(())
    }

    fn split(&self, members: &[usize]) -> Result<Box<dyn Communicator<Cuda>>, CommError> {
        let sh = &self.shared;
        let me = sh.world_rank();
        let idx = check_split(me, sh.world.size, members)?;
        let parent: Vec<usize> = members
            .iter()
            .map(|w| sh.members.iter().position(|m| m == w))
            .collect::<Option<_>>()
            .ok_or_else(|| CommError::InvalidRank {
                op: "split".into(),
                rank: me,
                detail: format!(
                    "members {members:?} must all belong to the group {:?}",
                    sh.members
                ),
            })?;
        let nth = {
            let mut splits = lock(&sh.splits);
            let c = splits.entry(members.to_vec()).or_insert(0);
            *c += 1;
            *c
        };
        let op = format!("split #{nth} onto {members:?}");
        if let Some(e) = &lock(&sh.state).dead {
            return Err(e.clone());
        }
        // The new group's NCCL id, made by its first member and sent to the others on this
        // communicator (only the members take part).
        const ID: usize = 128;
        let uint8 = sys::ncclDataType_t::ncclUint8;
        let mut buf: CudaSlice<u8> = if idx == 0 {
            let id = nccl::get_uniqueid().map_err(|e| CommError::Library {
                op: op.clone(),
                rank: me,
                library: "NCCL",
                detail: nccl_text(&e),
            })?;
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            sh.stream.clone_htod(&bytes[..]).map_err(|e| driver_err(&op, me, e))?
        } else {
            sh.stream.alloc_zeros(ID).map_err(|e| driver_err(&op, me, e))?
        };
        {
            let (ptr, _g) = buf.device_ptr_mut(&sh.stream);
            let peers: Vec<usize> = parent[1..].to_vec();
            let root = parent[0];
            let plan: Vec<Transfer> = if idx == 0 {
                peers.iter().map(|&p| (true, p, ptr, ID, uint8)).collect()
            } else {
                vec![(false, root, ptr, ID, uint8)]
            };
            // SAFETY: a 128-byte buffer alive for the call and the wait below.
            sh.call(&op, |comm, stream| unsafe { group(&plan, comm, stream) })?;
        }
        let done = sh.mark(&op)?;
        sh.wait_event(&op, &done, &[members[0]])?;
        let bytes = sh.stream.clone_dtoh(&buf).map_err(|e| driver_err(&op, me, e))?;
        let mut id = sys::ncclUniqueId { internal: [0; ID] };
        for (d, b) in id.internal.iter_mut().zip(bytes) {
            *d = b as std::ffi::c_char;
        }
        let comm = NcclComm::init(
            id,
            idx,
            members.to_vec(),
            sh.device.clone(),
            sh.timeout,
            sh.world.clone(),
        )?;
        Ok(Box::new(comm))
    }

    fn abort(&self, reason: &str) {
        let sh = &self.shared;
        sh.world.publish(sh.world_rank(), reason);
        let mut s = lock(&sh.state);
        let e = CommError::PeerFailed {
            op: "abort".into(),
            rank: sh.world_rank(),
            failed_rank: sh.world_rank(),
            reason: reason.to_string(),
        };
        sh.kill(&mut s, e);
    }

    fn stats(&self) -> CommStats {
        lock(&self.shared.world.stats).clone()
    }

    fn reset_stats(&self) {
        *lock(&self.shared.world.stats) = CommStats::default();
    }
}

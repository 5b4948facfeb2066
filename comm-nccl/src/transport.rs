//! [`NcclTransport`]: forms NCCL worlds under parallel-core's launchers — all ranks of one
//! process (a GPU each), or one rank per process met at the rendezvous store.

use std::sync::Arc;

use parallel_core::{
    Comm, CommError, Connector, LaunchOptions, ProcessGroup, Transport, WorldExit,
};

use crate::nccl::{Cuda, Failures, NcclComm, World, nccl_text};
use crate::rendezvous::{ID_BYTES, meet};
use cubecl::cuda::CudaDevice;
use cudarc::nccl::{result as nccl, sys};

/// The NCCL transport (see the [module docs](self)). Put it in
/// [`LaunchOptions::transport`](parallel_core::LaunchOptions).
#[derive(Debug, Default, Clone, Copy)]
pub struct NcclTransport;

/// Whether NCCL's library loads: cudarc panics on the first call when it does not.
///
/// # Errors
/// [`CommError::Library`] naming the library names tried and the usual fix.
pub fn check_library(rank: usize) -> Result<(), CommError> {
    // SAFETY: only tries to open the library.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    Err(CommError::Library {
        op: "loading NCCL".into(),
        rank,
        library: "NCCL",
        detail:
            "no libnccl.so could be loaded (tried libnccl.so and libnccl.so.{13,12,11,10,9,1}; \
                 a machine with only libnccl.so.2 needs a libnccl.so symlink to it on \
                 LD_LIBRARY_PATH)"
                .into(),
    })
}

fn id_from(bytes: &[u8]) -> sys::ncclUniqueId {
    let mut id = sys::ncclUniqueId { internal: [0; ID_BYTES] };
    for (d, &b) in id.internal.iter_mut().zip(bytes) {
        *d = b as std::ffi::c_char;
    }
    id
}

fn new_id(rank: usize) -> Result<sys::ncclUniqueId, CommError> {
    nccl::get_uniqueid().map_err(|e| CommError::Library {
        op: "ncclGetUniqueId".into(),
        rank,
        library: "NCCL",
        detail: nccl_text(&e),
    })
}

fn device_of(options: &LaunchOptions<Cuda>, rank: usize) -> CudaDevice {
    if options.devices.is_empty() {
        CudaDevice { index: rank }
    } else {
        options.devices[rank % options.devices.len()].clone()
    }
}

struct InProcess {
    id: sys::ncclUniqueId,
    size: usize,
    devices: Vec<CudaDevice>,
    timeout: std::time::Duration,
    failures: Arc<Failures>,
}

// SAFETY: the id is plain bytes.
unsafe impl Send for InProcess {}
unsafe impl Sync for InProcess {}

impl Connector<Cuda> for InProcess {
    fn connect(&self, rank: usize) -> Result<Comm<Cuda>, CommError> {
        let world = Arc::new(World::new(self.size, self.failures.clone(), None));
        let comm = NcclComm::init(
            self.id,
            rank,
            (0..self.size).collect(),
            self.devices[rank].clone(),
            self.timeout,
            world,
        )?;
        Ok(Comm::new(Box::new(comm)))
    }
}

struct Exit {
    comm: Comm<Cuda>,
    world: Arc<World>,
    _server: Option<parallel_core::comm::StoreServer>,
}

impl WorldExit for Exit {
    fn finish(self: Box<Self>) {}

    fn abort(self: Box<Self>, origin: usize, reason: &str) {
        self.world.publish(origin, reason);
        self.comm.abort(reason);
        // Rank 0 hosts the store: give the others a moment to read the abort from it
        // before this process (and the store) goes.
        if self._server.is_some() {
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
}

impl Transport<Cuda> for NcclTransport {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn world(
        &self,
        size: usize,
        options: &LaunchOptions<Cuda>,
    ) -> Result<Arc<dyn Connector<Cuda>>, CommError> {
        check_library(0)?;
        let devices: Vec<CudaDevice> = (0..size).map(|r| device_of(options, r)).collect();
        for (r, d) in devices.iter().enumerate() {
            if let Some(q) = devices[..r].iter().position(|e| e == d) {
                return Err(CommError::InvalidRank {
                    op: "an in-process NCCL world".into(),
                    rank: r,
                    detail: format!(
                        "ranks {q} and {r} are both on GPU {}: NCCL needs one GPU per rank \
                         (fewer ranks, more --devices, or the in-process communicator)",
                        d.index
                    ),
                });
            }
        }
        Ok(Arc::new(InProcess {
            id: new_id(0)?,
            size,
            devices,
            timeout: options.timeout,
            failures: Arc::new(Failures::default()),
        }))
    }

    fn join(
        &self,
        group: &ProcessGroup,
        options: &LaunchOptions<Cuda>,
    ) -> Result<(Comm<Cuda>, Box<dyn WorldExit>), CommError> {
        check_library(group.rank)?;
        let met = meet(group, options.timeout, || {
            let id = new_id(0).map_err(|e| e.to_string())?;
            Ok(id.internal.iter().map(|&c| c as u8).collect())
        })?;
        let world =
            Arc::new(World::new(group.world_size, Arc::new(Failures::default()), Some(met.client)));
        let comm = NcclComm::init(
            id_from(&met.id),
            group.rank,
            (0..group.world_size).collect(),
            device_of(options, group.rank),
            options.timeout,
            world.clone(),
        )?;
        let comm = Comm::new(Box::new(comm));
        Ok((comm.clone(), Box::new(Exit { comm, world, _server: met.server })))
    }
}

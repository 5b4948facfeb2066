//! NCCL for the toolkit's communicator contract: [`NcclComm`] implements parallel-core's
//! `Communicator` on Burn's CUDA tensors, and [`NcclTransport`] forms its worlds under
//! parallel-core's launchers (`launch` for every GPU of one process, `launch_process` for one
//! process per GPU, joined at the torchrun-style rendezvous store).
//!
//! The GPU parts sit behind the `nccl` feature (they build with no CUDA installed: cudarc
//! loads the libraries at run time). What needs no GPU — the records the ranks exchange to
//! catch mismatched calls ([`wire`]) and the rendezvous ([`rendezvous`]) — is always built
//! and tested on the CPU.

pub mod rendezvous;
pub mod wire;

#[cfg(feature = "nccl")]
#[allow(unsafe_code)]
mod nccl;
#[cfg(feature = "nccl")]
#[allow(unsafe_code)]
mod transport;

#[cfg(feature = "nccl")]
pub use nccl::{Cuda, NcclComm};
#[cfg(feature = "nccl")]
pub use transport::{NcclTransport, check_library};

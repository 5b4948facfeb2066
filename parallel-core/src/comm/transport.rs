//! Pluggable transports: how a communicator that is not built into this crate forms a
//! world under [`launch`](super::launch) and [`launch_process`](super::launch_process).
//!
//! Without a transport in [`LaunchOptions::transport`], in-process ranks talk through
//! [`LocalComm`](super::LocalComm) and the ranks of a multi-process world through
//! [`TcpComm`](super::TcpComm). A transport replaces both: crate `comm-nccl`'s NCCL transport is
//! one (each rank on its own GPU, the NCCL unique id shared through the rendezvous store).
//! The launchers keep their failure handling whatever the transport: a rank that fails or
//! panics is [`Communicator::abort`]ed (in process) or reported through its [`WorldExit`]
//! (multi-process), so the other ranks' waits end.

use std::fmt;
use std::sync::Arc;

use burn::tensor::backend::Backend;

use super::{Comm, LaunchOptions, ProcessGroup};
use crate::error::CommError;

/// A way of forming a world of ranks: see the [module docs](self).
pub trait Transport<B: Backend>: Send + Sync + fmt::Debug {
    /// Its name, for messages (`"nccl"`).
    fn name(&self) -> &'static str;

    /// Prepares an in-process world of `size` ranks. Each rank's thread then calls
    /// [`Connector::connect`] on the result, concurrently with the others (NCCL's
    /// initialisation of one rank returns only when every rank has called it).
    ///
    /// # Errors
    /// The world cannot be formed (no library, too few devices …), in words naming the cause.
    fn world(
        &self,
        size: usize,
        options: &LaunchOptions<B>,
    ) -> Result<Arc<dyn Connector<B>>, CommError>;

    /// Joins rank `group.rank` of a multi-process world whose rendezvous store rank 0 hosts at
    /// `group.master`. Report how the rank's work ended on the returned [`WorldExit`].
    ///
    /// # Errors
    /// [`CommError::Rendezvous`] naming the rank or setting at fault.
    fn join(
        &self,
        group: &ProcessGroup,
        options: &LaunchOptions<B>,
    ) -> Result<(Comm<B>, Box<dyn WorldExit>), CommError>;
}

/// An in-process world being formed ([`Transport::world`]).
pub trait Connector<B: Backend>: Send + Sync {
    /// The communicator of rank `rank`, called on that rank's own thread.
    ///
    /// # Errors
    /// This rank cannot join (its device, the library's initialisation).
    fn connect(&self, rank: usize) -> Result<Comm<B>, CommError>;
}

/// How a rank of a multi-process world reports the end of its work to the others.
pub trait WorldExit: Send {
    /// The rank finished its work.
    fn finish(self: Box<Self>);
    /// The rank stops because rank `origin` (itself, or a peer whose failure it only echoes)
    /// failed with `reason`: every peer's waits end naming `origin`.
    fn abort(self: Box<Self>, origin: usize, reason: &str);
}

//! Meeting the other ranks of a multi-process world at the rendezvous store, the torchrun
//! way — the first step of every transport between processes (`TcpComm`'s, and NCCL's in
//! crate `comm-nccl`).
//!
//! Rank 0 hosts the [`StoreServer`] at `MASTER_ADDR:MASTER_PORT`; every rank connects
//! (retrying until the deadline: rank 0 may start later), publishes a record — its
//! `WORLD_SIZE` and a transport's payload (a data port, an NCCL id) — once under its rank,
//! and reads every other rank's, rank 0's first so that a `WORLD_SIZE` that differs is
//! learnt at once. Each failure is a [`CommError::Rendezvous`] naming the rank or setting at
//! fault.

use std::io;
use std::time::{Duration, Instant};

use super::ProcessGroup;
use super::store::{StoreClient, StoreServer};
use crate::error::CommError;

/// What a rank has once the world has met.
#[derive(Debug)]
pub struct Rendezvous {
    /// Rank 0's store (`None` on the other ranks): keep it for as long as the world lives.
    pub server: Option<StoreServer>,
    /// This rank's connection to the store.
    pub client: StoreClient,
    /// Every rank's payload, by rank (this rank's own included).
    pub payloads: Vec<Vec<u8>>,
    /// The deadline of the whole rendezvous, for what the transport does next.
    pub deadline: Instant,
}

/// The error of rank `group.rank` meeting at `group.master`.
pub fn rendezvous_error(group: &ProcessGroup, detail: String) -> CommError {
    CommError::Rendezvous { addr: group.master.to_string(), rank: group.rank, detail }
}

/// Meets the other ranks of `group` within `timeout` (see the [module docs](self)). Records
/// live under `scope` (one per transport); `payload` makes this rank's payload once it is
/// connected (it may use the connection, e.g. for the interface that reaches the store).
///
/// # Errors
/// [`CommError::Rendezvous`]: `RANK ≥ WORLD_SIZE`, the store's port in use (rank 0), no store
/// answering, a second process with this rank, a rank with another `WORLD_SIZE` (both
/// named), a rank that never arrives (named, with the ranks present); `payload`'s error.
pub fn rendezvous(
    group: &ProcessGroup,
    timeout: Duration,
    scope: &str,
    payload: impl FnOnce(&mut StoreClient) -> Result<Vec<u8>, CommError>,
) -> Result<Rendezvous, CommError> {
    let (rank, size) = (group.rank, group.world_size);
    if size == 0 || rank >= size {
        return Err(rendezvous_error(
            group,
            format!("RANK {rank} must be below WORLD_SIZE {size} (ranks are 0..WORLD_SIZE)"),
        ));
    }
    let deadline = Instant::now() + timeout;
    let secs = timeout.as_secs_f64();
    let server = if rank == 0 {
        Some(StoreServer::bind(group.master).map_err(|e| {
            rendezvous_error(
                group,
                format!(
                    "rank 0 cannot host the rendezvous store there: {e}{}",
                    if e.kind() == io::ErrorKind::AddrInUse {
                        " (another run is using MASTER_PORT: pick a free one)"
                    } else {
                        " (MASTER_ADDR must be an address of rank 0's machine)"
                    }
                ),
            )
        })?)
    } else {
        None
    };
    let mut client = StoreClient::connect(group.master, deadline).map_err(|e| {
        rendezvous_error(
            group,
            format!("no rendezvous store answered within {secs:.0} s: {e} (is rank 0 running?)"),
        )
    })?;
    let mine = payload(&mut client)?;
    let io_err =
        |e: io::Error| rendezvous_error(group, format!("the store connection failed: {e}"));
    let key = |r: usize| format!("{scope}/rank/{r}");
    let mut record = (size as u64).to_le_bytes().to_vec();
    record.extend_from_slice(&mine);
    if !client.set_once(&key(rank), &record).map_err(io_err)? {
        return Err(rendezvous_error(
            group,
            format!(
                "another process already joined as rank {rank} (two processes have RANK={rank})"
            ),
        ));
    }
    let mut payloads: Vec<Vec<u8>> = vec![Vec::new(); size];
    payloads[rank] = mine;
    for p in std::iter::once(0).chain(1..size).filter(|&p| p != rank) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(v) = client.get(&key(p), left).map_err(io_err)? else {
            let present: Vec<usize> = (0..size)
                .filter(|&q| {
                    q == rank || matches!(client.get(&key(q), Duration::ZERO), Ok(Some(_)))
                })
                .collect();
            return Err(rendezvous_error(
                group,
                format!(
                    "rank {p} never arrived within {secs:.0} s (WORLD_SIZE {size}; ranks present: \
                     {present:?})"
                ),
            ));
        };
        let Some((theirs, rest)) = v.split_first_chunk::<8>() else {
            return Err(rendezvous_error(group, format!("rank {p}'s record is malformed")));
        };
        let theirs = u64::from_le_bytes(*theirs);
        if theirs != size as u64 {
            return Err(rendezvous_error(
                group,
                format!("rank {p} has WORLD_SIZE {theirs} but rank {rank} has WORLD_SIZE {size}"),
            ));
        }
        payloads[p] = rest.to_vec();
    }
    Ok(Rendezvous { server, client, payloads, deadline })
}

//! The rendezvous of a multi-process NCCL world, the torchrun way: parallel-core's
//! [`rendezvous`] (rank 0 hosts the TCP store at `MASTER_ADDR:MASTER_PORT`, every rank
//! registers with its `WORLD_SIZE`, a rank that never arrives or arrives twice is named), with
//! rank 0's record carrying the NCCL unique id — so the ranks have met, and agree on the
//! world, before `ncclCommInitRank`, which itself waits without a deadline.
//!
//! No GPU is involved here, so it is tested on the CPU: a rank that never arrives, two
//! processes with one `RANK`, a `WORLD_SIZE` that differs, a port in use — each an error
//! naming the rank or setting at fault, within the deadline.

use std::time::Duration;

use parallel_core::comm::{StoreClient, StoreServer, rendezvous, rendezvous_error};
use parallel_core::{CommError, ProcessGroup};

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

/// What a rank has once the world has met.
#[derive(Debug)]
pub struct Met {
    /// The world's NCCL unique id (rank 0's).
    pub id: Vec<u8>,
    /// Rank 0's store, kept for as long as the world lives (aborts travel through it).
    pub server: Option<StoreServer>,
    /// This rank's connection to the store.
    pub client: StoreClient,
}

/// Meets the other ranks of `group` within `timeout`; rank 0 makes the id with `make_id`.
///
/// # Errors
/// [`rendezvous`]'s; `make_id`'s error; an id of the wrong size.
pub fn meet(
    group: &ProcessGroup,
    timeout: Duration,
    make_id: impl FnOnce() -> Result<Vec<u8>, String>,
) -> Result<Met, CommError> {
    let met = rendezvous(group, timeout, "nccl", |_| {
        if group.rank != 0 {
            return Ok(Vec::new());
        }
        make_id().map_err(|e| rendezvous_error(group, format!("cannot make the NCCL id: {e}")))
    })?;
    let id = met.payloads.into_iter().next().unwrap_or_default();
    if id.len() != ID_BYTES {
        return Err(rendezvous_error(
            group,
            format!("rank 0's NCCL id has {} bytes, not {ID_BYTES}", id.len()),
        ));
    }
    Ok(Met { id, server: met.server, client: met.client })
}

#[cfg(test)]
mod tests {
    use super::*;
    use parallel_core::comm::free_loopback_port;

    fn group(rank: usize, world_size: usize, master: std::net::SocketAddr) -> ProcessGroup {
        ProcessGroup { rank, world_size, master }
    }

    fn id() -> Result<Vec<u8>, String> {
        Ok((0..ID_BYTES as u8).collect())
    }

    #[test]
    fn every_rank_gets_rank_zeros_id() {
        let master = free_loopback_port().unwrap();
        let met: Vec<Met> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|r| s.spawn(move || meet(&group(r, 3, master), Duration::from_secs(10), id)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        });
        for m in &met {
            assert_eq!(m.id, id().unwrap());
        }
        assert!(met[0].server.is_some() && met[1].server.is_none());
    }

    #[test]
    fn a_rank_that_never_arrives_is_named() {
        let master = free_loopback_port().unwrap();
        let e = meet(&group(0, 2, master), Duration::from_millis(300), id).unwrap_err();
        assert!(e.to_string().contains("rank 1 never arrived"), "{e}");
        assert!(e.to_string().contains("ranks present: [0]"), "{e}");
    }

    #[test]
    fn a_different_world_size_and_a_duplicate_rank_are_refused() {
        let master = free_loopback_port().unwrap();
        let t = Duration::from_secs(3);
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(move || meet(&group(0, 2, master), t, id));
            std::thread::sleep(Duration::from_millis(50));
            let b = s.spawn(move || meet(&group(1, 3, master), t, id));
            (a.join().unwrap(), b.join().unwrap())
        });
        let b = b.unwrap_err().to_string();
        assert!(b.contains("rank 0 has WORLD_SIZE 2 but rank 1 has WORLD_SIZE 3"), "{b}");
        assert!(a.is_err(), "rank 0 must not meet a world that does not exist");

        let master = free_loopback_port().unwrap();
        std::thread::scope(|s| {
            let host = s.spawn(move || meet(&group(0, 3, master), Duration::from_secs(2), id));
            std::thread::sleep(Duration::from_millis(50));
            let first = s.spawn(move || meet(&group(1, 3, master), Duration::from_secs(2), id));
            std::thread::sleep(Duration::from_millis(50));
            let e = meet(&group(1, 3, master), Duration::from_secs(2), id).unwrap_err();
            assert!(e.to_string().contains("two processes have RANK=1"), "{e}");
            let _ = (host.join(), first.join());
        });
    }

    #[test]
    fn bad_ranks_and_a_port_in_use_are_clear_errors() {
        let master = free_loopback_port().unwrap();
        let e = meet(&group(2, 2, master), Duration::from_secs(1), id).unwrap_err();
        assert!(e.to_string().contains("RANK 2 must be below WORLD_SIZE 2"), "{e}");
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e =
            meet(&group(0, 2, busy.local_addr().unwrap()), Duration::from_secs(1), id).unwrap_err();
        assert!(e.to_string().contains("another run is using MASTER_PORT"), "{e}");
        let master = free_loopback_port().unwrap();
        let e = meet(&group(0, 1, master), Duration::from_secs(1), || Err("no GPU".into()))
            .unwrap_err();
        assert!(e.to_string().contains("cannot make the NCCL id: no GPU"), "{e}");
    }
}

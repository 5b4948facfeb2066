//! The rendezvous of a multi-process NCCL world, the torchrun way: rank 0 hosts the TCP store
//! at `MASTER_ADDR:MASTER_PORT` (parallel-core's [`StoreServer`]), every rank registers with
//! its `WORLD_SIZE`, rank 0 publishes the NCCL unique id, and a store barrier (with the ranks
//! checked) comes before `ncclCommInitRank`, which itself waits without a deadline.
//!
//! No GPU is involved here, so it is tested on the CPU: a rank that never arrives, two
//! processes with one `RANK`, a `WORLD_SIZE` that differs, a port in use — each an error
//! naming the rank or setting at fault, within the deadline.

use std::io;
use std::time::{Duration, Instant};

use parallel_core::comm::{StoreClient, StoreServer};
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

fn fail(group: &ProcessGroup, detail: String) -> CommError {
    CommError::Rendezvous { addr: group.master.to_string(), rank: group.rank, detail }
}

/// Meets the other ranks of `group` within `timeout`; rank 0 makes the id with `make_id`.
///
/// # Errors
/// [`CommError::Rendezvous`]: `RANK ≥ WORLD_SIZE`, the store's port in use (rank 0), no store
/// answering, a second process with this rank, a rank with another `WORLD_SIZE` (both
/// named), a rank that never arrives (named, with the ranks present), an id of the wrong
/// size; `make_id`'s error.
pub fn meet(
    group: &ProcessGroup,
    timeout: Duration,
    make_id: impl FnOnce() -> Result<Vec<u8>, String>,
) -> Result<Met, CommError> {
    let (rank, size) = (group.rank, group.world_size);
    if size == 0 || rank >= size {
        return Err(fail(
            group,
            format!("RANK {rank} must be below WORLD_SIZE {size} (ranks are 0..WORLD_SIZE)"),
        ));
    }
    let deadline = Instant::now() + timeout;
    let secs = timeout.as_secs_f64();
    let server = if rank == 0 {
        Some(StoreServer::bind(group.master).map_err(|e| {
            fail(
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
        fail(
            group,
            format!("no rendezvous store answered within {secs:.0} s: {e} (is rank 0 running?)"),
        )
    })?;
    let io_err = |e: io::Error| fail(group, format!("the store connection failed: {e}"));
    if !client
        .set_once(&format!("nccl/rank/{rank}"), size.to_string().as_bytes())
        .map_err(io_err)?
    {
        return Err(fail(
            group,
            format!(
                "another process already joined as rank {rank} (two processes have RANK={rank})"
            ),
        ));
    }
    if rank == 0 {
        let id = make_id().map_err(|e| fail(group, format!("cannot make the NCCL id: {e}")))?;
        client.set_once("nccl/id", &id).map_err(io_err)?;
    }
    // Every rank's record, rank 0's first: a wrong WORLD_SIZE is learnt at once.
    for p in std::iter::once(0).chain(1..size).filter(|&p| p != rank) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(v) = client.get(&format!("nccl/rank/{p}"), left).map_err(io_err)? else {
            let present: Vec<usize> = (0..size)
                .filter(|&q| {
                    q == rank
                        || matches!(
                            client.get(&format!("nccl/rank/{q}"), Duration::ZERO),
                            Ok(Some(_))
                        )
                })
                .collect();
            return Err(fail(
                group,
                format!(
                    "rank {p} never arrived within {secs:.0} s (WORLD_SIZE {size}; ranks present: \
                     {present:?})"
                ),
            ));
        };
        let theirs = String::from_utf8_lossy(&v).into_owned();
        if theirs != size.to_string() {
            return Err(fail(
                group,
                format!("rank {p} has WORLD_SIZE {theirs} but rank {rank} has WORLD_SIZE {size}"),
            ));
        }
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let id = client
        .get("nccl/id", left)
        .map_err(io_err)?
        .ok_or_else(|| fail(group, "rank 0 never published the NCCL id".into()))?;
    if id.len() != ID_BYTES {
        return Err(fail(group, format!("the NCCL id has {} bytes, not {ID_BYTES}", id.len())));
    }
    Ok(Met { id, server, client })
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

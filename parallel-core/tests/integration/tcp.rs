//! The TCP transport (`TcpComm`, one rank per process; here N threads each joined over
//! loopback exactly as processes are) against `LocalComm`: the same program gives the same
//! bits and the same counted bytes on both, for world sizes 1–4 and every operation; and its
//! failures — a rank that errors, panics, leaves, vanishes (connection lost), never arrives
//! at the rendezvous, or disagrees about the world size — end every other rank's waits with
//! an error naming it, well within the timeout.

use std::time::{Duration, Instant};

use burn::tensor::{Tensor, TensorData};
use burn_flex::Flex;
use parallel_core::comm::{ProcessGroup, free_loopback_port, join};
use parallel_core::{
    Axis, Comm, CommError, CommStats, LaunchOptions, Mesh, OpKind, ParallelError, Tag, launch,
    launch_loopback,
};

type B = Flex;

/// Every wait's timeout. Failures below reach the other ranks in milliseconds (a socket
/// close or an abort frame wakes the waiting thread); the assertions bound them by
/// `TIMEOUT / 2`, which catches a wait that sat out the timeout instead of being woken while
/// leaving seconds for a loaded 2-core machine.
const TIMEOUT: Duration = Duration::from_secs(6);

fn opts() -> LaunchOptions<B> {
    LaunchOptions::default().with_timeout(TIMEOUT)
}

/// Non-integer values, so that a different summation order would change the bits.
fn values(rank: usize, salt: usize, shape: &[usize]) -> Tensor<B, 3> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let x = (rank * 7919 + salt * 104_729 + i * 31) as f32;
            (x * 0.618_034).sin() * 1.0e3 + (x * 0.1).cos() * 1.0e-3
        })
        .collect();
    Tensor::from_data(TensorData::new(v, [shape[0], shape[1], shape[2]]), &Default::default())
}

fn bits(t: Tensor<B, 3>) -> (Vec<usize>, Vec<u32>) {
    let dims = t.dims().to_vec();
    (dims, t.into_data().to_vec::<f32>().unwrap().iter().map(|x| x.to_bits()).collect())
}

type Outcome = (Vec<(Vec<usize>, Vec<u32>)>, CommStats);

/// One program using every operation; what it computed and what the transport counted.
fn program(comm: Comm<B>) -> Result<Outcome, ParallelError> {
    let (r, n) = (comm.rank(), comm.size());
    let mut out = Vec::new();
    // All-gather with uneven sizes along every dim.
    for dim in 0..3 {
        let mut shape = [2, 3, 4];
        shape[dim] += r;
        out.push(bits(comm.all_gather(values(r, dim, &shape), dim)?));
    }
    // All-to-all with uneven chunk sizes, and the equal-split form.
    let sizes: Vec<usize> = (0..n).map(|j| j + 1).collect();
    let total: usize = sizes.iter().sum();
    out.push(bits(comm.all_to_all_sizes(values(r, 9, &[2, total, 3]), 1, &sizes, 2)?));
    out.push(bits(comm.all_to_all(values(r, 10, &[2 * n, 3, 2]), 0, 1)?));
    // All-reduce: sizes below, at and above the ring's chunk count.
    for shape in [[1, 1, 1], [1, 1, 3], [2, 3, 5], [4, 16, 9]] {
        out.push(bits(comm.all_reduce_sum(values(r, 11, &shape))?));
    }
    for root in 0..n {
        out.push(bits(comm.broadcast(values(r, 12 + root, &[2, 2, 2]), root)?));
    }
    // Ring exchange as one group, then an asynchronous all-gather overlapping a receive.
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    let mut block = values(r, 20, &[1, 2, 3]);
    for round in 0..n {
        let tag = |origin: usize| Tag::new("kv").step(round as u32).patch(origin as u32);
        let origin = (r + n - round) % n;
        block = comm.send_recv(block, next, tag(origin), prev, tag((origin + n - 1) % n))?;
        out.push(bits(block.clone()));
    }
    let pending = comm.all_gather_async(values(r, 21, &[1, 2, 2]), 1)?;
    if n > 1 {
        let (send, recv) = comm.send_recv_async(
            values(r, 22, &[1, 1, 4]),
            next,
            Tag::new("async").layer(r as u32),
            prev,
            Tag::new("async").layer(prev as u32),
        )?;
        send.wait()?;
        out.push(bits(recv.wait()?));
    }
    out.push(bits(pending.wait()?));
    // Sub-groups of a 2-D mesh, each a stream of its own.
    if n == 4 {
        let mesh = Mesh::new(4, &[(Axis::Ulysses, 2), (Axis::Ring, 2)])?;
        let a = comm.split(&mesh, &[Axis::Ulysses])?;
        let b = comm.split(&mesh, &[Axis::Ring])?;
        let ha = a.all_reduce_sum_async(values(r, 30, &[3, 1, 1]))?;
        out.push(bits(b.all_gather(values(r, 31, &[1, 1, 2]), 2)?));
        out.push(bits(ha.wait()?));
    }
    comm.barrier()?;
    Ok((out, comm.stats()))
}

fn counted(s: &CommStats) -> Vec<(OpKind, u64, u64, u64)> {
    s.iter().map(|(k, o)| (k, o.calls, o.elements, o.bytes)).collect()
}

#[test]
fn every_operation_gives_local_comms_bits_and_counts() {
    for n in 1..=4 {
        let local: Vec<Outcome> =
            launch(n, &opts(), program).into_iter().map(|r| r.expect("local rank")).collect();
        let tcp: Vec<Outcome> = launch_loopback(n, &opts(), program)
            .into_iter()
            .map(|r| r.expect("tcp rank"))
            .collect();
        for r in 0..n {
            assert_eq!(local[r].0.len(), tcp[r].0.len());
            for (i, (a, b)) in local[r].0.iter().zip(&tcp[r].0).enumerate() {
                assert_eq!(a.0, b.0, "n={n} rank {r} result {i}: shapes");
                assert!(a.1 == b.1, "n={n} rank {r} result {i}: the bits differ");
            }
            assert_eq!(counted(&local[r].1), counted(&tcp[r].1), "n={n} rank {r}: counts");
            assert_eq!(local[r].1.links(), tcp[r].1.links(), "n={n} rank {r}: bytes per link");
        }
    }
}

fn ones() -> Tensor<B, 1> {
    Tensor::ones([4], &Default::default())
}

fn comm_error(r: &Result<(), ParallelError>) -> &CommError {
    match r {
        Err(ParallelError::Comm(e)) => e,
        other => panic!("expected a communicator error, got {other:?}"),
    }
}

#[test]
fn two_ranks_that_send_before_they_receive_time_out_as_they_would_hang_on_nccl() {
    let short = LaunchOptions::default().with_timeout(Duration::from_millis(800));
    let results = launch_loopback(2, &short, |comm| {
        let peer = 1 - comm.rank();
        comm.send(ones(), peer, Tag::new("x"))?;
        let _t: Tensor<B, 1> = comm.recv(peer, Tag::new("x"))?;
        Ok(())
    });
    for (r, res) in results.iter().enumerate() {
        match comm_error(res) {
            CommError::Timeout { missing, op, blocked, .. } => {
                assert_eq!(missing, &vec![1 - r]);
                assert!(op.contains("send"), "{op}");
                assert!(blocked.contains("receive was not posted"), "{blocked}");
            }
            // The first to time out aborts; the other may see that first.
            CommError::PeerFailed { reason, .. } => {
                assert!(reason.contains("timed out"), "{reason}")
            }
            other => panic!("rank {r}: {other}"),
        }
    }
}

#[test]
fn an_error_or_a_panic_on_one_rank_ends_every_other_wait_at_once() {
    for panics in [false, true] {
        let start = Instant::now();
        let results = launch_loopback(3, &opts(), |comm| {
            if comm.rank() == 1 {
                std::thread::sleep(Duration::from_millis(100));
                if panics {
                    panic!("boom");
                }
                return Err(ParallelError::Model("bad weights".into()));
            }
            comm.all_reduce_sum(ones())?;
            Ok(())
        });
        println!("rank 1 failed (panic: {panics}); all returned after {:?}", start.elapsed());
        assert!(start.elapsed() < TIMEOUT / 2);
        for r in [0, 2] {
            match comm_error(&results[r]) {
                CommError::PeerFailed { failed_rank, reason, .. } => {
                    assert_eq!(*failed_rank, 1);
                    let want = if panics { "boom" } else { "bad weights" };
                    assert!(reason.contains(want), "{reason}");
                }
                other => panic!("rank {r}: {other}"),
            }
        }
    }
}

#[test]
fn a_rank_that_left_cannot_be_waited_for() {
    let results = launch_loopback(2, &opts(), |comm| {
        if comm.rank() == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
        comm.barrier()?;
        Ok(())
    });
    assert!(results[0].is_ok());
    match comm_error(&results[1]) {
        CommError::PeerLeft { peer, op, .. } => {
            assert!(*peer == 0 && op.contains("barrier"), "{op}")
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_rank_whose_connections_drop_without_a_goodbye_is_named_as_lost() {
    let master = free_loopback_port().unwrap();
    let start = Instant::now();
    let results: Vec<Result<(), CommError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                s.spawn(move || {
                    let group = ProcessGroup { rank, world_size: 2, master };
                    let (comm, world) = join::<B>(&group, &opts())?;
                    if rank == 1 {
                        // A crash: the connections close with no abort and no goodbye.
                        std::thread::sleep(Duration::from_millis(100));
                        drop(world);
                        return Ok(());
                    }
                    let r = comm.all_gather(ones(), 0).map(|_| ());
                    world.finish();
                    r
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(start.elapsed() < TIMEOUT / 2, "{:?}", start.elapsed());
    match &results[0] {
        Err(CommError::PeerFailed { failed_rank: 1, reason, .. }) => {
            assert!(reason.contains("connection lost"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn mismatched_collectives_and_wrong_tags_are_named() {
    let results = launch_loopback(2, &opts(), |comm| {
        if comm.rank() == 0 {
            comm.all_gather(ones(), 0)?;
        } else {
            comm.all_reduce_sum(ones())?;
        }
        Ok(())
    });
    let direct: Vec<String> = results
        .iter()
        .filter_map(|r| match r {
            Err(ParallelError::Comm(e @ CommError::Mismatch { .. })) => Some(e.to_string()),
            _ => None,
        })
        .collect();
    assert!(!direct.is_empty(), "{results:?}");
    assert!(direct[0].contains("all_gather") && direct[0].contains("all_reduce"), "{}", direct[0]);

    let results = launch_loopback(2, &opts(), |comm| {
        if comm.rank() == 0 {
            comm.send(ones(), 1, Tag::new("activations").step(3).patch(1))?;
        } else {
            let _t: Tensor<B, 1> = comm.recv(0, Tag::new("activations").step(3).patch(2))?;
        }
        Ok(())
    });
    let msg = results[1].as_ref().unwrap_err().to_string();
    assert!(msg.contains("activations(step=3, patch=2, layer=0)"), "{msg}");
    assert!(msg.contains("activations(step=3, patch=1, layer=0)"), "{msg}");
}

#[test]
fn a_dropped_handle_poisons_the_next_call() {
    let results = launch_loopback(2, &opts(), |comm| {
        let h = comm.all_reduce_sum_async(ones())?;
        drop(h);
        comm.barrier()?;
        Ok(())
    });
    for r in &results {
        match comm_error(r) {
            CommError::Abandoned { op, .. } => assert!(op.contains("all_reduce"), "{op}"),
            // The other rank may have failed first.
            CommError::PeerFailed { .. } => {}
            other => panic!("{other}"),
        }
    }
}

fn join_all(
    worlds: &[usize],
    master: std::net::SocketAddr,
    timeout: Duration,
) -> Vec<Result<(), CommError>> {
    let options = LaunchOptions::<B>::default().with_timeout(timeout);
    std::thread::scope(|s| {
        let handles: Vec<_> = worlds
            .iter()
            .enumerate()
            .map(|(rank, &world_size)| {
                let options = &options;
                s.spawn(move || {
                    let group = ProcessGroup { rank, world_size, master };
                    join::<B>(&group, options).map(|(comm, world)| {
                        drop(comm);
                        world.finish();
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn the_rendezvous_names_a_rank_that_never_arrives() {
    let master = free_loopback_port().unwrap();
    let start = Instant::now();
    let r = join_all(&[2], master, Duration::from_millis(700));
    let e = r[0].as_ref().unwrap_err().to_string();
    assert!(e.contains("rank 1 never arrived"), "{e}");
    assert!(e.contains("ranks present: [0]"), "{e}");
    assert!(e.contains(&master.to_string()), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn the_rendezvous_refuses_a_world_size_that_differs() {
    let master = free_loopback_port().unwrap();
    let r = join_all(&[2, 3], master, Duration::from_secs(3));
    let e = r[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("rank 0 has WORLD_SIZE 2 but rank 1 has WORLD_SIZE 3"), "{e}");
    assert!(r[0].is_err(), "rank 0 cannot complete its world either");
}

#[test]
fn the_rendezvous_refuses_a_rank_beyond_the_world_and_a_port_in_use() {
    let master = free_loopback_port().unwrap();
    let options = LaunchOptions::<B>::default().with_timeout(Duration::from_secs(2));
    let e = join::<B>(&ProcessGroup { rank: 2, world_size: 2, master }, &options).unwrap_err();
    assert!(e.to_string().contains("RANK 2 must be below WORLD_SIZE 2"), "{e}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let e =
        join::<B>(&ProcessGroup { rank: 0, world_size: 2, master: busy }, &options).unwrap_err();
    assert!(e.to_string().contains("another run is using MASTER_PORT"), "{e}");
}

#[test]
fn two_processes_with_the_same_rank_are_refused() {
    let master = free_loopback_port().unwrap();
    let options = LaunchOptions::<B>::default().with_timeout(Duration::from_secs(2));
    let results: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = [0, 1, 1]
            .into_iter()
            .enumerate()
            .map(|(i, rank)| {
                let options = &options;
                s.spawn(move || {
                    // The duplicate starts a little later, so that it is the second writer.
                    std::thread::sleep(Duration::from_millis(200 * i as u64));
                    match join::<B>(&ProcessGroup { rank, world_size: 2, master }, options) {
                        Ok((_, world)) => {
                            // Rank 0's store stays up while the duplicate tries to join.
                            std::thread::sleep(Duration::from_millis(800));
                            world.finish();
                            String::new()
                        }
                        Err(e) => e.to_string(),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results[2].contains("another process already joined as rank 1"), "{results:?}");
}

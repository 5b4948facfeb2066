//! NCCL's rules as `LocalComm` enforces them (see `parallel_core::comm`), what the transport
//! counts, and the link model — checked by ordering and a logical clock, never by wall-time
//! thresholds.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use burn::tensor::Tensor;
use burn_flex::Flex;
use parallel_core::{
    Clock, CommError, LaunchOptions, Link, LinkModel, ManualClock, OpKind, ParallelError, Tag,
    launch,
};

type B = Flex;

fn ones(n: usize) -> Tensor<B, 1> {
    Tensor::ones([n], &Default::default())
}

fn short() -> LaunchOptions<B> {
    LaunchOptions::default().with_timeout(Duration::from_millis(400))
}

fn comm_err(r: &Result<(), ParallelError>) -> &CommError {
    match r {
        Err(ParallelError::Comm(e)) => e,
        other => panic!("expected a communication error, got {other:?}"),
    }
}

#[test]
fn an_unpaired_blocking_send_times_out_naming_the_operation_peer_and_tag() {
    let results = launch(2, &short(), |comm| {
        if comm.rank() == 0 {
            comm.send(ones(4), 1, Tag::new("latent_patch").step(3).patch(1))?;
        } else {
            // Never posts the receive; waits elsewhere, starting late enough that rank 0's
            // timeout comes first.
            std::thread::sleep(Duration::from_millis(150));
            comm.barrier()?;
        }
        Ok(())
    });
    let e = comm_err(&results[0]);
    let msg = e.to_string();
    assert!(matches!(e, CommError::Timeout { missing, .. } if missing == &vec![1]), "{msg}");
    assert!(msg.contains("send latent_patch(step=3, patch=1, layer=0) to rank 1"), "{msg}");
    assert!(msg.contains("rank 1 is at: barrier"), "{msg}");
}

#[test]
fn ranks_that_send_then_receive_deadlock_unless_the_pair_is_grouped() {
    // Ungrouped: each rank's send waits for the other's receive, which sits behind that
    // rank's own send in its stream — NCCL hangs here; LocalComm times out.
    let results = launch(2, &short(), |comm| {
        let other = 1 - comm.rank();
        let send = comm.send_async(ones(8), other, Tag::new("kv"))?;
        let got: Tensor<B, 1> = comm.recv(other, Tag::new("kv"))?;
        send.wait()?;
        assert_eq!(got.dims(), [8]);
        Ok(())
    });
    for r in &results {
        let msg = comm_err(r).to_string();
        assert!(msg.contains("timed out") || msg.contains("failed"), "{msg}");
    }
    assert!(results.iter().any(|r| {
        let msg = comm_err(r).to_string();
        msg.contains("recv kv") && msg.contains("earlier operation is not done: send kv")
    }));
    // Grouped: the same exchange completes.
    let results = launch(2, &short(), |comm| {
        let other = 1 - comm.rank();
        let got: Tensor<B, 1> =
            comm.send_recv(ones(8), other, Tag::new("kv"), other, Tag::new("kv"))?;
        assert_eq!(got.dims(), [8]);
        Ok(())
    });
    assert!(results.iter().all(Result::is_ok), "{results:?}");
}

#[test]
fn a_split_is_a_stream_of_its_own() {
    // A send pending on one communicator does not hold up a receive on another.
    let results = launch(2, &short(), |comm| {
        let other = 1 - comm.rank();
        let data = comm.split_members(&[0, 1])?;
        let back = comm.split_members(&[0, 1])?;
        if comm.rank() == 0 {
            let send = data.send_async(ones(3), other, Tag::new("activations"))?;
            let _: Tensor<B, 1> = back.recv(other, Tag::new("latent"))?;
            send.wait()?;
        } else {
            let send = back.send_async(ones(2), other, Tag::new("latent"))?;
            let _: Tensor<B, 1> = data.recv(other, Tag::new("activations"))?;
            send.wait()?;
        }
        Ok(())
    });
    assert!(results.iter().all(Result::is_ok), "{results:?}");
}

#[test]
fn dropping_an_unwaited_handle_fails_the_next_call_naming_it() {
    let results = launch(2, &short(), |comm| {
        let pending = comm.all_gather_async(ones(2), 0)?;
        if comm.rank() == 0 {
            drop(pending);
        } else {
            pending.wait()?;
        }
        comm.barrier()?;
        Ok(())
    });
    let msg = comm_err(&results[0]).to_string();
    assert!(
        matches!(comm_err(&results[0]), CommError::Abandoned { .. }) && msg.contains("all_gather"),
        "{msg}"
    );
    assert!(results[1].is_err(), "rank 1's barrier cannot complete");
}

#[test]
fn counts_per_link_equal_the_bytes_handed_in() {
    let results = launch(3, &LaunchOptions::default(), |comm| {
        let r = comm.rank();
        // Blocks of 2, 3 and 4 elements: rank r's block reaches each other rank once.
        comm.all_gather(ones(2 + r), 0)?;
        comm.all_reduce_sum(ones(7))?;
        match r {
            0 => {
                comm.send(ones(10), 1, Tag::new("a"))?;
                comm.send(ones(20), 2, Tag::new("b"))?;
            }
            1 => drop(comm.recv::<1>(0, Tag::new("a"))?),
            _ => drop(comm.recv::<1>(0, Tag::new("b"))?),
        }
        Ok(comm.stats())
    });
    let stats: Vec<_> = results.into_iter().map(Result::unwrap).collect();
    // Ring all-reduce of 7 elements over 3: chunks 3, 2, 2; rank r sends all but chunks
    // (r+1) and (r+2) once in each phase, all of it to rank r+1.
    let chunks = [3u64, 2, 2];
    for (r, s) in stats.iter().enumerate() {
        let gather = (2 + r) as u64;
        let reduce = 2 * 7 - chunks[(r + 1) % 3] - chunks[(r + 2) % 3];
        let mut want = std::collections::BTreeMap::new();
        for j in (0..3).filter(|&j| j != r) {
            *want.entry(j).or_insert(0) += gather * 4;
        }
        *want.entry((r + 1) % 3).or_insert(0) += reduce * 4;
        if r == 0 {
            *want.entry(1).or_insert(0) += 40;
            *want.entry(2).or_insert(0) += 80;
        }
        assert_eq!(s.links(), &want, "rank {r}");
        assert_eq!(s.get(OpKind::AllGather).elements, gather * 2, "rank {r}");
        assert_eq!(s.get(OpKind::AllReduce).elements, reduce, "rank {r}");
        assert_eq!(s.total_bytes(), want.values().sum::<u64>(), "rank {r}");
    }
}

/// A world on a manual clock whose every link moves 1 MB/s after 1 ms.
fn slow_world(clock: &Arc<ManualClock>) -> LaunchOptions<B> {
    let link = Link { bandwidth: 1e6, latency: Duration::from_millis(1) };
    LaunchOptions::default()
        .with_timeout(Duration::from_secs(20))
        .with_link(LinkModel::uniform("test", link))
        .with_clock(clock.clone())
}

#[test]
fn a_transfer_is_not_observable_before_its_modelled_completion() {
    let clock = Arc::new(ManualClock::new());
    let sync = Barrier::new(2);
    // 1000 f32 = 4000 B: 1 ms + 4 ms = 5 ms.
    let results = launch(2, &slow_world(&clock), |comm| {
        let step = |f: &dyn Fn()| {
            sync.wait();
            f();
            sync.wait();
        };
        if comm.rank() == 0 {
            let send = comm.send_async(ones(1000), 1, Tag::new("x"))?;
            step(&|| {});
            step(&|| clock.advance(Duration::from_micros(4_900)));
            step(&|| clock.advance(Duration::from_micros(200)));
            send.wait()?;
        } else {
            let recv = comm.recv_async::<1>(0, Tag::new("x"))?;
            step(&|| assert!(!recv.is_ready(), "observable at t = 0"));
            step(&|| {});
            step(&|| {});
            // The order of the two rank threads inside a step is free; check after both.
            assert!(clock.now() >= Duration::from_micros(5_100));
            assert!(recv.is_ready(), "not done after its modelled 5 ms");
            assert_eq!(recv.wait()?.dims(), [1000]);
        }
        Ok(())
    });
    assert!(results.iter().all(Result::is_ok), "{results:?}");
}

#[test]
fn transfers_on_one_link_queue_and_async_ones_run_while_the_rank_computes() {
    let clock = Arc::new(ManualClock::new());
    let sync = Barrier::new(2);
    let results = launch(2, &slow_world(&clock), |comm| {
        // Two communicators, one link 0 → 1: the second transfer waits for the first.
        let a = comm.split_members(&[0, 1])?;
        let b = comm.split_members(&[0, 1])?;
        if comm.rank() == 0 {
            let s1 = a.send_async(ones(1000), 1, Tag::new("first"))?; // 5 ms
            let s2 = b.send_async(ones(1000), 1, Tag::new("second"))?; // then 5 ms more
            sync.wait();
            // "Computing" for 6 ms of modelled time.
            clock.advance(Duration::from_millis(6));
            sync.wait();
            sync.wait();
            clock.advance(Duration::from_millis(5));
            sync.wait();
            s1.wait()?;
            s2.wait()?;
        } else {
            let r1 = a.recv_async::<1>(0, Tag::new("first"))?;
            let r2 = b.recv_async::<1>(0, Tag::new("second"))?;
            sync.wait();
            sync.wait();
            assert!(r1.is_ready(), "the first finished during the 6 ms of computing");
            assert!(
                !r2.is_ready(),
                "the second queues behind the first on the link: done at 10 ms"
            );
            sync.wait();
            sync.wait();
            assert!(r2.is_ready());
            r1.wait()?;
            r2.wait()?;
        }
        Ok(comm.stats())
    });
    let stats: Vec<_> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(stats[0].links().get(&1), Some(&8000));
}

//! Every collective of `LocalComm` against a plain reference computed on one thread, for
//! world sizes 1–4, several tensor ranks and dims, uneven sizes where the operation allows
//! them, and sub-groups; and what the transport counts, per kind and per link, exactly, in
//! every case.

use std::time::Duration;

use burn::tensor::{Tensor, TensorData};
use burn_flex::Flex;
use parallel_core::{
    Axis, Comm, CommStats, LaunchOptions, Mesh, OpKind, ParallelError, Tag,
    comm::all_reduce_elements, launch,
};

type B = Flex;

fn opts() -> LaunchOptions<B> {
    LaunchOptions::default().with_timeout(Duration::from_secs(20))
}

/// A tensor whose every element says which rank made it and where: `rank·1000 + index`.
fn rank_tensor<const D: usize>(rank: usize, shape: [usize; D]) -> Tensor<B, D> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|i| (rank * 1000 + i) as f32).collect();
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

fn assert_same<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) {
    assert_eq!(a.dims(), b.dims());
    // Integers below 2^24 and sums of a few of them: exact in f32.
    assert_eq!(a.into_data().to_vec::<f32>().unwrap(), b.into_data().to_vec::<f32>().unwrap());
}

fn run<T: Send>(n: usize, f: impl Fn(Comm<B>) -> Result<T, ParallelError> + Sync) -> Vec<T> {
    launch(n, &opts(), f).into_iter().map(|r| r.expect("rank failed")).collect()
}

/// Shape of rank `r`'s block: `base` with dim `dim` made uneven (`base[dim] + r`).
fn uneven<const D: usize>(base: [usize; D], dim: usize, r: usize) -> [usize; D] {
    let mut s = base;
    s[dim] += r;
    s
}

#[test]
fn all_gather_equals_concatenation_in_rank_order() {
    for n in 1..=4 {
        for dim in 0..3 {
            for even in [true, false] {
                let shape = |r: usize| if even { [2, 3, 4] } else { uneven([2, 3, 4], dim, r) };
                let stats = run(n, |comm| {
                    let r = comm.rank();
                    let got = comm.all_gather(rank_tensor(r, shape(r)), dim)?;
                    let want = Tensor::cat((0..n).map(|j| rank_tensor(j, shape(j))).collect(), dim);
                    assert_same(got, want);
                    Ok(comm.stats())
                });
                for (r, s) in stats.iter().enumerate() {
                    let local = shape(r).iter().product::<usize>() as u64;
                    assert_eq!(s.get(OpKind::AllGather).elements, local * (n as u64 - 1));
                    assert_eq!(s.get(OpKind::AllGather).bytes, 4 * local * (n as u64 - 1));
                    assert_eq!(s.get(OpKind::AllGather).calls, 1);
                }
            }
        }
    }
}

#[test]
fn all_gather_of_2d_and_4d_tensors() {
    for n in [2, 3] {
        run(n, |comm| {
            let r = comm.rank();
            let got = comm.all_gather(rank_tensor(r, [3, 2]), 1)?;
            assert_same(got, Tensor::cat((0..n).map(|j| rank_tensor(j, [3, 2])).collect(), 1));
            let got = comm.all_gather(rank_tensor(r, [1, 2, 2, 3]), 3)?;
            let want = Tensor::cat((0..n).map(|j| rank_tensor(j, [1, 2, 2, 3])).collect(), 3);
            assert_same(got, want);
            Ok(())
        });
    }
}

#[test]
fn all_to_all_scatters_heads_and_gathers_tokens() {
    // The Ulysses pattern: [batch, heads, tokens, dim], scatter heads, gather tokens; tokens
    // may differ between ranks (uneven sequence split).
    for n in 1..=4 {
        for even in [true, false] {
            let tokens = |r: usize| if even { 3 } else { 2 + r };
            let stats = run(n, |comm| {
                let r = comm.rank();
                let heads = 2 * n;
                let got = comm.all_to_all(rank_tensor(r, [2, heads, tokens(r), 5]), 1, 2)?;
                let want = Tensor::cat(
                    (0..n)
                        .map(|j| rank_tensor(j, [2, heads, tokens(j), 5]).narrow(1, r * 2, 2))
                        .collect(),
                    2,
                );
                assert_same(got.clone(), want);
                // And back: scatter tokens (now the full sequence) is not even in general,
                // so invert with the gather dim as heads on an even split.
                Ok(comm.stats())
            });
            for (r, s) in stats.iter().enumerate() {
                let local = (2 * 2 * n * tokens(r) * 5) as u64;
                assert_eq!(s.get(OpKind::AllToAll).elements, local * (n as u64 - 1) / n as u64);
            }
        }
    }
}

#[test]
fn all_to_all_round_trip_is_identity() {
    for n in [2, 4] {
        run(n, |comm| {
            let r = comm.rank();
            let x = rank_tensor(r, [1, 8, 6, 3]);
            let y = comm.all_to_all(x.clone(), 1, 2)?; // [1, 8/n, 6n, 3]
            let back = comm.all_to_all(y, 2, 1)?;
            assert_same(back, x);
            Ok(())
        });
    }
}

#[test]
fn all_to_all_rejects_indivisible_scatter_dim() {
    let results = launch(2, &opts(), |comm| {
        comm.all_to_all(rank_tensor(comm.rank(), [3, 2]), 0, 1)
            .map(|_| ())
            .map_err(ParallelError::from)
    });
    for r in results {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("divisible by the group size 2"), "{e}");
    }
}

#[test]
fn all_reduce_sums_in_rank_order_and_counts_a_ring() {
    for n in 1..=4 {
        for shape in [[5, 1, 1], [2, 3, 4], [1, 7, 3]] {
            let stats = run(n, |comm| {
                let got = comm.all_reduce_sum(rank_tensor(comm.rank(), shape))?;
                let want = (1..n).fold(rank_tensor(0, shape), |acc, j| acc + rank_tensor(j, shape));
                assert_same(got, want);
                Ok(comm.stats())
            });
            let size = shape.iter().product::<usize>() as u64;
            for (r, s) in stats.iter().enumerate() {
                assert_eq!(
                    s.get(OpKind::AllReduce).elements,
                    all_reduce_elements(size, r as u64, n as u64)
                );
                if size.is_multiple_of(n as u64) {
                    assert_eq!(
                        s.get(OpKind::AllReduce).elements,
                        2 * size * (n as u64 - 1) / n as u64
                    );
                }
            }
        }
    }
}

#[test]
fn broadcast_from_every_root() {
    for n in 1..=4 {
        for root in 0..n {
            let stats = run(n, |comm| {
                let got = comm.broadcast(rank_tensor(comm.rank(), [2, 3]), root)?;
                assert_same(got, rank_tensor(root, [2, 3]));
                Ok(comm.stats())
            });
            for (r, s) in stats.iter().enumerate() {
                let want = if r == root { 6 * (n as u64 - 1) } else { 0 };
                assert_eq!(s.get(OpKind::Broadcast).elements, want);
            }
        }
    }
}

#[test]
fn send_recv_pass_tensors_around_the_ring_without_deadlock() {
    for n in 1..=4 {
        let stats = run(n, |comm| {
            let r = comm.rank();
            let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
            let mut block = rank_tensor(r, [2, 4]);
            // Every rank sends first and receives second: buffered sends make it safe.
            for round in 0..(2 * n) {
                let tag = |src: usize| Tag::new("kv").step(round as u32).patch(src as u32);
                let origin = (r + n - round % n) % n;
                let from = (origin + n - 1) % n;
                block = comm.send_recv(block, next, tag(origin), prev, tag(from))?;
                assert_same(block.clone(), rank_tensor(from, [2, 4]));
            }
            Ok(comm.stats())
        });
        for s in stats {
            assert_eq!(s.get(OpKind::Send).elements, 8 * 2 * n as u64);
            assert_eq!(s.get(OpKind::Send).calls, 2 * n as u64);
            assert_eq!(s.get(OpKind::Recv).calls, 2 * n as u64);
            assert_eq!(s.get(OpKind::Recv).elements, 0);
        }
    }
}

#[test]
fn point_to_point_keeps_order_per_pair() {
    run(3, |comm| {
        if comm.rank() == 0 {
            for i in 0..5 {
                comm.send(rank_tensor(i, [1, 2]), 2, Tag::new("a").step(i as u32))?;
            }
        }
        if comm.rank() == 2 {
            for i in 0..5 {
                let t: Tensor<B, 2> = comm.recv(0, Tag::new("a").step(i as u32))?;
                assert_same(t, rank_tensor(i, [1, 2]));
            }
        }
        comm.barrier().map_err(ParallelError::from)
    });
}

#[test]
fn async_all_gather_completes_after_other_work() {
    for n in [1, 2, 4] {
        run(n, |comm| {
            let r = comm.rank();
            let pending = comm.all_gather_async(rank_tensor(r, [2, 2]), 0)?;
            // Interleave another collective on the same group while the gather is pending.
            let sum = comm.all_reduce_sum(rank_tensor(r, [1, 1]))?;
            let want: f32 = (0..n).map(|j| (j * 1000) as f32).sum();
            assert_eq!(sum.into_data().to_vec::<f32>().unwrap(), vec![want]);
            assert!(pending.is_ready(), "every rank joined the gather before the reduce");
            let got = pending.wait()?;
            assert_same(got, Tensor::cat((0..n).map(|j| rank_tensor(j, [2, 2])).collect(), 0));
            Ok(())
        });
    }
}

#[test]
fn async_recv_waits_for_a_later_send() {
    run(2, |comm| {
        if comm.rank() == 1 {
            let pending = comm.recv_async::<2>(0, Tag::new("late"))?;
            // Work meanwhile (on another communicator: this one's stream is busy with the
            // receive until the send arrives).
            std::thread::sleep(Duration::from_millis(20));
            assert_same(pending.wait()?, rank_tensor(0, [2, 2]));
        } else {
            std::thread::sleep(Duration::from_millis(40));
            comm.send(rank_tensor(0, [2, 2]), 1, Tag::new("late"))?;
        }
        Ok(())
    });
}

#[test]
fn barrier_counts_calls_only() {
    let stats = run(3, |comm| {
        comm.barrier()?;
        comm.barrier()?;
        Ok(comm.stats())
    });
    for s in stats {
        assert_eq!(s.get(OpKind::Barrier).calls, 2);
        assert_eq!(s.total_elements(), 0);
    }
}

#[test]
fn sub_groups_of_a_usp_mesh() {
    // 2 (ring) × 2 (ulysses): ulysses groups are neighbours {0,1},{2,3}; ring groups {0,2},{1,3}.
    let stats = run(4, |comm| {
        let mesh = Mesh::new(4, &[(Axis::Ring, 2), (Axis::Ulysses, 2)])?;
        let uly = comm.split(&mesh, &[Axis::Ulysses])?;
        let ring = comm.split(&mesh, &[Axis::Ring])?;
        let r = comm.rank();
        assert_eq!(uly.members(), if r < 2 { &[0, 1][..] } else { &[2, 3][..] });
        assert_eq!(ring.members(), if r % 2 == 0 { &[0, 2][..] } else { &[1, 3][..] });
        assert_eq!(uly.rank(), r % 2);
        assert_eq!(ring.rank(), r / 2);
        let got = uly.all_gather(rank_tensor(r, [1, 3]), 0)?;
        let base = r / 2 * 2;
        assert_same(
            got,
            Tensor::cat(vec![rank_tensor(base, [1, 3]), rank_tensor(base + 1, [1, 3])], 0),
        );
        let got = ring.all_reduce_sum(rank_tensor(r, [2, 2]))?;
        assert_same(got, rank_tensor(r % 2, [2, 2]) + rank_tensor(r % 2 + 2, [2, 2]));
        // Point-to-point inside a sub-group uses group ranks.
        let other = 1 - ring.rank();
        let got: Tensor<B, 2> =
            ring.send_recv(rank_tensor(r, [1, 1]), other, Tag::new("x"), other, Tag::new("x"))?;
        assert_same(got, rank_tensor(ring.members()[other], [1, 1]));
        // A second split onto the same members is a distinct group with its own sequence.
        let uly2 = comm.split(&mesh, &[Axis::Ulysses])?;
        uly2.barrier()?;
        let whole = comm.split(&mesh, &[Axis::Ring, Axis::Ulysses])?;
        let all = whole.all_gather(rank_tensor(r, [1]), 0)?;
        assert_eq!(all.dims(), [4]);
        Ok(comm.stats())
    });
    // Sub-groups add to their rank's counters: 2 members each ⇒ (N−1) = 1.
    for s in &stats {
        assert_eq!(s.get(OpKind::AllGather).elements, 3 + 3);
        assert_eq!(s.get(OpKind::AllReduce).elements, 4);
        assert_eq!(s.get(OpKind::Send).elements, 1);
    }
}

#[test]
fn stats_reset_and_since() {
    run(2, |comm| {
        comm.all_gather(rank_tensor(0, [4]), 0)?;
        let before = comm.stats();
        comm.all_gather(rank_tensor(0, [4]), 0)?;
        let delta = comm.stats().since(&before);
        assert_eq!(delta.get(OpKind::AllGather).elements, 4);
        comm.reset_stats();
        assert_eq!(comm.stats(), CommStats::default());
        Ok(())
    });
}

#[test]
fn uneven_ulysses_round_trip_with_chunk_sizes() {
    // Ranks hold 3, 3, 2, 2 tokens: forward pass gathers uneven tokens, the return pass
    // scatters them back with explicit chunk sizes.
    for n in [2, 3, 4] {
        let tokens: Vec<usize> =
            parallel_core::split::balanced(10, n).iter().map(|r| r.len()).collect();
        let stats = run(n, |comm| {
            let r = comm.rank();
            let x = rank_tensor(r, [2, 2 * n, tokens[r], 3]);
            let y = comm.all_to_all(x.clone(), 1, 2)?;
            assert_eq!(y.dims(), [2, 2, 10, 3]);
            let back = comm.all_to_all_sizes(y, 2, &tokens, 1)?;
            assert_same(back, x);
            Ok(comm.stats())
        });
        for (r, s) in stats.iter().enumerate() {
            let there = (2 * 2 * n * tokens[r] * 3) as u64 * (n as u64 - 1) / n as u64;
            let back = (2 * 2 * 3 * (10 - tokens[r])) as u64;
            assert_eq!(s.get(OpKind::AllToAll).elements, there + back);
        }
    }
}

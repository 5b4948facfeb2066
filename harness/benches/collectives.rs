//! Each collective of `LocalComm` (N ranks as N threads of one process) on 2 ranks, with
//! 4 MiB of float32 per rank (about one layer's K/V band of PixArt-XL-2-512 with guidance:
//! 2 × 512 tokens × 1152 × 4 B = 4.5 MiB):
//! `cpu/all_gather/n2/4MiB`, `cpu/all_to_all/n2/4MiB`, `cpu/all_reduce/n2/4MiB`,
//! `cpu/send_recv/n2/4MiB` (ring neighbours exchanging).
//!
//! The ranks are launched once per sample (`iter_custom`); inside, after a barrier, each
//! rank runs the operation `iters` times, each followed by `Backend::sync` of its device
//! (the explicit sync); the sample's time is the slowest rank's.

use std::time::{Duration, Instant};

use burn::prelude::Backend;
use burn::tensor::{Distribution, Tensor};
use criterion::Criterion;
use parallel_core::{Comm, LaunchOptions, Tag, launch};

type B = harness::CpuBackend;

const RANKS: usize = 2;
const ELEMENTS: usize = 1 << 20; // 4 MiB of f32

fn timed(iters: u64, op: impl Fn(&Comm<B>, Tensor<B, 2>) -> Tensor<B, 2> + Sync) -> Duration {
    let options = LaunchOptions::<B>::default().with_threads_per_rank(1);
    let times = launch(RANKS, &options, |comm| {
        let device = comm.device();
        let t = Tensor::<B, 2>::random([1024, ELEMENTS / 1024], Distribution::Default, &device);
        comm.barrier()?;
        let start = Instant::now();
        for _ in 0..iters {
            let out = op(&comm, t.clone());
            B::sync(&device).expect("sync");
            std::hint::black_box(out);
        }
        Ok(start.elapsed())
    });
    times.into_iter().map(|t| t.expect("rank")).max().unwrap_or_default()
}

fn collectives(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.bench_function("all_gather/n2/4MiB", |b| {
        b.iter_custom(|iters| timed(iters, |c, t| c.all_gather(t, 0).expect("all_gather")))
    });
    g.bench_function("all_to_all/n2/4MiB", |b| {
        b.iter_custom(|iters| timed(iters, |c, t| c.all_to_all(t, 0, 1).expect("all_to_all")))
    });
    g.bench_function("all_reduce/n2/4MiB", |b| {
        b.iter_custom(|iters| timed(iters, |c, t| c.all_reduce_sum(t).expect("all_reduce")))
    });
    g.bench_function("send_recv/n2/4MiB", |b| {
        b.iter_custom(|iters| {
            timed(iters, |c, t| {
                let (next, prev) = ((c.rank() + 1) % RANKS, (c.rank() + RANKS - 1) % RANKS);
                let tag = Tag::new("bench");
                c.send_recv(t, next, tag, prev, tag).expect("send_recv")
            })
        })
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    collectives(&mut c);
    c.final_summary();
}

//! The GPU check of the NCCL communicator, for a machine with CUDA and NCCL (no Rust needed
//! there: build with `cargo build --release -p comm-nccl --features nccl --example
//! nccl_check`, copy `target/release/examples/nccl_check` over, run it).
//!
//! `nccl_check [RANKS]` runs RANKS in-process ranks (default: every visible GPU, at least 1),
//! one GPU each, through parallel-core's `launch` on [`NcclTransport`], and checks each
//! operation against values computed on the host: all-reduce, broadcast, all-gather (equal
//! and unequal sizes, dim 0 and dim 1), all-to-all, a ring of tagged send/receive pairs, a
//! tag mismatch, barrier, split; with two or more ranks a collective mismatch; and an
//! abort, after which the next call fails at once. Then it times an all-reduce of 64 Mi
//! floats. One line per check, `ok` or `FAILED: …`; exit status 1 if any failed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::{Tensor, TensorData};
use comm_nccl::{Cuda, NcclTransport};
use cubecl::cuda::CudaDevice;
use parallel_core::{Comm, CommError, LaunchOptions, ParallelError, Tag, launch};

type T2 = Tensor<Cuda, 2>;

fn tensor(comm: &Comm<Cuda>, rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) -> T2 {
    let v: Vec<f32> = (0..rows * cols).map(|i| f(i / cols, i % cols)).collect();
    Tensor::from_data(TensorData::new(v, [rows, cols]), &comm.device())
}

fn values(t: T2) -> Vec<f32> {
    t.into_data().to_vec::<f32>().expect("f32")
}

fn expect(name: &str, got: Vec<f32>, want: Vec<f32>) -> Result<(), ParallelError> {
    if got == want {
        Ok(())
    } else {
        Err(ParallelError::Model(format!(
            "{name}: got {:?}…, want {:?}…",
            &got[..got.len().min(8)],
            &want[..want.len().min(8)]
        )))
    }
}

fn checks(comm: Comm<Cuda>) -> Result<Vec<String>, ParallelError> {
    let (r, n) = (comm.rank(), comm.size());
    let mut done = Vec::new();

    // All-reduce: rank r holds r+1 everywhere.
    let s = comm.all_reduce_sum(tensor(&comm, 4, 3, |_, _| r as f32 + 1.0))?;
    let total = (n * (n + 1) / 2) as f32;
    expect("all_reduce", values(s), vec![total; 12])?;
    done.push("all_reduce".to_string());

    // Broadcast from the last rank.
    let root = n - 1;
    let b = comm.broadcast(tensor(&comm, 2, 5, |i, j| (r * 100 + i * 5 + j) as f32), root)?;
    expect("broadcast", values(b), (0..10).map(|k| (root * 100 + k) as f32).collect())?;
    done.push("broadcast".into());

    // All-gather, equal sizes along dim 0 and unequal along dim 1.
    let g = comm.all_gather(tensor(&comm, 2, 3, |i, j| (r * 10 + i * 3 + j) as f32), 0)?;
    let want: Vec<f32> = (0..n).flat_map(|q| (0..6).map(move |k| (q * 10 + k) as f32)).collect();
    expect("all_gather dim 0", values(g), want)?;
    let g = comm.all_gather(tensor(&comm, 2, r + 1, |i, j| (r * 100 + i * 10 + j) as f32), 1)?;
    let want: Vec<f32> = (0..2)
        .flat_map(|i| {
            (0..n).flat_map(move |q| (0..q + 1).map(move |j| (q * 100 + i * 10 + j) as f32))
        })
        .collect();
    expect("all_gather dim 1, unequal", values(g), want)?;
    done.push("all_gather".into());

    // All-to-all: split dim 1 (2 columns per rank), gather dim 0.
    let t = tensor(&comm, 3, 2 * n, |i, j| (r * 1000 + i * 100 + j) as f32);
    let a = comm.all_to_all(t, 1, 0)?;
    let want: Vec<f32> = (0..n)
        .flat_map(|q| {
            (0..3).flat_map(move |i| (0..2).map(move |c| (q * 1000 + i * 100 + 2 * r + c) as f32))
        })
        .collect();
    expect("all_to_all", values(a), want)?;
    done.push("all_to_all".into());

    if n > 1 {
        // A ring of tagged pairs, sent and received in one group.
        let tag = Tag::new("check").step(7);
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let got =
            comm.send_recv(tensor(&comm, 1, 4, |_, j| (r * 10 + j) as f32), next, tag, prev, tag)?;
        expect("send_recv ring", values(got), (0..4).map(|j| (prev * 10 + j) as f32).collect())?;
        done.push("send_recv".into());
    }

    comm.barrier()?;
    done.push("barrier".into());

    let solo = comm.split_members(&[comm.world_rank()])?;
    let s = solo.all_reduce_sum(tensor(&solo, 1, 2, |_, _| 3.0))?;
    expect("split", values(s), vec![3.0, 3.0])?;
    done.push("split".into());

    if n > 1 {
        // A collective mismatch is an error on every rank, not garbage or a hang.
        let x = tensor(&comm, 1, 2, |_, _| 1.0);
        let e = if r == 0 { comm.all_reduce_sum(x).err() } else { comm.all_gather(x, 0).err() };
        match e {
            Some(CommError::Mismatch { .. }) => done.push("mismatch detected".into()),
            other => return Err(ParallelError::Model(format!("mismatch: got {other:?}"))),
        }
        // A received tag other than the expected one is an error naming both (it aborts
        // the communicator, so it comes last).
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let x = tensor(&comm, 1, 1, |_, _| 0.0);
        match comm.send_recv(x, next, Tag::new("sent"), prev, Tag::new("other")) {
            Err(CommError::TagMismatch { .. }) => done.push("tag mismatch detected".into()),
            other => return Err(ParallelError::Model(format!("tag mismatch: got {other:?}"))),
        }
    }
    Ok(done)
}

fn timing(comm: Comm<Cuda>) -> Result<f64, ParallelError> {
    let x = tensor(&comm, 64 * 1024, 1024, |_, _| 1.0);
    comm.all_reduce_sum(x.clone())?;
    let start = Instant::now();
    for _ in 0..5 {
        comm.all_reduce_sum(x.clone())?;
    }
    Ok(start.elapsed().as_secs_f64() / 5.0)
}

fn abort_check(comm: Comm<Cuda>) -> Result<String, ParallelError> {
    comm.abort("deliberate abort");
    match comm.barrier() {
        Err(CommError::PeerFailed { reason, .. }) if reason.contains("deliberate") => {
            Ok("abort: the next call fails at once".into())
        }
        other => Err(ParallelError::Model(format!("abort: got {other:?}"))),
    }
}

fn fail(why: &str) -> ! {
    eprintln!("error: {why}");
    std::process::exit(1)
}

fn main() {
    // cudarc panics when libcuda cannot be loaded: say it in words instead.
    std::panic::set_hook(Box::new(|_| {}));
    let probed = std::panic::catch_unwind(cudarc::driver::CudaContext::device_count);
    let _ = std::panic::take_hook();
    let visible = match probed {
        Ok(Ok(n)) if n > 0 => n as usize,
        Ok(Ok(_)) => fail("the CUDA driver shows no GPU"),
        Ok(Err(e)) => fail(&format!("the CUDA driver failed to initialise: {e:?}")),
        Err(_) => fail("no CUDA driver library (libcuda.so) can be loaded on this machine"),
    };
    if let Err(e) = comm_nccl::check_library(0) {
        fail(&e.to_string());
    }
    let ranks: usize =
        std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(visible.max(1));
    println!(
        "NCCL version {:?}, {visible} visible GPU(s), {ranks} rank(s)",
        cudarc::nccl::result::get_nccl_version()
    );
    let options = LaunchOptions::<Cuda> {
        devices: (0..ranks).map(|index| CudaDevice { index }).collect(),
        ..LaunchOptions::default()
    }
    .with_timeout(Duration::from_secs(60))
    .with_transport(Arc::new(NcclTransport));
    let mut failed = false;
    for (name, results) in [
        ("checks", launch(ranks, &options, |c| checks(c).map(|v| v.join(", ")))),
        ("abort", launch(ranks, &options, abort_check)),
        (
            "all_reduce 256 MiB",
            launch(ranks, &options, |c| timing(c).map(|s| format!("{:.3} ms", s * 1e3))),
        ),
    ] {
        for (r, res) in results.into_iter().enumerate() {
            match res {
                Ok(s) => println!("{name} rank {r}: ok ({s})"),
                Err(e) => {
                    failed = true;
                    println!("{name} rank {r}: FAILED: {e}");
                }
            }
        }
    }
    std::process::exit(i32::from(failed));
}

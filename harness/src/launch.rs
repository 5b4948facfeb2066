//! Running a closure on every rank of a world, with harness errors.
//!
//! [`parallel_core::launch`] wants each rank's closure to return a [`ParallelError`], so that
//! a failing rank ends every other rank's waits. The harness's ranks fail with
//! [`HarnessError`]s (a bad weight file, a PNG that cannot be written …), which carry more
//! than a message; [`launch_ranks`] keeps each rank's real error aside, reports the failure
//! to the world as a [`ParallelError::RankFailed`], and afterwards returns the *root cause*:
//! the first failing rank whose error is not just "another rank failed" or "another rank
//! left".

use std::sync::Mutex;
use std::time::Duration;

use burn::tensor::backend::Backend;
use parallel_core::{Comm, LaunchOptions, ParallelError};

use crate::config::ParallelConfig;
use crate::error::{HarnessError, Result};

/// Threads of each rank's rayon pool: the configured number, else the machine's cores shared
/// evenly (at least 1).
pub fn threads_per_rank(parallel: &ParallelConfig) -> usize {
    parallel.threads_per_rank.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Under a launcher the ranks sharing this machine's cores are its local ranks.
        let sharing = parallel.process.as_ref().map_or(parallel.world_size, |p| p.local_world_size);
        (cores / sharing.max(1)).max(1)
    })
}

/// The launch options of a parallel config: its timeout, one rayon pool of
/// [`threads_per_rank`] per rank, its link model, `devices` by rank (empty: the default
/// device) and its transport ([`crate::devices::transport`]: NCCL, or the built-in one).
///
/// # Errors
/// A link specification that does not parse; `--comm nccl` where NCCL cannot work.
pub fn launch_options<B: Backend>(
    parallel: &ParallelConfig,
    devices: Vec<B::Device>,
) -> Result<LaunchOptions<B>> {
    let mut options = LaunchOptions::<B>::default()
        .with_timeout(Duration::from_secs(parallel.timeout_secs))
        .with_threads_per_rank(threads_per_rank(parallel));
    options.transport = crate::devices::transport::<B>(parallel, &devices)?;
    options.devices = devices;
    options.link = parallel.link_model()?;
    Ok(options)
}

/// Runs `f` on the `parallel.world_size` ranks (threads) and returns every rank's result in
/// rank order, or the root-cause error (see the [module docs](self)).
///
/// Under a launcher (`parallel.process`), this process runs only its own rank, joined to the
/// others over TCP: rank 0's process gets its one result, any other process
/// [`HarnessError::WorkerDone`] once its rank has finished.
pub fn launch_ranks<B, T, F>(
    parallel: &ParallelConfig,
    options: &LaunchOptions<B>,
    f: F,
) -> Result<Vec<T>>
where
    B: Backend,
    T: Send,
    F: Fn(Comm<B>) -> Result<T> + Sync,
{
    let world_size = parallel.world_size;
    if let Some(p) = &parallel.process {
        let error: Mutex<Option<HarnessError>> = Mutex::new(None);
        let outcome = parallel_core::launch_process(&p.group(), options, |comm| {
            let rank = comm.rank();
            f(comm).map_err(|e| {
                let reason = e.to_string();
                *error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                ParallelError::RankFailed { rank, reason }
            })
        });
        return match outcome {
            Ok(v) if p.rank == 0 => Ok(vec![v]),
            Ok(_) => Err(HarnessError::WorkerDone { rank: p.rank }),
            Err(e) => Err(error
                .into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or(HarnessError::Parallel(e))),
        };
    }
    let errors: Mutex<Vec<Option<HarnessError>>> =
        Mutex::new((0..world_size).map(|_| None).collect());
    let results = parallel_core::launch(world_size, options, |comm| {
        let rank = comm.rank();
        f(comm).map_err(|e| {
            let reason = e.to_string();
            errors.lock().unwrap_or_else(|p| p.into_inner())[rank] = Some(e);
            ParallelError::RankFailed { rank, reason }
        })
    });
    let mut errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut outputs = Vec::with_capacity(world_size);
    let mut first_failure: Option<HarnessError> = None;
    for (rank, result) in results.into_iter().enumerate() {
        match result {
            Ok(v) => outputs.push(v),
            Err(launch_error) => {
                // Our closure's error, kept aside; otherwise the rank panicked.
                let e = errors[rank].take().unwrap_or_else(|| {
                    HarnessError::Parallel(match launch_error {
                        ParallelError::RankFailed { rank, reason } => ParallelError::RankFailed {
                            rank,
                            reason: format!("panicked: {reason}"),
                        },
                        other => other,
                    })
                });
                if !e.is_secondary() {
                    return Err(e);
                }
                first_failure.get_or_insert(e);
            }
        }
    }
    match first_failure {
        Some(e) => Err(e),
        None => Ok(outputs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;

    fn world(world_size: usize) -> ParallelConfig {
        ParallelConfig { world_size, ..ParallelConfig::default() }
    }

    #[test]
    fn the_root_cause_is_reported_not_the_peers_aborts() {
        let options = LaunchOptions::<CpuBackend>::default().with_timeout(Duration::from_secs(20));
        let e = launch_ranks(&world(3), &options, |comm| {
            if comm.rank() == 2 {
                return Err(HarnessError::config("height", "not a multiple of 16"));
            }
            comm.barrier()?;
            Ok(())
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "height: not a multiple of 16");
    }

    #[test]
    fn a_panicking_rank_is_an_error_not_a_hang() {
        let options = LaunchOptions::<CpuBackend>::default().with_timeout(Duration::from_secs(20));
        let e = launch_ranks(&world(2), &options, |comm| {
            if comm.rank() == 1 {
                panic!("boom");
            }
            comm.barrier()?;
            Ok(())
        })
        .unwrap_err();
        assert!(e.to_string().contains("rank 1") && e.to_string().contains("boom"), "{e}");
    }
}

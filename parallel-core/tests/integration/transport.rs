//! A transport plugged into the launchers (the seam `comm-nccl`'s NCCL transport uses): the
//! launchers form the world through it, run every rank on it, and keep their failure
//! handling — a failing rank aborts its communicator (in process) or reports through its
//! `WorldExit` (multi-process), a rank that cannot connect is an error of that rank, a world
//! that cannot be formed is every rank's error.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::Tensor;
use burn_flex::Flex;
use parallel_core::{
    Comm, CommError, Connector, LaunchOptions, LocalComm, ParallelError, ProcessGroup, Transport,
    WorldExit, launch, launch_process,
};

type B = Flex;

/// How long a wait may block. A failure must reach the other ranks long before it (they
/// are woken by the abort, in < 1 ms on the reference machine); the bound below is the
/// timeout itself, which a rank left waiting would reach.
const TIMEOUT: Duration = Duration::from_secs(5);

/// In-process ranks on `LocalComm`, handed out by rank; or, for a multi-process join, a
/// one-rank world whose exit is recorded in `exits`.
#[derive(Debug, Default)]
struct Recording {
    refuse_world: bool,
    refuse_rank: Option<usize>,
    exits: Arc<Mutex<Vec<String>>>,
}

struct Handout {
    comms: Mutex<Vec<Option<Comm<B>>>>,
    refuse_rank: Option<usize>,
}

impl Connector<B> for Handout {
    fn connect(&self, rank: usize) -> Result<Comm<B>, CommError> {
        if self.refuse_rank == Some(rank) {
            return Err(CommError::Library {
                op: "connect".into(),
                rank,
                library: "test",
                detail: "this rank's device is gone".into(),
            });
        }
        Ok(self.comms.lock().unwrap()[rank].take().expect("each rank connects once"))
    }
}

struct Exit(Arc<Mutex<Vec<String>>>);

impl WorldExit for Exit {
    fn finish(self: Box<Self>) {
        self.0.lock().unwrap().push("finish".into());
    }
    fn abort(self: Box<Self>, origin: usize, reason: &str) {
        self.0.lock().unwrap().push(format!("abort {origin}: {reason}"));
    }
}

impl Transport<B> for Recording {
    fn name(&self) -> &'static str {
        "recording"
    }

    fn world(
        &self,
        size: usize,
        options: &LaunchOptions<B>,
    ) -> Result<Arc<dyn Connector<B>>, CommError> {
        if self.refuse_world {
            return Err(CommError::Library {
                op: "world".into(),
                rank: 0,
                library: "test",
                detail: "no library".into(),
            });
        }
        let mut plain = options.clone();
        plain.transport = None;
        let comms = LocalComm::create(size, &plain).into_iter().map(Some).collect();
        Ok(Arc::new(Handout { comms: Mutex::new(comms), refuse_rank: self.refuse_rank }))
    }

    fn join(
        &self,
        _group: &ProcessGroup,
        options: &LaunchOptions<B>,
    ) -> Result<(Comm<B>, Box<dyn WorldExit>), CommError> {
        let mut plain = options.clone();
        plain.transport = None;
        let comm = LocalComm::create(1, &plain).remove(0);
        Ok((comm, Box::new(Exit(self.exits.clone()))))
    }
}

fn options(t: Recording) -> LaunchOptions<B> {
    LaunchOptions::default().with_timeout(TIMEOUT).with_transport(Arc::new(t))
}

#[test]
fn launch_runs_every_rank_on_the_transport() {
    let results = launch(3, &options(Recording::default()), |comm| {
        let x = Tensor::<B, 1>::from_floats([comm.rank() as f32 + 1.0], &comm.device());
        Ok(comm.all_reduce_sum(x)?.into_scalar())
    });
    let sums: Vec<f32> = results.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(sums, vec![6.0; 3]);
}

#[test]
fn a_failing_rank_aborts_its_transport_communicator_so_no_peer_waits_out_the_timeout() {
    let start = Instant::now();
    let results = launch(3, &options(Recording::default()), |comm| {
        if comm.rank() == 2 {
            return Err(ParallelError::Model("rank 2 broke".into()));
        }
        comm.barrier()?;
        Ok(())
    });
    assert!(start.elapsed() < TIMEOUT, "a peer waited for the timeout: {:?}", start.elapsed());
    for (rank, r) in results.iter().enumerate().take(2) {
        match r {
            Err(ParallelError::Comm(CommError::PeerFailed { failed_rank: 2, reason, .. })) => {
                assert!(reason.contains("rank 2 broke"), "rank {rank}: {reason}")
            }
            other => panic!("rank {rank}: {other:?}"),
        }
    }
}

#[test]
fn a_rank_that_cannot_connect_fails_and_a_world_that_cannot_form_fails_every_rank() {
    let t = Recording { refuse_rank: Some(1), ..Recording::default() };
    // Rank 1 never connects; the other ranks' barrier ends at the timeout (a short one here:
    // nothing can tell them, as with a GPU that never initialises), not in a hang.
    let opts = options(t).with_timeout(Duration::from_millis(300));
    let results = launch(2, &opts, |comm| Ok(comm.barrier()?));
    assert!(
        matches!(&results[1], Err(ParallelError::Comm(CommError::Library { detail, .. }))
        if detail.contains("device is gone")),
        "{:?}",
        results[1]
    );
    assert!(results[0].is_err(), "rank 0 must not succeed alone: {:?}", results[0]);

    let results =
        launch(2, &options(Recording { refuse_world: true, ..Recording::default() }), |_| Ok(()));
    for r in &results {
        assert!(
            matches!(r, Err(ParallelError::Comm(CommError::Library { detail, .. }))
            if detail == "no library"),
            "{r:?}"
        );
    }
}

#[test]
fn launch_process_reports_finish_and_abort_through_the_transport() {
    let group = ProcessGroup { rank: 0, world_size: 1, master: "127.0.0.1:1".parse().unwrap() };
    let t = Recording::default();
    let exits = t.exits.clone();
    let opts = options(t);
    launch_process(&group, &opts, |comm| Ok(comm.rank())).unwrap();
    let e = launch_process(&group, &opts, |_| -> Result<(), ParallelError> {
        Err(ParallelError::Model("bad weights".into()))
    })
    .unwrap_err();
    assert!(e.to_string().contains("bad weights"), "{e}");
    let recorded = exits.lock().unwrap().clone();
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    assert_eq!(recorded[0], "finish");
    assert!(recorded[1].starts_with("abort 0: ") && recorded[1].contains("bad weights"));
}

//! Multi-process runs, the torchrun way: `harness launch` starts one process per rank, and a
//! process started with `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` in its
//! environment (by the launcher, by torchrun-style tooling or by Slurm) runs only its rank of
//! the world, joined to the others over TCP ([`parallel_core::comm::TcpComm`]).
//!
//! Under a launcher every flag of `run` and `forward` means what it means in one process; the
//! world size is the launcher's (`--world-size`, if given, must agree). Rank 0's process
//! writes the outputs and prints the summary; the others print nothing when they succeed.
//!
//! [`launch`] (the `harness launch` command) starts the ranks of this machine, forwards their
//! standard error with a `[rank r]` prefix, and when one fails stops the others and exits
//! non-zero with the first failure's message — the root cause, not a peer's "rank r failed"
//! echo of it. A rank whose launcher dies (even by SIGKILL) stops as well: the launcher holds
//! the write end of every rank's stdin, and a rank ends when it closes ([`watch_launcher`]).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use parallel_core::ProcessGroup;

use crate::error::{HarnessError, Result};

/// This process's place in a multi-process world, read from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessEnv {
    /// `RANK` (Slurm: `SLURM_PROCID`).
    pub rank: usize,
    /// `WORLD_SIZE` (Slurm: `SLURM_NTASKS`).
    pub world_size: usize,
    /// `LOCAL_RANK` (Slurm: `SLURM_LOCALID`; default: `RANK mod LOCAL_WORLD_SIZE`).
    pub local_rank: usize,
    /// `LOCAL_WORLD_SIZE`: ranks on this machine (default `WORLD_SIZE`), which share its cores.
    pub local_world_size: usize,
    /// `MASTER_ADDR:MASTER_PORT`, resolved.
    pub master: SocketAddr,
}

impl ProcessEnv {
    /// The communicator's view of it.
    pub fn group(&self) -> ProcessGroup {
        ProcessGroup { rank: self.rank, world_size: self.world_size, master: self.master }
    }
}

fn bad_env(name: &str, reason: impl Into<String>) -> HarnessError {
    HarnessError::config(format!("environment variable {name}"), reason)
}

/// The multi-process settings in the environment `var` reads (`std::env::var` in the
/// binary), or `None` when neither `RANK` nor `SLURM_PROCID` is set (a one-process run).
///
/// # Errors
/// A variable that is missing beside `RANK`, not a number, a `RANK ≥ WORLD_SIZE`, a
/// `MASTER_ADDR` that is neither an IP address nor a host name that resolves, a
/// `MASTER_PORT` that is not a port: each naming the variable.
pub fn process_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<ProcessEnv>> {
    let pick = |names: &[&'static str]| -> Option<(&'static str, String)> {
        names.iter().find_map(|&n| var(n).map(|v| (n, v.trim().to_string())))
    };
    let Some((rank_name, rank)) = pick(&["RANK", "SLURM_PROCID"]) else { return Ok(None) };
    let number = |name: &str, v: &str| -> Result<usize> {
        v.parse::<usize>()
            .map_err(|_| bad_env(name, format!("`{v}` is not a non-negative integer")))
    };
    let rank = number(rank_name, &rank)?;
    let (world_name, world) = pick(&["WORLD_SIZE", "SLURM_NTASKS"])
        .ok_or_else(|| bad_env("WORLD_SIZE", format!("must be set beside {rank_name}")))?;
    let world_size = number(world_name, &world)?;
    if world_size == 0 {
        return Err(bad_env(world_name, "must be at least 1"));
    }
    if rank >= world_size {
        return Err(bad_env(
            rank_name,
            format!("{rank} must be below {world_name} {world_size} (ranks are 0..{world_size})"),
        ));
    }
    let local_world_size = match pick(&["LOCAL_WORLD_SIZE"]) {
        Some((n, v)) => number(n, &v)?.max(1),
        None => world_size,
    };
    let local_rank = match pick(&["LOCAL_RANK", "SLURM_LOCALID"]) {
        Some((n, v)) => number(n, &v)?,
        None => rank % local_world_size,
    };
    let addr = var("MASTER_ADDR").map(|v| v.trim().to_string()).ok_or_else(|| {
        bad_env("MASTER_ADDR", format!("must be set beside {rank_name} (rank 0's host)"))
    })?;
    let port = var("MASTER_PORT").map(|v| v.trim().to_string()).ok_or_else(|| {
        bad_env("MASTER_PORT", format!("must be set beside {rank_name} (e.g. 29500)"))
    })?;
    let port: u16 = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return Err(bad_env("MASTER_PORT", format!("`{port}` is not a TCP port (1–65535)"))),
    };
    let master = resolve(&addr, port)?;
    Ok(Some(ProcessEnv { rank, world_size, local_rank, local_world_size, master }))
}

/// `addr:port` as a socket address: an IP literal, or a host name that resolves (IPv4
/// preferred). A string of digits and dots must be an IPv4 address.
fn resolve(addr: &str, port: u16) -> Result<SocketAddr> {
    if let Ok(ip) = addr.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let hostname = !addr.is_empty()
        && addr.len() <= 253
        && addr.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !addr.chars().all(|c| c.is_ascii_digit() || c == '.');
    if !hostname {
        return Err(bad_env(
            "MASTER_ADDR",
            format!("`{addr}` is not an IP address or a host name"),
        ));
    }
    let found: Vec<SocketAddr> = (addr, port)
        .to_socket_addrs()
        .map_err(|e| bad_env("MASTER_ADDR", format!("cannot resolve `{addr}`: {e}")))?
        .collect();
    found
        .iter()
        .find(|a| a.is_ipv4())
        .or(found.first())
        .copied()
        .ok_or_else(|| bad_env("MASTER_ADDR", format!("`{addr}` resolves to no address")))
}

/// `harness launch`: start the ranks of this machine (see the [module docs](self)).
#[derive(Debug, Clone, clap::Args)]
pub struct LaunchArgs {
    /// Processes (ranks) to start on this machine.
    #[arg(long)]
    pub nproc_per_node: usize,
    /// Machines taking part (each runs `harness launch` with its own --node-rank).
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This machine's index (0..nnodes); its ranks are node-rank · nproc-per-node + local rank.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Rank 0's host, where the rendezvous store listens.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// The rendezvous store's port.
    #[arg(long, default_value_t = 29500)]
    pub master_port: u16,
    /// The command every rank runs: `run …` or `forward …` (after `--`).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// What the launcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchOutcome {
    /// Ranks started on this machine.
    pub ranks: Vec<usize>,
}

struct Rank {
    rank: usize,
    child: Child,
    /// The write end of the child's stdin, held open for as long as the launcher lives: its
    /// closing is how the child learns that the launcher died ([`watch_launcher`]).
    _lifeline: Option<std::process::ChildStdin>,
    /// The last `error: …` line it wrote.
    error: Arc<Mutex<Option<String>>>,
    status: Option<ExitStatus>,
    forwarder: Option<std::thread::JoinHandle<()>>,
}

/// How long the launcher lets the other ranks end by themselves after the first failure
/// (so that their messages can show which failure was the cause) before it stops them.
const GRACE: Duration = Duration::from_secs(2);
/// How long a rank sent SIGTERM has to exit before it gets SIGKILL (torchrun's order).
const TERM_GRACE: Duration = Duration::from_secs(3);

fn describe(status: &ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let name = match sig {
                9 => " (SIGKILL)",
                15 => " (SIGTERM)",
                11 => " (SIGSEGV)",
                6 => " (SIGABRT)",
                2 => " (SIGINT)",
                _ => "",
            };
            return format!("was killed by signal {sig}{name}");
        }
    }
    match status.code() {
        Some(c) => format!("exited with code {c}"),
        None => "ended abnormally".into(),
    }
}

/// Whether a rank's error only echoes another rank's failure.
fn is_echo(message: &str) -> bool {
    message.contains(" aborted: rank ") || message.contains("has already left the group")
}

/// Runs `harness launch`: starts `nproc_per_node` processes of this executable running
/// `command`, with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`
/// and `MASTER_PORT` set, and waits for them.
///
/// # Errors
/// Bad launcher settings (naming the flag); a command other than `run` or `forward`; a
/// process that cannot start; the first failing rank — its exit or signal and its error
/// message — after the other ranks were stopped.
pub fn launch(args: &LaunchArgs) -> Result<LaunchOutcome> {
    if args.nproc_per_node == 0 {
        return Err(HarnessError::config("--nproc-per-node", "must be at least 1"));
    }
    if args.nnodes == 0 {
        return Err(HarnessError::config("--nnodes", "must be at least 1"));
    }
    if args.node_rank >= args.nnodes {
        return Err(HarnessError::config(
            "--node-rank",
            format!("{} must be below --nnodes {}", args.node_rank, args.nnodes),
        ));
    }
    match args.command.first().map(String::as_str) {
        Some("run" | "forward") => {}
        Some(other) => {
            return Err(HarnessError::config(
                "harness launch",
                format!("runs `run` or `forward` on every rank, not `{other}`"),
            ));
        }
        None => return Err(HarnessError::config("harness launch", "needs a command after `--`")),
    }
    // The children check the address themselves; checking here too fails before any start.
    resolve(&args.master_addr, args.master_port)
        .map_err(|e| HarnessError::config("--master-addr", e.to_string()))?;
    let exe = std::env::current_exe()
        .map_err(|e| HarnessError::io("the harness executable", e.to_string()))?;
    let world = args.nnodes * args.nproc_per_node;
    let mut ranks: Vec<Rank> = Vec::with_capacity(args.nproc_per_node);
    for local in 0..args.nproc_per_node {
        let rank = args.node_rank * args.nproc_per_node + local;
        let spawned = Command::new(&exe)
            .args(&args.command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", args.nproc_per_node.to_string())
            .env("GROUP_RANK", args.node_rank.to_string())
            .env("MASTER_ADDR", &args.master_addr)
            .env("MASTER_PORT", args.master_port.to_string())
            .env(LIFELINE, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                stop(&mut ranks);
                return Err(HarnessError::io(&exe, format!("cannot start rank {rank}: {e}")));
            }
        };
        log::info!("launch: rank {rank} is process {}", child.id());
        let error = Arc::new(Mutex::new(None));
        let forwarder = child.stderr.take().map(|err| {
            let error = error.clone();
            std::thread::spawn(move || forward_stderr(rank, err, &error))
        });
        let lifeline = child.stdin.take();
        ranks.push(Rank { rank, child, _lifeline: lifeline, error, status: None, forwarder });
    }
    let started: Vec<usize> = ranks.iter().map(|r| r.rank).collect();
    let mut first_failure: Option<(Instant, usize)> = None;
    loop {
        for (i, r) in ranks.iter_mut().enumerate() {
            if r.status.is_none()
                && let Ok(Some(s)) = r.child.try_wait()
            {
                r.status = Some(s);
                if !s.success() && first_failure.is_none() {
                    first_failure = Some((Instant::now(), i));
                }
            }
        }
        let running = ranks.iter().filter(|r| r.status.is_none()).count();
        if running == 0 {
            break;
        }
        if let Some((at, _)) = first_failure
            && at.elapsed() >= GRACE
        {
            stop(&mut ranks);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for r in &mut ranks {
        if let Some(h) = r.forwarder.take() {
            let _ = h.join();
        }
    }
    let Some((_, first)) = first_failure else {
        return Ok(LaunchOutcome { ranks: started });
    };
    // The root cause: the first failed rank whose message is not an echo of another's.
    let failed: Vec<&Rank> =
        ranks.iter().filter(|r| r.status.is_some_and(|s| !s.success())).collect();
    let message = |r: &Rank| r.error.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let cause = failed
        .iter()
        .find(|r| message(r).is_some_and(|m| !is_echo(&m)))
        .or_else(|| failed.iter().find(|r| message(r).is_none()))
        .copied()
        .unwrap_or(&ranks[first]);
    let status = cause.status.map(|s| describe(&s)).unwrap_or_else(|| "was stopped".into());
    let text = match message(cause) {
        Some(m) => format!("rank {} {status}: {m}", cause.rank),
        None => format!("rank {} {status}", cause.rank),
    };
    let others = started.len() - 1;
    Err(HarnessError::Launch {
        reason: if others > 0 {
            format!("{text} (the other {others} rank(s) of this machine were stopped)")
        } else {
            text
        },
    })
}

/// The variable `harness launch` sets on its ranks: their stdin is the launcher's lifeline.
pub const LIFELINE: &str = "HARNESS_LAUNCHER_LIFELINE";

/// Under `harness launch` (`HARNESS_LAUNCHER_LIFELINE=1`): a thread that waits for the
/// launcher's end of this process's stdin to close — the launcher died (killed, crashed) —
/// and then ends this rank with an error, so that no rank outlives its launcher (its peers
/// see the lost connection and end too). Nothing else reads the harness's stdin.
pub fn watch_launcher(rank: usize) {
    let spawned = std::thread::Builder::new().name("launcher-lifeline".into()).spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        // The launcher read this rank's stderr: it may be gone too, so no `eprintln!`.
        let _ = writeln!(
            std::io::stderr(),
            "error: rank {rank}: its launcher exited (killed?); this rank stops too"
        );
        std::process::exit(1);
    });
    if let Err(e) = spawned {
        log::warn!(
            "rank {rank}: cannot watch the launcher ({e}); it may outlive a killed launcher"
        );
    }
}

/// Stops every rank still running and reaps it: SIGTERM first (so a rank may end as it
/// would on Ctrl-C), SIGKILL to those still running `term_grace` later — torchrun's order.
fn stop(ranks: &mut [Rank]) {
    stop_children(ranks.iter_mut().map(|r| (&mut r.child, &mut r.status)), TERM_GRACE);
}

fn stop_children<'a>(
    children: impl Iterator<Item = (&'a mut Child, &'a mut Option<ExitStatus>)>,
    term_grace: Duration,
) {
    let mut running: Vec<(&mut Child, &mut Option<ExitStatus>)> =
        children.filter(|(_, status)| status.is_none()).collect();
    // std has no signal but SIGKILL: `kill -TERM` (procps / coreutils) sends the other one;
    // where it cannot run, straight to SIGKILL.
    let termed = running.iter().all(|(child, _)| {
        std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let started = Instant::now();
    while termed && started.elapsed() < term_grace {
        for (child, status) in running.iter_mut() {
            if status.is_none()
                && let Ok(Some(s)) = child.try_wait()
            {
                **status = Some(s);
            }
        }
        if running.iter().all(|(_, status)| status.is_some()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (child, status) in running.iter_mut().filter(|(_, status)| status.is_none()) {
        let _ = child.kill();
        **status = child.wait().ok();
    }
}

fn forward_stderr(rank: usize, err: impl std::io::Read, last_error: &Mutex<Option<String>>) {
    let reader = BufReader::new(err);
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if let Some(m) = line.strip_prefix("error: ") {
            *last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(m.to_string());
        }
        let mut stderr = std::io::stderr().lock();
        let _ = writeln!(stderr, "[rank {rank}] {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The launcher's stop: SIGTERM ends a rank that lets it; one that ignores it gets
    /// SIGKILL after the grace period.
    #[cfg(unix)]
    #[test]
    fn stop_sends_sigterm_then_sigkill() {
        use std::os::unix::process::ExitStatusExt;
        let spawn = |script: &str| {
            std::process::Command::new("sh").args(["-c", script]).spawn().expect("sh runs")
        };
        let mut polite = spawn("exec sleep 30");
        // `trap '' TERM` ignores SIGTERM, and an ignored signal stays ignored across exec.
        let mut stubborn = spawn("trap '' TERM; exec sleep 30");
        std::thread::sleep(Duration::from_millis(200));
        let (mut a, mut b) = (None, None);
        let started = Instant::now();
        stop_children(
            [(&mut polite, &mut a), (&mut stubborn, &mut b)].into_iter(),
            Duration::from_millis(600),
        );
        assert_eq!(a.and_then(|s| s.signal()), Some(15), "{a:?}");
        assert_eq!(b.and_then(|s| s.signal()), Some(9), "{b:?}");
        assert!(started.elapsed() >= Duration::from_millis(600));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| m.get(k).cloned()
    }

    fn torchrun(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut v = vec![
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ];
        for (k, val) in extra {
            v.retain(|(kk, _)| kk != k);
            v.push((k, val));
        }
        v
    }

    fn error(pairs: &[(&str, &str)]) -> String {
        process_env(env(pairs)).unwrap_err().to_string()
    }

    #[test]
    fn no_rank_is_a_one_process_run() {
        assert_eq!(process_env(env(&[("WORLD_SIZE", "2")])).unwrap(), None);
    }

    #[test]
    fn torchrun_and_slurm_variables_are_read() {
        let p = process_env(env(&torchrun(&[("LOCAL_WORLD_SIZE", "2")]))).unwrap().unwrap();
        assert_eq!((p.rank, p.world_size, p.local_rank, p.local_world_size), (1, 2, 1, 2));
        assert_eq!(p.master, "127.0.0.1:29500".parse().unwrap());
        let s = process_env(env(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "localhost"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((s.rank, s.world_size, s.local_rank), (3, 4, 1));
        assert_eq!(s.master.port(), 1234);
    }

    #[test]
    fn bad_variables_are_named() {
        let e = error(&torchrun(&[("RANK", "2")]));
        assert!(e.contains("RANK") && e.contains("2 must be below WORLD_SIZE 2"), "{e}");
        let e = error(&torchrun(&[("MASTER_PORT", "70000")]));
        assert!(e.contains("MASTER_PORT") && e.contains("`70000` is not a TCP port"), "{e}");
        let e = error(&torchrun(&[("MASTER_ADDR", "10.0.0.300")]));
        assert!(e.contains("MASTER_ADDR") && e.contains("not an IP address"), "{e}");
        let e = error(&torchrun(&[("MASTER_ADDR", "no spaces please")]));
        assert!(e.contains("MASTER_ADDR"), "{e}");
        let e = error(&torchrun(&[("WORLD_SIZE", "two")]));
        assert!(e.contains("WORLD_SIZE") && e.contains("`two`"), "{e}");
        let e = error(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_PORT", "1")]);
        assert!(e.contains("MASTER_ADDR") && e.contains("must be set"), "{e}");
    }

    #[test]
    fn an_echo_is_told_from_a_cause() {
        assert!(is_echo("all_gather #3 on group [0, 1] on rank 0 aborted: rank 1 failed: boom"));
        assert!(!is_echo("height: not a multiple of 16"));
    }
}

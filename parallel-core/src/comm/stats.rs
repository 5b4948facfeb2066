//! Communication counts: what the transport moved off a rank, per operation kind and per
//! link, and how long the rank waited on it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// The kinds of operation a [`Comm`](super::Comm) counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    /// [`Comm::all_gather`](super::Comm::all_gather) and its async form.
    AllGather,
    /// [`Comm::all_to_all`](super::Comm::all_to_all).
    AllToAll,
    /// [`Comm::all_reduce_sum`](super::Comm::all_reduce_sum).
    AllReduce,
    /// [`Comm::broadcast`](super::Comm::broadcast).
    Broadcast,
    /// Point-to-point sends (also the send half of `send_recv`).
    Send,
    /// Point-to-point receives (calls only: a receive sends nothing).
    Recv,
    /// [`Comm::barrier`](super::Comm::barrier) (calls only).
    Barrier,
}

impl OpKind {
    /// Every kind, in display order.
    pub const ALL: [OpKind; 7] = [
        OpKind::AllGather,
        OpKind::AllToAll,
        OpKind::AllReduce,
        OpKind::Broadcast,
        OpKind::Send,
        OpKind::Recv,
        OpKind::Barrier,
    ];

    /// The snake-case name used in reports (`all_gather`, `send`, …).
    pub fn name(self) -> &'static str {
        match self {
            OpKind::AllGather => "all_gather",
            OpKind::AllToAll => "all_to_all",
            OpKind::AllReduce => "all_reduce",
            OpKind::Broadcast => "broadcast",
            OpKind::Send => "send",
            OpKind::Recv => "recv",
            OpKind::Barrier => "barrier",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Calls and volume sent of one operation kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpStats {
    /// Number of calls (an async call counts when it starts).
    pub calls: u64,
    /// Tensor elements that left this rank.
    pub elements: u64,
    /// Bytes that left this rank (elements × element size).
    pub bytes: u64,
}

/// What the transport moved off one rank, per operation kind and per destination, summed
/// over every group the rank belongs to, and the time the rank spent blocked on it.
///
/// The counts are taken by the communicator where it moves data (for [`LocalComm`]: when
/// an operation executes), not computed from call shapes, so they can be set beside a
/// strategy's formula as an independent measurement. [`LocalComm`] moves data as these
/// algorithms do (`local`: the elements this rank passes in, `N` the group size):
///
/// | operation   | what leaves this rank                                                    |
/// |-------------|--------------------------------------------------------------------------|
/// | all_gather  | its block to each other rank: `local · (N − 1)`                          |
/// | all_to_all  | chunk `j` to rank `j`: `local − own chunk`                               |
/// | all_reduce  | a ring (reduce-scatter, then all-gather): `2(N − 1)` chunk sends to the next rank; the `N` chunks differ in size by at most one, larger first (`2 · size · (N − 1) / N` when `N` divides `size`) |
/// | broadcast   | the root: its tensor to each other rank; others: nothing                  |
/// | send        | the tensor, to its destination                                           |
/// | recv, barrier | nothing (calls are counted)                                            |
///
/// For `N = 1` nothing moves.
///
/// [`LocalComm`]: super::LocalComm
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommStats {
    ops: [OpStats; 7],
    /// Bytes sent to each destination rank (world numbering).
    links: BTreeMap<usize, u64>,
    /// Time blocked waiting on communication.
    wait: Duration,
}

impl CommStats {
    /// The counts of one operation kind.
    pub fn get(&self, kind: OpKind) -> OpStats {
        self.ops[kind.index()]
    }

    /// Records one call of `kind` (its data is recorded by [`moved`](CommStats::moved)).
    pub fn called(&mut self, kind: OpKind) {
        self.ops[kind.index()].calls += 1;
    }

    /// Records `elements` elements of `elem_bytes` bytes each moved to rank `dst` by an
    /// operation of `kind`.
    pub fn moved(&mut self, kind: OpKind, dst: usize, elements: u64, elem_bytes: u64) {
        let s = &mut self.ops[kind.index()];
        s.elements += elements;
        s.bytes += elements * elem_bytes;
        *self.links.entry(dst).or_default() += elements * elem_bytes;
    }

    /// Records time spent blocked on communication.
    pub fn waited(&mut self, d: Duration) {
        self.wait += d;
    }

    /// Bytes sent to each destination rank (world numbering).
    pub fn links(&self) -> &BTreeMap<usize, u64> {
        &self.links
    }

    /// Time spent blocked on communication.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// Elements sent, all kinds together.
    pub fn total_elements(&self) -> u64 {
        self.ops.iter().map(|s| s.elements).sum()
    }

    /// Bytes sent, all kinds together.
    pub fn total_bytes(&self) -> u64 {
        self.ops.iter().map(|s| s.bytes).sum()
    }

    /// Calls, all kinds together.
    pub fn total_calls(&self) -> u64 {
        self.ops.iter().map(|s| s.calls).sum()
    }

    /// The kinds with at least one call, with their counts.
    pub fn iter(&self) -> impl Iterator<Item = (OpKind, OpStats)> + '_ {
        OpKind::ALL.into_iter().map(|k| (k, self.get(k))).filter(|(_, s)| s.calls > 0)
    }

    /// `self − earlier`, kind by kind and link by link: the traffic between two snapshots.
    pub fn since(&self, earlier: &CommStats) -> CommStats {
        let mut out = CommStats::default();
        for k in OpKind::ALL {
            let (a, b) = (self.get(k), earlier.get(k));
            out.ops[k.index()] = OpStats {
                calls: a.calls.saturating_sub(b.calls),
                elements: a.elements.saturating_sub(b.elements),
                bytes: a.bytes.saturating_sub(b.bytes),
            };
        }
        for (&dst, &b) in &self.links {
            let d = b.saturating_sub(earlier.links.get(&dst).copied().unwrap_or(0));
            if d > 0 {
                out.links.insert(dst, d);
            }
        }
        out.wait = self.wait.saturating_sub(earlier.wait);
        out
    }
}

impl fmt::Display for CommStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (k, s) in self.iter() {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{k}: {} calls, {} elements, {} B", s.calls, s.elements, s.bytes)?;
        }
        if first {
            f.write_str("no communication")?;
        }
        Ok(())
    }
}

/// Sizes of the `n` ring chunks of `size` elements: they differ by at most one, larger first.
/// (A formula helper for strategies; the transport chunks on its own.)
pub fn ring_chunks(size: u64, n: u64) -> Vec<u64> {
    (0..n).map(|i| size / n + u64::from(i < size % n)).collect()
}

/// Elements rank `rank` of `n` sends in a ring all-reduce of `size` elements (see
/// [`CommStats`]): a formula helper for strategies.
pub fn all_reduce_elements(size: u64, rank: u64, n: u64) -> u64 {
    if n <= 1 {
        return 0;
    }
    let c = ring_chunks(size, n);
    2 * size - c[((rank + 1) % n) as usize] - c[((rank + 2) % n) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_all_reduce_matches_the_even_formula() {
        for n in 1..=8u64 {
            for r in 0..n {
                let size = 24 * 35;
                assert_eq!(all_reduce_elements(size, r, n), 2 * size * (n - 1) / n);
            }
        }
    }

    #[test]
    fn ring_all_reduce_uneven_totals_are_exact() {
        // Over all ranks, a ring all-reduce moves each chunk 2(N-1) times.
        for n in 2..=5u64 {
            for size in [1u64, 7, 10, 13] {
                let total: u64 = (0..n).map(|r| all_reduce_elements(size, r, n)).sum();
                assert_eq!(total, 2 * size * (n - 1));
            }
        }
    }
}

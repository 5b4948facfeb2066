//! The link model of [`LocalComm`](super::LocalComm): transfers that take the time a real
//! interconnect would give them, so that overlap is visible on one CPU.
//!
//! A transfer of `b` bytes over the directed link `src → dst` completes
//! `(latency + b / bandwidth) · dilation` after it starts; transfers on the same link queue
//! (a link carries one transfer at a time). Each ordered rank pair is its own link (a full
//! crossbar, as NVSwitch or a non-blocking fabric gives; on a PCIe tree shared by more than
//! two GPUs this overstates all-to-all bandwidth at `N > 2`).
//!
//! The **dilation** `F` puts this machine's compute and a GPU cluster's links in proportion:
//! if a CPU runs a step `F` times slower than the modelled GPU, stretching every transfer by
//! `F` keeps the ratio of communication to compute that the GPU cluster would see.
//!
//! Presets, bandwidth per direction from the specifications:
//!
//! | name | bandwidth | latency | source |
//! |---|---|---|---|
//! | `nvlink-a100` | 300 GB/s | 3 µs | A100 datasheet: NVLink 3, 600 GB/s per GPU, both directions |
//! | `nvlink-h100` | 450 GB/s | 3 µs | H100 SXM datasheet: NVLink 4, 900 GB/s per GPU, both directions |
//! | `pcie4` | 31.5 GB/s | 8 µs | PCIe 4.0 ×16: 16 GT/s × 16 lanes × 128/130 / 8 |
//! | `pcie5` | 63 GB/s | 8 µs | PCIe 5.0 ×16: 32 GT/s × 16 lanes × 128/130 / 8 |
//! | `ib100` | 12.5 GB/s | 5 µs | 100 Gb/s InfiniBand (EDR / HDR100) |
//! | `eth25` | 3.125 GB/s | 25 µs | 25 Gb/s Ethernet |
//!
//! Latencies are the order of magnitude of a small message through NCCL on such a link (a
//! few µs in a node, more across one), not a specification; what the model is for — whether
//! megabytes of K/V hide behind a step — depends on the bandwidth far more.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where the communicator reads the time (a wall clock, or a test's logical one).
pub trait Clock: Send + Sync + fmt::Debug {
    /// Time since the clock's origin.
    fn now(&self) -> Duration;

    /// Blocks until [`now`](Clock::now) is at least `t` or `max` has passed, whichever is
    /// first.
    fn sleep_until(&self, t: Duration, max: Duration);
}

/// The wall clock (the default).
#[derive(Debug)]
pub struct WallClock {
    origin: Instant,
}

impl Default for WallClock {
    fn default() -> Self {
        WallClock { origin: Instant::now() }
    }
}

impl Clock for WallClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn sleep_until(&self, t: Duration, max: Duration) {
        let wait = t.saturating_sub(self.now()).min(max);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// A logical clock that moves only when told ([`ManualClock::advance`]): tests of the link
/// model check what is observable before and after a modelled completion without measuring
/// wall time.
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
    moved: Mutex<()>,
    cv: Condvar,
}

impl ManualClock {
    /// A clock at 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let _g = self.moved.lock().unwrap_or_else(|e| e.into_inner());
        self.nanos.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
        self.cv.notify_all();
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }

    fn sleep_until(&self, t: Duration, max: Duration) {
        let g = self.moved.lock().unwrap_or_else(|e| e.into_inner());
        if self.now() < t {
            let _ = self.cv.wait_timeout(g, max);
        }
    }
}

/// One directed link's speed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Bytes per second in one direction.
    pub bandwidth: f64,
    /// Time before the first byte arrives.
    pub latency: Duration,
}

impl Link {
    /// The time `bytes` take over this link, stretched by `dilation`.
    pub fn transfer_time(&self, bytes: u64, dilation: f64) -> Duration {
        let secs = self.latency.as_secs_f64() + bytes as f64 / self.bandwidth;
        Duration::from_secs_f64(secs * dilation)
    }
}

/// A named interconnect preset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preset {
    /// The name `--link` takes.
    pub name: &'static str,
    /// Bytes per second per direction.
    pub bandwidth: f64,
    /// Latency in microseconds.
    pub latency_us: f64,
    /// Where the numbers come from.
    pub source: &'static str,
}

/// The presets of the [module docs](self).
pub const PRESETS: [Preset; 6] = [
    Preset {
        name: "nvlink-a100",
        bandwidth: 300e9,
        latency_us: 3.0,
        source: "A100 datasheet: NVLink 3, 600 GB/s per GPU in both directions",
    },
    Preset {
        name: "nvlink-h100",
        bandwidth: 450e9,
        latency_us: 3.0,
        source: "H100 SXM datasheet: NVLink 4, 900 GB/s per GPU in both directions",
    },
    Preset {
        name: "pcie4",
        bandwidth: 31.5e9,
        latency_us: 8.0,
        source: "PCIe 4.0 x16: 16 GT/s x 16 lanes x 128/130 / 8",
    },
    Preset {
        name: "pcie5",
        bandwidth: 63e9,
        latency_us: 8.0,
        source: "PCIe 5.0 x16: 32 GT/s x 16 lanes x 128/130 / 8",
    },
    Preset {
        name: "ib100",
        bandwidth: 12.5e9,
        latency_us: 5.0,
        source: "100 Gb/s InfiniBand (EDR / HDR100)",
    },
    Preset { name: "eth25", bandwidth: 3.125e9, latency_us: 25.0, source: "25 Gb/s Ethernet" },
];

/// A `--link` specification that does not parse: the key at fault and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("link `{spec}`: {key}: {reason}")]
pub struct LinkSpecError {
    /// The whole specification.
    pub spec: String,
    /// The part at fault (`dilation`, `bandwidth`, a preset name, …).
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

/// The link model of a world: every directed rank pair's [`Link`] and the dilation.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkModel {
    /// What it models, for reports (`"pcie4"`, `"bandwidth=20 MB/s, latency=100 µs"`).
    pub name: String,
    /// The link of every pair not in `pairs`.
    pub link: Link,
    /// Links of particular `(src, dst)` pairs (world ranks).
    pub pairs: BTreeMap<(usize, usize), Link>,
    /// Every transfer takes this many times its modelled time.
    pub dilation: f64,
}

impl LinkModel {
    /// Every pair linked by `link`, no dilation.
    pub fn uniform(name: impl Into<String>, link: Link) -> Self {
        LinkModel { name: name.into(), link, pairs: BTreeMap::new(), dilation: 1.0 }
    }

    /// The preset `name`, if there is one.
    pub fn preset(name: &str) -> Option<Self> {
        PRESETS.iter().find(|p| p.name == name).map(|p| {
            let latency = Duration::from_secs_f64(p.latency_us * 1e-6);
            LinkModel::uniform(p.name, Link { bandwidth: p.bandwidth, latency })
        })
    }

    /// This model with `src → dst` linked by `link`.
    pub fn with_pair(mut self, src: usize, dst: usize, link: Link) -> Self {
        self.pairs.insert((src, dst), link);
        self
    }

    /// This model stretched by `dilation`.
    pub fn with_dilation(mut self, dilation: f64) -> Self {
        self.dilation = dilation;
        self
    }

    /// The link `src → dst` (world ranks).
    pub fn link(&self, src: usize, dst: usize) -> Link {
        self.pairs.get(&(src, dst)).copied().unwrap_or(self.link)
    }

    /// Parses a `--link` specification: a preset name or explicit `bandwidth=…,latency=…`,
    /// optionally with `dilation=F`, comma-separated: `pcie4`, `pcie4,dilation=1000`,
    /// `bandwidth=0.02GB/s,latency=100us`. Bandwidths take `B/s`, `KB/s`, `MB/s`, `GB/s` (and
    /// `Gb/s` for bits); latencies `ns`, `us`, `ms`, `s`.
    ///
    /// # Errors
    /// An unknown preset (listing the known ones), an unknown key, a value that does not
    /// parse, or a non-positive bandwidth or dilation (naming the key).
    pub fn parse(spec: &str) -> Result<Self, LinkSpecError> {
        let err = |key: &str, reason: String| LinkSpecError {
            spec: spec.to_string(),
            key: key.to_string(),
            reason,
        };
        let mut preset: Option<LinkModel> = None;
        let (mut bandwidth, mut latency, mut dilation) = (None, None, 1.0f64);
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                None => {
                    if preset.is_some() {
                        return Err(err(part, "a second preset name".into()));
                    }
                    preset = Some(LinkModel::preset(part).ok_or_else(|| {
                        let known: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
                        err(part, format!("unknown link; known links: {}", known.join(", ")))
                    })?);
                }
                Some((k, v)) => match k.trim() {
                    "bandwidth" => bandwidth = Some(parse_bandwidth(v).map_err(|r| err(k, r))?),
                    "latency" => latency = Some(parse_duration(v).map_err(|r| err(k, r))?),
                    "dilation" => {
                        dilation = v.trim().parse().map_err(|e| err(k, format!("`{v}`: {e}")))?
                    }
                    other => {
                        return Err(err(
                            other,
                            "unknown key; keys: bandwidth, latency, dilation (or a preset name)"
                                .into(),
                        ));
                    }
                },
            }
        }
        if !(dilation.is_finite() && dilation > 0.0) {
            return Err(err("dilation", format!("must be a positive number, got {dilation}")));
        }
        let mut model = match (preset, bandwidth) {
            (Some(p), _) => p,
            (None, Some(_)) => LinkModel::uniform(
                "",
                Link { bandwidth: 1.0, latency: latency.unwrap_or(Duration::ZERO) },
            ),
            (None, None) => {
                return Err(err(
                    "bandwidth",
                    "give a preset name or bandwidth=… (e.g. `pcie4` or `bandwidth=25GB/s`)".into(),
                ));
            }
        };
        if let Some(b) = bandwidth {
            model.link.bandwidth = b;
        }
        if let Some(l) = latency {
            model.link.latency = l;
        }
        model.dilation = dilation;
        if bandwidth.is_some() || latency.is_some() {
            let base =
                if model.name.is_empty() { String::new() } else { format!("{} ", model.name) };
            model.name = format!(
                "{base}bandwidth={}, latency={:?}",
                show_bandwidth(model.link.bandwidth),
                model.link.latency
            );
        }
        Ok(model)
    }

    /// One line for reports: name, bandwidth, latency, dilation.
    pub fn describe(&self) -> String {
        format!(
            "{} ({} per direction, latency {:?}, dilation {})",
            self.name,
            show_bandwidth(self.link.bandwidth),
            self.link.latency,
            self.dilation
        )
    }
}

fn show_bandwidth(b: f64) -> String {
    if b >= 1e9 {
        format!("{} GB/s", b / 1e9)
    } else if b >= 1e6 {
        format!("{} MB/s", b / 1e6)
    } else {
        format!("{b} B/s")
    }
}

fn split_unit(v: &str) -> (f64, String, String) {
    let v = v.trim();
    let at =
        v.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == '-' || c == '+'));
    let (num, unit) = match at {
        Some(i) => v.split_at(i),
        None => (v, ""),
    };
    (num.parse().unwrap_or(f64::NAN), num.to_string(), unit.trim().to_string())
}

fn parse_bandwidth(v: &str) -> Result<f64, String> {
    let (x, num, unit) = split_unit(v);
    let scale = match unit.as_str() {
        "B/s" | "" => 1.0,
        "KB/s" => 1e3,
        "MB/s" => 1e6,
        "GB/s" => 1e9,
        "Gb/s" | "Gbit/s" => 1e9 / 8.0,
        "Mb/s" => 1e6 / 8.0,
        other => {
            return Err(format!("`{v}`: unknown unit `{other}` (B/s, KB/s, MB/s, GB/s, Gb/s)"));
        }
    };
    if !x.is_finite() {
        return Err(format!("`{v}`: `{num}` is not a number"));
    }
    if x <= 0.0 {
        return Err(format!("must be positive, got `{v}`"));
    }
    Ok(x * scale)
}

fn parse_duration(v: &str) -> Result<Duration, String> {
    let (x, num, unit) = split_unit(v);
    let scale = match unit.as_str() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" | "" => 1.0,
        other => return Err(format!("`{v}`: unknown unit `{other}` (ns, us, ms, s)")),
    };
    if !x.is_finite() || x < 0.0 {
        return Err(format!("`{v}`: `{num}` is not a non-negative number"));
    }
    Ok(Duration::from_secs_f64(x * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_explicit_links_parse() {
        let m = LinkModel::parse("pcie4").unwrap();
        assert_eq!((m.link.bandwidth, m.dilation), (31.5e9, 1.0));
        let m = LinkModel::parse("pcie4,dilation=1000").unwrap();
        assert_eq!(m.dilation, 1000.0);
        let m = LinkModel::parse("bandwidth=0.02GB/s,latency=100us").unwrap();
        assert!((m.link.bandwidth - 2e7).abs() < 1e-3);
        assert_eq!(m.link.latency, Duration::from_micros(100));
        let m = LinkModel::parse("ib100,latency=1ms").unwrap();
        assert_eq!((m.link.bandwidth, m.link.latency), (12.5e9, Duration::from_millis(1)));
        let m = LinkModel::parse("bandwidth=100Gb/s").unwrap();
        assert_eq!(m.link.bandwidth, 12.5e9);
    }

    #[test]
    fn bad_specs_name_the_key() {
        let e = LinkModel::parse("pcie9").unwrap_err().to_string();
        assert!(e.contains("pcie9") && e.contains("known links: nvlink-a100"), "{e}");
        let e = LinkModel::parse("pcie4,dilation=0").unwrap_err().to_string();
        assert!(e.contains("dilation") && e.contains("positive"), "{e}");
        let e = LinkModel::parse("bandwidth=-3GB/s").unwrap_err().to_string();
        assert!(e.contains("bandwidth") && e.contains("positive"), "{e}");
        let e = LinkModel::parse("bandwidth=3 furlongs").unwrap_err().to_string();
        assert!(e.contains("unknown unit"), "{e}");
        let e = LinkModel::parse("speed=3GB/s").unwrap_err().to_string();
        assert!(e.contains("speed") && e.contains("unknown key"), "{e}");
        let e = LinkModel::parse("latency=5us").unwrap_err().to_string();
        assert!(e.contains("bandwidth"), "{e}");
    }

    #[test]
    fn a_transfer_takes_latency_plus_bytes_over_bandwidth_times_dilation() {
        let l = Link { bandwidth: 1e9, latency: Duration::from_micros(10) };
        assert_eq!(l.transfer_time(1_000_000, 1.0), Duration::from_micros(1010));
        assert_eq!(l.transfer_time(1_000_000, 10.0), Duration::from_micros(10100));
    }
}

//! Facts about the machine and the process, from Linux's `/proc`: the CPU model and its
//! SIMD flags, the load average, resident memory and its peak, and the CPU time other
//! processes used. Each reads as "unknown" (0, empty) where `/proc` is not there.

use std::time::Instant;

/// A `/proc/self/status` field in bytes (`VmHWM`, `VmRSS`); 0 where unreadable.
fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        })
        .map_or(0, |kb| kb * 1024)
}

/// Resets the process's peak resident set to its current size (Linux `clear_refs` 5);
/// returns the current resident set size.
pub(super) fn reset_peak_rss() -> u64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    status_bytes("VmRSS:")
}

/// The process's resident set size now (`VmRSS`; 0 where unreadable).
pub(crate) fn resident_bytes() -> u64 {
    status_bytes("VmRSS:")
}

/// The process's peak resident set since the last reset.
pub(super) fn peak_rss() -> u64 {
    status_bytes("VmHWM:")
}

/// The 1-, 5- and 15-minute load averages (`/proc/loadavg`); 0 where unreadable.
pub(super) fn load_average() -> [f64; 3] {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut v = s.split_whitespace().map(|x| x.parse().unwrap_or(0.0));
    [v.next().unwrap_or(0.0), v.next().unwrap_or(0.0), v.next().unwrap_or(0.0)]
}

/// The CPU model (`/proc/cpuinfo` `model name`); "unknown" where unreadable.
pub(super) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Flag-name prefixes of the SIMD extensions in an x86 `flags` line (SSE3 is `pni`, its
/// kernel name).
const X86_SIMD: &[&str] = &["sse", "ssse", "pni", "avx", "fma", "f16c", "amx"];

/// Flag-name prefixes of the SIMD extensions in an Arm `Features` line (NEON is `asimd`).
const ARM_SIMD: &[&str] = &["asimd", "sve", "sme"];

/// The CPU's SIMD flags (`/proc/cpuinfo`, see [`simd_flags`]); empty where unreadable.
pub(super) fn cpu_simd_flags() -> Vec<String> {
    simd_flags(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
}

/// The SIMD flags of the first processor of `/proc/cpuinfo` text, named and ordered as
/// there (and in `lscpu`): of its x86 `flags` line, the SSE, SSSE3, SSE3 (`pni`), AVX (all
/// `avx*`, AVX-512 included), FMA, F16C and AMX flags; of its Arm `Features` line, the
/// `asimd*`, `sve*` and `sme*` ones. Empty when there is neither line.
fn simd_flags(cpuinfo: &str) -> Vec<String> {
    let line = cpuinfo.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        match key.trim() {
            "flags" => Some((X86_SIMD, value)),
            "Features" => Some((ARM_SIMD, value)),
            _ => None,
        }
    });
    let Some((families, value)) = line else { return Vec::new() };
    value
        .split_whitespace()
        .filter(|f| families.iter().any(|p| f.starts_with(p)))
        .map(str::to_string)
        .collect()
}

/// Busy CPU time of the machine and of this process, to tell how much others used.
pub(super) struct CpuTimes {
    at: Instant,
    machine_busy: u64,
    own: u64,
}

impl CpuTimes {
    /// Clock ticks per second of `/proc` times (the Linux `USER_HZ`, 100 on every common
    /// configuration).
    const HZ: f64 = 100.0;

    pub(super) fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let v: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // user nice system idle iowait irq softirq steal …
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        let own = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                // Fields after the parenthesised command name; utime and stime are 14 and 15.
                let rest = s.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .unwrap_or(0);
        CpuTimes { at: Instant::now(), machine_busy: total.saturating_sub(idle), own }
    }

    /// Cores' worth of CPU other processes used since `self`.
    pub(super) fn other_cores_since(&self) -> f64 {
        let now = CpuTimes::now();
        let secs = now.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let others = (now.machine_busy - self.machine_busy.min(now.machine_busy)) as f64
            - (now.own - self.own.min(now.own)) as f64;
        (others / Self::HZ / secs).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_flags_come_from_the_first_flags_or_features_line() {
        let x86 = "processor\t: 0\nmodel name\t: AMD EPYC\n\
                   flags\t\t: fpu sse sse2 pni ssse3 fma sse4_1 sse4_2 avx f16c misalignsse \
                   avx2 sme avx512f avx512bw avx_vnni amx_tile\n\
                   vmx flags\t: ept avx\nbugs\t\t: sysret_ss_attrs\n\
                   processor\t: 1\nflags\t\t: fpu sse\n";
        assert_eq!(
            simd_flags(x86),
            [
                "sse", "sse2", "pni", "ssse3", "fma", "sse4_1", "sse4_2", "avx", "f16c", "avx2",
                "avx512f", "avx512bw", "avx_vnni", "amx_tile"
            ]
        );
        let arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimdhp sve sve2 sme bf16\n";
        assert_eq!(simd_flags(arm), ["asimd", "asimdhp", "sve", "sve2", "sme"]);
        assert!(simd_flags("").is_empty());
        assert!(simd_flags("processor\t: 0\nmodel name\t: ?\n").is_empty());
    }
}

//! Which device each rank computes on.
//!
//! On the CPU every rank uses Flex's one device. On CUDA (`--backend cuda`, a harness built
//! with the `cuda` feature) rank `i` runs on GPU `i mod visible GPUs`, or on
//! `devices[i mod len]` with an explicit `--devices 0,1,…` (TOML `[parallel] devices`); under a
//! launcher the rank of this process is its `LOCAL_RANK`. The driver is probed first: no
//! driver library, a driver that fails to initialise, no visible GPU, or a listed GPU that
//! does not exist is an error naming the setting, before any work — cudarc itself panics
//! when its libraries are missing, so the probe catches that and says it in words.

#[cfg(feature = "cuda")]
use crate::config::ParallelConfig;
#[cfg(feature = "cuda")]
use crate::error::{HarnessError, Result};

/// Parses `--devices 0,1,3`.
///
/// # Errors
/// An entry that is not a non-negative integer, or an empty list, naming the flag.
pub fn parse_devices(text: &str) -> crate::error::Result<Vec<usize>> {
    let ids: std::result::Result<Vec<usize>, _> =
        text.split(',').map(|s| s.trim().parse::<usize>()).collect();
    match ids {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => Err(crate::error::HarnessError::config(
            "--devices",
            format!("`{text}` is not a comma-separated list of GPU indices (e.g. 0,1)"),
        )),
    }
}

/// How many GPUs the CUDA driver shows this process (after `CUDA_VISIBLE_DEVICES`).
///
/// # Errors
/// No driver library could be loaded, the driver failed to initialise, or it shows no GPU —
/// each as a [`HarnessError::Config`] on `parallel.backend`.
#[cfg(feature = "cuda")]
pub fn visible_gpus() -> Result<usize> {
    // cudarc panics when libcuda cannot be loaded: catch it, without printing the panic.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let probed = std::panic::catch_unwind(cudarc::driver::CudaContext::device_count);
    std::panic::set_hook(hook);
    let visible = std::env::var("CUDA_VISIBLE_DEVICES")
        .map(|v| format!(" (CUDA_VISIBLE_DEVICES={v})"))
        .unwrap_or_default();
    let bad = |reason: String| HarnessError::config("parallel.backend (--backend cuda)", reason);
    match probed {
        Err(_) => Err(bad(
            "no CUDA driver library (libcuda.so) can be loaded on this machine: install the \
             NVIDIA driver, or run with --backend cpu"
                .into(),
        )),
        Ok(Err(e)) => Err(bad(format!("the CUDA driver failed to initialise: {e}{visible}"))),
        Ok(Ok(n)) if n <= 0 => Err(bad(format!("the CUDA driver shows no GPU{visible}"))),
        Ok(Ok(n)) => Ok(n as usize),
    }
}

/// The CUDA device of every rank this process runs (all ranks in one process; its own rank
/// under a launcher), checked against the GPUs the driver shows.
///
/// # Errors
/// [`visible_gpus`]'s, or a `--devices` entry beyond the visible GPUs.
#[cfg(feature = "cuda")]
pub fn cuda_devices(parallel: &ParallelConfig) -> Result<Vec<burn_cuda::CudaDevice>> {
    let count = visible_gpus()?;
    if let Some(&bad) = parallel.devices.iter().find(|&&d| d >= count) {
        return Err(HarnessError::config(
            "parallel.devices (--devices)",
            format!(
                "GPU {bad} does not exist: the driver shows {count} GPU{} (0..{count})",
                if count == 1 { "" } else { "s" }
            ),
        ));
    }
    let ranks: Vec<usize> = match &parallel.process {
        Some(p) => vec![p.local_rank],
        None => (0..parallel.world_size).collect(),
    };
    Ok(ranks
        .into_iter()
        .map(|r| {
            let index = if parallel.devices.is_empty() {
                r % count
            } else {
                parallel.devices[r % parallel.devices.len()]
            };
            burn_cuda::CudaDevice { index }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists_parse_and_bad_ones_are_named() {
        assert_eq!(parse_devices("0, 1,3").unwrap(), vec![0, 1, 3]);
        for bad in ["", "0,,1", "gpu0", "-1"] {
            let e = parse_devices(bad).unwrap_err().to_string();
            assert!(e.starts_with("--devices: ") && e.contains("GPU indices"), "{e}");
        }
    }
}

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

/// The transport of a run (see [`crate::config::CommKind`]): NCCL where `parallel.comm` asks
/// for it and it can work on `devices` (by rank), else `None`, the built-in communicator.
///
/// # Errors
/// `--comm nccl` where NCCL cannot work: not CUDA, a harness without the `nccl` feature, no
/// NCCL library, two in-process ranks on one GPU — each naming `parallel.comm`.
pub fn transport<B: burn::tensor::backend::Backend>(
    parallel: &crate::config::ParallelConfig,
    devices: &[B::Device],
) -> crate::error::Result<Option<std::sync::Arc<dyn parallel_core::Transport<B>>>> {
    use crate::config::{BackendKind, CommKind};
    let explicit = parallel.comm == CommKind::Nccl;
    let bad =
        |reason: String| crate::error::HarnessError::config("parallel.comm (--comm nccl)", reason);
    // Where NCCL cannot work: an error when asked for, the built-in communicator otherwise.
    let refuse = |reason: String| if explicit { Err(bad(reason)) } else { Ok(None) };
    if parallel.comm == CommKind::Builtin {
        return Ok(None);
    }
    if parallel.backend != BackendKind::Cuda {
        return refuse("NCCL moves CUDA tensors: it needs --backend cuda".into());
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = devices;
        refuse(
            "this harness was built without NCCL (cargo build --release -p harness --features \
             cuda,nccl)"
                .into(),
        )
    }
    #[cfg(feature = "nccl")]
    {
        let in_process = parallel.process.is_none();
        if in_process && parallel.world_size == 1 && !explicit {
            return Ok(None);
        }
        if let Err(e) = comm_nccl::check_library(0) {
            if !explicit {
                log::warn!("NCCL is not available, ranks use the built-in communicator: {e}");
            }
            return refuse(e.to_string());
        }
        if in_process {
            for r in 0..devices.len() {
                if let Some(q) = devices[..r].iter().position(|d| *d == devices[r]) {
                    return refuse(format!(
                        "ranks {q} and {r} share {:?}: NCCL needs one GPU per rank (more GPUs, \
                         --devices, or one process per GPU with harness launch)",
                        devices[r]
                    ));
                }
            }
        }
        let t: std::sync::Arc<dyn parallel_core::Transport<crate::CudaBackend>> =
            std::sync::Arc::new(comm_nccl::NcclTransport);
        let any: Box<dyn std::any::Any> = Box::new(Some(t));
        // B is the CUDA backend whenever parallel.backend is cuda (run and forward choose it
        // from the same setting).
        any.downcast::<Option<std::sync::Arc<dyn parallel_core::Transport<B>>>>()
            .map(|t| *t)
            .map_err(|_| bad("the CUDA backend was not the backend of this run".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_where_it_cannot_work_is_an_error_only_when_asked_for() {
        use crate::config::{BackendKind, CommKind, ParallelConfig};
        let mut p = ParallelConfig { world_size: 2, ..ParallelConfig::default() };
        assert!(transport::<crate::CpuBackend>(&p, &[]).unwrap().is_none());
        p.comm = CommKind::Nccl;
        let e = transport::<crate::CpuBackend>(&p, &[]).err().unwrap().to_string();
        assert_eq!(
            e,
            "parallel.comm (--comm nccl): NCCL moves CUDA tensors: it needs --backend cuda"
        );
        p.backend = BackendKind::Cuda;
        if !cfg!(feature = "nccl") {
            let e = transport::<crate::CpuBackend>(&p, &[]).err().unwrap().to_string();
            assert!(e.contains("built without NCCL") && e.contains("--features cuda,nccl"), "{e}");
        }
        p.comm = CommKind::Builtin;
        assert!(transport::<crate::CpuBackend>(&p, &[]).unwrap().is_none());
    }

    #[test]
    fn device_lists_parse_and_bad_ones_are_named() {
        assert_eq!(parse_devices("0, 1,3").unwrap(), vec![0, 1, 3]);
        for bad in ["", "0,,1", "gpu0", "-1"] {
            let e = parse_devices(bad).unwrap_err().to_string();
            assert!(e.starts_with("--devices: ") && e.contains("GPU indices"), "{e}");
        }
    }
}

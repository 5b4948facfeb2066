//! Times the patch-parallel decode of Stable Diffusion's VAE architecture (random weights,
//! float32, decoder only) on the CPU: `N` ranks as threads of one process, one Rayon thread
//! each, every rank decoding a band of latent rows with `ExactRows` seams (not run by CI).
//!
//! ```sh
//! cargo run --release -p models-vae --example vae_split -- 2 128   # 2 ranks, 1024² image
//! ```
//!
//! Arguments: ranks `N` (1 runs the plain whole-image `decode`), latent side (128 → 1024²,
//! 256 → 2048²), and for `N = 1` the decode's threads (default 1). Prints one JSON line: the decode's wall time, the process's peak RSS
//! (`VmHWM`, every rank together: the ranks are threads), the decoder's weight bytes (held
//! once per rank) and the estimate of one rank's peak activations, `(peak − N·weights)/N`
//! (the ranks run in lockstep, so their peaks coincide).

use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Distribution, Tensor};
use burn_flex::Flex;
use models_vae::{AutoencoderKLConfig, VaeParts};
use parallel_core::split::{ExactRows, balanced};
use parallel_core::{LaunchOptions, launch};

/// `stabilityai/sd-vae-ft-mse`'s (SD 1.x/2.x) `vae/config.json`.
const SD_VAE: &str = r#"{
  "_class_name": "AutoencoderKL", "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
  "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
  "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215
}"#;

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // As the harness binary does (glibc set for tensor-sized blocks).
    kernels::tune_allocator();
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1);
    let side: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(128);
    // Threads of the serial decode (N = 1 only; each of N > 1 ranks has one).
    let threads: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1);
    if threads == 0 || (n > 1 && threads != 1) {
        return Err(format!("threads: {threads} (at least 1, and 1 when N > 1)").into());
    }
    let config = AutoencoderKLConfig::from_json_str(SD_VAE)?;
    let z = Tensor::<Flex, 4>::random(
        [1, 4, side, side],
        Distribution::Normal(0.0, 1.0),
        &Default::default(),
    );
    let t0 = Instant::now();
    let weights = if n == 1 {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
        pool.install(|| -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
            let vae = config.init::<Flex>(VaeParts::DecoderOnly, &Default::default())?;
            let t = Instant::now();
            let out = vae.decode(z.clone())?;
            let _ = out.into_data();
            eprintln!("decode {:.2} s", t.elapsed().as_secs_f64());
            Ok(vae.num_params() * 4)
        })?
    } else {
        let bands = balanced(side, n);
        let options = LaunchOptions::default().with_threads_per_rank(1);
        let outs = launch(n, &options, |comm| {
            let vae = config
                .init::<Flex>(VaeParts::DecoderOnly, &Default::default())
                .map_err(|e| parallel_core::ParallelError::Model(e.to_string()))?;
            comm.barrier()?;
            let t = Instant::now();
            let mut seams = ExactRows::new(&comm, bands.clone(), side, "vae")?;
            let out = vae
                .decode_rows(z.clone(), bands[comm.rank()].clone(), &mut seams)
                .map_err(|e| parallel_core::ParallelError::Model(e.to_string()))?;
            let _ = out.into_data();
            comm.barrier()?;
            eprintln!("rank {} decode {:.2} s", comm.rank(), t.elapsed().as_secs_f64());
            Ok(vae.num_params() * 4)
        });
        outs.into_iter().next().expect("rank 0")?
    };
    let total = t0.elapsed().as_secs_f64();
    let peak = peak_rss_bytes();
    let per_rank = (peak.saturating_sub(n as u64 * weights as u64)) / n as u64;
    println!(
        "{{\"ranks\": {n}, \"image\": {}, \"wall_s_with_init\": {total:.2}, \"peak_rss_gb\": {:.3}, \
         \"weights_gb_per_rank\": {:.3}, \"est_peak_activations_gb_per_rank\": {:.3}}}",
        side * 8,
        peak as f64 / 1e9,
        weights as f64 / 1e9,
        per_rank as f64 / 1e9
    );
    Ok(())
}

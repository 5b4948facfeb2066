//! Decode time of the fixture VAE (ignored by default; run with
//! `cargo test -p models-vae --test integration timing -- --ignored --nocapture`). Dependencies are built
//! at opt-level 3 in every profile (see the workspace `Cargo.toml`), so the test profile times
//! Burn's kernels as a release build would.

use std::time::{Duration, Instant};

use crate::common::{B, load_vae, read_tensor, reference};
use burn::prelude::*;
use models_vae::VaeParts;

#[test]
#[ignore = "timing, not a check"]
fn decode_time_16x16_latent() {
    let vae = load_vae(VaeParts::DecoderOnly);
    let z = read_tensor(&reference("vae.safetensors"), "latents");
    let run = |z: Tensor<B, 4>| {
        let start = Instant::now();
        // into_data waits for the result.
        let _ = vae.decode_latents(z).unwrap().into_data();
        start.elapsed()
    };
    run(z.clone());
    let mut times: Vec<Duration> = (0..20).map(|_| run(z.clone())).collect();
    times.sort();
    println!(
        "decode [1, 4, 16, 16] -> [1, 3, 128, 128]: median {:?}, min {:?} over {} runs",
        times[times.len() / 2],
        times[0],
        times.len()
    );
}

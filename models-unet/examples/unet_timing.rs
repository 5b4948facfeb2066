//! Times one U-Net forward on the CPU (Flex backend, float32), to set beside
//! `tools/bench/unet_timing.py` on the same weights and inputs (not run by CI).
//!
//! ```sh
//! cargo run --release -p models-unet --example unet_timing -- target/bench/models/sd15-unet-seed0 1 3
//! ```
//!
//! Arguments: the folder `unet_timing.py --write` made (its `inputs.safetensors` holds
//! `sample`, `timestep`, `encoder_hidden_states`), the thread count (a Rayon pool of that
//! size runs the forward), and the timed repetitions (after one warm-up). Prints one line per
//! forward and a JSON summary on the last line.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use burn_flex::Flex;
use models_unet::UnetModel;
use parallel_core::{DenoiserInput, LoadPlan};

fn tensor<const D: usize>(t: &weights::HostTensor) -> Tensor<Flex, D> {
    let values: Vec<f32> = t.values.iter().map(|&v| v as f32).collect();
    Tensor::from_data(TensorData::new(values, t.shape.clone()), &Default::default())
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // As the harness binary does (glibc set for tensor-sized blocks).
    kernels::tune_allocator();
    let mut args = std::env::args().skip(1);
    let folder = PathBuf::from(args.next().ok_or("usage: unet_timing FOLDER [THREADS] [REPS]")?);
    let threads: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1);
    let reps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    pool.install(|| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let device = Default::default();
        let model = UnetModel::<Flex>::load(&folder, &LoadPlan::full(), &device)?;
        let inputs = weights::read_tensors(&folder.join("inputs.safetensors"))?;
        let mut input = DenoiserInput::new(tensor(&inputs["sample"]), tensor(&inputs["timestep"]));
        input.encoder_hidden_states = Some(tensor(&inputs["encoder_hidden_states"]));
        let mut times = Vec::new();
        for i in 0..1 + reps {
            let t0 = Instant::now();
            let out = model.forward(&input)?;
            let _ = out.into_data();
            let dt = t0.elapsed().as_secs_f64();
            println!("forward {i}: {dt:.3} s{}", if i == 0 { " (warmup)" } else { "" });
            if i > 0 {
                times.push(dt);
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "{{\"impl\": \"ours\", \"threads\": {threads}, \"median_s\": {median:.4}, \"times_s\": {times:?}, \"simd\": \"{}\"}}",
            kernels::simd_level()
        );
        Ok(())
    })
}

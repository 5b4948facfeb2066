//! One denoiser evaluation of every strategy on 2 ranks of 1 thread each, against serial on
//! 1 rank of 1 thread: `cpu/serial/n1/256px`, `cpu/ulysses/n2/256px`, … .
//!
//! The model is PixArt-XL-2-512's architecture (hidden 1152, 16 heads, feed-forward 4608)
//! cut to 2 transformer blocks, with random weights, at 256 px (32×32 latent, 256 tokens),
//! guidance batch 2 and 120 text tokens, so that `cargo bench` stays short; the full model
//! at 512 px is `harness bench`'s job. Per sample the ranks are launched once, build and
//! load their part (untimed), then after a barrier run `forward` `iters` times; each
//! iteration ends with `into_data()` of the prediction (the explicit sync); the sample's
//! time is the slowest rank's. PipeFusion's `forward` is its synchronous pass (no
//! pipelining across steps); DistriFusion runs with `warmup_steps = 1`, so every iteration
//! but a sample's first is a steady (stale K/V, asynchronous gather) step.

use std::time::{Duration, Instant};

use burn::tensor::{Distribution, Tensor};
use criterion::Criterion;
use models_dit::{DitModel, ModelConfig};
use parallel_core::{DenoiserInput, LaunchOptions, RequestInfo, StrategyOptions, launch};

type B = harness::CpuBackend;

const LATENT: usize = 32;
const TEXT: usize = 120;

fn config() -> ModelConfig {
    let mut c = ModelConfig::preset("PixArt-XL-2-512x512").expect("preset");
    if let ModelConfig::PixArt(p) = &mut c {
        p.num_layers = 2;
    }
    c
}

fn input(device: &burn::tensor::Device<B>) -> DenoiserInput<B> {
    let n = Distribution::Normal(0.0, 1.0);
    let mut i = DenoiserInput::new(
        Tensor::random([2, 4, LATENT, LATENT], n, device),
        Tensor::from_floats([500.0, 500.0], device),
    );
    i.encoder_hidden_states = Some(Tensor::random([2, TEXT, 4096], n, device));
    i.encoder_attention_mask = Some(Tensor::ones([2, TEXT], device));
    i
}

fn timed(name: &str, n: usize, iters: u64) -> Duration {
    let registry = harness::registry::<B>();
    let config = config();
    let desc = config.desc();
    let options = LaunchOptions::<B>::default().with_threads_per_rank(1);
    let times = launch(n, &options, |comm| {
        let device = comm.device();
        let input = input(&device);
        let request = RequestInfo {
            steps: iters as usize + 1,
            grid: input.grid(),
            batch: 2,
            images: 1,
            text_tokens: TEXT,
        };
        let mut options = StrategyOptions::new(name);
        if name == "distrifusion" {
            options.set("warmup_steps", parallel_core::OptionValue::Int(1));
        }
        let mut strategy = registry.create(name, comm.clone(), &options)?;
        strategy.validate(&desc, &request)?;
        let model = DitModel::<B>::random(&config, &strategy.load_plan(&desc)?, &device)
            .map_err(|e| parallel_core::ParallelError::Model(e.to_string()))?;
        strategy.begin_request(&desc, &request)?;
        comm.barrier()?;
        let start = Instant::now();
        for step in 0..iters as usize {
            std::hint::black_box(strategy.forward(&model, &input, step)?.into_data());
        }
        Ok(start.elapsed())
    });
    times.into_iter().map(|t| t.expect("rank")).max().unwrap_or_default()
}

fn strategies(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("serial/n1/256px", |b| b.iter_custom(|iters| timed("serial", 1, iters)));
    for name in ["tensor", "ulysses", "ring", "distrifusion", "naive_patch", "pipefusion"] {
        g.bench_function(format!("{name}/n2/256px"), |b| {
            b.iter_custom(|iters| timed(name, 2, iters))
        });
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    strategies(&mut c);
    c.final_summary();
}

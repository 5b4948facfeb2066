//! Stable Diffusion 1.5's U-Net architecture (random weights, float32) at a 64×64 latent
//! (512² images), batch 2 (the guidance pair): forward latency serial on one thread, beside
//! 2 ranks × 1 thread of `tensor` and of `distrifusion` (its synchronous step 0 and its stale,
//! overlapped steps after), with each rank's parameter and buffer bytes and what it sent
//! (not run by CI; numbers in `docs/BENCH.md`).
//!
//! ```sh
//! cargo run --release -p harness --example unet_strategies -- 3
//! ```
//!
//! Argument: forwards per strategy (DistriFusion: step 0 is the warmup, the rest stale).
//! Prints one JSON line per strategy. The ranks are threads of one process; each builds its
//! own (random) weights, which does not change the time of a forward.

use std::time::Instant;

use burn::tensor::{Distribution, Tensor};
use burn_flex::Flex;
use models_unet::{UNet2DConditionConfig, UnetModel};
use parallel_core::{
    Denoiser, DenoiserInput, LatentGrid, LaunchOptions, OptionValue, RequestInfo, StrategyOptions,
    launch,
};

type B = Flex;

fn input() -> DenoiserInput<B> {
    let dev = Default::default();
    let mut input = DenoiserInput::new(
        Tensor::random([2, 4, 64, 64], Distribution::Normal(0.0, 1.0), &dev),
        Tensor::from_floats([500.0, 500.0], &dev),
    );
    input.encoder_hidden_states =
        Some(Tensor::random([2, 77, 768], Distribution::Normal(0.0, 1.0), &dev));
    input
}

struct Rank {
    times: Vec<f64>,
    sent: Vec<u64>,
    params: u64,
    buffers: u64,
}

fn run(name: &str, n: usize, steps: usize, options: StrategyOptions) -> Vec<Rank> {
    let config = UNet2DConditionConfig::preset("sd15").expect("preset");
    let desc = config.desc();
    let registry = harness::registry::<B>();
    let launch_options = LaunchOptions::default().with_threads_per_rank(1);
    let grid = LatentGrid { height: 64, width: 64 };
    let request = RequestInfo { steps, grid, batch: 2, images: 1, text_tokens: 77 };
    launch(n, &launch_options, |comm| {
        let mut strategy = registry.create(name, comm.clone(), &options)?;
        strategy.validate(&desc, &request)?;
        let plan = strategy.load_plan(&desc)?;
        let model = UnetModel::<B>::random(&config, &plan, &comm.device())
            .map_err(|e| parallel_core::ParallelError::Model(e.to_string()))?;
        let input = input();
        strategy.begin_request(&desc, &request)?;
        let mut rank = Rank { times: Vec::new(), sent: Vec::new(), params: 0, buffers: 0 };
        for step in 0..steps {
            comm.barrier()?;
            comm.reset_stats();
            let t = Instant::now();
            let out = strategy.forward(&model, &input, step)?;
            let _ = out.into_data();
            rank.times.push(t.elapsed().as_secs_f64());
            rank.sent.push(comm.stats().total_elements() * 4);
        }
        rank.params = model.param_bytes();
        rank.buffers = strategy.buffer_bytes();
        Ok(rank)
    })
    .into_iter()
    .map(|r| r.expect("rank"))
    .collect()
}

fn main() {
    let steps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let gn = |mode: &str| {
        StrategyOptions::new("distrifusion")
            .with("warmup_steps", OptionValue::Int(1))
            .with("gn_mode", OptionValue::Str(mode.into()))
    };
    let cases: Vec<(&str, usize, StrategyOptions)> = vec![
        ("serial", 1, StrategyOptions::new("serial")),
        ("tensor", 2, StrategyOptions::new("tensor")),
        ("distrifusion", 2, gn("corrected_async")),
        ("naive_patch", 2, StrategyOptions::new("naive_patch")),
    ];
    for (name, n, options) in cases {
        let label = format!(
            "{name}[{}]",
            options.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
        );
        let ranks = run(name, n, steps, options);
        let r0 = &ranks[0];
        let fmt = |v: &[f64]| v.iter().map(|t| format!("{t:.2}")).collect::<Vec<_>>().join(", ");
        println!(
            "{{\"strategy\": \"{label}\", \"ranks\": {n}, \"forward_s\": [{}], \"sent_mb_per_forward\": [{}], \
             \"params_gb_per_rank\": {:.3}, \"buffers_mb_per_rank\": {:.1}}}",
            fmt(&r0.times),
            r0.sent
                .iter()
                .map(|b| format!("{:.1}", *b as f64 / 1e6))
                .collect::<Vec<_>>()
                .join(", "),
            r0.params as f64 / 1e9,
            r0.buffers as f64 / 1e6
        );
    }
}

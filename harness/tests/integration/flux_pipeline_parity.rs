//! The FLUX.1-dev pipeline against diffusers 0.42 (`fixtures/pipeline/reference-flux`, made
//! by `tools/fixtures/flux_pipeline.py` on `fixtures/pipeline/flux-tiny`): CLIP's pooled output
//! and T5's embeddings, the flow-matching schedule with FLUX's resolution-dependent
//! exponential shift, the loop with embedded guidance (no CFG batch, `timestep / 1000`), the
//! 16-channel VAE decode, and every MMDiT strategy on the same run, through `harness::run`.
//!
//! # Tolerances (measured on an Intel Xeon, AVX-512)
//! - `TEXT`: embeddings, relative L2 ≤ 2e-6 (the SD pipelines' bound).
//! - `LATENTS`: final latents, max relative error ≤ 1e-4 (the bound).
//! - `IMAGE`: the decoded image in [0, 1], max absolute error ≤ 1e-4.
//! - the schedule: timesteps and sigmas equal in float32 bits.

use std::collections::BTreeMap;
use std::path::PathBuf;

use harness::{CpuBackend, HostTensor, PipelineFolder, RunConfig};

type B = CpuBackend;

/// Prompt embeddings, relative L2.
const TEXT: f64 = 2e-6;
/// Final latents, max-relative (the bound).
const LATENTS: f64 = 1e-4;
/// Decoded image, max absolute.
const IMAGE: f64 = 1e-4;
/// T5 tokens of the fixture's calls (`max_sequence_length`).
const T5_TOKENS: usize = 32;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn reference(name: &str) -> BTreeMap<String, weights::HostTensor> {
    weights::read_tensors(&repo(&format!("fixtures/pipeline/reference-flux/{name}.safetensors")))
        .unwrap()
}

fn f32s(t: &weights::HostTensor) -> Vec<f32> {
    t.values.iter().map(|&v| v as f32).collect()
}

/// (reference file, height, width)
const CASES: [(&str, usize, usize); 2] = [("flux_dev", 128, 128), ("flux_dev_nonsquare", 128, 192)];

fn pipeline() -> PathBuf {
    repo("fixtures/pipeline/flux-tiny")
}

#[test]
fn flux_prompt_embeddings_match_diffusers() {
    let folder = PipelineFolder::open(pipeline()).unwrap();
    let text = folder.load_text::<B>(T5_TOKENS, &Default::default()).unwrap();
    let r = reference("flux_dev");
    let e = text.encode("a photo of a cat", None, false, (128, 128)).unwrap();
    let got = HostTensor::from_tensor(e.embeds).unwrap();
    assert_eq!(got.shape, vec![1, T5_TOKENS, 32]);
    let embeds = got.rel_l2_error(&f32s(&r["prompt_embeds"]));
    let pooled = HostTensor::from_tensor(e.added_cond["pooled_projections"].clone())
        .unwrap()
        .rel_l2_error(&f32s(&r["pooled_prompt_embeds"]));
    println!("flux: prompt embeddings rel L2 {embeds:.2e}, pooled {pooled:.2e}");
    assert!(embeds <= TEXT && pooled <= TEXT, "{embeds:.2e} {pooled:.2e}");
}

#[test]
fn flux_schedule_matches_diffusers() {
    for (file, h, w) in CASES {
        let r = reference(file);
        let folder = PipelineFolder::open(pipeline()).unwrap();
        let scheduler = folder.scheduler(None).unwrap();
        assert!(scheduler.uses_dynamic_shifting());
        let tokens = (h / 16) * (w / 16);
        let mu = schedulers::flux_mu(scheduler.config(), tokens);
        let s = scheduler.set_timesteps_dynamic(4, mu).unwrap();
        let t: Vec<f32> = s.timesteps().iter().map(|&t| t as f32).collect();
        assert_eq!(t, f32s(&r["timesteps"]), "{file}: timesteps (mu {mu})");
        assert_eq!(s.sigmas().unwrap(), f32s(&r["sigmas"]).as_slice(), "{file}: sigmas");
    }
}

fn config(file: &str, size: (usize, usize), parallel: harness::ParallelConfig) -> RunConfig {
    let r = reference(file);
    let name = format!(
        "flux-{file}-{}-{}-{}",
        parallel.strategy, parallel.world_size, parallel.cfg_degree
    );
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let latents = dir.join("initial.safetensors");
    let initial = HostTensor {
        shape: r["initial_latents"].shape.clone(),
        values: f32s(&r["initial_latents"]),
    };
    weights::write_tensors::<B, 4>(
        &latents,
        &[("latents", initial.to_tensor(&Default::default()))],
    )
    .unwrap();
    RunConfig {
        model: pipeline(),
        prompt: "a photo of a cat".into(),
        steps: 4,
        guidance_scale: Some(3.5),
        height: Some(size.0),
        width: Some(size.1),
        max_sequence_length: Some(T5_TOKENS),
        latents: Some(latents),
        output: PathBuf::new(),
        parallel,
        ..RunConfig::default()
    }
}

fn run(cfg: &RunConfig) -> Result<harness::RunReport, String> {
    harness::run_with_options(cfg, &harness::RunOptions { decode: false, progress: false })
        .map_err(|e| e.to_string())
}

#[test]
fn flux_runs_and_decodes_match_diffusers() {
    for (file, h, w) in CASES {
        let r = reference(file);
        let report = run(&config(file, (h, w), Default::default())).unwrap();
        let err = report.latents.max_rel_error(&f32s(&r["latents"]));
        println!("{file}: final latents max rel error {err:.2e}");
        assert!(err <= LATENTS, "{file}: {err:.2e}");
        if file == "flux_dev" {
            let folder = PipelineFolder::open(pipeline()).unwrap();
            let vae = folder.load_vae::<B>(&Default::default()).unwrap();
            let decoded =
                vae.decode_latents(report.latents.to_tensor(&Default::default())).unwrap();
            let img =
                HostTensor::from_tensor(decoded.div_scalar(2.0).add_scalar(0.5).clamp(0.0, 1.0))
                    .unwrap();
            let want = f32s(&r["image"]);
            let max_abs =
                img.values.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            println!("{file}: image max abs error {max_abs:.2e}");
            assert!(f64::from(max_abs) <= IMAGE, "{file}: {max_abs:.2e}");
        }
    }
}

/// The FLUX pipeline with every MMDiT strategy: the fresh ones and DistriFusion with warmup ≥
/// steps equal the serial run within `EXACT` (max-relative), DistriFusion after warmup and
/// naive patch differ; CFG parallelism is refused (FLUX.1-dev has no guidance batch).
#[test]
fn flux_strategies_run_the_pipeline() {
    const EXACT: f64 = 2e-5;
    let int = toml::Value::Integer;
    type Opt = (&'static str, toml::Value);
    let runs: Vec<(&str, usize, Vec<Opt>, bool)> = vec![
        ("tensor", 2, vec![], true),
        ("ulysses", 2, vec![], true),
        ("ring", 4, vec![], true),
        ("usp", 4, vec![("ring_degree", int(2))], true),
        ("distrifusion", 2, vec![("warmup_steps", int(100))], true),
        ("distrifusion", 2, vec![("warmup_steps", int(1))], false),
        ("naive_patch", 2, vec![], false),
    ];
    let (file, h, w) = CASES[0];
    let serial = run(&config(file, (h, w), Default::default())).unwrap();
    for (strategy, n, options, exact) in runs {
        let mut parallel = harness::ParallelConfig {
            strategy: strategy.to_string(),
            world_size: n,
            threads_per_rank: Some(1),
            ..Default::default()
        };
        for (k, v) in &options {
            parallel.options.insert(k.to_string(), v.clone());
        }
        let report = run(&config(file, (h, w), parallel))
            .unwrap_or_else(|e| panic!("{strategy} n={n}: {e}"));
        let got = report.latents.max_rel_error(&serial.latents.values);
        println!("{strategy} n={n} {options:?}: max rel vs serial {got:.2e}");
        if exact {
            assert!(got <= EXACT, "{strategy} n={n}: {got:.2e}");
        } else {
            assert!(got > EXACT, "{strategy} n={n} equals serial: {got:.2e}");
        }
    }
    let cfg2 = harness::ParallelConfig {
        strategy: "ulysses".into(),
        world_size: 4,
        cfg_degree: 2,
        ..Default::default()
    };
    let err = run(&config(file, (h, w), cfg2)).unwrap_err();
    assert!(err.contains("cfg_degree"), "{err}");
}

//! The Stable Diffusion and SDXL pipelines against diffusers 0.42 (`fixtures/pipeline/
//! reference-sd`, made by `tools/fixtures/sd_pipelines.py`; see `tools/fixtures/PIPELINE.md`):
//! CLIP prompt encoding (SDXL: both encoders, pooled embeddings, zeroed unconditional
//! embeddings), the guided loop with fixed initial latents under PNDM, DDIM and Euler, and the
//! VAE decode, each through `harness::run` as the CLI runs it.
//!
//! # Tolerances (measured on the reference machine, AMD EPYC, AVX2)
//! - `TEXT`: prompt embeddings, relative L2 ≤ 2e-6 (as the PixArt pipeline's T5 bound): a
//!   tiny CLIP in float32; see the measured values printed by the test.
//! - `LATENTS`: final latents, max relative error `max|a−b| / max|b|` ≤ 1e-4, the issue's
//!   bound: the U-Net's float32 rounding (≤ 1.1e-6 relative L2 per forward) through 4–5 guided
//!   steps (guidance 7.5 multiplies the difference of the two halves).
//! - `IMAGE`: the decoded image in [0, 1], max absolute error ≤ 1e-4.

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

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn reference(name: &str) -> BTreeMap<String, weights::HostTensor> {
    weights::read_tensors(&repo(&format!("fixtures/pipeline/reference-sd/{name}"))).unwrap()
}

fn f32s(t: &weights::HostTensor) -> Vec<f32> {
    t.values.iter().map(|&v| v as f32).collect()
}

fn host<const D: usize>(t: burn::tensor::Tensor<B, D>) -> HostTensor {
    HostTensor::from_tensor(t).unwrap()
}

struct Case {
    file: &'static str,
    pipeline: &'static str,
    negative: Option<&'static str>,
    scheduler: Option<&'static str>,
    size: (usize, usize),
}

const CASES: [Case; 7] = [
    Case {
        file: "sd15_pndm",
        pipeline: "sd15-tiny",
        negative: Some(""),
        scheduler: None,
        size: (128, 128),
    },
    Case {
        file: "sd15_ddim",
        pipeline: "sd15-tiny",
        negative: Some(""),
        scheduler: Some("ddim"),
        size: (128, 128),
    },
    Case {
        file: "sd15_pndm_negative",
        pipeline: "sd15-tiny",
        negative: Some("blurry"),
        scheduler: None,
        size: (128, 128),
    },
    Case {
        file: "sd15_pndm_nonsquare",
        pipeline: "sd15-tiny",
        negative: Some(""),
        scheduler: None,
        size: (128, 192),
    },
    Case {
        file: "sdxl_euler",
        pipeline: "sdxl-tiny",
        negative: None,
        scheduler: None,
        size: (128, 128),
    },
    Case {
        file: "sdxl_euler_negative",
        pipeline: "sdxl-tiny",
        negative: Some("blurry"),
        scheduler: None,
        size: (128, 128),
    },
    Case {
        file: "sdxl_euler_nonsquare",
        pipeline: "sdxl-tiny",
        negative: None,
        scheduler: None,
        size: (192, 128),
    },
];

fn folder(case: &Case) -> PathBuf {
    repo(&format!("fixtures/pipeline/{}", case.pipeline))
}

/// The prompt embeddings (and SDXL's pooled embeddings and time ids) of `case` against the
/// reference; returns the worst relative L2.
fn check_text(case: &Case) -> f64 {
    let r = reference(&format!("{}.safetensors", case.file));
    let device = Default::default();
    let folder = PipelineFolder::open(folder(case)).unwrap();
    let text = folder.load_text::<B>(77, &device).unwrap();
    let embeds = text.encode("a photo of a cat", case.negative, true, case.size).unwrap();
    let want = [f32s(&r["negative_prompt_embeds"]), f32s(&r["prompt_embeds"])].concat();
    let mut worst = host(embeds.embeds).rel_l2_error(&want);
    assert!(embeds.mask.is_none(), "the SD pipelines pass no text mask");
    if let Some(pooled) = embeds.added_cond.get("text_embeds") {
        let want =
            [f32s(&r["negative_pooled_prompt_embeds"]), f32s(&r["pooled_prompt_embeds"])].concat();
        let got = host(pooled.clone());
        // Zeroed unconditional embeddings compare exactly; rel L2 over the pair otherwise.
        worst = worst.max(got.rel_l2_error(&want));
        let ids = host(embeds.added_cond["time_ids"].clone()).values;
        let want_ids = f32s(&r["add_time_ids"]);
        assert_eq!(ids, [want_ids.clone(), want_ids].concat(), "{}: add_time_ids", case.file);
    }
    println!("{}: prompt embeddings rel L2 {worst:.2e}", case.file);
    worst
}

/// The run of `case` with the reference's initial latents, under `parallel`.
fn config(case: &Case, decode: bool, parallel: harness::ParallelConfig) -> RunConfig {
    let r = reference(&format!("{}.safetensors", case.file));
    let name = format!("sd-{}-{}-{}", case.file, parallel.strategy, parallel.world_size);
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
        model: folder(case),
        prompt: "a photo of a cat".into(),
        negative_prompt: case.negative.map(str::to_string),
        steps: 4,
        guidance_scale: Some(7.5),
        height: Some(case.size.0),
        width: Some(case.size.1),
        scheduler: case.scheduler.map(str::to_string),
        latents: Some(latents),
        output: if decode { dir.join("image.png") } else { PathBuf::new() },
        parallel,
        ..RunConfig::default()
    }
}

fn run_case(
    case: &Case,
    decode: bool,
) -> (harness::RunReport, BTreeMap<String, weights::HostTensor>) {
    let r = reference(&format!("{}.safetensors", case.file));
    let cfg = config(case, decode, harness::ParallelConfig::default());
    let report =
        harness::run_with_options(&cfg, &harness::RunOptions { decode, progress: false }).unwrap();
    assert_eq!(report.step_times.len(), r["timesteps"].shape[0], "{}: steps", case.file);
    (report, r)
}

#[test]
fn prompt_embeddings_match_diffusers() {
    for case in &CASES {
        assert!(check_text(case) <= TEXT, "{}", case.file);
    }
}

#[test]
fn runs_match_diffusers() {
    let mut worst = 0f64;
    for case in &CASES {
        let (report, r) = run_case(case, false);
        let err = report.latents.max_rel_error(&f32s(&r["latents"]));
        println!("{}: final latents max rel error {err:.2e}", case.file);
        assert!(err <= LATENTS, "{}: {err:.2e}", case.file);
        worst = worst.max(err);
    }
    println!("worst final latents max rel error {worst:.2e}");
}

#[test]
fn decoded_images_match_diffusers() {
    for case in CASES.iter().filter(|c| c.file == "sd15_pndm" || c.file == "sdxl_euler") {
        let (report, r) = run_case(case, true);
        let image = report.decoded.expect("decoded");
        let _ = image;
        let folder = PipelineFolder::open(folder(case)).unwrap();
        let vae = folder.load_vae::<B>(&Default::default()).unwrap();
        let decoded = vae.decode_latents(report.latents.to_tensor(&Default::default())).unwrap();
        let img = host(decoded.div_scalar(2.0).add_scalar(0.5).clamp(0.0, 1.0));
        let want = f32s(&r["image"]);
        let max_abs = img.values.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        println!("{}: image max abs error {max_abs:.2e}", case.file);
        assert!(f64::from(max_abs) <= IMAGE, "{}: {max_abs:.2e}", case.file);
    }
}

/// The pipelines with the U-Net strategies (`harness run --strategy …` as the CLI runs
/// them): where a strategy is exact — tensor parallelism, DistriFusion with warmup ≥ steps —
/// its final latents equal the serial run's within `EXACT` (max-relative; measured ≤ 2.3e-6:
/// the reordered float32 sums of all-reduces and merged statistics through 4 guided steps),
/// and so equal diffusers; DistriFusion after warmup and naive patch run and differ from
/// serial by more than that (their seams are not exact by design).
#[test]
fn u_net_strategies_run_the_pipelines() {
    const EXACT: f64 = 2e-5;
    type Opt = (&'static str, toml::Value);
    let int = toml::Value::Integer;
    // (strategy, world size, options, cfg degree, exact)
    let runs: [(&str, usize, Vec<Opt>, usize, bool); 9] = [
        ("tensor", 2, vec![], 1, true),
        ("distrifusion", 2, vec![("warmup_steps", int(100))], 1, true),
        ("distrifusion", 4, vec![("warmup_steps", int(100))], 1, true),
        ("distrifusion", 2, vec![("warmup_steps", int(1))], 1, false),
        ("naive_patch", 2, vec![], 1, false),
        ("naive_patch", 4, vec![], 1, false),
        // CFG parallelism around U-Net strategies: the guidance halves on two groups.
        ("serial", 2, vec![], 2, true),
        ("tensor", 4, vec![], 2, true),
        ("distrifusion", 4, vec![("warmup_steps", int(100))], 2, true),
    ];
    for case in CASES.iter().filter(|c| c.file == "sd15_pndm" || c.file == "sdxl_euler") {
        let (serial, _) = run_case(case, false);
        let want = serial.latents.values.clone();
        for (strategy, n, options, cfg_degree, exact) in &runs {
            let mut parallel = harness::ParallelConfig {
                strategy: strategy.to_string(),
                world_size: *n,
                cfg_degree: *cfg_degree,
                threads_per_rank: Some(1),
                ..Default::default()
            };
            for (k, v) in options {
                parallel.options.insert(k.to_string(), v.clone());
            }
            let got = match run_parallel(case, parallel) {
                Ok(report) => report.latents.max_rel_error(&want),
                // The tiny SD 1.5's 16 latent rows are 2 rows of its 8-row granularity.
                Err(e) if *n / cfg_degree == 4 && case.pipeline == "sd15-tiny" => {
                    assert!(e.contains("fewer than the 4 ranks"), "{e}");
                    continue;
                }
                Err(e) => panic!("{} {strategy} n={n} cfg {cfg_degree}: {e}", case.file),
            };
            println!(
                "{} {strategy} n={n} cfg {cfg_degree} {options:?}: max rel vs serial {got:.2e}",
                case.file
            );
            if *exact {
                assert!(got <= EXACT, "{} {strategy} n={n}: {got:.2e}", case.file);
            } else {
                assert!(got > EXACT, "{} {strategy} n={n} equals serial: {got:.2e}", case.file);
            }
        }
    }
}

fn run_parallel(
    case: &Case,
    parallel: harness::ParallelConfig,
) -> Result<harness::RunReport, String> {
    let cfg = config(case, false, parallel);
    harness::run_with_options(&cfg, &harness::RunOptions { decode: false, progress: false })
        .map_err(|e| e.to_string())
}

/// `vae_parallel`: the decode split by rows over the run's ranks gives the image rank 0
/// decodes alone, with any strategy (here tensor on 2 ranks, naive patch on 4: the latents
/// are the same with and without the split decode, so only the decode differs). Pixels may
/// differ by one 8-bit level where float32 reordering (≤ 1.3e-6 relative, see
/// `models-vae/tests/integration/banded.rs`) crosses a rounding boundary; measured: 1–2 of 49 152.
#[test]
fn the_split_vae_decode_equals_rank_0s() {
    for case in CASES.iter().filter(|c| c.file == "sd15_pndm" || c.file == "sdxl_euler") {
        for (strategy, n) in [("tensor", 2), ("naive_patch", 4)] {
            if n == 4 && case.pipeline == "sd15-tiny" {
                continue; // 2 rows of its 8-row granularity: naive patch refuses 4 ranks.
            }
            let parallel = |vae_parallel| harness::ParallelConfig {
                strategy: strategy.to_string(),
                world_size: n,
                threads_per_rank: Some(1),
                vae_parallel,
                ..Default::default()
            };
            let decode = |vae_parallel| {
                let cfg = config(case, true, parallel(vae_parallel));
                let options = harness::RunOptions { decode: true, progress: false };
                harness::run_with_options(&cfg, &options).unwrap().decoded.unwrap()
            };
            let (alone, split) = (decode(false), decode(true));
            assert_eq!(alone.dimensions(), split.dimensions());
            let diffs: Vec<i16> = alone
                .as_raw()
                .iter()
                .zip(split.as_raw())
                .map(|(a, b)| i16::from(*a) - i16::from(*b))
                .filter(|d| *d != 0)
                .collect();
            println!("{} {strategy} n={n}: {} pixel values differ", case.file, diffs.len());
            assert!(diffs.iter().all(|d| d.abs() <= 1), "{}: {diffs:?}", case.file);
            assert!(diffs.len() * 1000 <= alone.as_raw().len(), "{}: {}", case.file, diffs.len());
        }
    }
}

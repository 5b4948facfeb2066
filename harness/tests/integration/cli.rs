//! The `harness` binary end to end: every user error is one clear line on stderr naming the
//! culprit, a non-zero exit, and never a panic; `forward`, `run` and `list` do their job.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn harness(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(args)
        .current_dir(repo(""))
        .output()
        .expect("the harness binary runs")
}

/// Runs a command that must fail; returns its stderr after the common checks.
fn fails(args: &[&str]) -> String {
    let out = harness(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} succeeded; stderr: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    stderr
}

fn succeeds(args: &[&str]) -> String {
    let out = harness(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_typo_in_the_config_names_the_key_file_and_line() {
    let dir = tmp("typo");
    let cfg = dir.join("typo.toml");
    std::fs::write(&cfg, "prompt = \"a cat\"\nstpes = 4\n").unwrap();
    let err = fails(&["run", s(&cfg)]);
    assert!(
        err.contains("typo.toml") && err.contains("`stpes`") && err.contains("line 2"),
        "{err}"
    );
    let cfg = dir.join("nested.toml");
    std::fs::write(&cfg, "[parallel]\nworld_sise = 2\n").unwrap();
    let err = fails(&["run", s(&cfg)]);
    assert!(err.contains("`world_sise`"), "{err}");
}

/// A copy of the tiny pipeline in `dir`, without the component `skip`.
fn copy_pipeline(dir: &Path, skip: &str) {
    copy_pipeline_from("fixtures/pipeline/pixart-alpha-tiny", dir, skip);
}

/// A copy of the pipeline folder `src` in `dir`, without the component `skip`.
fn copy_pipeline_from(src: &str, dir: &Path, skip: &str) {
    let src = repo(src);
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == skip {
            continue;
        }
        let to = dir.join(&name);
        if entry.path().is_dir() {
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(entry.path()).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        } else {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
}

#[test]
fn a_missing_component_folder_is_named() {
    let dir = tmp("missing-vae");
    copy_pipeline(&dir, "vae");
    let err = fails(&["run", "configs/demo.toml", "--model", s(&dir), "--steps", "2"]);
    assert!(err.contains("missing component folder `vae/`"), "{err}");
}

#[test]
fn stable_diffusion_pipelines_run_and_name_what_is_missing() {
    for (pipeline, size) in
        [("fixtures/pipeline/sd15-tiny", "128"), ("fixtures/pipeline/sdxl-tiny", "192")]
    {
        let dir = tmp(&format!("sd-run-{size}"));
        let png = dir.join("sd.png");
        let stdout = succeeds(&[
            "run",
            "--model",
            pipeline,
            "--prompt",
            "a photo of a cat",
            "--steps",
            "2",
            "--height",
            size,
            "--output",
            s(&png),
        ]);
        assert!(stdout.contains("steps/s"), "{stdout}");
        assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    }
    // The U-Net strategies run the pipeline, with the split VAE decode too; Ulysses, Ring and
    // PipeFusion refuse a U-Net, naming the family.
    let dir = tmp("sd-parallel");
    for strategy in ["naive_patch", "distrifusion", "tensor"] {
        let png = dir.join(format!("{strategy}.png"));
        succeeds(&[
            "run",
            "--model",
            "fixtures/pipeline/sd15-tiny",
            "--steps",
            "2",
            "--strategy",
            strategy,
            "--world-size",
            "2",
            "--vae-parallel",
            "--output",
            s(&png),
        ]);
        assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    }
    // A split decode with more ranks than latent rows: refused before any work, naming the
    // setting.
    let err = fails(&[
        "run",
        "--model",
        "fixtures/pipeline/sd15-tiny",
        "--steps",
        "1",
        "--height",
        "8",
        "--world-size",
        "2",
        "--strategy",
        "tensor",
        "--vae-parallel",
    ]);
    assert!(
        err.contains("parallel.vae_parallel") && err.contains("fewer than the 2 ranks"),
        "{err}"
    );
    let err = fails(&[
        "run",
        "--model",
        "fixtures/pipeline/sd15-tiny",
        "--steps",
        "1",
        "--strategy",
        "ulysses",
        "--world-size",
        "2",
    ]);
    assert!(err.contains("U-Net"), "{err}");
    let err = fails(&[
        "run",
        "--model",
        "fixtures/pipeline/sd15-tiny",
        "--steps",
        "1",
        "--max-sequence-length",
        "100",
    ]);
    assert!(
        err.contains("max_sequence_length") && err.contains("StableDiffusionPipeline"),
        "{err}"
    );
    // A scheduler class this toolkit does not implement: named, with the known ones and the
    // flag that overrides it.
    let dir = tmp("sd-lms");
    copy_pipeline_from("fixtures/pipeline/sd15-tiny", &dir, "");
    let config = dir.join("scheduler/scheduler_config.json");
    let text =
        std::fs::read_to_string(&config).unwrap().replace("PNDMScheduler", "LMSDiscreteScheduler");
    std::fs::write(&config, text).unwrap();
    let err = fails(&["run", "--model", s(&dir), "--steps", "1"]);
    assert!(
        err.contains("LMSDiscreteScheduler")
            && err.contains("PNDMScheduler")
            && err.contains("--scheduler"),
        "{err}"
    );
    succeeds(&[
        "run",
        "--model",
        s(&dir),
        "--steps",
        "1",
        "--scheduler",
        "ddim",
        "--output",
        s(&dir.join("x.png")),
    ]);
    let dir = tmp("sdxl-missing");
    copy_pipeline_from("fixtures/pipeline/sdxl-tiny", &dir, "tokenizer_2");
    let err = fails(&["run", "--model", s(&dir), "--steps", "1"]);
    assert!(err.contains("missing component folder `tokenizer_2/`"), "{err}");
}

#[test]
fn a_failure_on_rank_0_is_reported_by_its_cause_not_as_peers_aborting() {
    // Rank 0 alone loads the VAE; the other rank waits for the text broadcast meanwhile.
    let dir = tmp("corrupt-vae");
    copy_pipeline(&dir, "");
    let weights = dir.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&[
        "run",
        "configs/demo.toml",
        "--model",
        s(&dir),
        "--strategy",
        "ulysses",
        "--world-size",
        "2",
        "--timeout-secs",
        "60",
        "--output",
        s(&dir.join("never.png")),
    ]);
    assert!(err.contains("vae") && err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    assert!(!err.contains("aborted"), "{err}");
}

/// Sets every value of float32 tensor `key` in a safetensors file to `value`.
fn poison(file: &Path, key: &str, value: f32) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let entry = &header[key];
    assert_eq!(entry["dtype"], "F32", "{key}");
    let start = 8 + n + entry["data_offsets"][0].as_u64().unwrap() as usize;
    let end = 8 + n + entry["data_offsets"][1].as_u64().unwrap() as usize;
    for chunk in bytes[start..end].chunks_exact_mut(4) {
        chunk.copy_from_slice(&value.to_le_bytes());
    }
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn non_finite_weights_are_an_error_naming_the_step_not_a_black_png() {
    for (value, strategy) in [(f32::NAN, "serial"), (f32::INFINITY, "ring")] {
        let dir = tmp(&format!("non-finite-{strategy}"));
        copy_pipeline(&dir, "");
        poison(
            &dir.join("transformer/diffusion_pytorch_model.safetensors"),
            "proj_out.bias",
            value,
        );
        let png = dir.join("never.png");
        let world = if strategy == "serial" { "1" } else { "2" };
        let err = fails(&[
            "run",
            "configs/demo.toml",
            "--model",
            s(&dir),
            "--steps",
            "2",
            "--strategy",
            strategy,
            "--world-size",
            world,
            "--output",
            s(&png),
        ]);
        assert!(
            err.contains("non-finite") && err.contains("noise prediction of step 0"),
            "{strategy}: {err}"
        );
        assert!(err.contains("sampler on rank "), "{strategy}: {err}");
        assert!(!png.exists(), "{strategy}: a PNG was written");
    }
}

#[test]
fn a_transformer_that_does_not_fit_the_text_encoder_is_refused_before_loading() {
    // PixArt-α 1024-MS style (additional conditions) with 24 caption channels; T5 gives 32.
    let dir = tmp("mismatch");
    copy_pipeline(&dir, "transformer");
    std::fs::create_dir_all(dir.join("transformer")).unwrap();
    std::fs::copy(
        repo("fixtures/dit/pixart-alpha-ms/config.json"),
        dir.join("transformer/config.json"),
    )
    .unwrap();
    let err = fails(&["run", "configs/demo.toml", "--model", s(&dir)]);
    assert!(err.contains("`caption_channels` is 24") && err.contains("`d_model` is 32"), "{err}");
}

#[test]
fn a_height_not_divisible_by_vae_factor_times_patch_is_refused() {
    // The demo pipeline: a VAE of 4× down-sampling, patch 2.
    let err = fails(&["run", "configs/demo.toml", "--height", "100"]);
    assert!(err.contains("height") && err.contains("multiple of 8"), "{err}");
    let err = fails(&["run", "configs/demo.toml", "--width", "60"]);
    assert!(err.contains("width") && err.contains("multiple of 8"), "{err}");
    let tiny = "fixtures/pipeline/pixart-alpha-tiny";
    let err = fails(&["run", "configs/demo.toml", "--model", tiny, "--height", "120"]);
    assert!(err.contains("height") && err.contains("multiple of 16"), "{err}");
}

#[test]
fn an_unknown_strategy_lists_the_known_ones() {
    let err = fails(&["run", "configs/demo.toml", "--strategy", "ulyses"]);
    assert!(err.contains("unknown strategy `ulyses`"), "{err}");
    for known in ["serial", "ulysses", "usp", "ring", "tensor", "distrifusion", "pipefusion"] {
        assert!(err.contains(known), "{known} not listed: {err}");
    }
}

#[test]
fn a_world_size_the_strategy_cannot_use_is_refused() {
    let err = fails(&["run", "configs/demo.toml", "--strategy", "ulysses", "--world-size", "3"]);
    assert!(err.contains("4 attention heads") && err.contains("Ulysses degree 3"), "{err}");
    let err = fails(&["run", "configs/demo.toml", "--strategy", "serial", "--world-size", "2"]);
    assert!(err.contains("--world-size 1"), "{err}");
    let err = fails(&["run", "configs/demo.toml", "--strategy", "pipefusion", "--world-size", "8"]);
    assert!(err.contains("fewer than the 8 pipeline stages"), "{err}");
}

#[test]
fn cfg_degrees_the_run_cannot_take_are_refused_naming_the_setting() {
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "configs/demo.toml"];
        args.extend_from_slice(extra);
        fails(&args)
    };
    let err = run(&["--world-size", "2", "--cfg-degree", "2", "--guidance-scale", "1"]);
    assert!(err.contains("parallel.cfg_degree") && err.contains("guidance is off"), "{err}");
    let err = run(&["--world-size", "3", "--cfg-degree", "2"]);
    assert!(err.contains("parallel.cfg_degree") && err.contains("does not divide the 3"), "{err}");
    let err = run(&["--world-size", "4", "--cfg-degree", "3"]);
    assert!(err.contains("parallel.cfg_degree") && err.contains("1 or 2"), "{err}");
    // The inner strategy's degrees must fill its half: every degree is named.
    let err = run(&[
        "--strategy",
        "usp",
        "--world-size",
        "4",
        "--cfg-degree",
        "2",
        "--ulysses-degree",
        "2",
        "--ring-degree",
        "2",
    ]);
    assert!(
        err.contains("ulysses_degree 2 × ring_degree 2") && err.contains("2 groups of 2"),
        "{err}"
    );
    let png = tmp("cfg2").join("serial.png");
    let out = succeeds(&[
        "run",
        "configs/demo.toml",
        "--strategy",
        "serial",
        "--world-size",
        "2",
        "--cfg-degree",
        "2",
        "--steps",
        "2",
        "--output",
        s(&png),
    ]);
    assert!(out.contains("cfg2×serial on 2 ranks"), "{out}");
}

#[test]
fn data_parallel_replicas_draw_the_images_of_consecutive_seeds() {
    let dir = tmp("dp");
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "configs/demo.toml", "--steps", "3", "--threads-per-rank", "1"];
        args.extend_from_slice(extra);
        succeeds(&args)
    };
    let (png, lat) = (dir.join("dp.png"), dir.join("dp.safetensors"));
    let out = run(&[
        "--seed",
        "7",
        "--world-size",
        "4",
        "--dp-degree",
        "2",
        "--strategy",
        "ulysses",
        "--output",
        s(&png),
        "--save-latents",
        s(&lat),
    ]);
    assert!(out.contains("2 images (2 data-parallel replicas)"), "{out}");
    let alone = dir.join("seed8.safetensors");
    run(&["--seed", "8", "--output", s(&dir.join("seed8.png")), "--save-latents", s(&alone)]);
    let read = |p: &Path| -> Vec<f32> {
        let t = weights::read_tensors(p).unwrap().remove("latents").unwrap();
        t.values.iter().map(|&v| v as f32).collect()
    };
    let max_rel = |a: &[f32], b: &[f32]| metrics::compare(a, b).max_rel;
    for r in [0, 1] {
        assert!(dir.join(format!("dp-{r}.png")).is_file(), "replica {r}'s image");
    }
    // Replica 1 starts from seed 7 + 1: the image a lone run with seed 8 draws (Ulysses on
    // 2 ranks equals serial within float32 reordering; measured 0 here).
    let (a, b) = (read(&dir.join("dp-1.safetensors")), read(&alone));
    let err = max_rel(&a, &b);
    assert!(err <= 1e-5, "replica 1 vs seed 8: {err:e}");
    assert!(max_rel(&read(&dir.join("dp-0.safetensors")), &b) > 1e-2, "replica 0 is seed 7's");

    let err = fails(&["run", "configs/demo.toml", "--world-size", "3", "--dp-degree", "2"]);
    assert!(err.contains("parallel.dp_degree") && err.contains("does not divide the 3"), "{err}");
    let err = fails(&[
        "run",
        "configs/demo.toml",
        "--world-size",
        "2",
        "--dp-degree",
        "2",
        "--latents",
        s(&lat.with_file_name("dp-0.safetensors")),
    ]);
    assert!(err.contains("parallel.dp_degree") && err.contains("--latents"), "{err}");
}

#[test]
fn batch_generation_writes_every_image_and_its_metadata() {
    let dir = tmp("batch");
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "a red circle\n\na blue square\na green triangle\n").unwrap();
    let out = dir.join("images");
    let common = ["--steps", "2", "--threads-per-rank", "1", "--seed", "40"];
    let mut args =
        vec!["run", "configs/demo.toml", "--prompts", s(&prompts), "--output-dir", s(&out)];
    args.extend_from_slice(&common);
    // Two data-parallel replicas over three prompts: replica 0 draws 0 and 2, replica 1 draws 1.
    args.extend_from_slice(&["--world-size", "2", "--dp-degree", "2"]);
    let stdout = succeeds(&args);
    // The folder and the count, not every file.
    let summary = format!("3 images (2 data-parallel replicas) in {}", out.display());
    assert!(stdout.contains(&summary) && !stdout.contains("00001.png"), "{stdout}");
    let meta = std::fs::read_to_string(out.join("metadata.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> =
        meta.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["index"], i);
        assert_eq!(l["seed"], 40 + i as u64, "request i gets seed + i");
        assert_eq!(l["file"], format!("{i:05}.png"));
        assert_eq!(l["dp_degree"], 2);
        assert!(out.join(format!("{i:05}.png")).is_file());
    }
    assert_eq!(lines[2]["prompt"], "a green triangle");
    // Image 2 is what a lone run of its prompt and seed draws.
    let alone = dir.join("alone.png");
    let mut args = vec!["run", "configs/demo.toml", "--prompt", "a green triangle"];
    args.extend_from_slice(&["--steps", "2", "--threads-per-rank", "1", "--seed", "42"]);
    args.extend_from_slice(&["--output", s(&alone)]);
    succeeds(&args);
    let same = std::fs::read(&alone).unwrap() == std::fs::read(out.join("00002.png")).unwrap();
    assert!(same, "image 2 differs from a lone run of its prompt and seed");

    // The same request four times on one DistriFusion instance (stale K/V after step 0):
    // four identical images — nothing leaks from one request into the next.
    let same = dir.join("same.jsonl");
    std::fs::write(&same, "{\"prompt\": \"a cat\", \"seed\": 3}\n".repeat(4)).unwrap();
    let again = dir.join("again");
    succeeds(&[
        "run",
        "configs/demo.toml",
        "--prompts",
        s(&same),
        "--output-dir",
        s(&again),
        "--steps",
        "3",
        "--strategy",
        "distrifusion",
        "--warmup-steps",
        "1",
        "--world-size",
        "2",
    ]);
    let first = std::fs::read(again.join("00000.png")).unwrap();
    for i in 1..4 {
        let other = std::fs::read(again.join(format!("{i:05}.png"))).unwrap();
        assert!(other == first, "request {i} differs from request 0: state leaked");
    }
    let meta = std::fs::read_to_string(again.join("metadata.jsonl")).unwrap();
    assert!(meta.lines().all(|l| l.contains("\"rss_mib\"")), "{meta}");

    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"x\"}\n{\"prompt\": 3}\n").unwrap();
    let err = fails(&["run", "configs/demo.toml", "--prompts", s(&bad), "--output-dir", s(&out)]);
    assert!(err.contains("bad.jsonl line 2"), "{err}");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n").unwrap();
    let err = fails(&["run", "configs/demo.toml", "--prompts", s(&empty), "--output-dir", s(&out)]);
    assert!(err.contains("no prompts"), "{err}");
    let err = fails(&["run", "configs/demo.toml", "--prompts", s(&prompts)]);
    assert!(err.contains("--output-dir"), "{err}");
    let err =
        fails(&["run", "configs/demo.toml", "--prompts", s(&prompts), "--output-dir", s(&prompts)]);
    assert!(err.contains("is a file"), "{err}");
    let err = fails(&[
        "run",
        "configs/demo.toml",
        "--world-size",
        "4",
        "--dp-degree",
        "4",
        "--prompts",
        s(&prompts),
        "--output-dir",
        s(&out),
    ]);
    assert!(err.contains("4 replicas but the run draws 3"), "{err}");
}

#[test]
fn pipefusion_stages_of_ulysses_groups_and_rings_run_and_bad_degrees_are_named() {
    let png = tmp("pf-ulysses").join("out.png");
    // Two stages of two Ulysses ranks; the same inside CFG parallelism (8 ranks); two
    // stages of a two-rank ring; two stages of USP 2 × 2 (8 ranks).
    for (world, extra) in [
        ("4", &["--ulysses-degree", "2"][..]),
        ("8", &["--ulysses-degree", "2", "--cfg-degree", "2"][..]),
        ("4", &["--ring-degree", "2"][..]),
        ("8", &["--ring-degree", "2", "--ulysses-degree", "2"][..]),
    ] {
        let mut args = vec![
            "run",
            "configs/demo.toml",
            "--strategy",
            "pipefusion",
            "--world-size",
            world,
            "--steps",
            "3",
            "--output",
            s(&png),
        ];
        args.extend_from_slice(extra);
        let out = succeeds(&args);
        assert!(out.contains(&format!("on {world} ranks")), "{out}");
    }
    let err = fails(&[
        "run",
        "configs/demo.toml",
        "--strategy",
        "pipefusion",
        "--world-size",
        "4",
        "--ulysses-degree",
        "3",
    ]);
    assert!(
        err.contains("`ulysses_degree`") && err.contains("does not divide the 4 ranks"),
        "{err}"
    );
    let err = fails(&[
        "run",
        "configs/demo.toml",
        "--strategy",
        "pipefusion",
        "--world-size",
        "6",
        "--ring-degree",
        "2",
        "--ulysses-degree",
        "2",
    ]);
    assert!(
        err.contains("`ring_degree`") && err.contains("= 4 does not divide the 6 ranks"),
        "{err}"
    );
}

#[test]
fn bad_options_are_named() {
    let err = fails(&["run", "configs/demo.toml", "--strategy", "ulysses", "--warmup-steps", "2"]);
    assert!(err.contains("`warmup_steps`"), "{err}");
    let err = fails(&["run", "configs/demo.toml", "--scheduler", "heun"]);
    assert!(err.contains("`heun`") && err.contains("dpm_solver_multistep"), "{err}");
    let err = fails(&["run", "configs/demo.toml", "--latents", "no/such.safetensors"]);
    assert!(err.contains("--latents") && err.contains("no/such.safetensors"), "{err}");
    let err = fails(&["forward", "--model", "no/such", "--inputs", "x", "--output", "y"]);
    assert!(err.contains("no/such"), "{err}");
}

#[test]
fn bad_link_models_are_named_and_a_good_one_runs() {
    let err = fails(&["run", "configs/demo.toml", "--link", "pcie9"]);
    assert!(
        err.contains("--link") && err.contains("pcie9") && err.contains("nvlink-a100"),
        "{err}"
    );
    let err = fails(&["run", "configs/demo.toml", "--link", "pcie4,dilation=-1"]);
    assert!(err.contains("dilation") && err.contains("positive"), "{err}");
    let err = fails(&["run", "configs/demo.toml", "--link", "bandwidth=0GB/s"]);
    assert!(err.contains("bandwidth") && err.contains("positive"), "{err}");
    let dir = tmp("link");
    let cfg = dir.join("link.toml");
    std::fs::write(&cfg, "prompt = \"a cat\"\n[parallel]\nlink = \"eth26\"\n").unwrap();
    let err = fails(&["run", s(&cfg), "--model", "fixtures/pipeline/pixart-alpha-tiny"]);
    assert!(err.contains("parallel.link") && err.contains("eth26"), "{err}");
    // A slow modelled link changes the time, not the image.
    let slow = dir.join("slow.safetensors");
    let fast = dir.join("fast.safetensors");
    for (link, out) in [("pcie4,dilation=1000", &slow), ("none", &fast)] {
        let mut args = vec![
            "run",
            "configs/demo.toml",
            "--steps",
            "3",
            "--strategy",
            "ulysses",
            "--world-size",
            "2",
            "--save-latents",
            s(out),
            "--output",
        ];
        let png = dir.join("x.png");
        args.push(s(&png));
        if link != "none" {
            args.extend(["--link", link]);
        }
        succeeds(&args);
    }
    let (a, b) = (weights::read_tensors(&slow).unwrap(), weights::read_tensors(&fast).unwrap());
    assert_eq!(a["latents"].values, b["latents"].values);
}

#[test]
fn forward_under_ulysses_equals_the_case() {
    let dir = tmp("forward");
    let out = dir.join("sample.safetensors");
    let case = "fixtures/dit/pixart-alpha/cases/square.safetensors";
    let stdout = succeeds(&[
        "forward",
        "--model",
        "fixtures/dit/pixart-alpha",
        "--inputs",
        case,
        "--output",
        s(&out),
        "--strategy",
        "ulysses",
        "--world-size",
        "2",
    ]);
    assert!(stdout.contains("relative L2 error"), "{stdout}");
    let got = weights::read_tensors(&out).unwrap();
    let want = weights::read_tensors(&repo(case)).unwrap();
    let (a, b) = (&got["sample"], &want["sample"]);
    assert_eq!(a.shape, b.shape);
    let rel = metrics::rel_l2(&a.values, &b.values);
    println!("forward under ulysses × 2 vs diffusers: relative L2 {rel:.2e}");
    // Fresh-K/V strategies equal serial, and serial equals diffusers, to float32 rounding:
    // relative L2 1e-5 each (docs/ARCHITECTURE.md, "What we measure ourselves by"). Measured
    // 1.19e-6 (AMD EPYC, AVX2; serial alone gives the same 1.19e-6 on this case), a margin
    // of 8.
    assert!(rel <= 1e-5, "relative L2 {rel:e}");
}

#[test]
fn forward_runs_an_sd3_folder_with_its_strategies_and_refuses_pipefusion() {
    let dir = tmp("forward-sd3");
    let out = dir.join("sample.safetensors");
    let case = "fixtures/mmdit/sd35/cases/wide.safetensors";
    let want = weights::read_tensors(&repo(case)).unwrap();
    // Fresh strategies on 2 ranks (and USP on 4; DistriFusion's and PipeFusion's lone
    // forward is a warmup step, exact) equal diffusers as the serial forward does: the bar of models-dit's parity
    // test, 1e-5; measured 7.7e-7 for each (Intel Xeon).
    for (strategy, n) in [
        ("serial", "1"),
        ("ulysses", "2"),
        ("ring", "2"),
        ("tensor", "2"),
        ("usp", "4"),
        ("distrifusion", "2"),
        ("pipefusion", "2"),
    ] {
        let mut args = vec![
            "forward",
            "--model",
            "fixtures/mmdit/sd35",
            "--inputs",
            case,
            "--output",
            s(&out),
            "--strategy",
            strategy,
            "--world-size",
            n,
        ];
        if strategy == "usp" {
            args.extend(["--ring-degree", "2"]);
        }
        let stdout = succeeds(&args);
        assert!(stdout.contains("relative L2 error"), "{stdout}");
        let got = weights::read_tensors(&out).unwrap();
        let rel = metrics::rel_l2(&got["sample"].values, &want["sample"].values);
        println!("sd35/wide under {strategy} × {n}: relative L2 {rel:.2e} vs diffusers");
        assert!(rel <= 1e-5, "{strategy}: relative L2 {rel:e}");
    }
    // PixArt's inputs given to SD3: the unknown tensor is named with the names SD3 takes.
    let err = fails(&[
        "forward",
        "--model",
        "fixtures/mmdit/sd35",
        "--inputs",
        "fixtures/dit/pixart-alpha/cases/square.safetensors",
        "--output",
        s(&out),
    ]);
    assert!(err.contains("encoder_attention_mask") && err.contains("pooled_projections"), "{err}");
}

#[test]
fn forward_runs_a_flux_folder_on_packed_tokens() {
    let dir = tmp("forward-flux");
    let out = dir.join("sample.safetensors");
    let case = "fixtures/mmdit/flux-dev/cases/rows10.safetensors";
    let want = weights::read_tensors(&repo(case)).unwrap();
    for (strategy, n) in [("ulysses", "2"), ("ring", "4"), ("tensor", "2")] {
        succeeds(&[
            "forward",
            "--model",
            "fixtures/mmdit/flux-dev",
            "--inputs",
            case,
            "--output",
            s(&out),
            "--strategy",
            strategy,
            "--world-size",
            n,
        ]);
        let got = weights::read_tensors(&out).unwrap();
        // Written packed, as diffusers' output: [batch, tokens, 4C].
        assert_eq!(got["sample"].shape, want["sample"].shape, "{strategy}");
        let rel = metrics::rel_l2(&got["sample"].values, &want["sample"].values);
        println!("flux-dev/rows10 under {strategy} × {n}: relative L2 {rel:.2e} vs diffusers");
        // models-dit's FLUX bar (1e-5; measured 6.2e-6 serial on this case, the guidance's
        // sinusoid at 7000: see its parity test).
        assert!(rel <= 1e-5, "{strategy}: relative L2 {rel:e}");
    }
    // Ids that are not the pipeline's grid are refused, naming the tensor and the token.
    let mut tensors = weights::read_tensors(&repo(case)).unwrap();
    tensors.get_mut("img_ids").unwrap().values.swap(4, 5);
    let bad = dir.join("bad-ids.safetensors");
    let device = Default::default();
    let list: Vec<(String, burn::tensor::Tensor<burn_flex::Flex, 2>)> = ["img_ids", "txt_ids"]
        .iter()
        .map(|n| (n.to_string(), tensors[*n].to_float(n, &bad, &device).unwrap()))
        .collect();
    let refs: Vec<(&str, _)> = list.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    weights::write_tensors(&bad, &refs).unwrap();
    let err = fails(&[
        "forward",
        "--model",
        "fixtures/mmdit/flux-dev",
        "--inputs",
        s(&bad),
        "--output",
        s(&out),
    ]);
    assert!(err.contains("img_ids") && err.contains("token 1"), "{err}");
}

/// `--dtype`: the denoiser computes in float16 / bfloat16 (float32 weights converted while
/// loading), under a strategy, and the output stays within the conformance suite's
/// half-precision bounds of the float32 reference (`Fixture::tolerance`: 5e-3 / 3e-2) while
/// being measurably not float32 (> 1e-4); a run (the sampler widens the prediction) works too.
#[test]
fn dtype_flag_computes_the_denoiser_in_half_precision() {
    let dir = tmp("dtype");
    let out = dir.join("sample.safetensors");
    let case = "fixtures/dit/pixart-alpha/cases/square.safetensors";
    let want = weights::read_tensors(&repo(case)).unwrap();
    for (dtype, bound) in [("f16", 5e-3), ("bf16", 3e-2)] {
        succeeds(&[
            "forward",
            "--model",
            "fixtures/dit/pixart-alpha",
            "--inputs",
            case,
            "--output",
            s(&out),
            "--strategy",
            "ulysses",
            "--world-size",
            "2",
            "--dtype",
            dtype,
        ]);
        let got = weights::read_tensors(&out).unwrap();
        let rel = metrics::rel_l2(&got["sample"].values, &want["sample"].values);
        println!("pixart-alpha/square in {dtype} under ulysses × 2: relative L2 {rel:.2e}");
        assert!(rel <= bound && rel > 1e-4, "{dtype}: relative L2 {rel:e}");
    }
    let png = dir.join("demo.png");
    succeeds(&["run", "configs/demo.toml", "--dtype", "bf16", "--output", s(&png)]);
    assert!(png.is_file());
    // An unknown dtype is clap's usage error (exit 2), naming the flag and the choices.
    let bad = harness(&["run", "configs/demo.toml", "--dtype", "f8", "--output", s(&png)]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(err.contains("--dtype") && err.contains("bf16"), "{err}");
}

#[test]
fn forward_runs_a_unet_folder_with_its_strategies_and_refuses_transformer_only_ones() {
    let dir = tmp("forward-unet");
    let out = dir.join("sample.safetensors");
    let case = "fixtures/unet/sdxl/cases/wide.safetensors";
    let stdout = succeeds(&[
        "forward",
        "--model",
        "fixtures/unet/sdxl",
        "--inputs",
        case,
        "--output",
        s(&out),
    ]);
    assert!(stdout.contains("relative L2 error"), "{stdout}");
    let got = weights::read_tensors(&out).unwrap();
    let want = weights::read_tensors(&repo(case)).unwrap();
    let rel = metrics::rel_l2(&got["sample"].values, &want["out"].values);
    // The U-Net's serial-vs-diffusers bar (models-unet/tests/integration/diffusers_parity.rs); measured
    // 1.04e-6 on this case (AMD EPYC, AVX2).
    assert!(rel <= 1e-5, "relative L2 {rel:e}");
    // The U-Net strategies on 2 ranks: a lone forward is exact for each (DistriFusion's is a
    // warmup step), so each equals diffusers as the serial forward does.
    for strategy in ["distrifusion", "tensor", "naive_patch"] {
        succeeds(&[
            "forward",
            "--model",
            "fixtures/unet/sdxl",
            "--inputs",
            case,
            "--output",
            s(&out),
            "--strategy",
            strategy,
            "--world-size",
            "2",
        ]);
        let got = weights::read_tensors(&out).unwrap();
        let rel = metrics::rel_l2(&got["sample"].values, &want["out"].values);
        if strategy == "naive_patch" {
            // Zero halos, local statistics and attention: the seams show.
            assert!(rel > 1e-3, "{strategy}: relative L2 {rel:e}");
        } else {
            assert!(rel <= 1e-5, "{strategy}: relative L2 {rel:e}");
        }
    }
    for strategy in ["ulysses", "ring", "pipefusion"] {
        let err = fails(&[
            "forward",
            "--model",
            "fixtures/unet/sdxl",
            "--inputs",
            case,
            "--output",
            s(&out),
            "--strategy",
            strategy,
            "--world-size",
            "2",
        ]);
        assert!(err.contains("U-Net") && err.contains(strategy), "{strategy}: {err}");
    }
    // DiT inputs given to a U-Net: the unknown tensor is named, with the names a U-Net takes.
    let err = fails(&[
        "forward",
        "--model",
        "fixtures/unet/sdxl",
        "--inputs",
        "fixtures/dit/pixart-alpha/cases/square.safetensors",
        "--output",
        s(&out),
    ]);
    assert!(err.contains("hidden_states") && err.contains("time_ids"), "{err}");
}

#[test]
fn run_writes_a_png_and_latents_that_run_again() {
    let dir = tmp("run");
    let png = dir.join("demo.png");
    let latents = dir.join("final.safetensors");
    let stdout = succeeds(&[
        "run",
        "configs/demo.toml",
        "--steps",
        "2",
        "--output",
        s(&png),
        "--save-latents",
        s(&latents),
    ]);
    assert!(stdout.contains("2 steps") && stdout.contains("steps/s"), "{stdout}");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // The saved latents are a valid `--latents` input (same name, same shape).
    let png2 = dir.join("again.png");
    succeeds(&[
        "run",
        "configs/demo.toml",
        "--steps",
        "1",
        "--strategy",
        "pipefusion",
        "--world-size",
        "2",
        "--latents",
        s(&latents),
        "--output",
        s(&png2),
    ]);
    assert!(png2.is_file());
}

#[test]
fn list_shows_models_strategies_with_options_and_schedulers() {
    let stdout = succeeds(&["list"]);
    for want in [
        "PixArt-XL-2-512x512",
        "pixart-alpha-tiny",
        "pipefusion",
        "num_pipeline_patch",
        "ulysses_degree",
        "warmup_steps",
        "flow_match_euler",
        "DPMSolverMultistepScheduler",
    ] {
        assert!(stdout.contains(want), "{want} missing:\n{stdout}");
    }
}

#[test]
fn eval_fid_of_pytorch_fid_statistics_and_its_refusals() {
    let q = repo("fixtures/quality");
    let a = q.join("stats-compressed.npz");
    let b = q.join("stats-plain.npz");
    // pytorch-fid's distance between these statistics: fixtures/quality/frechet.json, "a-b".
    let out = succeeds(&["eval", "fid", s(&a), s(&b)]);
    let fid: f64 = out.trim().strip_prefix("FID: ").unwrap().parse().unwrap();
    assert!((fid - 11.580036029887623).abs() < 1e-5, "{out}");
    let err = fails(&["eval", "fid", s(&a)]);
    assert!(err.contains("--save-stats"), "{err}");
    let err = fails(&["eval", "fid", s(&q.join("images")), s(&b)]);
    assert!(err.contains("--inception") && err.contains("convert_inception.py"), "{err}");
    let dir = tmp("eval-fid");
    let pth = dir.join("pt_inception-2015-12-05-6726825d.pth");
    std::fs::write(&pth, b"not really").unwrap();
    let err = fails(&["eval", "fid", s(&q.join("images")), s(&b), "--inception", s(&pth)]);
    assert!(err.contains("convert it once") && err.contains("convert_inception.py"), "{err}");
    let err = fails(&["eval", "fid", s(&q.join("images/a-64x64.png")), s(&b)]);
    assert!(err.contains("neither an image folder nor a .npz"), "{err}");
}

#[test]
fn eval_compare_pairs_images_by_name() {
    let q = repo("fixtures/quality/images");
    let (reference, generated) = (tmp("eval-compare-ref"), tmp("eval-compare-gen"));
    for name in ["x.png", "y.png"] {
        std::fs::copy(q.join("b-96x128.png"), reference.join(name)).unwrap();
    }
    std::fs::copy(q.join("pair-noise.png"), generated.join("x.png")).unwrap();
    std::fs::copy(q.join("pair-same.png"), generated.join("y.png")).unwrap();
    let json = generated.join("scores.json");
    let out = succeeds(&["eval", "compare", s(&reference), s(&generated), "--json", s(&json)]);
    // scikit-image's numbers for the noisy pair: fixtures/quality/ssim.json.
    assert!(out.contains("26.80") && out.contains("0.7685"), "{out}");
    assert!(out.contains("inf") && out.contains("1.0000"), "{out}");
    let scores: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!((scores["worst_ssim"].as_f64().unwrap() - 0.7684559525649655).abs() < 1e-9);
    std::fs::copy(q.join("a-64x64.png"), generated.join("z.png")).unwrap();
    let err = fails(&["eval", "compare", s(&reference), s(&generated)]);
    assert!(err.contains("has no image named z.png"), "{err}");
    std::fs::copy(q.join("a-64x64.png"), reference.join("z.png")).unwrap();
    std::fs::copy(q.join("d-40x48.png"), generated.join("z.png")).unwrap();
    let err = fails(&["eval", "compare", s(&reference), s(&generated)]);
    assert!(err.contains("is 64×64 but this image 40×48"), "{err}");
}

/// One `harness run` of the trained demo pipeline on a reference caption's initial latents;
/// returns the final latents and the image (RGB bytes, height, width).
fn demo_run(caption: &str, latents: &Path, dir: &Path, extra: &[&str]) -> (Vec<f64>, Vec<u8>) {
    let (png, out) = (dir.join("out.png"), dir.join("final.safetensors"));
    let mut args = vec![
        "run",
        "configs/demo.toml",
        "--prompt",
        caption,
        "--latents",
        s(latents),
        "--save-latents",
        s(&out),
        "--output",
        s(&png),
    ];
    args.extend_from_slice(extra);
    succeeds(&args);
    let mut t = weights::read_tensors(&out).unwrap();
    let (pixels, (h, w)) = quality::load_rgb8(&png).unwrap();
    assert_eq!((h, w), (64, 64));
    (t.remove("latents").unwrap().values, pixels)
}

fn demo_reference() -> (PathBuf, serde_json::Value) {
    let dir = repo("fixtures/pipeline/shapes-demo-reference");
    let check = serde_json::from_str(&std::fs::read_to_string(dir.join("check.json")).unwrap());
    (dir, check.unwrap())
}

/// The README's first command on the trained demo pipeline (tools/demo_model/train.py) draws
/// the shape its caption names, and equals diffusers on it: for three captions, the final
/// latents of diffusers' `PixArtAlphaPipeline` from the same initial latents (bound 1e-4
/// max-rel, the issue's; measured in the output), and the colour/shape agreement the
/// training script saved as its threshold.
#[test]
fn the_demo_pipeline_draws_what_its_caption_names_and_equals_diffusers() {
    let (reference, check) = demo_reference();
    let iou_min = check["iou_min"].as_f64().unwrap();
    for (name, rgb) in quality::shapes::COLOURS {
        let want: Vec<u64> = check["palette"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(want, rgb.map(u64::from), "the palette of {name} differs from train.py's");
    }
    for (file, caption) in check["reference_captions"].as_object().unwrap() {
        let caption = caption.as_str().unwrap();
        let path = reference.join(file);
        let want = weights::read_tensors(&path).unwrap().remove("final_latents").unwrap();
        let (got, pixels) = demo_run(caption, &path, &tmp(&format!("demo-{file}")), &[]);
        let c = metrics::compare(&got, &want.values);
        eprintln!("{caption}: final latents vs diffusers {c}");
        assert!(c.max_rel <= 1e-4, "{caption}: {c}");
        let a = quality::shapes::agreement(&pixels, 64, 64);
        let (colour, shape) = caption.split_once(' ').unwrap().1.split_once(' ').unwrap();
        assert!(a.agrees(colour, shape, iou_min), "{caption}: the image shows {a:?}");
    }
}

/// Every strategy on the trained pipeline at 2 ranks: the exact ones equal serial's final
/// latents (bound 1e-5 max-rel: float32 sums in another order, measured in the output); the
/// stale ones report PSNR against serial and the agreement (not asserted).
#[test]
fn every_strategy_on_the_demo_pipeline() {
    let (reference, _) = demo_reference();
    let latents = reference.join("caption-00.safetensors");
    let caption = "a red circle";
    let (serial, serial_px) = demo_run(caption, &latents, &tmp("demo-serial"), &[]);
    let exact: &[&[&str]] = &[
        &["--strategy", "tensor"],
        &["--strategy", "ulysses"],
        &["--strategy", "ring"],
        &["--strategy", "pipefusion", "--num-pipeline-patch", "1"],
        &["--strategy", "distrifusion", "--warmup-steps", "100"],
        &["--strategy", "serial", "--cfg-degree", "2"],
    ];
    let stale: &[&[&str]] = &[
        &["--strategy", "distrifusion"],
        &["--strategy", "naive_patch"],
        &["--strategy", "pipefusion"],
    ];
    for (i, extra) in exact.iter().chain(stale).enumerate() {
        let mut args = extra.to_vec();
        args.extend_from_slice(&["--world-size", "2"]);
        let (got, px) = demo_run(caption, &latents, &tmp(&format!("demo-strategy-{i}")), &args);
        let c = metrics::compare(&got, &serial);
        let a = quality::shapes::agreement(&px, 64, 64);
        let psnr = metrics::image::psnr_u8(&serial_px, &px);
        eprintln!("{extra:?}: latents vs serial {c}; image PSNR {psnr:.1} dB; shows {a:?}");
        if i < exact.len() {
            assert!(c.max_rel <= 1e-5, "{extra:?}: {c}");
        }
    }
}

/// The quality experiment in one command on the demo pipeline: 4 prompts, serial and three
/// strategies on 2 ranks; the exact one's images equal serial's, the table and eval.json
/// have one row per strategy.
#[test]
fn eval_strategies_runs_the_experiment_in_one_command() {
    let dir = tmp("eval-strategies");
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "a red circle\na blue square\na yellow triangle\na green diamond\n")
        .unwrap();
    let out = dir.join("out");
    let table = succeeds(&[
        "eval",
        "strategies",
        "configs/demo.toml",
        "--prompts",
        s(&prompts),
        "--strategies",
        "ulysses,distrifusion:warmup_steps=1,naive_patch",
        "--world-size",
        "2",
        "--output-dir",
        s(&out),
        "--report",
        s(&dir.join("report")),
    ]);
    eprintln!("{table}");
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    let labels: Vec<&str> = rows.iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["serial", "ulysses", "distrifusion:warmup_steps=1", "naive_patch"]);
    for r in rows {
        assert_eq!(r["vs_serial"]["pairs"].as_array().unwrap().len(), 4, "{r}");
    }
    // Serial against itself, and exact Ulysses: every image within one 8-bit level or equal.
    for r in &rows[..2] {
        assert!(r["vs_serial"]["worst_ssim"].as_f64().unwrap() > 0.999, "{r}");
    }
    // The prompts name coloured shapes: every row counts the images that show them (serial
    // draws all four; the stale strategies are reported, not held to it).
    assert_eq!(rows[0]["shapes_agree"], serde_json::json!([4, 4]), "{table}");
    for r in rows {
        assert_eq!(r["shapes_agree"][1], 4, "{r}");
    }
    assert!(table.contains("shapes") && table.contains("4/4"), "{table}");
    assert!(out.join("distrifusion-warmup_steps=1/00003.png").is_file());
    let page = dir.join("report/index.html");
    assert!(table.contains("report: ") && page.is_file(), "{table}");
    // 4 prompts × (serial + 3 strategies with a heat-map each) = 28 images.
    check_in_browser(&page, 28, &dir.join("report.png"));
    let err = fails(&[
        "eval",
        "strategies",
        "configs/demo.toml",
        "--prompts",
        s(&prompts),
        "--strategies",
        "distrifusion:warmup_step=1",
        "--output-dir",
        s(&out),
    ]);
    assert!(err.contains("warmup_step"), "{err}");
}

/// Renders `page` in headless Chromium: every one of `images` images loaded, no error logged
/// (the page's script writes both onto `<body>`, read back from the DOM), and a screenshot.
/// Chromium comes from Debian's `chromium` package, which `.ci/run` installs and announces
/// with `CI_BROWSER=1`; elsewhere, without it, the check is skipped with a note.
fn check_in_browser(page: &Path, images: usize, screenshot: &Path) {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).is_file());
    let Some(chromium) = chromium else {
        assert!(
            std::env::var_os("CI_BROWSER").is_none(),
            "CI_BROWSER is set but chromium is missing"
        );
        eprintln!(
            "note: no chromium (apt-get install chromium): the report was not opened in a browser"
        );
        return;
    };
    let profile = page.parent().unwrap().join("chromium-profile");
    let url = format!("file://{}", page.canonicalize().unwrap().display());
    let run = |extra: &[&str]| {
        let out = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--virtual-time-budget=10000",
                &format!("--user-data-dir={}", profile.display()),
            ])
            .args(extra)
            .arg(&url)
            .output()
            .expect("chromium runs");
        assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let dom = run(&["--dump-dom"]);
    let want = format!("data-images=\"{images}/{images}\"");
    assert!(dom.contains(&want), "not every image loaded ({want}): {}", &dom[..dom.len().min(400)]);
    assert!(dom.contains("data-errors=\"0\""), "the page logged errors");
    assert!(dom.matches("<svg").count() >= 3, "charts missing");
    run(&[&format!("--screenshot={}", screenshot.display()), "--window-size=1280,2200"]);
    let size = std::fs::metadata(screenshot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot {} is {size} bytes", screenshot.display());
    eprintln!("report rendered in Chromium; screenshot {}", screenshot.display());
}

/// `harness bench --report DIR` writes a page with the table and its charts, which renders
/// in Chromium without errors.
#[test]
fn bench_report_renders_in_a_browser() {
    let dir = tmp("bench-report");
    let out = succeeds(&[
        "bench",
        "--model",
        "fixtures/dit/pixart-alpha",
        "--resolutions",
        "64",
        "--steps",
        "2",
        "--world-sizes",
        "1,2",
        "--strategies",
        "ulysses,pipefusion",
        "--repetitions",
        "1",
        "--warmup-runs",
        "0",
        "--json",
        s(&dir.join("bench.json")),
        "--svg",
        s(&dir.join("bench.svg")),
        "--report",
        s(&dir.join("report")),
    ]);
    let html = std::fs::read_to_string(dir.join("report/index.html")).unwrap();
    for want in ["ulysses", "pipefusion", "measured ÷ formula", "memory per rank", "bytes sent"] {
        assert!(html.contains(want), "the page lacks {want}: {out}");
    }
    check_in_browser(&dir.join("report/index.html"), 0, &dir.join("bench-report.png"));
}

// ---------------------------------------------------------------------------------------
// Multi-process runs: `harness launch`, and ranks started by hand with torchrun's variables
// ---------------------------------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The harness as rank `rank` of `world` ranks, rendezvous on loopback `port`.
fn rank_process(args: &[&str], rank: usize, world: usize, port: u16) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_harness"));
    c.args(args)
        .current_dir(repo(""))
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string());
    c
}

/// `harness launch --nproc-per-node n -- args…`, which must succeed; its stdout.
fn launched(n: usize, args: &[&str]) -> String {
    let port = free_port().to_string();
    let n = n.to_string();
    let mut all = vec!["launch", "--nproc-per-node", &n, "--master-port", &port, "--"];
    all.extend_from_slice(args);
    succeeds(&all)
}

fn sample_of(path: &Path) -> Vec<f64> {
    weights::read_tensors(path).unwrap().remove("sample").unwrap().values
}

#[test]
fn launched_forwards_of_every_strategy_equal_the_in_process_run() {
    let dir = tmp("launch-forward");
    let case = "fixtures/dit/pixart-alpha/cases/square.safetensors";
    let cases: &[(&str, usize, &[&str])] = &[
        ("tensor", 2, &[]),
        ("ulysses", 2, &[]),
        ("ring", 2, &[]),
        ("usp", 4, &["--ulysses-degree", "2"]),
        ("distrifusion", 2, &[]),
        ("naive_patch", 2, &[]),
        ("pipefusion", 2, &["--num-pipeline-patch", "2"]),
    ];
    for (strategy, n, extra) in cases {
        let (a, b) =
            (dir.join(format!("{strategy}-threads.st")), dir.join(format!("{strategy}-procs.st")));
        let world = n.to_string();
        let mut common = vec!["forward", "--model", "fixtures/dit/pixart-alpha", "--inputs", case];
        common.extend_from_slice(&["--strategy", strategy, "--threads-per-rank", "1"]);
        common.extend_from_slice(extra);
        let mut threads = common.clone();
        threads.extend_from_slice(&["--world-size", &world, "--output", s(&a)]);
        succeeds(&threads);
        let mut procs = common.clone();
        procs.extend_from_slice(&["--output", s(&b)]);
        let stdout = launched(*n, &procs);
        assert!(stdout.contains("relative L2 error"), "{strategy}: {stdout}");
        // The same program on the same bits: the TCP transport moves and sums exactly what
        // the in-process one does (parallel-core/tests/integration/tcp.rs), so nothing may differ.
        assert!(sample_of(&a) == sample_of(&b), "{strategy}: processes differ from threads");
    }
}

#[test]
fn launched_runs_equal_the_in_process_run_image_and_latents() {
    let dir = tmp("launch-run");
    let cases: &[(usize, &[&str])] = &[
        (2, &["--strategy", "pipefusion", "--num-pipeline-patch", "2", "--warmup-steps", "1"]),
        (4, &["--strategy", "ulysses", "--cfg-degree", "2", "--vae-parallel"]),
    ];
    for (i, (n, extra)) in cases.iter().enumerate() {
        let files =
            |tag: &str| (dir.join(format!("{i}-{tag}.png")), dir.join(format!("{i}-{tag}.st")));
        let ((png_a, lat_a), (png_b, lat_b)) = (files("threads"), files("procs"));
        let mut common = vec!["run", "configs/demo.toml", "--steps", "3", "--no-progress"];
        common.extend_from_slice(&["--threads-per-rank", "1"]);
        common.extend_from_slice(extra);
        let world = n.to_string();
        let mut threads = common.clone();
        threads.extend_from_slice(&["--world-size", &world, "--output", s(&png_a)]);
        threads.extend_from_slice(&["--save-latents", s(&lat_a)]);
        succeeds(&threads);
        let mut procs = common.clone();
        procs.extend_from_slice(&["--output", s(&png_b), "--save-latents", s(&lat_b)]);
        let stdout = launched(*n, &procs);
        assert!(
            stdout.contains("3 steps") && stdout.contains(&format!("on {n} ranks")),
            "{stdout}"
        );
        assert_eq!(
            std::fs::read(&png_a).unwrap(),
            std::fs::read(&png_b).unwrap(),
            "{extra:?}: PNG"
        );
        let lat = |p: &Path| weights::read_tensors(p).unwrap().remove("latents").unwrap().values;
        assert!(lat(&lat_a) == lat(&lat_b), "{extra:?}: latents");
    }
}

/// A long run of two ranks for the kill tests: 1000 steps of the demo pipeline (~10 s).
fn long_run(png: &Path) -> Vec<&str> {
    vec![
        "run",
        "-vv",
        "configs/demo.toml",
        "--steps",
        "1000",
        "--strategy",
        "ulysses",
        "--no-progress",
        "--timeout-secs",
        "30",
        "--output",
        s(png),
    ]
}

#[test]
fn a_rank_killed_mid_run_makes_the_other_exit_naming_it() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tmp("launch-kill");
    let png = dir.join("never.png");
    let port = free_port();
    let args = long_run(&png);
    let mut r0 = rank_process(&args, 0, 2, port)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut r1 = rank_process(&args, 1, 2, port)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(r0.stderr.take().unwrap()).lines().map_while(Result::ok);
    assert!(
        lines.by_ref().any(|l| l.contains("step 3/1000 begins")),
        "rank 0 never reached step 3"
    );
    r1.kill().unwrap(); // SIGKILL: no abort, no goodbye
    let killed = std::time::Instant::now();
    let rest: Vec<String> = lines.collect();
    let status = r0.wait().unwrap();
    let _ = r1.wait();
    println!("rank 0 exited {:?} after rank 1 was killed", killed.elapsed());
    assert_eq!(status.code(), Some(1), "{rest:?}");
    // Detected from the closed connection, not by the 30 s timeout.
    assert!(killed.elapsed() < std::time::Duration::from_secs(15), "{:?}", killed.elapsed());
    let error = rest.iter().find(|l| l.starts_with("error: ")).expect("an error line");
    assert!(error.contains("rank 1 failed") && error.contains("connection lost"), "{error}");
    assert!(!png.exists());
}

/// `harness -v launch` of [`long_run`] on two ranks, read until rank 0 begins step 3: the
/// launcher, its ranks' process ids (by rank) and the rest of its stderr.
fn launch_long_run(
    png: &Path,
) -> (std::process::Child, Vec<String>, impl Iterator<Item = String> + use<>) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let port = free_port().to_string();
    let mut args = vec!["-v", "launch", "--nproc-per-node", "2", "--master-port", &port, "--"];
    args.extend(long_run(png));
    let mut launcher = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(&args)
        .current_dir(repo(""))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(launcher.stderr.take().unwrap()).lines().map_while(Result::ok);
    let mut pids = Vec::new();
    for l in lines.by_ref() {
        if let Some(rest) = l.strip_prefix("info: launch: rank ")
            && let Some((_, pid)) = rest.split_once(" is process ")
        {
            pids.push(pid.trim().to_string());
        }
        if l.contains("[rank 0]") && l.contains("step 3/1000 begins") {
            break;
        }
    }
    assert_eq!(pids.len(), 2, "the launcher names both ranks' processes");
    (launcher, pids, lines)
}

#[test]
fn the_launcher_stops_every_rank_when_one_is_killed_and_names_it() {
    let dir = tmp("launcher-kill");
    let (mut launcher, pids, lines) = launch_long_run(&dir.join("never.png"));
    let pid = &pids[1];
    assert!(Command::new("kill").args(["-9", pid]).status().unwrap().success());
    let killed = std::time::Instant::now();
    let rest: Vec<String> = lines.collect();
    let status = launcher.wait().unwrap();
    println!("the launcher exited {:?} after rank 1 was killed", killed.elapsed());
    assert_eq!(status.code(), Some(1), "{rest:?}");
    assert!(killed.elapsed() < std::time::Duration::from_secs(15), "{:?}", killed.elapsed());
    let error = rest.last().expect("the launcher's error");
    assert!(
        error.starts_with("error: rank 1 was killed by signal 9 (SIGKILL)")
            && error.contains("were stopped"),
        "{error}"
    );
}

/// A rank started by hand that must fail; its stderr.
fn rank_fails(mut c: Command) -> String {
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: ") && !stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn multi_process_settings_and_rendezvous_failures_are_named() {
    let dir = tmp("launch-errors");
    let out = dir.join("x.safetensors");
    let forward = [
        "forward",
        "--model",
        "fixtures/dit/pixart-alpha",
        "--inputs",
        "fixtures/dit/pixart-alpha/cases/square.safetensors",
        "--output",
        s(&out),
        "--strategy",
        "ulysses",
        "--timeout-secs",
        "2",
    ];
    // A rank that never arrives.
    let port = free_port();
    let e = rank_fails(rank_process(&forward, 0, 2, port));
    assert!(e.contains(&format!("rendezvous at 127.0.0.1:{port} (rank 0)")), "{e}");
    assert!(e.contains("rank 1 never arrived within 2 s"), "{e}");
    // WORLD_SIZE that differs between ranks.
    let port = free_port();
    let mut r0 = rank_process(&forward, 0, 2, port);
    let mut r0 =
        r0.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let e = rank_fails(rank_process(&forward, 1, 3, port));
    assert!(e.contains("rank 0 has WORLD_SIZE 2 but rank 1 has WORLD_SIZE 3"), "{e}");
    assert!(!r0.wait().unwrap().success());
    // A port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let e = rank_fails(rank_process(&forward, 0, 2, taken.local_addr().unwrap().port()));
    assert!(e.contains("another run is using MASTER_PORT"), "{e}");
    // Malformed variables, and flags that disagree with the launcher.
    let e = rank_fails(rank_process(&forward, 2, 2, 29500));
    assert!(e.contains("environment variable RANK: 2 must be below WORLD_SIZE 2"), "{e}");
    let mut c = rank_process(&forward, 0, 2, 29500);
    c.env("MASTER_ADDR", "10.0.0.300");
    let e = rank_fails(c);
    assert!(e.contains("MASTER_ADDR") && e.contains("not an IP address"), "{e}");
    let mut c = rank_process(&forward, 0, 2, 29500);
    c.env("MASTER_PORT", "port");
    assert!(rank_fails(c).contains("environment variable MASTER_PORT: `port` is not a TCP port"));
    let mut with_world = forward.to_vec();
    with_world.extend_from_slice(&["--world-size", "3"]);
    let e = rank_fails(rank_process(&with_world, 0, 2, 29500));
    assert!(e.contains("--world-size: 3 disagrees with the launcher's WORLD_SIZE 2"), "{e}");
    let mut with_link = forward.to_vec();
    with_link.extend_from_slice(&["--link", "pcie4"]);
    let e = rank_fails(rank_process(&with_link, 0, 2, 29500));
    assert!(e.contains("parallel.link") && e.contains("the link is real"), "{e}");
    // The launcher's own settings.
    let e = fails(&["launch", "--nproc-per-node", "2", "--", "bench"]);
    assert!(e.contains("runs `run` or `forward`") && e.contains("`bench`"), "{e}");
    let e = fails(&[
        "launch",
        "--nproc-per-node",
        "1",
        "--nnodes",
        "2",
        "--node-rank",
        "2",
        "--",
        "run",
    ]);
    assert!(e.contains("--node-rank: 2 must be below --nnodes 2"), "{e}");
    let e = fails(&["launch", "--nproc-per-node", "1", "--master-addr", "a b", "--", "run"]);
    assert!(e.contains("--master-addr"), "{e}");
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn ranks_do_not_outlive_a_killed_launcher() {
    let dir = tmp("launcher-dies");
    let (mut launcher, pids, _lines) = launch_long_run(&dir.join("never.png"));
    launcher.kill().unwrap(); // SIGKILL: the launcher cannot stop its ranks itself
    let _ = launcher.wait();
    let killed = std::time::Instant::now();
    while !pids.iter().all(|p| gone(p)) && killed.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    println!("both ranks ended {:?} after their launcher was killed", killed.elapsed());
    assert!(pids.iter().all(|p| gone(p)), "a rank outlived its launcher");
    // Measured 20 ms; the run itself lasts ~10 s (1000 steps) and its timeout is 30 s: a
    // rank that does not watch its launcher is still running after 3 s.
    assert!(killed.elapsed() < std::time::Duration::from_secs(3), "{:?}", killed.elapsed());
}

#[test]
fn launched_data_parallel_batches_equal_the_in_process_batch() {
    let dir = tmp("launch-dp");
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "a red circle\na blue square\na green triangle\n").unwrap();
    let (a, b) = (dir.join("threads"), dir.join("procs"));
    let common =
        ["run", "configs/demo.toml", "--prompts", s(&prompts), "--steps", "3", "--no-progress"];
    let mut threads = common.to_vec();
    threads.extend_from_slice(&["--world-size", "4", "--dp-degree", "2", "--strategy", "ulysses"]);
    threads.extend_from_slice(&["--threads-per-rank", "1", "--output-dir", s(&a)]);
    succeeds(&threads);
    let mut procs = common.to_vec();
    procs.extend_from_slice(&["--dp-degree", "2", "--strategy", "ulysses"]);
    procs.extend_from_slice(&["--threads-per-rank", "1", "--output-dir", s(&b)]);
    let stdout = launched(4, &procs);
    assert!(stdout.contains("3 images (2 data-parallel replicas)"), "{stdout}");
    for f in ["00000.png", "00001.png", "00002.png"] {
        // Image 1 is replica 1's: written by world rank 2's process.
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f}");
    }
    // World rank 0 writes every replica's metadata lines (timings aside, the same).
    let meta = |d: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("metadata.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().retain(|k, _| k != "seconds" && k != "rss_mib");
                v
            })
            .collect()
    };
    assert_eq!(meta(&a), meta(&b));
    assert_eq!(meta(&b).len(), 3);
}

#[test]
fn nccl_where_it_cannot_work_is_refused_before_any_work() {
    // On the CPU backend NCCL has nothing to move: `--comm nccl` (or `comm = "nccl"`) is one
    // error naming the setting; `auto` and `builtin` run on the built-in communicator.
    let e =
        fails(&["run", "configs/demo.toml", "--steps", "1", "--world-size", "2", "--comm", "nccl"]);
    assert_eq!(
        e.trim(),
        "error: parallel.comm (--comm nccl): NCCL moves CUDA tensors: it needs --backend cuda"
    );
    let e = fails(&[
        "forward",
        "--model",
        "fixtures/dit/pixart-alpha",
        "--inputs",
        "fixtures/dit/pixart-alpha/cases/square.safetensors",
        "--output",
        s(&tmp("nccl-refused").join("x.safetensors")),
        "--comm",
        "nccl",
    ]);
    assert!(e.contains("parallel.comm (--comm nccl)"), "{e}");
    let e = harness(&["run", "--help"]);
    let help = String::from_utf8_lossy(&e.stdout);
    assert!(help.contains("--comm <KIND>") && help.contains("builtin"), "{help}");
}

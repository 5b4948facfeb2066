//! `harness bench`'s plumbing on the tiny fixture model: every strategy runs on 2 ranks,
//! its measured communication equals its formula exactly, the JSON has its fields and the
//! chart is written. No timing is asserted: speed is measured, never asserted.

use std::path::PathBuf;

use harness::bench::{BenchConfig, report, run_bench};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/dit/pixart-alpha")
}

#[test]
fn every_strategy_runs_on_two_ranks_with_communication_equal_to_its_formula() {
    let out = std::env::temp_dir().join(format!("harness-bench-test-{}", std::process::id()));
    let config = BenchConfig::from_toml(&format!(
        r#"
        model = "{}"
        resolutions = [64]
        steps = 3
        world_sizes = [1, 2]
        repetitions = 1
        warmup_runs = 0
        cores = 2
        text_tokens = 12
        strategies = ["tensor", "ulysses", "ring", "usp", "naive_patch",
                      {{ name = "distrifusion", warmup_steps = 1 }},
                      {{ name = "pipefusion", warmup_steps = 1 }}]
        links = ["none", "bandwidth=1GB/s,latency=50us,dilation=2"]
        json = "{}"
        svg = "{}"
        "#,
        fixture().display(),
        out.join("bench.json").display(),
        out.join("bench.svg").display(),
    ))
    .unwrap();
    let registry = harness::registry::<harness::CpuBackend>();
    let specs = config.strategy_specs(&registry, &[]).unwrap();
    let report = run_bench(&config, &specs, &registry, |l| eprintln!("{l}")).unwrap();
    eprintln!("{}", report::table(&report));

    // Serial on 1 thread, serial on 2 threads (world size 1), then 7 strategies on 2 ranks
    // under each of the 2 link models.
    assert_eq!(report.results.len(), 2 + 7 * 2);
    let linked: Vec<_> = report.results.iter().filter(|r| r.link.is_some()).collect();
    assert_eq!(linked.len(), 7);
    for r in linked.iter().filter(|r| r.error.is_none()) {
        assert!(r.label.ends_with("@bandwidth=1 GB/s, latency=50µs"), "{}", r.label);
        assert_eq!(r.wait_ms_per_step.len(), 2, "{}", r.label);
    }
    assert!(report::table(&report).contains("links (transfers take"), "the table names the links");
    for r in &report.results {
        if r.strategy == "usp" {
            let e = r.error.as_deref().expect("USP needs a 2-D mesh");
            assert!(e.contains("usp"), "{e}");
            continue;
        }
        assert!(r.error.is_none(), "{}: {:?}", r.label, r.error);
        assert_eq!(r.comm_ratio.len(), r.world_size, "{}", r.label);
        for (rank, ratio) in r.comm_ratio.iter().enumerate() {
            assert_eq!(*ratio, Some(1.0), "{} rank {rank}: measured/formula", r.label);
        }
        assert_eq!(r.request_seconds.len(), 1);
        assert_eq!(r.step_ms.len(), 3);
        assert!(r.param_bytes.iter().all(|&b| b > 0), "{}", r.label);
        if r.world_size == 2 {
            assert!(r.comm_bytes_per_step.iter().any(|&b| b > 0.0), "{}: nothing sent", r.label);
            assert!(r.speedup.is_some(), "{}", r.label);
        }
        // Fresh-K/V strategies equal serial; stale ones are only reported.
        if ["tensor", "ulysses", "ring", "serial"].contains(&r.strategy.as_str()) {
            // The fresh-K/V loop bar (docs/ARCHITECTURE.md); measured here 0 to 7.1e-7.
            assert!(r.rel_l2.unwrap() < 1e-5, "{}: {:?}", r.label, r.rel_l2);
            eprintln!("{}: rel L2 vs serial {:.2e}", r.label, r.rel_l2.unwrap());
        }
        assert!(r.max_abs_error.is_some(), "{}", r.label);
    }
    // The same strategy under a link model moves the same bytes, and its image is the same.
    let pair = |name: &str| {
        let mut it = report.results.iter().filter(|r| r.strategy == name);
        (it.next().unwrap(), it.next().unwrap())
    };
    for name in ["tensor", "ulysses", "ring", "naive_patch", "distrifusion", "pipefusion"] {
        let (plain, slow) = pair(name);
        assert_eq!(plain.comm_bytes_by_kind, slow.comm_bytes_by_kind, "{name}");
        assert_eq!(plain.rel_l2, slow.rel_l2, "{name}");
    }
    let pipe = report.results.iter().find(|r| r.strategy == "pipefusion").unwrap();
    assert!(
        pipe.comm_bytes_by_kind[1].get("broadcast").is_some_and(|&b| b > 0),
        "the last stage broadcasts the latents once, within the formula of the last step"
    );
    let df = report.results.iter().find(|r| r.strategy == "distrifusion").unwrap();
    assert!(df.buffer_bytes.iter().all(|&b| b > 0), "stale K/V buffers are reported");

    report::write_json(&report, &config.json).unwrap();
    report::write_svg(&report, &config.svg).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config.json).unwrap()).unwrap();
    for key in ["machine", "model", "cores", "repetitions", "results"] {
        assert!(json.get(key).is_some(), "JSON lacks `{key}`");
    }
    for key in ["cpu", "available_cores", "load_average"] {
        assert!(json["machine"].get(key).is_some(), "JSON machine lacks `{key}`");
    }
    assert!(json["machine"]["simd_flags"].is_array(), "JSON machine lacks `simd_flags`");
    assert!(report::table(&report).starts_with("cpu "), "the table header names the CPU");
    let first = &json["results"][2];
    for key in [
        "label",
        "world_size",
        "threads_per_rank",
        "latency_per_step_ms",
        "latency_per_image_s",
        "speedup",
        "steady_step_ms",
        "steady_speedup",
        "param_bytes",
        "buffer_bytes",
        "peak_rss_bytes",
        "comm_bytes_per_step",
        "comm_formula_bytes_per_step",
        "comm_ratio",
        "psnr_db",
        "max_abs_error",
    ] {
        assert!(first.get(key).is_some(), "JSON result lacks `{key}`");
    }
    let svg = std::fs::read_to_string(&config.svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("ulysses"), "the chart names the strategies");
    std::fs::remove_dir_all(&out).ok();
}

/// The same plumbing on a U-Net (the tiny SD 1.5-style fixture at 128 px: 16 latent rows, two
/// of its 8-row bands): the U-Net strategies and CFG parallelism run with communication
/// equal to their formulas, exact ones equal serial, and a transformer-only strategy is a
/// "not run" row naming the family — not a failure of the sweep.
#[test]
fn u_net_strategies_and_cfg_parallelism_run_with_communication_equal_to_their_formulas() {
    let unet = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/unet/sd15");
    let out = std::env::temp_dir().join(format!("harness-bench-unet-{}", std::process::id()));
    let config = BenchConfig::from_toml(&format!(
        r#"
        model = "{}"
        resolutions = [128]
        steps = 2
        world_sizes = [2]
        repetitions = 1
        warmup_runs = 0
        cores = 2
        strategies = ["tensor", "naive_patch", "ulysses",
                      {{ name = "distrifusion", warmup_steps = 1 }},
                      {{ name = "serial", cfg_degree = 2 }}]
        json = "{}"
        svg = "{}"
        "#,
        unet.display(),
        out.join("bench.json").display(),
        out.join("bench.svg").display(),
    ))
    .unwrap();
    let registry = harness::registry::<harness::CpuBackend>();
    let specs = config.strategy_specs(&registry, &[]).unwrap();
    let report = run_bench(&config, &specs, &registry, |l| eprintln!("{l}")).unwrap();
    eprintln!("{}", report::table(&report));
    assert_eq!(report.model.class_name, "UNet2DConditionModel");
    assert_eq!(report.text_tokens, 77, "a U-Net reads CLIP's 77 tokens");
    for r in report.results.iter().filter(|r| r.world_size == 2) {
        if r.strategy == "ulysses" {
            let e = r.error.as_deref().expect("ulysses refuses a U-Net");
            assert!(e.contains("U-Net"), "{e}");
            continue;
        }
        assert!(r.error.is_none(), "{}: {:?}", r.label, r.error);
        for (rank, ratio) in r.comm_ratio.iter().enumerate() {
            assert_eq!(*ratio, Some(1.0), "{} rank {rank}: measured/formula", r.label);
        }
        if ["tensor", "cfg2×serial"].contains(&r.strategy.as_str()) {
            assert!(r.rel_l2.unwrap() < 1e-5, "{}: {:?}", r.label, r.rel_l2);
        }
    }
    assert!(report.results.iter().any(|r| r.strategy == "cfg2×serial"));
    std::fs::remove_dir_all(&out).ok();
}

//! One lone forward: every registered strategy × its declared cases × every fixture (DiT and U-Net) ×
//! every case equals its reference, and sends exactly what its formula says.

use conformance::{check_forward, fixture, fixtures, read_input, registry, runs};
use parallel_core::StrategyOptions;

#[test]
fn every_strategy_equals_its_reference_on_every_fixture() {
    let registry = registry();
    let runs = runs(&registry);
    let fixtures = fixtures();
    assert!(fixtures.len() >= 16, "fixtures/{{dit,mmdit,unet}} have {} models", fixtures.len());
    let mut failures = Vec::new();
    let mut count = 0;
    for run in &runs {
        for f in &fixtures {
            count += 1;
            match check_forward(&registry, run, f) {
                Ok(w) => eprintln!("{run:<44} {f:<22} {}", w.summary()),
                Err(e) => failures.push(e),
            }
        }
    }
    eprintln!("{count} (strategy case, fixture) pairs, {} failed", failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_registered_strategy_declares_suite_cases() {
    let registry = registry();
    for info in registry.infos() {
        assert!(!info.suite.is_empty(), "{} declares no conformance cases", info.name);
        assert!(
            info.suite.iter().any(|c| c.world_sizes.iter().any(|&n| n > 1))
                || info.name == "serial",
            "{} is never run on more than one rank",
            info.name
        );
    }
    let names: Vec<&str> = registry.names();
    for name in
        ["serial", "tensor", "ulysses", "usp", "ring", "distrifusion", "naive_patch", "pipefusion"]
    {
        assert!(names.contains(&name), "{name} is not registered: {names:?}");
    }
}

fn refusal(name: &str, n: usize, model: &str) -> Vec<String> {
    let registry = registry();
    let f = fixture(model);
    let input = read_input(&f.case("square"));
    let run = conformance::SuiteRun {
        strategy: registry.info(name).unwrap().name,
        options: StrategyOptions::new(name),
        world_size: n,
        reference: parallel_core::Reference::Serial,
        family: None,
        cfg_degree: 1,
    };
    conformance::forward_on_ranks(&registry, &run, &f, &input)
        .into_iter()
        .map(|r| r.err().expect("refused").to_string())
        .collect()
}

#[test]
fn ulysses_refuses_heads_not_divisible_before_any_work() {
    for e in refusal("ulysses", 3, "pixart-alpha") {
        assert!(e.contains("4 attention heads") && e.contains("Ulysses degree 3"), "{e}");
        assert!(e.contains("among 1, 2, 4"), "{e}");
    }
}

#[test]
fn tensor_refuses_heads_not_divisible() {
    for e in refusal("tensor", 3, "dit") {
        assert!(e.contains("not divisible by 3 ranks"), "{e}");
    }
}

#[test]
fn pipefusion_refuses_more_stages_than_layers() {
    for e in refusal("pipefusion", 5, "pixart-alpha") {
        assert!(e.contains("4 transformer blocks") && e.contains("5 pipeline stages"), "{e}");
    }
}

#[test]
fn row_splits_refuse_more_ranks_than_rows() {
    // 16×16 latent, patch 2: 8 token rows; 16 ranks cannot each hold one.
    let f = fixture("pixart-alpha");
    let input = read_input(&f.case("square"));
    let err = parallel_core::split::row_partition("ring", &f.desc(), input.grid(), 16).unwrap_err();
    assert!(err.to_string().contains("8 rows of 2 latent rows, fewer than the 16 ranks"), "{err}");
}

#[test]
fn tensor_parallel_parameter_bytes_are_sharded_over_n_plus_replicated() {
    // PixArt; SD3.5 (both streams' projections and MLPs, the dual attention sharded); FLUX
    // (the single blocks' packed proj_out too).
    for name in ["pixart-alpha", "sd35", "flux-dev"] {
        let f = fixture(name);
        let input = read_input(&f.case("square"));
        let config = models_dit::ModelConfig::from_folder(&f.dir).unwrap();
        let (sharded, replicated): (u64, u64) =
            config.params(4).iter().fold((0, 0), |(s, r), p| match p.sharding {
                parallel_core::Sharding::Replicated => (s, r + p.bytes()),
                _ => (s + p.bytes(), r),
            });
        assert!(sharded > replicated, "{name}: most bytes are in the blocks' sharded layers");
        let registry = registry();
        for n in [1, 2, 4] {
            let run = conformance::SuiteRun {
                strategy: "tensor",
                options: StrategyOptions::new("tensor"),
                world_size: n,
                reference: parallel_core::Reference::Serial,
                family: None,
                cfg_degree: 1,
            };
            for rep in conformance::forward_on_ranks(&registry, &run, &f, &input) {
                assert_eq!(
                    rep.unwrap().param_bytes,
                    sharded / n as u64 + replicated,
                    "{name} n={n}"
                );
            }
        }
    }
}

/// The same on a U-Net (distrifuser's split: resnets' convs, time projections and second
/// norms, transformers' q/k/v, outputs and GEGLU), from the loaded model's placements.
#[test]
fn unet_tensor_parallel_parameter_bytes_are_sharded_over_n_plus_replicated() {
    let f = fixture("sdxl");
    let input = f.read(&f.case("square"));
    let whole = models_unet::UnetModel::<conformance::B>::load(
        &f.dir,
        &parallel_core::LoadPlan::full(),
        &Default::default(),
    )
    .unwrap();
    assert!(
        whole.params().iter().all(|p| p.sharding == parallel_core::Sharding::Replicated),
        "an unsharded load records every parameter as replicated"
    );
    let total: u64 = whole.params().iter().map(|p| p.bytes()).sum();
    let registry = registry();
    let run = conformance::SuiteRun {
        strategy: "tensor",
        options: StrategyOptions::new("tensor"),
        world_size: 2,
        reference: parallel_core::Reference::Serial,
        family: None,
        cfg_degree: 1,
    };
    let plan = parallel_core::LoadPlan {
        tensor_shard: Some(parallel_core::Shard { rank: 0, world: 2 }),
        ..parallel_core::LoadPlan::full()
    };
    let part =
        models_unet::UnetModel::<conformance::B>::load(&f.dir, &plan, &Default::default()).unwrap();
    let split: u64 = part
        .params()
        .iter()
        .filter(|p| p.sharding != parallel_core::Sharding::Replicated)
        .map(|p| p.bytes())
        .sum();
    // Measured: 92% of the tiny SDXL's bytes are split (its replicated part: conv_in/out,
    // samplers, shortcuts, norm1s, embeddings, proj_in/out).
    assert!(split > total / 2, "most of the U-Net's bytes are split: {split} of {total}");
    for rep in conformance::forward_on_ranks(&registry, &run, &f, &input) {
        assert_eq!(rep.unwrap().param_bytes, split / 2 + (total - split), "n=2");
    }
    eprintln!("split {split} of {total} bytes ({:.0}%)", 100.0 * split as f64 / total as f64);
}

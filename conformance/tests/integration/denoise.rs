//! Multi-step runs: every registered strategy × its declared cases × every fixture (DiT and U-Net), a
//! guided DPM-Solver++ loop through the strategy's `denoise`, against the reference loop of
//! its definition ([`conformance::check_denoise`]): final latents, every step's traffic,
//! equal ranks, and a second request on the same instance (state reset).
//!
//! Then what only some strategies have: DistriFusion's buffers and asynchronous gathers,
//! PipeFusion's blocks per stage.

use conformance::{
    B, References, check_denoise_with, fixture, fixtures, read_input, registry, runs,
};
use parallel_core::{OptionValue, Reference, StrategyOptions};

/// Six steps: with warmup 1 and 2 that is 5 and 4 stale steps — each one reading the
/// previous step's K/V, so a bookkeeping error of one step or one patch compounds (see
/// `tests/stale.rs` for what the suite tells apart).
const STEPS: usize = 6;

#[test]
fn every_strategy_equals_its_reference_loop_on_every_fixture() {
    let registry = registry();
    let mut failures = Vec::new();
    let mut worst = (0.0f64, String::new());
    // Every exact strategy's reference is the same serial loop: computed once per fixture.
    let mut references = References::default();
    for run in runs(&registry) {
        for f in fixtures() {
            match check_denoise_with(&registry, &run, &f, STEPS, &mut references) {
                Ok(r) if r.not_applicable.is_some() => {
                    eprintln!("{run:<44} {f:<22} not applicable: {}", r.not_applicable.unwrap())
                }
                Ok(r) => {
                    eprintln!(
                        "{run:<44} {f:<22} rel L2 vs reference {:.2e}, PSNR vs serial {:.1} dB",
                        r.rel_l2, r.psnr_vs_serial
                    );
                    if f.dtype == burn::tensor::DType::F32 && r.rel_l2 > worst.0 {
                        worst = (r.rel_l2, format!("{run} {f}"));
                    }
                }
                Err(e) => failures.push(e),
            }
        }
    }
    eprintln!("worst float32 loop: {:.2e} ({})", worst.0, worst.1);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn run(
    name: &'static str,
    n: usize,
    options: &[(&str, i64)],
    reference: Reference,
) -> conformance::SuiteRun {
    let mut o = StrategyOptions::new(name);
    for (k, v) in options {
        o.set(*k, OptionValue::Int(*v));
    }
    conformance::SuiteRun::new(name, o, n, reference)
}

#[test]
fn distrifusion_buffers_hold_every_layers_k_and_v() {
    let registry = registry();
    let f = fixture("pixart-alpha");
    let case = read_input(&f.case("wide"));
    let d = f.desc();
    for n in [2, 4] {
        let r = run(
            "distrifusion",
            n,
            &[("warmup_steps", 2)],
            Reference::DisplacedPatches {
                warmup_steps: 2,
                norm: parallel_core::GroupNormMode::CorrectedAsync,
            },
        );
        for (rank, reps) in conformance::denoise_on_ranks(&registry, &r, &f, &case, STEPS, 1)
            .into_iter()
            .enumerate()
        {
            let rep = &reps.unwrap()[0];
            let request = parallel_core::RequestInfo {
                steps: STEPS,
                grid: case.grid(),
                batch: 2,
                images: 1,
                text_tokens: 12,
            };
            let elements = strategy_distrifusion::buffer_elements(&d, &request);
            assert_eq!(
                rep.buffer_bytes,
                elements * 4,
                "n={n} rank {rank}: 2·p·hs·L·B f32 elements"
            );
        }
    }
}

#[test]
fn distrifusion_gathers_are_waited_on_in_the_next_step() {
    use parallel_core::{LaunchOptions, LoadPlan, ParallelStrategy, launch};
    let f = fixture("pixart-alpha");
    let input = read_input(&f.case("square"));
    let d = f.desc();
    let warmup = 2;
    let steps = 6;
    let results = launch(2, &LaunchOptions::<B>::default(), |comm| {
        let mut s = strategy_distrifusion::DistriFusion::new(
            comm.clone(),
            &strategy_distrifusion::DistriFusionConfig::default().with_warmup_steps(warmup),
        )?;
        let model = f.load(&LoadPlan::full(), burn::tensor::DType::F32, &comm.device())?;
        let mut sampler = conformance::sampler(&input, &d, steps)?;
        let mut request = parallel_core::RequestInfo::for_forward(&input);
        request.steps = steps;
        request.images = 1;
        s.begin_request(&d, &request)?;
        let latents = conformance::initial_latents(&sampler, &input);
        s.denoise(&model, &mut sampler, latents)?;
        Ok(s.gather_events().to_vec())
    });
    for r in results {
        let events = r.unwrap();
        // Steps 2..5 start a gather per layer; those of steps 2..4 are waited in the next.
        assert_eq!(events.len(), d.num_layers * 3);
        for e in events {
            assert!(e.started >= warmup, "{e:?}");
            assert_eq!(
                e.waited,
                e.started + 1,
                "{e:?}: waited in the step after the one that started it"
            );
        }
    }
}

#[test]
fn pipefusion_holds_its_own_blocks_and_buffers() {
    let registry = registry();
    let f = fixture("pixart-alpha");
    let case = read_input(&f.case("square"));
    let d = f.desc();
    let config = models_dit::ModelConfig::from_folder(&f.dir).unwrap();
    let params = config.params(4);
    let block_bytes =
        |b: usize| -> u64 { params.iter().filter(|p| p.block == Some(b)).map(|p| p.bytes()).sum() };
    let total: u64 = params.iter().map(|p| p.bytes()).sum();
    let all_blocks: u64 = (0..d.num_layers).map(block_bytes).sum();
    let n = 4;
    let r = run(
        "pipefusion",
        n,
        &[("warmup_steps", 1)],
        Reference::PipelinedPatches { patches: 4, warmup_steps: 1 },
    );
    let reports: Vec<_> = conformance::denoise_on_ranks(&registry, &r, &f, &case, STEPS, 1)
        .into_iter()
        .map(|x| x.unwrap().remove(0))
        .collect();
    let held: u64 = reports.iter().map(|r| r.param_bytes).sum();
    for (rank, rep) in reports.iter().enumerate() {
        // One block per stage here; the rest is embeddings/head (replicated or first/last).
        assert!(rep.param_bytes < total, "rank {rank} holds everything");
        assert!(rep.param_bytes >= block_bytes(rank), "rank {rank}");
        let p = d.tokens(case.grid()).len() as u64;
        assert_eq!(
            rep.buffer_bytes,
            2 * 2 * p * d.hidden_size as u64 * 4,
            "rank {rank}: one layer's K/V"
        );
    }
    // Every block is held exactly once across the stages.
    assert!(held >= all_blocks && held < all_blocks + n as u64 * (total - all_blocks));
}

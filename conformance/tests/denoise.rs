//! Multi-step runs: the scheduler loop through every strategy.
//!
//! - fresh-K/V strategies (ulysses, ring, usp, tensor) and the stale ones with every step a
//!   warmup step equal the serial loop after 20 steps;
//! - DistriFusion and PipeFusion with warmup 1 differ from serial, and their PSNR against
//!   serial is reported (and DistriFusion's beats naive patch's);
//! - the state is reset per request: a second request gives the same result;
//! - DistriFusion's gathers are really asynchronous; buffers and communication per step
//!   equal the formulas.

use conformance::{B, denoise_on_ranks, desc, model_dir, psnr, read_input, rel_l2, serial_denoise};
use parallel_core::{OpKind, OptionValue, StrategyOptions};

const STEPS: usize = 20;

/// Twenty steps of DPM-Solver++ amplify float32 rounding differences of the model (~1e-6
/// per evaluation) through the multistep update and a random-weight model whose latents
/// grow to ~1e3: the bar for the pipeline, 1e-4 relative.
const LOOP_REL_L2: f64 = 1e-4;

fn opts(name: &str, kv: &[(&str, i64)]) -> StrategyOptions {
    let mut o = StrategyOptions::new(name);
    for (k, v) in kv {
        o.set(*k, OptionValue::Int(*v));
    }
    o
}

fn case(model: &str, name: &str) -> (std::path::PathBuf, parallel_core::DenoiserInput<B>) {
    let dir = model_dir(model);
    let input = read_input(&dir.join(format!("cases/{name}.safetensors")));
    (dir, input)
}

fn run(
    name: &str,
    o: &StrategyOptions,
    n: usize,
    model: &str,
    case_name: &str,
    repeat: usize,
) -> Vec<(Vec<conformance::RankReport>, Vec<parallel_core::CommStats>)> {
    let (dir, input) = case(model, case_name);
    denoise_on_ranks(name, o, n, &dir, &input, STEPS, repeat)
        .into_iter()
        .enumerate()
        .map(|(r, x)| {
            x.unwrap_or_else(|e| panic!("{name} n={n} {model}/{case_name} rank {r}: {e}"))
        })
        .collect()
}

#[test]
fn fresh_strategies_and_all_warmup_stale_ones_equal_the_serial_loop() {
    for (model, case_name) in
        [("pixart-alpha", "wide"), ("dit", "square"), ("pixart-sigma", "rows10")]
    {
        let (dir, input) = case(model, case_name);
        let serial = serial_denoise(&dir, &input, STEPS);
        let configs: Vec<(&str, StrategyOptions, Vec<usize>)> = vec![
            ("ulysses", opts("ulysses", &[]), vec![2, 4]),
            ("ring", opts("ring", &[]), vec![2, 4]),
            ("usp", opts("usp", &[("ulysses_degree", 2), ("ring_degree", 2)]), vec![4]),
            ("tensor", opts("tensor", &[]), vec![2, 4]),
            ("distrifusion", opts("distrifusion", &[("warmup_steps", STEPS as i64)]), vec![2, 4]),
            ("pipefusion", opts("pipefusion", &[("warmup_steps", STEPS as i64)]), vec![2, 4]),
        ];
        for (name, o, sizes) in configs {
            for n in sizes {
                for (r, (reports, _)) in
                    run(name, &o, n, model, case_name, 1).into_iter().enumerate()
                {
                    let err = rel_l2(&reports[0].output, &serial);
                    assert!(
                        err <= LOOP_REL_L2,
                        "{name} n={n} {model}/{case_name} rank {r}: {err:.2e}"
                    );
                }
            }
        }
    }
}

/// PSNR against the serial loop after 20 steps, reported for DistriFusion (warmup 1, 2, 4),
/// PipeFusion (warmup 1, M = N and 2N) and naive patch.
///
/// Measured on these random-weight fixtures: with a single warmup step DistriFusion is only
/// about as good as naive patch (e.g. 40.0 vs 41.1 dB on PixArt-α at N = 2, 36.9 vs 33.5 dB
/// at N = 4), because DPM-Solver's first step moves the latents from O(1) noise to O(1e3)
/// (a random model's x0 prediction divided by α_999 ≈ 0.006), so the K/V of step 0 say
/// little about step 1. From two warmup steps on it is far better (≈ 47–49 dB vs 33–41).
/// The test asserts what holds robustly — warmup 1 differs from serial; warmup ≥ 2 beats
/// naive patch at N = 2 and 4 on PixArt and DiT — and prints the table.
#[test]
fn stale_strategies_report_psnr_against_serial() {
    for (model, case_name) in [("pixart-alpha", "square"), ("dit", "square")] {
        let (dir, input) = case(model, case_name);
        let serial = serial_denoise(&dir, &input, STEPS);
        for n in [2, 4] {
            let score = |name: &str, o: &StrategyOptions| {
                let reports = run(name, o, n, model, case_name, 1);
                // Every rank returns the same latents.
                for (rs, _) in &reports[1..] {
                    assert_eq!(
                        rel_l2(&rs[0].output, &reports[0].0[0].output),
                        0.0,
                        "{name}: ranks differ"
                    );
                }
                psnr(&reports[0].0[0].output, &serial)
            };
            let naive = score("naive_patch", &opts("naive_patch", &[]));
            let df: Vec<f64> = [1, 2, 4]
                .iter()
                .map(|&w| score("distrifusion", &opts("distrifusion", &[("warmup_steps", w)])))
                .collect();
            let pipe: Vec<f64> = [n, 2 * n]
                .iter()
                .map(|&m| {
                    let o = opts(
                        "pipefusion",
                        &[("warmup_steps", 1), ("num_pipeline_patch", m as i64)],
                    );
                    score("pipefusion", &o)
                })
                .collect();
            eprintln!(
                "PSNR vs serial, {STEPS} steps, {model}/{case_name}, N={n}: naive patch {naive:.1} dB; \
                 distrifusion warmup 1/2/4: {:.1}/{:.1}/{:.1} dB; pipefusion warmup 1, M={}/{}: \
                 {:.1}/{:.1} dB",
                df[0],
                df[1],
                df[2],
                n,
                2 * n,
                pipe[0],
                pipe[1]
            );
            assert!(df[0].is_finite() && df[0] < 200.0, "warmup 1 must differ from serial");
            assert!(pipe[0].is_finite() && pipe[0] < 200.0, "warmup 1 must differ from serial");
            assert!(
                df[1] > naive,
                "{model} N={n}: DistriFusion(warmup 2) {:.1} dB ≤ naive {naive:.1} dB",
                df[1]
            );
            assert!(df[2] > df[1], "{model} N={n}: more warmup must not hurt");
        }
    }
}

#[test]
fn a_second_request_gives_the_same_result() {
    for (name, o) in [
        ("distrifusion", opts("distrifusion", &[("warmup_steps", 1)])),
        ("pipefusion", opts("pipefusion", &[("warmup_steps", 1), ("num_pipeline_patch", 4)])),
        ("ring", opts("ring", &[])),
    ] {
        for (r, (reports, _)) in
            run(name, &o, 2, "pixart-alpha", "square", 2).into_iter().enumerate()
        {
            assert_eq!(
                rel_l2(&reports[1].output, &reports[0].output),
                0.0,
                "{name} rank {r}: the second request differs from the first"
            );
        }
    }
}

#[test]
fn distrifusion_communication_and_buffers_per_step_equal_the_formulas() {
    let (model, case_name) = ("pixart-alpha", "wide");
    let (dir, input) = case(model, case_name);
    let d = desc(&dir);
    for n in [2, 4] {
        let o = opts("distrifusion", &[("warmup_steps", 2)]);
        for (r, (reports, snaps)) in
            run("distrifusion", &o, n, model, case_name, 1).into_iter().enumerate()
        {
            let rep = &reports[0];
            let want = rep.expected.elements[&OpKind::AllGather];
            assert_eq!(snaps.len(), STEPS + 1);
            for s in 0..STEPS {
                let step = snaps[s + 1].since(&snaps[s]);
                assert_eq!(step.get(OpKind::AllGather).elements, want, "n={n} rank {r} step {s}");
                assert_eq!(step.total_elements(), want, "n={n} rank {r} step {s}: only gathers");
            }
            let request = parallel_core::RequestInfo {
                steps: STEPS,
                grid: input.grid(),
                batch: 2,
                images: 1,
                text_tokens: 12,
            };
            let elements = strategy_distrifusion::buffer_elements(&d, &request);
            assert_eq!(rep.buffer_bytes, elements * 4, "n={n}: 2·p·hs·L·B f32 elements");
        }
    }
}

#[test]
fn distrifusion_gathers_are_waited_on_in_the_next_step() {
    use parallel_core::{DenoiseLoop, LaunchOptions, ParallelStrategy, launch};
    let (model, case_name) = ("pixart-alpha", "square");
    let (dir, input) = case(model, case_name);
    let d = desc(&dir);
    let warmup = 2;
    let results = launch(2, &LaunchOptions::<B>::default(), |comm| {
        let mut s = strategy_distrifusion::DistriFusion::new(comm.clone(), warmup);
        let model =
            models_dit::DitModel::<B>::load(&dir, &parallel_core::LoadPlan::full(), &comm.device())
                .map_err(|e| parallel_core::ParallelError::Model(e.to_string()))?;
        let mut sampler = conformance::GuidedSampler::new(&input, 6, d.in_channels);
        let request = parallel_core::RequestInfo {
            steps: 6,
            grid: input.grid(),
            batch: 2,
            images: 1,
            text_tokens: 12,
        };
        s.begin_request(&d, &request)?;
        let latents = sampler.initial_latents();
        assert_eq!(sampler.num_steps(), 6);
        s.denoise(&model, &mut sampler, latents)?;
        Ok(s.gather_events().to_vec())
    });
    for r in results {
        let events = r.unwrap();
        // Steps 2..5 start a gather per layer; those of steps 2..4 are waited in the next.
        assert_eq!(events.len(), d.num_layers * 3);
        for e in events {
            assert!(e.started >= warmup, "{e:?}");
            assert_eq!(e.waited, e.started + 1, "{e:?}: waited in the step that started it");
        }
    }
}

#[test]
fn pipefusion_communication_per_request_equals_the_formula_and_has_no_factor_l() {
    let (model, case_name) = ("pixart-alpha", "square");
    let (dir, input) = case(model, case_name);
    let d = desc(&dir);
    for (n, m) in [(2, 2), (2, 4), (4, 4), (4, 8)] {
        let o = opts("pipefusion", &[("warmup_steps", 1), ("num_pipeline_patch", m)]);
        for (r, (reports, _)) in
            run("pipefusion", &o, n, model, case_name, 1).into_iter().enumerate()
        {
            let rep = &reports[0];
            let per_step = rep.expected.elements.get(&OpKind::Send).copied().unwrap_or(0);
            assert_eq!(
                rep.stats.get(OpKind::Send).elements,
                per_step * STEPS as u64,
                "n={n} m={m} rank {r}"
            );
            let g = input.grid();
            let latent = (d.in_channels * g.height * g.width) as u64;
            let bcast = if r + 1 == n { latent * (n as u64 - 1) } else { 0 };
            assert_eq!(rep.stats.get(OpKind::Broadcast).elements, bcast, "n={n} m={m} rank {r}");
            // Activations: B·p·hs per stage boundary, independent of the layer count.
            if r + 1 < n {
                let p = d.tokens(g).len() as u64;
                assert_eq!(per_step, 2 * p * d.hidden_size as u64);
            }
        }
    }
}

#[test]
fn pipefusion_holds_its_own_blocks_and_buffers() {
    let (model, case_name) = ("pixart-alpha", "square");
    let (dir, input) = case(model, case_name);
    let d = desc(&dir);
    let config = models_dit::ModelConfig::from_folder(&dir).unwrap();
    let params = match &config {
        models_dit::ModelConfig::PixArt(c) => c.params(4),
        models_dit::ModelConfig::DiT(c) => c.params(4),
    };
    let block_bytes =
        |b: usize| -> u64 { params.iter().filter(|p| p.block == Some(b)).map(|p| p.bytes()).sum() };
    let total: u64 = params.iter().map(|p| p.bytes()).sum();
    let all_blocks: u64 = (0..d.num_layers).map(block_bytes).sum();
    let n = 4;
    let o = opts("pipefusion", &[("warmup_steps", 1)]);
    let reports = run("pipefusion", &o, n, model, case_name, 1);
    let held: u64 = reports.iter().map(|(r, _)| r[0].param_bytes).sum();
    for (r, (rep, _)) in reports.iter().enumerate() {
        // One block per stage here; the rest is embeddings/head (replicated or first/last).
        assert!(rep[0].param_bytes < total, "rank {r} holds everything");
        assert!(rep[0].param_bytes >= block_bytes(r), "rank {r}");
        let p = d.tokens(input.grid()).len() as u64;
        assert_eq!(
            rep[0].buffer_bytes,
            2 * 2 * p * d.hidden_size as u64 * 4,
            "rank {r}: one layer's K/V"
        );
    }
    // Every block is held exactly once across the stages.
    assert!(held >= all_blocks && held < all_blocks + n as u64 * (total - all_blocks));
    eprintln!(
        "pipefusion n={n}: parameter bytes per rank {:?} (whole model {total}, blocks {all_blocks})",
        reports.iter().map(|(r, _)| r[0].param_bytes).collect::<Vec<_>>()
    );
}

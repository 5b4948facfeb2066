//! What the stale strategies' references can tell apart.
//!
//! DistriFusion and PipeFusion after warmup differ from serial by design (PSNR 50–55 dB after
//! six steps on these random fixtures, see `tests/denoise.rs`), so "close to serial" proves
//! nothing about their bookkeeping. The suite instead requires them to equal an exact
//! single-rank reference of their definition (`conformance::reference`). This test shows that
//! requirement has teeth: a strategy whose K/V were one step too old, whose own band were
//! stale, whose earlier patches were stale (or fresh when they must not be), whose bands
//! were cut one patch off, or — on a U-Net, whose halo rows and statistics are stale too —
//! whose group norms used another mode's statistics, would be far outside the suite's bound.

use std::collections::BTreeMap;

use conformance::reference::bands;
use conformance::{
    Plan, Variant, compare, denoise_on_ranks, fixture, not_applicable, reference_denoise, registry,
    runs,
};
use parallel_core::{GroupNormMode, ModelFamily, Reference};

const STEPS: usize = 6;

/// How far from the real strategy each mutation must land, in relative L2, in at least one
/// of the strategy's declared cases: 20× the float32 loop bound (1e-5). Measured: the
/// closest mutation of each strategy is 9.8e-4 to 2.8e-2 away (98× to 2800× the bound),
/// while the strategies equal their references to 7.2e-7 at worst (bitwise on most runs).
/// Not in every case: with DistriFusion's default four warmup steps out of six, "two steps
/// old" K/V are only ~2e-6 away — late steps barely move the K/V — which is why the suite
/// also declares warmup 1 and 2.
const MUTANT_MIN: f64 = 2e-4;

fn mutants(
    plan: &Plan,
    reference: &Reference,
    rows: usize,
    n: usize,
    family: ModelFamily,
) -> Vec<(String, Plan)> {
    let Plan::Stale { variant, .. } = plan.clone() else { return Vec::new() };
    let mut out = vec![
        (
            "K/V two steps old".to_string(),
            plan.clone().with_variant(Variant { stale_by: 2, ..variant }),
        ),
        (
            "own band stale".to_string(),
            plan.clone().with_variant(Variant { own_fresh: false, ..variant }),
        ),
        (
            if variant.earlier_fresh { "earlier patches stale" } else { "earlier bands fresh" }
                .to_string(),
            plan.clone().with_variant(Variant { earlier_fresh: !variant.earlier_fresh, ..variant }),
        ),
    ];
    let shifted = match reference {
        Reference::PipelinedPatches { patches, .. } if *patches > 1 => Some(patches - 1),
        Reference::DisplacedPatches { .. } => Some(n + 1),
        _ => None,
    };
    if let (Some(m), Plan::Stale { warmup_steps, variant, step_bands, norm, .. }) =
        (shifted, plan.clone())
    {
        out.push((
            format!("cut into {m} bands"),
            Plan::Stale { bands: bands(rows, m), warmup_steps, variant, step_bands, norm },
        ));
    }
    // A U-Net's group norms with another mode's statistics (sync has no sequential
    // definition after warmup).
    if let (ModelFamily::Unet, Plan::Stale { norm, .. }) = (family, plan) {
        for other in [GroupNormMode::Stale, GroupNormMode::CorrectedAsync, GroupNormMode::Separate]
        {
            if other != *norm {
                let mut mutant = plan.clone();
                if let Plan::Stale { norm, .. } = &mut mutant {
                    *norm = other;
                }
                out.push((format!("gn_mode {other}"), mutant));
            }
        }
    }
    out
}

#[test]
fn a_one_step_or_one_patch_mistake_is_far_outside_the_bound() {
    let registry = registry();
    // (strategy, mutation) → the largest distance over the strategy's cases, and where.
    let mut caught: BTreeMap<(String, String), (f64, String)> = BTreeMap::new();
    // A plan already mutated on a fixture for a strategy tells nothing new when another case
    // of the strategy has the same definition (PipeFusion's patches do not depend on how
    // many stages, or how many ranks per stage, run them): each (strategy, plan) once.
    let mut seen = std::collections::BTreeSet::new();
    for model in ["pixart-alpha", "dit", "sd15", "sdxl"] {
        let f = fixture(model);
        let case = f.read(&f.loop_case());
        let rows = f.units(case.grid());
        for run in runs(&registry) {
            let plan = Plan::of(&run.reference, rows, run.world_size);
            if !matches!(plan, Plan::Stale { .. })
                || run.world_size < 2
                || run.cfg_degree > 1
                || not_applicable(&registry, &run, &f, case.grid()).unwrap().is_some()
                || !seen.insert((run.strategy, f.name.clone(), format!("{plan:?}")))
            {
                continue;
            }
            let ours = denoise_on_ranks(&registry, &run, &f, &case, STEPS, 1)
                .remove(0)
                .unwrap_or_else(|e| panic!("{run}: {e}"))
                .remove(0)
                .output;
            let exact = compare(&ours, &reference_denoise(&plan, &f, &case, STEPS));
            assert!(exact.rel_l2 <= f.tolerance(true), "{run} {f}: {exact}");
            for (what, mutant) in mutants(&plan, &run.reference, rows, run.world_size, f.family) {
                if mutant == plan {
                    continue;
                }
                let c = compare(&ours, &reference_denoise(&mutant, &f, &case, STEPS));
                eprintln!("{run:<44} {f:<14} vs \"{what}\": rel L2 {:.2e}", c.rel_l2);
                let e =
                    caught.entry((run.strategy.to_string(), what)).or_insert((0.0, String::new()));
                if c.rel_l2 > e.0 {
                    *e = (c.rel_l2, format!("{run} {f}"));
                }
            }
        }
    }
    assert!(!caught.is_empty(), "no stale strategy registered");
    let mut missed = Vec::new();
    for ((strategy, what), (d, at)) in &caught {
        eprintln!("{strategy:<14} \"{what}\": caught at rel L2 {d:.2e} ({at})");
        if *d <= MUTANT_MIN {
            missed.push(format!("{strategy}: \"{what}\" is at most {d:.2e} from the strategy"));
        }
    }
    assert!(missed.is_empty(), "{}", missed.join("\n"));
}

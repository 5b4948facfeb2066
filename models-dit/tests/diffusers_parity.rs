//! Every fixture case of every model against diffusers 0.42.1's output on the same weights
//! and inputs (float32, CPU).

mod common;

use common::{B, cases, errors, fixtures, read_case};
use models_dit::DitModel;
use parallel_core::{Denoiser, LoadPlan, Serial};

/// Relative L2 error bar: float32 rounding of the same computation in a different order
/// (torch's fused addmm / SDPA kernels vs Burn's) accumulates to ~1e-7–1e-6 relative through
/// 4 blocks; 1e-5 is the project's serial-vs-diffusers bar (DESIGN.md) and is 10³ below the
/// smallest sensitivity of the fixtures (a timestep off by one changes the output by 0.15).
const REL_L2: f64 = 1e-5;
/// Worst single element, relative to the output's largest magnitude: rounding concentrates
/// in a few elements, so this bar is 10× looser than the L2 one, still far below any real
/// mistake (the fixtures' sensitivity checks all move the output by ≥ 1e-2).
const MAX_REL: f64 = 1e-4;

fn check_model(model: &str) -> (f64, f64) {
    let dev = Default::default();
    let m = DitModel::<B>::load(fixtures().join(model), &LoadPlan::full(), &dev)
        .unwrap_or_else(|e| panic!("{model}: {e}"));
    let files = cases(model);
    assert!(!files.is_empty(), "{model}: no cases");
    let (mut worst_l2, mut worst_max) = (0f64, 0f64);
    for file in files {
        let case = read_case(&file);
        let h = case.input.grid().height;
        let out = m.forward_rows(&case.input, 0..h, &mut Serial).unwrap();
        let (l2, max) = errors(&out, &case.sample);
        println!("{model}/{}: rel L2 {l2:.2e}, max rel {max:.2e}", case.name);
        assert!(
            l2 <= REL_L2 && max <= MAX_REL,
            "{model}/{}: rel L2 {l2:.2e}, max {max:.2e}",
            case.name
        );
        worst_l2 = worst_l2.max(l2);
        worst_max = worst_max.max(max);
    }
    (worst_l2, worst_max)
}

#[test]
fn pixart_alpha_matches_diffusers() {
    check_model("pixart-alpha");
}

#[test]
fn pixart_alpha_ms_matches_diffusers() {
    check_model("pixart-alpha-ms");
}

#[test]
fn pixart_sigma_matches_diffusers() {
    check_model("pixart-sigma");
}

#[test]
fn dit_matches_diffusers() {
    check_model("dit");
}

#[test]
fn sharded_f16_and_bf16_checkpoints_match_diffusers() {
    for model in ["pixart-alpha-sharded", "pixart-alpha-f16", "pixart-alpha-bf16"] {
        check_model(model);
    }
}

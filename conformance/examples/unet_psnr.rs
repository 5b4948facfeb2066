//! PSNR of DistriFusion's final latents against serial after a guided 20-step loop on the
//! tiny U-Net fixtures, for every `gn_mode` and warmup 1, 2, 4, beside naive patch (not run
//! by CI; numbers in `docs/BENCH.md`).
//!
//! ```sh
//! cargo run --release -p conformance --example unet_psnr -- 20
//! ```
//!
//! Random-weight fixtures: the numbers compare the modes with each other and with naive
//! patch, not with what a trained SD model would show.

use conformance::{
    Plan, SuiteRun, check_denoise, compare, denoise_on_ranks, fixture, reference_denoise, registry,
};
use parallel_core::{GroupNormMode, OptionValue, Reference, StrategyOptions};

fn main() {
    let steps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let registry = registry();
    for (model, n) in [("sd15", 2), ("sdxl", 2), ("sdxl", 4)] {
        let f = fixture(model);
        let run = |strategy: &'static str, options: StrategyOptions, reference| {
            SuiteRun::new(strategy, options, n, reference)
        };
        let naive =
            run("naive_patch", StrategyOptions::new("naive_patch"), Reference::LocalPatches);
        let r = check_denoise(&registry, &naive, &f, steps).expect("naive patch");
        println!(
            "{model} n={n} steps={steps} naive_patch: PSNR vs serial {:.1} dB",
            r.psnr_vs_serial
        );
        for mode in GroupNormMode::ALL {
            let mut line = format!("{model} n={n} steps={steps} distrifusion gn_mode={mode:<16}");
            for warmup in [1usize, 2, 4] {
                let options = StrategyOptions::new("distrifusion")
                    .with("warmup_steps", OptionValue::Int(warmup as i64))
                    .with("gn_mode", OptionValue::Str(mode.name().into()));
                let reference = Reference::DisplacedPatches { warmup_steps: warmup, norm: mode };
                let psnr = if mode == GroupNormMode::Sync {
                    // No sequential reference of sync statistics after warmup: the run against
                    // the serial loop only.
                    let case = f.read(&f.loop_case());
                    let r = run("distrifusion", options, reference);
                    let out = denoise_on_ranks(&registry, &r, &f, &case, steps, 1).remove(0);
                    let serial = reference_denoise(&Plan::Serial, &f, &case, steps);
                    compare(&out.expect("distrifusion").remove(0).output, &serial).psnr
                } else {
                    let r = run("distrifusion", options, reference);
                    check_denoise(&registry, &r, &f, steps).expect("distrifusion").psnr_vs_serial
                };
                line.push_str(&format!(" warmup {warmup}: {psnr:>5.1} dB"));
            }
            println!("{line}");
        }
    }
}

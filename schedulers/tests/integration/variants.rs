//! The scheduler options the main fixtures do not exercise (other prediction types, Heun,
//! first order, `sigma_min` final sigmas with and without `euler_at_final`, a clipped cosine
//! schedule, `leading`/`trailing` spacing, odd step counts, flow shifts), against diffusers
//! 0.42.1: `tests/data/variants.json`, made by `tools/fixtures/schedulers.py`.
//!
//! Same bars as `diffusers_parity.rs`: timesteps exactly equal; sigmas and `init_noise_sigma`
//! within 1 ulp (torch's float32 `sqrt` is not correctly rounded; measured: sigmas 1 ulp apart
//! in every DPM-Solver and some Euler cases, `init_noise_sigma` equal); every `prev_sample`
//! within 5e-6 relative (max-abs and L2), fed our own previous output. Measured worst on the
//! reference machine (AMD EPYC, AVX2): 7.9e-7 max-relative (`ddim_v_prediction`), so 5e-6 is
//! a margin of 6 (it was 1e-5, a margin of 13).

use burn::tensor::{Tensor, TensorData};
use burn_flex::Flex;
use schedulers::{Scheduler, TimestepDType};
use serde::Deserialize;

type B = Flex;

/// Relative error bar of samples: measured worst 7.9e-7 (`ddim_v_prediction`, 7 steps,
/// max-relative), a margin of 6; see the module docs.
const SAMPLE_REL_TOL: f64 = 5e-6;
/// Largest distance, in float32 ulps, of a sigma: measured 1; 0 would fail on torch's `sqrt`.
const MAX_SQRT_ULPS: u32 = 1;

#[derive(Deserialize)]
struct Variants {
    shape: [usize; 4],
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    config: String,
    steps: usize,
    timesteps_dtype: String,
    timesteps: Vec<f64>,
    sigmas: Option<Vec<f64>>,
    init_noise_sigma: f64,
    initial_sample: Vec<f32>,
    model_outputs: Vec<Vec<f32>>,
    prev_samples: Vec<Vec<f32>>,
}

fn ulps(a: f32, b: f32) -> u32 {
    if a == b { 0 } else { a.to_bits().abs_diff(b.to_bits()) }
}

/// `(max|a − b| / max|b|, ‖a − b‖₂ / ‖b‖₂)` ([`metrics::compare`]).
fn rel_errors(ours: &[f32], theirs: &[f32]) -> (f64, f64) {
    let c = metrics::compare(ours, theirs);
    (c.max_rel, c.rel_l2)
}

#[test]
fn variants_equal_diffusers() {
    let text = include_str!("../data/variants.json");
    let variants: Variants = serde_json::from_str(text).unwrap();
    let tensor = |v: &[f32]| -> Tensor<B, 4> {
        Tensor::from_data(TensorData::new(v.to_vec(), variants.shape), &Default::default())
    };
    println!("case                               steps  prev_sample max-rel  L2-rel");
    for case in &variants.cases {
        let name = &case.name;
        let scheduler =
            Scheduler::from_json(&case.config).unwrap_or_else(|e| panic!("{name}: {e}"));
        let schedule = scheduler.set_timesteps(case.steps).unwrap();
        assert_eq!(schedule.timesteps(), case.timesteps.as_slice(), "{name}: timesteps");
        let dtype = match case.timesteps_dtype.as_str() {
            "int64" => TimestepDType::Int64,
            "float32" => TimestepDType::Float32,
            other => panic!("{name}: timesteps of dtype {other}"),
        };
        assert_eq!(schedule.timestep_dtype(), dtype, "{name}");
        match (&case.sigmas, schedule.sigmas()) {
            (Some(theirs), Some(ours)) => {
                assert_eq!(ours.len(), theirs.len(), "{name}: number of sigmas");
                for (i, (&a, &b)) in ours.iter().zip(theirs).enumerate() {
                    assert!(ulps(a, b as f32) <= MAX_SQRT_ULPS, "{name}: sigma {i}: {a} vs {b}");
                }
                let worst = ours.iter().zip(theirs).map(|(&a, &b)| ulps(a, b as f32)).max();
                println!("{name}: sigmas within {} ulp", worst.unwrap_or(0));
            }
            (None, None) => {}
            _ => panic!("{name}: sigmas present on one side only"),
        }
        let init = schedule.init_noise_sigma();
        println!(
            "{name}: init_noise_sigma within {} ulp",
            ulps(init, case.init_noise_sigma as f32)
        );
        assert!(ulps(init, case.init_noise_sigma as f32) <= MAX_SQRT_ULPS, "{name}: init {init}");

        let mut state = schedule.new_state::<B, 4>();
        let mut sample = tensor(&case.initial_sample);
        let mut worst = (0f64, 0f64);
        for i in 0..case.steps {
            let out = tensor(&case.model_outputs[i]);
            sample = schedule.step(&mut state, i, out, sample).unwrap();
            let ours = sample.clone().into_data().to_vec::<f32>().unwrap();
            let (m, l2) = rel_errors(&ours, &case.prev_samples[i]);
            assert!(
                m <= SAMPLE_REL_TOL && l2 <= SAMPLE_REL_TOL,
                "{name}, step {i}: prev_sample max-rel {m:.2e}, L2-rel {l2:.2e}"
            );
            worst = (worst.0.max(m), worst.1.max(l2));
        }
        println!("{name:34} {:5}  {:19.2e}  {:.2e}", case.steps, worst.0, worst.1);
    }
}

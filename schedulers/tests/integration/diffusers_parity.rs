//! Every scheduler against diffusers 0.42.1, at 4 and 20 steps, on the reference files of
//! `fixtures/pipeline/reference/schedulers/` (made by `tools/fixtures/pipeline.py`,
//! `scheduler_refs()`): the config diffusers saved (`<name>.json`), and per schedule the
//! timesteps, sigmas, `init_noise_sigma`, the initial sample, the model output fed at each step,
//! `scale_model_input`'s result and `prev_sample` of each step.
//!
//! Bars and why:
//! - timesteps and `alphas_cumprod`: **exactly equal** (bitwise int64 / float32). They are
//!   host-side tables built from numpy and torch arithmetic that we reproduce operation by
//!   operation, so any difference is a real discrepancy, not rounding.
//! - sigmas and `init_noise_sigma`: within **1 ulp** of float32. They go through a square root,
//!   and torch's CPU float32 `sqrt` (MKL VML, "high accuracy" mode) is not correctly rounded:
//!   on the reference machine it differs from the correctly rounded root (Rust's, numpy's) by
//!   1 ulp for ~20% of random inputs; 156 of the 1000 training sigmas differ that way. Those
//!   are ~6e-8 relative, far below the sample bar. Measured here (AMD EPYC, AVX2): sigmas at
//!   most **1 ulp** apart (e.g. 4 of DPM-Solver's 21 at 20 steps), `init_noise_sigma` equal.
//!   A bound of 0 would fail on torch's rounding; 1 ulp is the smallest integer bound above it.
//! - `prev_sample` of every step, and `scale_model_input`: relative error ≤ 5e-6, measured two
//!   ways, `max|a − b| / max|b|` and `‖a − b‖₂ / ‖b‖₂`, with our own previous output fed to the
//!   next step (free-running, as in a pipeline, so errors may accumulate). Float32 rounding of
//!   a handful of elementwise operations is ~1e-7 relative; DPM-Solver's data prediction
//!   divides by `alpha_t` ≈ 0.006 at the first step, so latents reach ~100 and a relative
//!   measure is the meaningful one. Measured worst (AMD EPYC, AVX2): **7.3e-7** max-relative
//!   (DDIM at 20 steps; DPM-Solver++ 5.7e-7, Euler and flow matching ≤ 1.2e-7 or exact), so
//!   5e-6 is a margin of 7 (the bar was 1e-5, a margin of 14); a wrong coefficient,
//!   sigma or step index moves a sample by ≥ 1e-3.

use std::path::PathBuf;

use burn::tensor::{Tensor, TensorData};
use burn_flex::Flex;
use safetensors::{Dtype, SafeTensors};
use schedulers::{Schedule, Scheduler, TimestepDType};

type B = Flex;

/// Relative error bar of samples (see the module docs): measured worst 7.3e-7 (DDIM, 20
/// steps, max-relative; AMD EPYC, AVX2), a margin of 7.
const SAMPLE_REL_TOL: f64 = 5e-6;

/// Relative error bar of DPM-Solver++'s last 4-step sample against diffusers' x0 prediction:
/// measured 6.1e-8 (AMD EPYC, AVX2), a few float32 roundings of one first-order update; 5e-7
/// is a margin of 8 (it was SAMPLE_REL_TOL, then 1e-5). A last step that does not land on
/// sigma = 0 leaves noise of order sigma_1 in the sample, ≥ 1e-2 relative.
const X0_REL_TOL: f64 = 5e-7;

/// Largest distance, in float32 ulps, of a table value that goes through torch's `sqrt`:
/// measured 1 (see the module docs); 0 would fail on torch's rounding.
const MAX_SQRT_ULPS: u32 = 1;

/// Distance in units in the last place between two finite float32 values of the same sign.
fn ulps(a: f32, b: f32) -> u32 {
    if a == b {
        return 0;
    }
    assert_eq!(a.is_sign_negative(), b.is_sign_negative(), "{a} and {b} differ in sign");
    a.to_bits().abs_diff(b.to_bits())
}

/// The reference cases: fixture name (config `<name>.json`, schedules `<name>_<steps>`).
const CASES: [&str; 6] =
    ["dpmsolver_multistep", "ddim", "ddim_sd15", "euler", "euler_sdxl", "flow_match_euler"];

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/pipeline/reference/schedulers")
}

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn load(name: &str, steps: usize) -> Self {
        let path = fixture_dir().join(format!("{name}_{steps}.safetensors"));
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("reference file {} is missing: {e}", path.display()));
        Self { bytes }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("valid safetensors")
    }

    fn has(&self, key: &str) -> bool {
        self.st().names().contains(&key)
    }

    fn shape(&self, key: &str) -> Vec<usize> {
        self.st().tensor(key).unwrap().shape().to_vec()
    }

    fn f32s(&self, key: &str) -> Vec<f32> {
        let st = self.st();
        let t = st.tensor(key).unwrap_or_else(|_| panic!("no tensor `{key}`"));
        assert_eq!(t.dtype(), Dtype::F32, "`{key}` is not float32");
        t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }

    fn i64s(&self, key: &str) -> Vec<i64> {
        let st = self.st();
        let t = st.tensor(key).unwrap();
        assert_eq!(t.dtype(), Dtype::I64, "`{key}` is not int64");
        t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
    }

    fn dtype(&self, key: &str) -> Dtype {
        self.st().tensor(key).unwrap().dtype()
    }

    /// Item `i` of a stacked `[steps, 1, C, H, W]` tensor, as a `[1, C, H, W]` tensor.
    fn item(&self, key: &str, i: usize) -> Tensor<B, 4> {
        let shape = self.shape(key);
        let inner: [usize; 4] = shape[1..].try_into().unwrap();
        let n: usize = inner.iter().product();
        let values = self.f32s(key)[i * n..(i + 1) * n].to_vec();
        Tensor::from_data(TensorData::new(values, inner), &Default::default())
    }

    fn tensor4(&self, key: &str) -> Tensor<B, 4> {
        let shape: [usize; 4] = self.shape(key).try_into().unwrap();
        Tensor::from_data(TensorData::new(self.f32s(key), shape), &Default::default())
    }
}

fn scheduler(name: &str) -> Scheduler {
    Scheduler::from_file(fixture_dir().join(format!("{name}.json")))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn values(t: Tensor<B, 4>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

/// `(max|a − b| / max|b|, ‖a − b‖₂ / ‖b‖₂)` ([`metrics::compare`]).
fn rel_errors(ours: &[f32], theirs: &[f32]) -> (f64, f64) {
    let c = metrics::compare(ours, theirs);
    (c.max_rel, c.rel_l2)
}

fn assert_tables(
    name: &str,
    steps: usize,
    scheduler: &Scheduler,
    schedule: &Schedule,
    r: &Reference,
) {
    let ctx = format!("{name} at {steps} steps");
    if r.has("alphas_cumprod") {
        let ours = scheduler.alphas_cumprod().expect("alphas_cumprod");
        let theirs = r.f32s("alphas_cumprod");
        assert!(ours == theirs.as_slice(), "{ctx}: alphas_cumprod differs");
    }
    match r.dtype("timesteps") {
        Dtype::I64 => {
            assert_eq!(schedule.timestep_dtype(), TimestepDType::Int64, "{ctx}");
            assert_eq!(schedule.timesteps_i64().unwrap(), r.i64s("timesteps"), "{ctx}: timesteps");
        }
        Dtype::F32 => {
            assert_eq!(schedule.timestep_dtype(), TimestepDType::Float32, "{ctx}");
            assert!(schedule.timesteps_i64().is_none());
            let ours: Vec<f32> = schedule.timesteps().iter().map(|&t| t as f32).collect();
            // The f64 values are exactly the float32 ones widened.
            assert!(schedule.timesteps().iter().all(|&t| t == (t as f32) as f64));
            assert_eq!(ours, r.f32s("timesteps"), "{ctx}: timesteps");
        }
        other => panic!("{ctx}: timesteps of dtype {other:?}"),
    }
    assert_eq!(schedule.len(), steps, "{ctx}: number of timesteps");
    if r.has("sigmas") {
        let (ours, theirs) = (schedule.sigmas().expect("sigmas"), r.f32s("sigmas"));
        assert_eq!(ours.len(), theirs.len(), "{ctx}: number of sigmas");
        for (i, (&a, &b)) in ours.iter().zip(&theirs).enumerate() {
            assert!(ulps(a, b) <= MAX_SQRT_ULPS, "{ctx}: sigma {i}: {a} vs diffusers' {b}");
        }
        let worst = ours.iter().zip(&theirs).map(|(&a, &b)| ulps(a, b)).max().unwrap_or(0);
        let differ = ours.iter().zip(&theirs).filter(|&(&a, &b)| a != b).count();
        println!("{ctx}: sigmas within {worst} ulp ({differ} of {} differ)", ours.len());
    } else {
        assert!(schedule.sigmas().is_none(), "{ctx}: diffusers has no sigmas here");
    }
    let (ours, theirs) = (schedule.init_noise_sigma(), r.f32s("init_noise_sigma")[0]);
    println!("{ctx}: init_noise_sigma within {} ulp", ulps(ours, theirs));
    assert!(ulps(ours, theirs) <= MAX_SQRT_ULPS, "{ctx}: init_noise_sigma {ours} vs {theirs}");
}

/// Runs one case; returns the worst (max-relative, L2-relative) error of prev_sample and of
/// scale_model_input.
fn run_case(name: &str, steps: usize) -> ((f64, f64), (f64, f64)) {
    let r = Reference::load(name, steps);
    let scheduler = scheduler(name);
    let schedule = scheduler.set_timesteps(steps).unwrap();
    assert_tables(name, steps, &scheduler, &schedule, &r);

    let mut state = schedule.new_state::<B, 4>();
    let mut sample = r.tensor4("initial_sample");
    let (mut worst, mut worst_scale) = ((0f64, 0f64), (0f64, 0f64));
    for i in 0..steps {
        if r.has("scaled_model_inputs") {
            let scaled = values(schedule.scale_model_input(sample.clone(), i).unwrap());
            let (m, l2) = rel_errors(&scaled, &values(r.item("scaled_model_inputs", i)));
            assert!(
                m <= SAMPLE_REL_TOL && l2 <= SAMPLE_REL_TOL,
                "{name} at {steps} steps, step {i}: scale_model_input max-rel {m:.2e}, L2-rel {l2:.2e}"
            );
            worst_scale = (worst_scale.0.max(m), worst_scale.1.max(l2));
        } else {
            // No scale_model_input in diffusers: ours is the identity.
            assert_eq!(
                values(schedule.scale_model_input(sample.clone(), i).unwrap()),
                values(sample.clone())
            );
        }
        sample = schedule.step(&mut state, i, r.item("model_outputs", i), sample).unwrap();
        let (m, l2) = rel_errors(&values(sample.clone()), &values(r.item("prev_samples", i)));
        assert!(
            m <= SAMPLE_REL_TOL && l2 <= SAMPLE_REL_TOL,
            "{name} at {steps} steps, step {i}: prev_sample max-rel {m:.2e}, L2-rel {l2:.2e}"
        );
        worst = (worst.0.max(m), worst.1.max(l2));
    }
    (worst, worst_scale)
}

#[test]
fn every_scheduler_equals_diffusers_at_4_and_20_steps() {
    println!(
        "case                       steps  prev_sample max-rel  L2-rel    scale max-rel  L2-rel"
    );
    for name in CASES {
        for steps in [4, 20] {
            let ((m, l2), (sm, sl2)) = run_case(name, steps);
            println!("{name:26} {steps:5}  {m:19.2e}  {l2:.2e}  {sm:13.2e}  {sl2:.2e}");
        }
    }
}

/// Steps the whole `[1, 4, 8, 8]` reference sample with one state, and the same sample split
/// into row bands (3 + 5 rows, then 2 + 2 + 4) with one state per band, interleaving the bands
/// as PipeFusion does; the bands must be exactly the whole image's rows at every step.
#[test]
fn states_per_row_band_equal_the_whole_image_exactly() {
    for name in CASES {
        for steps in [4, 20] {
            let r = Reference::load(name, steps);
            let schedule = scheduler(name).set_timesteps(steps).unwrap();
            for bands in [vec![3, 5], vec![2, 2, 4]] {
                let mut whole_state = schedule.new_state::<B, 4>();
                let mut whole = r.tensor4("initial_sample");
                let mut states: Vec<_> =
                    bands.iter().map(|_| schedule.new_state::<B, 4>()).collect();
                let mut parts = split_rows(whole.clone(), &bands);
                for i in 0..steps {
                    let out = r.item("model_outputs", i);
                    whole = schedule.step(&mut whole_state, i, out.clone(), whole).unwrap();
                    let outs = split_rows(out, &bands);
                    // Bands in reverse order, to show the states are independent.
                    for b in (0..bands.len()).rev() {
                        let scaled = schedule.scale_model_input(parts[b].clone(), i).unwrap();
                        assert_eq!(
                            values(scaled),
                            values(
                                split_rows(
                                    schedule.scale_model_input(cat_rows(parts.clone()), i).unwrap(),
                                    &bands
                                )[b]
                                    .clone()
                            )
                        );
                        parts[b] = schedule
                            .step(&mut states[b], i, outs[b].clone(), parts[b].clone())
                            .unwrap();
                    }
                    assert_eq!(
                        values(cat_rows(parts.clone())),
                        values(whole.clone()),
                        "{name} at {steps} steps, bands {bands:?}, step {i}: bands differ from the whole"
                    );
                }
            }
        }
    }
}

fn split_rows(t: Tensor<B, 4>, bands: &[usize]) -> Vec<Tensor<B, 4>> {
    let mut start = 0;
    bands
        .iter()
        .map(|&h| {
            let part = t.clone().narrow(2, start, h);
            start += h;
            part
        })
        .collect()
}

fn cat_rows(parts: Vec<Tensor<B, 4>>) -> Tensor<B, 4> {
    Tensor::cat(parts, 2)
}

/// DPM-Solver++ keeps its history in the state: at 4 steps (< 15, `lower_order_final`) the
/// steps are first, second, second, first order; at 20 steps first, then second order, and the
/// final step is first order because `final_sigmas_type = "zero"` forces it whatever the count.
#[test]
fn dpm_solver_state_counts_lower_order_steps() {
    let schedule = scheduler("dpmsolver_multistep").set_timesteps(4).unwrap();
    let r = Reference::load("dpmsolver_multistep", 4);
    let mut state = schedule.new_state::<B, 4>();
    let mut sample = r.tensor4("initial_sample");
    assert_eq!(
        (state.next_step_index(), state.lower_order_nums(), state.history_len()),
        (None, 0, 0)
    );
    for i in 0..4 {
        sample = schedule.step(&mut state, i, r.item("model_outputs", i), sample).unwrap();
        assert_eq!(state.next_step_index(), Some(i + 1));
        assert_eq!(state.lower_order_nums(), (i + 1).min(2));
        assert_eq!(state.history_len(), (i + 1).min(2));
    }
    // The last step lands on sigma = 0: prev_sample is the data prediction itself.
    let theirs_x0 = values(r.item("pred_original_samples", 3));
    let (m, _) = rel_errors(&values(sample), &theirs_x0);
    println!("final DPM-Solver++ step vs diffusers' x0: max-rel {m:.2e}");
    assert!(m <= X0_REL_TOL, "final DPM-Solver step is not x0: {m:.2e}");
    state.reset();
    assert_eq!(
        (state.next_step_index(), state.lower_order_nums(), state.history_len()),
        (None, 0, 0)
    );
}

#[test]
fn stepping_out_of_order_is_an_error() {
    let schedule = scheduler("dpmsolver_multistep").set_timesteps(4).unwrap();
    let mut state = schedule.new_state::<B, 4>();
    let x = Tensor::<B, 4>::zeros([1, 4, 2, 2], &Default::default());
    let x = schedule.step(&mut state, 0, x.clone(), x).unwrap();
    let e = schedule.step(&mut state, 2, x.clone(), x).unwrap_err().to_string();
    assert!(e.contains("this state expects step 1 but was given step 2"), "{e}");
    // Nothing changed: the right step still works.
    let x = Tensor::<B, 4>::zeros([1, 4, 2, 2], &Default::default());
    schedule.step(&mut state, 1, x.clone(), x).unwrap();
}

#[test]
fn a_state_used_for_two_regions_is_an_error() {
    let schedule = scheduler("dpmsolver_multistep").set_timesteps(4).unwrap();
    let mut state = schedule.new_state::<B, 4>();
    let dev = Default::default();
    let a = Tensor::<B, 4>::zeros([1, 4, 2, 2], &dev);
    let b = Tensor::<B, 4>::zeros([1, 4, 3, 2], &dev);
    schedule.step(&mut state, 0, a.clone(), a).unwrap();
    let e = schedule.step(&mut state, 1, b.clone(), b).unwrap_err().to_string();
    assert!(
        e.contains("the state's history has shape [1, 4, 2, 2], the sample has [1, 4, 3, 2]"),
        "{e}"
    );
}

#[test]
fn a_state_of_another_schedule_is_an_error() {
    let scheduler = scheduler("euler");
    let four = scheduler.set_timesteps(4).unwrap();
    let twenty = scheduler.set_timesteps(20).unwrap();
    let mut state = four.new_state::<B, 4>();
    let x = Tensor::<B, 4>::zeros([1, 4, 2, 2], &Default::default());
    let e = twenty.step(&mut state, 0, x.clone(), x).unwrap_err().to_string();
    assert!(e.contains("the state was made by a schedule of 4 steps, this one has 20"), "{e}");
}

#[test]
fn steps_past_the_schedule_and_mismatched_outputs_are_errors() {
    let schedule = scheduler("euler").set_timesteps(4).unwrap();
    let dev = Default::default();
    let x = Tensor::<B, 4>::zeros([1, 4, 2, 2], &dev);
    let e = schedule.timestep(4).unwrap_err().to_string();
    assert!(e.contains("step index 4 is out of range for a schedule of 4 steps"), "{e}");
    assert!(schedule.scale_model_input(x.clone(), 7).is_err());
    let mut state = schedule.new_state::<B, 4>();
    let wide = Tensor::<B, 4>::zeros([1, 4, 2, 3], &dev);
    let e = schedule.step(&mut state, 0, wide, x).unwrap_err().to_string();
    assert!(e.contains("model_output has shape [1, 4, 2, 3], the sample has [1, 4, 2, 2]"), "{e}");
}

/// PipeFusion steps the whole latent during warmup, then each patch with its own state: a
/// state narrowed to a band after `k` whole steps continues exactly like the whole state.
#[test]
fn a_narrowed_state_continues_the_whole_one() {
    for name in ["dpmsolver_multistep", "ddim", "euler", "flow_match_euler"] {
        let schedule = scheduler(name).set_timesteps(20).unwrap();
        let r = Reference::load(name, 20);
        let mut whole_state = schedule.new_state::<B, 4>();
        let mut whole = r.tensor4("initial_sample");
        for i in 0..2 {
            whole = schedule.step(&mut whole_state, i, r.item("model_outputs", i), whole).unwrap();
        }
        let bands = [3usize, 5];
        let mut states: Vec<_> =
            [0..3, 3..8].into_iter().map(|rg| whole_state.narrow(2, rg)).collect();
        let mut parts = split_rows(whole.clone(), &bands);
        for i in 2..20 {
            let outs = split_rows(r.item("model_outputs", i), &bands);
            for b in 0..2 {
                parts[b] =
                    schedule.step(&mut states[b], i, outs[b].clone(), parts[b].clone()).unwrap();
            }
            whole = schedule.step(&mut whole_state, i, r.item("model_outputs", i), whole).unwrap();
            assert_eq!(values(cat_rows(parts.clone())), values(whole.clone()), "{name} step {i}");
        }
    }
}

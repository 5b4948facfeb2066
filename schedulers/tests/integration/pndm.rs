//! `PNDMScheduler` against diffusers 0.42.1: `tests/data/pndm.json`, made by
//! `tools/fixtures/schedulers.py` (`PNDM_CASES`). The cases: Stable Diffusion 1.5's config
//! (PLMS only, `steps_offset` 1, scaled-linear betas, `set_alpha_to_one` false) at 1, 2, 3, 4,
//! 10, 25 and 50 steps and started part-way (`begin` 3, as img2img does); with v-prediction,
//! `trailing` and `linspace` spacing, `set_alpha_to_one`; the Runge-Kutta warm-up
//! (`skip_prk_steps` false, diffusers' defaults) at 4, 9 (odd step ratio), 10, 25 and 50 steps,
//! with v-prediction, both other spacings, SD 1.5's betas and cosine betas; and 100 trained
//! betas.
//!
//! Bars and why:
//! - timesteps: **exactly equal**, the repeated ones included (numpy integer arithmetic we
//!   reproduce operation by operation); their number is diffusers' `len(timesteps)`, `n + 1`
//!   or `n + 9`, not `n`.
//! - `init_noise_sigma` exactly 1 and `scale_model_input` the identity, as in diffusers.
//! - the state after every step: `steps_taken()` equals diffusers' `counter` and
//!   `history_len()` equals `len(ets)`.
//! - `prev_sample` of every step: relative error ≤ [`SAMPLE_REL_TOL`], measured two ways,
//!   `max|a − b| / max|b|` and `‖a − b‖₂ / ‖b‖₂`, with our own previous output fed to the next
//!   step (free-running, as in a pipeline, so errors may accumulate over 59 steps). Every
//!   coefficient is a float32 scalar computed in diffusers' order and every tensor operation
//!   is diffusers', so the samples would be bit-equal but for torch's float32 square root:
//!   `_get_prev_sample` takes 2 roots (4 with v-prediction) of 0-d tensors, and torch's CPU
//!   `sqrt`/`** 0.5` (MKL VML) is 1 ulp off the correctly rounded root for ~18% of inputs
//!   (358 of 2000 random ones on the reference machine, 0-d tensors included), so a coefficient
//!   may be 6e-8 relative off; the cases whose roots all happen to agree (SD 1.5 at 1, 2 and 3
//!   steps) are bit-equal. Measured worst (AMD EPYC, AVX2): **9.4e-7** max-relative
//!   (`pndm_sd15_v_prediction`, 10 steps; SD 1.5 at 50 steps 6.8e-7, the Runge-Kutta path at
//!   50 steps 6.1e-7), so 5e-6, the other schedulers' bar, is a margin of 5. Mistakes move a
//!   sample far more: 59 → 58 in the fourth-order Adams-Bashforth formula gives 4.3e-4 (SD 1.5,
//!   4 steps, last step), swapping the parity of the Runge-Kutta `diff_to_prev` 0.64, moving
//!   the `counter == 1` special case to counter 2 gives 2.1, restarting PLMS's second step from
//!   its own input instead of the saved first sample gives 5.3.

use burn::tensor::{Tensor, TensorData};
use burn_flex::Flex;
use schedulers::{PndmConfig, Schedule, Scheduler, SchedulerConfig, SchedulerError, TimestepDType};
use serde::Deserialize;

type B = Flex;

/// Relative error bar of samples: measured worst 9.4e-7 (`pndm_sd15_v_prediction`, 10 steps,
/// max-relative; AMD EPYC, AVX2), a margin of 5; the same bar as the other schedulers' tests.
/// It comes from torch's float32 square root, 1 ulp off for ~18% of inputs (module docs).
const SAMPLE_REL_TOL: f64 = 5e-6;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    config: String,
    steps: usize,
    shape: [usize; 4],
    begin: usize,
    timesteps: Vec<i64>,
    init_noise_sigma: f64,
    initial_sample: Vec<f32>,
    model_outputs: Vec<Vec<f32>>,
    prev_samples: Vec<Vec<f32>>,
    counters: Vec<usize>,
    ets_lens: Vec<usize>,
}

impl Case {
    fn label(&self) -> String {
        format!("{} at {} steps", self.name, self.steps)
    }

    fn tensor(&self, v: &[f32]) -> Tensor<B, 4> {
        Tensor::from_data(TensorData::new(v.to_vec(), self.shape), &Default::default())
    }

    fn schedule(&self) -> Schedule {
        let scheduler =
            Scheduler::from_json(&self.config).unwrap_or_else(|e| panic!("{}: {e}", self.label()));
        assert_eq!(scheduler.class_name(), "PNDMScheduler");
        scheduler.set_timesteps(self.steps).unwrap()
    }
}

fn fixture() -> Fixture {
    serde_json::from_str(include_str!("../data/pndm.json")).unwrap()
}

fn values(t: Tensor<B, 4>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

/// `(max|a − b| / max|b|, ‖a − b‖₂ / ‖b‖₂)` ([`metrics::compare`]).
fn rel_errors(ours: &[f32], theirs: &[f32]) -> (f64, f64) {
    let c = metrics::compare(ours, theirs);
    (c.max_rel, c.rel_l2)
}

#[test]
fn pndm_equals_diffusers() {
    let fixture = fixture();
    println!("case                               steps  len  prev_sample max-rel  L2-rel");
    let mut worst_all = (0f64, String::new());
    for case in &fixture.cases {
        let ctx = case.label();
        let schedule = case.schedule();
        assert_eq!(schedule.timestep_dtype(), TimestepDType::Int64, "{ctx}");
        assert_eq!(schedule.timesteps_i64().unwrap(), case.timesteps, "{ctx}: timesteps");
        assert_eq!(schedule.len(), case.timesteps.len(), "{ctx}");
        assert!(schedule.sigmas().is_none(), "{ctx}: diffusers' PNDM has no sigmas");
        assert_eq!(schedule.init_noise_sigma() as f64, case.init_noise_sigma, "{ctx}");
        assert_eq!(case.init_noise_sigma, 1.0, "{ctx}");

        let mut state = schedule.new_state::<B, 4>();
        let mut sample = case.tensor(&case.initial_sample);
        let mut worst = (0f64, 0f64);
        for (k, i) in (case.begin..schedule.len()).enumerate() {
            let scaled = schedule.scale_model_input(sample.clone(), i).unwrap();
            assert_eq!(values(scaled), values(sample.clone()), "{ctx}: scale_model_input");
            let out = case.tensor(&case.model_outputs[k]);
            sample = schedule.step(&mut state, i, out, sample).unwrap();
            assert_eq!(state.steps_taken(), case.counters[k], "{ctx}, step {i}: counter");
            assert_eq!(state.history_len(), case.ets_lens[k], "{ctx}, step {i}: len(ets)");
            let (m, l2) = rel_errors(&values(sample.clone()), &case.prev_samples[k]);
            assert!(
                m <= SAMPLE_REL_TOL && l2 <= SAMPLE_REL_TOL,
                "{ctx}, step {i}: prev_sample max-rel {m:.2e}, L2-rel {l2:.2e}"
            );
            worst = (worst.0.max(m), worst.1.max(l2));
        }
        assert_eq!(state.steps_taken(), case.prev_samples.len(), "{ctx}: steps taken");
        if worst.0 > worst_all.0 {
            worst_all = (worst.0, ctx.clone());
        }
        println!(
            "{:34} {:5}  {:3}  {:19.2e}  {:.2e}",
            case.name,
            case.steps,
            schedule.len(),
            worst.0,
            worst.1
        );
    }
    println!("worst max-rel {:.2e} ({})", worst_all.0, worst_all.1);
}

/// SD 1.5's schedule at 10 steps repeats its second timestep, and the Runge-Kutta warm-up
/// adds 9 timesteps: diffusers' exact lists.
#[test]
fn pndm_timesteps_repeat_as_in_diffusers() {
    let sd15 = Scheduler::new(SchedulerConfig::Pndm(PndmConfig::stable_diffusion_v1_5())).unwrap();
    let s = sd15.set_timesteps(10).unwrap();
    assert_eq!(s.timesteps_i64().unwrap(), [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
    assert_eq!(sd15.set_timesteps(1).unwrap().timesteps_i64().unwrap(), [1]);
    assert_eq!(sd15.set_timesteps(2).unwrap().timesteps_i64().unwrap(), [501, 1, 1]);
    let prk = Scheduler::new(SchedulerConfig::Pndm(PndmConfig::default())).unwrap();
    // PNDMScheduler().set_timesteps(9): step ratio 111, h = 55.
    assert_eq!(
        prk.set_timesteps(9).unwrap().timesteps_i64().unwrap(),
        [888, 832, 832, 777, 777, 721, 721, 666, 666, 610, 610, 555, 555, 444, 333, 222, 111, 0]
    );
    assert_eq!(prk.set_timesteps(50).unwrap().len(), 59);
}

/// The `[1, 2, 8, 2]` cases split into row bands 3 + 5 and 2 + 2 + 4, the `[1, 2, 2, 2]` ones
/// into 1 + 1, one state per band, bands stepped in reverse order (to show the states are
/// independent): the bands are exactly the whole image's rows at every step.
#[test]
fn pndm_states_per_row_band_equal_the_whole_image_exactly() {
    for case in &fixture().cases {
        let ctx = case.label();
        let schedule = case.schedule();
        let band_sets: Vec<Vec<usize>> =
            if case.shape[2] == 8 { vec![vec![3, 5], vec![2, 2, 4]] } else { vec![vec![1, 1]] };
        for bands in band_sets {
            let mut whole_state = schedule.new_state::<B, 4>();
            let mut whole = case.tensor(&case.initial_sample);
            let mut states: Vec<_> = bands.iter().map(|_| schedule.new_state::<B, 4>()).collect();
            let mut parts = split_rows(whole.clone(), &bands);
            for (k, i) in (case.begin..schedule.len()).enumerate() {
                let out = case.tensor(&case.model_outputs[k]);
                whole = schedule.step(&mut whole_state, i, out.clone(), whole).unwrap();
                let outs = split_rows(out, &bands);
                for b in (0..bands.len()).rev() {
                    parts[b] = schedule
                        .step(&mut states[b], i, outs[b].clone(), parts[b].clone())
                        .unwrap();
                }
                assert_eq!(
                    values(Tensor::cat(parts.clone(), 2)),
                    values(whole.clone()),
                    "{ctx}, bands {bands:?}, step {i}: bands differ from the whole"
                );
            }
        }
    }
}

/// A state narrowed to row bands after `k` whole steps continues exactly like the whole
/// state: after 1 PLMS step (the saved sample matters at the next one), after 2 and 5; after
/// 1, 2, 3 (inside a Runge-Kutta group, with its running sum) and 6 Runge-Kutta steps.
#[test]
fn a_narrowed_pndm_state_continues_the_whole_one() {
    let fixture = fixture();
    for (name, steps, splits) in [("pndm_sd15", 10, [1, 2, 5, 9]), ("pndm_prk", 4, [1, 2, 3, 6])] {
        let case = fixture.cases.iter().find(|c| c.name == name && c.steps == steps).unwrap();
        assert_eq!(case.shape[2], 8);
        let schedule = case.schedule();
        for split in splits {
            let mut whole_state = schedule.new_state::<B, 4>();
            let mut whole = case.tensor(&case.initial_sample);
            for i in 0..split {
                let out = case.tensor(&case.model_outputs[i]);
                whole = schedule.step(&mut whole_state, i, out, whole).unwrap();
            }
            let bands = [3usize, 5];
            let mut states: Vec<_> =
                [0..3, 3..8].into_iter().map(|rg| whole_state.narrow(2, rg)).collect();
            let mut parts = split_rows(whole.clone(), &bands);
            for i in split..schedule.len() {
                let out = case.tensor(&case.model_outputs[i]);
                let outs = split_rows(out.clone(), &bands);
                for b in 0..2 {
                    parts[b] = schedule
                        .step(&mut states[b], i, outs[b].clone(), parts[b].clone())
                        .unwrap();
                }
                whole = schedule.step(&mut whole_state, i, out, whole).unwrap();
                assert_eq!(
                    values(Tensor::cat(parts.clone(), 2)),
                    values(whole.clone()),
                    "{name} at {steps} steps, narrowed after {split}, step {i}"
                );
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

/// A reset state starts over like a fresh one (counter, history and saved sample cleared).
#[test]
fn a_reset_pndm_state_starts_over() {
    let fixture = fixture();
    let case = fixture.cases.iter().find(|c| c.name == "pndm_sd15" && c.steps == 4).unwrap();
    let schedule = case.schedule();
    let mut state = schedule.new_state::<B, 4>();
    let x = case.tensor(&case.initial_sample);
    let first = schedule.step(&mut state, 0, case.tensor(&case.model_outputs[0]), x.clone());
    assert_eq!((state.steps_taken(), state.history_len()), (1, 1));
    state.reset();
    assert_eq!((state.steps_taken(), state.history_len(), state.next_step_index()), (0, 0, None));
    let again = schedule.step(&mut state, 0, case.tensor(&case.model_outputs[0]), x).unwrap();
    assert_eq!(values(first.unwrap()), values(again));
}

#[test]
fn pndm_configs_that_diffusers_cannot_run_are_refused_naming_the_key() {
    // Fewer than 4 timesteps with the Runge-Kutta warm-up: diffusers' numpy fails to broadcast.
    let prk = Scheduler::from_json(r#"{"_class_name": "PNDMScheduler"}"#).unwrap();
    for n in 1..4 {
        let e = prk.set_timesteps(n).unwrap_err();
        let SchedulerError::InvalidValue { key, .. } = &e else { panic!("{e}") };
        assert_eq!(key, "skip_prk_steps", "{e}");
    }
    prk.set_timesteps(4).unwrap();
    // Timesteps past the training range.
    let far = Scheduler::from_json(
        r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": true, "steps_offset": 200}"#,
    )
    .unwrap();
    let e = far.set_timesteps(5).unwrap_err();
    assert!(e.to_string().contains("`steps_offset`"), "{e}");
    // diffusers' _get_prev_sample raises for other prediction types.
    let e = SchedulerConfig::from_json(
        r#"{"_class_name": "PNDMScheduler", "prediction_type": "sample"}"#,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "PNDMScheduler: `prediction_type` = \"sample\" is not supported (supported: \"epsilon\", \
         \"v_prediction\")"
    );
    let e = SchedulerConfig::from_json(
        r#"{"_class_name": "PNDMScheduler", "trained_betas": [0.1, 0.2]}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`trained_betas`"), "{e}");
    let e =
        SchedulerConfig::from_json(r#"{"_class_name": "PNDMScheduler", "num_train_timesteps": 0}"#)
            .unwrap_err();
    assert!(e.to_string().contains("`num_train_timesteps`"), "{e}");
    let e =
        SchedulerConfig::from_json(r#"{"_class_name": "PNDMScheduler", "skip_prk_steps": "yes"}"#)
            .unwrap_err();
    assert!(e.to_string().contains("`skip_prk_steps`"), "{e}");
}

/// Stable Diffusion 1.5's `scheduler_config.json` as published (diffusers 0.6.0, with the
/// DDIM key `clip_sample`, which PNDM ignores) is [`PndmConfig::stable_diffusion_v1_5`].
#[test]
fn stable_diffusion_1_5_config_parses() {
    let sd15 = r#"{
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
        "trained_betas": null, "clip_sample": false
    }"#;
    let config = SchedulerConfig::from_json(sd15).unwrap();
    assert_eq!(config, SchedulerConfig::Pndm(PndmConfig::stable_diffusion_v1_5()));
    assert_eq!(config.class_name(), "PNDMScheduler");
    let fixture = fixture();
    let saved = &fixture.cases.iter().find(|c| c.name == "pndm_sd15").unwrap().config;
    assert_eq!(SchedulerConfig::from_json(saved).unwrap(), config);
}

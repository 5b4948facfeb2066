//! `scheduler_config.json` parsing: Python's non-finite floats, unknown keys ignored, values we
//! do not implement refused with the key named, unknown classes refused with the known ones
//! listed.

use std::path::PathBuf;

use schedulers::{
    DpmSolverMultistepConfig, FinalSigmasType, Scheduler, SchedulerConfig, SchedulerError,
};

fn pixart_config_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/pipeline/pixart-alpha-tiny/scheduler/scheduler_config.json")
}

const PIXART_LIKE: &str = r#"{
  "_class_name": "DPMSolverMultistepScheduler",
  "_diffusers_version": "0.42.1",
  "algorithm_type": "dpmsolver++",
  "lambda_min_clipped": -Infinity,
  "lower_order_final": true,
  "solver_order": 2,
  "trained_betas": null,
  "variance_type": null,
  "some_key_from_the_future": [1, 2, {"x": NaN}]
}"#;

fn err(json: &str) -> SchedulerError {
    SchedulerConfig::from_json(json).expect_err("the config should be refused")
}

#[test]
fn pixart_scheduler_config_with_minus_infinity_parses() {
    let config = SchedulerConfig::from_file(pixart_config_path()).unwrap();
    let SchedulerConfig::DpmSolverMultistep(c) = &config else { panic!("{config:?}") };
    assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
    assert_eq!(c, &DpmSolverMultistepConfig::pixart());
    assert_eq!(config.class_name(), "DPMSolverMultistepScheduler");
    Scheduler::new(config).unwrap().set_timesteps(20).unwrap();
}

#[test]
fn bare_non_finite_tokens_and_unknown_keys_are_accepted() {
    let SchedulerConfig::DpmSolverMultistep(c) = SchedulerConfig::from_json(PIXART_LIKE).unwrap()
    else {
        panic!()
    };
    assert_eq!(c, DpmSolverMultistepConfig::default());
    let c = SchedulerConfig::from_json(
        r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": Infinity}"#,
    )
    .unwrap();
    let SchedulerConfig::DpmSolverMultistep(c) = c else { panic!() };
    assert_eq!(c.lambda_min_clipped, f64::INFINITY);
    // The token inside a string stays a string.
    let e = err(r#"{"_class_name": "DDIMScheduler", "timestep_spacing": "-Infinity"}"#);
    assert!(matches!(&e, SchedulerError::InvalidValue { key, .. } if key == "timestep_spacing"));
}

#[test]
fn a_finite_lambda_min_clipped_drops_the_noisiest_timesteps() {
    let json = r#"{"_class_name": "DPMSolverMultistepScheduler",
                   "beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}"#;
    let schedule = Scheduler::from_json(json).unwrap().set_timesteps(10).unwrap();
    // diffusers 0.42.1 gives 995 first (tests/data/variants.json, dpm_cosine_clipped).
    assert_eq!(schedule.timesteps_i64().unwrap()[0], 995);
}

#[test]
fn unsupported_values_name_the_key() {
    let cases = [
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": true}"#,
            "use_karras_sigmas",
        ),
        (r#"{"_class_name": "DPMSolverMultistepScheduler", "thresholding": true}"#, "thresholding"),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}"#,
            "algorithm_type",
        ),
        (r#"{"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}"#, "solver_order"),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "variance_type": "learned_range"}"#,
            "variance_type",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "use_lu_lambdas": true}"#,
            "use_lu_lambdas",
        ),
        (
            r#"{"_class_name": "DDIMScheduler", "rescale_betas_zero_snr": true}"#,
            "rescale_betas_zero_snr",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "interpolation_type": "log_linear"}"#,
            "interpolation_type",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "use_exponential_sigmas": true}"#,
            "use_exponential_sigmas",
        ),
        (
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": true,
                "time_shift_type": "linear"}"#,
            "time_shift_type",
        ),
        (
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift_terminal": 0.1}"#,
            "shift_terminal",
        ),
        (
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "stochastic_sampling": true}"#,
            "stochastic_sampling",
        ),
    ];
    for (json, want) in cases {
        match err(json) {
            SchedulerError::Unsupported { key, .. } => assert_eq!(key, want, "{json}"),
            other => panic!("{json}: {other}"),
        }
    }
    let e = err(cases[0].0);
    assert_eq!(
        e.to_string(),
        "DPMSolverMultistepScheduler: `use_karras_sigmas` = true is not supported (supported: false)"
    );
    // The same check runs for configs built in code.
    let config = DpmSolverMultistepConfig { use_karras_sigmas: true, ..Default::default() };
    let e = Scheduler::new(SchedulerConfig::DpmSolverMultistep(config)).unwrap_err();
    assert!(e.to_string().contains("`use_karras_sigmas`"), "{e}");
}

#[test]
fn values_of_the_wrong_type_name_the_key() {
    let e = err(r#"{"_class_name": "DDIMScheduler", "beta_start": "small", "steps_offset": 1}"#);
    let SchedulerError::InvalidValue { class, key, message } = &e else { panic!("{e}") };
    assert_eq!((*class, key.as_str()), ("DDIMScheduler", "beta_start"));
    assert!(message.contains("small"), "{message}");
    let e = err(r#"{"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "sideways"}"#);
    assert!(e.to_string().contains("`timestep_spacing`"), "{e}");
    // diffusers refuses deis with zero final sigmas; so do we.
    let e = err(r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "deis"}"#);
    assert!(e.to_string().contains("`final_sigmas_type`"), "{e}");
    let e = err(r#"{"_class_name": "DDIMScheduler", "trained_betas": [0.1, 0.2]}"#);
    assert!(e.to_string().contains("`trained_betas`"), "{e}");
}

#[test]
fn unknown_or_missing_class_is_refused() {
    let e = err(r#"{"_class_name": "LMSDiscreteScheduler", "use_karras_sigmas": false}"#);
    assert_eq!(
        e.to_string(),
        "unknown scheduler class `LMSDiscreteScheduler`; known classes: \
         DPMSolverMultistepScheduler, DDIMScheduler, EulerDiscreteScheduler, \
         FlowMatchEulerDiscreteScheduler, PNDMScheduler"
    );
    let SchedulerError::UnknownClass { known, .. } = &e else { panic!("{e}") };
    assert_eq!(*known, SchedulerConfig::KNOWN_CLASSES.join(", "));
    assert!(matches!(err(r#"{"beta_start": 0.1}"#), SchedulerError::MissingClassName { .. }));
    assert!(matches!(err("[1, 2]"), SchedulerError::Json { .. }));
    assert!(matches!(err("{not json"), SchedulerError::Json { .. }));
    let e = SchedulerConfig::from_file("/nonexistent/scheduler_config.json").unwrap_err();
    assert!(matches!(e, SchedulerError::Io { .. }), "{e}");
}

#[test]
fn null_flags_read_as_false_and_defaults_follow_diffusers() {
    let c = SchedulerConfig::from_json(
        r#"{"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": null, "sigma_min": null}"#,
    )
    .unwrap();
    let SchedulerConfig::EulerDiscrete(c) = c else { panic!() };
    assert!(!c.use_karras_sigmas);
    assert_eq!(c.final_sigmas_type, FinalSigmasType::Zero);
}

#[test]
fn step_counts_outside_the_training_range_are_refused() {
    let s = Scheduler::from_json(r#"{"_class_name": "DDIMScheduler"}"#).unwrap();
    assert!(matches!(s.set_timesteps(0), Err(SchedulerError::InvalidStepCount { got: 0, .. })));
    assert!(matches!(s.set_timesteps(1001), Err(SchedulerError::InvalidStepCount { .. })));
    assert_eq!(s.set_timesteps(1000).unwrap().len(), 1000);
}

/// diffusers' `DDIMScheduler.from_config(pndm_config)`: the SD1.5 PNDM config read as DDIM
/// equals the config diffusers saved for that scheduler (fixture `ddim_sd15.json`).
#[test]
fn a_config_of_another_class_can_be_read_as_a_chosen_class() {
    let pndm = r#"{
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000,
        "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
        "trained_betas": null
    }"#;
    let as_ddim = SchedulerConfig::from_json_as("DDIMScheduler", pndm).unwrap();
    let saved = SchedulerConfig::from_file(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/pipeline/reference/schedulers/ddim_sd15.json"),
    )
    .unwrap();
    assert_eq!(as_ddim, saved);
    // Read as its own class, the config is SD 1.5's PNDM config (`clip_sample` ignored).
    let as_pndm = SchedulerConfig::from_json_as("PNDMScheduler", pndm).unwrap();
    assert_eq!(as_pndm, SchedulerConfig::from_json(pndm).unwrap());
    assert_eq!(as_pndm, SchedulerConfig::Pndm(schedulers::PndmConfig::stable_diffusion_v1_5()));
    let e = SchedulerConfig::from_json_as("LMSDiscreteScheduler", pndm).unwrap_err();
    assert!(matches!(e, SchedulerError::UnknownClass { .. }), "{e}");
}

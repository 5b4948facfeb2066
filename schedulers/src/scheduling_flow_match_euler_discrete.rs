//! `FlowMatchEulerDiscreteScheduler` (diffusers `scheduling_flow_match_euler_discrete.py`),
//! deterministic, with a static `shift` (SD3's setting) or FLUX's resolution-dependent
//! exponential shift (`use_dynamic_shifting`, with the pipeline's sigmas and `mu`:
//! [`Scheduler::set_timesteps_dynamic`](crate::Scheduler::set_timesteps_dynamic)).
//!
//! Precision and a quirk, as in diffusers: `__init__` shifts the 1000 training sigmas in
//! float32 and keeps `sigma_min = sigmas[-1]`, which is already shifted; `set_timesteps` lays
//! `np.linspace(σmax·N, σmin·N, n)` in float64 and shifts again, so the shift reaches the last
//! sigma twice (with shift 3 it is 0.00893, not 0.003, and the last timestep is 8.93, not 0).
//! The shifted sigmas are cast to float32 and the timesteps are `sigmas · N` in float32. The
//! step is `sample + (σ_next − σ)·v` in float32. There is no `init_noise_sigma` and no
//! `scale_model_input` in diffusers: here they are 1 and the identity.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::Deserialize;

use crate::SchedulerError;
use crate::config::{lenient, require_false, unsupported};
use crate::numerics::np_linspace;
use crate::schedule::{Schedule, StepRule, TimestepDType};
use crate::scheduling_dpmsolver_multistep::TimeShiftType;

/// Config of `FlowMatchEulerDiscreteScheduler`: every argument of its `__init__`, with
/// diffusers' defaults. See [`FlowMatchEulerDiscreteConfig::validate`] for what is implemented.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct FlowMatchEulerDiscreteConfig {
    /// Number of training timesteps (1000).
    pub num_train_timesteps: usize,
    /// Static timestep shift `σ' = s·σ / (1 + (s − 1)·σ)` (1.0).
    #[serde(deserialize_with = "lenient::f64")]
    pub shift: f64,
    /// Resolution-dependent shifting (`false`; needs `mu` per request, see
    /// [`Scheduler::set_timesteps_dynamic`](crate::Scheduler::set_timesteps_dynamic)).
    /// Implemented with `time_shift_type` `exponential`.
    #[serde(deserialize_with = "lenient::flag")]
    pub use_dynamic_shifting: bool,
    /// Dynamic-shift parameter (0.5; unused without dynamic shifting).
    #[serde(deserialize_with = "lenient::opt_f64")]
    pub base_shift: Option<f64>,
    /// Dynamic-shift parameter (1.15; unused without dynamic shifting).
    #[serde(deserialize_with = "lenient::opt_f64")]
    pub max_shift: Option<f64>,
    /// Dynamic-shift parameter (256; unused without dynamic shifting).
    pub base_image_seq_len: usize,
    /// Dynamic-shift parameter (4096; unused without dynamic shifting).
    pub max_image_seq_len: usize,
    /// Use `1 − σ` (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub invert_sigmas: bool,
    /// Stretch the schedule to end at this value (`null`). Implemented: `null`.
    #[serde(deserialize_with = "lenient::opt_f64")]
    pub shift_terminal: Option<f64>,
    /// Karras sigmas (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub use_karras_sigmas: bool,
    /// Exponential sigmas (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub use_exponential_sigmas: bool,
    /// Beta sigmas (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub use_beta_sigmas: bool,
    /// Kind of dynamic shift (`"exponential"`; unused without it).
    pub time_shift_type: TimeShiftType,
    /// Re-noise at every step (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchEulerDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: Some(0.5),
            max_shift: Some(1.15),
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            time_shift_type: TimeShiftType::Exponential,
            stochastic_sampling: false,
        }
    }
}

impl FlowMatchEulerDiscreteConfig {
    /// The diffusers class name.
    pub const CLASS_NAME: &'static str = "FlowMatchEulerDiscreteScheduler";

    /// Checks that every setting is implemented; the error names the key that is not.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let class = Self::CLASS_NAME;
        if self.use_dynamic_shifting && self.time_shift_type != TimeShiftType::Exponential {
            return Err(unsupported(class, "time_shift_type", "linear", "exponential"));
        }
        require_false(class, "invert_sigmas", self.invert_sigmas)?;
        // diffusers tests `if self.config.shift_terminal:`, so 0 is off as well.
        if let Some(v) = self.shift_terminal.filter(|&v| v != 0.0) {
            return Err(unsupported(class, "shift_terminal", v, "null"));
        }
        require_false(class, "use_karras_sigmas", self.use_karras_sigmas)?;
        require_false(class, "use_exponential_sigmas", self.use_exponential_sigmas)?;
        require_false(class, "use_beta_sigmas", self.use_beta_sigmas)?;
        require_false(class, "stochastic_sampling", self.stochastic_sampling)
    }
}

/// What `__init__` computes: the shifted `sigma_min` and `sigma_max` (float32 values, read back
/// as Python floats).
#[derive(Debug, Clone)]
pub(crate) struct FlowMatchTables {
    sigma_min: f64,
    sigma_max: f64,
}

impl FlowMatchTables {
    pub(crate) fn new(c: &FlowMatchEulerDiscreteConfig) -> Self {
        let n = c.num_train_timesteps;
        let shift = c.shift as f32;
        // timesteps = np.linspace(1, N, N, dtype=float32)[::-1]; sigmas = timesteps / N, then
        // shift * sigmas / (1 + (shift - 1) * sigmas), all float32 (torch).
        let sigma = |t: f64| {
            let s = t as f32 / n as f32;
            shift * s / (1.0 + (c.shift - 1.0) as f32 * s)
        };
        let ends = np_linspace(1.0, n as f64, n);
        Self { sigma_max: sigma(ends[n - 1]) as f64, sigma_min: sigma(ends[0]) as f64 }
    }

    /// `set_timesteps(sigmas=…, mu=…)` with dynamic shifting (FluxPipeline): the given sigmas
    /// cast to float32 and shifted by `exp(μ) / (exp(μ) + (1/σ − 1))` in float32 (numpy keeps
    /// the float32 array's dtype against Python scalars), timesteps `σ · N` in float32.
    pub(crate) fn set_timesteps_dynamic(
        &self,
        c: &FlowMatchEulerDiscreteConfig,
        sigmas: &[f64],
        mu: f64,
    ) -> Schedule {
        let train = c.num_train_timesteps as f32;
        let e = mu.exp() as f32;
        let mut sigmas: Vec<f32> =
            sigmas.iter().map(|&s| s as f32).map(|s| e / (e + (1.0 / s - 1.0))).collect();
        let timesteps: Vec<f64> = sigmas.iter().map(|&s| (s * train) as f64).collect();
        sigmas.push(0.0);
        Schedule {
            class: FlowMatchEulerDiscreteConfig::CLASS_NAME,
            timesteps,
            timestep_dtype: TimestepDType::Float32,
            sigmas: Some(sigmas),
            init_noise_sigma: 1.0,
            rule: StepRule::FlowMatch(FlowMatchStep),
        }
    }

    pub(crate) fn set_timesteps(&self, c: &FlowMatchEulerDiscreteConfig, n: usize) -> Schedule {
        let train = c.num_train_timesteps as f64;
        let shift = c.shift;
        // np.linspace(sigma_max * N, sigma_min * N, n) / N, shifted again in float64.
        let mut sigmas: Vec<f32> = np_linspace(self.sigma_max * train, self.sigma_min * train, n)
            .into_iter()
            .map(|t| {
                let s = t / train;
                (shift * s / (1.0 + (shift - 1.0) * s)) as f32
            })
            .collect();
        let timesteps: Vec<f64> = sigmas.iter().map(|&s| (s * train as f32) as f64).collect();
        sigmas.push(0.0);
        Schedule {
            class: FlowMatchEulerDiscreteConfig::CLASS_NAME,
            timesteps,
            timestep_dtype: TimestepDType::Float32,
            sigmas: Some(sigmas),
            init_noise_sigma: 1.0,
            rule: StepRule::FlowMatch(FlowMatchStep),
        }
    }
}

/// The step rule of flow-matching Euler.
#[derive(Debug, Clone)]
pub(crate) struct FlowMatchStep;

impl FlowMatchStep {
    /// `sample + (sigma_next - sigma) * model_output`.
    pub(crate) fn step<B: Backend, const D: usize>(
        &self,
        sigma: f32,
        sigma_next: f32,
        model_output: Tensor<B, D>,
        sample: Tensor<B, D>,
    ) -> Tensor<B, D> {
        sample.add(model_output.mul_scalar(sigma_next - sigma))
    }
}

//! `EulerDiscreteScheduler` (diffusers `scheduling_euler_discrete.py`), without churn
//! (`s_churn = 0`, the pipelines' default).
//!
//! Precision, as in diffusers: timesteps from numpy float64, cast to float32; the training
//! sigmas `((1 − ᾱ)/ᾱ)^½` in torch float32, then `np.interp` at the (possibly fractional)
//! timesteps in float64 and the result cast to float32; the step (`x0 = sample − σ·eps`,
//! `derivative = (sample − x0)/σ`, `dt = σ_next − σ`) in float32, in diffusers' order, so the
//! derivative is not simplified to `eps`.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::Deserialize;

use crate::SchedulerError;
use crate::config::{
    BetaSchedule, FinalSigmasType, PredictionType, TimestepSpacing, lenient, require_false,
    unsupported,
};
use crate::numerics::vp_sigmas_f32;
use crate::numerics::{alphas_cumprod, np_arange_f64, np_interp_arange, np_linspace};
use crate::schedule::{Schedule, StepRule, TimestepDType};
use crate::scheduling_dpmsolver_multistep::check_trained_betas;

/// `interpolation_type` of Euler's sigmas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum InterpolationType {
    /// `"linear"`: `np.interp` of the training sigmas at the timesteps.
    #[serde(rename = "linear")]
    Linear,
    /// `"log_linear"` (not implemented).
    #[serde(rename = "log_linear")]
    LogLinear,
}

/// `timestep_type` of Euler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TimestepType {
    /// `"discrete"`.
    #[serde(rename = "discrete")]
    Discrete,
    /// `"continuous"`: with v-prediction, timesteps become `0.25·log σ` (not implemented).
    #[serde(rename = "continuous")]
    Continuous,
}

/// Config of `EulerDiscreteScheduler`: every argument of its `__init__`, with diffusers'
/// defaults. See [`EulerDiscreteConfig::validate`] for what is implemented.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct EulerDiscreteConfig {
    /// Number of training timesteps (1000).
    pub num_train_timesteps: usize,
    /// First beta (0.0001).
    #[serde(deserialize_with = "lenient::f64")]
    pub beta_start: f64,
    /// Last beta (0.02).
    #[serde(deserialize_with = "lenient::f64")]
    pub beta_end: f64,
    /// Beta layout (`"linear"`).
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding the three fields above (`null`).
    #[serde(deserialize_with = "lenient::opt_f64_list")]
    pub trained_betas: Option<Vec<f64>>,
    /// What the model predicts (`"epsilon"`).
    pub prediction_type: PredictionType,
    /// Sigma interpolation (`"linear"`). Implemented: `"linear"`.
    pub interpolation_type: InterpolationType,
    /// Karras sigmas (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub use_karras_sigmas: bool,
    /// Exponential sigmas (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub use_exponential_sigmas: bool,
    /// Beta sigmas (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub use_beta_sigmas: bool,
    /// Lower sigma bound of Karras/exponential/beta sigmas (`null`; unused without them).
    #[serde(deserialize_with = "lenient::opt_f64")]
    pub sigma_min: Option<f64>,
    /// Upper sigma bound of Karras/exponential/beta sigmas (`null`; unused without them).
    #[serde(deserialize_with = "lenient::opt_f64")]
    pub sigma_max: Option<f64>,
    /// Timestep spacing (`"linspace"`).
    pub timestep_spacing: TimestepSpacing,
    /// Timestep type (`"discrete"`). `"continuous"` is implemented except with v-prediction.
    pub timestep_type: TimestepType,
    /// Offset added to `"leading"` timesteps (0).
    pub steps_offset: i64,
    /// Zero-terminal-SNR rescaling of betas (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub rescale_betas_zero_snr: bool,
    /// The sigma after the last step (`"zero"`).
    pub final_sigmas_type: FinalSigmasType,
}

impl Default for EulerDiscreteConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            interpolation_type: InterpolationType::Linear,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            timestep_spacing: TimestepSpacing::Linspace,
            timestep_type: TimestepType::Discrete,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            final_sigmas_type: FinalSigmasType::Zero,
        }
    }
}

impl EulerDiscreteConfig {
    /// The diffusers class name.
    pub const CLASS_NAME: &'static str = "EulerDiscreteScheduler";

    /// Checks that every setting is implemented; the error names the key that is not.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let class = Self::CLASS_NAME;
        if self.prediction_type == PredictionType::FlowPrediction {
            return Err(unsupported(
                class,
                "prediction_type",
                self.prediction_type.json(),
                "\"epsilon\", \"sample\", \"original_sample\", \"v_prediction\"",
            ));
        }
        if self.interpolation_type != InterpolationType::Linear {
            return Err(unsupported(class, "interpolation_type", "\"log_linear\"", "\"linear\""));
        }
        require_false(class, "use_karras_sigmas", self.use_karras_sigmas)?;
        require_false(class, "use_exponential_sigmas", self.use_exponential_sigmas)?;
        require_false(class, "use_beta_sigmas", self.use_beta_sigmas)?;
        if self.timestep_type == TimestepType::Continuous
            && self.prediction_type == PredictionType::VPrediction
        {
            return Err(unsupported(
                class,
                "timestep_type",
                "\"continuous\" (with v_prediction)",
                "\"discrete\"",
            ));
        }
        require_false(class, "rescale_betas_zero_snr", self.rescale_betas_zero_snr)?;
        check_trained_betas(class, &self.trained_betas, self.num_train_timesteps)
    }
}

/// What `__init__` computes: `alphas_cumprod` and the training sigmas (float32).
#[derive(Debug, Clone)]
pub(crate) struct EulerTables {
    pub(crate) alphas_cumprod: Vec<f32>,
    sigmas: Vec<f32>,
}

impl EulerTables {
    pub(crate) fn new(c: &EulerDiscreteConfig) -> Self {
        let alphas_cumprod = alphas_cumprod(
            c.num_train_timesteps,
            c.beta_start,
            c.beta_end,
            c.beta_schedule,
            c.trained_betas.as_deref(),
        );
        Self { sigmas: vp_sigmas_f32(&alphas_cumprod), alphas_cumprod }
    }

    pub(crate) fn set_timesteps(&self, c: &EulerDiscreteConfig, n: usize) -> Schedule {
        let train = c.num_train_timesteps;
        let timesteps: Vec<f32> = match c.timestep_spacing {
            TimestepSpacing::Linspace => {
                np_linspace(0.0, (train - 1) as f64, n).iter().rev().map(|&t| t as f32).collect()
            }
            // (np.arange(0, n) * (train // n)).round()[::-1].astype(float32) + steps_offset
            TimestepSpacing::Leading => (0..n as i64)
                .rev()
                .map(|i| (i * (train / n) as i64) as f32 + c.steps_offset as f32)
                .collect(),
            // np.arange(train, 0, -train / n).round().astype(float32) - 1
            TimestepSpacing::Trailing => {
                np_arange_f64(train as f64, 0.0, -(train as f64 / n as f64))
                    .iter()
                    .map(|t| t.round_ties_even() as f32 - 1.0)
                    .collect()
            }
        };
        let train_sigmas: Vec<f64> = self.sigmas.iter().map(|&s| s as f64).collect();
        let mut sigmas: Vec<f32> =
            timesteps.iter().map(|&t| np_interp_arange(t as f64, &train_sigmas) as f32).collect();
        sigmas.push(match c.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => self.sigmas[0],
        });
        // init_noise_sigma: max sigma, or (max**2 + 1) ** 0.5 for "leading" (float32).
        let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match c.timestep_spacing {
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
            _ => max_sigma,
        };
        Schedule {
            class: EulerDiscreteConfig::CLASS_NAME,
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            timestep_dtype: TimestepDType::Float32,
            sigmas: Some(sigmas),
            init_noise_sigma,
            rule: StepRule::Euler(EulerStep { prediction_type: c.prediction_type }),
        }
    }
}

/// The step rule of one Euler schedule.
#[derive(Debug, Clone)]
pub(crate) struct EulerStep {
    prediction_type: PredictionType,
}

impl EulerStep {
    /// `sample / ((sigma**2 + 1) ** 0.5)`.
    pub(crate) fn scale_model_input<B: Backend, const D: usize>(
        sample: Tensor<B, D>,
        sigma: f32,
    ) -> Tensor<B, D> {
        sample.div_scalar((sigma * sigma + 1.0).sqrt())
    }

    /// diffusers' `step` with `s_churn = 0` (so `sigma_hat = sigma`).
    pub(crate) fn step<B: Backend, const D: usize>(
        &self,
        sigma: f32,
        sigma_next: f32,
        model_output: Tensor<B, D>,
        sample: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let sigma_hat = sigma * (0.0 + 1.0);
        let pred_original_sample = match self.prediction_type {
            // sample - sigma_hat * model_output
            PredictionType::Epsilon => sample.clone().sub(model_output.mul_scalar(sigma_hat)),
            // model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
            PredictionType::VPrediction => {
                let s2p1 = sigma * sigma + 1.0;
                model_output.mul_scalar(-sigma / s2p1.sqrt()).add(sample.clone().div_scalar(s2p1))
            }
            _ => model_output,
        };
        // derivative = (sample - x0) / sigma_hat; dt = sigma_next - sigma_hat
        let derivative = sample.clone().sub(pred_original_sample).div_scalar(sigma_hat);
        sample.add(derivative.mul_scalar(sigma_next - sigma_hat))
    }
}

//! `DDIMScheduler` (diffusers `scheduling_ddim.py`), deterministic (`eta = 0`).
//!
//! Precision, as in diffusers: timesteps from numpy (int64); `alphas_cumprod` float32; every
//! coefficient (`sqrt(1 − ᾱ_t)`, `sqrt(ᾱ_t)`, `sqrt(ᾱ_prev)`, `sqrt(1 − ᾱ_prev)`) from 0-d float32
//! tensors. The previous timestep is always `t − num_train_timesteps // num_inference_steps`,
//! whatever the spacing (diffusers does the same).

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::Deserialize;

use crate::SchedulerError;
use crate::config::{
    BetaSchedule, PredictionType, TimestepSpacing, lenient, require_false, unsupported,
};
use crate::numerics::{alphas_cumprod, np_arange_f64, np_linspace};
use crate::schedule::{Schedule, StepRule, TimestepDType};
use crate::scheduling_dpmsolver_multistep::check_trained_betas;

/// Config of `DDIMScheduler`: every argument of its `__init__`, with diffusers' defaults. See
/// [`DdimConfig::validate`] for what is implemented.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct DdimConfig {
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
    /// Clip the predicted x0 to `±clip_sample_range` (`true`).
    #[serde(deserialize_with = "lenient::flag")]
    pub clip_sample: bool,
    /// ᾱ after the last step is 1 (`true`) or ᾱ of timestep 0 (`false`).
    #[serde(deserialize_with = "lenient::flag")]
    pub set_alpha_to_one: bool,
    /// Offset added to `"leading"` timesteps (0).
    pub steps_offset: i64,
    /// What the model predicts (`"epsilon"`).
    pub prediction_type: PredictionType,
    /// Dynamic thresholding of x0 (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub thresholding: bool,
    /// Percentile of dynamic thresholding (0.995; unused without thresholding).
    #[serde(deserialize_with = "lenient::f64")]
    pub dynamic_thresholding_ratio: f64,
    /// Bound of `clip_sample` (1.0).
    #[serde(deserialize_with = "lenient::f64")]
    pub clip_sample_range: f64,
    /// Threshold ceiling (1.0; unused without thresholding).
    #[serde(deserialize_with = "lenient::f64")]
    pub sample_max_value: f64,
    /// Timestep spacing (`"leading"`).
    pub timestep_spacing: TimestepSpacing,
    /// Zero-terminal-SNR rescaling of betas (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DdimConfig {
    /// The diffusers class name.
    pub const CLASS_NAME: &'static str = "DDIMScheduler";

    /// Checks that every setting is implemented; the error names the key that is not.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let class = Self::CLASS_NAME;
        if !matches!(
            self.prediction_type,
            PredictionType::Epsilon | PredictionType::Sample | PredictionType::VPrediction
        ) {
            return Err(unsupported(
                class,
                "prediction_type",
                self.prediction_type.json(),
                "\"epsilon\", \"sample\", \"v_prediction\"",
            ));
        }
        require_false(class, "thresholding", self.thresholding)?;
        require_false(class, "rescale_betas_zero_snr", self.rescale_betas_zero_snr)?;
        check_trained_betas(class, &self.trained_betas, self.num_train_timesteps)
    }
}

/// What `__init__` computes: `alphas_cumprod` and `final_alpha_cumprod` (float32).
#[derive(Debug, Clone)]
pub(crate) struct DdimTables {
    pub(crate) alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
}

impl DdimTables {
    pub(crate) fn new(c: &DdimConfig) -> Self {
        let alphas_cumprod = alphas_cumprod(
            c.num_train_timesteps,
            c.beta_start,
            c.beta_end,
            c.beta_schedule,
            c.trained_betas.as_deref(),
        );
        let final_alpha_cumprod = if c.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Self { alphas_cumprod, final_alpha_cumprod }
    }

    pub(crate) fn set_timesteps(
        &self,
        c: &DdimConfig,
        n: usize,
    ) -> Result<Schedule, SchedulerError> {
        let train = c.num_train_timesteps;
        let timesteps: Vec<i64> = match c.timestep_spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (train - 1) as f64, n)
                .iter()
                .rev()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let step_ratio = (train / n) as i64;
                (0..n as i64).rev().map(|i| i * step_ratio + c.steps_offset).collect()
            }
            TimestepSpacing::Trailing => {
                np_arange_f64(train as f64, 0.0, -(train as f64 / n as f64))
                    .iter()
                    .map(|t| t.round_ties_even() as i64 - 1)
                    .collect()
            }
        };
        // prev_timestep = timestep - num_train_timesteps // num_inference_steps
        let ratio = (train / n) as i64;
        let alpha = |t: i64| -> Result<f32, SchedulerError> {
            usize::try_from(t).ok().and_then(|i| self.alphas_cumprod.get(i).copied()).ok_or_else(
                || SchedulerError::InvalidValue {
                    class: DdimConfig::CLASS_NAME,
                    key: "steps_offset".into(),
                    message: format!("timestep {t} falls outside the {train} training timesteps"),
                },
            )
        };
        let alphas = timesteps
            .iter()
            .map(|&t| {
                let prev = t - ratio;
                Ok((alpha(t)?, if prev >= 0 { alpha(prev)? } else { self.final_alpha_cumprod }))
            })
            .collect::<Result<_, SchedulerError>>()?;
        Ok(Schedule {
            class: DdimConfig::CLASS_NAME,
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            timestep_dtype: TimestepDType::Int64,
            sigmas: None,
            init_noise_sigma: 1.0,
            rule: StepRule::Ddim(DdimStep {
                alphas,
                prediction_type: c.prediction_type,
                clip: c.clip_sample.then_some(c.clip_sample_range as f32),
            }),
        })
    }
}

/// The step rule of one DDIM schedule.
#[derive(Debug, Clone)]
pub(crate) struct DdimStep {
    /// `(alpha_prod_t, alpha_prod_t_prev)` of every step.
    alphas: Vec<(f32, f32)>,
    prediction_type: PredictionType,
    clip: Option<f32>,
}

impl DdimStep {
    /// diffusers' `step` with `eta = 0`, `use_clipped_model_output = False`.
    pub(crate) fn step<B: Backend, const D: usize>(
        &self,
        i: usize,
        model_output: Tensor<B, D>,
        sample: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let (alpha_prod_t, alpha_prod_t_prev) = self.alphas[i];
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_a, sqrt_b) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        let (pred_original_sample, pred_epsilon) = match self.prediction_type {
            // x0 = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
            PredictionType::Epsilon => (
                sample.sub(model_output.clone().mul_scalar(sqrt_b)).div_scalar(sqrt_a),
                model_output,
            ),
            // x0 = a**0.5 * sample - b**0.5 * v;  eps = a**0.5 * v + b**0.5 * sample
            PredictionType::VPrediction => (
                sample.clone().mul_scalar(sqrt_a).sub(model_output.clone().mul_scalar(sqrt_b)),
                model_output.mul_scalar(sqrt_a).add(sample.mul_scalar(sqrt_b)),
            ),
            // x0 = model_output;  eps = (sample - a**0.5 * x0) / b**0.5
            _ => (
                model_output.clone(),
                sample.sub(model_output.mul_scalar(sqrt_a)).div_scalar(sqrt_b),
            ),
        };
        let pred_original_sample = match self.clip {
            Some(r) => pred_original_sample.clamp(-r, r),
            None => pred_original_sample,
        };
        // eta = 0: std_dev_t = 0, so the direction is (1 - alpha_prod_t_prev - 0) ** 0.5 * eps.
        let direction = pred_epsilon.mul_scalar((1.0 - alpha_prod_t_prev - 0.0).sqrt());
        pred_original_sample.mul_scalar(alpha_prod_t_prev.sqrt()).add(direction)
    }
}

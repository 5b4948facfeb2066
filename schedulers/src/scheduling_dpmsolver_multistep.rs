//! `DPMSolverMultistepScheduler` (diffusers `scheduling_dpmsolver_multistep.py`): DPM-Solver++
//! multistep, first or second order (PixArt-α/Σ's default: second order, midpoint,
//! `lower_order_final`, epsilon prediction).
//!
//! Precision, as in diffusers: timesteps from numpy float64 (`np.linspace(...).round()`, ties to
//! even) cast to int64; the training sigmas `((1 − ᾱ)/ᾱ)^½` in torch float32 and picked at the
//! timesteps (`np.interp` at whole numbers returns them unchanged); every per-step coefficient
//! (`alpha_t`, `sigma_t`, `lambda`, `h`, `r0`, `exp(−h) − 1`) from 0-d float32 tensors, so here
//! from `f32` host arithmetic in the same order.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use serde::Deserialize;

use crate::SchedulerError;
use crate::config::{
    BetaSchedule, FinalSigmasType, PredictionType, TimestepSpacing, lenient, require_false,
    unsupported,
};
use crate::numerics::{alphas_cumprod, np_arange_f64, np_interp_arange, np_linspace};
use crate::numerics::{vp_alpha_sigma_f32, vp_sigmas_f32};
use crate::schedule::{Schedule, SchedulerState, StepRule, TimestepDType};

/// `algorithm_type` of DPM-Solver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AlgorithmType {
    /// `"dpmsolver++"`: solves the ODE of the data prediction (the only one implemented).
    #[serde(rename = "dpmsolver++")]
    DpmSolverPlusPlus,
    /// `"dpmsolver"` (deprecated in diffusers).
    #[serde(rename = "dpmsolver")]
    DpmSolver,
    /// `"sde-dpmsolver++"` (stochastic).
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPlusPlus,
    /// `"sde-dpmsolver"` (stochastic, deprecated).
    #[serde(rename = "sde-dpmsolver")]
    SdeDpmSolver,
    /// `"deis"`: diffusers silently replaces it by `"dpmsolver++"`; so does this crate.
    #[serde(rename = "deis")]
    Deis,
}

/// `solver_type` of the second-order update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SolverType {
    /// `"midpoint"`.
    #[serde(rename = "midpoint")]
    Midpoint,
    /// `"heun"`.
    #[serde(rename = "heun")]
    Heun,
    /// `"logrho"`: diffusers replaces it by `"midpoint"`.
    #[serde(rename = "logrho")]
    Logrho,
    /// `"bh1"`: diffusers replaces it by `"midpoint"`.
    #[serde(rename = "bh1")]
    Bh1,
    /// `"bh2"`: diffusers replaces it by `"midpoint"`.
    #[serde(rename = "bh2")]
    Bh2,
}

/// `variance_type` of a model that also predicts its variance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VarianceType {
    /// `"learned"`.
    #[serde(rename = "learned")]
    Learned,
    /// `"learned_range"`.
    #[serde(rename = "learned_range")]
    LearnedRange,
}

/// `time_shift_type` (only read by diffusers with `use_dynamic_shifting`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TimeShiftType {
    /// `"exponential"`.
    #[serde(rename = "exponential")]
    Exponential,
    /// `"linear"`.
    #[serde(rename = "linear")]
    Linear,
}

/// Config of `DPMSolverMultistepScheduler`: every argument of its `__init__`, with diffusers'
/// defaults. See [`DpmSolverMultistepConfig::validate`] for what is implemented.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct DpmSolverMultistepConfig {
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
    /// Solver order (2). Implemented: 1, 2.
    pub solver_order: usize,
    /// What the model predicts (`"epsilon"`).
    pub prediction_type: PredictionType,
    /// Dynamic thresholding of x0 (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub thresholding: bool,
    /// Percentile of dynamic thresholding (0.995; unused without thresholding).
    #[serde(deserialize_with = "lenient::f64")]
    pub dynamic_thresholding_ratio: f64,
    /// Threshold ceiling (1.0; unused without thresholding).
    #[serde(deserialize_with = "lenient::f64")]
    pub sample_max_value: f64,
    /// Algorithm (`"dpmsolver++"`). Implemented: `"dpmsolver++"` (and `"deis"`, which diffusers
    /// maps to it, and accepts only with `final_sigmas_type = "sigma_min"`).
    pub algorithm_type: AlgorithmType,
    /// Second-order update rule (`"midpoint"`).
    pub solver_type: SolverType,
    /// Use lower-order steps at the end when there are fewer than 15 steps (`true`).
    #[serde(deserialize_with = "lenient::flag")]
    pub lower_order_final: bool,
    /// Use a first-order (Euler) final step always (`false`).
    #[serde(deserialize_with = "lenient::flag")]
    pub euler_at_final: bool,
    /// Karras sigmas (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub use_karras_sigmas: bool,
    /// Exponential sigmas (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub use_exponential_sigmas: bool,
    /// Beta sigmas (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub use_beta_sigmas: bool,
    /// Lu lambdas (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub use_lu_lambdas: bool,
    /// Flow-matching sigmas (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub use_flow_sigmas: bool,
    /// Shift of flow sigmas (1.0; unused without them).
    #[serde(deserialize_with = "lenient::f64")]
    pub flow_shift: f64,
    /// The sigma after the last step (`"zero"`).
    pub final_sigmas_type: FinalSigmasType,
    /// Timesteps whose lambda is below this are not used (`-inf`: all are).
    #[serde(deserialize_with = "lenient::f64")]
    pub lambda_min_clipped: f64,
    /// Variance prediction of the model (`null`). Implemented: `null` (split learned sigma off
    /// before stepping, as the PixArt pipeline does).
    pub variance_type: Option<VarianceType>,
    /// Timestep spacing (`"linspace"`).
    pub timestep_spacing: TimestepSpacing,
    /// Offset added to `"leading"` timesteps (0).
    pub steps_offset: i64,
    /// Zero-terminal-SNR rescaling of betas (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub rescale_betas_zero_snr: bool,
    /// Resolution-dependent shifting (`false`). Implemented: `false`.
    #[serde(deserialize_with = "lenient::flag")]
    pub use_dynamic_shifting: bool,
    /// Kind of dynamic shift (`"exponential"`; unused without it).
    pub time_shift_type: TimeShiftType,
}

impl Default for DpmSolverMultistepConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            solver_order: 2,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: FinalSigmasType::Zero,
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: TimeShiftType::Exponential,
        }
    }
}

impl DpmSolverMultistepConfig {
    /// The diffusers class name.
    pub const CLASS_NAME: &'static str = "DPMSolverMultistepScheduler";

    /// The config of PixArt-α/Σ's `scheduler/scheduler_config.json` (the defaults).
    pub fn pixart() -> Self {
        Self::default()
    }

    /// Checks that every setting is implemented; the error names the key that is not.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let class = Self::CLASS_NAME;
        if !matches!(self.solver_order, 1 | 2) {
            return Err(unsupported(class, "solver_order", self.solver_order, "1, 2"));
        }
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
        if !matches!(self.algorithm_type, AlgorithmType::DpmSolverPlusPlus | AlgorithmType::Deis) {
            let value = match self.algorithm_type {
                AlgorithmType::DpmSolver => "\"dpmsolver\"",
                AlgorithmType::SdeDpmSolver => "\"sde-dpmsolver\"",
                _ => "\"sde-dpmsolver++\"",
            };
            return Err(unsupported(class, "algorithm_type", value, "\"dpmsolver++\""));
        }
        if self.algorithm_type == AlgorithmType::Deis
            && self.final_sigmas_type == FinalSigmasType::Zero
        {
            // diffusers checks the given algorithm_type before mapping "deis", and refuses it.
            return Err(SchedulerError::InvalidValue {
                class,
                key: "final_sigmas_type".into(),
                message: "\"zero\" is refused by diffusers with algorithm_type \"deis\"; \
                          use \"sigma_min\""
                    .into(),
            });
        }
        require_false(class, "use_karras_sigmas", self.use_karras_sigmas)?;
        require_false(class, "use_exponential_sigmas", self.use_exponential_sigmas)?;
        require_false(class, "use_beta_sigmas", self.use_beta_sigmas)?;
        require_false(class, "use_lu_lambdas", self.use_lu_lambdas)?;
        require_false(class, "use_flow_sigmas", self.use_flow_sigmas)?;
        if let Some(v) = self.variance_type {
            let value = match v {
                VarianceType::Learned => "\"learned\"",
                VarianceType::LearnedRange => "\"learned_range\"",
            };
            return Err(unsupported(class, "variance_type", value, "null"));
        }
        require_false(class, "rescale_betas_zero_snr", self.rescale_betas_zero_snr)?;
        require_false(class, "use_dynamic_shifting", self.use_dynamic_shifting)?;
        check_trained_betas(class, &self.trained_betas, self.num_train_timesteps)
    }
}

/// `trained_betas` must give one beta per training timestep.
pub(crate) fn check_trained_betas(
    class: &'static str,
    trained_betas: &Option<Vec<f64>>,
    num_train_timesteps: usize,
) -> Result<(), SchedulerError> {
    match trained_betas {
        Some(b) if b.len() != num_train_timesteps => Err(SchedulerError::InvalidValue {
            class,
            key: "trained_betas".into(),
            message: format!(
                "has {} values, num_train_timesteps is {num_train_timesteps}",
                b.len()
            ),
        }),
        _ => Ok(()),
    }
}

/// What `__init__` computes: `alphas_cumprod`, the training sigmas and lambdas (float32).
#[derive(Debug, Clone)]
pub(crate) struct DpmSolverTables {
    pub(crate) alphas_cumprod: Vec<f32>,
    sigmas: Vec<f32>,
    lambda_t: Vec<f32>,
}

impl DpmSolverTables {
    pub(crate) fn new(c: &DpmSolverMultistepConfig) -> Self {
        let alphas_cumprod = alphas_cumprod(
            c.num_train_timesteps,
            c.beta_start,
            c.beta_end,
            c.beta_schedule,
            c.trained_betas.as_deref(),
        );
        // alpha_t = sqrt(ac), sigma_t = sqrt(1 - ac), lambda_t = log(alpha_t) - log(sigma_t).
        let lambda_t =
            alphas_cumprod.iter().map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln()).collect();
        Self { sigmas: vp_sigmas_f32(&alphas_cumprod), alphas_cumprod, lambda_t }
    }

    pub(crate) fn set_timesteps(&self, c: &DpmSolverMultistepConfig, n: usize) -> Schedule {
        // clipped_idx = torch.searchsorted(torch.flip(lambda_t, [0]), lambda_min_clipped): the
        // number of (ascending, flipped) lambdas below the bound, compared in float32.
        let bound = c.lambda_min_clipped as f32;
        let clipped_idx = self.lambda_t.iter().rev().take_while(|&&l| l < bound).count();
        let last_timestep = c.num_train_timesteps - clipped_idx;
        let timesteps: Vec<i64> = match c.timestep_spacing {
            TimestepSpacing::Linspace => {
                let v = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1);
                v.iter().rev().take(n).map(|t| t.round_ties_even() as i64).collect()
            }
            TimestepSpacing::Leading => {
                let step_ratio = (last_timestep / (n + 1)) as i64;
                (0..=n as i64).rev().take(n).map(|i| i * step_ratio + c.steps_offset).collect()
            }
            TimestepSpacing::Trailing => {
                let step_ratio = c.num_train_timesteps as f64 / n as f64;
                np_arange_f64(last_timestep as f64, 0.0, -step_ratio)
                    .iter()
                    .map(|t| t.round_ties_even() as i64 - 1)
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
        let solver_type = match c.solver_type {
            SolverType::Heun => SolverType::Heun,
            _ => SolverType::Midpoint,
        };
        Schedule {
            class: DpmSolverMultistepConfig::CLASS_NAME,
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            timestep_dtype: TimestepDType::Int64,
            sigmas: Some(sigmas),
            init_noise_sigma: 1.0,
            rule: StepRule::DpmSolver(DpmSolverStep {
                solver_order: c.solver_order,
                prediction_type: c.prediction_type,
                solver_type,
                lower_order_final: c.lower_order_final,
                euler_at_final: c.euler_at_final,
                final_sigma_zero: c.final_sigmas_type == FinalSigmasType::Zero,
            }),
        }
    }
}

/// The step rule of one DPM-Solver++ schedule.
#[derive(Debug, Clone)]
pub(crate) struct DpmSolverStep {
    solver_order: usize,
    prediction_type: PredictionType,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
}

/// `lambda = log(alpha_t) - log(sigma_t)` of a sigma, with its alpha_t and sigma_t (float32).
fn alpha_sigma_lambda(sigma: f32) -> (f32, f32, f32) {
    let (alpha_t, sigma_t) = vp_alpha_sigma_f32(sigma);
    (alpha_t, sigma_t, alpha_t.ln() - sigma_t.ln())
}

impl DpmSolverStep {
    /// diffusers' `step`: convert to x0, push it on the history, then a first- or second-order
    /// update.
    pub(crate) fn step<B: Backend, const D: usize>(
        &self,
        sigmas: &[f32],
        state: &mut SchedulerState<B, D>,
        i: usize,
        model_output: Tensor<B, D>,
        sample: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let n = sigmas.len() - 1;
        let lower_order_final = i == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigma_zero);
        let x0 = self.convert_model_output(sigmas[i], model_output, sample.clone());
        if let Some(last) = state.model_outputs.last() {
            assert_eq!(
                last.dims(),
                x0.dims(),
                "{}: the state's history has another shape than this sample; \
                 keep one state per image region",
                DpmSolverMultistepConfig::CLASS_NAME
            );
        }
        state.model_outputs.push(x0);
        if state.model_outputs.len() > self.solver_order {
            state.model_outputs.remove(0);
        }
        let h = &state.model_outputs;
        let prev = if self.solver_order == 1 || state.lower_order_nums < 1 || lower_order_final {
            first_order_update(sigmas[i + 1], sigmas[i], h[h.len() - 1].clone(), sample)
        } else {
            // solver_order == 2 (3 is rejected by validate()).
            self.second_order_update(
                [sigmas[i + 1], sigmas[i], sigmas[i - 1]],
                h[h.len() - 1].clone(),
                h[h.len() - 2].clone(),
                sample,
            )
        };
        if state.lower_order_nums < self.solver_order {
            state.lower_order_nums += 1;
        }
        prev
    }

    /// `convert_model_output` for dpmsolver++: the data prediction x0.
    fn convert_model_output<B: Backend, const D: usize>(
        &self,
        sigma: f32,
        model_output: Tensor<B, D>,
        sample: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let (alpha_t, sigma_t) = vp_alpha_sigma_f32(sigma);
        match self.prediction_type {
            // (sample - sigma_t * model_output) / alpha_t
            PredictionType::Epsilon => {
                sample.sub(model_output.mul_scalar(sigma_t)).div_scalar(alpha_t)
            }
            // alpha_t * sample - sigma_t * model_output
            PredictionType::VPrediction => {
                sample.mul_scalar(alpha_t).sub(model_output.mul_scalar(sigma_t))
            }
            _ => model_output,
        }
    }

    /// `multistep_dpm_solver_second_order_update` for dpmsolver++; `sigmas` are
    /// `[sigma_t (next), sigma_s0 (current), sigma_s1 (previous)]`, `m0` the current x0 and
    /// `m1` the previous one.
    fn second_order_update<B: Backend, const D: usize>(
        &self,
        sigmas: [f32; 3],
        m0: Tensor<B, D>,
        m1: Tensor<B, D>,
        sample: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(sigmas[0]);
        let (_, sigma_s0, lambda_s0) = alpha_sigma_lambda(sigmas[1]);
        let (_, _, lambda_s1) = alpha_sigma_lambda(sigmas[2]);
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / h;
        let em1 = (-h).exp() - 1.0;
        // D1 = (1.0 / r0) * (m0 - m1)
        let d1 = m0.clone().sub(m1).mul_scalar(1.0 / r0);
        let first = sample.mul_scalar(sigma_t / sigma_s0).sub(m0.mul_scalar(alpha_t * em1));
        match self.solver_type {
            // ... - 0.5 * (alpha_t * (exp(-h) - 1.0)) * D1
            SolverType::Midpoint => first.sub(d1.mul_scalar(0.5 * (alpha_t * em1))),
            // ... + (alpha_t * ((exp(-h) - 1.0) / h + 1.0)) * D1
            _ => first.add(d1.mul_scalar(alpha_t * (em1 / h + 1.0))),
        }
    }
}

/// `dpm_solver_first_order_update` for dpmsolver++ (DDIM in the data-prediction form):
/// `(sigma_t / sigma_s) * sample - (alpha_t * (exp(-h) - 1)) * x0`. With a final sigma of 0 the
/// coefficients are exactly 0 and −1 (lambda_t = +inf), so the result is x0.
fn first_order_update<B: Backend, const D: usize>(
    sigma_next: f32,
    sigma: f32,
    x0: Tensor<B, D>,
    sample: Tensor<B, D>,
) -> Tensor<B, D> {
    let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(sigma_next);
    let (_, sigma_s, lambda_s) = alpha_sigma_lambda(sigma);
    let h = lambda_t - lambda_s;
    sample.mul_scalar(sigma_t / sigma_s).sub(x0.mul_scalar(alpha_t * ((-h).exp() - 1.0)))
}

//! [`Scheduler`] (a config plus its training tables), [`Schedule`] (one number of inference
//! steps: timesteps, sigmas, the step rule) and [`SchedulerState`] (the multistep history of one
//! image or one image region).

use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::SchedulerError;
use crate::config::SchedulerConfig;
use crate::scheduling_ddim::{DdimStep, DdimTables};
use crate::scheduling_dpmsolver_multistep::{DpmSolverStep, DpmSolverTables};
use crate::scheduling_euler_discrete::{EulerStep, EulerTables};
use crate::scheduling_flow_match_euler_discrete::{FlowMatchStep, FlowMatchTables};
use crate::scheduling_pndm::{PndmStep, PndmTables};

/// A scheduler: its validated config and the training-timestep tables diffusers computes in
/// `__init__` (betas, `alphas_cumprod`, training sigmas).
///
/// Build one per model; call [`Scheduler::set_timesteps`] once per number of inference steps.
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    tables: Tables,
}

#[derive(Debug, Clone)]
enum Tables {
    DpmSolver(DpmSolverTables),
    Ddim(DdimTables),
    Euler(EulerTables),
    FlowMatch(FlowMatchTables),
    Pndm(PndmTables),
}

impl Scheduler {
    /// Validates the config and computes the training tables.
    pub fn new(config: SchedulerConfig) -> Result<Self, SchedulerError> {
        config.validate()?;
        let tables = match &config {
            SchedulerConfig::DpmSolverMultistep(c) => Tables::DpmSolver(DpmSolverTables::new(c)),
            SchedulerConfig::Ddim(c) => Tables::Ddim(DdimTables::new(c)),
            SchedulerConfig::EulerDiscrete(c) => Tables::Euler(EulerTables::new(c)),
            SchedulerConfig::FlowMatchEulerDiscrete(c) => {
                Tables::FlowMatch(FlowMatchTables::new(c))
            }
            SchedulerConfig::Pndm(c) => Tables::Pndm(PndmTables::new(c)),
        };
        Ok(Self { config, tables })
    }

    /// Reads a `scheduler_config.json` and builds its scheduler.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SchedulerError> {
        Self::new(SchedulerConfig::from_file(path)?)
    }

    /// Parses the text of a `scheduler_config.json` and builds its scheduler.
    pub fn from_json(json: &str) -> Result<Self, SchedulerError> {
        Self::new(SchedulerConfig::from_json(json)?)
    }

    /// The config this scheduler was built from.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The diffusers class name (`"DPMSolverMultistepScheduler"`, …).
    pub fn class_name(&self) -> &'static str {
        self.config.class_name()
    }

    /// `alphas_cumprod` of every training timestep (float32, as diffusers holds it), for the
    /// schedulers that have one (not flow matching).
    pub fn alphas_cumprod(&self) -> Option<&[f32]> {
        match &self.tables {
            Tables::DpmSolver(t) => Some(&t.alphas_cumprod),
            Tables::Ddim(t) => Some(&t.alphas_cumprod),
            Tables::Euler(t) => Some(&t.alphas_cumprod),
            Tables::Pndm(t) => Some(&t.alphas_cumprod),
            Tables::FlowMatch(_) => None,
        }
    }

    /// The schedule for `num_inference_steps` steps: diffusers' `set_timesteps`.
    ///
    /// Errors when `num_inference_steps` is 0 or larger than `num_train_timesteps`.
    pub fn set_timesteps(&self, num_inference_steps: usize) -> Result<Schedule, SchedulerError> {
        let (class, max) = (self.class_name(), self.num_train_timesteps());
        if num_inference_steps == 0 || num_inference_steps > max {
            return Err(SchedulerError::InvalidStepCount { class, got: num_inference_steps, max });
        }
        Ok(match (&self.config, &self.tables) {
            (SchedulerConfig::DpmSolverMultistep(c), Tables::DpmSolver(t)) => {
                t.set_timesteps(c, num_inference_steps)
            }
            (SchedulerConfig::Ddim(c), Tables::Ddim(t)) => {
                t.set_timesteps(c, num_inference_steps)?
            }
            (SchedulerConfig::EulerDiscrete(c), Tables::Euler(t)) => {
                t.set_timesteps(c, num_inference_steps)
            }
            (SchedulerConfig::FlowMatchEulerDiscrete(c), Tables::FlowMatch(t)) => {
                t.set_timesteps(c, num_inference_steps)
            }
            (SchedulerConfig::Pndm(c), Tables::Pndm(t)) => {
                t.set_timesteps(c, num_inference_steps)?
            }
            _ => unreachable!("tables are built from the config they sit beside"),
        })
    }

    /// FluxPipeline's schedule: `sigmas = linspace(1, 1/n, n)` and the exponential dynamic shift
    /// by `mu` ([`flux_mu`] of the image's packed tokens), diffusers'
    /// `set_timesteps(sigmas=…, mu=…)`.
    ///
    /// # Errors
    /// `num_inference_steps` 0, or a scheduler that is not flow-matching Euler with
    /// `use_dynamic_shifting` (naming the class / key).
    pub fn set_timesteps_dynamic(
        &self,
        num_inference_steps: usize,
        mu: f64,
    ) -> Result<Schedule, SchedulerError> {
        let (class, max) = (self.class_name(), self.num_train_timesteps());
        if num_inference_steps == 0 || num_inference_steps > max {
            return Err(SchedulerError::InvalidStepCount { class, got: num_inference_steps, max });
        }
        match (&self.config, &self.tables) {
            (SchedulerConfig::FlowMatchEulerDiscrete(c), Tables::FlowMatch(t))
                if c.use_dynamic_shifting =>
            {
                let n = num_inference_steps;
                let sigmas = crate::numerics::np_linspace(1.0, 1.0 / n as f64, n);
                Ok(t.set_timesteps_dynamic(c, &sigmas, mu))
            }
            _ => Err(SchedulerError::Unsupported {
                class,
                key: "use_dynamic_shifting",
                value: "false".into(),
                supported: "true, on a FlowMatchEulerDiscreteScheduler (FLUX's)",
            }),
        }
    }

    /// Whether the schedule's shift depends on the image size (FLUX): then it is made with
    /// [`set_timesteps_dynamic`](Self::set_timesteps_dynamic).
    pub fn uses_dynamic_shifting(&self) -> bool {
        matches!(&self.config, SchedulerConfig::FlowMatchEulerDiscrete(c) if c.use_dynamic_shifting)
    }

    fn num_train_timesteps(&self) -> usize {
        match &self.config {
            SchedulerConfig::DpmSolverMultistep(c) => c.num_train_timesteps,
            SchedulerConfig::Ddim(c) => c.num_train_timesteps,
            SchedulerConfig::EulerDiscrete(c) => c.num_train_timesteps,
            SchedulerConfig::FlowMatchEulerDiscrete(c) => c.num_train_timesteps,
            SchedulerConfig::Pndm(c) => c.num_train_timesteps,
        }
    }
}

/// FluxPipeline's `calculate_shift`: `μ` for an image of `image_seq_len` packed tokens, linear
/// from `base_shift` at `base_image_seq_len` to `max_shift` at `max_image_seq_len` (the
/// scheduler config's; defaults 0.5, 1.15, 256, 4096), in float64.
pub fn flux_mu(config: &SchedulerConfig, image_seq_len: usize) -> f64 {
    let c = match config {
        SchedulerConfig::FlowMatchEulerDiscrete(c) => c.clone(),
        _ => Default::default(),
    };
    let (base, max) = (c.base_shift.unwrap_or(0.5), c.max_shift.unwrap_or(1.15));
    let (lo, hi) = (c.base_image_seq_len as f64, c.max_image_seq_len as f64);
    let m = (max - base) / (hi - lo);
    let b = base - m * lo;
    image_seq_len as f64 * m + b
}

/// The element type diffusers gives `scheduler.timesteps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepDType {
    /// `torch.int64` (DDIM, DPM-Solver, PNDM): every timestep is an integer.
    Int64,
    /// `torch.float32` (Euler, flow matching): timesteps may be fractional.
    Float32,
}

/// One schedule of a [`Scheduler`]: the timesteps and sigmas of a given number of inference
/// steps, and the rule that steps a sample from one to the next.
///
/// A schedule is immutable and holds no per-image state: share it (`&Schedule`) between
/// requests, threads and image regions, and give each of them its own [`SchedulerState`]
/// ([`Schedule::new_state`]).
///
/// ```ignore
/// let schedule = Scheduler::from_file("scheduler/scheduler_config.json")?.set_timesteps(20)?;
/// let mut state = schedule.new_state::<B, 4>();
/// let mut latents = noise.mul_scalar(schedule.init_noise_sigma());
/// for i in 0..schedule.len() {
///     let input = schedule.scale_model_input(latents.clone(), i)?;
///     let eps = model.forward(input, schedule.timestep(i)? as f32);
///     latents = schedule.step(&mut state, i, eps, latents)?;
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Schedule {
    pub(crate) class: &'static str,
    /// Exact values of diffusers' `scheduler.timesteps` (int64 or float32, widened to f64).
    pub(crate) timesteps: Vec<f64>,
    pub(crate) timestep_dtype: TimestepDType,
    /// Diffusers' `scheduler.sigmas` (`len + 1` values), where the scheduler has them.
    pub(crate) sigmas: Option<Vec<f32>>,
    pub(crate) init_noise_sigma: f32,
    pub(crate) rule: StepRule,
}

/// The per-class part of a step.
#[derive(Debug, Clone)]
pub(crate) enum StepRule {
    DpmSolver(DpmSolverStep),
    Ddim(DdimStep),
    Euler(EulerStep),
    FlowMatch(FlowMatchStep),
    Pndm(PndmStep),
}

impl Schedule {
    /// The diffusers class name of the scheduler that made this schedule.
    pub fn class_name(&self) -> &'static str {
        self.class
    }

    /// The number of steps (diffusers' `len(scheduler.timesteps)`): `num_inference_steps` for
    /// most schedulers, more for PNDM (`n + 1` with `skip_prk_steps`, `n + 9` with its
    /// Runge-Kutta warm-up), whose timesteps repeat.
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    /// Whether the schedule has no steps (never, for a schedule from `set_timesteps`).
    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// Diffusers' `scheduler.timesteps`, exactly (int64 or float32 values widened to f64; a
    /// model that embeds timesteps in float32 gets the same float32 as diffusers by `as f32`).
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The timestep of step `step_index` (see [`Schedule::timesteps`]).
    ///
    /// # Errors
    /// [`SchedulerError::StepOutOfRange`] if `step_index >= self.len()`.
    pub fn timestep(&self, step_index: usize) -> Result<f64, SchedulerError> {
        self.check_index(step_index)?;
        Ok(self.timesteps[step_index])
    }

    /// The element type diffusers gives the timesteps.
    pub fn timestep_dtype(&self) -> TimestepDType {
        self.timestep_dtype
    }

    /// The timesteps as integers, where diffusers holds them as `int64` (DDIM, DPM-Solver, PNDM);
    /// `None` for float32 timesteps (Euler, flow matching), even when they happen to be whole.
    pub fn timesteps_i64(&self) -> Option<Vec<i64>> {
        match self.timestep_dtype {
            TimestepDType::Int64 => Some(self.timesteps.iter().map(|&t| t as i64).collect()),
            TimestepDType::Float32 => None,
        }
    }

    /// Diffusers' `scheduler.sigmas` after `set_timesteps`: `len() + 1` float32 values, the last
    /// one the sigma after the final step. `None` for DDIM and PNDM, which have none.
    pub fn sigmas(&self) -> Option<&[f32]> {
        self.sigmas.as_deref()
    }

    /// The standard deviation of the initial noise: multiply unit Gaussian noise by it.
    ///
    /// 1 for DDIM, DPM-Solver and PNDM; for Euler the largest sigma (or `sqrt(σmax² + 1)` with
    /// `"leading"` spacing), computed in float32 as diffusers does; 1 for flow matching, which
    /// has no such attribute in diffusers (its pipelines do not scale the noise).
    pub fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    /// A fresh state for one image (or one region of an image) to be stepped through this
    /// schedule. Keep one per region when regions are stepped separately.
    pub fn new_state<B: Backend, const D: usize>(&self) -> SchedulerState<B, D> {
        SchedulerState {
            schedule_len: self.len(),
            next_step: None,
            model_outputs: Vec::new(),
            lower_order_nums: 0,
            steps_taken: 0,
            cur_sample: None,
            cur_model_output: None,
        }
    }

    /// The denoiser's input at step `step_index`: `sample / sqrt(σ² + 1)` for Euler, the
    /// sample itself for the other schedulers (diffusers' `scale_model_input`).
    ///
    /// It reads no state, so it may be called for any region at any time.
    ///
    /// # Errors
    /// [`SchedulerError::StepOutOfRange`] if `step_index >= self.len()`.
    pub fn scale_model_input<B: Backend, const D: usize>(
        &self,
        sample: Tensor<B, D>,
        step_index: usize,
    ) -> Result<Tensor<B, D>, SchedulerError> {
        self.check_index(step_index)?;
        Ok(match &self.rule {
            StepRule::Euler(_) => {
                let sigma = self.sigma(step_index);
                EulerStep::scale_model_input(sample, sigma)
            }
            StepRule::DpmSolver(_)
            | StepRule::Ddim(_)
            | StepRule::FlowMatch(_)
            | StepRule::Pndm(_) => sample,
        })
    }

    /// One denoising step: from `sample` at step `step_index` and the denoiser's
    /// `model_output` there, the sample at the next timestep (diffusers' `step(...).prev_sample`).
    ///
    /// `state` carries what a multistep solver remembers between steps (DPM-Solver's previous
    /// data predictions, PNDM's previous model outputs, counter and saved sample); it must have
    /// been made by this schedule, and steps must come in order (`step_index` one more than the
    /// last one this state took; the first may be any index, as with diffusers'
    /// `set_begin_index`; PNDM, which has no begin index, counts its steps from the state's
    /// first one, as diffusers' `counter` does when a pipeline starts part-way). Every
    /// operation is elementwise, so stepping the rows of a region with its own state gives
    /// exactly those rows of the whole-image step.
    ///
    /// # Errors
    /// [`SchedulerError::StepOutOfRange`] if `step_index >= self.len()`;
    /// [`SchedulerError::State`] if the state comes from a schedule of another length or has
    /// already stepped and `step_index` is not the next index; [`SchedulerError::Shape`] if
    /// `model_output`, `sample` and the state's history differ in shape. Nothing is changed
    /// on error.
    pub fn step<B: Backend, const D: usize>(
        &self,
        state: &mut SchedulerState<B, D>,
        step_index: usize,
        model_output: Tensor<B, D>,
        sample: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, SchedulerError> {
        self.check_index(step_index)?;
        let class = self.class;
        if state.schedule_len != self.len() {
            return Err(SchedulerError::State {
                class,
                reason: format!(
                    "the state was made by a schedule of {} steps, this one has {}",
                    state.schedule_len,
                    self.len()
                ),
            });
        }
        if let Some(next) = state.next_step
            && step_index != next
        {
            return Err(SchedulerError::State {
                class,
                reason: format!(
                    "this state expects step {next} but was given step {step_index}; states \
                     step in order, keep one state per image region"
                ),
            });
        }
        let shape = sample.dims().to_vec();
        let history = state
            .model_outputs
            .iter()
            .chain(&state.cur_sample)
            .chain(&state.cur_model_output)
            .map(|t| ("the state's history", t.dims()));
        for (what, got) in std::iter::once(("model_output", model_output.dims())).chain(history) {
            if got[..] != shape[..] {
                return Err(SchedulerError::Shape {
                    class,
                    what,
                    got: got.to_vec(),
                    sample: shape,
                });
            }
        }
        let prev = match &self.rule {
            StepRule::DpmSolver(rule) => {
                let sigmas = self.sigmas.as_deref().expect("a DPM-Solver schedule has sigmas");
                rule.step(sigmas, state, step_index, model_output, sample)
            }
            StepRule::Ddim(rule) => rule.step(step_index, model_output, sample),
            StepRule::Euler(rule) => {
                rule.step(self.sigma(step_index), self.sigma(step_index + 1), model_output, sample)
            }
            StepRule::FlowMatch(rule) => {
                rule.step(self.sigma(step_index), self.sigma(step_index + 1), model_output, sample)
            }
            StepRule::Pndm(rule) => rule.step(state, step_index, model_output, sample)?,
        };
        state.next_step = Some(step_index + 1);
        state.steps_taken += 1;
        Ok(prev)
    }

    fn sigma(&self, index: usize) -> f32 {
        self.sigmas.as_ref().expect("this scheduler has sigmas")[index]
    }

    fn check_index(&self, step_index: usize) -> Result<(), SchedulerError> {
        if step_index < self.len() {
            Ok(())
        } else {
            Err(SchedulerError::StepOutOfRange {
                class: self.class,
                step: step_index,
                len: self.len(),
            })
        }
    }
}

/// What one image, or one region of an image, carries from step to step: the index of the next
/// step, how many steps it has taken and, for DPM-Solver, its previous data predictions
/// (`model_outputs`) and how many lower-order warm-up steps it has taken (`lower_order_nums`);
/// for PNDM, its previous model outputs (diffusers' `ets`), the sample it restarts from
/// (`cur_sample`) and its running Runge-Kutta sum (`cur_model_output`).
///
/// Made by [`Schedule::new_state`]. PipeFusion steps each patch on its last stage with the
/// patch's own state; cloning a state forks the history.
#[derive(Debug, Clone)]
pub struct SchedulerState<B: Backend, const D: usize = 4> {
    pub(crate) schedule_len: usize,
    pub(crate) next_step: Option<usize>,
    /// DPM-Solver: previous data predictions, oldest first, at most `solver_order` of them.
    /// PNDM: diffusers' `ets`, previous model outputs, oldest first, at most 4.
    pub(crate) model_outputs: Vec<Tensor<B, D>>,
    pub(crate) lower_order_nums: usize,
    /// Steps taken since the state was made or reset: PNDM's `counter`.
    pub(crate) steps_taken: usize,
    /// PNDM's `cur_sample`: the sample a Runge-Kutta group, or PLMS's second step, starts from.
    pub(crate) cur_sample: Option<Tensor<B, D>>,
    /// PNDM's `cur_model_output`: the Runge-Kutta weighted sum so far (`None` is diffusers' 0).
    pub(crate) cur_model_output: Option<Tensor<B, D>>,
}

impl<B: Backend, const D: usize> SchedulerState<B, D> {
    /// The step index this state expects next; `None` before its first step.
    pub fn next_step_index(&self) -> Option<usize> {
        self.next_step
    }

    /// DPM-Solver's `lower_order_nums`: how many steps have filled the history (capped at the
    /// solver order). 0 for the single-step schedulers.
    pub fn lower_order_nums(&self) -> usize {
        self.lower_order_nums
    }

    /// How many steps this state has taken since it was made or reset (diffusers' `counter`
    /// for PNDM, whose step rule follows it).
    pub fn steps_taken(&self) -> usize {
        self.steps_taken
    }

    /// How many previous model outputs the state holds: DPM-Solver's data predictions, PNDM's
    /// `ets`; 0 for the single-step schedulers.
    pub fn history_len(&self) -> usize {
        self.model_outputs.len()
    }

    /// The state of a region of this state's sample: every history tensor narrowed to
    /// `range` along `dim` (counters kept). Stepping the regions' states on the regions'
    /// rows equals stepping this state on the whole sample — what a pipeline needs when it
    /// moves from whole-latent steps to per-patch steps (PipeFusion after its warmup).
    pub fn narrow(&self, dim: usize, range: std::ops::Range<usize>) -> Self {
        let narrow_opt = |t: &Option<Tensor<B, D>>| {
            t.as_ref().map(|t| t.clone().narrow(dim, range.start, range.len()))
        };
        SchedulerState {
            schedule_len: self.schedule_len,
            next_step: self.next_step,
            model_outputs: self
                .model_outputs
                .iter()
                .map(|t| t.clone().narrow(dim, range.start, range.len()))
                .collect(),
            lower_order_nums: self.lower_order_nums,
            steps_taken: self.steps_taken,
            cur_sample: narrow_opt(&self.cur_sample),
            cur_model_output: narrow_opt(&self.cur_model_output),
        }
    }

    /// Forgets everything, as at the start of a new request.
    pub fn reset(&mut self) {
        self.next_step = None;
        self.model_outputs.clear();
        self.lower_order_nums = 0;
        self.steps_taken = 0;
        self.cur_sample = None;
        self.cur_model_output = None;
    }
}

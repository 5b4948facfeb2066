//! Diffusion schedulers that equal diffusers' (0.42) for the same config, configured from a
//! `scheduler_config.json`, generic over the Burn backend:
//!
//! | `_class_name` | config | notes |
//! |---|---|---|
//! | `DPMSolverMultistepScheduler` | [`DpmSolverMultistepConfig`] | DPM-Solver++, order 1 or 2 (PixArt's default) |
//! | `DDIMScheduler` | [`DdimConfig`] | deterministic (`eta = 0`) |
//! | `EulerDiscreteScheduler` | [`EulerDiscreteConfig`] | without churn |
//! | `FlowMatchEulerDiscreteScheduler` | [`FlowMatchEulerDiscreteConfig`] | static shift (SD3) |
//! | `PNDMScheduler` | [`PndmConfig`] | PLMS, with or without the Runge-Kutta warm-up (Stable Diffusion 1.5's default) |
//!
//! # Shape
//!
//! Three values, one per lifetime:
//!
//! - [`Scheduler`]: a validated [`SchedulerConfig`] and the training tables (`alphas_cumprod`,
//!   training sigmas). One per model.
//! - [`Schedule`]: what diffusers' `set_timesteps(n)` sets — the timesteps (exactly diffusers'
//!   values), the sigmas, `init_noise_sigma` — and the step rule. Immutable; share it.
//! - [`SchedulerState`]: what one image, or one region of an image, carries between steps
//!   (DPM-Solver's previous data predictions and `lower_order_nums`; PNDM's previous model
//!   outputs `ets`, `counter` and saved sample; the next step index). Made by
//!   [`Schedule::new_state`], once per request or per region.
//!
//! diffusers keeps the multistep history inside the scheduler object; here it is an explicit
//! value so that PipeFusion, which steps every patch separately on its last stage, keeps one
//! state per patch. Every step is elementwise, so stepping the rows of a region with its own
//! state gives bit for bit the rows of the whole-image step (tested).
//!
//! ```ignore
//! use schedulers::Scheduler;
//! let schedule = Scheduler::from_file("pixart/scheduler/scheduler_config.json")?
//!     .set_timesteps(20)?;
//! let mut state = schedule.new_state::<B, 4>();
//! let mut latents = noise.mul_scalar(schedule.init_noise_sigma());
//! for i in 0..schedule.len() {
//!     let input = schedule.scale_model_input(latents.clone(), i);
//!     let eps = transformer.forward(input, schedule.timestep(i) as f32 /* … */);
//!     latents = schedule.step(&mut state, i, eps, latents);
//! }
//! ```
//!
//! # Equal to diffusers
//!
//! Timesteps are exactly diffusers' (PNDM's repeated ones included) and each step's output
//! agrees to float32 rounding: the tables and per-step scalars are computed on the host in the
//! precision diffusers uses for each (numpy float64 for timestep layout and `np.interp`, numpy
//! int64 for DDIM's and PNDM's integer timesteps; torch float32 for betas, `alphas_cumprod`,
//! sigmas and every step coefficient), in the same order, and the tensor operations are applied
//! in diffusers' order. Two torch details matter for bit equality of the tables:
//! `torch.linspace` in float32 fills each half with one fused rounding from its own end, and
//! `torch.cumprod` on CPU accumulates in float64. `tests/integration/diffusers_parity.rs` checks all of it
//! against reference files made by diffusers; `tests/integration/variants.rs` covers the options those
//! files do not, and `tests/integration/pndm.rs` covers PNDM.
//!
//! # Configs
//!
//! [`SchedulerConfig::from_json`] picks the class by `_class_name`, ignores keys the class does
//! not know (as diffusers does), reads every key it does know, and refuses values this crate
//! does not implement (Karras sigmas, thresholding, SDE variants, …) with an error naming the
//! key. Python's bare `Infinity`, `-Infinity` and `NaN` (DPM-Solver writes
//! `"lambda_min_clipped": -Infinity`) are accepted.
//!
//! Not implemented (refused by the config check): stochastic variants (`eta > 0`, SDE
//! DPM-Solver, churn, stochastic flow sampling), third-order DPM-Solver, Karras / exponential /
//! beta / Lu sigmas, thresholding, zero-terminal-SNR rescaling, linear dynamic flow shifting
//! (FLUX's exponential one is implemented); and `add_noise` (img2img).

mod config;
mod error;
mod numerics;
mod schedule;
pub mod scheduling_ddim;
pub mod scheduling_dpmsolver_multistep;
pub mod scheduling_euler_discrete;
pub mod scheduling_flow_match_euler_discrete;
pub mod scheduling_pndm;

pub use config::{BetaSchedule, FinalSigmasType, PredictionType, SchedulerConfig, TimestepSpacing};
pub use error::SchedulerError;
pub use schedule::{Schedule, Scheduler, SchedulerState, TimestepDType, flux_mu};
pub use scheduling_ddim::DdimConfig;
pub use scheduling_dpmsolver_multistep::DpmSolverMultistepConfig;
pub use scheduling_euler_discrete::EulerDiscreteConfig;
pub use scheduling_flow_match_euler_discrete::FlowMatchEulerDiscreteConfig;
pub use scheduling_pndm::PndmConfig;

//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while reading a `scheduler_config.json` or building a schedule.
///
/// Every variant that concerns one config key names it, and the scheduler class it belongs to.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The config file could not be read.
    #[error("cannot read scheduler config `{path}`: {source}")]
    Io {
        /// The file that was asked for.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The text is not JSON (even after accepting Python's `Infinity`, `-Infinity` and `NaN`),
    /// or its top level is not an object.
    #[error("scheduler config is not a JSON object: {message}")]
    Json {
        /// What the JSON parser said.
        message: String,
    },
    /// The config has no string `_class_name`, so the scheduler cannot be chosen.
    #[error("scheduler config has no `_class_name` string; known classes: {known}")]
    MissingClassName {
        /// The classes this crate implements, comma-separated.
        known: String,
    },
    /// `_class_name` names a scheduler this crate does not implement.
    #[error("unknown scheduler class `{class}`; known classes: {known}")]
    UnknownClass {
        /// The `_class_name` found.
        class: String,
        /// The classes this crate implements, comma-separated.
        known: String,
    },
    /// A key has a value of the wrong type or a value diffusers does not know either.
    #[error("{class}: invalid value for `{key}`: {message}")]
    InvalidValue {
        /// The diffusers class of the config.
        class: &'static str,
        /// The config key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A key has a value diffusers accepts but this crate does not implement.
    #[error("{class}: `{key}` = {value} is not supported (supported: {supported})")]
    Unsupported {
        /// The diffusers class of the config.
        class: &'static str,
        /// The config key.
        key: &'static str,
        /// The value found, as JSON would spell it.
        value: String,
        /// What this crate accepts for the key.
        supported: &'static str,
    },
    /// `set_timesteps` was asked for a number of steps the schedule cannot have.
    #[error("{class}: num_inference_steps must be in 1..={max}, got {got}")]
    InvalidStepCount {
        /// The diffusers class of the config.
        class: &'static str,
        /// The number asked for.
        got: usize,
        /// The largest number accepted (`num_train_timesteps`).
        max: usize,
    },
    /// A step index past the end of the schedule.
    #[error("{class}: step index {step} is out of range for a schedule of {len} steps")]
    StepOutOfRange {
        /// The diffusers class of the schedule.
        class: &'static str,
        /// The index asked for.
        step: usize,
        /// The number of steps of the schedule.
        len: usize,
    },
    /// A state used out of order or with another schedule.
    #[error("{class}: {reason}")]
    State {
        /// The diffusers class of the schedule.
        class: &'static str,
        /// What is wrong, and what to do instead.
        reason: String,
    },
    /// `model_output`, `sample` and the state's history differ in shape.
    #[error("{class}: {what} has shape {got:?}, the sample has {sample:?}")]
    Shape {
        /// The diffusers class of the schedule.
        class: &'static str,
        /// Which tensor.
        what: &'static str,
        /// Its shape.
        got: Vec<usize>,
        /// The sample's shape.
        sample: Vec<usize>,
    },
}

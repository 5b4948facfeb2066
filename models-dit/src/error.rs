//! Typed errors of configuration, loading and inputs.

use std::path::PathBuf;

use parallel_core::ParallelError;
use weights::WeightError;

/// An error of the DiT model crate.
#[derive(Debug, thiserror::Error)]
pub enum DitError {
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `config.json` is malformed or has a value this crate cannot run.
    #[error("config {location}: {reason}")]
    Config {
        /// The file (or `preset <name>`).
        location: String,
        /// What is wrong (naming the key).
        reason: String,
    },
    /// `config.json` names a class this crate does not implement.
    #[error(
        "config {location}: unsupported `_class_name` `{name}`; this crate implements {}",
        known.join(", ")
    )]
    UnknownClass {
        /// The file.
        location: String,
        /// The class named.
        name: String,
        /// The classes this crate implements.
        known: Vec<String>,
    },
    /// No preset of this name.
    #[error("unknown preset `{name}`; known presets: {}", known.join(", "))]
    UnknownPreset {
        /// The name asked for.
        name: String,
        /// The known presets.
        known: Vec<String>,
    },
    /// Loading the weights failed.
    #[error(transparent)]
    Weights(#[from] WeightError),
    /// The load plan cannot be honoured for this model.
    #[error("load plan for {class}: {reason}")]
    Plan {
        /// The model class.
        class: String,
        /// What is wrong and what to change.
        reason: String,
    },
    /// The inputs of a forward do not fit the model.
    #[error("{class} input: {reason}")]
    Input {
        /// The model class.
        class: String,
        /// What is wrong.
        reason: String,
    },
}

impl From<DitError> for ParallelError {
    fn from(e: DitError) -> Self {
        ParallelError::Model(e.to_string())
    }
}

/// Result alias of this crate.
pub type Result<T, E = DitError> = std::result::Result<T, E>;

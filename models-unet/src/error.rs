//! Typed errors of configuration, loading and inputs.

use std::path::PathBuf;

use parallel_core::ParallelError;
use weights::WeightError;

/// An error of the U-Net crate.
#[derive(Debug, thiserror::Error)]
pub enum UnetError {
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `config.json` is malformed or has a value this crate does not implement.
    #[error("config {location}: {reason}")]
    Config {
        /// The file (or `preset <name>`).
        location: String,
        /// What is wrong, naming the key.
        reason: String,
    },
    /// No preset of this name.
    #[error("unknown U-Net preset `{name}`; known presets: {}", known.join(", "))]
    UnknownPreset {
        /// The name asked for.
        name: String,
        /// The known presets.
        known: Vec<String>,
    },
    /// Loading the weights failed.
    #[error(transparent)]
    Weights(#[from] WeightError),
    /// The load plan cannot be honoured for a U-Net.
    #[error("load plan for UNet2DConditionModel: {0}")]
    Plan(String),
    /// The inputs of a forward do not fit the model.
    #[error("UNet2DConditionModel input: {0}")]
    Input(String),
}

impl From<UnetError> for ParallelError {
    fn from(e: UnetError) -> Self {
        ParallelError::Model(e.to_string())
    }
}

/// Result alias of this crate.
pub type Result<T, E = UnetError> = std::result::Result<T, E>;

//! The harness's one error type: its own configuration and file errors, and each composed
//! crate's error passed through unchanged (their messages already name the key, file,
//! tensor or degree at fault).

use std::path::PathBuf;

use parallel_core::{CommError, ParallelError};

/// Everything `harness run`, `forward` and `list` can fail with.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A setting is wrong: `location` is the config file, the key or the flag, `reason`
    /// says what is wrong and what to change.
    #[error("{location}: {reason}")]
    Config {
        /// The file, key or flag at fault (`configs/demo.toml`, `height`, `--latents`).
        location: String,
        /// What is wrong.
        reason: String,
    },
    /// A file or folder could not be read or written.
    #[error("{}: {reason}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A strategy, the communicator or a model seam failed.
    #[error(transparent)]
    Parallel(#[from] ParallelError),
    /// The transformer's config or weights.
    #[error(transparent)]
    Model(#[from] models_dit::DitError),
    /// The U-Net's config or weights.
    #[error(transparent)]
    Unet(#[from] models_unet::UnetError),
    /// The tokenizer or the text encoder.
    #[error(transparent)]
    Text(#[from] models_text::TextError),
    /// The VAE or the PNG output.
    #[error(transparent)]
    Vae(#[from] models_vae::VaeError),
    /// The scheduler config.
    #[error(transparent)]
    Scheduler(#[from] schedulers::SchedulerError),
    /// A tensor file (`--latents`, `forward --inputs`, `--save-latents`).
    #[error(transparent)]
    Weights(#[from] weights::WeightError),
    /// `harness launch`: a rank failed (its exit or signal and its error message); the
    /// launcher stopped the others.
    #[error("{reason}")]
    Launch {
        /// Which rank, how it ended, what it said.
        reason: String,
    },
    /// Not a failure: this process held a rank other than 0 of a multi-process world, and
    /// its work is done; rank 0's process writes the outputs and reports the run (the
    /// binary exits 0 on it, printing nothing).
    #[error("rank {rank} finished; rank 0's process reports the run")]
    WorkerDone {
        /// This process's rank.
        rank: usize,
    },
    /// `harness eval`: the Inception weights, a statistics file, an image or image folder.
    #[error(transparent)]
    Quality(#[from] quality::QualityError),
}

impl HarnessError {
    /// Whether this error only reports that *another* rank failed or left (so the other
    /// rank's error is the one to show).
    pub fn is_secondary(&self) -> bool {
        matches!(
            self,
            HarnessError::Parallel(ParallelError::Comm(
                CommError::PeerFailed { .. } | CommError::PeerLeft { .. }
            ))
        )
    }

    /// A [`HarnessError::Config`].
    pub fn config(location: impl Into<String>, reason: impl Into<String>) -> Self {
        HarnessError::Config { location: location.into(), reason: reason.into() }
    }

    /// A [`HarnessError::Io`].
    pub fn io(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        HarnessError::Io { path: path.into(), reason: reason.to_string() }
    }
}

impl From<CommError> for HarnessError {
    fn from(e: CommError) -> Self {
        HarnessError::Parallel(e.into())
    }
}

/// The error for `backend = "cuda"` in a binary built without the `cuda` feature.
pub fn no_cuda() -> HarnessError {
    HarnessError::config(
        "parallel.backend",
        "`cuda` needs a harness built with the `cuda` feature \
         (cargo build --release -p harness --features cuda)",
    )
}

/// Result alias of the harness.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

//! # quality: FID as pytorch-fid defines it
//!
//! The measure the toolkit's quality experiments report beside PSNR and SSIM
//! ([`metrics::image`]): the Fréchet Inception Distance between two image sets, computed the
//! way [pytorch-fid](https://github.com/mseitzer/pytorch-fid) 0.3 does, so that numbers are
//! comparable with published ones and with precomputed reference statistics:
//!
//! - [`FidInception`]: pytorch-fid's InceptionV3 (the 2015 TensorFlow weights as it ports
//!   them), pool3 features, 2048 per image; input resized and normalised as pytorch-fid does.
//! - [`Stats`]: mean and covariance of the features (`mu`, `sigma`, `f64`), read from and
//!   written to pytorch-fid's `.npz` files ([`npz`]).
//! - [`frechet_distance`]: `‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½)` in `f64` by symmetric
//!   eigen-decompositions (nalgebra).
//!
//! [`lpips::Lpips`] is LPIPS (AlexNet) as the `lpips` package computes it, for `harness eval
//! compare --lpips`.
//!
//! [`shapes`] is the demo pipeline's own measure: does an image show the coloured shape its
//! caption names.
//!
//! Checked against pytorch-fid itself (`tests/reference.rs`, fixtures by
//! `tools/fixtures/quality.py`): features on the same weights, distances on stored feature
//! sets, `.npz` files numpy wrote.
//!
//! ```
//! use quality::{Stats, frechet_distance};
//! let a = Stats::from_features(&[0.0f32, 1.0, 2.0, 3.0], 1).unwrap();
//! let b = Stats::from_features(&[1.0f32, 2.0, 3.0, 4.0], 1).unwrap();
//! // Same spread, means 1 apart: d² = 1.
//! assert!((frechet_distance(&a, &b).unwrap() - 1.0).abs() < 1e-12);
//! ```

use std::path::PathBuf;

pub mod frechet;
pub mod images;
pub mod inception;
pub mod lpips;
pub mod npz;
pub mod shapes;

pub use frechet::{Stats, frechet_distance};
pub use images::{image_files, load_rgb8, stats_of_files};
pub use inception::{FEATURES, FidInception, ParamSource, PatternWeights};
pub use lpips::Lpips;

/// What went wrong, naming the file or input at fault.
#[derive(Debug, thiserror::Error)]
pub enum QualityError {
    /// The Inception weights file.
    #[error("Inception weights {path}: {reason}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A statistics file.
    #[error("statistics file {path}: {reason}")]
    Npz {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An image or image folder.
    #[error("{path}: {reason}")]
    Image {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Bad input values or shapes.
    #[error("{0}")]
    Input(String),
}

/// This crate's results.
pub type Result<T> = std::result::Result<T, QualityError>;

//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while configuring, loading or running the VAE, or writing its
/// images. Each variant names what it is about: the file, the config key, the weight key or the
/// tensor shape.
#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },

    /// `config.json` is not valid JSON, has a value of the wrong type, or has a key this crate
    /// does not know (serde's message names the key).
    #[error("invalid VAE config {}: {message}", path.display())]
    Config {
        /// The config file (or `<string>` when parsed from a string).
        path: PathBuf,
        /// serde's message, which names the offending key.
        message: String,
    },

    /// The config asks for something this implementation does not compute.
    #[error("unsupported VAE config `{key}`: {message}")]
    Unsupported {
        /// The config key.
        key: &'static str,
        /// What was found and what is supported.
        message: String,
    },

    /// Loading the weights failed: no or corrupt file, missing or unused key (named), wrong
    /// shape (key and both shapes named), unsupported dtype.
    #[error("loading VAE weights: {0}")]
    Weights(#[from] weights::WeightError),

    /// A patch-parallel decode's exchange with the other ranks failed (a timeout, a peer
    /// gone), in parallel-core's words.
    #[error("patch-parallel decode: {0}")]
    Seam(String),

    /// A tensor handed to the model has the wrong shape.
    #[error("{what}: expected shape {expected}, got {got:?}")]
    Shape {
        /// Which input (for example `decode: latents`).
        what: &'static str,
        /// The expected shape, in words (for example `[batch, 4, height, width]`).
        expected: String,
        /// The shape that was given.
        got: Vec<usize>,
    },

    /// [`encode`](crate::AutoencoderKL::encode) was called on a VAE built without its encoder.
    #[error("this VAE was built without its encoder: load it with VaeParts::EncoderAndDecoder")]
    NoEncoder,

    /// The decoded sample holds a NaN or an infinity (broken VAE weights, or an overflow in
    /// half precision): no image is made of it.
    #[error(
        "the decoded image holds a non-finite value ({value} at flat index {index}); the VAE's weights or its input are broken"
    )]
    NonFinite {
        /// The first such value.
        value: f32,
        /// Its flat index in `[batch, 3, height, width]` (channels-last order).
        index: usize,
    },

    /// An image could not be written.
    #[error("cannot write image {}: {source}", path.display())]
    WriteImage {
        /// The file.
        path: PathBuf,
        /// The `image` crate's reason.
        source: image::ImageError,
    },
}

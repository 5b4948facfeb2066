//! Typed errors of weight loading: each names the key, the file or folder, and what was
//! expected, so that a user can see which checkpoint is wrong and how.

use std::path::PathBuf;

/// An error raised while opening a weights folder or taking a tensor from it.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The folder has no safetensors weights under the expected names.
    #[error(
        "no weights in {folder}: looked for {file_name} and {file_name}.index.json{}",
        if found.is_empty() { String::new() } else { format!(" (the folder holds: {})", found.join(", ")) }
    )]
    NotFound {
        /// The folder.
        folder: PathBuf,
        /// The single-file name asked for (e.g. `diffusion_pytorch_model.safetensors`).
        file_name: String,
        /// A few file names that are there, to help spot a typo.
        found: Vec<String>,
    },
    /// Only pickle (`.bin`, `.pt`, `.ckpt`) checkpoints are present: they are refused, because
    /// unpickling runs arbitrary code.
    #[error(
        "{folder} holds only pickle checkpoints ({}); pickle files can run arbitrary code and \
         are not loaded. Convert them to safetensors (e.g. `save_pretrained(dir, \
         safe_serialization=True)` in diffusers)",
        files.join(", ")
    )]
    PickleRefused {
        /// The folder.
        folder: PathBuf,
        /// The pickle files found.
        files: Vec<String>,
    },
    /// A safetensors file is truncated or its header is malformed.
    #[error("{path} is not a valid safetensors file (truncated or corrupt?): {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser found.
        reason: String,
    },
    /// A sharded checkpoint's index file is malformed or points at something absent.
    #[error("bad shard index {path}: {reason}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The same key is stored in two files of a sharded checkpoint.
    #[error("key `{key}` is stored twice: in {first} and in {second}")]
    DuplicateKey {
        /// The key.
        key: String,
        /// The first file holding it.
        first: PathBuf,
        /// The second file holding it.
        second: PathBuf,
    },
    /// A key the model needs is not in the checkpoint.
    #[error("missing weight `{key}` in {location}")]
    MissingKey {
        /// The key.
        key: String,
        /// The file or folder searched.
        location: PathBuf,
    },
    /// A tensor's stored shape differs from the one the model expects.
    #[error("weight `{key}` in {file}: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// The key.
        key: String,
        /// The file it is stored in.
        file: PathBuf,
        /// The shape the model expects.
        expected: Vec<usize>,
        /// The shape stored.
        found: Vec<usize>,
    },
    /// A tensor's dtype cannot be converted to a float compute dtype.
    #[error("weight `{key}` in {file} has dtype {dtype}; supported: F32, F16, BF16")]
    Dtype {
        /// The key.
        key: String,
        /// The file it is stored in.
        file: PathBuf,
        /// The stored dtype, as safetensors names it.
        dtype: String,
    },
    /// A shard was asked for that does not divide the tensor evenly (or an invalid dim/rank).
    #[error(
        "cannot take shard {rank}/{world} of dim {dim} of weight `{key}` (shape {shape:?}): {reason}"
    )]
    Shard {
        /// The key.
        key: String,
        /// Its full shape.
        shape: Vec<usize>,
        /// The split dim.
        dim: usize,
        /// The rank asked for.
        rank: usize,
        /// The number of parts.
        world: usize,
        /// What is wrong.
        reason: String,
    },
    /// A tensor file holds a tensor of a name the reader does not know (a typo would
    /// otherwise be silently ignored).
    #[error("{file}: unknown tensor `{name}`; known names: {known}")]
    UnknownInput {
        /// The tensor's name.
        name: String,
        /// The file.
        file: PathBuf,
        /// The names the reader takes.
        known: String,
    },
    /// A tensor of a known name whose values the reader cannot take (FLUX ids of another
    /// layout than the pipeline's, tokens that do not match them).
    #[error("{file}: tensor `{name}`: {reason}")]
    BadInput {
        /// The tensor's name.
        name: String,
        /// The file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Keys in the checkpoint that nothing took: usually a checkpoint of another model, or a
    /// config that does not match its weights.
    #[error(
        "{} unused weight(s) in {location} (checkpoint and config do not match?): {}",
        keys.len(),
        keys.join(", ")
    )]
    Unused {
        /// The keys never taken (nor skipped).
        keys: Vec<String>,
        /// The file or folder.
        location: PathBuf,
    },
}

/// Result alias of this crate.
pub type Result<T, E = WeightError> = std::result::Result<T, E>;

//! # weights
//!
//! Loads the weights of a diffusers/transformers model folder into Burn tensors. It knows
//! nothing about any model: a model crate asks for tensors by key and shape.
//!
//! - A folder holds one `*.safetensors` file (its name given by the caller, e.g.
//!   `diffusion_pytorch_model.safetensors`) or a sharded set listed by
//!   `*.safetensors.index.json`. Pickle checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`) are
//!   refused with [`WeightError::PickleRefused`]: unpickling runs arbitrary code.
//! - [`WeightStore::take`] hands out a tensor in the compute dtype, converting `F32`, `F16`
//!   and `BF16` on disk, after checking its shape ([`WeightError::Shape`] names the key and
//!   both shapes). [`WeightStore::take_sharded`] hands out one rank's part of a tensor split
//!   along a dim ([`Part`]), reading only that part.
//! - Every key is accounted for: [`WeightStore::finish`] fails naming every stored key that
//!   was neither taken nor deliberately [skipped](WeightStore::skip) (a block held by another
//!   pipeline stage), and taking an absent key fails naming it and the folder.
//! - A truncated or corrupt file is an error naming the file ([`WeightError::Corrupt`]),
//!   never a panic: the header is validated against the file length at open.
//!
//! ```no_run
//! # use burn::tensor::{backend::Backend, Tensor};
//! # fn load<B: Backend>(device: &B::Device) -> Result<(), weights::WeightError> {
//! use weights::Part;
//! let mut store = weights::WeightStore::open("transformer", "diffusion_pytorch_model.safetensors")?;
//! // PyTorch Linear weights are [out, in]; a column-parallel rank takes its rows.
//! let q: Tensor<B, 2> = store.take_sharded(
//!     "transformer_blocks.0.attn1.to_q.weight", [1152, 1152], 0, Part { index: 1, of: 2 }, device)?;
//! store.skip_prefix("transformer_blocks.1.");
//! store.finish()?; // names every key nobody took
//! # Ok(()) }
//! ```
//!
//! # Why not burn-store
//!
//! Burn's `burn-store` (`SafetensorsStore` with its PyTorch adapter) loads a whole record into
//! a module by regex key remapping. It is the right tool for a replicated model, but two
//! things this toolkit needs are outside its shape:
//!
//! 1. **Slice on load.** Under tensor parallelism a rank holds `1/N` of each column- or
//!    row-parallel weight. burn-store materialises every tensor whole before a module sees
//!    it, so every rank would read (and briefly hold) the full checkpoint. Here a rank maps
//!    the file and converts only its slice: `outer` contiguous runs of the split dim's range.
//! 2. **Total key accounting with a plan.** A pipeline stage loads blocks `[a, b)` only; the
//!    keys of the other blocks are *skipped*, not unused, while a key that nothing asked for
//!    is still an error naming it. burn-store reports unused keys per apply, without the
//!    notion of keys left out on purpose by the plan.
//!
//! The safetensors crate parses and validates the header; this crate does the rest in a few
//! hundred lines. The one `unsafe` is the memory map (see the crate's `Cargo.toml` lints).

mod error;
mod file;
mod store;

pub mod tensors;

pub use error::{Result, WeightError};
pub use store::{Part, TensorMeta, WeightStore};
pub use tensors::{HostTensor, read_tensors, write_tensors};

//! Files of diffusers forward arguments: a safetensors file of tensors named like the
//! model's `forward` arguments (`hidden_states`, `timestep`, `encoder_hidden_states`,
//! `encoder_attention_mask`, `class_labels`, `resolution`, `aspect_ratio`) read into a
//! [`DenoiserInput`], with the reference output `sample` when the file has one. `harness
//! forward` reads them, and so does the conformance suite (the fixtures' cases).

use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use parallel_core::DenoiserInput;
use weights::{Result, WeightError, read_tensors};

/// The diffusers forward-argument names [`read_denoiser_input`] understands.
pub const INPUT_NAMES: [&str; 7] = [
    "hidden_states",
    "timestep",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "class_labels",
    "resolution",
    "aspect_ratio",
];

/// Reads a file of diffusers forward arguments into a [`DenoiserInput`].
///
/// `hidden_states` and `timestep` are required; the others are optional. A tensor of another
/// name is an error (a typo would otherwise be silently ignored), except `sample`, the
/// expected output of a reference case, which is returned alongside.
pub fn read_denoiser_input<B: Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<(DenoiserInput<B>, Option<Tensor<B, 4>>)> {
    let tensors = read_tensors(path)?;
    if let Some(unknown) =
        tensors.keys().find(|k| !INPUT_NAMES.contains(&k.as_str()) && k.as_str() != "sample")
    {
        return Err(WeightError::UnknownInput {
            name: unknown.clone(),
            file: path.to_path_buf(),
            known: INPUT_NAMES.join(", "),
        });
    }
    let need = |name: &str| {
        tensors.get(name).ok_or_else(|| WeightError::MissingKey {
            key: name.to_string(),
            location: path.to_path_buf(),
        })
    };
    let mut input = DenoiserInput::new(
        need("hidden_states")?.to_float("hidden_states", path, device)?,
        need("timestep")?.to_float("timestep", path, device)?,
    );
    if let Some(t) = tensors.get("encoder_hidden_states") {
        input.encoder_hidden_states = Some(t.to_float("encoder_hidden_states", path, device)?);
    }
    if let Some(t) = tensors.get("encoder_attention_mask") {
        input.encoder_attention_mask = Some(t.to_float("encoder_attention_mask", path, device)?);
    }
    if let Some(t) = tensors.get("class_labels") {
        input.class_labels = Some(t.to_int("class_labels", path, device)?);
    }
    for name in ["resolution", "aspect_ratio"] {
        if let Some(t) = tensors.get(name) {
            input.added_cond.insert(name.to_string(), t.to_float(name, path, device)?);
        }
    }
    let sample = tensors.get("sample").map(|t| t.to_float("sample", path, device)).transpose()?;
    Ok((input, sample))
}

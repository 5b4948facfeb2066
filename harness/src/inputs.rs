//! Files of diffusers forward arguments: a safetensors file of tensors named like the
//! model's `forward` arguments read into a [`DenoiserInput`], with the reference output when
//! the file has one. `harness forward` reads them, and so does the conformance suite (the
//! fixtures' cases).
//!
//! | family | inputs | reference output |
//! |---|---|---|
//! | DiT (`PixArtTransformer2DModel.forward`, `DiTTransformer2DModel.forward`) | `hidden_states`, `timestep`, `encoder_hidden_states`, `encoder_attention_mask`, `class_labels`, `resolution`, `aspect_ratio` | `sample` |
//! | MMDiT (`SD3Transformer2DModel.forward`) | `hidden_states`, `timestep`, `encoder_hidden_states`, `pooled_projections` | `sample` |
//! | U-Net (`UNet2DConditionModel.forward`) | `sample`, `timestep`, `encoder_hidden_states`, `encoder_attention_mask`, `text_embeds`, `time_ids` (SDXL) | `out` |

use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use parallel_core::{DenoiserInput, ModelFamily};
use weights::{Result, WeightError, read_tensors};

/// The DiT forward-argument names [`read_denoiser_input`] understands.
pub const INPUT_NAMES: [&str; 7] = [
    "hidden_states",
    "timestep",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "class_labels",
    "resolution",
    "aspect_ratio",
];

/// The U-Net forward-argument names [`read_denoiser_input`] understands.
pub const UNET_INPUT_NAMES: [&str; 6] = [
    "sample",
    "timestep",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "text_embeds",
    "time_ids",
];

/// The MMDiT forward-argument names [`read_denoiser_input`] understands.
pub const MMDIT_INPUT_NAMES: [&str; 4] =
    ["hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"];

/// Reads a file of diffusers forward arguments of a `family` model into a [`DenoiserInput`].
///
/// The latents (`hidden_states` / `sample`) and `timestep` are required; the others are
/// optional. A tensor of another name is an error (a typo would otherwise be silently
/// ignored), except the expected output of a reference case (`sample` / `out`), which is
/// returned alongside.
pub fn read_denoiser_input<B: Backend>(
    path: &Path,
    family: ModelFamily,
    device: &B::Device,
) -> Result<(DenoiserInput<B>, Option<Tensor<B, 4>>)> {
    let tensors = read_tensors(path)?;
    let (names, latents, output): (&[&str], _, _) = match family {
        ModelFamily::Dit => (&INPUT_NAMES, "hidden_states", "sample"),
        ModelFamily::Unet => (&UNET_INPUT_NAMES, "sample", "out"),
        ModelFamily::MmDit => (&MMDIT_INPUT_NAMES, "hidden_states", "sample"),
    };
    if let Some(unknown) =
        tensors.keys().find(|k| !names.contains(&k.as_str()) && k.as_str() != output)
    {
        return Err(WeightError::UnknownInput {
            name: unknown.clone(),
            file: path.to_path_buf(),
            known: names.join(", "),
        });
    }
    let need = |name: &str| {
        tensors.get(name).ok_or_else(|| WeightError::MissingKey {
            key: name.to_string(),
            location: path.to_path_buf(),
        })
    };
    let mut input = DenoiserInput::new(
        need(latents)?.to_float(latents, path, device)?,
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
    for name in ["resolution", "aspect_ratio", "text_embeds", "time_ids", "pooled_projections"] {
        if let Some(t) = tensors.get(name) {
            input.added_cond.insert(name.to_string(), t.to_float(name, path, device)?);
        }
    }
    let reference = tensors.get(output).map(|t| t.to_float(output, path, device)).transpose()?;
    Ok((input, reference))
}

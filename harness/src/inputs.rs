//! Files of diffusers forward arguments: a safetensors file of tensors named like the
//! model's `forward` arguments read into a [`DenoiserInput`], with the reference output when
//! the file has one. `harness forward` reads them, and so does the conformance suite (the
//! fixtures' cases).
//!
//! | family | inputs | reference output |
//! |---|---|---|
//! | DiT (`PixArtTransformer2DModel.forward`, `DiTTransformer2DModel.forward`) | `hidden_states`, `timestep`, `encoder_hidden_states`, `encoder_attention_mask`, `class_labels`, `resolution`, `aspect_ratio` | `sample` |
//! | MMDiT (`SD3Transformer2DModel.forward`, `FluxTransformer2DModel.forward`) | `hidden_states`, `timestep`, `encoder_hidden_states`, `pooled_projections`; FLUX also `img_ids`, `txt_ids`, `guidance` | `sample` |
//!
//! FLUX's `hidden_states` and `sample` are the pipeline's packed tokens `[batch, tokens, 4C]`
//! with `img_ids` of its grid: they are unpacked to the latent `[batch, C, H, W]` the
//! toolkit's models take (and [`flux_grid`] tells a writer to pack the output back); other
//! ids than the pipeline's `(0, row, col)` and zero `txt_ids` are refused, naming the token.
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
pub const MMDIT_INPUT_NAMES: [&str; 7] = [
    "hidden_states",
    "timestep",
    "encoder_hidden_states",
    "pooled_projections",
    "img_ids",
    "txt_ids",
    "guidance",
];

/// The token grid of a FLUX inputs file (its `img_ids`), `None` for every other file.
///
/// # Errors
/// `img_ids` that are not the pipeline's grid, or `txt_ids` that are not zeros (named).
pub fn flux_grid(
    tensors: &std::collections::BTreeMap<String, weights::HostTensor>,
    path: &Path,
) -> Result<Option<(usize, usize)>> {
    let Some(ids) = tensors.get("img_ids") else { return Ok(None) };
    let bad = |name: &str, reason: String| WeightError::BadInput {
        name: name.to_string(),
        file: path.to_path_buf(),
        reason,
    };
    if ids.shape.len() != 2 || ids.shape[1] != 3 {
        return Err(bad("img_ids", format!("shape {:?}, expected [tokens, 3]", ids.shape)));
    }
    let rows: Vec<[f32; 3]> =
        ids.values.chunks_exact(3).map(|c| [c[0] as f32, c[1] as f32, c[2] as f32]).collect();
    let grid = models_dit::flux::grid_of_image_ids(&rows).map_err(|e| bad("img_ids", e))?;
    if let Some(t) = tensors.get("txt_ids")
        && (t.shape.len() != 2 || t.shape[1] != 3 || t.values.iter().any(|&v| v != 0.0))
    {
        return Err(bad(
            "txt_ids",
            format!(
                "must be zeros of shape [text tokens, 3] (the FLUX pipeline's), found shape {:?}",
                t.shape
            ),
        ));
    }
    Ok(Some(grid))
}

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
    let grid = flux_grid(&tensors, path)?;
    let latent = |name: &str, t: &weights::HostTensor| -> Result<Tensor<B, 4>> {
        match grid {
            Some((rows, cols)) => {
                let packed: Tensor<B, 3> = t.to_float(name, path, device)?;
                if packed.dims()[1] != rows * cols {
                    return Err(WeightError::BadInput {
                        name: name.to_string(),
                        file: path.to_path_buf(),
                        reason: format!(
                            "{} tokens, but `img_ids` describe a {rows}×{cols} grid",
                            packed.dims()[1]
                        ),
                    });
                }
                Ok(models_dit::flux::unpack_latents(packed, rows, cols))
            }
            None => t.to_float(name, path, device),
        }
    };
    let mut input = DenoiserInput::new(
        latent(latents, need(latents)?)?,
        need("timestep")?.to_float("timestep", path, device)?,
    );
    if let Some(t) = tensors.get("guidance") {
        let g: Tensor<B, 1> = t.to_float("guidance", path, device)?;
        let n = g.dims()[0];
        input.added_cond.insert("guidance".into(), g.reshape([n, 1]));
    }
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
    let reference = tensors.get(output).map(|t| latent(output, t)).transpose()?;
    Ok((input, reference))
}

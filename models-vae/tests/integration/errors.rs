//! Bad input gives errors that say what is wrong and where: missing files, configs that do not
//! match the weights (shape, missing key, unused key), unreadable weights, wrong tensor shapes,
//! unwritable image paths.

use std::path::{Path, PathBuf};

use crate::common::{B, errors, load_vae, read_tensor, reference, temp_dir, vae_folder, values};
use burn::prelude::*;
use models_vae::{AutoencoderKL, AutoencoderKLConfig, VaeError, VaeParts, save_png, to_image};

fn load(folder: &Path, parts: VaeParts) -> Result<AutoencoderKL<B>, VaeError> {
    AutoencoderKL::from_pretrained(folder, parts, &Default::default())
}

/// A copy of the fixture VAE folder whose config has `edit` applied.
fn edited_folder(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = temp_dir(name);
    let text = std::fs::read_to_string(vae_folder().join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let weights = "diffusion_pytorch_model.safetensors";
    std::fs::copy(vae_folder().join(weights), dir.join(weights)).unwrap();
    dir
}

fn message(result: Result<AutoencoderKL<B>, VaeError>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_folder_names_the_config_file() {
    let err = load(Path::new("/nonexistent/vae"), VaeParts::DecoderOnly).err().unwrap();
    assert!(matches!(err, VaeError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/vae/config.json"), "{err}");
}

#[test]
fn missing_weights_file_names_the_folder_and_files() {
    let dir = edited_folder("no-weights", |_| {});
    std::fs::remove_file(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let msg = message(load(&dir, VaeParts::DecoderOnly));
    assert!(msg.contains(&*dir.to_string_lossy()), "{msg}");
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn corrupt_weights_file_is_named() {
    let dir = edited_folder("corrupt", |_| {});
    std::fs::write(dir.join("diffusion_pytorch_model.safetensors"), b"not a safetensors file")
        .unwrap();
    let msg = message(load(&dir, VaeParts::DecoderOnly));
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn wrong_shape_names_the_key_and_both_shapes() {
    // 16 channels at the bottom instead of 32: decoder.conv_in is [32, 4, 3, 3] in the file.
    let dir =
        edited_folder("shape", |c| c["block_out_channels"] = serde_json::json!([16, 16, 16, 16]));
    let msg = message(load(&dir, VaeParts::DecoderOnly));
    assert!(msg.contains("decoder.conv_in.weight"), "{msg}");
    assert!(msg.contains("[32, 4, 3, 3]") && msg.contains("[16, 4, 3, 3]"), "{msg}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_key_is_named() {
    // Two layers per block: the decoder wants a third resnet per up block.
    let dir = edited_folder("missing", |c| c["layers_per_block"] = serde_json::json!(2));
    let msg = message(load(&dir, VaeParts::DecoderOnly));
    assert!(msg.contains("`decoder.up_blocks.0.resnets.2.norm1.weight`"), "{msg}");
    assert!(msg.contains("missing"), "{msg}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unused_key_is_named_but_encoder_keys_are_skipped_when_decoder_only() {
    // Without mid-block attention the file's attention weights are unused.
    let dir = edited_folder("unused", |c| c["mid_block_add_attention"] = serde_json::json!(false));
    let msg = message(load(&dir, VaeParts::DecoderOnly));
    assert!(msg.contains("unused"), "{msg}");
    assert!(msg.contains("decoder.mid_block.attentions.0."), "{msg}");
    std::fs::remove_dir_all(dir).unwrap();

    // Without quant_conv its weights are unused: an error for the full VAE, skipped (with the
    // rest of the encoder) when only the decoder is loaded.
    let dir = edited_folder("no-quant", |c| c["use_quant_conv"] = serde_json::json!(false));
    let msg = message(load(&dir, VaeParts::EncoderAndDecoder));
    assert!(msg.contains("quant_conv.weight") || msg.contains("quant_conv.bias"), "{msg}");
    load(&dir, VaeParts::DecoderOnly).expect("encoder.* and quant_conv.* are skipped");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unsupported_config_names_the_key() {
    let dir = edited_folder("act", |c| c["act_fn"] = serde_json::json!("gelu"));
    let msg = message(load(&dir, VaeParts::DecoderOnly));
    assert!(msg.contains("act_fn") && msg.contains("gelu"), "{msg}");
    std::fs::remove_dir_all(dir).unwrap();

    let dir = edited_folder("unknown", |c| c["norm_type"] = serde_json::json!("spatial"));
    let msg = message(load(&dir, VaeParts::DecoderOnly));
    assert!(msg.contains("norm_type") && msg.contains("config.json"), "{msg}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn half_precision_weights_load() {
    // The fixture's weights converted to f16 and bf16: they load (converted to the backend's
    // float type) and decode close to the float32 result. Tolerance: f16 keeps 11 significant
    // bits (relative rounding 2^-11 ≈ 4.9e-4 per weight), bf16 8 bits (2^-8 ≈ 3.9e-3); summed
    // over the network the output moves by about that. Measured (AMD EPYC, AVX2): f16
    // 6.1e-4, bf16 5.5e-3, so the bounds 5e-3 and 5e-2 are 8× and 9× above; a weight
    // misread as the wrong half type (bit patterns reinterpreted) gives O(1).
    let file = vae_folder().join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let reference_file = reference("vae.safetensors");
    let latents = read_tensor(&reference_file, "latents");
    let want = values(read_tensor(&reference_file, "sample"));
    for (dtype, tol) in [(safetensors::Dtype::F16, 5e-3), (safetensors::Dtype::BF16, 5e-2)] {
        let converted: Vec<(String, Vec<u8>, Vec<usize>)> = st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let data: Vec<u8> = view
                    .data()
                    .chunks_exact(4)
                    .flat_map(|b| {
                        let x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        match dtype {
                            safetensors::Dtype::F16 => half::f16::from_f32(x).to_le_bytes(),
                            _ => half::bf16::from_f32(x).to_le_bytes(),
                        }
                    })
                    .collect();
                (name, data, view.shape().to_vec())
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = converted
            .iter()
            .map(|(name, data, shape)| {
                (
                    name.clone(),
                    safetensors::tensor::TensorView::new(dtype, shape.clone(), data).unwrap(),
                )
            })
            .collect();
        let dir = edited_folder(&format!("{dtype:?}"), |_| {});
        safetensors::serialize_to_file(
            views,
            None,
            &dir.join("diffusion_pytorch_model.safetensors"),
        )
        .unwrap();
        let vae = load(&dir, VaeParts::EncoderAndDecoder).unwrap();
        let got = values(vae.decode_latents(latents.clone()).unwrap());
        let (rel_l2, _) = errors(&got, &want);
        println!("{dtype:?} weights: relative L2 {rel_l2:.3e}");
        assert!(rel_l2 <= tol, "{dtype:?}: {rel_l2:e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn wrong_tensor_shapes_are_errors() {
    let vae = load_vae(VaeParts::DecoderOnly);
    let device = Default::default();
    let err = vae.decode(Tensor::<B, 4>::zeros([1, 3, 8, 8], &device)).unwrap_err();
    assert!(matches!(err, VaeError::Shape { .. }), "{err:?}");
    assert!(err.to_string().contains("[1, 3, 8, 8]") && err.to_string().contains("4"), "{err}");
    assert!(vae.decode_latents(Tensor::<B, 4>::zeros([1, 4, 0, 8], &device)).is_err());

    let err = vae.encode(Tensor::<B, 4>::zeros([1, 3, 32, 32], &device)).unwrap_err();
    assert!(matches!(err, VaeError::NoEncoder), "{err:?}");
    let full = load_vae(VaeParts::EncoderAndDecoder);
    let err = full.encode(Tensor::<B, 4>::zeros([1, 4, 32, 32], &device)).unwrap_err();
    assert!(matches!(err, VaeError::Shape { .. }), "{err:?}");

    let err = to_image(Tensor::<B, 4>::zeros([1, 4, 8, 8], &device)).unwrap_err();
    assert!(err.to_string().contains("[1, 4, 8, 8]"), "{err}");
    let err = to_image(Tensor::<B, 4>::zeros([2, 3, 8, 8], &device)).unwrap_err();
    assert!(err.to_string().contains("[2, 3, 8, 8]"), "{err}");
}

#[test]
fn unwritable_png_path_is_named() {
    let image = image::RgbImage::new(4, 4);
    let path = Path::new("/nonexistent-dir/out.png");
    let err = save_png(&image, path).unwrap_err();
    assert!(matches!(err, VaeError::WriteImage { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent-dir/out.png"), "{err}");
}

#[test]
fn random_init_gives_the_documented_shapes() {
    // A config unlike the fixture: 3 blocks (×4), 2 layers per block, no attention, no
    // post_quant_conv, odd encoder input size.
    let config = AutoencoderKLConfig::from_json_str(
        r#"{"block_out_channels": [8, 16, 16], "layers_per_block": 2, "norm_num_groups": 4,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "mid_block_add_attention": false, "use_post_quant_conv": false, "latent_channels": 2,
            "shift_factor": 0.5}"#,
    )
    .unwrap();
    assert_eq!(config.spatial_scale(), 4);
    let device = Default::default();
    let vae = config.init::<B>(VaeParts::EncoderAndDecoder, &device).unwrap();
    assert!(vae.post_quant_conv.is_none() && vae.decoder.mid_block.attentions.is_empty());
    assert_eq!(vae.decoder.up_blocks[0].resnets.len(), 3);
    let out = vae.decode(Tensor::<B, 4>::zeros([2, 2, 3, 5], &device)).unwrap();
    assert_eq!(out.dims(), [2, 3, 12, 20]);
    let dist = vae.encode(Tensor::<B, 4>::zeros([1, 3, 13, 10], &device)).unwrap();
    // 13 → 6 → 3, 10 → 5 → 2 (each down-sampling rounds down).
    assert_eq!(dist.mean.dims(), [1, 2, 3, 2]);
    // scale_latents inverts unscale_latents (with the shift).
    let z = Tensor::<B, 4>::ones([1, 2, 2, 2], &device);
    let back = vae.scale_latents(vae.unscale_latents(z.clone()));
    let (rel_l2, _) = errors(&values(back), &values(z));
    println!("scale_latents(unscale_latents(z)) vs z: relative L2 {rel_l2:.3e}");
    // Measured 0 (bitwise, AMD EPYC, AVX2). 1e-6 allows the two roundings of z / s + shift,
    // then − shift, · s (a few ulps, ~1e-7); a wrong shift or a factor applied twice is ≥ 0.1.
    assert!(rel_l2 < 1e-6);
}

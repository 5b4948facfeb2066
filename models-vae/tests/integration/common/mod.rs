//! Shared helpers of the integration tests: fixture paths, reference tensors, error measures.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::TensorData;
use models_vae::{AutoencoderKL, VaeParts};

/// The test backend.
pub type B = burn_flex::Flex;

/// `fixtures/pipeline` of the workspace.
pub fn pipeline_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/pipeline")
}

/// The tiny random-weight VAE folder (see `tools/fixtures/PIPELINE.md`).
pub fn vae_folder() -> PathBuf {
    pipeline_fixtures().join("pixart-alpha-tiny/vae")
}

/// A reference file under `fixtures/pipeline/reference`.
pub fn reference(name: &str) -> PathBuf {
    pipeline_fixtures().join("reference").join(name)
}

/// Loads the fixture VAE.
pub fn load_vae(parts: VaeParts) -> AutoencoderKL<B> {
    AutoencoderKL::from_pretrained(vae_folder(), parts, &Default::default())
        .expect("fixture VAE loads")
}

/// A float32 tensor of a reference safetensors file, as a 4-D Burn tensor.
pub fn read_tensor(file: &Path, key: &str) -> Tensor<B, 4> {
    let (values, shape) = read_f32(file, key);
    let shape: [usize; 4] = shape.try_into().expect("a 4-D tensor");
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

/// A float32 tensor of a reference safetensors file: values and shape.
pub fn read_f32(file: &Path, key: &str) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let view = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{key}");
    let values =
        view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    (values, view.shape().to_vec())
}

/// The values of a tensor, as float32.
pub fn values(t: Tensor<B, 4>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().expect("float32 data")
}

/// Relative L2 error ‖a − b‖ / ‖b‖ and max|a − b| / max|b| ([`metrics::compare`]); a
/// non-finite output fails the test.
pub fn errors(a: &[f32], b: &[f32]) -> (f64, f64) {
    let c = metrics::compare(a, b);
    assert_eq!(c.non_finite, 0, "non-finite output");
    (c.rel_l2, c.max_rel)
}

/// A fresh empty directory under the system temp dir, unique to this process and `name`.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("models-vae-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

//! Helpers shared by the integration tests: fixture paths, reading reference tensors, error
//! metrics.

#![allow(dead_code)]

use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};

/// The test backend.
pub type B = burn_flex::Flex;

/// `fixtures/pipeline` at the workspace root.
pub fn pipeline_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/pipeline")
}

/// The tiny PixArt-α pipeline folder.
pub fn tiny() -> PathBuf {
    pipeline_dir().join("pixart-alpha-tiny")
}

/// A reference file under `fixtures/pipeline/reference`.
pub fn reference(name: &str) -> PathBuf {
    pipeline_dir().join("reference").join(name)
}

/// `fixtures/text` at the workspace root (CLIP encoders and tokenizer folders,
/// `tools/fixtures/clip_models.py`).
pub fn text_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/text")
}

/// A tokenizer folder under `fixtures/text/tokenizers`.
pub fn tokenizer_dir(name: &str) -> PathBuf {
    text_dir().join("tokenizers").join(name)
}

/// A reference safetensors file, read whole.
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    /// Reads `fixtures/pipeline/reference/{name}`.
    pub fn open(name: &str) -> Self {
        Self::open_path(reference(name))
    }

    /// Reads `fixtures/text/reference/{name}`.
    pub fn open_text(name: &str) -> Self {
        Self::open_path(text_dir().join("reference").join(name))
    }

    /// Reads a safetensors file.
    pub fn open_path(path: PathBuf) -> Self {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { bytes }
    }

    /// Whether the file holds `key`.
    pub fn has(&self, key: &str) -> bool {
        SafeTensors::deserialize(&self.bytes).expect("valid safetensors").tensor(key).is_ok()
    }

    fn view(&self, key: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("valid safetensors");
        let t = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    /// An int64 tensor: `(shape, values)`.
    pub fn i64(&self, key: &str) -> (Vec<usize>, Vec<i64>) {
        let (dtype, shape, data) = self.view(key);
        assert_eq!(dtype, Dtype::I64, "{key}");
        let v = data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        (shape, v)
    }

    /// A float32 tensor: `(shape, values)`.
    pub fn f32(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let (dtype, shape, data) = self.view(key);
        assert_eq!(dtype, Dtype::F32, "{key}");
        let v = data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        (shape, v)
    }
}

/// `‖a − b‖₂ / ‖b‖₂` ([`metrics::compare`]).
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    metrics::compare(a, b).rel_l2
}

/// `max|a − b| / max|b|` ([`metrics::compare`]).
pub fn rel_max(a: &[f32], b: &[f32]) -> f64 {
    metrics::compare(a, b).max_rel
}

/// A fresh empty folder under cargo's per-target temporary directory.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("models-text").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

//! Shared helpers of the integration tests: fixture paths, reading diffusers cases into
//! [`DenoiserInput`]s, comparison metrics, temp dirs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::{Int, Tensor, TensorData};
use burn_flex::Flex;
use parallel_core::DenoiserInput;
use safetensors::{Dtype, SafeTensors};

pub type B = Flex;

/// `fixtures/dit/` of the repository.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/dit")
}

/// `fixtures/mmdit/` of the repository (SD3-family transformers).
pub fn mmdit_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/mmdit")
}

/// The case files of a fixture model, sorted.
pub fn cases(model: &str) -> Vec<PathBuf> {
    cases_in(&fixtures().join(model))
}

/// The case files of the fixture model in `dir`, sorted.
pub fn cases_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("cases"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

fn values_f32(st: &SafeTensors<'_>, name: &str) -> Option<(Vec<f32>, Vec<usize>)> {
    let view = st.tensor(name).ok()?;
    let shape = view.shape().to_vec();
    let b = view.data();
    let values = match view.dtype() {
        Dtype::F32 => {
            b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
        }
        Dtype::I64 => {
            b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect()
        }
        other => panic!("{name}: dtype {other:?}"),
    };
    Some((values, shape))
}

fn values_i64(st: &SafeTensors<'_>, name: &str) -> Option<(Vec<i64>, Vec<usize>)> {
    let view = st.tensor(name).ok()?;
    assert_eq!(view.dtype(), Dtype::I64, "{name}");
    let shape = view.shape().to_vec();
    let values =
        view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    Some((values, shape))
}

fn tensor<const D: usize>(v: (Vec<f32>, Vec<usize>)) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v.0, v.1), &Default::default())
}

/// A diffusers case: the forward inputs and the expected `sample`.
pub struct Case {
    pub name: String,
    pub input: DenoiserInput<B>,
    pub sample: Tensor<B, 4>,
}

/// Reads a case file (inputs named like diffusers' forward arguments, output `sample`).
pub fn read_case(path: &Path) -> Case {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let get = |n: &str| values_f32(&st, n);
    // FLUX cases hold packed tokens and the pipeline's ids: unpack to the latent.
    let flux_grid = get("img_ids").map(|(v, _)| {
        let ids: Vec<[f32; 3]> = v.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect();
        models_dit::flux::grid_of_image_ids(&ids).unwrap()
    });
    let latent = |v: (Vec<f32>, Vec<usize>)| -> Tensor<B, 4> {
        match flux_grid {
            Some((rows, cols)) => models_dit::flux::unpack_latents(tensor::<3>(v), rows, cols),
            None => tensor(v),
        }
    };
    let mut input =
        DenoiserInput::new(latent(get("hidden_states").unwrap()), tensor(get("timestep").unwrap()));
    if let Some((v, shape)) = get("guidance") {
        input.added_cond.insert("guidance".into(), tensor((v, vec![shape[0], 1])));
    }
    input.encoder_hidden_states = get("encoder_hidden_states").map(tensor);
    input.encoder_attention_mask = get("encoder_attention_mask").map(tensor);
    for name in ["resolution", "aspect_ratio", "pooled_projections"] {
        if let Some(v) = get(name) {
            input.added_cond.insert(name.to_string(), tensor(v));
        }
    }
    input.class_labels = values_i64(&st, "class_labels")
        .map(|(v, s)| Tensor::<B, 1, Int>::from_data(TensorData::new(v, s), &Default::default()));
    let name = path.file_stem().unwrap().to_str().unwrap().to_string();
    Case { name, input, sample: latent(get("sample").unwrap()) }
}

/// `(‖a − b‖ / ‖b‖, max|a − b| / max|b|)` ([`metrics::compare`]).
pub fn errors<const D: usize>(a: &Tensor<B, D>, b: &Tensor<B, D>) -> (f64, f64) {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f32> = a.to_data().to_vec().unwrap();
    let b: Vec<f32> = b.to_data().to_vec().unwrap();
    let c = metrics::compare(&a, &b);
    (c.rel_l2, c.max_rel)
}

/// A fresh, empty folder under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("models-dit-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

//! Shared helpers of the integration tests: fixture paths, reading diffusers cases.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use burn_flex::Flex;
use parallel_core::DenoiserInput;
use safetensors::{Dtype, SafeTensors};

pub type B = Flex;

/// `fixtures/unet/` of the repository.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/unet")
}

/// The case files of a fixture model, sorted.
pub fn cases(model: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures().join(model).join("cases"))
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

fn tensor<const D: usize>(v: (Vec<f32>, Vec<usize>)) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v.0, v.1), &Default::default())
}

/// A diffusers case: the forward inputs (named like `UNet2DConditionModel.forward`'s
/// arguments) and the expected output.
pub struct Case {
    pub name: String,
    pub input: DenoiserInput<B>,
    pub out: Tensor<B, 4>,
}

/// Reads a case file.
pub fn read_case(path: &Path) -> Case {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let get = |n: &str| values_f32(&st, n);
    let mut input =
        DenoiserInput::new(tensor(get("sample").unwrap()), tensor(get("timestep").unwrap()));
    input.encoder_hidden_states = get("encoder_hidden_states").map(tensor);
    for name in ["text_embeds", "time_ids"] {
        if let Some(v) = get(name) {
            input.added_cond.insert(name.to_string(), tensor(v));
        }
    }
    let name = path.file_stem().unwrap().to_str().unwrap().to_string();
    Case { name, input, out: tensor(get("out").unwrap()) }
}

/// `(‖a − b‖ / ‖b‖, max|a − b| / max|b|)` ([`metrics::compare`]).
pub fn errors<const D: usize>(a: &Tensor<B, D>, b: &Tensor<B, D>) -> (f64, f64) {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f32> = a.to_data().to_vec().unwrap();
    let b: Vec<f32> = b.to_data().to_vec().unwrap();
    let c = metrics::compare(&a, &b);
    (c.rel_l2, c.max_rel)
}

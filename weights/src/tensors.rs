//! Named-tensor files: diffusers forward inputs in, outputs out.
//!
//! [`read_tensors`] reads every tensor of a safetensors file to the host (any float or
//! integer dtype, as f64), [`write_tensors`] writes float tensors as float32. `harness
//! forward` and the test suites use them for diffusers' forward inputs and outputs.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Result, WeightError};

/// One tensor read from a file: its shape and its values as f64 (exact for f32, f16, bf16
/// and integers below 2^53).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values, row-major.
    pub values: Vec<f64>,
    /// The dtype on disk, as safetensors names it.
    pub dtype: String,
}

impl HostTensor {
    /// As a float tensor of rank `D` on `device`.
    pub fn to_float<B: Backend, const D: usize>(
        &self,
        name: &str,
        file: &Path,
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        self.check_rank(name, file, D)?;
        let v: Vec<f32> = self.values.iter().map(|&x| x as f32).collect();
        Ok(Tensor::from_data(TensorData::new(v, self.shape.clone()), device))
    }

    /// As an integer tensor of rank `D` on `device`.
    pub fn to_int<B: Backend, const D: usize>(
        &self,
        name: &str,
        file: &Path,
        device: &B::Device,
    ) -> Result<Tensor<B, D, Int>> {
        self.check_rank(name, file, D)?;
        let v: Vec<i64> = self.values.iter().map(|&x| x as i64).collect();
        Ok(Tensor::from_data(TensorData::new(v, self.shape.clone()), device))
    }

    fn check_rank(&self, name: &str, file: &Path, d: usize) -> Result<()> {
        if self.shape.len() != d {
            return Err(WeightError::Shape {
                key: name.to_string(),
                file: file.to_path_buf(),
                expected: vec![0; d],
                found: self.shape.clone(),
            });
        }
        Ok(())
    }
}

/// Every tensor of a safetensors file, by name.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let bytes = std::fs::read(path)
        .map_err(|source| WeightError::Io { path: path.to_path_buf(), source })?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| WeightError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let b = view.data();
        let values: Vec<f64> = match view.dtype() {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            Dtype::F16 => {
                b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect()
            }
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            Dtype::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64)
                .collect(),
            Dtype::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            Dtype::BOOL | Dtype::U8 => b.iter().map(|&x| x as f64).collect(),
            other => {
                return Err(WeightError::Dtype {
                    key: name.clone(),
                    file: path.to_path_buf(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                values,
                dtype: format!("{:?}", view.dtype()),
            },
        );
    }
    Ok(out)
}

/// Writes float tensors as a float32 safetensors file.
pub fn write_tensors<B: Backend, const D: usize>(
    path: &Path,
    tensors: &[(&str, Tensor<B, D>)],
) -> Result<()> {
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in tensors {
        let shape = t.dims().to_vec();
        let data = t.clone().into_data().convert::<f32>();
        let values = data.to_vec::<f32>().map_err(|e| WeightError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("{name}: {e:?}"),
        })?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        owned.push((name.to_string(), shape, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| WeightError::Corrupt {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| WeightError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|source| WeightError::Io { path: dir.to_path_buf(), source })?;
    }
    std::fs::write(path, bytes)
        .map_err(|source| WeightError::Io { path: path.to_path_buf(), source })
}

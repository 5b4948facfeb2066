//! LPIPS (Zhang et al. 2018) as the `lpips` package 0.1 computes it with `net='alex'`: the
//! perceptual distance between two images, from their AlexNet features.
//!
//! Inputs in `[0, 1]` are mapped to `[-1, 1]`, then by LPIPS's scaling layer
//! (`(x − shift) / scale`, shift `(−.030, −.088, −.188)`, scale `(.458, .448, .450)`), through
//! torchvision's AlexNet `features` cut after each of its five ReLUs; each feature map is
//! normalised over channels (`x / (‖x‖₂ + 1e-10)`), the two images' maps are subtracted and
//! squared, weighted per channel by the linear head (`lin0` … `lin4`, a 1 × 1 convolution to
//! one channel), averaged over the map and summed over the five layers.
//!
//! Weights: the LPIPS model's state dict (`net.slice1.0.weight` …, `lin0.model.1.weight` …)
//! as safetensors — `tools/fid/convert_lpips.py` writes it from torchvision's AlexNet
//! weights and the `lpips` package's `alex.pth`.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Tensor, TensorData};

use crate::inception::ParamSource;
use crate::{QualityError, Result};

const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];

/// One AlexNet convolution: `(key, in, out, kernel, stride, padding)`.
const CONVS: [(&str, usize, usize, usize, usize, usize); 5] = [
    ("net.slice1.0", 3, 64, 11, 4, 2),
    ("net.slice2.3", 64, 192, 5, 1, 2),
    ("net.slice3.6", 192, 384, 3, 1, 1),
    ("net.slice4.8", 384, 256, 3, 1, 1),
    ("net.slice5.10", 256, 256, 3, 1, 1),
];

/// LPIPS with the AlexNet trunk; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Lpips<B: Backend> {
    convs: Vec<(Tensor<B, 4>, Tensor<B, 1>, usize, usize)>,
    lins: Vec<Tensor<B, 4>>,
    device: B::Device,
}

impl<B: Backend> Lpips<B> {
    /// LPIPS from its state dict as safetensors (`scaling_layer.*` buffers, if present, are
    /// the constants above and not read).
    ///
    /// # Errors
    /// [`QualityError::Weights`]: a pickle (with the conversion command), a missing or
    /// misshapen tensor, a tensor LPIPS (alex) does not have.
    pub fn from_file(path: &Path, device: &B::Device) -> Result<Self> {
        let mut store = crate::inception::open_safetensors(
            path,
            "tools/fid/convert_lpips.py alexnet-owt-7be5be79.pth lpips_alex.safetensors",
        )?;
        store.skip_prefix("scaling_layer.");
        // `lins.K` is the state dict's second name of `linK` (a ModuleList of the same heads).
        store.skip_prefix("lins.");
        let net = Self::load(&mut store, device)?;
        store.finish().map_err(|e| QualityError::Weights {
            path: path.to_path_buf(),
            reason: format!("{e}: not an LPIPS (alex) state dict"),
        })?;
        Ok(net)
    }

    /// LPIPS from any parameter source (keys as in the `lpips` package's state dict).
    ///
    /// # Errors
    /// Whatever the source reports for a missing or misshapen tensor.
    pub fn load(src: &mut dyn ParamSource, device: &B::Device) -> Result<Self> {
        let mut convs = Vec::new();
        let mut lins = Vec::new();
        for (i, &(key, cin, cout, k, stride, pad)) in CONVS.iter().enumerate() {
            let w = src.take(&format!("{key}.weight"), &[cout, cin, k, k])?;
            let b = src.take(&format!("{key}.bias"), &[cout])?;
            convs.push((
                Tensor::from_data(TensorData::new(w, [cout, cin, k, k]), device),
                Tensor::from_data(TensorData::new(b, [cout]), device),
                stride,
                pad,
            ));
            let lin = src.take(&format!("lin{i}.model.1.weight"), &[1, cout, 1, 1])?;
            lins.push(Tensor::from_data(TensorData::new(lin, [1, cout, 1, 1]), device));
        }
        Ok(Lpips { convs, lins, device: device.clone() })
    }

    /// The five feature maps of a batch in `[0, 1]`, `[N, 3, H, W]`, each normalised over
    /// channels.
    fn features(&self, x: Tensor<B, 4>) -> Vec<Tensor<B, 4>> {
        let shift = Tensor::<B, 1>::from_data(TensorData::new(SHIFT.to_vec(), [3]), &self.device);
        let scale = Tensor::<B, 1>::from_data(TensorData::new(SCALE.to_vec(), [3]), &self.device);
        let x = x.mul_scalar(2.0).sub_scalar(1.0);
        let mut h = (x - shift.reshape([1, 3, 1, 1])) / scale.reshape([1, 3, 1, 1]);
        let mut out = Vec::new();
        for (i, (w, b, stride, pad)) in self.convs.iter().enumerate() {
            // AlexNet's max pools sit before the 2nd and 3rd convolutions.
            if i == 1 || i == 2 {
                h = max_pool2d(h, [3, 3], [2, 2], [0, 0], [1, 1], false);
            }
            let options = ConvOptions::new([*stride; 2], [*pad; 2], [1, 1], 1);
            h = burn::tensor::activation::relu(conv2d(h, w.clone(), Some(b.clone()), options));
            let norm = h.clone().powi_scalar(2).sum_dim(1).sqrt().add_scalar(1e-10);
            out.push(h.clone() / norm);
        }
        out
    }

    /// The LPIPS distance between two `height × width` 8-bit RGB images.
    ///
    /// # Errors
    /// Byte counts that do not match the size; an image too small for AlexNet (< 31 px).
    pub fn distance(&self, a: &[u8], b: &[u8], (h, w): (usize, usize)) -> Result<f64> {
        if h < 31 || w < 31 {
            return Err(QualityError::Input(format!(
                "{h}×{w} is too small for LPIPS's AlexNet (31×31 at least)"
            )));
        }
        let mut data = Vec::with_capacity(2 * 3 * h * w);
        for img in [a, b] {
            if img.len() != h * w * 3 {
                return Err(QualityError::Input(format!(
                    "an image has {} bytes, not {h}×{w}×3",
                    img.len()
                )));
            }
            for c in 0..3 {
                data.extend(img.iter().skip(c).step_by(3).map(|&v| f32::from(v) / 255.0));
            }
        }
        let x = Tensor::<B, 4>::from_data(TensorData::new(data, [2, 3, h, w]), &self.device);
        let mut total = 0.0f64;
        for (f, lin) in self.features(x).into_iter().zip(&self.lins) {
            let d = (f.clone().narrow(0, 0, 1) - f.narrow(0, 1, 1)).powi_scalar(2);
            let weighted =
                conv2d(d, lin.clone(), None, ConvOptions::new([1, 1], [0, 0], [1, 1], 1));
            let mean =
                weighted.mean().into_data().into_vec::<f32>().map_err(|e| {
                    QualityError::Input(format!("LPIPS could not be read back: {e:?}"))
                })?;
            total += f64::from(mean[0]);
        }
        Ok(total)
    }
}

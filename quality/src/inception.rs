//! pytorch-fid's InceptionV3 ("FID Inception"): the 2015 TensorFlow Inception weights as
//! pytorch-fid ports them, up to the pool3 features (2048 per image).
//!
//! The network is torchvision's `Inception3` with pytorch-fid's patched blocks
//! (`FIDInceptionA`, `FIDInceptionC`, `FIDInceptionE_1`, `FIDInceptionE_2`: average pools that
//! do not count padding, and a max pool in the last block), cut after the final average pool.
//! Its input is what pytorch-fid feeds it: RGB in `[0, 1]`, resized to 299 × 299 by bilinear
//! interpolation with `align_corners = false` and no anti-aliasing, then mapped to `[-1, 1]`.
//!
//! Every `BasicConv2d` (convolution without bias, batch norm with `eps = 0.001` from its
//! running statistics, ReLU) is loaded with its batch norm folded into the convolution, in
//! `f64`: `W' = W·γ/√(σ² + ε)`, `b' = β − μ·γ/√(σ² + ε)`.
//!
//! Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` converted to safetensors with
//! its state-dict keys unchanged (`tools/fid/convert_inception.py`); the loader refuses a file
//! that lacks a key or has a wrong shape, saying how to convert.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::module::{avg_pool2d, conv2d, interpolate, max_pool2d};
use burn::tensor::ops::{ConvOptions, InterpolateMode, InterpolateOptions};
use burn::tensor::{Tensor, TensorData};
use weights::WeightStore;

use crate::{QualityError, Result};

/// Features per image (pool3).
pub const FEATURES: usize = 2048;
/// Side of the network's input after resizing.
pub const INPUT_SIZE: usize = 299;
/// Batch norm epsilon of every `BasicConv2d`.
pub const BN_EPS: f64 = 0.001;

/// Where the network's parameters come from: a weights file, or a generated pattern.
pub trait ParamSource {
    /// The values of tensor `key`, whose shape must be `shape`, in row-major order.
    fn take(&mut self, key: &str, shape: &[usize]) -> Result<Vec<f32>>;
}

impl ParamSource for WeightStore {
    fn take(&mut self, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.take_f32(key, shape).map_err(|e| QualityError::Weights {
            path: self.location().to_path_buf(),
            reason: format!(
                "{e}; this must be pytorch-fid's FID Inception state dict converted with \
                 tools/fid/convert_inception.py (keys unchanged, e.g. Conv2d_1a_3x3.conv.weight)"
            ),
        })
    }
}

/// The deterministic weights the reference fixtures use (`tools/fixtures/quality.py`): with
/// `h` the FNV-1a-32 hash of the tensor's name and `u_i = ((i·2654435761 + h) mod 2³²)/2³²`,
/// conv weights are `(u − ū_filter)·√(40/fan_in)`, batch-norm weights `1 + 0.2(u − ½)`, biases
/// and running means `0.05(u − ½)`, running variances `0.8 + 0.4u` (computed in `f64`, rounded
/// to `f32` once); for LPIPS, its AlexNet's weights (`net.*.weight`) as conv weights, its
/// biases as batch-norm biases, its linear heads (`lin*`) `0.1u`. Tests use them to compare
/// with pytorch-fid and lpips without their weights.
#[derive(Debug, Default, Clone, Copy)]
pub struct PatternWeights;

impl PatternWeights {
    fn uniform(key: &str, n: usize) -> Vec<f64> {
        let mut h: u32 = 0x811C_9DC5;
        for b in key.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        (0..n as u64)
            .map(|i| ((i * 2_654_435_761 + u64::from(h)) % (1 << 32)) as f64 / 4_294_967_296.0)
            .collect()
    }
}

impl ParamSource for PatternWeights {
    fn take(&mut self, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let n: usize = shape.iter().product();
        let u = Self::uniform(key, n);
        let conv =
            key.ends_with("conv.weight") || (key.starts_with("net.") && key.ends_with(".weight"));
        let v: Vec<f64> = if key.starts_with("lin") {
            // LPIPS's linear heads: non-negative, as trained ones are.
            u.iter().map(|x| 0.1 * x).collect()
        } else if conv {
            let fan_in: usize = shape[1..].iter().product();
            let gain = (40.0 / fan_in as f64).sqrt();
            u.chunks(fan_in)
                .flat_map(|f| {
                    let mean = f.iter().sum::<f64>() / fan_in as f64;
                    f.iter().map(move |x| (x - mean) * gain)
                })
                .collect()
        } else if key.ends_with("bn.weight") {
            u.iter().map(|x| 1.0 + 0.2 * (x - 0.5)).collect()
        } else if key.ends_with("bn.bias")
            || key.ends_with("running_mean")
            || (key.starts_with("net.") && key.ends_with(".bias"))
        {
            u.iter().map(|x| 0.05 * (x - 0.5)).collect()
        } else if key.ends_with("running_var") {
            u.iter().map(|x| 0.8 + 0.4 * x).collect()
        } else {
            return Err(QualityError::Weights {
                path: "pattern".into(),
                reason: format!("no pattern for `{key}`"),
            });
        };
        Ok(v.into_iter().map(|x| x as f32).collect())
    }
}

/// Opens a weights file that must be safetensors; a PyTorch pickle is refused with the
/// conversion command `convert` (a `tools/fid/` script and its arguments).
pub(crate) fn open_safetensors(path: &Path, convert: &str) -> Result<WeightStore> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if matches!(ext, "pth" | "pt" | "bin" | "ckpt") {
        return Err(QualityError::Weights {
            path: path.to_path_buf(),
            reason: format!(
                "a PyTorch pickle is not read here; convert it once with `python {convert}` \
                 (keys unchanged)"
            ),
        });
    }
    WeightStore::open_file(path).map_err(|e| QualityError::Weights {
        path: path.to_path_buf(),
        reason: format!("{e}; expected safetensors written by `python {convert}`"),
    })
}

/// `BasicConv2d` with its batch norm folded in, then ReLU.
#[derive(Debug, Clone)]
struct ConvBn<B: Backend> {
    weight: Tensor<B, 4>,
    bias: Tensor<B, 1>,
    stride: [usize; 2],
    padding: [usize; 2],
}

impl<B: Backend> ConvBn<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let options = ConvOptions::new(self.stride, self.padding, [1, 1], 1);
        burn::tensor::activation::relu(conv2d(
            x,
            self.weight.clone(),
            Some(self.bias.clone()),
            options,
        ))
    }
}

/// Builds the layers from a parameter source.
struct Loader<'a, B: Backend> {
    src: &'a mut dyn ParamSource,
    device: &'a B::Device,
}

impl<B: Backend> Loader<'_, B> {
    /// `name`: `BasicConv2d(cin, cout, kernel, stride, padding)`.
    fn conv(
        &mut self,
        name: &str,
        (cin, cout): (usize, usize),
        kernel: [usize; 2],
        stride: usize,
        padding: [usize; 2],
    ) -> Result<ConvBn<B>> {
        let w =
            self.src.take(&format!("{name}.conv.weight"), &[cout, cin, kernel[0], kernel[1]])?;
        let mut bn = |p: &str| self.src.take(&format!("{name}.bn.{p}"), &[cout]);
        let (gamma, beta, mean, var) =
            (bn("weight")?, bn("bias")?, bn("running_mean")?, bn("running_var")?);
        let per_out = cin * kernel[0] * kernel[1];
        let mut weight = Vec::with_capacity(w.len());
        let mut bias = Vec::with_capacity(cout);
        for o in 0..cout {
            let scale = f64::from(gamma[o]) / (f64::from(var[o]) + BN_EPS).sqrt();
            weight.extend(
                w[o * per_out..(o + 1) * per_out].iter().map(|&x| (f64::from(x) * scale) as f32),
            );
            bias.push((f64::from(beta[o]) - f64::from(mean[o]) * scale) as f32);
        }
        Ok(ConvBn {
            weight: Tensor::from_data(
                TensorData::new(weight, [cout, cin, kernel[0], kernel[1]]),
                self.device,
            ),
            bias: Tensor::from_data(TensorData::new(bias, [cout]), self.device),
            stride: [stride, stride],
            padding,
        })
    }

    fn k1(&mut self, name: &str, cin: usize, cout: usize) -> Result<ConvBn<B>> {
        self.conv(name, (cin, cout), [1, 1], 1, [0, 0])
    }
}

/// torchvision's `InceptionA` with pytorch-fid's pool (average, padding not counted).
#[derive(Debug, Clone)]
struct BlockA<B: Backend> {
    b1x1: ConvBn<B>,
    b5x5: [ConvBn<B>; 2],
    b3x3dbl: [ConvBn<B>; 3],
    pool: ConvBn<B>,
}

impl<B: Backend> BlockA<B> {
    fn load(l: &mut Loader<'_, B>, n: &str, cin: usize, pool_features: usize) -> Result<Self> {
        Ok(BlockA {
            b1x1: l.k1(&format!("{n}.branch1x1"), cin, 64)?,
            b5x5: [
                l.k1(&format!("{n}.branch5x5_1"), cin, 48)?,
                l.conv(&format!("{n}.branch5x5_2"), (48, 64), [5, 5], 1, [2, 2])?,
            ],
            b3x3dbl: [
                l.k1(&format!("{n}.branch3x3dbl_1"), cin, 64)?,
                l.conv(&format!("{n}.branch3x3dbl_2"), (64, 96), [3, 3], 1, [1, 1])?,
                l.conv(&format!("{n}.branch3x3dbl_3"), (96, 96), [3, 3], 1, [1, 1])?,
            ],
            pool: l.k1(&format!("{n}.branch_pool"), cin, pool_features)?,
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let a = self.b1x1.forward(x.clone());
        let b = chain(&self.b5x5, x.clone());
        let c = chain(&self.b3x3dbl, x.clone());
        let d = self.pool.forward(avg3(x));
        Tensor::cat(vec![a, b, c, d], 1)
    }
}

/// torchvision's `InceptionB` (grid reduction 35 → 17).
#[derive(Debug, Clone)]
struct BlockB<B: Backend> {
    b3x3: ConvBn<B>,
    b3x3dbl: [ConvBn<B>; 3],
}

impl<B: Backend> BlockB<B> {
    fn load(l: &mut Loader<'_, B>, n: &str, cin: usize) -> Result<Self> {
        Ok(BlockB {
            b3x3: l.conv(&format!("{n}.branch3x3"), (cin, 384), [3, 3], 2, [0, 0])?,
            b3x3dbl: [
                l.k1(&format!("{n}.branch3x3dbl_1"), cin, 64)?,
                l.conv(&format!("{n}.branch3x3dbl_2"), (64, 96), [3, 3], 1, [1, 1])?,
                l.conv(&format!("{n}.branch3x3dbl_3"), (96, 96), [3, 3], 2, [0, 0])?,
            ],
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let a = self.b3x3.forward(x.clone());
        let b = chain(&self.b3x3dbl, x.clone());
        let c = max_pool2d(x, [3, 3], [2, 2], [0, 0], [1, 1], false);
        Tensor::cat(vec![a, b, c], 1)
    }
}

/// torchvision's `InceptionC` (factorised 7 × 7) with pytorch-fid's pool.
#[derive(Debug, Clone)]
struct BlockC<B: Backend> {
    b1x1: ConvBn<B>,
    b7x7: [ConvBn<B>; 3],
    b7x7dbl: [ConvBn<B>; 5],
    pool: ConvBn<B>,
}

impl<B: Backend> BlockC<B> {
    fn load(l: &mut Loader<'_, B>, n: &str, cin: usize, c7: usize) -> Result<Self> {
        let (row, col) = (([1, 7], [0, 3]), ([7, 1], [3, 0]));
        let mut c = |name: &str, io, (k, p): ([usize; 2], [usize; 2])| {
            l.conv(&format!("{n}.{name}"), io, k, 1, p)
        };
        Ok(BlockC {
            b7x7: [
                c("branch7x7_1", (cin, c7), ([1, 1], [0, 0]))?,
                c("branch7x7_2", (c7, c7), row)?,
                c("branch7x7_3", (c7, 192), col)?,
            ],
            b7x7dbl: [
                c("branch7x7dbl_1", (cin, c7), ([1, 1], [0, 0]))?,
                c("branch7x7dbl_2", (c7, c7), col)?,
                c("branch7x7dbl_3", (c7, c7), row)?,
                c("branch7x7dbl_4", (c7, c7), col)?,
                c("branch7x7dbl_5", (c7, 192), row)?,
            ],
            b1x1: c("branch1x1", (cin, 192), ([1, 1], [0, 0]))?,
            pool: c("branch_pool", (cin, 192), ([1, 1], [0, 0]))?,
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let a = self.b1x1.forward(x.clone());
        let b = chain(&self.b7x7, x.clone());
        let c = chain(&self.b7x7dbl, x.clone());
        let d = self.pool.forward(avg3(x));
        Tensor::cat(vec![a, b, c, d], 1)
    }
}

/// torchvision's `InceptionD` (grid reduction 17 → 8).
#[derive(Debug, Clone)]
struct BlockD<B: Backend> {
    b3x3: [ConvBn<B>; 2],
    b7x7x3: [ConvBn<B>; 4],
}

impl<B: Backend> BlockD<B> {
    fn load(l: &mut Loader<'_, B>, n: &str, cin: usize) -> Result<Self> {
        Ok(BlockD {
            b3x3: [
                l.k1(&format!("{n}.branch3x3_1"), cin, 192)?,
                l.conv(&format!("{n}.branch3x3_2"), (192, 320), [3, 3], 2, [0, 0])?,
            ],
            b7x7x3: [
                l.k1(&format!("{n}.branch7x7x3_1"), cin, 192)?,
                l.conv(&format!("{n}.branch7x7x3_2"), (192, 192), [1, 7], 1, [0, 3])?,
                l.conv(&format!("{n}.branch7x7x3_3"), (192, 192), [7, 1], 1, [3, 0])?,
                l.conv(&format!("{n}.branch7x7x3_4"), (192, 192), [3, 3], 2, [0, 0])?,
            ],
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let a = chain(&self.b3x3, x.clone());
        let b = chain(&self.b7x7x3, x.clone());
        let c = max_pool2d(x, [3, 3], [2, 2], [0, 0], [1, 1], false);
        Tensor::cat(vec![a, b, c], 1)
    }
}

/// torchvision's `InceptionE` with pytorch-fid's pool: average without padding counted in
/// `Mixed_7b` (`FIDInceptionE_1`), max in `Mixed_7c` (`FIDInceptionE_2`).
#[derive(Debug, Clone)]
struct BlockE<B: Backend> {
    b1x1: ConvBn<B>,
    b3x3_1: ConvBn<B>,
    b3x3_2: [ConvBn<B>; 2],
    b3x3dbl: [ConvBn<B>; 2],
    b3x3dbl_3: [ConvBn<B>; 2],
    pool: ConvBn<B>,
    max_pool: bool,
}

impl<B: Backend> BlockE<B> {
    fn load(l: &mut Loader<'_, B>, n: &str, cin: usize, max_pool: bool) -> Result<Self> {
        let row = |l: &mut Loader<'_, B>, name: &str| {
            l.conv(&format!("{n}.{name}"), (384, 384), [1, 3], 1, [0, 1])
        };
        let col = |l: &mut Loader<'_, B>, name: &str| {
            l.conv(&format!("{n}.{name}"), (384, 384), [3, 1], 1, [1, 0])
        };
        Ok(BlockE {
            b1x1: l.k1(&format!("{n}.branch1x1"), cin, 320)?,
            b3x3_1: l.k1(&format!("{n}.branch3x3_1"), cin, 384)?,
            b3x3_2: [row(l, "branch3x3_2a")?, col(l, "branch3x3_2b")?],
            b3x3dbl: [
                l.k1(&format!("{n}.branch3x3dbl_1"), cin, 448)?,
                l.conv(&format!("{n}.branch3x3dbl_2"), (448, 384), [3, 3], 1, [1, 1])?,
            ],
            b3x3dbl_3: [row(l, "branch3x3dbl_3a")?, col(l, "branch3x3dbl_3b")?],
            pool: l.k1(&format!("{n}.branch_pool"), cin, 192)?,
            max_pool,
        })
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let a = self.b1x1.forward(x.clone());
        let b = self.b3x3_1.forward(x.clone());
        let b = Tensor::cat(vec![self.b3x3_2[0].forward(b.clone()), self.b3x3_2[1].forward(b)], 1);
        let c = chain(&self.b3x3dbl, x.clone());
        let c = Tensor::cat(
            vec![self.b3x3dbl_3[0].forward(c.clone()), self.b3x3dbl_3[1].forward(c)],
            1,
        );
        let pooled = if self.max_pool {
            max_pool2d(x, [3, 3], [1, 1], [1, 1], [1, 1], false)
        } else {
            avg3(x)
        };
        Tensor::cat(vec![a, b, c, self.pool.forward(pooled)], 1)
    }
}

fn chain<B: Backend>(convs: &[ConvBn<B>], x: Tensor<B, 4>) -> Tensor<B, 4> {
    convs.iter().fold(x, |h, c| c.forward(h))
}

/// `avg_pool2d(kernel 3, stride 1, padding 1, count_include_pad = False)`.
fn avg3<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    avg_pool2d(x, [3, 3], [1, 1], [1, 1], false, false)
}

/// pytorch-fid's InceptionV3 up to the pool3 features; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct FidInception<B: Backend> {
    stem: [ConvBn<B>; 5],
    mixed_5: [BlockA<B>; 3],
    mixed_6a: BlockB<B>,
    mixed_6: [BlockC<B>; 4],
    mixed_7a: BlockD<B>,
    mixed_7b: BlockE<B>,
    mixed_7c: BlockE<B>,
    device: B::Device,
}

impl<B: Backend> FidInception<B> {
    /// The network from pytorch-fid's weights converted to safetensors (`fc.*`, the
    /// classifier, and `num_batches_tracked` counters are not used).
    ///
    /// # Errors
    /// [`QualityError::Weights`] naming the file: not safetensors (a `.pth` says how to
    /// convert it), a missing key, a wrong shape, or a key no FID Inception has.
    pub fn from_file(path: &Path, device: &B::Device) -> Result<Self> {
        let mut store = open_safetensors(
            path,
            "tools/fid/convert_inception.py pt_inception-2015-12-05-6726825d.pth \
             fid_inception.safetensors",
        )?;
        store.skip_prefix("fc.");
        let counters: Vec<String> =
            store.keys().filter(|k| k.ends_with("num_batches_tracked")).map(String::from).collect();
        for k in counters {
            store.skip(&k);
        }
        let net = Self::load(&mut store, device)?;
        store.finish().map_err(|e| QualityError::Weights {
            path: path.to_path_buf(),
            reason: format!(
                "{e}: not pytorch-fid's FID Inception (is it torchvision's ImageNet Inception?)"
            ),
        })?;
        Ok(net)
    }

    /// The network from any parameter source (keys as in pytorch-fid's state dict).
    ///
    /// # Errors
    /// Whatever the source reports for a missing or misshapen tensor.
    pub fn load(src: &mut dyn ParamSource, device: &B::Device) -> Result<Self> {
        let mut l = Loader::<B> { src, device };
        let l = &mut l;
        Ok(FidInception {
            stem: [
                l.conv("Conv2d_1a_3x3", (3, 32), [3, 3], 2, [0, 0])?,
                l.conv("Conv2d_2a_3x3", (32, 32), [3, 3], 1, [0, 0])?,
                l.conv("Conv2d_2b_3x3", (32, 64), [3, 3], 1, [1, 1])?,
                l.k1("Conv2d_3b_1x1", 64, 80)?,
                l.conv("Conv2d_4a_3x3", (80, 192), [3, 3], 1, [0, 0])?,
            ],
            mixed_5: [
                BlockA::load(l, "Mixed_5b", 192, 32)?,
                BlockA::load(l, "Mixed_5c", 256, 64)?,
                BlockA::load(l, "Mixed_5d", 288, 64)?,
            ],
            mixed_6a: BlockB::load(l, "Mixed_6a", 288)?,
            mixed_6: [
                BlockC::load(l, "Mixed_6b", 768, 128)?,
                BlockC::load(l, "Mixed_6c", 768, 160)?,
                BlockC::load(l, "Mixed_6d", 768, 160)?,
                BlockC::load(l, "Mixed_6e", 768, 192)?,
            ],
            mixed_7a: BlockD::load(l, "Mixed_7a", 768)?,
            mixed_7b: BlockE::load(l, "Mixed_7b", 1280, false)?,
            mixed_7c: BlockE::load(l, "Mixed_7c", 2048, true)?,
            device: device.clone(),
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Pool3 features of a batch of RGB images in `[0, 1]`, `[N, 3, H, W]` (any size): `[N, 2048]`.
    pub fn features(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let [n, _, _, _] = images.dims();
        let options = InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false);
        let x = interpolate(images, [INPUT_SIZE, INPUT_SIZE], options);
        let x = x.mul_scalar(2.0).sub_scalar(1.0);
        let [c1a, c2a, c2b, c3b, c4a] = &self.stem;
        let x = c2b.forward(c2a.forward(c1a.forward(x)));
        let x = max_pool2d(x, [3, 3], [2, 2], [0, 0], [1, 1], false);
        let x = c4a.forward(c3b.forward(x));
        let x = max_pool2d(x, [3, 3], [2, 2], [0, 0], [1, 1], false);
        let x = self.mixed_5.iter().fold(x, |h, b| b.forward(h));
        let x = self.mixed_6a.forward(x);
        let x = self.mixed_6.iter().fold(x, |h, b| b.forward(h));
        let x = self.mixed_7c.forward(self.mixed_7b.forward(self.mixed_7a.forward(x)));
        let [_, c, h, w] = x.dims();
        x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c])
    }

    /// Features of 8-bit RGB images (`H × W × 3` bytes each, as decoded), all of one size.
    ///
    /// # Errors
    /// An image whose byte count is not `h · w · 3`.
    pub fn features_rgb8(&self, images: &[&[u8]], (h, w): (usize, usize)) -> Result<Vec<f32>> {
        let mut data = Vec::with_capacity(images.len() * 3 * h * w);
        for (i, img) in images.iter().enumerate() {
            if img.len() != h * w * 3 {
                return Err(QualityError::Input(format!(
                    "image {i} has {} bytes, not {h}×{w}×3",
                    img.len()
                )));
            }
            // HWC bytes → CHW in [0, 1] (torchvision's ToTensor: x / 255).
            for c in 0..3 {
                data.extend(img.iter().skip(c).step_by(3).map(|&v| f32::from(v) / 255.0));
            }
        }
        let x =
            Tensor::<B, 4>::from_data(TensorData::new(data, [images.len(), 3, h, w]), &self.device);
        self.features(x)
            .into_data()
            .into_vec::<f32>()
            .map_err(|e| QualityError::Input(format!("features could not be read back: {e:?}")))
    }
}

//! Where parameters come from while a model is built: a weight file or random initialisation.
//!
//! Every module is built by one function that asks a [`ParamSource`] for each tensor by its
//! diffusers key and PyTorch shape, so the file loader and the random initialiser share the
//! same code path (and the same keys). The Burn layers are assembled from the tensors directly,
//! never initialised first and overwritten.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::Distribution;

use crate::VaeError;

/// The eps of every GroupNorm in diffusers' `AutoencoderKL`.
pub const GROUP_NORM_EPS: f64 = 1e-6;

/// SiLU as PyTorch's CPU kernel computes it, `x / (1 + exp(-x))`: one `exp` per element,
/// about twice as fast on Flex as Burn's `x · sigmoid(x)` (whose sigmoid branches on the sign).
/// For very negative `x`, `exp(-x)` overflows to infinity and the result is −0, as in PyTorch.
///
/// # Shapes
/// - `x`: any; output: the same
pub(crate) fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clone() / (x.neg().exp() + 1.0)
}

/// How a tensor is initialised when it does not come from a file.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    /// N(0, 1/fan_in): conv and linear weights.
    FanIn(usize),
    /// 0.05·N(0, 1): biases (non-zero, so tests see them).
    Bias,
    /// All ones: GroupNorm weights.
    Ones,
    /// All zeros: GroupNorm biases.
    Zeros,
}

/// A source of parameters, asked once per tensor with its diffusers key and PyTorch shape.
pub(crate) trait ParamSource<B: Backend> {
    /// The tensor stored under `key`, which must have `shape`.
    fn tensor<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Tensor<B, D>, VaeError>;
}

/// Random parameters (see [`Init`]), for shape tests and benchmarks without a weight file.
pub(crate) struct RandomInit<B: Backend> {
    pub(crate) device: B::Device,
}

impl<B: Backend> ParamSource<B> for RandomInit<B> {
    fn tensor<const D: usize>(
        &mut self,
        _key: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Tensor<B, D>, VaeError> {
        let device = &self.device;
        Ok(match init {
            Init::FanIn(fan_in) => {
                let std = 1.0 / (fan_in.max(1) as f64).sqrt();
                Tensor::random(shape, Distribution::Normal(0.0, std), device)
            }
            Init::Bias => Tensor::random(shape, Distribution::Normal(0.0, 0.05), device),
            Init::Ones => Tensor::ones(shape, device),
            Init::Zeros => Tensor::zeros(shape, device),
        })
    }
}

/// A `k`×`k` convolution with bias from `{key}.weight` `[out, in, k, k]` and `{key}.bias`.
pub(crate) fn conv2d<B: Backend>(
    src: &mut impl ParamSource<B>,
    key: &str,
    [channels_in, channels_out]: [usize; 2],
    kernel: usize,
    stride: usize,
    padding: PaddingConfig2d,
) -> Result<Conv2d<B>, VaeError> {
    let fan_in = channels_in * kernel * kernel;
    let weight = src.tensor(
        &format!("{key}.weight"),
        [channels_out, channels_in, kernel, kernel],
        Init::FanIn(fan_in),
    )?;
    let bias = src.tensor(&format!("{key}.bias"), [channels_out], Init::Bias)?;
    Ok(Conv2d {
        weight: Param::from_tensor(kernels::conv_weight(weight, stride)),
        bias: Some(Param::from_tensor(bias)),
        stride: [stride, stride],
        kernel_size: [kernel, kernel],
        dilation: [1, 1],
        groups: 1,
        padding,
    })
}

/// A 3×3, stride-1, padding-1 convolution (the most common one here).
pub(crate) fn conv3x3<B: Backend>(
    src: &mut impl ParamSource<B>,
    key: &str,
    channels: [usize; 2],
) -> Result<Conv2d<B>, VaeError> {
    conv2d(src, key, channels, 3, 1, PaddingConfig2d::Explicit(1, 1, 1, 1))
}

/// A 1×1 convolution.
pub(crate) fn conv1x1<B: Backend>(
    src: &mut impl ParamSource<B>,
    key: &str,
    channels: [usize; 2],
) -> Result<Conv2d<B>, VaeError> {
    conv2d(src, key, channels, 1, 1, PaddingConfig2d::Valid)
}

/// `conv.forward(x)`, through [`kernels::conv2d`] for the stride-1, symmetrically padded
/// convolutions (every one of the decoder's): the project's CPU convolution on Flex/f32,
/// Burn's on every other backend. Anything else (the encoder's stride-2 down-samplers):
/// Burn's module.
pub(crate) fn conv<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let pad = match conv.padding {
        PaddingConfig2d::Valid => Some(0),
        PaddingConfig2d::Explicit(t, l, b, r) if t == l && l == b && b == r => Some(t),
        _ => None,
    };
    match pad {
        Some(p) if conv.stride == [1, 1] && conv.dilation == [1, 1] && conv.groups == 1 => {
            let bias = conv.bias.as_ref().map(|b| b.val());
            kernels::conv2d(x, conv.weight.val(), bias, 1, kernels::ConvPadding::same(p))
        }
        _ => conv.forward(x),
    }
}

/// `norm.forward(x)` for float32 maps through the GroupNorm kernel ([`kernels::group_norm`]:
/// two passes for the statistics, one for the normalisation); Burn's module for other dtypes,
/// whose numerics the half-precision fixtures were written against.
pub(crate) fn norm<B: Backend>(norm: &GroupNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    if x.dtype() != burn::tensor::DType::F32 {
        return norm.forward(x);
    }
    let (gamma, beta) = (norm.gamma.as_ref().map(|g| g.val()), norm.beta.as_ref().map(|b| b.val()));
    kernels::group_norm(x, norm.num_groups, norm.epsilon, gamma, beta)
}

/// An affine GroupNorm (eps [`GROUP_NORM_EPS`]) from `{key}.weight` and `{key}.bias`.
pub(crate) fn group_norm<B: Backend>(
    src: &mut impl ParamSource<B>,
    key: &str,
    num_groups: usize,
    num_channels: usize,
) -> Result<GroupNorm<B>, VaeError> {
    let gamma = src.tensor(&format!("{key}.weight"), [num_channels], Init::Ones)?;
    let beta = src.tensor(&format!("{key}.bias"), [num_channels], Init::Zeros)?;
    Ok(GroupNorm {
        gamma: Some(Param::from_tensor(gamma)),
        beta: Some(Param::from_tensor(beta)),
        num_groups,
        num_channels,
        epsilon: GROUP_NORM_EPS,
        affine: true,
    })
}

/// A Linear with bias from `{key}.weight` (PyTorch `[out, in]`, transposed here to Burn's
/// `[in, out]`) and `{key}.bias`.
pub(crate) fn linear<B: Backend>(
    src: &mut impl ParamSource<B>,
    key: &str,
    d_input: usize,
    d_output: usize,
) -> Result<Linear<B>, VaeError> {
    let weight = src.tensor(&format!("{key}.weight"), [d_output, d_input], Init::FanIn(d_input))?;
    let bias = src.tensor(&format!("{key}.bias"), [d_output], Init::Bias)?;
    Ok(Linear {
        weight: Param::from_tensor(weight.transpose()),
        bias: Some(Param::from_tensor(bias)),
    })
}

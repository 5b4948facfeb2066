//! Where parameters come from while a U-Net is built: a weight file or random values.
//!
//! Every module is built by one function that asks [`Params`] for each tensor by its
//! diffusers key and PyTorch shape, so loading and random initialisation share one code path
//! and one set of keys, and the list of every parameter ([`ParamInfo`], what a strategy
//! computes bytes from) is recorded as a side effect of the build.

use burn::module::Param;
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use weights::WeightStore;

use crate::error::Result;
use crate::layers::{Conv2d, GroupNorm};

/// How a tensor is drawn when it does not come from a file (presets, shape tests).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    /// `N(0, 1/fan_in)`: conv and linear weights (keeps activations of order one).
    FanIn(usize),
    /// `N(0, 0.02²)`: biases.
    Bias,
    /// Ones: norm weights.
    Ones,
    /// Zeros: norm biases.
    Zeros,
}

/// The source of a build's tensors, and the record of what it handed out.
pub(crate) struct Params<'a, B: Backend> {
    store: Option<&'a mut WeightStore>,
    device: B::Device,
    /// Every parameter handed out (key, PyTorch shape), in build order.
    pub infos: Vec<(String, Vec<usize>)>,
}

impl<'a, B: Backend> Params<'a, B> {
    /// Tensors taken from `store` (in its compute dtype).
    pub fn from_store(store: &'a mut WeightStore, device: &B::Device) -> Self {
        Params { store: Some(store), device: device.clone(), infos: Vec::new() }
    }

    /// Random tensors (see [`Init`]) in the device's float dtype.
    pub fn random(device: &B::Device) -> Self {
        Params { store: None, device: device.clone(), infos: Vec::new() }
    }

    /// The tensor under `key`, which must have `shape`.
    pub fn tensor<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Tensor<B, D>> {
        self.infos.push((key.to_string(), shape.to_vec()));
        let device = &self.device;
        Ok(match &mut self.store {
            Some(store) => store.take(key, shape, device)?,
            None => match init {
                Init::FanIn(fan_in) => Tensor::random(
                    shape,
                    Distribution::Normal(0.0, 1.0 / (fan_in.max(1) as f64).sqrt()),
                    device,
                ),
                Init::Bias => Tensor::random(shape, Distribution::Normal(0.0, 0.02), device),
                Init::Ones => Tensor::ones(shape, device),
                Init::Zeros => Tensor::zeros(shape, device),
            },
        })
    }

    /// A PyTorch `nn.Linear` (`{key}.weight` `[out, in]`, transposed to Burn's `[in, out]`;
    /// `{key}.bias` when `bias`).
    pub fn linear(
        &mut self,
        key: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
    ) -> Result<Linear<B>> {
        let weight = self.tensor(&format!("{key}.weight"), [d_out, d_in], Init::FanIn(d_in))?;
        let bias = if bias {
            Some(Param::from_tensor(self.tensor(&format!("{key}.bias"), [d_out], Init::Bias)?))
        } else {
            None
        };
        Ok(Linear { weight: Param::from_tensor(weight.transpose()), bias })
    }

    /// A 1×1 `nn.Conv2d` stored `[out, in, 1, 1]`, as a [`Linear`] over channels.
    pub fn conv1x1_as_linear(&mut self, key: &str, d_in: usize, d_out: usize) -> Result<Linear<B>> {
        let weight =
            self.tensor(&format!("{key}.weight"), [d_out, d_in, 1, 1], Init::FanIn(d_in))?;
        let bias = self.tensor(&format!("{key}.bias"), [d_out], Init::Bias)?;
        Ok(Linear {
            weight: Param::from_tensor(weight.reshape([d_out, d_in]).transpose()),
            bias: Some(Param::from_tensor(bias)),
        })
    }

    /// A `k × k` `nn.Conv2d` with bias, stride `stride`, padding `(k − 1)/2`.
    pub fn conv(
        &mut self,
        key: &str,
        [d_in, d_out]: [usize; 2],
        kernel: usize,
        stride: usize,
    ) -> Result<Conv2d<B>> {
        let fan_in = d_in * kernel * kernel;
        let weight = self.tensor(
            &format!("{key}.weight"),
            [d_out, d_in, kernel, kernel],
            Init::FanIn(fan_in),
        )?;
        let bias = self.tensor(&format!("{key}.bias"), [d_out], Init::Bias)?;
        Ok(Conv2d {
            weight: Param::from_tensor(weight),
            bias: Param::from_tensor(bias),
            kernel,
            stride,
        })
    }

    /// An affine `nn.GroupNorm`.
    pub fn group_norm(
        &mut self,
        key: &str,
        groups: usize,
        channels: usize,
        eps: f64,
    ) -> Result<GroupNorm<B>> {
        let gamma = self.tensor(&format!("{key}.weight"), [channels], Init::Ones)?;
        let beta = self.tensor(&format!("{key}.bias"), [channels], Init::Zeros)?;
        Ok(GroupNorm {
            gamma: Param::from_tensor(gamma),
            beta: Param::from_tensor(beta),
            groups,
            eps,
        })
    }

    /// An affine `nn.LayerNorm` over the last dim.
    pub fn layer_norm(&mut self, key: &str, dim: usize, eps: f64) -> Result<LayerNorm<B>> {
        let gamma = self.tensor(&format!("{key}.weight"), [dim], Init::Ones)?;
        let beta = self.tensor(&format!("{key}.bias"), [dim], Init::Zeros)?;
        let mut norm = LayerNormConfig::new(dim).with_epsilon(eps).init(&self.device);
        norm.gamma = Param::from_tensor(gamma);
        norm.beta = Some(Param::from_tensor(beta));
        Ok(norm)
    }
}

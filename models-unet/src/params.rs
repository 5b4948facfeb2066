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
use parallel_core::{Shard, Sharding};
use weights::{Part, WeightStore};

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
    /// The tensor-parallel part this build loads of the sharded parameters (`None`: whole).
    pub shard: Option<Shard>,
    /// Every parameter handed out (key, full PyTorch shape, placement), in build order.
    pub infos: Vec<(String, Vec<usize>, Sharding)>,
}

impl<'a, B: Backend> Params<'a, B> {
    /// Tensors taken from `store` (in its compute dtype).
    pub fn from_store(store: &'a mut WeightStore, device: &B::Device) -> Self {
        Params { store: Some(store), device: device.clone(), shard: None, infos: Vec::new() }
    }

    /// Random tensors (see [`Init`]) in the device's float dtype.
    pub fn random(device: &B::Device) -> Self {
        Params { store: None, device: device.clone(), shard: None, infos: Vec::new() }
    }

    /// Tensor-parallel ranks (1 when unsharded).
    pub fn world(&self) -> usize {
        self.shard.map_or(1, |s| s.world)
    }

    fn draw<const D: usize>(&self, shape: [usize; D], init: Init) -> Tensor<B, D> {
        let device = &self.device;
        match init {
            Init::FanIn(fan_in) => Tensor::random(
                shape,
                Distribution::Normal(0.0, 1.0 / (fan_in.max(1) as f64).sqrt()),
                device,
            ),
            Init::Bias => Tensor::random(shape, Distribution::Normal(0.0, 0.02), device),
            Init::Ones => Tensor::ones(shape, device),
            Init::Zeros => Tensor::zeros(shape, device),
        }
    }

    /// The tensor under `key`, which must have `shape`.
    pub fn tensor<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Tensor<B, D>> {
        self.infos.push((key.to_string(), shape.to_vec(), Sharding::Replicated));
        Ok(match &mut self.store {
            Some(store) => store.take(key, shape, &self.device)?,
            None => self.draw(shape, init),
        })
    }

    /// This rank's part of `key` (full stored shape `shape`) split along `dim` into
    /// `chunks · world` equal parts: part `c · world + rank` of every chunk `c`, concatenated
    /// (`chunks = 2` for GEGLU's value and gate halves, 1 otherwise). Only those parts are
    /// read. The whole tensor when the build is unsharded.
    pub fn tensor_split<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        dim: usize,
        chunks: usize,
        sharding: Sharding,
        init: Init,
    ) -> Result<Tensor<B, D>> {
        let Some(Shard { rank, world }) = self.shard.filter(|s| s.world > 1) else {
            return self.tensor(key, shape, init);
        };
        self.infos.push((key.to_string(), shape.to_vec(), sharding));
        let mut local = shape;
        local[dim] /= chunks * world;
        let parts = (0..chunks)
            .map(|c| {
                let part = Part { index: c * world + rank, of: chunks * world };
                Ok(match &mut self.store {
                    Some(store) => store.take_sharded(key, shape, dim, part, &self.device)?,
                    None => self.draw(local, init),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(parts, dim))
    }

    /// A column-parallel `nn.Linear` (output features split in `chunks` chunks, see
    /// [`tensor_split`](Self::tensor_split); its bias with them).
    pub fn linear_column(
        &mut self,
        key: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        chunks: usize,
    ) -> Result<Linear<B>> {
        let col = Sharding::Column { dim: 0 };
        let wkey = format!("{key}.weight");
        let weight = self.tensor_split(&wkey, [d_out, d_in], 0, chunks, col, Init::FanIn(d_in))?;
        let bias = if bias {
            let b =
                self.tensor_split(&format!("{key}.bias"), [d_out], 0, chunks, col, Init::Bias)?;
            Some(Param::from_tensor(b))
        } else {
            None
        };
        Ok(Linear { weight: Param::from_tensor(weight.transpose()), bias })
    }

    /// A row-parallel `nn.Linear` (input features split; the bias whole, added after the
    /// partial sums are reduced).
    pub fn linear_row(&mut self, key: &str, d_in: usize, d_out: usize) -> Result<Linear<B>> {
        let row = Sharding::Row { dim: 1 };
        let wkey = format!("{key}.weight");
        let weight = self.tensor_split(&wkey, [d_out, d_in], 1, 1, row, Init::FanIn(d_in))?;
        let bias = self.tensor(&format!("{key}.bias"), [d_out], Init::Bias)?;
        Ok(Linear {
            weight: Param::from_tensor(weight.transpose()),
            bias: Some(Param::from_tensor(bias)),
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
            weight: Param::from_tensor(kernels::conv_weight(weight, stride)),
            bias: Param::from_tensor(bias),
            kernel,
            stride,
            reduce: false,
            split_bias: false,
        })
    }

    /// A 3×3-style `nn.Conv2d` (stride 1) split over tensor-parallel ranks: column-parallel
    /// (output channels and bias split) or row-parallel (input channels split; the bias
    /// whole, added once after the reduce: [`Conv2d::reduce`]). A row-parallel conv always
    /// passes the reduce seam, so the sites do not depend on the plan.
    pub fn conv_split(
        &mut self,
        key: &str,
        [d_in, d_out]: [usize; 2],
        kernel: usize,
        sharding: Sharding,
    ) -> Result<Conv2d<B>> {
        let init = Init::FanIn(d_in * kernel * kernel);
        let shape = [d_out, d_in, kernel, kernel];
        let (wkey, bkey) = (format!("{key}.weight"), format!("{key}.bias"));
        let (weight, bias) = match sharding {
            Sharding::Column { .. } => (
                self.tensor_split(&wkey, shape, 0, 1, sharding, init)?,
                self.tensor_split(&bkey, [d_out], 0, 1, sharding, Init::Bias)?,
            ),
            Sharding::Row { .. } => (
                self.tensor_split(&wkey, shape, 1, 1, sharding, init)?,
                self.tensor(&bkey, [d_out], Init::Bias)?,
            ),
            Sharding::Replicated => {
                (self.tensor(&wkey, shape, init)?, self.tensor(&bkey, [d_out], Init::Bias)?)
            }
            Sharding::RowPacked { .. } => {
                unreachable!("no U-Net convolution packs its input channels")
            }
        };
        let reduce = matches!(sharding, Sharding::Row { .. });
        Ok(Conv2d {
            weight: Param::from_tensor(kernels::conv_weight(weight, 1)),
            bias: Param::from_tensor(bias),
            kernel,
            stride: 1,
            reduce,
            split_bias: reduce && self.world() > 1,
        })
    }

    /// An affine `nn.GroupNorm` over this rank's part of the channels, in whole groups (the
    /// column-parallel conv before it splits its output channels on group boundaries).
    pub fn group_norm_column(
        &mut self,
        key: &str,
        groups: usize,
        channels: usize,
        eps: f64,
    ) -> Result<GroupNorm<B>> {
        let col = Sharding::Column { dim: 0 };
        let gamma =
            self.tensor_split(&format!("{key}.weight"), [channels], 0, 1, col, Init::Ones)?;
        let beta = self.tensor_split(&format!("{key}.bias"), [channels], 0, 1, col, Init::Zeros)?;
        Ok(GroupNorm {
            gamma: Param::from_tensor(gamma),
            beta: Param::from_tensor(beta),
            groups: groups / self.world(),
            eps,
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

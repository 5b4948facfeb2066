//! `Encoder`, `Decoder` and `DiagonalGaussianDistribution` (diffusers
//! `models/autoencoders/vae.py`), with `norm_type="group"`.

use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::prelude::*;

use crate::VaeError;
use crate::config::AutoencoderKLConfig;
use crate::params::{ParamSource, conv, conv3x3, group_norm, norm, silu};
use crate::unet_2d_blocks::{DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D};

/// The VAE decoder: latent (after `post_quant_conv`) to image.
///
/// `conv_in` → `mid_block` → `up_blocks` (channels `block_out_channels` reversed,
/// `layers_per_block + 1` resnets each, an up-sampler in all but the last) → `conv_norm_out`
/// (GroupNorm eps 1e-6) → SiLU → `conv_out`. Keys are diffusers' under `decoder.`.
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// 3×3 convolution, latent channels to the last `block_out_channels`.
    pub conv_in: Conv2d<B>,
    /// Resnet, attention, resnet at the lowest resolution.
    pub mid_block: UNetMidBlock2D<B>,
    /// The up blocks, from the most channels to the fewest.
    pub up_blocks: Vec<UpDecoderBlock2D<B>>,
    /// GroupNorm over the first `block_out_channels`.
    pub conv_norm_out: GroupNorm<B>,
    /// 3×3 convolution to the image channels.
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Decoder<B> {
    pub(crate) fn build(
        src: &mut impl ParamSource<B>,
        prefix: &str,
        config: &AutoencoderKLConfig,
    ) -> Result<Self, VaeError> {
        let groups = config.norm_num_groups;
        let reversed: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let top = reversed[0];
        let conv_in = conv3x3(src, &format!("{prefix}.conv_in"), [config.latent_channels, top])?;
        let mid_block = UNetMidBlock2D::build(
            src,
            &format!("{prefix}.mid_block"),
            top,
            groups,
            config.mid_block_add_attention,
        )?;
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut prev = top;
        for (i, &out) in reversed.iter().enumerate() {
            up_blocks.push(UpDecoderBlock2D::build(
                src,
                &format!("{prefix}.up_blocks.{i}"),
                [prev, out],
                config.layers_per_block + 1,
                groups,
                i + 1 < reversed.len(),
            )?);
            prev = out;
        }
        let first = config.block_out_channels[0];
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(src, &format!("{prefix}.conv_norm_out"), groups, first)?,
            conv_out: conv3x3(src, &format!("{prefix}.conv_out"), [first, config.out_channels])?,
        })
    }

    /// Decodes a latent (already through `post_quant_conv`).
    ///
    /// # Shapes
    /// - `latent`: `[batch, latent_channels, height, width]`
    /// - output: `[batch, out_channels, s·height, s·width]`, s = 2^(blocks − 1)
    pub fn forward(&self, latent: Tensor<B, 4>) -> Tensor<B, 4> {
        let hidden = self.mid_block.forward(conv(&self.conv_in, latent));
        let hidden = self.up_blocks.iter().fold(hidden, |h, block| block.forward(h));
        conv(&self.conv_out, silu(norm(&self.conv_norm_out, hidden)))
    }
}

/// The VAE encoder: image to the parameters of the latent distribution (before `quant_conv`).
///
/// `conv_in` → `down_blocks` (`layers_per_block` resnets each, a down-sampler in all but the
/// last) → `mid_block` → `conv_norm_out` → SiLU → `conv_out` (to `2·latent_channels`: mean and
/// log-variance). Keys are diffusers' under `encoder.`.
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    /// 3×3 convolution, image channels to the first `block_out_channels`.
    pub conv_in: Conv2d<B>,
    /// The down blocks, from the fewest channels to the most.
    pub down_blocks: Vec<DownEncoderBlock2D<B>>,
    /// Resnet, attention, resnet at the lowest resolution.
    pub mid_block: UNetMidBlock2D<B>,
    /// GroupNorm over the last `block_out_channels`.
    pub conv_norm_out: GroupNorm<B>,
    /// 3×3 convolution to `2·latent_channels`.
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Encoder<B> {
    pub(crate) fn build(
        src: &mut impl ParamSource<B>,
        prefix: &str,
        config: &AutoencoderKLConfig,
    ) -> Result<Self, VaeError> {
        let groups = config.norm_num_groups;
        let channels = &config.block_out_channels;
        let first = channels[0];
        let last = channels[channels.len() - 1];
        let conv_in = conv3x3(src, &format!("{prefix}.conv_in"), [config.in_channels, first])?;
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut prev = first;
        for (i, &out) in channels.iter().enumerate() {
            down_blocks.push(DownEncoderBlock2D::build(
                src,
                &format!("{prefix}.down_blocks.{i}"),
                [prev, out],
                config.layers_per_block,
                groups,
                i + 1 < channels.len(),
            )?);
            prev = out;
        }
        let mid_block = UNetMidBlock2D::build(
            src,
            &format!("{prefix}.mid_block"),
            last,
            groups,
            config.mid_block_add_attention,
        )?;
        let latent2 = 2 * config.latent_channels;
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block,
            conv_norm_out: group_norm(src, &format!("{prefix}.conv_norm_out"), groups, last)?,
            conv_out: conv3x3(src, &format!("{prefix}.conv_out"), [last, latent2])?,
        })
    }

    /// Encodes an image into the moments of the latent distribution (before `quant_conv`).
    ///
    /// # Shapes
    /// - `image`: `[batch, in_channels, height, width]`
    /// - output: `[batch, 2·latent_channels, height/s, width/s]`, s = 2^(blocks − 1), each
    ///   halving rounding down
    pub fn forward(&self, image: Tensor<B, 4>) -> Tensor<B, 4> {
        let hidden = conv(&self.conv_in, image);
        let hidden = self.down_blocks.iter().fold(hidden, |h, block| block.forward(h));
        let hidden = self.mid_block.forward(hidden);
        conv(&self.conv_out, silu(norm(&self.conv_norm_out, hidden)))
    }
}

/// The latent distribution the encoder predicts: a diagonal Gaussian per latent element.
#[derive(Debug, Clone)]
pub struct DiagonalGaussianDistribution<B: Backend> {
    /// The mean, `[batch, latent_channels, height, width]`.
    pub mean: Tensor<B, 4>,
    /// The log-variance, clamped to [−30, 20] as diffusers does, same shape as `mean`.
    pub logvar: Tensor<B, 4>,
}

impl<B: Backend> DiagonalGaussianDistribution<B> {
    /// Splits the moments `[batch, 2·C, h, w]` into mean (first C channels) and log-variance
    /// (last C channels, clamped to [−30, 20]), as `torch.chunk(moments, 2, dim=1)`.
    ///
    /// # Shapes
    /// - `moments`: `[batch, 2·latent_channels, height, width]`
    pub fn from_moments(moments: Tensor<B, 4>) -> Self {
        let half = moments.dims()[1] / 2;
        let mean = moments.clone().narrow(1, 0, half);
        let logvar = moments.narrow(1, half, half).clamp(-30.0, 20.0);
        Self { mean, logvar }
    }

    /// The standard deviation `exp(logvar / 2)`.
    ///
    /// # Shapes
    /// - output: `[batch, latent_channels, height, width]`
    pub fn std(&self) -> Tensor<B, 4> {
        (self.logvar.clone() * 0.5).exp()
    }

    /// A sample `mean + std · noise`, with `noise` drawn by the caller from N(0, 1) (diffusers
    /// draws it with `randn_tensor`; passing it in keeps runs reproducible across backends).
    ///
    /// # Shapes
    /// - `noise`: `[batch, latent_channels, height, width]`
    /// - output: `[batch, latent_channels, height, width]`
    pub fn sample(&self, noise: Tensor<B, 4>) -> Tensor<B, 4> {
        self.mean.clone() + self.std() * noise
    }

    /// The mode of the distribution (its mean), as diffusers' `latent_dist.mode()`.
    ///
    /// # Shapes
    /// - output: `[batch, latent_channels, height, width]`
    pub fn mode(&self) -> Tensor<B, 4> {
        self.mean.clone()
    }
}

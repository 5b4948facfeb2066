//! The VAE's blocks from diffusers `models/unets/unet_2d_blocks.py`: `UNetMidBlock2D`,
//! `UpDecoderBlock2D` and `DownEncoderBlock2D`, all without time embedding.

use burn::prelude::*;

use crate::VaeError;
use crate::attention::Attention;
use crate::downsampling::Downsample2D;
use crate::params::ParamSource;
use crate::resnet::ResnetBlock2D;
use crate::upsampling::Upsample2D;

/// The middle of the encoder and the decoder: resnet, attention, resnet (one layer).
///
/// Keys: `resnets.0`, `attentions.0`, `resnets.1`. With `mid_block_add_attention = false`
/// there is no attention and `attentions` is empty.
#[derive(Module, Debug)]
pub struct UNetMidBlock2D<B: Backend> {
    /// The attention layers, one between each pair of resnets (empty when disabled).
    pub attentions: Vec<Attention<B>>,
    /// `num_layers + 1` resnets, channels to channels.
    pub resnets: Vec<ResnetBlock2D<B>>,
}

impl<B: Backend> UNetMidBlock2D<B> {
    pub(crate) fn build(
        src: &mut impl ParamSource<B>,
        prefix: &str,
        channels: usize,
        groups: usize,
        add_attention: bool,
    ) -> Result<Self, VaeError> {
        // diffusers' VAE mid block always has num_layers = 1.
        let num_layers = 1;
        let mut resnets = vec![ResnetBlock2D::build(
            src,
            &format!("{prefix}.resnets.0"),
            channels,
            channels,
            groups,
        )?];
        let mut attentions = Vec::new();
        for i in 0..num_layers {
            if add_attention {
                let key = format!("{prefix}.attentions.{i}");
                attentions.push(Attention::build(src, &key, channels, groups)?);
            }
            let key = format!("{prefix}.resnets.{}", i + 1);
            resnets.push(ResnetBlock2D::build(src, &key, channels, channels, groups)?);
        }
        Ok(Self { attentions, resnets })
    }

    /// # Shapes
    /// - `input`: `[batch, channels, height, width]`
    /// - output: `[batch, channels, height, width]`
    pub fn forward(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut hidden = self.resnets[0].forward(input);
        for (i, resnet) in self.resnets.iter().enumerate().skip(1) {
            if let Some(attention) = self.attentions.get(i - 1) {
                hidden = attention.forward(hidden);
            }
            hidden = resnet.forward(hidden);
        }
        hidden
    }
}

/// A decoder block: `num_layers` resnets, then (except in the last block) an [`Upsample2D`].
///
/// Keys: `resnets.{i}`, `upsamplers.0`.
#[derive(Module, Debug)]
pub struct UpDecoderBlock2D<B: Backend> {
    /// The resnets; the first maps the block's input channels to its output channels.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// Zero or one up-sampler (a list, as in diffusers, so the key is `upsamplers.0`).
    pub upsamplers: Vec<Upsample2D<B>>,
}

impl<B: Backend> UpDecoderBlock2D<B> {
    pub(crate) fn build(
        src: &mut impl ParamSource<B>,
        prefix: &str,
        [channels_in, channels_out]: [usize; 2],
        num_layers: usize,
        groups: usize,
        add_upsample: bool,
    ) -> Result<Self, VaeError> {
        let resnets = (0..num_layers)
            .map(|i| {
                let c_in = if i == 0 { channels_in } else { channels_out };
                ResnetBlock2D::build(
                    src,
                    &format!("{prefix}.resnets.{i}"),
                    c_in,
                    channels_out,
                    groups,
                )
            })
            .collect::<Result<_, _>>()?;
        let upsamplers = if add_upsample {
            vec![Upsample2D::build(src, &format!("{prefix}.upsamplers.0"), channels_out)?]
        } else {
            Vec::new()
        };
        Ok(Self { resnets, upsamplers })
    }

    /// # Shapes
    /// - `input`: `[batch, channels_in, height, width]`
    /// - output: `[batch, channels_out, s·height, s·width]`, s = 2 with an up-sampler, else 1
    pub fn forward(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        let hidden = self.resnets.iter().fold(input, |h, resnet| resnet.forward(h));
        self.upsamplers.iter().fold(hidden, |h, up| up.forward(h))
    }
}

/// An encoder block: `num_layers` resnets, then (except in the last block) a [`Downsample2D`].
///
/// Keys: `resnets.{i}`, `downsamplers.0`.
#[derive(Module, Debug)]
pub struct DownEncoderBlock2D<B: Backend> {
    /// The resnets; the first maps the block's input channels to its output channels.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// Zero or one down-sampler (key `downsamplers.0`).
    pub downsamplers: Vec<Downsample2D<B>>,
}

impl<B: Backend> DownEncoderBlock2D<B> {
    pub(crate) fn build(
        src: &mut impl ParamSource<B>,
        prefix: &str,
        [channels_in, channels_out]: [usize; 2],
        num_layers: usize,
        groups: usize,
        add_downsample: bool,
    ) -> Result<Self, VaeError> {
        let resnets = (0..num_layers)
            .map(|i| {
                let c_in = if i == 0 { channels_in } else { channels_out };
                ResnetBlock2D::build(
                    src,
                    &format!("{prefix}.resnets.{i}"),
                    c_in,
                    channels_out,
                    groups,
                )
            })
            .collect::<Result<_, _>>()?;
        let downsamplers = if add_downsample {
            vec![Downsample2D::build(src, &format!("{prefix}.downsamplers.0"), channels_out)?]
        } else {
            Vec::new()
        };
        Ok(Self { resnets, downsamplers })
    }

    /// # Shapes
    /// - `input`: `[batch, channels_in, height, width]`
    /// - output: `[batch, channels_out, height/s, width/s]`, s = 2 (rounding down) with a
    ///   down-sampler, else 1
    pub fn forward(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        let hidden = self.resnets.iter().fold(input, |h, resnet| resnet.forward(h));
        self.downsamplers.iter().fold(hidden, |h, down| down.forward(h))
    }
}

//! `ResnetBlock2D` (diffusers `models/resnet.py`) as the VAE uses it: no time embedding,
//! `output_scale_factor` 1, SiLU, GroupNorm eps 1e-6.

use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::prelude::*;

use crate::VaeError;
use crate::params::{ParamSource, conv, conv1x1, conv3x3, group_norm, norm, silu};

/// A pre-norm residual block: `shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`.
///
/// Keys (under the block's prefix): `norm1`, `conv1`, `norm2`, `conv2`, and `conv_shortcut`
/// (a 1×1 convolution) when the channel count changes.
#[derive(Module, Debug)]
pub struct ResnetBlock2D<B: Backend> {
    /// GroupNorm over the input channels.
    pub norm1: GroupNorm<B>,
    /// 3×3 convolution, input to output channels.
    pub conv1: Conv2d<B>,
    /// GroupNorm over the output channels.
    pub norm2: GroupNorm<B>,
    /// 3×3 convolution, output to output channels.
    pub conv2: Conv2d<B>,
    /// 1×1 convolution of the residual when input and output channels differ.
    pub conv_shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> ResnetBlock2D<B> {
    pub(crate) fn build(
        src: &mut impl ParamSource<B>,
        prefix: &str,
        channels_in: usize,
        channels_out: usize,
        groups: usize,
    ) -> Result<Self, VaeError> {
        Ok(Self {
            norm1: group_norm(src, &format!("{prefix}.norm1"), groups, channels_in)?,
            conv1: conv3x3(src, &format!("{prefix}.conv1"), [channels_in, channels_out])?,
            norm2: group_norm(src, &format!("{prefix}.norm2"), groups, channels_out)?,
            conv2: conv3x3(src, &format!("{prefix}.conv2"), [channels_out, channels_out])?,
            conv_shortcut: if channels_in != channels_out {
                Some(conv1x1(src, &format!("{prefix}.conv_shortcut"), [channels_in, channels_out])?)
            } else {
                None
            },
        })
    }

    /// Applies the block.
    ///
    /// # Shapes
    /// - `input`: `[batch, channels_in, height, width]`
    /// - output: `[batch, channels_out, height, width]`
    pub fn forward(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        let hidden = conv(&self.conv1, silu(norm(&self.norm1, input.clone())));
        let hidden = conv(&self.conv2, silu(norm(&self.norm2, hidden)));
        let shortcut = match &self.conv_shortcut {
            Some(shortcut) => conv(shortcut, input),
            None => input,
        };
        shortcut + hidden
    }
}

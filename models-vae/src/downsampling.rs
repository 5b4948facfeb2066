//! `Downsample2D` (diffusers `models/downsampling.py`) as the VAE encoder uses it:
//! `use_conv=True, padding=0`.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::prelude::*;

use crate::VaeError;
use crate::params::{ParamSource, conv2d};

/// Zero-pads one column on the right and one row at the bottom, then a 3×3 convolution with
/// stride 2 and no further padding (key `conv`).
#[derive(Module, Debug)]
pub struct Downsample2D<B: Backend> {
    /// 3×3 stride-2 convolution, channels to channels, padding (top 0, left 0, bottom 1,
    /// right 1).
    pub conv: Conv2d<B>,
}

impl<B: Backend> Downsample2D<B> {
    pub(crate) fn build(
        src: &mut impl ParamSource<B>,
        prefix: &str,
        channels: usize,
    ) -> Result<Self, VaeError> {
        // diffusers: F.pad(x, (0, 1, 0, 1)) then Conv2d(stride=2, padding=0). Burn's explicit
        // padding order is (top, left, bottom, right).
        let padding = PaddingConfig2d::Explicit(0, 0, 1, 1);
        Ok(Self {
            conv: conv2d(src, &format!("{prefix}.conv"), [channels, channels], 3, 2, padding)?,
        })
    }

    /// Halves height and width (rounding down).
    ///
    /// # Shapes
    /// - `input`: `[batch, channels, height, width]`
    /// - output: `[batch, channels, ⌊height/2⌋, ⌊width/2⌋]`
    pub fn forward(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        self.conv.forward(input)
    }
}

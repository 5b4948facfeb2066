//! `Upsample2D` (diffusers `models/upsampling.py`) with `use_conv=True`: nearest ×2, then a
//! 3×3 convolution.

use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

use crate::VaeError;
use crate::params::{ParamSource, conv, conv3x3};

/// Nearest-neighbour ×2 up-sampling followed by a 3×3 convolution (key `conv`).
#[derive(Module, Debug)]
pub struct Upsample2D<B: Backend> {
    /// 3×3 convolution, channels to channels.
    pub conv: Conv2d<B>,
}

impl<B: Backend> Upsample2D<B> {
    pub(crate) fn build(
        src: &mut impl ParamSource<B>,
        prefix: &str,
        channels: usize,
    ) -> Result<Self, VaeError> {
        Ok(Self { conv: conv3x3(src, &format!("{prefix}.conv"), [channels, channels])? })
    }

    /// Doubles height and width (each output pixel copies input pixel `(y/2, x/2)`, as
    /// `F.interpolate(scale_factor=2.0, mode="nearest")`), then convolves.
    ///
    /// # Shapes
    /// - `input`: `[batch, channels, height, width]`
    /// - output: `[batch, channels, 2·height, 2·width]`
    pub fn forward(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, _, height, width] = input.dims();
        let options = InterpolateOptions::new(InterpolateMode::Nearest);
        let up = interpolate(input, [2 * height, 2 * width], options);
        conv(&self.conv, up)
    }
}

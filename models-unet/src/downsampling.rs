//! `Downsample2D` (diffusers `models/downsampling.py`) with `use_conv = True`, padding 1.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::error::Result;
use crate::layers::{Band, Conv2d, Fwd};
use crate::params::Params;

/// A stride-2 3×3 convolution (key `conv`): `[h, w]` → `[⌈h/2⌉, ⌈w/2⌉]`.
#[derive(Module, Debug)]
pub struct Downsample2D<B: Backend> {
    /// Channels → channels, stride 2, padding 1.
    pub conv: Conv2d<B>,
}

impl<B: Backend> Downsample2D<B> {
    pub(crate) fn build(p: &mut Params<'_, B>, prefix: &str, channels: usize) -> Result<Self> {
        Ok(Downsample2D { conv: p.conv(&format!("{prefix}.conv"), [channels, channels], 3, 2)? })
    }

    /// # Shapes
    /// `[batch, c, band rows, width]` → `[batch, c, band rows / 2, ⌈width / 2⌉]`.
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        band: &Band,
        fwd: &mut Fwd<'_, B>,
    ) -> parallel_core::Result<(Tensor<B, 4>, Band)> {
        self.conv.forward(x, band, fwd)
    }
}

//! `Upsample2D` (diffusers `models/upsampling.py`) with `use_conv = True`: nearest-neighbour
//! interpolation, then a 3×3 convolution.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::error::Result;
use crate::layers::{Band, Conv2d, Fwd};
use crate::params::Params;

/// Nearest ×2 (or to the size of the skip connection it meets, when the latent is not a
/// multiple of the total down-sampling) and a 3×3 convolution (key `conv`).
#[derive(Module, Debug)]
pub struct Upsample2D<B: Backend> {
    /// Channels → channels, 3×3, padding 1.
    pub conv: Conv2d<B>,
}

/// PyTorch's `nearest` source index along one dim (`upsample_nearest` in
/// `aten/src/ATen/native/UpSample.h`): `min(⌊dst · (in / out)⌋, in − 1)` with the scale in
/// float32, exact `dst / 2` for a doubling.
fn nearest_indices(input: usize, output: usize) -> Vec<i64> {
    if output == 2 * input {
        return (0..output as i64).map(|d| d / 2).collect();
    }
    let scale = input as f32 / output as f32;
    (0..output).map(|d| ((d as f32 * scale).floor() as usize).min(input - 1) as i64).collect()
}

/// Nearest-neighbour interpolation of `[batch, c, h, w]` to `[batch, c, size[0], size[1]]`.
fn interpolate_nearest<B: Backend>(x: Tensor<B, 4>, size: [usize; 2]) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    if size == [2 * h, 2 * w] {
        // Each pixel repeated into a 2×2 block.
        return x.reshape([b, c, h, 1, w, 1]).expand([b, c, h, 2, w, 2]).reshape([
            b,
            c,
            2 * h,
            2 * w,
        ]);
    }
    let device = x.device();
    let index = |input: usize, output: usize| {
        Tensor::<B, 1, Int>::from_data(
            TensorData::new(nearest_indices(input, output), [output]),
            &device,
        )
    };
    x.select(2, index(h, size[0])).select(3, index(w, size[1]))
}

impl<B: Backend> Upsample2D<B> {
    pub(crate) fn build(p: &mut Params<'_, B>, prefix: &str, channels: usize) -> Result<Self> {
        Ok(Upsample2D { conv: p.conv(&format!("{prefix}.conv"), [channels, channels], 3, 1)? })
    }

    /// `size`: the whole map's output size when it is not twice the input (diffusers'
    /// `upsample_size`, only ever set for a whole-map forward).
    ///
    /// # Shapes
    /// `[batch, c, band rows, w]` → `[batch, c, 2 · band rows, 2w]` (or `size`).
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        band: &Band,
        size: Option<[usize; 2]>,
        fwd: &mut Fwd<'_, B>,
    ) -> parallel_core::Result<(Tensor<B, 4>, Band)> {
        let [_, _, h, w] = x.dims();
        let (x, band) = match size {
            Some(size) if band.is_full() && size != [2 * h, 2 * w] => {
                (interpolate_nearest(x, size), Band::full(size[0]))
            }
            _ => (interpolate_nearest(x, [2 * h, 2 * w]), band.up()),
        };
        self.conv.forward(x, &band, fwd)
    }
}

#[cfg(test)]
mod tests {
    use super::nearest_indices;

    #[test]
    fn nearest_indices_match_pytorch() {
        // torch.nn.functional.interpolate(torch.arange(5.)[None, None, :, None], size=(9, 1))
        assert_eq!(nearest_indices(5, 9), vec![0, 0, 1, 1, 2, 2, 3, 3, 4]);
        // size=(7, 1) from 3 rows: floor(d · 3/7)
        assert_eq!(nearest_indices(3, 7), vec![0, 0, 0, 1, 1, 2, 2]);
        assert_eq!(nearest_indices(2, 4), vec![0, 0, 1, 1]);
    }
}

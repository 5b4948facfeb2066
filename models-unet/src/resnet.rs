//! `ResnetBlock2D` (diffusers `models/resnet.py`) with a timestep embedding, as the U-Net's
//! down, mid and up blocks use it: `time_embedding_norm = "default"`, SiLU, no up/down
//! sampling inside.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use models_dit::linear;
use parallel_core::Sharding;

use crate::error::Result;
use crate::layers::{Band, Conv2d, Fwd, GroupNorm, silu};
use crate::params::Params;

/// `(shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + time_emb_proj(silu(temb))))))
/// / output_scale_factor`.
///
/// Keys (under the block's prefix): `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, and
/// `conv_shortcut` (1×1) when the channel count changes.
///
/// Under tensor parallelism (distrifuser's split) `conv1`, `time_emb_proj` and `norm2` hold
/// this rank's output channels (whole groups), `conv2` its input channels; `conv2`'s partial
/// output passes the reduce seam and its bias is added once after. `norm1` and the shortcut
/// are whole.
#[derive(Module, Debug)]
pub struct ResnetBlock2D<B: Backend> {
    /// GroupNorm over the input channels (eps `norm_eps`).
    pub norm1: GroupNorm<B>,
    /// 3×3, input → output channels.
    pub conv1: Conv2d<B>,
    /// The timestep embedding → output channels, added per channel.
    pub time_emb_proj: Linear<B>,
    /// GroupNorm over the output channels.
    pub norm2: GroupNorm<B>,
    /// 3×3, output → output channels.
    pub conv2: Conv2d<B>,
    /// 1×1 convolution of the residual when input and output channels differ.
    pub conv_shortcut: Option<Conv2d<B>>,
    /// The sum is divided by this (1 in every SD checkpoint).
    #[module(skip)]
    pub output_scale_factor: f64,
}

/// Sizes of one resnet.
pub(crate) struct ResnetSpec {
    pub channels: [usize; 2],
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl<B: Backend> ResnetBlock2D<B> {
    pub(crate) fn build(p: &mut Params<'_, B>, prefix: &str, spec: &ResnetSpec) -> Result<Self> {
        let [c_in, c_out] = spec.channels;
        let (col, row) = (Sharding::Column { dim: 0 }, Sharding::Row { dim: 1 });
        Ok(ResnetBlock2D {
            norm1: p.group_norm(&format!("{prefix}.norm1"), spec.groups, c_in, spec.eps)?,
            conv1: p.conv_split(&format!("{prefix}.conv1"), [c_in, c_out], 3, col)?,
            time_emb_proj: p.linear_column(
                &format!("{prefix}.time_emb_proj"),
                spec.temb,
                c_out,
                true,
                1,
            )?,
            norm2: p.group_norm_column(&format!("{prefix}.norm2"), spec.groups, c_out, spec.eps)?,
            conv2: p.conv_split(&format!("{prefix}.conv2"), [c_out, c_out], 3, row)?,
            conv_shortcut: if c_in != c_out {
                Some(p.conv(&format!("{prefix}.conv_shortcut"), [c_in, c_out], 1, 1)?)
            } else {
                None
            },
            output_scale_factor: spec.output_scale_factor,
        })
    }

    /// # Shapes
    /// - `x`: `[batch, in, band rows, width]`; `temb_act`: `silu(temb)`, `[batch, temb]`
    /// - output: `[batch, out, band rows, width]`
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        temb_act: &Tensor<B, 2>,
        band: &Band,
        fwd: &mut Fwd<'_, B>,
    ) -> parallel_core::Result<Tensor<B, 4>> {
        let h = silu(self.norm1.forward(x.clone(), band, fwd)?);
        let (h, _) = self.conv1.forward(h, band, fwd)?;
        let t = linear(&self.time_emb_proj, temb_act.clone());
        let h = h + t.unsqueeze_dim::<3>(2).unsqueeze_dim::<4>(3);
        let h = silu(self.norm2.forward(h, band, fwd)?);
        let (h, _) = self.conv2.forward(h, band, fwd)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x, band, fwd)?.0,
            None => x,
        };
        let out = shortcut + h;
        Ok(if self.output_scale_factor == 1.0 {
            out
        } else {
            out.div_scalar(self.output_scale_factor)
        })
    }
}

//! `Transformer2DModel` (diffusers `models/transformers/transformer_2d.py`) in its continuous
//! input form, as the U-Net's attention blocks use it.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use models_dit::linear;

use crate::attention::BasicTransformerBlock;
use crate::error::Result;
use crate::layers::{Band, Fwd, GroupNorm};
use crate::params::Params;

/// `x + proj_out(blocks(proj_in(norm(x))))` over the pixels of a feature map as tokens.
///
/// Keys: `norm` (GroupNorm, eps 1e-6), `proj_in`, `transformer_blocks.{j}`, `proj_out`. The
/// projections are `nn.Linear` with `use_linear_projection` (SD 2.x, SDXL), else 1×1
/// convolutions (SD 1.x), which compute the same per-pixel map; both are held as [`Linear`].
#[derive(Module, Debug)]
pub struct Transformer2DModel<B: Backend> {
    /// GroupNorm over the channels, eps 1e-6.
    pub norm: GroupNorm<B>,
    /// Channels → inner width (= channels in the U-Net).
    pub proj_in: Linear<B>,
    /// The transformer blocks.
    pub transformer_blocks: Vec<BasicTransformerBlock<B>>,
    /// Inner width → channels.
    pub proj_out: Linear<B>,
}

/// Sizes of one `Transformer2DModel`.
pub(crate) struct TransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

impl<B: Backend> Transformer2DModel<B> {
    pub(crate) fn build(
        p: &mut Params<'_, B>,
        prefix: &str,
        spec: &TransformerSpec,
    ) -> Result<Self> {
        let c = spec.channels;
        let proj = |p: &mut Params<'_, B>, key: &str| {
            if spec.linear_projection {
                p.linear(&format!("{prefix}.{key}"), c, c, true)
            } else {
                p.conv1x1_as_linear(&format!("{prefix}.{key}"), c, c)
            }
        };
        let norm = p.group_norm(&format!("{prefix}.norm"), spec.groups, c, 1e-6)?;
        let proj_in = proj(p, "proj_in")?;
        let transformer_blocks = (0..spec.layers)
            .map(|j| {
                BasicTransformerBlock::build(
                    p,
                    &format!("{prefix}.transformer_blocks.{j}"),
                    c,
                    spec.heads,
                    spec.cross_attention_dim,
                )
            })
            .collect::<Result<_>>()?;
        let proj_out = proj(p, "proj_out")?;
        Ok(Transformer2DModel { norm, proj_in, transformer_blocks, proj_out })
    }

    /// # Shapes
    /// - `x`: `[batch, c, band rows, width]`; `text`: `[batch, text tokens, cross dim]`
    /// - output: `[batch, c, band rows, width]`
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        text: &Tensor<B, 3>,
        text_bias: Option<&Tensor<B, 4>>,
        band: &Band,
        fwd: &mut Fwd<'_, B>,
    ) -> parallel_core::Result<Tensor<B, 4>> {
        let [batch, c, rows, width] = x.dims();
        let h = self.norm.forward(x.clone(), band, fwd)?;
        let h = h.reshape([batch, c, rows * width]).swap_dims(1, 2);
        let mut h = linear(&self.proj_in, h);
        for block in &self.transformer_blocks {
            let site = fwd.attention_site(band, width);
            h = block.forward(h, text, text_bias, &site, fwd.seams)?;
        }
        let h = linear(&self.proj_out, h);
        // Tokens back to channel-major: a batched transpose (`kernels::contiguous`'s tiles;
        // Flex's reshape would copy the view element by element).
        let h = kernels::contiguous(h.swap_dims(1, 2)).reshape([batch, c, rows, width]);
        Ok(h + x)
    }
}

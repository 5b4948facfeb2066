//! `BasicTransformerBlock` (diffusers `models/attention.py`) as the U-Net's
//! `Transformer2DModel` uses it: LayerNorms with affine parameters (eps 1e-5), self-attention,
//! cross-attention to the text, and a GEGLU feed-forward (exact GELU), each pre-norm with a
//! residual.
//!
//! The attention module is models-dit's [`Attention`] (diffusers' one `Attention` class with
//! `AttnProcessor2_0`): q/k/v without bias, `to_out.0` with bias; self-attention through the
//! [`self_attention`](parallel_core::Seams::self_attention) seam, the row-parallel outputs
//! through [`reduce_partial`](parallel_core::Seams::reduce_partial).

use burn::module::Module;
use burn::nn::{LayerNorm, Linear};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use models_dit::Attention;
use models_dit::linear;
use parallel_core::{AttentionSite, Projection, ReduceSite, Seams};

use crate::error::Result;
use crate::params::Params;

/// GEGLU feed-forward (key `ff`): `net.2(h · gelu(gate))` with `[h, gate] = net.0.proj(x)`
/// split in halves along the features.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// `ff.net.0.proj`: dim → 2 · inner (the value half, then the gate half).
    pub net_0_proj: Linear<B>,
    /// `ff.net.2`: inner → dim.
    pub net_2: Linear<B>,
    /// Inner width (4 · dim; this rank's part under tensor parallelism).
    #[module(skip)]
    pub inner: usize,
}

impl<B: Backend> FeedForward<B> {
    /// # Shapes
    /// `[batch, tokens, dim]` in and out.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        layer: usize,
        seams: &mut dyn Seams<B>,
    ) -> parallel_core::Result<Tensor<B, 3>> {
        // The value half then the gate half, fused (exact GELU).
        let h = kernels::geglu(linear(&self.net_0_proj, x), true);
        let reduce = ReduceSite { layer, projection: Projection::MlpOut };
        models_dit::row_parallel(&self.net_2, h, reduce, seams)
    }
}

/// One transformer block: `x += attn1(norm1(x))`, `x += attn2(norm2(x), text)`,
/// `x += ff(norm3(x))`.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock<B: Backend> {
    /// Before self-attention.
    pub norm1: LayerNorm<B>,
    /// Self-attention over the image tokens.
    pub attn1: Attention<B>,
    /// Before cross-attention.
    pub norm2: LayerNorm<B>,
    /// Cross-attention to the text embeddings.
    pub attn2: Attention<B>,
    /// Before the feed-forward.
    pub norm3: LayerNorm<B>,
    /// GEGLU feed-forward.
    pub ff: FeedForward<B>,
}

/// Under tensor parallelism q/k/v hold this rank's heads (column-parallel), `to_out.0` their
/// input features (row-parallel, reduced by the seam, bias once after).
fn attention<B: Backend>(
    p: &mut Params<'_, B>,
    prefix: &str,
    dim: usize,
    context: usize,
    heads: usize,
) -> Result<Attention<B>> {
    Ok(Attention {
        to_q: p.linear_column(&format!("{prefix}.to_q"), dim, dim, false, 1)?,
        to_k: p.linear_column(&format!("{prefix}.to_k"), context, dim, false, 1)?,
        to_v: p.linear_column(&format!("{prefix}.to_v"), context, dim, false, 1)?,
        to_out_0: p.linear_row(&format!("{prefix}.to_out.0"), dim, dim)?,
        heads: heads / p.world(),
        head_dim: dim / heads,
    })
}

impl<B: Backend> BasicTransformerBlock<B> {
    pub(crate) fn build(
        p: &mut Params<'_, B>,
        prefix: &str,
        dim: usize,
        heads: usize,
        cross_attention_dim: usize,
    ) -> Result<Self> {
        let inner = 4 * dim;
        Ok(BasicTransformerBlock {
            norm1: p.layer_norm(&format!("{prefix}.norm1"), dim, 1e-5)?,
            attn1: attention(p, &format!("{prefix}.attn1"), dim, dim, heads)?,
            norm2: p.layer_norm(&format!("{prefix}.norm2"), dim, 1e-5)?,
            attn2: attention(p, &format!("{prefix}.attn2"), dim, cross_attention_dim, heads)?,
            norm3: p.layer_norm(&format!("{prefix}.norm3"), dim, 1e-5)?,
            // Column-parallel in two chunks: this rank's columns of the value half and the
            // same columns of the gate half.
            ff: FeedForward {
                net_0_proj: p.linear_column(
                    &format!("{prefix}.ff.net.0.proj"),
                    dim,
                    2 * inner,
                    true,
                    2,
                )?,
                net_2: p.linear_row(&format!("{prefix}.ff.net.2"), inner, dim)?,
                inner: inner / p.world(),
            },
        })
    }

    /// # Shapes
    /// - `x`: `[batch, band tokens, dim]`; `text`: `[batch, text tokens, cross dim]`;
    ///   `text_bias`: `[batch, 1, 1, text tokens]` (padding as −10000) or none
    /// - output: `[batch, band tokens, dim]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        text: &Tensor<B, 3>,
        text_bias: Option<&Tensor<B, 4>>,
        site: &AttentionSite,
        seams: &mut dyn Seams<B>,
    ) -> parallel_core::Result<Tensor<B, 3>> {
        let h = self.attn1.self_attention(self.norm1.forward(x.clone()), site, seams)?;
        let x = x + h;
        let h = self.attn2.cross_attention(
            self.norm2.forward(x.clone()),
            text.clone(),
            text_bias.cloned(),
            site.layer,
            seams,
        )?;
        let x = x + h;
        let h = self.ff.forward(self.norm3.forward(x.clone()), site.layer, seams)?;
        Ok(x + h)
    }
}

//! The transformer block (diffusers `attention.BasicTransformerBlock`) in its two DiT-family
//! forms: `ada_norm_single` (PixArt: shared modulation plus the block's `scale_shift_table`,
//! cross-attention to text with no norm before it) and `ada_norm_zero` (DiT: the block's own
//! timestep/class embedder, no cross-attention).

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use parallel_core::{AttentionSite, Result, Seams};

use crate::attention::{Attention, FeedForward};
use kernels::{gated_residual, layer_norm_modulate};

use crate::normalization::AdaLayerNormZero;

/// One transformer block (key `transformer_blocks.i`).
#[derive(Module, Debug)]
pub struct BasicTransformerBlock<B: Backend> {
    /// DiT: adaLN-Zero conditioning of this block (`norm1`).
    pub norm1: Option<AdaLayerNormZero<B>>,
    /// Self-attention over image tokens (`attn1`).
    pub attn1: Attention<B>,
    /// PixArt: cross-attention to the caption (`attn2`).
    pub attn2: Option<Attention<B>>,
    /// Feed-forward (`ff`).
    pub ff: FeedForward<B>,
    /// PixArt: the block's learned `scale_shift_table`, `[6, hidden]`.
    pub scale_shift_table: Option<Param<Tensor<B, 2>>>,
    /// Eps of the LayerNorm before self-attention (PixArt `norm_eps`; DiT 1e-6).
    #[module(skip)]
    pub norm1_eps: f64,
    /// Eps of the LayerNorm before the feed-forward (PixArt `norm2`, DiT `norm3`: `norm_eps`).
    #[module(skip)]
    pub ff_norm_eps: f64,
}

/// Text the blocks cross-attend to: projected caption and its additive mask bias.
#[derive(Debug, Clone)]
pub struct Context<B: Backend> {
    /// `[batch, text_tokens, hidden]`.
    pub states: Tensor<B, 3>,
    /// `[batch, 1, 1, text_tokens]`: 0 to keep, −10000 for padding.
    pub bias: Option<Tensor<B, 4>>,
}

impl<B: Backend> BasicTransformerBlock<B> {
    /// The block's six modulation vectors (shift, scale, gate for attention; shift, scale,
    /// gate for the MLP) from the shared adaLN-single output (PixArt) or from its own
    /// adaLN-Zero embedder (DiT).
    ///
    /// # Shapes
    /// - `shared`: `[batch, 6·hidden]` (PixArt); `timestep`, `labels`: `[batch]` (DiT)
    /// - output: `[batch, 6, hidden]`
    pub fn modulation(
        &self,
        shared: Option<&Tensor<B, 2>>,
        timestep: &Tensor<B, 1>,
        labels: Option<&Tensor<B, 1, Int>>,
    ) -> Option<Tensor<B, 3>> {
        let m = match (&self.norm1, &self.scale_shift_table, shared, labels) {
            (Some(norm1), _, _, Some(labels)) => norm1.forward(timestep.clone(), labels.clone()),
            (None, Some(_), Some(shared), _) => shared.clone(),
            _ => return None,
        };
        let [batch, six_h] = m.dims();
        let m = m.reshape([batch, 6, six_h / 6]);
        Some(match &self.scale_shift_table {
            Some(table) => table.val().unsqueeze::<3>() + m,
            None => m,
        })
    }

    /// Runs the block on a band of image tokens.
    ///
    /// # Shapes
    /// - `hidden`: `[batch, tokens, hidden]`; `modulation`: `[batch, 6, hidden]`
    /// - output: `[batch, tokens, hidden]`
    pub fn forward(
        &self,
        hidden: Tensor<B, 3>,
        modulation: &Tensor<B, 3>,
        context: Option<&Context<B>>,
        site: &AttentionSite,
        seams: &mut dyn Seams<B>,
    ) -> Result<Tensor<B, 3>> {
        let m = |i: usize| modulation.clone().narrow(1, i, 1);
        let (shift_msa, scale_msa, gate_msa) = (m(0), m(1), m(2));
        let (shift_mlp, scale_mlp, gate_mlp) = (m(3), m(4), m(5));

        let norm =
            layer_norm_modulate(hidden.clone(), self.norm1_eps, Some(scale_msa), Some(shift_msa));
        let attn = self.attn1.self_attention(norm, site, seams)?;
        let mut hidden = gated_residual(hidden, Some(gate_msa), attn);

        if let (Some(attn2), Some(ctx)) = (&self.attn2, context) {
            // PixArt applies no norm before cross-attention (norm2 is used for the MLP).
            let out = attn2.cross_attention(
                hidden.clone(),
                ctx.states.clone(),
                ctx.bias.clone(),
                site.layer,
                seams,
            )?;
            hidden = gated_residual(hidden, None, out);
        }

        let norm =
            layer_norm_modulate(hidden.clone(), self.ff_norm_eps, Some(scale_mlp), Some(shift_mlp));
        let ff = self.ff.forward(norm, site.layer, seams)?;
        Ok(gated_residual(hidden, Some(gate_mlp), ff))
    }
}

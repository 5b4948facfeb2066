//! The mid-block self-attention of the VAE: diffusers' `Attention` with
//! `_from_deprecated_attn_block=True` and `AttnProcessor2_0`
//! (`models/attention_processor.py`).

use burn::nn::{GroupNorm, Linear};
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::VaeError;
use crate::params::{ParamSource, group_norm, linear, norm};

/// Single-head self-attention over the pixels of a feature map, with a residual connection.
///
/// `x + to_out(softmax(q·kᵀ/√C)·v)` where `q, k, v = to_q/to_k/to_v(group_norm(x))` act on the
/// channel vector of each pixel. In the VAE `heads = C / attention_head_dim = 1` (the head
/// dimension is the channel count) and `rescale_output_factor` is 1, so neither is stored.
///
/// Keys: `group_norm`, `to_q`, `to_k`, `to_v`, `to_out.0` (diffusers' `to_out` is
/// `[Linear, Dropout]`; the field here is the Linear). Checkpoints saved before diffusers renamed
/// these (`query`, `key`, `value`, `proj_attn`) are not read.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// GroupNorm over the channels, before the projections.
    pub group_norm: GroupNorm<B>,
    /// Query projection, `[C, C]`.
    pub to_q: Linear<B>,
    /// Key projection, `[C, C]`.
    pub to_k: Linear<B>,
    /// Value projection, `[C, C]`.
    pub to_v: Linear<B>,
    /// Output projection, `[C, C]` (key `to_out.0`).
    pub to_out: Linear<B>,
}

impl<B: Backend> Attention<B> {
    pub(crate) fn build(
        src: &mut impl ParamSource<B>,
        prefix: &str,
        channels: usize,
        groups: usize,
    ) -> Result<Self, VaeError> {
        Ok(Self {
            group_norm: group_norm(src, &format!("{prefix}.group_norm"), groups, channels)?,
            to_q: linear(src, &format!("{prefix}.to_q"), channels, channels)?,
            to_k: linear(src, &format!("{prefix}.to_k"), channels, channels)?,
            to_v: linear(src, &format!("{prefix}.to_v"), channels, channels)?,
            to_out: linear(src, &format!("{prefix}.to_out.0"), channels, channels)?,
        })
    }

    /// Applies attention over the `height·width` pixels, plus the residual.
    ///
    /// # Shapes
    /// - `input`: `[batch, channels, height, width]`
    /// - output: `[batch, channels, height, width]`
    pub fn forward(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, channels, height, width] = input.dims();
        let tokens = height * width;
        // GroupNorm over [B, C, H, W] equals diffusers' GroupNorm over [B, C, H·W].
        let hidden = norm(&self.group_norm, input.clone());
        let hidden = hidden.reshape([batch, channels, tokens]).swap_dims(1, 2);
        // One head: [B, 1, tokens, C].
        let heads = |t: Tensor<B, 3>| t.unsqueeze_dim::<4>(1);
        let q = heads(self.to_q.forward(hidden.clone()));
        let k = heads(self.to_k.forward(hidden.clone()));
        let v = heads(self.to_v.forward(hidden));
        // Default scale 1/√head_dim, as torch's scaled_dot_product_attention.
        let out = attention(q, k, v, None, None, AttentionModuleOptions::default());
        let out = self.to_out.forward(out.reshape([batch, tokens, channels]));
        let out = out.swap_dims(1, 2).reshape([batch, channels, height, width]);
        out + input
    }
}

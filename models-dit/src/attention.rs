//! Attention and feed-forward (diffusers `attention_processor.Attention` with
//! `AttnProcessor2_0`, and `attention.FeedForward`), written for one device with the seams
//! where tensor and sequence parallelism act.
//!
//! Under tensor parallelism these modules hold a rank's slice: q/k/v and `ff.net.0.proj` are
//! column-parallel (this rank's heads / inner features), `to_out.0` and `ff.net.2`
//! row-parallel; the row-parallel product `x·W` goes through
//! [`Seams::reduce_partial`](parallel_core::Seams::reduce_partial) and the bias is added
//! once, after the reduce.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use parallel_core::attention::sdpa;
use parallel_core::{AttentionSite, Projection, ReduceSite, Result, Seams};

/// `x·W + b` of a linear layer through [`kernels::linear`] (one GEMM over all rows, the bias
/// accumulated onto, on Flex/f32; Burn's `linear` elsewhere).
///
/// # Shapes
/// `[..., in]` → `[..., out]`.
pub fn linear<B: Backend, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    kernels::linear(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()))
}

/// `x·W` of a row-parallel projection, summed over ranks by the reduce seam, plus the bias
/// (added once, after the sum).
///
/// # Shapes
/// `[batch, tokens, local in]` → `[batch, tokens, out]`.
pub fn row_parallel<B: Backend>(
    linear: &Linear<B>,
    x: Tensor<B, 3>,
    site: ReduceSite,
    seams: &mut dyn Seams<B>,
) -> Result<Tensor<B, 3>> {
    let partial = kernels::linear(x, linear.weight.val(), None);
    let sum = seams.reduce_partial(&site, partial)?;
    Ok(match &linear.bias {
        Some(bias) => sum + bias.val().unsqueeze::<3>(),
        None => sum,
    })
}

/// Multi-head attention (key `attn1` for self-attention over image tokens, `attn2` for
/// cross-attention to text).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `to_q`: hidden → heads·head_dim (this rank's heads).
    pub to_q: Linear<B>,
    /// `to_k`: hidden (or cross_attention_dim) → heads·head_dim.
    pub to_k: Linear<B>,
    /// `to_v`: hidden (or cross_attention_dim) → heads·head_dim.
    pub to_v: Linear<B>,
    /// `to_out.0`: heads·head_dim → hidden (row-parallel).
    pub to_out_0: Linear<B>,
    /// Heads this instance holds (all heads / tensor-parallel world).
    #[module(skip)]
    pub heads: usize,
    /// Channels per head.
    #[module(skip)]
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// `[batch, tokens, heads·d]` → `[batch, heads, tokens, d]`.
    fn split_heads(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [batch, tokens, _] = x.dims();
        x.reshape([batch, tokens, self.heads, self.head_dim]).swap_dims(1, 2)
    }

    /// `[batch, heads, tokens, d]` → `[batch, tokens, heads·d]`.
    fn merge_heads(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, heads, tokens, d] = x.dims();
        // A strategy's exchange may hand the heads back in `[b, h, n, d]` order: copied run by
        // run then (a no-op when they are already where the merge wants them).
        kernels::contiguous(x.swap_dims(1, 2)).reshape([batch, tokens, heads * d])
    }

    /// Self-attention of this band's image tokens; the attention itself is the
    /// [`Seams::self_attention`] seam (serial: over these tokens only).
    ///
    /// # Shapes
    /// `[batch, tokens, hidden]` in and out.
    pub fn self_attention(
        &self,
        x: Tensor<B, 3>,
        site: &AttentionSite,
        seams: &mut dyn Seams<B>,
    ) -> Result<Tensor<B, 3>> {
        let q = self.split_heads(linear(&self.to_q, x.clone()));
        let k = self.split_heads(linear(&self.to_k, x.clone()));
        let v = self.split_heads(linear(&self.to_v, x));
        let out = seams.self_attention(site, q, k, v)?;
        let reduce = ReduceSite { layer: site.layer, projection: Projection::SelfAttnOut };
        row_parallel(&self.to_out_0, self.merge_heads(out), reduce, seams)
    }

    /// Cross-attention of image tokens to text tokens, with an additive bias on the text
    /// positions (−10000 for padding).
    ///
    /// # Shapes
    /// - `x`: `[batch, tokens, hidden]`; `context`: `[batch, text_tokens, cross_dim]`;
    ///   `bias`: `[batch, 1, 1, text_tokens]`
    /// - output: `[batch, tokens, hidden]`
    pub fn cross_attention(
        &self,
        x: Tensor<B, 3>,
        context: Tensor<B, 3>,
        bias: Option<Tensor<B, 4>>,
        layer: usize,
        seams: &mut dyn Seams<B>,
    ) -> Result<Tensor<B, 3>> {
        let q = self.split_heads(linear(&self.to_q, x));
        let k = self.split_heads(linear(&self.to_k, context.clone()));
        let v = self.split_heads(linear(&self.to_v, context));
        let out = sdpa(q, k, v, bias);
        let reduce = ReduceSite { layer, projection: Projection::CrossAttnOut };
        row_parallel(&self.to_out_0, self.merge_heads(out), reduce, seams)
    }
}

/// Feed-forward (key `ff`): `net.2(gelu(net.0.proj(x)))`, inner width 4·hidden.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// `ff.net.0.proj`: hidden → inner (column-parallel).
    pub net_0_proj: Linear<B>,
    /// `ff.net.2`: inner → hidden (row-parallel).
    pub net_2: Linear<B>,
    /// Tanh-approximate GELU (`gelu-approximate`) or exact (`gelu`).
    #[module(skip)]
    pub approximate: bool,
}

impl<B: Backend> FeedForward<B> {
    /// # Shapes
    /// `[batch, tokens, hidden]` in and out.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        layer: usize,
        seams: &mut dyn Seams<B>,
    ) -> Result<Tensor<B, 3>> {
        self.forward_at(x, ReduceSite { layer, projection: Projection::MlpOut }, seams)
    }

    /// [`forward`](Self::forward) with the down-projection reduced at `site` (an MMDiT's
    /// text-stream feed-forward is [`Projection::ContextMlpOut`]).
    ///
    /// # Shapes
    /// `[batch, tokens, hidden]` in and out.
    pub fn forward_at(
        &self,
        x: Tensor<B, 3>,
        site: ReduceSite,
        seams: &mut dyn Seams<B>,
    ) -> Result<Tensor<B, 3>> {
        let h = kernels::gelu(linear(&self.net_0_proj, x), self.approximate);
        row_parallel(&self.net_2, h, site, seams)
    }
}

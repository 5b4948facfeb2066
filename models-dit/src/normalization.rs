//! Normalization layers (diffusers `normalization.py`; the affine-free LayerNorm itself is
//! `kernels::layer_norm_modulate`): the two adaptive conditionings, adaLN-single (PixArt) and adaLN-Zero (DiT).

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::embeddings::{
    CombinedTimestepLabelEmbeddings, PixArtAlphaCombinedTimestepSizeEmbeddings,
};

/// adaLN-single of PixArt (diffusers `AdaLayerNormSingle`, key `adaln_single`): one
/// timestep (and size) embedding shared by all blocks, projected to the six modulation
/// vectors; each block then adds its own `scale_shift_table`.
#[derive(Module, Debug)]
pub struct AdaLayerNormSingle<B: Backend> {
    /// `adaln_single.emb`.
    pub emb: PixArtAlphaCombinedTimestepSizeEmbeddings<B>,
    /// `adaln_single.linear`: hidden → 6·hidden.
    pub linear: Linear<B>,
}

impl<B: Backend> AdaLayerNormSingle<B> {
    /// Returns `(linear(silu(emb)), emb)`: the blocks' modulation and the embedded timestep
    /// the final layer uses.
    ///
    /// # Shapes
    /// - `timestep`: `[batch]`; `size`: see
    ///   [`PixArtAlphaCombinedTimestepSizeEmbeddings::forward`]
    /// - output: `([batch, 6·hidden], [batch, hidden])`
    pub fn forward(
        &self,
        timestep: Tensor<B, 1>,
        size: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let embedded = self.emb.forward(timestep, size);
        (self.linear.forward(silu(embedded.clone())), embedded)
    }
}

/// adaLN-Zero of DiT (diffusers `AdaLayerNormZero`, key `transformer_blocks.i.norm1`): each
/// block has its own timestep/class embedder and modulation projection. Its LayerNorm has a
/// fixed eps of 1e-6 (applied by the block).
#[derive(Module, Debug)]
pub struct AdaLayerNormZero<B: Backend> {
    /// `norm1.emb`.
    pub emb: CombinedTimestepLabelEmbeddings<B>,
    /// `norm1.linear`: hidden → 6·hidden.
    pub linear: Linear<B>,
}

impl<B: Backend> AdaLayerNormZero<B> {
    /// The six modulation vectors `linear(silu(emb(t, y)))` (shift, scale, gate for the
    /// attention, then for the MLP).
    ///
    /// # Shapes
    /// - `timestep`, `labels`: `[batch]`
    /// - output: `[batch, 6·hidden]`
    pub fn forward(&self, timestep: Tensor<B, 1>, labels: Tensor<B, 1, Int>) -> Tensor<B, 2> {
        self.linear.forward(silu(self.emb.forward(timestep, labels)))
    }
}

//! The model seams: the places in a model's forward where a strategy may act.
//!
//! A model is written once, for one device, and calls these methods of a
//! `&mut dyn Seams<B>` it is handed. Every method has a serial default, so [`Serial`] (a
//! unit struct implementing none of them) makes the model plain single-device code.
//!
//! | seam | serial default | who overrides it |
//! |---|---|---|
//! | [`self_attention`](Seams::self_attention) | attention over the local tokens | Ulysses (all-to-all heads↔tokens), Ring (K/V round the ring, log-sum-exp merge), DistriFusion (stale K/V buffer + async gather), PipeFusion (per-stage K/V buffer), naive patch (the default: local tokens only) |
//! | [`reduce_partial`](Seams::reduce_partial) | identity | tensor parallel (all-reduce of row-parallel outputs; the model adds the bias after) |
//! | [`conv_halo`](Seams::conv_halo) | no halo rows (the conv pads with zeros) | DistriFusion on a U-Net (neighbours' boundary rows, fresh or stale) |
//! | [`group_norm_stats`](Seams::group_norm_stats) | local statistics | DistriFusion on a U-Net (sync, stale, corrected-async) |

use std::ops::Range;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::attention::sdpa;
use crate::error::Result;

/// Where a self-attention over image tokens happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionSite {
    /// The layer (transformer block index; for a U-Net, the running index of its attention
    /// blocks).
    pub layer: usize,
    /// The tokens of the full image sequence this rank holds (its q, k, v rows).
    pub tokens: Range<usize>,
    /// Tokens in the full image sequence.
    pub total_tokens: usize,
}

/// Which row-parallel projection a partial sum comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    /// The self-attention output projection.
    SelfAttnOut,
    /// The cross-attention output projection.
    CrossAttnOut,
    /// The feed-forward down-projection.
    MlpOut,
}

/// Where a partial sum after a row-parallel projection is reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReduceSite {
    /// The transformer block.
    pub layer: usize,
    /// The projection.
    pub projection: Projection,
}

/// Where a row-split feature map needs neighbours' rows or statistics (U-Net).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowSite {
    /// The running index of the conv (or group norm) in the forward.
    pub index: usize,
    /// The rows of the full feature map this rank holds, at this layer's resolution.
    pub rows: Range<usize>,
    /// Rows of the full feature map at this layer's resolution.
    pub total_rows: usize,
}

/// A feature map extended with neighbours' rows for a convolution.
#[derive(Debug, Clone)]
pub struct Halo<B: Backend> {
    /// `[batch, channels, top + local rows + bottom, width]`.
    pub tensor: Tensor<B, 4>,
    /// Real rows prepended (the model zero-pads the rest of its padding).
    pub top: usize,
    /// Real rows appended.
    pub bottom: usize,
}

/// Group-norm statistics of (a band of) a feature map.
#[derive(Debug, Clone)]
pub struct GroupNormStats<B: Backend> {
    /// Per batch entry and group, the sum of values, `[batch, groups]` (float32).
    pub sum: Tensor<B, 2>,
    /// Per batch entry and group, the sum of squared values, `[batch, groups]` (float32).
    pub sum_sq: Tensor<B, 2>,
    /// Elements per group that the sums cover.
    pub count: usize,
}

/// The seams a model calls; every method has the serial behaviour as its default.
pub trait Seams<B: Backend> {
    /// Self-attention of this rank's image tokens.
    ///
    /// # Shapes
    /// `q`, `k`, `v`: `[batch, heads, local tokens, head_dim]` (heads: the heads this rank
    /// holds); output like `q`.
    fn self_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let _ = site;
        Ok(sdpa(q, k, v, None))
    }

    /// The sum over ranks of a row-parallel projection's partial output (before its bias).
    ///
    /// # Shapes
    /// `[batch, tokens, features]` in and out.
    fn reduce_partial(&mut self, site: &ReduceSite, partial: Tensor<B, 3>) -> Result<Tensor<B, 3>> {
        let _ = site;
        Ok(partial)
    }

    /// `x` extended by up to `halo` real rows above and below for a `(2·halo+1)`-row kernel.
    fn conv_halo(&mut self, site: &RowSite, x: Tensor<B, 4>, halo: usize) -> Result<Halo<B>> {
        let _ = (site, halo);
        Ok(Halo { tensor: x, top: 0, bottom: 0 })
    }

    /// The group-norm statistics to normalise this rank's band with.
    fn group_norm_stats(
        &mut self,
        site: &RowSite,
        local: GroupNormStats<B>,
    ) -> Result<GroupNormStats<B>> {
        let _ = site;
        Ok(local)
    }
}

/// The serial seams: a model run with these is plain single-device code.
#[derive(Debug, Clone, Copy, Default)]
pub struct Serial;

impl<B: Backend> Seams<B> for Serial {}

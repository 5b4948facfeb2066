//! The band a rank computes, the forward's seam context, and the two layers that meet the
//! seams of a row-split feature map: [`Conv2d`] (halo rows) and [`GroupNorm`] (statistics).

use std::ops::Range;

use burn::module::{Module, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use parallel_core::{
    AttentionSite, ParallelError, Projection, ReduceSite, RowSite, Seams, group_norm,
};

/// The rows of a feature map this forward computes, at that map's resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Band {
    /// This rank's rows.
    pub rows: Range<usize>,
    /// Rows of the whole feature map.
    pub total: usize,
}

impl Band {
    /// All `total` rows.
    pub fn full(total: usize) -> Self {
        Band { rows: 0..total, total }
    }

    /// Whether the band is the whole map.
    pub fn is_full(&self) -> bool {
        self.rows.start == 0 && self.rows.end == self.total
    }

    /// The band after a stride-2, padding-1, 3×3 convolution: `⌈total/2⌉` rows for the whole
    /// map (as PyTorch); half the rows of an even band otherwise.
    pub fn down(&self) -> Band {
        if self.is_full() {
            Band::full(self.total.div_ceil(2))
        } else {
            Band { rows: self.rows.start / 2..self.rows.end / 2, total: self.total / 2 }
        }
    }

    /// The band after a nearest ×2 up-sampling.
    pub fn up(&self) -> Band {
        Band { rows: 2 * self.rows.start..2 * self.rows.end, total: 2 * self.total }
    }

    fn site(&self, index: usize) -> RowSite {
        RowSite { index, rows: self.rows.clone(), total_rows: self.total }
    }
}

/// One forward's seams and the running indices of the sites it passes.
pub struct Fwd<'a, B: Backend> {
    /// The strategy's seams (or [`parallel_core::Serial`]).
    pub seams: &'a mut dyn Seams<B>,
    conv: usize,
    norm: usize,
    attention: usize,
    conv_reduce: usize,
}

impl<'a, B: Backend> Fwd<'a, B> {
    /// A forward starting at site 0 of every kind.
    pub fn new(seams: &'a mut dyn Seams<B>) -> Self {
        Fwd { seams, conv: 0, norm: 0, attention: 0, conv_reduce: 0 }
    }

    /// The next self-attention site (one per transformer block) over a band of a map `width`
    /// pixels wide.
    pub fn attention_site(&mut self, band: &Band, width: usize) -> AttentionSite {
        let layer = self.attention;
        self.attention += 1;
        AttentionSite {
            layer,
            tokens: band.rows.start * width..band.rows.end * width,
            total_tokens: band.total * width,
        }
    }

    /// Sites passed so far: (convolutions with a halo, group norms, self-attentions).
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.conv, self.norm, self.attention)
    }
}

/// `x / (1 + exp(−x))` (PyTorch's SiLU) through the project's kernel.
pub(crate) fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    kernels::silu(x)
}

/// A `k × k` convolution with bias, stride 1 or 2, padding `(k − 1)/2` (diffusers' every
/// `nn.Conv2d` with `k > 1` in the U-Net).
///
/// On a band of rows, the `(k − 1)/2` rows above and below come from the
/// [`conv_halo`](Seams::conv_halo) seam; the image's own top and bottom (and any row the
/// seam does not supply) are zero padding, as in the whole-map convolution.
#[derive(Module, Debug)]
pub struct Conv2d<B: Backend> {
    /// `[out, in, k, k]`.
    pub weight: Param<Tensor<B, 4>>,
    /// `[out]`.
    pub bias: Param<Tensor<B, 1>>,
    /// Kernel size `k` (odd).
    #[module(skip)]
    pub kernel: usize,
    /// Stride (1, or 2 for a down-sampler).
    #[module(skip)]
    pub stride: usize,
    /// A resnet's second conv: its output passes [`reduce_partial`](Seams::reduce_partial)
    /// (the sum of row-parallel partial outputs under tensor parallelism; identity serially).
    #[module(skip)]
    pub reduce: bool,
    /// The weight holds this rank's input channels only: the bias is added once, after the
    /// reduce.
    #[module(skip)]
    pub split_bias: bool,
}

impl<B: Backend> Conv2d<B> {
    fn conv(&self, x: Tensor<B, 4>, top: usize, bottom: usize) -> Tensor<B, 4> {
        let bias = (!self.split_bias).then(|| self.bias.val());
        let padding = kernels::ConvPadding { top, bottom, cols: self.kernel / 2 };
        kernels::conv2d(x, self.weight.val(), bias, self.stride, padding)
    }

    /// A reducing conv's output summed over ranks by the seam, then its bias where split.
    fn reduced(
        &self,
        out: Tensor<B, 4>,
        fwd: &mut Fwd<'_, B>,
    ) -> parallel_core::Result<Tensor<B, 4>> {
        if !self.reduce {
            return Ok(out);
        }
        let [b, c, h, w] = out.dims();
        let site = ReduceSite { layer: fwd.conv_reduce, projection: Projection::ConvOut };
        fwd.conv_reduce += 1;
        let sum =
            fwd.seams.reduce_partial(&site, out.reshape([b, c, h * w]))?.reshape([b, c, h, w]);
        Ok(if self.split_bias { sum + self.bias.val().reshape([1, c, 1, 1]) } else { sum })
    }

    /// The band's output rows, with halo rows from the seam.
    ///
    /// # Shapes
    /// `[batch, in, band rows, width]` → `[batch, out, band rows / stride, ⌈width / stride⌉]`.
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        band: &Band,
        fwd: &mut Fwd<'_, B>,
    ) -> parallel_core::Result<(Tensor<B, 4>, Band)> {
        let p = self.kernel / 2;
        let out_band = if self.stride == 2 { band.down() } else { band.clone() };
        if p == 0 {
            let out = self.conv(x, 0, 0);
            return Ok((self.reduced(out, fwd)?, out_band));
        }
        let site = band.site(fwd.conv);
        fwd.conv += 1;
        let halo = fwd.seams.conv_halo(&site, x, p)?;
        if halo.top > p || halo.bottom > p {
            return Err(ParallelError::Model(format!(
                "conv_halo at conv {} returned {} rows above and {} below; at most {p} were asked",
                site.index, halo.top, halo.bottom
            )));
        }
        let out = self.conv(halo.tensor, p - halo.top, p - halo.bottom);
        Ok((self.reduced(out, fwd)?, out_band))
    }

    /// `conv_in` over the band's rows of the *whole* input: its halo rows are real input rows
    /// (every rank has the full latents), so no seam is involved.
    ///
    /// # Shapes
    /// `[batch, in, total rows, width]` → `[batch, out, band rows, width]`.
    pub fn forward_input(&self, input: Tensor<B, 4>, band: &Band) -> Tensor<B, 4> {
        let p = self.kernel / 2;
        if band.is_full() {
            return self.conv(input, p, p);
        }
        let start = band.rows.start.saturating_sub(p);
        let end = (band.rows.end + p).min(band.total);
        let x = input.narrow(2, start, end - start);
        self.conv(x, p - (band.rows.start - start), p - (end - band.rows.end))
    }
}

/// An affine GroupNorm whose statistics pass the [`group_norm_stats`](Seams::group_norm_stats)
/// seam: the band's own (serial), or statistics a strategy merges over ranks or keeps stale.
///
/// Statistics and normalisation in float32 (as PyTorch's CPU kernel for half inputs), two
/// passes (mean, then squared deviations), biased variance: `(x − mean)/√(var + eps)·γ + β`.
#[derive(Module, Debug)]
pub struct GroupNorm<B: Backend> {
    /// `[channels]`.
    pub gamma: Param<Tensor<B, 1>>,
    /// `[channels]`.
    pub beta: Param<Tensor<B, 1>>,
    /// Groups of channels.
    #[module(skip)]
    pub groups: usize,
    /// Added to the variance.
    #[module(skip)]
    pub eps: f64,
}

impl<B: Backend> GroupNorm<B> {
    /// # Shapes
    /// `[batch, channels, band rows, width]` in and out.
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        band: &Band,
        fwd: &mut Fwd<'_, B>,
    ) -> parallel_core::Result<Tensor<B, 4>> {
        let site = band.site(fwd.norm);
        fwd.norm += 1;
        let (gamma, beta) = (Some(self.gamma.val()), Some(self.beta.val()));
        group_norm(x, gamma, beta, self.groups, self.eps, &site, fwd.seams)
    }
}

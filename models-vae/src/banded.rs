//! The decoder over a band of rows: the same modules as [`Decoder::forward`], with the
//! places where a band needs other rows going through parallel-core's seams, so that a
//! patch-parallel decode (every rank one band, `parallel_core::split::ExactRows`) equals the
//! whole-image decode and holds about `1/N` of its activations.
//!
//! A band of latent rows `a..b` becomes rows `a·s..b·s` of the image (`s` the spatial scale):
//! every 3×3 convolution after `conv_in` takes its halo rows from
//! [`conv_halo`](Seams::conv_halo), every GroupNorm its statistics from
//! [`group_norm_stats`](Seams::group_norm_stats), the mid-block attention its keys and values
//! from [`self_attention`](Seams::self_attention); `conv_in` reads its halo from the whole
//! latent, which every rank has. With [`parallel_core::Serial`] seams a band is decoded alone
//! (zero halos, local statistics and attention): what the tests set beside the exact seams.

use std::ops::Range;

use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use parallel_core::{AttentionSite, RowSite, Seams};

use crate::VaeError;
use crate::attention::Attention;
use crate::autoencoder_kl::AutoencoderKL;
use crate::params::silu;
use crate::resnet::ResnetBlock2D;
use crate::unet_2d_blocks::{UNetMidBlock2D, UpDecoderBlock2D};

/// A band's rows of a feature map, and the running site indices of the forward.
struct Rows<'a, B: Backend> {
    seams: &'a mut dyn Seams<B>,
    /// This band's rows at the current resolution.
    rows: Range<usize>,
    /// Rows of the whole map at the current resolution.
    total: usize,
    conv: usize,
    norm: usize,
    attention: usize,
}

impl<B: Backend> Rows<'_, B> {
    fn site(&self, index: usize) -> RowSite {
        RowSite { index, rows: self.rows.clone(), total_rows: self.total }
    }

    fn double(&mut self) {
        self.rows = 2 * self.rows.start..2 * self.rows.end;
        self.total *= 2;
    }
}

/// A stride-1 convolution with `top`/`bottom` rows of zero padding and the conv's own column
/// padding ([`kernels::conv2d`]: the project's CPU convolution on Flex/f32; on other backends
/// Burn's, the rows padded by concatenation since Burn 0.21's asymmetric padding pads in the
/// default float dtype).
fn conv_rows<B: Backend>(
    conv: &Conv2d<B>,
    x: Tensor<B, 4>,
    top: usize,
    bottom: usize,
) -> Tensor<B, 4> {
    let cols = conv.kernel_size[0] / 2;
    let bias = conv.bias.as_ref().map(|b| b.val());
    let padding = kernels::ConvPadding { top, bottom, cols };
    kernels::conv2d(x, conv.weight.val(), bias, 1, padding)
}

/// A 3×3 (or 1×1) convolution of the band, halo rows from the seam.
fn conv<B: Backend>(
    conv: &Conv2d<B>,
    x: Tensor<B, 4>,
    f: &mut Rows<'_, B>,
) -> parallel_core::Result<Tensor<B, 4>> {
    let p = conv.kernel_size[0] / 2;
    if p == 0 {
        return Ok(conv_rows(conv, x, 0, 0));
    }
    let site = f.site(f.conv);
    f.conv += 1;
    let halo = f.seams.conv_halo(&site, x, p)?;
    Ok(conv_rows(conv, halo.tensor, p - halo.top, p - halo.bottom))
}

/// GroupNorm of the band with statistics from the seam ([`parallel_core::group_norm`]).
fn group_norm<B: Backend>(
    norm: &GroupNorm<B>,
    x: Tensor<B, 4>,
    f: &mut Rows<'_, B>,
) -> parallel_core::Result<Tensor<B, 4>> {
    let site = f.site(f.norm);
    f.norm += 1;
    let (gamma, beta) = (norm.gamma.as_ref().map(|g| g.val()), norm.beta.as_ref().map(|b| b.val()));
    parallel_core::group_norm(x, gamma, beta, norm.num_groups, norm.epsilon, &site, f.seams)
}

fn resnet<B: Backend>(
    block: &ResnetBlock2D<B>,
    x: Tensor<B, 4>,
    f: &mut Rows<'_, B>,
) -> parallel_core::Result<Tensor<B, 4>> {
    let h = silu(group_norm(&block.norm1, x.clone(), f)?);
    let h = conv(&block.conv1, h, f)?;
    let h = silu(group_norm(&block.norm2, h, f)?);
    let h = conv(&block.conv2, h, f)?;
    let shortcut = match &block.conv_shortcut {
        Some(c) => conv(c, x, f)?,
        None => x,
    };
    Ok(shortcut + h)
}

fn attend<B: Backend>(
    block: &Attention<B>,
    x: Tensor<B, 4>,
    f: &mut Rows<'_, B>,
) -> parallel_core::Result<Tensor<B, 4>> {
    let [batch, channels, height, width] = x.dims();
    let tokens = height * width;
    let hidden = group_norm(&block.group_norm, x.clone(), f)?;
    let hidden = hidden.reshape([batch, channels, tokens]).swap_dims(1, 2);
    let heads = |t: Tensor<B, 3>| t.unsqueeze_dim::<4>(1);
    let q = heads(block.to_q.forward(hidden.clone()));
    let k = heads(block.to_k.forward(hidden.clone()));
    let v = heads(block.to_v.forward(hidden));
    let site = AttentionSite {
        layer: f.attention,
        tokens: f.rows.start * width..f.rows.end * width,
        total_tokens: f.total * width,
    };
    f.attention += 1;
    let out = f.seams.self_attention(&site, q, k, v)?;
    let out = block.to_out.forward(out.reshape([batch, tokens, channels]));
    Ok(out.swap_dims(1, 2).reshape([batch, channels, height, width]) + x)
}

fn mid<B: Backend>(
    block: &UNetMidBlock2D<B>,
    x: Tensor<B, 4>,
    f: &mut Rows<'_, B>,
) -> parallel_core::Result<Tensor<B, 4>> {
    let mut h = resnet(&block.resnets[0], x, f)?;
    for (i, r) in block.resnets.iter().enumerate().skip(1) {
        if let Some(a) = block.attentions.get(i - 1) {
            h = attend(a, h, f)?;
        }
        h = resnet(r, h, f)?;
    }
    Ok(h)
}

fn up<B: Backend>(
    block: &UpDecoderBlock2D<B>,
    x: Tensor<B, 4>,
    f: &mut Rows<'_, B>,
) -> parallel_core::Result<Tensor<B, 4>> {
    let mut h = x;
    for r in &block.resnets {
        h = resnet(r, h, f)?;
    }
    for u in &block.upsamplers {
        let [_, _, height, width] = h.dims();
        let options = InterpolateOptions::new(InterpolateMode::Nearest);
        h = interpolate(h, [2 * height, 2 * width], options);
        f.double();
        h = conv(&u.conv, h, f)?;
    }
    Ok(h)
}

impl<B: Backend> AutoencoderKL<B> {
    /// Rows `rows` of the decoded image's latent (rows `rows·s` of the image), given the whole
    /// latent `z` as [`decode`](Self::decode) takes it (already unscaled) and the seams that
    /// supply what the band needs of other rows (see the [module docs](self)).
    ///
    /// # Shapes
    /// - `z`: `[batch, latent_channels, height, width]`
    /// - output: `[batch, out_channels, s·rows.len(), s·width]`
    ///
    /// # Errors
    /// [`VaeError::Shape`] for latents `decode` refuses or an empty or out-of-range band;
    /// [`VaeError::Seam`] when a seam fails (a collective timing out, a peer gone).
    pub fn decode_rows(
        &self,
        z: Tensor<B, 4>,
        rows: Range<usize>,
        seams: &mut dyn Seams<B>,
    ) -> Result<Tensor<B, 4>, VaeError> {
        let dims = z.dims();
        if dims[1] != self.config.latent_channels || dims.contains(&0) {
            return Err(VaeError::Shape {
                what: "decode_rows: latents",
                expected: format!(
                    "[batch, {}, height, width] (non-empty)",
                    self.config.latent_channels
                ),
                got: dims.to_vec(),
            });
        }
        let height = dims[2];
        if rows.start >= rows.end || rows.end > height {
            return Err(VaeError::Shape {
                what: "decode_rows: band",
                expected: format!("a non-empty range of the latent's {height} rows"),
                got: vec![rows.start, rows.end],
            });
        }
        let z = match &self.post_quant_conv {
            Some(c) => conv_rows(c, z, 0, 0),
            None => z,
        };
        let d = &self.decoder;
        // conv_in over the band, its halo rows from the whole latent.
        let p = d.conv_in.kernel_size[0] / 2;
        let start = rows.start.saturating_sub(p);
        let end = (rows.end + p).min(height);
        let x = z.narrow(2, start, end - start);
        let h = conv_rows(&d.conv_in, x, p - (rows.start - start), p - (end - rows.end));
        let mut f = Rows { seams, rows, total: height, conv: 0, norm: 0, attention: 0 };
        let run = |f: &mut Rows<'_, B>| -> parallel_core::Result<Tensor<B, 4>> {
            let mut h = mid(&d.mid_block, h, f)?;
            for block in &d.up_blocks {
                h = up(block, h, f)?;
            }
            let h = silu(group_norm(&d.conv_norm_out, h, f)?);
            conv(&d.conv_out, h, f)
        };
        run(&mut f).map_err(|e| VaeError::Seam(e.to_string()))
    }
}

//! The U-Net's blocks from diffusers `models/unets/unet_2d_blocks.py`: [`DownBlock`]
//! (`DownBlock2D`, `CrossAttnDownBlock2D`), [`UNetMidBlock2DCrossAttn`] and [`UpBlock`]
//! (`UpBlock2D`, `CrossAttnUpBlock2D`).
//!
//! A cross-attention block is its plain counterpart with a `Transformer2DModel` after each
//! resnet; both variants run one loop (`attentions` empty for the plain one).

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::downsampling::Downsample2D;
use crate::error::Result;
use crate::layers::{Band, Fwd};
use crate::params::Params;
use crate::resnet::{ResnetBlock2D, ResnetSpec};
use crate::transformer_2d::{Transformer2DModel, TransformerSpec};
use crate::upsampling::Upsample2D;

/// What every block's forward reads besides its input.
pub struct BlockInputs<'t, B: Backend> {
    /// `silu(temb)`, `[batch, time_embed_dim]`.
    pub temb_act: Tensor<B, 2>,
    /// Text embeddings, `[batch, text tokens, cross dim]`.
    pub text: &'t Tensor<B, 3>,
    /// Additive text-padding bias, `[batch, 1, 1, text tokens]`, if a mask was given.
    pub text_bias: Option<&'t Tensor<B, 4>>,
}

/// A feature map with the band it covers.
pub type Banded<B> = (Tensor<B, 4>, Band);

/// A block's resnets, transformers (none for a plain block) and samplers.
type Parts<'a, B, S> = (&'a [ResnetBlock2D<B>], &'a [Transformer2DModel<B>], &'a [S]);

/// `DownBlock2D`: resnets, then a down-sampler (all but the last block).
/// Keys: `resnets.{j}`, `downsamplers.0`.
#[derive(Module, Debug)]
pub struct DownBlock2D<B: Backend> {
    /// The resnets; the first maps the block's input channels to its output channels.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// Zero or one down-sampler.
    pub downsamplers: Vec<Downsample2D<B>>,
}

/// `CrossAttnDownBlock2D`: each resnet followed by a `Transformer2DModel`.
/// Keys: `resnets.{j}`, `attentions.{j}`, `downsamplers.0`.
#[derive(Module, Debug)]
pub struct CrossAttnDownBlock2D<B: Backend> {
    /// The resnets.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// One transformer after each resnet.
    pub attentions: Vec<Transformer2DModel<B>>,
    /// Zero or one down-sampler.
    pub downsamplers: Vec<Downsample2D<B>>,
}

/// A down block of either kind.
#[derive(Module, Debug)]
pub enum DownBlock<B: Backend> {
    /// `DownBlock2D`.
    Plain(DownBlock2D<B>),
    /// `CrossAttnDownBlock2D`.
    CrossAttn(CrossAttnDownBlock2D<B>),
}

/// Sizes of one down or up block.
pub(crate) struct BlockSpec {
    /// Down: input channels. Up: the skip channels of its last resnet.
    pub in_channels: usize,
    pub out_channels: usize,
    /// Up blocks only: channels coming from the block below.
    pub prev_output_channels: usize,
    pub layers: usize,
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
    pub resnet_scale: f64,
    pub sample: bool,
    /// `Some` for a cross-attention block: heads, transformer layers, text width, linear
    /// projections.
    pub attention: Option<(usize, usize, usize, bool)>,
}

impl BlockSpec {
    fn resnet(&self, channels: [usize; 2]) -> ResnetSpec {
        ResnetSpec {
            channels,
            temb: self.temb,
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: self.resnet_scale,
        }
    }

    fn transformer(&self, channels: usize) -> Option<TransformerSpec> {
        self.attention.map(|(heads, layers, cross, linear)| TransformerSpec {
            channels,
            heads,
            layers,
            cross_attention_dim: cross,
            groups: self.groups,
            linear_projection: linear,
        })
    }
}

fn attentions<B: Backend>(
    p: &mut Params<'_, B>,
    prefix: &str,
    spec: &Option<TransformerSpec>,
    n: usize,
) -> Result<Vec<Transformer2DModel<B>>> {
    match spec {
        None => Ok(Vec::new()),
        Some(t) => (0..n)
            .map(|j| Transformer2DModel::build(p, &format!("{prefix}.attentions.{j}"), t))
            .collect(),
    }
}

impl<B: Backend> DownBlock<B> {
    pub(crate) fn build(p: &mut Params<'_, B>, prefix: &str, spec: &BlockSpec) -> Result<Self> {
        let resnets = (0..spec.layers)
            .map(|j| {
                let c_in = if j == 0 { spec.in_channels } else { spec.out_channels };
                ResnetBlock2D::build(
                    p,
                    &format!("{prefix}.resnets.{j}"),
                    &spec.resnet([c_in, spec.out_channels]),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = attentions(p, prefix, &spec.transformer(spec.out_channels), spec.layers)?;
        let downsamplers = if spec.sample {
            vec![Downsample2D::build(p, &format!("{prefix}.downsamplers.0"), spec.out_channels)?]
        } else {
            Vec::new()
        };
        Ok(if spec.attention.is_some() {
            DownBlock::CrossAttn(CrossAttnDownBlock2D { resnets, attentions, downsamplers })
        } else {
            DownBlock::Plain(DownBlock2D { resnets, downsamplers })
        })
    }

    fn parts(&self) -> Parts<'_, B, Downsample2D<B>> {
        match self {
            DownBlock::Plain(b) => (&b.resnets, &[], &b.downsamplers),
            DownBlock::CrossAttn(b) => (&b.resnets, &b.attentions, &b.downsamplers),
        }
    }

    /// The block's output and the skip connections it leaves (one per resnet, one after the
    /// down-sampler), in order.
    pub fn forward(
        &self,
        (x, band): Banded<B>,
        inputs: &BlockInputs<'_, B>,
        fwd: &mut Fwd<'_, B>,
    ) -> parallel_core::Result<(Banded<B>, Vec<Banded<B>>)> {
        let (resnets, attentions, downsamplers) = self.parts();
        let mut skips = Vec::with_capacity(resnets.len() + 1);
        let (mut h, mut band) = (x, band);
        for (j, resnet) in resnets.iter().enumerate() {
            h = resnet.forward(h, &inputs.temb_act, &band, fwd)?;
            if let Some(attn) = attentions.get(j) {
                h = attn.forward(h, inputs.text, inputs.text_bias, &band, fwd)?;
            }
            skips.push((h.clone(), band.clone()));
        }
        for down in downsamplers {
            (h, band) = down.forward(h, &band, fwd)?;
            skips.push((h.clone(), band.clone()));
        }
        Ok(((h, band), skips))
    }
}

/// `UNetMidBlock2DCrossAttn` with one layer: resnet, transformer, resnet.
/// Keys: `resnets.0`, `attentions.0`, `resnets.1`.
#[derive(Module, Debug)]
pub struct UNetMidBlock2DCrossAttn<B: Backend> {
    /// One more resnet than transformers.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// The transformers, each between two resnets.
    pub attentions: Vec<Transformer2DModel<B>>,
}

impl<B: Backend> UNetMidBlock2DCrossAttn<B> {
    /// `spec.out_channels` is the channel count; `spec.resnet_scale` the mid block scale.
    pub(crate) fn build(p: &mut Params<'_, B>, prefix: &str, spec: &BlockSpec) -> Result<Self> {
        let c = spec.out_channels;
        let resnets = (0..2)
            .map(|j| {
                ResnetBlock2D::build(p, &format!("{prefix}.resnets.{j}"), &spec.resnet([c, c]))
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = attentions(p, prefix, &spec.transformer(c), 1)?;
        Ok(UNetMidBlock2DCrossAttn { resnets, attentions })
    }

    /// # Shapes
    /// `[batch, c, band rows, w]` in and out.
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        band: &Band,
        inputs: &BlockInputs<'_, B>,
        fwd: &mut Fwd<'_, B>,
    ) -> parallel_core::Result<Tensor<B, 4>> {
        let mut h = self.resnets[0].forward(x, &inputs.temb_act, band, fwd)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(h, inputs.text, inputs.text_bias, band, fwd)?;
            h = resnet.forward(h, &inputs.temb_act, band, fwd)?;
        }
        Ok(h)
    }
}

/// `UpBlock2D`: resnets over `cat([h, skip])`, then an up-sampler (all but the last block).
/// Keys: `resnets.{j}`, `upsamplers.0`.
#[derive(Module, Debug)]
pub struct UpBlock2D<B: Backend> {
    /// The resnets.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// Zero or one up-sampler.
    pub upsamplers: Vec<Upsample2D<B>>,
}

/// `CrossAttnUpBlock2D`: each resnet followed by a `Transformer2DModel`.
/// Keys: `resnets.{j}`, `attentions.{j}`, `upsamplers.0`.
#[derive(Module, Debug)]
pub struct CrossAttnUpBlock2D<B: Backend> {
    /// The resnets.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// One transformer after each resnet.
    pub attentions: Vec<Transformer2DModel<B>>,
    /// Zero or one up-sampler.
    pub upsamplers: Vec<Upsample2D<B>>,
}

/// An up block of either kind.
#[derive(Module, Debug)]
pub enum UpBlock<B: Backend> {
    /// `UpBlock2D`.
    Plain(UpBlock2D<B>),
    /// `CrossAttnUpBlock2D`.
    CrossAttn(CrossAttnUpBlock2D<B>),
}

impl<B: Backend> UpBlock<B> {
    pub(crate) fn build(p: &mut Params<'_, B>, prefix: &str, spec: &BlockSpec) -> Result<Self> {
        let resnets = (0..spec.layers)
            .map(|j| {
                let skip = if j == spec.layers - 1 { spec.in_channels } else { spec.out_channels };
                let c_in = if j == 0 { spec.prev_output_channels } else { spec.out_channels };
                ResnetBlock2D::build(
                    p,
                    &format!("{prefix}.resnets.{j}"),
                    &spec.resnet([c_in + skip, spec.out_channels]),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = attentions(p, prefix, &spec.transformer(spec.out_channels), spec.layers)?;
        let upsamplers = if spec.sample {
            vec![Upsample2D::build(p, &format!("{prefix}.upsamplers.0"), spec.out_channels)?]
        } else {
            Vec::new()
        };
        Ok(if spec.attention.is_some() {
            UpBlock::CrossAttn(CrossAttnUpBlock2D { resnets, attentions, upsamplers })
        } else {
            UpBlock::Plain(UpBlock2D { resnets, upsamplers })
        })
    }

    fn parts(&self) -> Parts<'_, B, Upsample2D<B>> {
        match self {
            UpBlock::Plain(b) => (&b.resnets, &[], &b.upsamplers),
            UpBlock::CrossAttn(b) => (&b.resnets, &b.attentions, &b.upsamplers),
        }
    }

    /// Skip connections this block consumes (one per resnet).
    pub fn num_skips(&self) -> usize {
        self.parts().0.len()
    }

    /// Consumes skip connections from the end of `skips`; `upsample_size` is the size of the
    /// next skip (diffusers forwards it when the latent is not a multiple of the total
    /// down-sampling).
    pub fn forward(
        &self,
        (x, band): Banded<B>,
        skips: &mut Vec<Banded<B>>,
        upsample_size: Option<[usize; 2]>,
        inputs: &BlockInputs<'_, B>,
        fwd: &mut Fwd<'_, B>,
    ) -> parallel_core::Result<Banded<B>> {
        let (resnets, attentions, upsamplers) = self.parts();
        let (mut h, mut band) = (x, band);
        for (j, resnet) in resnets.iter().enumerate() {
            let (skip, skip_band) = skips.pop().ok_or_else(|| {
                parallel_core::ParallelError::Model(
                    "U-Net: fewer skip connections than resnets".into(),
                )
            })?;
            debug_assert_eq!(skip_band, band, "skip connection on another band");
            h = Tensor::cat(vec![h, skip], 1);
            h = resnet.forward(h, &inputs.temb_act, &band, fwd)?;
            if let Some(attn) = attentions.get(j) {
                h = attn.forward(h, inputs.text, inputs.text_bias, &band, fwd)?;
            }
        }
        for up in upsamplers {
            (h, band) = up.forward(h, &band, upsample_size, fwd)?;
        }
        Ok((h, band))
    }
}

//! # models-unet
//!
//! The Stable Diffusion U-Net, diffusers' `UNet2DConditionModel` (0.42), for SD 1.x (conv
//! `proj_in`/`proj_out`), SD 2.x (linear projections, per-level heads, `upcast_attention`)
//! and SDXL (`transformer_layers_per_block`, `addition_embed_type = "text_time"`), computing
//! what diffusers computes (checked against its outputs in `tests/integration/diffusers_parity.rs`) and
//! written once for one device with the seams where the U-Net strategies act.
//!
//! | piece | file | diffusers |
//! |---|---|---|
//! | [`UNet2DConditionModel`], [`UnetModel`] | `unet_2d_condition.rs` | `unets/unet_2d_condition.py` |
//! | [`DownBlock`], [`UNetMidBlock2DCrossAttn`], [`UpBlock`] | `unet_2d_blocks.rs` | `unets/unet_2d_blocks.py` |
//! | [`ResnetBlock2D`] | `resnet.rs` | `resnet.py` |
//! | [`Downsample2D`], [`Upsample2D`] | `downsampling.rs`, `upsampling.rs` | `downsampling.py`, `upsampling.py` |
//! | [`Transformer2DModel`] | `transformer_2d.rs` | `transformers/transformer_2d.py` |
//! | [`BasicTransformerBlock`], GEGLU [`FeedForward`] | `attention.rs` | `attention.py` (the `Attention` module is models-dit's, the same diffusers class) |
//! | [`Conv2d`], [`GroupNorm`], [`Band`] | `layers.rs` | — (the seams) |
//!
//! Details that decide equality: the ResNet GroupNorms use `norm_eps` (1e-5), the
//! transformers' GroupNorm 1e-6; `attention_head_dim` is the number of heads (diffusers'
//! naming quirk); skips are concatenated `cat([h, skip])`; up-sampling is PyTorch's
//! `nearest`, to the skip's size when a latent side is not a multiple of `2^downsamplers`;
//! SDXL's added embedding is `[text_embeds, time_ids embedding]`, text first.
//!
//! ## The seams
//!
//! [`Denoiser::forward_rows`](parallel_core::Denoiser::forward_rows) computes the output of a
//! band of latent rows (a multiple of the total down-sampling, [`ModelDesc::row_granularity`]:
//! 8 for SD, 4 for SDXL); at a level down-sampled by `2^l` the band is the rows `/2^l`. Where
//! the band needs what other rows hold, the forward calls the seams, whose serial defaults
//! make the whole-latent forward plain single-device code:
//!
//! | seam | site index | called at |
//! |---|---|---|
//! | [`conv_halo`](parallel_core::Seams::conv_halo) | running over every k×k convolution with k > 1 after `conv_in` (resnets' `conv1`/`conv2`, down- and up-samplers, `conv_out`) | before the convolution; rows not supplied are zero padding. `conv_in` reads its halo from the full input every rank has. |
//! | [`group_norm_stats`](parallel_core::Seams::group_norm_stats) | running over every GroupNorm (resnets' `norm1`/`norm2`, transformers' `norm`, `conv_norm_out`) | with the band's own mean and `M2` |
//! | [`self_attention`](parallel_core::Seams::self_attention) | running over transformer blocks (one `attn1` each) | the band's tokens `rows·width` at that resolution |
//! | [`reduce_partial`](parallel_core::Seams::reduce_partial) | the transformer block | after `attn1.to_out.0`, `attn2.to_out.0`, `ff.net.2` |
//!
//! [`ModelDesc::row_granularity`]: parallel_core::ModelDesc::row_granularity
//!
//! Strategies that only apply to transformers (Ulysses, Ring, PipeFusion) refuse
//! [`ModelFamily::Unet`](parallel_core::ModelFamily::Unet) in their `validate`. The loader
//! refuses tensor-parallel and pipeline load plans for now: the weights are loaded whole.

mod attention;
mod config;
mod downsampling;
mod error;
mod layers;
mod params;
mod resnet;
mod transformer_2d;
mod unet_2d_blocks;
mod unet_2d_condition;
mod upsampling;

pub use attention::{BasicTransformerBlock, FeedForward};
pub use config::{BlockKind, CLASS_NAME, PRESETS, TextTimeConfig, UNet2DConditionConfig};
pub use downsampling::Downsample2D;
pub use error::{Result, UnetError};
pub use layers::{Band, Conv2d, Fwd, GroupNorm};
pub use resnet::ResnetBlock2D;
pub use transformer_2d::Transformer2DModel;
pub use unet_2d_blocks::{
    CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock, DownBlock2D, UNetMidBlock2DCrossAttn,
    UpBlock, UpBlock2D,
};
pub use unet_2d_condition::{
    TimestepEmbedding, UNet2DConditionModel, UnetModel, WEIGHTS_FILE, timestep_proj,
};
pub use upsampling::Upsample2D;

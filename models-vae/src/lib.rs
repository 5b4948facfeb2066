//! diffusers' `AutoencoderKL` in Burn: the VAE that turns latents into images (and images into
//! latents), plus PNG output of the decoded images.
//!
//! # Use
//!
//! ```no_run
//! # fn main() -> Result<(), models_vae::VaeError> {
//! use burn::prelude::*;
//! use models_vae::{AutoencoderKL, VaeParts, save_png, to_image};
//! # type B = burn_flex::Flex;
//! let device = Default::default();
//! let vae = AutoencoderKL::<B>::from_pretrained("pipeline/vae", VaeParts::DecoderOnly, &device)?;
//! let latents = Tensor::<B, 4>::zeros([1, 4, 64, 64], &device); // from the denoising loop
//! let sample = vae.decode_latents(latents)?; // [1, 3, 512, 512], about [-1, 1]
//! save_png(&to_image(sample)?, "out.png")?;
//! # Ok(())
//! # }
//! ```
//!
//! # What is computed
//!
//! Exactly diffusers 0.42's computation, file for file (`autoencoder_kl.py`, `vae.py`,
//! `resnet.py`, `attention_processor.py`, `unet_2d_blocks.py`, `upsampling.py`,
//! `downsampling.py`); struct and field names are diffusers', and so are the weight keys:
//!
//! - [`AutoencoderKL::decode`] = `vae.decode(z).sample`: `post_quant_conv` (1×1), then the
//!   [`Decoder`]: `conv_in`, [`UNetMidBlock2D`] (resnet, single-head self-attention over the
//!   pixels, resnet), [`UpDecoderBlock2D`]s in reversed channel order with
//!   `layers_per_block + 1` [`ResnetBlock2D`]s and an [`Upsample2D`] (nearest ×2, 3×3 conv) in
//!   all but the last, `conv_norm_out` (GroupNorm), SiLU, `conv_out`.
//! - [`AutoencoderKL::decode_latents`] = what the pipelines pass to it:
//!   `latents / scaling_factor (+ shift_factor)`.
//! - [`AutoencoderKL::encode`] = `vae.encode(x).latent_dist`: the [`Encoder`]
//!   ([`DownEncoderBlock2D`]s whose [`Downsample2D`] zero-pads right and bottom by one, then a
//!   stride-2 3×3 conv), `quant_conv`, and the split into mean and log-variance clamped to
//!   [−30, 20] ([`DiagonalGaussianDistribution`]).
//! - Every GroupNorm has eps 1e-6 and `norm_num_groups` groups. No tiling, no slicing.
//! - [`to_image`] / [`to_images`] post-process like `VaeImageProcessor.postprocess` +
//!   `numpy_to_pil`: `(x * 0.5 + 0.5).clamp(0, 1)`, × 255, rounded half to even, in float32.
//!   [`save_png`] writes the result.
//!
//! # Loading
//!
//! [`AutoencoderKL::from_pretrained`] reads a diffusers `vae/` folder: `config.json`
//! ([`AutoencoderKLConfig`], unknown keys and unsupported settings are errors naming the key)
//! and the safetensors weights. Every key the model needs must be present with the right
//! shape, and every key in the file must be used, except, with [`VaeParts::DecoderOnly`], the
//! encoder's keys ([`DECODER_ONLY_SKIPPED_PREFIXES`]: `encoder.*`, `quant_conv.*`), which a
//! text-to-image pipeline never needs and which are then not even converted.
//!
//! # Departures from the Burn layer pattern, and why
//!
//! There is one config, diffusers' own ([`AutoencoderKLConfig`]), and no `XxxConfig` per layer:
//! every layer's shape follows from it. Each module is built by one function that asks a
//! parameter source for each tensor by diffusers key and PyTorch shape; the file loader and
//! the random initialiser ([`AutoencoderKLConfig::init`]) are two such sources, so the keys are
//! written once, and loaded weights never pass through a random initialisation first.
//! [`AutoencoderKL::decode`] and [`AutoencoderKL::encode`] return `Result` because they check
//! the input's channel count (a wrong one would otherwise panic deep inside a convolution); the
//! forwards of the inner modules are infallible.

mod attention;
mod autoencoder_kl;
pub mod banded;
mod config;
mod downsampling;
mod error;
mod load;
mod output;
mod params;
mod resnet;
mod unet_2d_blocks;
mod upsampling;
mod vae;

pub use attention::Attention;
pub use autoencoder_kl::{AutoencoderKL, VaeParts};
pub use config::{AutoencoderKLConfig, DOWN_ENCODER_BLOCK_2D, SampleSize, UP_DECODER_BLOCK_2D};
pub use downsampling::Downsample2D;
pub use error::VaeError;
pub use image::RgbImage;
pub use load::{DECODER_ONLY_SKIPPED_PREFIXES, WEIGHTS_FILE};
pub use output::{denormalize, denormalize_to_u8, save_png, to_image, to_images};
pub use params::GROUP_NORM_EPS;
pub use resnet::ResnetBlock2D;
pub use unet_2d_blocks::{DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D};
pub use upsampling::Upsample2D;
pub use vae::{Decoder, DiagonalGaussianDistribution, Encoder};

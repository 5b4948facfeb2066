//! `AutoencoderKL` (diffusers `models/autoencoders/autoencoder_kl.py`): the VAE of Stable
//! Diffusion, PixArt and most latent diffusion models.

use std::path::Path;

use burn::nn::conv::Conv2d;
use burn::prelude::*;

use crate::VaeError;
use crate::config::AutoencoderKLConfig;
use crate::load::{self, DECODER_ONLY_SKIPPED_PREFIXES};
use crate::params::{ParamSource, RandomInit, conv1x1};
use crate::vae::{Decoder, DiagonalGaussianDistribution, Encoder};

/// Which halves of the VAE to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeParts {
    /// The decoder and `post_quant_conv` only: all a text-to-image pipeline needs. When loading,
    /// the file's `encoder.*` and `quant_conv.*` keys are skipped (see
    /// [`DECODER_ONLY_SKIPPED_PREFIXES`]); any other unused key is still an error.
    DecoderOnly,
    /// Encoder, `quant_conv`, `post_quant_conv` and decoder: every key of the file is used.
    EncoderAndDecoder,
}

/// diffusers' `AutoencoderKL`: a convolutional VAE with a Gaussian latent.
///
/// Built from a diffusers `vae/` folder with [`from_pretrained`](Self::from_pretrained), or with
/// random weights with [`AutoencoderKLConfig::init`].
///
/// Computation follows diffusers exactly (no tiling or slicing): [`decode`](Self::decode) is
/// `vae.decode(z).sample`, [`decode_latents`](Self::decode_latents) adds the pipeline's
/// un-scaling, [`encode`](Self::encode) is `vae.encode(x).latent_dist`.
#[derive(Module, Debug)]
pub struct AutoencoderKL<B: Backend> {
    /// The encoder; `None` when built with [`VaeParts::DecoderOnly`].
    pub encoder: Option<Encoder<B>>,
    /// The 1×1 convolution after the encoder (`2·latent` to `2·latent` channels); `None` when
    /// decoder-only or `use_quant_conv` is false.
    pub quant_conv: Option<Conv2d<B>>,
    /// The 1×1 convolution before the decoder (`latent` to `latent` channels); `None` when
    /// `use_post_quant_conv` is false.
    pub post_quant_conv: Option<Conv2d<B>>,
    /// The decoder.
    pub decoder: Decoder<B>,
    /// The configuration the model was built from.
    #[module(skip)]
    pub config: AutoencoderKLConfig,
}

impl AutoencoderKLConfig {
    /// Builds a VAE with random weights (N(0, 1/fan_in) convolutions and linears, small random
    /// biases, unit GroupNorms): for shape tests and benchmarks without a weight file.
    ///
    /// Fails only when the config does not [`validate`](Self::validate).
    pub fn init<B: Backend>(
        &self,
        parts: VaeParts,
        device: &B::Device,
    ) -> Result<AutoencoderKL<B>, VaeError> {
        self.validate()?;
        AutoencoderKL::build(&mut RandomInit { device: device.clone() }, self.clone(), parts)
    }
}

impl<B: Backend> AutoencoderKL<B> {
    /// Loads a VAE from a diffusers folder (the `vae/` folder of a pipeline): `config.json`
    /// and `diffusion_pytorch_model.safetensors` (or a sharded
    /// `diffusion_pytorch_model.safetensors.index.json`). f32, f16 and bf16 weights are
    /// converted to the backend's float type.
    ///
    /// Errors name the file, the config key, or the weight key (missing, wrong shape, or
    /// unused).
    pub fn from_pretrained(
        folder: impl AsRef<Path>,
        parts: VaeParts,
        device: &B::Device,
    ) -> Result<Self, VaeError> {
        let folder = folder.as_ref();
        let config = AutoencoderKLConfig::from_file(folder.join("config.json"))?;
        let skipped: &[&str] = match parts {
            VaeParts::DecoderOnly => DECODER_ONLY_SKIPPED_PREFIXES,
            VaeParts::EncoderAndDecoder => &[],
        };
        load::with_weights(folder, device, skipped, |src| Self::build(src, config, parts))
    }

    pub(crate) fn build(
        src: &mut impl ParamSource<B>,
        config: AutoencoderKLConfig,
        parts: VaeParts,
    ) -> Result<Self, VaeError> {
        let latent = config.latent_channels;
        let (encoder, quant_conv) = match parts {
            VaeParts::DecoderOnly => (None, None),
            VaeParts::EncoderAndDecoder => {
                let encoder = Encoder::build(src, "encoder", &config)?;
                let quant_conv = if config.use_quant_conv {
                    Some(conv1x1(src, "quant_conv", [2 * latent, 2 * latent])?)
                } else {
                    None
                };
                (Some(encoder), quant_conv)
            }
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv1x1(src, "post_quant_conv", [latent, latent])?)
        } else {
            None
        };
        let decoder = Decoder::build(src, "decoder", &config)?;
        Ok(Self { encoder, quant_conv, post_quant_conv, decoder, config })
    }

    /// Decodes latents as diffusers' `vae.decode(z).sample`: `post_quant_conv`, then the
    /// decoder. `z` is the *un-scaled* latent; see [`decode_latents`](Self::decode_latents) for
    /// what a pipeline passes.
    ///
    /// The result is the raw decoder output, about [−1, 1]; [`to_image`](crate::to_image) maps
    /// it to pixels.
    ///
    /// # Shapes
    /// - `z`: `[batch, latent_channels, height, width]`
    /// - output: `[batch, out_channels, s·height, s·width]`, s =
    ///   [`spatial_scale`](AutoencoderKLConfig::spatial_scale) (8 for Stable Diffusion's VAE)
    ///
    /// # Errors
    /// [`VaeError::Shape`] when `z` does not have `latent_channels` channels or is empty.
    pub fn decode(&self, z: Tensor<B, 4>) -> Result<Tensor<B, 4>, VaeError> {
        let dims = z.dims();
        if dims[1] != self.config.latent_channels || dims.contains(&0) {
            return Err(VaeError::Shape {
                what: "decode: latents",
                expected: format!(
                    "[batch, {}, height, width] (non-empty)",
                    self.config.latent_channels
                ),
                got: dims.to_vec(),
            });
        }
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z),
            None => z,
        };
        Ok(self.decoder.forward(z))
    }

    /// Decodes latents the way the pipelines do before `decode`: `latents / scaling_factor`,
    /// plus `shift_factor` when the config has one (SD3, Flux); PixArt's config has none, so
    /// this is exactly PixArt's `vae.decode(latents / vae.config.scaling_factor)`.
    ///
    /// # Shapes
    /// - `latents`: `[batch, latent_channels, height, width]`, as the denoising loop leaves them
    /// - output: `[batch, out_channels, s·height, s·width]`
    ///
    /// # Errors
    /// As [`decode`](Self::decode).
    pub fn decode_latents(&self, latents: Tensor<B, 4>) -> Result<Tensor<B, 4>, VaeError> {
        self.decode(self.unscale_latents(latents))
    }

    /// `latents / scaling_factor (+ shift_factor)`: the pipeline's step before `decode`.
    ///
    /// # Shapes
    /// - `latents`: `[batch, latent_channels, height, width]`
    /// - output: the same
    pub fn unscale_latents(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        let z = latents.div_scalar(self.config.scaling_factor);
        match self.config.shift_factor {
            Some(shift) => z.add_scalar(shift),
            None => z,
        }
    }

    /// `(latents - shift_factor) · scaling_factor`: what a pipeline does to the encoder's
    /// sample before denoising (the inverse of [`unscale_latents`](Self::unscale_latents)).
    ///
    /// # Shapes
    /// - `z`: `[batch, latent_channels, height, width]`
    /// - output: the same
    pub fn scale_latents(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let z = match self.config.shift_factor {
            Some(shift) => z.sub_scalar(shift),
            None => z,
        };
        z.mul_scalar(self.config.scaling_factor)
    }

    /// Encodes images as diffusers' `vae.encode(x).latent_dist`: the encoder, `quant_conv`,
    /// then the split into mean and clamped log-variance.
    ///
    /// # Shapes
    /// - `image`: `[batch, in_channels, height, width]`, values in [−1, 1]
    /// - output: mean and log-variance `[batch, latent_channels, height/s, width/s]`
    ///
    /// # Errors
    /// [`VaeError::NoEncoder`] when built with [`VaeParts::DecoderOnly`]; [`VaeError::Shape`]
    /// when `image` does not have `in_channels` channels or is empty.
    pub fn encode(&self, image: Tensor<B, 4>) -> Result<DiagonalGaussianDistribution<B>, VaeError> {
        let encoder = self.encoder.as_ref().ok_or(VaeError::NoEncoder)?;
        let dims = image.dims();
        if dims[1] != self.config.in_channels || dims.contains(&0) {
            return Err(VaeError::Shape {
                what: "encode: image",
                expected: format!(
                    "[batch, {}, height, width] (non-empty)",
                    self.config.in_channels
                ),
                got: dims.to_vec(),
            });
        }
        let moments = encoder.forward(image);
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(moments),
            None => moments,
        };
        Ok(DiagonalGaussianDistribution::from_moments(moments))
    }
}

//! # models-unet
//!
//! The Stable Diffusion U-Net family (`UNet2DConditionModel`) is not implemented yet: it
//! arrives with its own issue, which will add it here, equal to diffusers, calling the
//! seams that `parallel-core` already defines for it — the conv halo rows
//! ([`parallel_core::Seams::conv_halo`]) and the group-norm statistics
//! ([`parallel_core::Seams::group_norm_stats`]) of a row-split feature map, which is where
//! DistriFusion acts on a U-Net — with [`parallel_core::ModelFamily::Unet`] and a row
//! granularity of the total down-sampling (8 for SD 1.5/SDXL).
//!
//! This crate holds no code until then, so that nothing depends on a half-built model.

//! Reading diffusers weights into the model, through the workspace's `weights` crate.
//!
//! The model code only sees [`ParamSource`]; [`with_weights`] is the one place that knows the
//! file format and the key accounting.

use std::path::Path;

use burn::prelude::*;
use weights::WeightStore;

use crate::VaeError;
use crate::params::{Init, ParamSource};

/// Key prefixes of a diffusers `AutoencoderKL` file that a decoder-only load leaves unread on
/// purpose: the encoder and its `quant_conv`. They are marked skipped in the weight store, so
/// they do not count as unused; every other key of the file must be used.
pub const DECODER_ONLY_SKIPPED_PREFIXES: &[&str] = &["encoder.", "quant_conv."];

/// The weights file of a diffusers model folder (or, with `.index.json` appended, the index of
/// its shards).
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

/// Opens the weights of `folder`, skips `skipped_prefixes`, lets `build` take the tensors it
/// needs, then fails naming every key neither taken nor skipped.
pub(crate) fn with_weights<B: Backend, T>(
    folder: &Path,
    device: &B::Device,
    skipped_prefixes: &[&str],
    build: impl FnOnce(&mut StoreSource<'_, B>) -> Result<T, VaeError>,
) -> Result<T, VaeError> {
    let mut store = WeightStore::open(folder, WEIGHTS_FILE)?;
    for prefix in skipped_prefixes {
        store.skip_prefix(prefix);
    }
    let model = build(&mut StoreSource { store: &mut store, device: device.clone() })?;
    store.finish()?;
    Ok(model)
}

/// A [`ParamSource`] taking tensors from a [`WeightStore`] (converted to the device's default
/// float dtype).
pub(crate) struct StoreSource<'a, B: Backend> {
    store: &'a mut WeightStore,
    device: B::Device,
}

impl<B: Backend> ParamSource<B> for StoreSource<'_, B> {
    fn tensor<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        _init: Init,
    ) -> Result<Tensor<B, D>, VaeError> {
        Ok(self.store.take(key, shape, &self.device)?)
    }
}

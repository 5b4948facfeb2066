//! The denoisers the harness composes with a strategy: a DiT-family transformer or a
//! Stable Diffusion U-Net, chosen by the folder's `config.json` `_class_name`.

use std::ops::Range;
use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use models_dit::{DitModel, ModelConfig};
use models_unet::{UNet2DConditionConfig, UnetModel};
use parallel_core::{Denoiser, DenoiserInput, LoadPlan, ModelDesc, Seams, StagedDenoiser};
use weights::WeightStore;

use crate::error::{HarnessError, Result};

/// A denoiser's configuration, by family.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // one per launch; boxing would only add noise
pub enum DenoiserConfig {
    /// `PixArtTransformer2DModel`, `DiTTransformer2DModel` (or legacy `Transformer2DModel`).
    Dit(ModelConfig),
    /// `UNet2DConditionModel`.
    Unet(UNet2DConditionConfig),
}

impl DenoiserConfig {
    /// Reads `folder/config.json`, dispatching on its `_class_name`.
    ///
    /// # Errors
    /// An unreadable file, or a class neither model crate implements (the message lists
    /// every class the harness knows).
    pub fn from_folder(folder: &Path) -> Result<Self> {
        let path = folder.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| HarnessError::io(&path, e))?;
        let class = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("_class_name").and_then(|c| c.as_str()).map(str::to_string));
        match class.as_deref() {
            Some(models_unet::CLASS_NAME) => Ok(DenoiserConfig::Unet(
                UNet2DConditionConfig::from_json(&text, &path.display().to_string())?,
            )),
            Some(c) if !models_dit::KNOWN_CLASSES.contains(&c) => Err(HarnessError::config(
                path.display().to_string(),
                format!(
                    "`_class_name` `{c}` is not a denoiser the harness runs; known: {}, {}",
                    models_dit::KNOWN_CLASSES.join(", "),
                    models_unet::CLASS_NAME
                ),
            )),
            _ => Ok(DenoiserConfig::Dit(ModelConfig::from_folder(folder)?)),
        }
    }

    /// What strategies validate against.
    pub fn desc(&self) -> ModelDesc {
        match self {
            DenoiserConfig::Dit(c) => c.desc(),
            DenoiserConfig::Unet(c) => c.desc(),
        }
    }

    /// Loads the folder's weights as this rank's part under `plan`, computing in `dtype`.
    pub fn load_as<B: Backend>(
        &self,
        folder: &Path,
        plan: &LoadPlan,
        dtype: burn::tensor::DType,
        device: &B::Device,
    ) -> Result<AnyDenoiser<B>> {
        Ok(match self {
            DenoiserConfig::Dit(c) => {
                let store = WeightStore::open(folder, models_dit::WEIGHTS_FILE)?.with_dtype(dtype);
                AnyDenoiser::Dit(DitModel::from_store(c, store, plan, device)?)
            }
            DenoiserConfig::Unet(c) => {
                let store = WeightStore::open(folder, models_unet::WEIGHTS_FILE)?.with_dtype(dtype);
                AnyDenoiser::Unet(Box::new(UnetModel::from_store(c, store, plan, device)?))
            }
        })
    }

    /// Loads the folder's weights as this rank's part under `plan`.
    pub fn load<B: Backend>(
        &self,
        folder: &Path,
        plan: &LoadPlan,
        device: &B::Device,
    ) -> Result<AnyDenoiser<B>> {
        Ok(match self {
            DenoiserConfig::Dit(_) => AnyDenoiser::Dit(DitModel::load(folder, plan, device)?),
            DenoiserConfig::Unet(_) => {
                AnyDenoiser::Unet(Box::new(UnetModel::load(folder, plan, device)?))
            }
        })
    }
}

/// A loaded denoiser of either family.
#[derive(Debug, Clone)]
pub enum AnyDenoiser<B: Backend> {
    /// A DiT-family transformer.
    Dit(DitModel<B>),
    /// A U-Net (boxed: its module tree is far larger than the DiT enum's boxes).
    Unet(Box<UnetModel<B>>),
}

impl<B: Backend> Denoiser<B> for AnyDenoiser<B> {
    fn desc(&self) -> &ModelDesc {
        match self {
            AnyDenoiser::Dit(m) => m.desc(),
            AnyDenoiser::Unet(m) => m.desc(),
        }
    }

    fn forward_rows(
        &self,
        input: &DenoiserInput<B>,
        rows: Range<usize>,
        seams: &mut dyn Seams<B>,
    ) -> parallel_core::Result<Tensor<B, 4>> {
        match self {
            AnyDenoiser::Dit(m) => m.forward_rows(input, rows, seams),
            AnyDenoiser::Unet(m) => m.forward_rows(input, rows, seams),
        }
    }

    fn staged(&self) -> Option<&dyn StagedDenoiser<B>> {
        match self {
            AnyDenoiser::Dit(m) => m.staged(),
            AnyDenoiser::Unet(m) => m.staged(),
        }
    }

    fn param_bytes(&self) -> u64 {
        match self {
            AnyDenoiser::Dit(m) => m.param_bytes(),
            AnyDenoiser::Unet(m) => m.param_bytes(),
        }
    }
}

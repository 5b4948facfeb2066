//! [`DitModel`]: either model, chosen by `config.json`'s `_class_name`, behind the
//! [`Denoiser`] and [`StagedDenoiser`] contracts.

use std::ops::Range;
use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use parallel_core::{
    Conditioning, Denoiser, DenoiserInput, LoadPlan, ModelDesc, ParamInfo, Seams, StagedDenoiser,
};
use weights::WeightStore;

use crate::config::ModelConfig;
use crate::dit::DiTTransformer2DModel;
use crate::error::Result;
use crate::flux::FluxTransformer2DModel;
use crate::pixart::PixArtTransformer2DModel;
use crate::sd3::SD3Transformer2DModel;

/// The file name of a diffusers transformer's weights (or the stem of its shard index).
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

/// A PixArt or DiT transformer.
#[derive(Debug, Clone)]
pub enum DitModel<B: Backend> {
    /// `PixArtTransformer2DModel`.
    PixArt(Box<PixArtTransformer2DModel<B>>),
    /// `DiTTransformer2DModel`.
    DiT(Box<DiTTransformer2DModel<B>>),
    /// `SD3Transformer2DModel` (an MMDiT: no [`StagedDenoiser`] — its text stream passes
    /// every block beside the image tokens).
    SD3(Box<SD3Transformer2DModel<B>>),
    /// `FluxTransformer2DModel` (an MMDiT, not staged either).
    Flux(Box<FluxTransformer2DModel<B>>),
}

macro_rules! each {
    ($self:expr, $m:ident => $e:expr) => {
        match $self {
            DitModel::PixArt($m) => $e,
            DitModel::DiT($m) => $e,
            DitModel::SD3($m) => $e,
            DitModel::Flux($m) => $e,
        }
    };
}

impl<B: Backend> DitModel<B> {
    /// Loads a diffusers transformer folder (`config.json` +
    /// `diffusion_pytorch_model.safetensors` or its `.index.json` shards) as this rank's
    /// part under `plan`, in the device's default float dtype.
    ///
    /// # Errors
    /// A bad or unsupported `config.json` (naming the key or the class), missing/corrupt
    /// weights, wrong shapes or dtypes, unused keys ([`weights::WeightError`]), or a plan the
    /// model cannot honour (heads not divisible by the tensor-parallel degree …).
    pub fn load(folder: impl AsRef<Path>, plan: &LoadPlan, device: &B::Device) -> Result<Self> {
        let folder = folder.as_ref();
        let config = ModelConfig::from_folder(folder)?;
        Self::from_store(&config, WeightStore::open(folder, WEIGHTS_FILE)?, plan, device)
    }

    /// Loads from an opened store (choose the compute dtype with
    /// [`WeightStore::with_dtype`]).
    pub fn from_store(
        config: &ModelConfig,
        store: WeightStore,
        plan: &LoadPlan,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(match config {
            ModelConfig::PixArt(c) => DitModel::PixArt(Box::new(
                PixArtTransformer2DModel::from_store(c, store, plan, device)?,
            )),
            ModelConfig::DiT(c) => {
                DitModel::DiT(Box::new(DiTTransformer2DModel::from_store(c, store, plan, device)?))
            }
            ModelConfig::SD3(c) => {
                DitModel::SD3(Box::new(SD3Transformer2DModel::from_store(c, store, plan, device)?))
            }
            ModelConfig::Flux(c) => DitModel::Flux(Box::new(FluxTransformer2DModel::from_store(
                c, store, plan, device,
            )?)),
        })
    }

    /// A model with random weights, `N(0, 0.02²)`, honouring `plan`.
    pub fn random(config: &ModelConfig, plan: &LoadPlan, device: &B::Device) -> Result<Self> {
        Ok(match config {
            ModelConfig::PixArt(c) => {
                DitModel::PixArt(Box::new(PixArtTransformer2DModel::random(c, plan, device)?))
            }
            ModelConfig::DiT(c) => {
                DitModel::DiT(Box::new(DiTTransformer2DModel::random(c, plan, device)?))
            }
            ModelConfig::SD3(c) => {
                DitModel::SD3(Box::new(SD3Transformer2DModel::random(c, plan, device)?))
            }
            ModelConfig::Flux(c) => {
                DitModel::Flux(Box::new(FluxTransformer2DModel::random(c, plan, device)?))
            }
        })
    }

    /// The model of a configuration with random weights (see [`DitModel::random`]).
    pub fn init(config: &ModelConfig, plan: &LoadPlan, device: &B::Device) -> Result<Self> {
        Self::random(config, plan, device)
    }

    /// A named preset ([`PRESETS`](crate::PRESETS)) with random weights, honouring `plan`
    /// (load only a few blocks to keep it small).
    pub fn preset(name: &str, plan: &LoadPlan, device: &B::Device) -> Result<Self> {
        Self::random(&ModelConfig::preset(name)?, plan, device)
    }

    /// The configuration.
    pub fn config(&self) -> ModelConfig {
        match self {
            DitModel::PixArt(m) => ModelConfig::PixArt(m.config.clone()),
            DitModel::DiT(m) => ModelConfig::DiT(m.config.clone()),
            DitModel::SD3(m) => ModelConfig::SD3(m.config.clone()),
            DitModel::Flux(m) => ModelConfig::Flux(m.config.clone()),
        }
    }

    /// Every parameter of the full model with its tensor-parallel placement and block.
    pub fn params(&self) -> Vec<ParamInfo> {
        each!(self, m => m.params())
    }
}

impl<B: Backend> Denoiser<B> for DitModel<B> {
    fn desc(&self) -> &ModelDesc {
        each!(self, m => m.desc())
    }

    fn forward_rows(
        &self,
        input: &DenoiserInput<B>,
        rows: Range<usize>,
        seams: &mut dyn Seams<B>,
    ) -> parallel_core::Result<Tensor<B, 4>> {
        each!(self, m => m.forward_rows(input, rows, seams))
    }

    fn staged(&self) -> Option<&dyn StagedDenoiser<B>> {
        Some(self)
    }

    fn param_bytes(&self) -> u64 {
        each!(self, m => m.param_bytes())
    }
}

impl<B: Backend> StagedDenoiser<B> for DitModel<B> {
    fn condition(&self, input: &DenoiserInput<B>) -> parallel_core::Result<Conditioning> {
        each!(self, m => m.condition(input))
    }

    fn embed(
        &self,
        input: &DenoiserInput<B>,
        rows: Range<usize>,
        cond: &Conditioning,
    ) -> parallel_core::Result<Tensor<B, 3>> {
        each!(self, m => m.embed(input, rows, cond))
    }

    fn block(
        &self,
        index: usize,
        hidden: Tensor<B, 3>,
        rows: Range<usize>,
        cond: &Conditioning,
        seams: &mut dyn Seams<B>,
    ) -> parallel_core::Result<Tensor<B, 3>> {
        each!(self, m => m.block(index, hidden, rows, cond, seams))
    }

    fn head(
        &self,
        hidden: Tensor<B, 3>,
        rows: Range<usize>,
        cond: &Conditioning,
    ) -> parallel_core::Result<Tensor<B, 4>> {
        each!(self, m => m.head(hidden, rows, cond))
    }

    fn held_blocks(&self) -> Range<usize> {
        each!(self, m => m.held_blocks())
    }
}

/// Loads a diffusers DiT-family transformer folder as this rank's part under `plan`
/// (shorthand for [`DitModel::load`]).
pub fn load<B: Backend>(
    folder: impl AsRef<Path>,
    plan: &LoadPlan,
    device: &B::Device,
) -> Result<DitModel<B>> {
    DitModel::load(folder, plan, device)
}

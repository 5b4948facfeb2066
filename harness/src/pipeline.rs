//! A diffusers PixArt pipeline folder and its components: what each rank loads, and the
//! text-encoding step.
//!
//! [`PipelineFolder::open`] checks the folder's layout (`model_index.json` and the
//! `transformer/`, `text_encoder/`, `tokenizer/`, `vae/` and `scheduler/` folders) and reads the
//! small configs that decide the request before any weight is read: the transformer's
//! [`ModelConfig`] (what strategies validate against), the VAE's up-sampling factor, and the
//! pipeline class (PixArt-α or -Σ, which sets the text length). The heavy parts are loaded
//! separately, where a rank needs them: [`PipelineFolder::load_transformer`] under a
//! strategy's [`LoadPlan`], [`PipelineFolder::load_text`] and [`PipelineFolder::load_vae`] on
//! rank 0 only.

use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use models_dit::{DitModel, ModelConfig};
use models_text::{PromptTokenizer, T5EncoderModel};
use models_vae::{AutoencoderKL, AutoencoderKLConfig, VaeParts};
use parallel_core::LoadPlan;
use schedulers::{Scheduler, SchedulerConfig, SchedulerError};

use crate::error::{HarnessError, Result};

/// The component folders a text-to-image pipeline folder must have.
pub const COMPONENTS: [&str; 5] = ["transformer", "text_encoder", "tokenizer", "vae", "scheduler"];

/// The pipeline classes `harness run` implements, with their default text length.
pub const PIPELINE_CLASSES: [(&str, usize); 2] = [
    ("PixArtAlphaPipeline", models_text::PIXART_ALPHA_MAX_LENGTH),
    ("PixArtSigmaPipeline", models_text::PIXART_SIGMA_MAX_LENGTH),
];

/// Scheduler names `--scheduler` accepts besides diffusers' class names, in the order of
/// [`SchedulerConfig::KNOWN_CLASSES`].
pub const SCHEDULER_NAMES: [(&str, &str); 5] = [
    ("dpm_solver_multistep", "DPMSolverMultistepScheduler"),
    ("ddim", "DDIMScheduler"),
    ("euler", "EulerDiscreteScheduler"),
    ("flow_match_euler", "FlowMatchEulerDiscreteScheduler"),
    ("pndm", "PNDMScheduler"),
];

/// The diffusers class of a scheduler name: a short name of [`SCHEDULER_NAMES`] or a class
/// name itself.
pub fn scheduler_class(name: &str) -> Result<&'static str> {
    SCHEDULER_NAMES
        .iter()
        .find(|(short, class)| *short == name || *class == name)
        .map(|(_, class)| *class)
        .ok_or_else(|| {
            let known: Vec<String> =
                SCHEDULER_NAMES.iter().map(|(s, c)| format!("{s} ({c})")).collect();
            HarnessError::config(
                "scheduler",
                format!("unknown scheduler `{name}`; known: {}", known.join(", ")),
            )
        })
}

/// A diffusers PixArt pipeline folder, checked and with its small configs read.
#[derive(Debug, Clone)]
pub struct PipelineFolder {
    /// The folder.
    pub root: PathBuf,
    /// `model_index.json`'s `_class_name` (`PixArtAlphaPipeline`, `PixArtSigmaPipeline`).
    pub class_name: String,
    /// The transformer's configuration.
    pub transformer_config: ModelConfig,
    /// The VAE's configuration.
    pub vae_config: AutoencoderKLConfig,
}

impl PipelineFolder {
    /// Opens a pipeline folder: `model_index.json` must name a supported pipeline, every
    /// component folder must exist, and the transformer and VAE configs must parse.
    ///
    /// # Errors
    /// A missing folder or file (named), an unsupported pipeline class, a transformer that is
    /// not a PixArt model, or a bad config (naming the file and key).
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(HarnessError::io(
                &root,
                "no such pipeline folder (set `model` or --model)",
            ));
        }
        let index_path = root.join("model_index.json");
        let index_text = std::fs::read_to_string(&index_path).map_err(|e| {
            HarnessError::io(
                &index_path,
                format!("cannot read it ({e}): not a diffusers pipeline folder"),
            )
        })?;
        let index: serde_json::Value = serde_json::from_str(&index_text)
            .map_err(|e| HarnessError::config(index_path.display().to_string(), e.to_string()))?;
        let class_name = index
            .get("_class_name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                HarnessError::config(index_path.display().to_string(), "no `_class_name` string")
            })?
            .to_string();
        if !PIPELINE_CLASSES.iter().any(|(c, _)| *c == class_name) {
            let known: Vec<&str> = PIPELINE_CLASSES.iter().map(|(c, _)| *c).collect();
            return Err(HarnessError::config(
                format!("{}: `_class_name`", index_path.display()),
                format!(
                    "pipeline `{class_name}` is not supported by `harness run`; supported: {}",
                    known.join(", ")
                ),
            ));
        }
        for component in COMPONENTS {
            let dir = root.join(component);
            if !dir.is_dir() {
                return Err(HarnessError::io(
                    &dir,
                    format!(
                        "missing component folder `{component}/` of the pipeline (a PixArt \
                         pipeline folder has {})",
                        COMPONENTS.map(|c| format!("{c}/")).join(", ")
                    ),
                ));
            }
        }
        let transformer_config = ModelConfig::from_folder(root.join("transformer"))?;
        if !matches!(transformer_config, ModelConfig::PixArt(_)) {
            return Err(HarnessError::config(
                root.join("transformer/config.json").display().to_string(),
                format!(
                    "`harness run` needs a PixArt transformer, this is {}",
                    transformer_config.class_name()
                ),
            ));
        }
        let t5 = models_text::T5Config::from_file(root.join("text_encoder/config.json"))?;
        if let ModelConfig::PixArt(c) = &transformer_config
            && let Some(caption) = c.caption_channels
            && caption != t5.d_model
        {
            return Err(HarnessError::config(
                root.join("transformer/config.json").display().to_string(),
                format!(
                    "`caption_channels` is {caption} but the text encoder's `d_model` is {} \
                     ({}): the transformer and the text encoder do not belong together",
                    t5.d_model,
                    root.join("text_encoder/config.json").display()
                ),
            ));
        }
        let vae_config = AutoencoderKLConfig::from_file(root.join("vae/config.json"))?;
        Ok(PipelineFolder { root, class_name, transformer_config, vae_config })
    }

    /// The folder of a component (`transformer`, `vae`, …).
    pub fn component(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The pipeline's text length: 120 tokens for PixArt-α, 300 for PixArt-Σ.
    pub fn default_max_sequence_length(&self) -> usize {
        PIPELINE_CLASSES
            .iter()
            .find(|(c, _)| *c == self.class_name)
            .map_or(models_text::PIXART_ALPHA_MAX_LENGTH, |(_, n)| *n)
    }

    /// Pixels per latent pixel: `2^(len(vae.block_out_channels) − 1)`, as diffusers'
    /// `vae_scale_factor`.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_config.spatial_scale()
    }

    /// The default image size: the transformer's `sample_size` × the VAE scale factor.
    pub fn default_image_size(&self) -> usize {
        self.transformer_config.desc().sample_size * self.vae_scale_factor()
    }

    /// Whether the transformer takes PixArt-α 1024's resolution and aspect-ratio conditions.
    pub fn uses_additional_conditions(&self) -> bool {
        match &self.transformer_config {
            ModelConfig::PixArt(c) => c.use_additional_conditions(),
            ModelConfig::DiT(_) => false,
        }
    }

    /// The scheduler: the folder's own, or `name` (a short or class name, see
    /// [`scheduler_class`]) configured from the folder's config as diffusers'
    /// `X.from_config(pipe.scheduler.config)` does.
    pub fn scheduler(&self, name: Option<&str>) -> Result<Scheduler> {
        let path = self.component("scheduler").join("scheduler_config.json");
        let located = |e: SchedulerError| match e {
            SchedulerError::Json { message } => {
                HarnessError::config(path.display().to_string(), message)
            }
            other => other.into(),
        };
        let config = match name {
            None => SchedulerConfig::from_file(&path),
            Some(n) => SchedulerConfig::from_file_as(scheduler_class(n)?, &path),
        }
        .map_err(located)?;
        Scheduler::new(config).map_err(located)
    }

    /// Loads the transformer as this rank's part under `plan`.
    pub fn load_transformer<B: Backend>(
        &self,
        plan: &LoadPlan,
        device: &B::Device,
    ) -> Result<DitModel<B>> {
        Ok(DitModel::load(self.component("transformer"), plan, device)?)
    }

    /// Loads the tokenizer and the T5 encoder.
    pub fn load_text<B: Backend>(
        &self,
        max_sequence_length: usize,
        device: &B::Device,
    ) -> Result<TextEncoder<B>> {
        let tokenizer =
            PromptTokenizer::from_dir(self.component("tokenizer"), max_sequence_length)?;
        let encoder = T5EncoderModel::from_pretrained(self.component("text_encoder"), device)?;
        Ok(TextEncoder { tokenizer, encoder, max_sequence_length })
    }

    /// Loads the VAE's decoder.
    pub fn load_vae<B: Backend>(&self, device: &B::Device) -> Result<AutoencoderKL<B>> {
        Ok(AutoencoderKL::from_pretrained(self.component("vae"), VaeParts::DecoderOnly, device)?)
    }
}

/// The prompt embeddings of one request, in the batch order of the denoiser input:
/// `[negative, positive]` with classifier-free guidance, `[positive]` without.
#[derive(Debug, Clone)]
pub struct PromptEmbeds<B: Backend> {
    /// T5 outputs, `[batch, text_tokens, d_model]`.
    pub embeds: Tensor<B, 3>,
    /// 1 on real tokens, 0 on padding, `[batch, text_tokens]`.
    pub mask: Tensor<B, 2>,
}

/// The tokenizer and T5 encoder of a pipeline.
#[derive(Debug)]
pub struct TextEncoder<B: Backend> {
    /// The tokenizer (`lower().strip()`, padded and cut to the text length).
    pub tokenizer: PromptTokenizer,
    /// The encoder.
    pub encoder: T5EncoderModel<B>,
    /// Text tokens per prompt.
    pub max_sequence_length: usize,
}

impl<B: Backend> TextEncoder<B> {
    /// `PixArtAlphaPipeline.encode_prompt`: the prompt, and with guidance the negative prompt
    /// (each encoded on its own, as diffusers does), concatenated `[negative, positive]`.
    pub fn encode(
        &self,
        prompt: &str,
        negative_prompt: &str,
        guidance: bool,
    ) -> Result<PromptEmbeds<B>> {
        let one = |text: &str| -> Result<(Tensor<B, 3>, Tensor<B, 2>)> {
            let (e, m) = models_text::encode_prompts(
                &self.tokenizer,
                &self.encoder,
                &[text.to_string()],
                self.max_sequence_length,
            )?;
            Ok((e, m.float()))
        };
        let (pos, pos_mask) = one(prompt)?;
        if !guidance {
            return Ok(PromptEmbeds { embeds: pos, mask: pos_mask });
        }
        let (neg, neg_mask) = one(negative_prompt)?;
        Ok(PromptEmbeds {
            embeds: Tensor::cat(vec![neg, pos], 0),
            mask: Tensor::cat(vec![neg_mask, pos_mask], 0),
        })
    }
}

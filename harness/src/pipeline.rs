//! A diffusers pipeline folder and its components: what each rank loads, and the
//! text-encoding step.
//!
//! [`PipelineFolder::open`] reads `model_index.json`'s `_class_name` (one of
//! [`PIPELINE_CLASSES`]), checks that the class's component folders exist, and reads the small
//! configs that decide the request before any weight is read: the denoiser's
//! ([`DenoiserConfig`]: what strategies validate against), the VAE's up-sampling factor, and
//! that the text encoders' widths fit the denoiser's. The heavy parts are loaded separately,
//! where a rank needs them: [`PipelineFolder::load_denoiser`] under a strategy's [`LoadPlan`],
//! [`PipelineFolder::load_text`] and [`PipelineFolder::load_vae`] on rank 0 only.
//!
//! | class | denoiser | text | components |
//! |---|---|---|---|
//! | `PixArtAlphaPipeline`, `PixArtSigmaPipeline` | `transformer/` | T5 (`text_encoder/`, `tokenizer/`), 120 / 300 tokens, with mask | + `vae/`, `scheduler/` |
//! | `StableDiffusionPipeline` | `unet/` | CLIP (`text_encoder/`, `tokenizer/`), 77 tokens, last hidden state | + `vae/`, `scheduler/` |
//! | `StableDiffusionXLPipeline` | `unet/` | two CLIPs (`text_encoder/` + `tokenizer/`, `text_encoder_2/` + `tokenizer_2/`): penultimate hidden states concatenated, the second's `text_embeds` pooled, `time_ids` | + `vae/`, `scheduler/` |
//! | `FluxPipeline` | `transformer/` | CLIP (`text_encoder/` + `tokenizer/`): its pooled output only; T5 (`text_encoder_2/` + `tokenizer_2/`, 512 tokens, unmasked); no negative prompt (guidance is embedded, FLUX.1-dev) | + `vae/` (16 channels), `scheduler/` (flow matching, dynamic shift) |
//! | `StableDiffusion3Pipeline` | `transformer/` | two CLIPs with projections (`text_encoder/`, `text_encoder_2/` + tokenizers): penultimate hidden states concatenated and zero-padded to T5's width, then T5's (`text_encoder_3/` + `tokenizer_3/`, 256 tokens, unmasked) appended along the tokens; both CLIPs' `text_embeds` pooled | + `vae/` (16 channels, `shift_factor`), `scheduler/` (flow matching) |

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use models_dit::ModelConfig;
use models_text::{
    CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PromptTokenizer, T5EncoderModel,
};
use models_vae::{AutoencoderKL, AutoencoderKLConfig, VaeParts};
use parallel_core::LoadPlan;
use schedulers::{Scheduler, SchedulerConfig, SchedulerError};

use crate::error::{HarnessError, Result};
use crate::model::{AnyDenoiser, DenoiserConfig};

/// The pipeline families `harness run` implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineKind {
    /// PixArt-α / -Σ: a DiT transformer and T5.
    PixArt,
    /// Stable Diffusion 1.x / 2.x: a U-Net and one CLIP encoder.
    StableDiffusion,
    /// SDXL: a U-Net with text/time conditioning and two CLIP encoders.
    StableDiffusionXl,
    /// Stable Diffusion 3 / 3.5: an MMDiT, two CLIP encoders and T5.
    StableDiffusion3,
    /// FLUX.1: an MMDiT with embedded guidance, CLIP's pooled output and T5.
    Flux,
}

/// One pipeline class `harness run` implements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PipelineClass {
    /// `model_index.json`'s `_class_name`.
    pub name: &'static str,
    /// Its family.
    pub kind: PipelineKind,
    /// The component folders it needs.
    pub components: &'static [&'static str],
    /// Text tokens per prompt by default (PixArt: `max_sequence_length`; SD: CLIP's 77,
    /// the tokenizer's `model_max_length` when it says otherwise; SD3: T5's
    /// `max_sequence_length`, after CLIP's 77).
    pub text_tokens: usize,
    /// diffusers' default `guidance_scale` of the class.
    pub guidance_scale: f64,
}

const PIXART_COMPONENTS: &[&str] =
    &["transformer", "text_encoder", "tokenizer", "vae", "scheduler"];
const SD_COMPONENTS: &[&str] = &["unet", "text_encoder", "tokenizer", "vae", "scheduler"];
const SDXL_COMPONENTS: &[&str] =
    &["unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler"];

const SD3_COMPONENTS: &[&str] = &[
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "vae",
    "scheduler",
];

const FLUX_COMPONENTS: &[&str] = &[
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "vae",
    "scheduler",
];

/// SD3's default T5 length (`max_sequence_length`).
pub const SD3_MAX_SEQUENCE_LENGTH: usize = 256;

/// The pipeline classes `harness run` implements.
pub const PIPELINE_CLASSES: [PipelineClass; 6] = [
    PipelineClass {
        name: "PixArtAlphaPipeline",
        kind: PipelineKind::PixArt,
        components: PIXART_COMPONENTS,
        text_tokens: models_text::PIXART_ALPHA_MAX_LENGTH,
        guidance_scale: 4.5,
    },
    PipelineClass {
        name: "PixArtSigmaPipeline",
        kind: PipelineKind::PixArt,
        components: PIXART_COMPONENTS,
        text_tokens: models_text::PIXART_SIGMA_MAX_LENGTH,
        guidance_scale: 4.5,
    },
    PipelineClass {
        name: "StableDiffusionPipeline",
        kind: PipelineKind::StableDiffusion,
        components: SD_COMPONENTS,
        text_tokens: models_text::CLIP_MAX_LENGTH,
        guidance_scale: 7.5,
    },
    PipelineClass {
        name: "StableDiffusionXLPipeline",
        kind: PipelineKind::StableDiffusionXl,
        components: SDXL_COMPONENTS,
        text_tokens: models_text::CLIP_MAX_LENGTH,
        guidance_scale: 5.0,
    },
    PipelineClass {
        name: "StableDiffusion3Pipeline",
        kind: PipelineKind::StableDiffusion3,
        components: SD3_COMPONENTS,
        text_tokens: SD3_MAX_SEQUENCE_LENGTH,
        guidance_scale: 7.0,
    },
    PipelineClass {
        name: "FluxPipeline",
        kind: PipelineKind::Flux,
        components: FLUX_COMPONENTS,
        text_tokens: 512,
        guidance_scale: 3.5,
    },
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

/// A diffusers pipeline folder, checked and with its small configs read.
#[derive(Debug, Clone)]
pub struct PipelineFolder {
    /// The folder.
    pub root: PathBuf,
    /// `model_index.json`'s class.
    pub class: PipelineClass,
    /// The denoiser's configuration (`transformer/` or `unet/`).
    pub denoiser_config: DenoiserConfig,
    /// The VAE's configuration.
    pub vae_config: AutoencoderKLConfig,
    /// `force_zeros_for_empty_prompt` of an SDXL `model_index.json` (true when absent, as
    /// diffusers' default): with no negative prompt, the unconditional embeddings are zeros.
    pub force_zeros_for_empty_prompt: bool,
}

fn cfg_error(path: &Path, reason: impl Into<String>) -> HarnessError {
    HarnessError::config(path.display().to_string(), reason)
}

impl PipelineFolder {
    /// Opens a pipeline folder: `model_index.json` must name a supported pipeline, every
    /// component folder of that class must exist, and the denoiser, VAE and text-encoder
    /// configs must parse and fit each other.
    ///
    /// # Errors
    /// A missing folder or file (named), an unsupported pipeline class, a denoiser of the
    /// wrong family, or a bad config (naming the file and key).
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
        let index: serde_json::Value =
            serde_json::from_str(&index_text).map_err(|e| cfg_error(&index_path, e.to_string()))?;
        let class_name = index
            .get("_class_name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| cfg_error(&index_path, "no `_class_name` string"))?;
        let Some(class) = PIPELINE_CLASSES.iter().find(|c| c.name == class_name).copied() else {
            let known: Vec<&str> = PIPELINE_CLASSES.iter().map(|c| c.name).collect();
            return Err(HarnessError::config(
                format!("{}: `_class_name`", index_path.display()),
                format!(
                    "pipeline `{class_name}` is not supported by `harness run`; supported: {}",
                    known.join(", ")
                ),
            ));
        };
        for component in class.components {
            let dir = root.join(component);
            if !dir.is_dir() {
                return Err(HarnessError::io(
                    &dir,
                    format!(
                        "missing component folder `{component}/` of the pipeline (a {} folder \
                         has {})",
                        class.name,
                        class
                            .components
                            .iter()
                            .map(|c| format!("{c}/"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        let denoiser_dir = root.join(class.components[0]);
        let denoiser_config = DenoiserConfig::from_folder(&denoiser_dir)?;
        let denoiser_json = denoiser_dir.join("config.json");
        let force_zeros_for_empty_prompt =
            index.get("force_zeros_for_empty_prompt").and_then(|v| v.as_bool()).unwrap_or(true);
        match (class.kind, &denoiser_config) {
            (PipelineKind::PixArt, DenoiserConfig::Dit(ModelConfig::PixArt(c))) => {
                let t5 = models_text::T5Config::from_file(root.join("text_encoder/config.json"))?;
                if let Some(caption) = c.caption_channels
                    && caption != t5.d_model
                {
                    return Err(cfg_error(
                        &denoiser_json,
                        format!(
                            "`caption_channels` is {caption} but the text encoder's `d_model` \
                             is {} ({}): the transformer and the text encoder do not belong \
                             together",
                            t5.d_model,
                            root.join("text_encoder/config.json").display()
                        ),
                    ));
                }
            }
            (PipelineKind::StableDiffusion3, DenoiserConfig::Dit(ModelConfig::SD3(c))) => {
                let clip =
                    |name: &str| CLIPTextConfig::from_file(root.join(name).join("config.json"));
                let (l, g) = (clip("text_encoder")?, clip("text_encoder_2")?);
                let t5 = models_text::T5Config::from_file(root.join("text_encoder_3/config.json"))?;
                let clip_width = l.hidden_size + g.hidden_size;
                if t5.d_model != c.joint_attention_dim || clip_width > t5.d_model {
                    return Err(cfg_error(
                        &denoiser_json,
                        format!(
                            "`joint_attention_dim` is {} but T5's `d_model` is {} and the CLIPs \
                             give {clip_width} channels (padded to T5's width, which must be the \
                             larger): the transformer and the text encoders do not belong \
                             together",
                            c.joint_attention_dim, t5.d_model
                        ),
                    ));
                }
                let pooled = l.projection_dim.unwrap_or(0) + g.projection_dim.unwrap_or(0);
                if pooled != c.pooled_projection_dim {
                    return Err(cfg_error(
                        &denoiser_json,
                        format!(
                            "`pooled_projection_dim` is {} but the CLIPs' projections give \
                             {pooled}: the transformer and the text encoders do not belong \
                             together",
                            c.pooled_projection_dim
                        ),
                    ));
                }
            }
            (PipelineKind::Flux, DenoiserConfig::Dit(ModelConfig::Flux(c))) => {
                let clip = CLIPTextConfig::from_file(root.join("text_encoder/config.json"))?;
                let t5 = models_text::T5Config::from_file(root.join("text_encoder_2/config.json"))?;
                if t5.d_model != c.joint_attention_dim
                    || clip.hidden_size != c.pooled_projection_dim
                {
                    return Err(cfg_error(
                        &denoiser_json,
                        format!(
                            "`joint_attention_dim` {} and `pooled_projection_dim` {} must be T5's \
                             `d_model` ({}) and CLIP's `hidden_size` ({}): the transformer and \
                             the text encoders do not belong together",
                            c.joint_attention_dim,
                            c.pooled_projection_dim,
                            t5.d_model,
                            clip.hidden_size
                        ),
                    ));
                }
            }
            (PipelineKind::PixArt | PipelineKind::StableDiffusion3 | PipelineKind::Flux, other) => {
                return Err(cfg_error(
                    &denoiser_json,
                    format!(
                        "`{}` needs a {} transformer, this is {}",
                        class.name,
                        match class.kind {
                            PipelineKind::PixArt => "PixArt",
                            PipelineKind::Flux => "FLUX",
                            _ => "SD3",
                        },
                        other.desc().class_name
                    ),
                ));
            }
            (
                PipelineKind::StableDiffusion | PipelineKind::StableDiffusionXl,
                DenoiserConfig::Unet(u),
            ) => {
                let clip =
                    |name: &str| CLIPTextConfig::from_file(root.join(name).join("config.json"));
                let first = clip("text_encoder")?;
                let (width, text_embeds) = if class.kind == PipelineKind::StableDiffusionXl {
                    let second = clip("text_encoder_2")?;
                    (first.hidden_size + second.hidden_size, second.projection_dim)
                } else {
                    (first.hidden_size, None)
                };
                if width != u.cross_attention_dim {
                    return Err(cfg_error(
                        &denoiser_json,
                        format!(
                            "`cross_attention_dim` is {} but the text encoder{} give{} {width} \
                             channels: the U-Net and the text encoders do not belong together",
                            u.cross_attention_dim,
                            if text_embeds.is_some() { "s" } else { "" },
                            if text_embeds.is_some() { "" } else { "s" },
                        ),
                    ));
                }
                match (class.kind, &u.addition, text_embeds) {
                    (PipelineKind::StableDiffusion, None, _) => {}
                    (PipelineKind::StableDiffusionXl, Some(a), Some(p))
                        if a.text_embeds_dim() == p => {}
                    (PipelineKind::StableDiffusion, Some(_), _) => {
                        return Err(cfg_error(
                            &denoiser_json,
                            "this U-Net takes SDXL's text/time conditioning \
                             (`addition_embed_type`); a StableDiffusionPipeline gives none",
                        ));
                    }
                    (_, a, p) => {
                        return Err(cfg_error(
                            &denoiser_json,
                            format!(
                                "an SDXL U-Net needs `addition_embed_type` \"text_time\" with \
                                 text embeddings as wide as `text_encoder_2`'s \
                                 `projection_dim` ({p:?}); the U-Net takes {:?}",
                                a.map(|a| a.text_embeds_dim())
                            ),
                        ));
                    }
                }
            }
            (_, other) => {
                return Err(cfg_error(
                    &denoiser_json,
                    format!(
                        "`{}` needs a UNet2DConditionModel, this is {}",
                        class.name,
                        other.desc().class_name
                    ),
                ));
            }
        }
        let vae_config = AutoencoderKLConfig::from_file(root.join("vae/config.json"))?;
        Ok(PipelineFolder {
            root,
            class,
            denoiser_config,
            vae_config,
            force_zeros_for_empty_prompt,
        })
    }

    /// The folder of a component (`transformer`, `unet`, `vae`, …).
    pub fn component(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The pipeline's text length: 120 tokens for PixArt-α, 300 for PixArt-Σ, 77 for CLIP,
    /// SD3's T5 length 256 (its joint text is CLIP's 77 more).
    pub fn default_max_sequence_length(&self) -> usize {
        self.class.text_tokens
    }

    /// Pixels per latent pixel: `2^(len(vae.block_out_channels) − 1)`, as diffusers'
    /// `vae_scale_factor`.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_config.spatial_scale()
    }

    /// The default image size: the denoiser's `sample_size` × the VAE scale factor.
    pub fn default_image_size(&self) -> usize {
        self.denoiser_config.desc().sample_size * self.vae_scale_factor()
    }

    /// Whether the transformer takes PixArt-α 1024's resolution and aspect-ratio conditions.
    pub fn uses_additional_conditions(&self) -> bool {
        match &self.denoiser_config {
            DenoiserConfig::Dit(ModelConfig::PixArt(c)) => c.use_additional_conditions(),
            _ => false,
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
            e @ SchedulerError::UnknownClass { .. } => HarnessError::config(
                path.display().to_string(),
                format!("{e}; run it with one of them: --scheduler NAME (`harness list`)"),
            ),
            other => other.into(),
        };
        let config = match name {
            None => SchedulerConfig::from_file(&path),
            Some(n) => SchedulerConfig::from_file_as(scheduler_class(n)?, &path),
        }
        .map_err(located)?;
        Scheduler::new(config).map_err(located)
    }

    /// Loads the denoiser as this rank's part under `plan`.
    pub fn load_denoiser<B: Backend>(
        &self,
        plan: &LoadPlan,
        device: &B::Device,
    ) -> Result<AnyDenoiser<B>> {
        self.denoiser_config.load(&self.component(self.class.components[0]), plan, device)
    }

    /// [`load_denoiser`](Self::load_denoiser), computing in `dtype` (the weights converted
    /// while loading).
    pub fn load_denoiser_as<B: Backend>(
        &self,
        plan: &LoadPlan,
        dtype: burn::tensor::DType,
        device: &B::Device,
    ) -> Result<AnyDenoiser<B>> {
        let dir = self.component(self.class.components[0]);
        self.denoiser_config.load_as(&dir, plan, dtype, device)
    }

    /// Loads the tokenizer(s) and text encoder(s) of the pipeline.
    pub fn load_text<B: Backend>(
        &self,
        max_sequence_length: usize,
        device: &B::Device,
    ) -> Result<TextEncoder<B>> {
        let tokenizer = |name: &str| PromptTokenizer::clip_from_dir(self.component(name));
        Ok(match self.class.kind {
            PipelineKind::PixArt => TextEncoder::T5 {
                tokenizer: PromptTokenizer::from_dir(
                    self.component("tokenizer"),
                    max_sequence_length,
                )?,
                encoder: T5EncoderModel::from_pretrained(self.component("text_encoder"), device)?,
                max_sequence_length,
            },
            PipelineKind::StableDiffusion => TextEncoder::Clip {
                tokenizer: tokenizer("tokenizer")?,
                encoder: CLIPTextModel::from_pretrained(self.component("text_encoder"), device)?,
            },
            PipelineKind::StableDiffusionXl => TextEncoder::ClipXl {
                tokenizer: tokenizer("tokenizer")?,
                encoder: CLIPTextModel::from_pretrained(self.component("text_encoder"), device)?,
                tokenizer_2: tokenizer("tokenizer_2")?,
                encoder_2: CLIPTextModelWithProjection::from_pretrained(
                    self.component("text_encoder_2"),
                    device,
                )?,
                force_zeros_for_empty_prompt: self.force_zeros_for_empty_prompt,
            },
            PipelineKind::StableDiffusion3 => TextEncoder::Sd3 {
                tokenizer: tokenizer("tokenizer")?,
                encoder: CLIPTextModelWithProjection::from_pretrained(
                    self.component("text_encoder"),
                    device,
                )?,
                tokenizer_2: tokenizer("tokenizer_2")?,
                encoder_2: CLIPTextModelWithProjection::from_pretrained(
                    self.component("text_encoder_2"),
                    device,
                )?,
                tokenizer_3: PromptTokenizer::from_dir(
                    self.component("tokenizer_3"),
                    max_sequence_length,
                )?,
                encoder_3: T5EncoderModel::from_pretrained(
                    self.component("text_encoder_3"),
                    device,
                )?,
                max_sequence_length,
            },
            PipelineKind::Flux => TextEncoder::Flux {
                tokenizer: tokenizer("tokenizer")?,
                encoder: CLIPTextModel::from_pretrained(self.component("text_encoder"), device)?,
                tokenizer_2: PromptTokenizer::from_dir(
                    self.component("tokenizer_2"),
                    max_sequence_length,
                )?,
                encoder_2: T5EncoderModel::from_pretrained(
                    self.component("text_encoder_2"),
                    device,
                )?,
                max_sequence_length,
            },
        })
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
    /// Text-encoder outputs, `[batch, text_tokens, width]`.
    pub embeds: Tensor<B, 3>,
    /// 1 on real tokens, 0 on padding, `[batch, text_tokens]` (PixArt; the SD pipelines
    /// pass no mask).
    pub mask: Option<Tensor<B, 2>>,
    /// Added conditions by name, each `[batch, k]` (SDXL: `text_embeds`, `time_ids`).
    pub added_cond: BTreeMap<String, Tensor<B, 2>>,
}

/// The tokenizer(s) and text encoder(s) of a pipeline.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per request, on rank 0; boxing would only add noise
pub enum TextEncoder<B: Backend> {
    /// PixArt's T5.
    T5 {
        /// `lower().strip()`, padded and cut to the text length.
        tokenizer: PromptTokenizer,
        /// The encoder.
        encoder: T5EncoderModel<B>,
        /// Text tokens per prompt.
        max_sequence_length: usize,
    },
    /// Stable Diffusion 1.x/2.x's CLIP.
    Clip {
        /// Padded and cut to 77 tokens.
        tokenizer: PromptTokenizer,
        /// The encoder.
        encoder: CLIPTextModel<B>,
    },
    /// SDXL's two CLIPs.
    ClipXl {
        /// The first tokenizer.
        tokenizer: PromptTokenizer,
        /// The first encoder.
        encoder: CLIPTextModel<B>,
        /// The second tokenizer.
        tokenizer_2: PromptTokenizer,
        /// The second encoder, with the projection of its pooled output.
        encoder_2: CLIPTextModelWithProjection<B>,
        /// Zeros for the unconditional embeddings when there is no negative prompt.
        force_zeros_for_empty_prompt: bool,
    },
    /// Stable Diffusion 3's two CLIPs and T5.
    Sd3 {
        /// CLIP-L's tokenizer.
        tokenizer: PromptTokenizer,
        /// CLIP-L, with its projection.
        encoder: CLIPTextModelWithProjection<B>,
        /// CLIP-G's tokenizer.
        tokenizer_2: PromptTokenizer,
        /// CLIP-G, with its projection.
        encoder_2: CLIPTextModelWithProjection<B>,
        /// T5's tokenizer (padded and cut to `max_sequence_length`).
        tokenizer_3: PromptTokenizer,
        /// T5.
        encoder_3: T5EncoderModel<B>,
        /// T5 tokens per prompt.
        max_sequence_length: usize,
    },
    /// FLUX's CLIP (pooled output) and T5.
    Flux {
        /// CLIP's tokenizer.
        tokenizer: PromptTokenizer,
        /// CLIP.
        encoder: CLIPTextModel<B>,
        /// T5's tokenizer.
        tokenizer_2: PromptTokenizer,
        /// T5.
        encoder_2: T5EncoderModel<B>,
        /// T5 tokens per prompt.
        max_sequence_length: usize,
    },
}

/// Width of the penultimate hidden state: a model with one layer has none.
fn penultimate<B: Backend>(state: Option<Tensor<B, 3>>, which: &str) -> Result<Tensor<B, 3>> {
    state.ok_or_else(|| {
        HarnessError::config(which, "the text encoder has no penultimate hidden state (one layer)")
    })
}

impl<B: Backend> TextEncoder<B> {
    /// The pipeline's `encode_prompt`: the prompt and, with guidance, the negative prompt
    /// (each encoded on its own, as diffusers does), concatenated `[negative, positive]`.
    ///
    /// - PixArt: T5 embeddings and mask; no negative prompt encodes `""`.
    /// - SD: CLIP's last hidden state (after the final LayerNorm); no negative prompt
    ///   encodes `""`.
    /// - SDXL: both encoders' `hidden_states[-2]` concatenated, `text_embeds` of the second,
    ///   and `time_ids = [h, w, 0, 0, h, w]` (original size, crop top-left, target size) for
    ///   `image_size`; with no negative prompt and `force_zeros_for_empty_prompt`, zeros for
    ///   the unconditional embeddings and `text_embeds`.
    /// - SD3: both CLIPs' `hidden_states[-2]` concatenated and zero-padded to T5's width,
    ///   T5's output (unmasked, `max_sequence_length` tokens) appended along the tokens;
    ///   `pooled_projections` = both CLIPs' `text_embeds` concatenated; no negative prompt
    ///   encodes `""` (SD3 has no zeroing).
    /// - FLUX: T5's output (unmasked) as the text, CLIP's pooled output as
    ///   `pooled_projections`, batch 1: FLUX.1-dev embeds its guidance instead of a negative
    ///   batch (`guidance` is ignored; the pipeline adds the `guidance` condition).
    pub fn encode(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
        guidance: bool,
        image_size: (usize, usize),
    ) -> Result<PromptEmbeds<B>> {
        match self {
            TextEncoder::T5 { tokenizer, encoder, max_sequence_length } => {
                let one = |text: &str| -> Result<(Tensor<B, 3>, Tensor<B, 2>)> {
                    let (e, m) = models_text::encode_prompts(
                        tokenizer,
                        encoder,
                        &[text.to_string()],
                        *max_sequence_length,
                    )?;
                    Ok((e, m.float()))
                };
                let (pos, pos_mask) = one(prompt)?;
                if !guidance {
                    return Ok(PromptEmbeds {
                        embeds: pos,
                        mask: Some(pos_mask),
                        added_cond: BTreeMap::new(),
                    });
                }
                let (neg, neg_mask) = one(negative_prompt.unwrap_or(""))?;
                Ok(PromptEmbeds {
                    embeds: Tensor::cat(vec![neg, pos], 0),
                    mask: Some(Tensor::cat(vec![neg_mask, pos_mask], 0)),
                    added_cond: BTreeMap::new(),
                })
            }
            TextEncoder::Clip { tokenizer, encoder } => {
                let one = |text: &str| -> Result<Tensor<B, 3>> {
                    let tokens = tokenizer.tokenize(&[text])?;
                    for t in &tokens.truncations {
                        log::warn!("{}", t.message());
                    }
                    Ok(encoder.forward_tokens(&tokens, false)?.last_hidden_state)
                };
                let pos = one(prompt)?;
                let embeds = if guidance {
                    Tensor::cat(vec![one(negative_prompt.unwrap_or(""))?, pos], 0)
                } else {
                    pos
                };
                Ok(PromptEmbeds { embeds, mask: None, added_cond: BTreeMap::new() })
            }
            TextEncoder::ClipXl {
                tokenizer,
                encoder,
                tokenizer_2,
                encoder_2,
                force_zeros_for_empty_prompt,
            } => {
                let one = |text: &str| -> Result<(Tensor<B, 3>, Tensor<B, 2>)> {
                    let t1 = tokenizer.tokenize(&[text])?;
                    let t2 = tokenizer_2.tokenize(&[text])?;
                    for t in t1.truncations.iter().chain(&t2.truncations) {
                        log::warn!("{}", t.message());
                    }
                    let h1 = penultimate(
                        encoder.forward_tokens(&t1, false)?.hidden_state_from_end(2),
                        "text_encoder",
                    )?;
                    let out2 = encoder_2.forward_tokens(&t2, false)?;
                    let h2 = penultimate(out2.hidden_state_from_end(2), "text_encoder_2")?;
                    Ok((Tensor::cat(vec![h1, h2], 2), out2.text_embeds))
                };
                let (pos, pooled) = one(prompt)?;
                let (h, w) = image_size;
                let ids = [h as f32, w as f32, 0.0, 0.0, h as f32, w as f32];
                let device = pos.device();
                let (embeds, pooled, batch) = if guidance {
                    let (neg, neg_pooled) = match negative_prompt {
                        None if *force_zeros_for_empty_prompt => {
                            (pos.zeros_like(), pooled.zeros_like())
                        }
                        other => one(other.unwrap_or(""))?,
                    };
                    (Tensor::cat(vec![neg, pos], 0), Tensor::cat(vec![neg_pooled, pooled], 0), 2)
                } else {
                    (pos, pooled, 1)
                };
                let time_ids: Vec<f32> = (0..batch).flat_map(|_| ids).collect();
                let mut added_cond = BTreeMap::new();
                added_cond.insert("text_embeds".to_string(), pooled);
                added_cond.insert(
                    "time_ids".to_string(),
                    Tensor::from_data(TensorData::new(time_ids, [batch, 6]), &device),
                );
                Ok(PromptEmbeds { embeds, mask: None, added_cond })
            }
            TextEncoder::Sd3 {
                tokenizer,
                encoder,
                tokenizer_2,
                encoder_2,
                tokenizer_3,
                encoder_3,
                max_sequence_length,
            } => {
                let one = |text: &str| -> Result<(Tensor<B, 3>, Tensor<B, 2>)> {
                    let t1 = tokenizer.tokenize(&[text])?;
                    let t2 = tokenizer_2.tokenize(&[text])?;
                    for t in t1.truncations.iter().chain(&t2.truncations) {
                        log::warn!("{}", t.message());
                    }
                    let out1 = encoder.forward_tokens(&t1, false)?;
                    let h1 = penultimate(out1.hidden_state_from_end(2), "text_encoder")?;
                    let out2 = encoder_2.forward_tokens(&t2, false)?;
                    let h2 = penultimate(out2.hidden_state_from_end(2), "text_encoder_2")?;
                    let (t5, _) = models_text::encode_prompts_masked(
                        tokenizer_3,
                        encoder_3,
                        &[text.to_string()],
                        *max_sequence_length,
                        false,
                    )?;
                    let clip = Tensor::cat(vec![h1, h2], 2);
                    let [b, n, w] = clip.dims();
                    let width = t5.dims()[2];
                    let clip = if w < width {
                        let zeros = Tensor::zeros([b, n, width - w], &clip.device());
                        Tensor::cat(vec![clip, zeros], 2)
                    } else {
                        clip
                    };
                    let pooled = Tensor::cat(vec![out1.text_embeds, out2.text_embeds], 1);
                    Ok((Tensor::cat(vec![clip, t5], 1), pooled))
                };
                let (pos, pooled) = one(prompt)?;
                let (embeds, pooled) = if guidance {
                    let (neg, neg_pooled) = one(negative_prompt.unwrap_or(""))?;
                    (Tensor::cat(vec![neg, pos], 0), Tensor::cat(vec![neg_pooled, pooled], 0))
                } else {
                    (pos, pooled)
                };
                let mut added_cond = BTreeMap::new();
                added_cond.insert("pooled_projections".to_string(), pooled);
                Ok(PromptEmbeds { embeds, mask: None, added_cond })
            }
            TextEncoder::Flux {
                tokenizer,
                encoder,
                tokenizer_2,
                encoder_2,
                max_sequence_length,
            } => {
                let _ = (negative_prompt, guidance);
                let tokens = tokenizer.tokenize(&[prompt])?;
                for t in &tokens.truncations {
                    log::warn!("{}", t.message());
                }
                let pooled = encoder.forward_tokens(&tokens, false)?.pooler_output;
                let (embeds, _) = models_text::encode_prompts_masked(
                    tokenizer_2,
                    encoder_2,
                    &[prompt.to_string()],
                    *max_sequence_length,
                    false,
                )?;
                let mut added_cond = BTreeMap::new();
                added_cond.insert("pooled_projections".to_string(), pooled);
                Ok(PromptEmbeds { embeds, mask: None, added_cond })
            }
        }
    }
}

//! Loading a transformers CLIP text-encoder folder (`config.json` + `model.safetensors`, or a
//! sharded set) through the `weights` crate.
//!
//! Keys follow transformers: `embeddings.token_embedding.weight`,
//! `encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}`, `layer_norm{1,2}`,
//! `mlp.fc{1,2}`, `final_layer_norm`, and `text_projection.weight` for the projection model.
//!
//! # The `text_model.` prefix
//!
//! transformers 4.x wrapped the modules of a `CLIPTextModel` in `text_model`, so SD 1.x/2.x
//! checkpoints name them `text_model.embeddings.…`; transformers 5 moved them up and saves a
//! `CLIPTextModel` without the prefix (a `CLIPTextModelWithProjection` still has
//! `text_model.`), and loads both. So does [`CLIPTextModel::from_pretrained`]: it looks for
//! `text_model.embeddings.token_embedding.weight` and, if the file has it, reads every key
//! with the prefix. Keys of the other naming are then unused and reported.
//!
//! `embeddings.position_ids` (a buffer, `arange(max_position_embeddings)`, that transformers
//! before 4.31 saved) is skipped. Every other key the encoder does not use is an error naming
//! it; in particular a `CLIPTextModel` does not silently drop a `text_projection.weight`.
//!
//! PyTorch stores a `Linear` weight as `[out, in]` and Burn as `[in, out]`: every linear weight
//! is transposed on load. CLIP's attention projections are square, so a missing transpose
//! passes the shape checks; the reference tests catch it.

use std::path::Path;

use burn::module::Param;
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::backend::Backend;
use weights::WeightStore;

use crate::clip_config::{CLIPTextConfig, CLIPTextModelConfig};
use crate::error::Result;
use crate::loader::WEIGHTS_NAME;
use crate::modeling_clip::{
    CLIPAttention, CLIPEncoder, CLIPEncoderLayer, CLIPMLP, CLIPTextEmbeddings, CLIPTextModel,
    CLIPTextModelWithProjection,
};

/// The prefix transformers 4.x (and `CLIPTextModelWithProjection`) puts before the text
/// encoder's keys.
pub const TEXT_MODEL_PREFIX: &str = "text_model.";

impl<B: Backend> CLIPTextModel<B> {
    /// Loads a transformers `CLIPTextModel` folder (e.g. SD's `text_encoder/`): `config.json`
    /// (validated, see [`CLIPTextConfig::model_config`]) and `model.safetensors` or its
    /// sharded set, converted to the device's default float dtype (f16/bf16 files included).
    ///
    /// # Errors
    /// A missing or invalid `config.json` or unsupported setting (naming the key); a missing
    /// weight, a weight of the wrong shape, or a stored weight the encoder does not use (naming
    /// the key); pickle-only folders are refused.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = CLIPTextConfig::from_file(dir.join("config.json"))?.model_config(false)?;
        let mut store = WeightStore::open(dir, WEIGHTS_NAME)?;
        let prefix =
            if store.contains(&format!("{TEXT_MODEL_PREFIX}embeddings.token_embedding.weight")) {
                TEXT_MODEL_PREFIX
            } else {
                ""
            };
        let model = Self::load(&config, &mut store, prefix, device)?;
        store.finish()?;
        Ok(model)
    }

    /// Takes the encoder's weights from an open store, every key under `prefix` (`""` or
    /// [`TEXT_MODEL_PREFIX`]); `{prefix}embeddings.position_ids` is skipped. Call
    /// [`WeightStore::finish`] afterwards to have unused keys reported.
    pub fn load(
        config: &CLIPTextModelConfig,
        store: &mut WeightStore,
        prefix: &str,
        device: &B::Device,
    ) -> Result<Self> {
        let mut l = Loader { store, device, config };
        l.store.skip(&format!("{prefix}embeddings.position_ids"));
        let embeddings = CLIPTextEmbeddings {
            token_embedding: l
                .embedding(&format!("{prefix}embeddings.token_embedding"), config.vocab_size)?,
            position_embedding: l.embedding(
                &format!("{prefix}embeddings.position_embedding"),
                config.max_position_embeddings,
            )?,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| l.layer(&format!("{prefix}encoder.layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = l.layer_norm(&format!("{prefix}final_layer_norm"))?;
        Ok(CLIPTextModel {
            embeddings,
            encoder: CLIPEncoder { layers },
            final_layer_norm,
            pooling: config.pooling,
        })
    }
}

impl<B: Backend> CLIPTextModelWithProjection<B> {
    /// Loads a transformers `CLIPTextModelWithProjection` folder (SDXL's `text_encoder_2/`):
    /// `config.json` (which then needs `projection_dim`), keys `text_model.*` and
    /// `text_projection.weight`; see [`CLIPTextModel::from_pretrained`].
    ///
    /// # Errors
    /// As [`CLIPTextModel::from_pretrained`].
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = CLIPTextConfig::from_file(dir.join("config.json"))?.model_config(true)?;
        let mut store = WeightStore::open(dir, WEIGHTS_NAME)?;
        let model = Self::load(&config, &mut store, device)?;
        store.finish()?;
        Ok(model)
    }

    /// Takes the weights from an open store (`text_model.*` and `text_projection.weight`).
    /// `config.projection_dim` must be set ([`CLIPTextConfig::model_config`] with
    /// `with_projection`); without it the projection is read as square.
    pub fn load(
        config: &CLIPTextModelConfig,
        store: &mut WeightStore,
        device: &B::Device,
    ) -> Result<Self> {
        let text_model = CLIPTextModel::load(config, store, TEXT_MODEL_PREFIX, device)?;
        let p = config.projection_dim.unwrap_or(config.hidden_size);
        let mut l = Loader { store, device, config };
        let text_projection = l.linear("text_projection", config.hidden_size, p, false)?;
        Ok(CLIPTextModelWithProjection { text_model, text_projection })
    }
}

struct Loader<'a, B: Backend> {
    store: &'a mut WeightStore,
    device: &'a B::Device,
    config: &'a CLIPTextModelConfig,
}

impl<B: Backend> Loader<'_, B> {
    /// A PyTorch `Linear` (`{prefix}.weight` `[d_out, d_in]` on disk, `{prefix}.bias`),
    /// transposed to Burn's `[d_in, d_out]`.
    fn linear(&mut self, prefix: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Linear<B>> {
        let w = self.store.take::<B, 2>(&format!("{prefix}.weight"), [d_out, d_in], self.device)?;
        let bias = if bias {
            Some(Param::from_tensor(self.store.take::<B, 1>(
                &format!("{prefix}.bias"),
                [d_out],
                self.device,
            )?))
        } else {
            None
        };
        Ok(Linear { weight: Param::from_tensor(w.transpose()), bias })
    }

    fn embedding(&mut self, prefix: &str, rows: usize) -> Result<Embedding<B>> {
        let w = self.store.take::<B, 2>(
            &format!("{prefix}.weight"),
            [rows, self.config.hidden_size],
            self.device,
        )?;
        Ok(Embedding { weight: Param::from_tensor(w) })
    }

    fn layer_norm(&mut self, prefix: &str) -> Result<LayerNorm<B>> {
        let h = self.config.hidden_size;
        let mut norm =
            LayerNormConfig::new(h).with_epsilon(self.config.layer_norm_eps).init(self.device);
        norm.gamma = Param::from_tensor(self.store.take::<B, 1>(
            &format!("{prefix}.weight"),
            [h],
            self.device,
        )?);
        norm.beta = Some(Param::from_tensor(self.store.take::<B, 1>(
            &format!("{prefix}.bias"),
            [h],
            self.device,
        )?));
        Ok(norm)
    }

    fn layer(&mut self, prefix: &str) -> Result<CLIPEncoderLayer<B>> {
        let c = self.config;
        let h = c.hidden_size;
        let attn = format!("{prefix}.self_attn");
        Ok(CLIPEncoderLayer {
            self_attn: CLIPAttention {
                q_proj: self.linear(&format!("{attn}.q_proj"), h, h, true)?,
                k_proj: self.linear(&format!("{attn}.k_proj"), h, h, true)?,
                v_proj: self.linear(&format!("{attn}.v_proj"), h, h, true)?,
                out_proj: self.linear(&format!("{attn}.out_proj"), h, h, true)?,
                num_heads: c.num_attention_heads,
                head_dim: h / c.num_attention_heads,
            },
            layer_norm1: self.layer_norm(&format!("{prefix}.layer_norm1"))?,
            mlp: CLIPMLP {
                fc1: self.linear(&format!("{prefix}.mlp.fc1"), h, c.intermediate_size, true)?,
                fc2: self.linear(&format!("{prefix}.mlp.fc2"), c.intermediate_size, h, true)?,
                activation: c.hidden_act,
            },
            layer_norm2: self.layer_norm(&format!("{prefix}.layer_norm2"))?,
        })
    }
}

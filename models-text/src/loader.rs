//! Loading a transformers T5 encoder folder (`config.json` + `model.safetensors`, or a sharded
//! set with `model.safetensors.index.json`) through the `weights` crate.
//!
//! Keys follow transformers (`encoder.block.{i}.layer.0.SelfAttention.q.weight`, …).
//! PyTorch stores a `Linear` weight as `[out, in]` and Burn's [`Linear`] as `[in, out]`: every
//! linear weight is transposed on load (T5's projections are square in places, `q`, `k`, `v`,
//! `o` when `num_heads·d_kv = d_model`, where a missing transpose would go unnoticed by the
//! shape check; the reference test catches it).
//!
//! Token embeddings are tied: transformers keeps `shared.weight` and
//! `encoder.embed_tokens.weight`, and a file may hold either or both (the fixture holds only
//! `shared.weight`). The first present is loaded; a duplicate is skipped, not reported unused.
//! Keys containing `decoder` are skipped as transformers' `T5EncoderModel` ignores them
//! (`_keys_to_ignore_on_load_unexpected = [r"decoder"]`), so the encoder half of a full T5
//! checkpoint loads. Any other key the encoder does not use is an error naming it.

use std::path::Path;

use burn::module::Param;
use burn::nn::{Embedding, Linear};
use burn::tensor::backend::Backend;
use weights::WeightStore;

use crate::attention::T5Attention;
use crate::block::{T5Block, T5LayerSelfAttention};
use crate::config::{T5Config, T5EncoderConfig};
use crate::encoder::{T5EncoderModel, T5Stack};
use crate::error::Result;
use crate::feed_forward::{T5DenseActDense, T5DenseFF, T5DenseGatedActDense, T5LayerFF};
use crate::layer_norm::T5LayerNorm;

/// File name of a transformers checkpoint (or of its shard index, with `.index.json`).
pub const WEIGHTS_NAME: &str = "model.safetensors";

/// The two names of the tied token embeddings, in the order they are looked for.
pub const EMBEDDING_KEYS: [&str; 2] = ["shared.weight", "encoder.embed_tokens.weight"];

impl<B: Backend> T5EncoderModel<B> {
    /// Loads a transformers `T5EncoderModel` folder: `config.json` (validated, see
    /// [`T5Config::encoder_config`]) and `model.safetensors` or its sharded set, weights
    /// converted to the device's default float dtype.
    ///
    /// # Errors
    /// A missing or invalid `config.json` or unsupported setting (naming the key); a missing
    /// weight, a weight of the wrong shape, or a stored weight the encoder does not use
    /// (naming the key); pickle-only folders are refused.
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = T5Config::from_file(dir.join("config.json"))?.encoder_config()?;
        let mut store = WeightStore::open(dir, WEIGHTS_NAME)?;
        let model = Self::load(&config, &mut store, device)?;
        store.finish()?;
        Ok(model)
    }

    /// Takes the encoder's weights from an open store (for a chosen dtype, use
    /// [`WeightStore::with_dtype`]). Tied-embedding duplicates and `decoder` keys are skipped;
    /// call [`WeightStore::finish`] afterwards to have unused keys reported.
    pub fn load(
        config: &T5EncoderConfig,
        store: &mut WeightStore,
        device: &B::Device,
    ) -> Result<Self> {
        let mut loader = Loader { store, device };
        let decoder_keys: Vec<String> =
            loader.store.keys().filter(|k| k.contains("decoder")).map(str::to_string).collect();
        for key in &decoder_keys {
            loader.store.skip(key);
        }
        let embed_key = EMBEDDING_KEYS
            .into_iter()
            .find(|k| loader.store.contains(k))
            .unwrap_or(EMBEDDING_KEYS[0]);
        let embed_tokens = Embedding {
            weight: Param::from_tensor(loader.store.take(
                embed_key,
                [config.vocab_size, config.d_model],
                device,
            )?),
        };
        for key in EMBEDDING_KEYS {
            loader.store.skip(key);
        }
        let block =
            (0..config.num_layers).map(|i| loader.block(config, i)).collect::<Result<Vec<_>>>()?;
        let final_layer_norm = loader.layer_norm("encoder.final_layer_norm", config)?;
        Ok(T5EncoderModel { encoder: T5Stack { embed_tokens, block, final_layer_norm } })
    }
}

struct Loader<'a, B: Backend> {
    store: &'a mut WeightStore,
    device: &'a B::Device,
}

impl<B: Backend> Loader<'_, B> {
    /// A bias-free PyTorch `Linear` (`{prefix}.weight`, `[d_out, d_in]` on disk), transposed
    /// to Burn's `[d_in, d_out]`.
    fn linear(&mut self, prefix: &str, d_in: usize, d_out: usize) -> Result<Linear<B>> {
        let w = self.store.take::<B, 2>(&format!("{prefix}.weight"), [d_out, d_in], self.device)?;
        Ok(Linear { weight: Param::from_tensor(w.transpose()), bias: None })
    }

    fn layer_norm(&mut self, prefix: &str, c: &T5EncoderConfig) -> Result<T5LayerNorm<B>> {
        let w = self.store.take::<B, 1>(&format!("{prefix}.weight"), [c.d_model], self.device)?;
        Ok(T5LayerNorm { weight: Param::from_tensor(w), variance_epsilon: c.layer_norm_epsilon })
    }

    fn attention(
        &mut self,
        prefix: &str,
        c: &T5EncoderConfig,
        first: bool,
    ) -> Result<T5Attention<B>> {
        let inner = c.num_heads * c.d_kv;
        let relative_attention_bias = if first {
            let key = format!("{prefix}.relative_attention_bias.weight");
            let w = self.store.take::<B, 2>(
                &key,
                [c.relative_attention_num_buckets, c.num_heads],
                self.device,
            )?;
            Some(Embedding { weight: Param::from_tensor(w) })
        } else {
            None
        };
        Ok(T5Attention {
            q: self.linear(&format!("{prefix}.q"), c.d_model, inner)?,
            k: self.linear(&format!("{prefix}.k"), c.d_model, inner)?,
            v: self.linear(&format!("{prefix}.v"), c.d_model, inner)?,
            o: self.linear(&format!("{prefix}.o"), inner, c.d_model)?,
            relative_attention_bias,
            n_heads: c.num_heads,
            key_value_proj_dim: c.d_kv,
            relative_attention_num_buckets: c.relative_attention_num_buckets,
            relative_attention_max_distance: c.relative_attention_max_distance,
        })
    }

    fn feed_forward(&mut self, prefix: &str, c: &T5EncoderConfig) -> Result<T5DenseFF<B>> {
        let (d, f, act) = (c.d_model, c.d_ff, c.feed_forward.activation);
        Ok(if c.feed_forward.gated {
            T5DenseFF::GatedActDense(T5DenseGatedActDense {
                wi_0: self.linear(&format!("{prefix}.wi_0"), d, f)?,
                wi_1: self.linear(&format!("{prefix}.wi_1"), d, f)?,
                wo: self.linear(&format!("{prefix}.wo"), f, d)?,
                act,
            })
        } else {
            T5DenseFF::ActDense(T5DenseActDense {
                wi: self.linear(&format!("{prefix}.wi"), d, f)?,
                wo: self.linear(&format!("{prefix}.wo"), f, d)?,
                act,
            })
        })
    }

    fn block(&mut self, c: &T5EncoderConfig, i: usize) -> Result<T5Block<B>> {
        let p = format!("encoder.block.{i}.layer");
        Ok(T5Block {
            layer_self_attention: T5LayerSelfAttention {
                self_attention: self.attention(&format!("{p}.0.SelfAttention"), c, i == 0)?,
                layer_norm: self.layer_norm(&format!("{p}.0.layer_norm"), c)?,
            },
            layer_ff: T5LayerFF {
                dense_relu_dense: self.feed_forward(&format!("{p}.1.DenseReluDense"), c)?,
                layer_norm: self.layer_norm(&format!("{p}.1.layer_norm"), c)?,
            },
        })
    }
}

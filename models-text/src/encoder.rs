//! `T5Stack` (the encoder stack) and `T5EncoderModel`.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor};

use crate::attention::mask_position_bias;
use crate::block::{T5Block, T5BlockConfig};
use crate::config::T5EncoderConfig;
use crate::layer_norm::{T5LayerNorm, T5LayerNormConfig};

impl T5EncoderConfig {
    /// A randomly initialised encoder (Burn's default initialisers; for tests and shapes).
    /// Load trained weights with
    /// [`T5EncoderModel::from_pretrained`](crate::T5EncoderModel::from_pretrained).
    pub fn init<B: Backend>(&self, device: &B::Device) -> T5EncoderModel<B> {
        let block = (0..self.num_layers)
            .map(|i| {
                T5BlockConfig::new(self.clone())
                    .with_has_relative_attention_bias(i == 0)
                    .init(device)
            })
            .collect();
        T5EncoderModel {
            encoder: T5Stack {
                embed_tokens: EmbeddingConfig::new(self.vocab_size, self.d_model).init(device),
                block,
                final_layer_norm: T5LayerNormConfig::new(self.d_model)
                    .with_eps(self.layer_norm_epsilon)
                    .init(device),
            },
        }
    }
}

/// The T5 encoder stack (transformers' `T5Stack` with `is_decoder = False`).
///
/// Embedding lookup (no scaling), `num_layers` blocks sharing the relative-position bias
/// computed by block 0, then a final layer norm. Dropout is the identity (inference).
#[derive(Module, Debug)]
pub struct T5Stack<B: Backend> {
    /// `[vocab_size, d_model]` token embeddings, tied to `shared.weight` in transformers.
    pub embed_tokens: Embedding<B>,
    /// The blocks; only `block[0]` holds a relative-attention bias table.
    pub block: Vec<T5Block<B>>,
    /// Layer norm after the last block.
    pub final_layer_norm: T5LayerNorm<B>,
}

impl<B: Backend> T5Stack<B> {
    /// Runs the stack on token ids.
    ///
    /// `attention_mask` marks real tokens (`true`) and padding (`false`); padded **keys**
    /// are masked in every layer, the way transformers 5's SDPA path does it (the score of a
    /// padded key is `finfo(dtype).min` instead of its position bias). Padded **queries**
    /// are computed like any other position: their rows of the output are real values,
    /// not zeros, and a pipeline passes them on (PixArt masks them as cross-attention keys).
    /// Without a mask every key is attended.
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq]`
    /// - `attention_mask`: `[batch, seq]`
    /// - output (`last_hidden_state`): `[batch, seq, d_model]`
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Bool>>,
    ) -> Tensor<B, 3> {
        let hidden_states = self.embed_tokens.forward(input_ids);
        self.forward_embeds(hidden_states, attention_mask)
    }

    /// Runs the stack on embeddings (transformers' `inputs_embeds`); see
    /// [`T5Stack::forward`].
    ///
    /// # Shapes
    /// - `inputs_embeds`: `[batch, seq, d_model]`
    /// - `attention_mask`: `[batch, seq]`
    /// - output: `[batch, seq, d_model]`
    ///
    /// # Panics
    /// If the stack has no block, or block 0 has no relative-attention bias table (a
    /// stack built by [`T5EncoderConfig::init`] or the loader always has both).
    pub fn forward_embeds(
        &self,
        inputs_embeds: Tensor<B, 3>,
        attention_mask: Option<Tensor<B, 2, Bool>>,
    ) -> Tensor<B, 3> {
        let [_, seq, _] = inputs_embeds.dims();
        let device = inputs_embeds.device();
        // Computed by layer 0 and shared by all layers, as in transformers.
        let position_bias = self
            .block
            .first()
            .and_then(|b| b.layer_self_attention.self_attention.compute_bias(seq, seq, &device))
            .expect("T5 block 0 must own the relative attention bias");
        let position_bias = match attention_mask {
            Some(mask) => mask_position_bias(position_bias, mask),
            None => position_bias,
        };
        let mut hidden_states = inputs_embeds;
        for block in &self.block {
            hidden_states = block.forward(hidden_states, position_bias.clone());
        }
        self.final_layer_norm.forward(hidden_states)
    }
}

/// transformers' `T5EncoderModel`: the encoder half of T5, as the PixArt pipelines use it.
///
/// transformers keeps the token embeddings twice, tied (`shared` and
/// `encoder.embed_tokens`); here they live once, in
/// [`T5Stack::embed_tokens`], loaded from either key.
#[derive(Module, Debug)]
pub struct T5EncoderModel<B: Backend> {
    /// The encoder stack.
    pub encoder: T5Stack<B>,
}

impl<B: Backend> T5EncoderModel<B> {
    /// `last_hidden_state` of the encoder; see [`T5Stack::forward`].
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq]`
    /// - `attention_mask`: `[batch, seq]`, `true` for real tokens
    /// - output: `[batch, seq, d_model]`
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Bool>>,
    ) -> Tensor<B, 3> {
        self.encoder.forward(input_ids, attention_mask)
    }

    /// The token embeddings of `input_ids` (the encoder's input).
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq]`
    /// - output: `[batch, seq, d_model]`
    pub fn embed(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.encoder.embed_tokens.forward(input_ids)
    }

    /// Width of the hidden states.
    pub fn d_model(&self) -> usize {
        self.encoder.embed_tokens.weight.dims()[1]
    }

    /// Number of token embeddings.
    pub fn vocab_size(&self) -> usize {
        self.encoder.embed_tokens.weight.dims()[0]
    }
}

//! The CLIP text encoders of the Stable Diffusion pipelines, as transformers 5.24's
//! `models/clip/modeling_clip.py` computes them: [`CLIPTextModel`] (SD 1.x/2.x, SDXL's first
//! encoder) and [`CLIPTextModelWithProjection`] (SDXL's second encoder).
//!
//! | piece | transformers | here |
//! |---|---|---|
//! | [`CLIPTextEmbeddings`] | token + absolute position embeddings, positions `0..seq` | same |
//! | [`CLIPAttention`] | `softmax(q·kᵀ·head_dim^-½ + mask)·v`, biased q/k/v/out projections, SDPA | [`kernels::attention`] with an additive mask |
//! | [`CLIPMLP`] | `fc2(act(fc1 x))`, `quick_gelu` or `gelu` | [`kernels::linear`], [`kernels::gelu`] (exact) or `x·σ(1.702x)` |
//! | [`CLIPEncoderLayer`] | pre-norm: `x + attn(ln1 x)`, then `x + mlp(ln2 x)` | same, Burn's `LayerNorm` |
//! | [`CLIPEncoder`] | the layers; every layer's output recorded (`output_hidden_states`) | [`CLIPEncoder::forward`] returns them all |
//! | [`CLIPTextModel`] | embeddings → causal encoder → `final_layer_norm`; pooled at the eos ([`CLIPPooling`]) | same |
//! | [`CLIPTextModelWithProjection`] | `text_embeds = text_projection(pooled)` (no bias) | same |
//!
//! # The mask
//!
//! The text encoder is causal: query `i` attends to keys `0..=i` only. transformers builds the
//! mask with `create_causal_mask`; with an `attention_mask` (the SD pipelines pass none, unless
//! the text encoder's config says `use_attention_mask`) padded keys are masked as well. Here
//! both become one additive bias, `finfo(f32).min` at masked (query, key) pairs, so a masked
//! key's weight is exactly 0 as with SDPA's boolean mask. A query whose every key is masked
//! (a sequence that starts with padding, i.e. left padding) gets uniform weights here where
//! PyTorch's SDPA gives NaN; right padding, which every tokenizer here produces, never does.
//!
//! # Hidden states
//!
//! `hidden_states` holds `num_hidden_layers + 1` tensors: the embeddings, then each layer's
//! output; the last is the last layer's output **before** `final_layer_norm` (transformers 5.24
//! records it with `tie_last_hidden_states=False`), while `last_hidden_state` is after it.
//! SD 1.x with `clip_skip` takes `hidden_states[-(clip_skip + 1)]` and applies
//! `final_layer_norm` itself; SDXL takes `hidden_states[-2]` as it is
//! ([`BaseModelOutputWithPooling::hidden_state_from_end`]).

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::sigmoid;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::attention::dtype_min;
use crate::clip_config::{CLIPActivation, CLIPPooling, CLIPTextModelConfig};
use crate::error::{Result, TextError};
use crate::tokenizer::TokenizedPrompts;

/// `x·W + b` through [`kernels::linear`] (one GEMM on Flex/f32, Burn's `linear` elsewhere).
fn linear<B: Backend, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    kernels::linear(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()))
}

/// transformers' `QuickGELUActivation`: `x·σ(1.702·x)`.
pub fn quick_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clone() * sigmoid(x * 1.702)
}

/// The additive attention mask of the text encoder: 0 where query `i` may attend key `j`
/// (`j ≤ i` and, with a padding mask, key `j` is a real token), `finfo(f32).min` elsewhere.
///
/// # Shapes
/// - `attention_mask`: `[batch, seq]`, `true` on real tokens
/// - output: `[1, 1, seq, seq]` without a padding mask, `[batch, 1, seq, seq]` with one
pub fn causal_attention_bias<B: Backend>(
    seq: usize,
    attention_mask: Option<Tensor<B, 2, Bool>>,
    device: &B::Device,
) -> Tensor<B, 4> {
    let future: Vec<bool> = (0..seq).flat_map(|i| (0..seq).map(move |j| j > i)).collect();
    let future = Tensor::<B, 2, Bool>::from_data(TensorData::new(future, [seq, seq]), device);
    let min = dtype_min(burn::tensor::DType::F32);
    match attention_mask {
        None => Tensor::<B, 2>::zeros([seq, seq], device)
            .mask_fill(future, min)
            .reshape([1, 1, seq, seq]),
        Some(mask) => {
            let [batch, _] = mask.dims();
            let padded = mask.bool_not().reshape([batch, 1, 1, seq]).expand([batch, 1, seq, seq]);
            let masked =
                future.reshape([1, 1, seq, seq]).expand([batch, 1, seq, seq]).bool_or(padded);
            Tensor::<B, 4>::zeros([batch, 1, seq, seq], device).mask_fill(masked, min)
        }
    }
}

/// Token and position embeddings (transformers' `CLIPTextEmbeddings`, key `embeddings`).
#[derive(Module, Debug)]
pub struct CLIPTextEmbeddings<B: Backend> {
    /// `token_embedding`: `[vocab_size, hidden_size]`.
    pub token_embedding: Embedding<B>,
    /// `position_embedding`: `[max_position_embeddings, hidden_size]`.
    pub position_embedding: Embedding<B>,
}

impl<B: Backend> CLIPTextEmbeddings<B> {
    /// `token_embedding(ids) + position_embedding(0..seq)`.
    ///
    /// `seq` must not exceed `max_position_embeddings` ([`CLIPTextModel::forward`] checks it).
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq]`
    /// - output: `[batch, seq, hidden_size]`
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [_, seq] = input_ids.dims();
        let device = input_ids.device();
        let positions = Tensor::<B, 1, Int>::arange(0..seq as i64, &device).reshape([1, seq]);
        self.token_embedding.forward(input_ids) + self.position_embedding.forward(positions)
    }
}

/// Multi-head self-attention (transformers' `CLIPAttention`, key `self_attn`).
#[derive(Module, Debug)]
pub struct CLIPAttention<B: Backend> {
    /// `q_proj`: hidden → hidden, with bias.
    pub q_proj: Linear<B>,
    /// `k_proj`: hidden → hidden, with bias.
    pub k_proj: Linear<B>,
    /// `v_proj`: hidden → hidden, with bias.
    pub v_proj: Linear<B>,
    /// `out_proj`: hidden → hidden, with bias.
    pub out_proj: Linear<B>,
    /// Number of heads.
    #[module(skip)]
    pub num_heads: usize,
    /// Width of one head (`hidden_size / num_heads`); scores are scaled by `head_dim^-½`.
    #[module(skip)]
    pub head_dim: usize,
}

impl<B: Backend> CLIPAttention<B> {
    /// `out_proj(softmax(q·kᵀ/√head_dim + bias)·v)`.
    ///
    /// # Shapes
    /// - `hidden_states`: `[batch, seq, hidden]`
    /// - `bias`: `[1 or batch, 1, seq, seq]` ([`causal_attention_bias`])
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, hidden_states: Tensor<B, 3>, bias: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, seq, _] = hidden_states.dims();
        let (h, d) = (self.num_heads, self.head_dim);
        let split = |x: Tensor<B, 3>| x.reshape([batch, seq, h, d]).swap_dims(1, 2);
        let q = split(linear(&self.q_proj, hidden_states.clone()));
        let k = split(linear(&self.k_proj, hidden_states.clone()));
        let v = split(linear(&self.v_proj, hidden_states));
        let out = kernels::attention(q, k, v, Some(bias));
        linear(&self.out_proj, out.swap_dims(1, 2).reshape([batch, seq, h * d]))
    }
}

/// The feed-forward (transformers' `CLIPMLP`, key `mlp`): `fc2(act(fc1 x))`.
#[derive(Module, Debug)]
pub struct CLIPMLP<B: Backend> {
    /// `fc1`: hidden → intermediate, with bias.
    pub fc1: Linear<B>,
    /// `fc2`: intermediate → hidden, with bias.
    pub fc2: Linear<B>,
    /// `hidden_act`.
    #[module(skip)]
    pub activation: CLIPActivation,
}

impl<B: Backend> CLIPMLP<B> {
    /// # Shapes
    /// `[batch, seq, hidden]` in and out.
    pub fn forward(&self, hidden_states: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = linear(&self.fc1, hidden_states);
        let h = match self.activation {
            CLIPActivation::QuickGelu => quick_gelu(h),
            CLIPActivation::Gelu => kernels::gelu(h, false),
        };
        linear(&self.fc2, h)
    }
}

/// One pre-norm transformer layer (transformers' `CLIPEncoderLayer`, key `encoder.layers.{i}`).
#[derive(Module, Debug)]
pub struct CLIPEncoderLayer<B: Backend> {
    /// `self_attn`.
    pub self_attn: CLIPAttention<B>,
    /// `layer_norm1`, before the attention.
    pub layer_norm1: LayerNorm<B>,
    /// `mlp`.
    pub mlp: CLIPMLP<B>,
    /// `layer_norm2`, before the MLP.
    pub layer_norm2: LayerNorm<B>,
}

impl<B: Backend> CLIPEncoderLayer<B> {
    /// `x + self_attn(layer_norm1 x)`, then `x + mlp(layer_norm2 x)`.
    ///
    /// # Shapes
    /// - `hidden_states`: `[batch, seq, hidden]`; `bias`: `[1 or batch, 1, seq, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, hidden_states: Tensor<B, 3>, bias: Tensor<B, 4>) -> Tensor<B, 3> {
        let attn = self.self_attn.forward(self.layer_norm1.forward(hidden_states.clone()), bias);
        let hidden_states = hidden_states + attn;
        let mlp = self.mlp.forward(self.layer_norm2.forward(hidden_states.clone()));
        hidden_states + mlp
    }
}

/// The stack of layers (transformers' `CLIPEncoder`, key `encoder`).
#[derive(Module, Debug)]
pub struct CLIPEncoder<B: Backend> {
    /// `layers`.
    pub layers: Vec<CLIPEncoderLayer<B>>,
}

impl<B: Backend> CLIPEncoder<B> {
    /// Runs every layer; returns the input followed by every layer's output
    /// (`num_layers + 1` tensors, transformers' `hidden_states`).
    ///
    /// # Shapes
    /// - `inputs_embeds`: `[batch, seq, hidden]`; `bias`: `[1 or batch, 1, seq, seq]`
    /// - output: `num_layers + 1` × `[batch, seq, hidden]`
    pub fn forward(&self, inputs_embeds: Tensor<B, 3>, bias: Tensor<B, 4>) -> Vec<Tensor<B, 3>> {
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        states.push(inputs_embeds);
        for layer in &self.layers {
            let last = states.last().cloned().unwrap_or_else(|| unreachable!("pushed above"));
            states.push(layer.forward(last, bias.clone()));
        }
        states
    }
}

/// What [`CLIPTextModel::forward`] returns (transformers' `BaseModelOutputWithPooling` with
/// `output_hidden_states=True`).
#[derive(Debug, Clone)]
pub struct BaseModelOutputWithPooling<B: Backend> {
    /// `final_layer_norm` of the last layer's output: `[batch, seq, hidden]` (SD 1.x/2.x's
    /// `prompt_embeds` without `clip_skip`).
    pub last_hidden_state: Tensor<B, 3>,
    /// `last_hidden_state` at each sequence's pooled position ([`CLIPPooling`]):
    /// `[batch, hidden]`.
    pub pooler_output: Tensor<B, 2>,
    /// The embeddings and every layer's output, `num_hidden_layers + 1` × `[batch, seq,
    /// hidden]`; the last one before `final_layer_norm`.
    pub hidden_states: Vec<Tensor<B, 3>>,
}

/// Python's `hidden_states[-n]` (`n ≥ 1`), `None` when out of range.
fn from_end<B: Backend>(states: &[Tensor<B, 3>], n: usize) -> Option<Tensor<B, 3>> {
    (n >= 1 && n <= states.len()).then(|| states[states.len() - n].clone())
}

impl<B: Backend> BaseModelOutputWithPooling<B> {
    /// Python's `hidden_states[-n]`: `n = 1` the last layer's output (before the final norm),
    /// `n = 2` the penultimate (SDXL), `n = clip_skip + 1` for SD 1.x's `clip_skip`. `None` when
    /// `n` is 0 or more than `num_hidden_layers + 1`.
    pub fn hidden_state_from_end(&self, n: usize) -> Option<Tensor<B, 3>> {
        from_end(&self.hidden_states, n)
    }
}

/// What [`CLIPTextModelWithProjection::forward`] returns (transformers' `CLIPTextModelOutput`
/// with `output_hidden_states=True`, plus the pooled output before the projection).
#[derive(Debug, Clone)]
pub struct CLIPTextModelOutput<B: Backend> {
    /// `text_projection(pooler_output)`: `[batch, projection_dim]` (SDXL's
    /// `pooled_prompt_embeds`).
    pub text_embeds: Tensor<B, 2>,
    /// As [`BaseModelOutputWithPooling::last_hidden_state`].
    pub last_hidden_state: Tensor<B, 3>,
    /// As [`BaseModelOutputWithPooling::pooler_output`] (not part of transformers' output
    /// class; what the projection was applied to).
    pub pooler_output: Tensor<B, 2>,
    /// As [`BaseModelOutputWithPooling::hidden_states`].
    pub hidden_states: Vec<Tensor<B, 3>>,
}

impl<B: Backend> CLIPTextModelOutput<B> {
    /// Python's `hidden_states[-n]`; see [`BaseModelOutputWithPooling::hidden_state_from_end`].
    pub fn hidden_state_from_end(&self, n: usize) -> Option<Tensor<B, 3>> {
        from_end(&self.hidden_states, n)
    }
}

/// The CLIP text encoder (transformers 5.24's `CLIPTextModel`, which now holds the former
/// `CLIPTextTransformer`'s modules directly; checkpoints name them `text_model.*` or, as
/// transformers 5 saves them, without the prefix: both load).
#[derive(Module, Debug)]
pub struct CLIPTextModel<B: Backend> {
    /// `embeddings`.
    pub embeddings: CLIPTextEmbeddings<B>,
    /// `encoder`.
    pub encoder: CLIPEncoder<B>,
    /// `final_layer_norm`.
    pub final_layer_norm: LayerNorm<B>,
    /// Where the pooled output is taken (from `eos_token_id`).
    #[module(skip)]
    pub pooling: CLIPPooling,
}

/// The pooled position of each sequence (see [`CLIPPooling`]), computed on the device: the
/// first position that holds the maximum id (legacy) or the eos id; 0 when no position does.
///
/// # Shapes
/// - `input_ids`: `[batch, seq]`
/// - output: `[batch, 1]`
pub fn pooled_positions<B: Backend>(
    input_ids: Tensor<B, 2, Int>,
    pooling: CLIPPooling,
) -> Tensor<B, 2, Int> {
    let [batch, seq] = input_ids.dims();
    let device = input_ids.device();
    let hit = match pooling {
        CLIPPooling::ArgmaxInputIds => {
            let max = input_ids.clone().max_dim(1).expand([batch, seq]);
            input_ids.equal(max)
        }
        CLIPPooling::FirstEos(eos) => input_ids.equal_elem(eos),
    };
    let positions =
        Tensor::<B, 1, Int>::arange(0..seq as i64, &device).reshape([1, seq]).expand([batch, seq]);
    let first = positions.mask_fill(hit.bool_not(), seq as i64).min_dim(1);
    let none = first.clone().equal_elem(seq as i64);
    first.mask_fill(none, 0)
}

impl<B: Backend> CLIPTextModel<B> {
    /// Runs the encoder (transformers' `CLIPTextModel.forward` with `output_hidden_states`).
    ///
    /// `attention_mask` (`true` on real tokens) masks padded keys on top of the causal mask;
    /// the SD pipelines pass none. Ids must lie below `vocab_size` (not checked here: reading
    /// them back would synchronise the device; [`CLIPTextModel::forward_tokens`] checks).
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq]`, `1 ≤ seq ≤ max_position_embeddings`
    /// - `attention_mask`: `[batch, seq]`
    ///
    /// # Errors
    /// [`TextError::SequenceLength`] when `seq` is 0 or longer than the position table.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Bool>>,
    ) -> Result<BaseModelOutputWithPooling<B>> {
        let [_, seq] = input_ids.dims();
        let max = self.max_position_embeddings();
        if seq == 0 || seq > max {
            return Err(TextError::SequenceLength { length: seq, max_position_embeddings: max });
        }
        let device = input_ids.device();
        let embeds = self.embeddings.forward(input_ids.clone());
        let bias = causal_attention_bias::<B>(seq, attention_mask, &device);
        let hidden_states = self.encoder.forward(embeds, bias);
        let last = hidden_states.last().cloned().unwrap_or_else(|| unreachable!("embeddings"));
        let last_hidden_state = self.final_layer_norm.forward(last);
        let [batch, _, hidden] = last_hidden_state.dims();
        let index = pooled_positions(input_ids, self.pooling).reshape([batch, 1, 1]);
        let pooler_output = last_hidden_state
            .clone()
            .gather(1, index.expand([batch, 1, hidden]))
            .reshape([batch, hidden]);
        Ok(BaseModelOutputWithPooling { last_hidden_state, pooler_output, hidden_states })
    }

    /// Runs the encoder on a tokenizer's output, as the SD pipelines call it: the ids only, or
    /// with the attention mask when `use_attention_mask` (a text-encoder config flag some
    /// checkpoints set). Checks every id against the vocabulary first.
    ///
    /// # Errors
    /// [`TextError::TokenOutOfVocab`], [`TextError::SequenceLength`].
    pub fn forward_tokens(
        &self,
        tokens: &TokenizedPrompts,
        use_attention_mask: bool,
    ) -> Result<BaseModelOutputWithPooling<B>> {
        let vocab_size = self.vocab_size();
        for (index, row) in tokens.input_ids.iter().enumerate() {
            if let Some(&id) = row.iter().find(|&&id| id as usize >= vocab_size) {
                return Err(TextError::TokenOutOfVocab { index, id, vocab_size });
            }
        }
        let device = self.embeddings.token_embedding.weight.device();
        let shape = [tokens.batch_size(), tokens.max_length];
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(tokens.input_ids_flat(), shape),
            &device,
        );
        let mask = use_attention_mask.then(|| {
            Tensor::<B, 2, Bool>::from_data(
                TensorData::new(tokens.attention_mask_flat(), shape),
                &device,
            )
        });
        self.forward(ids, mask)
    }

    /// Number of token embeddings.
    pub fn vocab_size(&self) -> usize {
        self.embeddings.token_embedding.weight.dims()[0]
    }

    /// Width of the hidden states.
    pub fn hidden_size(&self) -> usize {
        self.embeddings.token_embedding.weight.dims()[1]
    }

    /// The longest sequence the position table takes.
    pub fn max_position_embeddings(&self) -> usize {
        self.embeddings.position_embedding.weight.dims()[0]
    }
}

/// SDXL's second text encoder (transformers' `CLIPTextModelWithProjection`): a
/// [`CLIPTextModel`] under `text_model.*` and a bias-free `text_projection` of the pooled
/// output.
#[derive(Module, Debug)]
pub struct CLIPTextModelWithProjection<B: Backend> {
    /// `text_model`.
    pub text_model: CLIPTextModel<B>,
    /// `text_projection`: hidden → projection_dim, no bias.
    pub text_projection: Linear<B>,
}

impl<B: Backend> CLIPTextModelWithProjection<B> {
    /// Runs the encoder and projects the pooled output; see [`CLIPTextModel::forward`].
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq]`; `attention_mask`: `[batch, seq]`
    ///
    /// # Errors
    /// As [`CLIPTextModel::forward`].
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Bool>>,
    ) -> Result<CLIPTextModelOutput<B>> {
        Ok(self.project(self.text_model.forward(input_ids, attention_mask)?))
    }

    /// [`CLIPTextModel::forward_tokens`], then the projection.
    ///
    /// # Errors
    /// As [`CLIPTextModel::forward_tokens`].
    pub fn forward_tokens(
        &self,
        tokens: &TokenizedPrompts,
        use_attention_mask: bool,
    ) -> Result<CLIPTextModelOutput<B>> {
        Ok(self.project(self.text_model.forward_tokens(tokens, use_attention_mask)?))
    }

    fn project(&self, out: BaseModelOutputWithPooling<B>) -> CLIPTextModelOutput<B> {
        CLIPTextModelOutput {
            text_embeds: linear(&self.text_projection, out.pooler_output.clone()),
            last_hidden_state: out.last_hidden_state,
            pooler_output: out.pooler_output,
            hidden_states: out.hidden_states,
        }
    }
}

impl CLIPTextModelConfig {
    /// A randomly initialised `CLIPTextModel` (Burn's default initialisers; for tests and
    /// shapes). Load trained weights with [`CLIPTextModel::from_pretrained`].
    pub fn init_text_model<B: Backend>(&self, device: &B::Device) -> CLIPTextModel<B> {
        let h = self.hidden_size;
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        let ln = || LayerNormConfig::new(h).with_epsilon(self.layer_norm_eps).init(device);
        let layers = (0..self.num_hidden_layers)
            .map(|_| CLIPEncoderLayer {
                self_attn: CLIPAttention {
                    q_proj: lin(h, h),
                    k_proj: lin(h, h),
                    v_proj: lin(h, h),
                    out_proj: lin(h, h),
                    num_heads: self.num_attention_heads,
                    head_dim: h / self.num_attention_heads,
                },
                layer_norm1: ln(),
                mlp: CLIPMLP {
                    fc1: lin(h, self.intermediate_size),
                    fc2: lin(self.intermediate_size, h),
                    activation: self.hidden_act,
                },
                layer_norm2: ln(),
            })
            .collect();
        CLIPTextModel {
            embeddings: CLIPTextEmbeddings {
                token_embedding: EmbeddingConfig::new(self.vocab_size, h).init(device),
                position_embedding: EmbeddingConfig::new(self.max_position_embeddings, h)
                    .init(device),
            },
            encoder: CLIPEncoder { layers },
            final_layer_norm: ln(),
            pooling: self.pooling,
        }
    }

    /// A randomly initialised `CLIPTextModelWithProjection` (`projection_dim` must be set;
    /// without it the projection is square, `hidden → hidden`).
    pub fn init_with_projection<B: Backend>(
        &self,
        device: &B::Device,
    ) -> CLIPTextModelWithProjection<B> {
        let p = self.projection_dim.unwrap_or(self.hidden_size);
        CLIPTextModelWithProjection {
            text_model: self.init_text_model(device),
            text_projection: LinearConfig::new(self.hidden_size, p).with_bias(false).init(device),
        }
    }
}

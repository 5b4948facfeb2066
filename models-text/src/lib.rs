//! # models-text
//!
//! Text encoding for the diffusion pipelines, written to equal transformers 5.24 /
//! diffusers 0.42: the T5 v1.1 encoder of PixArt-α/Σ, the CLIP text encoders of Stable
//! Diffusion 1.x/2.x and SDXL, and their tokenizers built from whatever files a model
//! repository ships (`tokenizer.json`, or `vocab.json` + `merges.txt`, or `spiece.model`).
//!
//! ```no_run
//! # use burn::tensor::backend::Backend;
//! # fn run<B: Backend>(device: &B::Device) -> Result<(), models_text::TextError> {
//! use models_text::{encode_prompts, PromptTokenizer, T5EncoderModel, PIXART_ALPHA_MAX_LENGTH};
//! let tokenizer = PromptTokenizer::from_dir("pixart/tokenizer", PIXART_ALPHA_MAX_LENGTH)?;
//! let encoder = T5EncoderModel::<B>::from_pretrained("pixart/text_encoder", device)?;
//! let prompts = vec!["A photo of a cat".to_string()];
//! let (embeds, mask) = encode_prompts(&tokenizer, &encoder, &prompts, PIXART_ALPHA_MAX_LENGTH)?;
//! assert_eq!(embeds.dims()[1], 120);
//! # let _ = mask; Ok(()) }
//! ```
//!
//! The SD pipelines' text step (SDXL shown; SD 1.x/2.x use `last_hidden_state`, or
//! `hidden_state_from_end(clip_skip + 1)` through `final_layer_norm`, of one `CLIPTextModel`):
//!
//! ```no_run
//! # use burn::tensor::backend::Backend;
//! # fn run<B: Backend>(device: &B::Device) -> Result<(), models_text::TextError> {
//! use models_text::{CLIPTextModel, CLIPTextModelWithProjection, PromptTokenizer};
//! let tokenizer = PromptTokenizer::clip_from_dir("sdxl/tokenizer")?; // 77, pads with <|endoftext|>
//! let tokenizer_2 = PromptTokenizer::clip_from_dir("sdxl/tokenizer_2")?; // 77, pads with "!"
//! let text_encoder = CLIPTextModel::<B>::from_pretrained("sdxl/text_encoder", device)?;
//! let text_encoder_2 =
//!     CLIPTextModelWithProjection::<B>::from_pretrained("sdxl/text_encoder_2", device)?;
//! let prompt = ["A photo of a cat"];
//! let out_1 = text_encoder.forward_tokens(&tokenizer.tokenize(&prompt)?, false)?;
//! let out_2 = text_encoder_2.forward_tokens(&tokenizer_2.tokenize(&prompt)?, false)?;
//! // prompt_embeds = cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], -1)
//! let penultimate = [out_1.hidden_state_from_end(2), out_2.hidden_state_from_end(2)];
//! let pooled_prompt_embeds = out_2.text_embeds; // [batch, projection_dim]
//! # let _ = (penultimate, pooled_prompt_embeds); Ok(()) }
//! ```
//!
//! ## What is computed (read off `transformers/models/t5/modeling_t5.py`, 5.24)
//!
//! | piece | file | detail |
//! |---|---|---|
//! | [`T5LayerNorm`] | `layer_norm.rs` | `w · x · rsqrt(mean(x²) + eps)`: no mean subtraction, no bias, statistics in f32 |
//! | [`T5Attention`] | `attention.rs` | no `1/√d` scaling; relative-position bias from bidirectional buckets ([`relative_position_bucket`]), computed by block 0 and shared by every block |
//! | [`T5LayerFF`] | `feed_forward.rs` | gated `wo(gelu_new(wi_0 x) · wi_1 x)` (v1.1) or `wo(relu(wi x))`, pre-norm, residual |
//! | [`T5Block`] | `block.rs` | self-attention then feed-forward, float16 clamp as transformers |
//! | [`T5Stack`], [`T5EncoderModel`] | `encoder.rs` | embeddings (no scaling) → blocks → final norm |
//! | padding mask | `attention.rs` | a padded key gets `finfo(dtype).min` instead of its bias (transformers' SDPA path); padded queries are computed normally |
//!
//! ## What is computed (read off `transformers/models/clip/modeling_clip.py`, 5.24)
//!
//! | piece | file | detail |
//! |---|---|---|
//! | [`CLIPTextConfig`], [`CLIPTextModelConfig`] | `clip_config.rs` | `config.json`; `hidden_act` `quick_gelu` or `gelu`; [`CLIPPooling`] from `eos_token_id` (2 = legacy argmax) |
//! | [`CLIPTextModel`], [`CLIPTextModelWithProjection`] and their layers | `modeling_clip.rs` | token + position embeddings → causal pre-norm layers ([`kernels::attention`], [`kernels::linear`]) → `final_layer_norm`; pooled at the eos; every hidden state returned; `text_embeds = text_projection(pooled)` |
//! | loading | `clip_loader.rs` | keys with or without `text_model.` (transformers 4 / 5), f32/f16/bf16 files |
//!
//! ## Tokenizers (read off `tokenization_clip.py`, `tokenization_t5.py`, `tokenization_utils_*.py`, `convert_slow_tokenizer.py`, 5.24)
//!
//! | piece | file | detail |
//! |---|---|---|
//! | [`PromptTokenizer`] | `tokenizer.rs` | the pipelines' call: preprocessing (PixArt: `lower().strip()`; SD: none), padding and truncation to `max_length`, what was cut |
//! | CLIP | `tokenization_clip.rs` | byte-level BPE with `</w>`, NFC + whitespace + lowercase, the CLIP split pattern, `<\|startoftext\|> … <\|endoftext\|>` |
//! | T5 | `tokenization_t5.rs` | Unigram, `Precompiled` charsmap, `WhitespaceSplit` + `Metaspace`, `</s>`, the `<extra_id_N>` sentinels |
//! | `spiece.model` | `sentencepiece_model.rs` | a hand-written protobuf reader of the fields transformers takes |
//! | special and added tokens | `tokenizer_config.rs` | `tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json` resolved in transformers' order |
//!
//! Weights load through the `weights` crate ([`T5EncoderModel::from_pretrained`],
//! [`CLIPTextModel::from_pretrained`]; keys as in transformers, `Linear` weights transposed
//! from PyTorch's `[out, in]`).
//!
//! ## Naming
//!
//! Structs keep transformers' names (`CLIPMLP`, `BaseModelOutputWithPooling`, …). Fields too,
//! except where Rust wants snake case or a list is a pair: `SelfAttention` → `self_attention`,
//! `DenseReluDense` → `dense_relu_dense`, `layer[0]`/`layer[1]` →
//! `layer_self_attention`/`layer_ff`. Only T5's encoder half exists, so there is no
//! `is_decoder` branch, cross-attention or cache.

mod attention;
mod block;
mod clip_config;
mod clip_loader;
mod config;
mod encode;
mod encoder;
mod error;
mod feed_forward;
mod layer_norm;
mod loader;
mod modeling_clip;
mod sentencepiece_model;
mod tokenization_clip;
mod tokenization_t5;
mod tokenizer;
mod tokenizer_config;

pub use attention::{
    T5Attention, T5AttentionConfig, mask_position_bias, relative_position_bucket,
    relative_position_buckets,
};
pub use block::{T5Block, T5BlockConfig, T5LayerSelfAttention, clamp_f16};
pub use clip_config::{CLIPActivation, CLIPPooling, CLIPTextConfig, CLIPTextModelConfig};
pub use clip_loader::TEXT_MODEL_PREFIX;
pub use config::{T5Activation, T5Config, T5EncoderConfig, T5FeedForward};
pub use encode::{encode_prompts, encode_prompts_masked};
pub use encoder::{T5EncoderModel, T5Stack};
pub use error::{Result, TextError};
pub use feed_forward::{
    T5DenseActDense, T5DenseFF, T5DenseGatedActDense, T5LayerFF, T5LayerFFConfig, gelu_new,
};
pub use layer_norm::{T5LayerNorm, T5LayerNormConfig};
pub use loader::{EMBEDDING_KEYS, WEIGHTS_NAME};
pub use modeling_clip::{
    BaseModelOutputWithPooling, CLIPAttention, CLIPEncoder, CLIPEncoderLayer, CLIPMLP,
    CLIPTextEmbeddings, CLIPTextModel, CLIPTextModelOutput, CLIPTextModelWithProjection,
    causal_attention_bias, pooled_positions, quick_gelu,
};
pub use sentencepiece_model::{PieceType, SentencePiece, SentencePieceModel};
pub use tokenization_clip::CLIP_PATTERN;
pub use tokenization_t5::T5_UNK_ID;
pub use tokenizer::{
    CLIP_MAX_LENGTH, PAD_TOKEN, PIXART_ALPHA_MAX_LENGTH, PIXART_SIGMA_MAX_LENGTH, PromptTokenizer,
    TOKENIZER_FILES, TokenizedPrompts, TokenizerKind, Truncation, clean_up_tokenization,
    preprocess_prompt,
};

//! # models-text
//!
//! Text encoding for the diffusion pipelines: the T5 v1.1 encoder of PixArt-α/Σ and the
//! tokenization step of their pipelines, written to equal transformers 5 / diffusers 0.42.
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
//! | [`PromptTokenizer`] | `tokenizer.rs` | `lower().strip()`, `tokenizer.json` via the `tokenizers` crate, `</s>`, cut and padded to 120 (α) / 300 (Σ) |
//!
//! Weights load through the `weights` crate ([`T5EncoderModel::from_pretrained`]; keys as in
//! transformers, `Linear` weights transposed from PyTorch's `[out, in]`).
//!
//! ## Naming
//!
//! Structs keep transformers' names. Fields too, except where Rust wants snake case or a list
//! is a pair: `SelfAttention` → `self_attention`, `DenseReluDense` → `dense_relu_dense`,
//! `layer[0]`/`layer[1]` → `layer_self_attention`/`layer_ff`. Only the encoder half exists, so
//! there is no `is_decoder` branch, cross-attention or cache.

mod attention;
mod block;
mod config;
mod encode;
mod encoder;
mod error;
mod feed_forward;
mod layer_norm;
mod loader;
mod tokenizer;

pub use attention::{
    T5Attention, T5AttentionConfig, mask_position_bias, relative_position_bucket,
    relative_position_buckets,
};
pub use block::{T5Block, T5BlockConfig, T5LayerSelfAttention, clamp_f16};
pub use config::{T5Activation, T5Config, T5EncoderConfig, T5FeedForward};
pub use encode::encode_prompts;
pub use encoder::{T5EncoderModel, T5Stack};
pub use error::{Result, TextError};
pub use feed_forward::{
    T5DenseActDense, T5DenseFF, T5DenseGatedActDense, T5LayerFF, T5LayerFFConfig, gelu_new,
};
pub use layer_norm::{T5LayerNorm, T5LayerNormConfig};
pub use loader::{EMBEDDING_KEYS, WEIGHTS_NAME};
pub use tokenizer::{
    PAD_TOKEN, PIXART_ALPHA_MAX_LENGTH, PIXART_SIGMA_MAX_LENGTH, PromptTokenizer, TokenizedPrompts,
    Truncation, clean_up_tokenization, preprocess_prompt,
};

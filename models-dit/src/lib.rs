//! # models-dit
//!
//! The DiT family of diffusion transformers, computing exactly what diffusers 0.42 computes
//! (checked against its outputs in `tests/integration/diffusers_parity.rs`), written once for one device
//! and exposing the seams where parallel strategies act:
//!
//! - [`PixArtTransformer2DModel`]: PixArt-α (512 px; 1024 px multi-scale with resolution and
//!   aspect-ratio conditions) and PixArt-Σ (interpolation scale 2). Text conditioning through
//!   cross-attention to the projected T5 caption (padding masked by an additive −10000),
//!   timestep conditioning through adaLN-single shared by all blocks plus each block's
//!   `scale_shift_table`.
//! - [`DiTTransformer2DModel`]: class-conditional DiT with adaLN-Zero; every block embeds the
//!   timestep and class itself, the final layer reuses block 0's embedding, and label
//!   `num_classes` is the null class for classifier-free guidance.
//!
//! Both: a `p × p` patch embedding plus a 2-D sin-cos position embedding recomputed from the
//! actual token grid (`arange(n)/(n/base)/interpolation_scale` in float32, frequencies and
//! sin/cos in float64, the first half of the channels for the column), `num_layers`
//! [`BasicTransformerBlock`]s, a modulated final LayerNorm and projection, and unpatchify
//! `nhwpqc → nchpwq`.
//!
//! # Loading
//!
//! [`load`] (or [`DitModel::load`], [`PixArtTransformer2DModel::load`],
//! [`DiTTransformer2DModel::load`]) reads a diffusers folder: `config.json` (serde, diffusers'
//! defaults for absent or `null` keys; the legacy `Transformer2DModel` class is remapped by
//! `norm_type` as diffusers does) and the weights through the `weights` crate (one file or
//! shards, f32/f16/bf16 on disk). [`DitModel::preset`] builds a real-size model with random
//! weights ([`PRESETS`]). Module and field names follow diffusers' keys, with `.` → `_` inside
//! a name (`to_out.0` → `to_out_0`, `ff.net.0.proj` → `ff.net_0_proj`).
//!
//! A strategy says what a rank loads with a [`LoadPlan`](parallel_core::LoadPlan):
//! - `tensor_shard: Some(Shard { rank, world })`: q/k/v (self and cross) and `ff.net.0.proj`
//!   are column-parallel (rows `rank` of `world` of their `[out, in]` weight and bias),
//!   `to_out.0` and `ff.net.2` row-parallel (columns of the weight; the bias whole), all else
//!   replicated; blocks then compute with `heads / world` heads. Heads or feed-forward width
//!   not divisible by `world` is an error before any weight is read. A rank reads only its
//!   slices from the file.
//! - `blocks: Some(a..b)`: only those blocks (a pipeline stage); `skip_embed` / `skip_head`
//!   leave out the patch embedding / final layer. Keys left out are skipped, not "unused";
//!   a DiT stage holding the final layer but not block 0 also loads block 0's embedder.
//!
//! [`PixArtConfig::params`] / [`DiTConfig::params`] list every parameter with its
//! [`Sharding`](parallel_core::Sharding) and block, from the same table loading uses.
//!
//! # Seams
//!
//! Each block `i` calls, on the tokens of its band of rows:
//! - [`Seams::self_attention`](parallel_core::Seams::self_attention) with
//!   `AttentionSite { layer: i, tokens: grid.token_range(&rows), total_tokens }` and q, k, v as
//!   `[batch, local heads, tokens, head_dim]` (cross-attention to text is local: every rank
//!   has the whole caption);
//! - [`Seams::reduce_partial`](parallel_core::Seams::reduce_partial) after each row-parallel
//!   projection (`attn1.to_out.0`, `attn2.to_out.0`, `ff.net.2`) with the partial `x·W`; the
//!   bias is added after the reduce.
//!
//! The models implement [`Denoiser`](parallel_core::Denoiser) and
//! [`StagedDenoiser`](parallel_core::StagedDenoiser): `condition` computes the
//! timestep/class/caption embeddings (and every held block's modulation) once per forward;
//! `embed(rows)` patch-embeds only latent rows `rows·p` with the full grid's position
//! embedding sliced to them; `block(i, rows)`; `head(rows)` the final layer and unpatchify of
//! those rows; `forward_rows` is embed → all blocks → head for a band of latent rows. The
//! crate holds no strategy-specific code.
//!
//! # Design notes
//!
//! - Layers have no per-layer `XxxConfig::init`: every module is assembled from one
//!   parameter table per model (key, shape, sharding, part), filled either from a checkpoint
//!   or with random values ([`PixArtConfig::init`], [`DitModel::preset`]). Shapes, the
//!   tensor-parallel split and [`PixArtConfig::params`] therefore come from one place and
//!   cannot disagree; the model-level configs are serde structs mirroring `config.json`.
//! - The compute dtype is the weights' dtype (the device default, or
//!   [`weights::WeightStore::with_dtype`] with [`DitModel::from_store`]); inputs of any float
//!   dtype are cast at entry, and the sinusoidal embeddings are computed in float32 first as
//!   diffusers does.
//! - DiT reads `class_labels` back to the host once per forward to range-check them (an
//!   out-of-range label would otherwise index past the class table).

mod attention;
mod block;
mod config;
mod dit;
mod embeddings;
mod error;
pub mod flux;
mod joint;
mod load;
mod model;
mod normalization;
mod pixart;
mod rope;
mod sd3;
mod stages;

pub use attention::{Attention, FeedForward, linear, row_parallel};
pub use block::{BasicTransformerBlock, Context};
pub use config::{DiTConfig, KNOWN_CLASSES, LegacyKeys, ModelConfig, PRESETS, PixArtConfig};
pub use dit::DiTTransformer2DModel;
pub use embeddings::{
    CombinedTimestepLabelEmbeddings, PatchEmbed, PixArtAlphaCombinedTimestepSizeEmbeddings,
    PixArtAlphaTextProjection, TimestepEmbedding, pos_embed_rows, timestep_embedding,
};
pub use error::{DitError, Result};
pub use flux::{FluxConfig, FluxSingleTransformerBlock, FluxTransformer2DModel};
pub use model::{DitModel, WEIGHTS_FILE, load};
pub use normalization::{AdaLayerNormSingle, AdaLayerNormZero};
pub use pixart::PixArtTransformer2DModel;
pub use sd3::{JointTransformerBlock, QkvProjection, SD3Config, SD3Transformer2DModel};

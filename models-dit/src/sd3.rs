//! `SD3Transformer2DModel` (diffusers `transformers/transformer_sd3.py`): the MMDiT of Stable
//! Diffusion 3 and 3.5 — image and text tokens in two streams with their own weights, meeting
//! in one joint self-attention per block ([`Seams::joint_attention`]).
//!
//! - `JointTransformerBlock` (diffusers `attention.py`): adaLN-Zero modulation of both
//!   streams from one conditioning vector (timestep embedding + pooled text projection); the
//!   last block is `context_pre_only` (its text stream is modulated by a continuous adaLN
//!   and only supplies keys and values); SD3.5's `qk_norm = "rms_norm"` normalises every
//!   head's queries and keys (RMSNorm over the head dim, learned scale); SD3.5 Medium's
//!   `dual_attention_layers` add an image-only self-attention (`attn2`, modulated by three
//!   more vectors of `norm1`) after the joint one.
//! - Position embedding: a stored `pos_embed_max_size²` sin-cos table (`pos_embed.pos_embed`,
//!   persistent in the checkpoint) cropped at the centre to the latent's token grid.
//!
//! Under tensor parallelism each block holds a rank's heads and MLP columns of both streams
//! (q/k/v, `add_{q,k,v}_proj`, `attn2.to_{q,k,v}`, `ff*.net.0.proj` column-parallel;
//! `to_out.0`, `to_add_out`, `attn2.to_out.0`, `ff*.net.2` row-parallel through the reduce
//! seam); the text stream is whole on every rank under every strategy.

use std::ops::Range;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use parallel_core::{
    AttentionSite, Conditioning, DenoiserInput, JointLayer, LoadPlan, ModelDesc, ModelFamily,
    ParamInfo, Projection, ReduceSite, Seams, Sharding, TextQkv, TokenGrid,
};
use serde::Deserialize;
use weights::WeightStore;

use crate::attention::{FeedForward, linear, row_parallel};
use crate::embeddings::{TimestepEmbedding, pos_embed_rows, timestep_embedding};
use crate::error::{DitError, Result};
use crate::joint::{JointCond, JointStages, joint_denoiser};
use crate::load::{
    Lin, Loaded, Part, RandomSource, Source, StoreSource, Table, check_plan, materialize,
};
use crate::pixart::{feed_forward, timestep_mlp};
use crate::rope::JointRope;
use crate::stages::input_error;
use kernels::{gated_residual, layer_norm_modulate};

/// The class name.
pub const CLASS_NAME: &str = "SD3Transformer2DModel";

/// Eps of every LayerNorm and RMSNorm of the model (diffusers hard-codes 1e-6).
pub(crate) const EPS: f64 = 1e-6;

fn d_sample() -> usize {
    128
}
fn d_patch() -> usize {
    2
}
fn d_16() -> usize {
    16
}
fn d_layers() -> usize {
    18
}
fn d_head_dim() -> usize {
    64
}
fn d_heads() -> usize {
    18
}
fn d_joint() -> usize {
    4096
}
fn d_caption() -> usize {
    1152
}
fn d_pooled() -> usize {
    2048
}
fn d_out() -> Option<usize> {
    Some(16)
}
fn d_pos_max() -> usize {
    96
}

/// Configuration of [`SD3Transformer2DModel`], with diffusers 0.42's defaults for absent
/// keys. A key diffusers' class does not take is refused, naming it (keys starting with `_`,
/// diffusers' own bookkeeping, are ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SD3Config {
    /// Latent size of training (128); only sets the position table's base grid.
    #[serde(default = "d_sample")]
    pub sample_size: usize,
    /// Patch size (2).
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    /// Latent channels in (16).
    #[serde(default = "d_16")]
    pub in_channels: usize,
    /// Joint transformer blocks (18; the last is `context_pre_only`).
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    /// Channels per head (64).
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    /// Attention heads (18).
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Width of the text encoders' joined embeddings (4096).
    #[serde(default = "d_joint")]
    pub joint_attention_dim: usize,
    /// Width of the projected text stream (1152); must equal the hidden size.
    #[serde(default = "d_caption")]
    pub caption_projection_dim: usize,
    /// Width of the pooled text embeddings (2048: CLIP-L 768 + CLIP-G 1280).
    #[serde(default = "d_pooled")]
    pub pooled_projection_dim: usize,
    /// Channels out (16); `null` means `in_channels`.
    #[serde(default = "d_out")]
    pub out_channels: Option<usize>,
    /// Token rows and columns of the stored position table (96).
    #[serde(default = "d_pos_max")]
    pub pos_embed_max_size: usize,
    /// Blocks with SD3.5's image-only second attention (none for SD3).
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    /// `rms_norm` (SD3.5) or `null`.
    #[serde(default)]
    pub qk_norm: Option<String>,
}

impl SD3Config {
    /// Parses a `config.json` value of this class (the `_`-prefixed keys removed first).
    pub(crate) fn from_value(value: serde_json::Value, location: &str) -> Result<Self> {
        let config: SD3Config = strict_config(value, location, CLASS_NAME)?;
        config.validate(location)?;
        Ok(config)
    }

    /// Stable Diffusion 3 Medium (`stabilityai/stable-diffusion-3-medium-diffusers`).
    pub fn sd3_medium() -> Self {
        SD3Config {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 24,
            attention_head_dim: 64,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            caption_projection_dim: 1536,
            pooled_projection_dim: 2048,
            out_channels: Some(16),
            pos_embed_max_size: 192,
            dual_attention_layers: Vec::new(),
            qk_norm: None,
        }
    }

    /// Stable Diffusion 3.5 Medium (`stabilityai/stable-diffusion-3.5-medium`): RMS qk-norm,
    /// dual attention in blocks 0–12, position table 384².
    pub fn sd35_medium() -> Self {
        SD3Config {
            pos_embed_max_size: 384,
            dual_attention_layers: (0..13).collect(),
            qk_norm: Some("rms_norm".into()),
            ..Self::sd3_medium()
        }
    }

    /// Stable Diffusion 3.5 Large (`stabilityai/stable-diffusion-3.5-large`): 38 blocks of
    /// 38 heads, RMS qk-norm, no dual attention.
    pub fn sd35_large() -> Self {
        SD3Config {
            num_layers: 38,
            num_attention_heads: 38,
            caption_projection_dim: 2432,
            qk_norm: Some("rms_norm".into()),
            ..Self::sd3_medium()
        }
    }

    /// `num_attention_heads · attention_head_dim`.
    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    fn qk_norm(&self) -> bool {
        self.qk_norm.is_some()
    }

    fn dual(&self, block: usize) -> bool {
        self.dual_attention_layers.contains(&block)
    }

    fn pre_only(&self, block: usize) -> bool {
        block + 1 == self.num_layers
    }

    /// Checks that the settings are ones this crate computes exactly like diffusers.
    pub fn validate(&self, location: &str) -> Result<()> {
        let bad = |reason: String| Err(DitError::Config { location: location.into(), reason });
        let h = self.hidden_size();
        if self.num_attention_heads == 0 || self.attention_head_dim == 0 {
            return bad("`num_attention_heads` and `attention_head_dim` must be positive".into());
        }
        if self.num_layers == 0 || self.patch_size == 0 {
            return bad("`num_layers` and `patch_size` must be positive".into());
        }
        if !h.is_multiple_of(4) {
            return bad(format!(
                "hidden size {h} must be divisible by 4 for the 2-D sin-cos position embedding"
            ));
        }
        if self.caption_projection_dim != h {
            return bad(format!(
                "`caption_projection_dim` {} must equal the hidden size {h} \
                 (num_attention_heads × attention_head_dim): the text stream joins the \
                 image stream's attention",
                self.caption_projection_dim
            ));
        }
        if self.sample_size < self.patch_size {
            return bad("`sample_size` is below `patch_size`".into());
        }
        if self.pos_embed_max_size == 0 {
            return bad("`pos_embed_max_size` must be positive".into());
        }
        let mut unique = self.dual_attention_layers.clone();
        unique.sort_unstable();
        unique.dedup();
        if unique.len() != self.dual_attention_layers.len() {
            return bad(format!(
                "`dual_attention_layers` {:?} names a block twice",
                self.dual_attention_layers
            ));
        }
        if let Some(&l) = self.dual_attention_layers.iter().find(|&&l| l >= self.num_layers) {
            return bad(format!(
                "`dual_attention_layers` names block {l}; the model has {} blocks",
                self.num_layers
            ));
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm") => Ok(()),
            Some(other) => bad(format!(
                "`qk_norm` `{other}` is not supported (null, rms_norm: what SD3 and SD3.5 use)"
            )),
        }
    }

    /// What strategies validate against.
    pub fn desc(&self) -> ModelDesc {
        let h = self.hidden_size();
        ModelDesc {
            class_name: CLASS_NAME.into(),
            family: ModelFamily::MmDit,
            num_layers: self.num_layers,
            num_heads: self.num_attention_heads,
            head_dim: self.attention_head_dim,
            hidden_size: h,
            ff_inner: 4 * h,
            patch_size: self.patch_size,
            in_channels: self.in_channels,
            out_channels: self.out_channels(),
            cross_attention: false,
            row_granularity: self.patch_size,
            sample_size: self.sample_size,
            heads_per_level: vec![self.num_attention_heads],
            feature_sites: Vec::new(),
            joint_layers: (0..self.num_layers)
                .map(|i| JointLayer {
                    text_out: !self.pre_only(i),
                    image_attention: self.dual(i),
                    single_stream: false,
                })
                .collect(),
        }
    }

    pub(crate) fn table(&self, elem_bytes: usize) -> Table {
        let (h, p, m) = (self.hidden_size(), self.patch_size, self.pos_embed_max_size);
        let d = self.attention_head_dim;
        let rep = Sharding::Replicated;
        let mut t = Table::new(elem_bytes);
        t.tensor("pos_embed.proj.weight", &[h, self.in_channels, p, p], rep, Part::Embed);
        t.tensor("pos_embed.proj.bias", &[h], rep, Part::Embed);
        t.tensor("pos_embed.pos_embed", &[1, m * m, h], rep, Part::Embed);
        t.mlp("time_text_embed.timestep_embedder", 256, h, Part::Cond);
        let text = "time_text_embed.text_embedder";
        let pooled = self.pooled_projection_dim;
        t.linear(&format!("{text}.linear_1"), pooled, h, true, Lin::Replicated, Part::Cond);
        t.linear(&format!("{text}.linear_2"), h, h, true, Lin::Replicated, Part::Cond);
        let joint = self.joint_attention_dim;
        t.linear("context_embedder", joint, h, true, Lin::Replicated, Part::Embed);
        for i in 0..self.num_layers {
            let part = Part::Block(i);
            let b = format!("transformer_blocks.{i}");
            let norm1 = if self.dual(i) { 9 } else { 6 };
            t.linear(&format!("{b}.norm1.linear"), h, norm1 * h, true, Lin::Replicated, part);
            let ctx = if self.pre_only(i) { 2 } else { 6 };
            t.linear(&format!("{b}.norm1_context.linear"), h, ctx * h, true, Lin::Replicated, part);
            let mut attention = |name: &str, added: bool, out: bool| {
                let a = format!("{b}.{name}");
                for proj in ["to_q", "to_k", "to_v"] {
                    t.linear(&format!("{a}.{proj}"), h, h, true, Lin::Column, part);
                }
                if self.qk_norm() {
                    t.tensor(&format!("{a}.norm_q.weight"), &[d], rep, part);
                    t.tensor(&format!("{a}.norm_k.weight"), &[d], rep, part);
                }
                t.linear(&format!("{a}.to_out.0"), h, h, true, Lin::Row, part);
                if added {
                    for proj in ["add_q_proj", "add_k_proj", "add_v_proj"] {
                        t.linear(&format!("{a}.{proj}"), h, h, true, Lin::Column, part);
                    }
                    if self.qk_norm() {
                        t.tensor(&format!("{a}.norm_added_q.weight"), &[d], rep, part);
                        t.tensor(&format!("{a}.norm_added_k.weight"), &[d], rep, part);
                    }
                    if out {
                        t.linear(&format!("{a}.to_add_out"), h, h, true, Lin::Row, part);
                    }
                }
            };
            attention("attn", true, !self.pre_only(i));
            if self.dual(i) {
                attention("attn2", false, false);
            }
            let mut ff = |name: &str| {
                let f = format!("{b}.{name}");
                t.linear(&format!("{f}.net.0.proj"), h, 4 * h, true, Lin::Column, part);
                t.linear(&format!("{f}.net.2"), 4 * h, h, true, Lin::Row, part);
            };
            ff("ff");
            if !self.pre_only(i) {
                ff("ff_context");
            }
        }
        t.linear("norm_out.linear", h, 2 * h, true, Lin::Replicated, Part::Head);
        t.linear("proj_out", h, p * p * self.out_channels(), true, Lin::Replicated, Part::Head);
        t
    }

    /// Every parameter (diffusers key, full shape, tensor-parallel placement, block) with
    /// `elem_bytes` per element.
    pub fn params(&self, elem_bytes: usize) -> Vec<ParamInfo> {
        self.table(elem_bytes).specs.into_iter().map(|s| s.info).collect()
    }
}

/// A class's config from a `config.json` value, refusing keys the class does not take (its
/// serde `deny_unknown_fields`), naming the key; diffusers' `_`-prefixed bookkeeping keys
/// are removed first.
pub(crate) fn strict_config<T: serde::de::DeserializeOwned>(
    mut value: serde_json::Value,
    location: &str,
    class: &str,
) -> Result<T> {
    if let Some(map) = value.as_object_mut() {
        map.retain(|k, _| !k.starts_with('_'));
    }
    serde_json::from_value(value).map_err(|e| DitError::Config {
        location: location.into(),
        reason: format!("{class}: {e}"),
    })
}

/// RMSNorm over the head dim with a learned scale (diffusers `RMSNorm`, `qk_norm =
/// "rms_norm"`): `x / √(mean(x²) + eps) · w`, in float32.
///
/// # Shapes
/// `x`: `[batch, heads, tokens, head_dim]`; `weight`: `[head_dim]`.
pub(crate) fn rms_norm<B: Backend>(x: Tensor<B, 4>, weight: &Param<Tensor<B, 1>>) -> Tensor<B, 4> {
    let dtype = x.dtype();
    let xf = x.cast(DType::F32);
    let d = xf.dims()[3];
    let rstd = (xf.clone() * xf.clone()).mean_dim(3).add_scalar(EPS).sqrt().recip();
    let w = weight.val().cast(DType::F32).reshape([1, 1, 1, d]);
    (xf * rstd * w).cast(dtype)
}

/// Queries, keys and values of one stream: `prefix.{to_q,to_k,to_v}` (or the `add_*_proj`
/// of the text stream), with the optional RMS qk-norm.
#[derive(Module, Debug)]
pub struct QkvProjection<B: Backend> {
    /// Queries: hidden → this rank's heads · head_dim.
    pub q: Linear<B>,
    /// Keys.
    pub k: Linear<B>,
    /// Values.
    pub v: Linear<B>,
    /// `norm_q` / `norm_added_q` (qk-norm).
    pub norm_q: Option<Param<Tensor<B, 1>>>,
    /// `norm_k` / `norm_added_k` (qk-norm).
    pub norm_k: Option<Param<Tensor<B, 1>>>,
    /// Heads this instance holds.
    #[module(skip)]
    pub heads: usize,
    /// Channels per head.
    #[module(skip)]
    pub head_dim: usize,
}

impl<B: Backend> QkvProjection<B> {
    pub(crate) fn split_heads(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [batch, tokens, _] = x.dims();
        x.reshape([batch, tokens, self.heads, self.head_dim]).swap_dims(1, 2)
    }

    /// Keys and values, `[batch, heads, tokens, head_dim]` each.
    pub(crate) fn kv(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let k = self.split_heads(linear(&self.k, x.clone()));
        let k = match &self.norm_k {
            Some(w) => rms_norm(k, w),
            None => k,
        };
        (k, self.split_heads(linear(&self.v, x)))
    }

    /// Queries, `[batch, heads, tokens, head_dim]`.
    pub(crate) fn q(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let q = self.split_heads(linear(&self.q, x));
        match &self.norm_q {
            Some(w) => rms_norm(q, w),
            None => q,
        }
    }
}

pub(crate) fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [batch, heads, tokens, d] = x.dims();
    // A strategy's exchange may hand the heads back in `[b, h, n, d]` order: copied run by
    // run then (a no-op when they are already where the merge wants them).
    kernels::contiguous(x.swap_dims(1, 2)).reshape([batch, tokens, heads * d])
}

/// One joint transformer block (key `transformer_blocks.i`).
#[derive(Module, Debug)]
pub struct JointTransformerBlock<B: Backend> {
    /// `norm1.linear`: the image stream's 6 (dual attention: 9) modulation vectors.
    pub norm1: Linear<B>,
    /// `norm1_context.linear`: the text stream's 6 (`context_pre_only`: 2, scale and shift).
    pub norm1_context: Linear<B>,
    /// `attn.to_{q,k,v}` (+ `norm_q`, `norm_k`).
    pub image_qkv: QkvProjection<B>,
    /// `attn.add_{q,k,v}_proj` (+ `norm_added_q`, `norm_added_k`).
    pub text_qkv: QkvProjection<B>,
    /// `attn.to_out.0` (row-parallel).
    pub to_out: Linear<B>,
    /// `attn.to_add_out` (row-parallel; absent in the `context_pre_only` block).
    pub to_add_out: Option<Linear<B>>,
    /// SD3.5 dual attention: `attn2.to_{q,k,v}` and `attn2.to_out.0`.
    pub attn2: Option<(QkvProjection<B>, Linear<B>)>,
    /// `ff` (tanh GELU).
    pub ff: FeedForward<B>,
    /// `ff_context` (absent in the `context_pre_only` block).
    pub ff_context: Option<FeedForward<B>>,
    /// The attention site of `attn2`: numbered after every block's joint attention
    /// (`num_layers + k` for the k-th dual-attention block), so that a strategy keeping
    /// state per site keeps the two attentions of a block apart.
    #[module(skip)]
    pub dual_site: usize,
}

/// The per-forward modulation of one block, `[batch, 1, hidden]` each, in diffusers'
/// chunk order.
#[derive(Debug, Clone)]
pub(crate) struct BlockModulation<B: Backend> {
    /// Image: shift, scale, gate (attention); shift, scale, gate (MLP); dual: shift, scale,
    /// gate of `attn2`.
    image: Vec<Tensor<B, 3>>,
    /// Text: the same six, or (`context_pre_only`) scale and shift.
    text: Vec<Tensor<B, 3>>,
}

/// `linear(silu(temb))` cut into `k` vectors of `[batch, 1, hidden]`.
pub(crate) fn chunks<B: Backend>(
    linear_layer: &Linear<B>,
    temb_silu: &Tensor<B, 2>,
) -> Vec<Tensor<B, 3>> {
    let m = linear(linear_layer, temb_silu.clone());
    let [batch, kh] = m.dims();
    let h = linear_layer.weight.val().dims()[0];
    let m = m.reshape([batch, kh / h, h]);
    (0..kh / h).map(|i| m.clone().narrow(1, i, 1)).collect()
}

impl<B: Backend> JointTransformerBlock<B> {
    pub(crate) fn modulation(&self, temb_silu: &Tensor<B, 2>) -> BlockModulation<B> {
        BlockModulation {
            image: chunks(&self.norm1, temb_silu),
            text: chunks(&self.norm1_context, temb_silu),
        }
    }

    /// Runs the block on this rank's image tokens and the whole text stream; returns both
    /// streams (the text stream unchanged after the `context_pre_only` block, whose text
    /// output diffusers drops).
    pub(crate) fn forward(
        &self,
        hidden: Tensor<B, 3>,
        context: Tensor<B, 3>,
        m: &BlockModulation<B>,
        rope: Option<&JointRope<B>>,
        site: &AttentionSite,
        seams: &mut dyn Seams<B>,
    ) -> parallel_core::Result<(Tensor<B, 3>, Tensor<B, 3>)> {
        let layer = site.layer;
        let im = &m.image;
        let input = hidden.clone();
        let norm =
            layer_norm_modulate(hidden.clone(), EPS, Some(im[1].clone()), Some(im[0].clone()));
        let text_out = self.to_add_out.is_some();
        let norm_ctx = if text_out {
            layer_norm_modulate(
                context.clone(),
                EPS,
                Some(m.text[1].clone()),
                Some(m.text[0].clone()),
            )
        } else {
            // AdaLayerNormContinuous: `scale, shift = chunk(2)`, scale first.
            layer_norm_modulate(
                context.clone(),
                EPS,
                Some(m.text[0].clone()),
                Some(m.text[1].clone()),
            )
        };

        let q = self.image_qkv.q(norm.clone());
        let (k, v) = self.image_qkv.kv(norm.clone());
        let (tk, tv) = self.text_qkv.kv(norm_ctx.clone());
        let tq = text_out.then(|| self.text_qkv.q(norm_ctx));
        // Flux: rotary positions on queries and keys after their norms.
        let (q, k, tq, tk) = match rope {
            Some(r) => {
                (r.image.apply(q), r.image.apply(k), tq.map(|t| r.text.apply(t)), r.text.apply(tk))
            }
            None => (q, k, tq, tk),
        };
        let (image_attn, text_attn) =
            seams.joint_attention(site, q, k, v, TextQkv { q: tq, k: tk, v: tv })?;
        let reduce = |projection| ReduceSite { layer, projection };
        let attn = row_parallel(
            &self.to_out,
            merge_heads(image_attn),
            reduce(Projection::SelfAttnOut),
            seams,
        )?;
        let mut hidden = gated_residual(hidden, Some(im[2].clone()), attn);

        if let Some((qkv, out)) = &self.attn2 {
            // SD35AdaLayerNormZeroX: the block's input, normalised once and modulated a second
            // time by attn2's own shift and scale (not the stream after the joint attention).
            let norm2 = layer_norm_modulate(input, EPS, Some(im[7].clone()), Some(im[6].clone()));
            let (k, v) = qkv.kv(norm2.clone());
            let dual = AttentionSite { layer: self.dual_site, ..site.clone() };
            let o = seams.self_attention(&dual, qkv.q(norm2), k, v)?;
            let o = row_parallel(out, merge_heads(o), reduce(Projection::DualAttnOut), seams)?;
            hidden = gated_residual(hidden, Some(im[8].clone()), o);
        }

        let norm =
            layer_norm_modulate(hidden.clone(), EPS, Some(im[4].clone()), Some(im[3].clone()));
        let ff = self.ff.forward_at(norm, reduce(Projection::MlpOut), seams)?;
        let hidden = gated_residual(hidden, Some(im[5].clone()), ff);

        let context = match (&self.to_add_out, &self.ff_context, text_attn) {
            (Some(add_out), Some(ff_context), Some(text_attn)) => {
                let tm = &m.text;
                let a = row_parallel(
                    add_out,
                    merge_heads(text_attn),
                    reduce(Projection::ContextAttnOut),
                    seams,
                )?;
                let context = gated_residual(context, Some(tm[2].clone()), a);
                let norm = layer_norm_modulate(
                    context.clone(),
                    EPS,
                    Some(tm[4].clone()),
                    Some(tm[3].clone()),
                );
                let f = ff_context.forward_at(norm, reduce(Projection::ContextMlpOut), seams)?;
                gated_residual(context, Some(tm[5].clone()), f)
            }
            _ => context,
        };
        Ok((hidden, context))
    }
}

/// The SD3 / SD3.5 transformer (see the module docs).
#[derive(Module, Debug)]
pub struct SD3Transformer2DModel<B: Backend> {
    /// `pos_embed.proj`: the patch convolution (absent with `skip_embed`).
    pub patch_proj: Option<Conv2d<B>>,
    /// `pos_embed.pos_embed`: `[1, M², hidden]`, `M = pos_embed_max_size` (absent with
    /// `skip_embed`).
    pub pos_table: Option<Param<Tensor<B, 3>>>,
    /// `time_text_embed.timestep_embedder`.
    pub timestep_embedder: TimestepEmbedding<B>,
    /// `time_text_embed.text_embedder.linear_1` (pooled → hidden, then SiLU).
    pub pooled_1: Linear<B>,
    /// `time_text_embed.text_embedder.linear_2`.
    pub pooled_2: Linear<B>,
    /// `context_embedder`: joint_attention_dim → hidden (absent with `skip_embed`: only the
    /// first pipeline stage embeds the text stream).
    pub context_embedder: Option<Linear<B>>,
    /// `transformer_blocks`: the held ones.
    pub transformer_blocks: Vec<JointTransformerBlock<B>>,
    /// `norm_out.linear`: hidden → 2·hidden (scale, shift) (absent with `skip_head`).
    pub norm_out: Option<Linear<B>>,
    /// `proj_out`: hidden → p·p·out_channels (absent with `skip_head`).
    pub proj_out: Option<Linear<B>>,
    /// The configuration.
    #[module(skip)]
    pub config: SD3Config,
    #[module(skip)]
    desc: ModelDesc,
    #[module(skip)]
    held: Range<usize>,
}

impl<B: Backend> SD3Transformer2DModel<B> {
    /// Loads from an opened store (choose the compute dtype with
    /// [`WeightStore::with_dtype`]); fails if the store holds keys the model does not use.
    pub fn from_store(
        config: &SD3Config,
        mut store: WeightStore,
        plan: &LoadPlan,
        device: &B::Device,
    ) -> Result<Self> {
        let mut source = StoreSource { store: &mut store, device: device.clone() };
        let model = Self::build(config, plan, &mut source)?;
        store.finish()?;
        Ok(model)
    }

    /// Random weights, `N(0, 0.02²)`, honouring `plan`; the position table is the sin-cos
    /// table diffusers builds (for presets and benchmarks).
    pub fn random(config: &SD3Config, plan: &LoadPlan, device: &B::Device) -> Result<Self> {
        let mut model =
            Self::build(config, plan, &mut RandomSource { device: device.clone(), std: 0.02 })?;
        if model.pos_table.is_some() {
            let (h, m) = (config.hidden_size(), config.pos_embed_max_size);
            let grid = TokenGrid { rows: m, cols: m };
            let base = config.sample_size / config.patch_size;
            let table = pos_embed_rows::<B>(h, grid, 0..m, base, 1.0, DType::F32, device);
            model.pos_table = Some(Param::from_tensor(table.cast(model.dtype())));
        }
        Ok(model)
    }

    fn build(config: &SD3Config, plan: &LoadPlan, source: &mut dyn Source<B>) -> Result<Self> {
        config.validate(CLASS_NAME)?;
        let desc = config.desc();
        let held = check_plan(&desc, plan)?;
        let table = config.table(4);
        let mut p = materialize(CLASS_NAME, &table.specs, plan, &held, source)?;
        let world = plan.tensor_shard.map_or(1, |s| s.world);
        let heads = config.num_attention_heads / world;
        let head_dim = config.attention_head_dim;

        let (patch_proj, pos_table, context_embedder) = if plan.skip_embed {
            (None, None, None)
        } else {
            (
                Some(p.patch_conv("pos_embed.proj", config.patch_size)?),
                Some(Param::from_tensor(p.t3("pos_embed.pos_embed")?)),
                Some(p.linear("context_embedder")?),
            )
        };
        let timestep_embedder = timestep_mlp(&mut p, "time_text_embed.timestep_embedder")?;
        let pooled_1 = p.linear("time_text_embed.text_embedder.linear_1")?;
        let pooled_2 = p.linear("time_text_embed.text_embedder.linear_2")?;
        let qkv = |p: &mut Loaded<B>, a: &str, names: [&str; 3], norms: [&str; 2]| {
            Ok::<_, DitError>(QkvProjection {
                q: p.linear(&format!("{a}.{}", names[0]))?,
                k: p.linear(&format!("{a}.{}", names[1]))?,
                v: p.linear(&format!("{a}.{}", names[2]))?,
                norm_q: if config.qk_norm() {
                    Some(Param::from_tensor(p.t1(&format!("{a}.{}.weight", norms[0]))?))
                } else {
                    None
                },
                norm_k: if config.qk_norm() {
                    Some(Param::from_tensor(p.t1(&format!("{a}.{}.weight", norms[1]))?))
                } else {
                    None
                },
                heads,
                head_dim,
            })
        };
        let mut transformer_blocks = Vec::with_capacity(held.len());
        for i in held.clone() {
            let b = format!("transformer_blocks.{i}");
            let a = format!("{b}.attn");
            let image_qkv = qkv(&mut p, &a, ["to_q", "to_k", "to_v"], ["norm_q", "norm_k"])?;
            let text_qkv = qkv(
                &mut p,
                &a,
                ["add_q_proj", "add_k_proj", "add_v_proj"],
                ["norm_added_q", "norm_added_k"],
            )?;
            let pre_only = config.pre_only(i);
            let attn2 = if config.dual(i) {
                let a2 = format!("{b}.attn2");
                let proj = qkv(&mut p, &a2, ["to_q", "to_k", "to_v"], ["norm_q", "norm_k"])?;
                Some((proj, p.linear(&format!("{a2}.to_out.0"))?))
            } else {
                None
            };
            transformer_blocks.push(JointTransformerBlock {
                norm1: p.linear(&format!("{b}.norm1.linear"))?,
                norm1_context: p.linear(&format!("{b}.norm1_context.linear"))?,
                image_qkv,
                text_qkv,
                to_out: p.linear(&format!("{a}.to_out.0"))?,
                to_add_out: if pre_only {
                    None
                } else {
                    Some(p.linear(&format!("{a}.to_add_out"))?)
                },
                attn2,
                ff: feed_forward(&mut p, &b, true)?,
                dual_site: config.num_layers
                    + config.dual_attention_layers.iter().filter(|&&l| l < i).count(),
                ff_context: if pre_only {
                    None
                } else {
                    Some(FeedForward {
                        net_0_proj: p.linear(&format!("{b}.ff_context.net.0.proj"))?,
                        net_2: p.linear(&format!("{b}.ff_context.net.2"))?,
                        approximate: true,
                    })
                },
            });
        }
        let (norm_out, proj_out) = if plan.skip_head {
            (None, None)
        } else {
            (Some(p.linear("norm_out.linear")?), Some(p.linear("proj_out")?))
        };
        p.finish()?;
        Ok(SD3Transformer2DModel {
            patch_proj,
            pos_table,
            timestep_embedder,
            pooled_1,
            pooled_2,
            context_embedder,
            transformer_blocks,
            norm_out,
            proj_out,
            config: config.clone(),
            desc,
            held,
        })
    }

    /// Every parameter of the full model (see [`SD3Config::params`]).
    pub fn params(&self) -> Vec<ParamInfo> {
        self.config.params(self.dtype().size())
    }

    fn dtype(&self) -> DType {
        self.pooled_2.weight.val().dtype()
    }

    /// The position embedding of token rows `rows` of `grid`: the centred crop of the stored
    /// table, as diffusers' `PatchEmbed.cropped_pos_embed`.
    fn positions(
        &self,
        table: &Param<Tensor<B, 3>>,
        grid: TokenGrid,
        rows: Range<usize>,
    ) -> Result<Tensor<B, 3>> {
        let m = self.config.pos_embed_max_size;
        if grid.rows > m || grid.cols > m {
            return Err(input_error(
                &self.desc,
                format!(
                    "the token grid {}×{} exceeds the position table's {m}×{m} \
                     (`pos_embed_max_size`); the largest latent is {}×{}",
                    grid.rows,
                    grid.cols,
                    m * self.config.patch_size,
                    m * self.config.patch_size
                ),
            ));
        }
        let h = self.desc.hidden_size;
        let (top, left) = ((m - grid.rows) / 2, (m - grid.cols) / 2);
        let table = table.val().reshape([m, m, h]);
        let crop = table.narrow(0, top + rows.start, rows.len()).narrow(1, left, grid.cols);
        Ok(crop.reshape([1, rows.len() * grid.cols, h]))
    }
}

impl<B: Backend> JointStages<B> for SD3Transformer2DModel<B> {
    fn joint_desc(&self) -> &ModelDesc {
        &self.desc
    }

    fn joint_held(&self) -> &Range<usize> {
        &self.held
    }

    /// The inputs checked, and what every block reads computed once: the conditioning of
    /// one forward.
    fn compute_condition(&self, input: &DenoiserInput<B>) -> parallel_core::Result<Conditioning> {
        let desc = &self.desc;
        let grid = crate::stages::check_input(desc, input)?;
        let dtype = self.dtype();
        let c = &self.config;
        let context = crate::stages::text_context(
            desc,
            input,
            c.joint_attention_dim,
            "the joined text embeddings",
        )?;
        let pooled =
            crate::stages::added_cond(desc, input, "pooled_projections", c.pooled_projection_dim)?;
        if input.encoder_attention_mask.is_some() || input.class_labels.is_some() {
            return Err(input_error(
                desc,
                "SD3 takes no `encoder_attention_mask` or `class_labels` (its text is not masked)",
            )
            .into());
        }
        if let Some(k) = input.added_cond.keys().find(|k| *k != "pooled_projections") {
            return Err(input_error(desc, format!("SD3 takes no added condition `{k}`")).into());
        }

        // Conditioning: timestep embedding + pooled text projection, through SiLU once for
        // every adaLN.
        let t = self.timestep_embedder.forward(timestep_embedding(
            input.timestep.clone(),
            256,
            0.0,
            dtype,
        ));
        let pooled =
            linear(&self.pooled_2, kernels::silu(linear(&self.pooled_1, pooled.cast(dtype))));
        let text_tokens = context.dims()[1];
        Ok(Conditioning::new(
            grid,
            JointCond {
                held: self.held.clone(),
                temb_silu: kernels::silu(t + pooled),
                text_tokens,
                context: self.context_embedder.as_ref().map(|e| linear(e, context.cast(dtype))),
                rope: None,
            },
        ))
    }

    /// Patch and position embedding of token rows `rows`.
    fn embed_image(
        &self,
        input: &DenoiserInput<B>,
        rows: Range<usize>,
        grid: TokenGrid,
    ) -> parallel_core::Result<Tensor<B, 3>> {
        let (Some(proj), Some(table)) = (&self.patch_proj, &self.pos_table) else {
            return Err(input_error(
                &self.desc,
                "this instance was loaded without the patch \
                                                 and text embeddings",
            )
            .into());
        };
        let p = self.desc.patch_size;
        let latent = input
            .hidden_states
            .clone()
            .narrow(2, rows.start * p, rows.len() * p)
            .cast(self.dtype());
        let x = proj.forward(latent);
        let [batch, h, n_rows, cols] = x.dims();
        Ok(x.reshape([batch, h, n_rows * cols]).swap_dims(1, 2)
            + self.positions(table, grid, rows)?)
    }

    /// Block `index` (held) on a band's image tokens and the text stream.
    fn run_block(
        &self,
        index: usize,
        image: Tensor<B, 3>,
        context: Tensor<B, 3>,
        site: &AttentionSite,
        c: &JointCond<B>,
        seams: &mut dyn Seams<B>,
    ) -> parallel_core::Result<(Tensor<B, 3>, Tensor<B, 3>)> {
        let block = &self.transformer_blocks[index - self.held.start];
        let m = block.modulation(&c.temb_silu);
        block.forward(image, context, &m, None, site, seams)
    }

    /// The final layer and unpatchify of a band's image tokens.
    fn head_image(
        &self,
        image: Tensor<B, 3>,
        rows: Range<usize>,
        grid: TokenGrid,
        c: &JointCond<B>,
    ) -> parallel_core::Result<Tensor<B, 4>> {
        let (Some(norm_out), Some(proj_out)) = (&self.norm_out, &self.proj_out) else {
            return Err(input_error(
                &self.desc,
                "this instance was loaded without the final layer",
            )
            .into());
        };
        let out = chunks(norm_out, &c.temb_silu);
        // AdaLayerNormContinuous: scale first, then shift.
        let x = layer_norm_modulate(image, EPS, Some(out[0].clone()), Some(out[1].clone()));
        let x = linear(proj_out, x);
        let [batch, _, _] = x.dims();
        let (p, c_out, n_rows) = (self.desc.patch_size, self.desc.out_channels, rows.len());
        // nhwpqc -> nchpwq
        Ok(x.reshape([batch, n_rows, grid.cols, p, p, c_out])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([batch, c_out, n_rows * p, grid.cols * p]))
    }
}

joint_denoiser!(SD3Transformer2DModel);

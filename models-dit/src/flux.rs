//! `FluxTransformer2DModel` (diffusers `transformers/transformer_flux.py`): FLUX.1 — an MMDiT
//! of double-stream blocks (image and text streams with their own weights meeting in one
//! joint attention, as SD3's) followed by single-stream blocks (text and image tokens as one
//! stream through one set of weights: attention and a parallel MLP, one packed output
//! projection), with rotary positions on three axes instead of a position table.
//!
//! - **Latents.** diffusers' model takes the pipeline's packed tokens (`_pack_latents`: 2×2
//!   latent pixels of `C` channels → one token of `4C`) and position ids (`img_ids` rows
//!   `(0, row, col)`, `txt_ids` zeros). Here, like every model of the crate, the input is the
//!   latent `[batch, C, H, W]` and a band of latent rows is packed inside the forward; the
//!   ids are those of the pipeline, computed from the band (what lets a row split work on
//!   Flux unchanged). [`ModelDesc::patch_size`] is 2, `in_channels` the latent's `C`.
//! - **Conditioning.** `timestep` as diffusers' forward takes it (the pipeline's σ = t/1000;
//!   the model multiplies by 1000), FLUX.1-dev's `guidance` (`added_cond["guidance"]`,
//!   `[batch, 1]`, also ×1000) and the pooled CLIP embedding (`pooled_projections`).
//! - The last single-stream block's text tokens only supply keys and values: diffusers
//!   computes their output and drops it, which changes nothing.
//!
//! Tensor parallelism: q/k/v (both streams), `proj_mlp`, `ff*.net.0.proj` column-parallel;
//! `to_out.0`, `to_add_out`, `ff*.net.2` row-parallel; the single blocks' `proj_out`
//! row-parallel over its two packed input blocks (attention heads, then MLP columns:
//! [`Sharding::RowPacked`]), one reduce over the text and image tokens together.

use std::ops::Range;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use parallel_core::{
    AttentionSite, Conditioning, DenoiserInput, JointLayer, LoadPlan, ModelDesc, ModelFamily,
    ParamInfo, Projection, ReduceSite, Seams, Sharding, TextQkv, TokenGrid,
};
use serde::Deserialize;
use weights::WeightStore;

use crate::attention::{FeedForward, linear, row_parallel};
use crate::embeddings::{TimestepEmbedding, timestep_embedding};
use crate::error::{DitError, Result};
use crate::joint::{JointCond, JointStages, joint_denoiser};
use crate::load::{
    Lin, Loaded, Part, RandomSource, Source, StoreSource, Table, check_plan, materialize,
};
use crate::pixart::{feed_forward, timestep_mlp};
use crate::rope::{JointRope, Rope};
use crate::sd3::{EPS, JointTransformerBlock, QkvProjection, chunks, merge_heads, strict_config};
use crate::stages::input_error;
use kernels::{gated_residual, layer_norm_modulate};

/// The class name.
pub const CLASS_NAME: &str = "FluxTransformer2DModel";

/// `FluxPosEmbed`'s θ.
const THETA: f64 = 10000.0;

fn d_patch() -> usize {
    1
}
fn d_in() -> usize {
    64
}
fn d_layers() -> usize {
    19
}
fn d_single() -> usize {
    38
}
fn d_head_dim() -> usize {
    128
}
fn d_heads() -> usize {
    24
}
fn d_joint() -> usize {
    4096
}
fn d_pooled() -> usize {
    768
}
fn d_axes() -> Vec<usize> {
    vec![16, 56, 56]
}

/// Configuration of [`FluxTransformer2DModel`], with diffusers 0.42's defaults for absent
/// keys; a key the class does not take is refused, naming it (`_`-prefixed keys ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FluxConfig {
    /// Must be 1: the pipeline packs 2×2 latent pixels into a token itself.
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    /// Channels of a packed token (64: 16 latent channels × 2 × 2).
    #[serde(default = "d_in")]
    pub in_channels: usize,
    /// Channels of a packed output token; `null`: `in_channels`.
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Double-stream blocks (19).
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    /// Single-stream blocks (38).
    #[serde(default = "d_single")]
    pub num_single_layers: usize,
    /// Channels per head (128).
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    /// Attention heads (24).
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// Width of the T5 embeddings (4096).
    #[serde(default = "d_joint")]
    pub joint_attention_dim: usize,
    /// Width of the pooled CLIP embedding (768).
    #[serde(default = "d_pooled")]
    pub pooled_projection_dim: usize,
    /// FLUX.1-dev's guidance embedding (true for dev, false for schnell).
    #[serde(default)]
    pub guidance_embeds: bool,
    /// Channels of each head rotated by each position axis (16, 56, 56); their sum is the
    /// head dim.
    #[serde(default = "d_axes")]
    pub axes_dims_rope: Vec<usize>,
}

impl FluxConfig {
    /// Parses a `config.json` value of this class (the `_`-prefixed keys removed first).
    pub(crate) fn from_value(value: serde_json::Value, location: &str) -> Result<Self> {
        let config: FluxConfig = strict_config(value, location, CLASS_NAME)?;
        config.validate(location)?;
        Ok(config)
    }

    /// FLUX.1-dev (`black-forest-labs/FLUX.1-dev`).
    pub fn flux1_dev() -> Self {
        FluxConfig {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: true,
            axes_dims_rope: vec![16, 56, 56],
        }
    }

    /// FLUX.1-schnell (`black-forest-labs/FLUX.1-schnell`): no guidance embedding.
    pub fn flux1_schnell() -> Self {
        FluxConfig { guidance_embeds: false, ..Self::flux1_dev() }
    }

    /// `num_attention_heads · attention_head_dim`.
    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Channels of a packed output token.
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// All blocks, double then single.
    pub fn blocks(&self) -> usize {
        self.num_layers + self.num_single_layers
    }

    /// Checks that the settings are ones this crate computes exactly like diffusers.
    pub fn validate(&self, location: &str) -> Result<()> {
        let bad = |reason: String| Err(DitError::Config { location: location.into(), reason });
        if self.num_attention_heads == 0 || self.attention_head_dim == 0 {
            return bad("`num_attention_heads` and `attention_head_dim` must be positive".into());
        }
        if self.blocks() == 0 {
            return bad("`num_layers` + `num_single_layers` must be positive".into());
        }
        if self.patch_size != 1 {
            return bad(format!(
                "`patch_size` {} is not supported: FLUX packs 2×2 latent pixels per token in \
                 the pipeline and uses patch_size 1",
                self.patch_size
            ));
        }
        for (key, c) in [("in_channels", self.in_channels), ("out_channels", self.out_channels())] {
            if c == 0 || !c.is_multiple_of(4) {
                return bad(format!(
                    "`{key}` {c} must be a positive multiple of 4 (2×2 packed latent channels)"
                ));
            }
        }
        let axes = &self.axes_dims_rope;
        if axes.len() != 3
            || axes.iter().any(|a| a % 2 != 0)
            || axes.iter().sum::<usize>() != self.attention_head_dim
        {
            return bad(format!(
                "`axes_dims_rope` {axes:?} must be three even numbers summing to \
                 `attention_head_dim` {}",
                self.attention_head_dim
            ));
        }
        Ok(())
    }

    /// What strategies validate against (latent channels and 2×2 patches: the packing).
    pub fn desc(&self) -> ModelDesc {
        let h = self.hidden_size();
        let single_last = self.num_single_layers > 0;
        ModelDesc {
            class_name: CLASS_NAME.into(),
            family: ModelFamily::MmDit,
            num_layers: self.blocks(),
            num_heads: self.num_attention_heads,
            head_dim: self.attention_head_dim,
            hidden_size: h,
            ff_inner: 4 * h,
            patch_size: 2,
            in_channels: self.in_channels / 4,
            out_channels: self.out_channels() / 4,
            cross_attention: false,
            row_granularity: 2,
            sample_size: 128,
            heads_per_level: vec![self.num_attention_heads],
            feature_sites: Vec::new(),
            joint_layers: (0..self.blocks())
                .map(|i| JointLayer {
                    // The last block's text output is dropped: only with single blocks (a
                    // double-stream last block still feeds nothing, but diffusers has none).
                    text_out: !(single_last && i + 1 == self.blocks()),
                    image_attention: false,
                    single_stream: i >= self.num_layers,
                })
                .collect(),
        }
    }

    pub(crate) fn table(&self, elem_bytes: usize) -> Table {
        let (h, d) = (self.hidden_size(), self.attention_head_dim);
        let rep = Sharding::Replicated;
        let mut t = Table::new(elem_bytes);
        t.linear("x_embedder", self.in_channels, h, true, Lin::Replicated, Part::Embed);
        t.mlp("time_text_embed.timestep_embedder", 256, h, Part::Cond);
        if self.guidance_embeds {
            t.mlp("time_text_embed.guidance_embedder", 256, h, Part::Cond);
        }
        let text = "time_text_embed.text_embedder";
        let pooled = self.pooled_projection_dim;
        t.linear(&format!("{text}.linear_1"), pooled, h, true, Lin::Replicated, Part::Cond);
        t.linear(&format!("{text}.linear_2"), h, h, true, Lin::Replicated, Part::Cond);
        let joint = self.joint_attention_dim;
        t.linear("context_embedder", joint, h, true, Lin::Replicated, Part::Embed);
        let qkv = |t: &mut Table, a: &str, names: [&str; 3], norms: [&str; 2], part| {
            for proj in names {
                t.linear(&format!("{a}.{proj}"), h, h, true, Lin::Column, part);
            }
            for norm in norms {
                t.tensor(&format!("{a}.{norm}.weight"), &[d], rep, part);
            }
        };
        for i in 0..self.num_layers {
            let part = Part::Block(i);
            let b = format!("transformer_blocks.{i}");
            t.linear(&format!("{b}.norm1.linear"), h, 6 * h, true, Lin::Replicated, part);
            t.linear(&format!("{b}.norm1_context.linear"), h, 6 * h, true, Lin::Replicated, part);
            let a = format!("{b}.attn");
            qkv(&mut t, &a, ["to_q", "to_k", "to_v"], ["norm_q", "norm_k"], part);
            t.linear(&format!("{a}.to_out.0"), h, h, true, Lin::Row, part);
            let added = ["add_q_proj", "add_k_proj", "add_v_proj"];
            qkv(&mut t, &a, added, ["norm_added_q", "norm_added_k"], part);
            t.linear(&format!("{a}.to_add_out"), h, h, true, Lin::Row, part);
            for f in ["ff", "ff_context"] {
                t.linear(&format!("{b}.{f}.net.0.proj"), h, 4 * h, true, Lin::Column, part);
                t.linear(&format!("{b}.{f}.net.2"), 4 * h, h, true, Lin::Row, part);
            }
        }
        for j in 0..self.num_single_layers {
            let part = Part::Block(self.num_layers + j);
            let b = format!("single_transformer_blocks.{j}");
            t.linear(&format!("{b}.norm.linear"), h, 3 * h, true, Lin::Replicated, part);
            t.linear(&format!("{b}.proj_mlp"), h, 4 * h, true, Lin::Column, part);
            t.linear(&format!("{b}.proj_out"), 5 * h, h, true, Lin::RowPacked(h), part);
            qkv(&mut t, &format!("{b}.attn"), ["to_q", "to_k", "to_v"], ["norm_q", "norm_k"], part);
        }
        t.linear("norm_out.linear", h, 2 * h, true, Lin::Replicated, Part::Head);
        t.linear("proj_out", h, self.out_channels(), true, Lin::Replicated, Part::Head);
        t
    }

    /// Every parameter (diffusers key, full shape, tensor-parallel placement, block) with
    /// `elem_bytes` per element.
    pub fn params(&self, elem_bytes: usize) -> Vec<ParamInfo> {
        self.table(elem_bytes).specs.into_iter().map(|s| s.info).collect()
    }
}

/// One single-stream block (key `single_transformer_blocks.j`).
#[derive(Module, Debug)]
pub struct FluxSingleTransformerBlock<B: Backend> {
    /// `norm.linear`: shift, scale, gate.
    pub norm: Linear<B>,
    /// `attn.to_{q,k,v}` with `norm_q`, `norm_k`.
    pub qkv: QkvProjection<B>,
    /// `proj_mlp` (column-parallel), then tanh GELU.
    pub proj_mlp: Linear<B>,
    /// `proj_out` over `[attention, mlp]` (row-parallel, packed).
    pub proj_out: Linear<B>,
}

impl<B: Backend> FluxSingleTransformerBlock<B> {
    /// Runs the block on this rank's image tokens and the whole text stream. With
    /// `text_out` false the text tokens only give keys and values, and come back unchanged.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        hidden: Tensor<B, 3>,
        context: Tensor<B, 3>,
        temb_silu: &Tensor<B, 2>,
        rope: &JointRope<B>,
        text_out: bool,
        site: &AttentionSite,
        seams: &mut dyn Seams<B>,
    ) -> parallel_core::Result<(Tensor<B, 3>, Tensor<B, 3>)> {
        let m = chunks(&self.norm, temb_silu);
        let (shift, scale, gate) = (m[0].clone(), m[1].clone(), m[2].clone());
        let norm =
            |x: Tensor<B, 3>| layer_norm_modulate(x, EPS, Some(scale.clone()), Some(shift.clone()));
        let (image, text) = (norm(hidden.clone()), norm(context.clone()));
        let q = rope.image.apply(self.qkv.q(image.clone()));
        let (k, v) = self.qkv.kv(image.clone());
        let k = rope.image.apply(k);
        let (tk, tv) = self.qkv.kv(text.clone());
        let tk = rope.text.apply(tk);
        let tq = text_out.then(|| rope.text.apply(self.qkv.q(text.clone())));
        let (attn, text_attn) =
            seams.joint_attention(site, q, k, v, TextQkv { q: tq, k: tk, v: tv })?;
        let t = context.dims()[1];
        // One stream [text, image] as diffusers concatenates it, through the packed proj_out.
        let (residual, attn, mlp_in) = match text_attn {
            Some(text_attn) => (
                Tensor::cat(vec![context.clone(), hidden], 1),
                Tensor::cat(vec![merge_heads(text_attn), merge_heads(attn)], 1),
                Tensor::cat(vec![text, image], 1),
            ),
            None => (hidden, merge_heads(attn), image),
        };
        let mlp = kernels::gelu(linear(&self.proj_mlp, mlp_in), true);
        let site = ReduceSite { layer: site.layer, projection: Projection::SingleStreamOut };
        let out = row_parallel(&self.proj_out, Tensor::cat(vec![attn, mlp], 2), site, seams)?;
        let stream = gated_residual(residual, Some(gate), out);
        if text_out {
            let n = stream.dims()[1] - t;
            Ok((stream.clone().narrow(1, t, n), stream.narrow(1, 0, t)))
        } else {
            Ok((stream, context))
        }
    }
}

/// The FLUX.1 transformer (see the module docs).
#[derive(Module, Debug)]
pub struct FluxTransformer2DModel<B: Backend> {
    /// `x_embedder`: packed token → hidden (absent with `skip_embed`).
    pub x_embedder: Option<Linear<B>>,
    /// `time_text_embed.timestep_embedder`.
    pub timestep_embedder: TimestepEmbedding<B>,
    /// `time_text_embed.guidance_embedder` (FLUX.1-dev).
    pub guidance_embedder: Option<TimestepEmbedding<B>>,
    /// `time_text_embed.text_embedder.linear_1` (pooled → hidden, then SiLU).
    pub pooled_1: Linear<B>,
    /// `time_text_embed.text_embedder.linear_2`.
    pub pooled_2: Linear<B>,
    /// `context_embedder`: T5 width → hidden (absent with `skip_embed`: only the first
    /// pipeline stage embeds the text stream).
    pub context_embedder: Option<Linear<B>>,
    /// `transformer_blocks` (double-stream): the held ones.
    pub transformer_blocks: Vec<JointTransformerBlock<B>>,
    /// `single_transformer_blocks`: the held ones (block `num_layers + j` is single `j`).
    pub single_transformer_blocks: Vec<FluxSingleTransformerBlock<B>>,
    /// `norm_out.linear`: scale, shift (absent with `skip_head`).
    pub norm_out: Option<Linear<B>>,
    /// `proj_out`: hidden → packed output channels (absent with `skip_head`).
    pub proj_out: Option<Linear<B>>,
    /// The configuration.
    #[module(skip)]
    pub config: FluxConfig,
    #[module(skip)]
    desc: ModelDesc,
    /// The held blocks, double-stream `0..num_layers` then single-stream.
    #[module(skip)]
    held: Range<usize>,
}

impl<B: Backend> FluxTransformer2DModel<B> {
    /// Loads from an opened store (choose the compute dtype with
    /// [`WeightStore::with_dtype`]); fails if the store holds keys the model does not use.
    pub fn from_store(
        config: &FluxConfig,
        mut store: WeightStore,
        plan: &LoadPlan,
        device: &B::Device,
    ) -> Result<Self> {
        let mut source = StoreSource { store: &mut store, device: device.clone() };
        let model = Self::build(config, plan, &mut source)?;
        store.finish()?;
        Ok(model)
    }

    /// Random weights, `N(0, 0.02²)`, honouring `plan` (presets and benchmarks).
    pub fn random(config: &FluxConfig, plan: &LoadPlan, device: &B::Device) -> Result<Self> {
        Self::build(config, plan, &mut RandomSource { device: device.clone(), std: 0.02 })
    }

    fn build(config: &FluxConfig, plan: &LoadPlan, source: &mut dyn Source<B>) -> Result<Self> {
        config.validate(CLASS_NAME)?;
        let desc = config.desc();
        let held = check_plan(&desc, plan)?;
        let table = config.table(4);
        let mut p = materialize(CLASS_NAME, &table.specs, plan, &held, source)?;
        let world = plan.tensor_shard.map_or(1, |s| s.world);
        let heads = config.num_attention_heads / world;
        let head_dim = config.attention_head_dim;
        let qkv = |p: &mut Loaded<B>, a: &str, names: [&str; 3], norms: [&str; 2]| {
            Ok::<_, DitError>(QkvProjection {
                q: p.linear(&format!("{a}.{}", names[0]))?,
                k: p.linear(&format!("{a}.{}", names[1]))?,
                v: p.linear(&format!("{a}.{}", names[2]))?,
                norm_q: Some(Param::from_tensor(p.t1(&format!("{a}.{}.weight", norms[0]))?)),
                norm_k: Some(Param::from_tensor(p.t1(&format!("{a}.{}.weight", norms[1]))?)),
                heads,
                head_dim,
            })
        };
        let (x_embedder, context_embedder) = if plan.skip_embed {
            (None, None)
        } else {
            (Some(p.linear("x_embedder")?), Some(p.linear("context_embedder")?))
        };
        let timestep_embedder = timestep_mlp(&mut p, "time_text_embed.timestep_embedder")?;
        let guidance_embedder = if config.guidance_embeds {
            Some(timestep_mlp(&mut p, "time_text_embed.guidance_embedder")?)
        } else {
            None
        };
        let pooled_1 = p.linear("time_text_embed.text_embedder.linear_1")?;
        let pooled_2 = p.linear("time_text_embed.text_embedder.linear_2")?;
        let doubles = held.start.min(config.num_layers)..held.end.min(config.num_layers);
        let mut transformer_blocks = Vec::with_capacity(doubles.len());
        for i in doubles {
            let b = format!("transformer_blocks.{i}");
            let a = format!("{b}.attn");
            transformer_blocks.push(JointTransformerBlock {
                norm1: p.linear(&format!("{b}.norm1.linear"))?,
                norm1_context: p.linear(&format!("{b}.norm1_context.linear"))?,
                image_qkv: qkv(&mut p, &a, ["to_q", "to_k", "to_v"], ["norm_q", "norm_k"])?,
                text_qkv: qkv(
                    &mut p,
                    &a,
                    ["add_q_proj", "add_k_proj", "add_v_proj"],
                    ["norm_added_q", "norm_added_k"],
                )?,
                to_out: p.linear(&format!("{a}.to_out.0"))?,
                to_add_out: Some(p.linear(&format!("{a}.to_add_out"))?),
                attn2: None,
                dual_site: 0,
                ff: feed_forward(&mut p, &b, true)?,
                ff_context: Some(FeedForward {
                    net_0_proj: p.linear(&format!("{b}.ff_context.net.0.proj"))?,
                    net_2: p.linear(&format!("{b}.ff_context.net.2"))?,
                    approximate: true,
                }),
            });
        }
        let l = config.num_layers;
        let singles = held.start.max(l) - l..held.end.max(l) - l;
        let mut single_transformer_blocks = Vec::with_capacity(singles.len());
        for j in singles {
            let b = format!("single_transformer_blocks.{j}");
            single_transformer_blocks.push(FluxSingleTransformerBlock {
                norm: p.linear(&format!("{b}.norm.linear"))?,
                qkv: qkv(
                    &mut p,
                    &format!("{b}.attn"),
                    ["to_q", "to_k", "to_v"],
                    ["norm_q", "norm_k"],
                )?,
                proj_mlp: p.linear(&format!("{b}.proj_mlp"))?,
                proj_out: p.linear(&format!("{b}.proj_out"))?,
            });
        }
        let (norm_out, proj_out) = if plan.skip_head {
            (None, None)
        } else {
            (Some(p.linear("norm_out.linear")?), Some(p.linear("proj_out")?))
        };
        p.finish()?;
        Ok(FluxTransformer2DModel {
            x_embedder,
            timestep_embedder,
            guidance_embedder,
            pooled_1,
            pooled_2,
            context_embedder,
            transformer_blocks,
            single_transformer_blocks,
            norm_out,
            proj_out,
            config: config.clone(),
            desc,
            held,
        })
    }

    /// Every parameter of the full model (see [`FluxConfig::params`]).
    pub fn params(&self) -> Vec<ParamInfo> {
        self.config.params(self.dtype().size())
    }

    fn dtype(&self) -> DType {
        self.pooled_2.weight.val().dtype()
    }
}

impl<B: Backend> JointStages<B> for FluxTransformer2DModel<B> {
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
        let batch = input.batch();
        let dtype = self.dtype();
        let c = &self.config;
        let context =
            crate::stages::text_context(desc, input, c.joint_attention_dim, "the T5 embeddings")?;
        let text_tokens = context.dims()[1];
        let pooled =
            crate::stages::added_cond(desc, input, "pooled_projections", c.pooled_projection_dim)?;
        let guidance = if c.guidance_embeds {
            Some(crate::stages::added_cond(desc, input, "guidance", 1)?)
        } else {
            None
        };
        let allowed: &[&str] = if c.guidance_embeds {
            &["pooled_projections", "guidance"]
        } else {
            &["pooled_projections"]
        };
        if let Some(k) = input.added_cond.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(input_error(
                desc,
                format!("{CLASS_NAME} takes no added condition `{k}` (it takes {allowed:?})"),
            )
            .into());
        }
        if input.encoder_attention_mask.is_some() || input.class_labels.is_some() {
            return Err(input_error(
                desc,
                "FLUX takes no `encoder_attention_mask` or `class_labels`",
            )
            .into());
        }

        // Conditioning: timestep (and guidance) × 1000, sinusoidal, embedded; + pooled text.
        let embed_scalar = |t: Tensor<B, 1>, mlp: &TimestepEmbedding<B>| {
            mlp.forward(timestep_embedding(
                t.cast(DType::F32).cast(dtype).mul_scalar(1000.0),
                256,
                0.0,
                dtype,
            ))
        };
        let mut temb = embed_scalar(input.timestep.clone(), &self.timestep_embedder);
        if let (Some(g), Some(mlp)) = (guidance, &self.guidance_embedder) {
            temb = temb + embed_scalar(g.reshape([batch]), mlp);
        }
        let pooled =
            linear(&self.pooled_2, kernels::silu(linear(&self.pooled_1, pooled.cast(dtype))));

        // The pipeline's ids: text (0, 0, 0); image (0, row, col), for the whole grid (a band
        // takes its tokens' rows).
        let device = input.hidden_states.device();
        let text_pos = vec![vec![0.0; 3]; text_tokens];
        let image_pos: Vec<Vec<f64>> = (0..grid.rows)
            .flat_map(|r| (0..grid.cols).map(move |col| vec![0.0, r as f64, col as f64]))
            .collect();
        let rope = JointRope {
            image: Rope::new(THETA, &c.axes_dims_rope, &image_pos, &device),
            text: Rope::new(THETA, &c.axes_dims_rope, &text_pos, &device),
        };
        Ok(Conditioning::new(
            grid,
            JointCond {
                held: self.held.clone(),
                temb_silu: kernels::silu(temb + pooled),
                text_tokens,
                context: self.context_embedder.as_ref().map(|e| linear(e, context.cast(dtype))),
                rope: Some(rope),
            },
        ))
    }

    /// The packed tokens of token rows `rows`, embedded:
    /// `[B, C, 2r, W] → [B, r·(W/2), 4C] → hidden`, channel index `c·4 + 2·dy + dx`.
    fn embed_image(
        &self,
        input: &DenoiserInput<B>,
        rows: Range<usize>,
        _grid: TokenGrid,
    ) -> parallel_core::Result<Tensor<B, 3>> {
        let Some(x_embedder) = &self.x_embedder else {
            return Err(input_error(
                &self.desc,
                "this instance was loaded without the patch and text embeddings",
            )
            .into());
        };
        let latent = input
            .hidden_states
            .clone()
            .narrow(2, rows.start * 2, rows.len() * 2)
            .cast(self.dtype());
        Ok(linear(x_embedder, pack_latents(latent)))
    }

    /// Block `index` (held; `num_layers + j` is single-stream block `j`) on a band's image
    /// tokens and the text stream.
    fn run_block(
        &self,
        index: usize,
        image: Tensor<B, 3>,
        context: Tensor<B, 3>,
        site: &AttentionSite,
        c: &JointCond<B>,
        seams: &mut dyn Seams<B>,
    ) -> parallel_core::Result<(Tensor<B, 3>, Tensor<B, 3>)> {
        let rope = c
            .rope
            .as_ref()
            .ok_or_else(|| input_error(&self.desc, "the conditioning has no rotary positions"))?;
        let rope =
            JointRope { image: rope.image.tokens(site.tokens.clone()), text: rope.text.clone() };
        let l = self.config.num_layers;
        let doubles = self.held.start.min(l);
        if index < l {
            let block = &self.transformer_blocks[index - doubles];
            let m = block.modulation(&c.temb_silu);
            block.forward(image, context, &m, Some(&rope), site, seams)
        } else {
            let block = &self.single_transformer_blocks[index - self.held.start.max(l)];
            let text_out = self.desc.joint_layers[index].text_out;
            block.forward(image, context, &c.temb_silu, &rope, text_out, site, seams)
        }
    }

    /// The final layer and unpacking of a band's image tokens.
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
        Ok(unpack_latents(linear(proj_out, x), rows.len(), grid.cols))
    }
}

joint_denoiser!(FluxTransformer2DModel);

/// The image ids the FLUX pipeline makes for a token grid of `rows × cols` (what
/// [`FluxTransformer2DModel`] computes for itself): `(0, row, col)` per token, row-major.
pub fn image_ids(rows: usize, cols: usize) -> Vec<[f32; 3]> {
    (0..rows).flat_map(|r| (0..cols).map(move |c| [0.0, r as f32, c as f32])).collect()
}

/// The token grid of FLUX `img_ids` (`[tokens, 3]` values, row-major), which must be the
/// pipeline's own ([`image_ids`] of some grid): the model derives positions from the latent,
/// so other ids would be silently ignored.
///
/// # Errors
/// Ids of another layout, naming the first token that differs.
pub fn grid_of_image_ids(ids: &[[f32; 3]]) -> std::result::Result<(usize, usize), String> {
    let cols = ids.iter().map(|i| i[2] as usize + 1).max().unwrap_or(0);
    if cols == 0 || !ids.len().is_multiple_of(cols) {
        return Err(format!("{} ids do not form a grid of whole rows", ids.len()));
    }
    let rows = ids.len() / cols;
    let want = image_ids(rows, cols);
    if let Some((i, (got, w))) = ids.iter().zip(&want).enumerate().find(|(_, (a, b))| a != b) {
        return Err(format!(
            "token {i} has ids {got:?}, but the pipeline's {rows}×{cols} grid gives {w:?} \
             (only the FLUX pipeline's ids (0, row, col) are supported)"
        ));
    }
    Ok((rows, cols))
}

/// FluxPipeline's `_pack_latents`: `[batch, C, H, W]` → `[batch, (H/2)(W/2), 4C]`.
pub fn pack_latents<B: Backend>(latents: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, c, h, w] = latents.dims();
    latents.reshape([b, c, h / 2, 2, w / 2, 2]).permute([0, 2, 4, 1, 3, 5]).reshape([
        b,
        (h / 2) * (w / 2),
        c * 4,
    ])
}

/// FluxPipeline's `_unpack_latents` for a `rows × cols` token grid: `[batch, rows·cols, 4C]`
/// → `[batch, C, 2·rows, 2·cols]`.
pub fn unpack_latents<B: Backend>(packed: Tensor<B, 3>, rows: usize, cols: usize) -> Tensor<B, 4> {
    let [b, _, c4] = packed.dims();
    let c = c4 / 4;
    packed.reshape([b, rows, cols, c, 2, 2]).permute([0, 3, 1, 4, 2, 5]).reshape([
        b,
        c,
        rows * 2,
        cols * 2,
    ])
}

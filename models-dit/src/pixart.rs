//! `PixArtTransformer2DModel` (diffusers `transformers/pixart_transformer_2d.py`): PixArt-α
//! and PixArt-Σ, text-conditioned through cross-attention, timestep-conditioned through
//! adaLN-single.

use std::ops::Range;
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use parallel_core::{
    Conditioning, Denoiser, DenoiserInput, LoadPlan, ModelDesc, ParamInfo, Seams, StagedDenoiser,
};
use weights::WeightStore;

use crate::WEIGHTS_FILE;
use crate::attention::{Attention, FeedForward};
use crate::block::{BasicTransformerBlock, Context};
use crate::config::{ModelConfig, PixArtConfig};
use crate::embeddings::{
    PatchEmbed, PixArtAlphaCombinedTimestepSizeEmbeddings, PixArtAlphaTextProjection,
    TimestepEmbedding,
};
use crate::error::{DitError, Result};
use crate::load::{
    Lin, Loaded, Part, RandomSource, Source, StoreSource, Table, block_layers, check_plan,
    materialize,
};
use crate::normalization::AdaLayerNormSingle;
use crate::stages::{self, Stack, StageCond, check_input, input_error};

/// PixArt-α / PixArt-Σ transformer: patch embedding, `num_layers` blocks of self-attention,
/// cross-attention to the projected caption and feed-forward, each modulated by the shared
/// adaLN-single timestep embedding plus its own `scale_shift_table`, and a modulated final
/// projection unpatchified to `[batch, out_channels, height, width]`.
///
/// An instance may hold a subset of the blocks, no patch embedding or no final layer, and a
/// tensor-parallel slice of each block (see [`LoadPlan`]).
#[derive(Module, Debug)]
pub struct PixArtTransformer2DModel<B: Backend> {
    /// `pos_embed` (absent when loaded with `skip_embed`).
    pub pos_embed: Option<PatchEmbed<B>>,
    /// `transformer_blocks[held]`: the blocks this instance holds.
    pub transformer_blocks: Vec<BasicTransformerBlock<B>>,
    /// `adaln_single`: timestep (and size) conditioning.
    pub adaln_single: AdaLayerNormSingle<B>,
    /// `caption_projection` (when `caption_channels` is set).
    pub caption_projection: Option<PixArtAlphaTextProjection<B>>,
    /// Final layer: `scale_shift_table`, `[2, hidden]` (absent with `skip_head`).
    pub scale_shift_table: Option<Param<Tensor<B, 2>>>,
    /// Final layer: `proj_out`, hidden → p·p·out_channels (absent with `skip_head`).
    pub proj_out: Option<Linear<B>>,
    /// The configuration.
    #[module(skip)]
    pub config: PixArtConfig,
    #[module(skip)]
    desc: ModelDesc,
    #[module(skip)]
    held: Range<usize>,
}

impl PixArtConfig {
    pub(crate) fn table(&self, elem_bytes: usize) -> Table {
        let (h, p) = (self.hidden_size(), self.patch_size);
        let mut t = Table::new(elem_bytes);
        let rep = parallel_core::Sharding::Replicated;
        t.tensor("pos_embed.proj.weight", &[h, self.in_channels, p, p], rep, Part::Embed);
        t.tensor("pos_embed.proj.bias", &[h], rep, Part::Embed);
        t.mlp("adaln_single.emb.timestep_embedder", 256, h, Part::Cond);
        if self.use_additional_conditions() {
            t.mlp("adaln_single.emb.resolution_embedder", 256, h / 3, Part::Cond);
            t.mlp("adaln_single.emb.aspect_ratio_embedder", 256, h / 3, Part::Cond);
        }
        t.linear("adaln_single.linear", h, 6 * h, true, Lin::Replicated, Part::Cond);
        if let Some(cc) = self.caption_channels {
            t.linear("caption_projection.linear_1", cc, h, true, Lin::Replicated, Part::Cond);
            t.linear("caption_projection.linear_2", h, h, true, Lin::Replicated, Part::Cond);
        }
        for i in 0..self.num_layers {
            let key = format!("transformer_blocks.{i}.scale_shift_table");
            t.tensor(&key, &[6, h], rep, Part::Block(i));
            block_layers(&mut t, i, h, self.cross_attention_dim, self.attention_bias);
        }
        t.tensor("scale_shift_table", &[2, h], rep, Part::Head);
        t.linear("proj_out", h, p * p * self.out_channels(), true, Lin::Replicated, Part::Head);
        t
    }

    /// A model with random weights, `N(0, 0.02²)`, honouring `plan` (Burn's
    /// `Config::init`; see [`PixArtTransformer2DModel::random`]).
    pub fn init<B: Backend>(
        &self,
        plan: &LoadPlan,
        device: &B::Device,
    ) -> Result<PixArtTransformer2DModel<B>> {
        PixArtTransformer2DModel::random(self, plan, device)
    }

    /// Every parameter (diffusers key, full shape, tensor-parallel placement, block) with
    /// `elem_bytes` per element, in checkpoint order of the model's structure.
    pub fn params(&self, elem_bytes: usize) -> Vec<ParamInfo> {
        self.table(elem_bytes).specs.into_iter().map(|s| s.info).collect()
    }
}

/// `prefix.{to_q,to_k,to_v,to_out.0}` as an [`Attention`] with `heads` local heads.
pub(crate) fn attention<B: Backend>(
    p: &mut Loaded<B>,
    prefix: &str,
    heads: usize,
    head_dim: usize,
) -> Result<Attention<B>> {
    Ok(Attention {
        to_q: p.linear(&format!("{prefix}.to_q"))?,
        to_k: p.linear(&format!("{prefix}.to_k"))?,
        to_v: p.linear(&format!("{prefix}.to_v"))?,
        to_out_0: p.linear(&format!("{prefix}.to_out.0"))?,
        heads,
        head_dim,
    })
}

/// `prefix.ff.net.{0.proj,2}` as a [`FeedForward`].
pub(crate) fn feed_forward<B: Backend>(
    p: &mut Loaded<B>,
    prefix: &str,
    approximate: bool,
) -> Result<FeedForward<B>> {
    Ok(FeedForward {
        net_0_proj: p.linear(&format!("{prefix}.ff.net.0.proj"))?,
        net_2: p.linear(&format!("{prefix}.ff.net.2"))?,
        approximate,
    })
}

pub(crate) fn timestep_mlp<B: Backend>(
    p: &mut Loaded<B>,
    prefix: &str,
) -> Result<TimestepEmbedding<B>> {
    Ok(TimestepEmbedding {
        linear_1: p.linear(&format!("{prefix}.linear_1"))?,
        linear_2: p.linear(&format!("{prefix}.linear_2"))?,
    })
}

impl<B: Backend> PixArtTransformer2DModel<B> {
    /// Loads `folder` (`config.json` + `diffusion_pytorch_model.safetensors`, or its sharded
    /// form) as this rank's part under `plan`, in the device's default float dtype.
    pub fn load(folder: impl AsRef<Path>, plan: &LoadPlan, device: &B::Device) -> Result<Self> {
        let folder = folder.as_ref();
        let config = match ModelConfig::from_folder(folder)? {
            ModelConfig::PixArt(c) => c,
            other => {
                return Err(DitError::Config {
                    location: folder.join("config.json").display().to_string(),
                    reason: format!(
                        "expected a PixArtTransformer2DModel, found {}",
                        other.class_name()
                    ),
                });
            }
        };
        Self::from_store(&config, WeightStore::open(folder, WEIGHTS_FILE)?, plan, device)
    }

    /// Loads from an opened store (choose the compute dtype with
    /// [`WeightStore::with_dtype`]); fails if the store holds keys the model does not use.
    pub fn from_store(
        config: &PixArtConfig,
        mut store: WeightStore,
        plan: &LoadPlan,
        device: &B::Device,
    ) -> Result<Self> {
        let mut source = StoreSource { store: &mut store, device: device.clone() };
        let model = Self::build(config, plan, &mut source)?;
        store.finish()?;
        Ok(model)
    }

    /// Random weights, `N(0, 0.02²)`, honouring `plan` (for presets and shape tests).
    pub fn random(config: &PixArtConfig, plan: &LoadPlan, device: &B::Device) -> Result<Self> {
        Self::build(config, plan, &mut RandomSource { device: device.clone(), std: 0.02 })
    }

    fn build(config: &PixArtConfig, plan: &LoadPlan, source: &mut dyn Source<B>) -> Result<Self> {
        config.validate("PixArtTransformer2DModel")?;
        let desc = config.desc();
        let held = check_plan(&desc, plan)?;
        let table = config.table(4);
        let mut p = materialize("PixArtTransformer2DModel", &table.specs, plan, &held, source)?;
        let world = plan.tensor_shard.map_or(1, |s| s.world);
        let heads = config.num_attention_heads / world;
        let head_dim = config.attention_head_dim;
        let approximate = config.activation_fn == "gelu-approximate";

        let pos_embed = if plan.skip_embed {
            None
        } else {
            Some(PatchEmbed {
                proj: p.patch_conv("pos_embed.proj", config.patch_size)?,
                base_size: config.base_size(),
                interpolation_scale: config.interpolation_scale(),
            })
        };
        let additional = config.use_additional_conditions();
        let adaln_single = AdaLayerNormSingle {
            emb: PixArtAlphaCombinedTimestepSizeEmbeddings {
                timestep_embedder: timestep_mlp(&mut p, "adaln_single.emb.timestep_embedder")?,
                resolution_embedder: if additional {
                    Some(timestep_mlp(&mut p, "adaln_single.emb.resolution_embedder")?)
                } else {
                    None
                },
                aspect_ratio_embedder: if additional {
                    Some(timestep_mlp(&mut p, "adaln_single.emb.aspect_ratio_embedder")?)
                } else {
                    None
                },
            },
            linear: p.linear("adaln_single.linear")?,
        };
        let caption_projection = match config.caption_channels {
            Some(_) => Some(PixArtAlphaTextProjection {
                linear_1: p.linear("caption_projection.linear_1")?,
                linear_2: p.linear("caption_projection.linear_2")?,
            }),
            None => None,
        };
        let mut transformer_blocks = Vec::with_capacity(held.len());
        for i in held.clone() {
            let prefix = format!("transformer_blocks.{i}");
            transformer_blocks.push(BasicTransformerBlock {
                norm1: None,
                attn1: attention(&mut p, &format!("{prefix}.attn1"), heads, head_dim)?,
                attn2: match config.cross_attention_dim {
                    Some(_) => {
                        Some(attention(&mut p, &format!("{prefix}.attn2"), heads, head_dim)?)
                    }
                    None => None,
                },
                ff: feed_forward(&mut p, &prefix, approximate)?,
                scale_shift_table: Some(p.param2(&format!("{prefix}.scale_shift_table"))?),
                norm1_eps: config.norm_eps,
                ff_norm_eps: config.norm_eps,
            });
        }
        let (scale_shift_table, proj_out) = if plan.skip_head {
            (None, None)
        } else {
            (Some(p.param2("scale_shift_table")?), Some(p.linear("proj_out")?))
        };
        p.finish()?;
        Ok(PixArtTransformer2DModel {
            pos_embed,
            transformer_blocks,
            adaln_single,
            caption_projection,
            scale_shift_table,
            proj_out,
            config: config.clone(),
            desc,
            held,
        })
    }

    /// Every parameter of the full model (see [`PixArtConfig::params`]), with this instance's
    /// element size.
    pub fn params(&self) -> Vec<ParamInfo> {
        self.config.params(self.elem_bytes())
    }

    fn elem_bytes(&self) -> usize {
        self.adaln_single.linear.weight.val().dtype().size()
    }

    fn compute_condition(&self, input: &DenoiserInput<B>) -> Result<Conditioning> {
        let desc = &self.desc;
        let grid = check_input(desc, input)?;
        let batch = input.batch();
        let size = if self.config.use_additional_conditions() {
            let get = |name: &str, k: usize| -> Result<Tensor<B, 2>> {
                let t = input.added_cond.get(name).ok_or_else(|| {
                    input_error(
                        desc,
                        format!(
                            "this model uses additional conditions: `added_cond` needs \
                             `resolution` [batch, 2] (height, width in pixels) and \
                             `aspect_ratio` [batch, 1] (height / width); `{name}` is missing"
                        ),
                    )
                })?;
                if t.dims() != [batch, k] {
                    return Err(input_error(
                        desc,
                        format!("`{name}` has shape {:?}, expected [{batch}, {k}]", t.dims()),
                    ));
                }
                Ok(t.clone())
            };
            Some((get("resolution", 2)?, get("aspect_ratio", 1)?))
        } else {
            None
        };
        let (shared, embedded) = self.adaln_single.forward(input.timestep.clone(), size);
        let modulation = self
            .transformer_blocks
            .iter()
            .map(|b| b.modulation(Some(&shared), &input.timestep, None))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| input_error(desc, "internal: a block has no modulation"))?;
        let head = self.scale_shift_table.as_ref().map(|table| {
            let m = table.val().unsqueeze::<3>() + embedded.clone().unsqueeze_dim::<3>(1);
            (m.clone().narrow(1, 0, 1), m.narrow(1, 1, 1))
        });
        let context = if self.config.cross_attention_dim.is_some() {
            let states = input.encoder_hidden_states.clone().ok_or_else(|| {
                input_error(desc, "`encoder_hidden_states` (the text embeddings) are required")
            })?;
            let [b, tokens, channels] = states.dims();
            let want =
                self.config.caption_channels.or(self.config.cross_attention_dim).unwrap_or(0);
            if b != batch || channels != want {
                return Err(input_error(
                    desc,
                    format!(
                        "`encoder_hidden_states` has shape {:?}, expected [{batch}, tokens, {want}]",
                        states.dims()
                    ),
                ));
            }
            let dtype = self.adaln_single.linear.weight.val().dtype();
            let states = states.cast(dtype);
            let states = match &self.caption_projection {
                Some(proj) => proj.forward(states),
                None => states,
            };
            let bias = match &input.encoder_attention_mask {
                Some(mask) => {
                    if mask.dims() != [batch, tokens] {
                        return Err(input_error(
                            desc,
                            format!(
                                "`encoder_attention_mask` has shape {:?}, expected [{batch}, {tokens}]",
                                mask.dims()
                            ),
                        ));
                    }
                    // diffusers: (1 − mask) · −10000, broadcast over heads and queries.
                    let bias = mask.clone().cast(dtype).neg().add_scalar(1.0).mul_scalar(-10000.0);
                    Some(bias.reshape([batch, 1, 1, tokens]))
                }
                None => None,
            };
            Some(Context { states, bias })
        } else {
            None
        };
        let payload = StageCond { held: self.held.clone(), modulation, head, context };
        Ok(Conditioning::new(grid, payload))
    }
}

impl<B: Backend> Denoiser<B> for PixArtTransformer2DModel<B> {
    fn desc(&self) -> &ModelDesc {
        &self.desc
    }

    fn forward_rows(
        &self,
        input: &DenoiserInput<B>,
        rows: Range<usize>,
        seams: &mut dyn Seams<B>,
    ) -> parallel_core::Result<Tensor<B, 4>> {
        stages::forward_rows(self, input, rows, seams)
    }

    fn staged(&self) -> Option<&dyn StagedDenoiser<B>> {
        Some(self)
    }

    fn param_bytes(&self) -> u64 {
        (self.num_params() * self.elem_bytes()) as u64
    }
}

impl<B: Backend> StagedDenoiser<B> for PixArtTransformer2DModel<B> {
    fn condition(&self, input: &DenoiserInput<B>) -> parallel_core::Result<Conditioning> {
        Ok(self.compute_condition(input)?)
    }

    fn embed(
        &self,
        input: &DenoiserInput<B>,
        rows: Range<usize>,
        cond: &Conditioning,
    ) -> parallel_core::Result<Tensor<B, 3>> {
        stages::embed(&self.desc, self.pos_embed.as_ref(), input, rows, cond)
    }

    fn block(
        &self,
        index: usize,
        hidden: Tensor<B, 3>,
        rows: Range<usize>,
        cond: &Conditioning,
        seams: &mut dyn Seams<B>,
    ) -> parallel_core::Result<Tensor<B, 3>> {
        let stack = Stack { desc: &self.desc, blocks: &self.transformer_blocks, held: &self.held };
        stages::block(stack, index, hidden, rows, cond, seams)
    }

    fn head(
        &self,
        hidden: Tensor<B, 3>,
        rows: Range<usize>,
        cond: &Conditioning,
    ) -> parallel_core::Result<Tensor<B, 4>> {
        stages::head(&self.desc, self.proj_out.as_ref(), hidden, rows, cond)
    }

    fn held_blocks(&self) -> Range<usize> {
        self.held.clone()
    }
}

//! `DiTTransformer2DModel` (diffusers `transformers/dit_transformer_2d.py`): class-conditional
//! DiT with adaLN-Zero, each block carrying its own timestep/class embedder.

use std::ops::Range;
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use parallel_core::{
    Conditioning, Denoiser, DenoiserInput, LoadPlan, ModelDesc, ParamInfo, Seams, Sharding,
    StagedDenoiser,
};
use weights::WeightStore;

use crate::WEIGHTS_FILE;
use crate::block::BasicTransformerBlock;
use crate::config::{DiTConfig, ModelConfig};
use crate::embeddings::{CombinedTimestepLabelEmbeddings, PatchEmbed};
use crate::error::{DitError, Result};
use crate::load::{
    Lin, Loaded, Part, RandomSource, Source, StoreSource, Table, block_layers, check_plan,
    materialize,
};
use crate::normalization::AdaLayerNormZero;
use crate::pixart::{attention, feed_forward, timestep_mlp};
use crate::stages::{self, Stack, StageCond, check_input, input_error};

/// Eps of the LayerNorm inside adaLN-Zero (`norm1`), fixed in diffusers whatever `norm_eps`.
const NORM1_EPS: f64 = 1e-6;

/// DiT transformer: patch embedding, `num_layers` blocks of self-attention and feed-forward
/// modulated by adaLN-Zero (each block embeds the timestep and class itself), and a final
/// layer modulated by block 0's embedding (`proj_out_1`), unpatchified to a square latent.
///
/// The class table of every block has `num_classes + 1` rows; label `num_classes` is the null
/// class used for classifier-free guidance. The latent must be square (diffusers'
/// unpatchify assumes it).
#[derive(Module, Debug)]
pub struct DiTTransformer2DModel<B: Backend> {
    /// `pos_embed` (absent when loaded with `skip_embed`).
    pub pos_embed: Option<PatchEmbed<B>>,
    /// `transformer_blocks[held]`: the blocks this instance holds.
    pub transformer_blocks: Vec<BasicTransformerBlock<B>>,
    /// Final layer: `proj_out_1`, hidden → 2·hidden (shift, scale) (absent with `skip_head`).
    pub proj_out_1: Option<Linear<B>>,
    /// Final layer: `proj_out_2`, hidden → p·p·out_channels (absent with `skip_head`).
    pub proj_out_2: Option<Linear<B>>,
    /// Block 0's `norm1.emb`, loaded separately when this instance holds the final layer but
    /// not block 0 (the last stage of a pipeline).
    pub head_emb: Option<CombinedTimestepLabelEmbeddings<B>>,
    /// The configuration.
    #[module(skip)]
    pub config: DiTConfig,
    #[module(skip)]
    desc: ModelDesc,
    #[module(skip)]
    held: Range<usize>,
}

impl DiTConfig {
    pub(crate) fn table(&self, elem_bytes: usize) -> Table {
        let (h, p) = (self.hidden_size(), self.patch_size);
        let rep = Sharding::Replicated;
        let mut t = Table::new(elem_bytes);
        t.tensor("pos_embed.proj.weight", &[h, self.in_channels, p, p], rep, Part::Embed);
        t.tensor("pos_embed.proj.bias", &[h], rep, Part::Embed);
        for i in 0..self.num_layers {
            let part = Part::Block(i);
            let emb = format!("transformer_blocks.{i}.norm1.emb");
            let from = t.specs.len();
            t.mlp(&format!("{emb}.timestep_embedder"), 256, h, part);
            let table = format!("{emb}.class_embedder.embedding_table.weight");
            t.tensor(&table, &[self.num_classes() + 1, h], rep, part);
            if i == 0 {
                t.head_too(from);
            }
            let linear = format!("transformer_blocks.{i}.norm1.linear");
            t.linear(&linear, h, 6 * h, true, Lin::Replicated, part);
            block_layers(&mut t, i, h, None, self.attention_bias);
        }
        t.linear("proj_out_1", h, 2 * h, true, Lin::Replicated, Part::Head);
        t.linear("proj_out_2", h, p * p * self.out_channels(), true, Lin::Replicated, Part::Head);
        t
    }

    /// A model with random weights, `N(0, 0.02²)`, honouring `plan` (Burn's
    /// `Config::init`; see [`DiTTransformer2DModel::random`]).
    pub fn init<B: Backend>(
        &self,
        plan: &LoadPlan,
        device: &B::Device,
    ) -> Result<DiTTransformer2DModel<B>> {
        DiTTransformer2DModel::random(self, plan, device)
    }

    /// Every parameter (diffusers key, full shape, tensor-parallel placement, block) with
    /// `elem_bytes` per element. Block 0's timestep/class embedder is listed once, in block
    /// 0, though the final layer also uses it.
    pub fn params(&self, elem_bytes: usize) -> Vec<ParamInfo> {
        self.table(elem_bytes).specs.into_iter().map(|s| s.info).collect()
    }
}

fn label_embedding<B: Backend>(
    p: &mut Loaded<B>,
    prefix: &str,
) -> Result<CombinedTimestepLabelEmbeddings<B>> {
    Ok(CombinedTimestepLabelEmbeddings {
        timestep_embedder: timestep_mlp(p, &format!("{prefix}.timestep_embedder"))?,
        class_embedder: Param::from_tensor(
            p.t2(&format!("{prefix}.class_embedder.embedding_table.weight"))?,
        ),
    })
}

impl<B: Backend> DiTTransformer2DModel<B> {
    /// Loads `folder` (`config.json` + `diffusion_pytorch_model.safetensors`, or its sharded
    /// form) as this rank's part under `plan`, in the device's default float dtype.
    pub fn load(folder: impl AsRef<Path>, plan: &LoadPlan, device: &B::Device) -> Result<Self> {
        let folder = folder.as_ref();
        let config = match ModelConfig::from_folder(folder)? {
            ModelConfig::DiT(c) => c,
            other => {
                return Err(DitError::Config {
                    location: folder.join("config.json").display().to_string(),
                    reason: format!(
                        "expected a DiTTransformer2DModel, found {}",
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
        config: &DiTConfig,
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
    pub fn random(config: &DiTConfig, plan: &LoadPlan, device: &B::Device) -> Result<Self> {
        Self::build(config, plan, &mut RandomSource { device: device.clone(), std: 0.02 })
    }

    fn build(config: &DiTConfig, plan: &LoadPlan, source: &mut dyn Source<B>) -> Result<Self> {
        config.validate("DiTTransformer2DModel")?;
        let desc = config.desc();
        let held = check_plan(&desc, plan)?;
        let table = config.table(4);
        let mut p = materialize("DiTTransformer2DModel", &table.specs, plan, &held, source)?;
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
                interpolation_scale: 1.0,
            })
        };
        let mut transformer_blocks = Vec::with_capacity(held.len());
        for i in held.clone() {
            let prefix = format!("transformer_blocks.{i}");
            transformer_blocks.push(BasicTransformerBlock {
                norm1: Some(AdaLayerNormZero {
                    emb: label_embedding(&mut p, &format!("{prefix}.norm1.emb"))?,
                    linear: p.linear(&format!("{prefix}.norm1.linear"))?,
                }),
                attn1: attention(&mut p, &format!("{prefix}.attn1"), heads, head_dim)?,
                attn2: None,
                ff: feed_forward(&mut p, &prefix, approximate)?,
                scale_shift_table: None,
                norm1_eps: NORM1_EPS,
                ff_norm_eps: config.norm_eps,
            });
        }
        let (proj_out_1, proj_out_2) = if plan.skip_head {
            (None, None)
        } else {
            (Some(p.linear("proj_out_1")?), Some(p.linear("proj_out_2")?))
        };
        let head_emb = if !plan.skip_head && !held.contains(&0) {
            Some(label_embedding(&mut p, "transformer_blocks.0.norm1.emb")?)
        } else {
            None
        };
        p.finish()?;
        Ok(DiTTransformer2DModel {
            pos_embed,
            transformer_blocks,
            proj_out_1,
            proj_out_2,
            head_emb,
            config: config.clone(),
            desc,
            held,
        })
    }

    /// Every parameter of the full model (see [`DiTConfig::params`]), with this instance's
    /// element size.
    pub fn params(&self) -> Vec<ParamInfo> {
        self.config.params(self.elem_bytes())
    }

    fn elem_bytes(&self) -> usize {
        let attn = self.transformer_blocks.first().map(|b| &b.attn1.to_q);
        attn.or(self.proj_out_2.as_ref()).map_or(4, |l| l.weight.val().dtype().size())
    }

    /// The embedding the final layer is modulated by: block 0's `norm1.emb`.
    fn head_embedding(&self) -> Option<&CombinedTimestepLabelEmbeddings<B>> {
        if self.held.contains(&0) {
            self.transformer_blocks[0].norm1.as_ref().map(|n| &n.emb)
        } else {
            self.head_emb.as_ref()
        }
    }

    fn labels(&self, input: &DenoiserInput<B>) -> Result<Tensor<B, 1, Int>> {
        let desc = &self.desc;
        let labels = input.class_labels.clone().ok_or_else(|| {
            input_error(
                desc,
                format!(
                    "`class_labels` are required (0..{n}, or {n} for the null class)",
                    n = self.config.num_classes()
                ),
            )
        })?;
        let batch = input.batch();
        if labels.dims() != [batch] {
            return Err(input_error(
                desc,
                format!("`class_labels` has shape {:?}, expected [{batch}]", labels.dims()),
            ));
        }
        let n = self.config.num_classes() as i64;
        let values: Vec<i64> = labels
            .to_data()
            .convert::<i64>()
            .to_vec()
            .map_err(|e| input_error(desc, format!("cannot read `class_labels`: {e:?}")))?;
        if let Some(bad) = values.iter().find(|&&v| v < 0 || v > n) {
            return Err(input_error(
                desc,
                format!("class label {bad} is outside 0..={n} ({n} is the null class)"),
            ));
        }
        Ok(labels)
    }

    fn compute_condition(&self, input: &DenoiserInput<B>) -> Result<Conditioning> {
        let desc = &self.desc;
        let grid = check_input(desc, input)?;
        if grid.rows != grid.cols {
            return Err(input_error(
                desc,
                format!(
                    "DiT needs a square latent (diffusers unpatchifies with √tokens), got {}",
                    input.grid()
                ),
            ));
        }
        let labels = self.labels(input)?;
        let t = &input.timestep;
        let modulation = self
            .transformer_blocks
            .iter()
            .map(|b| b.modulation(None, t, Some(&labels)))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| input_error(desc, "internal: a block has no modulation"))?;
        let head = match (&self.proj_out_1, self.head_embedding()) {
            (Some(proj), Some(emb)) => {
                let c = emb.forward(t.clone(), labels);
                let m = proj.forward(silu(c));
                let [batch, two_h] = m.dims();
                let m = m.reshape([batch, 2, two_h / 2]);
                Some((m.clone().narrow(1, 0, 1), m.narrow(1, 1, 1)))
            }
            _ => None,
        };
        let payload = StageCond { held: self.held.clone(), modulation, head, context: None };
        Ok(Conditioning::new(grid, payload))
    }
}

impl<B: Backend> Denoiser<B> for DiTTransformer2DModel<B> {
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

impl<B: Backend> StagedDenoiser<B> for DiTTransformer2DModel<B> {
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
        stages::head(&self.desc, self.proj_out_2.as_ref(), hidden, rows, cond)
    }

    fn held_blocks(&self) -> Range<usize> {
        self.held.clone()
    }
}

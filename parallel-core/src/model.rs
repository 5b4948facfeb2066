//! What a strategy may know about a model, and the interface a model offers to strategies.
//!
//! A strategy crate never imports a model crate: it sees a model through [`Denoiser`] (a
//! whole forward over a band of latent rows, with the [`Seams`] intervening) and, for
//! transformer models, [`StagedDenoiser`] (embed a band, run block `i`, head of a band), and
//! it validates its degrees against a [`ModelDesc`].

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use crate::error::{ParallelError, Result};
use crate::seams::Seams;

/// The family of a denoiser, which decides which strategies apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// A diffusion transformer over patch tokens (PixArt, DiT): every strategy applies.
    Dit,
    /// A convolutional U-Net with attention blocks (Stable Diffusion): row-split strategies.
    Unet,
    /// A multimodal diffusion transformer (SD3, SD3.5): image and text tokens in two streams
    /// that meet in one joint self-attention per block
    /// ([`joint_attention`](crate::Seams::joint_attention)); the text stream is whole on
    /// every rank, the image tokens are what a strategy splits.
    MmDit,
}

impl fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelFamily::Dit => "DiT",
            ModelFamily::Unet => "U-Net",
            ModelFamily::MmDit => "MMDiT",
        })
    }
}

/// A description of a denoiser that a strategy validates its degrees against.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDesc {
    /// The model's class name (`PixArtTransformer2DModel`, …).
    pub class_name: String,
    /// Transformer or U-Net.
    pub family: ModelFamily,
    /// Transformer blocks (DiT), or transformer blocks over all resolutions (U-Net).
    pub num_layers: usize,
    /// Attention heads of every self-attention.
    pub num_heads: usize,
    /// Channels of one head.
    pub head_dim: usize,
    /// Width of the token stream (`num_heads · head_dim` for DiT).
    pub hidden_size: usize,
    /// Inner width of the feed-forward.
    pub ff_inner: usize,
    /// Patch size (DiT); 1 for a U-Net.
    pub patch_size: usize,
    /// Latent channels in.
    pub in_channels: usize,
    /// Channels out (twice `in_channels` with learned sigma).
    pub out_channels: usize,
    /// Whether the blocks cross-attend to text (PixArt) or not (DiT, class-conditional).
    pub cross_attention: bool,
    /// Latent rows one row of the coarsest feature map covers: the patch size for a DiT,
    /// the total down-sampling (8 for SD) for a U-Net. A row split must respect it.
    pub row_granularity: usize,
    /// The default latent height and width (`sample_size`).
    pub sample_size: usize,
    /// Attention heads at each resolution level, finest first (U-Net: per down block; DiT:
    /// one entry, `num_heads`). A strategy that splits heads must divide every entry.
    pub heads_per_level: Vec<usize>,
    /// A U-Net's seam sites, in forward order (each kind's sites in the order of their seam
    /// indices): what a row-split strategy counts its exchanges from. Empty for a DiT, whose
    /// only sites are its `num_layers` self-attentions over `hidden_size`-wide tokens.
    pub feature_sites: Vec<FeatureSite>,
    /// An MMDiT's blocks, in order (empty for every other family): what a strategy counts the
    /// text stream's share of its exchanges from.
    pub joint_layers: Vec<JointLayer>,
}

/// One block of an MMDiT ([`ModelDesc::joint_layers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JointLayer {
    /// Whether the text tokens' attention output is used, and the text stream goes on
    /// through its own output projection and feed-forward: false in SD3's last block
    /// (`context_pre_only`), where only the image tokens attend.
    pub text_out: bool,
    /// Whether an image-only self-attention follows the joint one (SD3.5's dual-attention
    /// blocks, `attn2`), through [`self_attention`](crate::Seams::self_attention) at the
    /// same layer.
    pub image_attention: bool,
    /// Whether the text and image tokens pass the block as one stream through one set of
    /// weights (Flux's single-stream blocks: one output projection over attention and MLP
    /// together, of every token) rather than two streams with their own.
    pub single_stream: bool,
}

impl ModelDesc {
    /// The self-attentions (through either seam) of one forward: one per block, plus the
    /// dual-attention blocks' image-only ones.
    pub fn attention_calls(&self) -> usize {
        self.num_layers + self.joint_layers.iter().filter(|l| l.image_attention).count()
    }

    /// Blocks whose text tokens' attention output is used (`0` unless an MMDiT).
    pub fn text_out_layers(&self) -> usize {
        self.joint_layers.iter().filter(|l| l.text_out).count()
    }
}

/// A place in a U-Net's forward where a band of rows needs what other rows hold
/// ([`ModelDesc::feature_sites`]). `scale` is the latent rows (and columns) per row of the
/// feature map the site reads: 1 at the latent's resolution, 2 after one down-sampler, ….
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureSite {
    /// A `k × k` convolution (`k > 1`, not `conv_in`, which reads the whole latent) of a
    /// `channels`-channel map: `halo = (k − 1)/2` rows above and below a band, through
    /// [`conv_halo`](crate::Seams::conv_halo).
    Conv {
        /// Input channels.
        channels: usize,
        /// Rows needed on each side.
        halo: usize,
        /// Latent rows per map row.
        scale: usize,
    },
    /// A GroupNorm of `channels` channels in `groups` groups, through
    /// [`group_norm_stats`](crate::Seams::group_norm_stats).
    GroupNorm {
        /// Channels normalised.
        channels: usize,
        /// Groups (statistics per batch entry and group).
        groups: usize,
        /// Latent rows per map row.
        scale: usize,
    },
    /// The sum of a row-parallel projection's partial outputs, `channels` wide per pixel,
    /// through [`reduce_partial`](crate::Seams::reduce_partial): after each transformer
    /// layer's self-attention, cross-attention and feed-forward, and each resnet's `conv2`.
    Reduce {
        /// Output features (channels).
        channels: usize,
        /// Latent rows per map row.
        scale: usize,
    },
    /// A self-attention over the map's pixels as `channels`-wide tokens in `heads` heads,
    /// through [`self_attention`](crate::Seams::self_attention).
    SelfAttention {
        /// Token width (`heads · head_dim`).
        channels: usize,
        /// Heads.
        heads: usize,
        /// Latent rows per map row.
        scale: usize,
    },
}

impl ModelDesc {
    /// The token grid of a latent grid (patch rows × patch columns).
    pub fn tokens(&self, grid: LatentGrid) -> TokenGrid {
        TokenGrid { rows: grid.height / self.patch_size, cols: grid.width / self.patch_size }
    }

    /// Refuses a model of another family than the strategy `strategy` applies to, naming
    /// both (Ulysses, Ring and PipeFusion split transformer blocks' tokens or stages, which
    /// a U-Net does not have).
    pub fn require_family(&self, strategy: &str, family: ModelFamily, why: &str) -> Result<()> {
        self.require_one_of(strategy, &[family], why)
    }

    /// [`require_family`](Self::require_family) for a strategy that applies to several
    /// families.
    pub fn require_one_of(
        &self,
        strategy: &str,
        families: &[ModelFamily],
        why: &str,
    ) -> Result<()> {
        if families.contains(&self.family) {
            return Ok(());
        }
        let names: Vec<String> = families.iter().map(|f| f.to_string()).collect();
        Err(ParallelError::Unsupported {
            strategy: strategy.to_string(),
            reason: format!(
                "{} is a {} model; {strategy} applies to {} models only ({why})",
                self.class_name,
                self.family,
                names.join(" and ")
            ),
        })
    }

    /// Checks a latent grid for a whole-latent (unsplit) forward: a DiT needs whole patches;
    /// a U-Net takes any size, forwarding its up-sampling sizes as diffusers does.
    pub fn check_whole_grid(&self, grid: LatentGrid) -> Result<()> {
        match self.family {
            ModelFamily::Dit | ModelFamily::MmDit => self.check_grid(grid),
            ModelFamily::Unet if grid.height > 0 && grid.width > 0 => Ok(()),
            ModelFamily::Unet => Err(ParallelError::Model(format!(
                "latent size {grid} of {} is empty",
                self.class_name
            ))),
        }
    }

    /// Checks that the latent grid is made of whole rows of the coarsest feature map.
    pub fn check_grid(&self, grid: LatentGrid) -> Result<()> {
        let g = self.row_granularity;
        if grid.height == 0
            || grid.width == 0
            || !grid.height.is_multiple_of(g)
            || !grid.width.is_multiple_of(g)
        {
            return Err(ParallelError::Model(format!(
                "latent size {grid} must be a positive multiple of {g} in both dims for {} \
                 (image height and width a multiple of {})",
                self.class_name,
                8 * g
            )));
        }
        Ok(())
    }
}

/// Latent height and width (in latent pixels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentGrid {
    /// Latent rows.
    pub height: usize,
    /// Latent columns.
    pub width: usize,
}

impl fmt::Display for LatentGrid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}×{}", self.height, self.width)
    }
}

/// Patch-token rows and columns of a DiT input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenGrid {
    /// Token rows.
    pub rows: usize,
    /// Token columns.
    pub cols: usize,
}

impl TokenGrid {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Whether the grid is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The token range of a band of token rows.
    pub fn token_range(&self, rows: &Range<usize>) -> Range<usize> {
        rows.start * self.cols..rows.end * self.cols
    }
}

/// One denoiser evaluation's inputs, named like diffusers' forward arguments.
#[derive(Debug, Clone)]
pub struct DenoiserInput<B: Backend> {
    /// Noisy latents, `[batch, channels, height, width]`.
    pub hidden_states: Tensor<B, 4>,
    /// Timesteps, `[batch]` (float; pipelines pass integers, cast here).
    pub timestep: Tensor<B, 1>,
    /// Text embeddings, `[batch, text_tokens, caption_channels]`.
    pub encoder_hidden_states: Option<Tensor<B, 3>>,
    /// Text mask, `[batch, text_tokens]`, 1 = keep, 0 = padding.
    pub encoder_attention_mask: Option<Tensor<B, 2>>,
    /// Class labels, `[batch]` (DiT; the null class is `num_classes`).
    pub class_labels: Option<Tensor<B, 1, Int>>,
    /// Added conditions by name, each `[batch, k]`: `resolution`, `aspect_ratio` (PixArt-α
    /// 1024), `text_embeds`, `time_ids` (SDXL).
    pub added_cond: BTreeMap<String, Tensor<B, 2>>,
}

impl<B: Backend> DenoiserInput<B> {
    /// Inputs with only latents and timesteps.
    pub fn new(hidden_states: Tensor<B, 4>, timestep: Tensor<B, 1>) -> Self {
        DenoiserInput {
            hidden_states,
            timestep,
            encoder_hidden_states: None,
            encoder_attention_mask: None,
            class_labels: None,
            added_cond: BTreeMap::new(),
        }
    }

    /// The latent grid of `hidden_states`.
    pub fn grid(&self) -> LatentGrid {
        let [_, _, height, width] = self.hidden_states.dims();
        LatentGrid { height, width }
    }

    /// The batch size.
    pub fn batch(&self) -> usize {
        self.hidden_states.dims()[0]
    }

    /// The same inputs for batch entries `range` (classifier-free-guidance halves).
    pub fn batch_slice(&self, range: Range<usize>) -> Self {
        let n = range.len();
        let s = range.start;
        DenoiserInput {
            hidden_states: self.hidden_states.clone().narrow(0, s, n),
            timestep: self.timestep.clone().narrow(0, s, n),
            encoder_hidden_states: self.encoder_hidden_states.clone().map(|t| t.narrow(0, s, n)),
            encoder_attention_mask: self.encoder_attention_mask.clone().map(|t| t.narrow(0, s, n)),
            class_labels: self.class_labels.clone().map(|t| t.narrow(0, s, n)),
            added_cond: self
                .added_cond
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().narrow(0, s, n)))
                .collect(),
        }
    }
}

/// Per-forward conditioning a [`StagedDenoiser`] computes once (timestep, class and caption
/// embeddings, the text mask bias) and every block reads. Opaque to strategies: only the
/// model that made it looks inside.
pub struct Conditioning {
    /// The token grid of this forward.
    pub grid: TokenGrid,
    payload: Box<dyn Any + Send + Sync>,
}

impl fmt::Debug for Conditioning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conditioning").field("grid", &self.grid).finish_non_exhaustive()
    }
}

impl Conditioning {
    /// Wraps a model's own conditioning value.
    pub fn new<T: Any + Send + Sync>(grid: TokenGrid, payload: T) -> Self {
        Conditioning { grid, payload: Box::new(payload) }
    }

    /// The model's own value, if it is a `T`.
    pub fn get<T: Any>(&self) -> Result<&T> {
        self.payload.downcast_ref::<T>().ok_or_else(|| {
            ParallelError::Model(format!(
                "conditioning was made by another model (expected {})",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// A denoiser written once for one device, calling [`Seams`] where a strategy may act.
pub trait Denoiser<B: Backend>: Send + Sync {
    /// What strategies validate against.
    fn desc(&self) -> &ModelDesc;

    /// The noise prediction for latent rows `rows` (a multiple of
    /// [`ModelDesc::row_granularity`]), `[batch, out_channels, rows.len(), width]`, given the
    /// *full* inputs; the seams supply what lies outside the band (attention over other
    /// tokens, halo rows, group-norm statistics).
    fn forward_rows(
        &self,
        input: &DenoiserInput<B>,
        rows: Range<usize>,
        seams: &mut dyn Seams<B>,
    ) -> Result<Tensor<B, 4>>;

    /// The transformer-stage interface, for models made of a stack of equal blocks.
    fn staged(&self) -> Option<&dyn StagedDenoiser<B>> {
        None
    }

    /// Bytes of the parameters this instance holds (after sharding or block selection).
    fn param_bytes(&self) -> u64;
}

/// The stages of a transformer denoiser, so that a strategy can run blocks `[a, b)` on one
/// band of token rows at a time (PipeFusion) or drive the blocks itself (sequence parallel).
pub trait StagedDenoiser<B: Backend>: Denoiser<B> {
    /// Embeddings computed once per forward from the timestep, class and text inputs.
    fn condition(&self, input: &DenoiserInput<B>) -> Result<Conditioning>;

    /// Patch embedding (with position embedding) of token rows `rows`:
    /// `[batch, rows.len() · cols, hidden]`. An MMDiT ([`ModelFamily::MmDit`]) puts its
    /// embedded text stream first, `[batch, text_tokens + rows.len() · cols, hidden]`, and
    /// every block and the head take and (the blocks) return that layout, so a pipeline
    /// stage passes both streams on as one tensor.
    fn embed(
        &self,
        input: &DenoiserInput<B>,
        rows: Range<usize>,
        cond: &Conditioning,
    ) -> Result<Tensor<B, 3>>;

    /// Transformer block `index` on the tokens of token rows `rows`.
    fn block(
        &self,
        index: usize,
        hidden: Tensor<B, 3>,
        rows: Range<usize>,
        cond: &Conditioning,
        seams: &mut dyn Seams<B>,
    ) -> Result<Tensor<B, 3>>;

    /// Final layer and unpatchify of token rows `rows`:
    /// `[batch, out_channels, rows.len() · patch, width]`.
    fn head(
        &self,
        hidden: Tensor<B, 3>,
        rows: Range<usize>,
        cond: &Conditioning,
    ) -> Result<Tensor<B, 4>>;

    /// The blocks this instance holds (all of them unless loaded for a pipeline stage).
    fn held_blocks(&self) -> Range<usize>;
}

/// Which slice of a split tensor a rank holds: `dim` cut in `world` equal parts, part `rank`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This rank's part.
    pub rank: usize,
    /// Number of parts.
    pub world: usize,
}

impl Shard {
    /// The index range of this rank's part of a dim of `len` (which must divide evenly).
    pub fn range(&self, len: usize) -> Range<usize> {
        let part = len / self.world;
        self.rank * part..(self.rank + 1) * part
    }
}

/// How a parameter is placed across tensor-parallel ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharding {
    /// Every rank holds all of it.
    Replicated,
    /// Column-parallel: the output features are split (`dim` of the stored tensor).
    Column {
        /// The split dim of the tensor as stored on disk.
        dim: usize,
    },
    /// Row-parallel: the input features are split; the partial outputs are summed by the
    /// reduce seam, and the bias (kept whole, on every rank) is added once after the sum.
    Row {
        /// The split dim of the tensor as stored on disk.
        dim: usize,
    },
    /// Row-parallel over packed inputs: the input features are two blocks, `[0, split)` and
    /// `[split, len)` (Flux's single-block `proj_out` reads attention heads, then MLP
    /// columns), each split in equal parts; a rank holds its part of each, in that order.
    /// Reduced like [`Row`](Self::Row), the bias added once after.
    RowPacked {
        /// The split dim of the tensor as stored on disk.
        dim: usize,
        /// Where the second block of input features starts.
        split: usize,
    },
}

/// One parameter of a model and its placement under tensor parallelism.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    /// The diffusers key.
    pub name: String,
    /// Its full shape.
    pub shape: Vec<usize>,
    /// Bytes of one element in compute dtype.
    pub elem_bytes: usize,
    /// Its placement.
    pub sharding: Sharding,
    /// The transformer block it belongs to, if any.
    pub block: Option<usize>,
}

impl ParamInfo {
    /// Bytes of the whole parameter.
    pub fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.elem_bytes) as u64
    }
}

/// What one rank loads, decided by its strategy before the weights are read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadPlan {
    /// Tensor-parallel slice of the sharded parameters (`None`: whole).
    pub tensor_shard: Option<Shard>,
    /// The transformer blocks to load (`None`: all).
    pub blocks: Option<Range<usize>>,
    /// Whether to skip the patch embedding (a pipeline stage other than the first).
    pub skip_embed: bool,
    /// Whether to skip the final layer (a pipeline stage other than the last).
    pub skip_head: bool,
}

impl LoadPlan {
    /// Everything, unsharded.
    pub fn full() -> Self {
        LoadPlan::default()
    }
}

//! The parameter tables of both models and loading under a [`LoadPlan`].
//!
//! One table per model lists every diffusers key with its full shape, its tensor-parallel
//! [`Sharding`] and the part of the model it belongs to (patch embedding, conditioning, block
//! `i`, final layer). The same table drives [`params`](crate::PixArtConfig::params) (what a
//! strategy computes expected bytes from) and loading, so the two cannot disagree:
//!
//! 1. the plan is checked (heads and feed-forward width divisible by the tensor-parallel
//!    world, blocks within range) before any weight is read;
//! 2. each key the plan needs is taken from the [`WeightStore`] — whole, or the rank's slice
//!    of the split dim — and every other key is *skipped*, so `finish()` still names any key
//!    of the checkpoint that no table entry describes;
//! 3. modules are assembled from the taken tensors; PyTorch `Linear` weights (`[out, in]`)
//!    are transposed to Burn's `[in, out]`.
//!
//! | placement | keys | split dim (on disk) |
//! |---|---|---|
//! | column-parallel | `attn1.to_{q,k,v}`, `attn2.to_{q,k,v}`, `ff.net.0.proj` (weight and bias) | 0 |
//! | row-parallel | `attn1.to_out.0.weight`, `attn2.to_out.0.weight`, `ff.net.2.weight` | 1 |
//! | replicated | everything else, including the row-parallel biases (added once after the reduce) | – |

use std::collections::HashMap;
use std::ops::Range;

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use parallel_core::{LoadPlan, ModelDesc, ParamInfo, Shard, Sharding};
use weights::WeightStore;

use crate::error::{DitError, Result};

/// The part of a model a parameter belongs to, which decides whether a plan loads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// Patch embedding (`pos_embed`): skipped with `skip_embed`.
    Embed,
    /// Conditioning every stage needs (PixArt `adaln_single`, `caption_projection`).
    Cond,
    /// Transformer block `i`: loaded when `i` is in the plan's blocks.
    Block(usize),
    /// Final layer: skipped with `skip_head`.
    Head,
}

/// One parameter of a model's table.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub info: ParamInfo,
    pub part: Part,
    /// Also needed by the final layer (DiT's block-0 timestep/class embedder).
    pub head_too: bool,
}

/// How a `Linear` is split under tensor parallelism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lin {
    Replicated,
    Column,
    Row,
    /// Row-parallel over two packed input blocks, the second starting at this feature.
    RowPacked(usize),
}

/// Builder of a parameter table.
pub(crate) struct Table {
    pub specs: Vec<Spec>,
    elem_bytes: usize,
}

impl Table {
    pub fn new(elem_bytes: usize) -> Self {
        Table { specs: Vec::new(), elem_bytes }
    }

    pub fn tensor(&mut self, key: &str, shape: &[usize], sharding: Sharding, part: Part) {
        let block = match part {
            Part::Block(i) => Some(i),
            _ => None,
        };
        self.specs.push(Spec {
            info: ParamInfo {
                name: key.to_string(),
                shape: shape.to_vec(),
                elem_bytes: self.elem_bytes,
                sharding,
                block,
            },
            part,
            head_too: false,
        });
    }

    /// A PyTorch `nn.Linear` `prefix.weight` `[d_out, d_in]` and `prefix.bias` `[d_out]`.
    pub fn linear(
        &mut self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        lin: Lin,
        part: Part,
    ) {
        let (w, b) = match lin {
            Lin::Replicated => (Sharding::Replicated, Sharding::Replicated),
            Lin::Column => (Sharding::Column { dim: 0 }, Sharding::Column { dim: 0 }),
            Lin::Row => (Sharding::Row { dim: 1 }, Sharding::Replicated),
            Lin::RowPacked(split) => (Sharding::RowPacked { dim: 1, split }, Sharding::Replicated),
        };
        self.tensor(&format!("{prefix}.weight"), &[d_out, d_in], w, part);
        if bias {
            self.tensor(&format!("{prefix}.bias"), &[d_out], b, part);
        }
    }

    /// A two-layer `TimestepEmbedding` (`linear_1`: d_in → d, `linear_2`: d → d).
    pub fn mlp(&mut self, prefix: &str, d_in: usize, d: usize, part: Part) {
        self.linear(&format!("{prefix}.linear_1"), d_in, d, true, Lin::Replicated, part);
        self.linear(&format!("{prefix}.linear_2"), d, d, true, Lin::Replicated, part);
    }

    /// Marks the specs added since `from` as also needed by the final layer.
    pub fn head_too(&mut self, from: usize) {
        for s in &mut self.specs[from..] {
            s.head_too = true;
        }
    }
}

/// The self-attention, cross-attention and feed-forward entries of block `i`.
pub(crate) fn block_layers(
    t: &mut Table,
    i: usize,
    hidden: usize,
    cross_dim: Option<usize>,
    attention_bias: bool,
) {
    let part = Part::Block(i);
    let p = format!("transformer_blocks.{i}");
    for name in ["to_q", "to_k", "to_v"] {
        t.linear(&format!("{p}.attn1.{name}"), hidden, hidden, attention_bias, Lin::Column, part);
    }
    t.linear(&format!("{p}.attn1.to_out.0"), hidden, hidden, true, Lin::Row, part);
    if let Some(cross) = cross_dim {
        t.linear(&format!("{p}.attn2.to_q"), hidden, hidden, attention_bias, Lin::Column, part);
        for name in ["to_k", "to_v"] {
            t.linear(
                &format!("{p}.attn2.{name}"),
                cross,
                hidden,
                attention_bias,
                Lin::Column,
                part,
            );
        }
        t.linear(&format!("{p}.attn2.to_out.0"), hidden, hidden, true, Lin::Row, part);
    }
    t.linear(&format!("{p}.ff.net.0.proj"), hidden, 4 * hidden, true, Lin::Column, part);
    t.linear(&format!("{p}.ff.net.2"), 4 * hidden, hidden, true, Lin::Row, part);
}

/// Checks a plan against a model before any weight is read; returns the blocks to hold.
pub(crate) fn check_plan(desc: &ModelDesc, plan: &LoadPlan) -> Result<Range<usize>> {
    let bad = |reason: String| DitError::Plan { class: desc.class_name.clone(), reason };
    if let Some(Shard { rank, world }) = plan.tensor_shard {
        if world == 0 || rank >= world {
            return Err(bad(format!("tensor shard rank {rank} of world {world} is out of range")));
        }
        if !desc.num_heads.is_multiple_of(world) {
            return Err(bad(format!(
                "{} attention heads are not divisible by the tensor-parallel degree {world}; \
                 use a degree that divides {}",
                desc.num_heads, desc.num_heads
            )));
        }
        if !desc.ff_inner.is_multiple_of(world) {
            return Err(bad(format!(
                "feed-forward width {} is not divisible by the tensor-parallel degree {world}",
                desc.ff_inner
            )));
        }
    }
    let blocks = plan.blocks.clone().unwrap_or(0..desc.num_layers);
    if blocks.start > blocks.end || blocks.end > desc.num_layers {
        return Err(bad(format!(
            "blocks {blocks:?} are not within the model's {} blocks",
            desc.num_layers
        )));
    }
    Ok(blocks)
}

/// A taken tensor of any rank the tables use.
pub(crate) enum AnyTensor<B: Backend> {
    D1(Tensor<B, 1>),
    D2(Tensor<B, 2>),
    D3(Tensor<B, 3>),
    D4(Tensor<B, 4>),
}

/// Where parameter values come from: a checkpoint, or random values (presets).
pub(crate) trait Source<B: Backend> {
    /// The tensor of `info` (the rank's part of dim `split.0` when `split` is given).
    fn get(&mut self, info: &ParamInfo, split: Option<(usize, Shard)>) -> Result<AnyTensor<B>>;
    /// Rank `shard`'s parts of both input blocks of a [`Sharding::RowPacked`] 2-d weight
    /// `[out, in]`, concatenated along `in`.
    fn get_packed(&mut self, info: &ParamInfo, split: usize, shard: Shard) -> Result<AnyTensor<B>>;
    /// `key` is left out by the plan.
    fn skip(&mut self, key: &str);
}

/// The two ranges of a packed split's input features a rank holds.
fn packed_ranges(len: usize, split: usize, shard: Shard) -> [Range<usize>; 2] {
    let first = Shard::range(&shard, split);
    let second = Shard::range(&shard, len - split);
    [first, split + second.start..split + second.end]
}

/// A tensor-parallel shard as the part of a dim the weight store reads.
fn part(shard: Shard) -> weights::Part {
    weights::Part { index: shard.rank, of: shard.world }
}

/// Parameters from a [`WeightStore`].
pub(crate) struct StoreSource<'a, B: Backend> {
    pub store: &'a mut WeightStore,
    pub device: B::Device,
}

impl<B: Backend> Source<B> for StoreSource<'_, B> {
    fn get(&mut self, info: &ParamInfo, split: Option<(usize, Shard)>) -> Result<AnyTensor<B>> {
        let key = info.name.as_str();
        let dev = &self.device;
        let s = &mut *self.store;
        Ok(match (info.shape.as_slice(), split) {
            (&[a], None) => AnyTensor::D1(s.take(key, [a], dev)?),
            (&[a], Some((d, sh))) => AnyTensor::D1(s.take_sharded(key, [a], d, part(sh), dev)?),
            (&[a, b], None) => AnyTensor::D2(s.take(key, [a, b], dev)?),
            (&[a, b], Some((d, sh))) => {
                AnyTensor::D2(s.take_sharded(key, [a, b], d, part(sh), dev)?)
            }
            (&[a, b, c], None) => AnyTensor::D3(s.take(key, [a, b, c], dev)?),
            (&[a, b, c, e], None) => AnyTensor::D4(s.take(key, [a, b, c, e], dev)?),
            (&[a, b, c, e], Some((d, sh))) => {
                AnyTensor::D4(s.take_sharded(key, [a, b, c, e], d, part(sh), dev)?)
            }
            (shape, _) => unreachable!("tables hold 1- to 4-d tensors, not {shape:?}"),
        })
    }

    fn get_packed(&mut self, info: &ParamInfo, split: usize, shard: Shard) -> Result<AnyTensor<B>> {
        let &[out, len] = info.shape.as_slice() else {
            unreachable!("a packed row-parallel weight is 2-d, not {:?}", info.shape)
        };
        let [a, b] = packed_ranges(len, split, shard);
        let key = info.name.as_str();
        let first = self.store.take_range(key, [out, len], 1, a, &self.device)?;
        let second = self.store.take_range(key, [out, len], 1, b, &self.device)?;
        Ok(AnyTensor::D2(Tensor::cat(vec![first, second], 1)))
    }

    fn skip(&mut self, key: &str) {
        self.store.skip(key);
    }
}

/// Random parameters, `N(0, std²)`, for presets and shape tests.
pub(crate) struct RandomSource<B: Backend> {
    pub device: B::Device,
    pub std: f64,
}

impl<B: Backend> Source<B> for RandomSource<B> {
    fn get(&mut self, info: &ParamInfo, split: Option<(usize, Shard)>) -> Result<AnyTensor<B>> {
        let mut shape = info.shape.clone();
        if let Some((dim, shard)) = split {
            shape[dim] /= shard.world;
        }
        let dist = Distribution::Normal(0.0, self.std);
        let dev = &self.device;
        Ok(match shape.as_slice() {
            &[a] => AnyTensor::D1(Tensor::random([a], dist, dev)),
            &[a, b] => AnyTensor::D2(Tensor::random([a, b], dist, dev)),
            &[a, b, c] => AnyTensor::D3(Tensor::random([a, b, c], dist, dev)),
            &[a, b, c, e] => AnyTensor::D4(Tensor::random([a, b, c, e], dist, dev)),
            shape => unreachable!("tables hold 1- to 4-d tensors, not {shape:?}"),
        })
    }

    fn get_packed(&mut self, info: &ParamInfo, split: usize, shard: Shard) -> Result<AnyTensor<B>> {
        let [a, b] = packed_ranges(info.shape[1], split, shard);
        let shape = [info.shape[0], a.len() + b.len()];
        let dist = Distribution::Normal(0.0, self.std);
        Ok(AnyTensor::D2(Tensor::random(shape, dist, &self.device)))
    }

    fn skip(&mut self, _key: &str) {}
}

/// The tensors a plan loaded, by key, for assembling modules.
pub(crate) struct Loaded<B: Backend> {
    map: HashMap<String, AnyTensor<B>>,
    class: &'static str,
}

/// Takes the table's entries the plan needs from `source` (skipping the others).
pub(crate) fn materialize<B: Backend>(
    class: &'static str,
    specs: &[Spec],
    plan: &LoadPlan,
    blocks: &Range<usize>,
    source: &mut dyn Source<B>,
) -> Result<Loaded<B>> {
    let mut map = HashMap::new();
    for spec in specs {
        let needed = match spec.part {
            Part::Embed => !plan.skip_embed,
            Part::Head => !plan.skip_head,
            Part::Cond => true,
            Part::Block(i) => blocks.contains(&i) || (spec.head_too && !plan.skip_head),
        };
        if !needed {
            source.skip(&spec.info.name);
            continue;
        }
        let tensor = match (plan.tensor_shard, spec.info.sharding) {
            (Some(shard), Sharding::Column { dim } | Sharding::Row { dim }) => {
                source.get(&spec.info, Some((dim, shard)))?
            }
            (Some(shard), Sharding::RowPacked { split, .. }) => {
                source.get_packed(&spec.info, split, shard)?
            }
            _ => source.get(&spec.info, None)?,
        };
        map.insert(spec.info.name.clone(), tensor);
    }
    Ok(Loaded { map, class })
}

impl<B: Backend> Loaded<B> {
    fn missing(&self, key: &str) -> DitError {
        DitError::Plan {
            class: self.class.to_string(),
            reason: format!("internal: `{key}` was not loaded for this plan"),
        }
    }

    fn take(&mut self, key: &str) -> Result<AnyTensor<B>> {
        self.map.remove(key).ok_or_else(|| self.missing(key))
    }

    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    pub fn t1(&mut self, key: &str) -> Result<Tensor<B, 1>> {
        match self.take(key)? {
            AnyTensor::D1(t) => Ok(t),
            _ => Err(self.missing(key)),
        }
    }

    pub fn t2(&mut self, key: &str) -> Result<Tensor<B, 2>> {
        match self.take(key)? {
            AnyTensor::D2(t) => Ok(t),
            _ => Err(self.missing(key)),
        }
    }

    pub fn t3(&mut self, key: &str) -> Result<Tensor<B, 3>> {
        match self.take(key)? {
            AnyTensor::D3(t) => Ok(t),
            _ => Err(self.missing(key)),
        }
    }

    pub fn t4(&mut self, key: &str) -> Result<Tensor<B, 4>> {
        match self.take(key)? {
            AnyTensor::D4(t) => Ok(t),
            _ => Err(self.missing(key)),
        }
    }

    pub fn param2(&mut self, key: &str) -> Result<Param<Tensor<B, 2>>> {
        Ok(Param::from_tensor(self.t2(key)?))
    }

    /// `prefix.weight` (`[out, in]` on disk, transposed to Burn's `[in, out]`) and
    /// `prefix.bias` if loaded.
    pub fn linear(&mut self, prefix: &str) -> Result<Linear<B>> {
        let weight = self.t2(&format!("{prefix}.weight"))?.transpose();
        let bias_key = format!("{prefix}.bias");
        let bias =
            if self.has(&bias_key) { Some(Param::from_tensor(self.t1(&bias_key)?)) } else { None };
        Ok(Linear { weight: Param::from_tensor(weight), bias })
    }

    /// A stride-`p` `p × p` convolution `prefix.weight` `[out, in, p, p]`, `prefix.bias`.
    pub fn patch_conv(&mut self, prefix: &str, patch: usize) -> Result<Conv2d<B>> {
        let weight = self.t4(&format!("{prefix}.weight"))?;
        let bias = self.t1(&format!("{prefix}.bias"))?;
        Ok(Conv2d {
            weight: Param::from_tensor(weight),
            bias: Some(Param::from_tensor(bias)),
            stride: [patch, patch],
            kernel_size: [patch, patch],
            dilation: [1, 1],
            groups: 1,
            padding: PaddingConfig2d::Valid,
        })
    }

    /// Checks that assembly used every loaded tensor (a table/assembly mismatch is a bug).
    pub fn finish(self) -> Result<()> {
        if self.map.is_empty() {
            Ok(())
        } else {
            let mut keys: Vec<&String> = self.map.keys().collect();
            keys.sort();
            Err(DitError::Plan {
                class: self.class.to_string(),
                reason: format!("internal: loaded but not assembled: {keys:?}"),
            })
        }
    }
}

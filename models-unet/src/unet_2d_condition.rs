//! `UNet2DConditionModel` (diffusers `models/unets/unet_2d_condition.py`): Stable Diffusion
//! 1.x/2.x and SDXL, behind the [`Denoiser`] contract.

use std::ops::Range;
use std::path::Path;

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use models_dit::linear;
use parallel_core::{
    Denoiser, DenoiserInput, LoadPlan, ModelDesc, ParallelError, ParamInfo, Seams, Sharding,
};
use weights::WeightStore;

use crate::config::{BlockKind, UNet2DConditionConfig};
use crate::error::{Result, UnetError};
use crate::layers::{Band, Conv2d, Fwd, GroupNorm, silu};
use crate::params::Params;
use crate::unet_2d_blocks::{BlockInputs, BlockSpec, DownBlock, UNetMidBlock2DCrossAttn, UpBlock};

/// The file name of a diffusers U-Net's weights (or the stem of its shard index).
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

/// `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Module, Debug)]
pub struct TimestepEmbedding<B: Backend> {
    /// Input → time embedding width.
    pub linear_1: Linear<B>,
    /// Width → width.
    pub linear_2: Linear<B>,
}

impl<B: Backend> TimestepEmbedding<B> {
    fn build(p: &mut Params<'_, B>, prefix: &str, d_in: usize, d: usize) -> Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: p.linear(&format!("{prefix}.linear_1"), d_in, d, true)?,
            linear_2: p.linear(&format!("{prefix}.linear_2"), d, d, true)?,
        })
    }

    /// # Shapes
    /// `[batch, d_in]` → `[batch, d]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        linear(&self.linear_2, silu(linear(&self.linear_1, x)))
    }
}

/// diffusers' `get_timestep_embedding` (`Timesteps`): frequencies
/// `exp(−ln(10⁴)·i/(half − shift))` in float32, `[sin, cos]` of `t·freq` (`[cos, sin]` with
/// `flip_sin_to_cos`), a zero column for an odd width.
///
/// # Shapes
/// `[n]` → `[n, dim]` (float32).
pub fn timestep_proj<B: Backend>(
    timesteps: Tensor<B, 1>,
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
) -> Tensor<B, 2> {
    let half = dim / 2;
    let n = timesteps.dims()[0];
    let device = timesteps.device();
    let scale = -(10000f64.ln() as f32);
    let freqs: Vec<f32> =
        (0..half).map(|i| (scale * i as f32 / (half as f32 - shift as f32)).exp()).collect();
    let freqs = Tensor::<B, 1>::from_data(TensorData::new(freqs, [half]), (&device, DType::F32));
    let args = timesteps.cast(DType::F32).unsqueeze_dim::<2>(1) * freqs.unsqueeze::<2>();
    let (sin, cos) = (args.clone().sin(), args.cos());
    let mut parts = if flip_sin_to_cos { vec![cos, sin] } else { vec![sin, cos] };
    if dim % 2 == 1 {
        parts.push(Tensor::zeros([n, 1], (&device, DType::F32)));
    }
    Tensor::cat(parts, 1)
}

/// The Stable Diffusion U-Net.
///
/// Module and field names follow diffusers' keys (`down_blocks.{i}.attentions.{j}.…`); see the
/// crate docs for the seams its forward passes.
#[derive(Module, Debug)]
pub struct UNet2DConditionModel<B: Backend> {
    /// Latents → first block's channels.
    pub conv_in: Conv2d<B>,
    /// The timestep embedding MLP.
    pub time_embedding: TimestepEmbedding<B>,
    /// SDXL's embedding of `[text_embeds, time_ids embedding]`, added to the timestep's.
    pub add_embedding: Option<TimestepEmbedding<B>>,
    /// Down blocks, finest first.
    pub down_blocks: Vec<DownBlock<B>>,
    /// The mid block (absent with `mid_block_type: null`).
    pub mid_block: Option<UNetMidBlock2DCrossAttn<B>>,
    /// Up blocks, coarsest first.
    pub up_blocks: Vec<UpBlock<B>>,
    /// GroupNorm before the output convolution.
    pub conv_norm_out: GroupNorm<B>,
    /// First block's channels → output channels.
    pub conv_out: Conv2d<B>,
}

/// A [`UNet2DConditionModel`] with its configuration: what the harness and strategies hold.
#[derive(Debug, Clone)]
pub struct UnetModel<B: Backend> {
    /// The modules.
    pub unet: UNet2DConditionModel<B>,
    /// The validated configuration.
    pub config: UNet2DConditionConfig,
    desc: ModelDesc,
    params: Vec<ParamInfo>,
}

/// What one forward computes once from the timestep, added conditions and text.
struct Embedded<B: Backend> {
    /// `silu(temb)`, what every resnet's `time_emb_proj` reads.
    temb_act: Tensor<B, 2>,
    /// The text embeddings.
    text: Tensor<B, 3>,
    /// The text-padding bias, if a mask was given.
    text_bias: Option<Tensor<B, 4>>,
}

fn check_plan(config: &UNet2DConditionConfig, plan: &LoadPlan) -> Result<()> {
    if let Some(shard) = plan.tensor_shard {
        let n = shard.world;
        let bad = |what: String| {
            Err(UnetError::Plan(format!(
                "tensor-parallel part {} of {n}: {what} is not divisible by {n}",
                shard.rank
            )))
        };
        if n == 0 || shard.rank >= n {
            return bad("the part index".into());
        }
        if !config.norm_num_groups.is_multiple_of(n) {
            return bad(format!("norm_num_groups {}", config.norm_num_groups));
        }
        for site in config.feature_sites() {
            if let parallel_core::FeatureSite::SelfAttention { heads, channels, .. } = site
                && !heads.is_multiple_of(n)
            {
                return bad(format!(
                    "a transformer's {heads} attention heads ({channels} channels)"
                ));
            }
        }
    }
    if plan.blocks.is_some() || plan.skip_embed || plan.skip_head {
        return Err(UnetError::Plan(
            "a U-Net has no pipeline stages: load plans with `blocks`, `skip_embed` or \
             `skip_head` do not apply"
                .into(),
        ));
    }
    Ok(())
}

impl<B: Backend> UNet2DConditionModel<B> {
    fn build(p: &mut Params<'_, B>, c: &UNet2DConditionConfig) -> Result<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb = c.time_embed_dim;
        let conv_in = p.conv("conv_in", [c.in_channels, ch[0]], c.conv_in_kernel, 1)?;
        let time_embedding = TimestepEmbedding::build(p, "time_embedding", ch[0], temb)?;
        let add_embedding = match &c.addition {
            Some(a) => Some(TimestepEmbedding::build(p, "add_embedding", a.input_dim, temb)?),
            None => None,
        };
        let attention = |kind: BlockKind, heads: usize, layers: usize| match kind {
            BlockKind::Plain => None,
            BlockKind::CrossAttn => {
                Some((heads, layers, c.cross_attention_dim, c.use_linear_projection))
            }
        };
        let mut down_blocks = Vec::with_capacity(n);
        let mut out = ch[0];
        for (i, &channels) in ch.iter().enumerate() {
            let input = out;
            out = channels;
            let spec = BlockSpec {
                in_channels: input,
                out_channels: out,
                prev_output_channels: 0,
                layers: c.layers_per_block[i],
                temb,
                groups: c.norm_num_groups,
                eps: c.norm_eps,
                resnet_scale: c.resnet_out_scale_factor,
                sample: i + 1 < n,
                attention: attention(
                    c.down_block_types[i],
                    c.num_attention_heads[i],
                    c.transformer_layers_per_block[i],
                ),
            };
            down_blocks.push(DownBlock::build(p, &format!("down_blocks.{i}"), &spec)?);
        }
        let mid_block = if c.mid_block {
            let spec = BlockSpec {
                in_channels: ch[n - 1],
                out_channels: ch[n - 1],
                prev_output_channels: 0,
                layers: 1,
                temb,
                groups: c.norm_num_groups,
                eps: c.norm_eps,
                resnet_scale: c.mid_block_scale_factor,
                sample: false,
                attention: attention(
                    BlockKind::CrossAttn,
                    c.num_attention_heads[n - 1],
                    c.transformer_layers_per_block[n - 1],
                ),
            };
            Some(UNetMidBlock2DCrossAttn::build(p, "mid_block", &spec)?)
        } else {
            None
        };
        let rev_ch: Vec<usize> = ch.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = c.num_attention_heads.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = c.layers_per_block.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out = rev_ch[0];
        for (i, &channels) in rev_ch.iter().enumerate() {
            let prev = out;
            out = channels;
            let spec = BlockSpec {
                in_channels: rev_ch[(i + 1).min(n - 1)],
                out_channels: out,
                prev_output_channels: prev,
                layers: rev_layers[i] + 1,
                temb,
                groups: c.norm_num_groups,
                eps: c.norm_eps,
                resnet_scale: c.resnet_out_scale_factor,
                sample: i + 1 < n,
                attention: attention(
                    c.up_block_types[i],
                    rev_heads[i],
                    c.reverse_transformer_layers_per_block[i],
                ),
            };
            up_blocks.push(UpBlock::build(p, &format!("up_blocks.{i}"), &spec)?);
        }
        let conv_norm_out = p.group_norm("conv_norm_out", c.norm_num_groups, ch[0], c.norm_eps)?;
        let conv_out = p.conv("conv_out", [ch[0], c.out_channels], c.conv_out_kernel, 1)?;
        Ok(UNet2DConditionModel {
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }
}

impl<B: Backend> UnetModel<B> {
    /// Loads a diffusers U-Net folder (`config.json` + `diffusion_pytorch_model.safetensors`
    /// or its `.index.json` shards) in the device's default float dtype.
    ///
    /// # Errors
    /// A bad or unsupported `config.json` (naming the key), missing/corrupt weights, wrong
    /// shapes, keys nothing reads ([`weights::WeightError`]), or a plan a U-Net cannot honour.
    pub fn load(folder: impl AsRef<Path>, plan: &LoadPlan, device: &B::Device) -> Result<Self> {
        let folder = folder.as_ref();
        let config = UNet2DConditionConfig::from_folder(folder)?;
        Self::from_store(&config, WeightStore::open(folder, WEIGHTS_FILE)?, plan, device)
    }

    /// Loads from an opened store (choose the compute dtype with
    /// [`WeightStore::with_dtype`]); fails naming any stored key the model does not read.
    pub fn from_store(
        config: &UNet2DConditionConfig,
        mut store: WeightStore,
        plan: &LoadPlan,
        device: &B::Device,
    ) -> Result<Self> {
        check_plan(config, plan)?;
        let mut p = Params::from_store(&mut store, device);
        p.shard = plan.tensor_shard;
        let unet = UNet2DConditionModel::build(&mut p, config)?;
        let infos = std::mem::take(&mut p.infos);
        store.finish()?;
        Ok(Self::assemble(unet, config, infos))
    }

    /// A model with random weights (`N(0, 1/fan_in)`; norms the identity).
    pub fn random(
        config: &UNet2DConditionConfig,
        plan: &LoadPlan,
        device: &B::Device,
    ) -> Result<Self> {
        check_plan(config, plan)?;
        let mut p = Params::random(device);
        p.shard = plan.tensor_shard;
        let unet = UNet2DConditionModel::build(&mut p, config)?;
        let infos = std::mem::take(&mut p.infos);
        Ok(Self::assemble(unet, config, infos))
    }

    /// A named preset ([`PRESETS`](crate::PRESETS)) with random weights.
    pub fn preset(name: &str, plan: &LoadPlan, device: &B::Device) -> Result<Self> {
        Self::random(&UNet2DConditionConfig::preset(name)?, plan, device)
    }

    fn assemble(
        unet: UNet2DConditionModel<B>,
        config: &UNet2DConditionConfig,
        infos: Vec<(String, Vec<usize>, Sharding)>,
    ) -> Self {
        let elem_bytes = unet.conv_in.weight.val().dtype().size();
        let params = infos
            .into_iter()
            .map(|(name, shape, sharding)| ParamInfo {
                name,
                shape,
                elem_bytes,
                sharding,
                block: None,
            })
            .collect();
        UnetModel { unet, desc: config.desc(), config: config.clone(), params }
    }

    /// Every parameter with its full shape and tensor-parallel placement.
    pub fn params(&self) -> &[ParamInfo] {
        &self.params
    }

    fn input_error(reason: String) -> ParallelError {
        UnetError::Input(reason).into()
    }

    /// The conditioning inputs: `silu(temb)` and the text (with its padding bias).
    fn embed(&self, input: &DenoiserInput<B>) -> parallel_core::Result<Embedded<B>> {
        let c = &self.config;
        let [batch, channels, _, _] = input.hidden_states.dims();
        if channels != c.in_channels {
            return Err(Self::input_error(format!(
                "`sample` has {channels} channels; the model takes {}",
                c.in_channels
            )));
        }
        let dtype = self.unet.conv_in.weight.val().dtype();
        let t = input.timestep.clone();
        let t = match t.dims()[0] {
            n if n == batch => t,
            1 => t.expand([batch]),
            n => {
                return Err(Self::input_error(format!(
                    "`timestep` has {n} entries for a batch of {batch}"
                )));
            }
        };
        let t_emb = timestep_proj(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift);
        let mut emb = self.unet.time_embedding.forward(t_emb.cast(dtype));
        if let (Some(add), Some(a)) = (&self.unet.add_embedding, &c.addition) {
            let get = |key: &str, width: usize| -> parallel_core::Result<Tensor<B, 2>> {
                let t = input.added_cond.get(key).ok_or_else(|| {
                    Self::input_error(format!(
                        "`{key}` is required by this U-Net (addition_embed_type text_time)"
                    ))
                })?;
                if t.dims() != [batch, width] {
                    return Err(Self::input_error(format!(
                        "`{key}` has shape {:?}; expected [{batch}, {width}]",
                        t.dims()
                    )));
                }
                Ok(t.clone())
            };
            let text_embeds = get("text_embeds", a.text_embeds_dim())?;
            let time_ids = get("time_ids", 6)?;
            let time_embeds = timestep_proj(
                time_ids.reshape([batch * 6]),
                a.time_embed_dim,
                c.flip_sin_to_cos,
                c.freq_shift,
            )
            .reshape([batch, 6 * a.time_embed_dim]);
            let add_embeds = Tensor::cat(vec![text_embeds.cast(DType::F32), time_embeds], 1);
            emb = emb + add.forward(add_embeds.cast(dtype));
        }
        let text = input.encoder_hidden_states.clone().ok_or_else(|| {
            Self::input_error("`encoder_hidden_states` (the text embeddings) is required".into())
        })?;
        let [tb, tokens, width] = text.dims();
        if tb != batch || width != c.cross_attention_dim {
            return Err(Self::input_error(format!(
                "`encoder_hidden_states` has shape [{tb}, {tokens}, {width}]; expected \
                 [{batch}, tokens, {}]",
                c.cross_attention_dim
            )));
        }
        let bias = match &input.encoder_attention_mask {
            None => None,
            Some(mask) => {
                if mask.dims() != [batch, tokens] {
                    return Err(Self::input_error(format!(
                        "`encoder_attention_mask` has shape {:?}; expected [{batch}, {tokens}]",
                        mask.dims()
                    )));
                }
                let bias = mask.clone().cast(dtype).neg().add_scalar(1.0).mul_scalar(-10000.0);
                Some(bias.reshape([batch, 1, 1, tokens]))
            }
        };
        Ok(Embedded { temb_act: silu(emb), text: text.cast(dtype), text_bias: bias })
    }

    /// The forward of latent rows `rows` (all of them for the plain forward).
    fn forward_band(
        &self,
        input: &DenoiserInput<B>,
        rows: Range<usize>,
        seams: &mut dyn Seams<B>,
    ) -> parallel_core::Result<Tensor<B, 4>> {
        let c = &self.config;
        let [_, _, height, width] = input.hidden_states.dims();
        let band = Band { rows: rows.clone(), total: height };
        if !band.is_full() {
            self.desc.check_grid(input.grid())?;
            let g = self.desc.row_granularity;
            if rows.start >= rows.end
                || rows.end > height
                || !rows.start.is_multiple_of(g)
                || !rows.end.is_multiple_of(g)
            {
                return Err(Self::input_error(format!(
                    "latent rows {rows:?} of {height} are not a non-empty band of whole multiples \
                     of the total down-sampling {g}"
                )));
            }
        }
        let Embedded { temb_act, text, text_bias } = self.embed(input)?;
        let inputs = BlockInputs { temb_act, text: &text, text_bias: text_bias.as_ref() };
        let mut fwd = Fwd::new(seams);
        // Latents in the compute dtype (a float32 latent into a half-precision model).
        let sample = input.hidden_states.clone().cast(self.unet.conv_in.weight.val().dtype());
        let sample =
            if c.center_input_sample { sample.mul_scalar(2.0).sub_scalar(1.0) } else { sample };
        let h = self.unet.conv_in.forward_input(sample, &band);
        let mut skips = vec![(h.clone(), band.clone())];
        let mut state = (h, band);
        for block in &self.unet.down_blocks {
            let (next, block_skips) = block.forward(state, &inputs, &mut fwd)?;
            skips.extend(block_skips);
            state = next;
        }
        if let Some(mid) = &self.unet.mid_block {
            let (h, band) = state;
            state = (mid.forward(h, &band, &inputs, &mut fwd)?, band);
        }
        // diffusers forwards the skip sizes to the up-samplers when a latent side is not a
        // multiple of 2^(up-samplers).
        let factor = 1usize << c.num_downsamplers();
        let forward_size = !height.is_multiple_of(factor) || !width.is_multiple_of(factor);
        let last = self.unet.up_blocks.len() - 1;
        for (i, block) in self.unet.up_blocks.iter().enumerate() {
            let n = block.num_skips();
            let size = if i < last && forward_size && skips.len() > n {
                let [_, _, h, w] = skips[skips.len() - n - 1].0.dims();
                Some([h, w])
            } else {
                None
            };
            state = block.forward(state, &mut skips, size, &inputs, &mut fwd)?;
        }
        let (h, band) = state;
        let h = silu(self.unet.conv_norm_out.forward(h, &band, &mut fwd)?);
        let (out, _) = self.unet.conv_out.forward(h, &band, &mut fwd)?;
        Ok(out)
    }

    /// The whole-latent forward with the serial seams: `UNet2DConditionModel.forward`'s
    /// `sample` output.
    ///
    /// # Shapes
    /// `[batch, in_channels, h, w]` → `[batch, out_channels, h, w]`.
    pub fn forward(&self, input: &DenoiserInput<B>) -> parallel_core::Result<Tensor<B, 4>> {
        let height = input.hidden_states.dims()[2];
        self.forward_band(input, 0..height, &mut parallel_core::Serial)
    }
}

impl<B: Backend> Denoiser<B> for UnetModel<B> {
    fn desc(&self) -> &ModelDesc {
        &self.desc
    }

    fn forward_rows(
        &self,
        input: &DenoiserInput<B>,
        rows: Range<usize>,
        seams: &mut dyn Seams<B>,
    ) -> parallel_core::Result<Tensor<B, 4>> {
        self.forward_band(input, rows, seams)
    }

    /// Bytes this rank holds (its parts of the sharded parameters).
    fn param_bytes(&self) -> u64 {
        (self.unet.num_params() * self.unet.conv_in.weight.val().dtype().size()) as u64
    }
}

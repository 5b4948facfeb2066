//! The named presets: every preset's config, description and parameter table against the
//! real checkpoints (counts from diffusers 0.42.1 on the meta device), and a one-block
//! random-weight build of each family run through every stage (shape test).

use crate::common::B;
use burn::tensor::{Distribution, Int, Tensor};
use models_dit::{DitError, DitModel, ModelConfig, PRESETS};
use parallel_core::{Denoiser, DenoiserInput, LoadPlan, ModelFamily, Serial, StagedDenoiser};

/// (preset, parameter count, key count) of the full model, from
/// `sum(p.numel() for p in Model(**config).state_dict().values())` under
/// `torch.device("meta")` in diffusers 0.42.1. DiT-XL/2 has 750 M parameters in diffusers
/// (not the paper's 675 M) because every block carries its own timestep and class embedder.
const DIFFUSERS_COUNTS: [(&str, u64, usize); 5] = [
    ("PixArt-XL-2-512x512", 610_856_096, 603),
    ("PixArt-XL-2-1024-MS", 611_349_152, 611),
    ("PixArt-Sigma-XL-2-1024-MS", 610_856_096, 603),
    ("DiT-XL-2-256", 749_826_464, 538),
    ("DiT-XL-2-512", 749_826_464, 538),
];

/// The same for the MMDiT presets (SD3 family and FLUX.1) (diffusers 0.42.1, meta device; the position table
/// `pos_embed.pos_embed` is part of the state dict).
const SD3_COUNTS: [(&str, u64, usize); 5] = [
    ("SD3-medium", 2_084_951_104, 683),
    ("SD3.5-medium", 2_469_663_936, 909),
    ("SD3.5-large", 8_146_280_768, 1227),
    // FLUX.1: 11.9 B parameters (19 double- and 38 single-stream blocks).
    ("FLUX.1-dev", 11_901_408_320, 1160),
    ("FLUX.1-schnell", 11_891_178_560, 1156),
];

#[test]
fn every_mmdit_preset_matches_the_real_checkpoint() {
    for (name, count, keys) in SD3_COUNTS {
        let c = ModelConfig::preset(name).unwrap();
        let d = c.desc();
        assert_eq!(d.family, ModelFamily::MmDit, "{name}");
        assert_eq!(d.joint_layers.len(), d.num_layers);
        assert_eq!(d.text_out_layers(), d.num_layers - 1, "{name}: only the last is pre-only");
        let params = c.params(4);
        assert_eq!(params.len(), keys, "{name}");
        let n: u64 = params.iter().map(|p| p.shape.iter().product::<usize>() as u64).sum();
        assert_eq!(n, count, "{name}");
    }
}

#[test]
fn every_preset_matches_the_real_checkpoint() {
    assert_eq!(PRESETS.len(), DIFFUSERS_COUNTS.len() + SD3_COUNTS.len());
    for (name, count, keys) in DIFFUSERS_COUNTS {
        let c = ModelConfig::preset(name).unwrap();
        c.validate(name).unwrap();
        let d = c.desc();
        assert_eq!(d.family, ModelFamily::Dit);
        assert_eq!((d.num_layers, d.num_heads, d.head_dim, d.hidden_size), (28, 16, 72, 1152));
        assert_eq!((d.ff_inner, d.patch_size, d.row_granularity), (4608, 2, 2));
        assert_eq!((d.in_channels, d.out_channels), (4, 8));
        let params = c.params(4);
        assert_eq!(params.len(), keys, "{name}");
        let n: u64 = params.iter().map(|p| p.shape.iter().product::<usize>() as u64).sum();
        assert_eq!(n, count, "{name}");
        match &c {
            ModelConfig::PixArt(p) => {
                assert!(d.cross_attention);
                assert_eq!(p.caption_channels, Some(4096));
                let (sample, interp, extra) = match name {
                    "PixArt-XL-2-512x512" => (64, 1.0, false),
                    "PixArt-XL-2-1024-MS" => (128, 2.0, true),
                    _ => (128, 2.0, false),
                };
                assert_eq!(d.sample_size, sample, "{name}");
                assert_eq!(p.interpolation_scale(), interp, "{name}");
                assert_eq!(p.use_additional_conditions(), extra, "{name}");
            }
            ModelConfig::DiT(c) => {
                assert!(!d.cross_attention);
                assert_eq!(c.num_classes(), 1000);
                assert_eq!(d.sample_size, if name == "DiT-XL-2-256" { 32 } else { 64 });
            }
            ModelConfig::SD3(_) | ModelConfig::Flux(_) => {
                unreachable!("MMDiT presets are checked on their own")
            }
        }
    }
    let err = ModelConfig::preset("PixArt-XXL").unwrap_err();
    assert!(matches!(err, DitError::UnknownPreset { .. }));
    assert!(err.to_string().contains("DiT-XL-2-512"), "{err}");
}

/// Builds block 0 (+ embedding, conditioning, final layer) of a preset with random weights
/// and runs every stage on a small latent.
fn one_block_shapes(name: &str, input: &DenoiserInput<B>) {
    let dev = Default::default();
    let plan = LoadPlan { blocks: Some(0..1), ..LoadPlan::full() };
    let m = DitModel::<B>::preset(name, &plan, &dev).unwrap();
    assert_eq!(m.held_blocks(), 0..1);
    // Bytes held = everything outside the blocks + block 0, by the table.
    let want: u64 =
        m.params().iter().filter(|p| p.block.unwrap_or(0) == 0).map(|p| p.bytes()).sum();
    assert_eq!(m.param_bytes(), want, "{name}");
    let cond = m.condition(input).unwrap();
    let grid = cond.grid;
    let h = m.embed(input, 0..grid.rows, &cond).unwrap();
    assert_eq!(h.dims(), [1, grid.len(), 1152]);
    let h = m.block(0, h, 0..grid.rows, &cond, &mut Serial).unwrap();
    let out = m.head(h, 0..grid.rows, &cond).unwrap();
    let [_, _, height, width] = input.hidden_states.dims();
    assert_eq!(out.dims(), [1, 8, height, width]);
    let values: Vec<f32> = out.into_data().to_vec().unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
    // A whole forward needs all 28 blocks.
    assert!(m.forward_rows(input, 0..height, &mut Serial).is_err());
}

#[test]
fn one_block_of_pixart_1024_ms_runs_every_stage() {
    let dev = Default::default();
    let n = Distribution::Normal(0.0, 1.0);
    let mut input = DenoiserInput::new(
        Tensor::random([1, 4, 8, 12], n, &dev),
        Tensor::from_floats([500.0], &dev),
    );
    input.encoder_hidden_states = Some(Tensor::random([1, 5, 4096], n, &dev));
    input.encoder_attention_mask = Some(Tensor::from_floats([[1.0, 1.0, 1.0, 0.0, 0.0]], &dev));
    input.added_cond.insert("resolution".into(), Tensor::from_floats([[64.0, 96.0]], &dev));
    input.added_cond.insert("aspect_ratio".into(), Tensor::from_floats([[64.0 / 96.0]], &dev));
    one_block_shapes("PixArt-XL-2-1024-MS", &input);
}

#[test]
fn one_block_of_dit_256_runs_every_stage() {
    let dev = Default::default();
    let mut input = DenoiserInput::new(
        Tensor::random([1, 4, 8, 8], Distribution::Normal(0.0, 1.0), &dev),
        Tensor::from_floats([999.0], &dev),
    );
    input.class_labels = Some(Tensor::<B, 1, Int>::from_ints([1000], &dev));
    one_block_shapes("DiT-XL-2-256", &input);
}

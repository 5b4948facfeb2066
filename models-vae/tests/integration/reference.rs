//! The VAE against diffusers 0.42.1 on the tiny random-weight fixture
//! (`fixtures/pipeline/reference/vae.safetensors`, see `tools/fixtures/PIPELINE.md`).
//!
//! Tolerance: relative L2 ≤ 1e-5 (docs/ARCHITECTURE.md, "What we measure ourselves by":
//! serial models equal diffusers to relative L2 1e-5): both sides compute in float32 with
//! different summation orders (convolution, GroupNorm statistics, attention), so they agree
//! to float32 rounding accumulated over ~30 layers, not bit for bit. Measured on the reference
//! machine (AMD EPYC, AVX2): decoder 7.1e-7 (square) and 7.3e-7 (non-square), encoder mean
//! **1.4e-6** (the worst) and logvar 1.0e-6, a margin of 7. max|a−b| / max|b| is printed next
//! to it (run with `--nocapture`; measured ≤ 1.7e-6).

use std::time::Instant;

use crate::common::{errors, load_vae, read_tensor, reference, values};
use models_vae::VaeParts;

/// float32 rounding through the whole network (the project's bar for serial models,
/// docs/ARCHITECTURE.md, "What we measure ourselves by"); measured worst 1.4e-6
/// (`encode_mean`, AMD EPYC, AVX2), 7× below it.
const REL_L2_TOL: f64 = 1e-5;

fn check(name: &str, got: &[f32], want: &[f32]) {
    let (rel_l2, rel_max) = errors(got, want);
    println!("{name}: relative L2 {rel_l2:.3e}, max|a-b|/max|b| {rel_max:.3e}");
    assert!(rel_l2 <= REL_L2_TOL, "{name}: relative L2 {rel_l2:.3e} > {REL_L2_TOL:e}");
}

#[test]
fn decoder_matches_diffusers_square_and_nonsquare() {
    let vae = load_vae(VaeParts::DecoderOnly);
    let file = reference("vae.safetensors");
    // The file's `latents` are pre-scaling: sample = vae.decode(latents / 0.18215).sample, which
    // is decode_latents (PixArt's scaling_factor 0.18215, no shift_factor).
    for (latents, sample, shape) in [
        ("latents", "sample", [1, 3, 128, 128]),
        ("latents_nonsquare", "sample_nonsquare", [1, 3, 128, 192]),
    ] {
        let z = read_tensor(&file, latents);
        let want = read_tensor(&file, sample);
        let start = Instant::now();
        let got = vae.decode_latents(z.clone()).unwrap();
        let data = values(got.clone());
        println!("decode {:?} -> {:?}: {:?}", z.dims(), got.dims(), start.elapsed());
        assert_eq!(got.dims(), shape);
        check(sample, &data, &values(want));

        // decode is the raw vae.decode: decode(latents / scaling_factor) is the same.
        let raw = values(vae.decode(z / 0.18215).unwrap());
        let (rel_l2, _) = errors(&raw, &data);
        println!("decode vs decode_latents: relative L2 {rel_l2:.3e}");
        // Measured 0 (bitwise, AMD EPYC, AVX2): both divide by the scaling factor. 1e-6
        // allows a ulp of difference in the input (e.g. a multiply by 1/0.18215) carried
        // through the decoder, ~1e-7; a missing or doubled scaling moves it by ≥ 0.1.
        assert!(rel_l2 <= 1e-6, "decode vs decode_latents: {rel_l2:e}");
    }
}

#[test]
fn full_vae_decodes_the_same_and_encoder_matches_diffusers() {
    let vae = load_vae(VaeParts::EncoderAndDecoder);
    let file = reference("vae.safetensors");
    let got = vae.decode_latents(read_tensor(&file, "latents")).unwrap();
    check("sample (full VAE)", &values(got), &values(read_tensor(&file, "sample")));

    let dist = vae.encode(read_tensor(&file, "encode_input")).unwrap();
    assert_eq!(dist.mean.dims(), [1, 4, 4, 4]);
    check("encode_mean", &values(dist.mean.clone()), &values(read_tensor(&file, "encode_mean")));
    check(
        "encode_logvar",
        &values(dist.logvar.clone()),
        &values(read_tensor(&file, "encode_logvar")),
    );
    // The mode is the mean; a zero-noise sample too.
    let zero = dist.mean.zeros_like();
    let (rel_l2, _) = errors(&values(dist.sample(zero)), &values(dist.mode()));
    assert_eq!(rel_l2, 0.0);
}

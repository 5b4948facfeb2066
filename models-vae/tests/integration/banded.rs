//! The patch-parallel decode: every rank decodes a band of latent rows with
//! `parallel_core::split::ExactRows` (neighbours' halo rows, merged group-norm statistics,
//! gathered attention keys and values), and the bands stacked equal the whole-image decode.
//! With the serial seams instead (each band alone: zero halos, local statistics and
//! attention) the bands differ: the exchanges are needed, so the test can fail.

use crate::common::{B, errors, load_vae, values};
use burn::tensor::{Distribution, Tensor};
use models_vae::VaeParts;
use parallel_core::split::{ExactRows, balanced};
use parallel_core::{LaunchOptions, Serial, launch};

/// Max-relative bound of a banded decode against the whole one: float32 reordering of the
/// merged statistics and the gathered attention (measured ≤ 1.3e-6 here, n = 1…4); the bar.
const EXACT: f64 = 1e-5;

fn latent() -> Tensor<B, 4> {
    // 13 × 10 latent rows × columns: uneven bands over 2, 3 and 4 ranks.
    Tensor::random([2, 4, 13, 10], Distribution::Normal(0.0, 1.0), &Default::default())
}

#[test]
fn bands_over_ranks_equal_the_whole_decode() {
    let vae = load_vae(VaeParts::DecoderOnly);
    let z = latent();
    let whole = values(vae.decode(z.clone()).unwrap());
    let s = vae.config.spatial_scale();
    for n in [1, 2, 3, 4] {
        let bands = balanced(13, n);
        let outs = launch(n, &LaunchOptions::default(), |comm| {
            let mut seams = ExactRows::new(&comm, bands.clone(), 13, "vae")?;
            let rows = bands[comm.rank()].clone();
            vae.decode_rows(z.clone(), rows, &mut seams)
                .map_err(|e| parallel_core::ParallelError::Model(e.to_string()))
        });
        let outs: Vec<Tensor<B, 4>> = outs.into_iter().map(|o| o.unwrap()).collect();
        for (o, b) in outs.iter().zip(&bands) {
            assert_eq!(o.dims()[2], b.len() * s, "n={n}: rows of band {b:?}");
        }
        let got = values(Tensor::cat(outs, 2));
        let (rel_l2, max_rel) = errors(&got, &whole);
        println!("n={n}: rel L2 {rel_l2:.2e}, max rel {max_rel:.2e}");
        assert!(max_rel <= EXACT, "n={n}: max rel {max_rel:.2e}");
    }
}

#[test]
fn bands_decoded_alone_differ() {
    let vae = load_vae(VaeParts::DecoderOnly);
    let z = latent();
    let whole = values(vae.decode(z.clone()).unwrap());
    let outs: Vec<Tensor<B, 4>> = balanced(13, 2)
        .into_iter()
        .map(|rows| vae.decode_rows(z.clone(), rows, &mut Serial).unwrap())
        .collect();
    let (_, max_rel) = errors(&values(Tensor::cat(outs, 2)), &whole);
    assert!(max_rel > 1e-2, "bands alone equal the whole decode: {max_rel:.2e}");
    // The whole latent as one band with the serial seams is the whole decode.
    let one = values(vae.decode_rows(z.clone(), 0..13, &mut Serial).unwrap());
    assert!(errors(&one, &whole).1 <= EXACT);
}

#[test]
fn bad_bands_are_refused() {
    let vae = load_vae(VaeParts::DecoderOnly);
    let err = vae.decode_rows(latent(), 5..5, &mut Serial).unwrap_err().to_string();
    assert!(err.contains("band") && err.contains("13 rows"), "{err}");
    let err = vae.decode_rows(latent(), 10..14, &mut Serial).unwrap_err().to_string();
    assert!(err.contains("band"), "{err}");
}

//! Attention kernels shared by models, the serial seams and the strategies, so that every
//! path computes attention the same way: the `kernels` crate's (its tiled kernel on Flex/f32,
//! memory linear in tokens; Burn's ops on every other backend), under the names the
//! strategies use — `sdpa` ([`kernels::attention`]), `sdpa_with_lse`
//! ([`kernels::attention_with_lse`]) and [`merge_partial`].

pub use kernels::{attention as sdpa, attention_with_lse as sdpa_with_lse, merge_partial};

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::seams::{JointOutput, TextQkv};

/// Joint attention of image and text tokens over the keys of both (diffusers'
/// `JointAttnProcessor2_0`: queries, keys and values of the image tokens, then of the text
/// tokens, concatenated along the tokens; one attention; the output split back).
///
/// # Shapes
/// `q`, `k`, `v`: `[batch, heads, image tokens, d]`; `text`'s: `[batch, heads, text tokens,
/// d]`; output: the image tokens' and (with `text.q`) the text tokens' outputs.
pub fn joint_sdpa<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    text: TextQkv<B>,
) -> JointOutput<B> {
    let n = q.dims()[2];
    let keys = Tensor::cat(vec![k, text.k], 2);
    let values = Tensor::cat(vec![v, text.v], 2);
    match text.q {
        Some(tq) => {
            let t = tq.dims()[2];
            let out = sdpa(Tensor::cat(vec![q, tq], 2), keys, values, None);
            (out.clone().narrow(2, 0, n), Some(out.narrow(2, n, t)))
        }
        None => (sdpa(q, keys, values, None), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tensor, Tolerance};
    use burn_flex::Flex;

    type B = Flex;

    #[test]
    fn lse_merge_over_blocks_equals_full_attention() {
        let dev = Default::default();
        let q = Tensor::<B, 4>::random([2, 3, 5, 8], Distribution::Normal(0.0, 1.0), &dev);
        let k = Tensor::<B, 4>::random([2, 3, 9, 8], Distribution::Normal(0.0, 1.0), &dev);
        let v = Tensor::<B, 4>::random([2, 3, 9, 8], Distribution::Normal(0.0, 1.0), &dev);
        let full = sdpa(q.clone(), k.clone(), v.clone(), None);
        let (a, la) =
            sdpa_with_lse(q.clone(), k.clone().narrow(2, 0, 4), v.clone().narrow(2, 0, 4));
        let (b, lb) =
            sdpa_with_lse(q.clone(), k.clone().narrow(2, 4, 5), v.clone().narrow(2, 4, 5));
        let (merged, _) = merge_partial(a, la, b, lb);
        let (whole, _) = sdpa_with_lse(q, k, v);
        // Largest |a − b| / max(R·max(|a|, |b|), A) of any element: the share of the
        // `rel_abs(R, A)` bound below that is used (pass < 1), and the largest |a − b|.
        let used = |a: &Tensor<B, 4>, b: &Tensor<B, 4>| {
            let a: Vec<f32> = a.to_data().to_vec().unwrap();
            let b: Vec<f32> = b.to_data().to_vec().unwrap();
            a.iter().zip(&b).fold((0f32, 0f32), |(u, m), (x, y)| {
                let d = (x - y).abs();
                (u.max(d / (1e-5 * x.abs().max(y.abs())).max(1e-6)), m.max(d))
            })
        };
        println!("merged vs full: (share of bound, max abs) {:?}", used(&merged, &full));
        println!("whole vs full: (share of bound, max abs) {:?}", used(&whole, &full));
        // Float32 rounding of two differently ordered softmax sums. Measured over 30 runs of
        // these random inputs (AMD EPYC, AVX2): max |a − b| 3.6e-7 on outputs of O(1), the worst
        // element using 18% of the rel_abs(1e-5, 1e-6) bound (a margin of 5.6); a merge that
        // drops a block's weight or forgets to rescale by exp(lse) is off by O(0.1).
        merged
            .into_data()
            .assert_approx_eq::<f32>(&full.clone().into_data(), Tolerance::rel_abs(1e-5, 1e-6));
        whole
            .into_data()
            .assert_approx_eq::<f32>(&full.into_data(), Tolerance::rel_abs(1e-5, 1e-6));
    }
}

//! Every kernel's Flex/f32 fast path against Burn's own op (or Burn's composition of the same
//! function) on random inputs, on 1- and 3-thread pools, with the layouts the models pass
//! (heads as strided views, broadcast modulation vectors, masks as broadcast biases).
//!
//! The error measure is `max|ours − burn| / max|burn|` (metrics' max-rel). Each bound is named
//! with the value measured on an AMD EPYC (AVX2), and why it is that size.

use burn::tensor::activation;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Distribution, Tensor};
use burn_flex::Flex;

type B = Flex;

fn randn<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<B, D> {
    let dev = Default::default();
    B::seed(&dev, seed);
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &dev)
}

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec().expect("f32")
}

/// max-rel of `ours` against `reference`, printed with its label.
fn err<const D: usize>(label: &str, ours: Tensor<B, D>, reference: Tensor<B, D>) -> f64 {
    assert_eq!(ours.dims(), reference.dims(), "{label}: shapes");
    let c = metrics::compare(&values(ours), &values(reference));
    assert_eq!(c.non_finite, 0, "{label}: non-finite values");
    println!("{label}: max-rel {:.2e}, rel-L2 {:.2e}", c.max_rel, c.rel_l2);
    c.max_rel
}

fn on_threads(threads: usize, f: impl FnOnce() + Send) {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool").install(f);
}

/// Float32 rounding of a dot product or sum of a few thousand terms in a different order
/// than Burn's: measured ≤ 1.2e-6 below; a kernel that drops a key tile, a head or a
/// bias is off by O(0.1).
const SUM_ORDER: f64 = 1e-5;

#[test]
fn activations_match_burn() {
    for threads in [1, 3] {
        on_threads(threads, || {
            // 70 000 elements: several parallel chunks and a ragged tail.
            let x = randn([2, 7, 5000], 1).mul_scalar(4.0);
            // Measured 2.4e-7 (tanh), 2.4e-7 (erf), 1.2e-7 (silu): Burn evaluates the same
            // functions with libm's tanh/erf/exp; ours are within 1e-6 of f64 (math tests).
            let e = err(
                "gelu tanh",
                kernels::gelu(x.clone(), true),
                activation::gelu_approximate(x.clone()),
            );
            assert!(e < 2e-6, "gelu tanh {e}");
            let e = err("gelu erf", kernels::gelu(x.clone(), false), activation::gelu(x.clone()));
            assert!(e < 2e-6, "gelu erf {e}");
            let e = err("silu", kernels::silu(x.clone()), activation::silu(x.clone()));
            assert!(e < 2e-6, "silu {e}");
            // A strided (transposed) input takes the copy path.
            let xt = x.clone().swap_dims(1, 2);
            let e = err(
                "gelu strided",
                kernels::gelu(xt.clone(), true),
                activation::gelu_approximate(xt),
            );
            assert!(e < 2e-6, "gelu strided {e}");
        });
    }
}

#[test]
fn geglu_matches_burn() {
    for threads in [1, 3] {
        on_threads(threads, || {
            // 2 × 9 tokens × 2·1283: rows split over tasks unevenly, an odd half width.
            let h = randn([2, 9, 2 * 1283], 2).mul_scalar(4.0);
            let (value, gate) = (h.clone().narrow(2, 0, 1283), h.clone().narrow(2, 1283, 1283));
            // The same GELU error as `activations_match_burn` (≤ 2.4e-7 measured there),
            // times a value: measured 4.9e-8 (erf and tanh); swapping the halves gives O(1).
            let e = err(
                "geglu erf",
                kernels::geglu(h.clone(), true),
                value.clone() * activation::gelu(gate.clone()),
            );
            assert!(e < 2e-6, "geglu erf {e}");
            let e = err(
                "geglu tanh",
                kernels::geglu(h.clone(), false),
                value * activation::gelu_approximate(gate),
            );
            assert!(e < 2e-6, "geglu tanh {e}");
        });
    }
}

fn burn_layer_norm(x: Tensor<B, 3>, eps: f64) -> Tensor<B, 3> {
    let mean = x.clone().mean_dim(2);
    let c = x - mean;
    let var = c.clone().square().mean_dim(2);
    c / var.add_scalar(eps).sqrt()
}

#[test]
fn layer_norm_modulate_matches_burn() {
    for threads in [1, 3] {
        on_threads(threads, || {
            let x = randn([2, 37, 1152], 2).add_scalar(3.0);
            let m = randn([2, 6, 1152], 3).mul_scalar(0.3);
            // The modulation vectors as the block takes them: narrowed views of [b, 6, h].
            let (shift, scale) = (m.clone().narrow(1, 0, 1), m.clone().narrow(1, 1, 1));
            let want =
                burn_layer_norm(x.clone(), 1e-6) * scale.clone().add_scalar(1.0) + shift.clone();
            let got =
                kernels::layer_norm_modulate(x.clone(), 1e-6, Some(scale.clone()), Some(shift));
            // Measured 9.5e-7: the row mean and variance summed in 16 lanes vs Burn's order.
            assert!(err("layer norm modulate", got, want) < SUM_ORDER);
            let plain = kernels::layer_norm_modulate(x.clone(), 1e-6, None, None);
            assert!(err("layer norm", plain, burn_layer_norm(x.clone(), 1e-6)) < SUM_ORDER);
            // One vector for every batch row ([1, 1, h]).
            let one = scale.narrow(0, 1, 1);
            let want = burn_layer_norm(x.clone(), 1e-6) * one.clone().add_scalar(1.0);
            let got = kernels::layer_norm_modulate(x.clone(), 1e-6, Some(one), None);
            assert!(err("layer norm scale [1,1,h]", got, want) < SUM_ORDER);
        });
    }
}

#[test]
fn gated_residual_matches_burn() {
    on_threads(3, || {
        let (r, y) = (randn([2, 300, 96], 4), randn([2, 300, 96], 5));
        let g = randn([2, 6, 96], 6).narrow(1, 2, 1);
        // Measured 1.2e-7: one fused multiply-add against a rounded product and a sum.
        let e = err(
            "gated residual",
            kernels::gated_residual(r.clone(), Some(g.clone()), y.clone()),
            g.clone() * y.clone() + r.clone(),
        );
        assert!(e < 1e-6);
        // A residual nobody else holds is updated in place (a different code path).
        let unique = randn([2, 300, 96], 4);
        let e = err(
            "gated residual in place",
            kernels::gated_residual(unique, Some(g.clone()), y.clone()),
            g * y.clone() + r.clone(),
        );
        assert!(e < 1e-6);
        assert_eq!(
            values(kernels::gated_residual(r.clone(), None, y.clone())),
            values(y.clone() + r)
        );
        let unique = randn([2, 300, 96], 4);
        assert_eq!(
            values(kernels::gated_residual(unique, None, y.clone())),
            values(y + randn([2, 300, 96], 4))
        );
    });
}

#[test]
fn linear_matches_burn() {
    for threads in [1, 3] {
        on_threads(threads, || {
            let x = randn([2, 130, 96], 7);
            let w = randn([96, 200], 8);
            let b = randn([200], 9);
            let want = burn::tensor::module::linear(x.clone(), w.clone(), Some(b.clone()));
            // Measured 4.8e-7: the same GEMM over 260 rows at once instead of 2 × 130.
            assert!(
                err("linear", kernels::linear(x.clone(), w.clone(), Some(b)), want) < SUM_ORDER
            );
            let want = burn::tensor::module::linear(x.clone(), w.clone(), None);
            assert!(
                err("linear no bias", kernels::linear(x.clone(), w.clone(), None), want)
                    < SUM_ORDER
            );
            // A transposed weight view and a strided input.
            let wt = randn([200, 96], 10).transpose();
            let xs = randn([130, 2, 96], 11).swap_dims(0, 1);
            let want = burn::tensor::module::linear(xs.clone(), wt.clone(), None);
            assert!(err("linear strided", kernels::linear(xs, wt, None), want) < SUM_ORDER);
        });
    }
}

fn burn_sdpa(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    let bias = bias.map(|b| {
        let [bq, hq, lq, _] = q.dims();
        b.expand([bq, hq, lq, k.dims()[2]])
    });
    burn_attention(q, k, v, None, bias, AttentionModuleOptions::default())
}

/// `[b, t, h·d]` projections viewed as `[b, h, t, d]`, as the models pass them.
fn heads(b: usize, t: usize, h: usize, d: usize, seed: u64) -> Tensor<B, 4> {
    randn([b, t, h * d], seed).reshape([b, t, h, d]).swap_dims(1, 2)
}

#[test]
fn attention_matches_burn() {
    for threads in [1, 3] {
        on_threads(threads, || {
            // Self-attention, strided heads, token count not a multiple of the query tile.
            let (q, k, v) =
                (heads(2, 300, 4, 72, 12), heads(2, 300, 4, 72, 13), heads(2, 300, 4, 72, 14));
            let want = burn_sdpa(q.clone(), k.clone(), v.clone(), None);
            // Measured 1.1e-6: softmax and P·V summed in another order.
            assert!(err("attention", kernels::attention(q, k, v, None), want) < SUM_ORDER);

            // Cross-attention to 77 text tokens with a padding bias of −10000 on the last 20.
            let q = heads(2, 150, 4, 16, 15);
            let (k, v) = (randn([2, 4, 77, 16], 16), randn([2, 4, 77, 16], 17));
            let mask: Vec<f32> =
                (0..2 * 77).map(|i| if i % 77 >= 57 { -10000.0 } else { 0.0 }).collect();
            let bias = Tensor::<B, 1>::from_floats(mask.as_slice(), &Default::default())
                .reshape([2, 1, 1, 77]);
            let want = burn_sdpa(q.clone(), k.clone(), v.clone(), Some(bias.clone()));
            let got = kernels::attention(q, k, v, Some(bias));
            assert!(err("cross attention with bias", got, want) < SUM_ORDER);

            // More keys than one tile (online softmax over 3 tiles), fewer queries than keys,
            // and scores large enough that a missing rescale would show.
            let q = randn([1, 2, 40, 32], 18).mul_scalar(3.0);
            let (k, v) = (randn([1, 2, 1300, 32], 19), randn([1, 2, 1300, 32], 20));
            let want = burn_sdpa(q.clone(), k.clone(), v.clone(), None);
            assert!(
                err("attention, 3 key tiles", kernels::attention(q, k, v, None), want) < SUM_ORDER
            );
        });
    }
}

#[test]
fn attention_with_lse_matches_the_definition() {
    on_threads(3, || {
        let q = heads(2, 200, 3, 24, 21).mul_scalar(2.0);
        let (k, v) = (randn([2, 3, 1100, 24], 22), randn([2, 3, 1100, 24], 23));
        let scores = q.clone().matmul(k.clone().swap_dims(2, 3)).mul_scalar(1.0 / 24f64.sqrt());
        let max = scores.clone().max_dim(3);
        let p = (scores - max.clone()).exp();
        let sum = p.clone().sum_dim(3);
        let (want, want_lse) = (p.matmul(v.clone()) / sum.clone(), max + sum.log());
        let (got, lse) = kernels::attention_with_lse(q, k, v);
        assert!(err("attention (lse path)", got, want) < SUM_ORDER);
        // Measured 1.9e-7 relative to lse values of O(10).
        assert!(err("lse", lse, want_lse) < SUM_ORDER);
    });
}

#[test]
fn merging_two_key_blocks_equals_attention_over_both() {
    on_threads(3, || {
        let q = heads(2, 90, 3, 16, 24);
        let (k, v) = (randn([2, 3, 150, 16], 25), randn([2, 3, 150, 16], 26));
        let (a, la) = kernels::attention_with_lse(
            q.clone(),
            k.clone().narrow(2, 0, 60),
            v.clone().narrow(2, 0, 60),
        );
        let (b, lb) = kernels::attention_with_lse(
            q.clone(),
            k.clone().narrow(2, 60, 90),
            v.clone().narrow(2, 60, 90),
        );
        let (merged, lse) = kernels::merge_partial(a, la, b, lb);
        let (whole, whole_lse) = kernels::attention_with_lse(q.clone(), k.clone(), v.clone());
        // Measured 4.2e-7: the blocks' sums rescaled and added vs one sum.
        assert!(err("merged vs whole", merged, burn_sdpa(q, k, v, None)) < SUM_ORDER);
        assert!(err("merged lse", lse, whole_lse) < SUM_ORDER);
        drop(whole);
    });
}

/// GroupNorm in float64 on the host: `(x − mean)/√(var + eps)·γ + β` per (image, group).
fn group_norm_f64(
    x: &[f32],
    [b, c, h, w]: [usize; 4],
    groups: usize,
    eps: f64,
    gamma: &[f32],
    beta: &[f32],
) -> Vec<f32> {
    let n = c / groups * h * w;
    let mut out = vec![0f32; x.len()];
    for (gi, (xs, os)) in x.chunks(n).zip(out.chunks_mut(n)).enumerate() {
        let _ = b;
        let mean = xs.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let var = xs.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        for (j, (o, &v)) in os.iter_mut().zip(xs).enumerate() {
            let ch = (gi % groups) * (c / groups) + j / (h * w);
            *o = ((f64::from(v) - mean) * rstd * f64::from(gamma[ch]) + f64::from(beta[ch])) as f32;
        }
    }
    out
}

#[test]
fn group_norm_matches_its_float64_definition() {
    for threads in [1, 3] {
        on_threads(threads, || {
            let shape = [2, 32, 9, 7];
            // Offset 50 against a spread of 3: the variance must come from centred values
            // (Σx²/n − mean² in float32 would lose ~mean²/var ≈ 300 ulps).
            let x = randn(shape, 11).mul_scalar(3.0).add_scalar(50.0);
            let gamma = randn([32], 12);
            let beta = randn([32], 13);
            let eps = 1e-5;
            let want = group_norm_f64(
                &values(x.clone()),
                shape,
                8,
                eps,
                &values(gamma.clone()),
                &values(beta.clone()),
            );
            let norm = |x: Tensor<B, 4>| {
                kernels::group_norm(x, 8, eps, Some(gamma.clone()), Some(beta.clone()))
            };
            // The input shared (a resnet keeps it for its shortcut: a new output) and owned
            // (normalised in place).
            let shared = norm(x.clone());
            let owned = norm(x.clone().add_scalar(0.0));
            let dev = Default::default();
            let want = Tensor::<B, 1>::from_floats(want.as_slice(), &dev).reshape(shape);
            // Measured 9.6e-7 (both): float32 rounding of the mean, rstd and (x − mean)·s + β
            // against float64 (bound 4×);
            // a mean or variance taken over the wrong group is off by O(1).
            let e = err("group norm (shared input)", shared, want.clone());
            assert!(e < 4e-6, "group norm shared {e}");
            let e = err("group norm (owned input)", owned, want);
            assert!(e < 4e-6, "group norm owned {e}");
        });
    }
}

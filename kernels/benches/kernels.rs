//! The project's CPU kernels beside Burn's Flex ops on the same inputs, at PixArt-XL-2-512
//! sizes (512 px: 1024 tokens, hidden 1152 = 16 heads × 72, a 120-token caption, guidance
//! batch 2), on a 1-thread and a 2-thread pool. `cargo bench -p kernels`; PyTorch's numbers
//! for the same shapes: `tools/bench/pytorch_timing.py --kernels`. Also SD 1.5 U-Net shapes
//! (its level-0 self-attention, GEGLU, two 3×3 convs, a GroupNorm).
//!
//! Names: `{kernel}/{ours|burn}/{threads}t`. Each timed closure ends with `into_data()`.

use burn::tensor::activation;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Distribution, Tensor};
use burn_flex::Flex;
use criterion::Criterion;
use std::time::Duration;

type B = Flex;

const BATCH: usize = 2;
const HEADS: usize = 16;
const HEAD_DIM: usize = 72;
const TOKENS: usize = 1024;
const TEXT: usize = 120;
const HIDDEN: usize = HEADS * HEAD_DIM;

fn randn<const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

/// `[b, t, h·d]` → `[b, h, t, d]` as the models view it (no copy).
fn heads(x: Tensor<B, 3>) -> Tensor<B, 4> {
    x.reshape([BATCH, TOKENS, HEADS, HEAD_DIM]).swap_dims(1, 2)
}

/// `[b, h, t, d]` → `[b, t, h·d]`, the models' merge of heads (free when the attention wrote
/// its output in that order, as ours does; reading a `[b, h, t, d]` view out instead would time
/// Flex's element-by-element copy of it, single-threaded).
fn merge(x: Tensor<B, 4>) -> Tensor<B, 3> {
    x.swap_dims(1, 2).reshape([BATCH, TOKENS, HIDDEN])
}

fn main() {
    // As the harness binary runs the kernels (glibc set for tensor-sized blocks).
    kernels::tune_allocator();
    let mut c = Criterion::default().configure_from_args();
    let q = heads(randn([BATCH, TOKENS, HIDDEN]));
    let (k, v) = (heads(randn([BATCH, TOKENS, HIDDEN])), heads(randn([BATCH, TOKENS, HIDDEN])));
    let text_k = randn([BATCH, HEADS, TEXT, HEAD_DIM]);
    let text_v = randn([BATCH, HEADS, TEXT, HEAD_DIM]);
    let x = randn([BATCH, TOKENS, HIDDEN]);
    let y = randn([BATCH, TOKENS, HIDDEN]);
    let wide = randn([BATCH, TOKENS, 4 * HIDDEN]);
    let vec3 = randn([BATCH, 1, HIDDEN]);
    let w = randn([HIDDEN, 4 * HIDDEN]);
    let bias = randn([4 * HIDDEN]);
    // SD 1.5's first U-Net transformer block at 512 px: GEGLU's projection output, 4096 tokens
    // × 2·1280.
    let proj = randn([BATCH, 4096, 2 * 1280]);
    // SD 1.5's U-Net: a resnet conv at 64×64 (320 channels) and at 8×8 (1280).
    let map64 = randn([BATCH, 320, 64, 64]);
    let w64 = randn([320, 320, 3, 3]).mul_scalar(0.02);
    // Ours with the weight as models-unet loads it (`kernels::conv_weight`).
    let w64p = kernels::conv_weight(w64.clone(), 1);
    let map8 = randn([BATCH, 1280, 8, 8]);
    let w8 = randn([1280, 1280, 3, 3]).mul_scalar(0.01);
    let w8p = kernels::conv_weight(w8.clone(), 1);
    let cbias = randn([1280]);
    let conv_ours = |x: &Tensor<B, 4>, w: &Tensor<B, 4>| {
        let b = cbias.clone().narrow(0, 0, w.dims()[0]);
        let pad = kernels::ConvPadding::same(1);
        drop(kernels::conv2d(x.clone(), w.clone(), Some(b), 1, pad).into_data())
    };
    let conv_burn = |x: &Tensor<B, 4>, w: &Tensor<B, 4>| {
        let b = cbias.clone().narrow(0, 0, w.dims()[0]);
        let options = burn::tensor::ops::ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        drop(burn::tensor::module::conv2d(x.clone(), w.clone(), Some(b), options).into_data())
    };
    let gamma = randn([320]);
    // SD 1.5's first-level self-attention at 512 px: 4096 tokens, 8 heads × 40.
    let unet_heads = |x: Tensor<B, 3>| x.reshape([BATCH, 4096, 8, 40]).swap_dims(1, 2);
    let uq = unet_heads(randn([BATCH, 4096, 320]));
    let (uk, uv) = (unet_heads(randn([BATCH, 4096, 320])), unet_heads(randn([BATCH, 4096, 320])));
    let unet_merge = |x: Tensor<B, 4>| x.swap_dims(1, 2).reshape([BATCH, 4096, 320]);

    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
        let mut g = c.benchmark_group("kernels");
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        let mut pair = |name: &str, ours: &(dyn Fn() + Sync), burn: &(dyn Fn() + Sync)| {
            g.bench_function(format!("{name}/ours/{threads}t"), |b| pool.install(|| b.iter(ours)));
            g.bench_function(format!("{name}/burn/{threads}t"), |b| pool.install(|| b.iter(burn)));
        };
        pair(
            "attention_1024tok",
            &|| drop(merge(kernels::attention(q.clone(), k.clone(), v.clone(), None)).into_data()),
            &|| {
                let o = burn_attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    None,
                    None,
                    AttentionModuleOptions::default(),
                );
                drop(merge(o).into_data())
            },
        );
        pair(
            "attention_4096tok_8x40",
            &|| {
                let o = kernels::attention(uq.clone(), uk.clone(), uv.clone(), None);
                drop(unet_merge(o).into_data())
            },
            &|| {
                let o = burn_attention(
                    uq.clone(),
                    uk.clone(),
                    uv.clone(),
                    None,
                    None,
                    AttentionModuleOptions::default(),
                );
                drop(unet_merge(o).into_data())
            },
        );
        pair(
            "cross_attention_1024q_120kv",
            &|| {
                let o = kernels::attention(q.clone(), text_k.clone(), text_v.clone(), None);
                drop(merge(o).into_data())
            },
            &|| {
                let o = burn_attention(
                    q.clone(),
                    text_k.clone(),
                    text_v.clone(),
                    None,
                    None,
                    AttentionModuleOptions::default(),
                );
                drop(merge(o).into_data())
            },
        );
        pair(
            "linear_2048x1152x4608",
            &|| drop(kernels::linear(x.clone(), w.clone(), Some(bias.clone())).into_data()),
            &|| {
                drop(
                    burn::tensor::module::linear(x.clone(), w.clone(), Some(bias.clone()))
                        .into_data(),
                )
            },
        );
        pair(
            "gelu_tanh_2048x4608",
            &|| drop(kernels::gelu(wide.clone(), true).into_data()),
            &|| drop(activation::gelu_approximate(wide.clone()).into_data()),
        );
        pair(
            "layer_norm_modulate_2048x1152",
            &|| {
                let o = kernels::layer_norm_modulate(
                    x.clone(),
                    1e-6,
                    Some(vec3.clone()),
                    Some(vec3.clone()),
                );
                drop(o.into_data())
            },
            &|| {
                let mean = x.clone().mean_dim(2);
                let c = x.clone() - mean;
                let var = c.clone().square().mean_dim(2);
                let n = c / var.add_scalar(1e-6).sqrt();
                drop((n * vec3.clone().add_scalar(1.0) + vec3.clone()).into_data())
            },
        );
        pair(
            "gated_residual_2048x1152",
            &|| drop(kernels::gated_residual(x.clone(), Some(vec3.clone()), y.clone()).into_data()),
            &|| drop((vec3.clone() * y.clone() + x.clone()).into_data()),
        );
        pair("conv3x3_2x320x64x64", &|| conv_ours(&map64, &w64p), &|| conv_burn(&map64, &w64));
        pair("conv3x3_2x1280x8x8", &|| conv_ours(&map8, &w8p), &|| conv_burn(&map8, &w8));
        pair(
            "group_norm_2x320x64x64",
            &|| {
                let g = Some(gamma.clone());
                drop(kernels::group_norm(map64.clone(), 32, 1e-5, g.clone(), g).into_data())
            },
            &|| {
                // Burn's composition, as parallel-core's group_norm was before the kernel.
                let x = map64.clone().reshape([BATCH, 32, 10 * 64 * 64]);
                let mean = x.clone().mean_dim(2);
                let c = x - mean;
                let var = (c.clone() * c.clone()).mean_dim(2);
                let y = (c / var.add_scalar(1e-5).sqrt()).reshape([BATCH, 320, 64, 64]);
                let g = gamma.clone().reshape([1, 320, 1, 1]);
                drop((y * g.clone() + g).into_data())
            },
        );
        g.bench_function(format!("geglu_2x4096x2560/ours/{threads}t"), |b| {
            pool.install(|| b.iter(|| drop(kernels::geglu(proj.clone(), true).into_data())))
        });
        // What models-unet did before the fused kernel: narrow both halves, our GELU on the
        // gate (a strided copy first), Flex's product.
        g.bench_function(format!("geglu_2x4096x2560/narrow_gelu_mul/{threads}t"), |b| {
            pool.install(|| {
                b.iter(|| {
                    let value = proj.clone().narrow(2, 0, 1280);
                    let gate = proj.clone().narrow(2, 1280, 1280);
                    drop((value * kernels::gelu(gate, false)).into_data())
                })
            })
        });
        g.finish();

        // The cores' float32 FMA peak (registers only), every thread of the pool busy:
        // criterion's elements per second are floating-point operations per second.
        const ITERATIONS: usize = 2_000_000;
        let flops = (threads * kernels::fma_throughput(ITERATIONS)) as u64;
        let mut m = c.benchmark_group("machine");
        m.sample_size(10).warm_up_time(Duration::from_millis(300));
        m.throughput(criterion::Throughput::Elements(flops));
        m.bench_function(format!("fma_peak/{threads}t"), |b| {
            pool.install(|| {
                b.iter(|| {
                    rayon::broadcast(|_| std::hint::black_box(kernels::fma_throughput(ITERATIONS)))
                })
            })
        });
        m.finish();
    }
    c.final_summary();
}

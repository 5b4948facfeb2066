//! Kernels that decide a denoising step's time on the CPU, at PixArt-XL-2-512 sizes
//! (512 px: 64×64 latent, 1024 tokens, hidden 1152 = 16 heads × 72, a 120-token caption,
//! classifier-free guidance batch of 2), each on **one thread** (a 1-thread rayon pool, as
//! one rank of a 2-rank run on 2 cores has):
//!
//! - `cpu/attention/1024tok`: `parallel_core::attention::sdpa` (the `kernels` crate's tiled
//!   attention on Flex),
//!   the self-attention of serial, Ulysses, DistriFusion and PipeFusion;
//! - `cpu/attention_lse/1024tok`: `sdpa_with_lse` (the same kernel, log-sum-exp kept),
//!   the kernel of Ring attention, over the same sizes;
//! - `cpu/attention/512tok`, `cpu/attention_lse/512q_512kv`: what one of two ranks runs
//!   (Ulysses: all tokens, half the heads; Ring: half the queries against one K/V block);
//! - `cpu/dit_block/1024tok`: one `BasicTransformerBlock` (self-attention, cross-attention
//!   to 120 text tokens, feed-forward 1152→4608→1152, adaLN-single modulation).
//!
//! - `cpu/matmul/2048x1152x4608`: the feed-forward up-projection's matrix product alone
//!   (2 × 1024 token rows × 1152 → 4608), the bulk of a block's FLOPs.
//!
//! - `cpu/layer_norm/1024tok`, `cpu/gelu_tanh/1024x4608`: the element-wise passes of a
//!   block (the `kernels` crate's LayerNorm and GELU, as the block runs them) at their sizes.
//!
//! Each timed closure ends with `into_data()` on the result, the explicit sync.

use burn::tensor::{Distribution, Tensor};
use criterion::Criterion;
use models_dit::{Context, DitModel};
use parallel_core::attention::{sdpa, sdpa_with_lse};
use parallel_core::{AttentionSite, LoadPlan, Serial};
use std::time::Duration;

type B = harness::CpuBackend;

const BATCH: usize = 2;
const HEADS: usize = 16;
const HEAD_DIM: usize = 72;
const TOKENS: usize = 1024;
const TEXT: usize = 120;

fn one_thread() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a 1-thread pool")
}

fn randn<const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
}

fn attention(c: &mut Criterion) {
    let pool = one_thread();
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    let q = randn([BATCH, HEADS, TOKENS, HEAD_DIM]);
    let (k, v) = (randn([BATCH, HEADS, TOKENS, HEAD_DIM]), randn([BATCH, HEADS, TOKENS, HEAD_DIM]));
    g.bench_function("attention/1024tok", |b| {
        pool.install(|| b.iter(|| sdpa(q.clone(), k.clone(), v.clone(), None).into_data()))
    });
    g.bench_function("attention_lse/1024tok", |b| {
        pool.install(|| b.iter(|| sdpa_with_lse(q.clone(), k.clone(), v.clone()).0.into_data()))
    });
    let h = HEADS / 2;
    let (qh, kh, vh) =
        (q.clone().narrow(1, 0, h), k.clone().narrow(1, 0, h), v.clone().narrow(1, 0, h));
    g.bench_function("attention/512tok", |b| {
        // Ulysses on 2 ranks: every token, half the heads (the same work as 512 tokens'
        // worth of queries against all keys).
        pool.install(|| b.iter(|| sdpa(qh.clone(), kh.clone(), vh.clone(), None).into_data()))
    });
    let half = TOKENS / 2;
    let (qr, kr, vr) =
        (q.clone().narrow(2, 0, half), k.clone().narrow(2, 0, half), v.clone().narrow(2, 0, half));
    g.bench_function("attention_lse/512q_512kv", |b| {
        // One round of Ring attention on 2 ranks (each rank runs two per layer).
        pool.install(|| b.iter(|| sdpa_with_lse(qr.clone(), kr.clone(), vr.clone()).0.into_data()))
    });
    let a = randn([BATCH * TOKENS, HEADS * HEAD_DIM]);
    let w = randn([HEADS * HEAD_DIM, 4 * HEADS * HEAD_DIM]);
    g.bench_function("matmul/2048x1152x4608", |b| {
        pool.install(|| b.iter(|| a.clone().matmul(w.clone()).into_data()))
    });
    let x = randn([BATCH, TOKENS, HEADS * HEAD_DIM]);
    g.bench_function("layer_norm/1024tok", |b| {
        pool.install(|| {
            b.iter(|| kernels::layer_norm_modulate(x.clone(), 1e-6, None, None).into_data())
        })
    });
    let h = randn([BATCH, TOKENS, 4 * HEADS * HEAD_DIM]);
    g.bench_function("gelu_tanh/1024x4608", |b| {
        pool.install(|| b.iter(|| kernels::gelu(h.clone(), true).into_data()))
    });
    g.finish();
}

fn dit_block(c: &mut Criterion) {
    let pool = one_thread();
    let device = Default::default();
    let plan = LoadPlan { blocks: Some(0..1), ..LoadPlan::full() };
    let model = DitModel::<B>::preset("PixArt-XL-2-512x512", &plan, &device).expect("preset");
    let DitModel::PixArt(m) = &model else { unreachable!("PixArt preset") };
    let block = &m.transformer_blocks[0];
    let hidden = HEADS * HEAD_DIM;
    let x = randn([BATCH, TOKENS, hidden]);
    let modulation = randn([BATCH, 6, hidden]).mul_scalar(0.1);
    let ctx = Context { states: randn([BATCH, TEXT, hidden]), bias: None };
    let site = AttentionSite { layer: 0, tokens: 0..TOKENS, total_tokens: TOKENS };
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(8));
    g.bench_function("dit_block/1024tok", |b| {
        pool.install(|| {
            b.iter(|| {
                block
                    .forward(x.clone(), &modulation, Some(&ctx), &site, &mut Serial)
                    .expect("block")
                    .into_data()
            })
        })
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    attention(&mut c);
    dit_block(&mut c);
    c.final_summary();
}

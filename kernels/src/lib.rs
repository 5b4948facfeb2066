//! CPU kernels where Burn's Flex backend is slow, behind generic functions.
//!
//! Every function here takes tensors of any `B: Backend`. When `B` is Flex (Burn's CPU
//! backend) and the tensors are float32, it runs the project's own kernel on the Flex storage;
//! for every other backend (CUDA, or Flex wrapped by fusion/autodiff) and dtype it calls
//! Burn's own ops, so a model written against these functions stays generic. See
//! [`flex`](crate#the-backend-extension) below for how the Flex backend is recognised.
//!
//! | function | Flex/f32 kernel |
//! |---|---|
//! | [`attention`], [`attention_with_lse`], [`merge_partial`] | tiled online-softmax attention (memory linear in tokens), threads over batch × query tiles, heads read and written in place |
//! | [`linear`] | one GEMM over all rows with the bias accumulated onto (no second pass) |
//! | [`conv2d`] | one GEMM per kernel row over shifted copies of the input rows (no im2col), threads over output channels, images or row bands |
//! | [`gelu`], [`silu`] | vectorised, on the rank's threads, in place when the input is not shared |
//! | [`group_norm_stats`], [`group_norm_apply`] | GroupNorm's per-group mean and `M2` (two passes, float64 block totals) and its normalisation (one pass, in place when it can) |
//! | [`group_norm_normalize`], [`group_norm`] | the normalisation from a mean and variance (after a merge over ranks), and a whole GroupNorm |
//! | [`layer_norm_modulate`] | LayerNorm fused with adaLN's `·(1 + scale) + shift` |
//! | [`gated_residual`] | `residual + gate·y` in one pass |
//! | [`contiguous`] | strided views copied run by run, batched transposes in tiles (Flex copies ND views element by element) |
//! | [`tune_allocator`] | (not a kernel) glibc's allocator set for tensor-sized blocks, for a binary's `main` |
//!
//! # The backend extension
//! Each call asks whether `B::FloatTensorPrimitive` is `FlexTensor` (a `TypeId` comparison)
//! instead of requiring a `B: Kernels` bound on every model and strategy of the workspace
//! (Rust has no specialisation). The cost is one comparison per call.
//!
//! # Threads and SIMD
//! Parallel loops run on the current Rayon pool, which is the calling rank's own pool when
//! ranks are launched by `parallel-core` (ranks never share or oversubscribe cores). Vector
//! code is compiled for AVX-512, AVX2+FMA and scalar x86 (NEON on aarch64) and
//! chosen at run time by CPU detection; no `-C target-cpu` flag is needed.
//!
//! # Accuracy
//! Float32 throughout. Against Burn's ops on random inputs (tests/against_burn.rs): the
//! activations within 1e-6 relative of their f64 definitions, attention and LayerNorm within
//! float32 summation-order noise (named per test).

mod alloc;
mod attention;
mod conv;
mod elementwise;
mod flex;
mod gemm;
mod layout;
mod linear;
mod math;
mod norm;
mod probe;

pub use alloc::{MMAP_THRESHOLD, TRIM_THRESHOLD, tune_allocator};
pub use attention::{attention, attention_with_lse, merge_partial};
pub use conv::{ConvPadding, conv_weight, conv2d, pad_rows};
pub use elementwise::{gated_residual, geglu, gelu, silu};
pub use layout::{contiguous, contiguous_primitive};
pub use linear::linear;
pub use norm::{
    group_norm, group_norm_apply, group_norm_normalize, group_norm_stats, layer_norm_modulate,
};
pub use probe::fma_throughput;

/// The instruction set the vector kernels run with on this CPU (`"avx512"`, `"avx2+fma"`,
/// `"neon"` or `"scalar"`), for benchmark reports.
pub fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        match pulp::Arch::new() {
            pulp::Arch::V4(_) => "avx512",
            pulp::Arch::V3(_) => "avx2+fma",
            _ => "scalar",
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        "neon"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

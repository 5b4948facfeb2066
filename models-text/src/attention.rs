//! `T5Attention` (self-attention of the encoder) and T5's relative-position buckets.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Int, Tensor, TensorData};

/// transformers' `T5Attention._relative_position_bucket`, for one relative position
/// (`memory_position − query_position`).
///
/// Half of the buckets are for keys after the query (positive positions), half for keys at
/// or before it when `bidirectional`. Within a half, the first quarter of all buckets are
/// exact distances; the rest grow logarithmically up to `max_distance`, after which every
/// distance shares the last bucket.
///
/// The logarithmic part is computed in `f32`, in transformers' order of operations
/// (`log(n / max_exact) / log(max_distance / max_exact) · (num_buckets − max_exact)`, then
/// truncation), so that distances landing on a bucket boundary round the same way.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut num_buckets = num_buckets as i64;
    let mut bucket = 0i64;
    let n = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            bucket += num_buckets;
        }
        relative_position.abs()
    } else {
        (-relative_position).max(0)
    };
    let max_exact = num_buckets / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let log_ratio = (n as f32 / max_exact as f32).ln();
        // Python: `math.log(max_distance / max_exact)` is a double, used as an f32 scalar.
        let log_range = (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = max_exact + (log_ratio / log_range * (num_buckets - max_exact) as f32) as i64;
        bucket += large.min(num_buckets - 1);
    }
    bucket as usize
}

/// The bucket of every (query, key) pair of a sequence of `query_length` queries and
/// `key_length` keys, row-major `[query_length, key_length]`.
pub fn relative_position_buckets(
    query_length: usize,
    key_length: usize,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> Vec<i64> {
    let mut out = Vec::with_capacity(query_length * key_length);
    for q in 0..query_length as i64 {
        for k in 0..key_length as i64 {
            out.push(
                relative_position_bucket(k - q, bidirectional, num_buckets, max_distance) as i64
            );
        }
    }
    out
}

/// The most negative finite value of a float dtype: what transformers' SDPA path puts at
/// masked keys (`torch.finfo(dtype).min`).
pub(crate) fn dtype_min(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MIN,
        DType::F16 => -65504.0,
        DType::BF16 => -3.389_531_389_251_535_5e38,
        _ => f32::MIN as f64,
    }
}

/// Configuration of a [`T5Attention`].
#[derive(Config, Debug)]
pub struct T5AttentionConfig {
    /// Width of the hidden states.
    pub d_model: usize,
    /// Width of one head.
    pub d_kv: usize,
    /// Number of heads.
    pub num_heads: usize,
    /// Whether this layer owns the relative-position bias table (block 0 only).
    #[config(default = false)]
    pub has_relative_attention_bias: bool,
    /// Number of relative-position buckets.
    #[config(default = 32)]
    pub relative_attention_num_buckets: usize,
    /// Distance from which relative positions share the last bucket.
    #[config(default = 128)]
    pub relative_attention_max_distance: usize,
}

impl T5AttentionConfig {
    /// Randomly initialised attention (Burn's default initialisers; for tests).
    pub fn init<B: Backend>(&self, device: &B::Device) -> T5Attention<B> {
        let inner = self.num_heads * self.d_kv;
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        T5Attention {
            q: lin(self.d_model, inner),
            k: lin(self.d_model, inner),
            v: lin(self.d_model, inner),
            o: lin(inner, self.d_model),
            relative_attention_bias: self.has_relative_attention_bias.then(|| {
                EmbeddingConfig::new(self.relative_attention_num_buckets, self.num_heads)
                    .init(device)
            }),
            n_heads: self.num_heads,
            key_value_proj_dim: self.d_kv,
            relative_attention_num_buckets: self.relative_attention_num_buckets,
            relative_attention_max_distance: self.relative_attention_max_distance,
        }
    }
}

/// T5 self-attention (transformers' `T5Attention`, encoder use): multi-head attention with
/// **no** `1/√d_kv` scaling, a learned relative-position bias added to the scores, and no
/// biases in the projections.
#[derive(Module, Debug)]
pub struct T5Attention<B: Backend> {
    /// Query projection `d_model → num_heads·d_kv`.
    pub q: Linear<B>,
    /// Key projection.
    pub k: Linear<B>,
    /// Value projection.
    pub v: Linear<B>,
    /// Output projection `num_heads·d_kv → d_model`.
    pub o: Linear<B>,
    /// `[num_buckets, num_heads]` bias table; present in block 0 only, whose bias all blocks
    /// share.
    pub relative_attention_bias: Option<Embedding<B>>,
    /// Number of heads.
    pub n_heads: usize,
    /// Width of one head (`d_kv`).
    pub key_value_proj_dim: usize,
    /// Number of relative-position buckets.
    pub relative_attention_num_buckets: usize,
    /// Distance from which relative positions share the last bucket.
    pub relative_attention_max_distance: usize,
}

impl<B: Backend> T5Attention<B> {
    /// The relative-position bias (transformers' `compute_bias`), bidirectional.
    ///
    /// Returns `None` for a layer without the bias table (every block but the first).
    ///
    /// # Shapes
    /// - output: `[1, num_heads, query_length, key_length]`
    pub fn compute_bias(
        &self,
        query_length: usize,
        key_length: usize,
        device: &B::Device,
    ) -> Option<Tensor<B, 4>> {
        let table = self.relative_attention_bias.as_ref()?;
        let buckets = relative_position_buckets(
            query_length,
            key_length,
            true,
            self.relative_attention_num_buckets,
            self.relative_attention_max_distance,
        );
        let buckets = Tensor::<B, 2, Int>::from_data(
            TensorData::new(buckets, [query_length, key_length]),
            device,
        );
        // [q, k, heads] -> [1, heads, q, k]
        let values = table.forward(buckets);
        Some(values.permute([2, 0, 1]).unsqueeze_dim::<4>(0))
    }

    /// Attention of every position over every key, with an additive bias.
    ///
    /// `position_bias` is the relative-position bias with the padding mask already folded
    /// in (see [`T5Stack::forward`](crate::T5Stack::forward)): transformers' SDPA path puts
    /// `torch.finfo(dtype).min` at masked keys instead of the bias.
    ///
    /// # Shapes
    /// - `hidden_states`: `[batch, seq, d_model]`
    /// - `position_bias`: `[batch or 1, num_heads, seq, seq]`
    /// - output: `[batch, seq, d_model]`
    pub fn forward(
        &self,
        hidden_states: Tensor<B, 3>,
        position_bias: Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = hidden_states.dims();
        let (h, d) = (self.n_heads, self.key_value_proj_dim);
        let split = |x: Tensor<B, 3>| x.reshape([batch, seq, h, d]).swap_dims(1, 2);
        let query = split(self.q.forward(hidden_states.clone()));
        let key = split(self.k.forward(hidden_states.clone()));
        let value = split(self.v.forward(hidden_states));
        // No 1/sqrt(d) scaling in T5.
        let scores = query.matmul(key.swap_dims(2, 3)) + position_bias;
        let weights = softmax(scores, 3);
        let out = weights.matmul(value).swap_dims(1, 2).reshape([batch, seq, h * d]);
        self.o.forward(out)
    }
}

/// Folds a key padding mask into a relative-position bias the way transformers' SDPA path
/// does (`create_position_bias_mask`: `where(mask, bias, finfo.min)`).
///
/// # Shapes
/// - `position_bias`: `[1, heads, q, k]`
/// - `key_mask`: `[batch, k]`, `true` for a real token
/// - output: `[batch, heads, q, k]`
pub fn mask_position_bias<B: Backend>(
    position_bias: Tensor<B, 4>,
    key_mask: Tensor<B, 2, Bool>,
) -> Tensor<B, 4> {
    let [_, heads, q, k] = position_bias.dims();
    let [batch, _] = key_mask.dims();
    let min = dtype_min(position_bias.dtype());
    let padded = key_mask.bool_not().reshape([batch, 1, 1, k]).expand([batch, heads, q, k]);
    position_bias.expand([batch, heads, q, k]).mask_fill(padded, min)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where each bucket starts, walking away from the query, as transformers 5.24's
    /// `T5Attention._relative_position_bucket` gives it (bidirectional) over relative
    /// positions −1000..=1000: `(distance, bucket)` for keys after the query, then before.
    /// `(distance, bucket)` where a new bucket starts.
    type Starts = &'static [(i64, usize)];

    #[rustfmt::skip]
    const REFERENCE: [(usize, usize, Starts, Starts); 3] = [
        (
            32,
            128,
            &[(0, 0), (1, 17), (2, 18), (3, 19), (4, 20), (5, 21), (6, 22), (7, 23), (8, 24),
              (12, 25), (16, 26), (23, 27), (32, 28), (46, 29), (64, 30), (91, 31)],
            &[(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7), (8, 8), (12, 9),
              (16, 10), (23, 11), (32, 12), (46, 13), (64, 14), (91, 15)],
        ),
        (
            16,
            40,
            &[(0, 0), (1, 9), (2, 10), (3, 11), (4, 12), (8, 13), (13, 14), (23, 15)],
            &[(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (8, 5), (13, 6), (23, 7)],
        ),
        (
            64,
            256,
            &[(0, 0), (1, 33), (2, 34), (3, 35), (4, 36), (5, 37), (6, 38), (7, 39), (8, 40),
              (9, 41), (10, 42), (11, 43), (12, 44), (13, 45), (14, 46), (15, 47), (16, 48),
              (20, 49), (23, 50), (27, 51), (32, 52), (39, 53), (46, 54), (54, 55), (64, 56),
              (77, 57), (91, 58), (108, 59), (128, 60), (153, 61), (182, 62), (216, 63)],
            &[(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7), (8, 8), (9, 9),
              (10, 10), (11, 11), (12, 12), (13, 13), (14, 14), (15, 15), (16, 16), (20, 17),
              (23, 18), (27, 19), (32, 20), (39, 21), (46, 22), (54, 23), (64, 24), (77, 25),
              (91, 26), (108, 27), (128, 28), (153, 29), (182, 30), (216, 31)],
        ),
    ];

    fn starts(num_buckets: usize, max_distance: usize, sign: i64) -> Vec<(i64, usize)> {
        let mut out: Vec<(i64, usize)> = Vec::new();
        for n in 0..=1000i64 {
            let b = relative_position_bucket(sign * n, true, num_buckets, max_distance);
            if out.last().is_none_or(|&(_, prev)| prev != b) {
                out.push((n, b));
            }
        }
        out
    }

    #[test]
    fn buckets_equal_transformers() {
        for (nb, md, after, before) in REFERENCE {
            assert_eq!(starts(nb, md, 1), after, "{nb} buckets, max distance {md}, keys after");
            assert_eq!(starts(nb, md, -1), before, "{nb} buckets, max distance {md}, before");
        }
    }

    #[test]
    fn unidirectional_buckets_ignore_keys_after() {
        assert_eq!(relative_position_bucket(5, false, 32, 128), 0);
        assert_eq!(relative_position_bucket(-5, false, 32, 128), 5);
        assert_eq!(relative_position_bucket(-1000, false, 32, 128), 31);
    }
}

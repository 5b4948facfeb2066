//! `T5LayerSelfAttention` and `T5Block`: one encoder block.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use crate::attention::{T5Attention, T5AttentionConfig};
use crate::config::T5EncoderConfig;
use crate::feed_forward::{T5LayerFF, T5LayerFFConfig};
use crate::layer_norm::{T5LayerNorm, T5LayerNormConfig};

/// `x + SelfAttention(layer_norm(x))`: the first sub-layer of a T5 block (`layer.0`).
#[derive(Module, Debug)]
pub struct T5LayerSelfAttention<B: Backend> {
    /// transformers' `SelfAttention`.
    pub self_attention: T5Attention<B>,
    /// The pre-norm.
    pub layer_norm: T5LayerNorm<B>,
}

impl<B: Backend> T5LayerSelfAttention<B> {
    /// # Shapes
    /// - `hidden_states`: `[batch, seq, d_model]`
    /// - `position_bias`: `[batch or 1, num_heads, seq, seq]`, the mask folded in
    /// - output: `[batch, seq, d_model]`
    pub fn forward(
        &self,
        hidden_states: Tensor<B, 3>,
        position_bias: Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let normed = self.layer_norm.forward(hidden_states.clone());
        hidden_states + self.self_attention.forward(normed, position_bias)
    }
}

/// Configuration of a [`T5Block`].
#[derive(Config, Debug)]
pub struct T5BlockConfig {
    /// The encoder's architecture.
    pub encoder: T5EncoderConfig,
    /// Whether this block owns the relative-position bias table (block 0).
    #[config(default = false)]
    pub has_relative_attention_bias: bool,
}

impl T5BlockConfig {
    /// Randomly initialised block (Burn's default initialisers; for tests).
    pub fn init<B: Backend>(&self, device: &B::Device) -> T5Block<B> {
        let c = &self.encoder;
        T5Block {
            layer_self_attention: T5LayerSelfAttention {
                self_attention: T5AttentionConfig::new(c.d_model, c.d_kv, c.num_heads)
                    .with_has_relative_attention_bias(self.has_relative_attention_bias)
                    .with_relative_attention_num_buckets(c.relative_attention_num_buckets)
                    .with_relative_attention_max_distance(c.relative_attention_max_distance)
                    .init(device),
                layer_norm: T5LayerNormConfig::new(c.d_model)
                    .with_eps(c.layer_norm_epsilon)
                    .init(device),
            },
            layer_ff: T5LayerFFConfig::new(c.d_model, c.d_ff, c.feed_forward)
                .with_layer_norm_epsilon(c.layer_norm_epsilon)
                .init(device),
        }
    }
}

/// One encoder block (transformers' `T5Block` with `is_decoder = False`): self-attention then
/// feed-forward, each pre-normed and residual. transformers keeps the two in a list
/// `layer`; here they are named fields, loaded from `layer.0` and `layer.1`.
#[derive(Module, Debug)]
pub struct T5Block<B: Backend> {
    /// `layer.0`.
    pub layer_self_attention: T5LayerSelfAttention<B>,
    /// `layer.1`.
    pub layer_ff: T5LayerFF<B>,
}

impl<B: Backend> T5Block<B> {
    /// # Shapes
    /// - `hidden_states`: `[batch, seq, d_model]`
    /// - `position_bias`: `[batch or 1, num_heads, seq, seq]`, the mask folded in
    /// - output: `[batch, seq, d_model]`
    pub fn forward(
        &self,
        hidden_states: Tensor<B, 3>,
        position_bias: Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let hidden_states = self.layer_self_attention.forward(hidden_states, position_bias);
        let hidden_states = clamp_f16(hidden_states);
        clamp_f16(self.layer_ff.forward(hidden_states))
    }
}

/// transformers' float16 guard after each sub-layer of a block: clamp to ±`finfo(f16).max`,
/// or to ±(`max` − 1000) when the tensor holds an infinity. Other dtypes pass unchanged.
///
/// # Shapes
/// - `x`: any; output: same
pub fn clamp_f16<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if x.dtype() != DType::F16 {
        return x;
    }
    const F16_MAX: f64 = 65504.0;
    let device = x.device();
    let any_inf = x.clone().is_inf().any();
    let bound = Tensor::<B, 1>::full([1], F16_MAX, &device)
        .mask_fill(any_inf, F16_MAX - 1000.0)
        .cast(DType::F16)
        .reshape([1; D])
        .expand(x.shape());
    x.max_pair(bound.clone().neg()).min_pair(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_flex::Flex;

    #[test]
    fn f16_infinities_are_clamped_like_transformers() {
        let device = Default::default();
        let x =
            Tensor::<Flex, 1>::from_data([1.0f32, f32::INFINITY, -3.0], &device).cast(DType::F16);
        let y = clamp_f16(x).cast(DType::F32).into_data().to_vec::<f32>().unwrap();
        // torch: (x.half()).clamp(-(65504 - 1000), 65504 - 1000); 64504 rounds to 64512.
        assert_eq!(y, vec![1.0, 64512.0, -3.0]);
        let x = Tensor::<Flex, 1>::from_data([1.0f32, 7.0e4], &device);
        let y = clamp_f16(x).into_data().to_vec::<f32>().unwrap();
        assert_eq!(y, vec![1.0, 7.0e4], "f32 passes unchanged");
    }
}

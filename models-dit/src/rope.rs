//! Rotary position embedding over several position axes (diffusers `FluxPosEmbed` with
//! `get_1d_rotary_pos_embed(use_real=True, repeat_interleave_real=True)` and
//! `apply_rotary_emb`): each token has one position per axis; axis `i` rotates `axes[i]`
//! channels of every head, in consecutive pairs `(2j, 2j+1)` by the angle `pos_i · ω_j`,
//! `ω_j = 1 / θ^(2j / axes[i])`.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

/// The cosines and sines of one set of tokens' rotations.
#[derive(Debug, Clone)]
pub struct Rope<B: Backend> {
    /// `[1, 1, tokens, head_dim / 2]`, float32.
    cos: Tensor<B, 4>,
    /// Same shape.
    sin: Tensor<B, 4>,
}

impl<B: Backend> Rope<B> {
    /// The rotations of tokens at `positions` (one `[f64; 3]`-like row per token, one value
    /// per axis). Frequencies, angles, cosines and sines in float64 as diffusers computes
    /// them (`freqs_dtype = float64`), then rounded to float32.
    pub fn new(theta: f64, axes: &[usize], positions: &[Vec<f64>], device: &B::Device) -> Self {
        let half: usize = axes.iter().sum::<usize>() / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for pos in positions {
            for (axis, &dim) in axes.iter().enumerate() {
                for j in 0..dim / 2 {
                    let freq = 1.0 / theta.powf((2 * j) as f64 / dim as f64);
                    let angle = pos[axis] * freq;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let n = positions.len();
        let t = |v: Vec<f32>| {
            Tensor::<B, 2>::from_data(TensorData::new(v, [n, half]), (device, DType::F32))
                .reshape([1, 1, n, half])
        };
        Rope { cos: t(cos), sin: t(sin) }
    }

    /// The rotations of tokens `range` of these.
    pub fn tokens(&self, range: std::ops::Range<usize>) -> Self {
        let narrow = |t: &Tensor<B, 4>| t.clone().narrow(2, range.start, range.len());
        Rope { cos: narrow(&self.cos), sin: narrow(&self.sin) }
    }

    /// `x` rotated: per pair `(a, b)`, `(a·cos − b·sin, b·cos + a·sin)`, in float32, cast back.
    ///
    /// # Shapes
    /// `[batch, heads, tokens, head_dim]` in and out.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, n, d] = x.dims();
        let dtype = x.dtype();
        let pairs = x.cast(DType::F32).reshape([b, h, n, d / 2, 2]);
        let re = pairs.clone().narrow(4, 0, 1).squeeze_dim::<4>(4);
        let im = pairs.narrow(4, 1, 1).squeeze_dim::<4>(4);
        let (cos, sin) = (self.cos.clone(), self.sin.clone());
        let out_re = re.clone() * cos.clone() - im.clone() * sin.clone();
        let out_im = im * cos + re * sin;
        Tensor::stack::<5>(vec![out_re, out_im], 4).reshape([b, h, n, d]).cast(dtype)
    }
}

/// The rotations of an MMDiT block's image tokens and text tokens.
#[derive(Debug, Clone)]
pub struct JointRope<B: Backend> {
    /// This rank's image tokens.
    pub image: Rope<B>,
    /// The text tokens.
    pub text: Rope<B>,
}

//! Embeddings (diffusers `embeddings.py`): patch embedding with the 2-D sin-cos position
//! embedding, sinusoidal timestep projection, timestep/class/size embedders, caption
//! projection.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use parallel_core::TokenGrid;

/// Sinusoidal projection of timesteps (diffusers `get_timestep_embedding` with
/// `flip_sin_to_cos=True`): `[cos(t·f), sin(t·f)]` with `f_i = exp(−ln(10000)·i/(half − shift))`.
///
/// Computed in float32 whatever the compute dtype, as diffusers does (timesteps are cast to
/// float32 first; the frequencies are computed on the host with the same float32 operations
/// as torch), then cast to `dtype`.
///
/// Our `exp` is correctly rounded; torch's vectorized CPU `exp` (SLEEF, 1-ulp) differs in the
/// last bit for 1–2 of the 128 frequencies. At `t ≈ 1000` that moves single channels of the
/// projection by up to 3e-5, and it is the largest part of the ~1e-6 relative difference to
/// diffusers' outputs (with torch's frequencies substituted it drops to ~4e-7). It is not
/// emulated: it depends on torch's CPU kernel, and CUDA torch rounds differently again.
///
/// # Shapes
/// - `timesteps`: `[n]`
/// - output: `[n, channels]`
pub fn timestep_embedding<B: Backend>(
    timesteps: Tensor<B, 1>,
    channels: usize,
    shift: f32,
    dtype: DType,
) -> Tensor<B, 2> {
    let half = channels / 2;
    let device = timesteps.device();
    let scale = -(10000f64.ln() as f32);
    let freqs: Vec<f32> =
        (0..half).map(|i| (scale * i as f32 / (half as f32 - shift)).exp()).collect();
    let freqs = Tensor::<B, 1>::from_data(TensorData::new(freqs, [half]), (&device, DType::F32));
    let args = timesteps.cast(DType::F32).unsqueeze_dim::<2>(1) * freqs.unsqueeze::<2>();
    Tensor::cat(vec![args.clone().cos(), args.sin()], 1).cast(dtype)
}

/// The 1-D sin-cos embedding of positions (diffusers `get_1d_sincos_pos_embed_from_grid`):
/// `[sin(p·ω), cos(p·ω)]`, `ω_k = 1/10000^(k/(dim/2))`, in float64, as `f32` row-major
/// `[positions, dim]`.
fn sincos_1d(dim: usize, positions: &[f32]) -> Vec<f32> {
    let quarter = dim / 2;
    let omega: Vec<f64> =
        (0..quarter).map(|k| 1.0 / 10000f64.powf(k as f64 / (dim as f64 / 2.0))).collect();
    let mut out = Vec::with_capacity(positions.len() * dim);
    for &p in positions {
        let p = p as f64;
        out.extend(omega.iter().map(|w| (p * w).sin() as f32));
        out.extend(omega.iter().map(|w| (p * w).cos() as f32));
    }
    out
}

/// Grid coordinates as diffusers computes them, in float32:
/// `arange(n) / (n / base_size) / interpolation_scale` for indices `range`.
fn grid_coords(
    n: usize,
    base_size: usize,
    interpolation_scale: f64,
    range: std::ops::Range<usize>,
) -> Vec<f32> {
    let step = (n as f64 / base_size as f64) as f32;
    let interp = interpolation_scale as f32;
    range.map(|i| i as f32 / step / interp).collect()
}

/// The 2-D sin-cos position embedding of token rows `rows` of a token grid (diffusers `get_2d_sincos_pos_embed`): the first `hidden/2` channels encode the
/// column (x) coordinate, the second half the row (y); frequencies and sin/cos in float64,
/// cast to float32.
///
/// # Shapes
/// output: `[1, rows.len() · grid_cols, hidden]`
pub fn pos_embed_rows<B: Backend>(
    hidden: usize,
    grid: TokenGrid,
    rows: std::ops::Range<usize>,
    base_size: usize,
    interpolation_scale: f64,
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, 3> {
    let (half, grid_rows, grid_cols) = (hidden / 2, grid.rows, grid.cols);
    let n_rows = rows.len();
    let xs = grid_coords(grid_cols, base_size, interpolation_scale, 0..grid_cols);
    let ys = grid_coords(grid_rows, base_size, interpolation_scale, rows);
    let emb_x = Tensor::<B, 2>::from_data(
        TensorData::new(sincos_1d(half, &xs), [grid_cols, half]),
        (device, DType::F32),
    );
    let emb_y = Tensor::<B, 2>::from_data(
        TensorData::new(sincos_1d(half, &ys), [n_rows, half]),
        (device, DType::F32),
    );
    let emb_x = emb_x.unsqueeze_dim::<3>(0).expand([n_rows, grid_cols, half]);
    let emb_y = emb_y.unsqueeze_dim::<3>(1).expand([n_rows, grid_cols, half]);
    Tensor::cat(vec![emb_x, emb_y], 2).reshape([1, n_rows * grid_cols, hidden]).cast(dtype)
}

/// 2-D image to patch embedding (diffusers `PatchEmbed`, key `pos_embed`): a `p × p`
/// stride-`p` convolution, flattened to tokens, plus the sin-cos position embedding of the
/// actual token grid (not stored in the weights).
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    /// `pos_embed.proj`: `[hidden, in_channels, p, p]` convolution.
    pub proj: Conv2d<B>,
    /// Position-embedding base grid, `sample_size / patch_size`.
    #[module(skip)]
    pub base_size: usize,
    /// Position-embedding interpolation scale.
    #[module(skip)]
    pub interpolation_scale: f64,
}

impl<B: Backend> PatchEmbed<B> {
    /// Embeds a band of latent rows; `grid` is the full token grid and `token_rows` the
    /// band's token rows within it.
    ///
    /// # Shapes
    /// - `latent`: `[batch, in_channels, token_rows.len() · p, grid.cols · p]`
    /// - output: `[batch, token_rows.len() · grid.cols, hidden]`
    pub fn forward(
        &self,
        latent: Tensor<B, 4>,
        grid: TokenGrid,
        token_rows: std::ops::Range<usize>,
    ) -> Tensor<B, 3> {
        let x = self.proj.forward(latent);
        let [batch, hidden, rows, cols] = x.dims();
        let x = x.reshape([batch, hidden, rows * cols]).swap_dims(1, 2);
        let pos = pos_embed_rows::<B>(
            hidden,
            grid,
            token_rows,
            self.base_size,
            self.interpolation_scale,
            x.dtype(),
            &x.device(),
        );
        x + pos
    }
}

/// Two-layer MLP on a sinusoidal projection (diffusers `TimestepEmbedding`):
/// `linear_2(silu(linear_1(x)))`.
#[derive(Module, Debug)]
pub struct TimestepEmbedding<B: Backend> {
    /// `linear_1`: 256 → out.
    pub linear_1: Linear<B>,
    /// `linear_2`: out → out.
    pub linear_2: Linear<B>,
}

impl<B: Backend> TimestepEmbedding<B> {
    /// # Shapes
    /// `[n, in]` → `[n, out]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.linear_2.forward(kernels::silu(self.linear_1.forward(x)))
    }

    /// The dtype of the weights (the compute dtype).
    pub fn dtype(&self) -> DType {
        self.linear_1.weight.val().dtype()
    }
}

/// Timestep + class-label embedding of DiT (diffusers `CombinedTimestepLabelEmbeddings`):
/// `timestep_embedder(proj(t)) + class_embedder(labels)`, projection shift 1.
#[derive(Module, Debug)]
pub struct CombinedTimestepLabelEmbeddings<B: Backend> {
    /// `timestep_embedder`.
    pub timestep_embedder: TimestepEmbedding<B>,
    /// `class_embedder.embedding_table.weight`: `[num_classes + 1, hidden]`; the last row is
    /// the null class used for classifier-free guidance.
    pub class_embedder: Param<Tensor<B, 2>>,
}

impl<B: Backend> CombinedTimestepLabelEmbeddings<B> {
    /// # Shapes
    /// - `timestep`: `[batch]`, `labels`: `[batch]`
    /// - output: `[batch, hidden]`
    pub fn forward(&self, timestep: Tensor<B, 1>, labels: Tensor<B, 1, Int>) -> Tensor<B, 2> {
        let dtype = self.timestep_embedder.dtype();
        let t = self.timestep_embedder.forward(timestep_embedding(timestep, 256, 1.0, dtype));
        t + self.class_embedder.val().select(0, labels)
    }
}

/// Timestep (+ resolution and aspect-ratio) embedding of PixArt (diffusers
/// `PixArtAlphaCombinedTimestepSizeEmbeddings`), projection shift 0.
#[derive(Module, Debug)]
pub struct PixArtAlphaCombinedTimestepSizeEmbeddings<B: Backend> {
    /// `timestep_embedder`: 256 → hidden.
    pub timestep_embedder: TimestepEmbedding<B>,
    /// `resolution_embedder`: 256 → hidden/3 (with additional conditions).
    pub resolution_embedder: Option<TimestepEmbedding<B>>,
    /// `aspect_ratio_embedder`: 256 → hidden/3 (with additional conditions).
    pub aspect_ratio_embedder: Option<TimestepEmbedding<B>>,
}

impl<B: Backend> PixArtAlphaCombinedTimestepSizeEmbeddings<B> {
    /// `t_emb`, plus `cat([res_h, res_w, ar])` when the model uses additional conditions
    /// (`resolution` is flattened, so height and width are embedded separately).
    ///
    /// # Shapes
    /// - `timestep`: `[batch]`; `resolution`: `[batch, 2]` (`[h, w]`); `aspect_ratio`:
    ///   `[batch, 1]`
    /// - output: `[batch, hidden]`
    pub fn forward(
        &self,
        timestep: Tensor<B, 1>,
        size: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
    ) -> Tensor<B, 2> {
        let dtype = self.timestep_embedder.dtype();
        let t = self.timestep_embedder.forward(timestep_embedding(timestep, 256, 0.0, dtype));
        match (&self.resolution_embedder, &self.aspect_ratio_embedder, size) {
            (Some(res), Some(ar), Some((resolution, aspect_ratio))) => {
                let [batch, k] = resolution.dims();
                let r = res.forward(timestep_embedding(
                    resolution.reshape([batch * k]),
                    256,
                    0.0,
                    dtype,
                ));
                let r = r.reshape([batch as i32, -1]);
                let [batch_a, ka] = aspect_ratio.dims();
                let a = ar.forward(timestep_embedding(
                    aspect_ratio.reshape([batch_a * ka]),
                    256,
                    0.0,
                    dtype,
                ));
                let a = a.reshape([batch as i32, -1]);
                t + Tensor::cat(vec![r, a], 1)
            }
            _ => t,
        }
    }
}

/// Caption projection (diffusers `PixArtAlphaTextProjection`):
/// `linear_2(gelu_tanh(linear_1(x)))`, applied to every text token (padding included).
#[derive(Module, Debug)]
pub struct PixArtAlphaTextProjection<B: Backend> {
    /// `linear_1`: caption_channels → hidden.
    pub linear_1: Linear<B>,
    /// `linear_2`: hidden → hidden.
    pub linear_2: Linear<B>,
}

impl<B: Backend> PixArtAlphaTextProjection<B> {
    /// # Shapes
    /// `[batch, text_tokens, caption_channels]` → `[batch, text_tokens, hidden]`.
    pub fn forward(&self, caption: Tensor<B, 3>) -> Tensor<B, 3> {
        self.linear_2.forward(kernels::gelu(self.linear_1.forward(caption), true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sincos_matches_the_diffusers_formula() {
        // diffusers: get_2d_sincos_pos_embed(8, (2, 3), base_size=4, interpolation_scale=2)
        // rows: grid_h = arange(2)/(2/4)/2 = [0, 1]; cols: grid_w = arange(3)/(3/4)/2.
        let xs = grid_coords(3, 4, 2.0, 0..3);
        assert_eq!(xs, vec![0.0, (1.0f32 / 0.75) / 2.0, (2.0f32 / 0.75) / 2.0]);
        let e = sincos_1d(4, &[2.0]);
        let w1 = 1.0 / 10000f64.powf(0.5);
        let want = [2.0f64.sin(), (2.0 * w1).sin(), 2.0f64.cos(), (2.0 * w1).cos()];
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        assert_eq!(e, want);
    }
}

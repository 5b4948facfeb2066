//! LayerNorm without affine parameters, fused with the adaLN modulation that follows it in
//! DiT blocks: one pass per row instead of five tensors.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::flex::{self, all_to_flex, contiguous, from_flex, values};
use crate::math::{self, Kernel, simd};

/// Rows per parallel task (each `hidden` long).
const ROWS_PER_TASK: usize = 16;

/// `LayerNorm(x)·(1 + scale) + shift`, the LayerNorm over the last dim with no learned
/// affine (`(x − mean)/√(var + eps)`, biased variance). `scale`/`shift` `None` leave that
/// part out, so `layer_norm_modulate(x, eps, None, None)` is the plain LayerNorm.
///
/// Flex/f32: one task per [`ROWS_PER_TASK`] rows over the rank's threads; per row the mean,
/// then the variance of the centred values (as Burn's composition computes it), then the
/// modulated output, all on the row in cache. Other backends: Burn's ops.
///
/// # Shapes
/// - `x`: `[batch, tokens, hidden]`
/// - `scale`, `shift`: `[batch, 1, hidden]` or `[1, 1, hidden]`
/// - output: `[batch, tokens, hidden]`
pub fn layer_norm_modulate<B: Backend>(
    x: Tensor<B, 3>,
    eps: f64,
    scale: Option<Tensor<B, 3>>,
    shift: Option<Tensor<B, 3>>,
) -> Tensor<B, 3> {
    let [batch, tokens, hidden] = x.dims();
    let fits = |v: &Option<Tensor<B, 3>>| {
        v.as_ref().is_none_or(|v| {
            let [vb, vt, vh] = v.dims();
            (vb == batch || vb == 1) && vt == 1 && vh == hidden
        })
    };
    if !(fits(&scale) && fits(&shift)) {
        return reference(x, eps, scale, shift);
    }
    match all_to_flex([Some(x), scale, shift]) {
        Ok([Some(x), scale, shift]) => {
            from_flex(modulate_flex(x, eps as f32, scale, shift, [batch, tokens, hidden]))
        }
        Ok(_) => unreachable!("x was passed as Some"),
        Err([x, scale, shift]) => match x {
            Some(x) => reference(x, eps, scale, shift),
            None => unreachable!("x was passed as Some"),
        },
    }
}

/// Burn's composition of the same function (every backend but Flex/f32).
fn reference<B: Backend>(
    x: Tensor<B, 3>,
    eps: f64,
    scale: Option<Tensor<B, 3>>,
    shift: Option<Tensor<B, 3>>,
) -> Tensor<B, 3> {
    let mean = x.clone().mean_dim(2);
    let centered = x - mean;
    let var = centered.clone().square().mean_dim(2);
    let norm = centered / var.add_scalar(eps).sqrt();
    let norm = match scale {
        Some(s) => norm * s.add_scalar(1.0),
        None => norm,
    };
    match shift {
        Some(s) => norm + s,
        None => norm,
    }
}

fn modulate_flex(
    x: FlexTensor,
    eps: f32,
    scale: Option<FlexTensor>,
    shift: Option<FlexTensor>,
    [batch, tokens, hidden]: [usize; 3],
) -> FlexTensor {
    let x = contiguous(x);
    let (scale, shift) = (scale.map(contiguous), shift.map(contiguous));
    let (xs, sc, sh) = (values(&x), scale.as_ref().map(values), shift.as_ref().map(values));
    let mut out = flex::zeros(vec![batch, tokens, hidden]);
    if hidden == 0 {
        return out;
    }
    out.storage_mut::<f32>().par_chunks_mut(ROWS_PER_TASK * hidden).enumerate().for_each(
        |(task, out)| {
            let first = task * ROWS_PER_TASK;
            let x = &xs[first * hidden..first * hidden + out.len()];
            simd(NormRows { out, x, scale: sc, shift: sh, eps, hidden, tokens, first });
        },
    );
    out
}

struct NormRows<'a> {
    out: &'a mut [f32],
    x: &'a [f32],
    scale: Option<&'a [f32]>,
    shift: Option<&'a [f32]>,
    eps: f32,
    hidden: usize,
    tokens: usize,
    first: usize,
}

impl<'a> Kernel for NormRows<'a> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let h = self.hidden;
        // The vector of batch row `b` (a `[1, 1, hidden]` vector serves every row).
        let pick = |v: &'a [f32], b: usize| -> &'a [f32] {
            let b = if v.len() == h { 0 } else { b };
            &v[b * h..(b + 1) * h]
        };
        for (i, (o, xr)) in self.out.chunks_exact_mut(h).zip(self.x.chunks_exact(h)).enumerate() {
            let b = (self.first + i) / self.tokens;
            let mean = math::sum(xr) / h as f32;
            let var = math::sum_sq_dev(xr, mean) / h as f32;
            let rstd = 1.0 / (var + self.eps).sqrt();
            match (self.scale, self.shift) {
                (Some(sc), Some(sh)) => {
                    let (sc, sh) = (pick(sc, b), pick(sh, b));
                    for (((o, &x), &s), &t) in o.iter_mut().zip(xr).zip(sc).zip(sh) {
                        *o = ((x - mean) * rstd).mul_add(1.0 + s, t);
                    }
                }
                (Some(sc), None) => {
                    for ((o, &x), &s) in o.iter_mut().zip(xr).zip(pick(sc, b)) {
                        *o = (x - mean) * rstd * (1.0 + s);
                    }
                }
                (None, Some(sh)) => {
                    for ((o, &x), &t) in o.iter_mut().zip(xr).zip(pick(sh, b)) {
                        *o = (x - mean) * rstd + t;
                    }
                }
                (None, None) => {
                    for (o, &x) in o.iter_mut().zip(xr) {
                        *o = (x - mean) * rstd;
                    }
                }
            }
        }
    }
}

/// Elements a group's sum covers in float32 before it is added to a float64 total (a VAE's
/// group at 1024² holds 16 M elements; float32 lanes over all of them would drift).
const SUM_BLOCK: usize = 1 << 14;

/// Per image and group of channels: the mean, and `M2`, the sum of squared deviations from
/// it — a GroupNorm's local statistics (before any merge over ranks).
///
/// Flex/f32: one task per (image, group), two passes (the mean, then the squared deviations
/// from it), float32 lanes over blocks of 16 Ki elements summed in float64. Other backends:
/// Burn's `mean_dim` and `sum_dim` of the same two passes.
///
/// # Shapes
/// `x`: `[batch, channels, rows, width]` with `channels` a multiple of `groups` → `mean`,
/// `m2`: `[batch, groups]`.
pub fn group_norm_stats<B: Backend>(
    x: Tensor<B, 4>,
    groups: usize,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let [batch, channels, rows, width] = x.dims();
    let count = (channels / groups.max(1)) * rows * width;
    let fits = groups > 0 && channels % groups == 0 && count > 0;
    match flex::to_flex(x) {
        Ok(t) if fits => {
            let t = contiguous(t);
            let stats: Vec<(f32, f32)> =
                values(&t).par_chunks(count).map(|group| simd(GroupStats { x: group })).collect();
            let mut mean = flex::zeros(vec![batch, groups]);
            let mut m2 = flex::zeros(vec![batch, groups]);
            for ((m, s), &(a, b)) in
                mean.storage_mut::<f32>().iter_mut().zip(m2.storage_mut::<f32>()).zip(&stats)
            {
                (*m, *s) = (a, b);
            }
            (from_flex(mean), from_flex(m2))
        }
        Ok(t) => group_stats_reference(from_flex(t), groups),
        Err(x) => group_stats_reference(x, groups),
    }
}

fn group_stats_reference<B: Backend>(
    x: Tensor<B, 4>,
    groups: usize,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let [batch, channels, rows, width] = x.dims();
    let xg = x.reshape([batch, groups, channels / groups * rows * width]);
    let mean = xg.clone().mean_dim(2);
    let centered = xg - mean.clone();
    let m2 = (centered.clone() * centered).sum_dim(2);
    (mean.reshape([batch, groups]), m2.reshape([batch, groups]))
}

struct GroupStats<'a> {
    x: &'a [f32],
}

impl Kernel for GroupStats<'_> {
    type Output = (f32, f32);
    #[inline(always)]
    fn run(self) -> (f32, f32) {
        // Plain loops, not closures: a closure is a function of its own, compiled without the
        // target features `simd` enabled (its `mul_add` became a call to libm's `fmaf`).
        let n = self.x.len() as f64;
        let mut sum = 0f64;
        for b in self.x.chunks(SUM_BLOCK) {
            sum += f64::from(math::sum(b));
        }
        let mean = (sum / n) as f32;
        let mut m2 = 0f64;
        for b in self.x.chunks(SUM_BLOCK) {
            m2 += f64::from(math::sum_sq_dev(b, mean));
        }
        (mean, m2 as f32)
    }
}

/// Planes per task of the normalisation (a plane: one channel of one image).
const NORM_TASK: usize = 1 << 14;

/// GroupNorm's normalisation with given statistics: `(x − mean)·rstd·γ + β` per channel,
/// `mean`/`rstd` those of the channel's group.
///
/// Flex/f32: one pass, in place when `x` owns its storage; `γ·rstd` and `β` per plane,
/// threads over planes. Other backends: Burn's broadcast ops.
///
/// # Shapes
/// - `x`: `[batch, channels, rows, width]`; `mean`, `rstd`: `[batch, groups]`
/// - `gamma`, `beta`: `[channels]` (both or neither)
pub fn group_norm_apply<B: Backend>(
    x: Tensor<B, 4>,
    mean: Tensor<B, 2>,
    rstd: Tensor<B, 2>,
    gamma: Option<Tensor<B, 1>>,
    beta: Option<Tensor<B, 1>>,
) -> Tensor<B, 4> {
    let [batch, channels, rows, width] = x.dims();
    let [mb, groups] = mean.dims();
    let affine = match (gamma, beta) {
        (Some(g), Some(b)) if g.dims() == [channels] && b.dims() == [channels] => Some((g, b)),
        (Some(g), Some(b)) => return apply_reference(x, mean, rstd, Some((g, b))),
        _ => None,
    };
    let fits = groups > 0 && channels % groups == 0 && mb == batch && rstd.dims() == [mb, groups];
    if !(fits && flex::is_flex::<B>() && x.dtype() == burn::tensor::DType::F32)
        || [mean.dtype(), rstd.dtype()].iter().any(|d| *d != burn::tensor::DType::F32)
        || affine.as_ref().is_some_and(|(g, b)| {
            g.dtype() != burn::tensor::DType::F32 || b.dtype() != burn::tensor::DType::F32
        })
    {
        return apply_reference(x, mean, rstd, affine);
    }
    let t = flex::checked_flex(x);
    let (mean, rstd) = (contiguous(flex::checked_flex(mean)), contiguous(flex::checked_flex(rstd)));
    let affine =
        affine.map(|(g, b)| (contiguous(flex::checked_flex(g)), contiguous(flex::checked_flex(b))));
    let plane = rows * width;
    let per_group = channels / groups;
    let (mean, rstd) = (values(&mean), values(&rstd));
    let affine = affine.as_ref().map(|(g, b)| (values(g), values(b)));
    // Scale and shift of plane i = (image, channel): y = (x − mean)·s + β.
    let coef = |i: usize| -> (f32, f32, f32) {
        let (image, c) = (i / channels, i % channels);
        let g = image * groups + c / per_group;
        match affine {
            Some((gamma, beta)) => (mean[g], rstd[g] * gamma[c], beta[c]),
            None => (mean[g], rstd[g], 0.0),
        }
    };
    let planes_per_task = (NORM_TASK / plane.max(1)).max(1);
    let chunk = planes_per_task * plane.max(1);
    from_flex(flex::update_chunks(t, chunk, |task, out, input| {
        let plane = plane.max(1);
        for (j, p) in out.chunks_mut(plane).enumerate() {
            let (m, s, b) = coef(task * planes_per_task + j);
            let input = input.map(|x| &x[j * plane..][..p.len()]);
            simd(Affine { out: p, input, mean: m, scale: s, shift: b });
        }
    }))
}

/// GroupNorm's normalisation from a group's `mean` and (biased) `variance`:
/// `rstd = 1/√(variance + eps)`, then [`group_norm_apply`]. What a GroupNorm whose statistics
/// were merged over ranks (`parallel_core::group_norm`) runs after the merge.
///
/// # Shapes
/// As [`group_norm_apply`], `variance` in place of `rstd`.
pub fn group_norm_normalize<B: Backend>(
    x: Tensor<B, 4>,
    mean: Tensor<B, 2>,
    variance: Tensor<B, 2>,
    eps: f64,
    gamma: Option<Tensor<B, 1>>,
    beta: Option<Tensor<B, 1>>,
) -> Tensor<B, 4> {
    let rstd = variance.add_scalar(eps).sqrt().recip();
    group_norm_apply(x, mean, rstd, gamma, beta)
}

/// A whole GroupNorm (`torch.nn.GroupNorm`, biased variance, eps inside the square root):
/// [`group_norm_stats`], then [`group_norm_normalize`] with `variance = M2 / count`.
///
/// # Shapes
/// `x`: `[batch, channels, rows, width]` in and out, `channels` a multiple of `groups`;
/// `gamma`, `beta`: `[channels]` (both or neither).
pub fn group_norm<B: Backend>(
    x: Tensor<B, 4>,
    groups: usize,
    eps: f64,
    gamma: Option<Tensor<B, 1>>,
    beta: Option<Tensor<B, 1>>,
) -> Tensor<B, 4> {
    let [_, channels, rows, width] = x.dims();
    let count = channels / groups.max(1) * rows * width;
    let (mean, m2) = group_norm_stats(x.clone(), groups);
    let variance = m2.div_scalar(count.max(1) as f64);
    group_norm_normalize(x, mean, variance, eps, gamma, beta)
}

fn apply_reference<B: Backend>(
    x: Tensor<B, 4>,
    mean: Tensor<B, 2>,
    rstd: Tensor<B, 2>,
    affine: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
) -> Tensor<B, 4> {
    let [batch, channels, rows, width] = x.dims();
    let [_, groups] = mean.dims();
    let xg = x.reshape([batch, groups, channels / groups * rows * width]);
    let y = ((xg - mean.reshape([batch, groups, 1])) * rstd.reshape([batch, groups, 1]))
        .reshape([batch, channels, rows, width]);
    match affine {
        Some((g, b)) => y * g.reshape([1, channels, 1, 1]) + b.reshape([1, channels, 1, 1]),
        None => y,
    }
}

/// `out = (x − mean)·scale + shift` over one plane (`input` `None`: `out` is `x`).
struct Affine<'a> {
    out: &'a mut [f32],
    input: Option<&'a [f32]>,
    mean: f32,
    scale: f32,
    shift: f32,
}

impl Kernel for Affine<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let (m, s, b) = (self.mean, self.scale, self.shift);
        match self.input {
            Some(x) => {
                for (o, &x) in self.out.iter_mut().zip(x) {
                    *o = (x - m).mul_add(s, b);
                }
            }
            None => {
                for o in self.out.iter_mut() {
                    *o = (*o - m).mul_add(s, b);
                }
            }
        }
    }
}

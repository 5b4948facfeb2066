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

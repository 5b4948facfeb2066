//! Elementwise kernels: activations and gated residual sums, vectorised and shared over the
//! rank's threads.

use burn::tensor::Tensor;
use burn::tensor::activation;
use burn::tensor::backend::Backend;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::flex::{self, contiguous, from_flex, to_flex, values};
use crate::math::{self, Kernel, simd};

/// Elements per task of a parallel elementwise loop (64 KiB of float32: large enough that
/// scheduling costs nothing, small enough to share a [b, tokens, 4·hidden] tensor evenly).
const CHUNK: usize = 16 * 1024;

/// `f` applied to every element, in place when `t` owns its storage, else into a new
/// tensor. Generic over `f` so it is inlined into the vectorised loop.
fn map<F: Fn(f32) -> f32 + Sync + Send + Copy>(t: FlexTensor, f: F) -> FlexTensor {
    flex::update_chunks(t, CHUNK, |_, out, input| match input {
        Some(input) => simd(Map { out, input, f }),
        None => simd(MapInPlace { data: out, f }),
    })
}

struct MapInPlace<'a, F> {
    data: &'a mut [f32],
    f: F,
}

impl<F: Fn(f32) -> f32> Kernel for MapInPlace<'_, F> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        for x in self.data.iter_mut() {
            *x = (self.f)(*x);
        }
    }
}

struct Map<'a, F> {
    out: &'a mut [f32],
    input: &'a [f32],
    f: F,
}

impl<F: Fn(f32) -> f32> Kernel for Map<'_, F> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        for (o, &x) in self.out.iter_mut().zip(self.input) {
            *o = (self.f)(x);
        }
    }
}

/// GELU: tanh-approximate (`gelu-approximate`, `approximate = true`) or exact (`gelu`).
///
/// Flex/f32: max relative error 1e-6 against the f64 definition (the tanh form is computed
/// as `x·σ(2u)`, erf by Abramowitz & Stegun 7.1.26). Other backends: Burn's op.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>, approximate: bool) -> Tensor<B, D> {
    match to_flex(x) {
        Ok(t) if approximate => from_flex(map(t, math::gelu_tanh)),
        Ok(t) => from_flex(map(t, math::gelu_erf)),
        Err(x) if approximate => activation::gelu_approximate(x),
        Err(x) => activation::gelu(x),
    }
}

/// SiLU, `x·σ(x)`. Flex/f32: vectorised; other backends: Burn's op.
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match to_flex(x) {
        Ok(t) => from_flex(map(t, math::silu)),
        Err(x) => activation::silu(x),
    }
}

/// GEGLU's activation, `value · gelu(gate)` with `[value, gate]` the two halves of the last
/// dim of `h` (diffusers' `GEGLU`: the projection's output split by `chunk(2, -1)`); `exact`
/// picks erf GELU (`true`, the U-Nets) or the tanh form.
///
/// Flex/f32: one pass over `h` that reads both halves where the projection wrote them and
/// writes the product — no strided copies of the halves, no GELU intermediate. Other
/// backends: Burn's ops.
///
/// # Shapes
/// `h`: `[batch, tokens, 2·inner]` → `[batch, tokens, inner]`.
pub fn geglu<B: Backend>(h: Tensor<B, 3>, exact: bool) -> Tensor<B, 3> {
    let [batch, tokens, width] = h.dims();
    let inner = width / 2;
    let burn_ops = |h: Tensor<B, 3>| {
        let value = h.clone().narrow(2, 0, inner);
        let gate = h.narrow(2, inner, inner);
        value * if exact { activation::gelu(gate) } else { activation::gelu_approximate(gate) }
    };
    if width % 2 != 0 || inner == 0 {
        return burn_ops(h);
    }
    match to_flex(h) {
        Ok(t) => {
            let t = contiguous(t);
            let input = values(&t);
            let mut out = flex::zeros(vec![batch, tokens, inner]);
            let rows_per_task = (CHUNK / width.max(1)).max(1);
            out.storage_mut::<f32>()
                .par_chunks_mut(rows_per_task * inner.max(1))
                .zip(input.par_chunks(rows_per_task * width.max(1)))
                .for_each(|(out, input)| simd(Geglu { out, input, inner, exact }));
            from_flex(out)
        }
        Err(h) => burn_ops(h),
    }
}

/// GEGLU over a task's rows: `out[r] = value[r] · gelu(gate[r])`.
struct Geglu<'a> {
    out: &'a mut [f32],
    input: &'a [f32],
    inner: usize,
    exact: bool,
}

impl Kernel for Geglu<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let n = self.inner;
        for (o, row) in self.out.chunks_exact_mut(n).zip(self.input.chunks_exact(2 * n)) {
            let (value, gate) = row.split_at(n);
            if self.exact {
                for ((o, &v), &g) in o.iter_mut().zip(value).zip(gate) {
                    *o = v * math::gelu_erf(g);
                }
            } else {
                for ((o, &v), &g) in o.iter_mut().zip(value).zip(gate) {
                    *o = v * math::gelu_tanh(g);
                }
            }
        }
    }
}

/// `residual + gate·y` (`gate` `None`: `residual + y`), the gated residual of adaLN blocks.
///
/// # Shapes
/// - `residual`, `y`: `[batch, tokens, hidden]`
/// - `gate`: `[batch, 1, hidden]` or `[1, 1, hidden]` (one vector per batch row)
/// - output: `[batch, tokens, hidden]`
pub fn gated_residual<B: Backend>(
    residual: Tensor<B, 3>,
    gate: Option<Tensor<B, 3>>,
    y: Tensor<B, 3>,
) -> Tensor<B, 3> {
    let [batch, tokens, hidden] = residual.dims();
    let fits = y.dims() == [batch, tokens, hidden]
        && gate.as_ref().is_none_or(|g| {
            let [gb, gt, gh] = g.dims();
            (gb == batch || gb == 1) && gt == 1 && gh == hidden
        });
    let fallback = |residual: Tensor<B, 3>, gate: Option<Tensor<B, 3>>, y: Tensor<B, 3>| match gate
    {
        Some(g) => g * y + residual,
        None => y + residual,
    };
    if !fits {
        return fallback(residual, gate, y);
    }
    match flex::all_to_flex([Some(residual), gate, Some(y)]) {
        Ok([Some(r), gate, Some(y)]) => {
            from_flex(gated_residual_flex(r, gate, y, batch, tokens, hidden))
        }
        Ok(_) => unreachable!("residual and y were passed as Some"),
        Err([Some(r), gate, Some(y)]) => fallback(r, gate, y),
        Err(_) => unreachable!("residual and y were passed as Some"),
    }
}

fn gated_residual_flex(
    r: FlexTensor,
    gate: Option<FlexTensor>,
    y: FlexTensor,
    batch: usize,
    tokens: usize,
    hidden: usize,
) -> FlexTensor {
    let gate = gate.map(contiguous);
    let gates = gate.as_ref().map(values);
    let y = contiguous(y);
    let yv = values(&y);
    // Updated in place when the residual stream is not shared (the usual case inside a
    // block: no fresh buffer, no page faults), else in a copy of it.
    let r = contiguous(r);
    let whole =
        r.layout().start_offset() == 0 && r.storage::<f32>().len() == batch * tokens * hidden;
    let mut acc = if whole && r.is_unique() {
        r
    } else {
        let mut copy = flex::zeros(vec![batch, tokens, hidden]);
        copy.storage_mut::<f32>().copy_from_slice(values(&r));
        copy
    };
    let rows_per_task = (CHUNK / hidden.max(1)).max(1);
    acc.storage_mut::<f32>().par_chunks_mut(rows_per_task * hidden).enumerate().for_each(
        |(task, acc)| {
            let first = task * rows_per_task;
            let y = &yv[first * hidden..first * hidden + acc.len()];
            simd(GatedAccumulate { acc, y, gates, hidden, tokens, first });
        },
    );
    acc
}

/// The gated residual over a task's rows, into the residual: `acc ← acc + gate·y`
/// (`gate` per batch row, or one for all).
struct GatedAccumulate<'a> {
    acc: &'a mut [f32],
    y: &'a [f32],
    gates: Option<&'a [f32]>,
    hidden: usize,
    tokens: usize,
    first: usize,
}

impl Kernel for GatedAccumulate<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let h = self.hidden;
        for (i, (a, y)) in self.acc.chunks_exact_mut(h).zip(self.y.chunks_exact(h)).enumerate() {
            match self.gates {
                Some(g) => {
                    let b = if g.len() == h { 0 } else { (self.first + i) / self.tokens };
                    let g = &g[b * h..(b + 1) * h];
                    for ((a, &y), &g) in a.iter_mut().zip(y).zip(g) {
                        *a = g.mul_add(y, *a);
                    }
                }
                None => {
                    for (a, &y) in a.iter_mut().zip(y) {
                        *a += y;
                    }
                }
            }
        }
    }
}

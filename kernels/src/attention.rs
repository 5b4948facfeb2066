//! Fused scaled dot-product attention for the CPU: tiled over queries and keys with an online
//! softmax in float32 (FlashAttention's recurrence), so memory is linear in tokens; tasks of
//! one batch row × a tile of queries (all heads) shared over the rank's threads; the
//! log-sum-exp of every query row returned for merging partial results (Ring attention).
//!
//! Heads are read where they lie: `q`, `k`, `v` may be the `[b, tokens, heads, d]` buffers of
//! the projections viewed as `[b, heads, tokens, d]` (any strides with a unit last stride),
//! and the output is written as `[b, tokens, heads, d]` and returned as its
//! `[b, heads, tokens, d]` view, so splitting and merging heads copy nothing.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::flex::{self, all_to_flex, from_flex};
use crate::gemm::{MatMut, MatRef, Parallelism, matmul};
use crate::math::{self, Kernel, simd};

/// Query rows per task (fewer when the batch × tiles would not keep every thread busy). The
/// GEMMs pack each key/value tile once per query tile, so larger tiles pack less: 512 against
/// 256 on the Intel Xeon machine (docs/BENCH.md), 8 × 4096 × 40 at 1 / 2 threads 366 → 357 /
/// 192 → 185 ms, 16 × 1024 × 72 at 1 thread 77.5 → 75.0 ms; 1024 was slower (381 / 196).
const Q_TILE: usize = 512;
/// Keys per tile of the online softmax when there are more than [`SINGLE_KV_TILE`] keys.
const KV_TILE: usize = 512;
/// Up to this many keys, one tile holds them all (a 512 × 1024 score block is 2 MiB).
const SINGLE_KV_TILE: usize = 1024;

/// `softmax(q·kᵀ/√d + bias)·v`.
///
/// Flex/f32: the fused kernel of this module (never a `[q_tokens, kv_tokens]` matrix per
/// head; scratch is `Q_TILE × min(kv_tokens, 1024)` per task). Other backends and dtypes:
/// Burn's `attention`.
///
/// # Shapes
/// - `q`: `[batch, heads, q_tokens, d]`; `k`: `[batch, heads, kv_tokens, d]`;
///   `v`: `[batch, heads, kv_tokens, d_v]`
/// - `bias`: broadcastable to `[batch, heads, q_tokens, kv_tokens]` (e.g. `[batch, 1, 1,
///   kv_tokens]`, a padding mask as an additive bias)
/// - output: `[batch, heads, q_tokens, d_v]`
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    match fast_inputs(q, k, v, bias) {
        Ok(inputs) => from_flex(run(inputs, false).0),
        Err([q, k, v, bias]) => {
            let (q, k, v) = (q.expect("q"), k.expect("k"), v.expect("v"));
            let bias = bias.map(|b| {
                let [bq, hq, lq, _] = q.dims();
                let lk = k.dims()[2];
                let [bb, hb, lb, _] = b.dims();
                if bb == bq && hb == hq && lb == lq { b } else { b.expand([bq, hq, lq, lk]) }
            });
            burn_attention(q, k, v, None, bias, AttentionModuleOptions::default())
        }
    }
}

/// Attention and the log-sum-exp of each query row's scaled scores, for merging partial
/// results over disjoint blocks of keys. Computed in float32; the output has `q`'s dtype.
///
/// Flex/f32: the fused kernel; other backends and dtypes: Burn's ops in float32 (scores
/// materialised).
///
/// # Shapes
/// - `q`: `[batch, heads, q_tokens, d]`, `k`, `v`: `[batch, heads, kv_tokens, d]`
/// - output: `([batch, heads, q_tokens, d], lse: [batch, heads, q_tokens, 1])`
pub fn attention_with_lse<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    match fast_inputs(q, k, v, None) {
        Ok(inputs) => {
            let (out, lse) = run(inputs, true);
            (from_flex(out), from_flex(lse.unwrap_or_else(|| unreachable!("lse requested"))))
        }
        Err([q, k, v, _]) => reference_with_lse(q.expect("q"), k.expect("k"), v.expect("v")),
    }
}

/// Burn's composition of attention with log-sum-exp (float32, scores materialised).
fn reference_with_lse<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    use burn::tensor::DType;
    let dtype = q.dtype();
    let [_, _, _, d] = q.dims();
    let (q, k, v) = (q.cast(DType::F32), k.cast(DType::F32), v.cast(DType::F32));
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (d as f64).sqrt());
    let max = scores.clone().max_dim(3);
    let p = (scores - max.clone()).exp();
    let sum = p.clone().sum_dim(3);
    let out = p.matmul(v) / sum.clone();
    let lse = max + sum.log();
    (out.cast(dtype), lse)
}

/// One operand of the kernel: a Flex tensor with non-negative strides and a unit last
/// stride (copied to contiguous when it is not).
struct Operand {
    t: FlexTensor,
    dims: [usize; 4],
    strides: [usize; 4],
}

impl Operand {
    fn new(t: FlexTensor) -> Self {
        let usable = |t: &FlexTensor| {
            let s = t.layout().strides();
            let d = t.layout().shape();
            s.iter().all(|&s| s >= 0) && (s[3] == 1 || d[3] <= 1)
        };
        let t = if usable(&t) { t } else { t.to_contiguous() };
        let d = t.layout().shape();
        let s = t.layout().strides();
        Self {
            dims: [d[0], d[1], d[2], d[3]],
            strides: [s[0] as usize, s[1] as usize, s[2] as usize, s[3].max(1) as usize],
            t,
        }
    }

    fn data(&self) -> &[f32] {
        self.t.storage::<f32>()
    }

    /// Offset of element (b, h, i, 0); a broadcast dim (size 1) contributes nothing.
    fn at(&self, b: usize, h: usize, i: usize) -> usize {
        let pick = |idx: usize, dim: usize, stride: usize| if dim == 1 { 0 } else { idx * stride };
        self.t.layout().start_offset()
            + pick(b, self.dims[0], self.strides[0])
            + pick(h, self.dims[1], self.strides[1])
            + pick(i, self.dims[2], self.strides[2])
    }
}

struct Inputs {
    q: Operand,
    k: Operand,
    v: Operand,
    bias: Option<Operand>,
}

type Back<B> = [Option<Tensor<B, 4>>; 4];

/// The operands as Flex tensors when the fused kernel applies (Flex, f32, shapes that
/// agree, a bias broadcastable to the scores), else everything back unchanged.
fn fast_inputs<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
) -> Result<Inputs, Back<B>> {
    let [b, h, tq, d] = q.dims();
    let [kb, kh, tk, kd] = k.dims();
    let [vb, vh, vt, _] = v.dims();
    let agree = [kb, vb] == [b, b] && [kh, vh] == [h, h] && kd == d && vt == tk;
    let bias_fits = bias.as_ref().is_none_or(|bias| {
        let [bb, bh, bq, bk] = bias.dims();
        (bb == b || bb == 1) && (bh == h || bh == 1) && (bq == tq || bq == 1) && bk == tk
    });
    if !(agree && bias_fits) {
        return Err([Some(q), Some(k), Some(v), bias]);
    }
    match all_to_flex([Some(q), Some(k), Some(v), bias]) {
        Ok([Some(q), Some(k), Some(v), bias]) => Ok(Inputs {
            q: Operand::new(q),
            k: Operand::new(k),
            v: Operand::new(v),
            bias: bias.map(Operand::new),
        }),
        Ok(_) => unreachable!("q, k and v were passed as Some"),
        Err(back) => Err(back),
    }
}

/// Runs the kernel: the output `[b, h, tq, dv]` (stored `[b, tq, h, dv]`) and, when asked,
/// the log-sum-exp `[b, h, tq, 1]` (stored `[b, tq, h]`).
fn run(inputs: Inputs, want_lse: bool) -> (FlexTensor, Option<FlexTensor>) {
    let Inputs { q, k, v, bias } = inputs;
    let [batch, heads, tq, d] = q.dims;
    let tk = k.dims[2];
    let dv = v.dims[3];
    let scale = 1.0 / (d as f32).sqrt();

    let mut out = flex::zeros(vec![batch, tq, heads, dv]);
    let mut lse = flex::zeros(vec![batch, tq, heads]);
    let row = heads * dv;
    if batch * tq * row > 0 {
        // Enough tasks for every thread of the rank's pool (four each, for balance).
        let threads = rayon::current_num_threads();
        let tiles_wanted = (4 * threads).div_ceil(batch).max(1);
        let q_tile = Q_TILE.min(tq.div_ceil(tiles_wanted)).max(8.min(tq));
        let kv_tile = if tk <= SINGLE_KV_TILE { tk.max(1) } else { KV_TILE };
        let ctx =
            Ctx { q: &q, k: &k, v: &v, bias: bias.as_ref(), heads, d, dv, tk, scale, kv_tile };
        out.storage_mut::<f32>()
            .par_chunks_mut(tq * row)
            .zip(lse.storage_mut::<f32>().par_chunks_mut(tq * heads))
            .enumerate()
            .for_each(|(b, (out_b, lse_b))| {
                out_b
                    .par_chunks_mut(q_tile * row)
                    .zip(lse_b.par_chunks_mut(q_tile * heads))
                    .enumerate()
                    .for_each(|(tile, (o, l))| ctx.tile(b, tile * q_tile, o, l));
            });
    }
    let out = out.transpose(1, 2);
    let lse = want_lse.then(|| lse.reshape(vec![batch, tq, heads, 1].into()).transpose(1, 2));
    (out, lse)
}

/// What every task reads.
struct Ctx<'a> {
    q: &'a Operand,
    k: &'a Operand,
    v: &'a Operand,
    bias: Option<&'a Operand>,
    heads: usize,
    d: usize,
    dv: usize,
    tk: usize,
    scale: f32,
    kv_tile: usize,
}

impl Ctx<'_> {
    /// Query rows `i0 .. i0 + rows` of batch row `b`, every head: `out` is their
    /// `[rows, heads, dv]` block of the output, `lse` their `[rows, heads]` block.
    fn tile(&self, b: usize, i0: usize, out: &mut [f32], lse: &mut [f32]) {
        let (heads, dv, tk) = (self.heads, self.dv, self.tk);
        let rows = lse.len() / heads;
        let mut scores = vec![0f32; rows * self.kv_tile];
        let mut m = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0f32; rows];
        let mut corr = vec![0f32; rows];
        for h in 0..heads {
            m.fill(f32::NEG_INFINITY);
            l.fill(0.0);
            let q = MatRef {
                data: self.q.data(),
                offset: self.q.at(b, h, i0),
                rows,
                cols: self.d,
                row_stride: self.q.strides[2],
                col_stride: 1,
            };
            let mut j0 = 0;
            while j0 < tk {
                let kt = self.kv_tile.min(tk - j0);
                // S = scale · Q · K_tileᵀ (K read transposed through its strides).
                let kmat = MatRef {
                    data: self.k.data(),
                    offset: self.k.at(b, h, j0),
                    rows: self.d,
                    cols: kt,
                    row_stride: 1,
                    col_stride: self.k.strides[2],
                };
                let s = MatMut { data: &mut scores, rows, cols: kt, row_stride: self.kv_tile };
                matmul(s, false, q, kmat, self.scale, Parallelism::None);
                simd(OnlineSoftmax {
                    scores: &mut scores,
                    stride: self.kv_tile,
                    kt,
                    bias: self.bias.map(|bias| (bias, b, h, i0, j0)),
                    m: &mut m,
                    l: &mut l,
                    corr: &mut corr,
                });
                let first = j0 == 0;
                if !first {
                    simd(ScaleRows {
                        out: &mut *out,
                        factors: &corr,
                        head: h,
                        heads,
                        dv,
                        invert: false,
                    });
                }
                // O (+)= P · V_tile, written straight into this head's columns of the output.
                let p = MatRef {
                    data: &scores,
                    offset: 0,
                    rows,
                    cols: kt,
                    row_stride: self.kv_tile,
                    col_stride: 1,
                };
                let vmat = MatRef {
                    data: self.v.data(),
                    offset: self.v.at(b, h, j0),
                    rows: kt,
                    cols: dv,
                    row_stride: self.v.strides[2],
                    col_stride: 1,
                };
                let o = MatMut { data: &mut out[h * dv..], rows, cols: dv, row_stride: heads * dv };
                matmul(o, !first, p, vmat, 1.0, Parallelism::None);
                j0 += kt;
            }
            simd(ScaleRows { out: &mut *out, factors: &l, head: h, heads, dv, invert: true });
            for r in 0..rows {
                lse[r * heads + h] = m[r] + l[r].ln();
            }
        }
    }
}

/// One key tile of the online softmax, for every query row of a task: adds the bias, takes
/// the new row maxima `m`, turns the scores into `e^(s − m)` in place, and updates the row
/// sums `l` with `corr = e^(m_old − m_new)`, the factor the accumulated output must be scaled by.
struct OnlineSoftmax<'a> {
    scores: &'a mut [f32],
    stride: usize,
    kt: usize,
    /// The bias operand and (batch, head, first query, first key) of this tile.
    bias: Option<(&'a Operand, usize, usize, usize, usize)>,
    m: &'a mut [f32],
    l: &'a mut [f32],
    corr: &'a mut [f32],
}

impl Kernel for OnlineSoftmax<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        for r in 0..self.m.len() {
            let sr = &mut self.scores[r * self.stride..r * self.stride + self.kt];
            if let Some((bias, b, h, i0, j0)) = self.bias {
                let bs = bias.strides[3];
                let at = bias.at(b, h, i0 + r) + j0 * bs;
                let bd = bias.data();
                if bs == 1 {
                    let n = sr.len();
                    for (s, &x) in sr.iter_mut().zip(&bd[at..at + n]) {
                        *s += x;
                    }
                } else {
                    for (j, s) in sr.iter_mut().enumerate() {
                        *s += bd[at + j * bs];
                    }
                }
            }
            let m_new = self.m[r].max(math::max(sr));
            // A row whose keys so far are all masked (−∞) keeps a zero weight.
            let m_use = if m_new == f32::NEG_INFINITY { 0.0 } else { m_new };
            let sum = math::exp_sub_sum(sr, m_use);
            self.corr[r] = math::exp(self.m[r] - m_use);
            self.l[r] = self.l[r].mul_add(self.corr[r], sum);
            self.m[r] = m_new;
        }
    }
}

/// Scales row r of head `head` of a task's `[rows, heads, dv]` output by `factors[r]` (or
/// divides by it, `invert`).
struct ScaleRows<'a> {
    out: &'a mut [f32],
    factors: &'a [f32],
    head: usize,
    heads: usize,
    dv: usize,
    invert: bool,
}

impl Kernel for ScaleRows<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        for (r, &f) in self.factors.iter().enumerate() {
            let f = if self.invert { 1.0 / f } else { f };
            let o = &mut self.out[(r * self.heads + self.head) * self.dv..][..self.dv];
            for x in o.iter_mut() {
                *x *= f;
            }
        }
    }
}

/// Merges two partial attention results over disjoint key blocks by their log-sum-exps
/// (float32): the result equals attention over the union of the blocks, and its
/// log-sum-exp that of the union.
///
/// Flex/f32: one pass, rows of (batch, token) over the rank's threads, written as
/// `[b, tokens, heads, d]` and returned as its `[b, heads, tokens, d]` view (like
/// [`attention`]). Other backends and dtypes: Burn's ops.
///
/// # Shapes
/// `out_*`: `[batch, heads, q_tokens, d]`, `lse_*`: `[batch, heads, q_tokens, 1]`.
pub fn merge_partial<B: Backend>(
    out_a: Tensor<B, 4>,
    lse_a: Tensor<B, 4>,
    out_b: Tensor<B, 4>,
    lse_b: Tensor<B, 4>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, t, _] = out_a.dims();
    let fits = out_b.dims() == out_a.dims()
        && lse_a.dims() == [b, h, t, 1]
        && lse_b.dims() == [b, h, t, 1];
    if !fits {
        return merge_reference(out_a, lse_a, out_b, lse_b);
    }
    match all_to_flex([Some(out_a), Some(lse_a), Some(out_b), Some(lse_b)]) {
        Ok([Some(oa), Some(la), Some(ob), Some(lb)]) => {
            let (o, l) = merge_flex([oa, la, ob, lb].map(Operand::new));
            (from_flex(o), from_flex(l))
        }
        Ok(_) => unreachable!("every operand was passed as Some"),
        Err([Some(oa), Some(la), Some(ob), Some(lb)]) => merge_reference(oa, la, ob, lb),
        Err(_) => unreachable!("every operand was passed as Some"),
    }
}

/// Burn's composition of [`merge_partial`].
fn merge_reference<B: Backend>(
    out_a: Tensor<B, 4>,
    lse_a: Tensor<B, 4>,
    out_b: Tensor<B, 4>,
    lse_b: Tensor<B, 4>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    use burn::tensor::DType;
    let dtype = out_a.dtype();
    let (out_a, out_b) = (out_a.cast(DType::F32), out_b.cast(DType::F32));
    let max = lse_a.clone().max_pair(lse_b.clone());
    let wa = (lse_a - max.clone()).exp();
    let wb = (lse_b - max.clone()).exp();
    let total = wa.clone() + wb.clone();
    let out = (out_a * wa + out_b * wb) / total.clone();
    (out.cast(dtype), max + total.log())
}

fn merge_flex([oa, la, ob, lb]: [Operand; 4]) -> (FlexTensor, FlexTensor) {
    let [batch, heads, t, d] = oa.dims;
    let mut out = flex::zeros(vec![batch, t, heads, d]);
    let mut lse = flex::zeros(vec![batch, t, heads]);
    if batch * t * heads * d > 0 {
        out.storage_mut::<f32>()
            .par_chunks_mut(heads * d)
            .zip(lse.storage_mut::<f32>().par_chunks_mut(heads))
            .enumerate()
            .for_each(|(row, (out, lse))| {
                let (b, i) = (row / t, row % t);
                simd(MergeRow { out, lse, oa: &oa, la: &la, ob: &ob, lb: &lb, b, i });
            });
    }
    let out = out.transpose(1, 2);
    let lse = lse.reshape(vec![batch, t, heads, 1].into()).transpose(1, 2);
    (out, lse)
}

/// Every head of one (batch, token) row of [`merge_partial`].
struct MergeRow<'a> {
    out: &'a mut [f32],
    lse: &'a mut [f32],
    oa: &'a Operand,
    la: &'a Operand,
    ob: &'a Operand,
    lb: &'a Operand,
    b: usize,
    i: usize,
}

impl Kernel for MergeRow<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let d = self.oa.dims[3];
        for (h, (o, l)) in self.out.chunks_exact_mut(d).zip(self.lse.iter_mut()).enumerate() {
            let la = self.la.data()[self.la.at(self.b, h, self.i)];
            let lb = self.lb.data()[self.lb.at(self.b, h, self.i)];
            let m = if la > lb { la } else { lb };
            let (wa, wb) = (math::exp(la - m), math::exp(lb - m));
            let total = wa + wb;
            let (wa, wb) = (wa / total, wb / total);
            let a = &self.oa.data()[self.oa.at(self.b, h, self.i)..][..d];
            let bb = &self.ob.data()[self.ob.at(self.b, h, self.i)..][..d];
            for ((o, &x), &y) in o.iter_mut().zip(a).zip(bb) {
                *o = x.mul_add(wa, y * wb);
            }
            *l = m + total.ln();
        }
    }
}

//! Strided views made contiguous by copying their contiguous runs, threads over the runs.
//!
//! Flex copies a view that does not collapse to two dimensions element by element (its
//! general strided iterator): the head split and merge of attention (`[b, n, h, d]` viewed
//! as `[b, h, n, d]`) and every slice of such a view that a concatenation or an all-to-all
//! makes contiguous took that path. Here the innermost run (the head dimension, or longer
//! where dimensions merge) is copied as one slice.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorMetadata};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::flex;

/// Runs shorter than this are left to Flex's copy: per-run bookkeeping would dominate.
const MIN_RUN: usize = 8;
/// Elements per parallel task.
const TASK_ELEMENTS: usize = 1 << 16;

/// `x` with a contiguous row-major layout: unchanged when it already is one (or when `B` is
/// not Flex, whose backends manage layouts themselves), else copied.
///
/// Flex/f32 views whose innermost contiguous run has at least 8 elements are copied run by
/// run on the rank's threads; other layouts (negative strides, transposed last dims, short
/// runs) by Flex's own copy.
pub fn contiguous<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(contiguous_primitive::<B>(match x
        .into_primitive()
    {
        burn::tensor::TensorPrimitive::Float(p) => p,
        q => return Tensor::from_primitive(q),
    })))
}

/// [`contiguous`] on a backend primitive (for code that handles tensors of any rank).
pub fn contiguous_primitive<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    if x.dtype() != DType::F32 {
        return x;
    }
    match flex::primitive_to_flex::<B>(x) {
        Ok(t) => flex::flex_to_primitive::<B>(copy_runs(t)),
        Err(x) => x,
    }
}

/// Shape and strides with size-1 dimensions dropped and dimensions merged where the outer
/// stride is the inner extent (so the innermost entry is the longest contiguous run).
fn collapse(shape: &[usize], strides: &[isize]) -> (Vec<usize>, Vec<isize>) {
    let mut dims: Vec<(usize, isize)> = Vec::with_capacity(shape.len());
    for (&n, &s) in shape.iter().zip(strides) {
        if n == 1 {
            continue;
        }
        match dims.last_mut() {
            Some((pn, ps)) if *ps == s * n as isize => {
                *pn *= n;
                *ps = s;
            }
            _ => dims.push((n, s)),
        }
    }
    dims.into_iter().unzip()
}

/// `t` with a contiguous layout: unchanged if it has one, copied run by run where that
/// pays, else by Flex's copy.
pub(crate) fn copy_runs(t: FlexTensor) -> FlexTensor {
    let layout = t.layout();
    if layout.is_contiguous() {
        return t;
    }
    let (shape, strides) = collapse(layout.shape(), layout.strides());
    let run = shape.last().copied().unwrap_or(1);
    let simple = strides.last() == Some(&1) && strides.iter().all(|&s| s >= 0);
    let transposed = shape.len() >= 3
        && strides[shape.len() - 2] == 1
        && strides.iter().all(|&s| s > 0)
        && run >= MIN_RUN;
    if transposed {
        return transpose_blocks(t, &shape, &strides);
    }
    // Flex copies ≤ 2 collapsed dimensions with a tiled loop already.
    if !simple || run < MIN_RUN || shape.len() <= 2 {
        return t.to_contiguous();
    }
    let outer = &shape[..shape.len() - 1];
    let outer_strides = &strides[..strides.len() - 1];
    let n = layout.num_elements();
    let base = layout.start_offset();
    let src = t.storage::<f32>();
    let mut out = flex::zeros(layout.shape().to_vec());
    let rows_per_task = (TASK_ELEMENTS / run).max(1);
    out.storage_mut::<f32>()[..n].par_chunks_mut(rows_per_task * run).enumerate().for_each(
        |(task, dst)| {
            // The multi-index of this task's first run, then an odometer over the outer dims.
            let mut index = vec![0usize; outer.len()];
            let mut rest = task * rows_per_task;
            for d in (0..outer.len()).rev() {
                index[d] = rest % outer[d];
                rest /= outer[d];
            }
            let mut offset: usize = base
                + index.iter().zip(outer_strides).map(|(&i, &s)| i * s as usize).sum::<usize>();
            for row in dst.chunks_exact_mut(run) {
                row.copy_from_slice(&src[offset..offset + run]);
                for d in (0..outer.len()).rev() {
                    index[d] += 1;
                    offset += outer_strides[d] as usize;
                    if index[d] < outer[d] {
                        break;
                    }
                    offset -= outer[d] * outer_strides[d] as usize;
                    index[d] = 0;
                }
            }
        },
    );
    out
}

/// Side of the square tiles of [`transpose_blocks`] (16 floats: one cache line per row).
const TILE: usize = 16;

/// A batch of transposed matrices made contiguous: collapsed `shape` `[outer…, rows, cols]`
/// whose `rows` have stride 1 and `cols` a larger one — a `[b, c, h·w]` map viewed as
/// `[b, h·w, c]` (a U-Net transformer's tokens) or back. Flex copies such a view element by
/// element when the batch keeps it from collapsing to two dimensions. Copied in 16 × 16
/// tiles (each source column read as one cache line), threads over bands of 16 output rows.
fn transpose_blocks(t: FlexTensor, shape: &[usize], strides: &[isize]) -> FlexTensor {
    let layout = t.layout();
    let d = shape.len();
    let (rows, cols, col_stride) = (shape[d - 2], shape[d - 1], strides[d - 1] as usize);
    let (outer, outer_strides) = (&shape[..d - 2], &strides[..d - 2]);
    let base = layout.start_offset();
    let src = t.storage::<f32>();
    let mut out = flex::zeros(layout.shape().to_vec());
    let matrix = rows * cols;
    let n = layout.num_elements();
    out.storage_mut::<f32>()[..n].par_chunks_mut(matrix.max(1)).enumerate().for_each(|(m, dst)| {
        // The source offset of matrix m (row-major index over the outer dims).
        let (mut rest, mut at) = (m, base);
        for (&extent, &stride) in outer.iter().zip(outer_strides).rev() {
            at += (rest % extent) * stride as usize;
            rest /= extent;
        }
        dst.par_chunks_mut(TILE * cols.max(1)).enumerate().for_each(|(band, dst)| {
            let r0 = band * TILE;
            let band_rows = dst.len() / cols.max(1);
            for c0 in (0..cols).step_by(TILE) {
                let tile_cols = TILE.min(cols - c0);
                for r in 0..band_rows {
                    let row = &mut dst[r * cols + c0..][..tile_cols];
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = src[at + r0 + r + (c0 + j) * col_stride];
                    }
                }
            }
        });
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tensor};
    use burn_flex::Flex;

    type B = Flex;

    #[test]
    fn views_copy_to_the_same_values_as_flex() {
        let x: Tensor<B, 4> =
            Tensor::random([2, 301, 5, 24], Distribution::Normal(0.0, 1.0), &Default::default());
        let views: Vec<Tensor<B, 4>> = vec![
            // The head split: [b, n, h, d] as [b, h, n, d].
            x.clone().swap_dims(1, 2),
            // A slice of heads of it, as an all-to-all takes one.
            x.clone().swap_dims(1, 2).narrow(1, 2, 3),
            // Tokens narrowed from an offset, two dims permuted.
            x.clone().narrow(1, 3, 20).permute([2, 0, 1, 3]),
            // Short runs (4 < MIN_RUN): Flex's copy.
            x.clone().narrow(3, 0, 4).swap_dims(1, 2),
            // A transposed last dim with a short run (5 rows of stride 1): Flex's copy.
            x.clone().swap_dims(2, 3),
            // Channels and tokens swapped over a batch ([b, c, h·w] as [b, h·w, c]): tiles,
            // with partial tiles on both sides (301 × 120).
            x.clone().reshape([2, 301, 120, 1]).swap_dims(1, 2),
            x.clone().reshape([2, 301, 120, 1]).narrow(1, 7, 250).swap_dims(1, 2),
        ];
        for (i, v) in views.into_iter().enumerate() {
            let want = v.to_data();
            let got = contiguous(v);
            let p = flex::checked_flex(got.clone());
            assert!(p.layout().is_contiguous(), "view {i}");
            // A copy: exactly equal. (72 240 elements: the first views span two tasks.)
            assert_eq!(got.into_data(), want, "view {i}");
        }
    }

    #[test]
    fn dims_merge_where_strides_allow() {
        assert_eq!(collapse(&[2, 1, 3, 4], &[12, 12, 4, 1]), (vec![24], vec![1]));
        assert_eq!(
            collapse(&[2, 5, 3, 4], &[60, 4, 20, 1]),
            (vec![2, 5, 3, 4], vec![60, 4, 20, 1])
        );
        assert_eq!(collapse(&[2, 3, 4], &[24, 4, 1]), (vec![2, 12], vec![24, 1]));
    }
}

//! Linear layers as one GEMM over all leading dims, the bias written into the output first
//! and accumulated onto, threads shared by the GEMM itself.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use burn_flex::FlexTensor;

use crate::flex::{self, checked_flex, contiguous, from_flex, is_flex, values};
use crate::gemm::{MatMut, MatRef, matmul, parallelism_for};

/// `x·W + b` with `W` stored `[d_input, d_output]` (Burn's `Linear` layout).
///
/// Flex/f32: `x` viewed as `[rows, d_input]` (copied only if not contiguous), one GEMM of
/// all rows on the rank's threads, the bias pre-filled into the output and accumulated
/// onto (no second pass). Other backends: Burn's `linear`.
///
/// # Shapes
/// - `x`: `[..., d_input]`; `weight`: `[d_input, d_output]`; `bias`: `[d_output]`
/// - output: `[..., d_output]`
pub fn linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let f32s = x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.as_ref().is_none_or(|b| b.dtype() == DType::F32);
    let [d_in, d_out] = weight.dims();
    let shapes_fit = x.dims()[D - 1] == d_in && bias.as_ref().is_none_or(|b| b.dims() == [d_out]);
    if !(is_flex::<B>() && f32s && shapes_fit) {
        return burn::tensor::module::linear(x, weight, bias);
    }
    let dims = x.dims();
    let out =
        linear_flex(checked_flex(x), checked_flex(weight), bias.map(checked_flex), d_in, d_out);
    let mut shape = dims.to_vec();
    shape[D - 1] = d_out;
    from_flex::<B, D>(out.reshape(shape.into()))
}

fn linear_flex(
    x: FlexTensor,
    w: FlexTensor,
    bias: Option<FlexTensor>,
    d_in: usize,
    d_out: usize,
) -> FlexTensor {
    let x = contiguous(x);
    let w = if w.layout().strides().iter().any(|&s| s < 0) { w.to_contiguous() } else { w };
    let rows = x.layout().num_elements().checked_div(d_in).unwrap_or(0);
    let bias = bias.map(contiguous);
    let mut out = match &bias {
        Some(b) => flex::repeated_rows(rows, values(b)),
        None => flex::zeros(vec![rows, d_out]),
    };
    let (ws, wl) = (w.storage::<f32>(), w.layout());
    let (w_rs, w_cs) = (wl.strides()[0], wl.strides()[1]);
    if rows == 0 || d_out == 0 {
        return out;
    }
    let lhs =
        MatRef { data: values(&x), offset: 0, rows, cols: d_in, row_stride: d_in, col_stride: 1 };
    let rhs = MatRef {
        data: ws,
        offset: wl.start_offset(),
        rows: d_in,
        cols: d_out,
        row_stride: w_rs as usize,
        col_stride: w_cs as usize,
    };
    let dst = MatMut { data: out.storage_mut::<f32>(), rows, cols: d_out, row_stride: d_out };
    matmul(dst, bias.is_some(), lhs, rhs, 1.0, parallelism_for(rows, d_in, d_out));
    out
}

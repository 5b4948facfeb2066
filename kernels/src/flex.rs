//! The backend extension: recognising Burn's Flex backend at run time.
//!
//! Rust has no specialisation, and a trait bound (`B: Kernels`) would have to be written on
//! every generic model and strategy of the workspace. Instead each public kernel takes any
//! `B: Backend` and asks, once per call, whether `B`'s float primitive *is* `FlexTensor`
//! (a `TypeId` comparison through [`Any`]). If it is, and the tensor has the dtype and
//! layout the fast path handles, the kernel runs on the Flex storage; otherwise the tensor
//! goes back unchanged to Burn's own ops. CUDA (and any other backend, including Flex
//! wrapped by fusion or autodiff) therefore always runs Burn's ops.

use std::any::Any;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;

/// `x` as a Flex tensor if `B` is the Flex backend and `x` is a float32 tensor, else `x`
/// back unchanged.
pub(crate) fn to_flex<B: Backend, const D: usize>(
    x: Tensor<B, D>,
) -> Result<FlexTensor, Tensor<B, D>> {
    if x.dtype() != DType::F32 {
        return Err(x);
    }
    match x.into_primitive() {
        TensorPrimitive::Float(p) => {
            primitive_to_flex::<B>(p).map_err(|p| Tensor::from_primitive(TensorPrimitive::Float(p)))
        }
        other => Err(Tensor::from_primitive(other)),
    }
}

/// A backend float primitive as a Flex tensor if `B` is the Flex backend, else back
/// unchanged (any rank; the dtype is the caller's to check).
pub(crate) fn primitive_to_flex<B: Backend>(
    p: FloatTensor<B>,
) -> Result<FlexTensor, FloatTensor<B>> {
    let mut slot = Some(p);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<FlexTensor>>() {
        Some(flex) => flex.take().ok_or_else(unreachable_slot),
        None => Err(slot.take().unwrap_or_else(unreachable_slot)),
    }
}

/// A Flex tensor back as `B`'s float primitive. Only called with `B` the Flex backend (the
/// tensor came from [`primitive_to_flex`] or [`to_flex`] of the same call).
pub(crate) fn flex_to_primitive<B: Backend>(t: FlexTensor) -> FloatTensor<B> {
    let mut slot = Some(t);
    (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<FloatTensor<B>>>()
        .and_then(Option::take)
        .unwrap_or_else(|| panic!("kernels: from_flex called for a backend that is not Flex"))
}

/// Never called: the slot was filled one line before it is read.
#[cold]
fn unreachable_slot<T>() -> T {
    panic!("kernels: a tensor slot emptied twice")
}

/// Whether `B`'s float tensors are Flex tensors (no tensor is touched).
pub(crate) fn is_flex<B: Backend>() -> bool {
    std::any::TypeId::of::<B::FloatTensorPrimitive>() == std::any::TypeId::of::<FlexTensor>()
}

/// A Flex tensor back as a `Tensor<B, D>`. Only called with `B` the Flex backend (the tensor
/// came from [`to_flex`] of the same call).
pub(crate) fn from_flex<B: Backend, const D: usize>(t: FlexTensor) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(flex_to_primitive::<B>(t)))
}

/// Several (optional) tensors of one call as Flex tensors, all or none: if `B` is not Flex
/// or any tensor is not float32, every one comes back unchanged.
#[allow(clippy::type_complexity)]
pub(crate) fn all_to_flex<B: Backend, const D: usize, const N: usize>(
    xs: [Option<Tensor<B, D>>; N],
) -> Result<[Option<FlexTensor>; N], [Option<Tensor<B, D>>; N]> {
    if !is_flex::<B>() || xs.iter().flatten().any(|x| x.dtype() != DType::F32) {
        return Err(xs);
    }
    Ok(xs.map(|x| {
        x.map(|x| match to_flex(x) {
            Ok(t) => t,
            // Checked above: B is Flex and every dtype is f32.
            Err(_) => unreachable_slot(),
        })
    }))
}

/// `x` as a Flex tensor, for a caller that has checked that `B` is Flex ([`is_flex`]) and
/// that `x` is float32.
pub(crate) fn checked_flex<B: Backend, const D: usize>(x: Tensor<B, D>) -> FlexTensor {
    match to_flex(x) {
        Ok(t) => t,
        Err(_) => unreachable_slot(),
    }
}

/// The float32 values of a Flex tensor in row-major order, borrowed when its layout is
/// already contiguous (from offset 0 or any other), copied otherwise (run by run, see
/// [`crate::layout`]).
pub(crate) fn contiguous(t: FlexTensor) -> FlexTensor {
    crate::layout::copy_runs(t)
}

/// The elements of a contiguous float32 Flex tensor.
pub(crate) fn values(t: &FlexTensor) -> &[f32] {
    let n = t.layout().num_elements();
    let start = t.layout().start_offset();
    &t.storage::<f32>()[start..start + n]
}

/// A fresh, uninitialised-by-contract (zeroed) contiguous float32 Flex tensor.
///
/// Built from a `Vec<f32>` rather than through `FlexTensor::zeros`: that one allocates a
/// `Vec<u8>`, whose alignment (1) is below the 16 bytes Burn's `Bytes::from_bytes_vec`
/// demands, so every fresh tensor was allocated twice and its zeros copied (5 % of a PixArt
/// forward at 2 threads, memcpy and page faults of the second allocation). A `Vec<f32>`
/// is kept as it is (`Bytes::from_elems`), and `vec![0.0; n]` of a large `n` gets
/// already-zero pages from the allocator instead of a memset.
pub(crate) fn zeros(shape: Vec<usize>) -> FlexTensor {
    from_vec(vec![0.0; shape.iter().product()], shape)
}

/// `[rows, row.len()]` with every row a copy of `row`, written once over the rank's threads
/// (not zeroed first): a linear layer's output with its bias in place, ready to be
/// accumulated onto.
pub(crate) fn repeated_rows(rows: usize, row: &[f32]) -> FlexTensor {
    use rayon::prelude::*;
    let width = row.len();
    let n = rows * width;
    let mut data: Vec<f32> = Vec::with_capacity(n);
    if width > 0 {
        data.spare_capacity_mut()[..n].par_chunks_mut(width * 64).for_each(|c| {
            for r in c.chunks_exact_mut(width) {
                r.write_copy_of_slice(row);
            }
        });
    }
    // SAFETY: the first `n` slots of the capacity (`with_capacity(n)`) were all written
    // above: the chunks cover `[0, n)` and each is a whole number of `width`-long rows,
    // since `n` and the chunk length are multiples of `width` (for `width == 0`, `n == 0`).
    #[allow(unsafe_code)]
    unsafe {
        data.set_len(n);
    }
    from_vec(data, vec![rows, width])
}

/// A contiguous float32 Flex tensor owning `data` (no copy).
///
/// # Panics
/// If `data.len()` is not the product of `shape` (a programming error of this crate).
pub(crate) fn from_vec(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    assert_eq!(data.len(), shape.iter().product::<usize>(), "flex: data and shape disagree");
    let layout = burn_flex::Layout::contiguous(shape.into());
    FlexTensor::new(burn::tensor::Bytes::from_elems(data), layout, DType::F32)
}

/// The tensor `f` writes, chunk by chunk over the rank's threads: `f(task, out, input)` gets
/// the `task`-th `chunk` elements of the result and, when the result is a fresh tensor, the
/// same elements of `t` (`None`: `out` holds them already and is updated in place, which
/// happens when `t` is contiguous and owns all of its storage).
pub(crate) fn update_chunks<F>(t: FlexTensor, chunk: usize, f: F) -> FlexTensor
where
    F: Fn(usize, &mut [f32], Option<&[f32]>) + Sync + Send,
{
    use rayon::prelude::*;
    let chunk = chunk.max(1);
    let mut t = contiguous(t);
    let whole =
        t.layout().start_offset() == 0 && t.storage::<f32>().len() == t.layout().num_elements();
    if whole && let Some(data) = t.try_storage_mut::<f32>() {
        data.par_chunks_mut(chunk).enumerate().for_each(|(task, c)| f(task, c, None));
        return t;
    }
    let mut out = zeros(t.layout().shape().to_vec());
    out.storage_mut::<f32>()
        .par_chunks_mut(chunk)
        .zip(values(&t).par_chunks(chunk))
        .enumerate()
        .for_each(|(task, (o, x))| f(task, o, Some(x)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_rows_writes_every_row_and_nothing_else() {
        // 130 rows: two full chunks of 64 rows and a partial one.
        let row = [1.5, -2.0, 0.25];
        let t = repeated_rows(130, &row);
        assert_eq!(t.layout().shape().to_vec(), vec![130, 3]);
        let v = values(&t);
        assert_eq!(v.len(), 390);
        assert!(v.chunks_exact(3).all(|r| r == row));
        // Empty either way.
        assert_eq!(values(&repeated_rows(0, &row)).len(), 0);
        assert_eq!(repeated_rows(7, &[]).layout().shape().to_vec(), vec![7, 0]);
    }

    #[test]
    fn zeros_and_from_vec_own_their_values() {
        let z = zeros(vec![2, 3]);
        assert_eq!(values(&z), &[0.0; 6]);
        let t = from_vec((0..6).map(|i| i as f32).collect(), vec![3, 2]);
        assert_eq!(values(&t), &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }
}

//! 2-D convolution as `k` shifted GEMMs, one per kernel row, over shifted copies of the input
//! rows: no im2col matrix.
//!
//! The output is cut into tasks (`plan`: all images at once with output channels split over
//! the threads on small maps, bands of rows of one image on large ones). A task keeps `k`
//! copies of its input rows per channel (with zero rows above and below where it reaches the
//! map's edge), copy `kx` shifted by `kx − p` columns (`p = k / 2`) with the columns it shifts
//! in set to zero: in copy `kx`, the element at output position `q = y·width + x`, plus
//! `ky·width`, is the input under output pixel `(y, x)` for tap `(ky, kx)` — the zero columns
//! are the convolution's left and right padding, so no position wraps into a neighbouring
//! row. Stacked as `[kx, c_in]`, the depth index `kx·c_in + c` has one row stride, and kernel
//! row `ky` is a single GEMM `out[c_out, q] += W[:, ky, :, :] · planes[k·c_in, q + ky·width]`
//! of depth `k·c_in` (the weight laid out `[c_out, k, k, c_in]`, by [`conv_weight`] at load
//! or per call). When a task is a whole image, the GEMMs accumulate straight into the output,
//! pre-filled with the bias; otherwise into a scratch block copied out with the bias (the
//! `k − 1` padding rows between two images of a multi-image task are computed and dropped).
//! Scratch and planes per task are bounded (`TASK_FLOATS`, `LOCAL_FLOATS`).
//!
//! Burn's Flex instead builds an im2col tile of `c_in·k²` rows per 512 output pixels, copies
//! the input to NHWC and the weight to `[c_out, k, k, c_in]` on one thread at every call, and
//! scatters the product into the output.

use burn::tensor::backend::Backend;
use burn::tensor::module::conv2d as burn_conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor};
use burn_flex::FlexTensor;
use std::ops::Range;

use rayon::prelude::*;

use crate::flex::{self, checked_flex, contiguous, from_flex, is_flex, values};
use crate::gemm::{MatMut, MatRef, Parallelism, matmul};

/// Products per task's scratch (float32 elements, 8 MiB): a task computes whole output rows
/// of one image, as many as fit, so the scratch of one wave of tasks stays bounded on large
/// maps (a VAE decoder at 1024²) while a U-Net's 64×64×320 image is one task.
const TASK_FLOATS: usize = 1 << 21;

/// Input channels below which the shifted products are too thin (depth `c_in` per GEMM) and
/// Flex's small-channel convolution is used instead (a U-Net's or a VAE's 4-channel input).
const MIN_CHANNELS: usize = 16;

/// Zero padding of a convolution: `top` and `bottom` rows (may differ: a band of rows whose
/// halo is partly real rows), `cols` columns on each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvPadding {
    /// Zero rows above the input.
    pub top: usize,
    /// Zero rows below the input.
    pub bottom: usize,
    /// Zero columns left and right of the input.
    pub cols: usize,
}

impl ConvPadding {
    /// The same padding `p` on all four sides.
    pub fn same(p: usize) -> Self {
        ConvPadding { top: p, bottom: p, cols: p }
    }
}

/// `nn.Conv2d` (one group, no dilation): `[batch, c_in, rows, width]` with weight
/// `[c_out, c_in, k, k]` and bias `[c_out]` → `[batch, c_out, rows', width']`.
///
/// Flex/f32, stride 1, odd `k` with `padding.cols == k / 2` and `c_in ≥ 16`: one GEMM per
/// kernel row over per-task shifted copies of the input rows (module docs), threads over
/// output channels (small maps), images, or bands of output rows (large maps).
/// Anything else (other backends, dtypes, strides, kernels): Burn's `conv2d`, with the rows
/// padded by concatenation when `top ≠ bottom`.
pub fn conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    stride: usize,
    padding: ConvPadding,
) -> Tensor<B, 4> {
    let [_, c_in, rows, _] = x.dims();
    let [c_out, w_in, k, kw] = weight.dims();
    let f32s = x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.as_ref().is_none_or(|b| b.dtype() == DType::F32);
    let fast = is_flex::<B>()
        && f32s
        && stride == 1
        && k == kw
        && k % 2 == 1
        && padding.cols == k / 2
        && w_in == c_in
        && c_in >= MIN_CHANNELS
        && bias.as_ref().is_none_or(|b| b.dims() == [c_out])
        && padding.top + rows + padding.bottom >= k;
    if !fast {
        return burn_conv(x, weight, bias, stride, padding);
    }
    from_flex(conv_flex(
        checked_flex(x),
        checked_flex(weight),
        bias.map(checked_flex),
        padding.top,
        padding.bottom,
    ))
}

fn burn_conv<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    stride: usize,
    padding: ConvPadding,
) -> Tensor<B, 4> {
    let ConvPadding { top, bottom, cols } = padding;
    if top == bottom {
        let options = ConvOptions::new([stride, stride], [top, cols], [1, 1], 1);
        return burn_conv2d(x, weight, bias, options);
    }
    let options = ConvOptions::new([stride, stride], [0, cols], [1, 1], 1);
    burn_conv2d(pad_rows(x, top, bottom), weight, bias, options)
}

/// `x` with `top` and `bottom` rows of zeros (in `x`'s dtype) around its rows: the uneven
/// row padding of a band's convolution, written out because Burn 0.21's asymmetric
/// `conv2d` pads with a tensor of the default float dtype, which a float16/bfloat16 map
/// cannot be assigned into.
///
/// # Shapes
/// `[batch, channels, rows, width]` → `[batch, channels, top + rows + bottom, width]`.
pub fn pad_rows<B: Backend>(x: Tensor<B, 4>, top: usize, bottom: usize) -> Tensor<B, 4> {
    if top == 0 && bottom == 0 {
        return x;
    }
    let [b, c, _, w] = x.dims();
    let (device, dtype) = (x.device(), x.dtype());
    let zeros = |rows: usize| Tensor::<B, 4>::zeros([b, c, rows, w], (&device, dtype));
    let mut parts = Vec::with_capacity(3);
    if top > 0 {
        parts.push(zeros(top));
    }
    parts.push(x);
    if bottom > 0 {
        parts.push(zeros(bottom));
    }
    Tensor::cat(parts, 2)
}

/// One task: output rows `rows` of image `image`.
#[derive(Debug, Clone)]
struct Task {
    /// Images, one after another in the task's planes (several only with all rows).
    images: Range<usize>,
    /// Output rows of each image.
    rows: Range<usize>,
    /// Output channels.
    channels: Range<usize>,
}

impl Task {
    /// Padded rows per image in the task's planes.
    fn block(&self, k: usize) -> usize {
        self.rows.len() + k - 1
    }

    /// Output positions the task computes (module docs), over all its images: up to the
    /// last image's last row (the padding rows after it are not needed).
    fn span(&self, g: &Geometry) -> usize {
        ((self.images.len() - 1) * self.block(g.k) + self.rows.len()) * g.width
    }

    /// Where output row `y` of the `j`-th image of the task starts among its positions.
    fn position(&self, j: usize, y: usize, g: &Geometry) -> usize {
        (j * self.block(g.k) + y - self.rows.start) * g.width
    }

    /// Elements per channel of each copy of the task's planes: its images' padded rows (the
    /// last tap row's GEMM reads up to the end).
    fn plane(&self, g: &Geometry) -> usize {
        self.images.len() * self.block(g.k) * g.width
    }
}

/// The geometry of one call.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    c_in: usize,
    c_out: usize,
    k: usize,
    /// Input columns (= output columns).
    width: usize,
    /// Input rows, and the zero rows above them.
    rows_in: usize,
    top: usize,
}

fn conv_flex(
    x: FlexTensor,
    w: FlexTensor,
    bias: Option<FlexTensor>,
    top: usize,
    bottom: usize,
) -> FlexTensor {
    let x = contiguous(x);
    let bias = bias.map(contiguous);
    let &[batch, c_in, rows_in, width] = x.layout().shape().as_slice() else {
        unreachable!("conv2d: a 4-D input")
    };
    let &[c_out, _, k, _] = w.layout().shape().as_slice() else {
        unreachable!("conv2d: a 4-D weight")
    };
    let rows_out = top + rows_in + bottom + 1 - k;
    let g = Geometry { c_in, c_out, k, width, rows_in, top };
    let mut out = flex::zeros(vec![batch, c_out, rows_out, width]);
    if batch == 0 || c_out == 0 || width == 0 {
        return out;
    }
    let input = values(&x);
    // The weight as `[c_out, k, k, c_in]` in memory: as prepared by `conv_weight`, or
    // copied so now.
    let per_out = c_in * k * k;
    let reordered;
    let weights = if w.layout().strides() == tap_major_strides(c_in, k).as_slice() {
        &w.storage::<f32>()[w.layout().start_offset()..][..c_out * per_out]
    } else {
        reordered = tap_major(values(&contiguous(w.clone())), c_out, per_out, k * k);
        reordered.as_slice()
    };
    let bias = bias.as_ref().map(values);

    let tasks = plan(batch, rows_out, g);
    let image_out = c_out * rows_out * width;
    if tasks.len() == batch && tasks.iter().all(|t| t.images.len() == 1 && t.rows.len() == rows_out)
    {
        // One task per whole image: the GEMMs accumulate into the output, bias first.
        out.storage_mut::<f32>().par_chunks_mut(image_out).zip(&tasks).for_each(|(dst, task)| {
            if let Some(b) = bias {
                for (plane, &b) in dst.chunks_exact_mut(rows_out * width).zip(b) {
                    plane.fill(b);
                }
            }
            products(dst, task, input, weights, g, bias.is_some());
        });
        return out;
    }
    let wave = rayon::current_num_threads().max(1) * 2;
    let stride = tasks.iter().map(|t| t.channels.len() * t.span(&g)).max().unwrap_or(0);
    let mut scratch = vec![0f32; stride * wave.min(tasks.len())];
    for wave_tasks in tasks.chunks(wave) {
        scratch.par_chunks_mut(stride.max(1)).zip(wave_tasks).for_each(|(dst, task)| {
            products(dst, task, input, weights, g, false);
        });
        // Output rows out of the scratch, plus the bias: threads over (image, channel) planes.
        let plane_out = rows_out * width;
        out.storage_mut::<f32>().par_chunks_mut(plane_out).enumerate().for_each(|(i, dst)| {
            let (image, o) = (i / c_out, i % c_out);
            let b = bias.map_or(0.0, |b| b[o]);
            for (task, src) in wave_tasks.iter().zip(scratch.chunks(stride.max(1))) {
                if !task.images.contains(&image) || !task.channels.contains(&o) {
                    continue;
                }
                let (j, span) = (image - task.images.start, task.span(&g));
                let src = &src[(o - task.channels.start) * span..][..span];
                for y in task.rows.clone() {
                    let from = &src[task.position(j, y, &g)..][..width];
                    for (d, &s) in dst[y * width..(y + 1) * width].iter_mut().zip(from) {
                        *d = s + b;
                    }
                }
            }
        });
    }
    out
}

/// The tasks of one call, enough that every thread has one, each small enough that its
/// scratch ([`TASK_FLOATS`]) and planes ([`LOCAL_FLOATS`]) stay bounded:
/// - small maps (all images' planes fit): all images in one GEMM (the weight is packed once
///   instead of once per image), output channels shared over the threads;
/// - larger maps: bands of output rows of one image, rows shared evenly.
fn plan(batch: usize, rows_out: usize, g: Geometry) -> Vec<Task> {
    let threads = rayon::current_num_threads().max(1);
    let all = Task { images: 0..batch, rows: 0..rows_out, channels: 0..g.c_out };
    let planes = |t: &Task| if g.k == 1 { 0 } else { g.k * g.c_in * t.plane(&g) };
    if batch > 1 && planes(&all) <= LOCAL_FLOATS && g.c_out * all.span(&g) <= TASK_FLOATS {
        let part = g.c_out.div_ceil(threads).next_multiple_of(16).min(g.c_out);
        return (0..g.c_out)
            .step_by(part)
            .map(|o| Task { channels: o..(o + part).min(g.c_out), ..all.clone() })
            .collect();
    }
    let by_threads = rows_out.div_ceil(threads.div_ceil(batch));
    let by_scratch = TASK_FLOATS / (g.c_out * g.width).max(1);
    let by_planes = (LOCAL_FLOATS / (g.k * g.c_in * g.width).max(1)).saturating_sub(g.k - 1);
    let most = by_threads.min(by_scratch).min(if g.k == 1 { usize::MAX } else { by_planes });
    let band = rows_out.div_ceil(rows_out.div_ceil(most.max(1)));
    (0..batch)
        .flat_map(|image| {
            (0..rows_out).step_by(band).map(move |r0| Task {
                images: image..image + 1,
                rows: r0..(r0 + band).min(rows_out),
                channels: 0..g.c_out,
            })
        })
        .collect()
}

/// Float32 elements of one task's planes (16 MiB: the `k` shifted copies of
/// its input rows, all channels).
const LOCAL_FLOATS: usize = 1 << 22;

/// Strides of a `[c_out, c_in, k, k]` view of a contiguous `[c_out, k, k, c_in]` array.
fn tap_major_strides(c_in: usize, k: usize) -> [isize; 4] {
    [(k * k * c_in) as isize, 1, (k * c_in) as isize, c_in as isize]
}

/// A convolution weight `[c_out, c_in, k, k]` laid out for [`conv2d`] once, when a model
/// loads it: on Flex/f32 (with `k > 1`) the same tensor viewed from a `[c_out, k, k, c_in]`
/// array, which the convolution then reads without copying (reordering per call cost a pass
/// over the weight and its fresh pages: 25 ms of a 110 ms 8×8×1280 conv). Unchanged on every
/// other backend, and for convolutions [`conv2d`] leaves to Burn (`stride ≠ 1`, fewer than 16
/// input channels), whose kernels want the standard layout.
pub fn conv_weight<B: Backend>(weight: Tensor<B, 4>, stride: usize) -> Tensor<B, 4> {
    let [c_out, c_in, k, kw] = weight.dims();
    if k != kw || k == 1 || stride != 1 || c_in < MIN_CHANNELS || weight.dtype() != DType::F32 {
        return weight;
    }
    match flex::to_flex(weight) {
        Ok(t) => {
            let data = tap_major(values(&contiguous(t)), c_out, c_in * k * k, k * k);
            let layout = burn_flex::Layout::new(
                vec![c_out, c_in, k, k].into(),
                tap_major_strides(c_in, k).to_vec(),
                0,
            );
            let t = FlexTensor::new(burn::tensor::Bytes::from_elems(data), layout, DType::F32);
            from_flex(t)
        }
        Err(weight) => weight,
    }
}

/// `[c_out, c_in, k, k]` as `[c_out, k, k, c_in]`: for kernel row `ky`, the `[c_out, k·c_in]`
/// matrix of its taps has contiguous rows, laid out as the shifted planes' depth index
/// `kx·c_in + c`. One pass over the weight, threads over output channels.
fn tap_major(w: &[f32], c_out: usize, per_out: usize, taps: usize) -> Vec<f32> {
    let c_in = per_out / taps;
    let mut out = vec![0f32; c_out * per_out];
    out.par_chunks_mut(per_out).zip(w.par_chunks(per_out)).for_each(|(dst, src)| {
        for (c, from) in src.chunks_exact(taps).enumerate() {
            for (t, &v) in from.iter().enumerate() {
                dst[t * c_in + c] = v;
            }
        }
    });
    out
}

/// One task's planes, `[k (column shift kx), c_in, local plane]`: copy `kx` of channel `c`
/// holds the task's rows (zero rows where they fall outside the input) shifted by `kx − p`
/// columns, the columns shifted in left zero, so that `planes[(kx·c_in + c)·plane + ky·width + q]`
/// is the input under output position `q`, tap `(ky, kx)`: one row stride for the depth of a
/// GEMM over all `kx` of a kernel row.
fn local_planes(input: &[f32], task: &Task, g: Geometry) -> Vec<f32> {
    let plane = task.plane(&g);
    let (p, width) = (g.k / 2, g.width);
    let per_image = g.c_in * g.rows_in * width;
    // Written in order, zeros included, rather than zeroed first and copied into: one pass
    // over fresh memory instead of two.
    let mut planes = Vec::with_capacity(g.k * g.c_in * plane);
    for i in 0..g.k * g.c_in {
        let (kx, c) = (i / g.c_in, i % g.c_in);
        // Column x of copy kx holds input column x + kx − p: `to` zeros, `n` values, zeros.
        let (from, to) = (kx.saturating_sub(p), p.saturating_sub(kx));
        let n = width.saturating_sub(from.max(to));
        for image in task.images.clone() {
            let channel = &input[image * per_image + c * g.rows_in * width..][..g.rows_in * width];
            // Local row lr of this image is padded row rows.start + lr, input row that − top.
            for lr in 0..task.block(g.k) {
                let end = planes.len() + width;
                if let Some(y) =
                    (task.rows.start + lr).checked_sub(g.top).filter(|&y| y < g.rows_in)
                {
                    planes.resize(planes.len() + to, 0.0);
                    planes.extend_from_slice(&channel[y * width + from..][..n]);
                }
                planes.resize(end, 0.0);
            }
        }
    }
    planes
}

/// `dst[c_out, span] (+)= Σ_ky W[:, ky, :, :] · planes[k·c_in, ky·width ..]` for one task, on
/// the calling thread (`accumulate`: onto what `dst` holds, the bias): one GEMM of depth
/// `k·c_in` per kernel row (a depth of `c_in` per tap ran at 83 GFLOP/s on the AVX-512 EPYC
/// where `3·320` runs at 101).
fn products(
    dst: &mut [f32],
    task: &Task,
    input: &[f32],
    weights: &[f32],
    g: Geometry,
    accumulate: bool,
) {
    let span = task.span(&g);
    let depth = g.k * g.c_in;
    let rows = task.channels.len();
    let out = &mut dst[..rows * span];
    let first = task.channels.start * g.k * depth;
    if g.k == 1 && task.images.len() == 1 {
        // A pointwise conv of one image reads the input rows in place.
        let lhs = MatRef {
            data: weights,
            offset: first,
            rows,
            cols: g.c_in,
            row_stride: g.c_in,
            col_stride: 1,
        };
        let rhs = MatRef {
            data: input,
            offset: (task.images.start * g.c_in * g.rows_in + task.rows.start) * g.width,
            rows: g.c_in,
            cols: span,
            row_stride: g.rows_in * g.width,
            col_stride: 1,
        };
        let out = MatMut { data: out, rows, cols: span, row_stride: span };
        matmul(out, accumulate, lhs, rhs, 1.0, Parallelism::None);
        return;
    }
    let planes = local_planes(input, task, g);
    let plane = task.plane(&g);
    for ky in 0..g.k {
        let lhs = MatRef {
            data: weights,
            offset: first + ky * depth,
            rows,
            cols: depth,
            row_stride: g.k * depth,
            col_stride: 1,
        };
        let rhs = MatRef {
            data: &planes,
            offset: ky * g.width,
            rows: depth,
            cols: span,
            row_stride: plane,
            col_stride: 1,
        };
        let dst = MatMut { data: &mut out[..], rows, cols: span, row_stride: span };
        matmul(dst, accumulate || ky > 0, lhs, rhs, 1.0, Parallelism::None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn_flex::Flex;

    type B = Flex;

    /// `[batch, c_in, c_out, rows, width, k]`, the padding, the pool's threads.
    fn case([batch, c_in, c_out, rows, width, k]: [usize; 6], pad: ConvPadding, threads: usize) {
        let device = Default::default();
        let x = Tensor::<B, 4>::random(
            [batch, c_in, rows, width],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let w =
            Tensor::<B, 4>::random([c_out, c_in, k, k], Distribution::Normal(0.0, 0.1), &device);
        let b = Tensor::<B, 1>::random([c_out], Distribution::Normal(0.0, 1.0), &device);
        let want = burn_conv(x.clone(), w.clone(), Some(b.clone()), 1, pad);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
        // The weight as a model prepares it, and as given.
        let prepared =
            pool.install(|| conv2d(x.clone(), conv_weight(w.clone(), 1), Some(b.clone()), 1, pad));
        let got = pool.install(|| conv2d(x, w, Some(b), 1, pad));
        assert_eq!(prepared.to_data(), got.to_data(), "prepared weight");
        assert_eq!(got.dims(), want.dims());
        // Same products summed in another order (taps outermost here, c_in·k² at once in
        // Flex's im2col): float32 noise on sums of c_in·k² ≤ 288 terms of size ~0.1
        // (measured ≤ 4.8e-6 absolute over these cases).
        let got = got.into_data().to_vec::<f32>().expect("f32");
        let want = want.into_data().to_vec::<f32>().expect("f32");
        let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err <= 2e-5, "max abs error {err}");
    }

    #[test]
    fn equals_burn_on_symmetric_asymmetric_and_pointwise_padding() {
        case([2, 32, 24, 9, 11, 3], ConvPadding::same(1), 1);
        case([2, 32, 24, 9, 11, 3], ConvPadding::same(1), 2);
        // A band's rows: one halo row real above, zero padding below.
        case([1, 16, 8, 7, 5, 3], ConvPadding { top: 0, bottom: 1, cols: 1 }, 2);
        case([3, 16, 8, 6, 4, 3], ConvPadding { top: 1, bottom: 0, cols: 1 }, 2);
        // 1×1 (a resnet shortcut, a transformer's proj_in).
        case([2, 20, 12, 4, 6, 1], ConvPadding::same(0), 2);
        // A map whose planes exceed LOCAL_FLOATS: bands of rows of each image; below it all
        // images share one product and the output channels are split over the threads.
        case([2, 16, 20, 200, 220, 3], ConvPadding::same(1), 2);
        // 5×5, more threads than images (bands of rows, through a scratch block).
        case([1, 16, 4, 12, 10, 5], ConvPadding::same(2), 3);
        // One image on one thread: a whole-image task, accumulated into the output.
        case([1, 16, 8, 6, 5, 3], ConvPadding::same(1), 1);
        case([1, 16, 8, 6, 5, 5], ConvPadding { top: 1, bottom: 2, cols: 2 }, 1);
    }
}

//! A bounds-checked, safe front to the `gemm` crate (the GEMM Burn's Flex backend itself
//! calls), for the matrix products inside the fused kernels: strided operands, an
//! accumulating destination, a scale on the product, and the caller's choice of threading.

pub(crate) use gemm::Parallelism;

/// A read-only float32 matrix inside a slice: element (i, j) is
/// `data[offset + i·row_stride + j·col_stride]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl MatRef<'_> {
    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1)
                .checked_mul(self.row_stride)
                .and_then(|r| (self.cols - 1).checked_mul(self.col_stride).map(|c| (r, c)))
                .and_then(|(r, c)| r.checked_add(c)?.checked_add(self.offset))
                .is_some_and(|last| last < self.data.len())
    }
}

/// A row-major float32 matrix written in place: element (i, j) is
/// `data[i·row_stride + j]`, with `row_stride ≥ cols` so no two elements share a slot.
#[derive(Debug)]
pub(crate) struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}

/// Rows of the destination a thread's band is a multiple of (the micro-kernels' row tiles).
const BAND_ROWS: usize = 16;

/// `dst ← scale·lhs·rhs` (`accumulate` false) or `dst ← dst + scale·lhs·rhs` (true).
///
/// # Panics
/// If the shapes disagree, or an operand reaches outside its slice, or `dst`'s rows overlap
/// (`row_stride < cols`): these are programming errors of this crate, checked so that the
/// raw-pointer call below can never read or write out of bounds.
pub(crate) fn matmul(
    dst: MatMut<'_>,
    accumulate: bool,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    scale: f32,
    parallelism: Parallelism,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(rhs.rows == k && dst.rows == m && dst.cols == n, "gemm: shapes disagree");
    assert!(lhs.in_bounds() && rhs.in_bounds(), "gemm: an operand is out of bounds");
    assert!(
        m == 0 || n == 0 || (dst.row_stride >= n && (m - 1) * dst.row_stride + n <= dst.data.len()),
        "gemm: destination out of bounds or overlapping"
    );
    if m == 0 || n == 0 {
        return;
    }
    // Several threads: each takes a band of the destination's rows and runs its own
    // single-threaded product (no barrier per depth block as in the `gemm` crate's own
    // threading). Against that threading on 2 threads (AVX-512 EPYC, a scratch program, best
    // of 6 interleaved runs): 27.5 vs 30.6 ms at 2048×1152×1152 (and 28.4–32.7 vs 28.9–39.1
    // in three more), 107 vs 111 ms at 2048×4608×1152, 116 vs 120 ms at 2048×1152×4608.
    if let Parallelism::Rayon(threads) = parallelism {
        let threads = if threads == 0 { rayon::current_num_threads() } else { threads };
        let band = m.div_ceil(threads.max(1)).next_multiple_of(BAND_ROWS);
        if threads > 1 && m > band {
            use rayon::prelude::*;
            let row_stride = dst.row_stride;
            let bands = dst.data.par_chunks_mut(band * row_stride).take(m.div_ceil(band));
            bands.enumerate().for_each(|(i, data)| {
                let rows = band.min(m - i * band);
                let lhs = MatRef { offset: lhs.offset + i * band * lhs.row_stride, rows, ..lhs };
                let dst = MatMut { data, rows, cols: n, row_stride };
                matmul(dst, accumulate, lhs, rhs, scale, Parallelism::None);
            });
            return;
        }
    }
    if k == 0 {
        if !accumulate {
            for row in dst.data.chunks_mut(dst.row_stride).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: every element the call reads (lhs: offset + i·rs + j·cs for i < m, j < k; rhs
    // likewise for k × n) lies inside its slice and every element it writes
    // (i·dst.row_stride + j, i < m, j < n) inside `dst.data`, checked above; the rows of
    // `dst` are disjoint (row_stride ≥ n), `dst` is borrowed mutably so it aliases neither
    // operand, and the strides fit in isize because they index existing slices.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.row_stride as isize,
            accumulate,
            lhs.data.as_ptr().add(lhs.offset),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr().add(rhs.offset),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Threads for a GEMM of `m × k × n` run by one rank: its pool's threads when the product is
/// large enough to share, none (the calling thread) otherwise.
pub(crate) fn parallelism_for(m: usize, k: usize, n: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m.saturating_mul(k).saturating_mul(n) >= 64 * 64 * 64 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_product_and_accumulation_match_a_naive_loop() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k * 2).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        // lhs: every other column of a [m, 2k] matrix; rhs: [n, k] read transposed.
        let lhs =
            MatRef { data: &a, offset: 1, rows: m, cols: k, row_stride: 2 * k, col_stride: 2 };
        let rhs = MatRef { data: &b, offset: 0, rows: k, cols: n, row_stride: 1, col_stride: k };
        let mut out = vec![1.0f32; m * (n + 2)];
        matmul(
            MatMut { data: &mut out, rows: m, cols: n, row_stride: n + 2 },
            true,
            lhs,
            rhs,
            0.5,
            Parallelism::None,
        );
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0
                    + 0.5 * (0..k).map(|p| a[1 + i * 2 * k + 2 * p] * b[p + j * k]).sum::<f32>();
                assert!((out[i * (n + 2) + j] - want).abs() < 1e-5);
            }
            // The padding between rows is untouched.
            assert_eq!(out[i * (n + 2) + n], 1.0);
        }
    }

    #[test]
    fn bands_of_rows_on_two_threads_equal_one_product() {
        // 37 rows on 2 threads: bands of 32 and 5 rows (multiples of BAND_ROWS), strided lhs,
        // padded destination rows, accumulating.
        let (m, k, n) = (37, 29, 23);
        let a: Vec<f32> = (0..m * k * 2 + 1).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let lhs =
            MatRef { data: &a, offset: 1, rows: m, cols: k, row_stride: 2 * k, col_stride: 1 };
        let rhs = MatRef { data: &b, offset: 0, rows: k, cols: n, row_stride: n, col_stride: 1 };
        let run = |parallelism| {
            let mut out: Vec<f32> = (0..m * (n + 3)).map(|i| i as f32 * 1e-3).collect();
            let dst = MatMut { data: &mut out, rows: m, cols: n, row_stride: n + 3 };
            matmul(dst, true, lhs, rhs, 0.5, parallelism);
            out
        };
        let one = run(Parallelism::None);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("pool");
        let two = pool.install(|| run(Parallelism::Rayon(2)));
        // Each band is the same product of the same rows; only the `gemm` crate's blocking,
        // chosen from the row count, may reorder a sum: 1e-6 relative is float32 noise on
        // sums of 29 terms of size ≤ 1 (measured: exactly equal).
        for (i, (x, y)) in one.iter().zip(&two).enumerate() {
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "element {i}: {x} vs {y}");
        }
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn an_operand_past_its_slice_is_refused() {
        let a = vec![0f32; 10];
        let mut out = vec![0f32; 4];
        let lhs = MatRef { data: &a, offset: 0, rows: 2, cols: 6, row_stride: 6, col_stride: 1 };
        let rhs = MatRef { data: &a, offset: 0, rows: 6, cols: 2, row_stride: 1, col_stride: 1 };
        matmul(
            MatMut { data: &mut out, rows: 2, cols: 2, row_stride: 2 },
            false,
            lhs,
            rhs,
            1.0,
            Parallelism::None,
        );
    }
}

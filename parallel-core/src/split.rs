//! Splitting rows (or tokens, or layers) over ranks.

use std::ops::Range;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::comm::Comm;
use crate::error::{ParallelError, Result};
use crate::model::{Denoiser, DenoiserInput, LatentGrid, ModelDesc};
use crate::seams::Seams;

/// `total` items in `parts` contiguous ranges whose lengths differ by at most one, the
/// longer ones first (10 over 4 → 3, 3, 2, 2). A part may be empty when `parts > total`.
pub fn balanced(total: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    let (base, extra) = (total / parts, total % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// The bands of a row split of `grid` over `n` ranks, in units of
/// [`ModelDesc::row_granularity`] latent rows (token rows for a DiT): balanced, longer first.
///
/// # Errors
/// More ranks than rows, named with what to change.
pub fn row_partition(
    strategy: &str,
    desc: &ModelDesc,
    grid: LatentGrid,
    n: usize,
) -> Result<Vec<Range<usize>>> {
    desc.check_grid(grid)?;
    let units = grid.height / desc.row_granularity;
    if units < n {
        return Err(ParallelError::Unsupported {
            strategy: strategy.into(),
            reason: format!(
                "a latent height of {} has {units} rows of {} latent rows, fewer than the {n} \
                 ranks it is split over; use a larger height or fewer ranks",
                grid.height, desc.row_granularity
            ),
        });
    }
    Ok(balanced(units, n))
}

/// Runs `model` on this rank's band of a row split with `seams`, then all-gathers the bands'
/// outputs along the latent rows, so every rank holds the full prediction.
pub fn row_split_forward<B: Backend>(
    strategy: &str,
    model: &dyn Denoiser<B>,
    input: &DenoiserInput<B>,
    comm: &Comm<B>,
    seams: &mut dyn Seams<B>,
) -> Result<Tensor<B, 4>> {
    let desc = model.desc();
    let parts = row_partition(strategy, desc, input.grid(), comm.size())?;
    let g = desc.row_granularity;
    let mine = &parts[comm.rank()];
    let out = model.forward_rows(input, mine.start * g..mine.end * g, seams)?;
    Ok(comm.all_gather(out, 2)?)
}

/// Elements this rank sends in [`row_split_forward`]'s output gather.
pub fn output_gather_elements(
    desc: &ModelDesc,
    grid: LatentGrid,
    batch: usize,
    band: &Range<usize>,
    n: usize,
) -> u64 {
    (batch * desc.out_channels * band.len() * desc.row_granularity * grid.width * (n - 1)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_splits() {
        assert_eq!(balanced(10, 4), vec![0..3, 3..6, 6..8, 8..10]);
        assert_eq!(balanced(8, 4), vec![0..2, 2..4, 4..6, 6..8]);
        assert_eq!(balanced(2, 3), vec![0..1, 1..2, 2..2]);
        assert_eq!(balanced(5, 1), vec![0..5]);
    }
}

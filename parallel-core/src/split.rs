//! Splitting rows (or tokens, or layers) over ranks.

use std::ops::Range;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::attention::sdpa;
use crate::comm::{Comm, Tag};
use crate::error::{ParallelError, Result};
use crate::model::{Denoiser, DenoiserInput, LatentGrid, ModelDesc};
use crate::seams::{AttentionSite, GroupNormStats, Halo, RowSite, Seams};

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

/// Exact seams of a row split: what the whole-map forward would have, every time, by
/// synchronous exchanges — the neighbours' boundary rows before a convolution (point to
/// point, at most `2·halo` rows per rank), every band's group-norm statistics merged (an
/// all-gather of `(mean, M2)`), every band's keys and values for an attention (an
/// all-gather). What a patch-parallel VAE decode runs with; the result equals the whole map's
/// up to float32 reordering.
///
/// `bands` are every rank's rows at the resolution of the first site, in order; at a site of
/// another resolution a rank's rows scale with it (`rows · total_rows / first total`).
pub struct ExactRows<'a, B: Backend> {
    comm: &'a Comm<B>,
    bands: Vec<Range<usize>>,
    total: usize,
    kind: &'static str,
}

impl<'a, B: Backend> ExactRows<'a, B> {
    /// Exact seams over `comm`, rank `r` holding `bands[r]` of `total` rows; messages are
    /// tagged `kind`.
    ///
    /// # Errors
    /// Bands that are not one per rank, empty, or not contiguous from row 0 to `total`.
    pub fn new(
        comm: &'a Comm<B>,
        bands: Vec<Range<usize>>,
        total: usize,
        kind: &'static str,
    ) -> Result<Self> {
        let contiguous = bands.windows(2).all(|w| w[0].end == w[1].start);
        if bands.len() != comm.size()
            || bands.iter().any(|b| b.is_empty())
            || !contiguous
            || bands.first().map(|b| b.start) != Some(0)
            || bands.last().map(|b| b.end) != Some(total)
        {
            return Err(ParallelError::Model(format!(
                "{kind}: bands {bands:?} are not {} non-empty contiguous bands of {total} rows",
                comm.size()
            )));
        }
        Ok(ExactRows { comm, bands, total, kind })
    }

    /// Every rank's rows at a map of `total_rows` rows.
    fn rows_at(&self, total_rows: usize) -> Vec<usize> {
        self.bands.iter().map(|b| b.len() * total_rows / self.total).collect()
    }
}

impl<B: Backend> Seams<B> for ExactRows<'_, B> {
    fn self_attention(
        &mut self,
        _site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let kv = self.comm.all_gather(Tensor::stack::<5>(vec![k, v], 0), 3)?;
        let k = kv.clone().narrow(0, 0, 1).squeeze_dim::<4>(0);
        let v = kv.narrow(0, 1, 1).squeeze_dim::<4>(0);
        Ok(sdpa(q, k, v, None))
    }

    fn conv_halo(&mut self, site: &RowSite, x: Tensor<B, 4>, halo: usize) -> Result<Halo<B>> {
        let (r, n) = (self.comm.rank(), self.comm.size());
        let rows = x.dims()[2];
        if n == 1 || halo == 0 {
            return Ok(Halo { tensor: x, top: 0, bottom: 0 });
        }
        if rows < halo {
            return Err(ParallelError::Model(format!(
                "{}: conv {} has a band of {rows} rows, fewer than its {halo} halo rows",
                self.kind, site.index
            )));
        }
        let tag = |dir: u32| Tag::new(self.kind).layer(site.index as u32).patch(dir);
        let mut parts = Vec::with_capacity(3);
        let mut top = 0;
        if r > 0 {
            let mine = x.clone().narrow(2, 0, halo);
            parts.push(self.comm.send_recv(mine, r - 1, tag(0), r - 1, tag(1))?);
            top = halo;
        }
        let below = if r + 1 < n {
            let mine = x.clone().narrow(2, rows - halo, halo);
            Some(self.comm.send_recv(mine, r + 1, tag(1), r + 1, tag(0))?)
        } else {
            None
        };
        parts.push(x);
        let bottom = below.as_ref().map_or(0, |_| halo);
        parts.extend(below);
        Ok(Halo { tensor: Tensor::cat(parts, 2), top, bottom })
    }

    fn group_norm_stats(
        &mut self,
        site: &RowSite,
        local: GroupNormStats<B>,
    ) -> Result<GroupNormStats<B>> {
        if self.comm.size() == 1 {
            return Ok(local);
        }
        let rows = self.rows_at(site.total_rows);
        let mine = rows[self.comm.rank()];
        if mine != site.rows.len() || mine == 0 {
            return Err(ParallelError::Model(format!(
                "{}: group norm {} holds rows {:?} of {}, not this rank's {mine}",
                self.kind, site.index, site.rows, site.total_rows
            )));
        }
        let per_row = local.count / mine;
        let all = self.comm.all_gather(local.pack(), 0)?;
        let counts: Vec<usize> = rows.iter().map(|n| n * per_row).collect();
        let parts = GroupNormStats::unpack(&all, &counts);
        Ok(GroupNormStats::merge(&parts))
    }
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

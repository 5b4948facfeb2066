//! Independent single-rank references of every strategy's definition ([`Reference`]), built on
//! the serial model and its seams — never on a strategy's code.
//!
//! Everything here runs on one rank, one band of latent rows at a time, through
//! [`Denoiser::forward_rows`] with seams written for the reference:
//!
//! - **warmup / serial steps** run the whole latent with [`Recording`] seams: plain attention
//!   over every token, keeping each layer's K and V (`[2, B, H, p, d]`).
//! - **stale steps** ([`StaleKv`]) run band after band. In every self-attention a band sees a
//!   K/V of the whole sequence made of: its own fresh K/V; the other bands' K/V as they
//!   were `stale_by` steps ago (1 by the definitions); and, where `earlier_fresh` (PipeFusion),
//!   the fresh K/V that bands earlier in this same step produced. What every band produced
//!   becomes the K/V of this step.
//! - **local patches** (naive patch) run each band with the serial seams, which attend to
//!   the band's own tokens only.
//!
//! A U-Net's displaced patches also need, at a stale step, the previous step's rows of
//! every convolution's input next to the band, and every band's group-norm statistics of the
//! previous step. A warmup step therefore records every conv's whole input map, and runs
//! the bands once more with seams that hand each band the whole map's rows, statistics and
//! K/V ([`ExactBand`]), only to record each band's own statistics. A stale step reads the
//! halo rows and the statistics from the last step's record and puts the GroupNorm's
//! statistics together as [`GroupNormMode`] defines them — with its own merge (pairwise,
//! where the strategies sum) and moments, written here again. `sync` statistics after warmup
//! need every band's fresh statistics within one step, which band-after-band cannot give:
//! the suite declares that mode with a warmup longer than its loops.
//!
//! The knobs `stale_by`, `own_fresh` and `earlier_fresh` exist so that the suite can show
//! what it catches: a strategy whose bookkeeping were one step or one patch off would equal
//! one of the [`Variant`]s instead of its definition.

use std::collections::VecDeque;
use std::ops::Range;

use burn::tensor::Tensor;
use parallel_core::attention::{joint_sdpa, sdpa};
use parallel_core::{
    AttentionSite, DenoiseLoop, Denoiser, DenoiserInput, GroupNormMode, GroupNormStats, Halo,
    JointOutput, ModelFamily, ParallelError, Reference, Result, RowSite, Seams, Serial, TextQkv,
};

use crate::B;

/// `total` token rows in `parts` contiguous bands, balanced, longer bands first (10 over 4:
/// 3, 3, 2, 2) — written here again, on purpose, rather than borrowed from the strategies.
pub fn bands(total: usize, parts: usize) -> Vec<Range<usize>> {
    let (base, extra) = (total / parts, total % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            start += len;
            start - len..start
        })
        .collect()
}

/// Per layer, K and V of every token: `[2, B, H, p, d]`.
pub type Kv = Vec<Tensor<B, 5>>;

/// What one step left for the next (see the [module docs](self)).
#[derive(Clone)]
pub struct Record {
    /// K/V by attention layer.
    pub kv: Kv,
    /// U-Net: every conv's whole input map, `[B, C, rows, W]`, by conv site.
    pub convs: Vec<Tensor<B, 4>>,
    /// U-Net: every band's own statistics, by norm site, then band.
    pub norms: Vec<Vec<GroupNormStats<B>>>,
}

fn grow<T>(v: &mut Vec<Option<T>>, i: usize) -> &mut Option<T> {
    if v.len() <= i {
        v.resize_with(i + 1, || None);
    }
    &mut v[i]
}

fn complete<T>(v: Vec<Option<T>>, what: &str) -> Result<Vec<T>> {
    v.into_iter()
        .enumerate()
        .map(|(i, t)| t.ok_or_else(|| ParallelError::Model(format!("{what} {i} was not passed"))))
        .collect()
}

/// Serial seams that keep every layer's K and V, every conv's input and every norm's
/// whole-map statistics.
#[derive(Default)]
pub struct Recording {
    kv: Vec<Option<Tensor<B, 5>>>,
    convs: Vec<Option<Tensor<B, 4>>>,
    norms: Vec<Option<GroupNormStats<B>>>,
}

impl Recording {
    /// The recorded K/V, by layer.
    pub fn into_kv(self) -> Result<Kv> {
        complete(self.kv, "self-attention layer")
    }

    fn into_parts(self) -> Result<(Record, Vec<GroupNormStats<B>>)> {
        let record = Record {
            kv: complete(self.kv, "self-attention layer")?,
            convs: complete(self.convs, "conv")?,
            norms: Vec::new(),
        };
        Ok((record, complete(self.norms, "group norm")?))
    }
}

impl Seams<B> for Recording {
    fn self_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        *grow(&mut self.kv, site.layer) = Some(Tensor::stack(vec![k.clone(), v.clone()], 0));
        Ok(sdpa(q, k, v, None))
    }

    /// MMDiT: the image tokens' K/V recorded; the text's, fresh every step, are not kept.
    fn joint_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        text: TextQkv<B>,
    ) -> Result<JointOutput<B>> {
        *grow(&mut self.kv, site.layer) = Some(Tensor::stack(vec![k.clone(), v.clone()], 0));
        Ok(joint_sdpa(q, k, v, text))
    }

    fn conv_halo(&mut self, site: &RowSite, x: Tensor<B, 4>, _halo: usize) -> Result<Halo<B>> {
        *grow(&mut self.convs, site.index) = Some(x.clone());
        Ok(Halo { tensor: x, top: 0, bottom: 0 })
    }

    fn group_norm_stats(
        &mut self,
        site: &RowSite,
        local: GroupNormStats<B>,
    ) -> Result<GroupNormStats<B>> {
        *grow(&mut self.norms, site.index) = Some(local.clone());
        Ok(local)
    }
}

/// `map`'s rows `rows` with up to `halo` real rows of `source` (the whole map) above and
/// below, as the whole-map convolution sees them.
fn with_halo(source: &Tensor<B, 4>, x: Tensor<B, 4>, rows: &Range<usize>, halo: usize) -> Halo<B> {
    let total = source.dims()[2];
    let top = halo.min(rows.start);
    let bottom = halo.min(total - rows.end);
    let mut parts = Vec::new();
    if top > 0 {
        parts.push(source.clone().narrow(2, rows.start - top, top));
    }
    parts.push(x);
    if bottom > 0 {
        parts.push(source.clone().narrow(2, rows.end, bottom));
    }
    Halo { tensor: Tensor::cat(parts, 2), top, bottom }
}

/// One band of a warmup step, given everything the whole-map forward had (its neighbours'
/// rows, the whole map's statistics and K/V): what the band computes equals the whole map's
/// rows, and its own statistics are kept.
pub struct ExactBand<'a> {
    whole: &'a Record,
    whole_norms: &'a [GroupNormStats<B>],
    /// This band's statistics, by norm site.
    own: Vec<Option<GroupNormStats<B>>>,
}

impl Seams<B> for ExactBand<'_> {
    fn self_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        _k: Tensor<B, 4>,
        _v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let kv = self.whole.kv[site.layer].clone();
        let k = kv.clone().narrow(0, 0, 1).squeeze_dim::<4>(0);
        let v = kv.narrow(0, 1, 1).squeeze_dim::<4>(0);
        Ok(sdpa(q, k, v, None))
    }

    fn conv_halo(&mut self, site: &RowSite, x: Tensor<B, 4>, halo: usize) -> Result<Halo<B>> {
        Ok(with_halo(&self.whole.convs[site.index], x, &site.rows, halo))
    }

    fn group_norm_stats(
        &mut self,
        site: &RowSite,
        local: GroupNormStats<B>,
    ) -> Result<GroupNormStats<B>> {
        *grow(&mut self.own, site.index) = Some(local);
        Ok(self.whole_norms[site.index].clone())
    }
}

/// Statistics of the union of two disjoint parts, pairwise: `δ = mean_b − mean_a`,
/// `mean = mean_a + δ·n_b/n`, `M2 = M2_a + M2_b + δ²·n_a·n_b/n`.
fn union(a: &GroupNormStats<B>, b: &GroupNormStats<B>) -> GroupNormStats<B> {
    let n = a.count + b.count;
    let delta = b.mean.clone() - a.mean.clone();
    let mean = a.mean.clone() + delta.clone().mul_scalar(b.count as f64 / n as f64);
    let m2 = a.m2.clone()
        + b.m2.clone()
        + (delta.clone() * delta).mul_scalar((a.count as f64) * (b.count as f64) / n as f64);
    GroupNormStats { mean, m2, count: n }
}

fn union_all(parts: &[GroupNormStats<B>]) -> GroupNormStats<B> {
    let mut acc = parts[0].clone();
    for p in &parts[1..] {
        acc = union(&acc, p);
    }
    acc
}

/// The statistics band `band` normalises with after warmup, by `mode`'s definition.
fn stale_norm(
    mode: GroupNormMode,
    stale: &[GroupNormStats<B>],
    band: usize,
    fresh: GroupNormStats<B>,
) -> Result<GroupNormStats<B>> {
    match mode {
        GroupNormMode::Separate => Ok(fresh),
        GroupNormMode::Stale => {
            let mut parts = stale.to_vec();
            parts[band] = fresh;
            Ok(union_all(&parts))
        }
        GroupNormMode::CorrectedAsync => {
            // Moments E[x], E[x²] of every stale band, weighted by its elements.
            let n: usize = stale.iter().map(|s| s.count).sum();
            let moments = |s: &GroupNormStats<B>| {
                let e = s.mean.clone();
                let e2 = s.m2.clone().div_scalar(s.count as f64) + e.clone() * e.clone();
                (e, e2)
            };
            let mut e_all = stale[0].mean.zeros_like();
            let mut e2_all = e_all.clone();
            for s in stale {
                let (e, e2) = moments(s);
                let w = s.count as f64 / n as f64;
                e_all = e_all + e.mul_scalar(w);
                e2_all = e2_all + e2.mul_scalar(w);
            }
            let (e_own, e2_own) = moments(&fresh);
            let (e_was, e2_was) = moments(&stale[band]);
            let e = e_all + e_own - e_was;
            let e2 = e2_all + e2_own - e2_was;
            let var = e2 - e.clone() * e.clone();
            let own_var = fresh.m2.clone().div_scalar(fresh.count as f64);
            let var = var.clone().mask_where(var.lower_elem(0.0), own_var);
            Ok(GroupNormStats { mean: e, m2: var.mul_scalar(n as f64), count: n })
        }
        GroupNormMode::Sync => Err(ParallelError::Model(
            "the sequential reference cannot define sync statistics after warmup (every band's \
             fresh statistics within the step); declare the case with warmup ≥ steps"
                .into(),
        )),
    }
}

/// How a stale step's attention is put together (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// Other bands' K/V come from this many steps back (the definitions: 1).
    pub stale_by: usize,
    /// A band sees its own fresh K/V (the definitions: yes).
    pub own_fresh: bool,
    /// Bands earlier in the same step are seen fresh (PipeFusion: yes; DistriFusion: no).
    pub earlier_fresh: bool,
}

struct StaleKv<'a> {
    base: &'a Record,
    /// This step's record so far: `base` with every band run so far spliced in.
    working: &'a mut Record,
    variant: Variant,
    /// The band being run, and the group-norm statistics' definition.
    band: usize,
    norm: GroupNormMode,
}

fn splice(kv: Tensor<B, 5>, tokens: Range<usize>, part: Tensor<B, 5>) -> Tensor<B, 5> {
    let d = kv.dims();
    kv.slice_assign([0..d[0], 0..d[1], 0..d[2], tokens, 0..d[4]], part)
}

impl StaleKv<'_> {
    /// The image K/V the band sees at `site` (see the [module docs](self)); records its own.
    fn seen(
        &mut self,
        site: &AttentionSite,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let l = site.layer;
        let fresh: Tensor<B, 5> = Tensor::stack(vec![k, v], 0);
        let seen = if self.variant.earlier_fresh { &self.working.kv[l] } else { &self.base.kv[l] };
        let seen = if self.variant.own_fresh {
            splice(seen.clone(), site.tokens.clone(), fresh.clone())
        } else {
            seen.clone()
        };
        self.working.kv[l] = splice(self.working.kv[l].clone(), site.tokens.clone(), fresh);
        let k_all = seen.clone().narrow(0, 0, 1).squeeze_dim::<4>(0);
        let v_all = seen.narrow(0, 1, 1).squeeze_dim::<4>(0);
        (k_all, v_all)
    }
}

impl Seams<B> for StaleKv<'_> {
    fn self_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let (k, v) = self.seen(site, k, v);
        Ok(sdpa(q, k, v, None))
    }

    /// MMDiT: the image K/V as for a self-attention, the text's this step's (the band
    /// computes the whole text stream itself).
    fn joint_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        text: TextQkv<B>,
    ) -> Result<JointOutput<B>> {
        let (k, v) = self.seen(site, k, v);
        Ok(joint_sdpa(q, k, v, text))
    }

    fn conv_halo(&mut self, site: &RowSite, x: Tensor<B, 4>, halo: usize) -> Result<Halo<B>> {
        let i = site.index;
        let [b, c, _, w] = x.dims();
        let rows = site.rows.clone();
        self.working.convs[i] =
            self.working.convs[i].clone().slice_assign([0..b, 0..c, rows.clone(), 0..w], x.clone());
        Ok(with_halo(&self.base.convs[i], x, &rows, halo))
    }

    fn group_norm_stats(
        &mut self,
        site: &RowSite,
        local: GroupNormStats<B>,
    ) -> Result<GroupNormStats<B>> {
        let i = site.index;
        self.working.norms[i][self.band] = local.clone();
        stale_norm(self.norm, &self.base.norms[i], self.band, local)
    }
}

/// The reference loop of one strategy definition.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Every step serial.
    Serial,
    /// Stale K/V over `bands` (token rows) after `warmup_steps` serial steps.
    Stale {
        /// Token-row bands, run in order.
        bands: Vec<Range<usize>>,
        /// Serial steps first.
        warmup_steps: usize,
        /// How attention is put together.
        variant: Variant,
        /// Step each band with the scheduler as soon as it is done, with its own region
        /// state (PipeFusion), rather than the whole latent after all bands.
        step_bands: bool,
        /// A U-Net's group-norm statistics after warmup.
        norm: GroupNormMode,
    },
    /// Every band alone, attending to its own tokens.
    Local {
        /// Token-row bands.
        bands: Vec<Range<usize>>,
    },
}

impl Plan {
    /// The plan of `reference` on a latent of `token_rows` rows of the model's row
    /// granularity (token rows for a DiT) and a world of `n`.
    pub fn of(reference: &Reference, token_rows: usize, n: usize) -> Self {
        let exact = Variant { stale_by: 1, own_fresh: true, earlier_fresh: false };
        match reference {
            Reference::Serial => Plan::Serial,
            Reference::DisplacedPatches { warmup_steps, norm } => Plan::Stale {
                bands: bands(token_rows, n),
                warmup_steps: *warmup_steps,
                variant: exact,
                step_bands: false,
                norm: *norm,
            },
            Reference::LocalPatches => Plan::Local { bands: bands(token_rows, n) },
            Reference::PipelinedPatches { patches, warmup_steps } => Plan::Stale {
                bands: bands(token_rows, *patches),
                warmup_steps: *warmup_steps,
                variant: Variant { earlier_fresh: true, ..exact },
                step_bands: true,
                norm: GroupNormMode::Sync,
            },
        }
    }

    /// This plan with another attention variant (a deliberate mutation).
    pub fn with_variant(self, v: Variant) -> Self {
        match self {
            Plan::Stale { bands, warmup_steps, step_bands, norm, .. } => {
                Plan::Stale { bands, warmup_steps, variant: v, step_bands, norm }
            }
            other => other,
        }
    }
}

/// Latent rows of `rows` in units of `patch` latent rows (the model's row granularity).
fn latent_rows(rows: &Range<usize>, patch: usize) -> Range<usize> {
    rows.start * patch..rows.end * patch
}

/// The reference's output of one lone forward (step 0 of a request): serial, except for
/// local patches.
pub fn forward(
    plan: &Plan,
    model: &dyn Denoiser<B>,
    input: &DenoiserInput<B>,
) -> Result<Tensor<B, 4>> {
    let height = input.grid().height;
    match plan {
        Plan::Serial | Plan::Stale { .. } => model.forward_rows(input, 0..height, &mut Serial),
        Plan::Local { bands } => local(model, input, bands),
    }
}

fn local(
    model: &dyn Denoiser<B>,
    input: &DenoiserInput<B>,
    bands: &[Range<usize>],
) -> Result<Tensor<B, 4>> {
    let patch = model.desc().row_granularity;
    let outs = bands
        .iter()
        .map(|b| model.forward_rows(input, latent_rows(b, patch), &mut Serial))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(outs, 2))
}

/// The reference's final latents of the loop `sampler` drives from `latents`.
pub fn denoise(
    plan: &Plan,
    model: &dyn Denoiser<B>,
    sampler: &mut dyn DenoiseLoop<B>,
    latents: Tensor<B, 4>,
) -> Result<Tensor<B, 4>> {
    let patch = model.desc().row_granularity;
    let unet = model.desc().family == ModelFamily::Unet;
    let height = latents.dims()[2];
    let mut latents = latents;
    // What the last steps left, newest last (stale plans only).
    let mut history: VecDeque<Record> = VecDeque::new();
    for step in 0..sampler.num_steps() {
        let input = sampler.model_input(step, &latents)?;
        match plan {
            Plan::Serial => {
                let noise = model.forward_rows(&input, 0..height, &mut Serial)?;
                latents = sampler.step(step, 0..height, noise, latents)?;
            }
            Plan::Local { bands } => {
                let noise = local(model, &input, bands)?;
                latents = sampler.step(step, 0..height, noise, latents)?;
            }
            Plan::Stale { warmup_steps, bands, .. } if step < *warmup_steps => {
                let mut rec = Recording::default();
                let noise = model.forward_rows(&input, 0..height, &mut rec)?;
                let (mut record, whole_norms) = rec.into_parts()?;
                if unet {
                    record.norms = band_stats(model, &input, bands, &record, &whole_norms)?;
                }
                history.push_back(record);
                latents = sampler.step(step, 0..height, noise, latents)?;
            }
            Plan::Stale { bands, variant, step_bands, norm, .. } => {
                if history.is_empty() {
                    return Err(ParallelError::Model(
                        "a stale step before any warmup step: warmup_steps must be ≥ 1".into(),
                    ));
                }
                let back = variant.stale_by.clamp(1, history.len());
                let base = history[history.len() - back].clone();
                let mut working = base.clone();
                let mut outs = Vec::new();
                for (band, b) in bands.iter().enumerate() {
                    let rows = latent_rows(b, patch);
                    let mut seams = StaleKv {
                        base: &base,
                        working: &mut working,
                        variant: *variant,
                        band,
                        norm: *norm,
                    };
                    let noise = model.forward_rows(&input, rows.clone(), &mut seams)?;
                    if *step_bands {
                        let current = latents.clone().narrow(2, rows.start, rows.len());
                        let next = sampler.step(step, rows.clone(), noise, current)?;
                        let [bt, c, _, w] = latents.dims();
                        latents = latents.slice_assign([0..bt, 0..c, rows, 0..w], next);
                    } else {
                        outs.push(noise);
                    }
                }
                if !*step_bands {
                    latents = sampler.step(step, 0..height, Tensor::cat(outs, 2), latents)?;
                }
                history.push_back(working);
            }
        }
        if history.len() > 2 {
            history.pop_front();
        }
    }
    Ok(latents)
}

/// Every band's own statistics at every norm of a warmup step (rows of the whole map, as
/// [`ExactBand`] reproduces them), by norm site, then band.
fn band_stats(
    model: &dyn Denoiser<B>,
    input: &DenoiserInput<B>,
    bands: &[Range<usize>],
    whole: &Record,
    whole_norms: &[GroupNormStats<B>],
) -> Result<Vec<Vec<GroupNormStats<B>>>> {
    let patch = model.desc().row_granularity;
    let mut per_norm: Vec<Vec<GroupNormStats<B>>> = vec![Vec::new(); whole_norms.len()];
    for b in bands {
        let mut seams = ExactBand { whole, whole_norms, own: Vec::new() };
        model.forward_rows(input, latent_rows(b, patch), &mut seams)?;
        for (i, s) in complete(seams.own, "group norm")?.into_iter().enumerate() {
            per_norm[i].push(s);
        }
    }
    Ok(per_norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_are_balanced_longer_first() {
        assert_eq!(bands(10, 4), vec![0..3, 3..6, 6..8, 8..10]);
        assert_eq!(bands(8, 2), vec![0..4, 4..8]);
        assert_eq!(bands(8, 1), vec![0..8]);
    }
}

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
//! The knobs `stale_by`, `own_fresh` and `earlier_fresh` exist so that the suite can show
//! what it catches: a strategy whose bookkeeping were one step or one patch off would equal
//! one of the [`Variant`]s instead of its definition.

use std::collections::VecDeque;
use std::ops::Range;

use burn::tensor::Tensor;
use parallel_core::attention::sdpa;
use parallel_core::{
    AttentionSite, DenoiseLoop, Denoiser, DenoiserInput, ParallelError, Reference, Result, Seams,
    Serial,
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

/// Serial attention that keeps every layer's K and V.
#[derive(Default)]
pub struct Recording {
    kv: Vec<Option<Tensor<B, 5>>>,
}

impl Recording {
    /// The recorded K/V, by layer.
    pub fn into_kv(self) -> Result<Kv> {
        self.kv
            .into_iter()
            .enumerate()
            .map(|(l, t)| {
                t.ok_or_else(|| ParallelError::Model(format!("layer {l} had no self-attention")))
            })
            .collect()
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
        if self.kv.len() <= site.layer {
            self.kv.resize_with(site.layer + 1, || None);
        }
        self.kv[site.layer] = Some(Tensor::stack(vec![k.clone(), v.clone()], 0));
        Ok(sdpa(q, k, v, None))
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
    base: &'a Kv,
    /// This step's K/V so far: `base` with every band run so far spliced in.
    working: &'a mut Kv,
    variant: Variant,
}

fn splice(kv: Tensor<B, 5>, tokens: Range<usize>, part: Tensor<B, 5>) -> Tensor<B, 5> {
    let d = kv.dims();
    kv.slice_assign([0..d[0], 0..d[1], 0..d[2], tokens, 0..d[4]], part)
}

impl Seams<B> for StaleKv<'_> {
    fn self_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let l = site.layer;
        let fresh: Tensor<B, 5> = Tensor::stack(vec![k, v], 0);
        let seen = if self.variant.earlier_fresh { &self.working[l] } else { &self.base[l] };
        let seen = if self.variant.own_fresh {
            splice(seen.clone(), site.tokens.clone(), fresh.clone())
        } else {
            seen.clone()
        };
        self.working[l] = splice(self.working[l].clone(), site.tokens.clone(), fresh);
        let k_all = seen.clone().narrow(0, 0, 1).squeeze_dim::<4>(0);
        let v_all = seen.narrow(0, 1, 1).squeeze_dim::<4>(0);
        Ok(sdpa(q, k_all, v_all, None))
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
    },
    /// Every band alone, attending to its own tokens.
    Local {
        /// Token-row bands.
        bands: Vec<Range<usize>>,
    },
}

impl Plan {
    /// The plan of `reference` on a latent of `token_rows` token rows and a world of `n`.
    pub fn of(reference: &Reference, token_rows: usize, n: usize) -> Self {
        let exact = Variant { stale_by: 1, own_fresh: true, earlier_fresh: false };
        match reference {
            Reference::Serial => Plan::Serial,
            Reference::DisplacedPatches { warmup_steps } => Plan::Stale {
                bands: bands(token_rows, n),
                warmup_steps: *warmup_steps,
                variant: exact,
                step_bands: false,
            },
            Reference::LocalPatches => Plan::Local { bands: bands(token_rows, n) },
            Reference::PipelinedPatches { patches, warmup_steps } => Plan::Stale {
                bands: bands(token_rows, *patches),
                warmup_steps: *warmup_steps,
                variant: Variant { earlier_fresh: true, ..exact },
                step_bands: true,
            },
        }
    }

    /// This plan with another attention variant (a deliberate mutation).
    pub fn with_variant(self, v: Variant) -> Self {
        match self {
            Plan::Stale { bands, warmup_steps, step_bands, .. } => {
                Plan::Stale { bands, warmup_steps, variant: v, step_bands }
            }
            other => other,
        }
    }
}

/// Latent rows of token rows `rows`.
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
    let patch = model.desc().patch_size;
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
    let patch = model.desc().patch_size;
    let height = latents.dims()[2];
    let mut latents = latents;
    // K/V of the last steps, newest last (stale plans only).
    let mut history: VecDeque<Kv> = VecDeque::new();
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
            Plan::Stale { warmup_steps, .. } if step < *warmup_steps => {
                let mut rec = Recording::default();
                let noise = model.forward_rows(&input, 0..height, &mut rec)?;
                history.push_back(rec.into_kv()?);
                latents = sampler.step(step, 0..height, noise, latents)?;
            }
            Plan::Stale { bands, variant, step_bands, .. } => {
                if history.is_empty() {
                    return Err(ParallelError::Model(
                        "a stale step before any warmup step: warmup_steps must be ≥ 1".into(),
                    ));
                }
                let back = variant.stale_by.clamp(1, history.len());
                let base = history[history.len() - back].clone();
                let mut working = base.clone();
                let mut outs = Vec::new();
                for b in bands {
                    let rows = latent_rows(b, patch);
                    let mut seams =
                        StaleKv { base: &base, working: &mut working, variant: *variant };
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

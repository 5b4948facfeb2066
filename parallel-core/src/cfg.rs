//! CFG parallelism: the classifier-free-guidance batch `[negative, positive]` split over two
//! rank groups, each running any registered strategy on its half.
//!
//! With `cfg_degree = 2` the world's ranks form the mesh `cfg × inner` ([`Axis::Cfg`] outside
//! the inner strategy's axes, see [`crate::mesh`]): ranks `0..m` hold the negative
//! (unconditional) half, ranks `m..2m` the positive one, and rank `i` of one group is paired
//! with rank `i` of the other. Every evaluation the inner strategy makes on its group sees
//! one half of the batch; the pair exchanges its noise predictions (one all-gather over the
//! cfg axis, `B/2 · C_out · H · W` elements per rank and step) so that both halves hold the
//! whole guidance batch, and guidance and the scheduler step run identically on both.
//!
//! The inner strategy is unaware of the split: [`CfgParallel`] hands it a request of half the
//! batch, half of every model input, and a [`DenoiseLoop`] whose `step` gathers the other
//! half's prediction before the pipeline's guidance — so strategies that drive their own loop
//! (PipeFusion steps a patch at a time on its last stage) compose as well as those that only
//! forward. Serial inside is plain CFG parallelism on two ranks.

use std::ops::Range;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::comm::{Comm, OpKind};
use crate::error::{ParallelError, Result};
use crate::mesh::{Axis, Mesh};
use crate::model::{Denoiser, DenoiserInput, LoadPlan, ModelDesc};
use crate::strategy::{
    CurrentRequest, DenoiseLoop, ExpectedComm, ParallelStrategy, RequestInfo, StepKind,
};

/// The config key (and `--cfg-degree`) of the degree.
pub const CFG_DEGREE_KEY: &str = "parallel.cfg_degree";

/// A strategy run on one half of the guidance batch, paired with the other half's group.
pub struct CfgParallel<B: Backend> {
    world: Comm<B>,
    cfg: Comm<B>,
    inner: Box<dyn ParallelStrategy<B>>,
    name: String,
    /// 0: the negative (unconditional) half, 1: the positive one.
    half: usize,
    request: CurrentRequest,
}

impl<B: Backend> std::fmt::Debug for CfgParallel<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CfgParallel").field("name", &self.name).field("half", &self.half).finish()
    }
}

/// The rank groups of `cfg_degree` on `world`: the mesh `cfg × inner`, checked.
///
/// # Errors
/// A degree other than 1 or 2, or a world the degree does not divide.
pub fn cfg_mesh(world_size: usize, cfg_degree: usize) -> Result<Mesh> {
    if !(1..=2).contains(&cfg_degree) {
        return Err(ParallelError::Mesh(format!(
            "{CFG_DEGREE_KEY} is {cfg_degree}; it must be 1 or 2 (the guidance batch has two \
             halves)"
        )));
    }
    if world_size == 0 || !world_size.is_multiple_of(cfg_degree) {
        return Err(ParallelError::Mesh(format!(
            "{CFG_DEGREE_KEY} {cfg_degree} does not divide the {world_size} ranks: the world \
             is cfg_degree × the inner strategy's ranks; use an even world size or cfg_degree 1"
        )));
    }
    // The inner strategy lays its own axes out over its group; here they stand as one
    // placeholder axis (tensor, the innermost) of the group's size.
    Mesh::new(world_size, &[(Axis::Cfg, cfg_degree), (Axis::Tensor, world_size / cfg_degree)])
}

impl<B: Backend> CfgParallel<B> {
    /// Splits `world` into the two halves' groups and builds the inner strategy on this
    /// rank's group with `inner` (every rank of the world must call this).
    ///
    /// # Errors
    /// An odd world, or the inner strategy's own refusal of its group (its message prefixed
    /// with the composition, so the degrees at fault are all named).
    pub fn new(
        world: Comm<B>,
        inner: impl FnOnce(Comm<B>) -> Result<Box<dyn ParallelStrategy<B>>>,
    ) -> Result<Self> {
        let mesh = cfg_mesh(world.size(), 2)?;
        let group = world.split(&mesh, &[Axis::Tensor])?;
        let cfg = world.split(&mesh, &[Axis::Cfg])?;
        let half = mesh.coord(world.rank(), Axis::Cfg);
        let m = group.size();
        let inner = inner(group).map_err(|e| context(e, world.size(), m))?;
        let name = format!("cfg2×{}", inner.name());
        Ok(CfgParallel { world, cfg, inner, name, half, request: CurrentRequest::default() })
    }

    /// The inner strategy (on this rank's half).
    pub fn inner(&self) -> &dyn ParallelStrategy<B> {
        self.inner.as_ref()
    }

    /// Which half of the guidance batch this rank's group evaluates: 0 negative, 1 positive.
    pub fn half(&self) -> usize {
        self.half
    }

    fn halves(batch: usize, half: usize) -> Range<usize> {
        let b = batch / 2;
        half * b..(half + 1) * b
    }

    /// The request the inner strategy serves: half the batch.
    pub fn inner_request(request: &RequestInfo) -> RequestInfo {
        RequestInfo { batch: request.batch / 2, ..request.clone() }
    }

    /// Elements one rank sends in the cfg exchange of one evaluation (all rows).
    pub fn exchange_elements(model: &ModelDesc, request: &RequestInfo) -> u64 {
        (request.batch / 2 * model.out_channels * request.grid.height * request.grid.width) as u64
    }
}

fn context(e: ParallelError, world: usize, m: usize) -> ParallelError {
    match e {
        ParallelError::Unsupported { strategy, reason } => ParallelError::Unsupported {
            strategy: format!("cfg2×{strategy}"),
            reason: format!(
                "{reason} (with {CFG_DEGREE_KEY} 2 the {world} ranks are 2 groups of {m}: the \
                 inner strategy's degrees must multiply to {m})"
            ),
        },
        ParallelError::BadOption { strategy, key, reason } => ParallelError::BadOption {
            strategy,
            key,
            reason: format!(
                "{reason} (with {CFG_DEGREE_KEY} 2 the {world} ranks are 2 groups of {m}: the \
                 inner strategy's degrees must multiply to {m})"
            ),
        },
        other => other,
    }
}

impl<B: Backend> ParallelStrategy<B> for CfgParallel<B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn comm(&self) -> &Comm<B> {
        &self.world
    }

    fn validate(&self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        if request.batch != 2 * request.images {
            return Err(ParallelError::Unsupported {
                strategy: self.name.clone(),
                reason: format!(
                    "{CFG_DEGREE_KEY} 2 splits the guidance batch [negative, positive] over two \
                     rank groups, but this request evaluates a batch of {} for {} image(s): \
                     classifier-free guidance is off (guidance scale ≤ 1, or a pipeline without \
                     it); set a guidance scale > 1 or {CFG_DEGREE_KEY} 1",
                    request.batch, request.images
                ),
            });
        }
        self.inner.validate(model, &Self::inner_request(request))
    }

    fn load_plan(&self, model: &ModelDesc) -> Result<LoadPlan> {
        self.inner.load_plan(model)
    }

    fn begin_request(&mut self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        self.request.begin(request);
        self.inner.begin_request(model, &Self::inner_request(request))
    }

    fn forward(
        &mut self,
        model: &dyn Denoiser<B>,
        input: &DenoiserInput<B>,
        step: usize,
    ) -> Result<Tensor<B, 4>> {
        self.request.check_input(&self.name, input)?;
        let half = input.batch_slice(Self::halves(input.batch(), self.half));
        let noise = self.inner.forward(model, &half, step)?;
        Ok(self.cfg.all_gather(noise, 0)?)
    }

    fn denoise(
        &mut self,
        model: &dyn Denoiser<B>,
        sampler: &mut dyn DenoiseLoop<B>,
        latents: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        self.request.get(&self.name)?;
        let mut half = HalfLoop { sampler, cfg: &self.cfg, half: self.half };
        self.inner.denoise(model, &mut half, latents)
    }

    fn steps_latents(&self) -> bool {
        self.inner.steps_latents()
    }

    fn buffer_bytes(&self) -> u64 {
        self.inner.buffer_bytes()
    }

    fn expected_comm(
        &self,
        model: &ModelDesc,
        request: &RequestInfo,
        step: StepKind,
    ) -> Result<ExpectedComm> {
        let mut e = self.inner.expected_comm(model, &Self::inner_request(request), step)?;
        // A lone forward returns the whole prediction on every rank; in a loop only the ranks
        // that step the latents receive predictions.
        let exchanges = matches!(step, StepKind::Forward) || self.inner.steps_latents();
        let n = if exchanges { Self::exchange_elements(model, request) } else { 0 };
        e.add(OpKind::AllGather, n);
        e.formula = format!(
            "{} on half the batch + cfg exchange B/2·C_out·H·W = {n} (all-gather of the noise \
             prediction over the cfg pair{})",
            e.formula,
            if exchanges { "" } else { "; this rank does not step the latents" }
        );
        Ok(e)
    }
}

/// The pipeline's loop as one half sees it: model inputs of its half of the guidance batch,
/// and scheduler steps that first gather the other half's noise prediction.
struct HalfLoop<'a, B: Backend> {
    sampler: &'a mut dyn DenoiseLoop<B>,
    cfg: &'a Comm<B>,
    half: usize,
}

impl<B: Backend> DenoiseLoop<B> for HalfLoop<'_, B> {
    fn num_steps(&self) -> usize {
        self.sampler.num_steps()
    }

    fn model_input(&mut self, step: usize, latents: &Tensor<B, 4>) -> Result<DenoiserInput<B>> {
        let whole = self.sampler.model_input(step, latents)?;
        Ok(whole.batch_slice(CfgParallel::<B>::halves(whole.batch(), self.half)))
    }

    fn step(
        &mut self,
        step: usize,
        region: Range<usize>,
        noise_pred: Tensor<B, 4>,
        latents: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let whole = self.cfg.all_gather(noise_pred, 0)?;
        self.sampler.step(step, region, whole, latents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degrees_other_than_one_or_two_and_odd_worlds_are_refused() {
        let e = cfg_mesh(4, 3).unwrap_err().to_string();
        assert!(e.contains("parallel.cfg_degree is 3") && e.contains("1 or 2"), "{e}");
        let e = cfg_mesh(3, 2).unwrap_err().to_string();
        assert!(e.contains("does not divide the 3 ranks"), "{e}");
        let m = cfg_mesh(4, 2).unwrap();
        // The halves are the outer axis: ranks 0, 1 negative, 2, 3 positive; pairs (0, 2), (1, 3).
        assert_eq!(m.group(1, &[Axis::Cfg]), vec![1, 3]);
        assert_eq!(m.group(2, &[Axis::Tensor]), vec![2, 3]);
    }
}

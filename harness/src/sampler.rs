//! The sampler side of the denoising loop: what `PixArtAlphaPipeline.__call__` does around
//! each transformer call, as a [`DenoiseLoop`] that any strategy drives. The one sampler of
//! the toolkit: `harness run`, `harness bench` and the conformance suite all step through it.
//!
//! Per step `i` with timestep `t`:
//! 1. [`model_input`](DenoiseLoop::model_input): the latents twice (`[negative, positive]`)
//!    with classifier-free guidance (guidance scale > 1), once without;
//!    `scale_model_input(·, i)`; `t` for every batch entry; the conditioning of every
//!    evaluation (prompt embeddings and mask, or class labels; PixArt-α 1024's `resolution`
//!    (`[height, width]` in pixels) and `aspect_ratio` (`height / width`) when the
//!    transformer uses additional conditions).
//! 2. [`step`](DenoiseLoop::step) on a band of latent rows (a *region*): guidance
//!    `u + g·(c − u)` over all output channels, then, with learned sigma (twice the latent
//!    channels out), only the first half (epsilon) is kept; then the scheduler step with the
//!    region's own state.
//!
//! # Regions
//! A strategy steps either the whole latent (rows `0..height`) or bands of rows (PipeFusion's
//! last stage steps each patch as it completes). Each region, keyed by its row range, has its
//! own [`SchedulerState`]; a region seen for the first time starts from the whole latent's
//! state narrowed to its rows if the whole latent has been stepped before (PipeFusion after
//! its synchronous warmup), else from a fresh state. Schedulers are elementwise, so this
//! equals stepping the whole latent.
//!
//! # Non-finite values
//! A NaN or infinity in a noise prediction, or in the latents a step produces, is an error
//! naming the step, the rows and the rank (a broken checkpoint or an overflowing f16 model
//! fails there, instead of ending as a black PNG and exit code 0).
//!
//! # Observing
//! [`Sampler::watch`] snapshots a communicator's counters at the start of every step (its
//! first `model_input` call), so that each step's traffic can be set beside the strategy's
//! formula for that step; [`Sampler::step_starts`] has the start times.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use indicatif::ProgressBar;
use parallel_core::{Comm, CommStats, DenoiseLoop, DenoiserInput, ParallelError};
use schedulers::{Schedule, SchedulerState};

use crate::pipeline::PromptEmbeds;

/// The settings of a [`Sampler`] that come from the request and the model.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerSettings {
    /// Classifier-free guidance scale; ≤ 1 turns guidance off (no unconditional batch).
    pub guidance_scale: f64,
    /// Images per request (the latents' batch).
    pub images: usize,
    /// Latent channels (the transformer's `in_channels`).
    pub latent_channels: usize,
    /// The transformer's output channels (twice the latent channels with learned sigma).
    pub out_channels: usize,
    /// `Some((height, width))` in pixels: pass PixArt-α 1024's `resolution` and
    /// `aspect_ratio` conditions.
    pub additional_conditions: Option<(usize, usize)>,
}

impl SamplerSettings {
    /// Whether classifier-free guidance is on (diffusers: `guidance_scale > 1`).
    pub fn guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }

    /// The batch of one denoiser evaluation: 2 × images with guidance.
    pub fn batch(&self) -> usize {
        if self.guidance() { 2 * self.images } else { self.images }
    }
}

/// Guidance, scheduler and per-region state of one request; see the [module docs](self).
pub struct Sampler<B: Backend> {
    schedule: Schedule,
    settings: SamplerSettings,
    /// What every evaluation carries besides latents and timesteps (its `hidden_states` and
    /// `timestep` are replaced at every step).
    conditioning: DenoiserInput<B>,
    states: BTreeMap<(usize, usize), SchedulerState<B, 4>>,
    /// Latent rows of the whole latent, from the first `model_input` call.
    height: Option<usize>,
    progress: Option<ProgressBar>,
    step_starts: Vec<Option<Instant>>,
    watched: Option<Comm<B>>,
    snapshots: Vec<CommStats>,
    device: B::Device,
    /// What the schedule's timesteps are divided by for the denoiser (1; FLUX's transformer
    /// takes `t / 1000`).
    timestep_divisor: f32,
}

impl<B: Backend> std::fmt::Debug for Sampler<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("scheduler", &self.schedule.class_name())
            .field("steps", &self.schedule.len())
            .field("settings", &self.settings)
            .field("regions", &self.states.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Sampler<B> {
    /// A sampler over `schedule` for a text-conditioned transformer; `text` is the prompt
    /// embeddings in batch order (`None` for a model without text).
    ///
    /// # Errors
    /// Text embeddings whose batch is not [`SamplerSettings::batch`].
    pub fn new(
        schedule: Schedule,
        settings: SamplerSettings,
        text: Option<PromptEmbeds<B>>,
        device: &B::Device,
    ) -> Result<Self, ParallelError> {
        let batch = settings.batch();
        let mut conditioning = DenoiserInput::new(
            Tensor::zeros([batch, 1, 1, 1], device),
            Tensor::zeros([batch], device),
        );
        if let Some(t) = text {
            conditioning.encoder_hidden_states = Some(t.embeds);
            conditioning.encoder_attention_mask = t.mask;
            conditioning.added_cond.extend(t.added_cond);
        }
        Self::with_conditioning(schedule, settings, conditioning)
    }

    /// A sampler whose every evaluation carries the conditioning of `template` (text and
    /// mask, class labels, added conditions; its `hidden_states` and `timestep` are
    /// replaced at every step): a fixture case, or a benchmark's random caption. The
    /// settings' additional conditions (`resolution`, `aspect_ratio`) are added where the
    /// template has none.
    ///
    /// # Errors
    /// A conditioning tensor whose batch is not [`SamplerSettings::batch`].
    pub fn with_conditioning(
        schedule: Schedule,
        settings: SamplerSettings,
        template: DenoiserInput<B>,
    ) -> Result<Self, ParallelError> {
        let batch = settings.batch();
        let mut template = template;
        let device = template.hidden_states.device();
        if let Some((h, w)) = settings.additional_conditions
            && !template.added_cond.contains_key("resolution")
        {
            let res: Vec<f32> = (0..batch).flat_map(|_| [h as f32, w as f32]).collect();
            let ar: Vec<f32> = vec![(h as f64 / w as f64) as f32; batch];
            template.added_cond.insert(
                "resolution".to_string(),
                Tensor::from_data(TensorData::new(res, [batch, 2]), &device),
            );
            template.added_cond.insert(
                "aspect_ratio".to_string(),
                Tensor::from_data(TensorData::new(ar, [batch, 1]), &device),
            );
        }
        let mut batches: Vec<(String, usize)> = Vec::new();
        if let Some(t) = &template.encoder_hidden_states {
            batches.push(("encoder_hidden_states".into(), t.dims()[0]));
        }
        if let Some(t) = &template.encoder_attention_mask {
            batches.push(("encoder_attention_mask".into(), t.dims()[0]));
        }
        if let Some(t) = &template.class_labels {
            batches.push(("class_labels".into(), t.dims()[0]));
        }
        for (k, v) in &template.added_cond {
            batches.push((k.clone(), v.dims()[0]));
        }
        if let Some((name, b)) = batches.iter().find(|(_, b)| *b != batch) {
            return Err(ParallelError::Model(format!(
                "the conditioning `{name}` has batch {b}, the denoiser batch is {batch} \
                 ({} image(s){})",
                settings.images,
                if settings.guidance() { " × 2 for guidance" } else { "" }
            )));
        }
        let steps = schedule.len();
        Ok(Sampler {
            schedule,
            settings,
            conditioning: template,
            states: BTreeMap::new(),
            height: None,
            progress: None,
            step_starts: vec![None; steps],
            watched: None,
            snapshots: Vec::new(),
            timestep_divisor: 1.0,
            device,
        })
    }

    /// Advances `bar` as steps begin (the first `model_input` call of each step).
    pub fn with_progress(mut self, bar: ProgressBar) -> Self {
        self.progress = Some(bar);
        self
    }

    /// Divides every timestep by `divisor` in the denoiser's input (FLUX's transformer takes
    /// the pipeline's `timestep / 1000`: 1000), in float32 as the pipeline does.
    pub fn with_timestep_divisor(mut self, divisor: f32) -> Self {
        self.timestep_divisor = divisor;
        self
    }

    /// Snapshots `comm`'s counters at the start of every step; errors name its rank.
    pub fn watch(mut self, comm: Comm<B>) -> Self {
        self.watched = Some(comm);
        self
    }

    /// The progress bar, if any.
    pub fn progress(&self) -> Option<&ProgressBar> {
        self.progress.as_ref()
    }

    /// The schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// The settings.
    pub fn settings(&self) -> &SamplerSettings {
        &self.settings
    }

    /// When each step began (its first `model_input` call), `None` for steps not begun.
    pub fn step_starts(&self) -> &[Option<Instant>] {
        &self.step_starts
    }

    /// The watched communicator's counters at the start of each step begun so far.
    pub fn snapshots(&self) -> &[CommStats] {
        &self.snapshots
    }

    /// The row ranges of the regions stepped so far.
    pub fn regions(&self) -> Vec<Range<usize>> {
        self.states.keys().map(|&(a, b)| a..b).collect()
    }

    /// The initial latents: `noise · init_noise_sigma` (diffusers scales given latents too).
    pub fn initial_latents(&self, noise: Tensor<B, 4>) -> Tensor<B, 4> {
        noise.mul_scalar(self.schedule.init_noise_sigma())
    }

    fn bad(&self, reason: String) -> ParallelError {
        ParallelError::Sampler { rank: self.watched.as_ref().map(|c| c.world_rank()), reason }
    }

    /// An error if `t` holds a NaN or an infinity (`0 · x` is NaN exactly for those, so one
    /// reduction of `0 · t` tells; the index is looked up only on failure).
    fn check_finite(
        &self,
        t: &Tensor<B, 4>,
        what: impl Fn() -> String,
    ) -> Result<(), ParallelError> {
        let probe: f32 = t.clone().mul_scalar(0.0).sum().into_scalar().elem();
        if probe == 0.0 {
            return Ok(());
        }
        let values = t.clone().into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
        let at = values.iter().position(|v| !v.is_finite());
        let (index, value) = match at {
            Some(i) => (i.to_string(), values[i].to_string()),
            None => ("?".into(), "?".into()),
        };
        Err(self.bad(format!(
            "{} holds a non-finite value ({value} at flat index {index} of {:?}): the model \
             diverged or its weights are broken",
            what(),
            t.dims()
        )))
    }
}

/// The state of `region`: its own, else the whole latent's narrowed to it, else fresh.
fn state_for<'s, B: Backend>(
    states: &'s mut BTreeMap<(usize, usize), SchedulerState<B, 4>>,
    schedule: &Schedule,
    height: Option<usize>,
    region: &Range<usize>,
) -> &'s mut SchedulerState<B, 4> {
    let key = (region.start, region.end);
    if !states.contains_key(&key) {
        let whole = height.and_then(|h| states.get(&(0, h)));
        let state = match whole {
            Some(s) => s.narrow(2, region.clone()),
            None => schedule.new_state(),
        };
        states.insert(key, state);
    }
    states.get_mut(&key).expect("inserted above")
}

fn scheduler_error(e: schedulers::SchedulerError) -> ParallelError {
    ParallelError::Sampler { rank: None, reason: e.to_string() }
}

impl<B: Backend> DenoiseLoop<B> for Sampler<B> {
    fn num_steps(&self) -> usize {
        self.schedule.len()
    }

    fn model_input(
        &mut self,
        step: usize,
        latents: &Tensor<B, 4>,
    ) -> Result<DenoiserInput<B>, ParallelError> {
        if step >= self.schedule.len() {
            return Err(self.bad(format!(
                "step {step} is past the schedule of {} steps",
                self.schedule.len()
            )));
        }
        if self.step_starts[step].is_none() {
            self.step_starts[step] = Some(Instant::now());
            if let Some(c) = &self.watched {
                self.snapshots.push(c.stats());
            }
            if let Some(bar) = &self.progress {
                bar.set_position(step as u64);
            }
            log::debug!("step {}/{} begins", step + 1, self.schedule.len());
        }
        let images = latents.dims()[0];
        self.height = Some(latents.dims()[2]);
        if images != self.settings.images {
            return Err(self.bad(format!(
                "latents have batch {images}, the request has {} images",
                self.settings.images
            )));
        }
        let doubled = if self.settings.guidance() {
            Tensor::cat(vec![latents.clone(), latents.clone()], 0)
        } else {
            latents.clone()
        };
        let batch = doubled.dims()[0];
        let mut input = self.conditioning.clone();
        input.hidden_states =
            self.schedule.scale_model_input(doubled, step).map_err(scheduler_error)?;
        let t =
            self.schedule.timestep(step).map_err(scheduler_error)? as f32 / self.timestep_divisor;
        input.timestep = Tensor::from_data(TensorData::new(vec![t; batch], [batch]), &self.device);
        Ok(input)
    }

    fn step(
        &mut self,
        step: usize,
        region: Range<usize>,
        noise_pred: Tensor<B, 4>,
        latents: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>, ParallelError> {
        // A denoiser computing in float16/bfloat16 (`--dtype`): guidance and the scheduler
        // step in the latents' dtype (float32).
        let noise_pred = noise_pred.cast(latents.dtype());
        let s = &self.settings;
        let [nb, nc, nh, nw] = noise_pred.dims();
        let [lb, lc, lh, lw] = latents.dims();
        if nb != s.batch() || nc != s.out_channels || (nh, nw) != (lh, lw) || nh != region.len() {
            return Err(self.bad(format!(
                "step {step}, rows {region:?}: noise prediction {:?} does not fit latents {:?} \
                 (batch {}, {} output channels)",
                noise_pred.dims(),
                latents.dims(),
                s.batch(),
                s.out_channels
            )));
        }
        if lb != s.images || lc != s.latent_channels {
            return Err(self.bad(format!(
                "step {step}: latents {:?} are not [{}, {}, rows, width]",
                latents.dims(),
                s.images,
                s.latent_channels
            )));
        }
        if step >= self.schedule.len() {
            return Err(self.bad(format!(
                "step {step} is past the schedule of {} steps",
                self.schedule.len()
            )));
        }
        self.check_finite(&noise_pred, || {
            format!("the noise prediction of step {step} (latent rows {region:?})")
        })?;
        let s = &self.settings;
        let guided = if s.guidance() {
            let uncond = noise_pred.clone().narrow(0, 0, s.images);
            let cond = noise_pred.narrow(0, s.images, s.images);
            let diff = cond.sub(uncond.clone()).mul_scalar(s.guidance_scale);
            uncond.add(diff)
        } else {
            noise_pred
        };
        let eps = if s.out_channels == 2 * s.latent_channels {
            guided.narrow(1, 0, s.latent_channels)
        } else {
            guided
        };
        // A half-precision model's prediction steps float32 latents (the scheduler's
        // history stays in the latents' dtype).
        let eps = if eps.dtype() == latents.dtype() { eps } else { eps.cast(latents.dtype()) };
        let state = state_for(&mut self.states, &self.schedule, self.height, &region);
        if let Some(next) = state.next_step_index()
            && next != step
        {
            let reason = format!(
                "rows {region:?} were last stepped at step {}, now asked for step {step}",
                next - 1
            );
            return Err(self.bad(reason));
        }
        let next = self.schedule.step(state, step, eps, latents).map_err(scheduler_error)?;
        self.check_finite(&next, || format!("the latents after step {step} (rows {region:?})"))?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend as B;
    use burn::tensor::Distribution;
    use schedulers::{DpmSolverMultistepConfig, Scheduler, SchedulerConfig};

    fn sampler(guidance_scale: f64, cond: Option<(usize, usize)>) -> Sampler<B> {
        let schedule =
            Scheduler::new(SchedulerConfig::DpmSolverMultistep(DpmSolverMultistepConfig::pixart()))
                .unwrap()
                .set_timesteps(4)
                .unwrap();
        let settings = SamplerSettings {
            guidance_scale,
            images: 1,
            latent_channels: 2,
            out_channels: 4,
            additional_conditions: cond,
        };
        Sampler::new(schedule, settings, None, &Default::default()).unwrap()
    }

    fn random(shape: [usize; 4]) -> Tensor<B, 4> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    #[test]
    fn regions_after_a_whole_step_equal_whole_steps() {
        let latents = random([1, 2, 8, 4]);
        let preds: Vec<Tensor<B, 4>> = (0..4).map(|_| random([2, 4, 8, 4])).collect();
        let mut whole = sampler(4.5, None);
        let mut a = latents.clone();
        for (i, p) in preds.iter().enumerate() {
            let input = whole.model_input(i, &a).unwrap();
            assert_eq!(input.hidden_states.dims(), [2, 2, 8, 4]);
            a = whole.step(i, 0..8, p.clone(), a).unwrap();
        }
        // PipeFusion's shape: one synchronous step, then two patches stepped separately.
        let mut split = sampler(4.5, None);
        let mut b = latents;
        split.model_input(0, &b).unwrap();
        b = split.step(0, 0..8, preds[0].clone(), b).unwrap();
        for (i, p) in preds.iter().enumerate().skip(1) {
            split.model_input(i, &b).unwrap();
            let mut parts = Vec::new();
            for r in [0..3, 3..8] {
                let rows = b.clone().narrow(2, r.start, r.len());
                let pred = p.clone().narrow(2, r.start, r.len());
                parts.push(split.step(i, r, pred, rows).unwrap());
            }
            b = Tensor::cat(parts, 2);
        }
        assert_eq!(split.regions(), vec![0..3, 0..8, 3..8]);
        let (a, b) =
            (a.into_data().to_vec::<f32>().unwrap(), b.into_data().to_vec::<f32>().unwrap());
        let max = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        let scale = a.iter().map(|x| x.abs()).fold(0.0, f32::max);
        assert!(max <= 1e-6 * scale, "max diff {max} of {scale}");
    }

    #[test]
    fn no_guidance_batch_at_scale_one_and_pixart_1024_conditions() {
        let mut s = sampler(1.0, Some((1024, 768)));
        let input = s.model_input(0, &random([1, 2, 8, 4])).unwrap();
        assert_eq!(input.batch(), 1);
        let res = input.added_cond["resolution"].clone().into_data().to_vec::<f32>().unwrap();
        assert_eq!(res, vec![1024.0, 768.0]);
        let ar = input.added_cond["aspect_ratio"].clone().into_data().to_vec::<f32>().unwrap();
        assert_eq!(ar, vec![(1024.0f64 / 768.0) as f32]);
        assert_eq!(input.timestep.into_data().to_vec::<f32>().unwrap(), vec![999.0]);
        // Without guidance the noise prediction is used as is (minus the sigma half).
        let next = s.step(0, 0..8, random([1, 4, 8, 4]), random([1, 2, 8, 4])).unwrap();
        assert_eq!(next.dims(), [1, 2, 8, 4]);
    }

    #[test]
    fn misuse_is_an_error_not_a_panic() {
        let mut s = sampler(4.5, None);
        let lat = random([1, 2, 8, 4]);
        s.model_input(0, &lat).unwrap();
        let e = s.step(0, 0..8, random([1, 4, 8, 4]), lat.clone()).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        s.step(0, 0..8, random([2, 4, 8, 4]), lat.clone()).unwrap();
        let e = s.step(0, 0..8, random([2, 4, 8, 4]), lat.clone()).unwrap_err();
        assert!(e.to_string().contains("last stepped at step 0"), "{e}");
        let e = s.model_input(4, &lat).unwrap_err();
        assert!(e.to_string().contains("past the schedule"), "{e}");
    }
}

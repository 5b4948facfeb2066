//! # strategy-distrifusion: displaced patch parallelism (DistriFusion), and naive patch
//!
//! ## Algorithm
//! The latent is split by rows over the `N` ranks (token rows for a DiT; balanced, longer
//! bands first). Each rank runs the whole model on its band. In self-attention a rank's
//! queries need the keys and values of every token:
//!
//! - **warmup steps** (`step < warmup_steps`) are synchronous: in every layer the ranks
//!   all-gather their fresh K and V, attend over the full, fresh sequence, and keep the
//!   gathered K/V in the layer's buffer. A warmup step equals the serial model.
//! - **after warmup** a rank attends with its *own* fresh K/V and the *other* ranks' K/V from
//!   the previous step (the layer's buffer, one step stale). Right after computing its fresh
//!   K/V it starts an asynchronous all-gather of them, and waits on that handle only at the
//!   same layer of the next step, when it refreshes the buffer: the exchange overlaps a
//!   whole step of compute. The gathers run on a communicator of their own (a split of the
//!   world: its own stream), so the output gather that ends a step does not wait for them.
//!   The last step starts none (nobody would read them).
//!
//! The bands' outputs are all-gathered at the end of every step, so the noise prediction is
//! complete on every rank and the scheduler steps identically everywhere.
//!
//! **Staleness.** After warmup, the attention of rank `r`'s tokens to rank `j ≠ r`'s tokens
//! uses `K_j, V_j` from step `t−1`. Between adjacent steps the activations change little
//! (the premise of the method), so the error is small; it is reported as PSNR against
//! serial, not hidden. With `warmup_steps ≥ steps` the output equals serial.
//!
//! **Warmup default: 4** — the setting of the DistriFusion paper. The latents move fastest
//! in the first steps (from pure noise), where a one-step-stale K/V differs most from the
//! fresh one; a few synchronous steps remove most of the error at a cost of
//! `4/steps` of the exchanges being on the critical path.
//!
//! **Naive patch** (`naive_patch`): each rank denoises its rows alone, attending only to its
//! own tokens, with no exchange but the output gather: the baseline whose seams show in
//! the image and which DistriFusion beats.
//!
//! **On a U-Net** the bands are rows of the coarsest feature map (the total down-sampling,
//! 8 latent rows for SD), and two more kinds of site need other bands' data:
//!
//! - **every `k × k` convolution** (not `conv_in`, which reads the whole latent) needs
//!   `(k−1)/2` rows above and below the band. Each rank exchanges its boundary rows with its
//!   two neighbours only (point to point: a rank sends at most `2·(k−1)/2` rows per conv,
//!   where distrifuser all-gathers every rank's boundary to every rank). Warmup steps wait
//!   for the exchange before the conv; after warmup the conv reads the neighbours' rows of
//!   the previous step and the fresh ones travel meanwhile, waited on at the same conv of
//!   the next step (as the K/V).
//! - **every GroupNorm** normalises with statistics per the option `gn_mode`
//!   ([`GroupNormMode`]): warmup steps merge every band's fresh statistics (exact); after
//!   warmup `sync` still does (a synchronous gather at every norm), `stale` merges the
//!   band's fresh statistics with the others' of the previous step, `corrected_async`
//!   (default, distrifuser's) corrects the previous step's global statistics by the band's
//!   own change, `separate` uses the band's alone. Statistics travel as `(mean, M2)` per
//!   batch entry and group and merge by Chan's update, exact for uneven bands (distrifuser
//!   averages `E[x]`, `E[x²]` over equal bands, and rescales the variance by `n/(n−1)`,
//!   which `nn.GroupNorm` does not: we normalise as the serial model does).
//!
//! With `warmup_steps ≥ steps` every step equals the serial model.
//!
//! ## Constraints
//! At least one row of the model's row granularity per rank. Any head count.
//!
//! ## Config keys
//! `distrifusion`: `warmup_steps` (default 4), `gn_mode` (`corrected_async`; U-Net only).
//! `naive_patch`: none.
//!
//! ## Communication and memory (per denoising step, per rank `r`)
//! `B` batch, `hs = H·d` hidden size, `L` layers, `n_r` the rank's tokens, `p` all tokens:
//!
//! ```text
//! all_gather (K/V) = L · 2·B·n_r·hs·(N − 1)     (= 2·(p/N)·hs·(N−1)·L, warmup or not;
//!                                               none in the last step after warmup)
//! all_gather (output) = B · C_out · (band rows · patch) · W · (N − 1)
//! buffer = L · 2·B·p·hs elements                (full K and V of every layer)
//! ```
//! On a U-Net, per step per rank, over its sites ([`ModelDesc::feature_sites`]) at their
//! resolution (`w_s` = latent width / scale, `m_s` = the rank's band rows at that scale,
//! `ν` = its neighbours, 1 or 2):
//!
//! ```text
//! all_gather (K/V)    = Σ_attention 2·B·(m_s·w_s)·C·(N − 1)  (none in a last stale step)
//! send (halos)        = Σ_conv ν·halo·B·C·w_s                (none in a last stale step)
//! all_gather (GN)     = Σ_norm 2·B·G·(N − 1)                 (warmup; after it: sync every
//!                                                             step, stale/corrected_async
//!                                                             but the last, separate never)
//! buffers             = K/V of every token at every attention, the 2·halo neighbour rows
//!                       of every conv, every rank's (mean, M2) of every norm
//! ```
//!
//! Naive patch sends only the output gather and holds no buffer.
//!
//! The buffers and pending exchanges belong to the strategy instance and are dropped by
//! `begin_request`: one request never reads another's stale K/V, halos or statistics.

use std::ops::Range;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use parallel_core::attention::{joint_sdpa, sdpa};
use parallel_core::split::{output_gather_elements, row_partition, row_split_forward};
use parallel_core::{
    AttentionSite, Comm, CurrentRequest, Denoiser, DenoiserInput, ExpectedComm, FeatureSite,
    GroupNormMode, GroupNormStats, Halo, JointOutput, LatentGrid, ModelDesc, ModelFamily,
    NoOptions, OpKind, OptionInfo, OptionValue, ParallelError, ParallelStrategy, Pending,
    PendingSend, Reference, Registry, RequestInfo, Result, RowSite, Seams, Serial, StepKind,
    StrategyConfig, StrategyInfo, StrategyOptions, SuiteCase, Tag, TextQkv,
};

/// The registered name of DistriFusion.
pub const NAME: &str = "distrifusion";
/// The registered name of the naive-patch baseline.
pub const NAIVE_NAME: &str = "naive_patch";
/// The default number of synchronous warmup steps (the DistriFusion paper's).
pub const DEFAULT_WARMUP_STEPS: usize = 4;
/// The default group-norm statistics after warmup (distrifuser's default).
pub const DEFAULT_GN_MODE: GroupNormMode = GroupNormMode::CorrectedAsync;

/// When a layer's asynchronous K/V gather was started and when it was waited on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatherEvent {
    /// The layer.
    pub layer: usize,
    /// The step whose fresh K/V the gather carries.
    pub started: usize,
    /// The step that waited on it.
    pub waited: usize,
}

/// The neighbours' boundary rows at one conv: (the band above's bottom rows, the band
/// below's top rows), `None` at the image's edge.
type Boundary<B> = (Option<Tensor<B, 4>>, Option<Tensor<B, 4>>);

/// A started exchange of boundary rows with the neighbouring ranks.
struct HaloExchange<B: Backend> {
    sends: Vec<PendingSend>,
    above: Option<Pending<B, 4>>,
    below: Option<Pending<B, 4>>,
}

impl<B: Backend> HaloExchange<B> {
    /// Sends this band's top `halo` rows up and its bottom ones down, and receives the
    /// neighbours' (tags: kind `halo`, the step, the conv as layer, direction 0 up / 1 down).
    fn start(
        comm: &Comm<B>,
        x: &Tensor<B, 4>,
        halo: usize,
        step: usize,
        conv: usize,
    ) -> Result<Self> {
        let (r, n) = (comm.rank(), comm.size());
        let rows = x.dims()[2];
        let tag = |dir: u32| Tag::new("halo").step(step as u32).layer(conv as u32).patch(dir);
        let mut exchange = HaloExchange { sends: Vec::new(), above: None, below: None };
        if r > 0 {
            let top = x.clone().narrow(2, 0, halo);
            let (send, recv) = comm.send_recv_async(top, r - 1, tag(0), r - 1, tag(1))?;
            exchange.sends.push(send);
            exchange.above = Some(recv);
        }
        if r + 1 < n {
            let bottom = x.clone().narrow(2, rows - halo, halo);
            let (send, recv) = comm.send_recv_async(bottom, r + 1, tag(1), r + 1, tag(0))?;
            exchange.sends.push(send);
            exchange.below = Some(recv);
        }
        Ok(exchange)
    }

    fn wait(self) -> Result<Boundary<B>> {
        for send in self.sends {
            send.wait()?;
        }
        let above = self.above.map(Pending::wait).transpose()?;
        let below = self.below.map(Pending::wait).transpose()?;
        Ok((above, below))
    }
}

/// `v[i]`, growing `v` with `None`s up to it.
fn slot<T>(v: &mut Vec<Option<T>>, i: usize) -> &mut Option<T> {
    if v.len() <= i {
        v.resize_with(i + 1, || None);
    }
    &mut v[i]
}

/// Per-request state: per site, the buffers and the pending exchanges.
struct State<B: Backend> {
    /// Per attention layer: `[2, B, H, p, d]`, K and V of every token (fresh on the own band
    /// after this step's attention; others' from the previous step).
    buffers: Vec<Option<Tensor<B, 5>>>,
    /// Per attention layer: the gather started at `(step, handle)`.
    pending: Vec<Option<(usize, Pending<B, 5>)>>,
    events: Vec<GatherEvent>,
    /// Per conv (U-Net): the neighbours' boundary rows as last exchanged.
    halos: Vec<Option<Boundary<B>>>,
    /// Per conv: the exchange in flight.
    halo_pending: Vec<Option<HaloExchange<B>>>,
    /// Per norm (U-Net): every rank's `(mean, M2)` as last gathered, `[N, 2, B, G]`.
    norms: Vec<Option<Tensor<B, 4>>>,
    /// Per norm: the gather in flight.
    norm_pending: Vec<Option<Pending<B, 4>>>,
}

impl<B: Backend> State<B> {
    fn new() -> Self {
        State {
            buffers: Vec::new(),
            pending: Vec::new(),
            events: Vec::new(),
            halos: Vec::new(),
            halo_pending: Vec::new(),
            norms: Vec::new(),
            norm_pending: Vec::new(),
        }
    }

    fn slot(&mut self, layer: usize) {
        slot(&mut self.buffers, layer);
        slot(&mut self.pending, layer);
    }

    /// Waits out every exchange in flight (every rank alike, so the streams stay in step).
    fn drain(self) -> Result<()> {
        for (_, pending) in self.pending.into_iter().flatten() {
            pending.wait()?;
        }
        for exchange in self.halo_pending.into_iter().flatten() {
            exchange.wait()?;
        }
        for pending in self.norm_pending.into_iter().flatten() {
            pending.wait()?;
        }
        Ok(())
    }
}

/// DistriFusion's options, as a typed value (the keys of `harness list`, TOML and flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DistriFusionConfig {
    /// Synchronous steps (fresh K/V everywhere) first, ≥ 1.
    pub warmup_steps: usize,
    /// A U-Net's group-norm statistics after warmup.
    pub gn_mode: GroupNormMode,
}

impl Default for DistriFusionConfig {
    fn default() -> Self {
        DistriFusionConfig { warmup_steps: DEFAULT_WARMUP_STEPS, gn_mode: DEFAULT_GN_MODE }
    }
}

impl DistriFusionConfig {
    /// This config with `w` warmup steps.
    pub fn with_warmup_steps(mut self, w: usize) -> Self {
        self.warmup_steps = w;
        self
    }

    /// This config with group-norm mode `mode`.
    pub fn with_gn_mode(mut self, mode: GroupNormMode) -> Self {
        self.gn_mode = mode;
        self
    }

    /// The config of registry options.
    ///
    /// # Errors
    /// A `gn_mode` that is none of [`GroupNormMode::ALL`], naming them.
    pub fn from_options(opts: &StrategyOptions) -> Result<Self> {
        let mode = opts.string("gn_mode", DEFAULT_GN_MODE.name())?;
        let gn_mode = GroupNormMode::parse(&mode).ok_or_else(|| ParallelError::BadOption {
            strategy: NAME.into(),
            key: "gn_mode".into(),
            reason: format!(
                "`{mode}` is not a mode; one of {}",
                GroupNormMode::ALL.map(GroupNormMode::name).join(", ")
            ),
        })?;
        Ok(DistriFusionConfig {
            warmup_steps: opts.usize("warmup_steps", DEFAULT_WARMUP_STEPS)?,
            gn_mode,
        })
    }
}

impl StrategyConfig for DistriFusionConfig {
    fn name(&self) -> &'static str {
        NAME
    }

    fn options(&self) -> StrategyOptions {
        StrategyOptions::new(NAME)
            .with("warmup_steps", OptionValue::Int(self.warmup_steps as i64))
            .with("gn_mode", OptionValue::Str(self.gn_mode.name().into()))
    }
}

/// The strategy's config for library users (it takes no options).
pub const NAIVE_CONFIG: NoOptions = NoOptions(NAIVE_NAME);

/// DistriFusion over the whole world.
pub struct DistriFusion<B: Backend> {
    world: Comm<B>,
    /// The world again as a communicator of its own, for the K/V gathers: a stream apart
    /// from the output gathers, so a step's end does not wait for the gathers it started.
    kv: Comm<B>,
    warmup_steps: usize,
    gn_mode: GroupNormMode,
    state: State<B>,
    request: CurrentRequest,
}

impl<B: Backend> DistriFusion<B> {
    /// DistriFusion over `world` as `config` says.
    ///
    /// # Errors
    /// `warmup_steps = 0`: step 0 has no previous step whose K/V could be stale, so it is
    /// synchronous whatever is asked; say 1.
    pub fn new(world: Comm<B>, config: &DistriFusionConfig) -> Result<Self> {
        let warmup_steps = config.warmup_steps;
        if warmup_steps == 0 {
            return Err(ParallelError::BadOption {
                strategy: NAME.into(),
                key: "warmup_steps".into(),
                reason: "must be ≥ 1: step 0 has no previous step's K/V to reuse".into(),
            });
        }
        let kv = world.split_members(world.members())?;
        Ok(DistriFusion {
            world,
            kv,
            warmup_steps,
            gn_mode: config.gn_mode,
            state: State::new(),
            request: CurrentRequest::default(),
        })
    }

    /// The configured warmup steps.
    pub fn warmup_steps(&self) -> usize {
        self.warmup_steps
    }

    /// The configured group-norm mode.
    pub fn gn_mode(&self) -> GroupNormMode {
        self.gn_mode
    }

    /// Every asynchronous gather of this request: when it started and when it was waited.
    pub fn gather_events(&self) -> &[GatherEvent] {
        &self.state.events
    }
}

struct DfSeams<'a, B: Backend> {
    comm: &'a Comm<B>,
    state: &'a mut State<B>,
    step: usize,
    sync: bool,
    /// The request's last step: nobody would read a gather started now.
    last: bool,
    mode: GroupNormMode,
    /// Every rank's band, in latent rows.
    bands: Vec<Range<usize>>,
    /// Latent rows.
    height: usize,
}

impl<B: Backend> DfSeams<'_, B> {
    /// Elements per group that every rank's statistics at `site` cover, given this rank's
    /// `count` over its `site.rows`.
    fn counts(&self, site: &RowSite, count: usize) -> Result<Vec<usize>> {
        let rows_of = |band: &Range<usize>| band.len() * site.total_rows / self.height;
        let mine = rows_of(&self.bands[self.comm.rank()]);
        if mine != site.rows.len() || site.rows.is_empty() {
            return Err(ParallelError::Model(format!(
                "{NAME}: group norm {} holds rows {:?} of {}, not this rank's band of {mine} rows",
                site.index, site.rows, site.total_rows
            )));
        }
        let per_row = count / mine;
        Ok(self.bands.iter().map(|b| rows_of(b) * per_row).collect())
    }
}

/// `corrected_async`'s statistics ([`GroupNormMode::CorrectedAsync`]): the stale whole-map
/// moments plus this band's change in them; the band's fresh variance where the result is
/// negative.
fn corrected<B: Backend>(
    whole_stale: &GroupNormStats<B>,
    own_stale: &GroupNormStats<B>,
    own: &GroupNormStats<B>,
) -> GroupNormStats<B> {
    let moment2 = |s: &GroupNormStats<B>| s.variance() + s.mean.clone() * s.mean.clone();
    let mean = whole_stale.mean.clone() + own.mean.clone() - own_stale.mean.clone();
    let e2 = moment2(whole_stale) + moment2(own) - moment2(own_stale);
    let var = e2 - mean.clone() * mean.clone();
    let var = var.clone().mask_where(var.lower_elem(0.0), own.variance());
    let count = whole_stale.count;
    GroupNormStats { mean, m2: var.mul_scalar(count as f64), count }
}

impl<B: Backend> DfSeams<'_, B> {
    /// The image K/V this rank's queries see at `site`: every rank's fresh K/V in warmup,
    /// else the buffer (last step's gather) with this rank's own rows fresh; starts this
    /// step's gather. Keys and values, `[batch, heads, all image tokens, d]` each.
    fn image_kv(
        &mut self,
        site: &AttentionSite,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>)> {
        let layer = site.layer;
        self.state.slot(layer);
        let fresh: Tensor<B, 5> = Tensor::stack(vec![k, v], 0);
        // Refresh the buffer with last step's gather, if one is pending for this layer.
        if let Some((started, pending)) = self.state.pending[layer].take() {
            self.state.buffers[layer] = Some(pending.wait()?);
            self.state.events.push(GatherEvent { layer, started, waited: self.step });
        }
        let kv = match (&self.state.buffers[layer], self.sync) {
            // Warmup, or no stale K/V yet: gather the fresh K/V of every rank now.
            (None, _) | (_, true) => {
                let full = self.comm.all_gather(fresh, 3)?;
                self.state.buffers[layer] = Some(full.clone());
                full
            }
            (Some(buffer), false) => {
                let own: Range<usize> = site.tokens.clone();
                let dims = buffer.dims();
                let mixed = buffer.clone().slice_assign(
                    [0..dims[0], 0..dims[1], 0..dims[2], own, 0..dims[4]],
                    fresh.clone(),
                );
                if !self.last {
                    let pending = self.comm.all_gather_async(fresh, 3)?;
                    self.state.pending[layer] = Some((self.step, pending));
                }
                self.state.buffers[layer] = Some(mixed.clone());
                mixed
            }
        };
        let k_full = kv.clone().narrow(0, 0, 1).squeeze_dim::<4>(0);
        let v_full = kv.narrow(0, 1, 1).squeeze_dim::<4>(0);
        Ok((k_full, v_full))
    }
}

impl<B: Backend> Seams<B> for DfSeams<'_, B> {
    fn self_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let (k, v) = self.image_kv(site, k, v)?;
        Ok(sdpa(q, k, v, None))
    }

    /// MMDiT: the image K/V as for [`self_attention`](Seams::self_attention) (others' one
    /// step stale after warmup), the text K/V fresh — every rank holds the text stream.
    fn joint_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        text: TextQkv<B>,
    ) -> Result<JointOutput<B>> {
        let (k, v) = self.image_kv(site, k, v)?;
        Ok(joint_sdpa(q, k, v, text))
    }

    fn conv_halo(&mut self, site: &RowSite, x: Tensor<B, 4>, halo: usize) -> Result<Halo<B>> {
        if self.comm.size() == 1 || halo == 0 {
            return Ok(Halo { tensor: x, top: 0, bottom: 0 });
        }
        let rows = x.dims()[2];
        if rows < halo {
            return Err(ParallelError::Model(format!(
                "{NAME}: conv {} has a band of {rows} rows, fewer than its {halo} halo rows",
                site.index
            )));
        }
        let i = site.index;
        slot(&mut self.state.halos, i);
        if let Some(exchange) = slot(&mut self.state.halo_pending, i).take() {
            self.state.halos[i] = Some(exchange.wait()?);
        }
        let (above, below) = match (&self.state.halos[i], self.sync) {
            // Warmup, or no stale rows yet: exchange the fresh rows now.
            (None, _) | (_, true) => {
                let fresh = HaloExchange::start(self.comm, &x, halo, self.step, i)?.wait()?;
                self.state.halos[i] = Some(fresh.clone());
                fresh
            }
            (Some(stale), false) => {
                let stale = stale.clone();
                if !self.last {
                    let exchange = HaloExchange::start(self.comm, &x, halo, self.step, i)?;
                    self.state.halo_pending[i] = Some(exchange);
                }
                stale
            }
        };
        let top = above.as_ref().map_or(0, |t| t.dims()[2]);
        let bottom = below.as_ref().map_or(0, |t| t.dims()[2]);
        let parts: Vec<Tensor<B, 4>> = above.into_iter().chain([x]).chain(below).collect();
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
        let i = site.index;
        slot(&mut self.state.norms, i);
        if let Some(pending) = slot(&mut self.state.norm_pending, i).take() {
            self.state.norms[i] = Some(pending.wait()?);
        }
        let counts = self.counts(site, local.count)?;
        let keeps = matches!(self.mode, GroupNormMode::Stale | GroupNormMode::CorrectedAsync);
        let exact = self.sync
            || self.mode == GroupNormMode::Sync
            || (keeps && self.state.norms[i].is_none());
        if !exact && self.mode == GroupNormMode::Separate {
            return Ok(local);
        }
        let mine = local.pack();
        if exact {
            let all = self.comm.all_gather(mine, 0)?;
            let merged = GroupNormStats::merge(&GroupNormStats::unpack(&all, &counts));
            if keeps {
                self.state.norms[i] = Some(all);
            }
            return Ok(merged);
        }
        let stale = self.state.norms[i].clone().expect("an exact step filled the buffer");
        if !self.last {
            self.state.norm_pending[i] = Some(self.comm.all_gather_async(mine, 0)?);
        }
        let mut parts = GroupNormStats::unpack(&stale, &counts);
        let r = self.comm.rank();
        Ok(if self.mode == GroupNormMode::Stale {
            parts[r] = local;
            GroupNormStats::merge(&parts)
        } else {
            corrected(&GroupNormStats::merge(&parts), &parts[r], &local)
        })
    }
}

/// The description of `distrifusion` for the registry.
pub fn info() -> StrategyInfo {
    StrategyInfo {
        name: NAME,
        summary: "image rows split; others' K/V one step stale, gathered asynchronously after warmup",
        options: vec![
            OptionInfo {
                key: "warmup_steps",
                default: "4",
                doc: "synchronous steps (fresh K/V everywhere) before the stale, overlapped ones (≥ 1)",
            },
            OptionInfo {
                key: "gn_mode",
                default: "corrected_async",
                doc: "U-Net group-norm statistics after warmup: sync, stale, corrected_async, separate",
            },
        ],
        suite: {
            let case = |sizes: &[usize], warmup_steps: usize, norm: GroupNormMode| {
                SuiteCase::new(sizes, Reference::DisplacedPatches { warmup_steps, norm })
                    .with("warmup_steps", OptionValue::Int(warmup_steps as i64))
                    .with("gn_mode", OptionValue::Str(norm.name().into()))
            };
            // The other modes act on a U-Net's group norms only.
            let unet = |sizes: &[usize], warmup_steps, norm| {
                case(sizes, warmup_steps, norm).only(ModelFamily::Unet)
            };
            vec![
                case(&[1, 2, 4], 4, DEFAULT_GN_MODE),
                case(&[2, 4], 1, DEFAULT_GN_MODE),
                case(&[2, 4], 2, DEFAULT_GN_MODE),
                unet(&[2, 4], 1, GroupNormMode::Stale),
                unet(&[2, 4], 1, GroupNormMode::Separate),
                // Sync statistics after warmup need every band's fresh statistics within a
                // step; the suite's loops are shorter than this warmup, so it equals serial.
                unet(&[2, 4], 100, GroupNormMode::Sync),
            ]
        },
    }
}

/// The description of `naive_patch` for the registry.
pub fn naive_info() -> StrategyInfo {
    StrategyInfo {
        name: NAIVE_NAME,
        summary: "image rows split, each rank attends only to its own rows (the baseline; seams show)",
        options: vec![],
        suite: vec![SuiteCase::new(&[1, 2, 4], Reference::LocalPatches)],
    }
}

/// Registers `distrifusion` and `naive_patch`.
pub fn register<B: Backend>(registry: &mut Registry<B>) {
    registry.register(info(), |comm, opts: &StrategyOptions| {
        Ok(Box::new(DistriFusion::new(comm, &DistriFusionConfig::from_options(opts)?)?))
    });
    registry.register(naive_info(), |comm, _| Ok(Box::new(NaivePatch::new(comm))));
}

fn buffer_bytes_of<B: Backend>(state: &State<B>) -> u64 {
    fn bytes<B: Backend, const D: usize>(t: &Tensor<B, D>) -> u64 {
        (t.shape().num_elements() * t.dtype().size()) as u64
    }
    let kv: u64 = state.buffers.iter().flatten().map(bytes).sum();
    let halos: u64 =
        state.halos.iter().flatten().map(|(a, b)| a.iter().chain(b).map(bytes).sum::<u64>()).sum();
    let norms: u64 = state.norms.iter().flatten().map(bytes).sum();
    kv + halos + norms
}

impl<B: Backend> ParallelStrategy<B> for DistriFusion<B> {
    fn name(&self) -> &str {
        NAME
    }

    fn comm(&self) -> &Comm<B> {
        &self.world
    }

    fn validate(&self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        row_partition(NAME, model, request.grid, self.world.size()).map(|_| ())
    }

    fn begin_request(&mut self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        self.validate(model, request)?;
        // A request that ended early (an error, or forwards outside a loop) may leave
        // exchanges in flight: wait them out, every rank alike, so the streams stay in step.
        std::mem::replace(&mut self.state, State::new()).drain()?;
        self.request.begin(request);
        Ok(())
    }

    fn forward(
        &mut self,
        model: &dyn Denoiser<B>,
        input: &DenoiserInput<B>,
        step: usize,
    ) -> Result<Tensor<B, 4>> {
        let steps = self.request.check_input(NAME, input)?.steps;
        let sync = step < self.warmup_steps;
        let last = step + 1 >= steps;
        let desc = model.desc();
        let g = desc.row_granularity;
        let bands = row_partition(NAME, desc, input.grid(), self.world.size())?
            .into_iter()
            .map(|b| b.start * g..b.end * g)
            .collect();
        let mut seams = DfSeams {
            comm: &self.kv,
            state: &mut self.state,
            step,
            sync,
            last,
            mode: self.gn_mode,
            bands,
            height: input.grid().height,
        };
        row_split_forward(NAME, model, input, &self.world, &mut seams)
    }

    fn buffer_bytes(&self) -> u64 {
        buffer_bytes_of(&self.state)
    }

    fn expected_comm(
        &self,
        model: &ModelDesc,
        request: &RequestInfo,
        step: StepKind,
    ) -> Result<ExpectedComm> {
        // Warmup steps gather the fresh K/V synchronously, the others asynchronously (the
        // same volume); the last step of a loop after warmup starts no gather, nobody would
        // read it.
        let n = self.world.size();
        let r = self.world.rank();
        let parts = row_partition(NAME, model, request.grid, n)?;
        if model.family == ModelFamily::Unet {
            return Ok(self.unet_expected(model, request, &parts, step));
        }
        let cols = request.grid.width / model.patch_size;
        let n_r = parts[r].len() * cols;
        // L: every self-attention (SD3.5's dual-attention blocks have two); MMDiT text K/V
        // are fresh on every rank and never sent.
        let (b, hs, l) = (request.batch, model.hidden_size, model.attention_calls());
        let gathers = !step.is_last(request.steps) || step.is_warmup(self.warmup_steps);
        let mut e = ExpectedComm::none(format!(
            "distrifusion: L·2·B·n_r·hs·(N−1){} + output gather; L={l} B={b} n_r={n_r} hs={hs} \
             N={n}",
            if gathers { "" } else { " (none: the last step starts no gather)" }
        ));
        if gathers {
            e.add(OpKind::AllGather, (l * 2 * b * n_r * hs * (n - 1)) as u64);
        }
        e.add(OpKind::AllGather, output_gather_elements(model, request.grid, b, &parts[r], n));
        Ok(e)
    }
}

impl<B: Backend> DistriFusion<B> {
    /// The U-Net formula of the [crate docs](crate), site by site.
    fn unet_expected(
        &self,
        model: &ModelDesc,
        request: &RequestInfo,
        parts: &[Range<usize>],
        step: StepKind,
    ) -> ExpectedComm {
        let (n, r, b) = (self.world.size(), self.world.rank(), request.batch);
        let g = model.row_granularity;
        let LatentGrid { width, .. } = request.grid;
        let warm = step.is_warmup(self.warmup_steps);
        let overlapped = warm || !step.is_last(request.steps);
        let norms = warm
            || match self.gn_mode {
                GroupNormMode::Sync => true,
                GroupNormMode::Stale | GroupNormMode::CorrectedAsync => overlapped,
                GroupNormMode::Separate => false,
            };
        let neighbours = usize::from(r > 0) + usize::from(r + 1 < n);
        let (mut kv, mut halos, mut stats) = (0, 0, 0);
        for site in &model.feature_sites {
            match *site {
                FeatureSite::SelfAttention { channels, scale, .. } => {
                    let tokens = parts[r].len() * g / scale * (width / scale);
                    kv += 2 * b * tokens * channels * (n - 1);
                }
                FeatureSite::Conv { channels, halo, scale } if n > 1 => {
                    halos += neighbours * halo * b * channels * (width / scale);
                }
                FeatureSite::GroupNorm { groups, .. } if n > 1 => {
                    stats += 2 * b * groups * (n - 1);
                }
                _ => {}
            }
        }
        let mut e = ExpectedComm::none(format!(
            "distrifusion (U-Net, gn_mode {}): K/V Σ 2·B·m_s·w_s·C·(N−1) = {kv}{}, halos \
             Σ ν·halo·B·C·w_s = {halos}{}, GN Σ 2·B·G·(N−1) = {stats}{}, + output gather; \
             B={b} N={n} ν={neighbours}",
            self.gn_mode,
            if overlapped { "" } else { " (none: last step)" },
            if overlapped { "" } else { " (none: last step)" },
            if norms { "" } else { " (none this step)" },
        ));
        if overlapped {
            e.add(OpKind::AllGather, kv as u64);
            e.add(OpKind::Send, halos as u64);
        }
        if norms {
            e.add(OpKind::AllGather, stats as u64);
        }
        e.add(OpKind::AllGather, output_gather_elements(model, request.grid, b, &parts[r], n));
        e
    }
}

/// The buffer DistriFusion holds per rank, in elements: `L · 2 · B · p · hs` (`L` every
/// self-attention, [`ModelDesc::attention_calls`]).
pub fn buffer_elements(model: &ModelDesc, request: &RequestInfo) -> u64 {
    let p = model.tokens(request.grid).len();
    (model.attention_calls() * 2 * request.batch * p * model.hidden_size) as u64
}

/// Naive patch parallelism: every rank attends only to its own rows.
pub struct NaivePatch<B: Backend> {
    world: Comm<B>,
    request: CurrentRequest,
}

impl<B: Backend> NaivePatch<B> {
    /// Naive patch over the whole world.
    pub fn new(world: Comm<B>) -> Self {
        NaivePatch { world, request: CurrentRequest::default() }
    }
}

impl<B: Backend> ParallelStrategy<B> for NaivePatch<B> {
    fn name(&self) -> &str {
        NAIVE_NAME
    }

    fn comm(&self) -> &Comm<B> {
        &self.world
    }

    fn validate(&self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        row_partition(NAIVE_NAME, model, request.grid, self.world.size()).map(|_| ())
    }

    fn begin_request(&mut self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        self.validate(model, request)?;
        self.request.begin(request);
        Ok(())
    }

    fn forward(
        &mut self,
        model: &dyn Denoiser<B>,
        input: &DenoiserInput<B>,
        _step: usize,
    ) -> Result<Tensor<B, 4>> {
        self.request.check_input(NAIVE_NAME, input)?;
        // The serial seams attend to the local tokens only: exactly the naive split.
        row_split_forward(NAIVE_NAME, model, input, &self.world, &mut Serial)
    }

    fn expected_comm(
        &self,
        model: &ModelDesc,
        request: &RequestInfo,
        _step: StepKind,
    ) -> Result<ExpectedComm> {
        let n = self.world.size();
        let r = self.world.rank();
        let parts = row_partition(NAIVE_NAME, model, request.grid, n)?;
        let mut e = ExpectedComm::none("naive patch: output gather only");
        e.add(
            OpKind::AllGather,
            output_gather_elements(model, request.grid, request.batch, &parts[r], n),
        );
        Ok(e)
    }
}

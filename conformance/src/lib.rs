//! # conformance: every registered strategy against its definition
//!
//! One suite, run against every strategy (opendal's behaviour-test idea). It iterates the
//! registry the `harness` binary uses ([`harness::registry`]): every strategy declares, in its
//! [`StrategyInfo::suite`](parallel_core::StrategyInfo), the option sets and world sizes to run
//! and the [`Reference`] its output must equal, so a strategy joins the suite by registering —
//! nothing here names one.
//!
//! For every declared case ([`runs`]) and every fixture ([`fixtures`]: the DiT models PixArt-α,
//! PixArt-α 1024-MS with added conditions, PixArt-Σ, DiT, and PixArt-α as float16, bfloat16
//! and a sharded checkpoint; the U-Nets SD 1.5-, SD 2.1- and SDXL-style and SD 1.5 stored as
//! float16 and bfloat16; square, wide, tall, uneven-row, class-label and SDXL cases):
//!
//! - [`check_forward`]: one lone forward equals the reference's on every rank, and every rank
//!   sends exactly what the strategy's formula says for a forward
//!   ([`StepKind::Forward`](parallel_core::StepKind));
//! - [`check_denoise`]: a guided DPM-Solver++ loop equals the reference loop; every rank
//!   returns the same latents; every step's traffic equals the formula for that step; a second
//!   request on the same instance gives the same latents (state reset).
//!
//! The references ([`reference`]) are independent single-rank implementations of each
//! definition on the serial model through its seams — whose equality to diffusers is
//! `models-dit`'s and `models-unet`'s own test — never a number a strategy produced.
//!
//! A run does not apply to a fixture where its case is declared for the other family only
//! (options that act on a U-Net's group norms), or where the strategy says so in `validate`
//! for one of four reasons the suite accepts ([`not_applicable`]): a strategy for transformers
//! refusing a U-Net (the message names the family), a row split with more ranks than the
//! latent has rows of the model's row granularity, a row split of a U-Net latent that is
//! not made of whole rows of its coarsest map (a U-Net's whole forward takes any size), or a
//! tiny U-Net's two heads per level that four tensor-parallel ranks cannot split. Any other
//! refusal is a failure.

pub mod reference;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burn::tensor::{DType, Tensor};
use harness::{Sampler, SamplerSettings};
use parallel_core::{
    CommStats, Denoiser, DenoiserInput, ExpectedComm, LaunchOptions, LoadPlan, ModelDesc,
    ModelFamily, OpKind, ParallelError, ParallelStrategy, Reference, Registry, RequestInfo, Result,
    StepKind, StrategyOptions, launch,
};
use schedulers::Scheduler;

pub use reference::{Plan, Variant};

/// The backend of the suite (Flex, the CPU backend).
pub type B = burn_flex::Flex;

/// `fixtures/` of the repository.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// A fixture model: a diffusers transformer or U-Net folder with reference cases.
#[derive(Debug, Clone, PartialEq)]
pub struct Fixture {
    /// Its folder name under `fixtures/dit/` or `fixtures/unet/`.
    pub name: String,
    /// DiT or U-Net.
    pub family: ModelFamily,
    /// The folder.
    pub dir: PathBuf,
    /// The dtype of its weights on disk, which strategies compute in.
    pub dtype: DType,
}

impl Fixture {
    /// The case files, sorted.
    pub fn cases(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.join("cases"))
            .expect("fixture cases")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        files
    }

    /// Case `name`'s file.
    pub fn case(&self, name: &str) -> PathBuf {
        self.dir.join("cases").join(format!("{name}.safetensors"))
    }

    /// The case a loop runs on: `rows10` (10 token rows: uneven bands over 4 ranks) where the
    /// fixture has it, else `tall` for a U-Net (24 rows: 3 bands of 8 for SD, 6 of 4 for
    /// SDXL), else `square`.
    pub fn loop_case(&self) -> PathBuf {
        let rows10 = self.case("rows10");
        let tall = self.case("tall");
        if rows10.is_file() {
            rows10
        } else if self.family == ModelFamily::Unet && tall.is_file() {
            tall
        } else {
            self.case("square")
        }
    }

    fn config(&self) -> harness::DenoiserConfig {
        harness::DenoiserConfig::from_folder(&self.dir).expect("fixture config")
    }

    /// What strategies validate against.
    pub fn desc(&self) -> ModelDesc {
        self.config().desc()
    }

    /// A case's inputs.
    pub fn read(&self, path: &Path) -> DenoiserInput<B> {
        harness::read_denoiser_input::<B>(path, self.family, &Default::default())
            .expect("fixture case")
            .0
    }

    /// Row bands of a latent `grid` over `parts`, in units of the model's row granularity
    /// (token rows for a DiT): what a reference plan splits.
    pub fn units(&self, grid: parallel_core::LatentGrid) -> usize {
        grid.height / self.desc().row_granularity
    }

    /// The model as rank `plan` loads it, computing in `dtype`.
    pub fn load(
        &self,
        plan: &LoadPlan,
        dtype: DType,
        device: &<B as burn::tensor::backend::BackendTypes>::Device,
    ) -> Result<harness::AnyDenoiser<B>> {
        self.config()
            .load_as(&self.dir, plan, dtype, device)
            .map_err(|e| ParallelError::Model(e.to_string()))
    }

    /// How close a strategy computing in this fixture's dtype must come to the reference
    /// computed in float32 on the same weights, in relative L2: one forward (`loop_ = false`)
    /// or a 6-step loop's final latents. Measured on an AMD EPYC (AVX2), worst over the suite:
    ///
    /// | dtype | forward bound (measured DiT; U-Net) | loop bound (measured DiT; U-Net) |
    /// |---|---|---|
    /// | float32 | 1e-5 (3.5e-7; 8.9e-7) | 1e-5 (7.2e-7; 1.6e-6) |
    /// | float16 | 5e-3 (1.5e-3; 2.5e-3) | 3e-2 (1.0e-2; 4.1e-3) |
    /// | bfloat16 | 3e-2 (1.1e-2; 1.6e-2) | 6e-2 (2.1e-2; 2.9e-2) |
    ///
    /// (U-Net numbers on an Intel Xeon with AVX-512: the tiny SD 1.5 fixture's serial
    /// float16 forward is itself 2.4e-3 from float32, bfloat16 1.6e-2; ~2× margin.)
    ///
    /// - float32: strategies reorder float32 sums (log-sum-exp merges, all-reduces of partial
    ///   products, attention over spliced K/V), ~1e-7 relative per forward; a loop's
    ///   DPM-Solver++ multistep update and a random model whose latents grow to ~1e3 amplify
    ///   it to 7.2e-7 after six steps. 1e-5 is the project's bar for "equal to float32
    ///   rounding", kept for loops too (the issue's 1e-4, tightened 10×: a mistake of one
    ///   step or one patch in a stale strategy lands ≥ 9.8e-4 away, see `tests/stale.rs`).
    /// - float16: 11-bit mantissas round every product and sum at ~5e-4 relative; the serial
    ///   f16 forward is itself 1.48e-3 from float32 (the strategies 1.40e-3..1.52e-3: the same
    ///   rounding, reordered), and six steps amplify it to 0.8–1.0e-2. About 3× margin.
    /// - bfloat16: 8-bit mantissas (unit roundoff 3.9e-3); the serial bf16 forward is 1.09e-2
    ///   from float32, six steps 2.05e-2. About 3× margin.
    pub fn tolerance(&self, loop_: bool) -> f64 {
        match (self.dtype, loop_) {
            (DType::F16, false) => 5e-3,
            (DType::F16, true) => 3e-2,
            (DType::BF16, false) => 3e-2,
            (DType::BF16, true) => 6e-2,
            (_, _) => 1e-5,
        }
    }
}

impl fmt::Display for Fixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Every fixture under `fixtures/dit/` and `fixtures/unet/` (a folder with a `config.json`),
/// DiTs first, each family sorted by name.
pub fn fixtures() -> Vec<Fixture> {
    let mut all = family_fixtures("dit", ModelFamily::Dit);
    all.extend(family_fixtures("mmdit", ModelFamily::MmDit));
    all.extend(family_fixtures("unet", ModelFamily::Unet));
    all
}

fn family_fixtures(folder: &str, family: ModelFamily) -> Vec<Fixture> {
    let root = fixtures_dir().join(folder);
    let mut out: Vec<Fixture> = std::fs::read_dir(&root)
        .expect("fixtures folder")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("config.json").is_file())
        .map(|dir| {
            let store = weights::WeightStore::open(&dir, models_dit::WEIGHTS_FILE)
                .expect("fixture weights");
            let key = store.keys().next().expect("a weight").to_string();
            let dtype = match store.meta(&key).expect("meta").dtype.as_str() {
                "F16" => DType::F16,
                "BF16" => DType::BF16,
                _ => DType::F32,
            };
            let name = dir.file_name().expect("name").to_string_lossy().to_string();
            Fixture { name, family, dir, dtype }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The fixture named `name`.
pub fn fixture(name: &str) -> Fixture {
    fixtures().into_iter().find(|f| f.name == name).unwrap_or_else(|| panic!("no fixture {name}"))
}

/// A case's inputs (a DiT case holds `hidden_states`, a U-Net case `sample`).
pub fn read_input(path: &Path) -> DenoiserInput<B> {
    let tensors = weights::read_tensors(path).expect("fixture case");
    let family = if tensors.contains_key("pooled_projections") {
        ModelFamily::MmDit
    } else if tensors.contains_key("hidden_states") {
        ModelFamily::Dit
    } else {
        ModelFamily::Unet
    };
    harness::read_denoiser_input::<B>(path, family, &Default::default()).expect("fixture case").0
}

/// Why `run` does not apply to `fixture` on a latent `grid`, if it does not: every rank's
/// `validate` refuses, for a reason the suite accepts (see the [crate docs](crate)). `None`
/// when the strategy validates (the run must then equal its reference).
///
/// # Errors
/// A refusal the suite does not accept, in words.
pub fn not_applicable(
    registry: &Registry<B>,
    run: &SuiteRun,
    fixture: &Fixture,
    grid: parallel_core::LatentGrid,
) -> std::result::Result<Option<String>, String> {
    if let Some(family) = run.family.filter(|f| *f != fixture.family) {
        return Ok(Some(format!("the case is declared for {family} models only")));
    }
    let d = fixture.desc();
    let request = RequestInfo { steps: 1, grid, batch: 2, images: 1, text_tokens: 0 };
    let results = launch(run.world_size, &launch_options(), |comm| {
        let strategy = run.create(registry, comm)?;
        strategy.validate(&d, &request)
    });
    let errors: Vec<String> =
        results.into_iter().filter_map(|r| r.err()).map(|e| e.to_string()).collect();
    let Some(first) = errors.first() else { return Ok(None) };
    let family = fixture.family == ModelFamily::Unet
        && first.contains("U-Net model")
        && first.contains("applies to DiT");
    let rows = first.contains(&format!("fewer than the {} ranks", run.group_size()));
    // A pipeline of more stages than the fixture has blocks (the 3-block SD3 fixtures under 4
    // stages): a constraint of the model, refused before any work.
    let stages =
        first.contains("transformer blocks, fewer than the") && first.contains("pipeline stages");
    // A U-Net takes any latent size whole (diffusers forwards its up-sampling sizes); a row
    // split needs whole rows of the coarsest map.
    let unet = fixture.family == ModelFamily::Unet;
    let grid = unet && first.contains("must be a positive multiple");
    // The tiny U-Nets have two heads per level (tensor parallelism over 4 ranks cannot split
    // them); the DiT fixtures' four heads take every declared degree.
    let heads = unet && first.contains("attention heads") && first.contains("not divisible by");
    if (family || rows || stages || grid || heads) && errors.len() == run.world_size {
        Ok(Some(first.clone()))
    } else {
        Err(format!(
            "{run} {fixture}: refused by validate, for no reason the suite accepts: {first}"
        ))
    }
}

/// Every strategy of the binary, with the registry it is created from.
pub fn registry() -> Registry<B> {
    harness::registry::<B>()
}

/// One declared configuration of a registered strategy at one world size.
#[derive(Debug, Clone, PartialEq)]
pub struct SuiteRun {
    /// The registered name.
    pub strategy: &'static str,
    /// Its options.
    pub options: StrategyOptions,
    /// Ranks.
    pub world_size: usize,
    /// What it must equal.
    pub reference: Reference,
    /// Run on fixtures of this family only (`None`: every fixture).
    pub family: Option<ModelFamily>,
    /// 2: the strategy runs on each half of the guidance batch over `world_size / 2` ranks
    /// ([`parallel_core::CfgParallel`]); 1: on the whole world.
    pub cfg_degree: usize,
}

impl SuiteRun {
    /// A run of `strategy` with `options` on `world_size` ranks, equal to `reference`, on
    /// every fixture, without CFG parallelism.
    pub fn new(
        strategy: &'static str,
        options: StrategyOptions,
        world_size: usize,
        reference: Reference,
    ) -> Self {
        SuiteRun { strategy, options, world_size, reference, family: None, cfg_degree: 1 }
    }

    /// The ranks of the strategy's own group (what its reference's bands are cut by): the
    /// world over the cfg degree.
    pub fn group_size(&self) -> usize {
        self.world_size / self.cfg_degree
    }

    /// This rank's strategy, composed with the run's cfg degree.
    pub fn create(
        &self,
        registry: &Registry<B>,
        comm: parallel_core::Comm<B>,
    ) -> Result<Box<dyn ParallelStrategy<B>>> {
        registry.create_with_cfg(self.strategy, comm, &self.options, self.cfg_degree)
    }
}

impl fmt::Display for SuiteRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opts: Vec<String> =
            self.options.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>();
        let cfg = if self.cfg_degree > 1 { format!("cfg{}×", self.cfg_degree) } else { "".into() };
        write!(f, "{cfg}{}[{}] n={}", self.strategy, opts.join(","), self.world_size)
    }
}

/// Every case every registered strategy declares, expanded by world size; then every
/// strategy once more inside CFG parallelism (`cfg_degree = 2`): its first declared case at
/// its smallest parallel world size `n` (1 for serial), on `2n` ranks. The guidance pair's
/// halves do not interact in any model, so the composition must equal the same reference
/// (on bands of the group's `n` ranks).
pub fn runs(registry: &Registry<B>) -> Vec<SuiteRun> {
    let mut out = Vec::new();
    for info in registry.infos() {
        for case in &info.suite {
            for &n in &case.world_sizes {
                out.push(SuiteRun {
                    strategy: info.name,
                    options: case.strategy_options(info.name),
                    world_size: n,
                    reference: case.reference.clone(),
                    family: case.family,
                    cfg_degree: 1,
                });
            }
        }
    }
    for info in registry.infos() {
        let parallel = info
            .suite
            .iter()
            .find_map(|c| c.world_sizes.iter().copied().filter(|&n| n > 1).min().map(|n| (c, n)));
        let Some((case, n)) = parallel.or_else(|| info.suite.first().map(|c| (c, 1))) else {
            continue;
        };
        out.push(SuiteRun {
            strategy: info.name,
            options: case.strategy_options(info.name),
            world_size: 2 * n,
            reference: case.reference.clone(),
            family: case.family,
            cfg_degree: 2,
        });
    }
    out
}

fn launch_options() -> LaunchOptions<B> {
    LaunchOptions::default().with_timeout(Duration::from_secs(60))
}

/// What one rank reports after a run.
pub struct RankReport {
    /// The rank's output (noise prediction or final latents).
    pub output: Tensor<B, 4>,
    /// What it sent per step (one entry for a forward), from its counters.
    pub steps: Vec<CommStats>,
    /// What the formula says for each of those steps.
    pub expected: Vec<ExpectedComm>,
    /// Parameter bytes of its model.
    pub param_bytes: u64,
    /// Buffer bytes of its strategy after the run.
    pub buffer_bytes: u64,
}

/// Builds the strategy and loads the model on one rank, as the harness does: the strategy
/// validates and gives its load plan before any weight is read.
pub fn setup(
    registry: &Registry<B>,
    run: &SuiteRun,
    comm: parallel_core::Comm<B>,
    fixture: &Fixture,
    request: &RequestInfo,
) -> Result<(Box<dyn ParallelStrategy<B>>, harness::AnyDenoiser<B>)> {
    let strategy = run.create(registry, comm.clone())?;
    let d = fixture.desc();
    strategy.validate(&d, request)?;
    let plan = strategy.load_plan(&d)?;
    let model = fixture.load(&plan, fixture.dtype, &comm.device())?;
    Ok((strategy, model))
}

/// One lone forward of `run` on its ranks.
pub fn forward_on_ranks(
    registry: &Registry<B>,
    run: &SuiteRun,
    fixture: &Fixture,
    input: &DenoiserInput<B>,
) -> Vec<Result<RankReport>> {
    launch(run.world_size, &launch_options(), |comm| {
        let mut request = RequestInfo::for_forward(input);
        // The cases' batch of two is a guidance pair.
        request.images = request.batch / run.cfg_degree;
        let (mut strategy, model) = setup(registry, run, comm.clone(), fixture, &request)?;
        let d = model.desc().clone();
        strategy.begin_request(&d, &request)?;
        comm.reset_stats();
        let output = strategy.forward(&model, input, 0)?;
        Ok(RankReport {
            output,
            steps: vec![comm.stats()],
            expected: vec![strategy.expected_comm(&d, &request, StepKind::Forward)?],
            param_bytes: model.param_bytes(),
            buffer_bytes: strategy.buffer_bytes(),
        })
    })
}

/// The guided sampler of a loop over a fixture case: the case's batch of two is the guidance
/// pair (entry 0 unconditional, entry 1 conditional) at scale 4.5; DPM-Solver++ as the tiny
/// pipeline's `scheduler_config.json` sets it up; the latent is the case's first latent
/// entry.
pub fn sampler(case: &DenoiserInput<B>, desc: &ModelDesc, steps: usize) -> Result<Sampler<B>> {
    let config = fixtures_dir().join("pipeline/pixart-alpha-tiny/scheduler/scheduler_config.json");
    let schedule = Scheduler::from_file(&config)
        .and_then(|s| s.set_timesteps(steps))
        .map_err(|e| ParallelError::Model(e.to_string()))?;
    let settings = SamplerSettings {
        guidance_scale: 4.5,
        images: 1,
        latent_channels: desc.in_channels,
        out_channels: desc.out_channels,
        additional_conditions: None,
    };
    Sampler::with_conditioning(schedule, settings, case.clone())
}

/// The initial latents of a loop over `case`: its first sample × the initial noise sigma.
pub fn initial_latents(sampler: &Sampler<B>, case: &DenoiserInput<B>) -> Tensor<B, 4> {
    sampler.initial_latents(case.hidden_states.clone().narrow(0, 0, 1))
}

/// A loop of `steps` steps of `run` over `case`, `repeat` requests on the same instances;
/// per rank, one report per request.
pub fn denoise_on_ranks(
    registry: &Registry<B>,
    run: &SuiteRun,
    fixture: &Fixture,
    case: &DenoiserInput<B>,
    steps: usize,
    repeat: usize,
) -> Vec<Result<Vec<RankReport>>> {
    launch(run.world_size, &launch_options(), |comm| {
        let mut request = RequestInfo::for_forward(case);
        request.steps = steps;
        request.images = 1;
        let (mut strategy, model) = setup(registry, run, comm.clone(), fixture, &request)?;
        let d = model.desc().clone();
        let mut reports = Vec::new();
        for _ in 0..repeat.max(1) {
            let mut sampler = sampler(case, &d, steps)?.watch(comm.clone());
            strategy.begin_request(&d, &request)?;
            comm.reset_stats();
            let latents = initial_latents(&sampler, case);
            let output = strategy.denoise(&model, &mut sampler, latents)?;
            let mut snaps = sampler.snapshots().to_vec();
            snaps.push(comm.stats());
            let expected = (0..steps)
                .map(|i| strategy.expected_comm(&d, &request, StepKind::Denoise(i)))
                .collect::<Result<_>>()?;
            reports.push(RankReport {
                output,
                steps: snaps.windows(2).map(|w| w[1].since(&w[0])).collect(),
                expected,
                param_bytes: model.param_bytes(),
                buffer_bytes: strategy.buffer_bytes(),
            });
        }
        Ok(reports)
    })
}

/// The reference forward of `plan` on `fixture` (computed in float32 on its weights).
pub fn reference_forward(plan: &Plan, fixture: &Fixture, input: &DenoiserInput<B>) -> Tensor<B, 4> {
    let model = fixture.load(&LoadPlan::full(), DType::F32, &Default::default()).expect("load");
    reference::forward(plan, &model, input).expect("reference forward")
}

/// The reference loop of `plan` over `case` (computed in float32 on `fixture`'s weights).
pub fn reference_denoise(
    plan: &Plan,
    fixture: &Fixture,
    case: &DenoiserInput<B>,
    steps: usize,
) -> Tensor<B, 4> {
    let model = fixture.load(&LoadPlan::full(), DType::F32, &Default::default()).expect("load");
    let mut sampler = sampler(case, model.desc(), steps).expect("sampler");
    let latents = initial_latents(&sampler, case);
    reference::denoise(plan, &model, &mut sampler, latents).expect("reference loop")
}

/// The values of a tensor as float32.
pub fn values(t: &Tensor<B, 4>) -> Vec<f32> {
    t.clone().into_data().convert::<f32>().to_vec::<f32>().expect("f32")
}

/// `a` against the reference `b` ([`metrics::compare`]).
pub fn compare(a: &Tensor<B, 4>, b: &Tensor<B, 4>) -> metrics::Comparison {
    metrics::compare(&values(a), &values(b))
}

/// What the transport moved off the rank against the formula, per operation kind, over the
/// whole run (a lone forward, or every step of a loop): the first difference, in words.
///
/// Totals, not step by step: the transport counts a transfer when it executes, and an
/// asynchronous one (PipeFusion's activations, DistriFusion's K/V gathers) executes when its
/// peer gets to it — possibly after this rank's next step began. By the end of the run every
/// operation this rank started has executed (strategies wait on all of them), so the totals
/// are exact.
pub fn comm_mismatch(rep: &RankReport) -> Option<String> {
    if rep.steps.len() != rep.expected.len() {
        return Some(format!("{} steps counted, {} expected", rep.steps.len(), rep.expected.len()));
    }
    for kind in OpKind::ALL {
        let m: u64 = rep.steps.iter().map(|s| s.get(kind).elements).sum();
        let e: u64 = rep.expected.iter().map(|x| x.get(kind)).sum();
        if m != e {
            let formula = rep.expected.last().map(|x| x.formula.as_str()).unwrap_or("");
            return Some(format!(
                "{kind}: the transport moved {m} elements off this rank, the formula says {e} \
                 over {} step(s) ({formula})",
                rep.steps.len()
            ));
        }
    }
    None
}

/// The worst relative L2 error of a check, and what it was measured on.
#[derive(Debug, Clone, PartialEq)]
pub struct Worst {
    /// Relative L2 error against the reference.
    pub rel_l2: f64,
    /// Where.
    pub at: String,
    /// Cases run.
    pub applied: usize,
    /// Cases the run does not apply to, with the strategy's reason (see [`not_applicable`]).
    pub not_applicable: Vec<String>,
}

impl Worst {
    /// What a test prints: the worst error, or why no case applied.
    pub fn summary(&self) -> String {
        match (self.applied == 0, self.not_applicable.first()) {
            (true, Some(why)) => format!("not applicable: {why}"),
            (_, Some(_)) => format!(
                "worst rel L2 {:.2e} ({} case(s) not applicable)",
                self.rel_l2,
                self.not_applicable.len()
            ),
            _ => format!("worst rel L2 {:.2e}", self.rel_l2),
        }
    }
}

/// One forward of `run` on every case of `fixture`: each rank equals the reference forward
/// within the fixture's tolerance and sends exactly what the formula says.
///
/// # Errors
/// The first failure, in words naming the run, fixture, case and rank.
pub fn check_forward(
    registry: &Registry<B>,
    run: &SuiteRun,
    fixture: &Fixture,
) -> std::result::Result<Worst, String> {
    let mut worst =
        Worst { rel_l2: 0.0, at: String::new(), applied: 0, not_applicable: Vec::new() };
    for case in fixture.cases() {
        let input = fixture.read(&case);
        if let Some(reason) = not_applicable(registry, run, fixture, input.grid())? {
            worst.not_applicable.push(reason);
            continue;
        }
        worst.applied += 1;
        let plan = Plan::of(&run.reference, fixture.units(input.grid()), run.group_size());
        let want = reference_forward(&plan, fixture, &input);
        let label =
            format!("{run} {fixture}/{}", case.file_stem().expect("stem").to_string_lossy());
        let tol = fixture.tolerance(false);
        let mut sent = 0;
        for (r, rep) in forward_on_ranks(registry, run, fixture, &input).into_iter().enumerate() {
            let rep = rep.map_err(|e| format!("{label} rank {r}: {e}"))?;
            let c = compare(&rep.output, &want);
            if c.rel_l2.is_nan() || c.rel_l2 > tol {
                return Err(format!("{label} rank {r}: {c} against the reference (bound {tol:e})"));
            }
            if c.rel_l2 > worst.rel_l2 {
                worst.rel_l2 = c.rel_l2;
                worst.at = format!("{label} rank {r}");
            }
            if let Some(m) = comm_mismatch(&rep) {
                return Err(format!("{label} rank {r}: {m}"));
            }
            sent += rep.steps[0].total_elements();
        }
        if run.world_size > 1 && sent == 0 {
            return Err(format!("{label}: no rank sent anything on {} ranks", run.world_size));
        }
    }
    Ok(worst)
}

/// What a loop check measured.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopReport {
    /// Relative L2 of the final latents against the reference loop (worst rank).
    pub rel_l2: f64,
    /// PSNR of the final latents against the serial loop, dB.
    pub psnr_vs_serial: f64,
    /// Why the run does not apply to the fixture's loop case, if it does not
    /// ([`not_applicable`]); the errors are then 0.
    pub not_applicable: Option<String>,
}

/// Reference loops already computed, by fixture, plan and steps: the suite's many runs that
/// share a definition on a fixture (every exact strategy's is the serial loop) compute it
/// once. Owned by the caller (one per test), never global.
#[derive(Default)]
pub struct References(std::collections::BTreeMap<(String, String, usize), Tensor<B, 4>>);

impl References {
    /// The reference loop of `plan` over `fixture`'s loop case, computed on first use.
    pub fn denoise(
        &mut self,
        plan: &Plan,
        fixture: &Fixture,
        case: &DenoiserInput<B>,
        steps: usize,
    ) -> Tensor<B, 4> {
        let key = (fixture.name.clone(), format!("{plan:?}"), steps);
        self.0.entry(key).or_insert_with(|| reference_denoise(plan, fixture, case, steps)).clone()
    }
}

/// `steps` steps of `run` on `fixture`'s loop case, twice on the same instances: the final
/// latents equal the reference loop's within the fixture's loop tolerance on every rank, all
/// ranks return the same latents, every step sends exactly what the formula says, and the
/// second request equals the first.
///
/// # Errors
/// The first failure, in words.
pub fn check_denoise(
    registry: &Registry<B>,
    run: &SuiteRun,
    fixture: &Fixture,
    steps: usize,
) -> std::result::Result<LoopReport, String> {
    check_denoise_with(registry, run, fixture, steps, &mut References::default())
}

/// [`check_denoise`] with reference loops taken from (and added to) `references`.
///
/// # Errors
/// The first failure, in words.
pub fn check_denoise_with(
    registry: &Registry<B>,
    run: &SuiteRun,
    fixture: &Fixture,
    steps: usize,
    references: &mut References,
) -> std::result::Result<LoopReport, String> {
    let case_path = fixture.loop_case();
    let case = fixture.read(&case_path);
    let mut report =
        LoopReport { rel_l2: 0.0, psnr_vs_serial: f64::INFINITY, not_applicable: None };
    if let Some(why) = not_applicable(registry, run, fixture, case.grid())? {
        report.not_applicable = Some(why);
        return Ok(report);
    }
    let rows = fixture.units(case.grid());
    let plan = Plan::of(&run.reference, rows, run.group_size());
    let want = references.denoise(&plan, fixture, &case, steps);
    let serial = references.denoise(&Plan::Serial, fixture, &case, steps);
    let label = format!(
        "{run} {fixture}/{} {steps} steps",
        case_path.file_stem().expect("stem").to_string_lossy()
    );
    let tol = fixture.tolerance(true);
    let mut first: Option<Tensor<B, 4>> = None;
    for (r, reps) in
        denoise_on_ranks(registry, run, fixture, &case, steps, 2).into_iter().enumerate()
    {
        let reps = reps.map_err(|e| format!("{label} rank {r}: {e}"))?;
        let c = compare(&reps[0].output, &want);
        if c.rel_l2.is_nan() || c.rel_l2 > tol {
            return Err(format!(
                "{label} rank {r}: {c} against the reference loop (bound {tol:e})"
            ));
        }
        report.rel_l2 = report.rel_l2.max(c.rel_l2);
        report.psnr_vs_serial = compare(&reps[0].output, &serial).psnr;
        if let Some(m) = comm_mismatch(&reps[0]) {
            return Err(format!("{label} rank {r}: {m}"));
        }
        let again = compare(&reps[1].output, &reps[0].output);
        if again.max_abs != 0.0 {
            return Err(format!(
                "{label} rank {r}: a second request on the same instance differs from the first \
                 ({again}): state leaked between requests"
            ));
        }
        match &first {
            None => first = Some(reps[0].output.clone()),
            Some(f) => {
                let c = compare(&reps[0].output, f);
                if c.max_abs != 0.0 {
                    return Err(format!(
                        "{label}: rank {r} returns other latents than rank 0 ({c})"
                    ));
                }
            }
        }
    }
    Ok(report)
}

//! A new strategy joins the suite by registering: nothing in the suite names it.
//!
//! `RootOnly` is the smallest real strategy (rank 0 runs the serial model, the others receive
//! its prediction by broadcast), written here as a newcomer writes `strategy-foo`: the
//! `ParallelStrategy` implementation, an `info()` with its conformance cases and a
//! `register`. Registering it next to the binary's strategies is all the suite needs: the same
//! checks every built-in strategy passes then run on it. Two broken variants show the suite
//! turning them away: one whose formula undercounts, one that declares a definition it does
//! not follow.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use conformance::{B, check_denoise, check_forward, fixture, registry, runs};
use parallel_core::{
    Comm, CurrentRequest, Denoiser, DenoiserInput, ExpectedComm, ModelDesc, OpKind,
    ParallelStrategy, Reference, Registry, RequestInfo, Result, Serial, StepKind, StrategyInfo,
    SuiteCase,
};

/// Rank 0 computes, every other rank receives the prediction.
struct RootOnly<B: Backend> {
    world: Comm<B>,
    request: CurrentRequest,
    /// A deliberate bug for the tests below: undercount the broadcast by this many elements.
    formula_error: u64,
}

impl<B: Backend> ParallelStrategy<B> for RootOnly<B> {
    fn name(&self) -> &str {
        "root_only"
    }

    fn comm(&self) -> &Comm<B> {
        &self.world
    }

    fn validate(&self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        model.check_grid(request.grid)
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
        self.request.check_input("root_only", input)?;
        let out = if self.world.rank() == 0 {
            model.forward_rows(input, 0..input.grid().height, &mut Serial)?
        } else {
            let d = model.desc();
            let g = input.grid();
            Tensor::zeros(
                [input.batch(), d.out_channels, g.height, g.width],
                &input.hidden_states.device(),
            )
        };
        Ok(self.world.broadcast(out, 0)?)
    }

    fn expected_comm(
        &self,
        model: &ModelDesc,
        request: &RequestInfo,
        _step: StepKind,
    ) -> Result<ExpectedComm> {
        let g = request.grid;
        let mut e = ExpectedComm::none("root_only: rank 0 broadcasts B·C_out·H·W·(N−1)");
        if self.world.rank() == 0 {
            let n =
                (request.batch * model.out_channels * g.height * g.width * (self.world.size() - 1))
                    as u64;
            e.add(OpKind::Broadcast, n.saturating_sub(self.formula_error));
        }
        Ok(e)
    }
}

fn info(name: &'static str, reference: Reference) -> StrategyInfo {
    StrategyInfo {
        name,
        summary: "rank 0 computes, the others receive its prediction",
        options: vec![],
        suite: vec![SuiteCase::new(&[1, 2, 3], reference)],
    }
}

/// What `strategy-root-only`'s `register` would be.
fn register<B: Backend>(registry: &mut Registry<B>) {
    registry.register(info("root_only", Reference::Serial), |comm, _| {
        Ok(Box::new(RootOnly { world: comm, request: CurrentRequest::default(), formula_error: 0 }))
    });
}

#[test]
fn a_registered_strategy_is_run_by_the_suite_and_passes() {
    let mut registry = registry();
    register(&mut registry);
    let mine: Vec<_> = runs(&registry).into_iter().filter(|r| r.strategy == "root_only").collect();
    // Its declared world sizes, then once inside CFG parallelism: 2 groups of 2.
    assert_eq!(
        mine.iter().map(|r| (r.world_size, r.cfg_degree)).collect::<Vec<_>>(),
        vec![(1, 1), (2, 1), (3, 1), (4, 2)]
    );
    for f in [fixture("pixart-alpha"), fixture("dit")] {
        for run in &mine {
            check_forward(&registry, run, &f).unwrap();
            check_denoise(&registry, run, &f, 3).unwrap();
        }
    }
}

#[test]
fn a_formula_that_undercounts_by_one_element_fails() {
    let mut registry: Registry<B> = Registry::new();
    registry.register(info("root_only", Reference::Serial), |comm, _| {
        Ok(Box::new(RootOnly { world: comm, request: CurrentRequest::default(), formula_error: 1 }))
    });
    let run = runs(&registry)
        .into_iter()
        .find(|r| r.strategy == "root_only" && r.world_size == 2 && r.cfg_degree == 1)
        .unwrap();
    let e = check_forward(&registry, &run, &fixture("pixart-alpha")).unwrap_err();
    assert!(e.contains("broadcast: the transport moved") && e.contains("the formula says"), "{e}");
}

#[test]
fn a_strategy_that_is_not_what_it_declares_fails() {
    // naive patch's behaviour under a name that claims DistriFusion's definition.
    let mut registry: Registry<B> = Registry::new();
    registry.register(
        info(
            "liar",
            Reference::DisplacedPatches {
                warmup_steps: 1,
                norm: parallel_core::GroupNormMode::CorrectedAsync,
            },
        ),
        |comm, _| Ok(Box::new(strategy_distrifusion::NaivePatch::new(comm))),
    );
    let run = runs(&registry).into_iter().find(|r| r.world_size == 2).unwrap();
    let e = check_forward(&registry, &run, &fixture("pixart-alpha")).unwrap_err();
    assert!(e.contains("against the reference"), "{e}");
    let e = check_denoise(&registry, &run, &fixture("pixart-alpha"), 3).unwrap_err();
    assert!(e.contains("against the reference loop"), "{e}");
}

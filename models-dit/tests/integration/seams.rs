//! The seams and stages: a band of rows computed with full-sequence attention supplied by the
//! seams equals those rows of the full forward, and a pipeline of stage instances (each
//! loading only its blocks) equals the whole model.

use crate::common::{B, errors, fixtures, read_case};
use burn::tensor::Tensor;
use models_dit::DitModel;
use parallel_core::attention::sdpa;
use parallel_core::{AttentionSite, Denoiser, LoadPlan, Result, Seams, Serial, StagedDenoiser};

/// Bands and pipelines compute the same operations on subsets of the tokens; only kernel
/// blocking over fewer rows could reorder float32 sums. Measured on the reference machine
/// (AMD EPYC, AVX2), with 1 and with all rayon threads: **0** — band K/V, band outputs and
/// pipeline stages are bitwise equal to the full forward in every case below. The bar is not
/// zero so that a reordering backend or SIMD width still passes: 1e-6 is ~3× the
/// reassociation error that tensor-parallel sums show (3.2e-7, `tests/integration/tensor_parallel.rs`),
/// and it still exposes any token mixing or position-embedding offset (those move the output
/// by ≥ 1e-2; attending to the band's own tokens only gives 1.1e-1, below).
const SAME: f64 = 1e-6;

/// Serial attention that records every layer's K and V (all tokens).
#[derive(Default)]
struct Record {
    kv: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
}

impl Seams<B> for Record {
    fn self_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        assert_eq!(site.layer, self.kv.len());
        assert_eq!(site.tokens, 0..site.total_tokens);
        self.kv.push((k.clone(), v.clone()));
        Ok(sdpa(q, k, v, None))
    }
}

/// Attention of a band's queries to the K/V of *all* tokens (recorded from the full
/// forward), after checking that the band's own K/V are the matching rows of them.
struct FullKv<'a> {
    kv: &'a [(Tensor<B, 4>, Tensor<B, 4>)],
    calls: usize,
    /// Worst relative L2 error of the band's own K/V against the full forward's rows.
    worst_kv: f64,
}

impl Seams<B> for FullKv<'_> {
    fn self_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let (full_k, full_v) = &self.kv[site.layer];
        let [_, _, total, _] = full_k.dims();
        assert_eq!(total, site.total_tokens);
        let local = |t: &Tensor<B, 4>| t.clone().narrow(2, site.tokens.start, site.tokens.len());
        let (ek, _) = errors(&k, &local(full_k));
        let (ev, _) = errors(&v, &local(full_v));
        assert!(ek < SAME && ev < SAME, "layer {}: band K/V differ ({ek:e}, {ev:e})", site.layer);
        self.worst_kv = self.worst_kv.max(ek).max(ev);
        self.calls += 1;
        Ok(sdpa(q, full_k.clone(), full_v.clone(), None))
    }
}

fn bands_equal_full(model: &str, case: &str, bands: &[std::ops::Range<usize>]) {
    let dev = Default::default();
    let m = DitModel::<B>::load(fixtures().join(model), &LoadPlan::full(), &dev).unwrap();
    let case = read_case(&fixtures().join(model).join("cases").join(format!("{case}.safetensors")));
    let h = case.input.grid().height;
    let mut record = Record::default();
    let full = m.forward_rows(&case.input, 0..h, &mut record).unwrap();
    assert_eq!(record.kv.len(), m.desc().num_layers);
    let serial = m.forward_rows(&case.input, 0..h, &mut Serial).unwrap();
    let (l2_serial, _) = errors(&full, &serial);
    println!("{model}/{}: recording seams vs Serial rel L2 {l2_serial:.2e}", case.name);
    assert!(l2_serial < SAME);
    let mut covered = 0;
    for rows in bands {
        let mut seams = FullKv { kv: &record.kv, calls: 0, worst_kv: 0.0 };
        let band = m.forward_rows(&case.input, rows.clone(), &mut seams).unwrap();
        assert_eq!(seams.calls, m.desc().num_layers);
        let want = full.clone().narrow(2, rows.start, rows.len());
        let (l2, max) = errors(&band, &want);
        println!(
            "{model}/{} rows {rows:?}: band K/V rel L2 {:.2e}, output rel L2 {l2:.2e}, max rel \
             {max:.2e}",
            case.name, seams.worst_kv
        );
        // Max-relative: measured 0 (bitwise); 3 × SAME, as in `tests/integration/tensor_parallel.rs`.
        assert!(l2 < SAME && max < 3.0 * SAME, "{model} rows {rows:?}: {l2:e} {max:e}");
        covered += rows.len();
    }
    assert_eq!(covered, h);
}

#[test]
fn pixart_bands_with_full_kv_equal_the_full_output() {
    bands_equal_full("pixart-alpha", "square", &[0..8, 8..16]);
    // 10 token rows in 3 uneven bands, on the model with size conditions.
    bands_equal_full("pixart-alpha-ms", "rows10", &[0..6, 6..14, 14..20]);
}

#[test]
fn dit_bands_with_full_kv_equal_the_full_output() {
    bands_equal_full("dit", "big", &[0..12, 12..24]);
}

#[test]
fn bands_with_serial_seams_attend_to_their_own_tokens_only() {
    // Serial seams on a band = naive patch parallelism: it must differ from the full output
    // (proves the band does not see other tokens through some other path).
    let dev = Default::default();
    let m = DitModel::<B>::load(fixtures().join("pixart-alpha"), &LoadPlan::full(), &dev).unwrap();
    let case = read_case(&fixtures().join("pixart-alpha/cases/square.safetensors"));
    let band = m.forward_rows(&case.input, 0..8, &mut Serial).unwrap();
    let want = case.sample.clone().narrow(2, 0, 8);
    let (l2, _) = errors(&band, &want);
    println!("pixart-alpha/square rows 0..8, own tokens only: rel L2 {l2:.2e}");
    // A lower bound: measured 1.14e-1 on the reference machine (AMD EPYC, AVX2); 1e-2 is
    // 11× below that (it was 1e-3) and 10³ above the 1e-5 bar that the full forward meets
    // against this same diffusers sample (measured 1.2e-6), so neither can pass for the other.
    assert!(l2 > 1e-2, "{l2:e}");
}

/// Runs `stages` (plans of consecutive blocks) as a pipeline through the staged interface.
fn pipeline_equals_full(model: &str, case: &str, stages: &[LoadPlan]) {
    let dev = Default::default();
    let folder = fixtures().join(model);
    let full = DitModel::<B>::load(&folder, &LoadPlan::full(), &dev).unwrap();
    let case_name = case;
    let case = read_case(&folder.join("cases").join(format!("{case}.safetensors")));
    let grid = full.desc().tokens(case.input.grid());
    let rows = 0..grid.rows;
    let want = full.forward_rows(&case.input, 0..case.input.grid().height, &mut Serial).unwrap();
    let mut hidden = None;
    let mut out = None;
    let mut stage_bytes = 0;
    for plan in stages {
        let m = DitModel::<B>::load(&folder, plan, &dev).unwrap();
        assert_eq!(m.held_blocks(), plan.blocks.clone().unwrap());
        stage_bytes += m.param_bytes();
        let cond = m.condition(&case.input).unwrap();
        let mut h = match hidden.take() {
            None => m.embed(&case.input, rows.clone(), &cond).unwrap(),
            Some(h) => h,
        };
        for i in m.held_blocks() {
            h = m.block(i, h, rows.clone(), &cond, &mut Serial).unwrap();
        }
        if plan.skip_head {
            hidden = Some(h);
        } else {
            out = Some(m.head(h, rows.clone(), &cond).unwrap());
        }
    }
    let (l2, max) = errors(&out.unwrap(), &want);
    println!(
        "{model}/{} in {} stages: rel L2 {l2:.2e}, max rel {max:.2e}",
        case_name,
        stages.len()
    );
    // Max-relative: measured 0 (bitwise); 3 × SAME, as in `tests/integration/tensor_parallel.rs`.
    assert!(l2 < SAME && max < 3.0 * SAME, "{model}: {l2:e} {max:e}");
    assert!(stage_bytes > full.param_bytes(), "stages replicate the conditioning");
}

fn stages(bounds: &[usize]) -> Vec<LoadPlan> {
    let n = bounds.len() - 1;
    (0..n)
        .map(|s| LoadPlan {
            tensor_shard: None,
            blocks: Some(bounds[s]..bounds[s + 1]),
            skip_embed: s > 0,
            skip_head: s + 1 < n,
        })
        .collect()
}

#[test]
fn pipeline_stages_equal_the_whole_model() {
    pipeline_equals_full("pixart-alpha", "wide", &stages(&[0, 2, 4]));
    pipeline_equals_full("pixart-alpha-ms", "tall", &stages(&[0, 1, 3, 4]));
    // The last DiT stage holds the final layer but not block 0, whose embedder it reuses.
    pipeline_equals_full("dit", "square", &stages(&[0, 1, 4]));
    pipeline_equals_full("dit", "big", &stages(&[0, 2, 3, 4]));
}

#[test]
fn stage_instances_refuse_what_they_do_not_hold() {
    let dev = Default::default();
    let folder = fixtures().join("dit");
    let plan = &stages(&[0, 2, 4])[1];
    let m = DitModel::<B>::load(&folder, plan, &dev).unwrap();
    let case = read_case(&folder.join("cases/square.safetensors"));
    let cond = m.condition(&case.input).unwrap();
    let err = m.embed(&case.input, 0..8, &cond).unwrap_err().to_string();
    assert!(err.contains("without the patch embedding"), "{err}");
    let h = Tensor::<B, 3>::zeros([2, 64, 32], &dev);
    let err = m.block(0, h, 0..8, &cond, &mut Serial).unwrap_err().to_string();
    assert!(err.contains("block 0 is not held"), "{err}");
    let err = m.forward_rows(&case.input, 0..16, &mut Serial).unwrap_err().to_string();
    assert!(err.contains("needs all 4 blocks"), "{err}");
}

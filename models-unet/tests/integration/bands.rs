//! The banded forward is the whole forward cut into rows: with seams that hand every band
//! what the whole-map forward had (the neighbours' rows before each convolution, the whole
//! map's group-norm statistics, the whole map's keys and values), the bands' outputs,
//! stacked, equal the whole-map output. This checks the row arithmetic of every level
//! (stride-2 convolutions, nearest ×2, skips), that the site indices of a band's forward
//! line up with the whole forward's, and `conv_in`'s halo from the input.
//!
//! With the serial seams instead, a band differs from the whole forward (its halos are zero
//! padding, its statistics and attention local): that the exact seams are needed is checked
//! too, so the test cannot pass with a forward that ignores the seams.

use std::collections::HashMap;

use crate::common::{B, cases, errors, fixtures, read_case};
use burn::tensor::Tensor;
use models_unet::UnetModel;
use parallel_core::attention::sdpa;
use parallel_core::{
    AttentionSite, Denoiser, GroupNormStats, Halo, LoadPlan, RowSite, Seams, Serial,
};

/// Records the whole-map forward's seam inputs.
#[derive(Default)]
struct Record {
    convs: HashMap<usize, Tensor<B, 4>>,
    norms: HashMap<usize, GroupNormStats<B>>,
    kv: HashMap<usize, (Tensor<B, 4>, Tensor<B, 4>)>,
}

impl Seams<B> for Record {
    fn self_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> parallel_core::Result<Tensor<B, 4>> {
        assert_eq!(site.tokens, 0..site.total_tokens);
        self.kv.insert(site.layer, (k.clone(), v.clone()));
        Ok(sdpa(q, k, v, None))
    }

    fn conv_halo(
        &mut self,
        site: &RowSite,
        x: Tensor<B, 4>,
        _: usize,
    ) -> parallel_core::Result<Halo<B>> {
        assert_eq!(site.rows, 0..site.total_rows);
        self.convs.insert(site.index, x.clone());
        Ok(Halo { tensor: x, top: 0, bottom: 0 })
    }

    fn group_norm_stats(
        &mut self,
        site: &RowSite,
        local: GroupNormStats<B>,
    ) -> parallel_core::Result<GroupNormStats<B>> {
        self.norms.insert(site.index, local.clone());
        Ok(local)
    }
}

/// Hands a band what the whole forward had.
struct Exact<'r>(&'r Record);

impl Seams<B> for Exact<'_> {
    fn self_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        _k: Tensor<B, 4>,
        _v: Tensor<B, 4>,
    ) -> parallel_core::Result<Tensor<B, 4>> {
        let (k, v) = self.0.kv[&site.layer].clone();
        assert_eq!(k.dims()[2], site.total_tokens);
        Ok(sdpa(q, k, v, None))
    }

    fn conv_halo(
        &mut self,
        site: &RowSite,
        x: Tensor<B, 4>,
        halo: usize,
    ) -> parallel_core::Result<Halo<B>> {
        let full = self.0.convs[&site.index].clone();
        assert_eq!(full.dims()[2], site.total_rows, "conv {}: total rows", site.index);
        let top = halo.min(site.rows.start);
        let bottom = halo.min(site.total_rows - site.rows.end);
        let mine = full.clone().narrow(2, site.rows.start, site.rows.len());
        let (l2, _) = errors(&x, &mine);
        assert!(
            l2 < 1e-5,
            "conv {}: the band's own rows differ from the whole map's ({l2:.1e})",
            site.index
        );
        let start = site.rows.start - top;
        let tensor = full.narrow(2, start, site.rows.len() + top + bottom);
        Ok(Halo { tensor, top, bottom })
    }

    fn group_norm_stats(
        &mut self,
        site: &RowSite,
        _local: GroupNormStats<B>,
    ) -> parallel_core::Result<GroupNormStats<B>> {
        Ok(self.0.norms[&site.index].clone())
    }
}

fn check(model: &str, bands: usize) {
    let dev = Default::default();
    let m = UnetModel::<B>::load(fixtures().join(model), &LoadPlan::full(), &dev).unwrap();
    let g = m.desc().row_granularity;
    for file in cases(model) {
        let case = read_case(&file);
        let h = case.input.grid().height;
        if !h.is_multiple_of(g * bands) {
            continue;
        }
        let mut record = Record::default();
        let whole = m.forward_rows(&case.input, 0..h, &mut record).unwrap();
        let (l2, _) = errors(&whole, &case.out);
        assert!(l2 < 1e-5, "{model}/{}: whole forward {l2:.1e}", case.name);
        let step = h / bands;
        let parts: Vec<Tensor<B, 4>> = (0..bands)
            .map(|i| {
                m.forward_rows(&case.input, i * step..(i + 1) * step, &mut Exact(&record)).unwrap()
            })
            .collect();
        let stacked = Tensor::cat(parts, 2);
        let (l2, max) = errors(&stacked, &whole);
        println!("{model}/{}: {bands} bands vs whole: rel L2 {l2:.2e}, max {max:.2e}", case.name);
        // Summation-order noise only (the band convolutions and attention see the same
        // numbers in another blocking); measured ≤ 2e-7.
        assert!(l2 < 1e-6, "{model}/{}: bands differ from the whole map: {l2:.2e}", case.name);
        // The serial seams give another answer: the exact seams are what makes bands equal.
        let naive: Vec<Tensor<B, 4>> = (0..bands)
            .map(|i| m.forward_rows(&case.input, i * step..(i + 1) * step, &mut Serial).unwrap())
            .collect();
        let (l2, _) = errors(&Tensor::cat(naive, 2), &whole);
        assert!(
            l2 > 1e-2,
            "{model}/{}: bands with local seams equal the whole map ({l2:.1e})",
            case.name
        );
    }
}

#[test]
fn sd15_bands_equal_the_whole_forward() {
    check("sd15", 2);
}

#[test]
fn sdxl_bands_equal_the_whole_forward() {
    check("sdxl", 2);
    check("sdxl", 4);
}

#[test]
fn a_band_off_the_row_granularity_is_refused() {
    let dev = Default::default();
    let m = UnetModel::<B>::load(fixtures().join("sd15"), &LoadPlan::full(), &dev).unwrap();
    let case = read_case(&fixtures().join("sd15/cases/square.safetensors"));
    let err = m.forward_rows(&case.input, 0..4, &mut Serial).unwrap_err().to_string();
    assert!(err.contains("down-sampling 8"), "{err}");
    // A latent that is not a multiple of 8 runs whole, but cannot be cut into bands.
    let odd = read_case(&fixtures().join("sd15/cases/odd.safetensors"));
    let err = m.forward_rows(&odd.input, 0..8, &mut Serial).unwrap_err().to_string();
    assert!(err.contains("multiple of 8"), "{err}");
}

/// Records every site a forward passes, as the description would name it.
struct Sites {
    latent: [usize; 2],
    seen: Vec<parallel_core::FeatureSite>,
}

impl Sites {
    fn scale(&self, total_rows: usize) -> usize {
        assert_eq!(self.latent[0] % total_rows, 0, "a map of {total_rows} rows");
        self.latent[0] / total_rows
    }
}

impl Seams<B> for Sites {
    fn self_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> parallel_core::Result<Tensor<B, 4>> {
        let [_, heads, _, d] = q.dims();
        let pixels = self.latent[0] * self.latent[1];
        let scale = (1..=64).find(|s| s * s * site.total_tokens == pixels).expect("a scale");
        self.seen.push(parallel_core::FeatureSite::SelfAttention {
            channels: heads * d,
            heads,
            scale,
        });
        Ok(sdpa(q, k, v, None))
    }

    fn reduce_partial(
        &mut self,
        site: &parallel_core::ReduceSite,
        partial: Tensor<B, 3>,
    ) -> parallel_core::Result<Tensor<B, 3>> {
        let [_, a, b] = partial.dims();
        let (pixels, channels) =
            if site.projection == parallel_core::Projection::ConvOut { (b, a) } else { (a, b) };
        let all = self.latent[0] * self.latent[1];
        let scale = (1..=64).find(|s| s * s * pixels == all).expect("a scale");
        self.seen.push(parallel_core::FeatureSite::Reduce { channels, scale });
        Ok(partial)
    }

    fn conv_halo(
        &mut self,
        site: &RowSite,
        x: Tensor<B, 4>,
        halo: usize,
    ) -> parallel_core::Result<Halo<B>> {
        let scale = self.scale(site.total_rows);
        self.seen.push(parallel_core::FeatureSite::Conv { channels: x.dims()[1], halo, scale });
        Ok(Halo { tensor: x, top: 0, bottom: 0 })
    }

    fn group_norm_stats(
        &mut self,
        site: &RowSite,
        local: GroupNormStats<B>,
    ) -> parallel_core::Result<GroupNormStats<B>> {
        let scale = self.scale(site.total_rows);
        let groups = local.mean.dims()[1];
        let pixels = site.rows.len() * self.latent[1] / scale;
        let channels = local.count * groups / pixels;
        self.seen.push(parallel_core::FeatureSite::GroupNorm { channels, groups, scale });
        Ok(local)
    }
}

/// `ModelDesc::feature_sites` (what strategies count their exchanges from) is the list of
/// sites a forward passes, kind, channels, heads, groups and resolution, in order.
#[test]
fn the_described_sites_are_the_sites_a_forward_passes() {
    for model in ["sd15", "sd2", "sdxl"] {
        let dir = fixtures().join(model);
        let unet = UnetModel::<B>::load(&dir, &LoadPlan::full(), &Default::default()).unwrap();
        let case = read_case(&fixtures().join(model).join("cases/wide.safetensors"));
        let [_, _, h, w] = case.input.hidden_states.dims();
        let mut sites = Sites { latent: [h, w], seen: Vec::new() };
        unet.forward_rows(&case.input, 0..h, &mut sites).unwrap();
        let described = &unet.desc().feature_sites;
        assert_eq!(&sites.seen, described, "{model}: the forward's sites, then the description's");
        let attention = described
            .iter()
            .filter(|s| matches!(s, parallel_core::FeatureSite::SelfAttention { .. }))
            .count();
        assert_eq!(attention, unet.desc().num_layers, "{model}");
    }
}

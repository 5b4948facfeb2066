//! # strategy-ulysses: Ulysses sequence parallelism, and USP (Ulysses × Ring)
//!
//! ## Algorithm
//! The image tokens are split by latent (token) rows over the `N` ranks (balanced, longer
//! bands first; uneven splits are fine). Every layer runs on the local tokens, except
//! self-attention: there the ranks of a Ulysses group exchange q, k and v with one
//! all-to-all (scatter heads, gather tokens), so each rank holds *all* the group's tokens
//! for `H/u` of the heads, attends, and a second all-to-all (scatter tokens back with the
//! bands' own sizes, gather heads) returns the output to the token split. Cross-attention
//! and the feed-forward are local. After the last layer the bands' outputs are
//! all-gathered along the latent rows: the noise prediction is complete on every rank.
//!
//! **USP** (`usp`, `ulysses_degree × ring_degree = N`): the ranks form a mesh whose Ulysses
//! groups are neighbouring ranks and whose rings run across the groups. After the Ulysses
//! all-to-all, a rank holds its group's tokens for `H/u` heads; the attention over the
//! other groups' tokens is the ring of `strategy-ring` ([`RingAttention`]), on the ring
//! group. `ulysses` is USP with `ring_degree = 1`; `ring` (its own crate) is the case
//! `ulysses_degree = 1`.
//!
//! ## Constraints
//! The heads must be divisible by the Ulysses degree; at least one token row per rank.
//! Both are checked before any work, with an error that says what to change.
//!
//! ## Config keys
//! - `ulysses`: none (`--strategy ulysses --world-size N`);
//! - `usp`: `ulysses_degree`, `ring_degree` (give one or both; their product must be the
//!   world size).
//!
//! ## Communication (per denoising step, per rank `w`)
//! `B` batch, `H` heads, `d` head dim (`hs = H·d`), `L` layers, `n_w` the rank's tokens,
//! `T_g` the tokens of its Ulysses group, `u` and `R` the degrees:
//!
//! ```text
//! all_to_all = L · [ 3·B·H·n_w·d·(u−1)/u          (q, k, v: heads out, tokens in)
//!                  + B·(H/u)·d·(T_g − n_w) ]      (output: tokens out, heads in)
//!            ≈ 4·(p/N)·hs·(N−1)/N·L for pure Ulysses
//! send (ring) = L · 2 · B·(H/u)·d · Σ_{j ≠ (ρ+1) mod R} T_j   (ρ: the ring rank)
//! all_gather (output) = B · C_out · (n_w rows · patch) · W · (N − 1)
//! ```

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use parallel_core::attention::{joint_sdpa, sdpa};
use parallel_core::split::{output_gather_elements, row_partition, row_split_forward};
use parallel_core::{
    AttentionSite, Axis, Comm, CurrentRequest, Denoiser, DenoiserInput, ExpectedComm, JointOutput,
    Mesh, ModelDesc, ModelFamily, NoOptions, OpKind, OptionInfo, OptionValue, ParallelError,
    ParallelStrategy, Reference, Registry, RequestInfo, Result, Seams, StepKind, StrategyConfig,
    StrategyInfo, StrategyOptions, SuiteCase, TextQkv,
};
pub use strategy_ring::RingAttention;

/// The registered name of pure Ulysses.
pub const NAME: &str = "ulysses";
/// The registered name of the Ulysses × Ring hybrid.
pub const USP_NAME: &str = "usp";

/// The strategy's config for library users (it takes no options).
pub const CONFIG: NoOptions = NoOptions(NAME);

/// USP's degrees, as a typed value: give one or both (their product is the world size).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UspConfig {
    /// Ranks of each Ulysses group (must divide the heads).
    pub ulysses_degree: Option<usize>,
    /// Ranks of each ring.
    pub ring_degree: Option<usize>,
}

impl UspConfig {
    /// The config of registry options.
    pub fn from_options(opts: &StrategyOptions) -> Result<Self> {
        Ok(UspConfig {
            ulysses_degree: opts.opt_usize("ulysses_degree")?,
            ring_degree: opts.opt_usize("ring_degree")?,
        })
    }
}

impl StrategyConfig for UspConfig {
    fn name(&self) -> &'static str {
        USP_NAME
    }

    fn options(&self) -> StrategyOptions {
        let mut o = StrategyOptions::new(USP_NAME);
        if let Some(u) = self.ulysses_degree {
            o.set("ulysses_degree", OptionValue::Int(u as i64));
        }
        if let Some(r) = self.ring_degree {
            o.set("ring_degree", OptionValue::Int(r as i64));
        }
        o
    }
}

/// Ulysses (and USP) sequence parallelism.
pub struct Usp<B: Backend> {
    name: &'static str,
    world: Comm<B>,
    mesh: Mesh,
    ulysses: Comm<B>,
    ring: RingAttention<B>,
    forwards: u32,
    request: CurrentRequest,
}

impl<B: Backend> Usp<B> {
    /// Pure Ulysses over the whole world.
    pub fn ulysses(world: Comm<B>) -> Result<Self> {
        let n = world.size();
        Self::with_degrees(NAME, world, n, 1)
    }

    /// USP with the given degrees (`ulysses × ring` must be the world size).
    pub fn with_degrees(
        name: &'static str,
        world: Comm<B>,
        ulysses_degree: usize,
        ring_degree: usize,
    ) -> Result<Self> {
        let n = world.size();
        let mesh = Mesh::new(n, &[(Axis::Ring, ring_degree), (Axis::Ulysses, ulysses_degree)])
            .map_err(|e| ParallelError::BadOption {
                strategy: name.into(),
                key: "ulysses_degree".into(),
                reason: format!(
                    "ulysses_degree {ulysses_degree} × ring_degree {ring_degree} must equal the \
                     world size {n} ({e})"
                ),
            })?;
        let ulysses = world.split(&mesh, &[Axis::Ulysses])?;
        let ring = RingAttention::new(world.split(&mesh, &[Axis::Ring])?);
        Ok(Usp {
            name,
            world,
            mesh,
            ulysses,
            ring,
            forwards: 0,
            request: CurrentRequest::default(),
        })
    }

    /// The Ulysses degree.
    pub fn ulysses_degree(&self) -> usize {
        self.mesh.degree(Axis::Ulysses)
    }

    /// The ring degree.
    pub fn ring_degree(&self) -> usize {
        self.mesh.degree(Axis::Ring)
    }

    /// Tokens of every world rank for this request.
    fn tokens_per_rank(&self, model: &ModelDesc, request: &RequestInfo) -> Result<Vec<usize>> {
        let cols = request.grid.width / model.patch_size;
        Ok(row_partition(self.name, model, request.grid, self.world.size())?
            .iter()
            .map(|p| p.len() * cols)
            .collect())
    }
}

/// `q`, `k`, `v` (`[B, H, n, d]`, as the model's head split views its projections'
/// `[B, n, H·d]`) stacked to `[B, 3, H, n, d]` with one copy: stacked in token-major order
/// (`[B, n, 3, H, d]`, whole rows of heads per copy) and viewed in head-major order. Stacking
/// the `[B, H, n, d]` views directly had Flex copy each of them element by element first.
fn stack_qkv<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 5> {
    let rows = |t: Tensor<B, 4>| kernels::contiguous(t.swap_dims(1, 2));
    Tensor::stack::<5>(vec![rows(q), rows(k), rows(v)], 2).permute([0, 2, 3, 1, 4])
}

struct UspSeams<'a, B: Backend> {
    ulysses: &'a Comm<B>,
    /// Tokens of each member of this rank's Ulysses group, in group order.
    group_tokens: Vec<usize>,
    ring: &'a mut RingAttention<B>,
}

impl<B: Backend> Seams<B> for UspSeams<'_, B> {
    fn self_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        let u = self.ulysses.size();
        let (q, k, v) = if u > 1 {
            // [B, 3, H, n, d]: one all-to-all for q, k and v (scatter heads, gather tokens).
            let qkv = stack_qkv(q, k, v);
            let qkv = self.ulysses.all_to_all(qkv, 2, 3)?;
            let part = |i| qkv.clone().narrow(1, i, 1).squeeze_dim::<4>(1);
            (part(0), part(1), part(2))
        } else {
            (q, k, v)
        };
        let out = if self.ring.comm().size() > 1 {
            self.ring.attend(site.layer, q, k, v)?
        } else {
            sdpa(q, k, v, None)
        };
        if u > 1 {
            // Back to the token split: scatter tokens with the bands' sizes, gather heads.
            Ok(self.ulysses.all_to_all_sizes(out, 2, &self.group_tokens, 1)?)
        } else {
            Ok(out)
        }
    }

    fn joint_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        text: TextQkv<B>,
    ) -> Result<JointOutput<B>> {
        let u = self.ulysses.size();
        let heads = q.dims()[1] / u;
        let (q, k, v) = if u > 1 {
            let qkv = stack_qkv(q, k, v);
            let qkv = self.ulysses.all_to_all(qkv, 2, 3)?;
            let part = |i| qkv.clone().narrow(1, i, 1).squeeze_dim::<4>(1);
            (part(0), part(1), part(2))
        } else {
            (q, k, v)
        };
        // The text stream is whole on every rank: take this rank's heads of it, no exchange.
        let g = self.ulysses.rank();
        let mine = |t: Tensor<B, 4>| if u > 1 { t.narrow(1, g * heads, heads) } else { t };
        let text = TextQkv { q: text.q.map(mine), k: mine(text.k), v: mine(text.v) };
        let (image, text) = if self.ring.comm().size() > 1 {
            self.ring.attend_joint(site.layer, q, k, v, text)?
        } else {
            joint_sdpa(q, k, v, text)
        };
        if u == 1 {
            return Ok((image, text));
        }
        let image = self.ulysses.all_to_all_sizes(image, 2, &self.group_tokens, 1)?;
        // Every rank needs every head of the text output: gather them over the group.
        let text = text.map(|t| self.ulysses.all_gather(t, 1)).transpose()?;
        Ok((image, text))
    }
}

/// The description of `ulysses` for the registry.
pub fn info() -> StrategyInfo {
    StrategyInfo {
        name: NAME,
        summary: "tokens split by rows; all-to-all to heads for attention (fresh K/V)",
        options: vec![],
        suite: vec![SuiteCase::new(&[1, 2, 4], Reference::Serial)],
    }
}

/// The description of `usp` for the registry.
pub fn usp_info() -> StrategyInfo {
    StrategyInfo {
        name: USP_NAME,
        summary: "Ulysses groups of neighbouring ranks, Ring across them (fresh K/V)",
        options: vec![
            OptionInfo {
                key: "ulysses_degree",
                default: "world size / ring_degree",
                doc: "ranks of each Ulysses group (must divide the heads)",
            },
            OptionInfo {
                key: "ring_degree",
                default: "world size / ulysses_degree",
                doc: "ranks of each ring",
            },
        ],
        suite: vec![
            SuiteCase::new(&[4], Reference::Serial)
                .with("ulysses_degree", OptionValue::Int(2))
                .with("ring_degree", OptionValue::Int(2)),
            SuiteCase::new(&[2], Reference::Serial).with("ring_degree", OptionValue::Int(2)),
            SuiteCase::new(&[2, 4], Reference::Serial).with("ring_degree", OptionValue::Int(1)),
        ],
    }
}

impl<B: Backend> Usp<B> {
    /// USP over `world` with the degrees of `config` (one of them may be left to follow
    /// from the world size).
    ///
    /// # Errors
    /// Degrees that do not multiply to the world size, naming the key.
    pub fn from_config(world: Comm<B>, config: &UspConfig) -> Result<Self> {
        let n = world.size();
        let bad = |key: &str, reason: String| ParallelError::BadOption {
            strategy: USP_NAME.into(),
            key: key.into(),
            reason,
        };
        let (u, r) = match (config.ulysses_degree, config.ring_degree) {
            (Some(u), Some(r)) => (u, r),
            (Some(u), None) if u > 0 && n.is_multiple_of(u) => (u, n / u),
            (None, Some(r)) if r > 0 && n.is_multiple_of(r) => (n / r, r),
            (Some(u), None) => {
                return Err(bad(
                    "ulysses_degree",
                    format!("{u} does not divide the world size {n}"),
                ));
            }
            (None, Some(r)) => {
                return Err(bad("ring_degree", format!("{r} does not divide the world size {n}")));
            }
            (None, None) => {
                return Err(bad(
                    "ulysses_degree",
                    format!(
                        "give ulysses_degree and/or ring_degree (their product is the world size {n})"
                    ),
                ));
            }
        };
        Usp::with_degrees(USP_NAME, world, u, r)
    }
}

/// Registers `ulysses` and `usp`.
pub fn register<B: Backend>(registry: &mut Registry<B>) {
    registry.register(info(), |comm, _| Ok(Box::new(Usp::ulysses(comm)?)));
    registry.register(usp_info(), |comm, opts| {
        Ok(Box::new(Usp::from_config(comm, &UspConfig::from_options(opts)?)?))
    });
}

impl<B: Backend> ParallelStrategy<B> for Usp<B> {
    fn name(&self) -> &str {
        self.name
    }

    fn comm(&self) -> &Comm<B> {
        &self.world
    }

    fn validate(&self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        model.require_one_of(
            self.name,
            &[ModelFamily::Dit, ModelFamily::MmDit],
            "it splits the attention heads of a stack of transformer blocks",
        )?;
        let u = self.ulysses_degree();
        if !model.num_heads.is_multiple_of(u) {
            let divisors: Vec<String> = (1..=model.num_heads)
                .filter(|d| model.num_heads.is_multiple_of(*d))
                .map(|d| d.to_string())
                .collect();
            return Err(ParallelError::Unsupported {
                strategy: self.name.into(),
                reason: format!(
                    "{} has {} attention heads, not divisible by the Ulysses degree {u}; use a \
                     Ulysses degree among {}",
                    model.class_name,
                    model.num_heads,
                    divisors.join(", ")
                ),
            });
        }
        row_partition(self.name, model, request.grid, self.world.size()).map(|_| ())
    }

    fn begin_request(&mut self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        self.validate(model, request)?;
        self.forwards = 0;
        self.request.begin(request);
        Ok(())
    }

    fn forward(
        &mut self,
        model: &dyn Denoiser<B>,
        input: &DenoiserInput<B>,
        _step: usize,
    ) -> Result<Tensor<B, 4>> {
        let request = self.request.check_input(self.name, input)?;
        let tokens = self.tokens_per_rank(model.desc(), request)?;
        // Token counts by this group's own rank numbering (the Usp group may itself be a
        // part of the world, e.g. one half of a CFG split: its members are not 0..N).
        let group_tokens = self
            .mesh
            .group(self.world.rank(), &[Axis::Ulysses])
            .iter()
            .map(|&r| tokens[r])
            .collect();
        self.ring.begin_forward(self.forwards);
        self.forwards += 1;
        let mut seams = UspSeams { ulysses: &self.ulysses, group_tokens, ring: &mut self.ring };
        row_split_forward(self.name, model, input, &self.world, &mut seams)
    }

    fn expected_comm(
        &self,
        model: &ModelDesc,
        request: &RequestInfo,
        _step: StepKind,
    ) -> Result<ExpectedComm> {
        // Every evaluation moves the same all-to-alls, ring K/V and output gather.
        let (u, rd) = (self.ulysses_degree(), self.ring_degree());
        let w = self.world.rank();
        let tokens = self.tokens_per_rank(model, request)?;
        // L: every self-attention (SD3.5's dual-attention blocks have two).
        let (b, h, d, l) =
            (request.batch, model.num_heads, model.head_dim, model.attention_calls());
        let n_w = tokens[w];
        let t_g: usize =
            self.mesh.group(self.world.rank(), &[Axis::Ulysses]).iter().map(|&r| tokens[r]).sum();
        let mut e = ExpectedComm::none(format!(
            "{}: L·[3·B·H·n·d·(u−1)/u + B·(H/u)·d·(T_g − n)] all-to-all + ring L·2·B·(H/u)·d·Σ T_j \
             + L_text·B·(H/u)·T·d·(u−1) text all-gather + output gather; L={l} B={b} H={h} d={d} \
             n={n_w} T_g={t_g} u={u} R={rd} L_text={} T={}",
            self.name,
            model.text_out_layers(),
            request.text_tokens
        ));
        if u > 1 {
            let there = 3 * b * h * n_w * d * (u - 1) / u;
            let back = b * (h / u) * d * (t_g - n_w);
            e.add(OpKind::AllToAll, (l * (there + back)) as u64);
            // MMDiT: the text tokens' output of this rank's heads, to the group's others.
            let text = model.text_out_layers() * b * (h / u) * request.text_tokens * d * (u - 1);
            e.add(OpKind::AllGather, text as u64);
        }
        if rd > 1 {
            // Tokens of each ring member's Ulysses group, in ring order.
            let ring = self.mesh.group(self.world.rank(), &[Axis::Ring]);
            let ring_tokens: Vec<usize> = ring
                .iter()
                .map(|&member| {
                    let group = self.mesh.group(member, &[Axis::Ulysses]);
                    group.iter().map(|&m| tokens[m]).sum()
                })
                .collect();
            let per_layer = RingAttention::<B>::sent_per_layer(
                &ring_tokens,
                self.ring.comm().rank(),
                b * (h / u) * d,
            );
            e.add(OpKind::Send, per_layer * l as u64);
        }
        let parts = row_partition(self.name, model, request.grid, self.world.size())?;
        e.add(
            OpKind::AllGather,
            output_gather_elements(model, request.grid, b, &parts[w], self.world.size()),
        );
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_flex::Flex;
    use parallel_core::{LaunchOptions, LocalComm, OptionValue, launch};

    #[test]
    fn usp_degrees_come_from_either_option() {
        for (opts, want) in [
            (vec![("ulysses_degree", 2)], (2, 2)),
            (vec![("ring_degree", 4)], (1, 4)),
            (vec![("ulysses_degree", 4), ("ring_degree", 1)], (4, 1)),
        ] {
            let results = launch(4, &LaunchOptions::<Flex>::default(), |comm| {
                let mut o = StrategyOptions::new(USP_NAME);
                for (k, v) in &opts {
                    o.set(*k, OptionValue::Int(*v));
                }
                let s = Usp::from_config(comm, &UspConfig::from_options(&o)?)?;
                Ok((s.ulysses_degree(), s.ring_degree()))
            });
            for r in results {
                assert_eq!(r.unwrap(), want);
            }
        }
    }

    #[test]
    fn usp_rejects_degrees_that_do_not_fit_the_world() {
        let comm = LocalComm::<Flex>::create(4, &LaunchOptions::default()).swap_remove(0);
        let o = StrategyOptions::new(USP_NAME).with("ulysses_degree", OptionValue::Int(3));
        let e = Usp::from_config(comm.clone(), &UspConfig::from_options(&o).unwrap())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("ulysses_degree") && e.contains("does not divide the world size 4"),
            "{e}"
        );
        let e = Usp::from_config(comm, &UspConfig::default()).err().unwrap().to_string();
        assert!(e.contains("give ulysses_degree and/or ring_degree"), "{e}");
    }
}

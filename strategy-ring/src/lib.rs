//! # strategy-ring: Ring sequence parallelism
//!
//! ## Algorithm
//! The image tokens are split by latent (token) rows over the `N` ranks of the ring: rank `r`
//! holds a contiguous band of `n_r` tokens (balanced, longer bands first; uneven splits are
//! fine). Every layer runs on the local tokens only, except self-attention, where each
//! rank needs the keys and values of every token. There the K/V blocks travel around the
//! ring: at round `i` a rank attends its queries to the block it holds (its own at round 0),
//! while it sends that block to its successor and receives the next one from its
//! predecessor with a paired, tagged `send_recv` (started before the attention and waited
//! after it, so the transfer overlaps the compute). The partial results are merged with
//! their log-sum-exps in float32, which equals attention over all tokens up to rounding.
//! Cross-attention (to text) and the feed-forward are local. After the last layer the
//! bands' outputs are all-gathered along the latent rows, so the noise prediction is
//! complete on every rank and the scheduler steps identically everywhere.
//!
//! ## Constraints
//! At least one token row per rank (`token rows ≥ N`). Any head count.
//!
//! ## Config keys
//! None: `harness run --strategy ring --world-size N`.
//!
//! ## Communication (per denoising step, per rank `r`)
//! With `B` the batch, `h` the heads, `d` the head dim (`hs = h·d`), `L` the layers and
//! `m_j` the tokens of rank `j`: in each layer rank `r` forwards every block but the one it
//! receives last, from rank `r+1`:
//!
//! ```text
//! send = L · 2 · B · hs · Σ_{j ≠ (r+1) mod N} m_j      (≈ 2·(p/N)·hs·(N−1)·L per image)
//! all_gather (output) = B · C_out · (n_r rows · patch) · W · (N − 1)
//! ```
//!
//! The ring kernel [`RingAttention`] is public so that USP (Ulysses × Ring, in
//! `strategy-ulysses`) composes it with the Ulysses all-to-all instead of copying it.
//!
//! ## Using this crate alone, with your own model and loop
//!
//! A model needs only [`Denoiser`]: its forward over a band of latent rows, calling the
//! self-attention seam where tokens meet. Here a one-layer toy model (every latent pixel a
//! token, attention with `q = k = v = x`), a plain Euler-like loop of your own, and the ring
//! on 2 ranks (threads) — which gives the serial model's result:
//!
//! ```
//! use std::ops::Range;
//! use burn::tensor::{Distribution, Tensor};
//! use burn_flex::Flex as B;
//! use parallel_core::{
//!     AttentionSite, Denoiser, DenoiserInput, LaunchOptions, ModelDesc, ModelFamily,
//!     ParallelStrategy, RequestInfo, Result, Seams, Serial, launch,
//! };
//!
//! struct Mixer(ModelDesc);
//!
//! impl Denoiser<B> for Mixer {
//!     fn desc(&self) -> &ModelDesc {
//!         &self.0
//!     }
//!     fn forward_rows(
//!         &self,
//!         input: &DenoiserInput<B>,
//!         rows: Range<usize>,
//!         seams: &mut dyn Seams<B>,
//!     ) -> Result<Tensor<B, 4>> {
//!         let [b, c, h, w] = input.hidden_states.dims();
//!         let band = input.hidden_states.clone().narrow(2, rows.start, rows.len());
//!         // [B, C, r, W] → one head of r·W tokens: [B, 1, r·W, C]
//!         let x = band.reshape([b, c, rows.len() * w]).swap_dims(1, 2).unsqueeze_dim::<4>(1);
//!         let site = AttentionSite {
//!             layer: 0,
//!             tokens: rows.start * w..rows.end * w,
//!             total_tokens: h * w,
//!         };
//!         let y = seams.self_attention(&site, x.clone(), x.clone(), x)?;
//!         Ok(y.squeeze_dim::<3>(1).swap_dims(1, 2).reshape([b, c, rows.len(), w]))
//!     }
//!     fn param_bytes(&self) -> u64 {
//!         0
//!     }
//! }
//!
//! let desc = ModelDesc {
//!     class_name: "Mixer".into(), family: ModelFamily::Dit, num_layers: 1, num_heads: 1,
//!     head_dim: 4, hidden_size: 4, ff_inner: 4, patch_size: 1, in_channels: 4,
//!     out_channels: 4, cross_attention: false, row_granularity: 1, sample_size: 8,
//!     heads_per_level: vec![1], feature_sites: vec![], joint_layers: vec![],
//! };
//! let latents = Tensor::<B, 4>::random([1, 4, 8, 8], Distribution::Normal(0.0, 1.0), &Default::default());
//! let input = |x: &Tensor<B, 4>| DenoiserInput::new(x.clone(), Tensor::zeros([1], &x.device()));
//!
//! // Your loop, serial: x ← x − 0.1 · model(x), three times.
//! let model = Mixer(desc.clone());
//! let mut serial = latents.clone();
//! for _ in 0..3 {
//!     let noise = model.forward_rows(&input(&serial), 0..8, &mut Serial).unwrap();
//!     serial = serial.clone() - noise.mul_scalar(0.1);
//! }
//!
//! // The same loop on 2 ranks with the ring: every rank gets the whole prediction.
//! let finals = launch(2, &LaunchOptions::default(), |comm| {
//!     let model = Mixer(desc.clone());
//!     let mut ring = strategy_ring::Ring::new(comm);
//!     let mut request = RequestInfo::for_forward(&input(&latents));
//!     request.steps = 3;
//!     ring.validate(&desc, &request)?;
//!     ring.begin_request(&desc, &request)?;
//!     let mut x = latents.clone();
//!     for step in 0..3 {
//!         let noise = ring.forward(&model, &input(&x), step)?;
//!         x = x.clone() - noise.mul_scalar(0.1);
//!     }
//!     Ok(x)
//! });
//! for x in finals {
//!     let diff = (x.unwrap() - serial.clone()).abs().max().into_scalar();
//!     assert!(diff < 1e-5, "{diff}");
//! }
//! ```

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use parallel_core::attention::{merge_partial, sdpa_with_lse};
use parallel_core::split::{output_gather_elements, row_partition, row_split_forward};
use parallel_core::{
    AttentionSite, Comm, CurrentRequest, Denoiser, DenoiserInput, ExpectedComm, JointOutput,
    ModelDesc, ModelFamily, NoOptions, OpKind, ParallelStrategy, Reference, Registry, RequestInfo,
    Result, Seams, StepKind, StrategyInfo, StrategyOptions, SuiteCase, Tag, TextQkv,
};

/// The registered name.
pub const NAME: &str = "ring";

/// The ring attention kernel over one ring group.
///
/// Holds the ring communicator and a call counter that tags every message with the
/// forward it belongs to, so a message from another forward is an error, never mixed in.
pub struct RingAttention<B: Backend> {
    ring: Comm<B>,
    forward: u32,
}

impl<B: Backend> RingAttention<B> {
    /// A kernel over the ring group `ring` (rank `j` passes to `j + 1`).
    pub fn new(ring: Comm<B>) -> Self {
        RingAttention { ring, forward: 0 }
    }

    /// The ring group.
    pub fn comm(&self) -> &Comm<B> {
        &self.ring
    }

    /// Starts a new denoiser evaluation (the tag's step).
    pub fn begin_forward(&mut self, forward: u32) {
        self.forward = forward;
    }

    /// Attention of the local queries over the keys and values of every rank of the ring.
    ///
    /// # Shapes
    /// `q`: `[batch, heads, n_r, head_dim]`, `k`, `v`: `[batch, heads, n_r, head_dim]` (the
    /// local block; blocks may differ in length between ranks); output like `q`.
    pub fn attend(
        &mut self,
        layer: usize,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        self.attend_visiting(layer, q, k, v, &mut |_, _| Ok(()))
    }

    /// [`attend`](Self::attend), showing `visit` every K/V block as it is used:
    /// `visit(origin, kv)` with the ring rank the block comes from and `kv` its keys and
    /// values stacked, `[2, batch, heads, n_origin, head_dim]` — every rank's block once,
    /// this rank's own first. PipeFusion × Ring keeps the parts of other ranks' blocks its
    /// stale K/V buffer needs this way, with no transfer of its own.
    pub fn attend_visiting(
        &mut self,
        layer: usize,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        visit: &mut dyn FnMut(usize, &Tensor<B, 5>) -> Result<()>,
    ) -> Result<Tensor<B, 4>> {
        self.ring(layer, q, k, v, None, visit)
    }

    /// Joint attention of an MMDiT block over the ring: the local image queries and (when
    /// given) every text query attend to every rank's image K/V as they travel round the
    /// ring, and to the text K/V — which every rank holds — once, merged in after the ring
    /// with its log-sum-exp. Only image K/V travel, so the traffic is
    /// [`attend`](Self::attend)'s; every rank computes the whole text output (its queries
    /// are replicated, so are its results).
    ///
    /// # Shapes
    /// As [`attend`](Self::attend) for the image tokens; `text` as
    /// [`TextQkv`](parallel_core::TextQkv); output: image tokens' and text tokens' outputs.
    pub fn attend_joint(
        &mut self,
        layer: usize,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        text: TextQkv<B>,
    ) -> Result<JointOutput<B>> {
        self.attend_joint_visiting(layer, q, k, v, text, &mut |_, _| Ok(()))
    }

    /// [`attend_joint`](Self::attend_joint), showing `visit` every image K/V block as
    /// [`attend_visiting`](Self::attend_visiting) does (PipeFusion × Ring on an MMDiT).
    pub fn attend_joint_visiting(
        &mut self,
        layer: usize,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        text: TextQkv<B>,
        visit: &mut dyn FnMut(usize, &Tensor<B, 5>) -> Result<()>,
    ) -> Result<JointOutput<B>> {
        let n = q.dims()[2];
        let TextQkv { q: tq, k: tk, v: tv } = text;
        let t = tq.as_ref().map(|t| t.dims()[2]);
        let queries = match tq {
            Some(tq) => Tensor::cat(vec![q, tq], 2),
            None => q,
        };
        let out = self.ring(layer, queries, k, v, Some((tk, tv)), visit)?;
        Ok(match t {
            Some(t) => (out.clone().narrow(2, 0, n), Some(out.narrow(2, n, t))),
            None => (out, None),
        })
    }

    /// The ring loop: `q` over every rank's `(k, v)` block, then over `extra` (local keys
    /// and values no other rank sees) when given.
    fn ring(
        &mut self,
        layer: usize,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        extra: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
        visit: &mut dyn FnMut(usize, &Tensor<B, 5>) -> Result<()>,
    ) -> Result<Tensor<B, 4>> {
        let n = self.ring.size();
        let r = self.ring.rank();
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let tag = |origin: usize| {
            Tag::new("ring_kv").step(self.forward).layer(layer as u32).patch(origin as u32)
        };
        // K and V arrive as head views of the projections (`[B, n, H, d]` memory): copied run
        // by run, then stacked block-wise (stacking the views had Flex copy them element by
        // element).
        let mut kv: Tensor<B, 5> =
            Tensor::stack(vec![kernels::contiguous(k), kernels::contiguous(v)], 0);
        let mut acc: Option<(Tensor<B, 4>, Tensor<B, 4>)> = None;
        for round in 0..n {
            let origin = (r + n - round) % n;
            // Start the transfer of the block we hold before computing with it.
            let incoming = if round + 1 < n {
                // One group (NCCL's send/recv pair): neither half can block the other.
                Some(self.ring.send_recv_async::<5>(
                    kv.clone(),
                    next,
                    tag(origin),
                    prev,
                    tag((origin + n - 1) % n),
                )?)
            } else {
                None
            };
            visit(origin, &kv)?;
            let k_blk = kv.clone().narrow(0, 0, 1).squeeze_dim::<4>(0);
            let v_blk = kv.narrow(0, 1, 1).squeeze_dim::<4>(0);
            let (out, lse) = sdpa_with_lse(q.clone(), k_blk, v_blk);
            acc = Some(match acc {
                None => (out, lse),
                Some((o, l)) => merge_partial(o, l, out, lse),
            });
            match incoming {
                Some((send, recv)) => {
                    send.wait()?;
                    kv = recv.wait()?;
                }
                None => break,
            }
        }
        let (out, lse) = acc.expect("a ring has at least one rank");
        Ok(match extra {
            Some((ek, ev)) => {
                let (o, l) = sdpa_with_lse(q, ek, ev);
                merge_partial(out, lse, o, l).0
            }
            None => out,
        })
    }

    /// Elements rank `r` sends per layer, for block lengths `tokens` (in ring order) and
    /// `batch · heads · head_dim` elements per token.
    pub fn sent_per_layer(tokens: &[usize], rank: usize, elems_per_token: usize) -> u64 {
        let n = tokens.len();
        if n <= 1 {
            return 0;
        }
        let skip = (rank + 1) % n;
        let sum: usize =
            tokens.iter().enumerate().filter(|&(j, _)| j != skip).map(|(_, m)| m).sum();
        (2 * sum * elems_per_token) as u64
    }
}

struct RingSeams<'a, B: Backend> {
    kernel: &'a mut RingAttention<B>,
}

impl<B: Backend> Seams<B> for RingSeams<'_, B> {
    fn self_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>> {
        self.kernel.attend(site.layer, q, k, v)
    }

    fn joint_attention(
        &mut self,
        site: &AttentionSite,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        text: TextQkv<B>,
    ) -> Result<JointOutput<B>> {
        self.kernel.attend_joint(site.layer, q, k, v, text)
    }
}

/// The strategy's config for library users (it takes no options).
pub const CONFIG: NoOptions = NoOptions(NAME);

/// Ring sequence parallelism over the whole world.
pub struct Ring<B: Backend> {
    world: Comm<B>,
    kernel: RingAttention<B>,
    forwards: u32,
    request: CurrentRequest,
}

impl<B: Backend> Ring<B> {
    /// A ring over every rank of `world`.
    pub fn new(world: Comm<B>) -> Self {
        Ring {
            kernel: RingAttention::new(world.clone()),
            world,
            forwards: 0,
            request: CurrentRequest::default(),
        }
    }
}

/// The strategy's description for the registry.
pub fn info() -> StrategyInfo {
    StrategyInfo {
        name: NAME,
        summary: "tokens split by rows; K/V blocks travel round the ring (fresh K/V, log-sum-exp merge)",
        options: vec![],
        suite: vec![SuiteCase::new(&[1, 2, 4], Reference::Serial)],
    }
}

/// Registers the ring strategy.
pub fn register<B: Backend>(registry: &mut Registry<B>) {
    registry.register(info(), |comm, _opts: &StrategyOptions| Ok(Box::new(Ring::new(comm))));
}

impl<B: Backend> ParallelStrategy<B> for Ring<B> {
    fn name(&self) -> &str {
        NAME
    }

    fn comm(&self) -> &Comm<B> {
        &self.world
    }

    fn validate(&self, model: &ModelDesc, request: &RequestInfo) -> Result<()> {
        model.require_one_of(
            NAME,
            &[ModelFamily::Dit, ModelFamily::MmDit],
            "it passes K/V blocks of a stack of transformer blocks round a ring",
        )?;
        row_partition(NAME, model, request.grid, self.world.size()).map(|_| ())
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
        self.request.check_input(NAME, input)?;
        self.kernel.begin_forward(self.forwards);
        self.forwards += 1;
        let mut seams = RingSeams { kernel: &mut self.kernel };
        row_split_forward(NAME, model, input, &self.world, &mut seams)
    }

    fn expected_comm(
        &self,
        model: &ModelDesc,
        request: &RequestInfo,
        _step: StepKind,
    ) -> Result<ExpectedComm> {
        // Every evaluation moves the same K/V round the ring and gathers the same output.
        let n = self.world.size();
        let r = self.world.rank();
        let parts = row_partition(NAME, model, request.grid, n)?;
        let cols = request.grid.width / model.patch_size;
        let tokens: Vec<usize> = parts.iter().map(|p| p.len() * cols).collect();
        let per_token = request.batch * model.num_heads * model.head_dim;
        let layer = RingAttention::<B>::sent_per_layer(&tokens, r, per_token);
        let mut e = ExpectedComm::none(format!(
            "ring: L·2·B·hs·Σ_(j≠r+1) m_j = {}·2·{}·{}·{} + output gather (L: attentions)",
            model.attention_calls(),
            request.batch,
            model.hidden_size,
            tokens
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != (r + 1) % n)
                .map(|(_, m)| m)
                .sum::<usize>()
        ));
        e.add(OpKind::Send, layer * model.attention_calls() as u64);
        e.add(
            OpKind::AllGather,
            output_gather_elements(model, request.grid, request.batch, &parts[r], n),
        );
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_flex::Flex;

    #[test]
    fn a_rank_forwards_every_block_but_the_one_it_receives_last() {
        // Blocks of 3, 3, 2, 2 tokens: rank 1 never forwards rank 2's block.
        let tokens = [3, 3, 2, 2];
        assert_eq!(RingAttention::<Flex>::sent_per_layer(&tokens, 1, 10), 2 * (3 + 3 + 2) * 10);
        assert_eq!(RingAttention::<Flex>::sent_per_layer(&tokens, 3, 10), 2 * (3 + 2 + 2) * 10);
        assert_eq!(RingAttention::<Flex>::sent_per_layer(&[5], 0, 10), 0);
    }
}

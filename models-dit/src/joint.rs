//! What SD3 and FLUX share around their own embedding, blocks and final layer: the
//! `[text; image tokens]` stream of the staged interface, its checks, and the whole forward
//! of a band. Each model implements [`JointStages`] (its three steps and its conditioning);
//! [`joint_denoiser!`] writes the `Denoiser` and `StagedDenoiser` impls over it once.

use std::ops::Range;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use parallel_core::{
    AttentionSite, Conditioning, DenoiserInput, ModelDesc, Result, Seams, TokenGrid,
};

use crate::stages::{check_rows, input_error};

/// The per-model steps of an MMDiT between which the staged interface and the whole band
/// forward are the same for SD3 and FLUX.
pub(crate) trait JointStages<B: Backend> {
    /// The model's description.
    fn joint_desc(&self) -> &ModelDesc;
    /// The blocks this instance holds (all of them outside a pipeline stage).
    fn joint_held(&self) -> &Range<usize>;
    /// The inputs checked, and what every block reads computed once (a [`JointCond`]).
    fn compute_condition(&self, input: &DenoiserInput<B>) -> Result<Conditioning>;
    /// The embedded image tokens of token rows `rows`.
    fn embed_image(
        &self,
        input: &DenoiserInput<B>,
        rows: Range<usize>,
        grid: TokenGrid,
    ) -> Result<Tensor<B, 3>>;
    /// Block `index` (held) on a band's image tokens and the text stream; returns
    /// `(image, text)`.
    fn run_block(
        &self,
        index: usize,
        image: Tensor<B, 3>,
        context: Tensor<B, 3>,
        site: &AttentionSite,
        c: &JointCond<B>,
        seams: &mut dyn Seams<B>,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 3>)>;
    /// The final layer and unpatchify of a band's image tokens.
    fn head_image(
        &self,
        image: Tensor<B, 3>,
        rows: Range<usize>,
        grid: TokenGrid,
        c: &JointCond<B>,
    ) -> Result<Tensor<B, 4>>;
}

/// Refuses a whole forward on an instance holding only some blocks (a pipeline stage).
pub(crate) fn whole_model(desc: &ModelDesc, held: &Range<usize>) -> Result<()> {
    if *held != (0..desc.num_layers) {
        return Err(input_error(
            desc,
            format!(
                "a whole forward needs all {} blocks; this instance holds {held:?}",
                desc.num_layers
            ),
        )
        .into());
    }
    Ok(())
}

/// `Denoiser::forward_rows`: the band's image tokens and the text stream through every
/// block, without the staged stream's join and split copies.
pub(crate) fn forward_band<B: Backend, M: JointStages<B>>(
    model: &M,
    input: &DenoiserInput<B>,
    rows: Range<usize>,
    seams: &mut dyn Seams<B>,
) -> Result<Tensor<B, 4>> {
    let (desc, held) = (model.joint_desc(), model.joint_held());
    let grid = crate::stages::check_band(desc, input, &rows)?;
    whole_model(desc, held)?;
    let cond = model.compute_condition(input)?;
    let c = joint_cond::<B>(desc, held, &cond)?;
    let p = desc.patch_size;
    let token_rows = rows.start / p..rows.end / p;
    let mut image = model.embed_image(input, token_rows.clone(), grid)?;
    let mut context = joint_context(desc, c)?;
    let tokens = grid.token_range(&token_rows);
    for i in held.clone() {
        let site = AttentionSite { layer: i, tokens: tokens.clone(), total_tokens: grid.len() };
        (image, context) = model.run_block(i, image, context, &site, c, seams)?;
    }
    model.head_image(image, token_rows, grid, c)
}

/// `StagedDenoiser::embed`: the embedded text stream, then the band's image tokens.
pub(crate) fn embed<B: Backend, M: JointStages<B>>(
    model: &M,
    input: &DenoiserInput<B>,
    rows: Range<usize>,
    cond: &Conditioning,
) -> Result<Tensor<B, 3>> {
    let c = joint_cond::<B>(model.joint_desc(), model.joint_held(), cond)?;
    let image = model.embed_image(input, rows, cond.grid)?;
    Ok(join_stream(joint_context(model.joint_desc(), c)?, image))
}

/// `StagedDenoiser::block`: the stream split, block `index` run, the stream joined again.
pub(crate) fn block<B: Backend, M: JointStages<B>>(
    model: &M,
    index: usize,
    hidden: Tensor<B, 3>,
    rows: Range<usize>,
    cond: &Conditioning,
    seams: &mut dyn Seams<B>,
) -> Result<Tensor<B, 3>> {
    let desc = model.joint_desc();
    let c = joint_cond::<B>(desc, model.joint_held(), cond)?;
    let (site, text, image) = split_joint_stream(desc, c, index, hidden, &rows, cond.grid)?;
    let (image, text) = model.run_block(index, image, text, &site, c, seams)?;
    Ok(join_stream(text, image))
}

/// `StagedDenoiser::head`: the text dropped, the final layer on the image tokens.
pub(crate) fn head<B: Backend, M: JointStages<B>>(
    model: &M,
    hidden: Tensor<B, 3>,
    rows: Range<usize>,
    cond: &Conditioning,
) -> Result<Tensor<B, 4>> {
    let desc = model.joint_desc();
    let c = joint_cond::<B>(desc, model.joint_held(), cond)?;
    let (_, image) = split_stream(desc, c, hidden, &rows, cond.grid)?;
    model.head_image(image, rows, cond.grid, c)
}

/// The `Denoiser` and `StagedDenoiser` impls of an MMDiT type over its [`JointStages`]
/// (the type has inherent `num_params` and `dtype`).
macro_rules! joint_denoiser {
    ($ty:ident) => {
        impl<B: Backend> parallel_core::Denoiser<B> for $ty<B> {
            fn desc(&self) -> &ModelDesc {
                &self.desc
            }

            fn forward_rows(
                &self,
                input: &DenoiserInput<B>,
                rows: Range<usize>,
                seams: &mut dyn Seams<B>,
            ) -> parallel_core::Result<Tensor<B, 4>> {
                crate::joint::forward_band(self, input, rows, seams)
            }

            fn staged(&self) -> Option<&dyn parallel_core::StagedDenoiser<B>> {
                Some(self)
            }

            fn param_bytes(&self) -> u64 {
                (self.num_params() * self.dtype().size()) as u64
            }
        }

        /// The staged stream is `[text; image tokens]` (see `JointCond`), the layout of
        /// FLUX's single-stream blocks: every pass of a pipeline stage carries the whole
        /// text stream beside its band's image tokens.
        impl<B: Backend> parallel_core::StagedDenoiser<B> for $ty<B> {
            fn condition(&self, input: &DenoiserInput<B>) -> parallel_core::Result<Conditioning> {
                crate::joint::JointStages::compute_condition(self, input)
            }

            fn embed(
                &self,
                input: &DenoiserInput<B>,
                rows: Range<usize>,
                cond: &Conditioning,
            ) -> parallel_core::Result<Tensor<B, 3>> {
                crate::joint::embed(self, input, rows, cond)
            }

            fn block(
                &self,
                index: usize,
                hidden: Tensor<B, 3>,
                rows: Range<usize>,
                cond: &Conditioning,
                seams: &mut dyn Seams<B>,
            ) -> parallel_core::Result<Tensor<B, 3>> {
                crate::joint::block(self, index, hidden, rows, cond, seams)
            }

            fn head(
                &self,
                hidden: Tensor<B, 3>,
                rows: Range<usize>,
                cond: &Conditioning,
            ) -> parallel_core::Result<Tensor<B, 4>> {
                crate::joint::head(self, hidden, rows, cond)
            }

            fn held_blocks(&self) -> Range<usize> {
                self.held.clone()
            }
        }
    };
}
pub(crate) use joint_denoiser;

/// What an MMDiT's `condition` computes once per forward and every stage reads (SD3, FLUX):
/// the payload of their [`Conditioning`].
///
/// Through the staged interface an MMDiT's hidden stream is the text tokens followed by the
/// band's image tokens, `[batch, text_tokens + rows · cols, hidden]` (the layout FLUX's
/// single-stream blocks use), so a pipeline stage passes both streams on as one tensor.
pub(crate) struct JointCond<B: Backend> {
    /// The blocks this instance holds.
    pub held: Range<usize>,
    /// `silu(timestep embedding + pooled text projection)`: what every adaLN reads.
    pub temb_silu: Tensor<B, 2>,
    /// Text tokens leading every staged hidden stream.
    pub text_tokens: usize,
    /// The embedded text stream (where `context_embedder` is held: the first stage).
    pub context: Option<Tensor<B, 3>>,
    /// FLUX: the rotations of every image token of the grid, and of the text tokens.
    pub rope: Option<crate::rope::JointRope<B>>,
}

/// The [`JointCond`] of a conditioning, checked against the blocks an instance holds.
pub(crate) fn joint_cond<'a, B: Backend>(
    desc: &ModelDesc,
    held: &Range<usize>,
    cond: &'a Conditioning,
) -> Result<&'a JointCond<B>> {
    let c = cond
        .get::<JointCond<B>>()
        .map_err(|_| input_error(desc, "the conditioning was computed by another model"))?;
    if c.held != *held {
        return Err(input_error(
            desc,
            format!("the conditioning was computed for blocks {:?}, not {held:?}", c.held),
        )
        .into());
    }
    Ok(c)
}

/// A staged MMDiT block's inputs, checked: the block is held, `rows` is a band of the grid
/// and `hidden` is its text and image tokens. Returns the attention site and the two streams
/// `(text, image)`.
pub(crate) fn split_joint_stream<B: Backend>(
    desc: &ModelDesc,
    c: &JointCond<B>,
    index: usize,
    hidden: Tensor<B, 3>,
    rows: &Range<usize>,
    grid: TokenGrid,
) -> Result<(AttentionSite, Tensor<B, 3>, Tensor<B, 3>)> {
    if !c.held.contains(&index) {
        return Err(input_error(
            desc,
            format!("block {index} is not held (this instance holds {:?})", c.held),
        )
        .into());
    }
    let (text, image) = split_stream(desc, c, hidden, rows, grid)?;
    let site =
        AttentionSite { layer: index, tokens: grid.token_range(rows), total_tokens: grid.len() };
    Ok((site, text, image))
}

/// `hidden` = `[text; image tokens of rows]` cut into its two streams, its size checked.
pub(crate) fn split_stream<B: Backend>(
    desc: &ModelDesc,
    c: &JointCond<B>,
    hidden: Tensor<B, 3>,
    rows: &Range<usize>,
    grid: TokenGrid,
) -> Result<(Tensor<B, 3>, Tensor<B, 3>)> {
    check_rows(desc, rows, grid)?;
    let t = c.text_tokens;
    let n = grid.token_range(rows).len();
    let tokens = hidden.dims()[1];
    if tokens != t + n {
        return Err(input_error(
            desc,
            format!(
                "hidden has {tokens} tokens but the {t} text tokens and rows {rows:?} hold {}",
                t + n
            ),
        )
        .into());
    }
    Ok((hidden.clone().narrow(1, 0, t), hidden.narrow(1, t, n)))
}

/// The staged stream of an MMDiT: text tokens, then image tokens.
pub(crate) fn join_stream<B: Backend>(text: Tensor<B, 3>, image: Tensor<B, 3>) -> Tensor<B, 3> {
    Tensor::cat(vec![text, image], 1)
}

/// The embedded text stream of a conditioning, which only the first stage computes.
pub(crate) fn joint_context<B: Backend>(
    desc: &ModelDesc,
    c: &JointCond<B>,
) -> Result<Tensor<B, 3>> {
    c.context.clone().ok_or_else(|| {
        input_error(desc, "this instance was loaded without the patch and text embeddings").into()
    })
}

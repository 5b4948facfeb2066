//! The stage logic both models share: input checks, patch-embedding a band of rows, running
//! block `i` on a band, the final layer and unpatchify of a band, and the whole forward of a
//! band as embed → held blocks → head.

use std::ops::Range;

use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use parallel_core::{
    AttentionSite, Conditioning, DenoiserInput, ModelDesc, Result, Seams, StagedDenoiser, TokenGrid,
};

use crate::block::{BasicTransformerBlock, Context};
use crate::embeddings::PatchEmbed;
use crate::error::DitError;

/// Eps of the final LayerNorm (`norm_out`) in both models.
const NORM_OUT_EPS: f64 = 1e-6;

/// What `condition` computes once per forward and every stage reads (the payload of
/// [`Conditioning`]).
pub(crate) struct StageCond<B: Backend> {
    /// The blocks the modulation covers (the instance's held blocks).
    pub held: Range<usize>,
    /// Per held block, its six modulation vectors `[batch, 6, hidden]`.
    pub modulation: Vec<Tensor<B, 3>>,
    /// Final layer `(shift, scale)`, each `[batch, 1, hidden]`, when the head is held.
    pub head: Option<(Tensor<B, 3>, Tensor<B, 3>)>,
    /// PixArt: projected caption and mask bias.
    pub context: Option<Context<B>>,
}

pub(crate) fn input_error(desc: &ModelDesc, reason: impl Into<String>) -> DitError {
    DitError::Input { class: desc.class_name.clone(), reason: reason.into() }
}

/// Checks the latent and timestep shapes; returns the token grid.
pub(crate) fn check_input<B: Backend>(
    desc: &ModelDesc,
    input: &DenoiserInput<B>,
) -> Result<TokenGrid, DitError> {
    let [batch, channels, _, _] = input.hidden_states.dims();
    if channels != desc.in_channels {
        return Err(input_error(
            desc,
            format!(
                "`hidden_states` has {channels} channels, the model takes {}",
                desc.in_channels
            ),
        ));
    }
    let grid = input.grid();
    desc.check_grid(grid).map_err(|e| input_error(desc, e.to_string()))?;
    let [t] = input.timestep.dims();
    if t != batch {
        return Err(input_error(
            desc,
            format!("`timestep` has {t} entries for a batch of {batch}"),
        ));
    }
    Ok(desc.tokens(grid))
}

fn cond<'a, B: Backend>(desc: &ModelDesc, cond: &'a Conditioning) -> Result<&'a StageCond<B>> {
    cond.get::<StageCond<B>>()
        .map_err(|_| input_error(desc, "the conditioning was computed by another model").into())
}

pub(crate) fn check_rows(
    desc: &ModelDesc,
    rows: &Range<usize>,
    grid: TokenGrid,
) -> Result<(), DitError> {
    if rows.start >= rows.end || rows.end > grid.rows {
        return Err(input_error(
            desc,
            format!("token rows {rows:?} are not a non-empty band of the {} token rows", grid.rows),
        ));
    }
    Ok(())
}

/// Patch embedding of token rows `rows` (position embedding of the full grid, sliced).
pub(crate) fn embed<B: Backend>(
    desc: &ModelDesc,
    pos_embed: Option<&PatchEmbed<B>>,
    input: &DenoiserInput<B>,
    rows: Range<usize>,
    cond: &Conditioning,
) -> Result<Tensor<B, 3>> {
    let pos_embed = pos_embed
        .ok_or_else(|| input_error(desc, "this instance was loaded without the patch embedding"))?;
    let grid = cond.grid;
    check_rows(desc, &rows, grid)?;
    let p = desc.patch_size;
    // Inputs come in any float dtype; compute in the weights' dtype.
    let dtype = pos_embed.proj.weight.val().dtype();
    let latent = input.hidden_states.clone().narrow(2, rows.start * p, rows.len() * p).cast(dtype);
    Ok(pos_embed.forward(latent, grid, rows))
}

/// The blocks an instance holds.
pub(crate) struct Stack<'a, B: Backend> {
    pub desc: &'a ModelDesc,
    pub blocks: &'a [BasicTransformerBlock<B>],
    pub held: &'a Range<usize>,
}

/// Transformer block `index` on the tokens of token rows `rows`.
pub(crate) fn block<B: Backend>(
    stack: Stack<'_, B>,
    index: usize,
    hidden: Tensor<B, 3>,
    rows: Range<usize>,
    conditioning: &Conditioning,
    seams: &mut dyn Seams<B>,
) -> Result<Tensor<B, 3>> {
    let Stack { desc, blocks, held } = stack;
    if !held.contains(&index) {
        return Err(input_error(
            desc,
            format!("block {index} is not held (this instance holds {held:?})"),
        )
        .into());
    }
    let c = cond::<B>(desc, conditioning)?;
    if c.held != *held {
        return Err(input_error(
            desc,
            format!("the conditioning was computed for blocks {:?}, not {held:?}", c.held),
        )
        .into());
    }
    let grid = conditioning.grid;
    check_rows(desc, &rows, grid)?;
    let local = index - held.start;
    let [_, tokens, _] = hidden.dims();
    let site =
        AttentionSite { layer: index, tokens: grid.token_range(&rows), total_tokens: grid.len() };
    if tokens != site.tokens.len() {
        return Err(input_error(
            desc,
            format!("hidden has {tokens} tokens but rows {rows:?} hold {}", site.tokens.len()),
        )
        .into());
    }
    blocks[local].forward(hidden, &c.modulation[local], c.context.as_ref(), &site, seams)
}

/// Final layer (`norm_out`, modulation, projection) and unpatchify of token rows `rows`.
pub(crate) fn head<B: Backend>(
    desc: &ModelDesc,
    proj: Option<&Linear<B>>,
    hidden: Tensor<B, 3>,
    rows: Range<usize>,
    conditioning: &Conditioning,
) -> Result<Tensor<B, 4>> {
    let c = cond::<B>(desc, conditioning)?;
    let (Some(proj), Some((shift, scale))) = (proj, c.head.as_ref()) else {
        return Err(input_error(desc, "this instance was loaded without the final layer").into());
    };
    let grid = conditioning.grid;
    check_rows(desc, &rows, grid)?;
    let x = kernels::layer_norm_modulate(
        hidden,
        NORM_OUT_EPS,
        Some(scale.clone()),
        Some(shift.clone()),
    );
    let x = crate::attention::linear(proj, x);
    let [batch, _, _] = x.dims();
    let (p, c_out, n_rows, cols) = (desc.patch_size, desc.out_channels, rows.len(), grid.cols);
    // nhwpqc -> nchpwq
    Ok(x.reshape([batch, n_rows, cols, p, p, c_out]).permute([0, 5, 1, 3, 2, 4]).reshape([
        batch,
        c_out,
        n_rows * p,
        cols * p,
    ]))
}

/// Checks the latent and timestep shapes and that `rows` is a non-empty band of whole patches
/// of the latent; returns the token grid (every model's `forward_rows` starts here).
pub(crate) fn check_band<B: Backend>(
    desc: &ModelDesc,
    input: &DenoiserInput<B>,
    rows: &Range<usize>,
) -> Result<TokenGrid, DitError> {
    let grid = check_input(desc, input)?;
    let p = desc.patch_size;
    let height = input.grid().height;
    if !rows.start.is_multiple_of(p)
        || !rows.end.is_multiple_of(p)
        || rows.start >= rows.end
        || rows.end > height
    {
        return Err(input_error(
            desc,
            format!(
                "latent rows {rows:?} must be a non-empty band of whole patches (multiples of \
                 {p}) within the height {height}"
            ),
        ));
    }
    Ok(grid)
}

/// The text embeddings of an MMDiT input, `[batch, tokens, width]`, checked (`what` says
/// which embeddings the model takes).
pub(crate) fn text_context<B: Backend>(
    desc: &ModelDesc,
    input: &DenoiserInput<B>,
    width: usize,
    what: &str,
) -> Result<Tensor<B, 3>, DitError> {
    let batch = input.batch();
    let context = input.encoder_hidden_states.clone().ok_or_else(|| {
        input_error(desc, format!("`encoder_hidden_states` ({what}) are required"))
    })?;
    let [cb, _, cc] = context.dims();
    if cb != batch || cc != width {
        return Err(input_error(
            desc,
            format!(
                "`encoder_hidden_states` has shape {:?}, expected [{batch}, tokens, {width}]",
                context.dims()
            ),
        ));
    }
    Ok(context)
}

/// The added condition `name` of an input, `[batch, k]`, checked.
pub(crate) fn added_cond<B: Backend>(
    desc: &ModelDesc,
    input: &DenoiserInput<B>,
    name: &str,
    k: usize,
) -> Result<Tensor<B, 2>, DitError> {
    let batch = input.batch();
    let t = input
        .added_cond
        .get(name)
        .ok_or_else(|| input_error(desc, format!("`{name}` [{batch}, {k}] is required")))?;
    if t.dims() != [batch, k] {
        return Err(input_error(
            desc,
            format!("`{name}` has shape {:?}, expected [{batch}, {k}]", t.dims()),
        ));
    }
    Ok(t.clone())
}

/// embed → held blocks → head for latent rows `rows`.
pub(crate) fn forward_rows<B: Backend, M: StagedDenoiser<B> + ?Sized>(
    model: &M,
    input: &DenoiserInput<B>,
    rows: Range<usize>,
    seams: &mut dyn Seams<B>,
) -> Result<Tensor<B, 4>> {
    let desc = model.desc();
    check_band(desc, input, &rows)?;
    let p = desc.patch_size;
    let held = model.held_blocks();
    if held != (0..desc.num_layers) {
        return Err(input_error(
            desc,
            format!(
                "a whole forward needs all {} blocks; this instance holds {held:?}",
                desc.num_layers
            ),
        )
        .into());
    }
    let cond = model.condition(input)?;
    let token_rows = rows.start / p..rows.end / p;
    let mut hidden = model.embed(input, token_rows.clone(), &cond)?;
    for i in held {
        hidden = model.block(i, hidden, token_rows.clone(), &cond, seams)?;
    }
    model.head(hidden, token_rows, &cond)
}

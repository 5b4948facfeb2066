//! The text-encoding step of the PixArt pipelines: prompts in, embeddings and mask out.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::encoder::T5EncoderModel;
use crate::error::{Result, TextError};
use crate::tokenizer::PromptTokenizer;

/// `PixArtAlphaPipeline.encode_prompt` for one side of guidance (call it again with the
/// negative prompts): preprocess (`lower().strip()`), tokenize padded and cut to `max_len`,
/// and run the encoder with the attention mask.
///
/// Returns `(prompt_embeds, prompt_attention_mask)`; the mask is `true` on real tokens. The
/// embeddings of padded positions are real encoder outputs, as in diffusers (the transformer's
/// cross-attention masks them).
///
/// A prompt longer than `max_len` is cut and reported with `log::warn!` (target
/// `models_text::encode`), diffusers' message and the prompt's index; use
/// [`PromptTokenizer::tokenize`] directly to get the cut-off text as a value.
///
/// # Shapes
/// - output: `([batch, max_len, d_model], [batch, max_len])`
///
/// # Errors
/// Tokenization errors, `max_len` 0, and a token id outside the encoder's vocabulary (the
/// tokenizer and the encoder do not belong together).
pub fn encode_prompts<B: Backend>(
    tokenizer: &PromptTokenizer,
    encoder: &T5EncoderModel<B>,
    prompts: &[String],
    max_len: usize,
) -> Result<(Tensor<B, 3>, Tensor<B, 2, Bool>)> {
    encode_prompts_masked(tokenizer, encoder, prompts, max_len, true)
}

/// [`encode_prompts`], with the attention mask given to the encoder (`masked`, PixArt) or not
/// (Stable Diffusion 3's `_get_t5_prompt_embeds` runs T5 over the padded ids unmasked, so
/// the padding tokens attend and are attended to); the returned mask is the tokenizer's
/// either way.
///
/// # Errors
/// As [`encode_prompts`].
pub fn encode_prompts_masked<B: Backend>(
    tokenizer: &PromptTokenizer,
    encoder: &T5EncoderModel<B>,
    prompts: &[String],
    max_len: usize,
    masked: bool,
) -> Result<(Tensor<B, 3>, Tensor<B, 2, Bool>)> {
    let resized;
    let tokenizer = if tokenizer.max_length() == max_len {
        tokenizer
    } else {
        resized = tokenizer.with_max_length(max_len)?;
        &resized
    };
    let tokens = tokenizer.tokenize(prompts)?;
    for t in &tokens.truncations {
        log::warn!("prompt #{}: {}", t.index, t.message());
    }
    let vocab_size = encoder.vocab_size();
    for (index, row) in tokens.input_ids.iter().enumerate() {
        if let Some(&id) = row.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(TextError::TokenOutOfVocab { index, id, vocab_size });
        }
    }
    let batch = tokens.batch_size();
    let device = encoder.encoder.embed_tokens.weight.device();
    let input_ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(tokens.input_ids_flat(), [batch, max_len]),
        &device,
    );
    let mask = Tensor::<B, 2, Bool>::from_data(
        TensorData::new(tokens.attention_mask_flat(), [batch, max_len]),
        &device,
    );
    let embeds = encoder.forward(input_ids, masked.then(|| mask.clone()));
    Ok((embeds, mask))
}

//! The CLIP text encoders against transformers 5.24 (`fixtures/text/reference/<model>.safetensors`,
//! float32 on the CPU, SDPA attention; `tools/fixtures/clip_models.py`).
//!
//! | fixture | class | what it stands for |
//! |---|---|---|
//! | `clip-sd15` | `CLIPTextModel`, quick_gelu, `eos_token_id` 2, 3 layers, f32, `text_model.*` keys + `position_ids` | SD 1.5's `text_encoder/` |
//! | `clip-sd2` | `CLIPTextModel`, gelu, `eos_token_id` 2, 2 layers, bf16, keys as transformers 5 saves them | SD 2.x's `text_encoder/` |
//! | `clip-sdxl-2` | `CLIPTextModelWithProjection`, gelu, `eos_token_id` 767, 2 layers, f16 | SDXL's `text_encoder_2/` |
//!
//! The f16/bf16 references are computed in float32 from the rounded weights, which is what a
//! loader that upcasts must reproduce.
//!
//! # Tolerances
//!
//! Every float output: **relative L2 ≤ 1e-5** (the project's bar for "equal to float32
//! rounding", docs/ARCHITECTURE.md) and **max|a−b|/max|b| ≤ 1e-4**. The two computations agree
//! in every operation and differ only in summation order (GEMM blocking, the online softmax of
//! the attention kernel, LayerNorm's reductions) and in the exact GELU's erf (the kernel's
//! polynomial is within 1e-6 relative of erf), so a few float32 ulps per element are expected.
//! Measured on the reference machine (AMD EPYC, AVX2), over 23 compared tensors: relative L2
//! at most **3.4e-7** and max-relative at most **4.1e-7** (both SDXL's `prompt_text_embeds`;
//! the embeddings are exact), so the bars leave margins of 29× and 240×. They are loose
//! enough for a backend that sums in another order and still far below every mistake tried
//! (the bars fail them by ≥ 700×): the other activation (gelu for quick_gelu) changes
//! `last_hidden_state` by 7.1e-3 relative L2, dropping the causal mask by 0.57–0.64, the other
//! pooling rule changes `pooler_output` by 1.0–1.4, an untransposed square projection by
//! O(1). The fixture script measures the first three on the transformers side as well.

use crate::common;
use crate::common::{B, Reference, rel_l2, rel_max, text_dir};
use burn::tensor::{Bool, Int, Tensor, TensorData};
use models_text::{
    BaseModelOutputWithPooling, CLIPPooling, CLIPTextModel, CLIPTextModelWithProjection,
    pooled_positions,
};

/// Relative L2 bar: the project's float32 bar; measured worst 3.4e-7 (module docs).
const REL_L2_TOL: f64 = 1e-5;
/// `max|a−b|/max|b|` bar; measured worst 4.1e-7 (module docs).
const REL_MAX_TOL: f64 = 1e-4;

fn text_model(name: &str) -> CLIPTextModel<B> {
    CLIPTextModel::<B>::from_pretrained(text_dir().join(name), &Default::default()).unwrap()
}

fn projection_model(name: &str) -> CLIPTextModelWithProjection<B> {
    CLIPTextModelWithProjection::<B>::from_pretrained(text_dir().join(name), &Default::default())
        .unwrap()
}

fn ids(r: &Reference, key: &str) -> (Tensor<B, 2, Int>, Vec<i64>, [usize; 2]) {
    let (shape, v) = r.i64(key);
    let shape = [shape[0], shape[1]];
    (Tensor::from_data(TensorData::new(v.clone(), shape), &Default::default()), v, shape)
}

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

/// Compares one output with its reference (shape exact, values within the bars).
fn check<const D: usize>(name: &str, got: Tensor<B, D>, r: &Reference, key: &str) {
    let (shape, expected) = r.f32(key);
    assert_eq!(got.dims().to_vec(), shape, "{name}: {key} shape");
    check_values(&format!("{name}: {key}"), &values(got), &expected);
}

fn check_values(label: &str, got: &[f32], expected: &[f32]) {
    let l2 = rel_l2(got, expected);
    let max = rel_max(got, expected);
    println!("{label}: relative L2 {l2:.3e}, max|a-b|/max|b| {max:.3e}");
    assert!(l2 <= REL_L2_TOL, "{label}: relative L2 {l2:.3e} > {REL_L2_TOL:e}");
    assert!(max <= REL_MAX_TOL, "{label}: max-relative {max:.3e} > {REL_MAX_TOL:e}");
}

/// Every hidden state against the stacked `[layers + 1, batch, seq, hidden]` reference.
fn check_hidden_states(name: &str, states: &[Tensor<B, 3>], r: &Reference, key: &str) {
    let (shape, expected) = r.f32(key);
    assert_eq!(states.len(), shape[0], "{name}: number of hidden states");
    let per = expected.len() / shape[0];
    for (i, s) in states.iter().enumerate() {
        assert_eq!(s.dims().to_vec(), shape[1..].to_vec());
        let label = format!("{name}: {key}[{i}]");
        check_values(&label, &values(s.clone()), &expected[i * per..(i + 1) * per]);
    }
}

fn check_base(name: &str, out: &BaseModelOutputWithPooling<B>, r: &Reference) {
    check(name, out.last_hidden_state.clone(), r, "last_hidden_state");
    check(name, out.pooler_output.clone(), r, "pooler_output");
    check_hidden_states(name, &out.hidden_states, r, "hidden_states");
}

#[test]
fn sd15_text_model_equals_transformers() {
    let r = Reference::open_text("clip-sd15.safetensors");
    let (input_ids, _, _) = ids(&r, "input_ids");
    let out = text_model("clip-sd15").forward(input_ids, None).unwrap();
    assert_eq!(out.hidden_states.len(), 4, "embeddings + 3 layers");
    check_base("clip-sd15", &out, &r);
}

#[test]
fn sd15_with_attention_mask_equals_transformers() {
    let r = Reference::open_text("clip-sd15.safetensors");
    let (input_ids, _, shape) = ids(&r, "input_ids");
    let (_, mask) = r.i64("attention_mask");
    let mask: Vec<bool> = mask.iter().map(|&m| m != 0).collect();
    let mask = Tensor::<B, 2, Bool>::from_data(TensorData::new(mask, shape), &Default::default());
    let out = text_model("clip-sd15").forward(input_ids, Some(mask)).unwrap();
    check("clip-sd15 masked", out.last_hidden_state, &r, "last_hidden_state_masked");
    check("clip-sd15 masked", out.pooler_output, &r, "pooler_output_masked");
}

#[test]
fn sd2_text_model_equals_transformers() {
    let r = Reference::open_text("clip-sd2.safetensors");
    let (input_ids, _, _) = ids(&r, "input_ids");
    let out = text_model("clip-sd2").forward(input_ids, None).unwrap();
    check_base("clip-sd2", &out, &r);
}

#[test]
fn sdxl_projection_model_equals_transformers() {
    let r = Reference::open_text("clip-sdxl-2.safetensors");
    let (input_ids, _, _) = ids(&r, "input_ids");
    let out = projection_model("clip-sdxl-2").forward(input_ids, None).unwrap();
    check("clip-sdxl-2", out.text_embeds, &r, "text_embeds");
    check("clip-sdxl-2", out.last_hidden_state, &r, "last_hidden_state");
    check("clip-sdxl-2", out.pooler_output, &r, "pooler_output");
    check_hidden_states("clip-sdxl-2", &out.hidden_states, &r, "hidden_states");
}

#[test]
fn sdxl_prompt_embeds_equal_transformers() {
    // SDXL's encode_prompt on the second encoder: hidden_states[-2] (no final norm) and the
    // projected pooled output, for ["a photo of a cat", ""] as its tokenizer pads them to 77.
    let r = Reference::open_text("clip-sdxl-2.safetensors");
    let (input_ids, _, _) = ids(&r, "prompt_input_ids");
    let out = projection_model("clip-sdxl-2").forward(input_ids, None).unwrap();
    check("clip-sdxl-2", out.hidden_state_from_end(2).unwrap(), &r, "prompt_penultimate");
    check("clip-sdxl-2", out.text_embeds, &r, "prompt_text_embeds");
}

#[test]
fn pooled_positions_follow_transformers_rules() {
    // Legacy (eos_token_id 2): the first maximal id. Row 0 holds the config's eos id 2 at
    // position 3 and pads with the (highest) eos id; row 2 has no eos and a tie of its maximum.
    let r = Reference::open_text("clip-sd15.safetensors");
    let (input_ids, v, [batch, seq]) = ids(&r, "input_ids");
    let got: Vec<i64> = pooled_positions(input_ids, CLIPPooling::ArgmaxInputIds)
        .into_data()
        .convert::<i64>()
        .to_vec()
        .unwrap();
    let expected: Vec<i64> = (0..batch)
        .map(|b| {
            let row = &v[b * seq..(b + 1) * seq];
            let max = row.iter().max().unwrap();
            row.iter().position(|x| x == max).unwrap() as i64
        })
        .collect();
    assert_eq!(got, expected);
    assert_eq!(got[0], 9, "the first eos, not the id 2 at position 3");
    // Non-legacy: the first eos; 0 when there is none. Row 1 holds an id above the eos (a
    // textual-inversion token) before it.
    let r = Reference::open_text("clip-sdxl-2.safetensors");
    let (input_ids, _, _) = ids(&r, "input_ids");
    let got: Vec<i64> = pooled_positions(input_ids, CLIPPooling::FirstEos(767))
        .into_data()
        .convert::<i64>()
        .to_vec()
        .unwrap();
    assert_eq!(got, [9, 6, 0]);
}

#[test]
fn last_hidden_state_is_the_final_norm_of_the_last_hidden_state() {
    // What SD 1.x's clip_skip relies on: final_layer_norm(hidden_states[-1]) is
    // last_hidden_state, bit for bit.
    let r = Reference::open_text("clip-sd15.safetensors");
    let (input_ids, _, _) = ids(&r, "input_ids");
    let model = text_model("clip-sd15");
    let out = model.forward(input_ids, None).unwrap();
    let renormed = model.final_layer_norm.forward(out.hidden_state_from_end(1).unwrap());
    assert_eq!(values(renormed), values(out.last_hidden_state.clone()));
    assert!(out.hidden_state_from_end(0).is_none());
    assert!(out.hidden_state_from_end(5).is_none());
    assert!(out.hidden_state_from_end(4).is_some());
}

#[test]
fn too_long_or_empty_sequences_are_errors() {
    let model = text_model("clip-sd2");
    let device = Default::default();
    let long = Tensor::<B, 2, Int>::zeros([1, 78], &device);
    let e = model.forward(long, None).unwrap_err().to_string();
    assert!(e.contains("78") && e.contains("77") && e.contains("max_position_embeddings"), "{e}");
    let empty = Tensor::<B, 2, Int>::zeros([1, 0], &device);
    assert!(model.forward(empty, None).is_err());
}

#[test]
fn sdxl_tokenizer_and_encoder_end_to_end_equal_transformers() {
    // The SDXL second tokenizer's ids for the reference prompts, then the encoder on them.
    let r = Reference::open_text("clip-sdxl-2.safetensors");
    let tok =
        models_text::PromptTokenizer::clip_from_dir(common::tokenizer_dir("clip-sdxl-2")).unwrap();
    let tokens = tok.tokenize(&["a photo of a cat", ""]).unwrap();
    let (_, expected_ids, _) = ids(&r, "prompt_input_ids");
    assert_eq!(tokens.input_ids_flat(), expected_ids);
    let out = projection_model("clip-sdxl-2").forward_tokens(&tokens, false).unwrap();
    check(
        "clip-sdxl-2 end to end",
        out.hidden_state_from_end(2).unwrap(),
        &r,
        "prompt_penultimate",
    );
    check("clip-sdxl-2 end to end", out.text_embeds, &r, "prompt_text_embeds");
}

#[test]
fn ids_outside_the_vocabulary_are_refused() {
    let tok =
        models_text::PromptTokenizer::clip_from_dir(common::tokenizer_dir("clip-sd15")).unwrap();
    let tokens = tok.tokenize(&["a photo of a cat"]).unwrap();
    // clip-sd2 has 100 token embeddings; the tokenizer's ids go up to 767.
    let err = text_model("clip-sd2").forward_tokens(&tokens, false).unwrap_err();
    assert!(matches!(err, models_text::TextError::TokenOutOfVocab { .. }), "{err:?}");
}

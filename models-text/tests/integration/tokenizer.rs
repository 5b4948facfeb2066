//! The PixArt tokenization step against transformers 5.24 (`fixtures/pipeline/reference/
//! tokenizer.safetensors`, `prompts.json`): ids and masks must be **exactly** equal — token
//! ids admit no tolerance.

use crate::common;
use crate::common::{Reference, reference, tiny};
use models_text::{PIXART_ALPHA_MAX_LENGTH, PromptTokenizer, TextError, preprocess_prompt};

fn prompts() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(reference("prompts.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["max_length"], 120);
    json["prompts"].as_array().unwrap().clone()
}

fn tokenizer() -> PromptTokenizer {
    PromptTokenizer::from_dir(tiny().join("tokenizer"), PIXART_ALPHA_MAX_LENGTH).unwrap()
}

#[test]
fn ids_and_masks_equal_transformers_for_every_prompt() {
    let prompts = prompts();
    let texts: Vec<String> =
        prompts.iter().map(|p| p["prompt"].as_str().unwrap().to_string()).collect();
    let out = tokenizer().tokenize(&texts).unwrap();

    let r = Reference::open("tokenizer.safetensors");
    let (shape, ids) = r.i64("input_ids");
    let (mshape, mask) = r.i64("attention_mask");
    assert_eq!(shape, [texts.len(), 120]);
    assert_eq!(mshape, shape);
    assert_eq!(out.batch_size(), texts.len());
    for (i, p) in prompts.iter().enumerate() {
        let row =
            |v: &[i64]| v[i * 120..(i + 1) * 120].iter().map(|&x| x as u32).collect::<Vec<_>>();
        assert_eq!(preprocess_prompt(&texts[i]), p["preprocessed"].as_str().unwrap(), "prompt {i}");
        assert_eq!(out.input_ids[i], row(&ids), "input_ids of prompt {i}: {:?}", texts[i]);
        assert_eq!(out.attention_mask[i], row(&mask), "attention_mask of prompt {i}");
        let n = p["num_tokens"].as_u64().unwrap() as usize;
        assert_eq!(out.attention_mask[i].iter().filter(|&&m| m == 1).count(), n, "prompt {i}");
    }
    assert_eq!(out.input_ids_flat(), ids);
}

#[test]
fn typed_special_tokens_are_real_tokens() {
    // Prompt 5 types `<pad>` and `</s>`: ids 0 and 1 in the middle, with mask 1.
    let p = &prompts()[5];
    let out = tokenizer().tokenize(&[p["prompt"].as_str().unwrap()]).unwrap();
    let n = p["num_tokens"].as_u64().unwrap() as usize;
    let real = &out.input_ids[0][..n - 1];
    assert!(real.contains(&0) && real.contains(&1), "{real:?}");
    assert!(out.attention_mask[0][..n].iter().all(|&m| m == 1));
    assert!(out.attention_mask[0][n..].iter().all(|&m| m == 0));
}

#[test]
fn truncation_reports_what_diffusers_logs() {
    let prompts = prompts();
    let texts: Vec<&str> = prompts.iter().map(|p| p["prompt"].as_str().unwrap()).collect();
    let out = tokenizer().tokenize(&texts).unwrap();
    assert_eq!(out.truncations.len(), 1, "{:?}", out.truncations);
    let t = &out.truncations[0];
    assert_eq!(t.index, 6);
    assert_eq!(
        t.num_tokens_untruncated,
        prompts[6]["num_tokens_untruncated"].as_u64().unwrap() as usize
    );
    assert_eq!(t.max_length, 120);
    // transformers 5.24: tokenizer.batch_decode(untruncated_ids[:, 119:-1])
    let expected = "with old books and small plants, a sleeping golden retriever puppy on the \
        floor, a red scarf, a teddy bear wearing sunglasses, a colorful abstract painting on the \
        wall, a bowl of fresh fruit, a glass of orange juice with ice cubes, a pair of red shoes, \
        high quality, 4k, sharp focus, trending on artstation";
    assert_eq!(t.removed_text, expected);
    assert_eq!(
        t.message(),
        format!(
            "The following part of your input was truncated because T5 can only handle \
             sequences up to 120 tokens: ['{expected}']"
        )
    );
    // Row 6 keeps 119 pieces and ends with `</s>` (id 1), no padding.
    assert_eq!(out.input_ids[6][119], 1);
    assert!(out.attention_mask[6].iter().all(|&m| m == 1));
}

#[test]
fn exactly_max_length_is_not_truncated() {
    // A prompt of exactly L tokens (with `</s>`) fits: diffusers compares the untruncated ids
    // with the truncated ones and finds them equal.
    let tok = tokenizer();
    let long = prompts()[6]["prompt"].as_str().unwrap().to_string();
    let n = tok.inner().encode(preprocess_prompt(&long), true).unwrap().get_ids().len();
    let fits = tok.with_max_length(n).unwrap().tokenize(&[long.as_str()]).unwrap();
    assert!(fits.truncations.is_empty());
    let cut = tok.with_max_length(n - 1).unwrap().tokenize(&[long.as_str()]).unwrap();
    assert_eq!(cut.truncations.len(), 1);
    assert_eq!(cut.input_ids[0].len(), n - 1);
}

#[test]
fn sigma_length_pads_to_300() {
    let tok = tokenizer().with_max_length(models_text::PIXART_SIGMA_MAX_LENGTH).unwrap();
    let out = tok.tokenize(&["a photo of a cat"]).unwrap();
    assert_eq!(out.input_ids[0].len(), 300);
    assert_eq!(out.attention_mask[0].iter().sum::<u32>(), 7);
    assert!(out.input_ids[0][7..].iter().all(|&id| id == tok.pad_id()));
}

#[test]
fn missing_tokenizer_json_names_the_file() {
    let dir = common::scratch_dir("no-tokenizer");
    let err = PromptTokenizer::from_file(dir.join("tokenizer.json"), 120).unwrap_err();
    assert!(matches!(err, TextError::Io { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("tokenizer.json") && msg.contains("cannot read"), "{msg}");
    // A folder without any tokenizer file names the folder and what was looked for.
    let err = PromptTokenizer::from_dir(&dir, 120).unwrap_err();
    assert!(matches!(err, TextError::NoTokenizer { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("tokenizer.json") && msg.contains("spiece.model"), "{msg}");
}

#[test]
fn corrupt_tokenizer_json_is_a_load_error() {
    let dir = common::scratch_dir("bad-tokenizer");
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, r#"{"version": "1.0", "model": {"type": "Nonsense"}}"#).unwrap();
    let err = PromptTokenizer::from_file(&path, 120).unwrap_err();
    assert!(matches!(err, TextError::TokenizerLoad { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn tokenizer_without_pad_is_rejected() {
    // A WordLevel tokenizer with no `<pad>` in its vocabulary.
    let dir = common::scratch_dir("no-pad");
    let path = dir.join("tokenizer.json");
    std::fs::write(
        &path,
        r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "cat": 1}, "unk_token": "[UNK]"}}"#,
    )
    .unwrap();
    let err = PromptTokenizer::from_file(&path, 120).unwrap_err();
    assert!(matches!(err, TextError::MissingSpecialToken { .. }), "{err:?}");
    assert!(err.to_string().contains("<pad>"), "{err}");
}

#[test]
fn zero_max_length_is_rejected() {
    let err = PromptTokenizer::from_dir(tiny().join("tokenizer"), 0).unwrap_err();
    assert!(err.to_string().contains("max_length"), "{err}");
}

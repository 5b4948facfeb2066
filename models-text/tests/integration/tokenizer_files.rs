//! Tokenizers built from the files real repositories ship, against transformers 5.24
//! (`fixtures/text/reference/tokenizers.json`, `tools/fixtures/clip_models.py`): ids and masks
//! **exactly** equal, for every prompt and every folder kind.
//!
//! | folder | files | stands for |
//! |---|---|---|
//! | `clip-sd15` | vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json | SD 1.5's `tokenizer/` (pad `<\|endoftext\|>`) |
//! | `clip-sdxl-2` | the same, pad `!`, `added_tokens_decoder` | SD 2.x's `tokenizer/`, SDXL's `tokenizer_2/` |
//! | `t5-spiece` | spiece.model, tokenizer_config.json, special_tokens_map.json | PixArt's `tokenizer/` (T5 v1.1's) |
//! | `*-json` | tokenizer.json + tokenizer_config.json, as transformers 5.24 saves the above | a re-saved tokenizer |
//!
//! The references are transformers 5.24's `AutoTokenizer.from_pretrained(folder)` —
//! `CLIPTokenizer` and `T5Tokenizer`, both `tokenizers`-backed in transformers 5 (it has no
//! pure-Python or SentencePiece-backed class for either any more). The fixture script also runs
//! independent implementations (a pure-Python CLIP BPE, `sentencepiece.SentencePieceProcessor`)
//! and records where they differ (`independent_agrees`); see tools/fixtures/README.md.

use crate::common;
use std::path::{Path, PathBuf};

use crate::common::{scratch_dir, tokenizer_dir};
use models_text::{CLIP_MAX_LENGTH, PromptTokenizer, TOKENIZER_FILES, TextError, TokenizerKind};
use serde_json::Value;

fn reference() -> Value {
    let path = common::text_dir().join("reference/tokenizers.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn prompts(r: &Value) -> Vec<String> {
    r["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect()
}

fn load(name: &str, r: &Value) -> PromptTokenizer {
    let f = &r["folders"][name];
    let max_length = f["max_length"].as_u64().unwrap() as usize;
    match f["kind"].as_str().unwrap() {
        "clip" => PromptTokenizer::clip_from_dir(tokenizer_dir(name)).unwrap(),
        _ => PromptTokenizer::from_dir(tokenizer_dir(name), max_length).unwrap(),
    }
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Checks one folder against its reference entry: settings, added tokens, then every prompt.
fn check_folder(name: &str) {
    let r = reference();
    let f = &r["folders"][name];
    let tok = load(name, &r);
    let kind = if f["kind"] == "clip" { TokenizerKind::Clip } else { TokenizerKind::T5 };
    assert_eq!(tok.kind(), kind, "{name}");
    let max_length = f["max_length"].as_u64().unwrap() as usize;
    assert_eq!(tok.max_length(), max_length, "{name}");
    assert_eq!(tok.model_max_length(), f["model_max_length"].as_u64().map(|n| n as usize));
    assert_eq!(tok.pad_token(), f["pad_token"].as_str().unwrap(), "{name}: pad token");
    assert_eq!(tok.pad_id() as u64, f["pad_token_id"].as_u64().unwrap(), "{name}: pad id");
    assert_eq!(tok.eos_id().map(u64::from), f["eos_token_id"].as_u64(), "{name}: eos id");
    assert_eq!(tok.bos_id().map(u64::from), f["bos_token_id"].as_u64(), "{name}: bos id");
    assert_eq!(
        tok.inner().get_vocab_size(true) as u64,
        f["vocab_size"].as_u64().unwrap(),
        "{name}: vocabulary with added tokens"
    );
    // The added tokens with every flag: what decides how typed special tokens split.
    let mut added: Vec<_> = tok.inner().get_added_tokens_decoder().into_iter().collect();
    added.sort_by_key(|(id, _)| *id);
    let expected = f["added_tokens"].as_array().unwrap();
    assert_eq!(added.len(), expected.len(), "{name}: number of added tokens");
    for ((id, t), e) in added.iter().zip(expected) {
        let flags = |v: &Value, k: &str| v[k].as_bool().unwrap();
        assert_eq!(
            (
                *id as u64,
                t.content.as_str(),
                t.single_word,
                t.lstrip,
                t.rstrip,
                t.normalized,
                t.special
            ),
            (
                e["id"].as_u64().unwrap(),
                e["content"].as_str().unwrap(),
                flags(e, "single_word"),
                flags(e, "lstrip"),
                flags(e, "rstrip"),
                flags(e, "normalized"),
                flags(e, "special"),
            ),
            "{name}: added token {id}"
        );
    }

    let texts = prompts(&r);
    let out = tok.tokenize(&texts).unwrap();
    let entries = f["prompts"].as_array().unwrap();
    // `-json` folders store no ids: they must give their source folder's.
    let id_source = f.get("same_ids_as").and_then(Value::as_str).unwrap_or(name);
    let id_entries = r["folders"][id_source]["prompts"].as_array().unwrap();
    let pad = tok.pad_id();
    let mut truncated = 0;
    for (i, (e, ids_entry)) in entries.iter().zip(id_entries).enumerate() {
        let n = e["num_tokens"].as_u64().unwrap() as usize;
        let mut expected = u32s(&ids_entry["input_ids"]);
        assert_eq!(expected.len(), n);
        expected.resize(max_length, pad);
        let mask: Vec<u32> = (0..max_length).map(|k| u32::from(k < n)).collect();
        let shown = &texts[i][..texts[i].char_indices().nth(40).map_or(texts[i].len(), |(k, _)| k)];
        assert_eq!(out.input_ids[i], expected, "{name}: input_ids of prompt {i} ({shown:?})");
        assert_eq!(out.attention_mask[i], mask, "{name}: attention_mask of prompt {i}");
        match e["removed_text"].as_str() {
            Some(removed) => {
                let t = out
                    .truncations
                    .iter()
                    .find(|t| t.index == i)
                    .unwrap_or_else(|| panic!("{name}: prompt {i} was not reported truncated"));
                assert_eq!(t.removed_text, removed, "{name}: removed text of prompt {i}");
                assert_eq!(
                    t.num_tokens_untruncated as u64,
                    e["num_tokens_untruncated"].as_u64().unwrap()
                );
                assert_eq!(t.kind, kind);
                truncated += 1;
            }
            None => assert!(
                out.truncations.iter().all(|t| t.index != i),
                "{name}: prompt {i} reported truncated"
            ),
        }
    }
    assert_eq!(out.truncations.len(), truncated, "{name}");
    assert!(truncated >= 1, "{name}: the long prompts exercise truncation");
}

#[test]
fn clip_sd15_from_vocab_and_merges_equals_transformers() {
    check_folder("clip-sd15");
}

#[test]
fn clip_sdxl_2_from_vocab_and_merges_equals_transformers() {
    check_folder("clip-sdxl-2");
}

#[test]
fn t5_from_spiece_model_equals_transformers() {
    check_folder("t5-spiece");
}

#[test]
fn clip_sd15_from_tokenizer_json_equals_transformers() {
    check_folder("clip-sd15-json");
}

#[test]
fn clip_sdxl_2_from_tokenizer_json_equals_transformers() {
    check_folder("clip-sdxl-2-json");
}

#[test]
fn t5_from_tokenizer_json_equals_transformers() {
    check_folder("t5-spiece-json");
}

#[test]
fn clip_pads_with_the_folders_pad_token_and_keeps_eos_when_cut() {
    let sd15 = PromptTokenizer::clip_from_dir(tokenizer_dir("clip-sd15")).unwrap();
    let sdxl = PromptTokenizer::clip_from_dir(tokenizer_dir("clip-sdxl-2")).unwrap();
    assert_eq!((sd15.max_length(), sdxl.max_length()), (CLIP_MAX_LENGTH, CLIP_MAX_LENGTH));
    let long = prompts(&reference()).last().unwrap().clone();
    for tok in [&sd15, &sdxl] {
        let out = tok.tokenize(&["a photo of a cat", long.as_str()]).unwrap();
        let (bos, eos) = (tok.bos_id().unwrap(), tok.eos_id().unwrap());
        assert_eq!(out.input_ids[0][0], bos);
        assert_eq!(out.input_ids[0][6], eos);
        assert!(out.input_ids[0][7..].iter().all(|&id| id == tok.pad_id()));
        // 78 tokens cut to 77: bos, 75 text tokens, eos.
        assert_eq!(out.input_ids[1][0], bos);
        assert_eq!(out.input_ids[1][76], eos);
        assert!(out.attention_mask[1].iter().all(|&m| m == 1));
        assert_eq!(out.truncations.len(), 1);
        assert!(
            out.truncations[0]
                .message()
                .contains("because CLIP can only handle sequences up to 77")
        );
    }
    assert_eq!(sd15.pad_id(), sd15.eos_id().unwrap(), "SD 1.5 pads with <|endoftext|>");
    assert_eq!((sdxl.pad_token(), sdxl.pad_id()), ("!", 0), "SDXL's tokenizer_2 pads with !");
}

/// Copies a fixture tokenizer folder (only the listed files) into a scratch folder.
fn copy_folder(name: &str, scratch: &str, files: &[&str]) -> PathBuf {
    let dir = scratch_dir(scratch);
    for f in files {
        std::fs::copy(tokenizer_dir(name).join(f), dir.join(f)).unwrap();
    }
    dir
}

const CLIP_FILES: [&str; 4] =
    ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"];

#[test]
fn kind_is_read_from_the_files_without_a_config() {
    let clip = copy_folder("clip-sd15", "clip-no-config", &["vocab.json", "merges.txt"]);
    let tok = PromptTokenizer::from_dir(&clip, 77).unwrap();
    assert_eq!(tok.kind(), TokenizerKind::Clip);
    // CLIPTokenizer's defaults: pad with <|endoftext|>.
    assert_eq!(tok.pad_token(), "<|endoftext|>");
    let t5 = copy_folder("t5-spiece", "t5-no-config", &["spiece.model"]);
    let tok = PromptTokenizer::from_dir(&t5, 120).unwrap();
    assert_eq!(tok.kind(), TokenizerKind::T5);
    assert_eq!(tok.pad_token(), "<pad>");
    let json = copy_folder("clip-sdxl-2-json", "clip-json-no-config", &["tokenizer.json"]);
    assert_eq!(PromptTokenizer::from_dir(&json, 77).unwrap().kind(), TokenizerKind::Clip);
}

#[test]
fn a_folder_without_tokenizer_files_names_the_folder_and_the_files() {
    let dir = scratch_dir("no-tokenizer-files");
    std::fs::write(dir.join("README.md"), "nothing here").unwrap();
    let err = PromptTokenizer::from_dir(&dir, 77).unwrap_err();
    assert!(matches!(err, TextError::NoTokenizer { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&dir.display().to_string()) && msg.contains(TOKENIZER_FILES), "{msg}");
    for f in ["tokenizer.json", "vocab.json", "merges.txt", "spiece.model"] {
        assert!(msg.contains(f), "{msg}");
    }
}

#[test]
fn vocab_without_merges_names_the_missing_file() {
    let dir = copy_folder("clip-sd15", "vocab-only", &["vocab.json", "tokenizer_config.json"]);
    let err = PromptTokenizer::from_dir(&dir, 77).unwrap_err();
    assert!(matches!(err, TextError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("merges.txt"), "{err}");
}

fn with_merges(scratch: &str, edit: impl FnOnce(&mut Vec<String>)) -> (PathBuf, TextError) {
    let dir = copy_folder("clip-sd15", scratch, &CLIP_FILES);
    let path = dir.join("merges.txt");
    let mut lines: Vec<String> =
        std::fs::read_to_string(&path).unwrap().lines().map(str::to_string).collect();
    edit(&mut lines);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let err = PromptTokenizer::from_dir(&dir, 77).unwrap_err();
    (path, err)
}

fn assert_bad_merge(path: &Path, err: &TextError, line: usize, needle: &str) {
    match err {
        TextError::BadMerges { path: p, line: l, .. } => {
            assert_eq!((p.as_path(), *l), (path, line), "{err}");
        }
        other => panic!("expected BadMerges, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("merges.txt") && msg.contains(&format!("line {line}")), "{msg}");
    assert!(msg.contains(needle), "{msg}");
}

#[test]
fn a_bad_merges_line_is_an_error_naming_file_and_line() {
    // Line 1 is "#version: 0.2"; line 5 is the fourth merge.
    let (path, err) = with_merges("merges-three-parts", |l| l[4] = "a b c".into());
    assert_bad_merge(&path, &err, 5, "two tokens");
    let (path, err) = with_merges("merges-unknown-token", |l| l[9] = "zzzz q".into());
    assert_bad_merge(&path, &err, 10, "\"zzzz\" is not in the vocabulary");
    // A blank line is a bad merge for `tokenizers` too.
    let (path, err) = with_merges("merges-blank-line", |l| l.insert(3, String::new()));
    assert_bad_merge(&path, &err, 4, "two tokens");
}

#[test]
fn an_unsupported_tokenizer_class_is_named() {
    let dir = copy_folder("clip-sd15", "bert-class", &CLIP_FILES);
    let cfg = dir.join("tokenizer_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["tokenizer_class"] = "BertTokenizer".into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let err = PromptTokenizer::from_dir(&dir, 77).unwrap_err();
    assert!(matches!(err, TextError::UnsupportedTokenizer { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("BertTokenizer") && msg.contains("tokenizer_config.json"), "{msg}");
    // A T5 folder is not a CLIP tokenizer.
    let err = PromptTokenizer::clip_from_dir(tokenizer_dir("t5-spiece")).unwrap_err();
    assert!(matches!(err, TextError::UnsupportedTokenizer { .. }), "{err:?}");
}

#[test]
fn a_corrupt_spiece_model_names_the_file() {
    let dir = copy_folder("t5-spiece", "bad-spiece", &["tokenizer_config.json"]);
    let bytes = std::fs::read(tokenizer_dir("t5-spiece").join("spiece.model")).unwrap();
    std::fs::write(dir.join("spiece.model"), &bytes[..bytes.len() / 2]).unwrap();
    let err = PromptTokenizer::from_dir(&dir, 120).unwrap_err();
    assert!(matches!(err, TextError::TokenizerLoad { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("spiece.model") && msg.contains("byte"), "{msg}");
}

#[test]
fn a_bad_vocab_json_names_the_file() {
    let dir = copy_folder("clip-sd15", "bad-vocab", &CLIP_FILES);
    std::fs::write(dir.join("vocab.json"), r#"{"a": "zero"}"#).unwrap();
    let err = PromptTokenizer::from_dir(&dir, 77).unwrap_err();
    assert!(matches!(err, TextError::TokenizerLoad { .. }), "{err:?}");
    assert!(err.to_string().contains("vocab.json"), "{err}");
}

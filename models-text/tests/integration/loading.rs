//! Loading a T5 folder: tied-embedding names, ignored decoder keys, and errors that name the
//! key or the file. Folders are built from the fixture's weights with keys added, removed or
//! renamed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::common::{B, scratch_dir, tiny};
use models_text::{T5EncoderModel, TextError};
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

/// Copies the fixture's `text_encoder/` into a scratch folder, with the weights rewritten by
/// `edit` (key → (dtype, shape, bytes)) and `config.json` by `config`.
fn folder(
    name: &str,
    edit: impl FnOnce(&mut HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>),
    config: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    let src = tiny().join("text_encoder");
    let dir = scratch_dir(name);
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (dt, shape, data))| {
            (k.clone(), TensorView::new(*dt, shape.clone(), data).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir
}

fn load(dir: &Path) -> Result<T5EncoderModel<B>, TextError> {
    T5EncoderModel::<B>::from_pretrained(dir, &Default::default())
}

fn embeddings(m: &T5EncoderModel<B>) -> Vec<f32> {
    m.encoder.embed_tokens.weight.val().into_data().to_vec::<f32>().unwrap()
}

#[test]
fn fixture_loads_with_every_key_used() {
    let m = load(&tiny().join("text_encoder")).unwrap();
    assert_eq!(m.vocab_size(), 711);
    assert_eq!(m.d_model(), 32);
    assert_eq!(m.encoder.block.len(), 2);
    use burn::module::Module;
    assert_eq!(m.num_params(), 43_520, "PIPELINE.md: 43 520 parameters");
}

#[test]
fn embed_tokens_alone_or_both_names_load() {
    let reference = embeddings(&load(&tiny().join("text_encoder")).unwrap());
    let renamed = folder(
        "embed-tokens-only",
        |t| {
            let e = t.remove("shared.weight").unwrap();
            t.insert("encoder.embed_tokens.weight".into(), e);
        },
        |_| {},
    );
    assert_eq!(embeddings(&load(&renamed).unwrap()), reference);
    let both = folder(
        "both-embeddings",
        |t| {
            let e = t["shared.weight"].clone();
            t.insert("encoder.embed_tokens.weight".into(), e);
        },
        |_| {},
    );
    assert_eq!(embeddings(&load(&both).unwrap()), reference);
}

#[test]
fn decoder_keys_are_ignored_like_transformers() {
    let dir = folder(
        "with-decoder",
        |t| {
            let w = t["encoder.final_layer_norm.weight"].clone();
            t.insert("decoder.final_layer_norm.weight".into(), w);
        },
        |_| {},
    );
    load(&dir).unwrap();
}

#[test]
fn unused_key_is_an_error_naming_it() {
    let dir = folder(
        "unused",
        |t| {
            let w = t["encoder.final_layer_norm.weight"].clone();
            t.insert("lm_head.weight".into(), w);
        },
        |_| {},
    );
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, TextError::Weights(_)), "{err:?}");
    assert!(err.to_string().contains("lm_head.weight"), "{err}");
}

#[test]
fn missing_key_is_an_error_naming_it() {
    let key = "encoder.block.1.layer.1.DenseReluDense.wi_0.weight";
    let dir = folder("missing", |t| drop(t.remove(key)), |_| {});
    let err = load(&dir).unwrap_err();
    assert!(err.to_string().contains(key), "{err}");
}

#[test]
fn wrong_shape_is_an_error_naming_the_key() {
    // A config whose d_ff disagrees with the stored weights.
    let dir = folder("shape", |_| {}, |c| c["d_ff"] = 48.into());
    let err = load(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("DenseReluDense.wi_0.weight") && msg.contains("48"), "{msg}");
}

#[test]
fn bad_config_is_an_error_naming_the_key() {
    // The saved `dense_act_fn` wins over `feed_forward_proj`, as in transformers: changing
    // only `feed_forward_proj` changes nothing while `dense_act_fn: "gelu_new"` is there.
    let dir = folder("ff-overridden", |_| {}, |c| c["feed_forward_proj"] = "gated-silu".into());
    load(&dir).unwrap();
    let dir = folder(
        "bad-ff",
        |_| {},
        |c| {
            c["feed_forward_proj"] = "gated-silu".into();
            c.as_object_mut().unwrap().remove("dense_act_fn");
        },
    );
    let msg = load(&dir).unwrap_err().to_string();
    assert!(msg.contains("`feed_forward_proj`") && msg.contains("silu"), "{msg}");
    let dir = folder("bad-act", |_| {}, |c| c["dense_act_fn"] = "silu".into());
    let msg = load(&dir).unwrap_err().to_string();
    assert!(msg.contains("`dense_act_fn`") && msg.contains("silu"), "{msg}");

    let dir = folder("bad-type", |_| {}, |c| c["num_heads"] = "four".into());
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, TextError::ConfigParse { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("`num_heads`") && msg.contains("config.json"), "{msg}");

    let dir = folder("not-json", |_| {}, |_| {});
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let msg = load(&dir).unwrap_err().to_string();
    assert!(msg.contains("config.json") && msg.contains("invalid config"), "{msg}");
}

#[test]
fn missing_config_names_the_file() {
    let dir = scratch_dir("no-config");
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, TextError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn missing_weights_name_the_folder() {
    let dir = scratch_dir("no-weights");
    std::fs::copy(tiny().join("text_encoder/config.json"), dir.join("config.json")).unwrap();
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, TextError::Weights(_)), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

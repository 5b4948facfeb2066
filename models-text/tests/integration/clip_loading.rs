//! Loading CLIP text-encoder folders: both key namings, f16/bf16 files, and errors that name
//! the key or the file. Folders are built from the fixtures' weights with keys added, removed
//! or renamed, or the config edited.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::common::{B, scratch_dir, text_dir};
use models_text::{
    CLIPActivation, CLIPPooling, CLIPTextModel, CLIPTextModelWithProjection, TextError,
};
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

type Tensors = HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// Copies `fixtures/text/{name}` into a scratch folder, the weights rewritten by `edit` and
/// `config.json` by `config`.
fn folder(
    name: &str,
    scratch: &str,
    edit: impl FnOnce(&mut Tensors),
    config: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    let src = text_dir().join(name);
    let dir = scratch_dir(scratch);
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Tensors = st
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

fn load(dir: &Path) -> Result<CLIPTextModel<B>, TextError> {
    CLIPTextModel::<B>::from_pretrained(dir, &Default::default())
}

fn token_embedding(m: &CLIPTextModel<B>) -> Vec<f32> {
    m.embeddings.token_embedding.weight.val().into_data().to_vec::<f32>().unwrap()
}

#[test]
fn fixtures_load_with_every_key_used() {
    use burn::module::Module;
    let sd15 = load(&text_dir().join("clip-sd15")).unwrap();
    assert_eq!(
        (sd15.vocab_size(), sd15.hidden_size(), sd15.max_position_embeddings()),
        (100, 32, 77)
    );
    assert_eq!(sd15.encoder.layers.len(), 3);
    assert_eq!(sd15.encoder.layers[0].mlp.activation, CLIPActivation::QuickGelu);
    assert_eq!(sd15.pooling, CLIPPooling::ArgmaxInputIds);
    assert_eq!(sd15.num_params(), 28_240, "the fixture script's count");
    let sd2 = load(&text_dir().join("clip-sd2")).unwrap();
    assert_eq!(sd2.encoder.layers[0].mlp.activation, CLIPActivation::Gelu);
    assert_eq!(sd2.num_params(), 20_736);
    let sdxl = CLIPTextModelWithProjection::<B>::from_pretrained(
        text_dir().join("clip-sdxl-2"),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(sdxl.text_model.pooling, CLIPPooling::FirstEos(767));
    assert_eq!(sdxl.text_projection.weight.dims(), [32, 24], "[hidden, projection_dim]");
    assert_eq!(sdxl.num_params(), 43_008);
}

#[test]
fn keys_with_and_without_the_text_model_prefix_load_alike() {
    // clip-sd15 stores `text_model.*` (and the position_ids buffer); strip the prefix the way
    // transformers 5 saves a CLIPTextModel.
    let reference = token_embedding(&load(&text_dir().join("clip-sd15")).unwrap());
    let dir = folder(
        "clip-sd15",
        "clip-unprefixed",
        |t| {
            *t = t
                .drain()
                .filter(|(k, _)| !k.ends_with("position_ids"))
                .map(|(k, v)| (k.trim_start_matches("text_model.").to_string(), v))
                .collect();
        },
        |_| {},
    );
    assert_eq!(token_embedding(&load(&dir).unwrap()), reference);
}

#[test]
fn a_mixed_naming_leaves_keys_unused_and_names_them() {
    let dir = folder(
        "clip-sd15",
        "clip-mixed",
        |t| {
            let v = t.remove("text_model.final_layer_norm.weight").unwrap();
            t.insert("final_layer_norm.weight".into(), v);
        },
        |_| {},
    );
    let msg = load(&dir).unwrap_err().to_string();
    assert!(msg.contains("text_model.final_layer_norm.weight"), "{msg}");
}

#[test]
fn a_projection_weight_in_a_text_model_folder_is_reported() {
    let dir = folder(
        "clip-sd2",
        "clip-extra-projection",
        |t| {
            let w = t["encoder.layers.0.self_attn.q_proj.weight"].clone();
            t.insert("text_projection.weight".into(), w);
        },
        |_| {},
    );
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, TextError::Weights(_)), "{err:?}");
    assert!(err.to_string().contains("text_projection.weight"), "{err}");
}

#[test]
fn a_missing_weight_is_an_error_naming_it() {
    let key = "encoder.layers.1.mlp.fc2.bias";
    let dir = folder("clip-sd2", "clip-missing", |t| drop(t.remove(key)), |_| {});
    let msg = load(&dir).unwrap_err().to_string();
    assert!(msg.contains(key), "{msg}");
}

#[test]
fn a_wrong_shape_is_an_error_naming_the_key() {
    let dir = folder("clip-sd2", "clip-shape", |_| {}, |c| c["intermediate_size"] = 40.into());
    let msg = load(&dir).unwrap_err().to_string();
    assert!(msg.contains("mlp.fc1.weight") && msg.contains("40"), "{msg}");
}

#[test]
fn an_unsupported_hidden_act_names_the_key() {
    let dir = folder("clip-sd2", "clip-act", |_| {}, |c| c["hidden_act"] = "gelu_new".into());
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, TextError::UnsupportedConfig { key: "hidden_act", .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("`hidden_act`") && msg.contains("gelu_new"), "{msg}");
}

#[test]
fn other_bad_configs_name_the_key() {
    for (key, value) in [
        ("eos_token_id", serde_json::json!([2, 49407])),
        ("num_attention_heads", serde_json::json!(5)),
        ("model_type", serde_json::json!("clip")),
    ] {
        let dir =
            folder("clip-sd2", &format!("clip-bad-{key}"), |_| {}, |c| c[key] = value.clone());
        let msg = load(&dir).unwrap_err().to_string();
        assert!(msg.contains(&format!("`{key}`")), "{key}: {msg}");
    }
    let dir = folder("clip-sd2", "clip-bad-type", |_| {}, |c| c["hidden_size"] = "wide".into());
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, TextError::ConfigParse { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("`hidden_size`") && msg.contains("config.json"), "{msg}");
    // The projection model needs projection_dim.
    let dir = folder(
        "clip-sdxl-2",
        "clip-no-projection-dim",
        |_| {},
        |c| {
            c.as_object_mut().unwrap().insert("projection_dim".into(), serde_json::Value::Null);
        },
    );
    let msg = CLIPTextModelWithProjection::<B>::from_pretrained(&dir, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`projection_dim`"), "{msg}");
}

#[test]
fn missing_files_are_named() {
    let dir = scratch_dir("clip-empty");
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, TextError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("config.json"), "{err}");
    std::fs::copy(text_dir().join("clip-sd2/config.json"), dir.join("config.json")).unwrap();
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, TextError::Weights(_)), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

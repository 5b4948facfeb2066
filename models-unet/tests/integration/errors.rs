//! Bad folders and inputs are errors naming the key, file or tensor at fault, never panics.

use std::path::{Path, PathBuf};

use crate::common::{B, fixtures, read_case};
use models_unet::UnetModel;
use parallel_core::{Denoiser, LoadPlan, Serial, Shard};

/// A copy of fixture `model` with `config.json` edited by `edit`, in a fresh temp folder.
fn edited(model: &str, tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("models-unet-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join(model);
    std::fs::copy(src.join(models_unet::WEIGHTS_FILE), dir.join(models_unet::WEIGHTS_FILE))
        .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    UnetModel::<B>::load(dir, &LoadPlan::full(), &Default::default()).unwrap_err().to_string()
}

#[test]
fn unsupported_config_keys_are_named() {
    for (key, value) in [
        ("class_embed_type", serde_json::json!("timestep")),
        ("time_cond_proj_dim", serde_json::json!(256)),
        ("addition_embed_type", serde_json::json!("image")),
        ("encoder_hid_dim_type", serde_json::json!("text_proj")),
    ] {
        let dir = edited("sd15", key, |c| c[key] = value);
        let err = load_err(&dir);
        assert!(err.contains(key) && err.contains("config.json"), "{key}: {err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn weights_of_another_architecture_name_the_key() {
    // One resnet per block instead of two: the file's second resnets are read by no module.
    let dir = edited("sd15", "layers", |c| c["layers_per_block"] = serde_json::json!(1));
    let err = load_err(&dir);
    println!("{err}");
    assert!(err.contains("resnets."), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    // Linear projections on a conv-projection checkpoint: the shape of `proj_in` is named.
    let dir = edited("sd15", "linear", |c| c["use_linear_projection"] = serde_json::json!(true));
    let err = load_err(&dir);
    assert!(err.contains("proj_in"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    let err = load_err(&fixtures().join("no-such-unet"));
    assert!(err.contains("no-such-unet"), "{err}");
}

#[test]
fn plans_a_unet_cannot_honour_are_refused() {
    let dev = Default::default();
    // Tensor-parallel parts the model cannot split: the number at fault is named (sd15's
    // tiny fixture: 4 groups, 2 heads per transformer).
    let shard =
        |world| LoadPlan { tensor_shard: Some(Shard { rank: 0, world }), ..LoadPlan::full() };
    let err =
        UnetModel::<B>::load(fixtures().join("sd15"), &shard(3), &dev).unwrap_err().to_string();
    assert!(err.contains("norm_num_groups 4 is not divisible by 3"), "{err}");
    let err =
        UnetModel::<B>::load(fixtures().join("sd15"), &shard(4), &dev).unwrap_err().to_string();
    assert!(err.contains("2 attention heads") && err.contains("not divisible by 4"), "{err}");
    assert!(UnetModel::<B>::load(fixtures().join("sd15"), &shard(2), &dev).is_ok());
    let plan = LoadPlan { blocks: Some(0..1), ..LoadPlan::full() };
    let err = UnetModel::<B>::load(fixtures().join("sd15"), &plan, &dev).unwrap_err().to_string();
    assert!(err.contains("pipeline stages"), "{err}");
}

#[test]
fn missing_and_misshapen_inputs_are_named() {
    let dev = Default::default();
    let xl = UnetModel::<B>::load(fixtures().join("sdxl"), &LoadPlan::full(), &dev).unwrap();
    let case = read_case(&fixtures().join("sdxl/cases/square.safetensors"));
    let h = case.input.grid().height;
    let mut input = case.input.clone();
    input.added_cond.remove("time_ids");
    let err = xl.forward_rows(&input, 0..h, &mut Serial).unwrap_err().to_string();
    assert!(err.contains("time_ids"), "{err}");
    let mut input = case.input.clone();
    input.encoder_hidden_states = None;
    let err = xl.forward_rows(&input, 0..h, &mut Serial).unwrap_err().to_string();
    assert!(err.contains("encoder_hidden_states"), "{err}");
    let mut input = case.input.clone();
    input
        .added_cond
        .insert("text_embeds".into(), input.added_cond["text_embeds"].clone().narrow(1, 0, 3));
    let err = xl.forward_rows(&input, 0..h, &mut Serial).unwrap_err().to_string();
    assert!(err.contains("text_embeds") && err.contains("[2, 20]"), "{err}");
    let mut input = case.input;
    input.hidden_states = input.hidden_states.narrow(1, 0, 3);
    let err = xl.forward_rows(&input, 0..h, &mut Serial).unwrap_err().to_string();
    assert!(err.contains("3 channels"), "{err}");
}

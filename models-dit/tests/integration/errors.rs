//! Bad folders and bad inputs give clear errors (naming the file, key, shapes, dtype or
//! class at fault), never a panic. Bad folders are built in a temp dir from the fixtures.

use std::path::Path;

use crate::common::{B, TempDir, fixtures, read_case};
use burn::tensor::{Int, Tensor};
use models_dit::{DitError, DitModel, WEIGHTS_FILE};
use parallel_core::{Denoiser, LoadPlan, Serial, StagedDenoiser};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use weights::WeightError;

type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

/// The tensors of a fixture model's weights file.
fn fixture_tensors(model: &str) -> Tensors {
    let bytes = std::fs::read(fixtures().join(model).join(WEIGHTS_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect()
}

/// A copy of fixture `model` in a temp dir, with its weights replaced by `tensors`.
fn folder(model: &str, tensors: &Tensors) -> TempDir {
    let dir = TempDir::new(model);
    std::fs::copy(fixtures().join(model).join("config.json"), dir.0.join("config.json")).unwrap();
    write(&dir.0.join(WEIGHTS_FILE), tensors);
    dir
}

fn write(path: &Path, tensors: &Tensors) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn load(dir: &Path) -> Result<DitModel<B>, DitError> {
    DitModel::<B>::load(dir, &LoadPlan::full(), &Default::default())
}

fn edit(
    tensors: &mut Tensors,
    key: &str,
    f: impl FnOnce(&mut (String, Dtype, Vec<usize>, Vec<u8>)),
) {
    f(tensors.iter_mut().find(|t| t.0 == key).unwrap());
}

#[test]
fn a_missing_folder_or_config_names_the_file() {
    let err = load(Path::new("/nonexistent/pixart")).unwrap_err();
    assert!(matches!(err, DitError::Io { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/pixart/config.json"), "{err}");

    let dir = TempDir::new("no-weights");
    std::fs::copy(fixtures().join("dit/config.json"), dir.0.join("config.json")).unwrap();
    let err = load(&dir.0).unwrap_err();
    assert!(matches!(err, DitError::Weights(WeightError::NotFound { .. })), "{err}");
    assert!(err.to_string().contains(WEIGHTS_FILE), "{err}");
}

#[test]
fn pickle_checkpoints_are_refused() {
    let dir = TempDir::new("pickle");
    std::fs::copy(fixtures().join("dit/config.json"), dir.0.join("config.json")).unwrap();
    std::fs::write(dir.0.join("diffusion_pytorch_model.bin"), b"\x80\x02pickle").unwrap();
    let err = load(&dir.0).unwrap_err();
    assert!(matches!(err, DitError::Weights(WeightError::PickleRefused { .. })), "{err}");
}

#[test]
fn a_truncated_checkpoint_names_the_file() {
    let dir = folder("pixart-alpha", &fixture_tensors("pixart-alpha"));
    let path = dir.0.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load(&dir.0).unwrap_err();
    assert!(matches!(err, DitError::Weights(WeightError::Corrupt { .. })), "{err}");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

#[test]
fn a_wrong_shape_names_the_key_and_both_shapes() {
    let mut t = fixture_tensors("pixart-alpha");
    edit(&mut t, "adaln_single.linear.weight", |w| w.2 = vec![32, 192]);
    let err = load(&folder("pixart-alpha", &t).0).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DitError::Weights(WeightError::Shape { .. })), "{msg}");
    assert!(msg.contains("`adaln_single.linear.weight`"), "{msg}");
    assert!(msg.contains("[192, 32]") && msg.contains("[32, 192]"), "{msg}");
}

#[test]
fn a_wrong_dtype_names_the_key_and_dtype() {
    let mut t = fixture_tensors("dit");
    edit(&mut t, "proj_out_2.bias", |b| b.1 = Dtype::I32);
    let err = load(&folder("dit", &t).0).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DitError::Weights(WeightError::Dtype { .. })), "{msg}");
    assert!(msg.contains("`proj_out_2.bias`") && msg.contains("I32"), "{msg}");
}

#[test]
fn missing_and_unused_keys_are_named() {
    let mut t = fixture_tensors("dit");
    t.retain(|x| x.0 != "transformer_blocks.2.ff.net.2.bias");
    let err = load(&folder("dit", &t).0).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DitError::Weights(WeightError::MissingKey { .. })), "{msg}");
    assert!(msg.contains("`transformer_blocks.2.ff.net.2.bias`"), "{msg}");

    let mut t = fixture_tensors("dit");
    t.push(("transformer_blocks.4.attn1.to_q.weight".into(), Dtype::F32, vec![1], vec![0; 4]));
    t.push(("pos_embed.pos_embed".into(), Dtype::F32, vec![1], vec![0; 4]));
    let err = load(&folder("dit", &t).0).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DitError::Weights(WeightError::Unused { .. })), "{msg}");
    assert!(msg.contains("pos_embed.pos_embed, transformer_blocks.4.attn1.to_q.weight"), "{msg}");

    // Keys a plan leaves out (other stages' blocks) are not unused.
    let plan =
        LoadPlan { blocks: Some(1..3), skip_embed: true, skip_head: true, ..LoadPlan::full() };
    let m = DitModel::<B>::load(fixtures().join("dit"), &plan, &Default::default()).unwrap();
    assert_eq!(m.held_blocks(), 1..3);
}

#[test]
fn unsupported_classes_and_settings_are_named() {
    let t = fixture_tensors("dit");
    let dir = folder("dit", &t);
    let config = std::fs::read_to_string(dir.0.join("config.json")).unwrap();
    let set = |text: String| std::fs::write(dir.0.join("config.json"), text).unwrap();

    set(config.replace("DiTTransformer2DModel", "UNet2DConditionModel"));
    let err = load(&dir.0).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DitError::UnknownClass { .. }), "{msg}");
    assert!(msg.contains("`UNet2DConditionModel`"), "{msg}");
    assert!(
        msg.contains("PixArtTransformer2DModel") && msg.contains("DiTTransformer2DModel"),
        "{msg}"
    );

    set(config.replace("\"gelu-approximate\"", "\"swiglu\""));
    let err = load(&dir.0).unwrap_err();
    assert!(matches!(err, DitError::Config { .. }), "{err}");
    assert!(err.to_string().contains("`activation_fn` `swiglu`"), "{err}");

    set(config.replace("\"num_layers\": 4", "\"num_layers\": \"four\""));
    let err = load(&dir.0).unwrap_err();
    assert!(matches!(err, DitError::Config { .. }), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");

    set("{ not json".into());
    assert!(matches!(load(&dir.0), Err(DitError::Config { .. })));

    // A PixArt folder loaded as the wrong class.
    let err = models_dit::DiTTransformer2DModel::<B>::load(
        fixtures().join("pixart-alpha"),
        &LoadPlan::full(),
        &Default::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("expected a DiTTransformer2DModel"), "{err}");

    let plan = LoadPlan { blocks: Some(2..9), ..LoadPlan::full() };
    let err = DitModel::<B>::load(fixtures().join("dit"), &plan, &Default::default()).unwrap_err();
    assert!(matches!(err, DitError::Plan { .. }) && err.to_string().contains("2..9"), "{err}");
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let dev = Default::default();
    let pixart =
        DitModel::<B>::load(fixtures().join("pixart-alpha-ms"), &LoadPlan::full(), &dev).unwrap();
    let case = read_case(&fixtures().join("pixart-alpha-ms/cases/square.safetensors"));
    let run = |m: &DitModel<B>, input: &parallel_core::DenoiserInput<B>, rows| {
        m.forward_rows(input, rows, &mut Serial).unwrap_err().to_string()
    };

    let mut i = case.input.clone();
    i.encoder_hidden_states = None;
    assert!(run(&pixart, &i, 0..16).contains("`encoder_hidden_states`"));
    let mut i = case.input.clone();
    i.added_cond.remove("resolution");
    assert!(run(&pixart, &i, 0..16).contains("`resolution` is missing"));
    let mut i = case.input.clone();
    i.encoder_attention_mask = Some(Tensor::ones([2, 3], &dev));
    assert!(run(&pixart, &i, 0..16).contains("`encoder_attention_mask` has shape [2, 3]"));
    let mut i = case.input.clone();
    i.hidden_states = Tensor::zeros([2, 3, 16, 16], &dev);
    assert!(run(&pixart, &i, 0..16).contains("3 channels"));
    let mut i = case.input.clone();
    i.hidden_states = Tensor::zeros([2, 4, 15, 16], &dev);
    assert!(run(&pixart, &i, 0..14).contains("multiple of 2"));
    let mut i = case.input.clone();
    i.timestep = Tensor::zeros([1], &dev);
    assert!(run(&pixart, &i, 0..16).contains("`timestep` has 1 entries"));
    assert!(run(&pixart, &case.input, 0..7).contains("whole patches"));
    assert!(run(&pixart, &case.input, 8..18).contains("whole patches"));

    let dit = DitModel::<B>::load(fixtures().join("dit"), &LoadPlan::full(), &dev).unwrap();
    let case = read_case(&fixtures().join("dit/cases/square.safetensors"));
    let mut i = case.input.clone();
    i.class_labels = Some(Tensor::<B, 1, Int>::from_ints([3, 11], &dev));
    assert!(run(&dit, &i, 0..16).contains("class label 11 is outside 0..=10"));
    let mut i = case.input.clone();
    i.class_labels = None;
    assert!(run(&dit, &i, 0..16).contains("`class_labels` are required"));
    let mut i = case.input.clone();
    i.hidden_states = Tensor::zeros([2, 4, 16, 24], &dev);
    assert!(run(&dit, &i, 0..16).contains("square latent"));
}

/// MMDiT configs: a key the class does not take, and settings this crate does not compute
/// like diffusers, are refused naming the key (`ModelConfig::from_json`).
#[test]
fn mmdit_configs_refuse_unsupported_keys_naming_them() {
    use models_dit::ModelConfig;
    let sd3 =
        std::fs::read_to_string(crate::common::mmdit_fixtures().join("sd35/config.json")).unwrap();
    let flux =
        std::fs::read_to_string(crate::common::mmdit_fixtures().join("flux-dev/config.json"))
            .unwrap();
    let edit = |text: &str, key: &str, value: serde_json::Value| {
        let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
        v[key] = value;
        v.to_string()
    };
    let cases = [
        (edit(&sd3, "use_pos_embed_v2", serde_json::json!(true)), "use_pos_embed_v2"),
        (edit(&sd3, "qk_norm", serde_json::json!("layer_norm")), "qk_norm"),
        (edit(&sd3, "caption_projection_dim", serde_json::json!(24)), "caption_projection_dim"),
        (edit(&sd3, "dual_attention_layers", serde_json::json!([0, 7])), "dual_attention_layers"),
        (edit(&sd3, "dual_attention_layers", serde_json::json!([1, 1])), "dual_attention_layers"),
        (edit(&flux, "patch_size", serde_json::json!(2)), "patch_size"),
        (edit(&flux, "axes_dims_rope", serde_json::json!([2, 2, 2])), "axes_dims_rope"),
        (edit(&flux, "in_channels", serde_json::json!(18)), "in_channels"),
        (edit(&flux, "joint_attention_kwargs", serde_json::json!({})), "joint_attention_kwargs"),
    ];
    for (text, key) in cases {
        let err = ModelConfig::from_json(&text, "config.json").unwrap_err().to_string();
        assert!(err.contains(key) && err.contains("config.json"), "{key}: {err}");
    }
    // The diffusers bookkeeping keys are not refused.
    ModelConfig::from_json(&edit(&flux, "_name_or_path", serde_json::json!("x")), "c").unwrap();
}

//! WeightStore behaviour: single vs sharded checkpoints, dtype conversion, slice-on-load, and
//! every error a user can meet (each naming the key, file or folder at fault).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::{DType, Tensor};
use burn_flex::Flex;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use weights::{Part, WeightError, WeightStore};

type B = Flex;

const FILE: &str = "diffusion_pytorch_model.safetensors";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/dit")
}

/// A fresh, empty folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("weights-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a safetensors file of `(name, dtype, shape, little-endian bytes)`.
fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 * 0.25 - 3.0).collect()
}

#[test]
fn single_and_sharded_checkpoints_hold_the_same_tensors() {
    let mut single = WeightStore::open(fixtures().join("pixart-alpha"), FILE).unwrap();
    let mut sharded = WeightStore::open(fixtures().join("pixart-alpha-sharded"), FILE).unwrap();
    let keys: Vec<String> = single.keys().map(str::to_string).collect();
    let sharded_keys: Vec<String> = sharded.keys().map(str::to_string).collect();
    assert_eq!(keys, sharded_keys);
    assert!(keys.len() > 50, "{} keys", keys.len());
    let mut files = std::collections::BTreeSet::new();
    for key in &keys {
        let meta = single.meta(key).unwrap();
        files.insert(sharded.meta(key).unwrap().file);
        let a = single.take_f32(key, &meta.shape).unwrap();
        let b = sharded.take_f32(key, &meta.shape).unwrap();
        assert_eq!(a, b, "{key}");
    }
    assert_eq!(files.len(), 4, "the fixture has 4 shards");
    single.finish().unwrap();
    sharded.finish().unwrap();
}

#[test]
fn f16_and_bf16_on_disk_convert_to_the_rounded_f32_values() {
    let mut full = WeightStore::open(fixtures().join("pixart-alpha"), FILE).unwrap();
    let mut f16 = WeightStore::open(fixtures().join("pixart-alpha-f16"), FILE).unwrap();
    let mut bf16 = WeightStore::open(fixtures().join("pixart-alpha-bf16"), FILE).unwrap();
    let keys: Vec<String> = full.keys().map(str::to_string).collect();
    for key in &keys {
        let meta = full.meta(key).unwrap();
        assert_eq!(f16.meta(key).unwrap().dtype, "F16");
        assert_eq!(bf16.meta(key).unwrap().dtype, "BF16");
        let x = full.take_f32(key, &meta.shape).unwrap();
        let h = f16.take_f32(key, &meta.shape).unwrap();
        let b = bf16.take_f32(key, &meta.shape).unwrap();
        // torch's .to(float16/bfloat16) rounds to nearest even, as `half` does: exact equality.
        let want_h: Vec<f32> = x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        let want_b: Vec<f32> = x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        assert_eq!(h, want_h, "{key}");
        assert_eq!(b, want_b, "{key}");
    }
    // And through Burn: a tensor in the default dtype, or cast to a chosen compute dtype.
    let dev = Default::default();
    let mut f16 = WeightStore::open(fixtures().join("pixart-alpha-f16"), FILE).unwrap();
    let key = "proj_out.bias";
    let shape = f16.meta(key).unwrap().shape;
    let t: Tensor<B, 1> = f16.take(key, [shape[0]], &dev).unwrap();
    assert_eq!(t.dtype(), DType::F32);
    let mut f16 = WeightStore::open(fixtures().join("pixart-alpha-f16"), FILE)
        .unwrap()
        .with_dtype(DType::F16);
    let t16: Tensor<B, 1> = f16.take(key, [shape[0]], &dev).unwrap();
    assert_eq!(t16.dtype(), DType::F16);
    assert_eq!(
        t16.cast(DType::F32).into_data().to_vec::<f32>().unwrap(),
        t.into_data().to_vec::<f32>().unwrap()
    );
}

#[test]
fn synthetic_half_values_convert_exactly() {
    let dir = TempDir::new("half");
    let vals = [0.0f32, -1.5, 65504.0, 1e-7, 3.140625];
    let h: Vec<u8> =
        vals.iter().flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes()).collect();
    let b: Vec<u8> =
        vals.iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes()).collect();
    write(&dir.0.join(FILE), &[("h", Dtype::F16, vec![5], h), ("b", Dtype::BF16, vec![5], b)]);
    let mut s = WeightStore::open(&dir.0, FILE).unwrap();
    let h = s.take_f32("h", &[5]).unwrap();
    let b = s.take_f32("b", &[5]).unwrap();
    for (i, &v) in vals.iter().enumerate() {
        assert_eq!(h[i], half::f16::from_f32(v).to_f32());
        assert_eq!(b[i], half::bf16::from_f32(v).to_f32());
    }
    assert_eq!(&h[..3], &[0.0, -1.5, 65504.0]);
}

#[test]
fn a_shard_equals_the_slice_of_the_full_tensor() {
    let dir = TempDir::new("slice");
    let (o, i, k) = (8, 12, 3);
    let w2 = ramp(o * i);
    let w3 = ramp(o * i * k);
    let h16: Vec<u8> =
        w2.iter().flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes()).collect();
    write(
        &dir.0.join(FILE),
        &[
            ("w2", Dtype::F32, vec![o, i], f32_bytes(&w2)),
            ("w3", Dtype::F32, vec![o, i, k], f32_bytes(&w3)),
            ("h2", Dtype::F16, vec![o, i], h16),
        ],
    );
    let dev = Default::default();
    let mut s = WeightStore::open(&dir.0, FILE).unwrap();
    let full2: Tensor<B, 2> = s.take("w2", [o, i], &dev).unwrap();
    let full3: Tensor<B, 3> = s.take("w3", [o, i, k], &dev).unwrap();
    let half2: Tensor<B, 2> = s.take("h2", [o, i], &dev).unwrap();
    for world in [1, 2, 4] {
        for rank in 0..world {
            let shard = Part { index: rank, of: world };
            for dim in 0..2 {
                let len = [o, i][dim] / world;
                let got: Tensor<B, 2> = s.take_sharded("w2", [o, i], dim, shard, &dev).unwrap();
                let want = full2.clone().narrow(dim, rank * len, len);
                assert_eq!(got.into_data(), want.into_data(), "w2 dim {dim} {rank}/{world}");
                let got: Tensor<B, 2> = s.take_sharded("h2", [o, i], dim, shard, &dev).unwrap();
                let want = half2.clone().narrow(dim, rank * len, len);
                assert_eq!(got.into_data(), want.into_data(), "h2 dim {dim} {rank}/{world}");
            }
            for dim in 0..3 {
                if [o, i, k][dim] % world != 0 {
                    continue;
                }
                let len = [o, i, k][dim] / world;
                let got: Tensor<B, 3> = s.take_sharded("w3", [o, i, k], dim, shard, &dev).unwrap();
                let want = full3.clone().narrow(dim, rank * len, len);
                assert_eq!(got.into_data(), want.into_data(), "w3 dim {dim} {rank}/{world}");
            }
        }
    }
    // 3 is not divisible by 2: an error naming the key, the dim and the sizes.
    let err = s.take_sharded_f32("w3", &[o, i, k], 2, Part { index: 0, of: 2 }).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightError::Shard { .. }), "{msg}");
    assert!(msg.contains("`w3`") && msg.contains("3 is not divisible by 2"), "{msg}");
    s.finish().unwrap();
}

fn small_folder(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    write(
        &dir.0.join(FILE),
        &[
            ("a.weight", Dtype::F32, vec![2, 3], f32_bytes(&ramp(6))),
            ("a.bias", Dtype::F32, vec![2], f32_bytes(&ramp(2))),
            ("b.weight", Dtype::F32, vec![4], f32_bytes(&ramp(4))),
            ("ids", Dtype::I64, vec![2], vec![0u8; 16]),
        ],
    );
    dir
}

#[test]
fn a_missing_key_is_named_with_the_folder() {
    let dir = small_folder("missing");
    let mut s = WeightStore::open(&dir.0, FILE).unwrap();
    let err = s.take_f32("c.weight", &[2]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightError::MissingKey { .. }), "{msg}");
    assert!(msg.contains("`c.weight`") && msg.contains(&dir.0.display().to_string()), "{msg}");
}

#[test]
fn unused_keys_are_all_named_and_skipped_keys_are_not() {
    let dir = small_folder("unused");
    let mut s = WeightStore::open(&dir.0, FILE).unwrap();
    s.take_f32("a.weight", &[2, 3]).unwrap();
    s.skip("ids");
    let err = s.finish().unwrap_err();
    let msg = err.to_string();
    match &err {
        WeightError::Unused { keys, .. } => assert_eq!(keys, &["a.bias", "b.weight"]),
        other => panic!("{other}"),
    }
    assert!(msg.contains("2 unused") && msg.contains("a.bias, b.weight"), "{msg}");

    let mut s = WeightStore::open(&dir.0, FILE).unwrap();
    assert_eq!(s.skip_prefix("a."), 2);
    s.skip("ids");
    s.skip("not-there");
    s.take_f32("b.weight", &[4]).unwrap();
    s.finish().unwrap();
}

#[test]
fn a_wrong_shape_names_the_key_and_both_shapes() {
    let dir = small_folder("shape");
    let mut s = WeightStore::open(&dir.0, FILE).unwrap();
    let err = s.take::<B, 2>("a.weight", [3, 2], &Default::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightError::Shape { .. }), "{msg}");
    assert!(
        msg.contains("`a.weight`") && msg.contains("[3, 2]") && msg.contains("[2, 3]"),
        "{msg}"
    );
}

#[test]
fn an_unsupported_dtype_names_the_key_and_dtype() {
    let dir = small_folder("dtype");
    let mut s = WeightStore::open(&dir.0, FILE).unwrap();
    let err = s.take_f32("ids", &[2]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightError::Dtype { .. }), "{msg}");
    assert!(msg.contains("`ids`") && msg.contains("I64"), "{msg}");
}

#[test]
fn a_truncated_file_is_an_error_naming_it() {
    let dir = small_folder("truncated");
    let path = dir.0.join(FILE);
    let bytes = std::fs::read(&path).unwrap();
    for cut in [bytes.len() - 1, bytes.len() / 2, 12, 3, 0] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = WeightStore::open(&dir.0, FILE).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, WeightError::Corrupt { .. }), "cut {cut}: {msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
    // Garbage header.
    std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!").unwrap();
    assert!(matches!(WeightStore::open(&dir.0, FILE), Err(WeightError::Corrupt { .. })));
}

#[test]
fn pickle_only_folders_are_refused() {
    let dir = TempDir::new("pickle");
    std::fs::write(dir.0.join("diffusion_pytorch_model.bin"), b"PK\x03\x04").unwrap();
    std::fs::write(dir.0.join("config.json"), b"{}").unwrap();
    let err = WeightStore::open(&dir.0, FILE).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightError::PickleRefused { .. }), "{msg}");
    assert!(msg.contains("diffusion_pytorch_model.bin") && msg.contains("safetensors"), "{msg}");

    let empty = TempDir::new("empty");
    std::fs::write(empty.0.join("config.json"), b"{}").unwrap();
    let err = WeightStore::open(&empty.0, FILE).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightError::NotFound { .. }), "{msg}");
    assert!(msg.contains(FILE) && msg.contains("config.json"), "{msg}");
}

#[test]
fn bad_shard_indexes_are_errors() {
    let dir = TempDir::new("index");
    let shard = "model-00001-of-00001.safetensors";
    write(&dir.0.join(shard), &[("x", Dtype::F32, vec![2], f32_bytes(&ramp(2)))]);
    let index = dir.0.join(format!("{FILE}.index.json"));
    let cases: HashMap<&str, String> = HashMap::from([
        ("not json", "{".to_string()),
        ("weight_map", "{\"metadata\": {}}".to_string()),
        (
            "missing",
            format!("{{\"weight_map\": {{\"x\": \"{shard}\", \"y\": \"gone.safetensors\"}}}}"),
        ),
        ("wrong file", format!("{{\"weight_map\": {{\"x\": \"{shard}\", \"z\": \"{shard}\"}}}}")),
    ]);
    for (what, text) in cases {
        std::fs::write(&index, text).unwrap();
        let err = WeightStore::open(&dir.0, FILE).unwrap_err();
        assert!(matches!(err, WeightError::Index { .. }), "{what}: {err}");
    }
    std::fs::write(&index, format!("{{\"weight_map\": {{\"x\": \"{shard}\"}}}}")).unwrap();
    let mut s = WeightStore::open(&dir.0, FILE).unwrap();
    assert_eq!(s.take_f32("x", &[2]).unwrap(), ramp(2));
    s.finish().unwrap();
}

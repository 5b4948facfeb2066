//! [`WeightStore`]: the tensors of one checkpoint (one file or a sharded set), handed out by
//! key with shape checks, dtype conversion, slice-on-load, and key accounting.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use crate::error::{Result, WeightError};
use crate::file::{Entry, MappedFile};

/// One of `of` equal parts of a tensor dim: what a tensor-parallel rank loads of a split
/// weight (part `index` = its rank, `of` = the world size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// Which part, `0..of`.
    pub index: usize,
    /// How many equal parts the dim is cut into.
    pub of: usize,
}

impl Part {
    /// The index range of this part of a dim of `len` (which must divide evenly).
    pub fn range(&self, len: usize) -> std::ops::Range<usize> {
        let size = len / self.of;
        self.index * size..(self.index + 1) * size
    }
}

/// The shape, dtype and file of one stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    /// The stored shape.
    pub shape: Vec<usize>,
    /// The stored dtype, as safetensors names it (`F32`, `F16`, `BF16`, …).
    pub dtype: String,
    /// The file holding it.
    pub file: PathBuf,
}

/// The tensors of a safetensors checkpoint, taken one by one by a model loader.
///
/// Every key is accounted for: [`take`](Self::take) / [`take_sharded`](Self::take_sharded)
/// mark a key as used, [`skip`](Self::skip) marks a key the loader deliberately leaves out
/// (a transformer block another pipeline stage holds), and [`finish`](Self::finish) fails
/// naming every key that was neither. Taking an absent key fails naming it and the location.
///
/// Tensors come out in the compute dtype: the device's default float dtype, or the one set
/// with [`with_dtype`](Self::with_dtype); `F32`, `F16` and `BF16` on disk are converted
/// (exactly: every f16/bf16 value is an f32 value).
///
/// Files are memory-mapped and only the header is parsed at open, so taking one rank's slice
/// of a tensor reads only that slice's bytes.
#[derive(Debug)]
pub struct WeightStore {
    location: PathBuf,
    files: Vec<MappedFile>,
    /// key → index into `files`.
    keys: BTreeMap<String, usize>,
    taken: BTreeSet<String>,
    skipped: BTreeSet<String>,
    dtype: Option<DType>,
}

/// File extensions of pickle checkpoints, refused.
const PICKLE_EXTENSIONS: [&str; 4] = ["bin", "pt", "pth", "ckpt"];

impl WeightStore {
    /// Opens the weights of a diffusers/transformers model folder: `folder/file_name` (e.g.
    /// `diffusion_pytorch_model.safetensors`) if present, else the sharded set listed by
    /// `folder/{file_name}.index.json`.
    ///
    /// # Errors
    /// [`WeightError::PickleRefused`] when the folder has only pickle checkpoints (`.bin`,
    /// `.pt`, `.pth`, `.ckpt`); [`WeightError::NotFound`] when it has no weights at all;
    /// [`WeightError::Corrupt`] for a truncated or malformed file; [`WeightError::Index`] for a
    /// bad index file.
    pub fn open(folder: impl AsRef<Path>, file_name: &str) -> Result<Self> {
        let folder = folder.as_ref();
        let single = folder.join(file_name);
        if single.is_file() {
            let mut store = Self::open_file(&single)?;
            store.location = folder.to_path_buf();
            return Ok(store);
        }
        let index = folder.join(format!("{file_name}.index.json"));
        if index.is_file() {
            return Self::open_index(&index);
        }
        let listing: Vec<String> = std::fs::read_dir(folder)
            .map_err(|source| WeightError::Io { path: folder.to_path_buf(), source })?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        let mut pickles: Vec<String> = listing
            .iter()
            .filter(|n| {
                Path::new(n)
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| PICKLE_EXTENSIONS.contains(&e))
            })
            .cloned()
            .collect();
        if !pickles.is_empty() {
            pickles.sort();
            return Err(WeightError::PickleRefused {
                folder: folder.to_path_buf(),
                files: pickles,
            });
        }
        let mut found = listing;
        found.sort();
        found.truncate(8);
        Err(WeightError::NotFound {
            folder: folder.to_path_buf(),
            file_name: file_name.to_string(),
            found,
        })
    }

    /// Opens one safetensors file.
    pub fn open_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = MappedFile::open(path)?;
        let keys = file.entries.keys().map(|k| (k.clone(), 0)).collect();
        Ok(WeightStore {
            location: path.to_path_buf(),
            files: vec![file],
            keys,
            taken: BTreeSet::new(),
            skipped: BTreeSet::new(),
            dtype: None,
        })
    }

    /// Opens the shards listed in a `*.safetensors.index.json` (`{"weight_map": {key: file}}`).
    /// Every key of every shard is indexed; a key the index maps to a file that does not hold
    /// it is an error.
    pub fn open_index(index: impl AsRef<Path>) -> Result<Self> {
        let index = index.as_ref();
        let bad = |reason: String| WeightError::Index { path: index.to_path_buf(), reason };
        let text = std::fs::read_to_string(index)
            .map_err(|source| WeightError::Io { path: index.to_path_buf(), source })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no `weight_map` object".into()))?;
        let folder = index.parent().unwrap_or(Path::new("."));
        let mut weight_map = BTreeMap::new();
        for (key, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("`weight_map.{key}` is not a file name")))?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(bad(format!("`weight_map.{key}` = `{file}` is not a plain file name")));
            }
            weight_map.insert(key.clone(), file.to_string());
        }
        let names: BTreeSet<&String> = weight_map.values().collect();
        let mut files = Vec::with_capacity(names.len());
        let mut keys = BTreeMap::new();
        for name in names {
            let path = folder.join(name);
            if !path.is_file() {
                return Err(bad(format!(
                    "shard `{name}` is listed but {} is missing",
                    path.display()
                )));
            }
            let file = MappedFile::open(&path)?;
            for key in file.entries.keys() {
                if let Some(&other) = keys.get(key) {
                    let first: &MappedFile = &files[other];
                    return Err(WeightError::DuplicateKey {
                        key: key.clone(),
                        first: first.path.clone(),
                        second: path.clone(),
                    });
                }
                keys.insert(key.clone(), files.len());
            }
            files.push(file);
        }
        for (key, name) in &weight_map {
            let holder = keys.get(key).map(|&i| &files[i].path);
            if holder.is_none_or(|p| p.file_name().and_then(|n| n.to_str()) != Some(name)) {
                return Err(bad(format!("`{key}` is mapped to `{name}`, which does not hold it")));
            }
        }
        Ok(WeightStore {
            location: folder.to_path_buf(),
            files,
            keys,
            taken: BTreeSet::new(),
            skipped: BTreeSet::new(),
            dtype: None,
        })
    }

    /// Sets the compute dtype of the tensors handed out (default: the device's float dtype).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// The file or folder opened (for messages).
    pub fn location(&self) -> &Path {
        &self.location
    }

    /// All stored keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Whether `key` is stored.
    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// Shape, dtype and file of a stored tensor.
    pub fn meta(&self, key: &str) -> Result<TensorMeta> {
        let (file, entry) = self.entry(key)?;
        Ok(TensorMeta {
            shape: entry.shape.clone(),
            dtype: format!("{:?}", entry.dtype),
            file: file.path.clone(),
        })
    }

    fn entry(&self, key: &str) -> Result<(&MappedFile, &Entry)> {
        let missing =
            || WeightError::MissingKey { key: key.to_string(), location: self.location.clone() };
        let &i = self.keys.get(key).ok_or_else(missing)?;
        let file = &self.files[i];
        let entry = file.entries.get(key).ok_or_else(missing)?;
        Ok((file, entry))
    }

    /// The whole tensor `key` as `f32` values, after checking its stored shape is `shape`.
    /// Marks the key as taken.
    pub fn take_f32(&mut self, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (file, entry) = self.checked(key, shape)?;
        let values = file.read_f32(key, entry, None)?;
        self.taken.insert(key.to_string());
        Ok(values)
    }

    /// Part `part.index` of `part.of` equal parts of dim `dim` of tensor `key` (whose full
    /// stored shape must be `shape`) as `f32` values, reading only that part. Marks the key as
    /// taken.
    pub fn take_sharded_f32(
        &mut self,
        key: &str,
        shape: &[usize],
        dim: usize,
        part: Part,
    ) -> Result<Vec<f32>> {
        let (file, entry) = self.checked(key, shape)?;
        let err = |reason: String| WeightError::Shard {
            key: key.to_string(),
            shape: shape.to_vec(),
            dim,
            rank: part.index,
            world: part.of,
            reason,
        };
        let len =
            *shape.get(dim).ok_or_else(|| err(format!("the tensor has {} dims", shape.len())))?;
        if part.of == 0 || part.index >= part.of {
            return Err(err(
                "the part must be below the number of parts (and that positive)".into()
            ));
        }
        if len % part.of != 0 {
            return Err(err(format!("{len} is not divisible by {}", part.of)));
        }
        let values = file.read_f32(key, entry, Some((dim, part.range(len))))?;
        self.taken.insert(key.to_string());
        Ok(values)
    }

    fn checked(&self, key: &str, shape: &[usize]) -> Result<(&MappedFile, &Entry)> {
        let (file, entry) = self.entry(key)?;
        if entry.shape != shape {
            return Err(WeightError::Shape {
                key: key.to_string(),
                file: file.path.clone(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        Ok((file, entry))
    }

    /// Tensor `key`, whose stored shape must be `shape`, in the compute dtype on `device`.
    ///
    /// # Errors
    /// [`WeightError::MissingKey`], [`WeightError::Shape`] (naming both shapes),
    /// [`WeightError::Dtype`] for a non-float dtype on disk.
    pub fn take<B: Backend, const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        let values = self.take_f32(key, &shape)?;
        Ok(self.tensor(values, shape, device))
    }

    /// Part `part.index` of tensor `key` split in `part.of` equal parts along `dim`
    /// (`shape` is the full stored shape), in the compute dtype on `device`. Only the part's
    /// bytes are read and converted.
    ///
    /// # Errors
    /// As [`take`](Self::take), and [`WeightError::Shard`] when `dim` does not split evenly.
    pub fn take_sharded<B: Backend, const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        dim: usize,
        part: Part,
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        let values = self.take_sharded_f32(key, &shape, dim, part)?;
        let mut local = shape;
        local[dim] /= part.of;
        Ok(self.tensor(values, local, device))
    }

    /// Indices `range` of dim `dim` of tensor `key` (`shape` is the full stored shape), in
    /// the compute dtype on `device`; only those bytes are read. A packed row-parallel
    /// weight (Flux's single-block `proj_out`, whose input is attention then MLP features)
    /// takes one range of each block.
    ///
    /// # Errors
    /// As [`take`](Self::take), and [`WeightError::Shard`] when `range` leaves the dim.
    pub fn take_range<B: Backend, const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        dim: usize,
        range: std::ops::Range<usize>,
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        let (file, entry) = self.checked(key, &shape)?;
        if dim >= D || range.start > range.end || range.end > shape[dim] {
            return Err(WeightError::Shard {
                key: key.to_string(),
                shape: shape.to_vec(),
                dim,
                rank: range.start,
                world: range.end,
                reason: format!("indices {range:?} are not within dim {dim} of {shape:?}"),
            });
        }
        let values = file.read_f32(key, entry, Some((dim, range.clone())))?;
        self.taken.insert(key.to_string());
        let mut local = shape;
        local[dim] = range.len();
        Ok(self.tensor(values, local, device))
    }

    fn tensor<B: Backend, const D: usize>(
        &self,
        values: Vec<f32>,
        shape: [usize; D],
        device: &B::Device,
    ) -> Tensor<B, D> {
        let data = TensorData::new(values, shape);
        match self.dtype {
            Some(dtype) => Tensor::from_data(data, (device, dtype)),
            None => Tensor::from_data(data, device),
        }
    }

    /// Marks `key` as deliberately not loaded (it does not count as unused). Skipping an
    /// absent key is not an error: a loader skips what its plan leaves out by name.
    pub fn skip(&mut self, key: &str) {
        if self.keys.contains_key(key) {
            self.skipped.insert(key.to_string());
        }
    }

    /// Marks every stored key starting with `prefix` as deliberately not loaded; returns how
    /// many.
    pub fn skip_prefix(&mut self, prefix: &str) -> usize {
        let keys: Vec<String> =
            self.keys.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
        let n = keys.len();
        self.skipped.extend(keys);
        n
    }

    /// Keys taken so far, sorted.
    pub fn taken(&self) -> impl Iterator<Item = &str> {
        self.taken.iter().map(String::as_str)
    }

    /// Stored keys neither taken nor skipped, sorted.
    pub fn unused(&self) -> Vec<String> {
        self.keys
            .keys()
            .filter(|k| !self.taken.contains(*k) && !self.skipped.contains(*k))
            .cloned()
            .collect()
    }

    /// Ends loading: fails with [`WeightError::Unused`] naming every stored key that was
    /// neither taken nor skipped.
    pub fn finish(self) -> Result<()> {
        let keys = self.unused();
        if keys.is_empty() {
            Ok(())
        } else {
            Err(WeightError::Unused { keys, location: self.location })
        }
    }
}

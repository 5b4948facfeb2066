//! One memory-mapped safetensors file: its parsed header and element conversion of (a slice
//! of) one tensor to `f32`, reading only the bytes of that slice.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Result, WeightError};

/// Header entry of one tensor of a file.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the file's data section.
    pub offsets: (usize, usize),
}

/// A safetensors file, mapped read-only. Only the header is parsed at open; tensor bytes
/// are read (paged in by the OS) when a tensor or a slice of it is converted.
pub(crate) struct MappedFile {
    pub path: PathBuf,
    mmap: Mmap,
    /// Start of the data section (8 + header length).
    data_start: usize,
    pub entries: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("path", &self.path)
            .field("tensors", &self.entries.len())
            .finish_non_exhaustive()
    }
}

/// Maps `file` read-only.
///
/// One of the crate's two `unsafe` calls: a memory map is undefined behaviour if another process
/// truncates or rewrites the file while it is mapped. Checkpoint files are not modified while
/// a model loads (the same assumption `safetensors`, `candle` and `burn-store` make); the
/// header is validated against the file length before any tensor byte is read, so a file that
/// is truncated *before* opening is an error, not a fault.
#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: read-only mapping of a file we do not modify; see the function docs.
    unsafe { Mmap::map(file) }
}

/// Drops the pages of `len` bytes at `offset` of `mmap` from this process's resident set
/// (`MADV_DONTNEED`): the file's pages stay in the page cache, and a later read of the range
/// faults them in again with the same bytes.
///
/// Without it every byte read while loading stayed mapped into the process until the file was
/// closed, so a loaded model peaked at its converted tensors *plus* its whole file (PixArt-XL:
/// 4.67 GB against PyTorch's 3.30 GB).
#[cfg(unix)]
#[allow(unsafe_code)]
fn release_pages(mmap: &Mmap, offset: usize, len: usize) {
    // SAFETY: the mapping is private and read-only, so dropping its pages discards no data:
    // any later read of the range (this thread's or another's, including the neighbouring
    // tensors on the range's first and last page) reads the file's unchanged bytes again. No
    // slice of the range is used after this call by this crate's caller. A failure only
    // means the pages stay resident, so it is ignored.
    let _ = unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
}

#[cfg(not(unix))]
fn release_pages(_mmap: &Mmap, _offset: usize, _len: usize) {}

impl MappedFile {
    /// Drops the pages of a range that has been converted (see [`release_pages`]).
    fn release(&self, offset: usize, len: usize) {
        release_pages(&self.mmap, offset, len);
    }

    /// Opens, maps and validates the header of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| WeightError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let mmap = map_file(&file).map_err(io)?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            WeightError::Corrupt { path: path.to_path_buf(), reason: e.to_string() }
        })?;
        let entries = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let entry = Entry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    offsets: info.data_offsets,
                };
                (name, entry)
            })
            .collect();
        Ok(MappedFile { path: path.to_path_buf(), mmap, data_start: 8 + header_len, entries })
    }

    /// The elements of `key` restricted to `range` along `dim` (the whole tensor when
    /// `slice` is `None`), converted to `f32`, in row-major order of the sliced shape.
    ///
    /// Reads only the bytes of the slice: for a split of dim `d` the tensor is
    /// `outer = Π shape[..d]` runs of `range.len() · inner` contiguous elements.
    pub fn read_f32(
        &self,
        key: &str,
        entry: &Entry,
        slice: Option<(usize, Range<usize>)>,
    ) -> Result<Vec<f32>> {
        let elem = match entry.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(WeightError::Dtype {
                    key: key.to_string(),
                    file: self.path.clone(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        let bytes = self
            .mmap
            .get(self.data_start + entry.offsets.0..self.data_start + entry.offsets.1)
            .ok_or_else(|| WeightError::Corrupt {
                path: self.path.clone(),
                reason: format!("data of `{key}` lies past the end of the file"),
            })?;
        let shape = &entry.shape;
        let (dim, range) = slice.unwrap_or((0, 0..shape.first().copied().unwrap_or(1)));
        let outer: usize = shape[..dim].iter().product();
        let len_dim = shape.get(dim).copied().unwrap_or(1);
        let inner: usize = shape.get(dim + 1..).map_or(1, |s| s.iter().product());
        let mut out = Vec::with_capacity(outer * range.len() * inner);
        for o in 0..outer {
            let start = (o * len_dim + range.start) * inner * elem;
            let end = (o * len_dim + range.end) * inner * elem;
            convert(entry.dtype, &bytes[start..end], &mut out);
        }
        self.release(self.data_start + entry.offsets.0, entry.offsets.1 - entry.offsets.0);
        Ok(out)
    }
}

/// Appends the little-endian elements of `bytes` (of a supported float dtype) as `f32`.
fn convert(dtype: Dtype, bytes: &[u8], out: &mut Vec<f32>) {
    match dtype {
        Dtype::F32 => {
            out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        }
        Dtype::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
        ),
        Dtype::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
        ),
        _ => unreachable!("dtype checked by the caller"),
    }
}

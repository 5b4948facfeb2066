//! Image folders as pytorch-fid reads them: the files with its extensions, sorted by path,
//! decoded to 8-bit RGB.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

use crate::frechet::Stats;
use crate::inception::{FEATURES, FidInception};
use crate::{QualityError, Result};

/// pytorch-fid's image extensions (lower case). PNG and JPEG are decoded; a file with another
/// of these extensions is an error naming it.
pub const IMAGE_EXTENSIONS: [&str; 9] =
    ["bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"];

/// The image files of `dir` (not recursive), sorted.
///
/// # Errors
/// A folder that cannot be read or holds no image.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let bad = |reason: String| QualityError::Image { path: dir.to_path_buf(), reason };
    let entries =
        std::fs::read_dir(dir).map_err(|e| bad(format!("cannot read the folder: {e}")))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(bad(format!("no image files ({})", IMAGE_EXTENSIONS.join(", "))));
    }
    Ok(files)
}

/// An image decoded to 8-bit RGB: `H × W × 3` bytes and `(H, W)`.
///
/// # Errors
/// A file that cannot be read or decoded, naming it.
pub fn load_rgb8(path: &Path) -> Result<(Vec<u8>, (usize, usize))> {
    let img = image::open(path).map_err(|e| QualityError::Image {
        path: path.to_path_buf(),
        reason: format!("cannot decode the image: {e}"),
    })?;
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    Ok((rgb.into_raw(), (h as usize, w as usize)))
}

/// Inception features of `files` (`n × 2048`, in file order) and their statistics, in
/// batches of up to `batch` images of one size; `progress(done, total)` after each batch.
///
/// # Errors
/// An image that cannot be decoded; fewer than two images.
pub fn stats_of_files<B: Backend>(
    net: &FidInception<B>,
    files: &[PathBuf],
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<f32>, Stats)> {
    let batch = batch.max(1);
    let mut features = Vec::with_capacity(files.len() * FEATURES);
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut size = (0, 0);
    let flush = |pending: &mut Vec<Vec<u8>>, size, features: &mut Vec<f32>| -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let refs: Vec<&[u8]> = pending.iter().map(Vec::as_slice).collect();
        features.extend(net.features_rgb8(&refs, size)?);
        pending.clear();
        Ok(())
    };
    for (i, path) in files.iter().enumerate() {
        let (pixels, dims) = load_rgb8(path)?;
        if dims != size || pending.len() == batch {
            flush(&mut pending, size, &mut features)?;
            progress(i, files.len());
            size = dims;
        }
        pending.push(pixels);
    }
    flush(&mut pending, size, &mut features)?;
    progress(files.len(), files.len());
    let stats = Stats::from_features(&features, FEATURES)?;
    Ok((features, stats))
}

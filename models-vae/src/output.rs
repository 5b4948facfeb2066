//! From decoded samples to pixels and PNG files, as diffusers' `VaeImageProcessor.postprocess`
//! and `numpy_to_pil` do it.

use std::path::Path;

use burn::prelude::*;
use image::RgbImage;

use crate::VaeError;

/// Maps one decoded value to a pixel exactly as diffusers does in float32:
/// `(x * 0.5 + 0.5).clamp(0, 1)` (`_denormalize`), then `(v * 255).round().astype("uint8")`
/// (`numpy_to_pil`), where NumPy rounds halves to even. NaN maps to 0 (`clamp` keeps NaN, and
/// NumPy's cast of NaN to uint8 is undefined; 0 is what it gives on x86).
pub fn denormalize_to_u8(x: f32) -> u8 {
    unit_to_u8(denormalize(x))
}

/// `(v * 255).round()` with NumPy's rounding (halves to even), cast to `u8`. `v` is in [0, 1]
/// (or NaN, which casts to 0), so the cast cannot saturate.
fn unit_to_u8(v: f32) -> u8 {
    (v * 255.0).round_ties_even() as u8
}

/// Maps one decoded value to diffusers' `output_type="pt"` value: `(x * 0.5 + 0.5).clamp(0, 1)`.
pub fn denormalize(x: f32) -> f32 {
    (x * 0.5 + 0.5).clamp(0.0, 1.0)
}

/// Turns decoded samples into RGB images, one per batch entry, with diffusers'
/// post-processing ([`denormalize_to_u8`]).
///
/// # Shapes
/// - `sample`: `[batch, 3, height, width]`, the raw output of
///   [`decode`](crate::AutoencoderKL::decode) (about [−1, 1])
///
/// # Errors
/// [`VaeError::Shape`] when the sample does not have 3 channels or is empty.
pub fn to_images<B: Backend>(sample: Tensor<B, 4>) -> Result<Vec<RgbImage>, VaeError> {
    let dims = sample.dims();
    let [batch, channels, height, width] = dims;
    if channels != 3 || dims.contains(&0) {
        return Err(VaeError::Shape {
            what: "to_images: sample",
            expected: "[batch, 3, height, width] (non-empty)".into(),
            got: dims.to_vec(),
        });
    }
    // Channels last, on the device, so the host loop below is a plain map.
    let data = sample.permute([0, 2, 3, 1]).into_data().convert::<f32>();
    let values = data.as_slice::<f32>().map_err(|e| VaeError::Shape {
        what: "to_images: sample data",
        expected: format!("float32 data ({e:?})"),
        got: dims.to_vec(),
    })?;
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(VaeError::NonFinite { value: values[index], index });
    }
    let per_image = height * width * 3;
    Ok((0..batch)
        .map(|b| {
            let pixels = values[b * per_image..(b + 1) * per_image]
                .iter()
                .map(|&x| denormalize_to_u8(x))
                .collect();
            RgbImage::from_raw(width as u32, height as u32, pixels)
                .expect("buffer length is height·width·3 by construction")
        })
        .collect())
}

/// Turns one decoded sample into an RGB image ([`to_images`] for a batch of one).
///
/// # Shapes
/// - `sample`: `[1, 3, height, width]`
///
/// # Errors
/// [`VaeError::Shape`] when the shape is not `[1, 3, height, width]`.
pub fn to_image<B: Backend>(sample: Tensor<B, 4>) -> Result<RgbImage, VaeError> {
    let dims = sample.dims();
    if dims[0] != 1 {
        return Err(VaeError::Shape {
            what: "to_image: sample",
            expected: "[1, 3, height, width]".into(),
            got: dims.to_vec(),
        });
    }
    Ok(to_images(sample)?.remove(0))
}

/// Writes an image as PNG to `path` (the format is PNG whatever the extension).
///
/// # Errors
/// [`VaeError::WriteImage`], naming the file, when it cannot be created or written.
pub fn save_png(image: &RgbImage, path: impl AsRef<Path>) -> Result<(), VaeError> {
    let path = path.as_ref();
    image
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|source| VaeError::WriteImage { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denormalize_matches_numpy_rounding() {
        assert_eq!(denormalize_to_u8(-1.0), 0);
        assert_eq!(denormalize_to_u8(-7.0), 0);
        assert_eq!(denormalize_to_u8(1.0), 255);
        assert_eq!(denormalize_to_u8(3.0), 255);
        assert_eq!(denormalize_to_u8(0.0), 128); // 127.5 rounds to even: 128
        assert_eq!(denormalize_to_u8(f32::NAN), 0);
    }

    #[test]
    fn halves_round_to_even_like_numpy() {
        // Find float32 values whose product with 255 rounds to exactly n + 0.5.
        for (half, want) in [(2.5f32, 2u8), (3.5, 4), (100.5, 100), (101.5, 102)] {
            let mut v = half / 255.0;
            while v * 255.0 < half {
                v = v.next_up();
            }
            while v * 255.0 > half {
                v = v.next_down();
            }
            assert_eq!(v * 255.0, half);
            assert_eq!(unit_to_u8(v), want, "{half}");
        }
    }
}

//! PSNR and SSIM of 8-bit images, as scikit-image computes them
//! (`skimage.metrics.peak_signal_noise_ratio` and `structural_similarity` with
//! `gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255` — the
//! settings of Wang et al. 2004 that torchmetrics also uses).
//!
//! SSIM per channel: the local means, variances and covariance come from a Gaussian filter
//! (σ = 1.5, radius `int(3.5·σ + 0.5)` = 5, so an 11-tap window; separable, rows then
//! columns, edges mirrored as scipy's `reflect` mode: `d c b a | a b c d`), then
//! `S = (2μxμy + C1)(2σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))` with
//! `C1 = (0.01·255)²`, `C2 = (0.03·255)²`; the mean of `S` over the image less 5 pixels at
//! every edge; the mean over channels. Everything in `f64`.

/// The layout of an interleaved 8-bit image: `height × width × channels` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageDims {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// Interleaved channels (3 for RGB).
    pub channels: usize,
}

impl ImageDims {
    /// An RGB image of `height × width`.
    pub fn rgb(height: usize, width: usize) -> Self {
        ImageDims { height, width, channels: 3 }
    }

    fn len(&self) -> usize {
        self.height * self.width * self.channels
    }
}

/// Gaussian σ of the SSIM window.
pub const SSIM_SIGMA: f64 = 1.5;
/// Radius of the SSIM window (`int(3.5 · σ + 0.5)`, scipy's truncation).
pub const SSIM_RADIUS: usize = 5;

/// PSNR in dB of an 8-bit `image` against `reference` (peak 255; infinite when equal).
///
/// # Panics
/// If the lengths differ (a bug of the caller).
pub fn psnr_u8(reference: &[u8], image: &[u8]) -> f64 {
    assert_eq!(reference.len(), image.len(), "psnr_u8: images of different sizes");
    let sq: f64 = reference
        .iter()
        .zip(image)
        .map(|(&a, &b)| {
            let d = f64::from(a) - f64::from(b);
            d * d
        })
        .sum();
    let mse = sq / reference.len().max(1) as f64;
    if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0 * 255.0 / mse).log10() }
}

/// Mean SSIM of an 8-bit `image` against `reference` (see the [module docs](self)).
///
/// # Errors
/// Byte counts that do not match `dims`, or an image smaller than the 11 × 11 window
/// (scikit-image refuses those too).
pub fn ssim_u8(reference: &[u8], image: &[u8], dims: ImageDims) -> Result<f64, String> {
    let ImageDims { height: h, width: w, channels: c } = dims;
    for (name, v) in [("reference", reference), ("image", image)] {
        if v.len() != dims.len() {
            return Err(format!("{name} has {} bytes, not {h}×{w}×{c}", v.len()));
        }
    }
    let win = 2 * SSIM_RADIUS + 1;
    if h < win || w < win || c == 0 {
        return Err(format!("{h}×{w} is smaller than the {win}×{win} SSIM window"));
    }
    let kernel = gaussian_kernel();
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let mut total = 0.0;
    for ch in 0..c {
        let plane = |v: &[u8]| -> Vec<f64> {
            v.iter().skip(ch).step_by(c).map(|&x| f64::from(x)).collect()
        };
        let (x, y) = (plane(reference), plane(image));
        let xx: Vec<f64> = x.iter().map(|a| a * a).collect();
        let yy: Vec<f64> = y.iter().map(|a| a * a).collect();
        let xy: Vec<f64> = x.iter().zip(&y).map(|(a, b)| a * b).collect();
        let f = |v: &[f64]| filter(v, h, w, &kernel);
        let (ux, uy, uxx, uyy, uxy) = (f(&x), f(&y), f(&xx), f(&yy), f(&xy));
        let (mut sum, mut n) = (0.0, 0usize);
        for i in SSIM_RADIUS..h - SSIM_RADIUS {
            for j in SSIM_RADIUS..w - SSIM_RADIUS {
                let k = i * w + j;
                let (mx, my) = (ux[k], uy[k]);
                let (vx, vy, vxy) = (uxx[k] - mx * mx, uyy[k] - my * my, uxy[k] - mx * my);
                let s = ((2.0 * mx * my + c1) * (2.0 * vxy + c2))
                    / ((mx * mx + my * my + c1) * (vx + vy + c2));
                sum += s;
                n += 1;
            }
        }
        total += sum / n as f64;
    }
    Ok(total / c as f64)
}

/// scipy's `_gaussian_kernel1d(σ, 0, radius)`: `exp(−x²/(2σ²))` normalised to sum 1.
fn gaussian_kernel() -> Vec<f64> {
    let r = SSIM_RADIUS as f64;
    let k: Vec<f64> = (0..=2 * SSIM_RADIUS)
        .map(|i| {
            let x = i as f64 - r;
            (-0.5 / (SSIM_SIGMA * SSIM_SIGMA) * x * x).exp()
        })
        .collect();
    let s: f64 = k.iter().sum();
    k.into_iter().map(|v| v / s).collect()
}

/// scipy's `reflect` index: `d c b a | a b c d | d c b a`.
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    let mut i = i;
    // One mirror suffices for the 5-pixel radius on images of ≥ 11 pixels; loop for safety.
    loop {
        if i < 0 {
            i = -i - 1;
        } else if i >= n {
            i = 2 * n - i - 1;
        } else {
            return i as usize;
        }
    }
}

/// The separable Gaussian filter of an `h × w` plane: along rows' index (axis 0), then
/// columns (axis 1), as `scipy.ndimage.gaussian_filter`.
fn filter(v: &[f64], h: usize, w: usize, kernel: &[f64]) -> Vec<f64> {
    let r = SSIM_RADIUS as isize;
    let mut tmp = vec![0.0; h * w];
    for i in 0..h {
        for j in 0..w {
            tmp[i * w + j] = kernel
                .iter()
                .enumerate()
                .map(|(t, k)| k * v[reflect(i as isize + t as isize - r, h) * w + j])
                .sum();
        }
    }
    let mut out = vec![0.0; h * w];
    for i in 0..h {
        for j in 0..w {
            out[i * w + j] = kernel
                .iter()
                .enumerate()
                .map(|(t, k)| k * tmp[i * w + reflect(j as isize + t as isize - r, w)])
                .sum();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psnr_of_a_known_error() {
        // Every value off by 5: mse 25.
        let a = [10u8, 20, 30, 40];
        let b = [15u8, 25, 35, 45];
        assert!((psnr_u8(&a, &b) - 10.0 * (65025.0f64 / 25.0).log10()).abs() < 1e-12);
        assert_eq!(psnr_u8(&a, &a), f64::INFINITY);
    }

    #[test]
    fn ssim_is_one_for_equal_images_and_refuses_small_ones() {
        let dims = ImageDims::rgb(12, 13);
        let img: Vec<u8> = (0..dims.len()).map(|i| (i * 37 % 256) as u8).collect();
        assert!((ssim_u8(&img, &img, dims).unwrap() - 1.0).abs() < 1e-12);
        let e = ssim_u8(&img[..30], &img[..30], ImageDims::rgb(2, 5)).unwrap_err();
        assert!(e.contains("smaller than the 11×11"), "{e}");
        assert!(ssim_u8(&img, &img[1..], dims).unwrap_err().contains("image has"));
    }

    #[test]
    fn the_window_is_scipys() {
        let k = gaussian_kernel();
        assert_eq!(k.len(), 11);
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        assert!((k[5] / k[4] - (0.5f64 / 2.25).exp()).abs() < 1e-12);
        assert_eq!([reflect(-1, 5), reflect(-3, 5), reflect(5, 5), reflect(7, 5)], [0, 2, 4, 2]);
    }
}

//! The demo pipeline's agreement measure: does an image show the coloured shape its caption
//! names? The same measure as `tools/demo_model/train.py`'s `agreement`, which trained the
//! pipeline of `fixtures/pipeline/shapes-demo` on images of one shape (circle, square,
//! triangle, diamond, of equal areas) in one of six colours on white.
//!
//! The shape's pixels are those whose darkest channel is below half (`1 − min(r,g,b) > 0.5`);
//! their mean colour's nearest palette entry is the colour; templates of every shape with the
//! pixels' centroid and area (2 × 2 samples per pixel, covered when at least half are inside)
//! are compared by IoU, and the best one is the shape. A caption agrees when colour and shape
//! are the named ones and the IoU reaches the threshold the training script saved
//! (`check.json`'s `iou_min`).

/// The palette (sRGB), as the training script draws it.
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [215, 35, 35]),
    ("green", [35, 155, 50]),
    ("blue", [35, 70, 215]),
    ("yellow", [235, 200, 25]),
    ("purple", [135, 45, 165]),
    ("orange", [240, 125, 25]),
];

/// The shapes, as the training script draws them.
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "diamond"];

/// The IoU an image must reach to agree: the training script's threshold (`IOU_MIN` of
/// `tools/demo_model/train.py`, saved as `iou_min` in the demo reference's `check.json`).
pub const IOU_MIN: f64 = 0.75;

/// The colour and shape a caption of the demo's form names (`"a red circle"`, `"an orange
/// square"`: article, palette colour, shape; case and surrounding spaces ignored), or `None`.
pub fn parse_caption(caption: &str) -> Option<(&'static str, &'static str)> {
    let lower = caption.trim().to_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    let [article, colour, shape] = words.as_slice() else { return None };
    if !matches!(*article, "a" | "an") {
        return None;
    }
    let colour = COLOURS.iter().find(|(c, _)| c == colour)?.0;
    let shape = SHAPES.iter().find(|s| *s == shape)?;
    Some((colour, shape))
}

/// What an image shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Agreement {
    /// The nearest palette colour of the shape's pixels (`None`: fewer than 20 such pixels).
    pub colour: Option<&'static str>,
    /// The best-matching shape template.
    pub shape: Option<&'static str>,
    /// Its IoU with the shape's pixels.
    pub iou: f64,
    /// The shape's pixels.
    pub area: usize,
}

impl Agreement {
    /// Whether this is `colour` `shape` with an IoU of at least `iou_min`.
    pub fn agrees(&self, colour: &str, shape: &str, iou_min: f64) -> bool {
        self.colour == Some(colour) && self.shape == Some(shape) && self.iou >= iou_min
    }
}

/// Whether the point `(dx, dy)` from the centroid is inside `shape` of equal-area radius `r`.
fn inside(shape: &str, dx: f64, dy: f64, r: f64) -> bool {
    use std::f64::consts::PI;
    match shape {
        "circle" => dx * dx + dy * dy <= r * r,
        "square" => {
            let a = r * PI.sqrt() / 2.0;
            dx.abs() <= a && dy.abs() <= a
        }
        "diamond" => dx.abs() + dy.abs() <= r * (PI / 2.0).sqrt(),
        // Equilateral, pointing up (y grows downwards), centroid at the origin.
        _ => {
            let big = r * (4.0 * PI / (3.0 * 3f64.sqrt())).sqrt();
            let s3 = 3f64.sqrt();
            dy <= big / 2.0 && s3 * dx - dy <= big && -s3 * dx - dy <= big
        }
    }
}

/// What the `height × width` 8-bit RGB image `rgb` shows (see the [module docs](self)).
///
/// # Panics
/// If `rgb` is not `height · width · 3` bytes.
pub fn agreement(rgb: &[u8], height: usize, width: usize) -> Agreement {
    assert_eq!(rgb.len(), height * width * 3, "agreement: not a {height}×{width} RGB image");
    let mask: Vec<bool> = rgb
        .chunks(3)
        .map(|p| 1.0 - f64::from(*p.iter().min().expect("3 bytes")) / 255.0 > 0.5)
        .collect();
    let area = mask.iter().filter(|&&m| m).count();
    if area < 20 {
        return Agreement { colour: None, shape: None, iou: 0.0, area };
    }
    let (mut sum, mut cx, mut cy) = ([0.0f64; 3], 0.0, 0.0);
    for (i, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
        for c in 0..3 {
            sum[c] += f64::from(rgb[3 * i + c]);
        }
        cx += (i % width) as f64;
        cy += (i / width) as f64;
    }
    let n = area as f64;
    let mean = sum.map(|s| s / n);
    let colour = COLOURS
        .iter()
        .min_by(|a, b| {
            let d = |c: &[u8; 3]| (0..3).map(|k| (f64::from(c[k]) - mean[k]).powi(2)).sum::<f64>();
            d(&a.1).total_cmp(&d(&b.1))
        })
        .map(|c| c.0);
    let (cx, cy) = (cx / n + 0.5, cy / n + 0.5);
    let r = (n / std::f64::consts::PI).sqrt();
    let mut best: (Option<&'static str>, f64) = (None, -1.0);
    for shape in SHAPES {
        let (mut inter, mut union) = (0usize, 0usize);
        for (i, &m) in mask.iter().enumerate() {
            let (x, y) = ((i % width) as f64, (i / width) as f64);
            let samples = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)];
            let covered = samples
                .iter()
                .filter(|(sx, sy)| inside(shape, x + sx - cx, y + sy - cy, r))
                .count();
            let t = covered >= 2;
            inter += usize::from(t && m);
            union += usize::from(t || m);
        }
        let iou = inter as f64 / union.max(1) as f64;
        if iou > best.1 {
            best = (Some(shape), iou);
        }
    }
    Agreement { colour, shape: best.0, iou: best.1, area }
}

#[cfg(test)]
mod tests {
    #[test]
    fn captions_of_the_demo_form_are_parsed_and_others_are_not() {
        assert_eq!(super::parse_caption(" An Orange square "), Some(("orange", "square")));
        assert_eq!(super::parse_caption("a red circle"), Some(("red", "circle")));
        assert_eq!(super::parse_caption("a photo of a cat"), None);
        assert_eq!(super::parse_caption("a pink circle"), None);
        assert_eq!(super::parse_caption("the red circle"), None);
    }

    use super::*;

    /// An ideal render of `shape` (hard edges) in `colour` on white, centroid (30, 34), r 10.
    fn render(colour: [u8; 3], shape: &str) -> Vec<u8> {
        (0..64 * 64)
            .flat_map(|i| {
                let (x, y) = ((i % 64) as f64 + 0.5, (i / 64) as f64 + 0.5);
                if inside(shape, x - 30.0, y - 34.0, 10.0) { colour } else { [255, 255, 255] }
            })
            .collect()
    }

    #[test]
    fn ideal_shapes_agree_with_themselves_only() {
        for (name, rgb) in COLOURS {
            for shape in SHAPES {
                let a = agreement(&render(rgb, shape), 64, 64);
                assert!(a.agrees(name, shape, 0.9), "{name} {shape}: {a:?}");
                for other in SHAPES.iter().filter(|s| **s != shape) {
                    assert!(!a.agrees(name, other, 0.0), "{name} {shape} taken for {other}");
                }
            }
        }
        let blank = vec![255u8; 64 * 64 * 3];
        assert_eq!(agreement(&blank, 64, 64).colour, None);
    }
}

//! # metrics: how far an array is from a reference
//!
//! One implementation of the error measures every test, the benchmark and the harness
//! report, so that "relative L2 1e-5" means the same thing everywhere:
//!
//! | measure | definition |
//! |---|---|
//! | [`Comparison::rel_l2`] | `‖a − r‖₂ / ‖r‖₂` |
//! | [`Comparison::max_rel`] | `max|a − r| / max|r|` (the worst element, relative to the reference's largest magnitude) |
//! | [`Comparison::max_abs`] | `max|a − r|` |
//! | [`Comparison::psnr`] | `10·log10(range(r)² / mean((a − r)²))` dB, the reference's value range as the peak; infinite when equal |
//!
//! Sums run in `f64`, whatever the element type. Non-finite values of `a` are counted
//! ([`Comparison::non_finite`]) and make every measure NaN or infinite, so a test that
//! checks `rel_l2 <= tol` fails on them.
//!
//! ```
//! let c = metrics::compare(&[1.0f32, 2.0, 3.0], &[1.0f32, 2.0, 3.5]);
//! assert!((c.max_abs - 0.5).abs() < 1e-12);
//! assert!(c.rel_l2 > 0.1 && c.rel_l2 < 0.2);
//! assert_eq!(metrics::compare(&[1.0f64], &[1.0f64]).psnr, f64::INFINITY);
//! ```

pub mod image;

/// The errors of an array against a reference; see the [crate docs](crate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// `‖a − r‖₂ / ‖r‖₂`.
    pub rel_l2: f64,
    /// `max|a − r| / max|r|`.
    pub max_rel: f64,
    /// `max|a − r|`.
    pub max_abs: f64,
    /// PSNR in dB with the reference's value range as the peak (infinite when equal).
    pub psnr: f64,
    /// Values of `a` that are NaN or infinite.
    pub non_finite: usize,
    /// Elements compared.
    pub len: usize,
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rel L2 {:.2e}, max rel {:.2e}, max abs {:.2e}, PSNR {:.1} dB",
            self.rel_l2, self.max_rel, self.max_abs, self.psnr
        )?;
        if self.non_finite > 0 {
            write!(f, ", {} non-finite values", self.non_finite)?;
        }
        Ok(())
    }
}

/// The errors of `a` against the reference `reference`.
///
/// # Panics
/// If the lengths differ: comparing arrays of different sizes is a bug of the caller, not
/// a large error.
pub fn compare<A, R>(a: &[A], reference: &[R]) -> Comparison
where
    A: Copy + Into<f64>,
    R: Copy + Into<f64>,
{
    assert_eq!(
        a.len(),
        reference.len(),
        "metrics::compare: {} values against a reference of {}",
        a.len(),
        reference.len()
    );
    let (mut sq_diff, mut sq_ref, mut max_abs, mut max_ref) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    let mut non_finite = 0;
    for (&x, &y) in a.iter().zip(reference) {
        let (x, y): (f64, f64) = (x.into(), y.into());
        if !x.is_finite() {
            non_finite += 1;
        }
        let d = x - y;
        sq_diff += d * d;
        sq_ref += y * y;
        // `f64::max` would skip a NaN difference; keep it.
        max_abs = if d.abs() > max_abs || d.is_nan() { d.abs() } else { max_abs };
        max_ref = max_ref.max(y.abs());
        lo = lo.min(y);
        hi = hi.max(y);
    }
    let len = a.len();
    let tiny = f64::MIN_POSITIVE;
    let mse = sq_diff / len.max(1) as f64;
    let psnr = if mse == 0.0 {
        f64::INFINITY
    } else {
        let range = if hi >= lo { hi - lo } else { 0.0 };
        10.0 * (range * range / mse).log10()
    };
    Comparison {
        rel_l2: (sq_diff / sq_ref.max(tiny)).sqrt(),
        max_rel: max_abs / max_ref.max(tiny),
        max_abs,
        psnr,
        non_finite,
        len,
    }
}

/// `‖a − r‖₂ / ‖r‖₂` (see [`compare`]).
pub fn rel_l2<A: Copy + Into<f64>, R: Copy + Into<f64>>(a: &[A], reference: &[R]) -> f64 {
    compare(a, reference).rel_l2
}

/// `max|a − r| / max|r|` (see [`compare`]).
pub fn max_rel<A: Copy + Into<f64>, R: Copy + Into<f64>>(a: &[A], reference: &[R]) -> f64 {
    compare(a, reference).max_rel
}

/// PSNR of `a` against `reference` in dB (see [`compare`]).
pub fn psnr<A: Copy + Into<f64>, R: Copy + Into<f64>>(a: &[A], reference: &[R]) -> f64 {
    compare(a, reference).psnr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_of_a_known_difference() {
        // r = [0, 2, 4, 6], a = r + [0, 0, 0, 1]: ‖d‖ = 1, ‖r‖ = √56, range 6, mse 1/4.
        let r = [0.0f32, 2.0, 4.0, 6.0];
        let a = [0.0f32, 2.0, 4.0, 7.0];
        let c = compare(&a, &r);
        assert!((c.rel_l2 - 1.0 / 56f64.sqrt()).abs() < 1e-15);
        assert!((c.max_rel - 1.0 / 6.0).abs() < 1e-15);
        assert_eq!(c.max_abs, 1.0);
        assert!((c.psnr - 10.0 * (36.0f64 / 0.25).log10()).abs() < 1e-12);
        assert_eq!((c.non_finite, c.len), (0, 4));
    }

    #[test]
    fn equal_arrays_have_zero_error_and_infinite_psnr() {
        let c = compare(&[1.5f64, -2.0], &[1.5f64, -2.0]);
        assert_eq!((c.rel_l2, c.max_rel, c.max_abs), (0.0, 0.0, 0.0));
        assert_eq!(c.psnr, f64::INFINITY);
    }

    #[test]
    fn non_finite_values_are_counted_and_fail_every_bound() {
        let c = compare(&[f32::NAN, 1.0, f32::INFINITY], &[0.0f32, 1.0, 2.0]);
        assert_eq!(c.non_finite, 2);
        assert!(c.rel_l2.is_nan() || c.rel_l2.is_infinite());
        assert!(c.max_abs.is_nan() || c.max_abs.is_infinite());
        assert!(
            c.rel_l2.partial_cmp(&1e-5) != Some(std::cmp::Ordering::Less),
            "a NaN must not pass a bound"
        );
    }

    #[test]
    #[should_panic(expected = "3 values against a reference of 2")]
    fn different_lengths_are_a_bug() {
        compare(&[1.0f32, 2.0, 3.0], &[1.0f32, 2.0]);
    }
}

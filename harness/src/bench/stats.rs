//! The numbers computed from measurements: medians, the steady-step time, and the errors
//! of an output against a reference.

use burn::tensor::Tensor;

use crate::CpuBackend as B;

/// Errors of an output against a reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quality {
    /// PSNR in dB with the reference's range as the peak (infinite when equal).
    pub psnr: f64,
    /// Largest absolute difference.
    pub max_abs: f64,
    /// `‖a − b‖ / ‖b‖`.
    pub rel_l2: f64,
}

/// The errors of `a` against the reference `b` ([`metrics::compare`]).
pub fn quality(a: &Tensor<B, 4>, b: &Tensor<B, 4>) -> Quality {
    let values = |t: &Tensor<B, 4>| -> Vec<f32> {
        t.clone().into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default()
    };
    let c = metrics::compare(&values(a), &values(b));
    Quality { psnr: c.psnr, max_abs: c.max_abs, rel_l2: c.rel_l2 }
}

/// The median of the steps after `warmup` and before the last (all steps where none).
pub(super) fn steady(step_ms: &[f64], warmup: usize) -> f64 {
    let n = step_ms.len();
    let inner = &step_ms[warmup.min(n)..n.saturating_sub(1).max(warmup.min(n))];
    median(if inner.is_empty() { step_ms } else { inner })
}

/// The median (the mean of the middle two of an even count); 0 for none.
pub(super) fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_steps_skip_warmup_and_the_last_step() {
        assert_eq!(steady(&[9.0, 5.0, 5.0, 7.0], 1), 5.0);
        assert_eq!(steady(&[9.0, 7.0], 1), 8.0);
        assert_eq!(steady(&[4.0, 6.0], 0), 4.0);
        assert_eq!(steady(&[3.0], 4), 3.0);
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}

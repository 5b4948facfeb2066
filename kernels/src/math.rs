//! Scalar float32 functions written so that LLVM vectorises loops over them: no calls into
//! libm, no branches (selects only), fused multiply-adds. Every loop that uses them is the
//! `run` of a [`Kernel`] started by [`simd`], which compiles it once per instruction set
//! (AVX-512, AVX2+FMA, NEON, scalar) and picks one at run time.
//!
//! Why a trait and not a closure: pulp compiles the code it is given inside a
//! `#[target_feature]` function, but only code *inlined* into that function gets the
//! features. A closure's body is a function of its own that LLVM may decline to inline (it
//! did, for every loop here: `f32::mul_add` became calls to libm's `fmaf`), whereas
//! `Kernel::run` is `#[inline(always)]` by contract and is always inlined.
//!
//! Float reductions (sums, maxima) are written over [`LANES`] independent accumulators,
//! because LLVM does not reorder a serial float sum into vector lanes by itself.

/// Independent accumulators of a reduction: two AVX2 vectors, one AVX-512 vector.
pub(crate) const LANES: usize = 16;

/// A loop to run vectorised. Implementations must mark `run` `#[inline(always)]` and call
/// only `#[inline(always)]` helpers (those of this module), so that all of it is compiled
/// with the target features [`simd`] selects.
pub(crate) trait Kernel {
    /// What the loop returns.
    type Output;
    /// The loop.
    fn run(self) -> Self::Output;
}

struct Dispatch<K>(K);

impl<K: Kernel> pulp::WithSimd for Dispatch<K> {
    type Output = K::Output;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> K::Output {
        self.0.run()
    }
}

/// Runs `kernel` compiled for the best instruction set this CPU has (detected at run time).
#[inline(always)]
pub(crate) fn simd<K: Kernel>(kernel: K) -> K::Output {
    pulp::Arch::new().dispatch(Dispatch(kernel))
}

const LOG2_E: f32 = std::f32::consts::LOG2_E;
// ln 2 split into a part exact in float32 and the rest (Cephes' expf).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// Cephes' `expf` range reduction: `x = n·ln 2 + r` with |r| ≤ ln2/2, and a degree-7
/// polynomial for `e^r`. Returns `(e^r, n)`; `x` must already be clamped to [−87.3, 88.7].
#[inline(always)]
fn exp_reduced(x: f32) -> (f32, f32) {
    let n = (x * LOG2_E + 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let r2 = r * r;
    let p = 1.987_569_1e-4_f32
        .mul_add(r, 1.398_199_9e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 1.666_666_5e-1)
        .mul_add(r, 0.5);
    (p.mul_add(r2, r + 1.0), n)
}

/// 2^k for an integral `k` in [−126, 127], through the exponent field. The integer is read
/// from the mantissa of k + 1.5·2^23 (a bit cast, not `as i32`, whose saturating semantics
/// LLVM does not vectorise).
#[inline(always)]
fn pow2(k: f32) -> f32 {
    f32::from_bits(((k + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000 - 127)) << 23)
}

/// `e^x` to within 2 ulp for x in [−87.3, 88.7]; 0 below (so exp(−∞) = 0), +∞ above.
/// Cephes' `expf` ([`exp_reduced`]), then 2^n with n ∈ [−126, 128] (2^128 split as
/// 2·2^127).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let (er, n) = exp_reduced(x.clamp(-87.3, 88.7));
    let half = (n * 0.5).floor();
    let y = er * pow2(half) * pow2(n - half);
    let y = if x < -87.3 { 0.0 } else { y };
    if x > 88.7 { f32::INFINITY } else { y }
}

/// `e^x` for `x ≤ 0` (a softmax's `x − max`), to within 2 ulp on [−87.3, 0]; 0 below and at
/// −∞, NaN for NaN. [`exp`] without what positive arguments need (the upper clamp and 2^n
/// split in two factors for n up to 128): 2^n for n ∈ [−126, 0] is one exponent field.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    let (er, n) = exp_reduced(x.max(-87.3));
    let y = er * pow2(n);
    // `x.max(−87.3)` maps a NaN to −87.3, so the NaN is passed through explicitly.
    if x < -87.3 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// The logistic function 1 / (1 + e^−x).
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// √(2/π), of the tanh approximation of GELU.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// Tanh-approximate GELU, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, computed as
/// `x·σ(2u)` (the same function: 1 + tanh(u) = 2σ(2u)), which has no cancellation for
/// negative x.
#[inline(always)]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (0.044_715 * x * x).mul_add(x, x);
    x * sigmoid(2.0 * u)
}

/// `erfc(x)` for x ≥ 0 with relative error ≤ 1.2e-7 (Numerical Recipes' `erfcc`, a
/// Chebyshev fit of erfc(x)·e^(x²)), so the tail keeps its relative accuracy.
#[inline(always)]
fn erfc_pos(a: f32) -> f32 {
    let t = 1.0 / 0.5_f32.mul_add(a, 1.0);
    let p = 0.170_872_77_f32
        .mul_add(t, -0.822_152_23)
        .mul_add(t, 1.488_515_9)
        .mul_add(t, -1.135_204)
        .mul_add(t, 0.278_868_07)
        .mul_add(t, -0.186_288_06)
        .mul_add(t, 0.096_784_18)
        .mul_add(t, 0.374_091_96)
        .mul_add(t, 1.000_023_7)
        .mul_add(t, -1.265_512_2);
    t * exp(p - a * a)
}

/// Exact GELU, `0.5·x·(1 + erf(x/√2)) = 0.5·x·erfc(−x/√2)`: for negative x from erfc
/// directly (no cancellation in 1 + erf), relative error ≤ 2e-7.
#[inline(always)]
pub(crate) fn gelu_erf(x: f32) -> f32 {
    let a = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let c = erfc_pos(a);
    let phi2 = if x < 0.0 { c } else { 2.0 - c };
    0.5 * x * phi2
}

/// SiLU, `x·σ(x)`.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// Σ x over [`LANES`] accumulators (vectorises).
#[inline(always)]
pub(crate) fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for x in rest {
        s += x;
    }
    s
}

/// Σ (x − c)² over [`LANES`] accumulators (vectorises).
#[inline(always)]
pub(crate) fn sum_sq_dev(xs: &[f32], c: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for ch in chunks {
        for (a, x) in acc.iter_mut().zip(ch) {
            let d = x - c;
            *a = d.mul_add(d, *a);
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for x in rest {
        s += (x - c) * (x - c);
    }
    s
}

/// max x over [`LANES`] accumulators (vectorises); −∞ for an empty slice.
#[inline(always)]
pub(crate) fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a = if *x > *a { *x } else { *a };
        }
    }
    let mut m = acc.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for &x in rest {
        m = if x > m { x } else { m };
    }
    m
}

/// `x ← e^(x − c)` for every element, `c ≥` every `x` (a softmax row's maximum); returns Σ of
/// the results (vectorises).
#[inline(always)]
pub(crate) fn exp_sub_sum(xs: &mut [f32], c: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for ch in &mut chunks {
        for (a, x) in acc.iter_mut().zip(ch.iter_mut()) {
            *x = exp_nonpositive(*x - c);
            *a += *x;
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for x in chunks.into_remainder() {
        *x = exp_nonpositive(*x - c);
        s += *x;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error in ulps of float32 near `want`.
    fn ulps(got: f32, want: f64) -> f64 {
        let ulp = (want.abs() as f32).max(f32::MIN_POSITIVE);
        let ulp = f32::from_bits(ulp.to_bits() + 1) - ulp;
        ((got as f64) - want).abs() / ulp as f64
    }

    #[test]
    fn exp_is_within_two_ulp_and_saturates() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.5 * i as f32 / 200_000.0;
            worst = worst.max(ulps(exp(x), (x as f64).exp()));
        }
        println!("exp worst error: {worst:.2} ulp");
        assert!(worst <= 2.0, "exp off by {worst} ulp");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn gelu_and_silu_match_their_definitions_in_f64() {
        // Largest |got − want| / max(|want|, 1e-3) over [−12, 12]. Measured (AVX2): tanh
        // 9.5e-7, erf 1.3e-6, silu 1.6e-7. The float32 rounding of the exponent's argument
        // (2u, x²/2: relative ε ≈ 6e-8) is multiplied by its size (up to ~20) in e^arg, so
        // a few 1e-6 is what any float32 evaluation gets (Burn's and torch's too); a wrong
        // coefficient or branch is off by ≥ 1e-3.
        let (mut tanh_err, mut erf_err, mut silu_err) = (0f64, 0f64, 0f64);
        for i in 0..=48_000 {
            let x = -12.0 + 24.0 * i as f32 / 48_000.0;
            let xd = x as f64;
            let rel = |got: f32, want: f64| ((got as f64) - want).abs() / want.abs().max(1e-3);
            let u = (2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3));
            tanh_err = tanh_err.max(rel(gelu_tanh(x), 0.5 * xd * (1.0 + u.tanh())));
            let erf_want = 0.5 * xd * (1.0 + libm_erf(xd / std::f64::consts::SQRT_2));
            erf_err = erf_err.max(rel(gelu_erf(x), erf_want));
            silu_err = silu_err.max(rel(silu(x), xd / (1.0 + (-xd).exp())));
        }
        println!("gelu tanh {tanh_err:.2e}, gelu erf {erf_err:.2e}, silu {silu_err:.2e}");
        assert!(tanh_err < 3e-6, "gelu(tanh) rel error {tanh_err}");
        assert!(erf_err < 3e-6, "gelu(erf) rel error {erf_err}");
        assert!(silu_err < 1e-6, "silu rel error {silu_err}");
    }

    /// erf in f64 to ~1e-14: its Maclaurin series for |x| < 2.5, else 1 − erfc by the
    /// continued fraction erfc x = e^(−x²)/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + …)))).
    fn libm_erf(x: f64) -> f64 {
        let a = x.abs();
        let y = if a < 2.5 {
            let (mut term, mut s) = (a, a);
            for n in 1..80 {
                term *= -a * a / n as f64;
                s += term / (2 * n + 1) as f64;
            }
            s * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let mut t = a;
            for n in (1..200).rev() {
                t = a + (n as f64 / 2.0) / t;
            }
            1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * t)
        };
        y.copysign(x)
    }

    #[test]
    fn exp_nonpositive_is_within_two_ulp_and_saturates() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            worst = worst.max(ulps(exp_nonpositive(x), (x as f64).exp()));
        }
        println!("exp_nonpositive worst error: {worst:.2} ulp");
        assert!(worst <= 2.0, "exp_nonpositive off by {worst} ulp");
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-200.0), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    #[test]
    fn reductions_equal_serial_sums() {
        let xs: Vec<f32> = (0..1001).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let serial: f64 = xs.iter().map(|&x| x as f64).sum();
        assert!((sum(&xs) as f64 - serial).abs() < 1e-3);
        assert_eq!(max(&xs), xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let mean = serial / xs.len() as f64;
        let var: f64 = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum();
        assert!((sum_sq_dev(&xs, mean as f32) as f64 - var).abs() / var < 1e-6);
        let mut e = xs.clone();
        let top = max(&xs);
        let s = exp_sub_sum(&mut e, top);
        let want: f64 = xs.iter().map(|&x| (x as f64 - top as f64).exp()).sum();
        assert!((s as f64 - want).abs() / want < 1e-6);
    }
}

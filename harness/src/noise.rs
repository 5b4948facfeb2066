//! Seeded Gaussian noise for the initial latents, identical on every rank and every machine.
//!
//! SplitMix64 (Steele, Lea & Flood 2014) feeds the Box–Muller transform, in f64, rounded to
//! f32 at the end. Written out here rather than taken from `rand`/`rand_distr` so that a seed
//! names the same image for as long as this file is unchanged, whatever the versions of
//! those crates (whose normal samplers have changed between releases). It does not
//! reproduce PyTorch's generator: to reproduce a diffusers image exactly, pass its initial
//! latents with `--latents`.

/// The SplitMix64 generator.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform value in `(0, 1]` (53 random bits; never 0, so its log is finite).
    pub fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

/// `len` standard normal values from `seed` (Box–Muller, both outputs of each pair used).
pub fn gaussian(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(len + 1);
    while out.len() < len {
        let u1 = rng.next_open01();
        let u2 = rng.next_open01();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_values_and_normal_moments() {
        let a = gaussian(7, 100_001);
        assert_eq!(a, gaussian(7, 100_001));
        assert_ne!(a[..8], gaussian(8, 8)[..]);
        let n = a.len() as f64;
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "mean {mean}, var {var}");
        assert!(a.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn splitmix_reference_values() {
        // The first outputs for seed 1234567 from the reference implementation.
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
    }
}

//! Feature statistics and the Fréchet distance between two Gaussians, in `f64`.
//!
//! `d² = ‖μ₁ − μ₂‖² + Tr(Σ₁) + Tr(Σ₂) − 2·Tr((Σ₁Σ₂)^½)`, as pytorch-fid's
//! `calculate_frechet_distance`. pytorch-fid takes the square root of the (non-symmetric)
//! product with `scipy.linalg.sqrtm`; here the trace comes from symmetric eigen-decompositions
//! instead, which is exact arithmetic for the same quantity and needs no imaginary-part
//! clean-up: `Σ₁Σ₂` is similar to `S Σ₂ S` with `S = Σ₁^½` (symmetric, positive
//! semi-definite), so `Tr((Σ₁Σ₂)^½) = Σᵢ √λᵢ(S Σ₂ S)`. Eigenvalues that rounding makes
//! slightly negative (a singular covariance: fewer samples than dimensions) count as zero.

use nalgebra::{DMatrix, DVector};

use crate::{QualityError, Result};

/// Mean and covariance of a feature set (pytorch-fid's `mu`, `sigma`).
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// `mu`: the mean feature vector.
    pub mu: Vec<f64>,
    /// `sigma`: the `dim × dim` covariance, row-major (`np.cov(rowvar=False)`, divisor `n − 1`).
    pub sigma: Vec<f64>,
}

impl Stats {
    /// Statistics of `n` feature vectors of `dim` values each, row after row.
    ///
    /// # Errors
    /// Fewer than two vectors (no covariance), or a length that is not `n · dim`.
    pub fn from_features<T: Copy + Into<f64>>(features: &[T], dim: usize) -> Result<Stats> {
        if dim == 0 || !features.len().is_multiple_of(dim) {
            return Err(QualityError::Input(format!(
                "{} feature values are not a whole number of {dim}-d vectors",
                features.len()
            )));
        }
        let n = features.len() / dim;
        if n < 2 {
            return Err(QualityError::Input(format!(
                "{n} feature vector(s): a covariance needs at least 2 images"
            )));
        }
        let mut mu = vec![0.0f64; dim];
        for row in features.chunks(dim) {
            for (m, &x) in mu.iter_mut().zip(row) {
                *m += x.into();
            }
        }
        mu.iter_mut().for_each(|m| *m /= n as f64);
        // Centred rows, then Σ = XᵀX / (n − 1) by nalgebra's GEMM.
        let centred = DMatrix::from_row_iterator(
            n,
            dim,
            features.chunks(dim).flat_map(|row| {
                row.iter().zip(&mu).map(|(&x, m)| x.into() - m).collect::<Vec<f64>>()
            }),
        );
        let cov = centred.tr_mul(&centred) / (n as f64 - 1.0);
        // Row-major out (the matrix is symmetric up to rounding; keep it as computed).
        let sigma = (0..dim)
            .flat_map(|i| (0..dim).map(move |j| (i, j)))
            .map(|(i, j)| cov[(i, j)])
            .collect();
        Ok(Stats { mu, sigma })
    }

    /// The feature dimension.
    pub fn dim(&self) -> usize {
        self.mu.len()
    }

    /// Checks that `sigma` is `dim × dim` and every value finite.
    ///
    /// # Errors
    /// Naming what is wrong.
    pub fn check(&self) -> Result<()> {
        let d = self.dim();
        if self.sigma.len() != d * d {
            return Err(QualityError::Input(format!(
                "sigma has {} values, not {d}×{d} for a {d}-d mu",
                self.sigma.len()
            )));
        }
        if self.mu.iter().chain(&self.sigma).any(|x| !x.is_finite()) {
            return Err(QualityError::Input("mu or sigma holds NaN or infinite values".into()));
        }
        Ok(())
    }

    fn sigma_matrix(&self) -> DMatrix<f64> {
        let d = self.dim();
        let m = DMatrix::from_row_slice(d, d, &self.sigma);
        // Symmetrise: the eigen-solver reads one triangle.
        (&m + m.transpose()) * 0.5
    }
}

/// The Fréchet distance between the Gaussians of `a` and `b` (see the [module docs](self)).
///
/// # Errors
/// Statistics of different dimensions, or malformed ones ([`Stats::check`]).
pub fn frechet_distance(a: &Stats, b: &Stats) -> Result<f64> {
    a.check()?;
    b.check()?;
    if a.dim() != b.dim() {
        return Err(QualityError::Input(format!(
            "statistics of {}-d and {}-d features cannot be compared",
            a.dim(),
            b.dim()
        )));
    }
    let (s1, s2) = (a.sigma_matrix(), b.sigma_matrix());
    let diff = DVector::from_vec(a.mu.clone()) - DVector::from_vec(b.mu.clone());
    let root = sqrt_psd(s1.clone());
    let inner = &root * s2.clone() * &root;
    let inner = (&inner + inner.transpose()) * 0.5;
    let tr_covmean: f64 = inner.symmetric_eigenvalues().iter().map(|&l| l.max(0.0).sqrt()).sum();
    Ok(diff.dot(&diff) + s1.trace() + s2.trace() - 2.0 * tr_covmean)
}

/// The symmetric square root of a positive semi-definite matrix (negative eigenvalues, from
/// rounding, as zero).
fn sqrt_psd(m: DMatrix<f64>) -> DMatrix<f64> {
    let eig = m.symmetric_eigen();
    let roots = eig.eigenvalues.map(|l| l.max(0.0).sqrt());
    let v = &eig.eigenvectors;
    v * DMatrix::from_diagonal(&roots) * v.transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_of_known_gaussians() {
        // 1-d: d² = (μ₁ − μ₂)² + σ₁² + σ₂² − 2σ₁σ₂ = (μ₁ − μ₂)² + (σ₁ − σ₂)².
        let a = Stats { mu: vec![1.0], sigma: vec![4.0] };
        let b = Stats { mu: vec![3.0], sigma: vec![9.0] };
        assert!((frechet_distance(&a, &b).unwrap() - (4.0 + 1.0)).abs() < 1e-12);
        assert!(frechet_distance(&a, &a).unwrap().abs() < 1e-12);
    }

    #[test]
    fn statistics_are_numpy_mean_and_cov() {
        // Rows (1, 2), (3, 6), (5, 4): mean (3, 4); cov with n − 1 = 2.
        let s = Stats::from_features(&[1.0f32, 2.0, 3.0, 6.0, 5.0, 4.0], 2).unwrap();
        assert_eq!(s.mu, vec![3.0, 4.0]);
        assert_eq!(s.sigma, vec![4.0, 2.0, 2.0, 4.0]);
        let e = Stats::from_features(&[1.0f32, 2.0], 2).unwrap_err().to_string();
        assert!(e.contains("at least 2 images"), "{e}");
        let e = frechet_distance(&s, &Stats { mu: vec![0.0], sigma: vec![1.0] })
            .unwrap_err()
            .to_string();
        assert!(e.contains("2-d and 1-d"), "{e}");
    }
}

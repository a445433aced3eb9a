//! Small dense helpers on flat f64 vectors (sequential, so results do not depend on threads).

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// Inner product, accumulated in index order.
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Euclidean norm.
pub(crate) fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// `y += alpha * x`.
pub(crate) fn axpy(y: &mut [f64], alpha: f64, x: &[f64]) {
    for (a, b) in y.iter_mut().zip(x) {
        *a += alpha * b;
    }
}

/// `x *= alpha`.
pub(crate) fn scale(x: &mut [f64], alpha: f64) {
    for a in x.iter_mut() {
        *a *= alpha;
    }
}

/// Removes from `w` its components along the orthonormal `basis`: two sweeps of modified
/// Gram-Schmidt ("twice is enough" for orthogonality to working precision).
pub(crate) fn orthogonalize(w: &mut [f64], basis: &[Vec<f64>]) {
    for _ in 0..2 {
        for q in basis {
            let c = dot(q, w);
            axpy(w, -c, q);
        }
    }
}

/// Orthonormalizes `cols` in order (modified Gram-Schmidt with reorthogonalization), dropping
/// columns that are numerically dependent on the earlier ones: a column is kept when its
/// remainder after projection exceeds `1e-10` of its own norm and `1e-13` of the largest
/// column norm.
pub(crate) fn orthonormal_columns(cols: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let largest = cols.iter().map(|c| norm(c)).fold(0.0, f64::max);
    let mut q: Vec<Vec<f64>> = Vec::with_capacity(cols.len());
    for c in cols {
        let before = norm(c);
        let mut w = c.clone();
        orthogonalize(&mut w, &q);
        let after = norm(&w);
        if after > 1e-10 * before && after > 1e-13 * largest && after > 0.0 {
            scale(&mut w, 1.0 / after);
            q.push(w);
        }
    }
    q
}

/// A Rademacher vector (entries ±1 with equal probability), 64 signs per random word.
pub(crate) fn rademacher<R: Rng + ?Sized>(rng: &mut R, d: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(d);
    while out.len() < d {
        let bits: u64 = rng.gen();
        let take = (d - out.len()).min(64);
        out.extend((0..take).map(|i| if (bits >> i) & 1 == 1 { 1.0 } else { -1.0 }));
    }
    out
}

/// A vector of standard normal entries.
pub(crate) fn gaussian<R: Rng + ?Sized>(rng: &mut R, d: usize) -> Vec<f64> {
    (0..d).map(|_| StandardNormal.sample(rng)).collect()
}

/// Running mean and sample variance (Welford), fed in a fixed order.
#[derive(Clone, Debug, Default)]
pub(crate) struct Running {
    n: usize,
    mean: f64,
    m2: f64,
}

impl Running {
    pub(crate) fn push(&mut self, x: f64) {
        self.n += 1;
        let delta = x - self.mean;
        self.mean += delta / self.n as f64;
        self.m2 += delta * (x - self.mean);
    }

    pub(crate) fn count(&self) -> usize {
        self.n
    }

    pub(crate) fn mean(&self) -> f64 {
        self.mean
    }

    /// Standard error of the mean (NaN with fewer than two samples).
    pub(crate) fn std_error(&self) -> f64 {
        if self.n < 2 {
            return f64::NAN;
        }
        (self.m2.max(0.0) / (self.n - 1) as f64 / self.n as f64).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn orthonormal_columns_drop_dependent_ones() {
        let mut rng = StdRng::seed_from_u64(1);
        let a = gaussian(&mut rng, 50);
        let b = gaussian(&mut rng, 50);
        let mut c = a.clone();
        axpy(&mut c, 2.0, &b);
        let q = orthonormal_columns(&[a, b, c, vec![0.0; 50]]);
        assert_eq!(q.len(), 2);
        assert!((dot(&q[0], &q[0]) - 1.0).abs() < 1e-14);
        assert!(dot(&q[0], &q[1]).abs() < 1e-15);
    }

    #[test]
    fn rademacher_signs_are_balanced() {
        let mut rng = StdRng::seed_from_u64(2);
        let z = rademacher(&mut rng, 10_001);
        assert_eq!(z.len(), 10_001);
        assert!(z.iter().all(|&x| x == 1.0 || x == -1.0));
        assert!(z.iter().sum::<f64>().abs() < 400.0);
    }

    #[test]
    fn running_matches_two_pass() {
        let xs = [1.0, 4.0, -2.0, 7.5, 3.25];
        let mut r = Running::default();
        xs.iter().for_each(|&x| r.push(x));
        let mean = xs.iter().sum::<f64>() / 5.0;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / 4.0;
        assert!((r.mean() - mean).abs() < 1e-15);
        assert!((r.std_error() - (var / 5.0).sqrt()).abs() < 1e-14);
    }
}

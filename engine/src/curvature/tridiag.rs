//! Eigenvalues and selected eigenvector rows of a symmetric tridiagonal matrix, by the
//! implicit QL method with Wilkinson-type shifts (f64).

use super::{invalid, CurvatureError, CurvatureResult};

/// Eigen-decomposition of a symmetric tridiagonal matrix `T = Z diag(values) Zᵀ`, with only
/// the requested rows of `Z` kept.
#[derive(Clone, Debug, PartialEq)]
pub struct TridiagonalEigen {
    /// Eigenvalues in ascending order.
    pub values: Vec<f64>,
    /// `rows[r][j]`: component `requested[r]` of the unit eigenvector of `values[j]`.
    pub rows: Vec<Vec<f64>>,
}

/// Eigenvalues of the symmetric tridiagonal matrix with diagonal `diag` (length n) and
/// off-diagonal `off` (length n − 1, `off[i]` couples `i` and `i + 1`), in ascending order,
/// and the rows `requested` of the orthogonal eigenvector matrix (row `r` holds component
/// `r` of every eigenvector; ask for row 0 for Gauss quadrature weights, the last row for
/// Lanczos residuals, all rows for full eigenvectors).
///
/// Cost: O(n²) per eigenvalues plus O(n²) per requested row; no HVPs.
pub fn tridiagonal_eigen(
    diag: &[f64],
    off: &[f64],
    requested: &[usize],
) -> CurvatureResult<TridiagonalEigen> {
    check_tridiagonal(diag, off, requested)?;
    let n = diag.len();
    let mut d = diag.to_vec();
    let mut e = off.to_vec();
    e.push(0.0);
    let mut z: Vec<Vec<f64>> = requested
        .iter()
        .map(|&r| (0..n).map(|j| if j == r { 1.0 } else { 0.0 }).collect())
        .collect();
    for l in 0..n {
        let mut iterations = 0;
        loop {
            let m = unreduced_end(&d, &e, l);
            if m == l {
                break;
            }
            iterations += 1;
            if iterations > 200 {
                return Err(CurvatureError::NoConvergence { index: l, size: n });
            }
            ql_step(&mut d, &mut e, &mut z, l, m);
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| d[a].total_cmp(&d[b]));
    Ok(TridiagonalEigen {
        values: order.iter().map(|&j| d[j]).collect(),
        rows: z
            .iter()
            .map(|row| order.iter().map(|&j| row[j]).collect())
            .collect(),
    })
}

/// Refuses mismatched lengths, out-of-range rows and non-finite entries.
fn check_tridiagonal(diag: &[f64], off: &[f64], requested: &[usize]) -> CurvatureResult<()> {
    let n = diag.len();
    if off.len() + 1 != n.max(1) {
        return invalid(
            "tridiagonal",
            format!("{} diagonal and {} off-diagonal entries", n, off.len()),
        );
    }
    if let Some(&r) = requested.iter().find(|&&r| r >= n) {
        return invalid("tridiagonal", format!("row {r} of a {n}x{n} matrix"));
    }
    if diag.iter().chain(off).any(|x| !x.is_finite()) {
        return invalid("tridiagonal", "non-finite entry");
    }
    Ok(())
}

/// The first negligible off-diagonal entry at or after `l`: the block `l..=m` is unreduced.
fn unreduced_end(d: &[f64], e: &[f64], l: usize) -> usize {
    let n = d.len();
    let mut m = l;
    while m + 1 < n {
        let dd = d[m].abs() + d[m + 1].abs();
        if e[m].abs() <= f64::EPSILON * dd {
            break;
        }
        m += 1;
    }
    m
}

/// One implicit QL step on the unreduced block `l..=m`, rotating the kept eigenvector rows
/// `z` along; on underflow the block splits and the step ends early.
fn ql_step(d: &mut [f64], e: &mut [f64], z: &mut [Vec<f64>], l: usize, m: usize) {
    // Shift: the eigenvalue of the leading 2x2 block nearer to d[l].
    let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
    let mut r = g.hypot(1.0);
    g = d[m] - d[l] + e[l] / (g + r.copysign(g));
    let (mut s, mut c, mut p) = (1.0f64, 1.0f64, 0.0f64);
    // Chase the bulge from the bottom of the block up to l with plane rotations.
    for i in (l..m).rev() {
        let f = s * e[i];
        let b = c * e[i];
        r = f.hypot(g);
        e[i + 1] = r;
        if r == 0.0 {
            // Underflow: the block splits at i + 1; restart on it.
            d[i + 1] -= p;
            e[m] = 0.0;
            return;
        }
        s = f / r;
        c = g / r;
        g = d[i + 1] - p;
        r = (d[i] - g) * s + 2.0 * c * b;
        p = s * r;
        d[i + 1] = g + p;
        g = c * r - b;
        for row in z.iter_mut() {
            let t = row[i + 1];
            row[i + 1] = s * row[i] + c * t;
            row[i] = c * row[i] - s * t;
        }
    }
    d[l] -= p;
    e[l] = g;
    e[m] = 0.0;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn laplacian_eigenvalues() {
        let n = 40;
        let r = tridiagonal_eigen(&vec![2.0; n], &vec![-1.0; n - 1], &[]).unwrap();
        for (k, &v) in r.values.iter().enumerate() {
            let want = 2.0 - 2.0 * ((k + 1) as f64 * std::f64::consts::PI / (n + 1) as f64).cos();
            assert!((v - want).abs() < 1e-13, "{k}: {v} vs {want}");
        }
    }

    #[test]
    fn random_matrix_eigenvectors_are_orthonormal_and_exact() {
        let mut rng = StdRng::seed_from_u64(3);
        for n in [1usize, 2, 3, 7, 30] {
            let diag: Vec<f64> = (0..n).map(|_| rng.gen_range(-3.0..3.0)).collect();
            let mut off: Vec<f64> = (1..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            if n > 5 {
                off[2] = 0.0; // a split block
            }
            let all: Vec<usize> = (0..n).collect();
            let r = tridiagonal_eigen(&diag, &off, &all).unwrap();
            for j in 0..n {
                for i in 0..n {
                    // (T z_j)_i − λ_j z_ij
                    let mut t = diag[i] * r.rows[i][j];
                    if i > 0 {
                        t += off[i - 1] * r.rows[i - 1][j];
                    }
                    if i + 1 < n {
                        t += off[i] * r.rows[i + 1][j];
                    }
                    assert!((t - r.values[j] * r.rows[i][j]).abs() < 1e-13);
                }
                for j2 in 0..n {
                    let ip: f64 = (0..n).map(|i| r.rows[i][j] * r.rows[i][j2]).sum();
                    let want = if j == j2 { 1.0 } else { 0.0 };
                    assert!((ip - want).abs() < 1e-13);
                }
            }
            // Requested rows match the full decomposition.
            let first = tridiagonal_eigen(&diag, &off, &[0]).unwrap();
            assert_eq!(first.values, r.values);
            assert_eq!(first.rows[0], r.rows[0]);
        }
    }

    #[test]
    fn diagonal_and_empty() {
        let r = tridiagonal_eigen(&[3.0, -1.0, 2.0], &[0.0, 0.0], &[1]).unwrap();
        assert_eq!(r.values, vec![-1.0, 2.0, 3.0]);
        assert_eq!(r.rows[0], vec![1.0, 0.0, 0.0]);
        let e = tridiagonal_eigen(&[], &[], &[]).unwrap();
        assert!(e.values.is_empty());
        assert!(tridiagonal_eigen(&[1.0], &[1.0], &[]).is_err());
        assert!(tridiagonal_eigen(&[f64::NAN, 1.0], &[1.0], &[]).is_err());
    }
}

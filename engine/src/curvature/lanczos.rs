//! Lanczos with full reorthogonalization for extreme Hessian eigenvalues, and stochastic
//! Lanczos quadrature (SLQ) for the spectral density.

use super::linalg::{axpy, dot, gaussian, norm, orthogonalize, rademacher, scale, Running};
use super::operator::{BatchLoss, Hessian};
use super::tridiag::tridiagonal_eigen;
use super::{invalid, CurvatureResult};
use crate::scalar::Scalar;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Which end of the spectrum [`lanczos`] converges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// The algebraically largest eigenvalues (sharpness: `λ_max` first).
    Largest,
    /// The algebraically smallest eigenvalues (most negative curvature first).
    Smallest,
    /// The eigenvalues of largest magnitude.
    LargestMagnitude,
}

/// Options of [`lanczos`].
#[derive(Clone, Debug, PartialEq)]
pub struct LanczosOptions {
    /// Number of eigenvalues wanted (at least 1, at most `d`).
    pub k: usize,
    /// Most Lanczos iterations (= HVPs); capped at `d`.
    pub max_iters: usize,
    /// Convergence: every wanted Ritz pair has residual `‖H y − θ y‖ <= tol · max(|θ|,
    /// ε^(2/3) ‖T‖)`. The eigenvalue error is then about `residual² / gap`.
    pub tol: f64,
    /// Which end of the spectrum.
    pub which: Which,
    /// Seed of the `StdRng` that draws the (Gaussian) start vector and any restart vector.
    pub seed: u64,
    /// Also return the Ritz vectors (flat, in [`super::ParamLayout`] order).
    pub eigenvectors: bool,
}

impl Default for LanczosOptions {
    fn default() -> Self {
        LanczosOptions {
            k: 1,
            max_iters: 100,
            tol: 1e-6,
            which: Which::Largest,
            seed: 0,
            eigenvectors: false,
        }
    }
}

/// Result of [`lanczos`].
#[derive(Clone, Debug, PartialEq)]
pub struct LanczosResult {
    /// The `k` wanted Ritz values, most extreme first (largest first for
    /// [`Which::Largest`], smallest first for [`Which::Smallest`]).
    pub eigenvalues: Vec<f64>,
    /// Residual norms `‖H y − θ y‖` of the matching Ritz pairs.
    pub residuals: Vec<f64>,
    /// Unit Ritz vectors (flat, length `d`), when asked for.
    pub eigenvectors: Option<Vec<Vec<f64>>>,
    /// All Ritz values of the final tridiagonal matrix, ascending.
    pub ritz_values: Vec<f64>,
    /// Lanczos iterations run (= HVPs = dimension of the basis).
    pub iterations: usize,
    /// Restarts after an invariant subspace was found (each adds a fresh random direction,
    /// so repeated eigenvalues are found too).
    pub restarts: usize,
    /// True when every wanted pair met the tolerance.
    pub converged: bool,
    /// Number of trainable scalars `d`.
    pub dim: usize,
    /// Hessian-vector products spent.
    pub hvps: usize,
    /// Forward-over-reverse passes run.
    pub passes: usize,
}

/// Indices (into ascending `values`) of the `k` wanted ones, most extreme first.
fn wanted(values: &[f64], k: usize, which: Which) -> Vec<usize> {
    let n = values.len();
    let mut idx: Vec<usize> = match which {
        Which::Largest => (0..n).rev().collect(),
        Which::Smallest => (0..n).collect(),
        Which::LargestMagnitude => {
            let mut v: Vec<usize> = (0..n).collect();
            v.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()));
            v
        }
    };
    idx.truncate(k);
    idx
}

/// Lanczos with full reorthogonalization (two Gram-Schmidt sweeps against the whole basis
/// every step) for the `k` extreme eigenvalues of `H` at the chosen end, with Ritz-residual
/// convergence checks every iteration. On an invariant subspace it restarts with a random
/// vector orthogonal to the basis, so repeated eigenvalues are found too. Each step is one
/// HVP (a pass with one direction): Lanczos is sequential.
///
/// Like every Krylov method it only sees what its subspace has reached: a converged answer
/// can miss further copies of a (nearly) repeated eigenvalue that have not appeared yet.
/// Asking for a few more eigenvalues than needed makes that unlikely.
///
/// Cost: `iterations` HVPs (at most `min(max_iters, d)`), `iterations` passes per batch, and
/// memory for `iterations` flat f64 vectors of length `d`.
pub fn lanczos<T: Scalar, L: BatchLoss<T>>(
    h: &Hessian<'_, T, L>,
    opts: &LanczosOptions,
) -> CurvatureResult<LanczosResult> {
    let d = h.dim();
    if opts.k == 0 || opts.k > d {
        return invalid("k", format!("need 1 <= k <= d = {d}, got {}", opts.k));
    }
    if opts.max_iters < opts.k {
        return invalid(
            "max_iters",
            format!("{} is below k = {}", opts.max_iters, opts.k),
        );
    }
    if opts.tol.is_nan() || opts.tol < 0.0 {
        return invalid("tol", format!("must be >= 0, got {}", opts.tol));
    }
    let start = (h.hvps(), h.passes());
    let max_iters = opts.max_iters.min(d);
    let breakdown = 100.0 * T::epsilon().to_f64().unwrap_or(f64::EPSILON);
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut v = gaussian(&mut rng, d);
    let n0 = norm(&v);
    scale(&mut v, 1.0 / n0);
    let mut basis: Vec<Vec<f64>> = Vec::new();
    let mut alpha: Vec<f64> = Vec::new();
    let mut beta: Vec<f64> = Vec::new(); // beta[j] couples basis j and j + 1
    let mut restarts = 0;
    let mut scale_est: f64 = 0.0;
    let (mut converged, mut exhausted) = (false, false);
    let mut last_beta = 0.0;
    while basis.len() < max_iters {
        let j = basis.len();
        let mut w = h.apply(std::slice::from_ref(&v))?.remove(0);
        let a = dot(&v, &w);
        axpy(&mut w, -a, &v);
        if j > 0 {
            axpy(&mut w, -beta[j - 1], &basis[j - 1]);
        }
        basis.push(v);
        alpha.push(a);
        orthogonalize(&mut w, &basis);
        let b = norm(&w);
        last_beta = b;
        scale_est = scale_est.max(a.abs() + b + beta.last().map_or(0.0, |x: &f64| x.abs()));
        // On an invariant subspace the Ritz pairs are exact but may miss copies of repeated
        // eigenvalues: restart before judging convergence.
        let broke = b <= breakdown * scale_est;
        if !broke && basis.len() >= opts.k {
            let last = basis.len() - 1;
            let eig = tridiagonal_eigen(&alpha, &beta, &[last])?;
            let floor = f64::EPSILON.powf(2.0 / 3.0) * scale_est;
            converged = wanted(&eig.values, opts.k, opts.which)
                .iter()
                .all(|&i| (b * eig.rows[0][i]).abs() <= opts.tol * eig.values[i].abs().max(floor));
            if converged {
                break;
            }
        }
        if basis.len() == max_iters {
            break;
        }
        if broke {
            // Invariant subspace: continue with a fresh direction, uncoupled (beta = 0).
            let mut r = gaussian(&mut rng, d);
            orthogonalize(&mut r, &basis);
            let nr = norm(&r);
            if nr <= 1e-8 * (d as f64).sqrt() {
                exhausted = true;
                break;
            }
            scale(&mut r, 1.0 / nr);
            beta.push(0.0);
            restarts += 1;
            last_beta = 0.0;
            v = r;
        } else {
            scale(&mut w, 1.0 / b);
            beta.push(b);
            v = w;
        }
    }
    let iterations = basis.len();
    let rows: Vec<usize> = if opts.eigenvectors {
        (0..iterations).collect()
    } else {
        vec![iterations - 1]
    };
    let eig = tridiagonal_eigen(&alpha, &beta, &rows)?;
    let last_row = if opts.eigenvectors { iterations - 1 } else { 0 };
    let picked = wanted(&eig.values, opts.k, opts.which);
    let residuals: Vec<f64> = picked
        .iter()
        .map(|&i| (last_beta * eig.rows[last_row][i]).abs())
        .collect();
    if exhausted || iterations == d {
        converged = true;
    }
    let eigenvectors = opts.eigenvectors.then(|| {
        picked
            .iter()
            .map(|&i| {
                let mut y = vec![0.0; d];
                for (r, q) in basis.iter().enumerate() {
                    axpy(&mut y, eig.rows[r][i], q);
                }
                let ny = norm(&y);
                scale(&mut y, 1.0 / ny);
                y
            })
            .collect()
    });
    Ok(LanczosResult {
        eigenvalues: picked.iter().map(|&i| eig.values[i]).collect(),
        residuals,
        eigenvectors,
        ritz_values: eig.values,
        iterations,
        restarts,
        converged,
        dim: d,
        hvps: h.hvps() - start.0,
        passes: h.passes() - start.1,
    })
}

/// Options of [`slq`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlqOptions {
    /// Number of Rademacher probe vectors (at least 1).
    pub probes: usize,
    /// Lanczos steps per probe (at least 1; capped at `d`). Each step gives one quadrature
    /// node per probe.
    pub steps: usize,
    /// Seed of the `StdRng` that draws the probes.
    pub seed: u64,
    /// Reorthogonalize each probe's basis fully (memory: `probes × steps` flat vectors).
    /// Without it only three vectors per probe are kept; the quadrature stays usable but
    /// may show spurious copies of converged extreme nodes.
    pub reorthogonalize: bool,
}

impl Default for SlqOptions {
    fn default() -> Self {
        SlqOptions {
            probes: 8,
            steps: 64,
            seed: 0,
            reorthogonalize: true,
        }
    }
}

/// One probe's Gauss quadrature of the spectral measure `vᵀ δ(H − t) v`.
#[derive(Clone, Debug, PartialEq)]
pub struct SlqProbe {
    /// Quadrature nodes (Ritz values), ascending.
    pub nodes: Vec<f64>,
    /// Quadrature weights (squared first components of the Ritz vectors), summing to 1.
    pub weights: Vec<f64>,
    /// Lanczos steps run for this probe (fewer than asked when it found an invariant
    /// subspace: its quadrature is then exact).
    pub steps: usize,
}

/// Result of [`slq`]: the spectral density `φ(t) = (1/d) Σ_i δ(t − λ_i)` as the average of
/// the probes' quadratures.
#[derive(Clone, Debug, PartialEq)]
pub struct SlqResult {
    /// One quadrature per probe.
    pub probes: Vec<SlqProbe>,
    /// Number of trainable scalars `d`.
    pub dim: usize,
    /// Trace estimate `d · mean_l Σ_j w_j θ_j` (equal to Hutchinson on the same probes).
    pub trace_estimate: f64,
    /// Its sample standard error over probes (NaN for one probe).
    pub trace_std_error: f64,
    /// `trace_estimate / d`: the first moment of the density.
    pub normalized_trace_estimate: f64,
    /// Hessian-vector products spent.
    pub hvps: usize,
    /// Forward-over-reverse passes run.
    pub passes: usize,
}

impl SlqResult {
    /// All nodes and weights, the weights divided by the number of probes (they sum to 1).
    pub fn nodes_and_weights(&self) -> (Vec<f64>, Vec<f64>) {
        let inv = 1.0 / self.probes.len().max(1) as f64;
        let nodes = self.probes.iter().flat_map(|p| p.nodes.iter().copied());
        let weights = self
            .probes
            .iter()
            .flat_map(|p| p.weights.iter().map(move |w| w * inv));
        (nodes.collect(), weights.collect())
    }

    /// The `p`-th moment `∫ t^p φ(t) dt ≈ tr(H^p) / d`.
    pub fn moment(&self, p: i32) -> f64 {
        let (nodes, weights) = self.nodes_and_weights();
        nodes.iter().zip(&weights).map(|(t, w)| w * t.powi(p)).sum()
    }

    /// The density broadened by a Gaussian of width `sigma`, at each point of `grid`.
    pub fn density(&self, grid: &[f64], sigma: f64) -> Vec<f64> {
        let (nodes, weights) = self.nodes_and_weights();
        gaussian_density(&nodes, &weights, grid, sigma)
    }

    /// `points` evenly spaced values from the smallest node minus `pad` to the largest node
    /// plus `pad` (a grid for [`SlqResult::density`]; `pad` = a few `sigma` keeps the tails).
    pub fn grid(&self, points: usize, pad: f64) -> Vec<f64> {
        let (nodes, _) = self.nodes_and_weights();
        let lo = nodes.iter().copied().fold(f64::INFINITY, f64::min) - pad;
        let hi = nodes.iter().copied().fold(f64::NEG_INFINITY, f64::max) + pad;
        if !(lo.is_finite() && hi.is_finite()) || points == 0 {
            return Vec::new();
        }
        if points == 1 {
            return vec![0.5 * (lo + hi)];
        }
        let step = (hi - lo) / (points - 1) as f64;
        (0..points).map(|i| lo + step * i as f64).collect()
    }
}

/// `Σ_i w_i N(t; x_i, σ²)` at each `t` of `grid`: a Gaussian-broadened point measure with
/// nodes `x_i` and weights `w_i` (integrates to `Σ w_i`). `sigma` must be positive.
pub fn gaussian_density(nodes: &[f64], weights: &[f64], grid: &[f64], sigma: f64) -> Vec<f64> {
    let c = 1.0 / (sigma * (2.0 * std::f64::consts::PI).sqrt());
    grid.iter()
        .map(|&t| {
            nodes
                .iter()
                .zip(weights)
                .map(|(&x, &w)| {
                    let u = (t - x) / sigma;
                    w * c * (-0.5 * u * u).exp()
                })
                .sum()
        })
        .collect()
}

/// One probe's Lanczos state in [`slq`].
struct ProbeState {
    v: Vec<f64>,
    prev: Option<Vec<f64>>,
    basis: Vec<Vec<f64>>,
    alpha: Vec<f64>,
    beta: Vec<f64>,
    done: bool,
}

/// Stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019; Ubaru, Chen & Saad 2017):
/// for each Rademacher probe `v = z / √d`, `steps` Lanczos steps give a tridiagonal `T`
/// whose eigenvalues are quadrature nodes and whose squared first eigenvector components
/// are weights. All probes advance in lockstep, so each step is one batched HVP with one
/// direction per active probe. A probe stops early on an invariant subspace (its
/// quadrature is then exact).
///
/// Cost: at most `probes × min(steps, d)` HVPs, in `min(steps, d)` rounds of
/// `ceil(probes / K)` passes per batch.
pub fn slq<T: Scalar, L: BatchLoss<T>>(
    h: &Hessian<'_, T, L>,
    opts: &SlqOptions,
) -> CurvatureResult<SlqResult> {
    if opts.probes == 0 || opts.steps == 0 {
        return invalid(
            "probes / steps",
            format!(
                "need at least 1 each, got {} and {}",
                opts.probes, opts.steps
            ),
        );
    }
    let start = (h.hvps(), h.passes());
    let d = h.dim();
    if opts
        .probes
        .checked_mul(d)
        .is_none_or(|n| n > isize::MAX as usize / 8)
    {
        return invalid(
            "probes",
            format!(
                "{} probes of {d} entries cannot be held in memory",
                opts.probes
            ),
        );
    }
    let steps = opts.steps.min(d);
    let breakdown = 100.0 * T::epsilon().to_f64().unwrap_or(f64::EPSILON);
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let inv_sqrt_d = 1.0 / (d as f64).sqrt();
    let mut states: Vec<ProbeState> = (0..opts.probes)
        .map(|_| {
            let mut v = rademacher(&mut rng, d);
            scale(&mut v, inv_sqrt_d);
            ProbeState {
                v,
                prev: None,
                basis: Vec::new(),
                alpha: Vec::new(),
                beta: Vec::new(),
                done: false,
            }
        })
        .collect();
    for step in 0..steps {
        let active: Vec<usize> = (0..states.len()).filter(|&i| !states[i].done).collect();
        if active.is_empty() {
            break;
        }
        let vs: Vec<Vec<f64>> = active.iter().map(|&i| states[i].v.clone()).collect();
        let hv = h.apply(&vs)?;
        for (&i, mut w) in active.iter().zip(hv) {
            let st = &mut states[i];
            let a = dot(&st.v, &w);
            axpy(&mut w, -a, &st.v);
            if let Some(&b) = st.beta.last() {
                let prev = if opts.reorthogonalize {
                    st.basis.last()
                } else {
                    st.prev.as_ref()
                };
                if let Some(p) = prev {
                    axpy(&mut w, -b, p);
                }
            }
            st.alpha.push(a);
            let v = std::mem::take(&mut st.v);
            if opts.reorthogonalize {
                st.basis.push(v);
                orthogonalize(&mut w, &st.basis);
            } else {
                st.prev = Some(v);
            }
            let b = norm(&w);
            let scale_est = st
                .alpha
                .iter()
                .map(|x| x.abs())
                .chain(st.beta.iter().copied())
                .fold(0.0, f64::max);
            if step + 1 == steps || b <= breakdown * scale_est.max(f64::MIN_POSITIVE) {
                st.done = true;
                st.basis = Vec::new();
                st.prev = None;
            } else {
                scale(&mut w, 1.0 / b);
                st.beta.push(b);
                st.v = w;
            }
        }
    }
    let mut probes = Vec::with_capacity(states.len());
    let mut tr = Running::default();
    for st in &states {
        let eig = tridiagonal_eigen(&st.alpha, &st.beta, &[0])?;
        let raw: Vec<f64> = eig.rows[0].iter().map(|x| x * x).collect();
        let total: f64 = raw.iter().sum();
        let weights: Vec<f64> = raw.iter().map(|w| w / total).collect();
        let first: f64 = eig.values.iter().zip(&weights).map(|(t, w)| t * w).sum();
        tr.push(d as f64 * first);
        probes.push(SlqProbe {
            nodes: eig.values,
            weights,
            steps: st.alpha.len(),
        });
    }
    Ok(SlqResult {
        probes,
        dim: d,
        trace_estimate: tr.mean(),
        trace_std_error: tr.std_error(),
        normalized_trace_estimate: tr.mean() / d as f64,
        hvps: h.hvps() - start.0,
        passes: h.passes() - start.1,
    })
}

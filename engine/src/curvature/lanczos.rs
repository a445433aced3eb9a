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
    check_lanczos_options(opts, d)?;
    let start = (h.hvps(), h.passes());
    let max_iters = opts.max_iters.min(d);
    let breakdown = breakdown_tol::<T>();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut v = gaussian(&mut rng, d);
    let n0 = norm(&v);
    scale(&mut v, 1.0 / n0);
    let mut kr = Krylov::default();
    let (mut converged, mut exhausted) = (false, false);
    while kr.basis.len() < max_iters {
        let w = h.apply(std::slice::from_ref(&v))?.remove(0);
        let (w, b) = kr.step(v, w);
        // On an invariant subspace the Ritz pairs are exact but may miss copies of repeated
        // eigenvalues: restart before judging convergence.
        let broke = b <= breakdown * kr.scale_est;
        if !broke && kr.basis.len() >= opts.k {
            converged = kr.converged(b, opts)?;
            if converged {
                break;
            }
        }
        if kr.basis.len() == max_iters {
            break;
        }
        if broke {
            match kr.restart(&mut rng, d) {
                Some(r) => v = r,
                None => {
                    exhausted = true;
                    break;
                }
            }
        } else {
            v = kr.advance(w, b);
        }
    }
    if exhausted || kr.basis.len() == d {
        converged = true;
    }
    let spent = (h.hvps() - start.0, h.passes() - start.1);
    kr.finish(opts, d, converged, spent)
}

/// Checks `k`, `max_iters` and `tol` of [`lanczos`] against the dimension `d`.
fn check_lanczos_options(opts: &LanczosOptions, d: usize) -> CurvatureResult<()> {
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
    Ok(())
}

/// Relative size of a Lanczos residual below which the subspace counts as invariant.
fn breakdown_tol<T: Scalar>() -> f64 {
    100.0 * T::epsilon().to_f64().unwrap_or(f64::EPSILON)
}

/// The three-term recurrence: with `w = H v`, removes `α v` and `β_prev v_prev` from `w`;
/// gives `α = v·w`.
fn recurrence(w: &mut [f64], v: &[f64], prev: Option<(f64, &[f64])>) -> f64 {
    let a = dot(v, w);
    axpy(w, -a, v);
    if let Some((b, p)) = prev {
        axpy(w, -b, p);
    }
    a
}

/// The growing basis and tridiagonal matrix of [`lanczos`].
#[derive(Default)]
struct Krylov {
    basis: Vec<Vec<f64>>,
    alpha: Vec<f64>,
    /// `beta[j]` couples basis vectors `j` and `j + 1` (0 after a restart).
    beta: Vec<f64>,
    restarts: usize,
    /// Running estimate of ‖H‖, for the breakdown test and the convergence floor.
    scale_est: f64,
    /// Norm of the last residual (0 after a restart): Ritz residuals are it times a row.
    last_beta: f64,
}

impl Krylov {
    /// Appends unit `v` (with `w = H v`) to the basis; gives the fully reorthogonalized
    /// residual `w` and its norm.
    fn step(&mut self, v: Vec<f64>, mut w: Vec<f64>) -> (Vec<f64>, f64) {
        let j = self.basis.len();
        let prev = (j > 0).then(|| (self.beta[j - 1], self.basis[j - 1].as_slice()));
        let a = recurrence(&mut w, &v, prev);
        self.basis.push(v);
        self.alpha.push(a);
        orthogonalize(&mut w, &self.basis);
        let b = norm(&w);
        self.last_beta = b;
        let beta_prev = self.beta.last().map_or(0.0, |x: &f64| x.abs());
        self.scale_est = self.scale_est.max(a.abs() + b + beta_prev);
        (w, b)
    }

    /// Whether every wanted Ritz pair meets the tolerance, `b` being the last residual norm.
    fn converged(&self, b: f64, opts: &LanczosOptions) -> CurvatureResult<bool> {
        let last = self.basis.len() - 1;
        let eig = tridiagonal_eigen(&self.alpha, &self.beta, &[last])?;
        let floor = f64::EPSILON.powf(2.0 / 3.0) * self.scale_est;
        Ok(wanted(&eig.values, opts.k, opts.which)
            .iter()
            .all(|&i| (b * eig.rows[0][i]).abs() <= opts.tol * eig.values[i].abs().max(floor)))
    }

    /// The next basis vector `w / b`.
    fn advance(&mut self, mut w: Vec<f64>, b: f64) -> Vec<f64> {
        scale(&mut w, 1.0 / b);
        self.beta.push(b);
        w
    }

    /// Invariant subspace: a fresh random unit direction orthogonal to the basis,
    /// uncoupled (beta = 0); `None` when the basis already spans the space.
    fn restart(&mut self, rng: &mut StdRng, d: usize) -> Option<Vec<f64>> {
        let mut r = gaussian(rng, d);
        orthogonalize(&mut r, &self.basis);
        let nr = norm(&r);
        if nr <= 1e-8 * (d as f64).sqrt() {
            return None;
        }
        scale(&mut r, 1.0 / nr);
        self.beta.push(0.0);
        self.restarts += 1;
        self.last_beta = 0.0;
        Some(r)
    }

    /// Ritz values, residuals and (when asked) unit Ritz vectors of the wanted pairs;
    /// `spent` is (HVPs, passes).
    fn finish(
        self,
        opts: &LanczosOptions,
        d: usize,
        converged: bool,
        spent: (usize, usize),
    ) -> CurvatureResult<LanczosResult> {
        let iterations = self.basis.len();
        let rows: Vec<usize> = if opts.eigenvectors {
            (0..iterations).collect()
        } else {
            vec![iterations - 1]
        };
        let eig = tridiagonal_eigen(&self.alpha, &self.beta, &rows)?;
        let last_row = if opts.eigenvectors { iterations - 1 } else { 0 };
        let picked = wanted(&eig.values, opts.k, opts.which);
        let residuals: Vec<f64> = picked
            .iter()
            .map(|&i| (self.last_beta * eig.rows[last_row][i]).abs())
            .collect();
        let eigenvectors = opts.eigenvectors.then(|| {
            picked
                .iter()
                .map(|&i| ritz_vector(&self.basis, &eig.rows, i, d))
                .collect()
        });
        Ok(LanczosResult {
            eigenvalues: picked.iter().map(|&i| eig.values[i]).collect(),
            residuals,
            eigenvectors,
            ritz_values: eig.values,
            iterations,
            restarts: self.restarts,
            converged,
            dim: d,
            hvps: spent.0,
            passes: spent.1,
        })
    }
}

/// Unit Ritz vector `i`: `Σ_r rows[r][i] basis[r]`, normalized.
fn ritz_vector(basis: &[Vec<f64>], rows: &[Vec<f64>], i: usize, d: usize) -> Vec<f64> {
    let mut y = vec![0.0; d];
    for (r, q) in basis.iter().enumerate() {
        axpy(&mut y, rows[r][i], q);
    }
    let ny = norm(&y);
    scale(&mut y, 1.0 / ny);
    y
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

impl ProbeState {
    /// A fresh probe `v = z / √d` with Rademacher `z`.
    fn new(rng: &mut StdRng, d: usize) -> Self {
        let inv_sqrt_d = 1.0 / (d as f64).sqrt();
        let mut v = rademacher(rng, d);
        scale(&mut v, inv_sqrt_d);
        ProbeState {
            v,
            prev: None,
            basis: Vec::new(),
            alpha: Vec::new(),
            beta: Vec::new(),
            done: false,
        }
    }

    /// One Lanczos step with `w = H v`; `last`: this is the final step. Marks the probe
    /// done (and frees its vectors) on the final step or an invariant subspace.
    fn step(&mut self, mut w: Vec<f64>, last: bool, reorthogonalize: bool, breakdown: f64) {
        let prev = match self.beta.last() {
            Some(&b) if reorthogonalize => self.basis.last().map(|p| (b, p.as_slice())),
            Some(&b) => self.prev.as_deref().map(|p| (b, p)),
            None => None,
        };
        let a = recurrence(&mut w, &self.v, prev);
        self.alpha.push(a);
        let v = std::mem::take(&mut self.v);
        if reorthogonalize {
            self.basis.push(v);
            orthogonalize(&mut w, &self.basis);
        } else {
            self.prev = Some(v);
        }
        let b = norm(&w);
        let scale_est = self
            .alpha
            .iter()
            .map(|x| x.abs())
            .chain(self.beta.iter().copied())
            .fold(0.0, f64::max);
        if last || b <= breakdown * scale_est.max(f64::MIN_POSITIVE) {
            self.done = true;
            self.basis = Vec::new();
            self.prev = None;
        } else {
            scale(&mut w, 1.0 / b);
            self.beta.push(b);
            self.v = w;
        }
    }

    /// The probe's Gauss quadrature, and its first moment `Σ_j w_j θ_j`.
    fn quadrature(&self) -> CurvatureResult<(SlqProbe, f64)> {
        let eig = tridiagonal_eigen(&self.alpha, &self.beta, &[0])?;
        let raw: Vec<f64> = eig.rows[0].iter().map(|x| x * x).collect();
        let total: f64 = raw.iter().sum();
        let weights: Vec<f64> = raw.iter().map(|w| w / total).collect();
        let first: f64 = eig.values.iter().zip(&weights).map(|(t, w)| t * w).sum();
        let probe = SlqProbe {
            nodes: eig.values,
            weights,
            steps: self.alpha.len(),
        };
        Ok((probe, first))
    }
}

/// Checks `probes` and `steps` of [`slq`] against the dimension `d`.
fn check_slq_options(opts: &SlqOptions, d: usize) -> CurvatureResult<()> {
    if opts.probes == 0 || opts.steps == 0 {
        return invalid(
            "probes / steps",
            format!(
                "need at least 1 each, got {} and {}",
                opts.probes, opts.steps
            ),
        );
    }
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
    Ok(())
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
    let d = h.dim();
    check_slq_options(opts, d)?;
    let start = (h.hvps(), h.passes());
    let steps = opts.steps.min(d);
    let breakdown = breakdown_tol::<T>();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut states: Vec<ProbeState> = (0..opts.probes)
        .map(|_| ProbeState::new(&mut rng, d))
        .collect();
    for step in 0..steps {
        let active: Vec<usize> = (0..states.len()).filter(|&i| !states[i].done).collect();
        if active.is_empty() {
            break;
        }
        let vs: Vec<Vec<f64>> = active.iter().map(|&i| states[i].v.clone()).collect();
        let hv = h.apply(&vs)?;
        for (&i, w) in active.iter().zip(hv) {
            states[i].step(w, step + 1 == steps, opts.reorthogonalize, breakdown);
        }
    }
    let mut probes = Vec::with_capacity(states.len());
    let mut tr = Running::default();
    for st in &states {
        let (probe, first) = st.quadrature()?;
        tr.push(d as f64 * first);
        probes.push(probe);
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

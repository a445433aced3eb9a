//! Stochastic trace estimators: Hutchinson with a confidence-interval stopping rule, and
//! Hutch++ (Meyer, Musco, Musco & Woodruff 2021).

use super::linalg::{dot, orthogonalize, orthonormal_columns, rademacher, Running};
use super::operator::{BatchLoss, Hessian, ParamLayout};
use super::{invalid, CurvatureResult};
use crate::scalar::Scalar;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Options of [`hutchinson`].
#[derive(Clone, Debug, PartialEq)]
pub struct HutchinsonOptions {
    /// Seed of the `StdRng` that draws the Rademacher probes (the probe sequence depends on
    /// the seed only, not on how probes are batched).
    pub seed: u64,
    /// Probes drawn before the stopping rule is consulted (at least 2).
    pub min_probes: usize,
    /// Hard cap on probes (at least `min_probes`).
    pub max_probes: usize,
    /// Stop once `t · se / |mean| <= rel_tol` (the relative half-width of the confidence
    /// interval). 0 never stops early.
    pub rel_tol: f64,
    /// Normal quantile of the confidence level (1.96 for 95 %); the interval uses the
    /// Student-t quantile of the same level with `probes − 1` degrees of freedom
    /// ([`student_t_quantile`]), which matters for few probes.
    pub z: f64,
    /// Probes per round (the rule is checked after each round); `None`: `K` times the
    /// concurrent passes, so that a round fills the passes.
    pub probes_per_round: Option<usize>,
}

impl Default for HutchinsonOptions {
    fn default() -> Self {
        HutchinsonOptions {
            seed: 0,
            min_probes: 10,
            max_probes: 1000,
            rel_tol: 0.01,
            z: 1.96,
            probes_per_round: None,
        }
    }
}

/// Result of [`hutchinson`].
#[derive(Clone, Debug, PartialEq)]
pub struct HutchinsonResult {
    /// The trace estimate: the mean of `zᵀ H z` over the probes.
    pub estimate: f64,
    /// Sample standard error of the mean.
    pub std_error: f64,
    /// `t · std_error`: half-width of the confidence interval (`t` the Student-t quantile
    /// of the level of `z` with `probes − 1` degrees of freedom).
    pub half_width: f64,
    /// `half_width / |estimate|` (0 when the standard error is 0).
    pub relative_half_width: f64,
    /// Probes used (= HVPs).
    pub probes: usize,
    /// True when the stopping rule was met (false: stopped at `max_probes`).
    pub converged: bool,
    /// Number of trainable scalars `d`.
    pub dim: usize,
    /// `estimate / d`.
    pub normalized_estimate: f64,
    /// `std_error / d`.
    pub normalized_std_error: f64,
    /// Per-tensor trace estimates (the same probes restricted to each tensor's block).
    pub block_estimates: Vec<f64>,
    /// Standard errors of `block_estimates`.
    pub block_std_errors: Vec<f64>,
    /// The samples `zᵀ H z`, in probe order.
    pub samples: Vec<f64>,
    /// Hessian-vector products spent (= `probes`).
    pub hvps: usize,
    /// Forward-over-reverse passes run.
    pub passes: usize,
}

/// Checks `min_probes`, `max_probes`, `rel_tol` and `z` of [`hutchinson`].
fn check_hutchinson_options(opts: &HutchinsonOptions) -> CurvatureResult<()> {
    if opts.min_probes < 2 {
        return invalid(
            "min_probes",
            format!("must be at least 2, got {}", opts.min_probes),
        );
    }
    if opts.max_probes < opts.min_probes {
        return invalid(
            "max_probes",
            format!(
                "{} is below min_probes {}",
                opts.max_probes, opts.min_probes
            ),
        );
    }
    let tol_ok = opts.rel_tol >= 0.0;
    if !tol_ok || !opts.z.is_finite() || opts.z <= 0.0 {
        return invalid(
            "rel_tol / z",
            format!(
                "need rel_tol >= 0 and z > 0, got {} and {}",
                opts.rel_tol, opts.z
            ),
        );
    }
    Ok(())
}

/// Relative half-width `t · se / |mean|` of the confidence interval of `r` (0 when the
/// standard error is 0), `t` the Student-t quantile of the level of `z`.
fn relative_half_width(r: &Running, z: f64) -> f64 {
    let se = r.std_error();
    if se == 0.0 {
        0.0
    } else {
        student_t_quantile(z, r.count().saturating_sub(1)) * se / r.mean().abs()
    }
}

/// Hutchinson samples `zᵀ H z`, in total and per parameter tensor.
struct Tally {
    total: Running,
    blocks: Vec<Running>,
    samples: Vec<f64>,
}

impl Tally {
    /// Adds the probes `zs` with their products `hzs`, blocks summed in tensor order.
    fn add(&mut self, layout: &ParamLayout, zs: &[Vec<f64>], hzs: &[Vec<f64>]) {
        for (z, hz) in zs.iter().zip(hzs) {
            let mut s = 0.0;
            for (i, blk) in self.blocks.iter_mut().enumerate() {
                let r = layout.range(i);
                let v = dot(&z[r.clone()], &hz[r]);
                blk.push(v);
                s += v;
            }
            self.total.push(s);
            self.samples.push(s);
        }
    }
}

/// Hutchinson's trace estimator with Rademacher probes `z`: `tr(H) ≈ mean(zᵀ H z)`.
/// Probes go through the batched HVP a round at a time; after each round, once at least
/// `min_probes` are in, it stops when the relative half-width of the confidence interval
/// `z · se / |mean|` is at most `rel_tol`, or at `max_probes`.
///
/// Cost: one HVP per probe (`probes` in the result, between `min_probes` and `max_probes`,
/// rounded up to whole rounds below the cap).
pub fn hutchinson<T: Scalar, L: BatchLoss<T>>(
    h: &Hessian<'_, T, L>,
    opts: &HutchinsonOptions,
) -> CurvatureResult<HutchinsonResult> {
    check_hutchinson_options(opts)?;
    let round = opts
        .probes_per_round
        .unwrap_or_else(|| h.config().directions_per_pass * h.config().concurrent_passes);
    if round == 0 {
        return invalid("probes_per_round", "must be at least 1, got 0");
    }
    let start = (h.hvps(), h.passes());
    let layout = h.layout();
    let d = layout.dim();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut tally = Tally {
        total: Running::default(),
        blocks: vec![Running::default(); layout.num_tensors()],
        samples: Vec::new(),
    };
    let converged = loop {
        let n = tally.total.count();
        if n >= opts.min_probes && relative_half_width(&tally.total, opts.z) <= opts.rel_tol {
            break true;
        }
        if n >= opts.max_probes {
            break false;
        }
        let want = if n < opts.min_probes {
            round.max(opts.min_probes - n)
        } else {
            round
        };
        let take = want.min(opts.max_probes - n);
        let probes: Vec<Vec<f64>> = (0..take).map(|_| rademacher(&mut rng, d)).collect();
        let hz = h.apply(&probes)?;
        tally.add(layout, &probes, &hz);
    };
    let Tally {
        total,
        blocks,
        samples,
    } = tally;
    let estimate = total.mean();
    let se = total.std_error();
    Ok(HutchinsonResult {
        estimate,
        std_error: se,
        half_width: student_t_quantile(opts.z, total.count().saturating_sub(1)) * se,
        relative_half_width: relative_half_width(&total, opts.z),
        probes: total.count(),
        converged,
        dim: d,
        normalized_estimate: estimate / d as f64,
        normalized_std_error: se / d as f64,
        block_estimates: blocks.iter().map(|b| b.mean()).collect(),
        block_std_errors: blocks.iter().map(|b| b.std_error()).collect(),
        samples,
        hvps: h.hvps() - start.0,
        passes: h.passes() - start.1,
    })
}

/// The two-sided Student-t quantile with `dof` degrees of freedom at the confidence level
/// whose normal quantile is `z` (e.g. 1.96 → 2.262 for 9 degrees of freedom), by the
/// Cornish-Fisher expansion in `1/dof` (Hill 1970), accurate to about 1e-3 for `dof >= 3`
/// at usual levels. `dof = 0` (a single sample) gives infinity; `dof` 1 and 2 use the exact
/// closed forms.
pub fn student_t_quantile(z: f64, dof: usize) -> f64 {
    match dof {
        0 => f64::INFINITY,
        1 | 2 => {
            // Upper tail probability of z under the normal law, then the exact t inverse.
            let p = 0.5 * erfc(z / std::f64::consts::SQRT_2);
            if dof == 1 {
                (std::f64::consts::PI * (0.5 - p)).tan()
            } else {
                let a = 4.0 * p * (1.0 - p);
                (2.0 * (1.0 - 2.0 * p).powi(2) / a).sqrt()
            }
        }
        _ => {
            let v = dof as f64;
            let z2 = z * z;
            let g1 = (z2 + 1.0) * z / 4.0;
            let g2 = ((5.0 * z2 + 16.0) * z2 + 3.0) * z / 96.0;
            let g3 = (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) * z / 384.0;
            let g4 =
                ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) * z / 92160.0;
            z + g1 / v + g2 / (v * v) + g3 / (v * v * v) + g4 / (v * v * v * v)
        }
    }
}

/// The complementary error function, for [`student_t_quantile`]'s small-dof cases: the
/// Maclaurin series of `erf` (summed until the terms vanish; about 1e-10 accurate) for
/// `|x| <= 4`, the first terms of the asymptotic series beyond (relative error below 1e-4).
fn erfc(x: f64) -> f64 {
    if x.abs() > 4.0 {
        let x2 = x * x;
        let tail = (-x2).exp() / (x.abs() * std::f64::consts::PI.sqrt())
            * (1.0 - 0.5 / x2 + 0.75 / (x2 * x2));
        return if x > 0.0 { tail } else { 2.0 - tail };
    }
    // erf(x) = 2/√π Σ_n (−1)ⁿ x^(2n+1) / (n! (2n+1))
    let (x2, mut power, mut sum) = (x * x, x, 0.0);
    for n in 0..200 {
        let term = power / (2 * n + 1) as f64;
        sum += term;
        if term.abs() < 1e-17 * sum.abs().max(1e-300) {
            break;
        }
        power *= -x2 / (n + 1) as f64;
    }
    1.0 - 2.0 / std::f64::consts::PI.sqrt() * sum
}

/// Options of [`hutch_plus_plus`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HutchPlusPlusOptions {
    /// Total Hessian-vector products `m` (at least 6): `m / 3` for the sketch, up to `m / 3`
    /// for the exact trace on its range, the rest for Hutchinson on the deflated Hessian.
    pub budget: usize,
    /// Seed of the `StdRng` that draws the sketch and the probes.
    pub seed: u64,
}

impl Default for HutchPlusPlusOptions {
    fn default() -> Self {
        HutchPlusPlusOptions {
            budget: 99,
            seed: 0,
        }
    }
}

/// Result of [`hutch_plus_plus`].
#[derive(Clone, Debug, PartialEq)]
pub struct HutchPlusPlusResult {
    /// The trace estimate `tr(Qᵀ H Q) + residual_estimate`.
    pub estimate: f64,
    /// Standard error of the estimate (that of the Hutchinson part; the rest is exact given
    /// `Q`).
    pub std_error: f64,
    /// Half-width of the 95% confidence interval: `std_error` times the Student-t quantile
    /// with `residual_probes − 1` degrees of freedom (2.26 for 10 probes, not 1.96).
    pub half_width: f64,
    /// `tr(Qᵀ H Q)`, exact, over the sketched subspace.
    pub top_trace: f64,
    /// Hutchinson estimate of `tr((I − QQᵀ) H (I − QQᵀ))`.
    pub residual_estimate: f64,
    /// Columns of the sketch `S` (`m / 3`).
    pub sketch_size: usize,
    /// Rank of `Q` kept after orthonormalizing `H S` (at most `sketch_size`).
    pub rank: usize,
    /// Probes of the Hutchinson part (`m − sketch_size − rank`).
    pub residual_probes: usize,
    /// Number of trainable scalars `d`.
    pub dim: usize,
    /// `estimate / d`.
    pub normalized_estimate: f64,
    /// `std_error / d`.
    pub normalized_std_error: f64,
    /// Hessian-vector products spent (= `budget`).
    pub hvps: usize,
    /// Forward-over-reverse passes run.
    pub passes: usize,
}

/// Hutch++: `Q = orth(H S)` for a Rademacher sketch `S` with `m / 3` columns (modified
/// Gram-Schmidt with reorthogonalization), then `tr(Qᵀ H Q)` exactly, plus Hutchinson with
/// the remaining probes `g` on `(I − QQᵀ) H (I − QQᵀ)`. Far lower variance than Hutchinson
/// when a few large eigenvalues dominate the spectrum.
///
/// Cost: exactly `budget` HVPs, in two rounds: `m / 3` for `H S`, then `rank + g` together.
pub fn hutch_plus_plus<T: Scalar, L: BatchLoss<T>>(
    h: &Hessian<'_, T, L>,
    opts: &HutchPlusPlusOptions,
) -> CurvatureResult<HutchPlusPlusResult> {
    let m = opts.budget;
    if m < 6 {
        return invalid("budget", format!("must be at least 6 HVPs, got {m}"));
    }
    let start = (h.hvps(), h.passes());
    let d = h.dim();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let s = m / 3;
    let sketch: Vec<Vec<f64>> = (0..s).map(|_| rademacher(&mut rng, d)).collect();
    let hs = h.apply(&sketch)?;
    let q = orthonormal_columns(&hs);
    let rank = q.len();
    let g = m - s - rank;
    let mut dirs = q.clone();
    for _ in 0..g {
        let mut z = rademacher(&mut rng, d);
        orthogonalize(&mut z, &q);
        dirs.push(z);
    }
    let hd = h.apply(&dirs)?;
    let top_trace: f64 = q.iter().zip(&hd).map(|(qi, hqi)| dot(qi, hqi)).sum();
    let mut resid = Running::default();
    for (z, hz) in dirs[rank..].iter().zip(&hd[rank..]) {
        resid.push(dot(z, hz));
    }
    let estimate = top_trace + resid.mean();
    let se = resid.std_error();
    Ok(HutchPlusPlusResult {
        estimate,
        std_error: se,
        half_width: student_t_quantile(1.96, g.saturating_sub(1)) * se,
        top_trace,
        residual_estimate: resid.mean(),
        sketch_size: s,
        rank,
        residual_probes: g,
        dim: d,
        normalized_estimate: estimate / d as f64,
        normalized_std_error: se / d as f64,
        hvps: h.hvps() - start.0,
        passes: h.passes() - start.1,
    })
}

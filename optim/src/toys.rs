//! Test problems with known minima manifolds (paper.md §5), in f64 on flat vectors, with the
//! tools to measure flatness: the limit map Φ of gradient flow, the tangent projector `∂Φ`
//! at a minimum, the normalized trace `tr̄ = tr(∇²f)/d` and the flatness residual
//! `‖∂Φ(x*) ∇tr̄(x*)‖` at `x* = Φ(x)`.
//!
//! - [`Hyperbola`]: `f(x) = (x1 x2 − 1)²` (paper.md §5, substitute for Example 1), X* the
//!   hyperbola `x1 x2 = 1`, flat minima `±(1, 1)`;
//! - [`Valley`]: `f(x) = ½ (1 + x1²) x2²` (X), X* the axis `x2 = 0`, flat minimum the origin;
//! - [`DiagLinearNet`]: a diagonal linear network `p_i(u, v) = Σ_j a_ij u_j v_j` with square
//!   loss, n samples, any dimension d = 2m (X), flat minima balanced (`|u_j| = |v_j|`).
//!
//! Every problem is a finite sum `f = (1/n) Σ_i f_i` ([`FiniteSum`]; the first two have
//! n = 1) with analytic gradients, Hessian, `∇ tr ∇²f` and third derivatives
//! `∇³f_i[u, u]`, and a tape version of the loss ([`FiniteSum::tape_loss`]) so the analytic
//! formulas can be checked against the engine's exact Hessian-vector products
//! ([`engine_hvp`], [`engine_third`], [`engine_grad_trace`]). [`ToyOracle`] exposes a problem
//! to the optimizers (full gradient, single-sample and sub-batch gradients), counting
//! queries. All three losses are polynomials of degree 4, so the perturbation expectations of
//! paper.md §4 hold exactly: `E_g ∇f(x + ρg) = ∇f(x) + (ρ²/2)∇tr̄(x)` for g uniform on the
//! sphere and `E_σ ∇f_i(x + σρn) = ∇f_i(x) + (ρ²/2)∇³f_i(x)[n, n]` for a random sign σ.

use crate::rng::Rng;
use crate::{OptimError, Optimizer, Oracle, Probe, Result};
use flatmin_engine::curvature::hvp;
use flatmin_engine::{Tape, Tensor, Var};

/// A finite-sum loss `f = (1/n) Σ_i f_i` on `R^d` with analytic derivatives; see the module docs.
pub trait FiniteSum: Sync {
    /// Dimension d.
    fn dim(&self) -> usize;
    /// Number of samples n.
    fn samples(&self) -> usize;
    /// `f_i(x)` and `∇f_i(x)`.
    fn sample_loss_grad(&self, i: usize, x: &[f64]) -> (f64, Vec<f64>);
    /// Hessian `∇²f(x)`, row-major d × d.
    fn hessian(&self, x: &[f64]) -> Vec<f64>;
    /// `∇ tr ∇²f(x)`.
    fn grad_trace(&self, x: &[f64]) -> Vec<f64>;
    /// `∇³f_i(x)[u, u] = ∇_x (uᵀ ∇²f_i(x) u)`.
    fn sample_third(&self, i: usize, x: &[f64], u: &[f64]) -> Vec<f64>;
    /// Rows spanning the normal space of the minima manifold at a minimum `x` (the
    /// constraint gradients `∇p_i`).
    fn normals(&self, x: &[f64]) -> Vec<Vec<f64>>;
    /// An upper bound on `‖∇²f(x)‖₂` (step control of the flow integrator).
    fn smoothness(&self, x: &[f64]) -> f64 {
        self.hessian(x).iter().map(|v| v * v).sum::<f64>().sqrt()
    }
    /// The limit map `Φ(x)` of gradient flow (default: [`flow_limit`]).
    fn phi(&self, x: &[f64]) -> Vec<f64> {
        flow_limit(self, x, 1e-12, 2_000_000)
    }
    /// The loss on a tape, from one parameter `x` of shape `[d]`: `f` (`sample = None`) or
    /// `f_i` (`sample = Some(i)`).
    fn tape_loss(
        &self,
        tape: &mut Tape<f64>,
        x: Var,
        sample: Option<usize>,
    ) -> flatmin_engine::Result<Var>;

    /// `f(x)` and `∇f(x)` (mean over the samples).
    fn loss_grad(&self, x: &[f64]) -> (f64, Vec<f64>) {
        self.subset_loss_grad(&(0..self.samples()).collect::<Vec<_>>(), x)
    }

    /// Mean loss and gradient over the samples `idx`.
    fn subset_loss_grad(&self, idx: &[usize], x: &[f64]) -> (f64, Vec<f64>) {
        let mut l = 0.0;
        let mut g = vec![0.0; self.dim()];
        for &i in idx {
            let (li, gi) = self.sample_loss_grad(i, x);
            l += li;
            axpy(&mut g, 1.0, &gi);
        }
        let k = idx.len().max(1) as f64;
        g.iter_mut().for_each(|v| *v /= k);
        (l / k, g)
    }
}

fn dotv(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Euclidean norm of a flat vector.
pub fn normv(a: &[f64]) -> f64 {
    dotv(a, a).sqrt()
}

fn axpy(y: &mut [f64], a: f64, x: &[f64]) {
    y.iter_mut().zip(x).for_each(|(yi, xi)| *yi += a * xi);
}

/// `M v` for a row-major d × d matrix.
pub fn matvec(m: &[f64], v: &[f64]) -> Vec<f64> {
    let d = v.len();
    (0..d).map(|r| dotv(&m[r * d..(r + 1) * d], v)).collect()
}

/// `tr̄(x) = tr ∇²f(x) / d`.
pub fn trace_bar<P: FiniteSum + ?Sized>(p: &P, x: &[f64]) -> f64 {
    let d = p.dim();
    let h = p.hessian(x);
    (0..d).map(|i| h[i * d + i]).sum::<f64>() / d as f64
}

/// `∇tr̄(x) = ∇ tr ∇²f(x) / d`.
pub fn grad_trace_bar<P: FiniteSum + ?Sized>(p: &P, x: &[f64]) -> Vec<f64> {
    let d = p.dim() as f64;
    p.grad_trace(x).into_iter().map(|v| v / d).collect()
}

/// Orthogonal projector onto the tangent space of the minima manifold at the minimum `x`:
/// `I − Nᵀ (N Nᵀ)⁻¹ N` with N the rows of [`FiniteSum::normals`] (row-major d × d). At a
/// minimum this is `∂Φ(x)` (paper.md §1.2, F2).
pub fn tangent_projector<P: FiniteSum + ?Sized>(p: &P, x: &[f64]) -> Vec<f64> {
    let d = p.dim();
    let n = p.normals(x);
    let k = n.len();
    // Gram matrix and its Cholesky factor.
    let mut l = vec![0.0; k * k];
    for i in 0..k {
        for j in 0..=i {
            let mut s = dotv(&n[i], &n[j]);
            for q in 0..j {
                s -= l[i * k + q] * l[j * k + q];
            }
            l[i * k + j] = if i == j {
                s.max(0.0).sqrt()
            } else {
                s / l[j * k + j]
            };
        }
    }
    let solve = |b: &[f64]| -> Vec<f64> {
        let mut y = b.to_vec();
        for i in 0..k {
            for q in 0..i {
                y[i] -= l[i * k + q] * y[q];
            }
            y[i] /= l[i * k + i];
        }
        for i in (0..k).rev() {
            for q in i + 1..k {
                y[i] -= l[q * k + i] * y[q];
            }
            y[i] /= l[i * k + i];
        }
        y
    };
    let mut proj = vec![0.0; d * d];
    for c in 0..d {
        // Column c of Nᵀ (N Nᵀ)⁻¹ N.
        let b: Vec<f64> = n.iter().map(|row| row[c]).collect();
        let y = solve(&b);
        for r in 0..d {
            let v: f64 = (0..k).map(|i| n[i][r] * y[i]).sum();
            proj[r * d + c] = f64::from(u8::from(r == c)) - v;
        }
    }
    proj
}

/// Flatness residual `‖∂Φ(x*) ∇tr̄(x*)‖` at `x* = Φ(x)` (Definition 3: the second part of
/// `(ε, ε')`-flatness).
pub fn flatness_residual<P: FiniteSum + ?Sized>(p: &P, x: &[f64]) -> f64 {
    let xs = p.phi(x);
    normv(&matvec(&tangent_projector(p, &xs), &grad_trace_bar(p, &xs)))
}

/// Distance `‖x − Φ(x)‖` to the minimum gradient flow reaches.
pub fn distance_to_minima<P: FiniteSum + ?Sized>(p: &P, x: &[f64]) -> f64 {
    let xs = p.phi(x);
    normv(&x.iter().zip(&xs).map(|(a, b)| a - b).collect::<Vec<_>>())
}

/// `(ε, ε')`-flat (Definition 3): `‖x − Φ(x)‖ ≤ ε` and the flatness residual `≤ ε'`.
pub fn is_flat<P: FiniteSum + ?Sized>(p: &P, x: &[f64], eps: f64, eps_prime: f64) -> bool {
    distance_to_minima(p, x) <= eps && flatness_residual(p, x) <= eps_prime
}

/// Φ(x) by integrating `ẋ = −∇f(x)` with classical Runge–Kutta (step `0.1 / L`, L from
/// [`FiniteSum::smoothness`]) until `‖∇f‖ ≤ tol` or `max_steps` steps.
pub fn flow_limit<P: FiniteSum + ?Sized>(
    p: &P,
    x0: &[f64],
    tol: f64,
    max_steps: usize,
) -> Vec<f64> {
    let mut x = x0.to_vec();
    let grad = |x: &[f64]| p.loss_grad(x).1;
    for _ in 0..max_steps {
        let k1 = grad(&x);
        if normv(&k1) <= tol {
            break;
        }
        let h = (0.1 / p.smoothness(&x).max(1e-12)).min(1.0);
        let at =
            |k: &[f64], s: f64| -> Vec<f64> { x.iter().zip(k).map(|(a, b)| a - s * b).collect() };
        let k2 = grad(&at(&k1, h / 2.0));
        let k3 = grad(&at(&k2, h / 2.0));
        let k4 = grad(&at(&k3, h));
        for i in 0..x.len() {
            x[i] -= h / 6.0 * (k1[i] + 2.0 * k2[i] + 2.0 * k3[i] + k4[i]);
        }
    }
    x
}

/// `f(x1, x2) = (x1 x2 − 1)²`: Setting 1 with n = 1, `p = x1 x2`, y = 1, square loss.
///
/// `tr̄ = x1² + x2²`, X* = `{x1 x2 = 1}`; gradient flow conserves `c = x1² − x2²` and the sign
/// of `x1 + x2`, so `Φ(x) = sign(x1 + x2) (a, 1/a)` with `a² = (c + √(c² + 4))/2`,
/// `tr̄(Φ(x)) = √(c² + 4)` and flatness residual `2|c| / (c² + 4)^{1/4}`. Flat minima `±(1, 1)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Hyperbola;

impl Hyperbola {
    /// The flat minima `(1, 1)` and `(−1, −1)`.
    pub fn flat_minima() -> [[f64; 2]; 2] {
        [[1.0, 1.0], [-1.0, -1.0]]
    }

    /// The flow invariant (balance) `c = x1² − x2²`; 0 exactly at the flat minima.
    pub fn balance(x: &[f64]) -> f64 {
        x[0] * x[0] - x[1] * x[1]
    }

    /// The point `(a, 1/a)` of X*.
    pub fn minimum(a: f64) -> Vec<f64> {
        vec![a, 1.0 / a]
    }

    /// Closed-form flatness residual `2|c| / (c² + 4)^{1/4}` at `Φ(x)`.
    pub fn residual_closed_form(x: &[f64]) -> f64 {
        let c = Self::balance(x);
        2.0 * c.abs() / (c * c + 4.0).powf(0.25)
    }
}

/// Selects coordinate block `[from, from + len)` of a `[1, d]` row on the tape.
fn select(
    tape: &mut Tape<f64>,
    row: Var,
    d: usize,
    from: usize,
    len: usize,
) -> flatmin_engine::Result<Var> {
    let mut s = vec![0.0; d * len];
    for j in 0..len {
        s[(from + j) * len + j] = 1.0;
    }
    let sv = tape.constant(Tensor::from_vec(&[d, len], s)?);
    tape.matmul(row, sv)
}

impl FiniteSum for Hyperbola {
    fn dim(&self) -> usize {
        2
    }
    fn samples(&self) -> usize {
        1
    }
    fn sample_loss_grad(&self, _i: usize, x: &[f64]) -> (f64, Vec<f64>) {
        let r = x[0] * x[1] - 1.0;
        (r * r, vec![2.0 * r * x[1], 2.0 * r * x[0]])
    }
    fn hessian(&self, x: &[f64]) -> Vec<f64> {
        let off = 2.0 * (2.0 * x[0] * x[1] - 1.0);
        vec![2.0 * x[1] * x[1], off, off, 2.0 * x[0] * x[0]]
    }
    fn grad_trace(&self, x: &[f64]) -> Vec<f64> {
        vec![4.0 * x[0], 4.0 * x[1]]
    }
    fn sample_third(&self, _i: usize, x: &[f64], u: &[f64]) -> Vec<f64> {
        vec![
            2.0 * (4.0 * x[1] * u[0] * u[1] + 2.0 * x[0] * u[1] * u[1]),
            2.0 * (2.0 * x[1] * u[0] * u[0] + 4.0 * x[0] * u[0] * u[1]),
        ]
    }
    fn normals(&self, x: &[f64]) -> Vec<Vec<f64>> {
        vec![vec![x[1], x[0]]]
    }
    fn phi(&self, x: &[f64]) -> Vec<f64> {
        let c = Self::balance(x);
        let a = ((c + (c * c + 4.0).sqrt()) / 2.0).sqrt();
        let s = if x[0] + x[1] >= 0.0 { 1.0 } else { -1.0 };
        vec![s * a, s / a]
    }
    fn tape_loss(
        &self,
        tape: &mut Tape<f64>,
        x: Var,
        _sample: Option<usize>,
    ) -> flatmin_engine::Result<Var> {
        let row = tape.reshape(x, &[1, 2])?;
        let x1 = select(tape, row, 2, 0, 1)?;
        let x2 = select(tape, row, 2, 1, 1)?;
        let p = tape.mul(x1, x2)?;
        let r = tape.add_scalar(p, -1.0)?;
        let s = tape.square(r)?;
        tape.sum(s)
    }
}

/// `f(x) = ½ (1 + x1²) x2²` (X): X* = `{x2 = 0}`, `tr̄ = (1 + x1² + x2²)/2`; at `(x1, 0)`,
/// `∂Φ = e1 e1ᵀ` and `∂Φ ∇tr̄ = x1 e1`; flat minimum the origin. Gradient flow conserves
/// `ln|x1| + (x1² − x2²)/2` and the sign of x1, so `Φ(x) = sign(x1) (a, 0)` with
/// `ln a + a²/2 = ln|x1| + (x1² − x2²)/2`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Valley;

impl FiniteSum for Valley {
    fn dim(&self) -> usize {
        2
    }
    fn samples(&self) -> usize {
        1
    }
    fn sample_loss_grad(&self, _i: usize, x: &[f64]) -> (f64, Vec<f64>) {
        let a = 1.0 + x[0] * x[0];
        (0.5 * a * x[1] * x[1], vec![x[0] * x[1] * x[1], a * x[1]])
    }
    fn hessian(&self, x: &[f64]) -> Vec<f64> {
        let off = 2.0 * x[0] * x[1];
        vec![x[1] * x[1], off, off, 1.0 + x[0] * x[0]]
    }
    fn grad_trace(&self, x: &[f64]) -> Vec<f64> {
        vec![2.0 * x[0], 2.0 * x[1]]
    }
    fn sample_third(&self, _i: usize, x: &[f64], u: &[f64]) -> Vec<f64> {
        vec![
            4.0 * x[1] * u[0] * u[1] + 2.0 * x[0] * u[1] * u[1],
            2.0 * x[1] * u[0] * u[0] + 4.0 * x[0] * u[0] * u[1],
        ]
    }
    fn normals(&self, _x: &[f64]) -> Vec<Vec<f64>> {
        vec![vec![0.0, 1.0]]
    }
    fn phi(&self, x: &[f64]) -> Vec<f64> {
        if x[0] == 0.0 {
            return vec![0.0, 0.0];
        }
        let k = x[0].abs().ln() + (x[0] * x[0] - x[1] * x[1]) / 2.0;
        // Solve s + e^{2s}/2 = k for s = ln a (increasing and convex in s): bracket, then
        // Newton steps safeguarded by bisection.
        let h = |s: f64| s + (2.0 * s).exp() / 2.0 - k;
        let (mut lo, mut hi) = (k.min(0.0) - 1.0, k.max(0.0) + 1.0);
        while h(lo) > 0.0 {
            lo -= 2.0 * (1.0 + lo.abs());
        }
        while h(hi) < 0.0 {
            hi += 1.0;
        }
        let mut s = 0.5 * (lo + hi);
        for _ in 0..200 {
            let v = h(s);
            if v.abs() <= 1e-15 * (1.0 + k.abs()) || hi - lo <= 1e-15 {
                break;
            }
            if v > 0.0 {
                hi = s;
            } else {
                lo = s;
            }
            let next = s - v / (1.0 + (2.0 * s).exp());
            s = if next >= lo && next <= hi {
                next
            } else {
                0.5 * (lo + hi)
            };
        }
        vec![x[0].signum() * s.exp(), 0.0]
    }
    fn tape_loss(
        &self,
        tape: &mut Tape<f64>,
        x: Var,
        _sample: Option<usize>,
    ) -> flatmin_engine::Result<Var> {
        let row = tape.reshape(x, &[1, 2])?;
        let x1 = select(tape, row, 2, 0, 1)?;
        let x2 = select(tape, row, 2, 1, 1)?;
        let a = tape.square(x1)?;
        let a = tape.add_scalar(a, 1.0)?;
        let b = tape.square(x2)?;
        let f = tape.mul(a, b)?;
        let f = tape.mul_scalar(f, 0.5)?;
        tape.sum(f)
    }
}

/// Diagonal linear network (X): `x = (u, v) ∈ R^{2m}`, `p_i(x) = Σ_j a_ij u_j v_j`,
/// `f_i = ½ (p_i − y_i)²`, `y_i = p_i(x_true)`.
///
/// `tr ∇²f = (1/n) Σ_i Σ_j a_ij² (u_j² + v_j²)` (everywhere, as `tr ∇²p_i = 0`); gradient
/// flow conserves every `u_j² − v_j²`, so GD keeps the imbalance and flat minima are
/// balanced. Φ is computed by [`flow_limit`].
#[derive(Clone, Debug)]
pub struct DiagLinearNet {
    m: usize,
    a: Vec<Vec<f64>>,
    y: Vec<f64>,
    w_true: Vec<f64>,
}

impl DiagLinearNet {
    /// `n` samples in width `m` (d = 2m): `a_ij ~ N(0, 1/m)`, `w_true ~ N(0, 1)` with
    /// `|w_true,j| ≥ 0.2` (no coordinate near the degenerate `u_j = v_j = 0`), `y = A w_true`,
    /// all drawn from `seed`.
    pub fn new(m: usize, n: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let s = 1.0 / (m as f64).sqrt();
        let a: Vec<Vec<f64>> = (0..n)
            .map(|_| (0..m).map(|_| s * rng.normal_pair().0).collect())
            .collect();
        let w_true: Vec<f64> = (0..m)
            .map(|_| {
                let z = rng.normal_pair().0;
                z.signum() * z.abs().max(0.2)
            })
            .collect();
        let y = a.iter().map(|row| dotv(row, &w_true)).collect();
        DiagLinearNet { m, a, y, w_true }
    }

    /// Width m.
    pub fn width(&self) -> usize {
        self.m
    }

    /// A global minimum with product `w_true` and imbalance `kappa`:
    /// `u_j = sign(w_j) κ √|w_j|`, `v_j = √|w_j| / κ` (κ = 1: balanced).
    pub fn minimum(&self, kappa: f64) -> Vec<f64> {
        let mut x = vec![0.0; 2 * self.m];
        for (j, &w) in self.w_true.iter().enumerate() {
            x[j] = w.signum() * kappa * w.abs().sqrt();
            x[self.m + j] = w.abs().sqrt() / kappa;
        }
        x
    }

    fn pred(&self, i: usize, x: &[f64]) -> f64 {
        let (u, v) = x.split_at(self.m);
        (0..self.m).map(|j| self.a[i][j] * u[j] * v[j]).sum()
    }

    fn grad_p(&self, i: usize, x: &[f64]) -> Vec<f64> {
        let (u, v) = x.split_at(self.m);
        let mut g = vec![0.0; 2 * self.m];
        for j in 0..self.m {
            g[j] = self.a[i][j] * v[j];
            g[self.m + j] = self.a[i][j] * u[j];
        }
        g
    }

    /// `∇²p_i w` (the constant Hessian of `p_i` applied to w).
    fn hess_p(&self, i: usize, w: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; 2 * self.m];
        for j in 0..self.m {
            out[j] = self.a[i][j] * w[self.m + j];
            out[self.m + j] = self.a[i][j] * w[j];
        }
        out
    }
}

impl FiniteSum for DiagLinearNet {
    fn dim(&self) -> usize {
        2 * self.m
    }
    fn samples(&self) -> usize {
        self.y.len()
    }
    fn sample_loss_grad(&self, i: usize, x: &[f64]) -> (f64, Vec<f64>) {
        let r = self.pred(i, x) - self.y[i];
        let mut g = self.grad_p(i, x);
        g.iter_mut().for_each(|v| *v *= r);
        (0.5 * r * r, g)
    }
    fn hessian(&self, x: &[f64]) -> Vec<f64> {
        let d = self.dim();
        let n = self.samples() as f64;
        let mut h = vec![0.0; d * d];
        for i in 0..self.samples() {
            let gp = self.grad_p(i, x);
            let r = self.pred(i, x) - self.y[i];
            for a in 0..d {
                for b in 0..d {
                    h[a * d + b] += gp[a] * gp[b] / n;
                }
            }
            for j in 0..self.m {
                h[j * d + self.m + j] += r * self.a[i][j] / n;
                h[(self.m + j) * d + j] += r * self.a[i][j] / n;
            }
        }
        h
    }
    fn grad_trace(&self, x: &[f64]) -> Vec<f64> {
        let n = self.samples() as f64;
        let mut g = vec![0.0; self.dim()];
        for row in &self.a {
            for j in 0..self.m {
                let c = 2.0 * row[j] * row[j] / n;
                g[j] += c * x[j];
                g[self.m + j] += c * x[self.m + j];
            }
        }
        g
    }
    fn sample_third(&self, i: usize, x: &[f64], u: &[f64]) -> Vec<f64> {
        // ∇_x (uᵀ∇²f_i u) with uᵀ∇²f_i u = (∇p_i·u)² + r_i uᵀ∇²p_i u and ∇²p_i constant.
        let gp = self.grad_p(i, x);
        let hu = self.hess_p(i, u);
        let gpu = dotv(&gp, u);
        let uhu = dotv(u, &hu);
        gp.iter()
            .zip(&hu)
            .map(|(g, h)| 2.0 * gpu * h + uhu * g)
            .collect()
    }
    fn normals(&self, x: &[f64]) -> Vec<Vec<f64>> {
        (0..self.samples()).map(|i| self.grad_p(i, x)).collect()
    }
    fn smoothness(&self, x: &[f64]) -> f64 {
        let n = self.samples() as f64;
        (0..self.samples())
            .map(|i| {
                let gp = self.grad_p(i, x);
                let r = (self.pred(i, x) - self.y[i]).abs();
                let amax = self.a[i].iter().fold(0.0f64, |m, v| m.max(v.abs()));
                (dotv(&gp, &gp) + r * amax) / n
            })
            .sum()
    }
    fn tape_loss(
        &self,
        tape: &mut Tape<f64>,
        x: Var,
        sample: Option<usize>,
    ) -> flatmin_engine::Result<Var> {
        let (m, d) = (self.m, self.dim());
        let rows: Vec<usize> = match sample {
            Some(i) => vec![i],
            None => (0..self.samples()).collect(),
        };
        let row = tape.reshape(x, &[1, d])?;
        let u = select(tape, row, d, 0, m)?;
        let v = select(tape, row, d, m, m)?;
        let w = tape.mul(u, v)?;
        let mut at = vec![0.0; m * rows.len()];
        for (c, &i) in rows.iter().enumerate() {
            for j in 0..m {
                at[j * rows.len() + c] = self.a[i][j];
            }
        }
        let at = tape.constant(Tensor::from_vec(&[m, rows.len()], at)?);
        let p = tape.matmul(w, at)?;
        let y = tape.constant(Tensor::from_vec(
            &[1, rows.len()],
            rows.iter().map(|&i| self.y[i]).collect(),
        )?);
        let r = tape.sub(p, y)?;
        let s = tape.square(r)?;
        let f = tape.mean(s)?;
        tape.mul_scalar(f, 0.5)
    }
}

/// A problem's flat vector as optimizer parameters (one tensor of shape `[d]`).
pub fn to_params(x: &[f64]) -> Vec<Tensor<f64>> {
    vec![Tensor::from_vec(&[x.len()], x.to_vec()).expect("shape matches")]
}

/// Optimizer parameters back to a flat vector.
pub fn from_params(p: &[Tensor<f64>]) -> Vec<f64> {
    p.iter().flat_map(|t| t.data().to_vec()).collect()
}

/// A [`FiniteSum`] as a gradient oracle on parameters [`to_params`]: the step's batch is the
/// whole dataset (so `eval` is the full gradient `∇f`), [`Probe::SubBatch`] averages the
/// chosen samples (one index: `∇f_i`). Counts oracle calls and per-sample gradients.
pub struct ToyOracle<'a, P: ?Sized> {
    problem: &'a P,
    /// Oracle calls so far (each full, sub-batch or single-sample gradient counts one).
    pub calls: usize,
    /// Per-sample gradients computed so far (a full gradient counts n).
    pub sample_grads: usize,
}

impl<'a, P: FiniteSum + ?Sized> ToyOracle<'a, P> {
    /// An oracle over `problem` with zero counters.
    pub fn new(problem: &'a P) -> Self {
        ToyOracle {
            problem,
            calls: 0,
            sample_grads: 0,
        }
    }

    fn out(
        &mut self,
        idx: Option<&[usize]>,
        params: &[Tensor<f64>],
    ) -> Result<(f64, Vec<Tensor<f64>>)> {
        let x = from_params(params);
        if x.len() != self.problem.dim() {
            return Err(OptimError::Oracle(format!(
                "{} parameters for a {}-dimensional problem",
                x.len(),
                self.problem.dim()
            )));
        }
        self.calls += 1;
        let (l, g) = match idx {
            None => {
                self.sample_grads += self.problem.samples();
                self.problem.loss_grad(&x)
            }
            Some(idx) => {
                if idx.is_empty() || idx.iter().any(|&i| i >= self.problem.samples()) {
                    return Err(OptimError::Oracle(format!(
                        "sample positions {idx:?} out of range"
                    )));
                }
                self.sample_grads += idx.len();
                self.problem.subset_loss_grad(idx, &x)
            }
        };
        Ok((l, to_params(&g)))
    }
}

impl<P: FiniteSum + ?Sized> Oracle<f64> for ToyOracle<'_, P> {
    fn eval(&mut self, params: &[Tensor<f64>]) -> Result<(f64, Vec<Tensor<f64>>)> {
        self.out(None, params)
    }

    fn eval_on(
        &mut self,
        params: &[Tensor<f64>],
        probe: &Probe,
    ) -> Result<(f64, Vec<Tensor<f64>>)> {
        match probe {
            Probe::Batch => self.out(None, params),
            Probe::SubBatch { indices } => self.out(Some(indices), params),
            Probe::Fresh { .. } => Err(OptimError::Unsupported(
                "fresh batches on a toy problem".into(),
            )),
        }
    }

    fn batch_len(&self) -> Option<usize> {
        Some(self.problem.samples())
    }
}

/// How a [`drive`] run went.
#[derive(Clone, Debug, PartialEq)]
pub struct DriveReport {
    /// Optimizer steps taken.
    pub steps: usize,
    /// Oracle calls.
    pub oracle_calls: usize,
    /// Per-sample gradients.
    pub sample_grads: usize,
    /// Whether `done` said yes.
    pub reached: bool,
    /// Final parameters.
    pub x: Vec<f64>,
}

/// Runs `opt` on `problem` from `x0` with learning rate `lr` until `done(x)` (asked every
/// `check_every` steps) or `max_steps` steps.
pub fn drive<P: FiniteSum + ?Sized>(
    problem: &P,
    opt: &mut dyn Optimizer<f64>,
    x0: &[f64],
    lr: f64,
    max_steps: usize,
    check_every: usize,
    mut done: impl FnMut(&[f64]) -> bool,
) -> Result<DriveReport> {
    let mut oracle = ToyOracle::new(problem);
    let mut params = to_params(x0);
    let mut reached = false;
    let mut steps = 0;
    while steps < max_steps {
        opt.step(&mut params, &mut oracle, lr)?;
        steps += 1;
        if steps % check_every.max(1) == 0 && done(&from_params(&params)) {
            reached = true;
            break;
        }
    }
    Ok(DriveReport {
        steps,
        oracle_calls: oracle.calls,
        sample_grads: oracle.sample_grads,
        reached,
        x: from_params(&params),
    })
}

/// `∇²f_i(x) v` (or `∇²f(x) v` with `sample = None`) by the engine's forward-over-reverse
/// Hessian-vector product on [`FiniteSum::tape_loss`].
pub fn engine_hvp<P: FiniteSum + ?Sized>(
    p: &P,
    x: &[f64],
    v: &[f64],
    sample: Option<usize>,
) -> Vec<f64> {
    let r = hvp(&to_params(x), &[to_params(v)], |t, vars| {
        p.tape_loss(t, vars[0], sample)
    })
    .expect("toy losses record on the tape");
    from_params(&r.hvp[0])
}

/// `∇³f_i(x)[u, u]` as the central difference of engine HVPs, `(H(x + hu)u − H(x − hu)u)/2h`
/// (exact up to rounding for the quartic toys, whose Hessians are quadratic in x).
pub fn engine_third<P: FiniteSum + ?Sized>(
    p: &P,
    x: &[f64],
    u: &[f64],
    sample: Option<usize>,
    h: f64,
) -> Vec<f64> {
    let plus: Vec<f64> = x.iter().zip(u).map(|(a, b)| a + h * b).collect();
    let minus: Vec<f64> = x.iter().zip(u).map(|(a, b)| a - h * b).collect();
    let hp = engine_hvp(p, &plus, u, sample);
    let hm = engine_hvp(p, &minus, u, sample);
    hp.iter()
        .zip(&hm)
        .map(|(a, b)| (a - b) / (2.0 * h))
        .collect()
}

/// `∇ tr ∇²f(x) = Σ_j ∂_j (∇²f e_j)` (symmetry of the third derivative) from 2d engine HVPs.
pub fn engine_grad_trace<P: FiniteSum + ?Sized>(p: &P, x: &[f64], h: f64) -> Vec<f64> {
    let d = p.dim();
    let mut out = vec![0.0; d];
    for j in 0..d {
        let mut e = vec![0.0; d];
        e[j] = 1.0;
        let t = engine_third(p, x, &e, None, h);
        axpy(&mut out, 1.0, &t);
    }
    out
}

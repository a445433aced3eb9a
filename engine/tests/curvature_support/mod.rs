//! Shared fixtures of the curvature tests: a tiny tanh MLP, a low-rank-dominated quadratic,
//! an explicitly assembled Hessian and a dense symmetric eigensolver (cyclic Jacobi).
#![allow(dead_code)]

use flatmin_engine::curvature::hvp;
use flatmin_engine::{Result, Scalar, Tape, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// A tiny MLP `x -> tanh(x W1ᵀ + b1) W2ᵀ + b2` with cross-entropy: data and parameters.
pub struct Mlp<T> {
    pub params: Vec<Tensor<T>>,
    pub x: Tensor<T>,
    pub labels: Vec<usize>,
}

pub const MLP_IN: usize = 5;
pub const MLP_HIDDEN: usize = 7;
pub const MLP_CLASSES: usize = 3;

impl<T: Scalar> Mlp<T> {
    /// `n` samples; d = 5·7 + 7 + 7·3 + 3 = 66.
    pub fn new(n: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let params = vec![
            Tensor::uniform(&[MLP_HIDDEN, MLP_IN], -0.8, 0.8, &mut rng),
            Tensor::uniform(&[MLP_HIDDEN], -0.3, 0.3, &mut rng),
            Tensor::uniform(&[MLP_CLASSES, MLP_HIDDEN], -0.8, 0.8, &mut rng),
            Tensor::uniform(&[MLP_CLASSES], -0.3, 0.3, &mut rng),
        ];
        let x = Tensor::randn(&[n, MLP_IN], &mut rng);
        let labels = (0..n).map(|i| (i * 7 + 3) % MLP_CLASSES).collect();
        Mlp { params, x, labels }
    }

    /// The loss on samples `rows` (a mean over them).
    pub fn loss_on(&self, rows: std::ops::Range<usize>, t: &mut Tape<T>, v: &[Var]) -> Result<Var> {
        let n = rows.len();
        let data = self.x.data()[rows.start * MLP_IN..rows.end * MLP_IN].to_vec();
        let x = t.constant(Tensor::from_vec(&[n, MLP_IN], data)?);
        let h = t.linear(x, v[0], Some(v[1]))?;
        let h = t.tanh(h)?;
        let z = t.linear(h, v[2], Some(v[3]))?;
        t.cross_entropy(z, &self.labels[rows])
    }

    /// The loss on all samples.
    pub fn loss(&self, t: &mut Tape<T>, v: &[Var]) -> Result<Var> {
        self.loss_on(0..self.labels.len(), t, v)
    }
}

/// `f(θ) = ½ Σ_i λ_i (u_iᵀθ)² + ε Σ_j tanh(a_jᵀθ) + ½ δ ‖θ‖²` for θ of shape `[1, d]`, with
/// orthonormal `u_i`: a Hessian dominated by the few large `λ_i`.
pub struct LowRank {
    pub params: Vec<Tensor<f64>>,
    pub u: Tensor<f64>,
    pub a: Tensor<f64>,
    pub eps: f64,
    pub delta: f64,
}

impl LowRank {
    pub fn new(d: usize, lambdas: &[f64], p: usize, eps: f64, delta: f64, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let r = lambdas.len();
        // Orthonormal columns by Gram-Schmidt on Gaussian vectors.
        let mut cols: Vec<Vec<f64>> = Vec::new();
        for _ in 0..r {
            let mut c = Tensor::<f64>::randn(&[d], &mut rng).into_vec();
            for _ in 0..2 {
                for q in &cols {
                    let ip: f64 = q.iter().zip(&c).map(|(a, b)| a * b).sum();
                    c.iter_mut().zip(q).for_each(|(x, y)| *x -= ip * y);
                }
            }
            let n = c.iter().map(|x| x * x).sum::<f64>().sqrt();
            c.iter_mut().for_each(|x| *x /= n);
            cols.push(c);
        }
        let mut u = vec![0.0; d * r];
        for (i, c) in cols.iter().enumerate() {
            for (row, &x) in c.iter().enumerate() {
                u[row * r + i] = x * lambdas[i].sqrt();
            }
        }
        LowRank {
            params: vec![Tensor::uniform(&[1, d], -1.0, 1.0, &mut rng)],
            u: Tensor::from_vec(&[d, r], u).unwrap(),
            a: Tensor::uniform(&[d, p], -0.2, 0.2, &mut rng),
            eps,
            delta,
        }
    }

    pub fn loss(&self, t: &mut Tape<f64>, v: &[Var]) -> Result<Var> {
        let u = t.constant(self.u.clone());
        let y = t.matmul(v[0], u)?;
        let y2 = t.square(y)?;
        let quad = t.sum(y2)?;
        let quad = t.mul_scalar(quad, 0.5)?;
        let a = t.constant(self.a.clone());
        let s = t.matmul(v[0], a)?;
        let s = t.tanh(s)?;
        let s = t.sum(s)?;
        let s = t.mul_scalar(s, self.eps)?;
        let th2 = t.square(v[0])?;
        let ridge = t.sum(th2)?;
        let ridge = t.mul_scalar(ridge, 0.5 * self.delta)?;
        let f = t.add(quad, s)?;
        t.add(f, ridge)
    }
}

/// The full Hessian, assembled column by column with one single-direction HVP per column
/// (independent of the curvature module's batching). Symmetrized. Row-major `d × d`.
pub fn explicit_hessian(
    params: &[Tensor<f64>],
    loss: impl Fn(&mut Tape<f64>, &[Var]) -> Result<Var>,
) -> Vec<Vec<f64>> {
    let d: usize = params.iter().map(|p| p.numel()).sum();
    let mut cols = Vec::with_capacity(d);
    for j in 0..d {
        let mut off = 0;
        let dir: Vec<Tensor<f64>> = params
            .iter()
            .map(|p| {
                let mut t = Tensor::zeros(p.shape());
                if (off..off + p.numel()).contains(&j) {
                    t.data_mut()[j - off] = 1.0;
                }
                off += p.numel();
                t
            })
            .collect();
        let r = hvp(params, &[dir], &loss).unwrap();
        let col: Vec<f64> = r.hvp[0].iter().flat_map(|t| t.data().to_vec()).collect();
        cols.push(col);
    }
    (0..d)
        .map(|i| (0..d).map(|j| 0.5 * (cols[j][i] + cols[i][j])).collect())
        .collect()
}

/// Eigenvalues (ascending) of a symmetric matrix by cyclic Jacobi rotations.
pub fn jacobi_eigenvalues(m: &[Vec<f64>]) -> Vec<f64> {
    let n = m.len();
    let mut a: Vec<Vec<f64>> = m.to_vec();
    let total: f64 = a.iter().flatten().map(|x| x * x).sum();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        if off <= 1e-30 * total {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q] == 0.0 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for row in a.iter_mut() {
                    let (kp, kq) = (row[p], row[q]);
                    row[p] = c * kp - s * kq;
                    row[q] = s * kp + c * kq;
                }
                let (lo, hi) = a.split_at_mut(q);
                for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
                    let (pk, qk) = (*x, *y);
                    *x = c * pk - s * qk;
                    *y = s * pk + c * qk;
                }
            }
        }
    }
    let mut ev: Vec<f64> = (0..n).map(|i| a[i][i]).collect();
    ev.sort_by(|x, y| x.total_cmp(y));
    ev
}

/// `M v` for a dense row-major matrix.
pub fn matvec(m: &[Vec<f64>], v: &[f64]) -> Vec<f64> {
    m.iter()
        .map(|row| row.iter().zip(v).map(|(a, b)| a * b).sum())
        .collect()
}

pub fn rel_err(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

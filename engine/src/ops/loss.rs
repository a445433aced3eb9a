//! Softmax-family ops and losses: log_softmax, cross_entropy (fused with softmax), mse.
//!
//! log_softmax over the last axis, y = z − lse(z), p = softmax(z) = e^y:
//! - JVP: ẏ = ż − ⟨p, ż⟩;  VJP: z̄ = ȳ − p Σȳ;  tangent of VJP: z̄˙ = ȳ˙ − p Σȳ˙ − ṗ Σȳ,
//!   with ṗ = p ⊙ ẏ.
//!
//! cross_entropy of logits z `[N, C]` and integer labels y, L = (1/N) Σ_n (lse(z_n) − z_n[y_n]):
//! - JVP: L̇ = (1/N) Σ_n (⟨p_n, ż_n⟩ − ż_n[y_n])
//! - VJP: z̄ = (L̄/N)(p − e_y)
//! - tangent of VJP: z̄˙ = (L̄˙/N)(p − e_y) + (L̄/N) ṗ, with ṗ = p ⊙ (ż − ⟨p, ż⟩)
//!
//! mse(a, b) = mean((a − b)²) is composed from sub, square and mean, which carry its rules;
//! so is the one-hot MSE objective ([`Loss::Mse`]).
//!
//! [`Loss`] names the training objective; [`Loss::sample_head`] gives, per sample, the loss,
//! its gradient in the logits and a square-root factor of its Hessian in the logits, the
//! three things the structural trace needs from a loss.

use super::{tangent_shape, Op, Rule};
use crate::error::{EngineError, Result};
use crate::scalar::Scalar;
use crate::tape::{Sink, Tape, Var};
use crate::tensor::Tensor;

/// The training objective on logits `[N, C]` and integer labels, averaged over samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Loss {
    /// Mean softmax cross-entropy, (1/N) Σ_n (lse(z_n) − z_n[y_n]).
    #[default]
    CrossEntropy,
    /// Mean squared error against one-hot targets, averaged over all N·C logits as PyTorch's
    /// `mse_loss(z, one_hot(y))`: (1/(N·C)) Σ_n ‖z_n − e_{y_n}‖². Its minima are attained
    /// (zero loss), unlike cross-entropy's.
    Mse,
}

/// One sample's loss, its gradient in the logits and a factor `S` of its Hessian in the
/// logits (`Σ_c s_c s_cᵀ = ∇²_z ℓ`, one row per column `s_c`), in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleHead {
    /// The sample's loss ℓ_n (its mean over samples is the batch loss).
    pub loss: f64,
    /// ∂ℓ_n/∂z_n.
    pub grad: Vec<f64>,
    /// The rows `s_c` of the Hessian factor, `C` of them.
    pub factor: Vec<Vec<f64>>,
}

impl Loss {
    /// Every objective, in the order the command line lists them.
    pub const ALL: [Loss; 2] = [Loss::CrossEntropy, Loss::Mse];

    /// The name used by the command line and in records: `ce` or `mse`.
    pub fn name(self) -> &'static str {
        match self {
            Loss::CrossEntropy => "ce",
            Loss::Mse => "mse",
        }
    }

    /// Parses `ce` (also `cross-entropy`) or `mse`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ce" | "cross-entropy" | "cross_entropy" => Some(Loss::CrossEntropy),
            "mse" => Some(Loss::Mse),
            _ => None,
        }
    }

    /// The loss of one sample with logits `z` and label `label` (`< z.len()`), its gradient
    /// and its Hessian factor: for cross-entropy `p − e_y` and `s_c = √p_c (e_c − p)`; for the
    /// one-hot MSE `(2/C)(z − e_y)` and `s_c = √(2/C) e_c`.
    pub fn sample_head(self, z: &[f64], label: usize) -> SampleHead {
        let c = z.len();
        let onehot = |j: usize| if j == label { 1.0 } else { 0.0 };
        match self {
            Loss::CrossEntropy => {
                let mx = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = z.iter().map(|&v| (v - mx).exp()).collect();
                let s: f64 = e.iter().sum();
                let p: Vec<f64> = e.iter().map(|&v| v / s).collect();
                SampleHead {
                    loss: s.ln() + mx - z[label],
                    grad: (0..c).map(|j| p[j] - onehot(j)).collect(),
                    factor: (0..c)
                        .map(|k| {
                            let sk = p[k].sqrt();
                            (0..c)
                                .map(|j| sk * (if j == k { 1.0 } else { 0.0 } - p[j]))
                                .collect()
                        })
                        .collect(),
                }
            }
            Loss::Mse => {
                let scale = 2.0 / c as f64;
                let root = scale.sqrt();
                SampleHead {
                    loss: (0..c).map(|j| (z[j] - onehot(j)).powi(2)).sum::<f64>() / c as f64,
                    grad: (0..c).map(|j| scale * (z[j] - onehot(j))).collect(),
                    factor: (0..c)
                        .map(|k| (0..c).map(|j| if j == k { root } else { 0.0 }).collect())
                        .collect(),
                }
            }
        }
    }
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Checks logits `[N, C]` (N, C ≥ 1) against `N` labels below `C`; returns `(N, C)`.
fn check_logits(op: &'static str, s: &[usize], labels: &[usize]) -> Result<(usize, usize)> {
    if s.len() != 2 || s[0] != labels.len() || s[1] == 0 || s[0] == 0 {
        return Err(EngineError::Shape {
            op,
            detail: format!("logits {s:?} with {} labels", labels.len()),
        });
    }
    if let Some((row, &label)) = labels.iter().enumerate().find(|(_, &l)| l >= s[1]) {
        return Err(EngineError::Label {
            op,
            label,
            row,
            classes: s[1],
        });
    }
    Ok((s[0], s[1]))
}

pub(crate) struct LogSoftmax {
    z: usize,
    classes: usize,
}

pub(crate) struct CrossEntropy<T> {
    z: usize,
    labels: Vec<usize>,
    /// Softmax probabilities `[N, C]`.
    p: Vec<T>,
}

/// Softmax of one row into `p`; returns log-sum-exp.
fn softmax_row<T: Scalar>(z: &[T], p: &mut [T]) -> T {
    let mx = z.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
    let mut s = T::zero();
    for (pi, &zi) in p.iter_mut().zip(z) {
        *pi = (zi - mx).exp();
        s = s + *pi;
    }
    for pi in p.iter_mut() {
        *pi = *pi / s;
    }
    mx + s.ln()
}

fn dot<T: Scalar>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::zero(), |s, (&x, &y)| s + x * y)
}

impl<T: Scalar> Tape<T> {
    /// log_softmax over the last axis.
    pub fn log_softmax(&mut self, z: Var) -> Result<Var> {
        self.check_var(z)?;
        let zv = self.value(z);
        let classes = *zv.shape().last().ok_or(EngineError::Shape {
            op: "log_softmax",
            detail: "needs at least one axis".into(),
        })?;
        if classes == 0 {
            return Err(EngineError::Shape {
                op: "log_softmax",
                detail: "empty last axis".into(),
            });
        }
        let mut y = Tensor::zeros(zv.shape());
        let mut p = vec![T::zero(); classes];
        for (zr, yr) in zv
            .data()
            .chunks(classes)
            .zip(y.data_mut().chunks_mut(classes))
        {
            let lse = softmax_row(zr, &mut p);
            for (yi, &zi) in yr.iter_mut().zip(zr) {
                *yi = zi - lse;
            }
        }
        let tangent = self.tangent(z).map(|zt| {
            let mut t = zt.clone();
            let rows = zv.numel() / classes;
            for (r, tr) in t.data_mut().chunks_mut(classes).enumerate() {
                let yr = &y.data()[(r % rows) * classes..(r % rows + 1) * classes];
                let pz = yr
                    .iter()
                    .zip(tr.iter())
                    .fold(T::zero(), |s, (&l, &v)| s + l.exp() * v);
                for v in tr.iter_mut() {
                    *v = *v - pz;
                }
            }
            t
        });
        Ok(self.push(
            Op::LogSoftmax(LogSoftmax { z: z.0, classes }),
            y,
            tangent,
            false,
        ))
    }

    /// Mean cross-entropy of logits `[N, C]` against integer labels (one per row).
    pub fn cross_entropy(&mut self, z: Var, labels: &[usize]) -> Result<Var> {
        self.check_var(z)?;
        let zv = self.value(z);
        let (n, c) = check_logits("cross_entropy", zv.shape(), labels)?;
        let mut p = vec![T::zero(); n * c];
        let mut total = T::zero();
        for (r, (zr, pr)) in zv.data().chunks(c).zip(p.chunks_mut(c)).enumerate() {
            let lse = softmax_row(zr, pr);
            total = total + (lse - zr[labels[r]]);
        }
        let inv_n = T::one() / T::from_usize_lossy(n);
        let y = Tensor::scalar(total * inv_n);
        let tangent = self.tangent(z).map(|zt| {
            let v: Vec<T> = zt
                .data()
                .chunks(n * c)
                .map(|tk| {
                    let mut acc = T::zero();
                    for (r, tr) in tk.chunks(c).enumerate() {
                        acc = acc + dot(&p[r * c..(r + 1) * c], tr) - tr[labels[r]];
                    }
                    acc * inv_n
                })
                .collect();
            let k = v.len();
            Tensor::from_vec(&[k], v).expect("loss tangent")
        });
        let op = CrossEntropy {
            z: z.0,
            labels: labels.to_vec(),
            p,
        };
        Ok(self.push(Op::CrossEntropy(op), y, tangent, false))
    }

    /// Mean squared error, mean((a − b)²), composed from sub, square and mean.
    pub fn mse(&mut self, a: Var, b: Var) -> Result<Var> {
        let d = self.sub(a, b)?;
        let d2 = self.square(d)?;
        self.mean(d2)
    }

    /// The one-hot MSE objective [`Loss::Mse`] of logits `[N, C]` against integer labels.
    pub fn mse_one_hot(&mut self, z: Var, labels: &[usize]) -> Result<Var> {
        self.check_var(z)?;
        let (n, c) = check_logits("mse_one_hot", self.value(z).shape(), labels)?;
        let mut target = Tensor::zeros(&[n, c]);
        for (row, &l) in target.data_mut().chunks_mut(c).zip(labels) {
            row[l] = T::one();
        }
        let t = self.constant(target);
        self.mse(z, t)
    }

    /// The objective `kind` of logits `[N, C]` against integer labels.
    pub fn loss(&mut self, kind: Loss, z: Var, labels: &[usize]) -> Result<Var> {
        match kind {
            Loss::CrossEntropy => self.cross_entropy(z, labels),
            Loss::Mse => self.mse_one_hot(z, labels),
        }
    }
}

impl<T: Scalar> Rule<T> for LogSoftmax {
    fn inputs(&self) -> Vec<usize> {
        vec![self.z]
    }

    fn backward(
        &self,
        tape: &Tape<T>,
        out: usize,
        gy: &Tensor<T>,
        gdot: Option<&Tensor<T>>,
        sink: &mut Sink<T>,
    ) {
        let c = self.classes;
        let yv = &tape.node(out).value;
        let yt = tape.node(out).tangent.as_ref();
        let rows = yv.numel() / c;
        let mut gz = gy.clone();
        let mut gsum = Vec::with_capacity(rows);
        for (r, gr) in gz.data_mut().chunks_mut(c).enumerate() {
            let yr = &yv.data()[r * c..(r + 1) * c];
            let s = gr.iter().fold(T::zero(), |a, &b| a + b);
            gsum.push(s);
            for (g, &l) in gr.iter_mut().zip(yr) {
                *g = *g - l.exp() * s;
            }
        }
        let k = tape.directions();
        let dot = (gdot.is_some() || yt.is_some()).then(|| {
            let mut d = match gdot {
                Some(gd) => gd.clone(),
                None => Tensor::zeros(&tangent_shape(k, yv.shape())),
            };
            for (rr, dr) in d.data_mut().chunks_mut(c).enumerate() {
                let r = rr % rows;
                let yr = &yv.data()[r * c..(r + 1) * c];
                let sd = dr.iter().fold(T::zero(), |a, &b| a + b);
                for (i, v) in dr.iter_mut().enumerate() {
                    let p = yr[i].exp();
                    let mut x = *v - p * sd;
                    if let Some(yt) = yt {
                        x = x - p * yt.data()[rr * c + i] * gsum[r];
                    }
                    *v = x;
                }
            }
            d
        });
        sink.add(self.z, gz, dot);
    }
}

impl<T: Scalar> Rule<T> for CrossEntropy<T> {
    fn inputs(&self) -> Vec<usize> {
        vec![self.z]
    }

    fn backward(
        &self,
        tape: &Tape<T>,
        _out: usize,
        gy: &Tensor<T>,
        gdot: Option<&Tensor<T>>,
        sink: &mut Sink<T>,
    ) {
        let zn = tape.node(self.z);
        let (n, c) = (zn.value.shape()[0], zn.value.shape()[1]);
        let inv_n = T::one() / T::from_usize_lossy(n);
        let gbar = gy.data()[0] * inv_n;
        // p − e_y, the per-row adjoint direction.
        let mut resid = self.p.clone();
        for (r, &l) in self.labels.iter().enumerate() {
            resid[r * c + l] = resid[r * c + l] - T::one();
        }
        let g =
            Tensor::from_vec(&[n, c], resid.iter().map(|&v| v * gbar).collect()).expect("ce grad");
        let k = tape.directions();
        let zt = zn.tangent.as_ref();
        let dot = (gdot.is_some() || zt.is_some()).then(|| {
            let mut d = Tensor::zeros(&tangent_shape(k, &[n, c]));
            for (kk, dk) in d.data_mut().chunks_mut(n * c).enumerate() {
                if let Some(gd) = gdot {
                    let s = gd.data()[kk] * inv_n;
                    for (o, &rv) in dk.iter_mut().zip(&resid) {
                        *o = rv * s;
                    }
                }
                if let Some(zt) = zt {
                    let tk = &zt.data()[kk * n * c..(kk + 1) * n * c];
                    for r in 0..n {
                        let (pr, tr) = (&self.p[r * c..(r + 1) * c], &tk[r * c..(r + 1) * c]);
                        let pz = dot(pr, tr);
                        for i in 0..c {
                            dk[r * c + i] = dk[r * c + i] + gbar * pr[i] * (tr[i] - pz);
                        }
                    }
                }
            }
            d
        });
        sink.add(self.z, g, dot);
    }
}

//! Batch normalization over NCHW (per channel), train and eval modes, affine γ, β.
//!
//! Per channel with m = N·H·W values. Train mode: μ, v = batch mean and biased variance,
//! s = 1/√(v + ε), x̂ = (x − μ) s, y = γ x̂ + β. With a = mean(x̂ ẋ):
//! - JVP: x̂˙ = s (ẋ − mean(ẋ) − x̂ a), ẏ = γ̇ x̂ + γ x̂˙ + β̇
//! - VJP: β̄ = Σȳ, γ̄ = Σ ȳ x̂, x̄ = s (g − mean(g) − x̂ mean(g x̂)) with g = γ ȳ
//! - tangent of VJP: β̄˙ = Σȳ˙, γ̄˙ = Σ (ȳ˙ x̂ + ȳ x̂˙),
//!   x̄˙ = −s a x̄ + s (ġ − mean(ġ) − x̂˙ mean(g x̂) − x̂ mean(ġ x̂ + g x̂˙)), ġ = γ̇ ȳ + γ ȳ˙
//!   (using ṡ = −s² a).
//!
//! Eval mode uses the running statistics: an affine map, x̂ = (x − μ_run) s, x̂˙ = s ẋ,
//! x̄ = γ s ȳ, x̄˙ = s (γ̇ ȳ + γ ȳ˙), with the same β̄, γ̄ and their tangents.
//! Channels run in parallel; each channel's sums run in a fixed order.

use super::{tangent_shape, Op, Rule};
use crate::error::{EngineError, Result};
use crate::kernels::par::SendPtr;
use crate::scalar::Scalar;
use crate::tape::{Sink, Tape, Var};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Which statistics batch normalization uses.
#[derive(Clone, Copy, Debug)]
pub enum BnMode<'a, T> {
    /// Batch statistics (biased variance), differentiated through.
    Train,
    /// Fixed running statistics.
    Eval {
        /// Running mean per channel.
        mean: &'a [T],
        /// Running variance per channel.
        var: &'a [T],
    },
}

/// Statistics of one training-mode batch, for updating running statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchStats<T> {
    /// Batch mean per channel.
    pub mean: Vec<T>,
    /// Unbiased batch variance per channel (what PyTorch folds into `running_var`).
    pub var_unbiased: Vec<T>,
}

pub(crate) struct BatchNorm2d<T> {
    x: usize,
    gamma: usize,
    beta: usize,
    train: bool,
    /// Centre per channel (batch or running mean).
    mu: Vec<T>,
    /// Inverse standard deviation per channel.
    s: Vec<T>,
    /// Train mode with tangents: (mean(ẋ_k), mean(x̂ ẋ_k)) per (k, channel).
    tstats: Vec<(T, T)>,
    n: usize,
    c: usize,
    hw: usize,
}

/// Sum over samples of `f(plane)` for channel `ch` of a `[*, C, HW]` block starting at plane
/// offset `base` (in planes); fixed order.
fn channel_sum<T: Scalar>(
    n: usize,
    c: usize,
    ch: usize,
    base: usize,
    mut f: impl FnMut(usize, usize) -> T,
) -> T {
    let mut acc = T::zero();
    for s in 0..n {
        acc = acc + f(s, base + s * c + ch);
    }
    acc
}

impl<T: Scalar> BatchNorm2d<T> {
    fn xhat(&self, x: T, ch: usize) -> T {
        (x - self.mu[ch]) * self.s[ch]
    }
}

impl<T: Scalar> Tape<T> {
    /// Batch normalization of `x: [N, C, H, W]` with scale `gamma: [C]`, shift `beta: [C]`.
    /// In train mode also returns the batch statistics (running statistics are the caller's).
    pub fn batch_norm2d(
        &mut self,
        x: Var,
        gamma: Var,
        beta: Var,
        mode: BnMode<T>,
        eps: f64,
    ) -> Result<(Var, Option<BatchStats<T>>)> {
        for v in [x, gamma, beta] {
            self.check_var(v)?;
        }
        let xs = self.value(x).shape().to_vec();
        let bad = |detail: String| EngineError::Shape {
            op: "batch_norm2d",
            detail,
        };
        if xs.len() != 4 {
            return Err(bad(format!("need [N, C, H, W], got {xs:?}")));
        }
        let (n, c, hw) = (xs[0], xs[1], xs[2] * xs[3]);
        for v in [gamma, beta] {
            if self.value(v).shape() != [c] {
                return Err(bad(format!("affine parameter {:?}, want [{c}]", self.value(v).shape())));
            }
        }
        let m = n * hw;
        let xv = self.value(x).data();
        let eps = T::c(eps);
        let (train, mu, s, stats) = match mode {
            BnMode::Train => {
                if m < 2 {
                    return Err(bad(format!(
                        "train mode needs more than one value per channel, got {xs:?}"
                    )));
                }
                let inv_m = T::one() / T::from_usize_lossy(m);
                let per: Vec<(T, T)> = (0..c)
                    .into_par_iter()
                    .map(|ch| {
                        let plane = |p: usize| &xv[p * hw..(p + 1) * hw];
                        let sum = channel_sum(n, c, ch, 0, |_, p| plane(p).iter().fold(T::zero(), |a, &b| a + b));
                        let mean = sum * inv_m;
                        let ss = channel_sum(n, c, ch, 0, |_, p| {
                            plane(p).iter().fold(T::zero(), |a, &b| a + (b - mean) * (b - mean))
                        });
                        (mean, ss * inv_m)
                    })
                    .collect();
                let mu: Vec<T> = per.iter().map(|p| p.0).collect();
                let s: Vec<T> = per.iter().map(|p| T::one() / (p.1 + eps).sqrt()).collect();
                let unb = T::from_usize_lossy(m) / T::from_usize_lossy(m - 1);
                let stats = BatchStats {
                    mean: mu.clone(),
                    var_unbiased: per.iter().map(|p| p.1 * unb).collect(),
                };
                (true, mu, s, Some(stats))
            }
            BnMode::Eval { mean, var } => {
                if mean.len() != c || var.len() != c {
                    return Err(bad(format!(
                        "running statistics of length {} and {}, want {c}",
                        mean.len(),
                        var.len()
                    )));
                }
                let s: Vec<T> = var.iter().map(|&v| T::one() / (v + eps).sqrt()).collect();
                (false, mean.to_vec(), s, None)
            }
        };
        let gv = self.value(gamma).data();
        let bv = self.value(beta).data();
        let mut y = Tensor::zeros(&xs);
        y.data_mut().par_chunks_mut(hw).enumerate().for_each(|(p, yo)| {
            let ch = p % c;
            let (sc, sh) = (gv[ch] * s[ch], bv[ch] - gv[ch] * s[ch] * mu[ch]);
            for (o, &xi) in yo.iter_mut().zip(&xv[p * hw..(p + 1) * hw]) {
                *o = sc * xi + sh;
            }
        });
        let mut op = BatchNorm2d {
            x: x.0,
            gamma: gamma.0,
            beta: beta.0,
            train,
            mu,
            s,
            tstats: Vec::new(),
            n,
            c,
            hw,
        };
        let k = self.directions();
        let (xt, gt, bt) = (self.tangent(x), self.tangent(gamma), self.tangent(beta));
        let tangent = if xt.is_none() && gt.is_none() && bt.is_none() {
            None
        } else {
            if let (true, Some(xt)) = (train, xt) {
                let inv_m = T::one() / T::from_usize_lossy(m);
                let xtd = xt.data();
                op.tstats = (0..k * c)
                    .into_par_iter()
                    .map(|j| {
                        let (kk, ch) = (j / c, j % c);
                        let mut sd = T::zero();
                        let mut sxd = T::zero();
                        for s_ in 0..n {
                            let vp = s_ * c + ch;
                            let tp = kk * n * c + vp;
                            for (&xi, &di) in xv[vp * hw..(vp + 1) * hw].iter().zip(&xtd[tp * hw..(tp + 1) * hw]) {
                                sd = sd + di;
                                sxd = sxd + op.xhat(xi, ch) * di;
                            }
                        }
                        (sd * inv_m, sxd * inv_m)
                    })
                    .collect();
            }
            let mut t = Tensor::zeros(&tangent_shape(k, &xs));
            let op = &op;
            t.data_mut().par_chunks_mut(hw).enumerate().for_each(|(tp, to)| {
                let (kk, vp) = (tp / (n * c), tp % (n * c));
                let ch = vp % c;
                let xp = &xv[vp * hw..(vp + 1) * hw];
                let gdot = gt.map_or(T::zero(), |g| g.data()[kk * c + ch]);
                let bdot = bt.map_or(T::zero(), |b| b.data()[kk * c + ch]);
                for (i, o) in to.iter_mut().enumerate() {
                    let xh = op.xhat(xp[i], ch);
                    let mut v = gdot * xh + bdot;
                    if let Some(xt) = xt {
                        let d = xt.data()[tp * hw + i];
                        let xhd = if op.train {
                            let (md, a) = op.tstats[kk * c + ch];
                            op.s[ch] * (d - md - xh * a)
                        } else {
                            op.s[ch] * d
                        };
                        v = v + gv[ch] * xhd;
                    }
                    *o = v;
                }
            });
            Some(t)
        };
        Ok((self.push(Op::BatchNorm2d(op), y, tangent, false), stats))
    }
}

impl<T: Scalar> Rule<T> for BatchNorm2d<T> {
    fn inputs(&self) -> Vec<usize> {
        vec![self.x, self.gamma, self.beta]
    }

    fn backward(
        &self,
        tape: &Tape<T>,
        _out: usize,
        gy: &Tensor<T>,
        gdot: Option<&Tensor<T>>,
        sink: &mut Sink<T>,
    ) {
        let (n, c, hw) = (self.n, self.c, self.hw);
        let k = tape.directions();
        let inv_m = T::one() / T::from_usize_lossy(n * hw);
        let nx = tape.node(self.x);
        let xv = nx.value.data();
        let xt = nx.tangent.as_ref();
        let gam = tape.node(self.gamma).value.data();
        let gt = tape.node(self.gamma).tangent.as_ref();
        let g = gy.data();
        let plane = |buf: &'_ [T], p: usize| -> std::ops::Range<usize> {
            let _ = buf;
            p * hw..(p + 1) * hw
        };

        // Per channel: Σȳ and Σȳx̂.
        let sums: Vec<(T, T)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let mut sy = T::zero();
                let mut syx = T::zero();
                for s in 0..n {
                    let r = plane(g, s * c + ch);
                    for (&gi, &xi) in g[r.clone()].iter().zip(&xv[r]) {
                        sy = sy + gi;
                        syx = syx + gi * self.xhat(xi, ch);
                    }
                }
                (sy, syx)
            })
            .collect();

        // x̂˙ for direction kk at value-plane vp, element i.
        let xhat_dot = |kk: usize, vp: usize, i: usize| -> T {
            match xt {
                None => T::zero(),
                Some(xt) => {
                    let ch = vp % c;
                    let d = xt.data()[(kk * n * c + vp) * hw + i];
                    if self.train {
                        let (md, a) = self.tstats[kk * c + ch];
                        self.s[ch] * (d - md - self.xhat(xv[vp * hw + i], ch) * a)
                    } else {
                        self.s[ch] * d
                    }
                }
            }
        };

        // Per (k, channel): Σȳ˙, Σȳ˙x̂, Σȳx̂˙.
        let want_dot = gdot.is_some() || xt.is_some() || gt.is_some();
        let dsums: Vec<(T, T, T)> = if want_dot {
            (0..k * c)
                .into_par_iter()
                .map(|j| {
                    let (kk, ch) = (j / c, j % c);
                    let (mut sd, mut sdx, mut syxd) = (T::zero(), T::zero(), T::zero());
                    for s in 0..n {
                        let vp = s * c + ch;
                        for i in 0..hw {
                            let xh = self.xhat(xv[vp * hw + i], ch);
                            if let Some(gd) = gdot {
                                let d = gd.data()[(kk * n * c + vp) * hw + i];
                                sd = sd + d;
                                sdx = sdx + d * xh;
                            }
                            if xt.is_some() {
                                syxd = syxd + g[vp * hw + i] * xhat_dot(kk, vp, i);
                            }
                        }
                    }
                    (sd, sdx, syxd)
                })
                .collect()
        } else {
            Vec::new()
        };

        if tape.needs_grad(self.x) {
            let mut gx = Tensor::zeros(nx.value.shape());
            gx.data_mut().par_chunks_mut(hw).enumerate().for_each(|(vp, o)| {
                let ch = vp % c;
                let (sy, syx) = sums[ch];
                let s = self.s[ch];
                for (i, oi) in o.iter_mut().enumerate() {
                    let gi = gam[ch] * g[vp * hw + i];
                    *oi = if self.train {
                        let xh = self.xhat(xv[vp * hw + i], ch);
                        s * (gi - gam[ch] * sy * inv_m - xh * gam[ch] * syx * inv_m)
                    } else {
                        s * gi
                    };
                }
            });
            let dot = want_dot.then(|| {
                let mut d = Tensor::zeros(&tangent_shape(k, nx.value.shape()));
                let gxd = gx.data();
                let dp = SendPtr(d.data_mut().as_mut_ptr());
                (0..k * n * c).into_par_iter().for_each(|tp| {
                    // SAFETY: each task writes its own plane.
                    let o = unsafe { dp.slice(tp * hw, hw) };
                    let (kk, vp) = (tp / (n * c), tp % (n * c));
                    let ch = vp % c;
                    let (sy, syx) = sums[ch];
                    let (sd, sdx, syxd) = dsums[kk * c + ch];
                    let s = self.s[ch];
                    let gam_dot = gt.map_or(T::zero(), |t| t.data()[kk * c + ch]);
                    for (i, oi) in o.iter_mut().enumerate() {
                        let e = vp * hw + i;
                        let gd = gdot.map_or(T::zero(), |t| t.data()[tp * hw + i]);
                        let gdot_i = gam_dot * g[e] + gam[ch] * gd;
                        *oi = if self.train {
                            let xh = self.xhat(xv[e], ch);
                            let xhd = xhat_dot(kk, vp, i);
                            let a = if xt.is_some() { self.tstats[kk * c + ch].1 } else { T::zero() };
                            let g2 = gam[ch] * syx * inv_m;
                            let g1d = (gam_dot * sy + gam[ch] * sd) * inv_m;
                            let g2d = (gam_dot * syx + gam[ch] * sdx + gam[ch] * syxd) * inv_m;
                            -s * a * gxd[e] + s * (gdot_i - g1d - xhd * g2 - xh * g2d)
                        } else {
                            s * gdot_i
                        };
                    }
                });
                d
            });
            sink.add(self.x, gx, dot);
        }
        if tape.needs_grad(self.gamma) {
            let gg = Tensor::from_vec(&[c], sums.iter().map(|p| p.1).collect()).expect("bn dgamma");
            let dot = want_dot.then(|| {
                let v = dsums.iter().map(|d| d.1 + d.2).collect();
                Tensor::from_vec(&[k, c], v).expect("bn dgamma tangent")
            });
            sink.add(self.gamma, gg, dot);
        }
        if tape.needs_grad(self.beta) {
            let gb = Tensor::from_vec(&[c], sums.iter().map(|p| p.0).collect()).expect("bn dbeta");
            let dot = gdot.map(|_| {
                let v = dsums.iter().map(|d| d.0).collect();
                Tensor::from_vec(&[k, c], v).expect("bn dbeta tangent")
            });
            sink.add(self.beta, gb, dot);
        }
    }
}

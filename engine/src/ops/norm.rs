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
use crate::kernels::par::par_build;
use crate::kernels::reduce::{
    dot, dot_centered, sum as total, sum_and_dot_centered, sum_sq_centered,
};
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
    /// Train mode with input tangents: (mean(ẋ_k), a_k = mean(x̂ ẋ_k)) per (k, channel).
    tstats: Vec<(T, T)>,
    n: usize,
    c: usize,
    hw: usize,
}

/// Sums `f(plane of a, plane of b, …)` over the samples of one channel, in sample order.
/// `planes(s)` gives the index of sample `s`'s plane in each array.
fn channel_sum<T: Scalar>(n: usize, mut plane_sum: impl FnMut(usize) -> T) -> T {
    (0..n).fold(T::zero(), |acc, s| acc + plane_sum(s))
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
                return Err(bad(format!(
                    "affine parameter {:?}, want [{c}]",
                    self.value(v).shape()
                )));
            }
        }
        let m = n * hw;
        let xv = self.value(x).data();
        let plane = |p: usize| &xv[p * hw..(p + 1) * hw];
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
                        let mean = channel_sum(n, |s| total(plane(s * c + ch))) * inv_m;
                        let ss = channel_sum(n, |s| sum_sq_centered(plane(s * c + ch), mean));
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
        let y = par_build(
            n * c * hw,
            hw,
            || (),
            |_, p, yo| {
                let ch = p % c;
                let (sc, sh) = (gv[ch] * s[ch], bv[ch] - gv[ch] * s[ch] * mu[ch]);
                for (o, &xi) in yo.iter_mut().zip(plane(p)) {
                    *o = sc * xi + sh;
                }
            },
        );
        let y = Tensor::from_vec(&xs, y).expect("bn value");
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
                let (mu, sd) = (&op.mu, &op.s);
                let tstats = (0..k * c)
                    .into_par_iter()
                    .map(|j| {
                        let (kk, ch) = (j / c, j % c);
                        let tplane = |s: usize| &xtd[(kk * n * c + s * c + ch) * hw..][..hw];
                        let md = channel_sum(n, |s| total(tplane(s))) * inv_m;
                        let a =
                            channel_sum(n, |s| dot_centered(plane(s * c + ch), mu[ch], tplane(s)));
                        (md, a * inv_m * sd[ch])
                    })
                    .collect();
                op.tstats = tstats;
            }
            // ẏ = γ s ẋ + (γ̇ s − γ s² a) (x − μ) + (β̇ − γ s mean(ẋ)) per (k, channel).
            let op = &op;
            let t = par_build(
                k * n * c * hw,
                hw,
                || (),
                |_, tp, to| {
                    let (kk, vp) = (tp / (n * c), tp % (n * c));
                    let ch = vp % c;
                    let s = op.s[ch];
                    let gdot = gt.map_or(T::zero(), |g| g.data()[kk * c + ch]);
                    let bdot = bt.map_or(T::zero(), |b| b.data()[kk * c + ch]);
                    let (md, a) = op
                        .tstats
                        .get(kk * c + ch)
                        .copied()
                        .unwrap_or((T::zero(), T::zero()));
                    let c_xc = gdot * s - gv[ch] * s * s * a;
                    let c0 = bdot - gv[ch] * s * md;
                    let mu = op.mu[ch];
                    match xt {
                        Some(xt) => {
                            let c_xd = gv[ch] * s;
                            let tpl = &xt.data()[tp * hw..(tp + 1) * hw];
                            for ((o, &xi), &d) in to.iter_mut().zip(plane(vp)).zip(tpl) {
                                *o = c_xd * d + c_xc * (xi - mu) + c0;
                            }
                        }
                        None => {
                            for (o, &xi) in to.iter_mut().zip(plane(vp)) {
                                *o = c_xc * (xi - mu) + c0;
                            }
                        }
                    }
                },
            );
            Some(Tensor::from_vec(&tangent_shape(k, &xs), t).expect("bn tangent"))
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
        let vplane = |buf: &'_ [T], p: usize| -> std::ops::Range<usize> {
            debug_assert!(buf.len() >= (p + 1) * hw);
            p * hw..(p + 1) * hw
        };

        // Per channel: Sy = Σȳ and Syx = Σȳx̂ = s Σ ȳ (x − μ).
        let sums: Vec<(T, T)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (sy, syx) = (0..n).fold((T::zero(), T::zero()), |(sy, syx), s| {
                    let r = vplane(g, s * c + ch);
                    let (a, b) = sum_and_dot_centered(&xv[r.clone()], self.mu[ch], &g[r]);
                    (sy + a, syx + b)
                });
                (sy, syx * self.s[ch])
            })
            .collect();

        // Per (k, channel): Sd = Σȳ˙, Sdx = Σȳ˙x̂, Syxd = Σȳx̂˙.
        let want_dot = gdot.is_some() || xt.is_some() || gt.is_some();
        let dsums: Vec<(T, T, T)> = if want_dot {
            (0..k * c)
                .into_par_iter()
                .map(|j| {
                    let (kk, ch) = (j / c, j % c);
                    let (mu, s) = (self.mu[ch], self.s[ch]);
                    let tp = |s_: usize| {
                        (kk * n * c + s_ * c + ch) * hw..(kk * n * c + s_ * c + ch + 1) * hw
                    };
                    let (mut sd, mut sdx) = (T::zero(), T::zero());
                    if let Some(gd) = gdot {
                        let gd = gd.data();
                        sd = channel_sum(n, |s_| total(&gd[tp(s_)]));
                        sdx = channel_sum(n, |s_| {
                            dot_centered(&xv[vplane(xv, s_ * c + ch)], mu, &gd[tp(s_)])
                        }) * s;
                    }
                    let syxd = match xt {
                        None => T::zero(),
                        Some(xt) => {
                            let xd = xt.data();
                            let sy_xd = channel_sum(n, |s_| {
                                let r = vplane(g, s_ * c + ch);
                                dot(&g[r], &xd[tp(s_)])
                            });
                            if self.train {
                                let (md, a) = self.tstats[kk * c + ch];
                                s * (sy_xd - md * sums[ch].0 - a * sums[ch].1)
                            } else {
                                s * sy_xd
                            }
                        }
                    };
                    (sd, sdx, syxd)
                })
                .collect()
        } else {
            Vec::new()
        };

        if tape.needs_grad(self.x) {
            // train: x̄ = sγ ȳ − (s²γ Syx/m)(x − μ) − sγ Sy/m;  eval: x̄ = sγ ȳ.
            let gx = par_build(
                n * c * hw,
                hw,
                || (),
                |_, vp, o| {
                    let ch = vp % c;
                    let (sy, syx) = sums[ch];
                    let (s, mu, ga) = (self.s[ch], self.mu[ch], gam[ch]);
                    let r = vplane(g, vp);
                    let c_y = s * ga;
                    if self.train {
                        let c_xc = -s * s * ga * syx * inv_m;
                        let c0 = -s * ga * sy * inv_m;
                        for ((oi, &gi), &xi) in o.iter_mut().zip(&g[r.clone()]).zip(&xv[r]) {
                            *oi = c_y * gi + c_xc * (xi - mu) + c0;
                        }
                    } else {
                        for (oi, &gi) in o.iter_mut().zip(&g[r]) {
                            *oi = c_y * gi;
                        }
                    }
                },
            );
            let gx = Tensor::from_vec(nx.value.shape(), gx).expect("bn dx");
            let dot = want_dot.then(|| {
                // x̄˙ = c_x̄ x̄ + c_y ȳ + c_dy ȳ˙ + c_xd ẋ + c_xc (x − μ) + c0, per (k, channel).
                let gxd = gx.data();
                let d = par_build(
                    k * n * c * hw,
                    hw,
                    || (),
                    |_, tp, o| {
                        let (kk, vp) = (tp / (n * c), tp % (n * c));
                        let ch = vp % c;
                        let (sy, syx) = sums[ch];
                        let (sd, sdx, syxd) = dsums[kk * c + ch];
                        let (s, mu, ga) = (self.s[ch], self.mu[ch], gam[ch]);
                        let gam_dot = gt.map_or(T::zero(), |t| t.data()[kk * c + ch]);
                        let (c_y, c_dy) = (s * gam_dot, s * ga);
                        let (mut c_xbar, mut c_xd, mut c_xc, mut c0) =
                            (T::zero(), T::zero(), T::zero(), T::zero());
                        if self.train {
                            let (md, a) = self
                                .tstats
                                .get(kk * c + ch)
                                .copied()
                                .unwrap_or((T::zero(), T::zero()));
                            let g2 = ga * syx * inv_m;
                            let g1d = (gam_dot * sy + ga * sd) * inv_m;
                            let g2d = (gam_dot * syx + ga * sdx + ga * syxd) * inv_m;
                            c_xbar = -s * a;
                            c_xd = -s * s * g2;
                            c_xc = s * s * s * g2 * a - s * s * g2d;
                            c0 = -s * g1d + s * s * g2 * md;
                        }
                        let r = vplane(g, vp);
                        let (xp, gp, gxp) = (&xv[r.clone()], &g[r.clone()], &gxd[r]);
                        let gdp = gdot.map(|t| &t.data()[tp * hw..(tp + 1) * hw]);
                        let xdp = xt.map(|t| &t.data()[tp * hw..(tp + 1) * hw]);
                        for i in 0..hw {
                            let mut v = c_xbar * gxp[i] + c_y * gp[i] + c_xc * (xp[i] - mu) + c0;
                            if let Some(gdp) = gdp {
                                v = v + c_dy * gdp[i];
                            }
                            if let Some(xdp) = xdp {
                                v = v + c_xd * xdp[i];
                            }
                            o[i] = v;
                        }
                    },
                );
                Tensor::from_vec(&tangent_shape(k, nx.value.shape()), d).expect("bn dx tangent")
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

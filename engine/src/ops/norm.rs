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
//!
//! With the ReLU epilogue ([`Tape::batch_norm2d_relu`]) the op's value is relu(y), in the same
//! pass. Its rules are ReLU's composed with the above, ReLU's written once (activation.rs): the
//! JVP is relu'·ẏ, and the backward masks ȳ and ȳ˙ by relu' (read off the stored output,
//! relu(y) > 0 exactly when y > 0, so no extra state) before BN's own rules. With no tangents
//! in play (the gradient), the mask is applied on the fly inside BN's passes over ȳ.

use super::activation::{relu, relu_d1, relu_vjp};
use super::{tangent_shape, Op, Rule};
use crate::error::{EngineError, Result};
use crate::kernels::cpu::vectorized;
use crate::kernels::par::{par_build, SendPtr};
use crate::kernels::reduce::{
    dot, dot_centered, sum as total, sum_and_dot_centered_by, sum_sq_centered,
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
    /// The ReLU epilogue: the op's value is relu(y).
    relu: bool,
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

/// A shape error of `batch_norm2d`.
fn bn_shape_error(detail: String) -> EngineError {
    EngineError::Shape {
        op: "batch_norm2d",
        detail,
    }
}

/// Per-channel normalization: whether batch statistics are used, centre μ, inverse
/// standard deviation s, and (train mode) the statistics handed back to the caller.
struct Normalizer<T> {
    train: bool,
    mu: Vec<T>,
    s: Vec<T>,
    stats: Option<BatchStats<T>>,
}

/// What the value needs besides x and the normalization: γ, β and the epilogue.
struct Affine<'a, T> {
    gamma: &'a [T],
    beta: &'a [T],
    /// The ReLU epilogue.
    relu: bool,
}

impl<T: Scalar> Affine<'_, T> {
    /// One plane of channel `ch` (centre `mu`, inverse standard deviation `s`) from its plane
    /// `xp` of x: y = γ s x + (β − γ s μ), then relu(y) with the epilogue.
    #[inline(always)]
    fn plane(&self, ch: usize, mu: T, s: T, xp: &[T], yo: &mut [T]) {
        let (g, b) = (self.gamma[ch], self.beta[ch]);
        let (sc, sh) = (g * s, b - g * s * mu);
        let pairs = yo.iter_mut().zip(xp);
        if self.relu {
            pairs.for_each(|(o, &xi)| *o = relu(sc * xi + sh));
        } else {
            pairs.for_each(|(o, &xi)| *o = sc * xi + sh);
        }
    }

    /// The value of `xv: [N, C, H·W]` for per-channel `mu`, `s`, plane by plane in parallel.
    fn planes(&self, xv: &[T], [n, c, hw]: [usize; 3], mu: &[T], s: &[T]) -> Vec<T> {
        par_build(
            n * c * hw,
            hw,
            || (),
            #[inline(always)]
            |_, p, yo| {
                let ch = p % c;
                self.plane(ch, mu[ch], s[ch], &xv[p * hw..(p + 1) * hw], yo);
            },
        )
    }
}

/// A buffer of `len` elements to be written whole by disjoint tasks before its length is set;
/// NaN first in debug builds, as `par_build`, so an element left unwritten fails the tests.
fn scratch<T: Scalar>(len: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(len);
    if cfg!(debug_assertions) {
        v.spare_capacity_mut().iter_mut().for_each(|e| {
            e.write(T::nan());
        });
    }
    v
}

/// Batch mean, inverse standard deviation and statistics of `xv: [N, C, H·W]` (m ≥ 2 values),
/// and the value: per channel in parallel, the statistics and then right away that channel's
/// planes of y, while its x is still in cache.
fn train_normalizer<T: Scalar>(
    xv: &[T],
    [n, c, hw]: [usize; 3],
    eps: T,
    affine: &Affine<T>,
) -> (Normalizer<T>, Vec<T>) {
    let m = n * hw;
    let plane = |p: usize| &xv[p * hw..(p + 1) * hw];
    let inv_m = T::one() / T::from_usize_lossy(m);
    let mut y = scratch(n * c * hw);
    let out = SendPtr(y.as_mut_ptr());
    let per: Vec<(T, T, T)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let mean = channel_sum(n, |s| total(plane(s * c + ch))) * inv_m;
            let var = channel_sum(n, |s| sum_sq_centered(plane(s * c + ch), mean)) * inv_m;
            let sd_inv = T::one() / (var + eps).sqrt();
            for p in (0..n).map(|s| s * c + ch) {
                // SAFETY: plane `p` lies within the capacity and only this channel's task
                // writes it; `T` is a plain float.
                let o = unsafe { out.slice(p * hw, hw) };
                vectorized(
                    #[inline(always)]
                    || affine.plane(ch, mean, sd_inv, plane(p), o),
                );
            }
            (mean, var, sd_inv)
        })
        .collect();
    // SAFETY: every plane of every channel was written above.
    unsafe { y.set_len(n * c * hw) };
    let mu: Vec<T> = per.iter().map(|p| p.0).collect();
    let s: Vec<T> = per.iter().map(|p| p.2).collect();
    let unb = T::from_usize_lossy(m) / T::from_usize_lossy(m - 1);
    let stats = BatchStats {
        mean: mu.clone(),
        var_unbiased: per.iter().map(|p| p.1 * unb).collect(),
    };
    let norm = Normalizer {
        train: true,
        mu,
        s,
        stats: Some(stats),
    };
    (norm, y)
}

/// The normalizer `mode` asks for, for `x` of shape `xs` with values `xv`, and the value.
fn normalizer<T: Scalar>(
    xv: &[T],
    xs: &[usize],
    mode: BnMode<T>,
    eps: f64,
    affine: &Affine<T>,
) -> Result<(Normalizer<T>, Vec<T>)> {
    let (n, c, hw) = (xs[0], xs[1], xs[2] * xs[3]);
    let eps = T::c(eps);
    match mode {
        BnMode::Train => {
            if n * hw < 2 {
                return Err(bn_shape_error(format!(
                    "train mode needs more than one value per channel, got {xs:?}"
                )));
            }
            Ok(train_normalizer(xv, [n, c, hw], eps, affine))
        }
        BnMode::Eval { mean, var } => {
            if mean.len() != c || var.len() != c {
                return Err(bn_shape_error(format!(
                    "running statistics of length {} and {}, want {c}",
                    mean.len(),
                    var.len()
                )));
            }
            let s: Vec<T> = var.iter().map(|&v| T::one() / (v + eps).sqrt()).collect();
            let y = affine.planes(xv, [n, c, hw], mean, &s);
            let norm = Normalizer {
                train: false,
                mu: mean.to_vec(),
                s,
                stats: None,
            };
            Ok((norm, y))
        }
    }
}

impl<T: Scalar> BatchNorm2d<T> {
    /// Plane `p` (one sample, one channel) of an `[.., H·W]` buffer.
    fn plane<'b>(&self, buf: &'b [T], p: usize) -> &'b [T] {
        &buf[p * self.hw..(p + 1) * self.hw]
    }

    /// Train mode: (mean(ẋ_k), mean(x̂ ẋ_k)) per (k, channel) for input tangents `xtd`.
    fn tangent_stats(&self, xv: &[T], xtd: &[T], k: usize) -> Vec<(T, T)> {
        let (n, c, hw) = (self.n, self.c, self.hw);
        let inv_m = T::one() / T::from_usize_lossy(n * hw);
        let (mu, sd) = (&self.mu, &self.s);
        (0..k * c)
            .into_par_iter()
            .map(|j| {
                let (kk, ch) = (j / c, j % c);
                let tplane = |s: usize| &xtd[(kk * n * c + s * c + ch) * hw..][..hw];
                let md = channel_sum(n, |s| total(tplane(s))) * inv_m;
                let a = channel_sum(n, |s| {
                    dot_centered(self.plane(xv, s * c + ch), mu[ch], tplane(s))
                });
                (md, a * inv_m * sd[ch])
            })
            .collect()
    }

    /// ẏ = γ s ẋ + (γ̇ s − γ s² a) (x − μ) + (β̇ − γ s mean(ẋ)) per (k, channel); with the
    /// epilogue, times relu' read off the op's value `yv`.
    fn tangent(
        &self,
        xv: &[T],
        yv: &[T],
        gv: &[T],
        tangents: [Option<&Tensor<T>>; 3],
        k: usize,
    ) -> Vec<T> {
        let (n, c, hw) = (self.n, self.c, self.hw);
        let [xt, gt, bt] = tangents;
        par_build(
            k * n * c * hw,
            hw,
            || (),
            #[inline(always)]
            |_, tp, to| {
                let (kk, vp) = (tp / (n * c), tp % (n * c));
                let ch = vp % c;
                let s = self.s[ch];
                let gdot = gt.map_or(T::zero(), |g| g.data()[kk * c + ch]);
                let bdot = bt.map_or(T::zero(), |b| b.data()[kk * c + ch]);
                let (md, a) = self
                    .tstats
                    .get(kk * c + ch)
                    .copied()
                    .unwrap_or((T::zero(), T::zero()));
                let c_xc = gdot * s - gv[ch] * s * s * a;
                let c0 = bdot - gv[ch] * s * md;
                let mu = self.mu[ch];
                match xt {
                    Some(xt) => {
                        let c_xd = gv[ch] * s;
                        let tpl = &xt.data()[tp * hw..(tp + 1) * hw];
                        for ((o, &xi), &d) in to.iter_mut().zip(self.plane(xv, vp)).zip(tpl) {
                            *o = c_xd * d + c_xc * (xi - mu) + c0;
                        }
                    }
                    None => {
                        for (o, &xi) in to.iter_mut().zip(self.plane(xv, vp)) {
                            *o = c_xc * (xi - mu) + c0;
                        }
                    }
                }
                if self.relu {
                    for (o, &yi) in to.iter_mut().zip(self.plane(yv, vp)) {
                        *o = relu_d1(yi) * *o;
                    }
                }
            },
        )
    }
}

impl<T: Scalar> Tape<T> {
    /// Checks `x: [N, C, H, W]`, `gamma: [C]`, `beta: [C]`; gives the shape of `x`.
    fn bn_shape(&self, x: Var, gamma: Var, beta: Var) -> Result<Vec<usize>> {
        for v in [x, gamma, beta] {
            self.check_var(v)?;
        }
        let xs = self.value(x).shape().to_vec();
        if xs.len() != 4 {
            return Err(bn_shape_error(format!("need [N, C, H, W], got {xs:?}")));
        }
        let c = xs[1];
        for v in [gamma, beta] {
            if self.value(v).shape() != [c] {
                return Err(bn_shape_error(format!(
                    "affine parameter {:?}, want [{c}]",
                    self.value(v).shape()
                )));
            }
        }
        Ok(xs)
    }

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
        self.record_batch_norm2d([x, gamma, beta], mode, eps, false)
    }

    /// relu([`Tape::batch_norm2d`]) as one op: one pass over the activation each way instead
    /// of two, and one value on the tape instead of two. The same values, gradients and
    /// Hessian-vector products, bit for bit, as `batch_norm2d` followed by [`Tape::relu`].
    pub fn batch_norm2d_relu(
        &mut self,
        x: Var,
        gamma: Var,
        beta: Var,
        mode: BnMode<T>,
        eps: f64,
    ) -> Result<(Var, Option<BatchStats<T>>)> {
        self.record_batch_norm2d([x, gamma, beta], mode, eps, true)
    }

    /// Records batch normalization of `[x, gamma, beta]`, with the ReLU epilogue when `relu`.
    fn record_batch_norm2d(
        &mut self,
        [x, gamma, beta]: [Var; 3],
        mode: BnMode<T>,
        eps: f64,
        relu: bool,
    ) -> Result<(Var, Option<BatchStats<T>>)> {
        let xs = self.bn_shape(x, gamma, beta)?;
        let xv = self.value(x).data();
        let (gv, bv) = (self.value(gamma).data(), self.value(beta).data());
        let affine = Affine {
            gamma: gv,
            beta: bv,
            relu,
        };
        let (norm, yv) = normalizer(xv, &xs, mode, eps, &affine)?;
        let mut op = BatchNorm2d {
            x: x.0,
            gamma: gamma.0,
            beta: beta.0,
            train: norm.train,
            relu,
            mu: norm.mu,
            s: norm.s,
            tstats: Vec::new(),
            n: xs[0],
            c: xs[1],
            hw: xs[2] * xs[3],
        };
        let y = Tensor::from_vec(&xs, yv).expect("bn value");
        let k = self.directions();
        let tangents = [self.tangent(x), self.tangent(gamma), self.tangent(beta)];
        let tangent = if tangents.iter().all(Option::is_none) {
            None
        } else {
            if let (true, Some(xt)) = (op.train, tangents[0]) {
                op.tstats = op.tangent_stats(xv, xt.data(), k);
            }
            let t = op.tangent(xv, y.data(), gv, tangents, k);
            Some(Tensor::from_vec(&tangent_shape(k, &xs), t).expect("bn tangent"))
        };
        Ok((
            self.push(Op::BatchNorm2d(op), y, tangent, false),
            norm.stats,
        ))
    }
}

/// Coefficients of x̄˙ = c_x̄ x̄ + c_y ȳ + c_dy ȳ˙ + c_xd ẋ + c_xc (x − μ) + c0
/// for one (direction, channel).
struct DotCoef<T> {
    xbar: T,
    y: T,
    dy: T,
    xd: T,
    xc: T,
    c0: T,
}

/// What the backward rule reads, gathered once: the op, ȳ, ȳ˙ and the inputs' values
/// and tangents. With the ReLU epilogue, `g` and `gdot` are either already masked by relu'
/// (`mask` is `None`), or `mask` holds the op's value and [`Back::channel_sums`] and
/// [`Back::grad_x_plane`] (the only readers of `g` then) mask on the fly.
struct Back<'a, T> {
    op: &'a BatchNorm2d<T>,
    /// Number of tangent directions.
    k: usize,
    /// 1 / (N·H·W).
    inv_m: T,
    xv: &'a [T],
    xt: Option<&'a Tensor<T>>,
    gam: &'a [T],
    gt: Option<&'a Tensor<T>>,
    g: &'a [T],
    /// The op's value, to mask `g` by relu' as it is read.
    mask: Option<&'a [T]>,
    gdot: Option<&'a [T]>,
}

impl<T: Scalar> Back<'_, T> {
    /// Index range of plane `p` in an `[.., H·W]` buffer.
    fn vplane(&self, buf: &[T], p: usize) -> std::ops::Range<usize> {
        let hw = self.op.hw;
        debug_assert!(buf.len() >= (p + 1) * hw);
        p * hw..(p + 1) * hw
    }

    /// Channel `ch`'s Sy = Σȳ and Syx = Σȳx̂ = s Σ ȳ (x − μ).
    fn channel_sums(&self, ch: usize) -> (T, T) {
        let (op, g, xv) = (self.op, self.g, self.xv);
        let (sy, syx) = (0..op.n).fold((T::zero(), T::zero()), |(sy, syx), s| {
            let r = self.vplane(g, s * op.c + ch);
            let (xp, gp) = (&xv[r.clone()], &g[r.clone()]);
            let (a, b) = match self.mask {
                None => sum_and_dot_centered_by(xp, op.mu[ch], gp, gp, |g, _| g),
                Some(y) => sum_and_dot_centered_by(xp, op.mu[ch], gp, &y[r], masked),
            };
            (sy + a, syx + b)
        });
        (sy, syx * op.s[ch])
    }

    /// Per channel, in parallel: [`Back::channel_sums`], then (with `want_gx`) that channel's
    /// planes of x̄ right away, while its ȳ and x are still in cache. Gives the sums and x̄.
    fn sums_and_grad_x(&self, want_gx: bool) -> (Vec<(T, T)>, Option<Vec<T>>) {
        let op = self.op;
        let len = if want_gx { op.n * op.c * op.hw } else { 0 };
        let mut gx: Vec<T> = scratch(len);
        let out = SendPtr(gx.as_mut_ptr());
        let sums: Vec<(T, T)> = (0..op.c)
            .into_par_iter()
            .map(|ch| {
                let sums_ch = self.channel_sums(ch);
                for vp in (0..op.n).map(|s| s * op.c + ch).filter(|_| want_gx) {
                    // SAFETY: plane `vp` lies within the capacity and only this channel's task
                    // writes it; `T` is a plain float.
                    let o = unsafe { out.slice(vp * op.hw, op.hw) };
                    vectorized(
                        #[inline(always)]
                        || self.grad_x_plane(vp, sums_ch, o),
                    );
                }
                sums_ch
            })
            .collect();
        // SAFETY: every plane of every channel was written above (none when `len` is 0).
        unsafe { gx.set_len(len) };
        (sums, want_gx.then_some(gx))
    }

    /// For direction `kk`, channel `ch`: Sd = Σȳ˙, Sdx = Σȳ˙x̂, Syxd = Σȳx̂˙.
    fn direction_sums(&self, kk: usize, ch: usize, sums: &[(T, T)]) -> (T, T, T) {
        let (op, g, xv) = (self.op, self.g, self.xv);
        let (n, c, hw) = (op.n, op.c, op.hw);
        let (mu, s) = (op.mu[ch], op.s[ch]);
        let tp = |s_: usize| (kk * n * c + s_ * c + ch) * hw..(kk * n * c + s_ * c + ch + 1) * hw;
        let (mut sd, mut sdx) = (T::zero(), T::zero());
        if let Some(gd) = self.gdot {
            sd = channel_sum(n, |s_| total(&gd[tp(s_)]));
            sdx = channel_sum(n, |s_| {
                dot_centered(&xv[self.vplane(xv, s_ * c + ch)], mu, &gd[tp(s_)])
            }) * s;
        }
        let syxd = match self.xt {
            None => T::zero(),
            Some(xt) => {
                let xd = xt.data();
                let sy_xd = channel_sum(n, |s_| {
                    let r = self.vplane(g, s_ * c + ch);
                    dot(&g[r], &xd[tp(s_)])
                });
                if op.train {
                    let (md, a) = op.tstats[kk * c + ch];
                    s * (sy_xd - md * sums[ch].0 - a * sums[ch].1)
                } else {
                    s * sy_xd
                }
            }
        };
        (sd, sdx, syxd)
    }

    /// Plane `vp` of x̄ into `o` (ȳ masked on the fly with [`Back::mask`]).
    #[inline(always)]
    fn grad_x_plane(&self, vp: usize, sums: (T, T), o: &mut [T]) {
        let r = self.vplane(self.g, vp);
        let gp = &self.g[r.clone()];
        match self.mask {
            None => self.grad_x_plane_by(vp, sums, o, gp, gp, |g, _| g),
            Some(y) => self.grad_x_plane_by(vp, sums, o, gp, &y[r], masked),
        }
    }

    /// Plane `vp` of x̄ into `o` from the weights f(ȳ, u): train: x̄ = sγ ȳ − (s²γ Syx/m)(x − μ)
    /// − sγ Sy/m; eval: x̄ = sγ ȳ, with the channel's sums `(Sy, Syx)`.
    #[inline(always)]
    fn grad_x_plane_by(
        &self,
        vp: usize,
        (sy, syx): (T, T),
        o: &mut [T],
        gp: &[T],
        up: &[T],
        f: impl Fn(T, T) -> T,
    ) {
        let (op, inv_m) = (self.op, self.inv_m);
        let ch = vp % op.c;
        let (s, mu, ga) = (op.s[ch], op.mu[ch], self.gam[ch]);
        let xp = &self.xv[self.vplane(self.xv, vp)];
        let c_y = s * ga;
        let gu = gp.iter().zip(up).map(|(&g, &u)| f(g, u));
        if op.train {
            let c_xc = -s * s * ga * syx * inv_m;
            let c0 = -s * ga * sy * inv_m;
            for ((oi, gi), &xi) in o.iter_mut().zip(gu).zip(xp) {
                *oi = c_y * gi + c_xc * (xi - mu) + c0;
            }
        } else {
            for (oi, gi) in o.iter_mut().zip(gu) {
                *oi = c_y * gi;
            }
        }
    }

    /// The coefficients of x̄˙ for direction `kk`, channel `ch`.
    fn dot_coef(&self, kk: usize, ch: usize, sums: &[(T, T)], dsums: &[(T, T, T)]) -> DotCoef<T> {
        let (op, inv_m, c) = (self.op, self.inv_m, self.op.c);
        let (sy, syx) = sums[ch];
        let (sd, sdx, syxd) = dsums[kk * c + ch];
        let (s, ga) = (op.s[ch], self.gam[ch]);
        let gam_dot = self.gt.map_or(T::zero(), |t| t.data()[kk * c + ch]);
        let (c_y, c_dy) = (s * gam_dot, s * ga);
        let (mut c_xbar, mut c_xd, mut c_xc, mut c0) = (T::zero(), T::zero(), T::zero(), T::zero());
        if op.train {
            let (md, a) = op
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
        DotCoef {
            xbar: c_xbar,
            y: c_y,
            dy: c_dy,
            xd: c_xd,
            xc: c_xc,
            c0,
        }
    }

    /// x̄˙ = c_x̄ x̄ + c_y ȳ + c_dy ȳ˙ + c_xd ẋ + c_xc (x − μ) + c0, per (k, channel).
    fn grad_x_tangent(&self, gxd: &[T], sums: &[(T, T)], dsums: &[(T, T, T)]) -> Vec<T> {
        let (op, g, xv) = (self.op, self.g, self.xv);
        let (n, c, hw) = (op.n, op.c, op.hw);
        par_build(
            self.k * n * c * hw,
            hw,
            || (),
            #[inline(always)]
            |_, tp, o| {
                let (kk, vp) = (tp / (n * c), tp % (n * c));
                let ch = vp % c;
                let mu = op.mu[ch];
                let cf = self.dot_coef(kk, ch, sums, dsums);
                let r = self.vplane(g, vp);
                let (xp, gp, gxp) = (&xv[r.clone()], &g[r.clone()], &gxd[r]);
                let gdp = self.gdot.map(|t| &t[tp * hw..(tp + 1) * hw]);
                let xdp = self.xt.map(|t| &t.data()[tp * hw..(tp + 1) * hw]);
                for i in 0..hw {
                    let mut v = cf.xbar * gxp[i] + cf.y * gp[i] + cf.xc * (xp[i] - mu) + cf.c0;
                    if let Some(gdp) = gdp {
                        v = v + cf.dy * gdp[i];
                    }
                    if let Some(xdp) = xdp {
                        v = v + cf.xd * xdp[i];
                    }
                    o[i] = v;
                }
            },
        )
    }
}

/// ȳ masked by relu' read off the op's value `y`: ReLU's VJP, element by element.
#[inline(always)]
fn masked<T: Scalar>(g: T, y: T) -> T {
    relu_d1(y) * g
}

impl<T: Scalar> Rule<T> for BatchNorm2d<T> {
    fn inputs(&self) -> Vec<usize> {
        vec![self.x, self.gamma, self.beta]
    }

    fn backward(
        &self,
        tape: &Tape<T>,
        out: usize,
        gy: &Tensor<T>,
        gdot: Option<&Tensor<T>>,
        sink: &mut Sink<T>,
    ) {
        let (c, k) = (self.c, tape.directions());
        let nx = tape.node(self.x);
        let (xt, gt) = (nx.tangent.as_ref(), tape.node(self.gamma).tangent.as_ref());
        let want_dot = gdot.is_some() || xt.is_some() || gt.is_some();
        let y = self.relu.then(|| tape.node(out).value.data());
        // With tangents in play, ȳ and ȳ˙ are masked once by ReLU's own VJP; the gradient
        // alone masks ȳ on the fly in its two passes.
        let relu_masked = y
            .filter(|_| want_dot)
            .map(|y| relu_vjp(y, gy.data(), gdot.map(Tensor::data), k));
        let (g, gdot) = match &relu_masked {
            Some((g, gd)) => (g.as_slice(), gd.as_deref()),
            None => (gy.data(), gdot.map(Tensor::data)),
        };
        let back = Back {
            op: self,
            k,
            inv_m: T::one() / T::from_usize_lossy(self.n * self.hw),
            xv: nx.value.data(),
            xt,
            gam: tape.node(self.gamma).value.data(),
            gt,
            g,
            mask: y.filter(|_| !want_dot),
            gdot,
        };
        let (sums, gx) = back.sums_and_grad_x(tape.needs_grad(self.x));
        let dsums: Vec<(T, T, T)> = if want_dot {
            (0..k * c)
                .into_par_iter()
                .map(|j| back.direction_sums(j / c, j % c, &sums))
                .collect()
        } else {
            Vec::new()
        };
        if let Some(gx) = gx {
            let gx = Tensor::from_vec(nx.value.shape(), gx).expect("bn dx");
            let dot = want_dot.then(|| {
                let d = back.grad_x_tangent(gx.data(), &sums, &dsums);
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

//! 2-D convolution (NCHW input, `[C_out, C_in, kh, kw]` weight, optional bias, stride, zero
//! padding), lowered per sample to im2col + GEMM.
//!
//! Convolution Y = W ⊛ X + b is bilinear in (W, X) and affine in b:
//! - value: Y_n = W cols(X_n) + b
//! - JVP: Ẏ_n = Ẇ cols(X_n) + W cols(Ẋ_n) + ḃ
//! - VJP: X̄_n = col2im(Wᵀ Ȳ_n), W̄ = Σ_n Ȳ_n cols(X_n)ᵀ, b̄ = Σ_{n,p} Ȳ_n
//! - tangent of VJP: X̄˙_n = col2im(Ẇᵀ Ȳ_n + Wᵀ Ȳ˙_n),
//!   W̄˙ = Σ_n Ȳ˙_n cols(X_n)ᵀ + Ȳ_n cols(Ẋ_n)ᵀ, b̄˙ = Σ_{n,p} Ȳ˙_n
//!
//! Samples run in parallel; the weight-gradient sum over samples uses fixed chunks reduced in
//! order, so results do not depend on the thread count.

use super::{tangent_shape, Op, Rule};
use crate::error::{EngineError, Result};
use crate::kernels::conv::{col2im_add, im2col, ConvGeom};
use crate::kernels::gemm::{gemm, MatRef};
use crate::kernels::par::{fixed_ranges, SendPtr};
use crate::scalar::Scalar;
use crate::tape::{Sink, Tape, Var};
use crate::tensor::Tensor;
use rayon::prelude::*;

pub(crate) struct Conv2d {
    x: usize,
    w: usize,
    b: Option<usize>,
    g: ConvGeom,
    n: usize,
}

/// Element budget for the per-chunk partial weight gradients.
const PARTIAL_BUDGET: usize = 1 << 25;
/// Most chunks a weight-gradient reduction is split into.
const MAX_CHUNKS: usize = 16;

/// The column matrix of one sample: the input itself for pointwise convs, else im2col into `buf`.
fn cols<'a, T: Scalar>(g: &ConvGeom, x: &'a [T], buf: &'a mut Vec<T>) -> &'a [T] {
    if g.is_pointwise() {
        x
    } else {
        buf.resize(g.patch() * g.positions(), T::zero());
        im2col(g, x, buf);
        buf
    }
}

/// Adds `bias[c]` to every position of channel `c` of one sample's output.
fn add_channel_bias<T: Scalar>(out: &mut [T], bias: &[T], positions: usize) {
    for (row, &b) in out.chunks_mut(positions).zip(bias) {
        for v in row {
            *v = *v + b;
        }
    }
}

/// Per-channel sums over samples and positions of a `[N, C, P]` buffer, in a fixed order.
fn channel_sums<T: Scalar>(g: &[T], c: usize, positions: usize) -> Vec<T> {
    let mut s = vec![T::zero(); c];
    for sample in g.chunks(c * positions) {
        for (acc, row) in s.iter_mut().zip(sample.chunks(positions)) {
            *acc = row.iter().fold(*acc, |a, &b| a + b);
        }
    }
    s
}

impl<T: Scalar> Tape<T> {
    /// 2-D convolution as PyTorch's `F.conv2d(x, w, b, stride, padding)` (square stride and
    /// padding, no dilation, no groups).
    pub fn conv2d(
        &mut self,
        x: Var,
        w: Var,
        b: Option<Var>,
        stride: usize,
        pad: usize,
    ) -> Result<Var> {
        self.check_var(x)?;
        self.check_var(w)?;
        let (xs, ws) = (self.value(x).shape(), self.value(w).shape());
        let bad = |detail: String| EngineError::Shape {
            op: "conv2d",
            detail,
        };
        if xs.len() != 4 || ws.len() != 4 {
            return Err(bad(format!("need 4-D input and weight, got {xs:?} and {ws:?}")));
        }
        if xs[1] != ws[1] {
            return Err(bad(format!("input channels {xs:?} vs weight {ws:?}")));
        }
        if stride == 0 || xs[2] + 2 * pad < ws[2] || xs[3] + 2 * pad < ws[3] {
            return Err(bad(format!(
                "kernel {ws:?} stride {stride} pad {pad} does not fit {xs:?}"
            )));
        }
        if let Some(b) = b {
            self.check_var(b)?;
            if self.value(b).shape() != [ws[0]] {
                return Err(bad(format!("bias {:?}, want [{}]", self.value(b).shape(), ws[0])));
            }
        }
        let g = ConvGeom {
            c_in: xs[1],
            h: xs[2],
            w: xs[3],
            c_out: ws[0],
            kh: ws[2],
            kw: ws[3],
            stride,
            pad,
        };
        let n = xs[0];
        let oshape = [n, g.c_out, g.ho(), g.wo()];
        let (il, ol, pl) = (g.in_len(), g.out_len(), g.positions());
        let xv = self.value(x).data();
        let wm = MatRef::new(self.value(w).data(), g.c_out, g.patch());
        let bias = b.map(|b| self.value(b).data());
        let mut y = Tensor::zeros(&oshape);
        y.data_mut().par_chunks_mut(ol).enumerate().for_each_init(Vec::new, |buf, (s, yo)| {
            let c = cols(&g, &xv[s * il..(s + 1) * il], buf);
            gemm(T::one(), wm, MatRef::new(c, g.patch(), pl), T::zero(), yo);
            if let Some(bias) = bias {
                add_channel_bias(yo, bias, pl);
            }
        });

        let k = self.directions();
        let (xt, wt) = (self.tangent(x), self.tangent(w));
        let bt = b.and_then(|b| self.tangent(b));
        let tangent = if xt.is_none() && wt.is_none() && bt.is_none() {
            None
        } else {
            let mut t = Tensor::zeros(&tangent_shape(k, &oshape));
            let tp = SendPtr(t.data_mut().as_mut_ptr());
            let wl = g.c_out * g.patch();
            (0..n).into_par_iter().for_each_init(
                || (Vec::new(), Vec::new()),
                |(buf, dbuf), s| {
                    let cx = wt.map(|_| cols(&g, &xv[s * il..(s + 1) * il], buf));
                    for kk in 0..k {
                        // SAFETY: (kk, s) blocks are disjoint; each sample s is one task.
                        let out = unsafe { tp.slice((kk * n + s) * ol, ol) };
                        let mut beta = T::zero();
                        if let (Some(wt), Some(cx)) = (wt, cx) {
                            let wk = MatRef::new(&wt.data()[kk * wl..(kk + 1) * wl], g.c_out, g.patch());
                            gemm(T::one(), wk, MatRef::new(cx, g.patch(), pl), beta, out);
                            beta = T::one();
                        }
                        if let Some(xt) = xt {
                            let off = (kk * n + s) * il;
                            let cd = cols(&g, &xt.data()[off..off + il], dbuf);
                            gemm(T::one(), wm, MatRef::new(cd, g.patch(), pl), beta, out);
                        }
                        if let Some(bt) = bt {
                            add_channel_bias(out, &bt.data()[kk * g.c_out..(kk + 1) * g.c_out], pl);
                        }
                    }
                },
            );
            Some(t)
        };
        let op = Conv2d {
            x: x.0,
            w: w.0,
            b: b.map(|b| b.0),
            g,
            n,
        };
        Ok(self.push(Op::Conv2d(op), y, tangent, false))
    }
}

impl Conv2d {
    /// `dst = col2im(Σ terms)` for one sample, where each term is `lhsᵀ` (`[C_out, patch]`)
    /// times a `[C_out, P]` adjoint block.
    fn data_grad<T: Scalar>(&self, terms: &[(MatRef<T>, &[T])], tmp: &mut Vec<T>, dst: &mut [T]) {
        let g = &self.g;
        let pl = g.positions();
        if g.is_pointwise() {
            for (i, (lhs, gy)) in terms.iter().enumerate() {
                let beta = if i == 0 { T::zero() } else { T::one() };
                gemm(T::one(), lhs.t(), MatRef::new(gy, g.c_out, pl), beta, dst);
            }
            return;
        }
        tmp.resize(g.patch() * pl, T::zero());
        for (i, (lhs, gy)) in terms.iter().enumerate() {
            let beta = if i == 0 { T::zero() } else { T::one() };
            gemm(T::one(), lhs.t(), MatRef::new(gy, g.c_out, pl), beta, tmp);
        }
        dst.fill(T::zero());
        col2im_add(g, tmp, dst);
    }
}

impl<T: Scalar> Rule<T> for Conv2d {
    fn inputs(&self) -> Vec<usize> {
        let mut v = vec![self.x, self.w];
        v.extend(self.b);
        v
    }

    fn backward(
        &self,
        tape: &Tape<T>,
        _out: usize,
        gy: &Tensor<T>,
        gdot: Option<&Tensor<T>>,
        sink: &mut Sink<T>,
    ) {
        let g = self.g;
        let n = self.n;
        let k = tape.directions();
        let (il, ol, pl, patch) = (g.in_len(), g.out_len(), g.positions(), g.patch());
        let (nx, nw) = (tape.node(self.x), tape.node(self.w));
        let (xv, wv) = (nx.value.data(), nw.value.data());
        let (xt, wt) = (nx.tangent.as_ref(), nw.tangent.as_ref());
        let wl = wv.len();
        let wm = MatRef::new(wv, g.c_out, patch);
        let gyd = gy.data();

        if tape.needs_grad(self.x) {
            let mut gx = Tensor::zeros(nx.value.shape());
            gx.data_mut().par_chunks_mut(il).enumerate().for_each_init(Vec::new, |tmp, (s, dst)| {
                self.data_grad(&[(wm, &gyd[s * ol..(s + 1) * ol])], tmp, dst);
            });
            let dot = (gdot.is_some() || wt.is_some()).then(|| {
                let mut d = Tensor::zeros(&tangent_shape(k, nx.value.shape()));
                d.data_mut().par_chunks_mut(il).enumerate().for_each_init(Vec::new, |tmp, (j, dst)| {
                    let (kk, s) = (j / n, j % n);
                    let mut terms = Vec::with_capacity(2);
                    if let Some(wt) = wt {
                        let wk = MatRef::new(&wt.data()[kk * wl..(kk + 1) * wl], g.c_out, patch);
                        terms.push((wk, &gyd[s * ol..(s + 1) * ol]));
                    }
                    if let Some(gd) = gdot {
                        terms.push((wm, &gd.data()[j * ol..(j + 1) * ol]));
                    }
                    self.data_grad(&terms, tmp, dst);
                });
                d
            });
            sink.add(self.x, gx, dot);
        }

        if tape.needs_grad(self.w) {
            let want_dot = gdot.is_some() || xt.is_some();
            let kd = if want_dot { k } else { 0 };
            let chunks = (PARTIAL_BUDGET / ((1 + kd) * wl).max(1)).clamp(1, MAX_CHUNKS);
            let ranges = fixed_ranges(n, chunks);
            let partials: Vec<Vec<T>> = ranges
                .par_iter()
                .map(|r| {
                    let mut acc = vec![T::zero(); (1 + kd) * wl];
                    let (mut buf, mut dbuf) = (Vec::new(), Vec::new());
                    for s in r.clone() {
                        let c = MatRef::new(cols(&g, &xv[s * il..(s + 1) * il], &mut buf), patch, pl);
                        let gys = MatRef::new(&gyd[s * ol..(s + 1) * ol], g.c_out, pl);
                        gemm(T::one(), gys, c.t(), T::one(), &mut acc[..wl]);
                        for kk in 0..kd {
                            let dst = &mut acc[(1 + kk) * wl..(2 + kk) * wl];
                            if let Some(gd) = gdot {
                                let off = (kk * n + s) * ol;
                                let gds = MatRef::new(&gd.data()[off..off + ol], g.c_out, pl);
                                gemm(T::one(), gds, c.t(), T::one(), dst);
                            }
                            if let Some(xt) = xt {
                                let off = (kk * n + s) * il;
                                let cd = cols(&g, &xt.data()[off..off + il], &mut dbuf);
                                gemm(T::one(), gys, MatRef::new(cd, patch, pl).t(), T::one(), dst);
                            }
                        }
                    }
                    acc
                })
                .collect();
            let mut total = partials[0].clone();
            for p in &partials[1..] {
                for (a, &b) in total.iter_mut().zip(p) {
                    *a = *a + b;
                }
            }
            let gw = Tensor::from_vec(nw.value.shape(), total[..wl].to_vec()).expect("conv dw");
            let dot = want_dot.then(|| {
                Tensor::from_vec(&tangent_shape(k, nw.value.shape()), total[wl..].to_vec())
                    .expect("conv dw tangent")
            });
            sink.add(self.w, gw, dot);
        }

        if let Some(b) = self.b.filter(|&b| tape.needs_grad(b)) {
            let gb = Tensor::from_vec(&[g.c_out], channel_sums(gyd, g.c_out, pl)).expect("conv db");
            let dot = gdot.map(|gd| {
                let v: Vec<T> = gd
                    .data()
                    .chunks(n * ol)
                    .flat_map(|c| channel_sums(c, g.c_out, pl))
                    .collect();
                Tensor::from_vec(&[k, g.c_out], v).expect("conv db tangent")
            });
            sink.add(b, gb, dot);
        }
    }
}

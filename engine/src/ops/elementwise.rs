//! Elementwise binary ops with NumPy-style broadcasting: add, sub, mul, div.
//!
//! For y = φ(a, b) with partial derivatives φ_a, φ_b, φ_aa, φ_ab, φ_bb at (a, b):
//! - value: y = φ(a, b)
//! - JVP: ẏ = φ_a ȧ + φ_b ḃ
//! - VJP: ā = Σ ȳ φ_a, b̄ = Σ ȳ φ_b (Σ over broadcast positions)
//! - tangent of VJP: ā˙ = Σ [ȳ˙ φ_a + ȳ (φ_aa ȧ + φ_ab ḃ)], b̄˙ = Σ [ȳ˙ φ_b + ȳ (φ_ab ȧ + φ_bb ḃ)]
//!
//! Each op only states φ and its partials; the rules above are written once.

use super::{tangent_shape, Op, Rule};
use crate::error::{EngineError, Result};
use crate::kernels::par::par_from_fn;
use crate::scalar::Scalar;
use crate::tape::{Sink, Tape, Var};
use crate::tensor::{numel, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Binary {
    Add,
    Sub,
    Mul,
    Div,
}

/// φ and its partials at one point.
struct Partials<T> {
    a: T,
    b: T,
    aa: T,
    ab: T,
    bb: T,
}

impl Binary {
    fn name(self) -> &'static str {
        match self {
            Binary::Add => "add",
            Binary::Sub => "sub",
            Binary::Mul => "mul",
            Binary::Div => "div",
        }
    }

    fn f<T: Scalar>(self, a: T, b: T) -> T {
        match self {
            Binary::Add => a + b,
            Binary::Sub => a - b,
            Binary::Mul => a * b,
            Binary::Div => a / b,
        }
    }

    fn partials<T: Scalar>(self, a: T, b: T) -> Partials<T> {
        let (o, z) = (T::one(), T::zero());
        match self {
            Binary::Add => Partials {
                a: o,
                b: o,
                aa: z,
                ab: z,
                bb: z,
            },
            Binary::Sub => Partials {
                a: o,
                b: -o,
                aa: z,
                ab: z,
                bb: z,
            },
            Binary::Mul => Partials {
                a: b,
                b: a,
                aa: z,
                ab: o,
                bb: z,
            },
            Binary::Div => {
                let inv = o / b;
                Partials {
                    a: inv,
                    b: -a * inv * inv,
                    aa: z,
                    ab: -inv * inv,
                    bb: (a + a) * inv * inv * inv,
                }
            }
        }
    }
}

/// Index maps from the broadcast output to each operand.
#[derive(Clone, Debug)]
struct Broadcast {
    out: Vec<usize>,
    same: bool,
    /// Per output dimension: (extent, stride into a, stride into b).
    dims: Vec<(usize, usize, usize)>,
}

impl Broadcast {
    fn new(op: &'static str, a: &[usize], b: &[usize]) -> Result<Self> {
        let rank = a.len().max(b.len());
        let pad = |s: &[usize]| {
            let mut v = vec![1; rank - s.len()];
            v.extend_from_slice(s);
            v
        };
        let (pa, pb) = (pad(a), pad(b));
        let mut out = Vec::with_capacity(rank);
        for (&x, &y) in pa.iter().zip(&pb) {
            if x != y && x != 1 && y != 1 {
                return Err(EngineError::Shape {
                    op,
                    detail: format!("cannot broadcast {a:?} with {b:?}"),
                });
            }
            out.push(x.max(y));
        }
        let strides = |s: &[usize]| {
            let mut st = vec![0; rank];
            let mut acc = 1;
            for d in (0..rank).rev() {
                st[d] = if s[d] == 1 { 0 } else { acc };
                acc *= s[d];
            }
            st
        };
        let (sa, sb) = (strides(&pa), strides(&pb));
        let dims = (0..rank).map(|d| (out[d], sa[d], sb[d])).collect();
        Ok(Broadcast {
            same: a == b,
            out,
            dims,
        })
    }

    /// Operand indices of output element `i`.
    #[inline]
    fn map(&self, i: usize) -> (usize, usize) {
        if self.same {
            return (i, i);
        }
        let (mut rem, mut ia, mut ib) = (i, 0, 0);
        for &(n, sa, sb) in self.dims.iter().rev() {
            let c = rem % n;
            rem /= n;
            ia += c * sa;
            ib += c * sb;
        }
        (ia, ib)
    }
}

pub(crate) struct BinaryOp {
    a: usize,
    b: usize,
    op: Binary,
    bc: Broadcast,
}

impl<T: Scalar> Tape<T> {
    fn binary(&mut self, a: Var, b: Var, op: Binary) -> Result<Var> {
        self.check_var(a)?;
        self.check_var(b)?;
        let bc = Broadcast::new(op.name(), self.value(a).shape(), self.value(b).shape())?;
        let (av, bv) = (self.value(a).data(), self.value(b).data());
        let y = par_from_fn(numel(&bc.out), |i| {
            let (ia, ib) = bc.map(i);
            op.f(av[ia], bv[ib])
        });
        let y = Tensor::from_vec(&bc.out, y).expect("binary value");
        let (at, bt) = (self.tangent(a), self.tangent(b));
        let tangent = if at.is_none() && bt.is_none() {
            None
        } else {
            let k = self.directions();
            let (m, na, nb) = (y.numel(), av.len(), bv.len());
            let t = par_from_fn(k * m, |i| {
                let (kk, e) = (i / m, i % m);
                let (ia, ib) = bc.map(e);
                let p = op.partials(av[ia], bv[ib]);
                let mut v = T::zero();
                if let Some(at) = at {
                    v = v + p.a * at.data()[kk * na + ia];
                }
                if let Some(bt) = bt {
                    v = v + p.b * bt.data()[kk * nb + ib];
                }
                v
            });
            Some(Tensor::from_vec(&tangent_shape(k, &bc.out), t).expect("binary tangent"))
        };
        Ok(self.push(
            Op::Binary(BinaryOp {
                a: a.0,
                b: b.0,
                op,
                bc,
            }),
            y,
            tangent,
            false,
        ))
    }

    /// a + b (broadcasting; also the residual add).
    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        self.binary(a, b, Binary::Add)
    }

    /// a − b (broadcasting).
    pub fn sub(&mut self, a: Var, b: Var) -> Result<Var> {
        self.binary(a, b, Binary::Sub)
    }

    /// a ⊙ b (broadcasting).
    pub fn mul(&mut self, a: Var, b: Var) -> Result<Var> {
        self.binary(a, b, Binary::Mul)
    }

    /// a / b (broadcasting).
    pub fn div(&mut self, a: Var, b: Var) -> Result<Var> {
        self.binary(a, b, Binary::Div)
    }
}

impl<T: Scalar> Rule<T> for BinaryOp {
    fn inputs(&self) -> Vec<usize> {
        vec![self.a, self.b]
    }

    fn backward(
        &self,
        tape: &Tape<T>,
        _out: usize,
        gy: &Tensor<T>,
        gdot: Option<&Tensor<T>>,
        sink: &mut Sink<T>,
    ) {
        let (na, nb) = (tape.node(self.a), tape.node(self.b));
        let (av, bv) = (na.value.data(), nb.value.data());
        let (at, bt) = (na.tangent.as_ref(), nb.tangent.as_ref());
        let g = gy.data();
        let m = g.len();
        let k = tape.directions();
        let want_dot = gdot.is_some() || at.is_some() || bt.is_some();
        for (side, node) in [(0usize, na), (1, nb)] {
            let id = if side == 0 { self.a } else { self.b };
            if !tape.needs_grad(id) {
                continue;
            }
            let n_in = node.value.numel();
            let pick = |p: &Partials<T>| if side == 0 { p.a } else { p.b };
            if self.bc.same && matches!(self.op, Binary::Add | Binary::Sub) {
                // Linear with unit coefficients: the adjoint (tangent) is ±ȳ (±ȳ˙).
                let neg = side == 1 && self.op == Binary::Sub;
                let signed = |t: &Tensor<T>| {
                    let mut t = t.clone();
                    if neg {
                        t.data_mut().iter_mut().for_each(|v| *v = -*v);
                    }
                    t
                };
                sink.add(id, signed(gy), gdot.map(signed));
                continue;
            }
            let shape = node.value.shape();
            if self.bc.same {
                // One output element per input element: no reduction, so run in parallel.
                let grad = par_from_fn(m, |i| g[i] * pick(&self.op.partials(av[i], bv[i])));
                let grad = Tensor::from_vec(shape, grad).expect("binary grad");
                let dot = want_dot.then(|| {
                    let d = par_from_fn(k * m, |j| {
                        let i = j % m;
                        let p = self.op.partials(av[i], bv[i]);
                        let (second_a, second_b) = if side == 0 {
                            (p.aa, p.ab)
                        } else {
                            (p.ab, p.bb)
                        };
                        let mut v = T::zero();
                        if let Some(gdot) = gdot {
                            v = v + gdot.data()[j] * pick(&p);
                        }
                        if let Some(at) = at {
                            v = v + g[i] * second_a * at.data()[j];
                        }
                        if let Some(bt) = bt {
                            v = v + g[i] * second_b * bt.data()[j];
                        }
                        v
                    });
                    Tensor::from_vec(&tangent_shape(k, shape), d).expect("binary grad tangent")
                });
                sink.add(id, grad, dot);
                continue;
            }
            let mut grad = Tensor::zeros(shape);
            let mut dot = want_dot.then(|| Tensor::zeros(&tangent_shape(k, shape)));
            // Sequential accumulation: a fixed order, so broadcast reductions are deterministic.
            let gd = grad.data_mut();
            #[allow(clippy::needless_range_loop)] // i indexes g, gdot and the broadcast map
            for i in 0..m {
                let (ia, ib) = self.bc.map(i);
                let p = self.op.partials(av[ia], bv[ib]);
                let ii = if side == 0 { ia } else { ib };
                gd[ii] = gd[ii] + g[i] * pick(&p);
                if let Some(dot) = dot.as_mut() {
                    let (second_a, second_b) = if side == 0 {
                        (p.aa, p.ab)
                    } else {
                        (p.ab, p.bb)
                    };
                    let dd = dot.data_mut();
                    for kk in 0..k {
                        let mut v = T::zero();
                        if let Some(gdot) = gdot {
                            v = v + gdot.data()[kk * m + i] * pick(&p);
                        }
                        if let Some(at) = at {
                            v = v + g[i] * second_a * at.data()[kk * av.len() + ia];
                        }
                        if let Some(bt) = bt {
                            v = v + g[i] * second_b * bt.data()[kk * bv.len() + ib];
                        }
                        dd[kk * n_in + ii] = dd[kk * n_in + ii] + v;
                    }
                }
            }
            sink.add(id, grad, dot);
        }
    }
}

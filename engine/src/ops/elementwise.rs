//! Elementwise binary ops with NumPy-style broadcasting: add, sub, mul, div.
//!
//! For y = φ(a, b) with partial derivatives φ_a, φ_b, φ_aa, φ_ab, φ_bb at (a, b):
//! - value: y = φ(a, b)
//! - JVP: ẏ = φ_a ȧ + φ_b ḃ
//! - VJP: ā = Σ ȳ φ_a, b̄ = Σ ȳ φ_b (Σ over broadcast positions)
//! - tangent of VJP: ā˙ = Σ [ȳ˙ φ_a + ȳ (φ_aa ȧ + φ_ab ḃ)], b̄˙ = Σ [ȳ˙ φ_b + ȳ (φ_ab ȧ + φ_bb ḃ)]
//!
//! Each op only states φ and its partials; the rules above are written once.
//!
//! With the ReLU epilogue ([`Tape::add_relu`]) the value is relu(φ(a, b)) in the same pass; the
//! JVP is relu'·ẏ and the backward masks ȳ and ȳ˙ by relu' (ReLU's own VJP, read off the stored
//! output) before the rules above.

use super::activation::{relu, relu_d1, relu_vjp};
use super::{tangent_shape, Op, Rule};
use crate::error::{EngineError, Result};
use crate::kernels::par::{par_from_fn, par_map2};
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

    #[inline(always)]
    fn f<T: Scalar>(self, a: T, b: T) -> T {
        match self {
            Binary::Add => a + b,
            Binary::Sub => a - b,
            Binary::Mul => a * b,
            Binary::Div => a / b,
        }
    }

    /// φ(a, b), then ReLU when `relu_after`.
    #[inline(always)]
    fn f_then<T: Scalar>(self, a: T, b: T, relu_after: bool) -> T {
        let y = self.f(a, b);
        if relu_after {
            relu(y)
        } else {
            y
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

/// φ(a, b) (then ReLU when `relu_after`) over the broadcast output.
fn binary_value<T: Scalar>(
    op: Binary,
    bc: &Broadcast,
    av: &[T],
    bv: &[T],
    relu_after: bool,
) -> Vec<T> {
    // One shape (the residual add): a plain loop over both operands, vectorized; the epilogue
    // is chosen outside the loop (one closure testing both `op` and the epilogue made the whole
    // resnet20 gradient 13% slower, presumably a loop LLVM no longer vectorized).
    match (bc.same, relu_after) {
        (true, false) => par_map2(
            av,
            bv,
            #[inline(always)]
            |x, y| op.f(x, y),
        ),
        (true, true) => par_map2(
            av,
            bv,
            #[inline(always)]
            |x, y| relu(op.f(x, y)),
        ),
        (false, _) => par_from_fn(
            numel(&bc.out),
            #[inline(always)]
            |i| {
                let (ia, ib) = bc.map(i);
                op.f_then(av[ia], bv[ib], relu_after)
            },
        ),
    }
}

pub(crate) struct BinaryOp {
    a: usize,
    b: usize,
    op: Binary,
    bc: Broadcast,
    /// The ReLU epilogue: the op's value is relu(φ(a, b)).
    relu: bool,
}

impl<T: Scalar> Tape<T> {
    fn binary(&mut self, a: Var, b: Var, op: Binary) -> Result<Var> {
        self.binary_then(a, b, op, false)
    }

    /// φ(a, b), then ReLU when `relu`.
    fn binary_then(&mut self, a: Var, b: Var, op: Binary, relu_after: bool) -> Result<Var> {
        self.check_var(a)?;
        self.check_var(b)?;
        let bc = Broadcast::new(op.name(), self.value(a).shape(), self.value(b).shape())?;
        let (av, bv) = (self.value(a).data(), self.value(b).data());
        let y = Tensor::from_vec(&bc.out, binary_value(op, &bc, av, bv, relu_after))?;
        let (at, bt) = (self.tangent(a), self.tangent(b));
        let tangent = if at.is_none() && bt.is_none() {
            None
        } else {
            let k = self.directions();
            let (m, na, nb) = (y.numel(), av.len(), bv.len());
            let t = par_from_fn(
                k * m,
                #[inline(always)]
                |i| {
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
                    if relu_after {
                        v = relu_d1(y.data()[e]) * v;
                    }
                    v
                },
            );
            Some(Tensor::from_vec(&tangent_shape(k, &bc.out), t).expect("binary tangent"))
        };
        Ok(self.push(
            Op::Binary(BinaryOp {
                a: a.0,
                b: b.0,
                op,
                bc,
                relu: relu_after,
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

    /// relu(a + b) as one op (the residual add and its ReLU): the same values, gradients and
    /// Hessian-vector products, bit for bit, as [`Tape::add`] followed by [`Tape::relu`].
    pub fn add_relu(&mut self, a: Var, b: Var) -> Result<Var> {
        self.binary_then(a, b, Binary::Add, true)
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

/// What the backward rule of a [`BinaryOp`] reads for one operand (`side` 0: a, 1: b).
struct Adjoint<'a, T> {
    op: Binary,
    side: usize,
    av: &'a [T],
    bv: &'a [T],
    at: Option<&'a Tensor<T>>,
    bt: Option<&'a Tensor<T>>,
    /// ȳ.
    g: &'a [T],
    /// ȳ˙.
    gdot: Option<&'a Tensor<T>>,
    /// Number of tangent directions.
    k: usize,
}

impl<T: Scalar> Adjoint<'_, T> {
    /// This operand's first partial.
    fn pick(&self, p: &Partials<T>) -> T {
        if self.side == 0 {
            p.a
        } else {
            p.b
        }
    }

    /// One term of the tangent of the VJP: ȳ˙ φ_side + ȳ (φ_side,a ȧ + φ_side,b ḃ), from the
    /// entries `gd` of ȳ˙, `ad` of ȧ and `bd` of ḃ (each when present).
    fn dot_term(&self, p: &Partials<T>, gi: T, gd: Option<T>, ad: Option<T>, bd: Option<T>) -> T {
        let (second_a, second_b) = if self.side == 0 {
            (p.aa, p.ab)
        } else {
            (p.ab, p.bb)
        };
        let mut v = T::zero();
        if let Some(gd) = gd {
            v = v + gd * self.pick(p);
        }
        if let Some(ad) = ad {
            v = v + gi * second_a * ad;
        }
        if let Some(bd) = bd {
            v = v + gi * second_b * bd;
        }
        v
    }

    /// Operands of one shape: one output element per input element, no reduction, so the
    /// gradient and its tangent run in parallel.
    fn same_shape(&self, shape: &[usize], want_dot: bool) -> (Tensor<T>, Option<Tensor<T>>) {
        let (g, av, bv, k) = (self.g, self.av, self.bv, self.k);
        let m = g.len();
        let grad = par_from_fn(
            m,
            #[inline(always)]
            |i| g[i] * self.pick(&self.op.partials(av[i], bv[i])),
        );
        let grad = Tensor::from_vec(shape, grad).expect("binary grad");
        let dot = want_dot.then(|| {
            let d = par_from_fn(
                k * m,
                #[inline(always)]
                |j| {
                    let i = j % m;
                    let p = self.op.partials(av[i], bv[i]);
                    let at_j = |t: &Tensor<T>| t.data()[j];
                    self.dot_term(
                        &p,
                        g[i],
                        self.gdot.map(at_j),
                        self.at.map(at_j),
                        self.bt.map(at_j),
                    )
                },
            );
            Tensor::from_vec(&tangent_shape(k, shape), d).expect("binary grad tangent")
        });
        (grad, dot)
    }

    /// Broadcast operands: gradient and tangent summed over broadcast positions,
    /// sequentially in output order (deterministic reductions).
    fn broadcast(
        &self,
        bc: &Broadcast,
        shape: &[usize],
        want_dot: bool,
    ) -> (Tensor<T>, Option<Tensor<T>>) {
        let (g, av, bv, k) = (self.g, self.av, self.bv, self.k);
        let (m, n_in) = (g.len(), numel(shape));
        let mut grad = Tensor::zeros(shape);
        let mut dot = want_dot.then(|| Tensor::zeros(&tangent_shape(k, shape)));
        let gd = grad.data_mut();
        #[allow(clippy::needless_range_loop)] // i indexes g, gdot and the broadcast map
        for i in 0..m {
            let (ia, ib) = bc.map(i);
            let p = self.op.partials(av[ia], bv[ib]);
            let ii = if self.side == 0 { ia } else { ib };
            gd[ii] = gd[ii] + g[i] * self.pick(&p);
            if let Some(dot) = dot.as_mut() {
                let dd = dot.data_mut();
                for kk in 0..k {
                    let v = self.dot_term(
                        &p,
                        g[i],
                        self.gdot.map(|t| t.data()[kk * m + i]),
                        self.at.map(|t| t.data()[kk * av.len() + ia]),
                        self.bt.map(|t| t.data()[kk * bv.len() + ib]),
                    );
                    dd[kk * n_in + ii] = dd[kk * n_in + ii] + v;
                }
            }
        }
        (grad, dot)
    }
}

/// `t`, negated when `neg`.
fn signed<T: Scalar>(t: &Tensor<T>, neg: bool) -> Tensor<T> {
    let mut t = t.clone();
    if neg {
        t.data_mut().iter_mut().for_each(|v| *v = -*v);
    }
    t
}

impl<T: Scalar> Rule<T> for BinaryOp {
    fn inputs(&self) -> Vec<usize> {
        vec![self.a, self.b]
    }

    fn backward(
        &self,
        tape: &Tape<T>,
        out: usize,
        gy: &Tensor<T>,
        gdot: Option<&Tensor<T>>,
        sink: &mut Sink<T>,
    ) {
        // The ReLU epilogue: ȳ and ȳ˙ masked by ReLU's own VJP first.
        let masked = self.relu.then(|| {
            let (k, y) = (tape.directions(), &tape.node(out).value);
            let (g, gd) = relu_vjp(y.data(), gy.data(), gdot.map(Tensor::data), k);
            let gd = gd.map(|d| Tensor::from_vec(&tangent_shape(k, y.shape()), d).expect("shape"));
            (Tensor::from_vec(y.shape(), g).expect("shape"), gd)
        });
        let (gy, gdot) = match &masked {
            Some((g, gd)) => (g, gd.as_ref()),
            None => (gy, gdot),
        };
        let (na, nb) = (tape.node(self.a), tape.node(self.b));
        let (at, bt) = (na.tangent.as_ref(), nb.tangent.as_ref());
        let want_dot = gdot.is_some() || at.is_some() || bt.is_some();
        for (side, node) in [(0usize, na), (1, nb)] {
            let id = if side == 0 { self.a } else { self.b };
            if !tape.needs_grad(id) {
                continue;
            }
            if self.bc.same && matches!(self.op, Binary::Add | Binary::Sub) {
                // Linear with unit coefficients: the adjoint (tangent) is ±ȳ (±ȳ˙).
                let neg = side == 1 && self.op == Binary::Sub;
                sink.add(id, signed(gy, neg), gdot.map(|t| signed(t, neg)));
                continue;
            }
            let adj = Adjoint {
                op: self.op,
                side,
                av: na.value.data(),
                bv: nb.value.data(),
                at,
                bt,
                g: gy.data(),
                gdot,
                k: tape.directions(),
            };
            let shape = node.value.shape();
            let (grad, dot) = if self.bc.same {
                adj.same_shape(shape, want_dot)
            } else {
                adj.broadcast(&self.bc, shape, want_dot)
            };
            sink.add(id, grad, dot);
        }
    }
}

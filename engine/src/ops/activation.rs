//! Elementwise unary ops: activations (relu, tanh, sigmoid, gelu, softplus) and scalar ops.
//!
//! For y = φ(x), with φ', φ'' at x:
//! - value: y = φ(x)
//! - JVP: ẏ = φ'(x) ẋ
//! - VJP: x̄ = φ'(x) ȳ
//! - tangent of VJP: (x̄)˙ = φ''(x) ẋ ȳ + φ'(x) ȳ˙
//!
//! Each function only states φ, φ' and φ''; the four rules above are written once.
//! Kink policy: relu'(0) = 0 (as PyTorch); relu'' = 0 everywhere.

use super::{tangent_shape, Rule};
use crate::error::Result;
use crate::kernels::cpu::vectorized;
use crate::kernels::par::{par_chunks, par_map, par_map2};
use crate::scalar::Scalar;
use crate::tape::{Sink, Tape, Var};
use crate::tensor::Tensor;

/// An elementwise function of one argument.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary<T> {
    /// max(x, 0).
    Relu,
    /// tanh(x).
    Tanh,
    /// 1 / (1 + e^-x).
    Sigmoid,
    /// x Φ(x) with the exact (erf) normal CDF, PyTorch's default GELU.
    Gelu,
    /// ln(1 + e^x), linear above x = 20 as in PyTorch (beta 1, threshold 20).
    Softplus,
    /// x + c.
    AddScalar(T),
    /// c x.
    MulScalar(T),
    /// x².
    Square,
    /// e^x.
    Exp,
}

impl<T: Scalar> Unary<T> {
    /// φ(x).
    pub fn f(self, x: T) -> T {
        match self {
            Unary::Relu => relu(x),
            Unary::Tanh => x.tanh(),
            Unary::Sigmoid => sigmoid(x),
            Unary::Gelu => x * normal_cdf(x),
            Unary::Softplus => {
                if x > T::c(20.0) {
                    x
                } else {
                    x.exp().ln_1p()
                }
            }
            Unary::AddScalar(c) => x + c,
            Unary::MulScalar(c) => c * x,
            Unary::Square => x * x,
            Unary::Exp => x.exp(),
        }
    }

    /// φ'(x).
    pub fn d1(self, x: T) -> T {
        match self {
            Unary::Relu => relu_d1(x),
            Unary::Tanh => {
                let t = x.tanh();
                T::one() - t * t
            }
            Unary::Sigmoid => {
                let s = sigmoid(x);
                s * (T::one() - s)
            }
            Unary::Gelu => normal_cdf(x) + x * normal_pdf(x),
            Unary::Softplus => {
                if x > T::c(20.0) {
                    T::one()
                } else {
                    sigmoid(x)
                }
            }
            Unary::AddScalar(_) => T::one(),
            Unary::MulScalar(c) => c,
            Unary::Square => x + x,
            Unary::Exp => x.exp(),
        }
    }

    /// φ''(x).
    pub fn d2(self, x: T) -> T {
        match self {
            Unary::Relu | Unary::AddScalar(_) | Unary::MulScalar(_) => T::zero(),
            Unary::Tanh => {
                let t = x.tanh();
                -(t + t) * (T::one() - t * t)
            }
            Unary::Sigmoid => {
                let s = sigmoid(x);
                s * (T::one() - s) * (T::one() - s - s)
            }
            Unary::Gelu => normal_pdf(x) * (T::c(2.0) - x * x),
            Unary::Softplus => {
                if x > T::c(20.0) {
                    T::zero()
                } else {
                    let s = sigmoid(x);
                    s * (T::one() - s)
                }
            }
            Unary::Square => T::c(2.0),
            Unary::Exp => x.exp(),
        }
    }

    /// False when φ'' vanishes everywhere, so the curvature term can be skipped.
    pub fn has_curvature(self) -> bool {
        !matches!(
            self,
            Unary::Relu | Unary::AddScalar(_) | Unary::MulScalar(_)
        )
    }

    /// Parses an activation name (`relu`, `tanh`, `sigmoid`, `gelu`, `softplus`).
    pub fn activation(name: &str) -> Option<Self> {
        Some(match name {
            "relu" => Unary::Relu,
            "tanh" => Unary::Tanh,
            "sigmoid" => Unary::Sigmoid,
            "gelu" => Unary::Gelu,
            "softplus" => Unary::Softplus,
            _ => return None,
        })
    }
}

fn sigmoid<T: Scalar>(x: T) -> T {
    if x >= T::zero() {
        T::one() / (T::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (T::one() + e)
    }
}

fn normal_cdf<T: Scalar>(x: T) -> T {
    T::c(0.5) * (T::one() + (x * T::c(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

fn normal_pdf<T: Scalar>(x: T) -> T {
    T::c(0.398_942_280_401_432_7) * (-(x * x) * T::c(0.5)).exp()
}

pub(crate) struct UnaryOp<T> {
    x: usize,
    f: Unary<T>,
}

/// Which derivative of φ to tabulate.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    Value,
    First,
    Second,
}

/// `out[i] = φ^(order)(x[i])`, in parallel fixed chunks, with the function chosen once per
/// chunk so the inner loop is tight (ReLU, the common case, gets its own loops).
fn tabulate<T: Scalar>(f: Unary<T>, order: Order, xs: &[T]) -> Vec<T> {
    match (f, order) {
        (Unary::Relu, Order::Value) => par_map(xs, relu),
        (Unary::Relu, Order::First) => par_map(xs, relu_d1),
        (_, Order::Value) => par_map(
            xs,
            #[inline(always)]
            |v| f.f(v),
        ),
        (_, Order::First) => par_map(
            xs,
            #[inline(always)]
            |v| f.d1(v),
        ),
        (_, Order::Second) => par_map(
            xs,
            #[inline(always)]
            |v| f.d2(v),
        ),
    }
}

/// `x[i] = φ(x[i])` on one task's slice (an inference epilogue's plane), at the machine's
/// vector width: the values of [`tabulate`]'s `Order::Value`.
pub(crate) fn apply_in_place<T: Scalar>(f: Unary<T>, xs: &mut [T]) {
    match f {
        Unary::Relu => vectorized(
            #[inline(always)]
            || xs.iter_mut().for_each(|v| *v = relu(*v)),
        ),
        _ => vectorized(
            #[inline(always)]
            || xs.iter_mut().for_each(|v| *v = f.f(*v)),
        ),
    }
}

/// ReLU: `v` above zero, 0 elsewhere (NaN gives 0).
#[inline(always)]
pub(crate) fn relu<T: Scalar>(v: T) -> T {
    if v > T::zero() {
        v
    } else {
        T::zero()
    }
}

/// ReLU's derivative: 1 above zero, 0 elsewhere. Also ReLU's derivative at its *input*
/// read off its output (`relu(z) > 0` exactly when `z > 0`), which fused ops use.
#[inline(always)]
pub(crate) fn relu_d1<T: Scalar>(v: T) -> T {
    if v > T::zero() {
        T::one()
    } else {
        T::zero()
    }
}

/// ReLU's VJP and its tangent at input (or output) values `x`: x̄ = relu'(x) ȳ and, with
/// `gdot: [K, m]`, x̄˙ = relu'(x) ȳ˙ (relu'' vanishes, so there is no curvature term).
pub(crate) fn relu_vjp<T: Scalar>(
    x: &[T],
    g: &[T],
    gdot: Option<&[T]>,
    k: usize,
) -> (Vec<T>, Option<Vec<T>>) {
    let gx = par_map2(
        x,
        g,
        #[inline(always)]
        |x, gy| relu_d1(x) * gy,
    );
    let dot = gdot.map(|gd| {
        let d1 = tabulate(Unary::Relu, Order::First, x);
        scale_blocks(x.len(), k, &[(&d1, gd)])
    });
    (gx, dot)
}

/// `out[k][i] = Σ_terms a_t[i] · b_t[k][i]` over `[K, m]` blocks, where each term pairs a
/// per-element factor `a` (length m) with a `[K, m]` array `b`.
pub(crate) fn scale_blocks<T: Scalar>(m: usize, k: usize, terms: &[(&[T], &[T])]) -> Vec<T> {
    let mut out = vec![T::zero(); k * m];
    for kk in 0..k {
        par_chunks(
            &mut out[kk * m..(kk + 1) * m],
            #[inline(always)]
            |off, c| {
                for (t, (a, b)) in terms.iter().enumerate() {
                    let a = &a[off..off + c.len()];
                    let b = &b[kk * m + off..kk * m + off + c.len()];
                    if t == 0 {
                        for ((o, &ai), &bi) in c.iter_mut().zip(a).zip(b) {
                            *o = ai * bi;
                        }
                    } else {
                        for ((o, &ai), &bi) in c.iter_mut().zip(a).zip(b) {
                            *o = *o + ai * bi;
                        }
                    }
                }
            },
        );
    }
    out
}

impl<T: Scalar> Tape<T> {
    /// Applies the elementwise function `f`.
    pub fn unary(&mut self, x: Var, f: Unary<T>) -> Result<Var> {
        self.check_var(x)?;
        let xv = self.value(x);
        let xs = xv.data();
        let y = Tensor::from_vec(xv.shape(), tabulate(f, Order::Value, xs))?;
        let k = self.directions();
        let tangent = self.tangent(x).map(|xt| {
            let d1 = tabulate(f, Order::First, xs);
            let t = scale_blocks(xs.len(), k, &[(&d1, xt.data())]);
            Tensor::from_vec(xt.shape(), t).expect("tangent shape")
        });
        Ok(self.push(super::Op::Unary(UnaryOp { x: x.0, f }), y, tangent, false))
    }

    /// ReLU.
    pub fn relu(&mut self, x: Var) -> Result<Var> {
        self.unary(x, Unary::Relu)
    }

    /// tanh.
    pub fn tanh(&mut self, x: Var) -> Result<Var> {
        self.unary(x, Unary::Tanh)
    }

    /// Logistic sigmoid.
    pub fn sigmoid(&mut self, x: Var) -> Result<Var> {
        self.unary(x, Unary::Sigmoid)
    }

    /// GELU, exact erf form (PyTorch's default).
    pub fn gelu(&mut self, x: Var) -> Result<Var> {
        self.unary(x, Unary::Gelu)
    }

    /// Softplus (beta 1, threshold 20, as PyTorch).
    pub fn softplus(&mut self, x: Var) -> Result<Var> {
        self.unary(x, Unary::Softplus)
    }

    /// x + c.
    pub fn add_scalar(&mut self, x: Var, c: T) -> Result<Var> {
        self.unary(x, Unary::AddScalar(c))
    }

    /// c x.
    pub fn mul_scalar(&mut self, x: Var, c: T) -> Result<Var> {
        self.unary(x, Unary::MulScalar(c))
    }

    /// x².
    pub fn square(&mut self, x: Var) -> Result<Var> {
        self.unary(x, Unary::Square)
    }

    /// e^x.
    pub fn exp(&mut self, x: Var) -> Result<Var> {
        self.unary(x, Unary::Exp)
    }
}

impl<T: Scalar> Rule<T> for UnaryOp<T> {
    fn inputs(&self) -> Vec<usize> {
        vec![self.x]
    }

    fn backward(
        &self,
        tape: &Tape<T>,
        _out: usize,
        gy: &Tensor<T>,
        gdot: Option<&Tensor<T>>,
        sink: &mut Sink<T>,
    ) {
        let f = self.f;
        let node = tape.node(self.x);
        let xs = node.value.data();
        let g = gy.data();
        let m = xs.len();
        let k = tape.directions();
        if f == Unary::Relu {
            let (gx, dot) = relu_vjp(xs, g, gdot.map(Tensor::data), k);
            let shape = node.value.shape();
            let dot = dot.map(|d| Tensor::from_vec(&tangent_shape(k, shape), d).expect("shape"));
            sink.add(
                self.x,
                Tensor::from_vec(shape, gx).expect("grad shape"),
                dot,
            );
            return;
        }
        // x̄ = φ'(x) ȳ in one pass (the table φ'(x) is built only when a tangent term needs it)
        let gx = par_map2(
            xs,
            g,
            #[inline(always)]
            |x, gy| f.d1(x) * gy,
        );
        let d1 = gdot.map(|_| tabulate(f, Order::First, xs));
        let xt = node.tangent.as_ref().filter(|_| f.has_curvature());
        // x̄˙ = φ'(x) ȳ˙ + (φ''(x) ȳ) ẋ
        let curv: Option<Vec<T>> = xt.map(|_| {
            let mut d2 = tabulate(f, Order::Second, xs);
            d2.iter_mut().zip(g).for_each(|(a, &b)| *a = *a * b);
            d2
        });
        let mut terms: Vec<(&[T], &[T])> = Vec::with_capacity(2);
        if let (Some(gd), Some(d1)) = (gdot, &d1) {
            terms.push((d1, gd.data()));
        }
        if let (Some(c), Some(xt)) = (&curv, xt) {
            terms.push((c, xt.data()));
        }
        let dot = (!terms.is_empty()).then(|| {
            Tensor::from_vec(
                &tangent_shape(k, node.value.shape()),
                scale_blocks(m, k, &terms),
            )
            .expect("tangent shape")
        });
        let gx = Tensor::from_vec(node.value.shape(), gx).expect("grad shape");
        sink.add(self.x, gx, dot);
    }
}

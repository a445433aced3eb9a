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
use crate::kernels::par::{par_chunks, par_fill};
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
            Unary::Relu => {
                if x > T::zero() {
                    x
                } else {
                    T::zero()
                }
            }
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
            Unary::Relu => {
                if x > T::zero() {
                    T::one()
                } else {
                    T::zero()
                }
            }
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
        !matches!(self, Unary::Relu | Unary::AddScalar(_) | Unary::MulScalar(_))
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

impl<T: Scalar> Tape<T> {
    /// Applies the elementwise function `f`.
    pub fn unary(&mut self, x: Var, f: Unary<T>) -> Result<Var> {
        self.check_var(x)?;
        let xv = self.value(x);
        let xs = xv.data();
        let mut y = Tensor::zeros(xv.shape());
        par_fill(y.data_mut(), |i| f.f(xs[i]));
        let tangent = self.tangent(x).map(|xt| {
            let m = xs.len();
            let mut t = Tensor::zeros(xt.shape());
            let xd = xt.data();
            par_fill(t.data_mut(), |i| f.d1(xs[i % m]) * xd[i]);
            t
        });
        Ok(self.push(
            super::Op::Unary(UnaryOp { x: x.0, f }),
            y,
            tangent,
            false,
        ))
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
        let mut gx = Tensor::zeros(node.value.shape());
        par_fill(gx.data_mut(), |i| f.d1(xs[i]) * g[i]);
        let curv = f.has_curvature();
        let xt = node.tangent.as_ref().filter(|_| curv);
        let dot = if gdot.is_none() && xt.is_none() {
            None
        } else {
            let k = tape.directions();
            let mut d = Tensor::zeros(&tangent_shape(k, node.value.shape()));
            par_chunks(d.data_mut(), |off, c| {
                for (j, o) in c.iter_mut().enumerate() {
                    let i = off + j;
                    let e = i % m;
                    let mut v = T::zero();
                    if let Some(gd) = gdot {
                        v = f.d1(xs[e]) * gd.data()[i];
                    }
                    if let Some(xt) = xt {
                        v = v + f.d2(xs[e]) * xt.data()[i] * g[e];
                    }
                    *o = v;
                }
            });
            Some(d)
        };
        sink.add(self.x, gx, dot);
    }
}

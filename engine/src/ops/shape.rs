//! Reductions to a scalar (sum, mean) and reshapes (including flatten).
//!
//! Sum with scale s (s = 1 for sum, 1/M for mean), y = s Σ x:
//! - JVP: ẏ = s Σ ẋ;  VJP: x̄ = s ȳ (broadcast);  tangent of VJP: x̄˙ = s ȳ˙ (broadcast).
//!
//! Reshape is linear and moves no data: all four rules are the same reshape, which shares the
//! buffer.

use super::{tangent_shape, Op, Rule};
use crate::error::{EngineError, Result};
use crate::kernels::reduce::sum as total;
use crate::scalar::Scalar;
use crate::tape::{Sink, Tape, Var};
use crate::tensor::{numel, Tensor};

pub(crate) struct Sum {
    x: usize,
    /// 1 for a sum, 1/M for a mean (stored as f64 so the op is not generic).
    scale: f64,
}

pub(crate) struct Reshape {
    x: usize,
}

impl<T: Scalar> Tape<T> {
    fn reduce(&mut self, x: Var, scale: f64) -> Result<Var> {
        let xv = self.value(x).data();
        let s = T::c(scale);
        let y = Tensor::scalar(total(xv) * s);
        let tangent = self.tangent(x).map(|t| {
            let m = xv.len().max(1);
            let v: Vec<T> = t.data().chunks(m).map(|c| total(c) * s).collect();
            let k = v.len();
            Tensor::from_vec(&[k], v).expect("tangent of a scalar")
        });
        Ok(self.push(Op::Sum(Sum { x: x.0, scale }), y, tangent, false))
    }

    /// Σ x over all elements (a scalar).
    pub fn sum(&mut self, x: Var) -> Result<Var> {
        self.check_var(x)?;
        self.reduce(x, 1.0)
    }

    /// Mean of all elements (a scalar).
    pub fn mean(&mut self, x: Var) -> Result<Var> {
        self.check_var(x)?;
        let m = self.value(x).numel();
        if m == 0 {
            return Err(EngineError::Shape {
                op: "mean",
                detail: "mean of an empty tensor".into(),
            });
        }
        self.reduce(x, 1.0 / m as f64)
    }

    /// The same values under another shape with the same number of elements.
    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Result<Var> {
        self.check_var(x)?;
        let xv = self.value(x);
        if numel(shape) != xv.numel() {
            return Err(EngineError::Shape {
                op: "reshape",
                detail: format!("{:?} to {shape:?}", xv.shape()),
            });
        }
        // The buffers are shared, not copied (a later write copies on write).
        let y = xv.clone().reshape(shape)?;
        let k = self.directions();
        let tangent = self
            .tangent(x)
            .map(|t| t.clone().reshape(&tangent_shape(k, shape)))
            .transpose()?;
        Ok(self.push(Op::Reshape(Reshape { x: x.0 }), y, tangent, false))
    }

    /// Flattens all dimensions after the first: `[n, ...] -> [n, prod(...)]`.
    pub fn flatten(&mut self, x: Var) -> Result<Var> {
        self.check_var(x)?;
        let s = self.value(x).shape();
        let n = s.first().copied().unwrap_or(1);
        let rest = numel(s.get(1..).unwrap_or(&[]));
        self.reshape(x, &[n, rest])
    }
}

impl<T: Scalar> Rule<T> for Sum {
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
        let shape = tape.node(self.x).value.shape();
        let s = T::c(self.scale);
        let g = Tensor::full(shape, gy.data()[0] * s);
        let k = tape.directions();
        let dot = gdot.map(|gd| {
            let m = numel(shape);
            let mut d = Vec::with_capacity(k * m);
            for &v in gd.data() {
                d.extend(std::iter::repeat_n(v * s, m));
            }
            Tensor::from_vec(&tangent_shape(k, shape), d).expect("tangent shape")
        });
        sink.add(self.x, g, dot);
    }
}

impl<T: Scalar> Rule<T> for Reshape {
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
        let shape = tape.node(self.x).value.shape();
        let k = tape.directions();
        let g = gy.clone().reshape(shape).expect("reshape back");
        let dot = gdot.map(|d| {
            d.clone()
                .reshape(&tangent_shape(k, shape))
                .expect("reshape back")
        });
        sink.add(self.x, g, dot);
    }
}

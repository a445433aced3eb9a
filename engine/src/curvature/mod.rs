//! Curvature building blocks over any loss closure: gradient, HVP, batched HVP.
//!
//! A loss is given as a closure that records the computation on a tape from parameter
//! variables. [`hvp`] evaluates the loss, its gradient and `H v_k` for K directions in one
//! forward-over-reverse pass.

use crate::error::Result;
use crate::scalar::Scalar;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;

/// Loss value, gradient and Hessian-vector products at one point.
#[derive(Clone, Debug)]
pub struct HvpResult<T> {
    /// Loss value.
    pub loss: T,
    /// Gradient, one tensor per parameter.
    pub grad: Vec<Tensor<T>>,
    /// `hvp[k][i]`: parameter `i`'s block of `H v_k`.
    pub hvp: Vec<Vec<Tensor<T>>>,
}

/// Evaluates `loss` at `params` and returns loss, gradient and `H v_k` for every direction
/// in `dirs` (`dirs[k][i]` has the shape of `params[i]`; `dirs` may be empty).
pub fn hvp<T: Scalar>(
    params: &[Tensor<T>],
    dirs: &[Vec<Tensor<T>>],
    loss: impl FnOnce(&mut Tape<T>, &[Var]) -> Result<Var>,
) -> Result<HvpResult<T>> {
    let k = dirs.len();
    let mut tape = Tape::new(k);
    let mut vars = Vec::with_capacity(params.len());
    for (i, p) in params.iter().enumerate() {
        let tangent = if k == 0 {
            None
        } else {
            let parts: Vec<Tensor<T>> = dirs.iter().map(|d| d[i].clone()).collect();
            Some(Tensor::stack(&parts)?)
        };
        vars.push(tape.param(p.clone(), tangent)?);
    }
    let out = loss(&mut tape, &vars)?;
    let mut grads = tape.backward(out)?;
    let value = tape.value(out).data()[0];
    let mut grad = Vec::with_capacity(vars.len());
    let mut hv: Vec<Vec<Tensor<T>>> = (0..k).map(|_| Vec::with_capacity(vars.len())).collect();
    for &v in &vars {
        grad.push(grads.take_grad(v).unwrap_or_else(|| Tensor::zeros(tape.value(v).shape())));
        if k > 0 {
            let h = grads.take_hvp(v).unwrap_or_else(|| grads.hvp(&tape, v));
            for (kk, slot) in hv.iter_mut().enumerate() {
                slot.push(h.index0(kk));
            }
        }
    }
    Ok(HvpResult {
        loss: value,
        grad,
        hvp: hv,
    })
}

/// Loss and gradient only (no tangents carried).
pub fn grad<T: Scalar>(
    params: &[Tensor<T>],
    loss: impl FnOnce(&mut Tape<T>, &[Var]) -> Result<Var>,
) -> Result<(T, Vec<Tensor<T>>)> {
    let r = hvp(params, &[], loss)?;
    Ok((r.loss, r.grad))
}

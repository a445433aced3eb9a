//! Curvature of a loss over any model: gradient, HVP, batched HVP, exact traces, trace
//! estimators and Hessian spectra.
//!
//! A loss is given as a closure that records the computation on a tape from parameter
//! variables. [`hvp`] evaluates the loss, its gradient and `H v_k` for K directions in one
//! forward-over-reverse pass.
//!
//! Everything else works on a [`Hessian`]: the Hessian of a loss averaged over the batches of
//! a dataset (a [`BatchLoss`]; [`Hessian::from_fn`] for a single batch), seen as a linear
//! operator on flat vectors in the parameters' order ([`ParamLayout`]). It applies `H` to many
//! vectors at once, `K` ([`HvpConfig::directions_per_pass`]) per forward-over-reverse pass, and
//! counts what it spent. On top of it:
//!
//! | function | what | cost in HVPs (d = trainable scalars) |
//! | --- | --- | --- |
//! | [`exact_trace`] | trace, exact diagonal, per-tensor traces | d |
//! | [`structural_trace`] | the same, by structure, for a declared [`Net`] | none |
//! | [`hutchinson`] | trace estimate with a confidence-interval stopping rule | probes used |
//! | [`hutch_plus_plus`] | Hutch++ trace estimate | the budget `m` |
//! | [`lanczos`] | extreme eigenvalues (and eigenvectors) | iterations |
//! | [`slq`] | spectral density by stochastic Lanczos quadrature | probes × steps |
//!
//! One HVP here is one product `H v` with the dataset-level Hessian: it costs one
//! per-batch HVP on every batch, and `K` of them share one pass per batch.
//!
//! ```
//! use flatmin_engine::curvature::{exact_trace, Hessian, HvpConfig};
//! use flatmin_engine::Tensor;
//! // f(w) = sum(tanh(x w)): its Hessian is diagonal here.
//! let w = vec![Tensor::from_vec(&[2, 1], vec![0.3, -0.2]).unwrap()];
//! let x = Tensor::from_vec(&[1, 2], vec![0.5, -1.0]).unwrap();
//! let h = Hessian::from_fn(&w, |t, v| {
//!     let xv = t.constant(x.clone());
//!     let y = t.matmul(xv, v[0])?;
//!     let a = t.tanh(y)?;
//!     t.sum(a)
//! }, HvpConfig::default()).unwrap();
//! let tr = exact_trace(&h).unwrap();
//! assert_eq!(tr.dim, 2);
//! assert_eq!(tr.hvps, 2);
//! assert!((tr.normalized_trace - tr.trace / 2.0).abs() < 1e-15);
//! ```

mod estimators;
mod lanczos;
mod linalg;
mod operator;
mod structural;
mod trace;
mod tridiag;

pub use estimators::{
    hutch_plus_plus, hutchinson, student_t_quantile, HutchPlusPlusOptions, HutchPlusPlusResult,
    HutchinsonOptions, HutchinsonResult,
};
pub use lanczos::{
    gaussian_density, lanczos, slq, LanczosOptions, LanczosResult, SlqOptions, SlqProbe, SlqResult,
    Which,
};
pub use operator::{BatchLoss, Batches, Hessian, HvpConfig, ParamLayout, Progress, SingleBatch};
pub use structural::{
    structural_support, structural_trace, StructuralAccumulator, StructuralBlock,
    StructuralOptions, StructuralSupport, StructuralTrace,
};
pub use trace::{exact_trace, exact_trace_of, BlockTrace, ExactTrace};
pub use tridiag::{tridiagonal_eigen, TridiagonalEigen};

use crate::error::{EngineError, Result};
use crate::scalar::Scalar;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use thiserror::Error;

/// What can go wrong in a curvature computation.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CurvatureError {
    /// The tape or the loss closure failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// An option or argument is out of range.
    #[error("{what}: {detail}")]
    Invalid {
        /// The option or argument.
        what: &'static str,
        /// Its value and what was expected.
        detail: String,
    },
    /// A Hessian-vector product came back with NaN or infinity.
    #[error("non-finite Hessian-vector product on batch {batch}")]
    NonFinite {
        /// The batch whose pass produced it.
        batch: usize,
    },
    /// The tridiagonal eigensolver did not converge (not seen on finite input).
    #[error("tridiagonal eigensolver: no convergence at index {index} of {size}")]
    NoConvergence {
        /// The eigenvalue being isolated.
        index: usize,
        /// The matrix size.
        size: usize,
    },
}

/// Result alias of the curvature module.
pub type CurvatureResult<T> = std::result::Result<T, CurvatureError>;

pub(crate) fn invalid<T>(what: &'static str, detail: impl Into<String>) -> CurvatureResult<T> {
    Err(CurvatureError::Invalid {
        what,
        detail: detail.into(),
    })
}

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
///
/// Cost: one forward-over-reverse pass carrying `dirs.len()` tangents.
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
        grad.push(
            grads
                .take_grad(v)
                .unwrap_or_else(|| Tensor::zeros(tape.value(v).shape())),
        );
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
///
/// Cost: one gradient pass.
pub fn grad<T: Scalar>(
    params: &[Tensor<T>],
    loss: impl FnOnce(&mut Tape<T>, &[Var]) -> Result<Var>,
) -> Result<(T, Vec<Tensor<T>>)> {
    let r = hvp(params, &[], loss)?;
    Ok((r.loss, r.grad))
}

//! flatmin-optim: optimizers behind one [`Optimizer`] trait, built around a gradient oracle.
//!
//! An optimizer never touches a tape: it asks an [`Oracle`] for "the loss and gradient at
//! these parameters on the current batch", as often as its algorithm needs (SGD once, SAM
//! twice, ...). The training loop supplies the oracle and does not know which optimizer runs.
#![warn(missing_docs)]

pub mod adamw;
pub mod schedule;
pub mod sgd;

pub use adamw::AdamW;
pub use schedule::{LrSchedule, Schedule};
pub use sgd::Sgd;

use flatmin_engine::{Scalar, Tensor};

/// Errors raised by optimizers (the oracle's own errors pass through as text).
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// The gradient oracle failed.
    #[error("gradient evaluation failed: {0}")]
    Oracle(String),
    /// A hyperparameter is out of range.
    #[error("invalid hyperparameter {name} = {value}: {why}")]
    Hyper {
        /// Flag-style name of the hyperparameter.
        name: &'static str,
        /// The value given.
        value: f64,
        /// The accepted range.
        why: &'static str,
    },
    /// Saved optimizer state does not fit the parameters.
    #[error("optimizer state '{0}' does not match the parameters")]
    State(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, OptimError>;

/// Loss and gradient at given parameters on the current batch.
pub trait Oracle<T> {
    /// Evaluates loss and gradient (one tensor per parameter) at `params`.
    fn eval(&mut self, params: &[Tensor<T>]) -> Result<(T, Vec<Tensor<T>>)>;
}

impl<T, F> Oracle<T> for F
where
    F: FnMut(&[Tensor<T>]) -> Result<(T, Vec<Tensor<T>>)>,
{
    fn eval(&mut self, params: &[Tensor<T>]) -> Result<(T, Vec<Tensor<T>>)> {
        self(params)
    }
}

/// What one optimizer step did, for logging.
#[derive(Clone, Debug, PartialEq)]
pub struct StepInfo {
    /// Loss at the current parameters (before the step).
    pub loss: f64,
    /// Euclidean norm of the gradient at the current parameters.
    pub grad_norm: f64,
    /// Number of gradient evaluations this step used.
    pub grad_evals: usize,
    /// Optimizer-specific figures (e.g. perturbation norm, gate hits), by name.
    pub extra: Vec<(String, f64)>,
}

/// An optimization algorithm over a list of parameter tensors.
pub trait Optimizer<T: Scalar>: Send {
    /// Short name as used on the command line (`sgd`, `adamw`, ...).
    fn name(&self) -> &'static str;
    /// Performs one step with learning rate `lr`, querying `oracle` as needed.
    fn step(&mut self, params: &mut [Tensor<T>], oracle: &mut dyn Oracle<T>, lr: f64) -> Result<StepInfo>;
    /// The optimizer's state (buffers, counters, RNG state) as named tensors, for checkpoints.
    fn state(&self) -> Vec<(String, Tensor<T>)>;
    /// Restores state produced by [`Optimizer::state`].
    fn load_state(&mut self, state: Vec<(String, Tensor<T>)>) -> Result<()>;
}

/// Euclidean norm of a list of tensors, accumulated in f64.
pub fn global_norm<T: Scalar>(ts: &[Tensor<T>]) -> f64 {
    ts.iter().map(|t| t.dot(t)).sum::<f64>().sqrt()
}

pub(crate) fn check_hyper(name: &'static str, value: f64, ok: bool, why: &'static str) -> Result<()> {
    if ok && value.is_finite() {
        Ok(())
    } else {
        Err(OptimError::Hyper { name, value, why })
    }
}

/// Looks up a named state tensor and checks its shape.
pub(crate) fn take_state<T: Scalar>(
    state: &mut Vec<(String, Tensor<T>)>,
    name: &str,
    shape: &[usize],
) -> Result<Tensor<T>> {
    let i = state
        .iter()
        .position(|(n, _)| n == name)
        .ok_or_else(|| OptimError::State(name.to_string()))?;
    let (_, t) = state.swap_remove(i);
    if t.shape() != shape {
        return Err(OptimError::State(name.to_string()));
    }
    Ok(t)
}

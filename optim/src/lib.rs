//! flatmin-optim: optimizers behind one [`Optimizer`] trait, built around a gradient oracle.
//!
//! An optimizer never touches a tape: it asks an [`Oracle`] for "the loss and gradient at
//! these parameters on the current batch", as often as its algorithm needs (SGD once, SAM
//! twice, ...). The training loop supplies the oracle and does not know which optimizer runs.
//!
//! Optimizers:
//!
//! | name | type | what |
//! | --- | --- | --- |
//! | `sgd` | [`Sgd`] | SGD with momentum / Nesterov / coupled weight decay |
//! | `adamw` | [`AdamW`] | AdamW |
//! | `sam`, `usam`, `asam` | [`Sam`] | SAM (Foret et al. 2021) with m-sharpness, unnormalized and adaptive variants |
//! | `sam1` | [`Sam1`] | SAM with batch size 1 (Wen, Ma & Li 2023) |
//! | `rps` | [`Rps`] | random-perturbation SGD (randomized smoothing, no projection) |
//! | `label-noise` | [`LabelNoiseSgd`] | label-noise SGD, classification form (Damian et al. 2021) |
//! | `rs` | [`Rs`] | Algorithm 1 of Ahn, Jadbabaie & Sra (2024): randomly smoothed perturbation |
//! | `sa` | [`Sa`] | Algorithm 2 of the same paper: sharpness-aware perturbation |
//!
//! Beyond the plain [`Oracle::eval`], perturbation methods need gradients on part of the
//! batch or on a fresh batch ([`Oracle::eval_on`] with a [`Probe`]) and with noisy labels
//! ([`Oracle::eval_noisy`]). Randomness comes from a seeded [`rng::Rng`] whose state is part
//! of [`Optimizer::state`], so a resumed run draws the same numbers as an uninterrupted one.
//! [`toys`] holds the paper's test problems with their minima manifolds, limit map Φ and
//! flatness residual.
//!
//! Choices the paper leaves open, marked (R) reconstructed or (X) ours in
//! `shared/docs/paper.md`, are options, never silent defaults (CLI flag of `flatmin train`):
//!
//! | choice | status | option | library default | CLI default |
//! | --- | --- | --- | --- | --- |
//! | separate rates η, η' | R | [`EtaPrime`], `--eta-prime` | given | η' = η (paper.md §6) |
//! | RS gate ε0 | V (value R) | `eps0`, `--eps0` | given | no gate |
//! | SA gate | R | `eps0`, `--eps0` | off | off |
//! | SA final GD phase T_gd | R | `horizon`, `--t-gd` | none | 0 |
//! | output iterate: uniformly random (reservoir) or last | R/X | [`OutputIterate`], `--output-iterate` | random | last |
//! | SA zero-gradient shift ξ (Remark 2) | R | `xi`, `--zero-grad-xi` | 1e-6 | 1e-6 |
//! | projection on/off | X (ablation) | `project`, `--project/--no-project` | on | on |
//! | probe batch size B, same or fresh batch | X (§6) | [`ProbeSpec`], `--probe-batch`, `--probe-data` | RS: whole batch, SA: 1 sample | whole batch (sam1: 1), same |
//! | Proj⊥ against a zero gradient = identity | X | — | always | always |
//! | sphere sampling as normalized Gaussian | X | — | always | always |
//! | momentum / weight decay on RS, SA (direction `∇f + (η'/η) v` through SGD) | X | `momentum`, `weight_decay` | 0 | `--momentum`, `--weight-decay` |
//! | ASAM scale applied to every tensor | X | — | always | always |
#![warn(missing_docs)]

pub mod adamw;
pub mod label_noise;
pub mod perturb;
pub mod rng;
pub mod rps;
pub mod rs;
pub mod sa;
pub mod sam;
pub mod schedule;
pub mod sgd;
pub mod toys;
pub mod vecops;

pub use adamw::AdamW;
pub use label_noise::{corrupt_labels, LabelNoiseSgd};
pub use perturb::{EtaPrime, OutputIterate, ProbeData, ProbeSpec};
pub use rps::Rps;
pub use rs::{Rs, RsConfig};
pub use sa::{Sa, SaConfig};
pub use sam::{Sam, Sam1, SamVariant};
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
        /// Name of the hyperparameter, as its configuration field (`rho`, `eta_prime`; the
        /// command line's flag is the same with dashes: `--rho`, `--eta-prime`).
        name: &'static str,
        /// The value given.
        value: f64,
        /// The accepted range.
        why: &'static str,
    },
    /// Saved optimizer state does not fit the parameters.
    #[error("optimizer state '{0}' does not match the parameters")]
    State(String),
    /// The oracle cannot evaluate what the optimizer asked for (e.g. a sub-batch).
    #[error("the gradient oracle does not support {0}")]
    Unsupported(String),
    /// The loss or a gradient is NaN or infinite (named, e.g. "gradient of 'fc1.weight'");
    /// the oracle reports it before the optimizer changes anything.
    #[error("non-finite {0}")]
    NonFinite(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, OptimError>;

/// Which data an oracle evaluation averages the loss over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The step's whole batch (what [`Oracle::eval`] uses).
    Batch,
    /// The samples at these positions of the step's batch (each `< batch_len`), e.g. one
    /// uniformly drawn sample for SA's single-sample gradient `∇f_i`.
    SubBatch {
        /// Positions in the step's batch.
        indices: Vec<usize>,
    },
    /// A fresh batch of `size` samples, independent of the step's batch. It must be drawn
    /// deterministically from the step (not from the call order or the clock), and every
    /// `Fresh` call of the same size within one step must see the same batch, so that a
    /// probe gradient and its perturbed counterpart use one batch and a resumed run sees the
    /// same batches.
    Fresh {
        /// Number of samples.
        size: usize,
    },
}

/// Label noise for [`Oracle::eval_noisy`] (classification form of label-noise SGD): each
/// label of the batch is, independently with probability `prob`, replaced by a uniformly
/// drawn *other* class. Oracles apply it with [`corrupt_labels`], which makes the draw a
/// function of `seed` alone.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LabelNoise {
    /// Probability of replacing a label, in (0, 1].
    pub prob: f64,
    /// Seed of the draws (the optimizer draws it from its own RNG).
    pub seed: u64,
}

/// Loss and gradient at given parameters on the current batch.
///
/// Only [`Oracle::eval`] is required. Perturbation methods also ask for sub-batch and
/// fresh-batch gradients ([`Oracle::eval_on`]) and noisy labels ([`Oracle::eval_noisy`]);
/// the defaults report [`OptimError::Unsupported`].
///
/// BatchNorm convention (followed by every optimizer of this crate, and which the training
/// oracle relies on): the first evaluation of a step is on the step's batch at the
/// unperturbed parameters (`eval` or `eval_noisy`), so it is the one that may update running
/// statistics.
pub trait Oracle<T> {
    /// Evaluates loss and gradient (one tensor per parameter) at `params`.
    fn eval(&mut self, params: &[Tensor<T>]) -> Result<(T, Vec<Tensor<T>>)>;

    /// Evaluates loss and gradient at `params` on the data `probe` selects. The default
    /// handles [`Probe::Batch`] through [`Oracle::eval`] and refuses the rest.
    fn eval_on(&mut self, params: &[Tensor<T>], probe: &Probe) -> Result<(T, Vec<Tensor<T>>)> {
        match probe {
            Probe::Batch => self.eval(params),
            Probe::SubBatch { .. } => Err(OptimError::Unsupported("sub-batch evaluation".into())),
            Probe::Fresh { .. } => Err(OptimError::Unsupported("fresh-batch evaluation".into())),
        }
    }

    /// Evaluates loss and gradient at `params` on the step's batch with labels corrupted by
    /// `noise` (loss and gradient are those of the noisy labels).
    fn eval_noisy(
        &mut self,
        params: &[Tensor<T>],
        noise: &LabelNoise,
    ) -> Result<(T, Vec<Tensor<T>>)> {
        let _ = (params, noise);
        Err(OptimError::Unsupported("noisy-label evaluation".into()))
    }

    /// Number of samples in the step's batch, when the oracle can address them
    /// individually (needed for [`Probe::SubBatch`]).
    fn batch_len(&self) -> Option<usize> {
        None
    }
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
    fn step(
        &mut self,
        params: &mut [Tensor<T>],
        oracle: &mut dyn Oracle<T>,
        lr: f64,
    ) -> Result<StepInfo>;
    /// The optimizer's state (buffers, counters, RNG state) as named tensors, for checkpoints.
    fn state(&self) -> Vec<(String, Tensor<T>)>;
    /// Restores state produced by [`Optimizer::state`].
    fn load_state(&mut self, state: Vec<(String, Tensor<T>)>) -> Result<()>;
}

/// Euclidean norm of a list of tensors, accumulated in f64.
pub fn global_norm<T: Scalar>(ts: &[Tensor<T>]) -> f64 {
    ts.iter().map(|t| t.dot(t)).sum::<f64>().sqrt()
}

pub(crate) fn check_hyper(
    name: &'static str,
    value: f64,
    ok: bool,
    why: &'static str,
) -> Result<()> {
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

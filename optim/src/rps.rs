//! Random-perturbation SGD (randomized smoothing, "average-direction sharpness"; paper.md §7):
//! `x ← x − η ∇L_B(x + ρ g)`, `g ~ Unif(S^{d−1})`, whose implicit penalty is `(ρ²/2) tr̄`.
//! RS without projection, gate and separate η'. Momentum and coupled weight decay act on the
//! perturbed gradient through [`Sgd::apply`]. The probe uses the step's batch.
//!
//! Cost: two evaluations (the first, at `x`, gives the logged loss and gradient norm and is
//! the one the BatchNorm rule lets update running statistics).

use crate::perturb::{load_rng, load_sgd, no_leftovers, rng_state};
use crate::rng::{derive_seed, Rng};
use crate::vecops::{norm, shifted};
use crate::{check_hyper, Optimizer, Oracle, Result, Sgd, StepInfo};
use flatmin_engine::{Scalar, Tensor};

/// Random-perturbation SGD; see the module docs.
#[derive(Clone, Debug)]
pub struct Rps<T> {
    rho: f64,
    sgd: Sgd<T>,
    rng: Rng,
}

impl<T: Scalar> Rps<T> {
    /// Radius `rho > 0`, SGD momentum / Nesterov / weight decay, `seed` of the sphere draws.
    pub fn new(
        rho: f64,
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
        seed: u64,
    ) -> Result<Self> {
        check_hyper("rho", rho, rho > 0.0, "must be > 0")?;
        Ok(Rps {
            rho,
            sgd: Sgd::new(momentum, nesterov, weight_decay)?,
            rng: Rng::new(derive_seed(seed, 0x5250)),
        })
    }
}

impl<T: Scalar> Optimizer<T> for Rps<T> {
    fn name(&self) -> &'static str {
        "rps"
    }

    fn step(
        &mut self,
        params: &mut [Tensor<T>],
        oracle: &mut dyn Oracle<T>,
        lr: f64,
    ) -> Result<StepInfo> {
        let (loss, g) = oracle.eval(params)?;
        let dir = self.rng.sphere(params);
        let xp = shifted(params, &dir, self.rho);
        let (_, h) = oracle.eval(&xp)?;
        let hn = norm(&h);
        self.sgd.apply(params, &h, lr);
        Ok(StepInfo {
            loss: loss.to_f64().unwrap_or(f64::NAN),
            grad_norm: norm(&g),
            grad_evals: 2,
            extra: vec![
                ("pert_norm".into(), self.rho),
                ("perturbed_grad_norm".into(), hn),
            ],
        })
    }

    fn state(&self) -> Vec<(String, Tensor<T>)> {
        let mut out = self.sgd.state();
        out.push(rng_state(&self.rng, "rps.rng"));
        out
    }

    fn load_state(&mut self, mut state: Vec<(String, Tensor<T>)>) -> Result<()> {
        load_sgd(&mut self.sgd, &mut state)?;
        self.rng = load_rng(&mut state, "rps.rng")?;
        no_leftovers(&state)
    }
}

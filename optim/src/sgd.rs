//! SGD with momentum, Nesterov momentum and (coupled) weight decay, with PyTorch's update rule:
//! g ← ∇L + λθ; b ← g on the first step, else b ← μ b + g; d = g + μ b (Nesterov) or b;
//! θ ← θ − η d.

use crate::{check_hyper, global_norm, take_state, Optimizer, Oracle, Result, StepInfo};
use flatmin_engine::{Scalar, Tensor};

/// Stochastic gradient descent (PyTorch `torch.optim.SGD` semantics, dampening 0).
#[derive(Clone, Debug)]
pub struct Sgd<T> {
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
    buffers: Option<Vec<Tensor<T>>>,
}

impl<T: Scalar> Sgd<T> {
    /// SGD with momentum `μ ∈ [0, 1)`, optional Nesterov (needs μ > 0), weight decay `λ ≥ 0`.
    pub fn new(momentum: f64, nesterov: bool, weight_decay: f64) -> Result<Self> {
        check_hyper(
            "momentum",
            momentum,
            (0.0..1.0).contains(&momentum),
            "must be in [0, 1)",
        )?;
        check_hyper(
            "weight_decay",
            weight_decay,
            weight_decay >= 0.0,
            "must be >= 0",
        )?;
        if nesterov {
            check_hyper(
                "momentum",
                momentum,
                momentum > 0.0,
                "Nesterov needs momentum > 0",
            )?;
        }
        Ok(Sgd {
            momentum,
            nesterov,
            weight_decay,
            buffers: None,
        })
    }

    /// Applies the update for gradient `grads` at `params` (shared by SAM-type optimizers,
    /// which compute their own descent direction and then step like SGD).
    pub fn apply(&mut self, params: &mut [Tensor<T>], grads: &[Tensor<T>], lr: f64) {
        let (mu, wd, lr) = (T::c(self.momentum), T::c(self.weight_decay), T::c(lr));
        let first = self.buffers.is_none();
        let bufs = self
            .buffers
            .get_or_insert_with(|| params.iter().map(|p| Tensor::zeros(p.shape())).collect());
        for ((p, g), b) in params.iter_mut().zip(grads).zip(bufs.iter_mut()) {
            for ((pi, &gi), bi) in p.data_mut().iter_mut().zip(g.data()).zip(b.data_mut()) {
                let mut d = gi;
                if self.weight_decay != 0.0 {
                    d = d + wd * *pi;
                }
                if self.momentum != 0.0 {
                    *bi = if first { d } else { mu * *bi + d };
                    d = if self.nesterov { d + mu * *bi } else { *bi };
                }
                *pi = *pi - lr * d;
            }
        }
    }
}

impl<T: Scalar> Optimizer<T> for Sgd<T> {
    fn name(&self) -> &'static str {
        "sgd"
    }

    fn step(
        &mut self,
        params: &mut [Tensor<T>],
        oracle: &mut dyn Oracle<T>,
        lr: f64,
    ) -> Result<StepInfo> {
        let (loss, grads) = oracle.eval(params)?;
        let grad_norm = global_norm(&grads);
        self.apply(params, &grads, lr);
        Ok(StepInfo {
            loss: loss.to_f64().unwrap_or(f64::NAN),
            grad_norm,
            grad_evals: 1,
            extra: Vec::new(),
        })
    }

    fn state(&self) -> Vec<(String, Tensor<T>)> {
        self.buffers
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, b)| (format!("sgd.momentum.{i}"), b.clone()))
            .collect()
    }

    fn load_state(&mut self, mut state: Vec<(String, Tensor<T>)>) -> Result<()> {
        if state.is_empty() {
            self.buffers = None;
            return Ok(());
        }
        let n = state.len();
        let mut bufs = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("sgd.momentum.{i}");
            let shape = state
                .iter()
                .find(|(s, _)| *s == name)
                .map(|(_, t)| t.shape().to_vec())
                .ok_or(crate::OptimError::State(name.clone()))?;
            bufs.push(take_state(&mut state, &name, &shape)?);
        }
        self.buffers = Some(bufs);
        Ok(())
    }
}

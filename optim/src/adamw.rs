//! AdamW (decoupled weight decay) with PyTorch's update order:
//! θ ← θ(1 − ηλ); m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g²;
//! θ ← θ − (η / (1−β1ᵗ)) · m / (√v / √(1−β2ᵗ) + ε).

use crate::{check_hyper, global_norm, take_state, Optimizer, Oracle, Result, StepInfo};
use flatmin_engine::{Scalar, Tensor};

/// Adam with decoupled weight decay (PyTorch `torch.optim.AdamW`, amsgrad off).
#[derive(Clone, Debug)]
pub struct AdamW<T> {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    t: u64,
    m: Vec<Tensor<T>>,
    v: Vec<Tensor<T>>,
}

impl<T: Scalar> AdamW<T> {
    /// AdamW with moment decays `beta1`, `beta2 ∈ [0, 1)`, `eps > 0`, weight decay `λ ≥ 0`.
    pub fn new(beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Result<Self> {
        check_hyper(
            "beta1",
            beta1,
            (0.0..1.0).contains(&beta1),
            "must be in [0, 1)",
        )?;
        check_hyper(
            "beta2",
            beta2,
            (0.0..1.0).contains(&beta2),
            "must be in [0, 1)",
        )?;
        check_hyper("eps", eps, eps > 0.0, "must be > 0")?;
        check_hyper(
            "weight_decay",
            weight_decay,
            weight_decay >= 0.0,
            "must be >= 0",
        )?;
        Ok(AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            t: 0,
            m: Vec::new(),
            v: Vec::new(),
        })
    }
}

impl<T: Scalar> Optimizer<T> for AdamW<T> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn step(
        &mut self,
        params: &mut [Tensor<T>],
        oracle: &mut dyn Oracle<T>,
        lr: f64,
    ) -> Result<StepInfo> {
        let (loss, grads) = oracle.eval(params)?;
        let grad_norm = global_norm(&grads);
        if self.m.is_empty() {
            self.m = params.iter().map(|p| Tensor::zeros(p.shape())).collect();
            self.v = params.iter().map(|p| Tensor::zeros(p.shape())).collect();
        }
        self.t = self.t.saturating_add(1);
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        let (b1, b2, eps) = (T::c(self.beta1), T::c(self.beta2), T::c(self.eps));
        let decay = T::c(1.0 - lr * self.weight_decay);
        let step = T::c(lr / bc1);
        let bc2_sqrt = T::c(bc2.sqrt());
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(&grads)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            for (((pi, &gi), mi), vi) in p
                .data_mut()
                .iter_mut()
                .zip(g.data())
                .zip(m.data_mut())
                .zip(v.data_mut())
            {
                *pi = *pi * decay;
                *mi = *mi * b1 + (T::one() - b1) * gi;
                *vi = *vi * b2 + (T::one() - b2) * gi * gi;
                let denom = vi.sqrt() / bc2_sqrt + eps;
                *pi = *pi - step * (*mi / denom);
            }
        }
        Ok(StepInfo {
            loss: loss.to_f64().unwrap_or(f64::NAN),
            grad_norm,
            grad_evals: 1,
            extra: Vec::new(),
        })
    }

    fn state(&self) -> Vec<(String, Tensor<T>)> {
        let mut out = vec![("adamw.t".to_string(), Tensor::scalar(T::c(self.t as f64)))];
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            out.push((format!("adamw.m.{i}"), m.clone()));
            out.push((format!("adamw.v.{i}"), v.clone()));
        }
        out
    }

    fn load_state(&mut self, mut state: Vec<(String, Tensor<T>)>) -> Result<()> {
        let t = take_state(&mut state, "adamw.t", &[])?;
        // A step count: a whole number the bias corrections' `powi` can take.
        let t = t.data()[0].to_f64().unwrap_or(f64::NAN);
        if !(t >= 0.0 && t.fract() == 0.0 && t < i32::MAX as f64) {
            return Err(crate::OptimError::State("adamw.t".into()));
        }
        self.t = t as u64;
        let n = state.len() / 2;
        let (mut m, mut v) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let shape = state
                .iter()
                .find(|(s, _)| *s == format!("adamw.m.{i}"))
                .map(|(_, t)| t.shape().to_vec())
                .ok_or(crate::OptimError::State(format!("adamw.m.{i}")))?;
            m.push(take_state(&mut state, &format!("adamw.m.{i}"), &shape)?);
            v.push(take_state(&mut state, &format!("adamw.v.{i}"), &shape)?);
        }
        self.m = m;
        self.v = v;
        Ok(())
    }
}

//! Sharpness-aware minimization and relatives (paper.md §7).
//!
//! - [`Sam`] with [`SamVariant::Normalized`]: SAM (Foret et al. 2021),
//!   `ε̂ = ρ g/‖g‖`, `x ← x − η ∇L_B(x + ε̂)`;
//!   [`SamVariant::Unnormalized`]: USAM (Andriushchenko & Flammarion 2022), `ε̂ = ρ g`;
//!   [`SamVariant::Adaptive`]: ASAM (Kwon et al. 2021), `ε̂ = ρ T² g / ‖T g‖` with the
//!   element-wise `T = |x| + η_a`.
//!   m-sharpness: with `m` smaller than the batch, the batch is cut into consecutive chunks
//!   of `m` positions (the last may be smaller); each chunk k computes its own `ε̂_k` from its
//!   own gradient and contributes `∇L_k(x + ε̂_k)`, weighted by its size, to the descent
//!   gradient (which is then the batch mean).
//! - [`Sam1`]: SAM with batch size 1 (Wen, Ma & Li 2023):
//!   `x ← x − η ∇f_k(x + ρ ∇f_k(x)/‖∇f_k(x)‖)` with k uniform in the batch (or B samples, or
//!   a fresh batch; [`ProbeSpec`]).
//!
//! All descend through [`Sgd::apply`] on the perturbed gradient (momentum and coupled weight
//! decay as in the usual SAM recipes; weight decay is taken at `x`, not at the perturbed
//! point). A zero ascent gradient gives no perturbation. The first evaluation of every step is
//! the batch gradient at `x` (for the logged loss and gradient norm, and the BatchNorm rule);
//! when the ascent uses the whole batch it is reused, so SAM costs two evaluations, m-sharp
//! SAM `1 + 2k` for k chunks, SAM-1 three.
//!
//! ASAM note (X): the reference implementation applies `T` to weight tensors only; optimizers
//! here see unnamed tensors, so `T` applies to every parameter.

use crate::perturb::{eval_probe, load_rng, load_sgd, no_leftovers, rng_state};
use crate::rng::{derive_seed, Rng};
use crate::vecops::{add_scaled, norm, scaled, shifted, zeros_like};
use crate::{check_hyper, Optimizer, Oracle, Probe, ProbeSpec, Result, Sgd, StepInfo};
use flatmin_engine::{Scalar, Tensor};

/// How SAM turns the ascent gradient into the perturbation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SamVariant {
    /// `ε̂ = ρ g / ‖g‖` (SAM).
    Normalized,
    /// `ε̂ = ρ g` (USAM).
    Unnormalized,
    /// `ε̂ = ρ T² g / ‖T g‖`, `T = |x| + eta` element-wise (ASAM; `eta` ≥ 0, 0.01 in the paper).
    Adaptive {
        /// The offset η_a of the adaptive scale.
        eta: f64,
    },
}

/// The perturbation `ε̂` for ascent gradient `g` at `x`, and its norm.
fn perturbation<T: Scalar>(
    variant: SamVariant,
    rho: f64,
    x: &[Tensor<T>],
    g: &[Tensor<T>],
) -> (Vec<Tensor<T>>, f64) {
    let gn = norm(g);
    if !(gn > 0.0 && gn.is_finite()) {
        return (zeros_like(g), 0.0);
    }
    let e = match variant {
        SamVariant::Normalized => scaled(g, rho / gn),
        SamVariant::Unnormalized => scaled(g, rho),
        SamVariant::Adaptive { eta } => {
            let eta = T::c(eta);
            // T g and T² g, element-wise.
            let mut tg = Vec::with_capacity(g.len());
            let mut ttg = Vec::with_capacity(g.len());
            for (xi, gi) in x.iter().zip(g) {
                let mut a = gi.clone();
                let mut b = gi.clone();
                for ((av, bv), &w) in a.data_mut().iter_mut().zip(b.data_mut()).zip(xi.data()) {
                    let s = w.abs() + eta;
                    *av = *av * s;
                    *bv = *bv * s * s;
                }
                tg.push(a);
                ttg.push(b);
            }
            let n = norm(&tg);
            if !(n > 0.0 && n.is_finite()) {
                return (zeros_like(g), 0.0);
            }
            scaled(&ttg, rho / n)
        }
    };
    let en = norm(&e);
    (e, en)
}

/// SAM, USAM or ASAM, with optional m-sharpness; see the module docs.
#[derive(Clone, Debug)]
pub struct Sam<T> {
    rho: f64,
    variant: SamVariant,
    m: Option<usize>,
    sgd: Sgd<T>,
}

impl<T: Scalar> Sam<T> {
    /// SAM-type optimizer with radius `rho > 0`, perturbation `variant`, m-sharpness chunk
    /// size `m` (`None`: the whole batch) and SGD momentum / Nesterov / weight decay.
    pub fn new(
        rho: f64,
        variant: SamVariant,
        m: Option<usize>,
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    ) -> Result<Self> {
        check_hyper("rho", rho, rho > 0.0, "must be > 0")?;
        if let SamVariant::Adaptive { eta } = variant {
            check_hyper("asam_eta", eta, eta >= 0.0, "must be >= 0")?;
        }
        if let Some(m) = m {
            check_hyper("m_sharpness", m as f64, m > 0, "must be at least 1")?;
        }
        Ok(Sam {
            rho,
            variant,
            m,
            sgd: Sgd::new(momentum, nesterov, weight_decay)?,
        })
    }
}

impl<T: Scalar> Optimizer<T> for Sam<T> {
    fn name(&self) -> &'static str {
        match self.variant {
            SamVariant::Normalized => "sam",
            SamVariant::Unnormalized => "usam",
            SamVariant::Adaptive { .. } => "asam",
        }
    }

    fn step(
        &mut self,
        params: &mut [Tensor<T>],
        oracle: &mut dyn Oracle<T>,
        lr: f64,
    ) -> Result<StepInfo> {
        let (loss, g) = oracle.eval(params)?;
        let gn = norm(&g);
        let chunks = match (self.m, oracle.batch_len()) {
            (Some(m), Some(n)) if m < n => Some((m, n)),
            (Some(m), None) => {
                return Err(crate::OptimError::Unsupported(format!(
                    "m-sharpness (--m-sharpness {m}) without addressable batch samples"
                )))
            }
            _ => None,
        };
        let (descent, evals, pert_norm, k) = match chunks {
            None => {
                let (e, en) = perturbation(self.variant, self.rho, params, &g);
                let xp = shifted(params, &e, 1.0);
                let (_, h) = oracle.eval(&xp)?;
                (h, 2, en, 1)
            }
            Some((m, n)) => {
                let mut acc = zeros_like(&g);
                let mut evals = 1;
                let mut en_sum = 0.0;
                let k = n.div_ceil(m);
                for c in 0..k {
                    let indices: Vec<usize> = (c * m..((c + 1) * m).min(n)).collect();
                    let w = indices.len() as f64 / n as f64;
                    let probe = Probe::SubBatch { indices };
                    let (_, gc) = oracle.eval_on(params, &probe)?;
                    let (e, en) = perturbation(self.variant, self.rho, params, &gc);
                    let xp = shifted(params, &e, 1.0);
                    let (_, h) = oracle.eval_on(&xp, &probe)?;
                    add_scaled(&mut acc, &h, w);
                    evals += 2;
                    en_sum += en;
                }
                (acc, evals, en_sum / k as f64, k)
            }
        };
        let dn = norm(&descent);
        self.sgd.apply(params, &descent, lr);
        Ok(StepInfo {
            loss: loss.to_f64().unwrap_or(f64::NAN),
            grad_norm: gn,
            grad_evals: evals,
            extra: vec![
                ("pert_norm".into(), pert_norm),
                ("perturbed_grad_norm".into(), dn),
                ("chunks".into(), k as f64),
            ],
        })
    }

    fn state(&self) -> Vec<(String, Tensor<T>)> {
        self.sgd.state()
    }

    fn load_state(&mut self, mut state: Vec<(String, Tensor<T>)>) -> Result<()> {
        load_sgd(&mut self.sgd, &mut state)?;
        no_leftovers(&state)
    }
}

/// SAM with batch size 1 (SAM-1); see the module docs.
#[derive(Clone, Debug)]
pub struct Sam1<T> {
    rho: f64,
    probe: ProbeSpec,
    sgd: Sgd<T>,
    rng: Rng,
}

impl<T: Scalar> Sam1<T> {
    /// SAM-1 with radius `rho > 0` whose ascent and descent gradients use `probe`
    /// ([`ProbeSpec::samples`]`(1)` for Wen et al.'s rule), with SGD momentum / Nesterov /
    /// weight decay; `seed` drives the sample draws.
    pub fn new(
        rho: f64,
        probe: ProbeSpec,
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
        seed: u64,
    ) -> Result<Self> {
        check_hyper("rho", rho, rho > 0.0, "must be > 0")?;
        probe.validate()?;
        Ok(Sam1 {
            rho,
            probe,
            sgd: Sgd::new(momentum, nesterov, weight_decay)?,
            rng: Rng::new(derive_seed(seed, 0x5331)),
        })
    }
}

impl<T: Scalar> Optimizer<T> for Sam1<T> {
    fn name(&self) -> &'static str {
        "sam1"
    }

    fn step(
        &mut self,
        params: &mut [Tensor<T>],
        oracle: &mut dyn Oracle<T>,
        lr: f64,
    ) -> Result<StepInfo> {
        let (loss, g) = oracle.eval(params)?;
        let gn = norm(&g);
        let (probe, reuse) = self.probe.resolve(oracle, &mut self.rng)?;
        let mut evals = 1;
        let gs = if reuse {
            g
        } else {
            evals += 1;
            eval_probe(oracle, params, &probe)?.1
        };
        let (e, en) = perturbation(SamVariant::Normalized, self.rho, params, &gs);
        let xp = shifted(params, &e, 1.0);
        let (_, h) = eval_probe(oracle, &xp, &probe)?;
        evals += 1;
        let dn = norm(&h);
        self.sgd.apply(params, &h, lr);
        Ok(StepInfo {
            loss: loss.to_f64().unwrap_or(f64::NAN),
            grad_norm: gn,
            grad_evals: evals,
            extra: vec![
                ("probe_grad_norm".into(), norm(&gs)),
                ("pert_norm".into(), en),
                ("perturbed_grad_norm".into(), dn),
            ],
        })
    }

    fn state(&self) -> Vec<(String, Tensor<T>)> {
        let mut out = self.sgd.state();
        out.push(rng_state(&self.rng, "sam1.rng"));
        out
    }

    fn load_state(&mut self, mut state: Vec<(String, Tensor<T>)>) -> Result<()> {
        load_sgd(&mut self.sgd, &mut state)?;
        self.rng = load_rng(&mut state, "sam1.rng")?;
        no_leftovers(&state)
    }
}

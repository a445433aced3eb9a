//! RS, Algorithm 1 of Ahn, Jadbabaie & Sra (ICML 2024): randomly smoothed perturbation.
//!
//! ```text
//! if ‖∇f(x_t)‖ ≤ ε0:                           (gate; paper.md §2)
//!     g_t ~ Unif(S^{d−1})
//!     v_t = Proj⊥_{∇f(x_t)} ∇f(x_t + ρ g_t)
//!     x_{t+1} = x_t − η ∇f(x_t) − η' v_t
//! else:
//!     x_{t+1} = x_t − η ∇f(x_t)
//! return x̂ ~ Unif{x_1, ..., x_T}
//! ```
//!
//! With a full-batch oracle and the defaults of [`RsConfig::paper`] this is Algorithm 1
//! exactly. Mini-batch form (paper.md §6): `∇f` is the step's mini-batch gradient, the probe
//! gradient `∇f(x + ρg)` uses the batch chosen by [`RsConfig::probe`] (same batch, a
//! sub-batch, or a fresh batch), the projection can be switched off, and η' defaults to η.
//!
//! Choices that are ours or reconstructed, each an option:
//! - the gate: `eps0 = None` means no gate (always perturb) — (X), CLI `--eps0`;
//! - the two rates η and η' (R): η is the step's learning rate, η' [`EtaPrime`], CLI `--eta-prime`;
//! - sphere sampling as a normalized Gaussian (X);
//! - Proj⊥ against a zero gradient is the identity (X);
//! - output iterate random (paper) or last (practice) (X), CLI `--output-iterate`;
//! - momentum and weight decay (X): the direction `∇f + (η'/η) v` goes through [`Sgd::apply`]
//!   (exactly the paper's update with momentum 0 and weight decay 0).
//!
//! Cost: two gradient evaluations per perturbed step, one per gate-closed step.

use crate::perturb::{
    check_eps0, descend, eval_probe, load_rng, load_sgd, no_leftovers, rng_state, Iterates,
    Reservoir,
};
use crate::rng::{derive_seed, Rng};
use crate::vecops::{dot, norm, proj_out, shifted};
use crate::{
    check_hyper, EtaPrime, Optimizer, Oracle, OutputIterate, ProbeSpec, Result, Sgd, StepInfo,
};
use flatmin_engine::{Scalar, Tensor};

/// Settings of [`Rs`].
#[derive(Clone, Debug, PartialEq)]
pub struct RsConfig {
    /// Perturbation radius ρ (> 0).
    pub rho: f64,
    /// Rate η' on `v_t`.
    pub eta_prime: EtaPrime,
    /// Gradient-norm gate ε0: perturb only when `‖∇f(x_t)‖ ≤ ε0`; `None` (or +∞): always perturb.
    pub eps0: Option<f64>,
    /// Project the probe gradient against `∇f(x_t)` (Algorithm 1: yes).
    pub project: bool,
    /// Data of the probe gradient `∇f(x_t + ρ g_t)` (Algorithm 1: the whole batch).
    pub probe: ProbeSpec,
    /// Which iterate is returned.
    pub output: OutputIterate,
    /// Number of steps T, when known: with [`OutputIterate::Random`] the parameters become
    /// `x̂` right after step T. `None`: never switch (read [`Rs::output`]).
    pub horizon: Option<u64>,
    /// SGD momentum (0 in the paper).
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Coupled weight decay (0 in the paper).
    pub weight_decay: f64,
    /// Seed of the sphere draws, sub-batch draws and the reservoir.
    pub seed: u64,
}

impl RsConfig {
    /// Algorithm 1 as written: radius `rho`, rates η (the step's rate) and `eta_prime`, gate
    /// `eps0`, projection on, full-batch probe, random output, no momentum or weight decay.
    pub fn paper(rho: f64, eta_prime: f64, eps0: f64, seed: u64) -> Self {
        RsConfig {
            rho,
            eta_prime: EtaPrime::Fixed(eta_prime),
            eps0: Some(eps0),
            project: true,
            probe: ProbeSpec::batch(),
            output: OutputIterate::Random,
            horizon: None,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            seed,
        }
    }
}

/// Randomly smoothed perturbation (Algorithm 1); see the module docs.
#[derive(Clone, Debug)]
pub struct Rs<T> {
    cfg: RsConfig,
    sgd: Sgd<T>,
    rng: Rng,
    iters: Iterates<T>,
}

impl<T: Scalar> Rs<T> {
    /// Validates the settings (errors name the CLI flag).
    pub fn new(cfg: RsConfig) -> Result<Self> {
        check_hyper("rho", cfg.rho, cfg.rho > 0.0, "must be > 0")?;
        cfg.eta_prime.validate()?;
        check_eps0(cfg.eps0)?;
        cfg.probe.validate()?;
        let sgd = Sgd::new(cfg.momentum, cfg.nesterov, cfg.weight_decay)?;
        Ok(Rs {
            rng: Rng::new(derive_seed(cfg.seed, 0x5253)),
            iters: Iterates::new(cfg.horizon, cfg.output, derive_seed(cfg.seed, 0x5253_0001)),
            sgd,
            cfg,
        })
    }

    /// The settings.
    pub fn config(&self) -> &RsConfig {
        &self.cfg
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.iters.t
    }

    /// The random output iterate `x̂` so far (with [`OutputIterate::Random`]).
    pub fn output(&self) -> Option<&[Tensor<T>]> {
        self.iters.reservoir.as_ref().and_then(Reservoir::sample)
    }

    /// The reservoir of the output iterate (which iterate it holds, how many it has seen).
    pub fn reservoir(&self) -> Option<&Reservoir<T>> {
        self.iters.reservoir.as_ref()
    }

    /// The last iterate `x_T`, kept when the parameters were swapped for `x̂` at the horizon.
    pub fn last_iterate(&self) -> Option<&[Tensor<T>]> {
        self.iters.last.as_deref()
    }
}

impl<T: Scalar> Optimizer<T> for Rs<T> {
    fn name(&self) -> &'static str {
        "rs"
    }

    fn step(
        &mut self,
        params: &mut [Tensor<T>],
        oracle: &mut dyn Oracle<T>,
        lr: f64,
    ) -> Result<StepInfo> {
        let (loss, g) = oracle.eval(params)?;
        let gn = norm(&g);
        let mut evals = 1;
        let open = self.cfg.eps0.is_none_or(|e| gn <= e);
        let eta_prime = self.cfg.eta_prime.at(lr);
        let (mut probe_norm, mut v_norm, mut v_cos) = (0.0, 0.0, 0.0);
        if open {
            let (probe, _) = self.cfg.probe.resolve(oracle, &mut self.rng)?;
            let dir = self.rng.sphere(params);
            let xp = shifted(params, &dir, self.cfg.rho);
            let (_, h) = eval_probe(oracle, &xp, &probe)?;
            evals += 1;
            probe_norm = norm(&h);
            let v = if self.cfg.project {
                proj_out(&g, &h)
            } else {
                h
            };
            v_norm = norm(&v);
            if v_norm > 0.0 && gn > 0.0 {
                v_cos = dot(&v, &g) / (v_norm * gn);
            }
            descend(&mut self.sgd, params, &g, Some((&v, eta_prime)), lr);
        } else {
            descend(&mut self.sgd, params, &g, None, lr);
        }
        let mut extra = vec![
            ("gate".to_string(), f64::from(u8::from(open))),
            (
                "pert_norm".to_string(),
                if open { self.cfg.rho } else { 0.0 },
            ),
            ("probe_grad_norm".to_string(), probe_norm),
            ("v_norm".to_string(), v_norm),
            ("v_cos_grad".to_string(), v_cos),
            ("eta_prime".to_string(), eta_prime),
        ];
        self.iters.after_step(params, &mut extra);
        Ok(StepInfo {
            loss: loss.to_f64().unwrap_or(f64::NAN),
            grad_norm: gn,
            grad_evals: evals,
            extra,
        })
    }

    fn state(&self) -> Vec<(String, Tensor<T>)> {
        let mut out = self.sgd.state();
        out.push(rng_state(&self.rng, "rs.rng"));
        self.iters.state("rs", &mut out);
        out
    }

    fn load_state(&mut self, mut state: Vec<(String, Tensor<T>)>) -> Result<()> {
        load_sgd(&mut self.sgd, &mut state)?;
        self.rng = load_rng(&mut state, "rs.rng")?;
        self.iters.load("rs", &mut state)?;
        no_leftovers(&state)
    }
}

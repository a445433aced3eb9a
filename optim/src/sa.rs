//! SA, Algorithm 2 of Ahn, Jadbabaie & Sra (ICML 2024): sharpness-aware perturbation.
//!
//! ```text
//! Phase 1, t = 0..T−1:
//!     i_t ~ Unif{1..n},  σ_t ~ Unif{−1, +1}
//!     n_t = ∇f_{i_t}(x_t) / ‖∇f_{i_t}(x_t)‖
//!     v_t = Proj⊥_{∇f(x_t)} ∇f_{i_t}(x_t + σ_t ρ n_t)
//!     x_{t+1} = x_t − η ∇f(x_t) − η' v_t
//! x̂ ~ Unif{x_1, ..., x_T}
//! Phase 2: T_gd steps of x ← x − η ∇f(x) from x̂.
//! ```
//!
//! With a full-batch oracle that addresses single samples and [`SaConfig::paper`], this is
//! Algorithm 2 exactly (`∇f` the full gradient, `∇f_i` from [`crate::Probe::SubBatch`] with
//! one uniformly drawn position). Mini-batch form (paper.md §6): `∇f` is the step's
//! mini-batch gradient, and the probe uses [`SaConfig::probe`]: B samples of the batch
//! (B = 1, 64, 128, or the whole batch, when the gradient at `x_t` is reused), or a fresh batch.
//!
//! Choices that are ours or reconstructed, each an option:
//! - the random output iterate (R) and the final GD phase of `t_gd` steps (R), CLI
//!   `--output-iterate`, `--t-gd`; T is [`SaConfig::horizon`];
//! - the optional gate ε0 (R: unconfirmed for Algorithm 2), off by default, CLI `--eps0`;
//! - Remark 2's fix when the probe gradient is exactly zero: the direction is taken from
//!   `∇f_i(x_t + ξ)` with ξ uniform on the sphere of radius `xi` (R: the paper suggests a
//!   norm about ε³), CLI `--zero-grad-xi`; if that gradient is zero too, the step has no
//!   perturbation term (logged as `zero_grad_fix = 2`);
//! - phase 2 steps like SGD with the same momentum and weight decay settings; the momentum
//!   buffer is carried over the switch to `x̂` (exactly the paper's GD with momentum 0) (X);
//! - rates η, η' (R), projection on/off (X), momentum and weight decay through
//!   [`Sgd::apply`] on `∇f + (η'/η) v` (X; exact with both 0), as for [`crate::Rs`].
//!
//! Cost per phase-1 step: one batch gradient and two probe gradients (one when the probe is
//! the whole batch, whose gradient at `x_t` is reused), plus one with the zero-gradient fix.

use crate::perturb::{
    check_eps0, descend, eval_probe, load_rng, load_sgd, no_leftovers, rng_state, take_u64s,
    Iterates, Reservoir,
};
use crate::rng::{derive_seed, encode_u64, Rng};
use crate::vecops::{dot, norm, proj_out, scaled, shifted};
use crate::{
    check_hyper, EtaPrime, Optimizer, Oracle, OutputIterate, ProbeSpec, Result, Sgd, StepInfo,
};
use flatmin_engine::{Scalar, Tensor};

/// Settings of [`Sa`].
#[derive(Clone, Debug, PartialEq)]
pub struct SaConfig {
    /// Perturbation radius ρ (> 0).
    pub rho: f64,
    /// Rate η' on `v_t`.
    pub eta_prime: EtaPrime,
    /// Optional gate: perturb only when `‖∇f(x_t)‖ ≤ ε0` (`None` or +∞: always, the default).
    pub eps0: Option<f64>,
    /// Project the probe gradient against `∇f(x_t)` (Algorithm 2: yes).
    pub project: bool,
    /// Draw the sign σ_t at random (Algorithm 2: yes); `false` always uses +1 (ablation).
    pub random_sign: bool,
    /// Data of the probe gradients `∇f_i` (Algorithm 2: one uniformly drawn sample).
    pub probe: ProbeSpec,
    /// Radius of the random shift ξ of Remark 2 (> 0).
    pub xi: f64,
    /// Which iterate phase 1 hands to phase 2.
    pub output: OutputIterate,
    /// Number of phase-1 steps T; `None`: phase 1 never ends.
    pub horizon: Option<u64>,
    /// SGD momentum (0 in the paper).
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Coupled weight decay (0 in the paper).
    pub weight_decay: f64,
    /// Seed of the sample, sign and ξ draws and the reservoir.
    pub seed: u64,
}

impl SaConfig {
    /// Algorithm 2 as written: single-sample probe, random sign, projection on, no gate,
    /// random output, rates η (the step's) and `eta_prime`; phase 1 lasts `horizon` steps
    /// when given. ξ radius 1e-6.
    pub fn paper(rho: f64, eta_prime: f64, horizon: Option<u64>, seed: u64) -> Self {
        SaConfig {
            rho,
            eta_prime: EtaPrime::Fixed(eta_prime),
            eps0: None,
            project: true,
            random_sign: true,
            probe: ProbeSpec::samples(1),
            xi: 1e-6,
            output: OutputIterate::Random,
            horizon,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            seed,
        }
    }
}

/// Sharpness-aware perturbation (Algorithm 2); see the module docs.
#[derive(Clone, Debug)]
pub struct Sa<T> {
    cfg: SaConfig,
    sgd: Sgd<T>,
    rng: Rng,
    iters: Iterates<T>,
    gd_steps: u64,
}

impl<T: Scalar> Sa<T> {
    /// Validates the settings (errors name the CLI flag).
    pub fn new(cfg: SaConfig) -> Result<Self> {
        check_hyper("rho", cfg.rho, cfg.rho > 0.0, "must be > 0")?;
        cfg.eta_prime.validate()?;
        check_eps0(cfg.eps0)?;
        check_hyper("zero_grad_xi", cfg.xi, cfg.xi > 0.0, "must be > 0")?;
        cfg.probe.validate()?;
        let sgd = Sgd::new(cfg.momentum, cfg.nesterov, cfg.weight_decay)?;
        Ok(Sa {
            rng: Rng::new(derive_seed(cfg.seed, 0x5341)),
            iters: Iterates::new(cfg.horizon, cfg.output, derive_seed(cfg.seed, 0x5341_0001)),
            sgd,
            cfg,
            gd_steps: 0,
        })
    }

    /// The settings.
    pub fn config(&self) -> &SaConfig {
        &self.cfg
    }

    /// Phase-1 (perturbed) steps taken.
    pub fn steps(&self) -> u64 {
        self.iters.t
    }

    /// Phase-2 (plain GD) steps taken.
    pub fn gd_steps(&self) -> u64 {
        self.gd_steps
    }

    /// The random output iterate `x̂` of phase 1 so far (with [`OutputIterate::Random`]).
    pub fn output(&self) -> Option<&[Tensor<T>]> {
        self.iters.reservoir.as_ref().and_then(Reservoir::sample)
    }

    /// The reservoir of the output iterate.
    pub fn reservoir(&self) -> Option<&Reservoir<T>> {
        self.iters.reservoir.as_ref()
    }

    /// The last phase-1 iterate `x_T`, kept when the parameters were swapped for `x̂`.
    pub fn last_iterate(&self) -> Option<&[Tensor<T>]> {
        self.iters.last.as_deref()
    }
}

/// What the perturbed half of a phase-1 step found: the direction `v` to descend along (none
/// when the probe gradient vanished even at the shifted point), and the step's figures (zero
/// where it did not get so far).
struct Perturbed<T> {
    v: Option<Vec<Tensor<T>>>,
    /// Gradient evaluations beyond the step's own.
    evals: usize,
    probe_norm: f64,
    pert_grad_norm: f64,
    v_norm: f64,
    v_cos: f64,
    sign: f64,
    /// 1: the probe gradient was zero and was taken again at a shifted point (Remark 2);
    /// 2: it was zero there too, and the step descends along `g` alone.
    fix: f64,
}

impl<T> Default for Perturbed<T> {
    fn default() -> Self {
        Perturbed {
            v: None,
            evals: 0,
            probe_norm: 0.0,
            pert_grad_norm: 0.0,
            v_norm: 0.0,
            v_cos: 0.0,
            sign: 0.0,
            fix: 0.0,
        }
    }
}

impl<T: Scalar> Sa<T> {
    /// The perturbation of a phase-1 step at `params` (gradient `g`, norm `gn`), as in the
    /// module header: the probe gradient's direction `n_t`, a step of `σ_t ρ` along it, and
    /// `v_t`, the probe gradient there, projected off `g` when [`SaConfig::project`] says so.
    fn perturbed_gradient(
        &mut self,
        params: &[Tensor<T>],
        oracle: &mut dyn Oracle<T>,
        g: &[Tensor<T>],
        gn: f64,
    ) -> Result<Perturbed<T>> {
        let mut p = Perturbed::default();
        let (probe, reuse) = self.cfg.probe.resolve(oracle, &mut self.rng)?;
        let mut gs = if reuse {
            g.to_vec()
        } else {
            p.evals += 1;
            eval_probe(oracle, params, &probe)?.1
        };
        let mut ns = norm(&gs);
        if ns == 0.0 {
            // Remark 2: take the direction at a slightly shifted point.
            p.fix = 1.0;
            let xi = self.rng.sphere(params);
            let shifted_x = shifted(params, &xi, self.cfg.xi);
            gs = eval_probe(oracle, &shifted_x, &probe)?.1;
            p.evals += 1;
            ns = norm(&gs);
        }
        p.probe_norm = ns;
        if !(ns > 0.0 && ns.is_finite()) {
            p.fix = 2.0;
            return Ok(p);
        }
        p.sign = if self.cfg.random_sign {
            self.rng.sign()
        } else {
            1.0
        };
        let dir = scaled(&gs, 1.0 / ns);
        let xp = shifted(params, &dir, p.sign * self.cfg.rho);
        let (_, h) = eval_probe(oracle, &xp, &probe)?;
        p.evals += 1;
        p.pert_grad_norm = norm(&h);
        let v = if self.cfg.project { proj_out(g, &h) } else { h };
        p.v_norm = norm(&v);
        if p.v_norm > 0.0 && gn > 0.0 {
            p.v_cos = dot(&v, g) / (p.v_norm * gn);
        }
        p.v = Some(v);
        Ok(p)
    }
}

impl<T: Scalar> Optimizer<T> for Sa<T> {
    fn name(&self) -> &'static str {
        "sa"
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
        if !self.iters.in_phase1() {
            descend(&mut self.sgd, params, &g, None, lr);
            self.gd_steps = self.gd_steps.saturating_add(1);
            return Ok(StepInfo {
                loss: loss.to_f64().unwrap_or(f64::NAN),
                grad_norm: gn,
                grad_evals: evals,
                extra: vec![("phase".into(), 2.0)],
            });
        }
        let open = self.cfg.eps0.is_none_or(|e| gn <= e);
        let eta_prime = self.cfg.eta_prime.at(lr);
        let p = if open {
            self.perturbed_gradient(params, oracle, &g, gn)?
        } else {
            Perturbed::default()
        };
        evals += p.evals;
        let perturbed = p.v.is_some();
        let v = p.v.as_deref().map(|v| (v, eta_prime));
        descend(&mut self.sgd, params, &g, v, lr);
        let mut extra = vec![
            ("phase".to_string(), 1.0),
            ("gate".to_string(), f64::from(u8::from(open))),
            ("sign".to_string(), p.sign),
            ("probe_grad_norm".to_string(), p.probe_norm),
            (
                "pert_norm".to_string(),
                if perturbed { self.cfg.rho } else { 0.0 },
            ),
            ("perturbed_grad_norm".to_string(), p.pert_grad_norm),
            ("v_norm".to_string(), p.v_norm),
            ("v_cos_grad".to_string(), p.v_cos),
            ("zero_grad_fix".to_string(), p.fix),
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
        out.push(rng_state(&self.rng, "sa.rng"));
        out.push(("sa.gd_steps".into(), encode_u64(&[self.gd_steps])));
        self.iters.state("sa", &mut out);
        out
    }

    fn load_state(&mut self, mut state: Vec<(String, Tensor<T>)>) -> Result<()> {
        load_sgd(&mut self.sgd, &mut state)?;
        self.rng = load_rng(&mut state, "sa.rng")?;
        self.gd_steps = take_u64s(&mut state, "sa.gd_steps")?
            .and_then(|v| v.first().copied())
            .unwrap_or(0);
        self.iters.load("sa", &mut state)?;
        no_leftovers(&state)
    }
}

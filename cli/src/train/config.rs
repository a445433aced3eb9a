//! The training recipe: every knob of a run, saved as `config.json` in the run folder.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Everything that determines a training run (together with the data).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Model preset or custom MLP spec.
    pub model: String,
    /// Optimizer name (one of [`OPTIMIZERS`]).
    pub optimizer: String,
    /// Base learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Nesterov momentum (SGD).
    pub nesterov: bool,
    /// Weight decay (coupled for SGD, decoupled for AdamW).
    pub weight_decay: f64,
    /// Learning-rate schedule: `constant`, `cosine` or `step`.
    pub schedule: String,
    /// `step` schedule: epochs between decays.
    pub step_every: usize,
    /// `step` schedule: decay factor.
    pub step_gamma: f64,
    /// Epochs of linear learning-rate warmup.
    pub warmup: usize,
    /// AdamW β1.
    pub beta1: f64,
    /// AdamW β2.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// Number of epochs.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Training images (class-balanced subset; 0 = all available).
    pub train_size: usize,
    /// Test images (class-balanced subset; 0 = all available).
    pub test_size: usize,
    /// Random crop (4-pixel zero padding) and horizontal flip.
    pub augment: bool,
    /// Seed of everything random: initialization, subsets, order, augmentation, optimizer
    /// noise (the data choices only when `data_seed` is not set).
    pub seed: u64,
    /// Seed of the data choices alone (training and test subsets, random labels, the trace
    /// subset); `None`: `seed`. Replicates from one starting point vary `seed` and keep this.
    pub data_seed: Option<u64>,
    /// Float type: `f32` or `f64`.
    pub dtype: String,
    /// Evaluate on the test subset every this many epochs (and after the last).
    pub eval_every: usize,
    /// Keep a numbered checkpoint every this many epochs (0: only the latest).
    pub checkpoint_every: usize,
    /// Data source: `auto`, `synthetic` or a folder of the official binary release.
    pub data: String,
    /// What a NaN or infinite loss or gradient does: `stop` (keep the last good checkpoint and
    /// exit with the step and tensor named) or `skip-step` (leave the parameters unchanged
    /// for that batch and go on).
    pub on_nonfinite: String,
    /// Perturbation radius ρ (sam, asam, usam, sam1, rps, rs, sa).
    pub rho: f64,
    /// Rate η' of the perturbation term (rs, sa); `None`: η' = η, the scheduled rate (paper.md
    /// §6 default, (X)).
    pub eta_prime: Option<f64>,
    /// Gradient-norm gate ε0 (rs, sa): perturb only when the batch gradient norm is at most
    /// ε0; `None`: no gate, always perturb ((X) for rs, (R) off by default for sa).
    pub eps0: Option<f64>,
    /// Probe batch size B (rs, sa, sam1): samples drawn from the step's batch (or the size of
    /// the fresh batch); 0: the optimizer's default (rs, sa: the whole batch, sam1: 1).
    pub probe_batch: usize,
    /// Where probe gradients come from (rs, sa, sam1): `same` (the step's batch) or `fresh`
    /// (another batch, drawn deterministically from the seed and the step).
    pub probe_data: String,
    /// Project the probe gradient against the batch gradient (rs, sa; Algorithms 1 and 2: on).
    pub project: bool,
    /// Label-noise probability p (label-noise): each label replaced by another class with
    /// probability p.
    pub label_noise: f64,
    /// m-sharpness chunk size (sam, asam, usam); 0: one perturbation for the whole batch.
    pub m_sharpness: usize,
    /// ASAM's offset η_a of the scale `|w| + η_a` (asam).
    pub asam_eta: f64,
    /// Final plain-GD steps of sa (Algorithm 2, phase 2; (R)); the perturbed phase gets the
    /// other steps of the run.
    pub t_gd: usize,
    /// Iterate rs/sa hand on at the end of their perturbed phase: `last` (practice, (X)) or
    /// `random` (uniformly random iterate, reservoir-sampled, as in Algorithms 1 and 2).
    pub output_iterate: String,
    /// Radius of the random shift ξ used when sa's probe gradient is exactly zero (Remark 2;
    /// (R): the paper suggests about ε³).
    pub zero_grad_xi: f64,
    /// Train on random labels: every training image gets a label drawn uniformly from the 10
    /// classes by a seeded generator, fixed for the whole run (the "adversarial
    /// initialization" pre-training of Liu et al. 2020).
    pub random_labels: bool,
    /// Start from this model state (a run's `model.safetensors` or a training checkpoint's
    /// model entries) instead of a fresh initialization.
    pub init_from: Option<String>,
    /// SHA-256 of the `init_from` file, recorded when the run is created (and checked when
    /// a run resumes without a checkpoint of its own).
    pub init_sha256: Option<String>,
    /// Log the exact normalized Hessian trace tr(H)/d every this many optimizer steps, at
    /// the start and at the end (0: never).
    pub trace_every: usize,
    /// Training images (a fixed, seeded, class-balanced subset) the logged trace is measured
    /// on.
    pub trace_size: usize,
    /// How the logged trace is measured: `auto` (structural where it applies, else
    /// Hutchinson), `structural` (refused where it does not apply) or `hutchinson`.
    pub trace_method: String,
    /// Probes of a Hutchinson-logged trace.
    pub trace_probes: usize,
}

impl Default for TrainConfig {
    /// The default recipe (the PyTorch reference recipe): cnn-s, SGD with momentum 0.9,
    /// lr 0.05 with cosine decay to 0, weight decay 5e-4, batch 128, random crop + flip,
    /// 10 epochs, on a 10,000 / 2,000 image class-balanced subset.
    fn default() -> Self {
        TrainConfig {
            model: "cnn-s".into(),
            optimizer: "sgd".into(),
            lr: 0.05,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
            schedule: "cosine".into(),
            step_every: 30,
            step_gamma: 0.1,
            warmup: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            epochs: 10,
            batch_size: 128,
            train_size: 10_000,
            test_size: 2_000,
            augment: true,
            seed: 0,
            data_seed: None,
            dtype: "f32".into(),
            eval_every: 1,
            checkpoint_every: 0,
            data: "auto".into(),
            on_nonfinite: "stop".into(),
            rho: 0.05,
            eta_prime: None,
            eps0: None,
            probe_batch: 0,
            probe_data: "same".into(),
            project: true,
            label_noise: 0.1,
            m_sharpness: 0,
            asam_eta: 0.01,
            t_gd: 0,
            output_iterate: "last".into(),
            zero_grad_xi: 1e-6,
            random_labels: false,
            init_from: None,
            init_sha256: None,
            trace_every: 0,
            trace_size: 256,
            trace_method: "auto".into(),
            trace_probes: 32,
        }
    }
}

/// Optimizer names `flatmin train --optimizer` accepts.
pub const OPTIMIZERS: [&str; 10] = [
    "sgd",
    "adamw",
    "sam",
    "asam",
    "usam",
    "sam1",
    "rps",
    "label-noise",
    "rs",
    "sa",
];

/// Optimizer-specific flags and the optimizers that use them (giving one to another optimizer
/// is an error rather than silently ignored).
pub const OPTIMIZER_FLAGS: [(&str, &[&str]); 13] = [
    ("--rho", &["sam", "asam", "usam", "sam1", "rps", "rs", "sa"]),
    ("--eta-prime", &["rs", "sa"]),
    ("--eps0", &["rs", "sa"]),
    ("--probe-batch", &["rs", "sa", "sam1"]),
    ("--probe-data", &["rs", "sa", "sam1"]),
    ("--project", &["rs", "sa"]),
    ("--no-project", &["rs", "sa"]),
    ("--output-iterate", &["rs", "sa"]),
    ("--label-noise", &["label-noise"]),
    ("--m-sharpness", &["sam", "asam", "usam"]),
    ("--asam-eta", &["asam"]),
    ("--t-gd", &["sa"]),
    ("--zero-grad-xi", &["sa"]),
];

impl TrainConfig {
    /// The seed of the data choices: `data_seed`, else `seed`.
    pub fn data_seed(&self) -> u64 {
        self.data_seed.unwrap_or(self.seed)
    }
}

impl TrainConfig {
    /// Parses a run configuration (`config.json`, or a file given to `--config`): a JSON
    /// object whose known keys override the default recipe; unknown keys (the run's
    /// metadata) are ignored. Only parses: call [`TrainConfig::validate`] on the result.
    /// Hostile bytes give an error, never a panic (fuzzed by `fuzz/fuzz_targets/run_config.rs`).
    pub fn from_json(text: &str) -> Result<Self> {
        Ok(serde_json::from_str(text)?)
    }

    /// Checks every value; the error names the flag.
    pub fn validate(&self) -> Result<()> {
        fn positive(flag: &str, v: f64) -> Result<()> {
            if !(v.is_finite() && v > 0.0) {
                bail!("{flag} must be a positive number, got {v}");
            }
            Ok(())
        }
        positive("--lr", self.lr)?;
        if !(0.0..1.0).contains(&self.momentum) {
            bail!("--momentum must be in [0, 1), got {}", self.momentum);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("--weight-decay must be >= 0, got {}", self.weight_decay);
        }
        if !OPTIMIZERS.contains(&self.optimizer.as_str()) {
            bail!(
                "--optimizer: unknown optimizer '{}' (one of {})",
                self.optimizer,
                OPTIMIZERS.join(", ")
            );
        }
        if self.nesterov && self.optimizer != "adamw" && self.momentum == 0.0 {
            bail!("--nesterov needs --momentum > 0");
        }
        self.validate_perturbation()?;
        if !["constant", "cosine", "step"].contains(&self.schedule.as_str()) {
            bail!(
                "--schedule: unknown schedule '{}' (constant, cosine or step)",
                self.schedule
            );
        }
        if self.schedule == "step" {
            if self.step_every == 0 {
                bail!("--step-every must be at least 1");
            }
            if !(self.step_gamma > 0.0 && self.step_gamma <= 1.0) {
                bail!("--step-gamma must be in (0, 1], got {}", self.step_gamma);
            }
        }
        for (flag, v) in [
            ("--epochs", self.epochs),
            ("--batch-size", self.batch_size),
            ("--eval-every", self.eval_every),
        ] {
            if v == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        if !["stop", "skip-step"].contains(&self.on_nonfinite.as_str()) {
            bail!(
                "--on-nonfinite must be stop or skip-step, got '{}'",
                self.on_nonfinite
            );
        }
        if !["f32", "f64"].contains(&self.dtype.as_str()) {
            bail!("--dtype must be f32 or f64, got '{}'", self.dtype);
        }
        if self.optimizer == "adamw" {
            if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
                bail!("--beta1 and --beta2 must be in [0, 1)");
            }
            positive("--eps", self.eps)?;
        }
        if self.trace_every > 0 && self.trace_size == 0 {
            bail!("--trace-samples must be at least 1");
        }
        if !["auto", "structural", "hutchinson"].contains(&self.trace_method.as_str()) {
            bail!(
                "--trace-method must be auto, structural or hutchinson, got '{}'",
                self.trace_method
            );
        }
        if self.trace_probes < 2 {
            bail!(
                "--trace-probes must be at least 2, got {}",
                self.trace_probes
            );
        }
        // A network file is read (and its errors reported) where the model is built.
        if !flatmin_models::netfile::is_network_file(&self.model) {
            flatmin_models::Arch::parse(&self.model)
                .map_err(|e| anyhow::anyhow!("--model: {e}"))?;
        }
        Ok(())
    }

    /// Checks the settings of the perturbation optimizers (those the chosen one uses).
    fn validate_perturbation(&self) -> Result<()> {
        let uses = |flag: &str| {
            OPTIMIZER_FLAGS
                .iter()
                .any(|(f, opts)| *f == flag && opts.contains(&self.optimizer.as_str()))
        };
        if uses("--rho") && !(self.rho.is_finite() && self.rho > 0.0) {
            bail!("--rho must be a positive number, got {}", self.rho);
        }
        if uses("--eta-prime") {
            if let Some(v) = self.eta_prime {
                if !(v.is_finite() && v >= 0.0) {
                    bail!("--eta-prime must be >= 0, got {v}");
                }
            }
        }
        if uses("--eps0") {
            if let Some(v) = self.eps0 {
                if !(v.is_finite() && v >= 0.0) {
                    bail!("--eps0 must be >= 0, got {v}");
                }
            }
        }
        if uses("--probe-data") && !["same", "fresh"].contains(&self.probe_data.as_str()) {
            bail!(
                "--probe-data must be same or fresh, got '{}'",
                self.probe_data
            );
        }
        if uses("--output-iterate") && !["last", "random"].contains(&self.output_iterate.as_str()) {
            bail!(
                "--output-iterate must be last or random, got '{}'",
                self.output_iterate
            );
        }
        if uses("--label-noise") && !(self.label_noise > 0.0 && self.label_noise <= 1.0) {
            bail!("--label-noise must be in (0, 1], got {}", self.label_noise);
        }
        if uses("--asam-eta") && !(self.asam_eta.is_finite() && self.asam_eta >= 0.0) {
            bail!("--asam-eta must be >= 0, got {}", self.asam_eta);
        }
        if uses("--zero-grad-xi") && !(self.zero_grad_xi.is_finite() && self.zero_grad_xi > 0.0) {
            bail!(
                "--zero-grad-xi must be a positive number, got {}",
                self.zero_grad_xi
            );
        }
        Ok(())
    }
}

//! The training recipe: every knob of a run, saved as `config.json` in the run folder.
//!
//! Settings with a fixed set of values are enums ([`Optimizer`], [`LossFn`], [`Schedule`], [`DType`],
//! [`NonFinitePolicy`], [`ProbeData`], [`OutputIterate`], [`TraceMethod`]): `config.json`
//! holds their words (`"sgd"`, `"skip-step"`, ...), the command line accepts the same words
//! and `--help` lists them. [`TrainConfig::optimizer_spec`] gives the chosen optimizer with
//! exactly the hyperparameters it uses.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

word_enum! {
    /// The optimizer of a run (`--optimizer`).
    Optimizer, "optimizer" {
        /// SGD with (Nesterov) momentum and coupled weight decay.
        Sgd => "sgd",
        /// AdamW (decoupled weight decay).
        AdamW => "adamw",
        /// SAM (normalized perturbation).
        Sam => "sam",
        /// Adaptive SAM (perturbation scaled by |w| + η).
        Asam => "asam",
        /// Unnormalized SAM.
        Usam => "usam",
        /// SAM whose perturbation comes from a batch of one sample.
        Sam1 => "sam1",
        /// Random-perturbation SGD.
        Rps => "rps",
        /// SGD on labels flipped at random with probability p.
        LabelNoise => "label-noise",
        /// Algorithm 1: randomly smoothed perturbation.
        Rs => "rs",
        /// Algorithm 2: sharpness-aware perturbation.
        Sa => "sa",
    }
}

impl Optimizer {
    /// The names of the per-step figures this optimizer reports (its `StepInfo::extra`),
    /// in `metrics.csv` column order: fixed by the optimizer, so a run's CSV header is fixed
    /// at its start. A figure reported only on some steps is empty on the others.
    pub fn step_figures(self) -> &'static [&'static str] {
        match self {
            Optimizer::Sgd | Optimizer::AdamW => &[],
            Optimizer::Sam | Optimizer::Asam | Optimizer::Usam => {
                &["pert_norm", "perturbed_grad_norm", "chunks"]
            }
            Optimizer::Sam1 => &["probe_grad_norm", "pert_norm", "perturbed_grad_norm"],
            Optimizer::Rps => &["pert_norm", "perturbed_grad_norm"],
            Optimizer::LabelNoise => &["label_noise"],
            Optimizer::Rs => &[
                "gate",
                "pert_norm",
                "probe_grad_norm",
                "v_norm",
                "v_cos_grad",
                "eta_prime",
                "output_pick",
            ],
            Optimizer::Sa => &[
                "phase",
                "gate",
                "sign",
                "probe_grad_norm",
                "pert_norm",
                "perturbed_grad_norm",
                "v_norm",
                "v_cos_grad",
                "zero_grad_fix",
                "eta_prime",
                "output_pick",
            ],
        }
    }
}

word_enum! {
    /// The learning-rate schedule (`--schedule`).
    Schedule, "schedule" {
        /// The base rate throughout.
        Constant => "constant",
        /// Cosine decay to 0.
        Cosine => "cosine",
        /// Multiply by `--step-gamma` every `--step-every` epochs.
        Step => "step",
    }
}

word_enum! {
    /// The float type of a run (`--dtype`).
    DType, "float type" {
        /// Single precision.
        F32 => "f32",
        /// Double precision.
        F64 => "f64",
    }
}

word_enum! {
    /// What a NaN or infinite loss or gradient does (`--on-nonfinite`).
    NonFinitePolicy, "policy" {
        /// Keep the last good checkpoint and exit, naming the step and tensor.
        Stop => "stop",
        /// Leave the parameters unchanged for that batch and go on.
        SkipStep => "skip-step",
    }
}

word_enum! {
    /// Where probe gradients come from (`--probe-data`).
    ProbeData, "probe data" {
        /// The step's batch.
        Same => "same",
        /// Another batch, drawn deterministically from the seed and the step.
        Fresh => "fresh",
    }
}

word_enum! {
    /// The iterate rs and sa hand on after their perturbed phase (`--output-iterate`).
    OutputIterate, "output iterate" {
        /// The last iterate (practice).
        Last => "last",
        /// A uniformly random iterate (as in the paper's algorithms).
        Random => "random",
    }
}

word_enum! {
    /// How the logged trace is measured (`--trace-method`).
    TraceMethod, "trace method" {
        /// Structural where it applies, else Hutchinson.
        Auto => "auto",
        /// Exact, structural; refused where it does not apply.
        Structural => "structural",
        /// Hutchinson estimate with `--trace-probes` probes.
        Hutchinson => "hutchinson",
    }
}

word_enum! {
    /// The training objective (`--loss`): every loss, gradient, HVP and trace of the run
    /// (and of the curvature commands run on it) is of this loss.
    LossFn, "loss" {
        /// Mean softmax cross-entropy.
        Ce => "ce",
        /// Mean squared error against one-hot targets (PyTorch's `mse_loss(z, one_hot(y))`,
        /// mean over all logits): its minima are attained.
        Mse => "mse",
    }
}

impl LossFn {
    /// The engine's objective.
    pub fn engine(self) -> flatmin_engine::Loss {
        match self {
            LossFn::Ce => flatmin_engine::Loss::CrossEntropy,
            LossFn::Mse => flatmin_engine::Loss::Mse,
        }
    }
}

impl TraceMethod {
    /// Whether the structural trace is tried (where it applies): `auto` and `structural`.
    pub fn tries_structural(self) -> bool {
        self != TraceMethod::Hutchinson
    }
}

impl From<ProbeData> for flatmin_optim::ProbeData {
    fn from(p: ProbeData) -> Self {
        match p {
            ProbeData::Same => flatmin_optim::ProbeData::Same,
            ProbeData::Fresh => flatmin_optim::ProbeData::Fresh,
        }
    }
}

impl From<OutputIterate> for flatmin_optim::OutputIterate {
    fn from(o: OutputIterate) -> Self {
        match o {
            OutputIterate::Last => flatmin_optim::OutputIterate::Last,
            OutputIterate::Random => flatmin_optim::OutputIterate::Random,
        }
    }
}

/// Everything that determines a training run (together with the data).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Model preset or custom MLP spec.
    pub model: String,
    /// The training objective.
    pub loss: LossFn,
    /// The optimizer.
    pub optimizer: Optimizer,
    /// Base learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Nesterov momentum (SGD).
    pub nesterov: bool,
    /// Weight decay (coupled for SGD, decoupled for AdamW).
    pub weight_decay: f64,
    /// Learning-rate schedule: `constant`, `cosine` or `step`.
    pub schedule: Schedule,
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
    pub dtype: DType,
    /// Evaluate on the test subset every this many epochs (and after the last).
    pub eval_every: usize,
    /// Keep a numbered checkpoint every this many epochs (0: only the latest).
    pub checkpoint_every: usize,
    /// Data source: `auto`, `synthetic` or a folder of the official binary release.
    pub data: String,
    /// What a NaN or infinite loss or gradient does: `stop` (keep the last good checkpoint and
    /// exit with the step and tensor named) or `skip-step` (leave the parameters unchanged
    /// for that batch and go on).
    pub on_nonfinite: NonFinitePolicy,
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
    pub probe_data: ProbeData,
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
    pub output_iterate: OutputIterate,
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
    /// Prefix removed from the `init_from` file's tensor names where present
    /// (`--strip-prefix`, for a wrapped PyTorch state_dict).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_strip_prefix: Option<String>,
    /// Log the exact normalized Hessian trace tr(H)/d every this many optimizer steps, at
    /// the start and at the end (0: never).
    pub trace_every: usize,
    /// Training images (a fixed, seeded, class-balanced subset) the logged trace is measured
    /// on.
    pub trace_size: usize,
    /// How the logged trace is measured: `auto` (structural where it applies, else
    /// Hutchinson), `structural` (refused where it does not apply) or `hutchinson`.
    pub trace_method: TraceMethod,
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
            loss: LossFn::Ce,
            optimizer: Optimizer::Sgd,
            lr: 0.05,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
            schedule: Schedule::Cosine,
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
            dtype: DType::F32,
            eval_every: 1,
            checkpoint_every: 0,
            data: "auto".into(),
            on_nonfinite: NonFinitePolicy::Stop,
            rho: 0.05,
            eta_prime: None,
            eps0: None,
            probe_batch: 0,
            probe_data: ProbeData::Same,
            project: true,
            label_noise: 0.1,
            m_sharpness: 0,
            asam_eta: 0.01,
            t_gd: 0,
            output_iterate: OutputIterate::Last,
            zero_grad_xi: 1e-6,
            random_labels: false,
            init_from: None,
            init_sha256: None,
            init_strip_prefix: None,
            trace_every: 0,
            trace_size: 256,
            trace_method: TraceMethod::Auto,
            trace_probes: 32,
        }
    }
}

impl Optimizer {
    /// The optimizer-specific flags this optimizer takes; giving one to another optimizer is
    /// an error rather than silently ignored. (Every optimizer but adamw also takes
    /// `--momentum`, `--nesterov` and `--weight-decay`, which are not listed.)
    pub fn flags(self) -> &'static [&'static str] {
        const PERTURB: [&str; 8] = [
            "--rho",
            "--eta-prime",
            "--eps0",
            "--probe-batch",
            "--probe-data",
            "--project",
            "--no-project",
            "--output-iterate",
        ];
        const SA: [&str; 10] = [
            PERTURB[0],
            PERTURB[1],
            PERTURB[2],
            PERTURB[3],
            PERTURB[4],
            PERTURB[5],
            PERTURB[6],
            PERTURB[7],
            "--t-gd",
            "--zero-grad-xi",
        ];
        match self {
            Optimizer::Sgd | Optimizer::AdamW => &[],
            Optimizer::Sam | Optimizer::Usam => &["--rho", "--m-sharpness"],
            Optimizer::Asam => &["--rho", "--m-sharpness", "--asam-eta"],
            Optimizer::Sam1 => &["--rho", "--probe-batch", "--probe-data"],
            Optimizer::Rps => &["--rho"],
            Optimizer::LabelNoise => &["--label-noise"],
            Optimizer::Rs => &PERTURB,
            Optimizer::Sa => &SA,
        }
    }

    /// Whether this optimizer takes the optimizer-specific `flag` (see [`Optimizer::flags`]).
    pub fn takes(self, flag: &str) -> bool {
        self.flags().contains(&flag)
    }

    /// The optimizers that take the optimizer-specific `flag`, in [`Optimizer::ALL`] order.
    pub fn taking(flag: &str) -> Vec<Optimizer> {
        Self::ALL
            .iter()
            .copied()
            .filter(|o| o.takes(flag))
            .collect()
    }
}

/// Momentum, Nesterov and weight decay: the SGD part of every optimizer but adamw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdParams {
    /// Heavy-ball (or Nesterov) momentum.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Coupled weight decay.
    pub weight_decay: f64,
}

/// The chosen optimizer with exactly the hyperparameters it uses (a typed view of
/// [`TrainConfig`], see [`TrainConfig::optimizer_spec`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerSpec {
    /// SGD.
    Sgd(SgdParams),
    /// AdamW.
    AdamW {
        /// β1.
        beta1: f64,
        /// β2.
        beta2: f64,
        /// ε.
        eps: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },
    /// SAM (normalized perturbation).
    Sam {
        /// Perturbation radius ρ.
        rho: f64,
        /// m-sharpness chunk size; `None`: one perturbation for the whole batch.
        m_sharpness: Option<usize>,
        /// The SGD step.
        sgd: SgdParams,
    },
    /// Adaptive SAM.
    Asam {
        /// Perturbation radius ρ.
        rho: f64,
        /// Offset η_a of the scale `|w| + η_a`.
        eta: f64,
        /// m-sharpness chunk size; `None`: one perturbation for the whole batch.
        m_sharpness: Option<usize>,
        /// The SGD step.
        sgd: SgdParams,
    },
    /// Unnormalized SAM.
    Usam {
        /// Perturbation radius ρ.
        rho: f64,
        /// m-sharpness chunk size; `None`: one perturbation for the whole batch.
        m_sharpness: Option<usize>,
        /// The SGD step.
        sgd: SgdParams,
    },
    /// SAM with a probe batch (of one sample by default).
    Sam1 {
        /// Perturbation radius ρ.
        rho: f64,
        /// Probe batch size; `None`: 1.
        probe_batch: Option<usize>,
        /// Where the probe gradient comes from.
        probe_data: ProbeData,
        /// The SGD step.
        sgd: SgdParams,
    },
    /// Random-perturbation SGD.
    Rps {
        /// Perturbation radius ρ.
        rho: f64,
        /// The SGD step.
        sgd: SgdParams,
    },
    /// Label-noise SGD.
    LabelNoise {
        /// Probability p that a label is replaced by another class.
        p: f64,
        /// The SGD step.
        sgd: SgdParams,
    },
    /// Algorithm 1, randomly smoothed perturbation.
    Rs {
        /// Perturbation radius ρ.
        rho: f64,
        /// Rate η' of the perturbation term; `None`: the scheduled rate.
        eta_prime: Option<f64>,
        /// Gradient-norm gate ε0; `None`: always perturb.
        eps0: Option<f64>,
        /// Probe batch size; `None`: the whole batch.
        probe_batch: Option<usize>,
        /// Where the probe gradient comes from.
        probe_data: ProbeData,
        /// Project the probe gradient against the batch gradient.
        project: bool,
        /// Iterate handed on at the end.
        output_iterate: OutputIterate,
        /// The SGD step.
        sgd: SgdParams,
    },
    /// Algorithm 2, sharpness-aware perturbation.
    Sa {
        /// Perturbation radius ρ.
        rho: f64,
        /// Rate η' of the perturbation term; `None`: the scheduled rate.
        eta_prime: Option<f64>,
        /// Gradient-norm gate ε0; `None`: always perturb.
        eps0: Option<f64>,
        /// Probe batch size; `None`: the whole batch.
        probe_batch: Option<usize>,
        /// Where the probe gradient comes from.
        probe_data: ProbeData,
        /// Project the probe gradient against the batch gradient.
        project: bool,
        /// Iterate handed on at the end of the perturbed phase.
        output_iterate: OutputIterate,
        /// Final plain-GD steps.
        t_gd: usize,
        /// Radius of the random shift used when the probe gradient is exactly zero.
        zero_grad_xi: f64,
        /// The SGD step.
        sgd: SgdParams,
    },
}

impl OptimizerSpec {
    /// Which optimizer this is.
    pub fn optimizer(&self) -> Optimizer {
        match self {
            OptimizerSpec::Sgd(_) => Optimizer::Sgd,
            OptimizerSpec::AdamW { .. } => Optimizer::AdamW,
            OptimizerSpec::Sam { .. } => Optimizer::Sam,
            OptimizerSpec::Asam { .. } => Optimizer::Asam,
            OptimizerSpec::Usam { .. } => Optimizer::Usam,
            OptimizerSpec::Sam1 { .. } => Optimizer::Sam1,
            OptimizerSpec::Rps { .. } => Optimizer::Rps,
            OptimizerSpec::LabelNoise { .. } => Optimizer::LabelNoise,
            OptimizerSpec::Rs { .. } => Optimizer::Rs,
            OptimizerSpec::Sa { .. } => Optimizer::Sa,
        }
    }
}

/// The keys of the run's metadata ([`super::RunMeta`]) that `config.json` carries beside
/// the recipe; a configuration file may hold these and no other keys but the settings.
pub const RUN_META_KEYS: [&str; 3] = ["flatmin_version", "threads", "dataset"];

impl TrainConfig {
    /// The seed of the data choices: `data_seed`, else `seed`.
    pub fn data_seed(&self) -> u64 {
        self.data_seed.unwrap_or(self.seed)
    }
}

impl TrainConfig {
    /// Parses a run configuration (`config.json`, or a file given to `--config`): a JSON
    /// object whose keys override the default recipe. Besides the settings, only the run's
    /// metadata keys ([`RUN_META_KEYS`], ignored) are allowed: any other key is an error
    /// naming it, as is a value of the wrong type or an unknown word (the error names the
    /// key and lists the choices). Only parses: call [`TrainConfig::validate`] on the
    /// result. Hostile bytes give an error, never a panic (fuzzed by
    /// `fuzz/fuzz_targets/run_config.rs`).
    pub fn from_json(text: &str) -> Result<Self> {
        use serde_json::{Map, Value};
        let Value::Object(mut map) = serde_json::from_str::<Value>(text)? else {
            bail!("expected a JSON object of settings");
        };
        for key in RUN_META_KEYS {
            map.remove(key);
        }
        let Value::Object(known) = serde_json::to_value(TrainConfig::default())? else {
            unreachable!("a struct serializes to an object");
        };
        if let Some(key) = map.keys().find(|k| !known.contains_key(*k)) {
            let hint = crate::suggest::did_you_mean(key, known.keys());
            bail!("unknown key '{key}'{hint}");
        }
        serde_json::from_value(Value::Object(map.clone())).or_else(|e| {
            // Name the key whose value is refused.
            for (key, v) in &map {
                let one: Map<String, Value> = [(key.clone(), v.clone())].into_iter().collect();
                if let Err(e) = serde_json::from_value::<TrainConfig>(Value::Object(one)) {
                    bail!("key '{key}': {e}");
                }
            }
            Err(e.into())
        })
    }

    /// The chosen optimizer with the hyperparameters it uses.
    pub fn optimizer_spec(&self) -> OptimizerSpec {
        let sgd = SgdParams {
            momentum: self.momentum,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
        };
        let m_sharpness = (self.m_sharpness > 0).then_some(self.m_sharpness);
        let probe_batch = (self.probe_batch > 0).then_some(self.probe_batch);
        let rho = self.rho;
        match self.optimizer {
            Optimizer::Sgd => OptimizerSpec::Sgd(sgd),
            Optimizer::AdamW => OptimizerSpec::AdamW {
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay: self.weight_decay,
            },
            Optimizer::Sam => OptimizerSpec::Sam {
                rho,
                m_sharpness,
                sgd,
            },
            Optimizer::Asam => OptimizerSpec::Asam {
                rho,
                eta: self.asam_eta,
                m_sharpness,
                sgd,
            },
            Optimizer::Usam => OptimizerSpec::Usam {
                rho,
                m_sharpness,
                sgd,
            },
            Optimizer::Sam1 => OptimizerSpec::Sam1 {
                rho,
                probe_batch,
                probe_data: self.probe_data,
                sgd,
            },
            Optimizer::Rps => OptimizerSpec::Rps { rho, sgd },
            Optimizer::LabelNoise => OptimizerSpec::LabelNoise {
                p: self.label_noise,
                sgd,
            },
            Optimizer::Rs => OptimizerSpec::Rs {
                rho,
                eta_prime: self.eta_prime,
                eps0: self.eps0,
                probe_batch,
                probe_data: self.probe_data,
                project: self.project,
                output_iterate: self.output_iterate,
                sgd,
            },
            Optimizer::Sa => OptimizerSpec::Sa {
                rho,
                eta_prime: self.eta_prime,
                eps0: self.eps0,
                probe_batch,
                probe_data: self.probe_data,
                project: self.project,
                output_iterate: self.output_iterate,
                t_gd: self.t_gd,
                zero_grad_xi: self.zero_grad_xi,
                sgd,
            },
        }
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
        if self.nesterov && self.optimizer != Optimizer::AdamW && self.momentum == 0.0 {
            bail!("--nesterov needs --momentum > 0");
        }
        self.validate_perturbation()?;
        if self.schedule == Schedule::Step {
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
        if self.optimizer == Optimizer::AdamW {
            if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
                bail!("--beta1 and --beta2 must be in [0, 1)");
            }
            positive("--eps", self.eps)?;
        }
        if self.trace_every > 0 && self.trace_size == 0 {
            bail!("--trace-size must be at least 1");
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
                .map_err(|e| crate::suggest::model_error(&self.model, e))?;
        }
        Ok(())
    }

    /// Checks the settings of the perturbation optimizers (those the chosen one uses).
    fn validate_perturbation(&self) -> Result<()> {
        let uses = |flag: &str| self.optimizer.takes(flag);
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

#[cfg(test)]
mod tests {
    use super::LossFn;

    #[test]
    fn loss_words_are_the_engine_names() {
        for &l in LossFn::ALL {
            assert_eq!(l.name(), l.engine().name());
            assert_eq!(flatmin_engine::Loss::parse(l.name()), Some(l.engine()));
        }
        assert_eq!(LossFn::ALL.len(), flatmin_engine::Loss::ALL.len());
    }
}

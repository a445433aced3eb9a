//! `flatmin train`: train a preset on CIFAR-10 into a run folder, with a progress bar.

use anyhow::{bail, Result};
use clap::Args;
use flatmin::data::{auto_candidates, resolve};
use flatmin::train::{
    DType, LossFn, NonFinitePolicy, Observer, Optimizer, Outcome, OutputIterate, ProbeData, Record,
    RunLock, Schedule, TraceMethod, TrainConfig, Trainer,
};
use flatmin_datasets::Element;
use flatmin_engine::Scalar;
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Arguments of `flatmin train`. Unset flags take the default recipe (see `TrainConfig`).
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Model preset (tiny-tanh, mlp-s, cnn-s, resnet20, resnet18), `mlp:W0,...:ACT` or a network
    /// file NET.json (docs/network-file.md) [default: cnn-s].
    #[arg(long, help_heading = "Model")]
    pub model: Option<String>,
    /// Training objective: ce (softmax cross-entropy) or mse (squared error against one-hot
    /// targets, mean over all logits; its minima are attained) [default: ce]. Traces logged
    /// with --trace-every, and the curvature commands run on the run, measure this loss.
    #[arg(long, value_enum, help_heading = "Model")]
    pub loss: Option<LossFn>,
    /// Optimizer: sgd, adamw, sam, asam, usam, sam1 (SAM with batch size 1), rps (random-
    /// perturbation SGD), label-noise, rs (Algorithm 1, randomly smoothed perturbation), sa
    /// (Algorithm 2, sharpness-aware perturbation) [default: sgd]. All but adamw take
    /// --momentum, --nesterov and --weight-decay (the paper's algorithms use neither:
    /// pass --momentum 0 --weight-decay 0).
    #[arg(long, value_enum, help_heading = "Optimizer")]
    pub optimizer: Option<Optimizer>,
    /// Base learning rate [default: 0.05].
    #[arg(long, allow_hyphen_values = true, help_heading = "Optimizer")]
    pub lr: Option<f64>,
    /// SGD momentum [default: 0.9].
    #[arg(long, allow_hyphen_values = true, help_heading = "Optimizer")]
    pub momentum: Option<f64>,
    /// Nesterov momentum.
    #[arg(long, overrides_with = "no_nesterov", help_heading = "Optimizer")]
    pub nesterov: bool,
    /// Plain (heavy-ball) momentum [default].
    #[arg(long, help_heading = "Optimizer")]
    pub no_nesterov: bool,
    /// Weight decay [default: 5e-4].
    #[arg(long, allow_hyphen_values = true, help_heading = "Optimizer")]
    pub weight_decay: Option<f64>,
    /// Learning-rate schedule: constant, cosine or step [default: cosine].
    #[arg(long, value_enum, help_heading = "Schedule")]
    pub schedule: Option<Schedule>,
    /// Step schedule: epochs between decays [default: 30].
    #[arg(long, help_heading = "Schedule")]
    pub step_every: Option<usize>,
    /// Step schedule: decay factor [default: 0.1].
    #[arg(long, allow_hyphen_values = true, help_heading = "Schedule")]
    pub step_gamma: Option<f64>,
    /// Epochs of linear warmup [default: 0].
    #[arg(long, help_heading = "Schedule")]
    pub warmup: Option<usize>,
    /// Number of epochs [default: 10].
    #[arg(long, help_heading = "Schedule")]
    pub epochs: Option<usize>,
    /// Mini-batch size [default: 128].
    #[arg(long, help_heading = "Data")]
    pub batch_size: Option<usize>,
    /// Training images, a class-balanced subset (0: all) [default: 10000].
    #[arg(long, help_heading = "Data")]
    pub train_size: Option<usize>,
    /// Test images, a class-balanced subset (0: all) [default: 2000].
    #[arg(long, help_heading = "Data")]
    pub test_size: Option<usize>,
    /// Random crop and flip on [default].
    #[arg(long, overrides_with = "no_augment", help_heading = "Data")]
    pub augment: bool,
    /// No augmentation.
    #[arg(long, help_heading = "Data")]
    pub no_augment: bool,
    /// Seed of initialization, subsets, order, augmentation and optimizer noise [default: 0].
    #[arg(long, help_heading = "Model")]
    pub seed: Option<u64>,
    /// Seed of the data choices alone (training/test subsets, random labels, trace subset),
    /// so that runs with different --seed train on the same images [default: --seed].
    #[arg(long, value_name = "SEED", help_heading = "Data")]
    pub data_seed: Option<u64>,
    /// Float type: f32 or f64 [default: f32].
    #[arg(long, value_enum, help_heading = "Model")]
    pub dtype: Option<DType>,
    /// Evaluate every this many epochs [default: 1].
    #[arg(long, help_heading = "Schedule")]
    pub eval_every: Option<usize>,
    /// Keep a numbered checkpoint every this many epochs (0: only the latest) [default: 0].
    #[arg(long, help_heading = "Run folder")]
    pub checkpoint_every: Option<usize>,
    /// Data: auto, synthetic, or a cifar-10-batches-bin folder [default: auto].
    #[arg(long, help_heading = "Data")]
    pub data: Option<String>,
    /// Run folder [default: runs/MODEL-OPTIMIZER-sSEED, numbered if taken].
    #[arg(long, help_heading = "Run folder")]
    pub out: Option<PathBuf>,
    /// Resume the run in this folder from its last checkpoint (its config.json is used).
    /// Refused at once while another process is training in the folder.
    #[arg(
        long,
        value_name = "RUN",
        conflicts_with = "config",
        help_heading = "Run folder"
    )]
    pub resume: Option<PathBuf>,
    /// Rerun a recorded experiment: take the recipe from this config.json (flags override it).
    #[arg(long, value_name = "FILE", help_heading = "Run folder")]
    pub config: Option<PathBuf>,
    /// Replace a run already in --out (refused, with nothing removed, while another process
    /// is training in it).
    #[arg(long, help_heading = "Run folder")]
    pub overwrite: bool,
    /// Worker threads (default: rayon's default, which honours RAYON_NUM_THREADS).
    #[arg(long, value_name = "T", value_parser = super::parse_threads, allow_hyphen_values = true)]
    pub threads: Option<usize>,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
    /// Memory the run may use, e.g. 512M, 16G, 1.5T (binary units). Training refuses to
    /// start when its estimated peak exceeds this, or by default the memory available now
    /// (MemAvailable); set it when the estimate is wrong or to leave room for other jobs.
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<String>,
    /// On a NaN or infinite loss or gradient: stop (keeping the last good checkpoint) or
    /// skip-step (leave the parameters unchanged for that batch) [default: stop].
    #[arg(long, value_name = "POLICY", value_enum)]
    pub on_nonfinite: Option<NonFinitePolicy>,
    /// Perturbation radius ρ (sam, asam, usam, sam1, rps, rs, sa) [default: 0.05].
    #[arg(long, allow_hyphen_values = true, help_heading = "Perturbation")]
    pub rho: Option<f64>,
    /// Rate η' on the perturbation term (rs, sa) [default: η, the scheduled learning rate].
    #[arg(long, allow_hyphen_values = true, help_heading = "Perturbation")]
    pub eta_prime: Option<f64>,
    /// Gradient-norm gate ε0 (rs, sa): perturb only when the batch gradient norm is at most ε0
    /// [default: no gate].
    #[arg(long, allow_hyphen_values = true, help_heading = "Perturbation")]
    pub eps0: Option<f64>,
    /// Probe batch size B (rs, sa, sam1): samples drawn from the step's batch, or the size of a
    /// fresh batch [default: the whole batch; sam1: 1].
    #[arg(long, help_heading = "Perturbation")]
    pub probe_batch: Option<usize>,
    /// Probe gradients from the step's batch (same) or a fresh batch (fresh) (rs, sa, sam1)
    /// [default: same].
    #[arg(long, value_enum, help_heading = "Perturbation")]
    pub probe_data: Option<ProbeData>,
    /// Project the probe gradient against the batch gradient (rs, sa) [default].
    #[arg(long, overrides_with = "no_project", help_heading = "Perturbation")]
    pub project: bool,
    /// Do not project the probe gradient (rs, sa ablation).
    #[arg(long, help_heading = "Perturbation")]
    pub no_project: bool,
    /// Label-noise probability p (label-noise) [default: 0.1].
    #[arg(long, allow_hyphen_values = true, help_heading = "Perturbation")]
    pub label_noise: Option<f64>,
    /// m-sharpness: samples per perturbation (sam, asam, usam) [default: 0, the whole batch].
    #[arg(long, help_heading = "Perturbation")]
    pub m_sharpness: Option<usize>,
    /// ASAM's η of the scale |w| + η (asam) [default: 0.01].
    #[arg(long, allow_hyphen_values = true, help_heading = "Perturbation")]
    pub asam_eta: Option<f64>,
    /// Final plain-GD steps after the perturbed phase (sa) [default: 0].
    #[arg(long, help_heading = "Perturbation")]
    pub t_gd: Option<usize>,
    /// Iterate handed on after the perturbed phase (rs, sa): last, or random (uniformly drawn,
    /// as in the paper's algorithms) [default: last].
    #[arg(long, value_enum, help_heading = "Perturbation")]
    pub output_iterate: Option<OutputIterate>,
    /// Radius of the random shift used when sa's probe gradient is exactly zero (Remark 2)
    /// [default: 1e-6].
    #[arg(long, allow_hyphen_values = true, help_heading = "Perturbation")]
    pub zero_grad_xi: Option<f64>,
    /// Train on random labels (fixed for the run, drawn from --seed): the random-label
    /// pre-training of Liu et al. (2020).
    #[arg(long, help_heading = "Data")]
    pub random_labels: bool,
    /// Start from this model state (a run's model.safetensors or a checkpoint; optimizer and
    /// trainer entries are ignored) instead of a fresh initialization; its path and SHA-256
    /// go into config.json.
    #[arg(long, value_name = "CKPT", help_heading = "Model")]
    pub init_from: Option<PathBuf>,
    /// Log the exact normalized Hessian trace tr(H)/d (structural, BatchNorm eval; Hutchinson
    /// with fixed probes where structure does not apply) every N steps, at the start and at
    /// the end, as `trace` records of metrics.jsonl (0: never) [default: 0].
    #[arg(long, value_name = "N", help_heading = "Curvature logging")]
    pub trace_every: Option<usize>,
    /// Training images (fixed, seeded, class-balanced subset) of the logged trace
    /// [default: 256].
    #[arg(
        long,
        alias = "trace-samples",
        value_name = "N",
        help_heading = "Curvature logging"
    )]
    pub trace_size: Option<usize>,
    /// How the logged trace is measured: auto (structural where it applies, else
    /// Hutchinson), structural (exact; refused where it does not apply) or hutchinson
    /// (estimate with --trace-probes probes, logged with its standard error) [default: auto].
    #[arg(
        long,
        value_name = "METHOD",
        value_enum,
        help_heading = "Curvature logging"
    )]
    pub trace_method: Option<TraceMethod>,
    /// Probes of a Hutchinson-logged trace [default: 32].
    #[arg(long, value_name = "P", help_heading = "Curvature logging")]
    pub trace_probes: Option<usize>,
    /// Remove this prefix from the --init-from file's tensor names where present: a wrapped
    /// PyTorch state_dict (`--strip-prefix model.` for `model.layers.0.weight`).
    #[arg(
        long,
        value_name = "PREFIX",
        requires = "init_from",
        help_heading = "Model"
    )]
    pub strip_prefix: Option<String>,
}

impl TrainArgs {
    /// The recipe: `--config FILE` (or the defaults) overridden by the given flags.
    pub fn config(&self) -> Result<TrainConfig> {
        let mut c = self.base_config()?;
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        set!(
            model,
            loss,
            optimizer,
            lr,
            momentum,
            weight_decay,
            schedule,
            step_every,
            step_gamma,
            warmup,
            epochs,
            batch_size,
            train_size,
            test_size,
            seed,
            dtype,
            eval_every,
            checkpoint_every,
            data,
            on_nonfinite
        );
        set!(
            rho,
            probe_batch,
            probe_data,
            label_noise,
            m_sharpness,
            asam_eta,
            t_gd,
            output_iterate,
            zero_grad_xi,
            trace_every,
            trace_size,
            trace_method,
            trace_probes
        );
        if self.random_labels {
            c.random_labels = true;
        }
        if self.data_seed.is_some() {
            c.data_seed = self.data_seed;
        }
        if self.strip_prefix.is_some() {
            c.init_strip_prefix = self.strip_prefix.clone();
        }
        if let Some(p) = &self.init_from {
            c.init_from = Some(p.display().to_string());
        }
        if self.eta_prime.is_some() {
            c.eta_prime = self.eta_prime;
        }
        if self.eps0.is_some() {
            c.eps0 = self.eps0;
        }
        for flag in self.optimizer_flags() {
            if !c.optimizer.takes(flag) {
                let opts: Vec<&str> = Optimizer::taking(flag).iter().map(|o| o.name()).collect();
                bail!(
                    "{flag} applies to --optimizer {} only, not {}",
                    opts.join(", "),
                    c.optimizer
                );
            }
        }
        self.apply_switches(&mut c);
        if self.optimizer == Some(Optimizer::AdamW) && self.lr.is_none() {
            c.lr = 1e-3;
        }
        if c.optimizer != Optimizer::Sgd && !self.nesterov {
            c.nesterov = false;
        }
        Ok(c)
    }

    /// The recipe of `--config FILE`, or the defaults.
    fn base_config(&self) -> Result<TrainConfig> {
        let Some(path) = &self.config else {
            return Ok(TrainConfig::default());
        };
        let text =
            flatmin_engine::fsread::read_regular_to_string(path, flatmin::train::MAX_CONFIG_BYTES)
                .map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
        TrainConfig::from_json(&text).map_err(|e| {
            anyhow::anyhow!(
                "--config {}: not a flatmin run configuration: {e}",
                path.display()
            )
        })
    }

    /// The on/off switch pairs (`--project`/`--no-project`, `--nesterov`/`--no-nesterov`,
    /// `--augment`/`--no-augment`): the one given overrides the recipe.
    fn apply_switches(&self, c: &mut TrainConfig) {
        for (on, off, field) in [
            (self.project, self.no_project, &mut c.project),
            (self.nesterov, self.no_nesterov, &mut c.nesterov),
            (self.augment, self.no_augment, &mut c.augment),
        ] {
            if off {
                *field = false;
            }
            if on {
                *field = true;
            }
        }
    }

    /// Optimizer-specific flags given on the command line.
    fn optimizer_flags(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        macro_rules! given {
            ($($f:ident => $flag:expr),*) => { $( if self.$f.is_some() { v.push($flag); } )* };
        }
        given!(rho => "--rho", eta_prime => "--eta-prime", eps0 => "--eps0", probe_batch => "--probe-batch",
            probe_data => "--probe-data", label_noise => "--label-noise", m_sharpness => "--m-sharpness",
            asam_eta => "--asam-eta", t_gd => "--t-gd", output_iterate => "--output-iterate",
            zero_grad_xi => "--zero-grad-xi");
        for (set, flag) in [
            (self.project, "--project"),
            (self.no_project, "--no-project"),
        ] {
            if set {
                v.push(flag);
            }
        }
        v
    }

    /// Recipe flags given together with `--resume` (which takes the recipe from the run).
    fn recipe_flags(&self) -> Vec<&'static str> {
        let mut v = self.optimizer_flags();
        macro_rules! given {
            ($($f:ident => $flag:expr),*) => { $( if self.$f.is_some() { v.push($flag); } )* };
        }
        given!(on_nonfinite => "--on-nonfinite");
        given!(model => "--model", loss => "--loss", optimizer => "--optimizer", lr => "--lr", momentum => "--momentum",
            weight_decay => "--weight-decay", schedule => "--schedule", step_every => "--step-every",
            step_gamma => "--step-gamma", warmup => "--warmup", epochs => "--epochs",
            batch_size => "--batch-size", train_size => "--train-size", test_size => "--test-size",
            seed => "--seed", data_seed => "--data-seed", dtype => "--dtype", eval_every => "--eval-every",
            checkpoint_every => "--checkpoint-every", out => "--out", init_from => "--init-from", strip_prefix => "--strip-prefix",
            trace_every => "--trace-every", trace_size => "--trace-size",
            trace_method => "--trace-method", trace_probes => "--trace-probes");
        if self.random_labels {
            v.push("--random-labels");
        }
        if self.overwrite {
            v.push("--overwrite");
        }
        for (set, flag) in [
            (self.nesterov, "--nesterov"),
            (self.no_nesterov, "--no-nesterov"),
            (self.augment, "--augment"),
            (self.no_augment, "--no-augment"),
        ] {
            if set {
                v.push(flag);
            }
        }
        v
    }
}

/// A fresh default run folder name: `runs/MODEL-OPTIMIZER-sSEED`, numbered if taken.
fn default_out(cfg: &TrainConfig) -> PathBuf {
    let model: String = cfg
        .model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let base = Path::new("runs").join(format!("{model}-{}-s{}", cfg.optimizer, cfg.seed));
    let mut p = base.clone();
    let mut i = 2;
    while p.exists() {
        p = PathBuf::from(format!("{}-{i}", base.display()));
        i += 1;
    }
    p
}

/// A write that failed during training (full disk, file too large, folder gone) ends the run
/// with one line: the failure, then which checkpoint is kept and how to resume from it.
/// Other errors (divergence says this itself) are returned as they are.
fn with_checkpoint_note<T: Scalar + Element>(
    e: anyhow::Error,
    trainer: &Trainer<T>,
    dir: &Path,
) -> anyhow::Error {
    let io = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some()
            || matches!(
                c.downcast_ref::<flatmin_models::ModelError>(),
                Some(flatmin_models::ModelError::Io { .. })
            )
    });
    if !io {
        return e;
    }
    let kept = match trainer.run_dir().last_checkpoint() {
        Some(p) => format!(
            "the last checkpoint {} is kept; resume with: flatmin train --resume {}",
            p.display(),
            dir.display()
        ),
        None => "no checkpoint was written yet".into(),
    };
    anyhow::anyhow!("{}; training stopped, {kept}", super::error_line(&e))
}

/// Runs `flatmin train`.
pub fn run(args: &TrainArgs) -> Result<()> {
    super::with_threads(args.threads, || dispatch(args))
}

fn dispatch(args: &TrainArgs) -> Result<()> {
    let (cfg, resume) = match &args.resume {
        Some(dir) => {
            let flags = args.recipe_flags();
            if !flags.is_empty() {
                bail!(
                    "--resume takes the recipe from {}/config.json; drop {}",
                    dir.display(),
                    flags.join(", ")
                );
            }
            let run = flatmin::train::RunDir::open(dir)?;
            let cfg = run.config()?;
            // Refuse a folder in use at once; the lock itself is taken by `Trainer::resume`.
            RunLock::check_free(dir, "--resume")?;
            // A config.json edited since the checkpoint, before the memory check and data.
            flatmin::train::check_resume_recipe(&run, &cfg)?;
            (cfg, Some(dir.clone()))
        }
        None => {
            let cfg = args.config()?;
            cfg.validate()?;
            if args.overwrite {
                let out = args.out.clone().unwrap_or_else(|| default_out(&cfg));
                RunLock::check_free(&out, "--out")?;
            }
            (cfg, None)
        }
    };
    // Before the data is loaded or the run folder touched: refuse what cannot fit.
    let limit = args
        .max_memory
        .as_deref()
        .map(flatmin::train::parse_size)
        .transpose()?;
    flatmin::train::check_memory(&cfg, limit)?;
    let data_spec = args.data.clone().unwrap_or_else(|| cfg.data.clone());
    let data = resolve(&data_spec, cfg.seed)?;
    if data.synthetic && data_spec != "synthetic" {
        let looked: Vec<String> = auto_candidates()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        eprintln!(
            "warning: no CIFAR-10 found (looked in {}).",
            looked.join(", ")
        );
        eprintln!("warning: training on the built-in SYNTHETIC dataset instead; accuracies are not CIFAR-10 accuracies.");
        eprintln!("warning: get CIFAR-10 with `flatmin data fetch cifar10`, or pass --data DIR / set FLATMIN_DATA.");
    }
    let origin = data.origin.clone();
    match cfg.dtype {
        DType::F64 => train::<f64>(args, cfg, data, resume, &origin),
        DType::F32 => train::<f32>(args, cfg, data, resume, &origin),
    }
}

fn train<T: Scalar + Element>(
    args: &TrainArgs,
    cfg: TrainConfig,
    data: flatmin::data::DataSource,
    resume: Option<PathBuf>,
    origin: &str,
) -> Result<()> {
    let mut trainer = match &resume {
        Some(dir) => Trainer::<T>::resume(dir, data)?,
        None => {
            let out = args.out.clone().unwrap_or_else(|| default_out(&cfg));
            Trainer::<T>::create(cfg, data, &out, args.overwrite)?
        }
    };
    for w in trainer.warnings() {
        eprintln!("warning: {w}");
    }
    let cfg = trainer.config().clone();
    let dir = trainer.run_dir().path().to_path_buf();
    if !args.quiet {
        let threads = rayon::current_num_threads();
        println!(
            "{} {} on {} ({} train / {} test images), {} epochs, batch {}, {} params, {} threads, {} -> {}",
            if resume.is_some() { "resuming" } else { "training" },
            cfg.model,
            origin,
            cfg.train_size,
            cfg.test_size,
            cfg.epochs,
            cfg.batch_size,
            trainer.model().num_params(),
            threads,
            cfg.optimizer,
            dir.display()
        );
    }
    let mut progress = Progress::new(args.quiet);
    // The first SIGINT or SIGTERM finishes the step, writes a checkpoint and exits non-zero;
    // a second ends the process at once (checkpoints are written atomically, so the
    // previous one stays intact).
    let stop = super::Interrupt::install()?;
    let outcome = trainer
        .run_until(&mut progress, &|_| stop.received().is_some())
        .map_err(|e| with_checkpoint_note(e, &trainer, &dir))?;
    progress.finish();
    if let Outcome::Stopped { step } = outcome {
        bail!(
            "interrupted after step {step}; checkpoint written to {}; resume with: flatmin train --resume {}",
            dir.join("checkpoints/last.safetensors").display(),
            dir.display()
        );
    }
    let last = trainer
        .run_dir()
        .records()?
        .into_iter()
        .rev()
        .find(|r| r.kind == "eval");
    if let Some(r) = last {
        println!(
            "done: test accuracy {:.2}%, test loss {:.4}, train accuracy {:.2}% (epoch {}) — run folder {}",
            100.0 * r.test_acc.unwrap_or(f64::NAN),
            r.test_loss.unwrap_or(f64::NAN),
            100.0 * r.train_acc.unwrap_or(f64::NAN),
            r.epoch,
            dir.display()
        );
    }
    Ok(())
}

/// Progress output on stderr: a bar where stderr can show one live
/// ([`super::term::live_progress`]), periodic plain lines otherwise, nothing when quiet.
struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    steps_per_epoch: usize,
    last_line: Instant,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        let live = !quiet && super::term::live_progress();
        Progress {
            bar: live.then(|| super::term::bar("", Some(0), "steps", true)),
            plain: !quiet && !live,
            steps_per_epoch: 1,
            last_line: Instant::now(),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

impl Observer for Progress {
    fn on_start(&mut self, step: usize, total: usize, steps_per_epoch: usize) {
        self.steps_per_epoch = steps_per_epoch.max(1);
        if let Some(b) = &self.bar {
            b.set_length(total as u64);
            b.set_position(step as u64);
        }
    }

    fn on_step(&mut self, r: &Record) {
        let msg = format!(
            "loss {:.4} acc {:.1}% {:.0} img/s",
            r.loss.unwrap_or(f64::NAN),
            100.0 * r.acc.unwrap_or(f64::NAN),
            r.images_per_s.unwrap_or(0.0)
        );
        if let Some(b) = &self.bar {
            b.set_prefix(format!("epoch {} step {}", r.epoch, r.step));
            b.set_position(r.step as u64);
            b.set_message(msg);
        } else if self.plain
            && (self.last_line.elapsed().as_secs_f64() >= 10.0
                || r.step.is_multiple_of(self.steps_per_epoch))
        {
            eprintln!("epoch {} step {}: {msg}", r.epoch, r.step);
            self.last_line = Instant::now();
        }
    }

    fn on_eval(&mut self, r: &Record) {
        let line = format!(
            "epoch {}: train loss {:.4} acc {:.2}% | test loss {:.4} acc {:.2}% | {:.0}s",
            r.epoch,
            r.train_loss.unwrap_or(f64::NAN),
            100.0 * r.train_acc.unwrap_or(f64::NAN),
            r.test_loss.unwrap_or(f64::NAN),
            100.0 * r.test_acc.unwrap_or(f64::NAN),
            r.wall_s
        );
        match &self.bar {
            Some(b) => b.println(line),
            None if self.plain => eprintln!("{line}"),
            None => {}
        }
    }
}

//! Training runs: a [`Trainer`] owns the model, optimizer, data and run folder, and goes
//! epoch by epoch, writing metrics and atomic checkpoints; a run can be resumed from its
//! folder and continues bit for bit as if never interrupted.

mod config;
mod lock;
mod memory;
mod record;
mod run_dir;

pub use config::{
    DType, LossFn, NonFinitePolicy, Optimizer, OptimizerSpec, OutputIterate, ProbeData, Schedule,
    SgdParams, TraceMethod, TrainConfig, RUN_META_KEYS,
};
pub use lock::{Locked, RunLock, LOCK_FILE};
pub use memory::{
    available_memory, check_memory, estimate_memory, human_bytes, param_bytes, parse_size,
    MemoryEstimate,
};
pub use record::{find_record, recipe_differences, recipe_sha256, RunRecord, RUN_RECORD_TENSOR};
pub use run_dir::{
    batch_sha256, csv_columns, parse_records, read_records, DatasetIdentity, Record, RunDir,
    RunMeta, BEST_MODEL_FILE, CSV_HEADER, MAX_CONFIG_BYTES, MAX_METRICS_BYTES, NETWORK_FILE,
};

use crate::data::{sized_subset, DataSource};
use anyhow::{bail, Context, Result};
use flatmin_datasets::{Augment, Batch, Element, Loader, MiniBatch};
use flatmin_engine::{Scalar, Tensor};
use flatmin_models::io::{RawData, RawTensor};
use flatmin_models::model::float_raw;
use flatmin_models::ModelError;
use flatmin_models::{BnUse, Model};
use flatmin_optim::rng::{derive_seed, Rng};
use flatmin_optim::Optimizer as StepRule;
use flatmin_optim::{
    corrupt_labels, AdamW, EtaPrime, LabelNoise, LabelNoiseSgd, LrSchedule, OptimError, Oracle,
    Probe, ProbeSpec, Rps, Rs, RsConfig, Sa, SaConfig, Sam, Sam1, SamVariant, Sgd,
};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Receives progress events (the command line draws a progress bar from them).
pub trait Observer {
    /// Training starts (or resumes) at `step` of `total` steps.
    fn on_start(&mut self, _step: usize, _total: usize, _steps_per_epoch: usize) {}
    /// One optimizer step finished.
    fn on_step(&mut self, _record: &Record) {}
    /// An evaluation finished.
    fn on_eval(&mut self, _record: &Record) {}
    /// A checkpoint was written.
    fn on_checkpoint(&mut self, _path: &Path) {}
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

/// Model, optimizer, data and position of one training run.
pub struct Trainer<T: Scalar + Element> {
    cfg: TrainConfig,
    model: Model<T>,
    params: Vec<Tensor<T>>,
    opt: Box<dyn StepRule<T>>,
    sched: LrSchedule,
    loader: Loader,
    /// The training subset as trained on (random labels applied), evaluated at each
    /// evaluation record.
    train: Arc<Batch>,
    test: Batch,
    run: RunDir,
    step: usize,
    /// Running sums of the current epoch: loss, correct predictions, images seen.
    epoch_sums: (f64, u64, u64),
    /// Gradient evaluations of the run so far.
    grad_queries: u64,
    /// Per-sample gradient evaluations of the run so far (each gradient query counts the
    /// samples of the batch it was evaluated on).
    grad_samples: u64,
    /// The trace subset in batches (empty without `--trace-every`).
    trace_set: Vec<(Tensor<T>, Vec<usize>)>,
    /// Records appended to `metrics.jsonl` so far (all kinds).
    records: u64,
    /// The images the run trains on (recorded in every checkpoint).
    dataset: DatasetIdentity,
    /// Warnings for the user about how the run was opened (see [`Trainer::warnings`]).
    warnings: Vec<String>,
    /// The evaluation `best.safetensors` holds the model of ([`BestModel`]).
    best: Option<BestModel>,
}

/// The best model of a run so far: the evaluation with the highest test accuracy (of the
/// ones with a finite accuracy; a tie keeps the earlier one). Its weights are in
/// `best.safetensors`; a resumed run finds it again in the records its checkpoint kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BestModel {
    /// Its test accuracy.
    pub test_acc: f64,
    /// Optimizer steps completed at its evaluation.
    pub step: usize,
    /// Its epoch (from 1, as `metrics.jsonl`'s `epoch`).
    pub epoch: usize,
}

impl BestModel {
    /// The best of the `eval` records `recs` (see [`BestModel`]), `None` without one.
    pub fn of_records<'a>(recs: impl IntoIterator<Item = &'a Record>) -> Option<Self> {
        recs.into_iter()
            .filter(|r| r.kind == "eval")
            .fold(None, BestModel::improve)
    }

    /// `best`, or the evaluation `r` when it beats it (strictly higher finite accuracy).
    fn improve(best: Option<Self>, r: &Record) -> Option<Self> {
        match r.test_acc {
            Some(a) if a.is_finite() && best.is_none_or(|b| a > b.test_acc) => Some(BestModel {
                test_acc: a,
                step: r.step,
                epoch: r.epoch,
            }),
            _ => best,
        }
    }
}

/// How [`Trainer::run_until`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// All epochs done.
    Finished,
    /// Stopped on request after `step` steps, with a checkpoint written there.
    Stopped {
        /// Steps completed.
        step: usize,
    },
}

/// Evaluation batch size (no gradients; memory only).
const EVAL_BATCH: usize = 250;

/// Purpose tags of the seeds derived from `--seed` for the optimizer's own draws and for
/// fresh probe batches.
const OPTIMIZER_SEED_TAG: u64 = 0x6f70_7469;
const FRESH_BATCH_SEED_TAG: u64 = 0x6672_6573;
/// Purpose tags of the seeds of the random labels (`--random-labels`) and of the trace
/// subset (`--trace-every`).
const RANDOM_LABELS_SEED_TAG: u64 = 0x726c_6162;
const TRACE_SUBSET_SEED_TAG: u64 = 0x7472_6163;
/// Batch size of the logged trace's structural pass (memory only).
const TRACE_BATCH: usize = 128;

/// SHA-256 (hex) of a file's bytes.
pub fn file_sha256(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = flatmin_engine::fsread::read_regular_file(path, flatmin_models::io::MAX_FILE_BYTES)
        .with_context(|| path.display().to_string())?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect())
}

/// The images a run with recipe `cfg` trains on, from the training split `split`: its
/// class-balanced subset of `train_size` images (seeded by the data seed), with random labels
/// when the run trains on them. `flatmin eval --split train` of a run evaluates the same.
pub fn training_subset(cfg: &TrainConfig, split: Batch) -> Result<Batch> {
    let mut train = sized_subset(
        split,
        cfg.train_size,
        cfg.data_seed(),
        "--train-size",
        "the training split",
    )?;
    if cfg.random_labels {
        randomize_labels(&mut train, cfg.data_seed());
    }
    Ok(train)
}

/// Checks the recipe `cfg` read from `run`'s `config.json` against the checkpoint's
/// `record` (nothing to check without one).
fn check_recipe_against(run: &RunDir, cfg: &TrainConfig, record: Option<&RunRecord>) -> Result<()> {
    match record {
        Some(rec) => rec.check_recipe(&run.recipe(cfg)?, &run.path().join("config.json")),
        None => Ok(()),
    }
}

/// Refuses to resume `run` when its `config.json` (parsed as `cfg`) is not the recipe its
/// last checkpoint recorded; the command line calls it before the memory check and the
/// data, and [`Trainer::resume`] checks the same again (with the data).
pub fn check_resume_recipe(run: &RunDir, cfg: &TrainConfig) -> Result<()> {
    let ckpt = LastCheckpoint::read(run)?;
    check_recipe_against(run, cfg, ckpt.as_ref().and_then(|c| c.record.as_ref()))
}

/// Loads the model state of the recipe's `--init-from` file into `model` (optimizer and
/// trainer entries ignored), after checking the file still has the recorded SHA-256.
fn load_init_from<T: Scalar + Element>(cfg: &TrainConfig, model: &mut Model<T>) -> Result<()> {
    let Some(init) = &cfg.init_from else {
        return Ok(());
    };
    let path = Path::new(init);
    if let Some(want) = &cfg.init_sha256 {
        let got = file_sha256(path).context("--init-from")?;
        if &got != want {
            bail!("--init-from {init}: SHA-256 {got} differs from the recorded {want} (the file changed)");
        }
    }
    let raw = flatmin_models::io::read_model_tensors(path, cfg.init_strip_prefix.as_deref())
        .with_context(|| format!("--init-from {init}"))?;
    model
        .load_raw(path, raw)
        .with_context(|| format!("--init-from {init}"))?;
    Ok(())
}

/// Whether a trainer being assembled loads the recipe's `--init-from` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InitFrom {
    /// Load it (a new run, or a resume with no checkpoint yet).
    Load,
    /// Skip it: a checkpoint will replace every model tensor.
    Superseded,
}

/// A run's last checkpoint, read.
struct LastCheckpoint {
    /// Its file.
    path: std::path::PathBuf,
    /// Its tensors.
    raw: Vec<RawTensor>,
    /// Its run record (`None` for checkpoints written before it existed).
    record: Option<RunRecord>,
}

impl LastCheckpoint {
    /// Reads the last checkpoint of `run`, if it has one.
    fn read(run: &RunDir) -> Result<Option<Self>> {
        let Some(path) = run.checkpoint_to_resume()? else {
            return Ok(None);
        };
        let raw = flatmin_models::io::read_safetensors(&path)?;
        let record = find_record(&path, &raw)?;
        Ok(Some(LastCheckpoint { path, raw, record }))
    }
}

/// The images the `--trace-every` records of a run with recipe `cfg` are measured on: a
/// seeded, class-balanced subset of `trace_size` images of its training subset `train` (as
/// [`training_subset`] gives it, labels as trained). `flatmin trace --trace-subset` uses it.
pub fn trace_subset(cfg: &TrainConfig, train: &Batch) -> Result<Batch> {
    let n = cfg.trace_size.min(train.len());
    let seed = derive_seed(cfg.data_seed(), TRACE_SUBSET_SEED_TAG);
    sized_subset(
        train.clone(),
        n,
        seed,
        "--trace-size",
        "the training subset",
    )
}

/// Replaces every label of `data` by one drawn uniformly from the 10 classes (seeded).
fn randomize_labels(data: &mut Batch, seed: u64) {
    let mut rng = Rng::new(derive_seed(seed, RANDOM_LABELS_SEED_TAG));
    for l in data.labels.iter_mut() {
        *l = rng.below(CLASSES as u64) as u8;
    }
}

/// An optimizer's out-of-range hyperparameter in the words of the command line: the library
/// names its field (`eta_prime`), the message names the flag (`--eta-prime`).
fn flag_names(e: anyhow::Error) -> anyhow::Error {
    match e.downcast_ref::<OptimError>() {
        Some(OptimError::Hyper { name, value, why }) => anyhow::anyhow!(
            "invalid hyperparameter --{} = {value}: {why}",
            name.replace('_', "-")
        ),
        _ => e,
    }
}

/// The optimizer of a run of `total_steps` steps. Perturbation methods draw from a seed
/// derived from `--seed`; every SGD-based one takes `--momentum`, `--nesterov` and
/// `--weight-decay` (see each optimizer's documentation for how they compose).
fn build_optimizer<T: Scalar>(
    cfg: &TrainConfig,
    total_steps: usize,
) -> Result<Box<dyn StepRule<T>>> {
    let seed = derive_seed(cfg.seed, OPTIMIZER_SEED_TAG);
    let probe = |size: Option<usize>, data: ProbeData| ProbeSpec {
        size,
        data: data.into(),
    };
    let eta_prime = |v: Option<f64>| v.map_or(EtaPrime::SameAsLr, EtaPrime::Fixed);
    let sam = |rho, variant, m: Option<usize>, sgd: SgdParams| -> Result<Box<dyn StepRule<T>>> {
        Ok(Box::new(Sam::new(
            rho,
            variant,
            m,
            sgd.momentum,
            sgd.nesterov,
            sgd.weight_decay,
        )?))
    };
    Ok(match cfg.optimizer_spec() {
        OptimizerSpec::Sgd(s) => Box::new(Sgd::new(s.momentum, s.nesterov, s.weight_decay)?),
        OptimizerSpec::AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
        } => Box::new(AdamW::new(beta1, beta2, eps, weight_decay)?),
        OptimizerSpec::Sam {
            rho,
            m_sharpness,
            sgd,
        } => sam(rho, SamVariant::Normalized, m_sharpness, sgd)?,
        OptimizerSpec::Usam {
            rho,
            m_sharpness,
            sgd,
        } => sam(rho, SamVariant::Unnormalized, m_sharpness, sgd)?,
        OptimizerSpec::Asam {
            rho,
            eta,
            m_sharpness,
            sgd,
        } => sam(rho, SamVariant::Adaptive { eta }, m_sharpness, sgd)?,
        OptimizerSpec::Sam1 {
            rho,
            probe_batch,
            probe_data,
            sgd: s,
        } => Box::new(Sam1::new(
            rho,
            probe(probe_batch.or(Some(1)), probe_data),
            s.momentum,
            s.nesterov,
            s.weight_decay,
            seed,
        )?),
        OptimizerSpec::Rps { rho, sgd: s } => {
            Box::new(Rps::new(rho, s.momentum, s.nesterov, s.weight_decay, seed)?)
        }
        OptimizerSpec::LabelNoise { p, sgd: s } => Box::new(LabelNoiseSgd::new(
            p,
            s.momentum,
            s.nesterov,
            s.weight_decay,
            seed,
        )?),
        OptimizerSpec::Rs {
            rho,
            eta_prime: ep,
            eps0,
            probe_batch,
            probe_data,
            project,
            output_iterate,
            sgd: s,
        } => Box::new(Rs::new(RsConfig {
            rho,
            eta_prime: eta_prime(ep),
            eps0,
            project,
            probe: probe(probe_batch, probe_data),
            output: output_iterate.into(),
            horizon: Some(total_steps as u64),
            momentum: s.momentum,
            nesterov: s.nesterov,
            weight_decay: s.weight_decay,
            seed,
        })?),
        OptimizerSpec::Sa {
            rho,
            eta_prime: ep,
            eps0,
            probe_batch,
            probe_data,
            project,
            output_iterate,
            t_gd,
            zero_grad_xi,
            sgd: s,
        } => {
            if t_gd >= total_steps {
                bail!("--t-gd {t_gd} leaves no perturbed steps: the run has {total_steps} steps");
            }
            Box::new(Sa::new(SaConfig {
                rho,
                eta_prime: eta_prime(ep),
                eps0,
                project,
                random_sign: true,
                probe: probe(probe_batch, probe_data),
                xi: zero_grad_xi,
                output: output_iterate.into(),
                horizon: Some((total_steps - t_gd) as u64),
                momentum: s.momentum,
                nesterov: s.nesterov,
                weight_decay: s.weight_decay,
                seed,
            })?)
        }
    })
}

impl<T: Scalar + Element> Trainer<T> {
    /// Starts a new run in `out` (which must not hold a run already).
    pub fn new(cfg: TrainConfig, data: DataSource, out: &Path) -> Result<Self> {
        Self::create(cfg, data, out, false)
    }

    /// Starts a new run in `out`; with `overwrite`, a run already there is replaced, unless
    /// another process is writing it (see [`RunDir::create`]).
    ///
    /// A setup error after the folder was locked (the model, `--init-from`, the data
    /// subsets, the optimizer, writing `config.json`) removes the folder when this call made
    /// it ([`RunDir::discard_unless_kept`]); a folder that existed before keeps what it held,
    /// and the `config.json` left in it does not block the next run (see
    /// [`RunDir::create`]).
    pub fn create(
        mut cfg: TrainConfig,
        data: DataSource,
        out: &Path,
        overwrite: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        cfg.init_sha256 = match &cfg.init_from {
            Some(p) => Some(file_sha256(Path::new(p)).context("--init-from")?),
            None => None,
        };
        let (origin, synthetic) = (data.origin.clone(), data.synthetic);
        let mut run = RunDir::create(out, &cfg, overwrite)?;
        run.discard_unless_kept();
        run.adopt_network(&mut cfg)?;
        let mut t = Self::assemble(cfg, data, run, InitFrom::Load)?;
        t.dataset = t.dataset_identity(origin, synthetic);
        let meta = RunMeta {
            flatmin_version: env!("CARGO_PKG_VERSION").into(),
            threads: rayon::current_num_threads(),
            dataset: t.dataset.clone(),
        };
        t.run.write_config(&t.cfg, &meta)?;
        t.run.keep();
        Ok(t)
    }

    /// The identity of the images this trainer holds (after subsetting and random labels),
    /// read from `origin`.
    fn dataset_identity(&self, origin: String, synthetic: bool) -> DatasetIdentity {
        DatasetIdentity {
            origin,
            synthetic,
            train_images: self.loader.records(),
            test_images: self.test.len(),
            train_sha256: batch_sha256(self.loader.data()),
            test_sha256: batch_sha256(&self.test),
        }
    }

    /// Warnings about how the run was opened, one line each, for the user: a resume from a
    /// checkpoint written before checkpoints recorded their recipe and data.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Reopens the run in `dir` at its last checkpoint (the folder's config is used). Takes
    /// the folder's lock first ([`RunDir::open_to_write`]): a folder in use by another process
    /// is refused before anything in it changes.
    ///
    /// The resume continues the recorded experiment or refuses, before anything changes:
    /// `config.json` must hold the recipe the checkpoint recorded and `data` the images it
    /// recorded ([`RunRecord`]; a checkpoint written before that record is accepted with a
    /// warning, [`Trainer::warnings`], its data compared with `config.json`'s record), and
    /// `metrics.jsonl` must reach the checkpoint's step ([`RunDir::check_records_reach`]).
    /// The step and the gradient counters come from the checkpoint.
    pub fn resume(dir: &Path, data: DataSource) -> Result<Self> {
        let run = RunDir::open_to_write(dir)?;
        let cfg = run.config()?;
        cfg.validate()
            .with_context(|| format!("{}: config.json", dir.display()))?;
        let ckpt = LastCheckpoint::read(&run)?;
        let record = ckpt.as_ref().and_then(|c| c.record.clone());
        check_recipe_against(&run, &cfg, record.as_ref())?;
        let (origin, synthetic) = (data.origin.clone(), data.synthetic);
        // A checkpoint holds every model tensor, so it supersedes `--init-from`: a moved or
        // deleted init file does not block the resume (config.json still names it).
        let init = match ckpt {
            Some(_) => InitFrom::Superseded,
            None => InitFrom::Load,
        };
        let mut t = Self::assemble(cfg, data, run, init)?;
        t.dataset = t.dataset_identity(origin, synthetic);
        match (&record, &ckpt) {
            (Some(rec), _) => t
                .dataset
                .check_against(&rec.dataset, dir, "the checkpoint")?,
            (None, ckpt) => {
                if let Some(c) = ckpt {
                    t.warnings.push(format!(
                        "{} was written by a flatmin without a record of its recipe and data: \
                         config.json is not checked against it",
                        c.path.display()
                    ));
                }
                if let Some(recorded) = t.run.recorded_dataset() {
                    t.dataset.check_against(&recorded, dir, "config.json")?;
                }
            }
        }
        let counters = match ckpt {
            Some(c) => t.load_checkpoint(&c.path, c.raw)?,
            None => None,
        };
        // Checked on what the truncation keeps, before anything is rewritten.
        let kept = t.run.kept_records(t.step)?;
        t.run
            .check_records_reach(&kept, t.step, counters.as_ref())?;
        t.run.truncate_metrics(t.step)?;
        t.best = BestModel::of_records(&kept);
        let c = counters.unwrap_or_else(|| Counters::from_records(&kept));
        (t.grad_queries, t.grad_samples, t.records) = (c.grad_queries, c.grad_samples, c.records);
        Ok(t)
    }

    /// Appends `rec` to the metrics files and counts it.
    fn append(&mut self, rec: &Record) -> Result<()> {
        self.run.append(rec)?;
        self.records += 1;
        Ok(())
    }

    fn assemble(cfg: TrainConfig, data: DataSource, run: RunDir, init: InitFrom) -> Result<Self> {
        let train = training_subset(&cfg, data.train)?;
        let trace_set = if cfg.trace_every > 0 {
            let b = trace_subset(&cfg, &train)?;
            (0..b.len())
                .step_by(TRACE_BATCH)
                .map(|start| {
                    let end = (start + TRACE_BATCH).min(b.len());
                    let pixels = b.pixels[start * 3072..end * 3072].to_vec();
                    let x = Tensor::from_vec(&[end - start, 3, 32, 32], T::from_pixels(pixels))?;
                    let labels = b.labels[start..end].iter().map(|&l| l as usize).collect();
                    Ok((x, labels))
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let test = sized_subset(
            data.test,
            cfg.test_size,
            cfg.data_seed() ^ 0x7e57,
            "--test-size",
            "the test split",
        )?;
        let augment = if cfg.augment {
            Augment::standard()
        } else {
            Augment::none()
        };
        let train = Arc::new(train);
        let loader = Loader::new(
            Arc::clone(&train),
            cfg.batch_size,
            true,
            false,
            augment,
            cfg.seed,
        )
        .context("--batch-size")?;
        let mut model = crate::cifar_model::<T>(&cfg.model, cfg.seed)?;
        model.set_loss_fn(cfg.loss.engine());
        if init == InitFrom::Load {
            load_init_from(&cfg, &mut model)?;
        }
        let params = model.params_cloned();
        let bpe = loader.batches_per_epoch();
        // Epoch counts from flags or a config file become step counts; one too large to
        // count in steps is an error naming the flag, not an overflow.
        let steps = |flag: &str, epochs: usize| {
            epochs.checked_mul(bpe).with_context(|| {
                format!("{flag} {epochs}: too large ({epochs} epochs of {bpe} steps overflow the step count)")
            })
        };
        let total = steps("--epochs", cfg.epochs)?;
        let opt = build_optimizer(&cfg, total).map_err(flag_names)?;
        let kind = match cfg.schedule {
            Schedule::Constant => flatmin_optim::Schedule::Constant,
            Schedule::Cosine => flatmin_optim::Schedule::Cosine,
            Schedule::Step => flatmin_optim::Schedule::Step {
                every: steps("--step-every", cfg.step_every)?,
                gamma: cfg.step_gamma,
            },
        };
        let sched = LrSchedule::new(cfg.lr, kind, steps("--warmup", cfg.warmup)?, total)
            .map_err(|e| flag_names(e.into()))?;
        Ok(Trainer {
            cfg,
            model,
            params,
            opt,
            sched,
            loader,
            train,
            test,
            run,
            step: 0,
            epoch_sums: (0.0, 0, 0),
            grad_queries: 0,
            grad_samples: 0,
            records: 0,
            trace_set,
            dataset: DatasetIdentity::default(),
            warnings: Vec::new(),
            best: None,
        })
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Optimizer steps completed so far.
    pub fn step(&self) -> usize {
        self.step
    }

    /// Steps per epoch.
    pub fn steps_per_epoch(&self) -> usize {
        self.loader.batches_per_epoch()
    }

    /// The model with the current parameters.
    pub fn model(&mut self) -> &Model<T> {
        self.sync_model();
        &self.model
    }

    /// The run folder.
    pub fn run_dir(&self) -> &RunDir {
        &self.run
    }

    fn sync_model(&mut self) {
        self.model
            .set_params(self.params.clone())
            .expect("parameters keep the model's shapes");
    }

    /// Trains to the configured number of epochs (from wherever the run stands).
    pub fn run(&mut self, obs: &mut dyn Observer) -> Result<()> {
        self.run_until(obs, &|_| false).map(|_| ())
    }

    /// Like [`Trainer::run`], but after each step asks `stop(step)`; when it says yes, writes
    /// a checkpoint at that step (resumable mid-epoch) and returns `Stopped`.
    pub fn run_until(
        &mut self,
        obs: &mut dyn Observer,
        stop: &dyn Fn(usize) -> bool,
    ) -> Result<Outcome> {
        let bpe = self.loader.batches_per_epoch();
        let total = self.cfg.epochs * bpe;
        obs.on_start(self.step, total, bpe);
        let started = Instant::now();
        // A run resumed at its end may have stopped between its last checkpoint and its final
        // files (a kill, a full disk): they are written again from the checkpoint below.
        let already_done = self.step >= total;
        if self.cfg.trace_every > 0 && self.step == 0 {
            let logged = self.run.records()?.iter().any(|r| r.kind == "trace");
            if !logged {
                self.log_trace(1, &started)?;
            }
        }
        while self.step < total {
            // The loader's epoch index counts from 0; records and messages count from 1.
            let index = self.step / bpe;
            let epoch = index + 1;
            let batches = self.loader.epoch_from::<T>(index, self.step % bpe);
            for mb in batches {
                self.step_on(obs, mb, (epoch, total), &started)?;
                // A step that ends the epoch stops only after the epoch's evaluation and
                // checkpoint (below), so a resumed run never skips them.
                if !self.step.is_multiple_of(bpe) && stop(self.step) {
                    let path = self.checkpoint(None)?;
                    obs.on_checkpoint(&path);
                    return Ok(Outcome::Stopped { step: self.step });
                }
            }
            self.end_epoch(obs, epoch, &started)?;
            let keep =
                self.cfg.checkpoint_every > 0 && epoch.is_multiple_of(self.cfg.checkpoint_every);
            let path = self.checkpoint(keep.then_some(epoch))?;
            obs.on_checkpoint(&path);
            if self.step < total && stop(self.step) {
                return Ok(Outcome::Stopped { step: self.step });
            }
        }
        if already_done {
            self.sync_model();
            self.run.write_model(&self.model)?;
        }
        self.write_summary()?;
        Ok(Outcome::Finished)
    }

    /// One optimizer step on `mb` in `epoch` (of `total` steps): its record, and a trace
    /// record every `--trace-every` steps. A non-finite step under `--on-nonfinite
    /// skip-step` consumes the batch and leaves parameters and optimizer state as they were;
    /// otherwise a non-finite loss, gradient or parameter stops the run with an error.
    fn step_on(
        &mut self,
        obs: &mut dyn Observer,
        mb: MiniBatch<T>,
        (epoch, total): (usize, usize),
        started: &Instant,
    ) -> Result<()> {
        let t0 = Instant::now();
        let n = mb.len();
        let x = Tensor::from_vec(&mb.shape(), mb.x)?;
        let lr = self.sched.at(self.step);
        let (info, correct, samples) = match self.train_step(&x, &mb.labels, lr) {
            Ok(r) => r,
            Err(e) => match e.downcast_ref::<OptimError>() {
                Some(OptimError::NonFinite(what))
                    if self.cfg.on_nonfinite == NonFinitePolicy::SkipStep =>
                {
                    // The batch is consumed; parameters and optimizer state stay.
                    self.step += 1;
                    let mut rec = Record::skipped(
                        epoch,
                        self.step,
                        lr,
                        what,
                        started.elapsed().as_secs_f64(),
                    );
                    rec.extra.insert("skipped".into(), 1.0);
                    self.append(&rec)?;
                    obs.on_step(&rec);
                    return Ok(());
                }
                Some(OptimError::NonFinite(what)) => {
                    let kept = kept_checkpoint(self.run.last_checkpoint());
                    bail!(
                        "training diverged: non-finite {what} at step {} (epoch {}); stopped, {kept}; lower --lr or use --on-nonfinite skip-step",
                        self.step + 1,
                        epoch
                    );
                }
                _ => return Err(e),
            },
        };
        if let Some(i) = self.params.iter().position(|p| !p.all_finite()) {
            bail!(
                "training diverged: parameter '{}' became non-finite at step {} (epoch {}); stopped, {}; lower --lr",
                self.model.param_names()[i],
                self.step + 1,
                epoch,
                kept_checkpoint(self.run.last_checkpoint())
            );
        }
        self.step += 1;
        self.grad_queries += info.grad_evals as u64;
        self.grad_samples += samples as u64;
        let s = &mut self.epoch_sums;
        s.0 += info.loss * n as f64;
        s.1 += correct as u64;
        s.2 += n as u64;
        let rec = Record::train(
            epoch,
            self.step,
            lr,
            &info,
            correct as f64 / n as f64,
            n as f64 / t0.elapsed().as_secs_f64(),
            started.elapsed().as_secs_f64(),
        )
        .with_grad_counts(self.grad_queries, self.grad_samples);
        self.append(&rec)?;
        obs.on_step(&rec);
        let every = self.cfg.trace_every;
        if every > 0 && (self.step.is_multiple_of(every) || self.step == total) {
            self.log_trace(epoch, started)?;
        }
        Ok(())
    }

    /// The end of `epoch`'s steps: on evaluation epochs, the test and training evaluation and
    /// its record (and the best checkpoint); then the epoch's running sums start again.
    fn end_epoch(&mut self, obs: &mut dyn Observer, epoch: usize, started: &Instant) -> Result<()> {
        if epoch.is_multiple_of(self.cfg.eval_every) || epoch == self.cfg.epochs {
            let (test_loss, test_acc) = self.evaluate_test()?;
            let (train_loss, train_acc) = self.evaluate_train()?;
            let s = self.epoch_sums;
            let rec = Record::eval(
                epoch,
                self.step,
                (train_loss, train_acc),
                (s.0 / s.2.max(1) as f64, s.1 as f64 / s.2.max(1) as f64),
                (test_loss, test_acc),
                started.elapsed().as_secs_f64(),
            )
            .with_grad_counts(self.grad_queries, self.grad_samples);
            self.append(&rec)?;
            self.keep_if_best(&rec)?;
            obs.on_eval(&rec);
        }
        self.epoch_sums = (0.0, 0, 0);
        Ok(())
    }

    /// Measures the Hessian trace of the mean cross-entropy on the trace subset at the
    /// current parameters (BatchNorm in eval mode) and appends a `trace` record: exact by
    /// structure when it applies, else a Hutchinson estimate with a fixed number of probes
    /// (seeded by the run's seed and the step). Changes no training state.
    fn log_trace(&mut self, epoch: usize, started: &Instant) -> Result<()> {
        use flatmin_models::measure::{self, MeasureError, TraceMethod as Measure, TraceOptions};
        self.sync_model();
        let opts = TraceOptions {
            method: match self.cfg.trace_method {
                TraceMethod::Auto => Measure::Auto,
                TraceMethod::Structural => Measure::Structural,
                TraceMethod::Hutchinson => Measure::Hutchinson,
            },
            bn: BnUse::Eval,
            seed: derive_seed(self.cfg.seed, TRACE_SUBSET_SEED_TAG ^ self.step as u64),
            probes: Some(self.cfg.trace_probes),
            chunk_size: TRACE_BATCH,
            directions: Some(8),
            // Where the structural trace does not apply: Hutchinson, never d basis HVPs.
            basis_max_dim: 0,
            ..TraceOptions::default()
        };
        let r = match measure::trace(&self.model, &self.trace_set, &opts) {
            Ok(r) => r,
            Err(ModelError::Measure(MeasureError::NotStructural { reason })) => bail!(
                "--trace-method structural does not apply to {}: {reason}",
                self.cfg.model
            ),
            Err(e) => return Err(e).context("--trace-every"),
        };
        let d = self.model.num_params();
        let mut extra = std::collections::BTreeMap::new();
        let trace = r.trace.context("--trace-every: no trace was measured")?;
        let method = if r.method_used == Measure::Structural {
            extra.extend(r.loss.map(|l| ("trace_loss".to_string(), l)));
            "structural"
        } else {
            extra.extend(r.std_error.map(|e| ("trace_std_error".to_string(), e)));
            extra.extend(r.probes.map(|p| ("trace_probes".to_string(), p as f64)));
            "hutchinson"
        };
        extra.insert("trace".to_string(), trace);
        extra.insert("trace_norm".to_string(), trace / d.max(1) as f64);
        extra.insert(
            "trace_images".to_string(),
            self.trace_set.iter().map(|b| b.1.len()).sum::<usize>() as f64,
        );
        let rec = Record {
            kind: "trace".into(),
            epoch,
            step: self.step,
            grad_queries: Some(self.grad_queries),
            grad_samples: Some(self.grad_samples),
            method: Some(method.into()),
            bn_mode: Some(opts.bn.name().into()),
            loss_fn: Some(self.cfg.loss.name().into()),
            wall_s: started.elapsed().as_secs_f64(),
            extra,
            ..Default::default()
        };
        self.append(&rec)
    }

    /// Writes `summary.json`: steps, the last evaluation, the best test accuracy.
    fn write_summary(&self) -> Result<()> {
        let recs = self.run.records()?;
        let evals: Vec<&Record> = recs.iter().filter(|r| r.kind == "eval").collect();
        let best = BestModel::of_records(evals.iter().copied());
        let summary = serde_json::json!({
            "model": self.cfg.model,
            "optimizer": self.cfg.optimizer,
            "seed": self.cfg.seed,
            "epochs": self.cfg.epochs,
            "steps": self.step,
            "parameters": self.model.num_params(),
            "final": evals.last(),
            "best_test_acc": best.map(|b| b.test_acc),
            "best_epoch": best.map(|b| b.epoch),
            "best_step": best.map(|b| b.step),
            "train_wall_s_last_process": recs.last().map(|r| r.wall_s),
            "grad_queries": self.grad_queries,
            "grad_samples": self.grad_samples,
            "final_trace_norm": recs.iter().rev().find(|r| r.kind == "trace").and_then(|r| r.extra.get("trace_norm")),
            "trace_method": recs.iter().rev().find(|r| r.kind == "trace").and_then(|r| r.method.clone()),
        });
        self.run.write_summary(&summary)
    }

    /// One optimizer step on one batch; returns the step info, the number of correct
    /// predictions at the pre-step parameters and the samples its gradient evaluations used
    /// (the sum of the batch sizes of all of them).
    ///
    /// BatchNorm rule: the first gradient evaluation of a step (on the step's batch, at the
    /// current parameters) normalizes with batch statistics and updates the running
    /// statistics; any further evaluation in the same step (at a perturbed point, on a
    /// sub-batch or a fresh batch) uses its own batch statistics and leaves the running
    /// statistics alone. See [`StepOracle`].
    fn train_step(
        &mut self,
        x: &Tensor<T>,
        labels: &[usize],
        lr: f64,
    ) -> Result<(flatmin_optim::StepInfo, usize, usize)> {
        let mut oracle = StepOracle {
            model: &mut self.model,
            x,
            labels,
            loader: &self.loader,
            fresh_seed: derive_seed(self.cfg.seed, FRESH_BATCH_SEED_TAG),
            step: self.step,
            calls: 0,
            correct: 0,
            samples: 0,
            fresh: None,
        };
        let info = self.opt.step(&mut self.params, &mut oracle, lr)?;
        Ok((info, oracle.correct, oracle.samples))
    }

    /// After the evaluation `rec`: when it beats the best so far, writes the model (synced by
    /// the evaluation) to `best.safetensors`, atomically, and remembers it.
    fn keep_if_best(&mut self, rec: &Record) -> Result<()> {
        let best = BestModel::improve(self.best, rec);
        if best != self.best {
            self.run.write_best(&self.model)?;
            self.best = best;
        }
        Ok(())
    }

    /// The evaluation whose model `best.safetensors` holds, if any yet.
    pub fn best(&self) -> Option<BestModel> {
        self.best
    }

    /// Mean loss and accuracy on the test subset (BatchNorm in eval mode).
    pub fn evaluate_test(&mut self) -> Result<(f64, f64)> {
        self.sync_model();
        evaluate(&self.model, &self.test)
    }

    /// Mean loss and accuracy on the training subset as trained on (labels as trained,
    /// no augmentation, BatchNorm in eval mode): what `flatmin eval --split train` gives.
    pub fn evaluate_train(&mut self) -> Result<(f64, f64)> {
        self.sync_model();
        evaluate(&self.model, &self.train)
    }

    /// Writes the checkpoint (atomically) and the plain model state; with `keep = Some(e)`
    /// also a numbered copy for epoch `e`. Returns the checkpoint path.
    pub fn checkpoint(&mut self, keep: Option<usize>) -> Result<std::path::PathBuf> {
        self.sync_model();
        let mut raw = self.model.to_raw();
        for (name, t) in self.opt.state() {
            raw.push(RawTensor {
                name: format!("optimizer/{name}"),
                shape: t.shape().to_vec(),
                data: float_raw(&t),
            });
        }
        let scalar_i64 = |name: &str, v: u64| RawTensor {
            name: format!("trainer/{name}"),
            shape: vec![],
            data: RawData::I64(vec![v as i64]),
        };
        raw.push(scalar_i64("step", self.step as u64));
        raw.push(scalar_i64("grad_queries", self.grad_queries));
        raw.push(scalar_i64("grad_samples", self.grad_samples));
        raw.push(scalar_i64("records", self.records));
        raw.push(RunRecord::new(self.run.recipe(&self.cfg)?, self.dataset.clone()).to_tensor()?);
        raw.push(scalar_i64("epoch_correct", self.epoch_sums.1));
        raw.push(scalar_i64("epoch_seen", self.epoch_sums.2));
        raw.push(RawTensor {
            name: "trainer/epoch_loss_sum".into(),
            shape: vec![],
            data: RawData::F64(vec![self.epoch_sums.0]),
        });
        let path = self.run.write_checkpoint(&raw, keep)?;
        self.run.write_model(&self.model)?;
        Ok(path)
    }

    /// Loads the checkpoint `path` (its tensors `raw`): model, optimizer and trainer state.
    /// Returns its counters, `None` for a checkpoint written before it held them.
    fn load_checkpoint(&mut self, path: &Path, raw: Vec<RawTensor>) -> Result<Option<Counters>> {
        let (mut model_part, mut opt_part, mut trainer_part) = (Vec::new(), Vec::new(), Vec::new());
        for t in raw {
            if let Some(n) = t.name.strip_prefix("optimizer/") {
                let v = t.data.to_f64().with_context(|| {
                    format!("{}: optimizer tensor '{n}' is not float", path.display())
                })?;
                opt_part.push((
                    n.to_string(),
                    Tensor::from_vec(&t.shape, v.into_iter().map(T::c).collect())?,
                ));
            } else if t.name.starts_with("trainer/") {
                trainer_part.push(t);
            } else {
                model_part.push(t);
            }
        }
        self.model.load_raw(path, model_part)?;
        self.params = self.model.params_cloned();
        check_per_param_state(path, &opt_part, &self.params)?;
        self.opt
            .load_state(opt_part)
            .with_context(|| format!("{}: optimizer state", path.display()))?;
        let get = |name: &str| -> Result<&RawData> {
            trainer_part
                .iter()
                .find(|t| t.name == format!("trainer/{name}"))
                .map(|t| &t.data)
                .with_context(|| format!("{}: missing tensor 'trainer/{name}'", path.display()))
        };
        let int = |name: &str| -> Result<u64> {
            match get(name)? {
                RawData::I64(v) if v.len() == 1 && v[0] >= 0 => Ok(v[0] as u64),
                _ => bail!(
                    "{}: tensor 'trainer/{name}' is not a non-negative int64 scalar",
                    path.display()
                ),
            }
        };
        self.step = int("step")? as usize;
        let loss_sum = match get("epoch_loss_sum")? {
            RawData::F64(v) if v.len() == 1 => v[0],
            _ => bail!(
                "{}: tensor 'trainer/epoch_loss_sum' is not an f64 scalar",
                path.display()
            ),
        };
        self.epoch_sums = (loss_sum, int("epoch_correct")?, int("epoch_seen")?);
        let held = |name: &str| {
            trainer_part
                .iter()
                .any(|t| t.name == format!("trainer/{name}"))
        };
        if !Counters::NAMES.iter().any(|n| held(n)) {
            return Ok(None);
        }
        Ok(Some(Counters {
            grad_queries: int("grad_queries")?,
            grad_samples: int("grad_samples")?,
            records: int("records")?,
        }))
    }
}

/// The running counts of a run a checkpoint holds (as `trainer/NAME` int64 scalars).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters {
    /// Gradient evaluations so far.
    pub grad_queries: u64,
    /// Per-sample gradient evaluations so far.
    pub grad_samples: u64,
    /// Records appended to `metrics.jsonl` so far.
    pub records: u64,
}

impl Counters {
    /// The names of the counters' checkpoint tensors (after `trainer/`).
    const NAMES: [&'static str; 3] = ["grad_queries", "grad_samples", "records"];

    /// The counters of a checkpoint written before it held them, from the metrics records
    /// kept up to it: the queries summed over the steps, the samples from the last running
    /// count (zero for folders written before it existed).
    fn from_records(records: &[Record]) -> Self {
        Counters {
            grad_queries: records
                .iter()
                .filter(|r| r.kind == "train")
                .filter_map(|r| r.grad_evals)
                .map(|g| g as u64)
                .sum(),
            grad_samples: records
                .iter()
                .filter_map(|r| r.grad_samples)
                .max()
                .unwrap_or(0),
            records: records.len() as u64,
        }
    }
}

/// Checks the optimizer state of a checkpoint that is kept per parameter (entries
/// `NAME.0`, `NAME.1`, ...: momentum, moments, kept iterates): one tensor per parameter, each
/// of its parameter's shape. The optimizers cannot check this themselves (they do not see
/// the parameters), and a mismatch would update only some parameters or fail inside a step.
fn check_per_param_state<T: Scalar>(
    path: &Path,
    state: &[(String, Tensor<T>)],
    params: &[Tensor<T>],
) -> Result<()> {
    let mut lists: std::collections::BTreeMap<&str, Vec<(usize, &Tensor<T>)>> =
        std::collections::BTreeMap::new();
    for (name, t) in state {
        if let Some((list, index)) = name.rsplit_once('.') {
            if !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()) {
                let i = index.parse().unwrap_or(usize::MAX);
                lists.entry(list).or_default().push((i, t));
            }
        }
    }
    for (list, mut items) in lists {
        items.sort_by_key(|(i, _)| *i);
        if items.len() != params.len() || items.iter().enumerate().any(|(k, (i, _))| k != *i) {
            bail!(
                "{}: optimizer state '{list}' holds {} tensors, not one for each of the model's {} parameters",
                path.display(),
                items.len(),
                params.len()
            );
        }
        for ((i, t), p) in items.iter().zip(params) {
            if t.shape() != p.shape() {
                bail!(
                    "{}: optimizer tensor '{list}.{i}' has shape {}, its parameter {}",
                    path.display(),
                    flatmin_models::error::brief_shape(t.shape()),
                    flatmin_models::error::brief_shape(p.shape())
                );
            }
        }
    }
    Ok(())
}

/// The gradient oracle of one training step: mean cross-entropy and gradient of the model at
/// given parameters, on
/// - the step's batch ([`Oracle::eval`]);
/// - rows of it ([`Probe::SubBatch`]: SA's single-sample gradient, probe batches, m-sharpness);
/// - a fresh batch ([`Probe::Fresh`]): batch `step` of an endless sequence of epochs drawn
///   from the training set by a second loader (shuffled with a seed derived from `--seed`,
///   same augmentation, full batches of the requested size), so it depends only on the seed,
///   the step and the size, and a resumed run sees the same fresh batches;
/// - the step's batch with noisy labels ([`Oracle::eval_noisy`], classification form via
///   [`corrupt_labels`] over the 10 classes).
///
/// The first evaluation of the step must be on the step's batch (plain or noisy labels):
/// it updates the BatchNorm running statistics and counts correct predictions (against
/// the true labels); later evaluations do neither.
struct StepOracle<'a, T: Scalar + Element> {
    model: &'a mut Model<T>,
    x: &'a Tensor<T>,
    labels: &'a [usize],
    loader: &'a Loader,
    fresh_seed: u64,
    step: usize,
    calls: usize,
    correct: usize,
    /// Samples of all successful evaluations of the step (sum of their batch sizes).
    samples: usize,
    /// The step's fresh batch, once drawn: size, images, labels.
    fresh: Option<(usize, Tensor<T>, Vec<usize>)>,
}

/// Number of classes of the models' heads (CIFAR-10).
const CLASSES: usize = 10;

impl<T: Scalar + Element> StepOracle<'_, T> {
    /// Evaluates at `p` on images `x` with `labels`; `step_batch` says whether this is the
    /// step's batch (the only place a first evaluation may happen).
    fn run(
        &mut self,
        p: &[Tensor<T>],
        x: &Tensor<T>,
        labels: &[usize],
        step_batch: bool,
    ) -> flatmin_optim::Result<(T, Vec<Tensor<T>>)> {
        let first = self.calls == 0;
        if first && !step_batch {
            return Err(OptimError::Oracle(
                "the first evaluation of a step must be on the step's batch (BatchNorm rule)"
                    .into(),
            ));
        }
        let refs: Vec<&Tensor<T>> = p.iter().collect();
        let e = self
            .model
            .evaluate_at(&refs, x, labels, &[], BnUse::Train, true)
            .map_err(|e| OptimError::Oracle(e.to_string()))?;
        // Divergence is reported before anything changes (running statistics, parameters,
        // optimizer state), so a step can be skipped cleanly.
        if !e.loss.is_finite() {
            return Err(OptimError::NonFinite("loss".into()));
        }
        if let Some(i) = e.grads.iter().position(|g| !g.all_finite()) {
            let name = self.model.param_names()[i].to_string();
            return Err(OptimError::NonFinite(format!("gradient of '{name}'")));
        }
        if first {
            self.model.update_running_stats(&e.bn_stats);
            self.correct = count_correct(&e.logits, self.labels);
        }
        self.calls += 1;
        self.samples += labels.len();
        Ok((e.loss, e.grads))
    }

    /// Rows `indices` of the step's batch.
    fn gather(&self, indices: &[usize]) -> flatmin_optim::Result<(Tensor<T>, Vec<usize>)> {
        let n = self.labels.len();
        if indices.is_empty() || indices.iter().any(|&i| i >= n) {
            return Err(OptimError::Oracle(format!(
                "sub-batch positions out of range for a batch of {n}"
            )));
        }
        let row = self.x.numel() / n;
        let mut data = Vec::with_capacity(indices.len() * row);
        for &i in indices {
            data.extend_from_slice(&self.x.data()[i * row..(i + 1) * row]);
        }
        let mut shape = self.x.shape().to_vec();
        shape[0] = indices.len();
        let x = Tensor::from_vec(&shape, data).map_err(|e| OptimError::Oracle(e.to_string()))?;
        Ok((x, indices.iter().map(|&i| self.labels[i]).collect()))
    }

    /// The step's fresh batch of `size` images (drawn once per step and size).
    fn fresh_batch(&mut self, size: usize) -> flatmin_optim::Result<(Tensor<T>, Vec<usize>)> {
        if let Some((s, x, l)) = &self.fresh {
            if *s == size {
                return Ok((x.clone(), l.clone()));
            }
        }
        let records = self.loader.records();
        let loader = Loader::new(
            self.loader.data().clone(),
            size,
            true,
            true,
            self.loader.augment(),
            self.fresh_seed,
        )
        .map_err(|_| {
            OptimError::Oracle(format!(
                "--probe-batch {size}: a fresh batch needs at most the {records} training images"
            ))
        })?;
        let bpe = loader.batches_per_epoch();
        let mb = loader
            .batch::<T>(self.step / bpe, self.step % bpe)
            .ok_or_else(|| OptimError::Oracle("fresh batch out of range".into()))?;
        let x =
            Tensor::from_vec(&mb.shape(), mb.x).map_err(|e| OptimError::Oracle(e.to_string()))?;
        self.fresh = Some((size, x.clone(), mb.labels.clone()));
        Ok((x, mb.labels))
    }
}

impl<T: Scalar + Element> Oracle<T> for StepOracle<'_, T> {
    fn eval(&mut self, p: &[Tensor<T>]) -> flatmin_optim::Result<(T, Vec<Tensor<T>>)> {
        let (x, labels) = (self.x, self.labels);
        self.run(p, x, labels, true)
    }

    fn eval_on(
        &mut self,
        p: &[Tensor<T>],
        probe: &Probe,
    ) -> flatmin_optim::Result<(T, Vec<Tensor<T>>)> {
        match probe {
            Probe::Batch => self.eval(p),
            Probe::SubBatch { indices } => {
                let (x, labels) = self.gather(indices)?;
                self.run(p, &x, &labels, false)
            }
            Probe::Fresh { size } => {
                let (x, labels) = self.fresh_batch(*size)?;
                self.run(p, &x, &labels, false)
            }
        }
    }

    fn eval_noisy(
        &mut self,
        p: &[Tensor<T>],
        noise: &LabelNoise,
    ) -> flatmin_optim::Result<(T, Vec<Tensor<T>>)> {
        let (noisy, _) = corrupt_labels(self.labels, CLASSES, noise);
        let x = self.x;
        self.run(p, x, &noisy, true)
    }

    fn batch_len(&self) -> Option<usize> {
        Some(self.labels.len())
    }
}

/// Number of rows whose arg-max logit is the label.
pub fn count_correct<T: Scalar>(logits: &Tensor<T>, labels: &[usize]) -> usize {
    let c = logits.shape()[1];
    logits
        .data()
        .chunks(c)
        .zip(labels)
        .filter(|(row, &l)| {
            let mut best = 0;
            for (i, v) in row.iter().enumerate() {
                if *v > row[best] {
                    best = i;
                }
            }
            best == l
        })
        .count()
}

/// Mean loss (the model's objective) and accuracy of `model` on `data` (BatchNorm in eval
/// mode), [`EVAL_BATCH`] images per forward pass.
pub fn evaluate<T: Scalar + Element>(model: &Model<T>, data: &Batch) -> Result<(f64, f64)> {
    evaluate_in_chunks(model, data, BnUse::Eval, EVAL_BATCH)
}

/// Mean loss (the model's objective) and accuracy of `model` on `data`, `chunk` images per
/// forward pass, BatchNorm as `bn` says (with [`BnUse::Train`], on each chunk's own
/// statistics, so the chunk size is part of the result).
pub fn evaluate_in_chunks<T: Scalar + Element>(
    model: &Model<T>,
    data: &Batch,
    bn: BnUse,
    chunk: usize,
) -> Result<(f64, f64)> {
    let (mut loss, mut correct) = (0.0, 0usize);
    for start in (0..data.len()).step_by(chunk) {
        let end = (start + chunk).min(data.len());
        let pixels = data.pixels[start * 3072..end * 3072].to_vec();
        let x = Tensor::from_vec(&[end - start, 3, 32, 32], T::from_pixels(pixels))?;
        let labels: Vec<usize> = data.labels[start..end]
            .iter()
            .map(|&l| usize::from(l))
            .collect();
        let e = model.evaluate(&x, &labels, &[], bn, false)?;
        loss += e.loss.to_f64().unwrap_or(f64::NAN) * (end - start) as f64;
        correct += count_correct(&e.logits, &labels);
    }
    let n = data.len().max(1) as f64;
    Ok((loss / n, correct as f64 / n))
}

/// What a divergence leaves behind, for its message: the last checkpoint when one exists
/// (it is kept), else that none was written (the run has nothing to resume from).
fn kept_checkpoint(last: Option<std::path::PathBuf>) -> String {
    match last {
        Some(p) => format!("the last good checkpoint {} is kept", p.display()),
        None => "no checkpoint was written yet, so there is nothing to resume from".into(),
    }
}

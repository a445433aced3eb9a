//! The run folder: `config.json`, `metrics.jsonl` and `metrics.csv` (one record per step and
//! per evaluation), `checkpoints/last.safetensors` (model, optimizer and trainer state, for
//! resuming), numbered checkpoints, and `model.safetensors` (the plain state_dict, loadable
//! by PyTorch), and `.lock`, the advisory lock of the process that writes the folder (see
//! [`RunLock`]).

use super::config::{Optimizer, TrainConfig};
use super::lock::{RunLock, LOCK_FILE};
use anyhow::{bail, Context, Result};
use flatmin_engine::fsread::{read_regular_file, read_regular_to_string};
use flatmin_engine::Scalar;
use flatmin_models::io::{write_atomic, write_safetensors, RawTensor};
use flatmin_models::netfile::is_network_file;
use flatmin_models::Model;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Largest run configuration read (`config.json`, `--config`), in bytes.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Largest metrics file read (`metrics.jsonl`, `metrics.csv`), in bytes.
pub const MAX_METRICS_BYTES: u64 = 4 << 30;

/// One line of `metrics.jsonl` (and one row of `metrics.csv`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// `train` (one optimizer step), `eval` (end-of-epoch evaluation), `trace` (Hessian
    /// trace on the trace subset, with `--trace-every`) or `skip` (a non-finite step skipped).
    pub kind: String,
    /// Epoch, counted from 1 as on screen (the step-0 trace belongs to epoch 1). Files
    /// written before flatmin numbered epochs from 1 are renumbered when read
    /// ([`renumber_epochs_from_one`]).
    pub epoch: usize,
    /// Optimizer steps completed.
    pub step: usize,
    /// Learning rate of the step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Mini-batch loss before the step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Mini-batch accuracy before the step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc: Option<f64>,
    /// Gradient norm at the current parameters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Gradient evaluations the step used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_evals: Option<usize>,
    /// Gradient evaluations of the run so far, cumulative (train, eval and trace records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_queries: Option<u64>,
    /// Per-sample gradient evaluations of the run so far, cumulative (train, eval and trace
    /// records): each gradient query counts the samples of the batch it used, so a B = 1
    /// probe counts 1 and a 128-image minibatch gradient counts 128.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_samples: Option<u64>,
    /// How a `trace` record's Hessian trace was measured (`structural` or `hutchinson`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The BatchNorm mode of a `trace` record's measured loss (`eval`: running statistics).
    /// In `metrics.jsonl` only (not a CSV column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bn_mode: Option<String>,
    /// The objective of a `trace` record's measured loss (`ce` or `mse`, the run's
    /// `--loss`). In `metrics.jsonl` only (not a CSV column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_fn: Option<String>,
    /// Mean loss on the training subset, by evaluation at the end of the epoch (labels as
    /// trained, no augmentation, BatchNorm in eval mode: as `flatmin eval --split train`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    /// Accuracy on the training subset, by evaluation (as `train_loss`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_acc: Option<f64>,
    /// Running mean of the epoch's minibatch losses (augmented batches, parameters changing
    /// during the epoch, BatchNorm on batch statistics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_loss_running: Option<f64>,
    /// Running accuracy over the epoch's minibatches (as `train_loss_running`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_acc_running: Option<f64>,
    /// Test loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_loss: Option<f64>,
    /// Test accuracy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_acc: Option<f64>,
    /// Training throughput of the step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub images_per_s: Option<f64>,
    /// Seconds since this process started training (not part of reproducibility).
    pub wall_s: f64,
    /// Optimizer-specific figures (perturbation norm, gate hits, ...).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub extra: std::collections::BTreeMap<String, f64>,
}

/// The first columns of `metrics.csv`, the same for every run. `trace`, `trace_norm` and
/// `trace_std_error` are the `extra` figures of `trace` records (`trace_std_error` only with
/// `--trace-method hutchinson`); `epoch` counts from 1, as on screen and in `metrics.jsonl`.
/// The optimizer's own figures follow ([`csv_columns`]).
pub const CSV_HEADER: &str = "kind,epoch,step,lr,loss,acc,grad_norm,grad_evals,train_loss,train_acc,test_loss,test_acc,images_per_s,wall_s,grad_queries,method,trace,trace_norm,trace_std_error,grad_samples,train_loss_running,train_acc_running";

/// Every column of a run's `metrics.csv`: [`CSV_HEADER`], then the per-step figures of the
/// run's optimizer ([`Optimizer::step_figures`]), fixed for the run by its `config.json`.
pub fn csv_columns(optimizer: Optimizer) -> Vec<&'static str> {
    CSV_HEADER
        .split(',')
        .chain(optimizer.step_figures().iter().copied())
        .collect()
}

/// One CSV line (with its newline) of `fields`, quoted where a field needs it.
fn csv_line<S: AsRef<[u8]>>(fields: impl IntoIterator<Item = S>) -> String {
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    // Writing to memory cannot fail; the bytes in are UTF-8, and so are the bytes out.
    let _ = w.write_record(fields);
    let bytes = w.into_inner().unwrap_or_default();
    String::from_utf8(bytes).unwrap_or_default()
}

impl Record {
    /// A training-step record.
    pub fn train(
        epoch: usize,
        step: usize,
        lr: f64,
        info: &flatmin_optim::StepInfo,
        acc: f64,
        images_per_s: f64,
        wall_s: f64,
    ) -> Self {
        Record {
            kind: "train".into(),
            epoch,
            step,
            lr: Some(lr),
            loss: Some(info.loss),
            acc: Some(acc),
            grad_norm: Some(info.grad_norm),
            grad_evals: Some(info.grad_evals),
            images_per_s: Some(images_per_s),
            wall_s,
            extra: info.extra.iter().cloned().collect(),
            ..Default::default()
        }
    }

    /// The record with the run's cumulative gradient queries `q` and per-sample gradient
    /// evaluations `s` set.
    pub fn with_grad_counts(mut self, q: u64, s: u64) -> Self {
        self.grad_queries = Some(q);
        self.grad_samples = Some(s);
        self
    }

    /// A step skipped because its loss or gradient was not finite (`what` names it).
    pub fn skipped(epoch: usize, step: usize, lr: f64, what: &str, wall_s: f64) -> Self {
        Record {
            kind: "skip".into(),
            epoch,
            step,
            lr: Some(lr),
            wall_s,
            extra: [(format!("nonfinite {what}"), 1.0)].into_iter().collect(),
            ..Default::default()
        }
    }

    /// An evaluation record: `(loss, accuracy)` on the training subset by evaluation, as
    /// running minibatch means over the epoch, and on the test subset.
    pub fn eval(
        epoch: usize,
        step: usize,
        train: (f64, f64),
        running: (f64, f64),
        (test_loss, test_acc): (f64, f64),
        wall_s: f64,
    ) -> Self {
        Record {
            kind: "eval".into(),
            epoch,
            step,
            train_loss: Some(train.0),
            train_acc: Some(train.1),
            train_loss_running: Some(running.0),
            train_acc_running: Some(running.1),
            test_loss: Some(test_loss),
            test_acc: Some(test_acc),
            wall_s,
            ..Default::default()
        }
    }

    /// The record's row of `metrics.csv` with its newline: the columns of [`CSV_HEADER`],
    /// then the optimizer figures `figures` from `extra`; empty where unset.
    pub fn csv_row(&self, figures: &[&str]) -> String {
        let f = |v: Option<f64>| v.map(|x| format!("{x}")).unwrap_or_default();
        let x = |k: &str| f(self.extra.get(k).copied());
        let n = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        let mut row = vec![
            self.kind.clone(),
            self.epoch.to_string(),
            self.step.to_string(),
            f(self.lr),
            f(self.loss),
            f(self.acc),
            f(self.grad_norm),
            n(self.grad_evals.map(|v| v as u64)),
            f(self.train_loss),
            f(self.train_acc),
            f(self.test_loss),
            f(self.test_acc),
            f(self.images_per_s),
            self.wall_s.to_string(),
            n(self.grad_queries),
            self.method.clone().unwrap_or_default(),
            x("trace"),
            x("trace_norm"),
            x("trace_std_error"),
            n(self.grad_samples),
            f(self.train_loss_running),
            f(self.train_acc_running),
        ];
        row.extend(figures.iter().map(|k| x(k)));
        csv_line(row)
    }
}

/// Who ran a run and on what: written into `config.json` beside the recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunMeta {
    /// flatmin's version.
    pub flatmin_version: String,
    /// Worker threads of the run (results do not depend on it).
    pub threads: usize,
    /// The data the run saw.
    pub dataset: DatasetIdentity,
}

/// What identifies the training and test images of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetIdentity {
    /// Folder of the CIFAR-10 release, or `synthetic`.
    pub origin: String,
    /// True for the built-in synthetic stand-in.
    pub synthetic: bool,
    /// Training images used (after subsetting).
    pub train_images: usize,
    /// Test images used (after subsetting).
    pub test_images: usize,
    /// SHA-256 of the training images used (labels, then pixels).
    pub train_sha256: String,
    /// SHA-256 of the test images used (labels, then pixels).
    pub test_sha256: String,
}

/// SHA-256 (hex) of a batch's labels followed by its pixels.
pub fn batch_sha256(b: &flatmin_datasets::Batch) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(&b.labels);
    h.update(&b.pixels);
    h.finalize().iter().map(|x| format!("{x:02x}")).collect()
}

/// A run folder on disk. One opened for writing ([`RunDir::create`],
/// [`RunDir::open_to_write`]) holds the folder's [`RunLock`] until it is dropped.
pub struct RunDir {
    root: PathBuf,
    /// Whether [`RunDir::create`] made the folder (it did not exist, nor did another process
    /// make it meanwhile).
    made: bool,
    /// Set on a folder this process made while [`RunDir::create`] writes it, and by
    /// [`RunDir::discard_unless_kept`] until [`RunDir::keep`]: dropped while set, the folder
    /// is removed (under the lock, which is released after).
    discard: bool,
    /// The optimizer figures of `metrics.csv` (see [`csv_columns`]): from the config when
    /// the folder is created or opened to write.
    figures: &'static [&'static str],
    _lock: Option<RunLock>,
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.discard {
            // Best effort: the folder is this process's own and nothing was trained in it.
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// The best model of a run (highest test accuracy at an evaluation, the earlier on a tie).
pub const BEST_MODEL_FILE: &str = "best.safetensors";

/// The copy of a run's network file inside its folder.
pub const NETWORK_FILE: &str = "network.json";

impl RunDir {
    /// Creates a new run folder (or adopts an existing one that holds no run), takes its lock
    /// and writes `config.json`. Fails before any training if the folder holds a run already
    /// (unless `overwrite`), is in use by another process (then nothing is changed, even with
    /// `overwrite`), or is not writable. `overwrite` removes everything in the folder but its
    /// lock file. A folder whose run never trained (see [`holds_a_run_in`]: what a setup
    /// error or a kill before the first step leaves) holds no run: it is taken as it is, its
    /// `config.json` and metrics files rewritten, its other files left alone. A failure after
    /// the lock is taken removes the folder again if this call made it; see
    /// [`RunDir::discard_unless_kept`] for the same over a caller's setup.
    pub fn create(root: &Path, cfg: &TrainConfig, overwrite: bool) -> Result<Self> {
        let holds_run = || holds_a_run_in(root);
        if holds_run() && !overwrite {
            bail!("{}", holds_a_run(root));
        }
        let cannot = || format!("--out {}: cannot create the run folder", root.display());
        if let Some((path, kind)) = non_folder_on_the_way(root) {
            bail!(
                "{}: {} is {kind}, not a folder; nothing was changed",
                cannot(),
                path.display()
            );
        }
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(cannot)?;
        }
        // Whether this process made the folder: only then may a failed setup remove it.
        let created = std::fs::create_dir(root).is_ok();
        std::fs::create_dir_all(root).with_context(cannot)?;
        let lock = RunLock::acquire(root, "--out")?;
        if holds_run() {
            if !overwrite {
                // Another run finished in the folder while this one waited for the lock.
                bail!("{}", holds_a_run(root));
            }
            clear_except_lock(root)?;
        }
        std::fs::create_dir_all(root.join("checkpoints"))
            .with_context(|| format!("--out {}: cannot create the run folder", root.display()))?;
        // A failure below removes a folder this call made (the value is dropped).
        let mut run = RunDir {
            root: root.to_path_buf(),
            made: created,
            discard: created,
            figures: cfg.optimizer.step_figures(),
            _lock: Some(lock),
        };
        let json = serde_json::to_string_pretty(cfg)?;
        write_atomic(&run.root.join("config.json"), json.as_bytes())
            .with_context(|| format!("--out {}", root.display()))?;
        for name in ["metrics.jsonl", "metrics.csv"] {
            File::create(run.root.join(name))
                .with_context(|| format!("--out {}: cannot write {name}", root.display()))?;
        }
        std::fs::write(run.root.join("metrics.csv"), run.csv_header())
            .with_context(|| format!("--out {}: cannot write metrics.csv", root.display()))?;
        run.discard = false;
        Ok(run)
    }

    /// Opens an existing run folder to read it (no lock is taken: readers may look at a run
    /// while it trains).
    pub fn open(root: &Path) -> Result<Self> {
        if !root.join("config.json").is_file() {
            bail!(
                "--resume {}: not a run folder (no config.json)",
                root.display()
            );
        }
        Ok(RunDir {
            root: root.to_path_buf(),
            made: false,
            discard: false,
            figures: &[],
            _lock: None,
        })
    }

    /// Opens an existing run folder to continue writing it (`--resume`): as
    /// [`RunDir::open`], then takes the folder's lock, failing at once when another process
    /// holds it.
    pub fn open_to_write(root: &Path) -> Result<Self> {
        let mut run = Self::open(root)?;
        run._lock = Some(RunLock::acquire(root, "--resume")?);
        run.figures = run.config()?.optimizer.step_figures();
        Ok(run)
    }

    /// The header line of this run's `metrics.csv` ([`csv_columns`]).
    fn csv_header(&self) -> String {
        csv_line(CSV_HEADER.split(',').chain(self.figures.iter().copied()))
    }

    /// Until [`RunDir::keep`], dropping this value removes the folder if [`RunDir::create`]
    /// made it (not if it existed, nor if another process made it meanwhile): a new run's
    /// setup error then leaves nothing behind.
    pub fn discard_unless_kept(&mut self) {
        self.discard = self.made;
    }

    /// Keeps the folder when this value is dropped: called once a new run is set up (its
    /// `config.json` complete); see [`RunDir::discard_unless_kept`].
    pub fn keep(&mut self) {
        self.discard = false;
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Copies the network file `cfg.model` names (when it names one) into the folder as
    /// [`NETWORK_FILE`], in its normalized form, and points `cfg.model` at the copy: the run
    /// folder holds everything it needs, whatever happens to the original file.
    pub fn adopt_network(&self, cfg: &mut TrainConfig) -> Result<()> {
        if !is_network_file(&cfg.model) {
            return Ok(());
        }
        let net = flatmin_models::read_network(Path::new(&cfg.model))
            .with_context(|| format!("--model {}", cfg.model))?;
        let copy = self.root.join(NETWORK_FILE);
        write_atomic(&copy, flatmin_models::network_json(&net).as_bytes())
            .with_context(|| format!("--out {}", self.root.display()))?;
        cfg.model = copy.display().to_string();
        Ok(())
    }

    /// Rewrites `config.json` with the recipe and the run's metadata (a network file inside
    /// the folder is recorded by its name, so the folder can move).
    pub fn write_config(&self, cfg: &TrainConfig, meta: &RunMeta) -> Result<()> {
        let mut v = self.recipe(cfg)?;
        if let (Some(o), serde_json::Value::Object(m)) =
            (v.as_object_mut(), serde_json::to_value(meta)?)
        {
            o.extend(m);
        }
        write_atomic(
            &self.root.join("config.json"),
            serde_json::to_string_pretty(&v)?.as_bytes(),
        )?;
        Ok(())
    }

    /// The recipe `cfg` as `config.json` holds it (a network file inside the folder by its
    /// name, so the folder can move): what a checkpoint records and a resume compares
    /// ([`super::RunRecord`]).
    pub fn recipe(&self, cfg: &TrainConfig) -> Result<serde_json::Value> {
        let mut cfg = cfg.clone();
        if Path::new(&cfg.model) == self.root.join(NETWORK_FILE) {
            cfg.model = NETWORK_FILE.to_string();
        }
        Ok(serde_json::to_value(&cfg)?)
    }

    /// The data identity `config.json` records (`None` for folders written before it was
    /// recorded, or a `config.json` whose record is unreadable).
    pub fn recorded_dataset(&self) -> Option<DatasetIdentity> {
        let p = self.root.join("config.json");
        let text = read_regular_to_string(&p, MAX_CONFIG_BYTES).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        serde_json::from_value(v.get("dataset")?.clone()).ok()
    }

    /// Writes `summary.json` (atomically).
    pub fn write_summary(&self, summary: &serde_json::Value) -> Result<()> {
        write_atomic(
            &self.root.join("summary.json"),
            serde_json::to_string_pretty(summary)?.as_bytes(),
        )?;
        Ok(())
    }

    /// The run's configuration (a network file recorded by its name in the folder comes
    /// back as its path).
    pub fn config(&self) -> Result<TrainConfig> {
        let p = self.root.join("config.json");
        let text = read_regular_to_string(&p, MAX_CONFIG_BYTES)
            .with_context(|| p.display().to_string())?;
        let mut cfg = TrainConfig::from_json(&text)
            .with_context(|| format!("{}: invalid run configuration", p.display()))?;
        if is_network_file(&cfg.model) && Path::new(&cfg.model).is_relative() {
            cfg.model = self.root.join(&cfg.model).display().to_string();
        }
        Ok(cfg)
    }

    /// Appends one record to `metrics.jsonl` and `metrics.csv`, each line in one write. A
    /// failed write (disk full, file too large) is an error naming the file; a line it left
    /// half-written comes after the last checkpoint and is dropped when the run resumes.
    pub fn append(&self, r: &Record) -> Result<()> {
        let append = |name: &str, line: String| -> Result<()> {
            let p = self.root.join(name);
            OpenOptions::new()
                .append(true)
                .open(&p)
                .and_then(|mut f| f.write_all(line.as_bytes()))
                .with_context(|| format!("{}: cannot append a record", p.display()))
        };
        append("metrics.jsonl", format!("{}\n", serde_json::to_string(r)?))?;
        append("metrics.csv", r.csv_row(self.figures))?;
        Ok(())
    }

    /// Every record of `metrics.jsonl`.
    pub fn records(&self) -> Result<Vec<Record>> {
        read_records(&self.root.join("metrics.jsonl"))
    }

    /// The records [`RunDir::truncate_metrics`] keeps for `step`, without changing the file.
    pub fn kept_records(&self, step: usize) -> Result<Vec<Record>> {
        Ok(self.kept_lines(step)?.1)
    }

    /// The lines of `metrics.jsonl` up to `step` (verbatim, unless an older flatmin's epochs
    /// are renumbered: see [`renumber_epochs_from_one`]) and their records: complete lines
    /// only, up to the first record past `step`.
    fn kept_lines(&self, step: usize) -> Result<(String, Vec<Record>)> {
        let jsonl_path = self.root.join("metrics.jsonl");
        let text = read_regular_to_string(&jsonl_path, MAX_METRICS_BYTES)
            .with_context(|| jsonl_path.display().to_string())?;
        let mut kept_json = String::new();
        let mut kept_records = Vec::new();
        // A last line without its newline was cut short by a crash or a full disk while being
        // appended; nothing was checkpointed after it, so it is dropped like the lines after
        // the checkpoint.
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        for (i, line) in complete.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let r: Record = serde_json::from_str(line).with_context(|| {
                format!(
                    "{}: line {}: not a metrics record",
                    jsonl_path.display(),
                    i + 1
                )
            })?;
            if r.step > step {
                break;
            }
            kept_json.push_str(line);
            kept_json.push('\n');
            kept_records.push(r);
        }
        // A file of an older flatmin (epochs from 0) is renumbered, so the resumed run's
        // records continue one numbering; its lines are then written anew.
        if renumber_epochs_from_one(&mut kept_records) {
            kept_json = kept_records
                .iter()
                .map(|r| Ok(format!("{}\n", serde_json::to_string(r)?)))
                .collect::<Result<String>>()?;
        }
        Ok((kept_json, kept_records))
    }

    /// Keeps only the records up to `step` (those written before the checkpoint a resumed
    /// run restarts from) in both metrics files. `metrics.jsonl` lines are copied verbatim
    /// (a file of an older flatmin gets its epochs renumbered from 1) and `metrics.csv`
    /// rebuilt from them, so a resumed run's files are byte-identical to an
    /// uninterrupted run's.
    pub fn truncate_metrics(&self, step: usize) -> Result<()> {
        let jsonl_path = self.root.join("metrics.jsonl");
        let (kept_json, kept_records) = self.kept_lines(step)?;
        // metrics.csv is rebuilt from the kept records: in the run's columns (a folder
        // written before them, or with rows lost or cut, gets one header and one width).
        // serde_json's `float_roundtrip` makes a rebuilt row byte-identical to a written one.
        let csv_path = self.root.join("metrics.csv");
        let mut csv = self.csv_header();
        for r in &kept_records {
            csv.push_str(&r.csv_row(self.figures));
        }
        write_atomic(&jsonl_path, kept_json.as_bytes())?;
        write_atomic(&csv_path, csv.as_bytes())?;
        Ok(())
    }

    /// Checks that the records of `metrics.jsonl` kept for a checkpoint at `step` (`kept`,
    /// from [`RunDir::kept_records`]) are all the records written up to it: one `train` or
    /// `skip` record for each step 1 to `step`, in order, and, when the checkpoint holds its
    /// `counters`, as many records as it counts, the last step's gradient-query count equal
    /// to its. Records lost (a truncated or emptied file, a half line, lines removed) cannot
    /// be rebuilt, so a shortfall is refused, naming the file, the last step it holds and the
    /// checkpoint's step; nothing is changed.
    pub fn check_records_reach(
        &self,
        kept: &[Record],
        step: usize,
        counters: Option<&super::Counters>,
    ) -> Result<()> {
        let path = self.root.join("metrics.jsonl");
        let refuse = |what: String| -> Result<()> {
            bail!(
                "{}: {what}; the records cannot be rebuilt: restore the file, or start the \
                 run again with --overwrite",
                path.display()
            )
        };
        let mut last: Option<&Record> = None;
        for r in kept
            .iter()
            .filter(|r| r.kind == "train" || r.kind == "skip")
        {
            let want = last.map_or(1, |l| l.step + 1);
            if r.step != want {
                return refuse(format!(
                    "the record of step {want} is missing (the next one is of step {}), but the \
                     checkpoint is at step {step}",
                    r.step
                ));
            }
            last = Some(r);
        }
        match last {
            Some(r) if r.step != step => {
                return refuse(format!(
                    "ends at step {}, but the checkpoint is at step {step}",
                    r.step
                ))
            }
            None if step > 0 => {
                return refuse(format!(
                    "holds no step, but the checkpoint is at step {step}"
                ))
            }
            _ => {}
        }
        let Some(c) = counters else {
            return Ok(());
        };
        if kept.len() as u64 != c.records {
            return refuse(format!(
                "holds {} records up to step {step}, but the checkpoint at step {step} was \
                 written after {}",
                kept.len(),
                c.records
            ));
        }
        match last.and_then(|r| r.grad_queries) {
            Some(q) if q != c.grad_queries => refuse(format!(
                "its record of step {step} counts {q} gradient queries, but the checkpoint at \
                 step {step} counts {} (another run's file)",
                c.grad_queries
            )),
            _ => Ok(()),
        }
    }

    /// Writes `checkpoints/last.safetensors` atomically, and a numbered copy for `keep`.
    pub fn write_checkpoint(&self, raw: &[RawTensor], keep: Option<usize>) -> Result<PathBuf> {
        let last = self.root.join("checkpoints").join("last.safetensors");
        write_safetensors(&last, raw)?;
        if let Some(e) = keep {
            write_safetensors(
                &self
                    .root
                    .join("checkpoints")
                    .join(format!("epoch-{e:04}.safetensors")),
                raw,
            )?;
        }
        Ok(last)
    }

    /// The checkpoint a resumed run starts from, if any.
    pub fn last_checkpoint(&self) -> Option<PathBuf> {
        let p = self.checkpoint_path();
        p.is_file().then_some(p)
    }

    /// Writes `best.safetensors` (atomically): the state_dict of the best model so far, as
    /// `model.safetensors` holds the last one (see `BestModel`).
    pub fn write_best<T: Scalar>(&self, model: &Model<T>) -> Result<()> {
        model.save(&self.root.join(BEST_MODEL_FILE))?;
        Ok(())
    }

    /// The checkpoint a resume continues from: `None` only when nothing at all is at its
    /// path. Anything else there that is not a regular file (a folder, a FIFO, a dangling
    /// link, a `checkpoints` that is a file) is an error naming it, not "no checkpoint":
    /// a resume without a checkpoint restarts from step 0 and drops the records after it.
    pub fn checkpoint_to_resume(&self) -> Result<Option<PathBuf>> {
        let p = self.checkpoint_path();
        match std::fs::symlink_metadata(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => bail!("{}: {e}; nothing was changed", p.display()),
            Ok(_) if p.is_file() => Ok(Some(p)),
            Ok(m) => bail!(
                "{}: {}, not a regular file; nothing was changed (move it away to restart \
                 the run from step 0)",
                p.display(),
                if m.file_type().is_symlink() {
                    "a link to nothing"
                } else {
                    flatmin_engine::fsread::describe_kind(&m.file_type())
                }
            ),
        }
    }

    /// Where the latest checkpoint is written.
    fn checkpoint_path(&self) -> PathBuf {
        self.root.join("checkpoints").join("last.safetensors")
    }

    /// Writes `model.safetensors`: the model's state_dict alone (PyTorch-loadable).
    pub fn write_model<T: Scalar>(&self, model: &Model<T>) -> Result<()> {
        model.save(&self.root.join("model.safetensors"))?;
        Ok(())
    }
}

/// Whether `root` holds a run that a new one must not replace without `--overwrite`: a
/// `config.json` with anything trained or recorded beside it (a checkpoint, `model.safetensors`,
/// `summary.json`, or a `metrics.jsonl` with a record past step 0, or that cannot be read as
/// records). A `config.json` alone, with metrics files empty or holding only step-0 records
/// (the trace logged before the first step), is a stub: the run never completed a step (a
/// setup error, a kill, or a divergence at the very first step), and its records can all be
/// made again from the recipe.
fn holds_a_run_in(root: &Path) -> bool {
    if !root.join("config.json").exists() {
        return false;
    }
    let any_checkpoint = std::fs::read_dir(root.join("checkpoints")).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| !e.file_name().to_string_lossy().starts_with('.'))
    });
    let jsonl = root.join("metrics.jsonl");
    let records = match std::fs::symlink_metadata(&jsonl) {
        Ok(m) => !m.file_type().is_file() || (m.len() > 0 && !only_step_zero_records(&jsonl)),
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    };
    any_checkpoint
        || records
        || ["model.safetensors", "summary.json"]
            .iter()
            .any(|f| std::fs::symlink_metadata(root.join(f)).is_ok())
}

/// Whether the metrics file `path` (a regular file) reads as records, all of step 0. Only a
/// small file is read (step-0 records are a few hundred bytes); a larger one, or one that
/// does not parse, counts as holding a run.
fn only_step_zero_records(path: &Path) -> bool {
    const STUB_METRICS_BYTES: u64 = 1 << 20;
    read_regular_file(path, STUB_METRICS_BYTES)
        .ok()
        .and_then(|bytes| parse_records(path, &bytes).ok())
        .is_some_and(|records| records.iter().all(|(_, r)| r.step == 0))
}

/// The nearest existing path of `root` and its ancestors when it is not a folder (links
/// followed), with what it is: `--out` naming a file, or a path under one.
fn non_folder_on_the_way(root: &Path) -> Option<(PathBuf, &'static str)> {
    let existing = root
        .ancestors()
        .find(|p| std::fs::symlink_metadata(p).is_ok())?;
    match std::fs::metadata(existing) {
        Ok(m) if m.is_dir() => None,
        Ok(m) => Some((
            existing.to_path_buf(),
            flatmin_engine::fsread::describe_kind(&m.file_type()),
        )),
        Err(_) => Some((existing.to_path_buf(), "a link to nothing")),
    }
}

/// The refusal to start a run in `root`, which holds one, without `--overwrite`.
fn holds_a_run(root: &Path) -> String {
    format!(
        "--out {}: already holds a run (resume it with --resume {}, replace it with --overwrite, or pick another --out)",
        root.display(),
        root.display()
    )
}

/// Removes every entry of the run folder `root` except its lock file (`--overwrite`: the
/// lock stays held, on the same file, while the old run's files go).
fn clear_except_lock(root: &Path) -> Result<()> {
    let cannot = |p: &Path| format!("--overwrite: cannot remove {}", p.display());
    for entry in std::fs::read_dir(root).with_context(|| cannot(root))? {
        let path = entry.with_context(|| cannot(root))?.path();
        if path.file_name() == Some(LOCK_FILE.as_ref()) {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).with_context(|| cannot(&path))?;
        if meta.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        }
        .with_context(|| cannot(&path))?;
    }
    Ok(())
}

/// Reads a `metrics.jsonl` file; a malformed line is an error naming the file and line.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let bytes =
        read_regular_file(path, MAX_METRICS_BYTES).with_context(|| path.display().to_string())?;
    Ok(parse_records(path, &bytes)?
        .into_iter()
        .map(|(_, r)| r)
        .collect())
}

/// Renumbers the epochs of the records of one `metrics.jsonl` written by a flatmin that
/// numbered them from 0 (before issue 16), so that they count from 1 like today's.
/// The numbering itself is the format marker: today's files never hold an epoch 0 (the
/// step-0 trace belongs to epoch 1), while the older files always do (their first step is
/// of epoch 0). Returns whether the records were renumbered; a second call does nothing.
pub fn renumber_epochs_from_one<'a>(records: impl IntoIterator<Item = &'a mut Record>) -> bool {
    let mut records: Vec<&mut Record> = records.into_iter().collect();
    let old = records.iter().any(|r| r.epoch == 0);
    if old {
        for r in &mut records {
            // Saturating: a hostile file may also hold the largest epoch.
            r.epoch = r.epoch.saturating_add(1);
        }
    }
    old
}

/// Parses the bytes of a `metrics.jsonl` file (`path` only names it in errors): one JSON
/// record per line, blank lines skipped, a trailing `\r` ignored. Returns each record with
/// its line number (from 1), epochs counted from 1 (a file of an older flatmin is renumbered,
/// see [`renumber_epochs_from_one`]). A line that is not UTF-8 or not a record is an error
/// naming the file and the line. The one parser of metrics files (`--resume`, `flatmin
/// plot`, `flatmin export`, `flatmin sweep`'s summary); fuzzed by
/// `fuzz/fuzz_targets/metrics.rs`.
pub fn parse_records(path: &Path, bytes: &[u8]) -> Result<Vec<(usize, Record)>> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let line = std::str::from_utf8(line)
            .with_context(|| format!("{}: line {}: not UTF-8 text", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let r = serde_json::from_str(line)
            .with_context(|| format!("{}: line {}: not a metrics record", path.display(), i + 1))?;
        out.push((i + 1, r));
    }
    renumber_epochs_from_one(out.iter_mut().map(|(_, r)| r));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_records_numbers_lines_and_names_bad_ones() {
        let p = Path::new("m.jsonl");
        let a = r#"{"kind":"train","epoch":0,"step":1,"wall_s":0.5}"#;
        let b = r#"{"kind":"eval","epoch":0,"step":1,"test_acc":0.25,"wall_s":0.7}"#;
        let text = format!("{a}\r\n\n  \n{b}");
        let got = parse_records(p, text.as_bytes()).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].0, got[1].0), (1, 4));
        assert_eq!(got[1].1.test_acc, Some(0.25));
        assert!(parse_records(p, b"").unwrap().is_empty());
        let err = format!(
            "{:#}",
            parse_records(p, format!("{a}\n{{\"kind\":").as_bytes()).unwrap_err()
        );
        assert!(
            err.starts_with("m.jsonl: line 2: not a metrics record"),
            "{err}"
        );
        // An older flatmin's file (an epoch 0) reads renumbered from 1, the largest epoch
        // without overflow; today's file as it is.
        let huge = r#"{"kind":"eval","epoch":18446744073709551615,"step":2,"wall_s":0.7}"#;
        let got = parse_records(p, format!("{a}\n{huge}").as_bytes()).unwrap();
        assert_eq!((got[0].1.epoch, got[1].1.epoch), (1, usize::MAX));
        let got = parse_records(p, b.replace("\"epoch\":0", "\"epoch\":3").as_bytes()).unwrap();
        assert_eq!(got[0].1.epoch, 3);
        let mut bytes = format!("{a}\n").into_bytes();
        bytes.extend([b'{', 0xff, b'}']);
        let err = format!("{:#}", parse_records(p, &bytes).unwrap_err());
        assert!(err.starts_with("m.jsonl: line 2: not UTF-8 text"), "{err}");
    }
}

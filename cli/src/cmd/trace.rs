//! `flatmin trace`: the Hessian trace of a model's mean cross-entropy on a set of images,
//! exact (by structure or by basis HVPs) or estimated (Hutchinson, Hutch++), its top
//! eigenvalues (Lanczos) or its spectral density (SLQ), with a per-tensor breakdown.
//!
//! The images (a batch file, or a class-balanced subset of a split) are cut into batches of
//! `--batch`; the loss is the mean over all images, so batch `b` weighs `|b| / N`. The
//! BatchNorm mode is part of the measured function and is named in every output.

use anyhow::{anyhow, bail, Context, Result};
use clap::{ArgGroup, Args, ValueEnum};
use flatmin::data::{resolve, sized_subset, warn_if_synthetic_fallback};
use flatmin::train::{DType, LossFn, RunDir, TrainConfig};
use flatmin_datasets::{read_batch_file, Batch, Element};
use flatmin_engine::curvature::{LanczosOptions, SlqOptions, SlqResult};
use flatmin_engine::{Scalar, Tensor};
use flatmin_models::measure::{
    self, MeasureError, ProgressFn, TensorDiagonal, TensorTrace, TraceDetails, TraceMethod,
    TraceOptions, TraceProgress, TraceReport,
};
use flatmin_models::spectrum::{self, DensityOptions, EigenOptions, HvpProgressFn};
use flatmin_models::{BnUse, Model, ModelError};
use indicatif::ProgressBar;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Seed offset of the trainer's test subset (as `flatmin eval` uses it).
const TEST_SUBSET_SEED: u64 = 0x7e57;
/// Images measured when `--size` is not given and the data is not a single batch file.
const DEFAULT_SIZE: usize = 1000;
/// Bins of the SLQ density histogram.
const DENSITY_BINS: usize = 12;
/// The density's negative mass counts nodes below `-NEGATIVE_TOL * max |node|`.
const NEGATIVE_TOL: f64 = 1e-6;

/// How the trace is obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// Structural if it applies, else basis HVPs for at most 20,000 parameters, else
    /// Hutchinson.
    Auto,
    /// Exact: structural if it applies, else basis HVPs (refused, with the estimated time,
    /// beyond --max-hours).
    Exact,
    /// Exact, from per-sample gradients (GGN part plus smooth-activation sources); needs
    /// BatchNorm in eval mode.
    Structural,
    /// Exact, one HVP per parameter (d HVPs).
    #[value(alias = "exact-hvp")]
    Basis,
    /// Estimate with a confidence-interval stopping rule (--tol, --max-probes), or exactly
    /// --probes probes.
    Hutchinson,
    /// Hutch++ estimate with --budget (or --probes) HVPs.
    #[value(name = "hutch++", alias = "hutchpp")]
    HutchPlusPlus,
    /// Top --top eigenvalues by Lanczos (no trace; also `flatmin eigen`).
    Lanczos,
    /// Spectral density by stochastic Lanczos quadrature (--probes x --steps), and its
    /// trace estimate (also `flatmin density`).
    Slq,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Auto => "auto",
            Method::Exact => "exact",
            Method::Structural => "structural",
            Method::Basis => "basis",
            Method::Hutchinson => "hutchinson",
            Method::HutchPlusPlus => "hutch++",
            Method::Lanczos => "lanczos",
            Method::Slq => "slq",
        }
    }
}

/// What is measured and on which images: shared by `flatmin trace`, `eigen` and `density`.
#[derive(Debug, Args)]
#[command(next_help_heading = "Model and images")]
#[command(group(ArgGroup::new("source").required(true).args(["weights", "run", "checkpoint"])))]
pub struct MeasureArgs {
    /// Model preset (tiny-tanh, mlp-s, cnn-s, resnet20, resnet18), `mlp:W0,...:ACT` or a network
    /// file NET.json
    /// [default with --run or --checkpoint: the run's].
    #[arg(long)]
    pub model: Option<String>,
    /// Model state (safetensors, f32 or f64; a PyTorch state_dict or a flatmin checkpoint).
    #[arg(long, value_name = "W.safetensors")]
    pub weights: Option<PathBuf>,
    /// A run folder: its model.safetensors, with its model, data, seed and float type as
    /// defaults.
    #[arg(long, value_name = "RUN")]
    pub run: Option<PathBuf>,
    /// A run folder (as --run) or a checkpoint file; a checkpoint inside a run folder's
    /// `checkpoints/` takes the run's model, data, seed and float type as defaults.
    #[arg(long, value_name = "RUN_OR_FILE")]
    pub checkpoint: Option<PathBuf>,
    /// Images: auto, synthetic, a cifar-10-batches-bin folder, or one CIFAR-10 batch file
    /// [default: the run's data, else auto].
    #[arg(long, value_name = "auto|synthetic|DIR|BATCH.bin")]
    pub data: Option<String>,
    /// Split of a dataset folder (ignored for a batch file).
    #[arg(long, default_value = "test", value_parser = ["test", "train"])]
    pub split: String,
    /// Class-balanced subset of N images (0: all) [default: 1000, or all of a batch file].
    #[arg(long, alias = "limit", value_name = "N")]
    pub size: Option<usize>,
    /// Measure on exactly the images the run's `--trace-every` records were measured on (its
    /// trace subset of the training images, labels as trained), so a logged trace can be
    /// reproduced; needs --run or a --checkpoint inside a run folder.
    #[arg(long, conflicts_with_all = ["size", "split", "data", "seed"])]
    pub trace_subset: bool,
    /// Images per batch (the loss is the mean over all batches, weighted by size; with
    /// --bn-mode train each batch has its own statistics).
    #[arg(long, alias = "batch-size", value_name = "B", default_value_t = 128)]
    pub batch: usize,
    /// BatchNorm normalization: eval (running statistics) or train (batch statistics).
    #[arg(long, default_value = "eval", value_parser = super::bn_mode())]
    pub bn_mode: BnUse,
    /// The loss whose Hessian is measured: ce or mse [default: the run's --loss, else ce].
    #[arg(long, value_enum)]
    pub loss: Option<LossFn>,
    /// HVP directions per forward-over-reverse pass [default: as many as fit in 512 MiB,
    /// at most 64]. Where the memory holds them, up to 4 passes run at once (for small
    /// models, whose single pass cannot keep the cores busy); the results are the same.
    #[arg(long, value_name = "K")]
    pub directions: Option<usize>,
    /// Seed of the subset, the synthetic data and the random probes [default: the run's,
    /// else 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Float type [default: the run's, else f32].
    #[arg(long, value_enum)]
    pub dtype: Option<DType>,
    /// Worker threads (default: rayon's default, which honours RAYON_NUM_THREADS).
    #[arg(long, value_name = "T", value_parser = super::parse_threads, allow_hyphen_values = true, help_heading = "Run")]
    pub threads: Option<usize>,
    /// Print one JSON object as the last line of stdout (the human report then goes to
    /// stderr).
    #[arg(long, help_heading = "Run")]
    pub json: bool,
    /// Remove this prefix from the weights file's tensor names where present: a wrapped
    /// PyTorch state_dict (`--strip-prefix model.` for `model.layers.0.weight`).
    #[arg(long, value_name = "PREFIX")]
    pub strip_prefix: Option<String>,
}

/// Arguments of `flatmin trace`.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The model, its state and the images.
    #[command(flatten)]
    pub common: MeasureArgs,
    /// How to get the trace.
    #[arg(long, value_enum, default_value_t = Method::Auto, help_heading = "Method")]
    pub method: Method,
    /// Hutchinson: stop when the 95% confidence half-width is below this fraction of the
    /// estimate.
    #[arg(
        long,
        default_value_t = 0.01,
        allow_negative_numbers = true,
        help_heading = "Method"
    )]
    pub tol: f64,
    /// Hutchinson: most probes (HVPs).
    #[arg(
        long,
        value_name = "P",
        default_value_t = 1000,
        help_heading = "Method"
    )]
    pub max_probes: usize,
    /// Hutch++: HVPs to spend (at least 6).
    #[arg(long, value_name = "M", default_value_t = 99, help_heading = "Method")]
    pub budget: usize,
    /// Hutchinson: exactly P probes (no stopping rule); Hutch++: P HVPs (as --budget);
    /// SLQ: P probe vectors [default 8].
    #[arg(long, value_name = "P", help_heading = "Method")]
    pub probes: Option<usize>,
    /// Lanczos: number of top eigenvalues.
    #[arg(
        long = "top",
        alias = "top-k",
        value_name = "K",
        default_value_t = 1,
        help_heading = "Method"
    )]
    pub top_k: usize,
    /// Lanczos: most iterations [default 100]; SLQ: steps per probe [default 64].
    #[arg(long, value_name = "S", help_heading = "Method")]
    pub steps: Option<usize>,
    /// Report the trace per parameter tensor (JSON: a `layers` object); optionally only of
    /// the named tensors or modules (comma-separated, e.g. `conv1,layer1`), which basis
    /// HVPs then measure alone.
    #[arg(long, value_name = "NAMES", num_args = 0..=1, default_missing_value = "", help_heading = "Method")]
    pub per_layer: Option<String>,
    /// Basis HVPs: refuse when the estimated time exceeds this many hours.
    #[arg(long, value_name = "H", default_value_t = 1.0, help_heading = "Method")]
    pub max_hours: f64,
    /// Exact methods: also write the Hessian diagonal, one float64 tensor per parameter
    /// (named like the parameters), to this safetensors file (written atomically).
    #[arg(long, value_name = "OUT.safetensors", help_heading = "Method")]
    pub diagonal: Option<PathBuf>,
}

/// Arguments of `flatmin eigen`.
#[derive(Debug, Args)]
pub struct EigenArgs {
    /// The model, its state and the images.
    #[command(flatten)]
    pub common: MeasureArgs,
    /// Number of top eigenvalues.
    #[arg(
        long,
        alias = "top-k",
        value_name = "K",
        default_value_t = 1,
        help_heading = "Lanczos"
    )]
    pub top: usize,
    /// Most Lanczos iterations [default: 100].
    #[arg(long, value_name = "S", help_heading = "Lanczos")]
    pub steps: Option<usize>,
    /// Write the eigenvectors (float64, unit norm, one tensor per trainable parameter under
    /// its name, so each file is a `flatmin hvp --vector` or a PyTorch-style state dict):
    /// OUT.safetensors for --top 1, else OUT-1.safetensors ... OUT-K.safetensors, λ1 first.
    #[arg(long, value_name = "OUT.safetensors", help_heading = "Lanczos")]
    pub out: Option<PathBuf>,
}

/// Arguments of `flatmin density`.
#[derive(Debug, Args)]
pub struct DensityArgs {
    /// The model, its state and the images.
    #[command(flatten)]
    pub common: MeasureArgs,
    /// Random probe vectors.
    #[arg(
        long,
        value_name = "P",
        default_value_t = 8,
        help_heading = "Stochastic Lanczos quadrature"
    )]
    pub probes: usize,
    /// Lanczos steps per probe.
    #[arg(
        long,
        value_name = "S",
        default_value_t = 64,
        help_heading = "Stochastic Lanczos quadrature"
    )]
    pub steps: usize,
    /// Plot of the density (Gaussian-broadened quadrature, log scale): .svg or .png.
    #[arg(
        long,
        value_name = "density.svg",
        help_heading = "Stochastic Lanczos quadrature"
    )]
    pub out: Option<PathBuf>,
}

/// One measurement request, from any of the three commands.
struct Request<'a> {
    common: &'a MeasureArgs,
    method: Method,
    tol: f64,
    max_probes: usize,
    /// Hutchinson with exactly this many probes.
    fixed_probes: Option<usize>,
    /// True when `--probes` was given (and so set `max_probes` or `budget`), for messages.
    probes_given: bool,
    budget: usize,
    top_k: usize,
    slq_probes: usize,
    steps: Option<usize>,
    /// `--per-layer`: None (off), or the filters (empty: every tensor).
    per_layer: Option<Vec<String>>,
    max_hours: f64,
    density_out: Option<PathBuf>,
    /// `eigen --out OUT`: where the eigenvectors go.
    eigen_out: Option<PathBuf>,
    /// `--diagonal OUT`: where the exact diagonal goes.
    diagonal_out: Option<PathBuf>,
}

/// Runs `flatmin trace`.
pub fn run(args: &TraceArgs) -> Result<()> {
    let per_layer = args.per_layer.as_ref().map(|s| {
        s.split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect()
    });
    if per_layer.is_some() && matches!(args.method, Method::Lanczos | Method::Slq) {
        bail!(
            "--per-layer needs a trace method, not --method {}",
            args.method.name()
        );
    }
    let req = Request {
        common: &args.common,
        method: args.method,
        tol: args.tol,
        // --probes is the probe count only of the methods that may run Hutchinson; for
        // Hutch++ it is the budget and for SLQ the probe vectors (below).
        max_probes: match args.method {
            Method::Auto | Method::Hutchinson => args.probes.unwrap_or(args.max_probes),
            _ => args.max_probes,
        },
        fixed_probes: args.probes.filter(|_| args.method == Method::Hutchinson),
        probes_given: args.probes.is_some(),
        budget: if args.method == Method::HutchPlusPlus {
            args.probes.unwrap_or(args.budget)
        } else {
            args.budget
        },
        top_k: args.top_k,
        slq_probes: args.probes.unwrap_or(8),
        steps: args.steps,
        per_layer,
        max_hours: args.max_hours,
        density_out: None,
        eigen_out: None,
        diagonal_out: args.diagonal.clone(),
    };
    if req.diagonal_out.is_some()
        && !matches!(
            args.method,
            Method::Exact | Method::Structural | Method::Basis | Method::Auto
        )
    {
        bail!(
            "--diagonal needs an exact method (exact, structural or exact-hvp), not --method {}",
            args.method.name()
        );
    }
    super::with_threads(args.common.threads, || dispatch(&req))
}

/// Runs `flatmin eigen`.
pub fn run_eigen(args: &EigenArgs) -> Result<()> {
    if let Some(out) = &args.out {
        if out.extension().is_none_or(|e| e != "safetensors") {
            bail!(
                "--out {}: the eigenvectors are written as safetensors; name the file OUT.safetensors",
                out.display()
            );
        }
    }
    let req = Request {
        top_k: args.top,
        steps: args.steps,
        eigen_out: args.out.clone(),
        ..Request::only(&args.common, Method::Lanczos)
    };
    super::with_threads(args.common.threads, || dispatch(&req))
}

/// Runs `flatmin density`.
pub fn run_density(args: &DensityArgs) -> Result<()> {
    if let Some(out) = &args.out {
        flatmin::plot::Format::of(out)?;
    }
    let req = Request {
        slq_probes: args.probes,
        steps: Some(args.steps),
        density_out: args.out.clone(),
        ..Request::only(&args.common, Method::Slq)
    };
    super::with_threads(args.common.threads, || dispatch(&req))
}

impl<'a> Request<'a> {
    /// A request for `method` with every other setting at its default.
    fn only(common: &'a MeasureArgs, method: Method) -> Self {
        Request {
            common,
            method,
            tol: 0.01,
            max_probes: 1000,
            fixed_probes: None,
            probes_given: false,
            budget: 99,
            top_k: 1,
            slq_probes: 8,
            steps: None,
            per_layer: None,
            max_hours: 1.0,
            density_out: None,
            eigen_out: None,
            diagonal_out: None,
        }
    }
}

/// Everything resolved from the command line before the float type is fixed.
struct Setup {
    model: String,
    weights: PathBuf,
    /// The flag the weights came from (`--weights`, `--run` or `--checkpoint`).
    source_flag: &'static str,
    /// `--strip-prefix`.
    strip_prefix: Option<String>,
    /// The run folder whose settings are the defaults, if any.
    run: Option<PathBuf>,
    dtype: DType,
    seed: u64,
    bn: BnUse,
    loss: LossFn,
    images: Batch,
    data_origin: String,
    synthetic: bool,
    split: Option<String>,
}

fn check_args(r: &Request) -> Result<()> {
    let c = r.common;
    if c.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if !(r.tol.is_finite() && r.tol >= 0.0) {
        bail!("--tol must be a finite number >= 0, got {}", r.tol);
    }
    let probes_set = |m: &[Method]| r.probes_given && m.contains(&r.method);
    if r.max_probes < 2 {
        let flag = if probes_set(&[Method::Auto, Method::Hutchinson]) {
            "--probes"
        } else {
            "--max-probes"
        };
        bail!("{flag} must be at least 2, got {}", r.max_probes);
    }
    if r.budget < 6 {
        let flag = if probes_set(&[Method::HutchPlusPlus]) {
            "--probes"
        } else {
            "--budget"
        };
        bail!("{flag} must be at least 6 HVPs, got {}", r.budget);
    }
    if r.top_k == 0 {
        bail!("--top must be at least 1");
    }
    if r.slq_probes == 0 {
        bail!("--probes must be at least 1");
    }
    if r.steps == Some(0) {
        bail!("--steps must be at least 1");
    }
    if c.directions == Some(0) {
        bail!("--directions must be at least 1");
    }
    if !(r.max_hours.is_finite() && r.max_hours > 0.0) {
        bail!("--max-hours must be a positive number, got {}", r.max_hours);
    }
    Ok(())
}

/// The model state and (for a run) the run folder, from --weights, --run or --checkpoint.
fn resolve_source(c: &MeasureArgs) -> Result<(PathBuf, &'static str, Option<PathBuf>)> {
    let open_run = |dir: &Path, flag: &str| -> Result<PathBuf> {
        if !dir.join("config.json").is_file() {
            bail!(
                "{flag} {}: not a run folder (no config.json)",
                dir.display()
            );
        }
        let w = dir.join("model.safetensors");
        if !w.is_file() {
            bail!(
                "{flag} {}: the run has no model.safetensors yet",
                dir.display()
            );
        }
        Ok(w)
    };
    let file = |w: &Path, flag: &str| -> Result<()> {
        if w.is_dir() {
            bail!(
                "{flag} {}: is a folder, not a safetensors file (for a run folder use --run)",
                w.display()
            );
        }
        if !w.is_file() {
            bail!("{flag} {}: no such file", w.display());
        }
        Ok(())
    };
    match (&c.weights, &c.run, &c.checkpoint) {
        (Some(w), _, _) => {
            file(w, "--weights")?;
            Ok((w.clone(), "--weights", None))
        }
        (None, Some(dir), _) => Ok((open_run(dir, "--run")?, "--run", Some(dir.clone()))),
        (None, None, Some(p)) if p.is_dir() => Ok((
            open_run(p, "--checkpoint")?,
            "--checkpoint",
            Some(p.clone()),
        )),
        (None, None, Some(p)) => {
            file(p, "--checkpoint")?;
            // RUN/checkpoints/NAME.safetensors belongs to RUN.
            let run = p
                .parent()
                .filter(|d| d.file_name().is_some_and(|n| n == "checkpoints"))
                .and_then(Path::parent)
                .filter(|r| r.join("config.json").is_file())
                .map(Path::to_path_buf);
            Ok((p.clone(), "--checkpoint", run))
        }
        (None, None, None) => bail!("one of --weights, --run or --checkpoint is needed"),
    }
}

fn dispatch(r: &Request) -> Result<()> {
    check_args(r)?;
    let c = r.common;
    let (weights, source_flag, run) = resolve_source(c)?;
    let run_cfg = match &run {
        Some(dir) => Some(
            RunDir::open(dir)
                .and_then(|d| d.config())
                .with_context(|| format!("{source_flag} {}", dir.display()))?,
        ),
        None => None,
    };
    let cfg: Option<&TrainConfig> = run_cfg.as_ref();
    let model = match (&c.model, cfg) {
        (Some(m), Some(cf)) if *m != cf.model => bail!(
            "--model {m}: the run {} is of model {}; drop --model",
            run.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            cf.model
        ),
        (Some(m), _) => m.clone(),
        (None, Some(cf)) => cf.model.clone(),
        (None, None) => bail!(
            "--model is needed with {source_flag} (which preset or mlp:... spec the weights belong to)"
        ),
    };
    let dtype = c.dtype.or(cfg.map(|cf| cf.dtype)).unwrap_or(DType::F32);
    let seed = c.seed.or(cfg.map(|cf| cf.data_seed())).unwrap_or(0);
    let bn = c.bn_mode;
    let loss = c.loss.or(cfg.map(|cf| cf.loss)).unwrap_or(LossFn::Ce);
    let spec = c
        .data
        .clone()
        .or_else(|| cfg.map(|cf| cf.data.clone()))
        .unwrap_or_else(|| "auto".into());
    let (images, data_origin, synthetic, split) = match (c.trace_subset, cfg) {
        (false, _) => load_images(c, &spec, seed)?,
        (true, Some(cf)) => {
            let data = resolve(&spec, seed)?;
            let train = flatmin::train::training_subset(cf, data.train)?;
            let images = flatmin::train::trace_subset(cf, &train)?;
            (
                images,
                data.origin,
                data.synthetic,
                Some("trace-subset".into()),
            )
        }
        (true, None) => {
            bail!("--trace-subset needs a run: use --run RUN or a --checkpoint inside a run folder")
        }
    };
    let setup = Setup {
        model,
        weights,
        source_flag,
        strip_prefix: c.strip_prefix.clone(),
        run,
        dtype,
        seed,
        bn,
        loss,
        images,
        data_origin,
        synthetic,
        split,
    };
    match setup.dtype {
        DType::F32 => measure::<f32>(r, &setup),
        DType::F64 => measure::<f64>(r, &setup),
    }
}

/// The images to measure on: a batch file, or a class-balanced subset of a split.
fn load_images(
    args: &MeasureArgs,
    spec: &str,
    seed: u64,
) -> Result<(Batch, String, bool, Option<String>)> {
    let path = Path::new(spec);
    if spec != "auto" && spec != "synthetic" && path.is_file() {
        let batch = read_batch_file(path).with_context(|| format!("--data {spec}"))?;
        let size = args.size.unwrap_or(0);
        let batch = sized_subset(batch, size, seed, "--size", &format!("--data {spec}"))?;
        return Ok((batch, spec.to_string(), false, None));
    }
    if spec != "auto" && spec != "synthetic" && !path.exists() {
        bail!("--data {spec}: no such file or folder (expected auto, synthetic, a cifar-10-batches-bin folder or a CIFAR-10 batch file)");
    }
    // The errors name `--data PATH` or FLATMIN_DATA themselves (an unset `--data` is
    // `auto`, and must not be blamed for FLATMIN_DATA).
    let data = resolve(spec, seed)?;
    warn_if_synthetic_fallback(spec, &data, "measuring");
    let (batch, subset_seed) = match args.split.as_str() {
        "train" => (data.train, seed),
        _ => (data.test, seed ^ TEST_SUBSET_SEED),
    };
    let what = format!("--split {}", args.split);
    let batch = sized_subset(
        batch,
        args.size.unwrap_or(DEFAULT_SIZE),
        subset_seed,
        "--size",
        &what,
    )?;
    Ok((batch, data.origin, data.synthetic, Some(args.split.clone())))
}

/// What one method found, for both reports.
struct Found {
    /// The method actually used.
    method: Method,
    /// Why `auto` chose it (or why structural was passed over).
    note: Option<String>,
    trace: Option<f64>,
    std_error: Option<f64>,
    /// Per measured parameter tensor.
    blocks: Option<Vec<TensorTrace>>,
    /// Method-specific fields for JSON.
    extra: serde_json::Map<String, Value>,
    /// Method-specific lines for the human report.
    lines: Vec<String>,
}

impl Found {
    fn new(method: Method) -> Self {
        Found {
            method,
            note: None,
            trace: None,
            std_error: None,
            blocks: None,
            extra: serde_json::Map::new(),
            lines: Vec::new(),
        }
    }
}

/// The parameter tensors `--per-layer` measures: all of them without filters; a filter
/// matches a tensor's name exactly or as a module prefix (`layer1` matches
/// `layer1.0.conv1.weight`). A filter that matches nothing is an error listing the modules.
fn select_tensors(names: &[String], filters: &[String]) -> Result<Vec<usize>> {
    if filters.is_empty() {
        return Ok((0..names.len()).collect());
    }
    let mut keep = vec![false; names.len()];
    for f in filters {
        let mut hit = false;
        for (i, n) in names.iter().enumerate() {
            let module = n
                .strip_prefix(f.as_str())
                .is_some_and(|rest| rest.starts_with('.'));
            if n == f || module {
                keep[i] = true;
                hit = true;
            }
        }
        if !hit {
            let mut modules: Vec<&str> = names
                .iter()
                .map(|n| n.split('.').next().unwrap_or(n))
                .collect();
            modules.dedup();
            bail!(
                "--per-layer {f}: no parameter tensor or module of that name (modules: {})",
                modules.join(", ")
            );
        }
    }
    Ok((0..names.len()).filter(|&i| keep[i]).collect())
}

/// Loads the model and its state from the weights file (a training checkpoint's optimizer
/// and trainer tensors are skipped).
fn load_model<T: Scalar>(s: &Setup) -> Result<Model<T>> {
    let mut model = flatmin::cifar_model::<T>(&s.model, s.seed)?;
    model.set_loss_fn(s.loss.engine());
    let what = s.source_flag;
    let raw = flatmin_models::io::read_model_tensors(&s.weights, s.strip_prefix.as_deref())
        .with_context(|| what.to_string())?;
    model
        .load_raw(&s.weights, raw)
        .with_context(|| what.to_string())?;
    Ok(model)
}

/// The images cut into batches of `batch`.
fn make_batches<T: Scalar + Element>(
    images: &Batch,
    batch: usize,
) -> Result<Vec<(Tensor<T>, Vec<usize>)>> {
    let n = images.len();
    (0..n)
        .step_by(batch)
        .map(|start| {
            let end = (start + batch).min(n);
            let pixels = images.pixels[start * 3072..end * 3072].to_vec();
            let x = Tensor::from_vec(&[end - start, 3, 32, 32], T::from_pixels(pixels))?;
            let labels = images.labels[start..end]
                .iter()
                .map(|&l| usize::from(l))
                .collect();
            Ok((x, labels))
        })
        .collect()
}

fn measure<T: Scalar + Element>(r: &Request, s: &Setup) -> Result<()> {
    let model = load_model::<T>(s)?;
    let names: Vec<String> = model.param_names().iter().map(|n| n.to_string()).collect();
    let selected = match &r.per_layer {
        Some(filters) => select_tensors(&names, filters)?,
        None => (0..names.len()).collect(),
    };
    let batches = make_batches::<T>(&s.images, r.common.batch)?;
    let started = Instant::now();
    let found = match r.method {
        Method::Lanczos | Method::Slq => spectral(r, s, &model, &batches)?,
        _ => traced(r, s, &model, &batches, &selected)?,
    };
    let compute_s = started.elapsed().as_secs_f64();
    Report {
        r,
        s,
        numels: model.params().iter().map(|p| p.numel()).collect(),
        shown: found
            .blocks
            .iter()
            .flatten()
            .filter(|b| selected.contains(&b.index))
            .collect(),
        has_bn: model.net().has_batch_norm(),
        f: &found,
        compute_s,
    }
    .print();
    Ok(())
}

/// The library's trace method for a trace `--method`.
fn trace_method(m: Method) -> TraceMethod {
    match m {
        Method::Exact => TraceMethod::Exact,
        Method::Structural => TraceMethod::Structural,
        Method::Basis => TraceMethod::Basis,
        Method::Hutchinson => TraceMethod::Hutchinson,
        Method::HutchPlusPlus => TraceMethod::HutchPlusPlus,
        Method::Auto | Method::Lanczos | Method::Slq => TraceMethod::Auto,
    }
}

/// The `--method` value of a library trace method.
fn cli_method(m: TraceMethod) -> Method {
    match m {
        TraceMethod::Auto => Method::Auto,
        TraceMethod::Exact => Method::Exact,
        TraceMethod::Structural => Method::Structural,
        TraceMethod::Basis => Method::Basis,
        TraceMethod::Hutchinson => Method::Hutchinson,
        TraceMethod::HutchPlusPlus => Method::HutchPlusPlus,
    }
}

/// Shows a library progress event on `bar`: images of a structural trace, or HVPs (of the
/// total when known) of an HVP method.
fn show_trace_progress(bar: &ProgressBar, p: TraceProgress) {
    let (label, unit, done, total) = match p {
        TraceProgress::Samples { done, total } => ("structural", "images", done, Some(total)),
        TraceProgress::Hvps {
            method,
            done,
            total,
        } => (method.name(), "HVPs", done, total),
    };
    if let Some(t) = total {
        bar.set_length(t.max(done) as u64);
    }
    bar.set_position(done as u64);
    if bar.prefix() != label {
        super::term::restyle(bar, label, total.is_some(), unit);
    }
}

/// Measures the trace with the library's policy ([`flatmin_models::measure::trace`]) and
/// writes the diagonal with `--diagonal`.
fn traced<T: Scalar>(
    r: &Request,
    s: &Setup,
    model: &Model<T>,
    batches: &[(Tensor<T>, Vec<usize>)],
    selected: &[usize],
) -> Result<Found> {
    let filtered = r.per_layer.as_ref().is_some_and(|f| !f.is_empty());
    let opts = TraceOptions {
        method: trace_method(r.method),
        bn: s.bn,
        seed: s.seed,
        tol: r.tol,
        max_probes: r.max_probes,
        probes: r.fixed_probes,
        budget: r.budget,
        chunk_size: r.common.batch,
        directions: r.common.directions,
        tensors: filtered.then(|| selected.to_vec()),
        diagonal: r.diagonal_out.is_some(),
        max_seconds: r.max_hours * 3600.0,
        basis_max_dim: measure::AUTO_BASIS_MAX_DIM,
    };
    let bar = super::term::bar("trace", None, "HVPs", !r.common.json);
    let draw = |p| show_trace_progress(&bar, p);
    let draw: ProgressFn = &draw;
    let result = measure::trace_with_progress(model, batches, &opts, Some(draw));
    bar.finish_and_clear();
    let rep = result.map_err(|e| trace_error(e, r, s))?;
    if let (Some(out), Some(diag)) = (&r.diagonal_out, &rep.diagonal) {
        write_diagonal(out, diag)?;
    }
    Ok(found_of(r, &rep))
}

/// A library error in the words of the command line (naming its flags).
fn trace_error(e: ModelError, r: &Request, s: &Setup) -> anyhow::Error {
    let ModelError::Measure(m) = e else {
        return e.into();
    };
    match m {
        MeasureError::NotStructural { reason } => anyhow!(
            "--method structural does not apply to {} with --bn-mode {}: {reason}",
            s.model,
            s.bn.name()
        ),
        MeasureError::TooSlow {
            hvps,
            samples,
            directions,
            estimate_seconds,
            pass_seconds,
            ..
        } => anyhow!(
            "--method {}: {hvps} basis HVPs on {samples} images would take about {} (one pass of {directions} directions: {pass_seconds:.2} s), more than --max-hours {}; estimate instead (--method hutchinson or hutch++), measure fewer images (--size), some tensors only (--per-layer NAMES), or raise --max-hours",
            r.method.name(),
            measure::human_duration(estimate_seconds),
            r.max_hours
        ),
        MeasureError::NoExactDiagonal { requested, chosen } => anyhow!(
            "--diagonal: no exact method applies here ({} chose {}); use --method exact-hvp",
            cli_method(requested).name(),
            cli_method(chosen).name()
        ),
        MeasureError::Curvature { step, source } => {
            let step = match step {
                "directions" => "--directions",
                "hutch++" => "--budget",
                other => other,
            };
            anyhow::Error::new(source).context(step)
        }
        MeasureError::Invalid {
            what: "probes / steps",
            detail,
        } => {
            // The library's detail starts with "PROBES x STEPS: ".
            let why = detail.split_once(": ").map_or(detail.as_str(), |(_, w)| w);
            anyhow!(
                "--probes {} with --steps {}: {why}",
                r.slq_probes,
                r.steps.unwrap_or(64)
            )
        }
        MeasureError::Invalid { what: "k", detail } => anyhow!("--top: {detail}"),
        MeasureError::Invalid {
            what: "steps",
            detail,
        } => anyhow!("--steps with --top: {detail}"),
        other => other.into(),
    }
}

/// The library's report as the command's findings: its method-specific JSON fields
/// ([`TraceReport::to_json`]) and report lines.
fn found_of(r: &Request, rep: &TraceReport) -> Found {
    let mut f = Found::new(cli_method(rep.method_used));
    f.note = rep.note.clone();
    f.trace = rep.trace;
    f.std_error = rep.std_error;
    f.blocks = Some(rep.blocks.clone());
    // The common fields come from the command's own report; keep the method's.
    const COMMON: [&str; 12] = [
        "layers",
        "method",
        "method_note",
        "exact",
        "trace",
        "normalized_trace",
        "std_error",
        "normalized_std_error",
        "num_params",
        "samples",
        "seconds",
        "directions_per_pass",
    ];
    f.extra = rep.to_json();
    f.extra.retain(|k, _| !COMMON.contains(&k.as_str()));
    match rep.details {
        TraceDetails::Structural {
            ggn_trace,
            activation_trace,
            source_columns,
            ..
        } => {
            let loss = rep.loss.unwrap_or(f64::NAN);
            f.extra.insert("hvps".into(), json!(0));
            f.extra.remove("passes");
            f.lines.push(format!(
                "  GGN part {ggn_trace:.6e} + smooth-activation part {activation_trace:.6e} ({source_columns} curvature sources), loss {loss:.4}, no HVPs",
            ));
            return f;
        }
        TraceDetails::Basis {
            selected: Some((trace, dim)),
        } => f.lines.push(format!(
            "  the selected tensors only ({dim} parameters): trace {trace:.6e}; the total is not measured"
        )),
        TraceDetails::Basis { selected: None } => {}
        TraceDetails::Hutchinson {
            relative_half_width,
            converged,
            fixed,
            ..
        } => {
            f.extra.insert("tol".into(), json!(r.tol));
            let stop = match (fixed, converged) {
                (true, _) => "--probes fixed the count".to_string(),
                (false, true) => format!("converged, --tol {}", r.tol),
                (false, false) => format!("stopped at --max-probes, --tol {}", r.tol),
            };
            f.lines.push(format!(
                "  {} probes, 95% half-width {:.2}% of the estimate ({stop})",
                rep.probes.unwrap_or_default(),
                100.0 * relative_half_width,
            ));
        }
        TraceDetails::HutchPlusPlus {
            half_width,
            rank,
            top_trace,
            residual_estimate,
            residual_probes,
        } => f.lines.push(format!(
            "  {} HVPs: exact {top_trace:.6e} on a rank-{rank} sketch + {residual_estimate:.6e} from {residual_probes} residual probes; 95% interval ± {half_width:.3e} (Student t)",
            r.budget
        )),
    }
    f.extra
        .insert("directions_per_pass".into(), json!(rep.directions));
    f
}

/// Writes the exact diagonal to `out` as float64 tensors named and shaped like their
/// parameters.
fn write_diagonal(out: &Path, diag: &[TensorDiagonal]) -> Result<()> {
    let tensors: Vec<flatmin_models::io::RawTensor> = diag
        .iter()
        .map(|d| flatmin_models::io::RawTensor {
            name: d.name.clone(),
            shape: d.shape.clone(),
            data: flatmin_models::io::RawData::F64(d.values.clone()),
        })
        .collect();
    flatmin_models::io::write_safetensors(out, &tensors)
        .with_context(|| format!("--diagonal {}", out.display()))
}

/// Writes each eigenvector (flat, in parameter order) as a safetensors file of tensors named
/// like `model`'s trainable parameters: `out` for one vector, else `out` with `-1`, `-2`, ...
/// before its extension. Returns the paths written.
fn write_eigenvectors<T: Scalar>(
    out: &Path,
    model: &Model<T>,
    vectors: &[Vec<f64>],
) -> Result<Vec<String>> {
    let names = model.param_names();
    let params = model.params();
    let mut written = Vec::with_capacity(vectors.len());
    for (k, v) in vectors.iter().enumerate() {
        let path = if vectors.len() == 1 {
            out.to_path_buf()
        } else {
            let stem = out.file_stem().unwrap_or_default().to_string_lossy();
            out.with_file_name(format!("{stem}-{}.safetensors", k + 1))
        };
        let mut offset = 0;
        let tensors: Vec<flatmin_models::io::RawTensor> = names
            .iter()
            .zip(&params)
            .map(|(name, p)| {
                let n = p.numel();
                let data = v[offset..offset + n].to_vec();
                offset += n;
                flatmin_models::io::RawTensor {
                    name: name.to_string(),
                    shape: p.shape().to_vec(),
                    data: flatmin_models::io::RawData::F64(data),
                }
            })
            .collect();
        flatmin_models::io::write_safetensors(&path, &tensors)
            .with_context(|| format!("--out {}", path.display()))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}

/// Lanczos eigenvalues or the SLQ density, by the library's calls
/// ([`flatmin_models::spectrum`]).
fn spectral<T: Scalar>(
    r: &Request,
    s: &Setup,
    model: &Model<T>,
    batches: &[(Tensor<T>, Vec<usize>)],
) -> Result<Found> {
    // The most HVPs the run can take: Lanczos stops early once converged.
    let total = match r.method {
        Method::Lanczos => lanczos_steps(r),
        _ => r.slq_probes.saturating_mul(slq_steps(r)),
    };
    let bar = super::term::bar(r.method.name(), Some(total as u64), "HVPs", !r.common.json);
    let shown = bar.clone();
    let progress: HvpProgressFn = Box::new(move |hvps| {
        let done = hvps as u64;
        if shown.length().is_some_and(|len| done > len) {
            shown.set_length(done);
        }
        shown.set_position(done);
    });
    let result = match r.method {
        Method::Lanczos => lanczos_found(r, s, model, batches, Some(progress)),
        _ => slq_found(r, s, model, batches, Some(progress)),
    };
    bar.finish_and_clear();
    result
}

/// Most Lanczos iterations: `--steps`, else 100 (at least `--top`).
fn lanczos_steps(r: &Request) -> usize {
    r.steps.unwrap_or(100.max(r.top_k))
}

/// SLQ steps per probe: `--steps`, else 64.
fn slq_steps(r: &Request) -> usize {
    r.steps.unwrap_or(64)
}

/// Top eigenvalues by Lanczos.
fn lanczos_found<T: Scalar>(
    args: &Request,
    s: &Setup,
    model: &Model<T>,
    batches: &[(Tensor<T>, Vec<usize>)],
    progress: Option<HvpProgressFn>,
) -> Result<Found> {
    let mut f = Found::new(Method::Lanczos);
    let opts = EigenOptions {
        lanczos: LanczosOptions {
            k: args.top_k,
            max_iters: lanczos_steps(args),
            seed: s.seed,
            eigenvectors: args.eigen_out.is_some(),
            ..LanczosOptions::default()
        },
        bn: s.bn,
    };
    let rep = spectrum::eigenvalues_with_progress(model, batches, &opts, progress)
        .map_err(|e| trace_error(e, args, s))?;
    let r = &rep.lanczos;
    if let (Some(out), Some(vectors)) = (&args.eigen_out, &r.eigenvectors) {
        let written = write_eigenvectors(out, model, vectors)?;
        f.extra.insert("eigenvector_files".into(), json!(written));
    }
    f.extra.insert("eigenvalues".into(), json!(r.eigenvalues));
    f.extra.insert("residuals".into(), json!(r.residuals));
    f.extra.insert("iterations".into(), json!(r.iterations));
    f.extra.insert("converged".into(), json!(r.converged));
    f.extra.insert("hvps".into(), json!(r.hvps));
    f.extra.insert("passes".into(), json!(rep.passes));
    f.extra
        .insert("directions_per_pass".into(), json!(rep.directions));
    f.lines.push(format!(
        "  top {} eigenvalue(s) after {} iterations ({}):",
        args.top_k,
        r.iterations,
        if r.converged {
            "converged"
        } else {
            "not converged: raise --steps"
        }
    ));
    for (i, (v, res)) in r.eigenvalues.iter().zip(&r.residuals).enumerate() {
        f.lines
            .push(format!("    λ{} = {v:.6e}  (residual {res:.1e})", i + 1));
    }
    Ok(f)
}

/// Spectral density by stochastic Lanczos quadrature.
fn slq_found<T: Scalar>(
    args: &Request,
    s: &Setup,
    model: &Model<T>,
    batches: &[(Tensor<T>, Vec<usize>)],
    progress: Option<HvpProgressFn>,
) -> Result<Found> {
    let mut f = Found::new(Method::Slq);
    let opts = DensityOptions {
        slq: SlqOptions {
            probes: args.slq_probes,
            steps: slq_steps(args),
            seed: s.seed,
            reorthogonalize: true,
        },
        bn: s.bn,
        directions: args.common.directions,
    };
    let rep = spectrum::density_with_progress(model, batches, &opts, progress)
        .map_err(|e| trace_error(e, args, s))?;
    let r = &rep.slq;
    f.trace = Some(r.trace_estimate);
    f.std_error = r.trace_std_error.is_finite().then_some(r.trace_std_error);
    f.extra.insert("hvps".into(), json!(r.hvps));
    f.extra.insert("passes".into(), json!(r.passes));
    f.extra
        .insert("directions_per_pass".into(), json!(rep.directions));
    let (nodes, weights) = r.nodes_and_weights();
    density_summary(&mut f, args, opts.slq.steps, r, &nodes, &weights);
    if let Some(out) = &args.density_out {
        plot_density(&nodes, &weights, out)?;
        f.extra
            .insert("density_plot".into(), json!(out.display().to_string()));
        f.lines.push(format!("  density plot: {}", out.display()));
    }
    Ok(f)
}

/// The density's support, moments, negative mass and a coarse histogram, as JSON fields
/// and report lines.
fn density_summary(
    f: &mut Found,
    args: &Request,
    steps: usize,
    r: &SlqResult,
    nodes: &[f64],
    weights: &[f64],
) {
    let lo = nodes.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = nodes.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    // Quadrature nodes of eigenvalues that are zero in exact arithmetic come out as tiny
    // numbers of either sign: count as negative only what lies below -tol.
    let tol = NEGATIVE_TOL * lo.abs().max(hi.abs());
    let negative: f64 = nodes
        .iter()
        .zip(weights)
        .filter(|(x, _)| **x < -tol)
        .map(|(_, w)| w)
        .sum();
    let width = (hi - lo) / DENSITY_BINS as f64;
    let mut mass = vec![0.0; DENSITY_BINS];
    for (&x, &w) in nodes.iter().zip(weights) {
        let bin = if width > 0.0 {
            (((x - lo) / width) as usize).min(DENSITY_BINS - 1)
        } else {
            0
        };
        mass[bin] += w;
    }
    let edges: Vec<f64> = (0..=DENSITY_BINS).map(|i| lo + width * i as f64).collect();
    f.extra.insert(
        "density".into(),
        json!({
            "probes": args.slq_probes,
            "steps": steps,
            "min": lo,
            "max": hi,
            "mean": r.moment(1),
            "second_moment": r.moment(2),
            "negative_mass": negative,
            "negative_tolerance": tol,
            "histogram": {"edges": edges, "mass": mass},
        }),
    );
    f.lines.push(format!(
            "  spectral density ({} probes x {} steps): support [{lo:.4e}, {hi:.4e}], mean {:.4e}, second moment {:.4e}, negative mass {:.3} (below -{tol:.1e})",
            args.slq_probes,
            steps,
            r.moment(1),
            r.moment(2),
            negative
        ));
    for (i, m) in mass.iter().enumerate() {
        f.lines.push(format!(
            "    [{:>11.4e}, {:>11.4e})  {:>6.2}%",
            edges[i],
            edges[i + 1],
            100.0 * m
        ));
    }
    f.extra.insert("probes".into(), json!(args.slq_probes));
}

/// Points of the quadrature's density broadened by a Gaussian of width 1% of the spectrum's
/// span, on a fine grid, floored at 1e-8 of the peak (for the log axis).
fn broadened_density(nodes: &[f64], weights: &[f64]) -> Vec<(f64, f64)> {
    let lo = nodes.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = nodes.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let span = hi - lo;
    let sigma = if span > 0.0 {
        0.01 * span
    } else {
        1e-3 * lo.abs().max(1e-12)
    };
    let (a, b) = (lo - 4.0 * sigma, hi + 4.0 * sigma);
    const GRID: usize = 1000;
    let norm = 1.0 / (sigma * (2.0 * std::f64::consts::PI).sqrt());
    let pts: Vec<(f64, f64)> = (0..GRID)
        .map(|i| {
            let x = a + (b - a) * i as f64 / (GRID - 1) as f64;
            let y: f64 = nodes
                .iter()
                .zip(weights)
                .map(|(&t, &w)| w * norm * (-0.5 * ((x - t) / sigma).powi(2)).exp())
                .sum();
            (x, y)
        })
        .collect();
    let peak = pts.iter().map(|p| p.1).fold(0.0, f64::max);
    let floor = 1e-8 * peak;
    pts.into_iter().map(|(x, y)| (x, y.max(floor))).collect()
}

/// Draws the spectral density to `out` (.svg or .png).
fn plot_density(nodes: &[f64], weights: &[f64], out: &Path) -> Result<()> {
    use flatmin::plot::{render, Figure, Format, Line, Metric, Panel, Source};
    let format = Format::of(out)?;
    let fig = Figure {
        title: Some("Hessian spectral density (SLQ)".into()),
        x_label: "eigenvalue".into(),
        log_y: true,
        panels: vec![Panel {
            metric: Metric {
                name: "density".into(),
                source: Source::Trace,
                description: "spectral density".into(),
            },
            caption: "density, Gaussian-broadened (σ = 1% of the span)".into(),
            y_label: "density".into(),
            lines: vec![Line {
                label: "SLQ".into(),
                points: broadened_density(nodes, weights),
                raw: None,
                markers: false,
            }],
        }],
    };
    render(&fig, out, format)
}

/// What `flatmin trace` found, with what it needs to report it.
struct Report<'a> {
    r: &'a Request<'a>,
    s: &'a Setup,
    /// Elements of each parameter tensor, in the model's order.
    numels: Vec<usize>,
    /// The measured tensors `--per-layer` asked for (all of them without the flag).
    shown: Vec<&'a TensorTrace>,
    has_bn: bool,
    f: &'a Found,
    compute_s: f64,
}

impl Report<'_> {
    /// Prints the human report (stdout, or stderr with --json) and the JSON object (the last
    /// line of stdout).
    fn print(&self) {
        let human = self.human();
        if self.r.common.json {
            eprintln!("{human}");
            println!("{}", self.json());
        } else {
            println!("{human}");
        }
    }

    /// Parameters in all.
    fn params(&self) -> usize {
        self.numels.iter().sum()
    }

    fn batches(&self) -> usize {
        self.s.images.len().div_ceil(self.r.common.batch)
    }

    /// Whether the method is exact (structural or basis).
    fn exact(&self) -> bool {
        matches!(self.f.method, Method::Structural | Method::Basis)
    }

    /// The report's lines: the setup, the method, the trace, the method's own lines and the
    /// per-tensor table.
    fn human(&self) -> String {
        let (r, s, f, d) = (self.r, self.s, self.f, self.params());
        let bn_note = if self.has_bn {
            ""
        } else {
            " (no BatchNorm layers)"
        };
        let images = match &s.split {
            Some(split) => format!("{} {split} images of {}", s.images.len(), s.data_origin),
            None => format!("{} images of {}", s.images.len(), s.data_origin),
        };
        let mut out = vec![format!(
            "{}: {d} parameters, {images}, {} batch(es) of at most {}, BatchNorm {}{bn_note}, {}, loss {}",
            s.model,
            self.batches(),
            r.common.batch,
            s.bn.name(),
            s.dtype,
            s.loss
        )];
        let kind = if self.exact() {
            "exact"
        } else if f.method == Method::Lanczos {
            "eigenvalues"
        } else {
            "estimate"
        };
        out.push(format!(
            "method: {} ({kind}){}",
            f.method.name(),
            f.note
                .as_ref()
                .map(|n| format!("; {}: {n}", r.method.name()))
                .unwrap_or_default()
        ));
        if let Some(t) = f.trace {
            let se = f
                .std_error
                .map(|e| format!(" ± {e:.3e} (s.e.)"))
                .unwrap_or_default();
            out.push(format!(
                "trace {t:.6e}{se}   normalized tr/d {:.6e}",
                t / d as f64
            ));
        }
        out.extend(f.lines.iter().cloned());
        self.tensor_table(&mut out);
        out.push(format!("time {:.3} s", self.compute_s));
        out.join("\n")
    }

    /// The shown tensors' traces and their shares of the trace (or of the selected tensors'
    /// trace), when there is a total to share.
    fn tensor_table(&self, out: &mut Vec<String>) {
        let f = self.f;
        let share_of = f
            .trace
            .or(f.extra.get("selected_trace").and_then(Value::as_f64));
        let Some(total) = share_of.filter(|_| !self.shown.is_empty()) else {
            return;
        };
        out.push(format!(
            "{:<30} {:>10} {:>14} {:>12} {:>8}",
            "parameter tensor", "numel", "trace", "tr/numel", "share"
        ));
        for b in &self.shown {
            let numel = self.numels[b.index];
            let se = b
                .std_error
                .map(|e| format!(" ±{e:.1e}"))
                .unwrap_or_default();
            let share = if total != 0.0 {
                100.0 * b.trace / total
            } else {
                0.0
            };
            out.push(format!(
                "{:<30} {numel:>10} {:>14.6e} {:>12.4e} {share:>7.2}%{se}",
                b.name, b.trace, b.normalized
            ));
        }
    }

    /// The JSON object of the report.
    fn json(&self) -> Value {
        let (r, s, f, d) = (self.r, self.s, self.f, self.params());
        let mut obj = json!({
            "model": s.model,
            "weights": s.weights.display().to_string(),
            "run": s.run.as_ref().map(|p| p.display().to_string()),
            "data": s.data_origin,
            "synthetic": s.synthetic,
            "split": s.split,
            "samples": s.images.len(),
            "batch_size": r.common.batch,
            "batches": self.batches(),
            "bn_mode": s.bn.name(),
            "loss_fn": s.loss.name(),
            "batch_norm_layers": self.has_bn,
            "dtype": s.dtype,
            "seed": s.seed,
            "method": f.method.name(),
            "requested_method": r.method.name(),
            "method_note": f.note,
            "exact": self.exact(),
            "num_params": d,
            "trace": f.trace,
            "normalized_trace": f.trace.map(|t| t / d as f64),
            "std_error": f.std_error,
            "normalized_std_error": f.std_error.map(|e| e / d as f64),
            "seconds": self.compute_s,
        });
        if let Value::Object(map) = &mut obj {
            if r.per_layer.is_some() {
                let layers: serde_json::Map<String, Value> = self
                    .shown
                    .iter()
                    .map(|b| (b.name.clone(), b.to_json()))
                    .collect();
                map.insert("layers".into(), Value::Object(layers));
            }
            for (k, v) in &f.extra {
                map.insert(k.clone(), v.clone());
            }
        }
        obj
    }
}

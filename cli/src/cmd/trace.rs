//! `flatmin trace`: the Hessian trace of a model's mean cross-entropy on a set of images,
//! exact (by structure or by basis HVPs) or estimated (Hutchinson, Hutch++), its top
//! eigenvalues (Lanczos) or its spectral density (SLQ), with a per-tensor breakdown.
//!
//! The images (a batch file, or a class-balanced subset of a split) are cut into batches of
//! `--batch`; the loss is the mean over all images, so batch `b` weighs `|b| / N`. The
//! BatchNorm mode is part of the measured function and is named in every output.

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args, ValueEnum};
use flatmin::data::{auto_candidates, resolve};
use flatmin::train::{RunDir, TrainConfig};
use flatmin_datasets::{balanced_subset, read_batch_file, Batch, Element};
use flatmin_engine::curvature::{
    exact_trace, hutch_plus_plus, hutchinson, lanczos, slq, structural_support, Batches, Hessian,
    HutchPlusPlusOptions, HutchinsonOptions, HvpConfig, LanczosOptions, SlqOptions,
    StructuralAccumulator, StructuralOptions, Which,
};
use flatmin_engine::{EngineError, Scalar, Tape, Tensor, Var};
use flatmin_models::{BnUse, Model, ModelError};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Seed offset of the trainer's test subset (as `flatmin eval` uses it).
const TEST_SUBSET_SEED: u64 = 0x7e57;
/// Images measured when `--size` is not given and the data is not a single batch file.
const DEFAULT_SIZE: usize = 1000;
/// `--method auto` takes basis HVPs up to this many parameters (when structure does not
/// apply), Hutchinson above.
const AUTO_BASIS_MAX_DIM: usize = 20_000;
/// Tangent memory one HVP pass may use when `--directions` is not given.
const DIRECTION_BYTES: usize = 512 << 20;
/// Most directions per pass chosen automatically.
const MAX_AUTO_DIRECTIONS: usize = 64;
/// Bins of the SLQ density histogram.
const DENSITY_BINS: usize = 12;

/// How the trace is obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// Structural if it applies, else basis HVPs for at most 20,000 parameters, else
    /// Hutchinson.
    Auto,
    /// Exact, from per-sample gradients (GGN part plus smooth-activation sources); needs
    /// BatchNorm in eval mode.
    Structural,
    /// Exact, one HVP per parameter (d HVPs).
    Basis,
    /// Estimate with a confidence-interval stopping rule (--tol, --max-probes).
    Hutchinson,
    /// Hutch++ estimate with --budget HVPs.
    #[value(name = "hutch++")]
    HutchPlusPlus,
    /// Top --top-k eigenvalues by Lanczos (no trace).
    Lanczos,
    /// Spectral density by stochastic Lanczos quadrature (--probes x --steps), and its
    /// trace estimate.
    Slq,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Auto => "auto",
            Method::Structural => "structural",
            Method::Basis => "basis",
            Method::Hutchinson => "hutchinson",
            Method::HutchPlusPlus => "hutch++",
            Method::Lanczos => "lanczos",
            Method::Slq => "slq",
        }
    }
}

/// Arguments of `flatmin trace`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["weights", "run"])))]
pub struct TraceArgs {
    /// Model preset (tiny-tanh, mlp-s, cnn-s, resnet20, resnet18) or `mlp:W0,...:ACT`
    /// [default with --run: the run's].
    #[arg(long)]
    pub model: Option<String>,
    /// Model state (safetensors, f32 or f64; a PyTorch state_dict or a flatmin checkpoint).
    #[arg(long, value_name = "W.safetensors")]
    pub weights: Option<PathBuf>,
    /// A run folder: its model.safetensors, with its model, data, seed and float type as
    /// defaults.
    #[arg(long, value_name = "RUN")]
    pub run: Option<PathBuf>,
    /// Images: auto, synthetic, a cifar-10-batches-bin folder, or one CIFAR-10 batch file
    /// [default: the run's data, else auto].
    #[arg(long, value_name = "auto|synthetic|DIR|BATCH.bin")]
    pub data: Option<String>,
    /// Split of a dataset folder (ignored for a batch file).
    #[arg(long, default_value = "test", value_parser = ["test", "train"])]
    pub split: String,
    /// Class-balanced subset of N images (0: all) [default: 1000, or all of a batch file].
    #[arg(long, value_name = "N")]
    pub size: Option<usize>,
    /// Images per batch (the loss is the mean over all batches, weighted by size; with
    /// --bn-mode train each batch has its own statistics).
    #[arg(long, value_name = "B", default_value_t = 128)]
    pub batch: usize,
    /// BatchNorm normalization: eval (running statistics) or train (batch statistics).
    #[arg(long, default_value = "eval", value_parser = ["eval", "train"])]
    pub bn_mode: String,
    /// How to get the trace.
    #[arg(long, value_enum, default_value_t = Method::Auto)]
    pub method: Method,
    /// Hutchinson: stop when the 95% confidence half-width is below this fraction of the
    /// estimate.
    #[arg(long, default_value_t = 0.01, allow_negative_numbers = true)]
    pub tol: f64,
    /// Hutchinson: most probes (HVPs).
    #[arg(long, value_name = "P", default_value_t = 1000)]
    pub max_probes: usize,
    /// Hutch++: HVPs to spend (at least 6).
    #[arg(long, value_name = "M", default_value_t = 99)]
    pub budget: usize,
    /// Lanczos: number of top eigenvalues.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub top_k: usize,
    /// SLQ: probe vectors.
    #[arg(long, value_name = "P", default_value_t = 8)]
    pub probes: usize,
    /// Lanczos: most iterations [default 100]; SLQ: steps per probe [default 64].
    #[arg(long, value_name = "S")]
    pub steps: Option<usize>,
    /// HVP directions per forward-over-reverse pass [default: as many as fit in 512 MiB,
    /// at most 64].
    #[arg(long, value_name = "K")]
    pub directions: Option<usize>,
    /// Seed of the subset, the synthetic data and the random probes [default: the run's,
    /// else 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Float type [default: the run's, else f32].
    #[arg(long, value_parser = ["f32", "f64"])]
    pub dtype: Option<String>,
    /// Worker threads (default: rayon's default, which honours RAYON_NUM_THREADS).
    #[arg(long, value_name = "T", value_parser = super::parse_threads, allow_hyphen_values = true)]
    pub threads: Option<usize>,
    /// Print one JSON object on stdout (the human report then goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// Runs `flatmin trace`.
pub fn run(args: &TraceArgs) -> Result<()> {
    super::with_threads(args.threads, || dispatch(args))
}

/// Everything resolved from the command line before the float type is fixed.
struct Setup {
    model: String,
    weights: PathBuf,
    dtype: String,
    seed: u64,
    bn: BnUse,
    images: Batch,
    data_origin: String,
    synthetic: bool,
    split: Option<String>,
}

fn check_args(args: &TraceArgs) -> Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if !(args.tol.is_finite() && args.tol >= 0.0) {
        bail!("--tol must be a finite number >= 0, got {}", args.tol);
    }
    if args.max_probes < 2 {
        bail!("--max-probes must be at least 2, got {}", args.max_probes);
    }
    if args.budget < 6 {
        bail!("--budget must be at least 6 HVPs, got {}", args.budget);
    }
    if args.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    if args.probes == 0 {
        bail!("--probes must be at least 1");
    }
    if args.steps == Some(0) {
        bail!("--steps must be at least 1");
    }
    if args.directions == Some(0) {
        bail!("--directions must be at least 1");
    }
    Ok(())
}

fn dispatch(args: &TraceArgs) -> Result<()> {
    check_args(args)?;
    let run_cfg = match &args.run {
        Some(dir) => {
            if !dir.join("config.json").is_file() {
                bail!("--run {}: not a run folder (no config.json)", dir.display());
            }
            let cfg = RunDir::open(dir)
                .and_then(|r| r.config())
                .with_context(|| format!("--run {}", dir.display()))?;
            Some(cfg)
        }
        None => None,
    };
    let weights = match (&args.weights, &args.run) {
        (Some(w), _) => {
            if w.is_dir() {
                bail!("--weights {}: is a folder, not a safetensors file (for a run folder use --run)", w.display());
            }
            if !w.is_file() {
                bail!("--weights {}: no such file", w.display());
            }
            w.clone()
        }
        (None, Some(dir)) => {
            let w = dir.join("model.safetensors");
            if !w.is_file() {
                bail!(
                    "--run {}: the run has no model.safetensors yet",
                    dir.display()
                );
            }
            w
        }
        (None, None) => bail!("one of --weights or --run is needed"),
    };
    let cfg: Option<&TrainConfig> = run_cfg.as_ref();
    let model = match (&args.model, cfg) {
        (Some(m), Some(c)) if *m != c.model => bail!(
            "--model {m}: the run {} is of model {}; drop --model",
            args.run
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            c.model
        ),
        (Some(m), _) => m.clone(),
        (None, Some(c)) => c.model.clone(),
        (None, None) => bail!(
            "--model is needed with --weights (which preset or mlp:... spec the weights belong to)"
        ),
    };
    let dtype = args
        .dtype
        .clone()
        .or_else(|| cfg.map(|c| c.dtype.clone()))
        .unwrap_or_else(|| "f32".into());
    let seed = args.seed.or(cfg.map(|c| c.seed)).unwrap_or(0);
    let bn = BnUse::parse(&args.bn_mode).context("--bn-mode: expected eval or train")?;
    let spec = args
        .data
        .clone()
        .or_else(|| cfg.map(|c| c.data.clone()))
        .unwrap_or_else(|| "auto".into());
    let (images, data_origin, synthetic, split) = load_images(args, &spec, seed)?;
    let setup = Setup {
        model,
        weights,
        dtype,
        seed,
        bn,
        images,
        data_origin,
        synthetic,
        split,
    };
    match setup.dtype.as_str() {
        "f32" => measure::<f32>(args, &setup),
        "f64" => measure::<f64>(args, &setup),
        other => bail!("--dtype must be f32 or f64, got '{other}'"),
    }
}

/// The images to measure on: a batch file, or a class-balanced subset of a split.
fn load_images(
    args: &TraceArgs,
    spec: &str,
    seed: u64,
) -> Result<(Batch, String, bool, Option<String>)> {
    let path = Path::new(spec);
    if spec != "auto" && spec != "synthetic" && path.is_file() {
        let batch = read_batch_file(path).with_context(|| format!("--data {spec}"))?;
        let size = args.size.unwrap_or(0);
        let batch = subset(batch, size, seed, &format!("--data {spec}"))?;
        return Ok((batch, spec.to_string(), false, None));
    }
    if spec != "auto" && spec != "synthetic" && !path.exists() {
        bail!("--data {spec}: no such file or folder (expected auto, synthetic, a cifar-10-batches-bin folder or a CIFAR-10 batch file)");
    }
    let data = resolve(spec, seed).with_context(|| format!("--data {spec}"))?;
    if data.synthetic && spec != "synthetic" {
        let looked: Vec<String> = auto_candidates()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        eprintln!(
            "warning: no CIFAR-10 found (looked in {}); measuring on the built-in SYNTHETIC dataset",
            looked.join(", ")
        );
    }
    let (batch, subset_seed) = match args.split.as_str() {
        "train" => (data.train, seed),
        _ => (data.test, seed ^ TEST_SUBSET_SEED),
    };
    let what = format!("--split {}", args.split);
    let batch = subset(batch, args.size.unwrap_or(DEFAULT_SIZE), subset_seed, &what)?;
    Ok((batch, data.origin, data.synthetic, Some(args.split.clone())))
}

/// The class-balanced subset of `size` images (0 or all of them: the whole batch).
fn subset(batch: Batch, size: usize, seed: u64, what: &str) -> Result<Batch> {
    if batch.is_empty() {
        bail!("{what}: no images");
    }
    if size == 0 || size == batch.len() {
        return Ok(batch);
    }
    if size > batch.len() {
        bail!(
            "--size {size} exceeds the {} images available ({what})",
            batch.len()
        );
    }
    balanced_subset(&batch, size, seed).with_context(|| format!("--size {size}"))
}

fn engine_err(e: ModelError) -> EngineError {
    match e {
        ModelError::Engine(e) => e,
        other => EngineError::Shape {
            op: "forward",
            detail: other.to_string(),
        },
    }
}

/// What one method found, for both reports.
struct Found {
    /// The method actually used.
    method: Method,
    /// Why `auto` chose it (or why structural was passed over).
    note: Option<String>,
    trace: Option<f64>,
    std_error: Option<f64>,
    /// Per parameter tensor: (trace, standard error).
    blocks: Option<Vec<(f64, Option<f64>)>>,
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

fn measure<T: Scalar + Element>(args: &TraceArgs, s: &Setup) -> Result<()> {
    let mut model = Model::<T>::named(&s.model, s.seed)
        .map_err(|e| anyhow::anyhow!("--model {}: {e}", s.model))?;
    let what = if args.run.is_some() {
        "--run"
    } else {
        "--weights"
    };
    // A training checkpoint also holds optimizer and trainer state; only the model's tensors
    // are loaded.
    let raw: Vec<_> = flatmin_models::io::read_safetensors(&s.weights)
        .with_context(|| what.to_string())?
        .into_iter()
        .filter(|t| !t.name.starts_with("optimizer/") && !t.name.starts_with("trainer/"))
        .collect();
    model
        .load_raw(&s.weights, raw)
        .with_context(|| what.to_string())?;
    let params = model.params_cloned();
    let names: Vec<String> = model.param_names().iter().map(|n| n.to_string()).collect();
    let d = model.num_params();

    let n = s.images.len();
    let batches: Vec<(Tensor<T>, Vec<usize>)> = (0..n)
        .step_by(args.batch)
        .map(|start| {
            let end = (start + args.batch).min(n);
            let pixels = s.images.pixels[start * 3072..end * 3072].to_vec();
            let x = Tensor::from_vec(&[end - start, 3, 32, 32], T::from_pixels(pixels))?;
            let labels = s.images.labels[start..end]
                .iter()
                .map(|&l| usize::from(l))
                .collect();
            Ok((x, labels))
        })
        .collect::<Result<_>>()?;
    let sizes: Vec<f64> = batches.iter().map(|b| b.1.len() as f64).collect();

    let net = model.structure(s.bn);
    let sopts = StructuralOptions {
        chunk_size: args.batch,
        ..StructuralOptions::default()
    };
    let started = Instant::now();
    let mut method = args.method;
    let mut note = None;
    if matches!(method, Method::Auto | Method::Structural) {
        let support =
            structural_support(&net, &params, &[3, 32, 32], &sopts).context("structural trace")?;
        match (&support.refusal, method) {
            (None, _) => method = Method::Structural,
            (Some(reason), Method::Structural) => {
                bail!(
                    "--method structural does not apply to {} with --bn-mode {}: {reason}",
                    s.model,
                    s.bn.name()
                )
            }
            (Some(reason), _) => {
                method = if d <= AUTO_BASIS_MAX_DIM {
                    Method::Basis
                } else {
                    Method::Hutchinson
                };
                note = Some(format!(
                    "structural does not apply ({reason}); {} instead",
                    method.name()
                ));
            }
        }
        if args.method == Method::Auto && note.is_none() {
            note = Some("structural applies".into());
        }
    }

    let mut found = if method == Method::Structural {
        let mut acc = StructuralAccumulator::new(&net, &params, &[3, 32, 32], &sopts)
            .context("structural trace")?;
        let live = std::io::stderr().is_terminal();
        for (x, labels) in &batches {
            acc.add_batch(x, labels).context("structural trace")?;
            if live {
                eprint!("\rstructural: {}/{n} images", acc.samples());
            }
        }
        if live {
            eprint!("\r\x1b[K");
        }
        let r = acc.finish().context("structural trace")?;
        let mut f = Found::new(method);
        f.trace = Some(r.trace);
        f.blocks = Some(r.blocks.iter().map(|b| (b.trace, None)).collect());
        f.extra.insert("ggn_trace".into(), json!(r.ggn_trace));
        f.extra
            .insert("activation_trace".into(), json!(r.activation_trace));
        f.extra.insert("loss".into(), json!(r.loss));
        f.extra
            .insert("class_columns".into(), json!(r.class_columns));
        f.extra
            .insert("source_columns".into(), json!(r.source_columns));
        f.extra.insert("hvps".into(), json!(0));
        f.lines.push(format!(
            "  GGN part {:.6e} + smooth-activation part {:.6e} ({} curvature sources), loss {:.4}, no HVPs",
            r.ggn_trace, r.activation_trace, r.source_columns, r.loss
        ));
        f
    } else {
        let loss = Batches::new(sizes, |b: usize, tape: &mut Tape<T>, vars: &[Var]| {
            let (x, labels) = &batches[b];
            let xv = tape.constant(x.clone());
            let (z, _) = model.forward(tape, vars, xv, s.bn).map_err(engine_err)?;
            tape.cross_entropy(z, labels)
        });
        let mut h =
            Hessian::new(&params, loss, HvpConfig::with_directions(1)).context("Hessian")?;
        let live = std::io::stderr().is_terminal();
        if live {
            let total = (method == Method::Basis).then_some(d);
            h = h.with_progress(move |p| match total {
                Some(t) => eprint!("\r{}: {}/{t} HVPs", method.name(), p.hvps),
                None => eprint!("\r{}: {} HVPs", method.name(), p.hvps),
            });
        }
        let k = match args.directions {
            Some(k) => k,
            None => h
                .directions_for_budget(DIRECTION_BYTES)
                .context("Hessian")?
                .min(MAX_AUTO_DIRECTIONS),
        };
        h.set_config(HvpConfig::with_directions(k))
            .context("--directions")?;
        let result = hvp_method(args, method, &h, d, s.seed);
        if live {
            eprint!("\r\x1b[K");
        }
        let mut f = result?;
        f.extra.insert("hvps".into(), json!(h.hvps()));
        f.extra.insert("passes".into(), json!(h.passes()));
        f.extra.insert("directions_per_pass".into(), json!(k));
        f
    };
    let compute_s = started.elapsed().as_secs_f64();
    if found.note.is_none() {
        found.note = note;
    }
    let has_bn = model.arch().has_batch_norm();
    report(args, s, &names, &params, has_bn, &found, compute_s)
}

/// Runs one of the HVP-based methods on `h`.
fn hvp_method<T: Scalar, L: flatmin_engine::curvature::BatchLoss<T>>(
    args: &TraceArgs,
    method: Method,
    h: &Hessian<'_, T, L>,
    d: usize,
    seed: u64,
) -> Result<Found> {
    let mut f = Found::new(method);
    match method {
        Method::Basis => {
            let r = exact_trace(h).context("basis trace")?;
            f.trace = Some(r.trace);
            f.blocks = Some(r.blocks.iter().map(|b| (b.trace, None)).collect());
        }
        Method::Hutchinson | Method::Auto | Method::Structural => {
            let opts = HutchinsonOptions {
                seed,
                min_probes: 10.min(args.max_probes),
                max_probes: args.max_probes,
                rel_tol: args.tol,
                ..HutchinsonOptions::default()
            };
            let r = hutchinson(h, &opts).context("hutchinson")?;
            f.trace = Some(r.estimate);
            f.std_error = Some(r.std_error);
            f.blocks = Some(
                r.block_estimates
                    .iter()
                    .zip(&r.block_std_errors)
                    .map(|(&e, &s)| (e, Some(s)))
                    .collect(),
            );
            f.extra.insert("probes".into(), json!(r.probes));
            f.extra.insert("converged".into(), json!(r.converged));
            f.extra
                .insert("relative_half_width".into(), json!(r.relative_half_width));
            f.extra.insert("tol".into(), json!(args.tol));
            f.lines.push(format!(
                "  {} probes, 95% half-width {:.2}% of the estimate ({}; --tol {})",
                r.probes,
                100.0 * r.relative_half_width,
                if r.converged {
                    "converged"
                } else {
                    "stopped at --max-probes"
                },
                args.tol
            ));
        }
        Method::HutchPlusPlus => {
            let opts = HutchPlusPlusOptions {
                budget: args.budget,
                seed,
            };
            let r = hutch_plus_plus(h, &opts).context("--budget")?;
            f.trace = Some(r.estimate);
            f.std_error = Some(r.std_error);
            f.extra.insert("budget".into(), json!(args.budget));
            f.extra.insert("sketch_rank".into(), json!(r.rank));
            f.extra.insert("top_trace".into(), json!(r.top_trace));
            f.extra
                .insert("residual_estimate".into(), json!(r.residual_estimate));
            f.extra
                .insert("residual_probes".into(), json!(r.residual_probes));
            f.lines.push(format!(
                "  {} HVPs: exact {:.6e} on a rank-{} sketch + {:.6e} from {} residual probes",
                args.budget, r.top_trace, r.rank, r.residual_estimate, r.residual_probes
            ));
        }
        Method::Lanczos => {
            if args.top_k > d {
                bail!("--top-k {} exceeds the {d} parameters", args.top_k);
            }
            let opts = LanczosOptions {
                k: args.top_k,
                max_iters: args.steps.unwrap_or(100).max(args.top_k),
                which: Which::Largest,
                seed,
                ..LanczosOptions::default()
            };
            let r = lanczos(h, &opts).context("lanczos")?;
            f.extra.insert("eigenvalues".into(), json!(r.eigenvalues));
            f.extra.insert("residuals".into(), json!(r.residuals));
            f.extra.insert("iterations".into(), json!(r.iterations));
            f.extra.insert("converged".into(), json!(r.converged));
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
        }
        Method::Slq => {
            let opts = SlqOptions {
                probes: args.probes,
                steps: args.steps.unwrap_or(64),
                seed,
                reorthogonalize: true,
            };
            // Every probe keeps its Lanczos basis (full reorthogonalization): refuse, before
            // allocating, what the memory available cannot hold.
            let d = h.dim();
            let need = opts.probes as f64 * (opts.steps.min(d) + 2) as f64 * d as f64 * 8.0;
            if let Some(avail) = flatmin::train::available_memory() {
                if need > avail {
                    bail!(
                        "--probes {} with --steps {}: the Lanczos bases need about {} ({} parameters each), but only {} are available (MemAvailable); lower --probes or --steps",
                        opts.probes,
                        opts.steps,
                        flatmin::train::human_bytes(need),
                        d,
                        flatmin::train::human_bytes(avail)
                    );
                }
            }
            let r = slq(h, &opts).context("slq")?;
            f.trace = Some(r.trace_estimate);
            f.std_error = r.trace_std_error.is_finite().then_some(r.trace_std_error);
            let (nodes, weights) = r.nodes_and_weights();
            let lo = nodes.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = nodes.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let negative: f64 = nodes
                .iter()
                .zip(&weights)
                .filter(|(x, _)| **x < 0.0)
                .map(|(_, w)| w)
                .sum();
            let width = (hi - lo) / DENSITY_BINS as f64;
            let mut mass = vec![0.0; DENSITY_BINS];
            for (&x, &w) in nodes.iter().zip(&weights) {
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
                    "probes": args.probes,
                    "steps": opts.steps,
                    "min": lo,
                    "max": hi,
                    "mean": r.moment(1),
                    "second_moment": r.moment(2),
                    "negative_mass": negative,
                    "histogram": {"edges": edges, "mass": mass},
                }),
            );
            f.lines.push(format!(
                "  spectral density ({} probes x {} steps): support [{lo:.4e}, {hi:.4e}], mean {:.4e}, second moment {:.4e}, negative mass {:.3}",
                args.probes,
                opts.steps,
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
        }
    }
    Ok(f)
}

/// Prints the human report (stdout, or stderr with --json) and the JSON object.
fn report<T: Scalar>(
    args: &TraceArgs,
    s: &Setup,
    names: &[String],
    params: &[Tensor<T>],
    has_bn: bool,
    f: &Found,
    compute_s: f64,
) -> Result<()> {
    let d: usize = params.iter().map(|p| p.numel()).sum();
    let batches = s.images.len().div_ceil(args.batch);
    let bn_note = if has_bn { "" } else { " (no BatchNorm layers)" };
    let mut out = Vec::new();
    let images = match &s.split {
        Some(split) => format!("{} {split} images of {}", s.images.len(), s.data_origin),
        None => format!("{} images of {}", s.images.len(), s.data_origin),
    };
    out.push(format!(
        "{}: {d} parameters, {images}, {batches} batch(es) of at most {}, BatchNorm {}{bn_note}, {}",
        s.model,
        args.batch,
        s.bn.name(),
        s.dtype
    ));
    let exact = matches!(f.method, Method::Structural | Method::Basis);
    let kind = if exact {
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
            .map(|n| format!("; auto: {n}"))
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
    if let (Some(blocks), Some(total)) = (&f.blocks, f.trace) {
        out.push(format!(
            "{:<30} {:>10} {:>14} {:>12} {:>8}",
            "parameter tensor", "numel", "trace", "tr/numel", "share"
        ));
        for ((name, p), (t, se)) in names.iter().zip(params).zip(blocks) {
            let numel = p.numel();
            let se = se.map(|e| format!(" ±{e:.1e}")).unwrap_or_default();
            out.push(format!(
                "{name:<30} {numel:>10} {t:>14.6e} {:>12.4e} {:>7.2}%{se}",
                if numel == 0 { 0.0 } else { t / numel as f64 },
                if total != 0.0 { 100.0 * t / total } else { 0.0 }
            ));
        }
    }
    out.push(format!("time {compute_s:.3} s"));
    let human = out.join("\n");
    if !args.json {
        println!("{human}");
        return Ok(());
    }
    eprintln!("{human}");
    let layers: Vec<Value> = match &f.blocks {
        Some(blocks) => names
            .iter()
            .zip(params)
            .zip(blocks)
            .map(|((name, p), (t, se))| {
                json!({
                    "name": name,
                    "shape": p.shape(),
                    "numel": p.numel(),
                    "trace": t,
                    "normalized_trace": if p.numel() == 0 { 0.0 } else { t / p.numel() as f64 },
                    "std_error": se,
                })
            })
            .collect(),
        None => Vec::new(),
    };
    let mut obj = json!({
        "model": s.model,
        "weights": s.weights.display().to_string(),
        "run": args.run.as_ref().map(|p| p.display().to_string()),
        "data": s.data_origin,
        "synthetic": s.synthetic,
        "split": s.split,
        "images": s.images.len(),
        "batch_size": args.batch,
        "batches": batches,
        "bn_mode": s.bn.name(),
        "batch_norm_layers": has_bn,
        "dtype": s.dtype,
        "seed": s.seed,
        "method": f.method.name(),
        "requested_method": args.method.name(),
        "method_note": f.note,
        "exact": exact,
        "dim": d,
        "trace": f.trace,
        "normalized_trace": f.trace.map(|t| t / d as f64),
        "std_error": f.std_error,
        "normalized_std_error": f.std_error.map(|e| e / d as f64),
        "layers": layers,
        "compute_s": compute_s,
    });
    if let Value::Object(map) = &mut obj {
        for (k, v) in &f.extra {
            map.insert(k.clone(), v.clone());
        }
    }
    println!("{obj}");
    Ok(())
}

//! `flatmin bench`: time gradients, HVPs, batched HVPs and GEMM in this process, with warm-up
//! and repetitions; prints a small table and, last, one JSON line.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use flatmin_benches::{grad_flops, hvp_flops, layer_macs, GemmLayout, GemmWorkload, Workload};
use serde_json::json;
use std::time::Instant;

/// What to time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Task {
    /// Loss and gradient.
    Grad,
    /// One Hessian-vector product (and the gradient, for the ratio).
    Hvp,
    /// K Hessian-vector products in one batched pass (and one single HVP, for the ratio).
    HvpBatched,
    /// SGEMM of size `--size` through the engine's parallel GEMM.
    Gemm,
    /// Exact Hessian trace of the batch (`--method structural` or `basis`), and the
    /// gradient for the ratio.
    Trace,
    /// This machine's measured single-precision FMA peak, every thread at once.
    Peak,
}

impl Task {
    /// The name the command line and the JSON line use.
    fn name(self) -> &'static str {
        match self {
            Task::Grad => "grad",
            Task::Hvp => "hvp",
            Task::HvpBatched => "hvp-batched",
            Task::Gemm => "gemm",
            Task::Trace => "trace",
            Task::Peak => "peak",
        }
    }
}

/// Seconds of FMA work per thread when measuring the peak.
const PEAK_SECONDS: f64 = 0.25;

/// The FMA peak of all of the pool's threads running at once, in GFLOP/s (`None` where no
/// vector kernel exists for this machine).
fn measured_peak() -> Option<f64> {
    let per_thread =
        rayon::broadcast(|_| flatmin_engine::kernels::cpu::fma_peak_gflops(PEAK_SECONDS));
    per_thread.into_iter().sum()
}

/// How `flatmin bench trace` computes the exact trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TraceMethod {
    /// By structure (GGN columns plus smooth-activation sources; BatchNorm eval).
    Structural,
    /// By d basis HVPs, `--vectors` per pass.
    Basis,
    /// Estimated: Hutchinson with exactly `--probes` probes, `--vectors` per pass.
    Hutchinson,
}

/// Storage of a benchmarked gemm's operands (see `--layout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    /// `C = A B`.
    Nn,
    /// `C = A Bᵀ`.
    Nt,
    /// `C = Aᵀ B`.
    Tn,
}

impl From<Layout> for GemmLayout {
    fn from(l: Layout) -> Self {
        match l {
            Layout::Nn => GemmLayout::Nn,
            Layout::Nt => GemmLayout::Nt,
            Layout::Tn => GemmLayout::Tn,
        }
    }
}

/// Parses `--shape MxKxN` (three positive sizes).
fn parse_shape(s: &str) -> std::result::Result<(usize, usize, usize), String> {
    let dims: Vec<usize> = s
        .split(['x', 'X'])
        .map(|d| d.trim().parse::<usize>().ok().filter(|&d| d > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            format!("{s:?}: expected MxKxN with three positive sizes, e.g. 128x3072x256")
        })?;
    match dims[..] {
        [m, k, n] => Ok((m, k, n)),
        _ => Err(format!(
            "{s:?}: expected MxKxN with three positive sizes, e.g. 128x3072x256"
        )),
    }
}

/// Arguments of `flatmin bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to time.
    #[arg(value_enum)]
    pub task: Task,
    /// Model preset, `mlp:...` spec or network file NET.json.
    #[arg(long, default_value = "mlp-s", help_heading = "Workload")]
    pub model: String,
    /// Batch size.
    #[arg(long, default_value_t = 128, help_heading = "Workload")]
    pub batch: usize,
    /// Directions for hvp-batched (and per pass for `trace --method basis`).
    #[arg(long, default_value_t = 16, help_heading = "Workload")]
    pub vectors: usize,
    /// Trace method of `trace`.
    #[arg(long, value_enum, default_value_t = TraceMethod::Structural, help_heading = "Trace")]
    pub method: TraceMethod,
    /// Probes of `trace --method hutchinson`.
    #[arg(long, default_value_t = 100, help_heading = "Trace")]
    pub probes: usize,
    /// Matrix size for gemm (square).
    #[arg(long, default_value_t = 1024, help_heading = "GEMM")]
    pub size: usize,
    /// A non-square gemm, `MxKxN` (overrides `--size`), e.g. a layer's `128x3072x256`.
    #[arg(long, value_name = "MxKxN", value_parser = parse_shape, help_heading = "GEMM")]
    pub shape: Option<(usize, usize, usize)>,
    /// Which gemm operands are stored transposed: `nn` (A B), `nt` (A Bᵀ, a linear
    /// layer's forward), `tn` (Aᵀ B, its weight gradient).
    #[arg(long, value_enum, default_value_t = Layout::Nn, help_heading = "GEMM")]
    pub layout: Layout,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 10, help_heading = "Run")]
    pub reps: usize,
    /// Worker threads (default: rayon's default, which honours RAYON_NUM_THREADS).
    #[arg(long, value_name = "T", value_parser = super::parse_threads, allow_hyphen_values = true, help_heading = "Run")]
    pub threads: Option<usize>,
    /// Only the JSON line.
    #[arg(long, help_heading = "Run")]
    pub json: bool,
}

/// Median and minimum of `reps` timed calls after one warm-up call, in milliseconds.
fn time(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut ms: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let median = if ms.len() % 2 == 1 {
        ms[ms.len() / 2]
    } else {
        0.5 * (ms[ms.len() / 2 - 1] + ms[ms.len() / 2])
    };
    (median, ms[0])
}

/// Runs `flatmin bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    if args.reps == 0 || args.batch == 0 || args.vectors == 0 || args.size == 0 {
        bail!("--reps, --batch, --vectors and --size must be at least 1");
    }
    if args.probes < 2 {
        bail!("--probes must be at least 2, got {}", args.probes);
    }
    super::with_threads(args.threads, || measure(args))
}

/// Timed rows of the table: (workload, median ms, min ms).
type Rows = Vec<(String, f64, f64)>;

/// Times the task of `args` in the current pool; prints the table (unless `--json`) and the
/// JSON line.
fn measure(args: &BenchArgs) -> Result<()> {
    let threads = rayon::current_num_threads();
    let mut rows: Rows = Vec::new();
    let mut out = json!({
        "task": args.task.name(),
        "threads": threads,
        "isa": flatmin_engine::kernels::cpu::isa().name(),
        "reps": args.reps,
        "dtype": "f32",
    });
    match args.task {
        Task::Peak => {
            let peak = measured_peak();
            out["peak_gflops"] = json!(peak);
            if !args.json {
                match peak {
                    Some(g) => println!("FMA peak ({threads} threads, f32): {g:.1} GFLOP/s"),
                    None => println!("no vector kernel for this machine: no peak to measure"),
                }
            }
        }
        Task::Gemm => measure_gemm(args, &mut rows, &mut out),
        task => measure_model(args, task, &mut rows, &mut out)?,
    }
    if !args.json && !rows.is_empty() {
        print_table(args, &rows, &out);
    }
    println!("{out}");
    Ok(())
}

/// `bench gemm`: one SGEMM of `--shape` (or `--size` cubed) and its share of the FMA peak.
fn measure_gemm(args: &BenchArgs, rows: &mut Rows, out: &mut serde_json::Value) {
    let shape = args.shape.unwrap_or((args.size, args.size, args.size));
    let mut w = GemmWorkload::<f32>::shaped(shape, args.layout.into());
    let (med, min) = time(args.reps, || w.run());
    let (m, k, n) = shape;
    rows.push((format!("sgemm {m}x{k}x{n} {:?}", args.layout), med, min));
    out["size"] = json!(args.size);
    out["shape"] = json!([m, k, n]);
    out["layout"] = json!(format!("{:?}", args.layout).to_lowercase());
    out["median_ms"] = json!(med);
    out["min_ms"] = json!(min);
    out["per_second"] = json!(1e3 / med);
    let gflops = w.flops() / (med * 1e6);
    out["gflops"] = json!(gflops);
    let peak = measured_peak();
    out["peak_gflops"] = json!(peak);
    out["peak_fraction"] = json!(peak.map(|p| gflops / p));
}

/// The model tasks (grad, hvp, hvp-batched, trace): the gradient for the ratios, then the
/// task itself.
fn measure_model(
    args: &BenchArgs,
    task: Task,
    rows: &mut Rows,
    out: &mut serde_json::Value,
) -> Result<()> {
    let k = match task {
        Task::HvpBatched => args.vectors,
        Task::Trace => 0,
        _ => 1,
    };
    let w = Workload::<f32>::new(&args.model, args.batch, k)?;
    let macs = layer_macs(w.model.net(), args.batch);
    let (g_med, g_min) = time(args.reps, || {
        std::hint::black_box(w.grad());
    });
    rows.push(("gradient".into(), g_med, g_min));
    out["model"] = json!(args.model);
    out["batch"] = json!(args.batch);
    // The BatchNorm mode of the timed loss (`trace` below sets its own).
    out["bn_mode"] = json!(w.bn.name());
    out["vectors"] = json!(match task {
        Task::Grad => 0,
        Task::Trace if args.method == TraceMethod::Structural => 0,
        Task::Trace => args.vectors,
        _ => k,
    });
    out["grad_ms"] = json!(g_med);
    let (med, min, flops) = match task {
        Task::Grad => (g_med, g_min, grad_flops(&macs)),
        Task::Trace => {
            let (m, n) = measure_trace(args, &w, g_med, rows, out);
            (m, n, f64::NAN)
        }
        Task::Hvp => {
            let (m, n) = time(args.reps, || {
                std::hint::black_box(w.hvp());
            });
            rows.push(("hvp".into(), m, n));
            (m, n, hvp_flops(&macs, 1))
        }
        _ => {
            let (h1, h1min) = time(args.reps, || {
                std::hint::black_box(w.hvp());
            });
            rows.push(("hvp (single)".into(), h1, h1min));
            let (m, n) = time(args.reps, || {
                std::hint::black_box(w.hvp_batched());
            });
            rows.push((format!("hvp x{k} batched"), m, n));
            out["single_hvp_ms"] = json!(h1);
            out["batched_over_singles"] = json!(m / (k as f64 * h1));
            (m, n, hvp_flops(&macs, k))
        }
    };
    out["median_ms"] = json!(med);
    out["min_ms"] = json!(min);
    let items = if task == Task::HvpBatched {
        k as f64
    } else {
        1.0
    };
    out["per_second"] = json!(items * 1e3 / med);
    out["gflops"] = if flops.is_nan() {
        serde_json::Value::Null
    } else {
        json!(flops / (med * 1e6))
    };
    if !matches!(task, Task::Grad | Task::Trace) {
        out["hvp_over_grad"] = json!(med / g_med / items);
    }
    Ok(())
}

/// `bench trace`: the trace by `--method`, its time against the gradient's `g_med`; gives
/// (median, min) ms.
fn measure_trace(
    args: &BenchArgs,
    w: &Workload<f32>,
    g_med: f64,
    rows: &mut Rows,
    out: &mut serde_json::Value,
) -> (f64, f64) {
    let mut trace = 0.0;
    let (m, n) = match args.method {
        TraceMethod::Structural => time(args.reps, || trace = w.trace_structural()),
        TraceMethod::Basis => time(args.reps, || trace = w.trace_basis(args.vectors)),
        TraceMethod::Hutchinson => time(args.reps, || {
            trace = w.trace_hutchinson(args.probes, args.vectors)
        }),
    };
    let name = match args.method {
        TraceMethod::Structural => "structural",
        TraceMethod::Basis => "basis",
        TraceMethod::Hutchinson => "hutchinson",
    };
    if args.method == TraceMethod::Hutchinson {
        out["probes"] = json!(args.probes);
        out["per_probe_ms"] = json!(m / args.probes as f64);
    }
    rows.push((format!("exact trace ({name})"), m, n));
    out["method"] = json!(name);
    out["trace"] = json!(trace);
    out["bn_mode"] = json!(if args.method == TraceMethod::Structural {
        flatmin_models::BnUse::Eval.name()
    } else {
        w.bn.name()
    });
    out["trace_over_grad"] = json!(m / g_med);
    (m, n)
}

/// The human-readable table and the ratios under it.
fn print_table(args: &BenchArgs, rows: &Rows, out: &serde_json::Value) {
    println!("{:<22} {:>12} {:>12}", "workload", "median ms", "min ms");
    for (name, med, min) in rows {
        println!("{name:<22} {med:>12.3} {min:>12.3}");
    }
    if let Some(r) = out.get("hvp_over_grad") {
        println!(
            "HVP / gradient (per direction): {:.3}",
            r.as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(r) = out.get("batched_over_singles") {
        println!(
            "batched / {} single HVPs: {:.3}",
            args.vectors,
            r.as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(g) = out["gflops"].as_f64() {
        println!("GFLOP/s (GEMM work): {g:.1}");
    }
    if let (Some(p), Some(f)) = (out["peak_gflops"].as_f64(), out["peak_fraction"].as_f64()) {
        println!(
            "measured FMA peak: {p:.1} GFLOP/s; this GEMM: {:.1}% of it",
            100.0 * f
        );
    }
    if let Some(t) = out.get("trace") {
        println!(
            "trace {:.6e} ({}; {:.2} gradients)",
            t.as_f64().unwrap_or(f64::NAN),
            out["method"].as_str().unwrap_or(""),
            out["trace_over_grad"].as_f64().unwrap_or(f64::NAN)
        );
    }
}

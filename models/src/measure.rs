//! Curvature measurements of a model's mean cross-entropy over a set of batches, as library
//! calls: the Hessian trace by the policy `flatmin trace` and `train --trace-every` use
//! (structural where it applies, else basis HVPs when the model is small enough, else
//! Hutchinson; the trainer sets [`TraceOptions::basis_max_dim`] to 0), with its per-tensor
//! breakdown and, for the exact methods, the diagonal.
//!
//! The loss is the mean over all images, so batch `b` weighs `|b| / N`; the BatchNorm mode
//! ([`BnUse`]) is part of the measured function.
//!
//! ```
//! use flatmin_models::measure::{trace, TraceMethod, TraceOptions};
//! use flatmin_models::Model;
//! use flatmin_engine::Tensor;
//! let model = Model::<f64>::named("tiny-tanh", 0).unwrap();
//! let x = Tensor::zeros(&[4, 3, 32, 32]);
//! let batches = vec![(x, vec![0, 1, 2, 3])];
//! let r = trace(&model, &batches, &TraceOptions::default()).unwrap();
//! assert_eq!(r.method_used, TraceMethod::Structural);
//! assert_eq!(r.dim, model.num_params());
//! ```

use crate::error::{ModelError, Result};
use crate::model::{BnUse, Model};
use flatmin_engine::curvature::{
    exact_trace, exact_trace_of, hutch_plus_plus, hutchinson, structural_support, BatchLoss,
    Batches, CurvatureError, Hessian, HutchPlusPlusOptions, HutchinsonOptions, HvpConfig,
    StructuralAccumulator, StructuralOptions, StructuralTrace,
};
use flatmin_engine::{EngineError, Loss, Scalar, Tape, Tensor, Var};
use std::time::Instant;
use thiserror::Error;

/// [`TraceMethod::Auto`] takes basis HVPs up to this many parameters (when structure does
/// not apply), Hutchinson above.
pub const AUTO_BASIS_MAX_DIM: usize = 20_000;
/// Tangent memory the HVP passes running at once may use together (see [`hvp_config`]).
pub const DIRECTION_BYTES: usize = 512 << 20;
/// Most directions per pass chosen automatically.
pub const MAX_AUTO_DIRECTIONS: usize = 64;
/// Most HVP passes run at once, where [`DIRECTION_BYTES`] holds them: a small model's pass
/// cannot keep even two cores busy on its own (its products are too small to split).
pub const MAX_AUTO_CONCURRENT_PASSES: usize = 4;

/// How the trace is obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceMethod {
    /// Structural if it applies, else basis HVPs for at most
    /// [`TraceOptions::basis_max_dim`] parameters (and within the time limit), else
    /// Hutchinson.
    Auto,
    /// Exact: structural if it applies, else basis HVPs (refused beyond the time limit).
    Exact,
    /// Exact, from per-sample gradients; needs BatchNorm in eval mode.
    Structural,
    /// Exact, one HVP per parameter.
    Basis,
    /// Hutchinson estimate (confidence-interval stopping rule, or a fixed probe count).
    Hutchinson,
    /// Hutch++ estimate with [`TraceOptions::budget`] HVPs.
    HutchPlusPlus,
}

impl TraceMethod {
    /// The method's name: `auto`, `exact`, `structural`, `basis`, `hutchinson`, `hutch++`.
    pub fn name(self) -> &'static str {
        match self {
            TraceMethod::Auto => "auto",
            TraceMethod::Exact => "exact",
            TraceMethod::Structural => "structural",
            TraceMethod::Basis => "basis",
            TraceMethod::Hutchinson => "hutchinson",
            TraceMethod::HutchPlusPlus => "hutch++",
        }
    }

    /// Parses a name as [`TraceMethod::name`] writes it (also `exact-hvp` and `hutchpp`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "auto" => TraceMethod::Auto,
            "exact" => TraceMethod::Exact,
            "structural" => TraceMethod::Structural,
            "basis" | "exact-hvp" => TraceMethod::Basis,
            "hutchinson" => TraceMethod::Hutchinson,
            "hutch++" | "hutchpp" => TraceMethod::HutchPlusPlus,
            _ => return None,
        })
    }

    /// Whether the method gives the exact trace.
    pub fn is_exact(self) -> bool {
        matches!(self, TraceMethod::Structural | TraceMethod::Basis)
    }
}

/// What to measure and how.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceOptions {
    /// The method asked for.
    pub method: TraceMethod,
    /// BatchNorm normalization of the measured loss.
    pub bn: BnUse,
    /// Seed of the random probes.
    pub seed: u64,
    /// Hutchinson: stop when the 95% confidence half-width is below this fraction of the
    /// estimate.
    pub tol: f64,
    /// Hutchinson: most probes.
    pub max_probes: usize,
    /// Hutchinson: exactly this many probes (no stopping rule).
    pub probes: Option<usize>,
    /// Hutch++: HVPs to spend (at least 6).
    pub budget: usize,
    /// Images per chunk of the structural trace.
    pub chunk_size: usize,
    /// HVP directions per pass (`None`: as many as fit in [`DIRECTION_BYTES`], at most
    /// [`MAX_AUTO_DIRECTIONS`]).
    pub directions: Option<usize>,
    /// Basis HVPs measure only these parameter tensors (indices); the total trace is then
    /// not measured. `None`: all of them.
    pub tensors: Option<Vec<usize>>,
    /// Also return the exact Hessian diagonal (exact methods only).
    pub diagonal: bool,
    /// Basis HVPs are refused (or, for `Auto`, replaced by Hutchinson) when their estimated
    /// time exceeds this many seconds.
    pub max_seconds: f64,
    /// `Auto` takes basis HVPs up to this many parameters when structure does not apply
    /// (0: never, Hutchinson instead).
    pub basis_max_dim: usize,
}

impl Default for TraceOptions {
    fn default() -> Self {
        TraceOptions {
            method: TraceMethod::Auto,
            bn: BnUse::Eval,
            seed: 0,
            tol: 0.01,
            max_probes: 1000,
            probes: None,
            budget: 99,
            chunk_size: 128,
            directions: None,
            tensors: None,
            diagonal: false,
            max_seconds: 3600.0,
            basis_max_dim: AUTO_BASIS_MAX_DIM,
        }
    }
}

/// The trace of one parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorTrace {
    /// Index of the tensor among the trainable parameters.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Trace of its diagonal block of the Hessian.
    pub trace: f64,
    /// `trace / numel` (0 for an empty tensor).
    pub normalized: f64,
    /// Standard error (estimates only).
    pub std_error: Option<f64>,
}

/// The exact Hessian diagonal of one parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorDiagonal {
    /// Index of the tensor among the trainable parameters.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// The diagonal entries, in the tensor's layout.
    pub values: Vec<f64>,
}

/// What the method found beyond the trace.
#[derive(Clone, Debug, PartialEq)]
pub enum TraceDetails {
    /// Structural trace.
    Structural {
        /// Gauss-Newton part.
        ggn_trace: f64,
        /// Smooth-activation part.
        activation_trace: f64,
        /// Class columns of the per-sample factors.
        class_columns: usize,
        /// Curvature-source columns.
        source_columns: usize,
    },
    /// Basis HVPs.
    Basis {
        /// With [`TraceOptions::tensors`]: the trace and size of the selected tensors.
        selected: Option<(f64, usize)>,
    },
    /// Hutchinson estimate.
    Hutchinson {
        /// Half-width of the 95% confidence interval.
        half_width: f64,
        /// The half-width as a fraction of the estimate.
        relative_half_width: f64,
        /// Whether the stopping rule was met.
        converged: bool,
        /// Whether the probe count was fixed ([`TraceOptions::probes`]).
        fixed: bool,
    },
    /// Hutch++ estimate.
    HutchPlusPlus {
        /// Half-width of the 95% interval (Student t).
        half_width: f64,
        /// Rank of the sketch.
        rank: usize,
        /// Exact trace on the sketch.
        top_trace: f64,
        /// Estimate of the residual's trace.
        residual_estimate: f64,
        /// Probes of the residual.
        residual_probes: usize,
    },
}

/// The result of [`trace`].
#[derive(Clone, Debug, PartialEq)]
pub struct TraceReport {
    /// The trace (`None` when only some tensors were measured).
    pub trace: Option<f64>,
    /// `trace / dim`.
    pub normalized_trace: Option<f64>,
    /// Trainable scalars.
    pub dim: usize,
    /// The method actually used.
    pub method_used: TraceMethod,
    /// Probes (Hutchinson) or HVPs (Hutch++) spent on the estimate.
    pub probes: Option<usize>,
    /// Standard error of an estimate.
    pub std_error: Option<f64>,
    /// Seconds spent measuring.
    pub seconds: f64,
    /// Mean loss over the images (structural only).
    pub loss: Option<f64>,
    /// The objective whose Hessian was measured (the model's [`Model::loss_fn`]).
    pub loss_fn: Loss,
    /// Images measured.
    pub samples: usize,
    /// Why `Auto`/`Exact` chose the method (or why structural was passed over).
    pub note: Option<String>,
    /// Per-tensor traces (none for Hutch++).
    pub blocks: Vec<TensorTrace>,
    /// The exact diagonal, when asked for.
    pub diagonal: Option<Vec<TensorDiagonal>>,
    /// Dataset-level HVPs spent (not counting the timing pass).
    pub hvps: usize,
    /// Forward-over-reverse passes run (not counting the timing pass).
    pub passes: usize,
    /// HVP directions per pass (HVP methods only).
    pub directions: Option<usize>,
    /// Method-specific results.
    pub details: TraceDetails,
}

impl TensorTrace {
    /// The tensor's entry of the `layers` object of `flatmin trace --json --per-layer` (and
    /// of the Python package): `shape`, `numel`, `trace`, `normalized_trace`, `std_error`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "shape": self.shape,
            "numel": self.shape.iter().product::<usize>(),
            "trace": self.trace,
            "normalized_trace": self.normalized,
            "std_error": self.std_error,
        })
    }
}

impl TraceReport {
    /// The report as the JSON object `flatmin trace --json` prints (and the Python package
    /// returns), without what only the caller knows (model, data, dtype): `method`, `loss_fn`,
    /// `method_note`, `exact`, `trace`, `normalized_trace`, `std_error`,
    /// `normalized_std_error`, `num_params`, `samples`, `seconds`, `hvps`,
    /// `passes`, `directions_per_pass`, and the method's own fields (structural: `ggn_trace`,
    /// `activation_trace`, `loss`, `class_columns`, `source_columns`; Hutchinson: `probes`,
    /// `ci95_half_width`, `relative_half_width`, `converged`; Hutch++: `budget`, `probes`,
    /// `ci95_half_width`, `sketch_rank`, `top_trace`, `residual_estimate`,
    /// `residual_probes`; basis HVPs on some tensors: `selected_trace`, `selected_params`),
    /// and `layers`: every measured tensor's [`TensorTrace::to_json`] under its name.
    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::json;
        let d = self.dim as f64;
        let mut x = serde_json::Map::new();
        let mut put = |k: &str, v: serde_json::Value| {
            x.insert(k.to_string(), v);
        };
        put("method", json!(self.method_used.name()));
        put("loss_fn", json!(self.loss_fn.name()));
        put("method_note", json!(self.note));
        put("exact", json!(self.method_used.is_exact()));
        put("trace", json!(self.trace));
        put("normalized_trace", json!(self.normalized_trace));
        put("std_error", json!(self.std_error));
        put("normalized_std_error", json!(self.std_error.map(|e| e / d)));
        put("num_params", json!(self.dim));
        put("samples", json!(self.samples));
        put("seconds", json!(self.seconds));
        put("hvps", json!(self.hvps));
        put("passes", json!(self.passes));
        put("directions_per_pass", json!(self.directions));
        let layers = self.blocks.iter().map(|b| (b.name.clone(), b.to_json()));
        put("layers", serde_json::Value::Object(layers.collect()));
        match &self.details {
            TraceDetails::Structural {
                ggn_trace,
                activation_trace,
                class_columns,
                source_columns,
            } => {
                put("ggn_trace", json!(ggn_trace));
                put("activation_trace", json!(activation_trace));
                put("loss", json!(self.loss));
                put("class_columns", json!(class_columns));
                put("source_columns", json!(source_columns));
            }
            TraceDetails::Basis { selected } => {
                if let Some((trace, dim)) = selected {
                    put("selected_trace", json!(trace));
                    put("selected_params", json!(dim));
                }
            }
            TraceDetails::Hutchinson {
                half_width,
                relative_half_width,
                converged,
                ..
            } => {
                put("probes", json!(self.probes.unwrap_or_default()));
                put("ci95_half_width", json!(half_width));
                put("relative_half_width", json!(relative_half_width));
                put("converged", json!(converged));
            }
            TraceDetails::HutchPlusPlus {
                half_width,
                rank,
                top_trace,
                residual_estimate,
                residual_probes,
            } => {
                put("budget", json!(self.probes));
                put("probes", json!(self.probes));
                put("ci95_half_width", json!(half_width));
                put("sketch_rank", json!(rank));
                put("top_trace", json!(top_trace));
                put("residual_estimate", json!(residual_estimate));
                put("residual_probes", json!(residual_probes));
            }
        }
        x
    }
}

/// Why a measurement could not be made as asked.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum MeasureError {
    /// The structural trace was asked for but does not apply.
    #[error("the structural trace does not apply: {reason}")]
    NotStructural {
        /// Why not (naming the layer).
        reason: String,
    },
    /// Basis HVPs would take longer than [`TraceOptions::max_seconds`].
    #[error("{hvps} basis HVPs on {samples} images would take about {} (one pass of {directions} directions: {pass_seconds:.2} s), more than the limit of {}", human_duration(*.estimate_seconds), human_duration(*.limit_seconds))]
    TooSlow {
        /// HVPs needed.
        hvps: usize,
        /// Images measured.
        samples: usize,
        /// Directions per pass.
        directions: usize,
        /// Estimated seconds.
        estimate_seconds: f64,
        /// Seconds of one timed pass.
        pass_seconds: f64,
        /// The limit.
        limit_seconds: f64,
    },
    /// The diagonal was asked for but the method chosen is not exact.
    #[error("the Hessian diagonal needs an exact method, but {requested} chose {chosen}")]
    NoExactDiagonal {
        /// The method asked for.
        requested: TraceMethod,
        /// The method chosen.
        chosen: TraceMethod,
    },
    /// An option is out of range.
    #[error("{what}: {detail}")]
    Invalid {
        /// The option.
        what: &'static str,
        /// Its value and what was expected.
        detail: String,
    },
    /// A curvature computation failed.
    #[error("{step}: {source}")]
    Curvature {
        /// What was being computed.
        step: &'static str,
        /// The error.
        source: CurvatureError,
    },
}

impl std::fmt::Display for TraceMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `secs` as e.g. `3.2 h`, `14 min` or `45 s`.
pub fn human_duration(secs: f64) -> String {
    if secs >= 3600.0 {
        format!("{:.1} h", secs / 3600.0)
    } else if secs >= 60.0 {
        format!("{:.0} min", secs / 60.0)
    } else {
        format!("{secs:.0} s")
    }
}

/// Progress of a running measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceProgress {
    /// Structural trace: images done of the total.
    Samples {
        /// Images done.
        done: usize,
        /// All images.
        total: usize,
    },
    /// HVP method: dataset-level HVPs done (and the total, when known in advance).
    Hvps {
        /// The method running.
        method: TraceMethod,
        /// HVPs done (counting the timing pass).
        done: usize,
        /// HVPs needed, when known (Hutchinson with its stopping rule: the most it may take,
        /// `max_probes`; it may stop sooner).
        total: Option<usize>,
    },
}

/// A progress callback.
pub type ProgressFn<'a> = &'a (dyn Fn(TraceProgress) + Send + Sync);

/// Wraps a curvature error of `step` as a measurement error.
pub(crate) fn curv(step: &'static str) -> impl FnOnce(CurvatureError) -> ModelError {
    move |source| ModelError::Measure(MeasureError::Curvature { step, source })
}

/// The Hessian of `model`'s mean loss ([`Model::loss_fn`]) over `batches` (BatchNorm mode `bn`) at
/// `params`, with `directions` HVP directions per pass (`None`: as many as fit in
/// [`DIRECTION_BYTES`], at most [`MAX_AUTO_DIRECTIONS`]); also returns the directions.
pub fn hessian<'a, T: Scalar>(
    model: &'a Model<T>,
    params: &'a [Tensor<T>],
    batches: &'a [(Tensor<T>, Vec<usize>)],
    bn: BnUse,
    directions: Option<usize>,
) -> Result<(Hessian<'a, T, impl BatchLoss<T> + 'a>, usize)> {
    let sizes: Vec<f64> = batches.iter().map(|b| b.1.len() as f64).collect();
    let loss = Batches::new(sizes, move |b: usize, tape: &mut Tape<T>, vars: &[Var]| {
        let (x, labels) = &batches[b];
        let xv = tape.constant(x.clone());
        let (z, _) = model
            .forward(tape, vars, xv, bn)
            .map_err(EngineError::from)?;
        tape.loss(model.loss_fn(), z, labels)
    });
    let mut h =
        Hessian::new(params, loss, HvpConfig::with_directions(1)).map_err(curv("Hessian"))?;
    let config = hvp_config(&h, directions)?;
    let k = config.directions_per_pass;
    h.set_config(config).map_err(curv("directions"))?;
    Ok((h, k))
}

/// How the measurements batch HVPs for `h`: `directions` per pass (`None`: as many as fit in
/// [`DIRECTION_BYTES`], at most [`MAX_AUTO_DIRECTIONS`]), and as many passes at once as the
/// rest of [`DIRECTION_BYTES`] holds, at most [`MAX_AUTO_CONCURRENT_PASSES`]. Both depend
/// on the model and the batch only, never on the thread count, and the results do not depend
/// on the passes run at once: the same bits on any machine.
pub fn hvp_config<T: Scalar, L: BatchLoss<T>>(
    h: &Hessian<'_, T, L>,
    directions: Option<usize>,
) -> Result<HvpConfig> {
    let per_direction = h.bytes_per_direction().map_err(curv("Hessian"))?;
    let k = match directions {
        Some(k) => k,
        None => (DIRECTION_BYTES / per_direction).clamp(1, MAX_AUTO_DIRECTIONS),
    };
    let concurrent =
        (DIRECTION_BYTES / (k * per_direction).max(1)).clamp(1, MAX_AUTO_CONCURRENT_PASSES);
    Ok(HvpConfig {
        directions_per_pass: k,
        concurrent_passes: concurrent,
    })
}

/// The Hessian trace of `model`'s mean loss ([`Model::loss_fn`]) over `batches`, by the policy of
/// [`TraceMethod`]; see [`trace_with_progress`].
pub fn trace<T: Scalar>(
    model: &Model<T>,
    batches: &[(Tensor<T>, Vec<usize>)],
    opts: &TraceOptions,
) -> Result<TraceReport> {
    trace_with_progress(model, batches, opts, None)
}

/// [`trace`], reporting progress to `progress`.
pub fn trace_with_progress<T: Scalar>(
    model: &Model<T>,
    batches: &[(Tensor<T>, Vec<usize>)],
    opts: &TraceOptions,
    progress: Option<ProgressFn<'_>>,
) -> Result<TraceReport> {
    check_options(opts)?;
    let started = Instant::now();
    let params = model.params_cloned();
    let (method, note) = choose_method(model, &params, opts)?;
    let mut report = if method == TraceMethod::Structural {
        structural(model, &params, batches, opts, progress)?
    } else {
        by_hvps(
            model,
            &params,
            batches,
            opts,
            method,
            note.clone(),
            progress,
        )?
    };
    report.samples = batches.iter().map(|b| b.1.len()).sum();
    report.seconds = started.elapsed().as_secs_f64();
    report.loss_fn = model.loss_fn();
    if report.note.is_none() {
        report.note = note;
    }
    Ok(report)
}

fn check_options(opts: &TraceOptions) -> Result<()> {
    let bad =
        |what, detail: String| Err(ModelError::Measure(MeasureError::Invalid { what, detail }));
    if !(opts.tol.is_finite() && opts.tol >= 0.0) {
        return bad(
            "tol",
            format!("must be a finite number >= 0, got {}", opts.tol),
        );
    }
    if opts.probes.unwrap_or(opts.max_probes) < 2 || opts.max_probes < 2 {
        return bad("probes", "need at least 2".into());
    }
    if opts.budget < 6 {
        return bad(
            "budget",
            format!("must be at least 6 HVPs, got {}", opts.budget),
        );
    }
    if opts.chunk_size == 0 || opts.directions == Some(0) {
        return bad("chunk_size / directions", "must be at least 1".into());
    }
    if !(opts.max_seconds.is_finite() && opts.max_seconds > 0.0) {
        return bad(
            "max_seconds",
            format!("must be positive, got {}", opts.max_seconds),
        );
    }
    if opts.diagonal
        && !matches!(
            opts.method,
            TraceMethod::Auto | TraceMethod::Exact | TraceMethod::Structural | TraceMethod::Basis
        )
    {
        return bad(
            "diagonal",
            format!("needs an exact method, not {}", opts.method),
        );
    }
    Ok(())
}

fn structural_options<T: Scalar>(model: &Model<T>, opts: &TraceOptions) -> StructuralOptions {
    StructuralOptions {
        chunk_size: opts.chunk_size,
        diagonal: opts.diagonal,
        loss: model.loss_fn(),
        ..StructuralOptions::default()
    }
}

/// The method to run (structure checked for `Auto`, `Exact` and `Structural`) and the note
/// explaining the choice.
fn choose_method<T: Scalar>(
    model: &Model<T>,
    params: &[Tensor<T>],
    opts: &TraceOptions,
) -> Result<(TraceMethod, Option<String>)> {
    use TraceMethod::*;
    let asked = opts.method;
    if !matches!(asked, Auto | Exact | Structural) {
        return Ok((asked, None));
    }
    let norm = model.norm_stats(opts.bn);
    let support = structural_support(model.net(), params, &norm, &structural_options(model, opts))
        .map_err(curv("structural trace"))?;
    let Some(reason) = support.refusal else {
        let note = (asked != Structural).then(|| "structural applies".to_string());
        return Ok((Structural, note));
    };
    let method = match asked {
        Structural => {
            return Err(ModelError::Measure(MeasureError::NotStructural { reason }));
        }
        Exact => {
            let note = format!("structural does not apply ({reason}); basis HVPs instead");
            return Ok((Basis, Some(note)));
        }
        _ if model.num_params() <= opts.basis_max_dim => Basis,
        _ => Hutchinson,
    };
    let note = format!(
        "structural does not apply ({reason}); {} instead",
        method.name()
    );
    Ok((method, Some(note)))
}

fn structural<T: Scalar>(
    model: &Model<T>,
    params: &[Tensor<T>],
    batches: &[(Tensor<T>, Vec<usize>)],
    opts: &TraceOptions,
    progress: Option<ProgressFn<'_>>,
) -> Result<TraceReport> {
    let norm = model.norm_stats(opts.bn);
    let sopts = structural_options(model, opts);
    let err = curv("structural trace");
    let mut acc = StructuralAccumulator::new(model.net(), params, &norm, &sopts)
        .map_err(curv("structural trace"))?;
    let total: usize = batches.iter().map(|b| b.1.len()).sum();
    for (x, labels) in batches {
        acc.add_batch(x, labels).map_err(curv("structural trace"))?;
        if let Some(p) = progress {
            p(TraceProgress::Samples {
                done: acc.samples(),
                total,
            });
        }
    }
    let r: StructuralTrace = acc.finish().map_err(err)?;
    let names = model.param_names();
    let blocks = r
        .blocks
        .iter()
        .enumerate()
        .map(|(i, b)| tensor_trace(i, names[i], &params[i], b.trace, None))
        .collect();
    let diagonal = opts.diagonal.then(|| {
        r.blocks
            .iter()
            .map(|b| {
                tensor_diagonal(
                    b.index,
                    names[b.index],
                    &params[b.index],
                    b.diagonal.clone().unwrap_or_default(),
                )
            })
            .collect()
    });
    Ok(TraceReport {
        trace: Some(r.trace),
        normalized_trace: Some(r.trace / model.num_params().max(1) as f64),
        dim: model.num_params(),
        method_used: TraceMethod::Structural,
        probes: None,
        std_error: None,
        seconds: 0.0,
        loss: Some(r.loss),
        loss_fn: model.loss_fn(),
        samples: r.samples,
        note: None,
        blocks,
        diagonal,
        hvps: 0,
        passes: 0,
        directions: None,
        details: TraceDetails::Structural {
            ggn_trace: r.ggn_trace,
            activation_trace: r.activation_trace,
            class_columns: r.class_columns,
            source_columns: r.source_columns,
        },
    })
}

fn tensor_trace<T: Scalar>(
    index: usize,
    name: &str,
    p: &Tensor<T>,
    trace: f64,
    std_error: Option<f64>,
) -> TensorTrace {
    let numel = p.numel();
    TensorTrace {
        index,
        name: name.to_string(),
        shape: p.shape().to_vec(),
        trace,
        normalized: if numel == 0 {
            0.0
        } else {
            trace / numel as f64
        },
        std_error,
    }
}

fn tensor_diagonal<T: Scalar>(
    index: usize,
    name: &str,
    p: &Tensor<T>,
    values: Vec<f64>,
) -> TensorDiagonal {
    TensorDiagonal {
        index,
        name: name.to_string(),
        shape: p.shape().to_vec(),
        values,
    }
}

/// Estimated seconds of `sel` basis HVPs in passes of `k` directions (and of one pass),
/// from one timed pass; `None` when at most 4 passes are needed (not worth timing).
fn basis_cost<T: Scalar, L: BatchLoss<T>>(
    h: &Hessian<'_, T, L>,
    sel: usize,
    k: usize,
) -> Result<Option<(f64, f64)>> {
    let passes = sel.div_ceil(k.max(1));
    if passes <= 4 {
        return Ok(None);
    }
    let probe = vec![vec![0.0; h.dim()]; k];
    let t = Instant::now();
    h.apply(&probe).map_err(curv("timing one HVP pass"))?;
    let pass_s = t.elapsed().as_secs_f64();
    Ok(Some((pass_s * passes as f64, pass_s)))
}

/// Runs an HVP method (basis, Hutchinson, Hutch++); basis HVPs first estimate their time
/// and are refused (or, for `Auto`, replaced by Hutchinson) beyond the limit.
fn by_hvps<T: Scalar>(
    model: &Model<T>,
    params: &[Tensor<T>],
    batches: &[(Tensor<T>, Vec<usize>)],
    opts: &TraceOptions,
    mut method: TraceMethod,
    mut note: Option<String>,
    progress: Option<ProgressFn<'_>>,
) -> Result<TraceReport> {
    let (mut h, k) = hessian(model, params, batches, opts.bn, opts.directions)?;
    let samples: usize = batches.iter().map(|b| b.1.len()).sum();
    let sel: usize = match &opts.tensors {
        Some(t) => t
            .iter()
            .filter_map(|&i| params.get(i))
            .map(|p| p.numel())
            .sum(),
        None => h.dim(),
    };
    let (mut timing_hvps, mut timing_passes) = (0, 0);
    if method == TraceMethod::Basis {
        if let Some((secs, pass_s)) = basis_cost(&h, sel, k)? {
            if secs > opts.max_seconds {
                if opts.method != TraceMethod::Auto {
                    return Err(ModelError::Measure(MeasureError::TooSlow {
                        hvps: sel,
                        samples,
                        directions: k,
                        estimate_seconds: secs,
                        pass_seconds: pass_s,
                        limit_seconds: opts.max_seconds,
                    }));
                }
                method = TraceMethod::Hutchinson;
                note = Some(format!(
                    "{}; basis HVPs would take about {}, so hutchinson",
                    note.unwrap_or_default(),
                    human_duration(secs)
                ));
            }
        }
        (timing_hvps, timing_passes) = (h.hvps(), h.passes());
    }
    if let Some(p) = progress {
        let total = match method {
            TraceMethod::Basis => Some(sel + timing_hvps),
            TraceMethod::Hutchinson => Some(opts.probes.unwrap_or(opts.max_probes)),
            TraceMethod::HutchPlusPlus => Some(opts.budget),
            _ => None,
        };
        h = h.with_progress(move |q| {
            p(TraceProgress::Hvps {
                method,
                done: q.hvps,
                total,
            })
        });
    }
    if opts.diagonal && method != TraceMethod::Basis {
        return Err(ModelError::Measure(MeasureError::NoExactDiagonal {
            requested: opts.method,
            chosen: method,
        }));
    }
    let mut r = run_hvp_method(model, &h, opts, method)?;
    r.hvps = h.hvps() - timing_hvps;
    r.passes = h.passes() - timing_passes;
    r.directions = Some(k);
    r.note = note;
    Ok(r)
}

/// A report with the common fields of an HVP method filled in.
fn hvp_report(dim: usize, method: TraceMethod, details: TraceDetails) -> TraceReport {
    TraceReport {
        trace: None,
        normalized_trace: None,
        dim,
        method_used: method,
        probes: None,
        std_error: None,
        seconds: 0.0,
        loss: None,
        loss_fn: Loss::default(),
        samples: 0,
        note: None,
        blocks: Vec::new(),
        diagonal: None,
        hvps: 0,
        passes: 0,
        directions: None,
        details,
    }
}

fn run_hvp_method<T: Scalar, L: BatchLoss<T>>(
    model: &Model<T>,
    h: &Hessian<'_, T, L>,
    opts: &TraceOptions,
    method: TraceMethod,
) -> Result<TraceReport> {
    let mut r = match method {
        TraceMethod::Basis => basis(model, h, opts)?,
        TraceMethod::HutchPlusPlus => hutchpp(h, opts)?,
        _ => hutch(model, h, opts)?,
    };
    if let Some(t) = r.trace {
        r.normalized_trace = Some(t / r.dim.max(1) as f64);
    }
    Ok(r)
}

fn basis<T: Scalar, L: BatchLoss<T>>(
    model: &Model<T>,
    h: &Hessian<'_, T, L>,
    opts: &TraceOptions,
) -> Result<TraceReport> {
    let r = match &opts.tensors {
        Some(tensors) => exact_trace_of(h, tensors),
        None => exact_trace(h),
    }
    .map_err(curv("basis trace"))?;
    let (names, params) = (model.param_names(), h.params());
    let selected = opts.tensors.as_ref().map(|_| (r.trace, r.dim));
    let mut rep = hvp_report(
        h.dim(),
        TraceMethod::Basis,
        TraceDetails::Basis { selected },
    );
    if selected.is_none() {
        rep.trace = Some(r.trace);
    }
    rep.blocks = r
        .blocks
        .iter()
        .map(|b| tensor_trace(b.index, names[b.index], &params[b.index], b.trace, None))
        .collect();
    if opts.diagonal {
        rep.diagonal = Some(
            r.blocks
                .iter()
                .map(|b| {
                    tensor_diagonal(
                        b.index,
                        names[b.index],
                        &params[b.index],
                        b.diagonal.clone(),
                    )
                })
                .collect(),
        );
    }
    Ok(rep)
}

fn hutch<T: Scalar, L: BatchLoss<T>>(
    model: &Model<T>,
    h: &Hessian<'_, T, L>,
    opts: &TraceOptions,
) -> Result<TraceReport> {
    let max_probes = opts.probes.unwrap_or(opts.max_probes);
    let hopts = HutchinsonOptions {
        seed: opts.seed,
        min_probes: opts.probes.unwrap_or(10.min(max_probes)),
        max_probes,
        rel_tol: if opts.probes.is_some() { 0.0 } else { opts.tol },
        // The stopping rule looks after every pass's worth of probes, whatever the passes
        // run at once (a fixed number of probes is taken in one round anyway).
        probes_per_round: Some(h.config().directions_per_pass),
        ..HutchinsonOptions::default()
    };
    let r = hutchinson(h, &hopts).map_err(curv("hutchinson"))?;
    let details = TraceDetails::Hutchinson {
        half_width: r.half_width,
        relative_half_width: r.relative_half_width,
        converged: r.converged,
        fixed: opts.probes.is_some(),
    };
    let mut rep = hvp_report(h.dim(), TraceMethod::Hutchinson, details);
    rep.trace = Some(r.estimate);
    rep.std_error = Some(r.std_error);
    rep.probes = Some(r.probes);
    let (names, params) = (model.param_names(), h.params());
    rep.blocks = r
        .block_estimates
        .iter()
        .zip(&r.block_std_errors)
        .enumerate()
        .map(|(i, (&e, &s))| tensor_trace(i, names[i], &params[i], e, Some(s)))
        .collect();
    Ok(rep)
}

fn hutchpp<T: Scalar, L: BatchLoss<T>>(
    h: &Hessian<'_, T, L>,
    opts: &TraceOptions,
) -> Result<TraceReport> {
    let hopts = HutchPlusPlusOptions {
        budget: opts.budget,
        seed: opts.seed,
    };
    let r = hutch_plus_plus(h, &hopts).map_err(curv("hutch++"))?;
    let details = TraceDetails::HutchPlusPlus {
        half_width: r.half_width,
        rank: r.rank,
        top_trace: r.top_trace,
        residual_estimate: r.residual_estimate,
        residual_probes: r.residual_probes,
    };
    let mut rep = hvp_report(h.dim(), TraceMethod::HutchPlusPlus, details);
    rep.trace = Some(r.estimate);
    rep.std_error = Some(r.std_error);
    rep.probes = Some(opts.budget);
    Ok(rep)
}

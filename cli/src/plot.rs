//! Figures of training runs: reads the `metrics.jsonl` of one or more run folders, checks
//! every input (missing folder, malformed line, unknown or absent metric) with a one-line
//! error, and draws one panel per metric with one line per run, as PNG or SVG.
//!
//! Per-step metrics (`loss`, `acc`, `lr`, `grad_norm`, ... and optimizer extras) are drawn
//! as lines, smoothed by a centred moving average over the raw values (drawn faintly
//! behind); per-epoch evaluation metrics (`test_acc`, `test_loss`, `train_loss`,
//! `train_acc`) as points joined by lines at the steps where they were measured. Text is
//! drawn with an embedded DejaVu Sans, so no system font library is needed. One legend per
//! figure, in a column right of the panels, where it hides no data. A PNG is drawn at three
//! times its size and averaged down (anti-aliased lines and text); an SVG is drawn in tenths
//! of a pixel, so its coordinates are not snapped to whole pixels.

use crate::train::Record;
use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Metrics plotted when none is asked for: test accuracy and the mini-batch training loss.
pub const DEFAULT_METRICS: [&str; 2] = ["test_acc", "loss"];

/// Per-step metrics (from `train` records) and what they mean.
const STEP_METRICS: [(&str, &str); 6] = [
    ("loss", "training loss (mini-batch)"),
    ("acc", "training accuracy (mini-batch)"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm"),
    ("grad_evals", "gradient evaluations per step"),
    ("images_per_s", "throughput (images/s)"),
];

/// Per-evaluation metrics (from `eval` records) and what they mean.
const EVAL_METRICS: [(&str, &str); 6] = [
    ("test_acc", "test accuracy"),
    ("test_loss", "test loss"),
    ("train_acc", "training accuracy (evaluation)"),
    ("train_loss", "training loss (evaluation)"),
    (
        "train_acc_running",
        "training accuracy (running minibatch mean)",
    ),
    (
        "train_loss_running",
        "training loss (running minibatch mean)",
    ),
];

/// Width and height in pixels of one panel (at [`BASE_DPI`]).
const PANEL: (u32, u32) = (760, 460);
/// Height in pixels of the figure title band.
const TITLE_BAND: u32 = 48;
/// Pixels a legend-column label may take per character (DejaVu Sans at 15 px, generous).
const LEGEND_CHAR_W: u32 = 9;
/// The resolution at which a figure's nominal pixel sizes are meant (`--dpi 100`).
pub const BASE_DPI: u32 = 100;
/// A PNG is drawn this many times larger in each direction and averaged down.
const SUPERSAMPLE: u32 = 3;
/// Most pixels a supersampled PNG may be drawn on (a smaller factor is used above it).
const MAX_DRAWN_PIXELS: u64 = 48_000_000;
/// SVG drawing units per pixel (coordinates in tenths of a pixel).
const SVG_UNITS: u32 = 10;
/// Accepted `--width`/`--height`, in pixels at [`BASE_DPI`].
const SIZE_RANGE: std::ops::RangeInclusive<u32> = 200..=20_000;
/// Accepted `--dpi`.
const DPI_RANGE: std::ops::RangeInclusive<u32> = 25..=1200;
/// Most pixels of a PNG as written (`--width` x `--height` at `--dpi`).
const MAX_PNG_PIXELS: u64 = 100_000_000;
/// The line colours, one per run, in order (cycled beyond ten runs).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The font every figure's text is drawn with (see `cli/assets/fonts/LICENSE-DejaVu.txt`).
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// The metrics of one run folder.
#[derive(Clone, Debug)]
pub struct Run {
    /// The name the run goes by in legends and errors (its folder name).
    pub label: String,
    /// The run folder as given.
    pub dir: PathBuf,
    /// Every record of its `metrics.jsonl`, in file order.
    pub records: Vec<Record>,
}

impl Run {
    /// The `metrics.jsonl` file of the run.
    pub fn metrics_file(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
}

/// Whether a metric is recorded at every optimizer step or at each evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A `train` record per optimizer step.
    Step,
    /// An `eval` record per evaluated epoch.
    Eval,
    /// A `trace` record (Hessian trace, `flatmin train --trace-every`).
    Trace,
}

/// A metric that can be plotted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metric {
    /// Its name in `metrics.jsonl` (an `extra` key for optimizer-specific figures).
    pub name: String,
    /// Where its values come from.
    pub source: Source,
    /// A short human description (the panel caption).
    pub description: String,
}

impl Metric {
    /// True for accuracies, which are drawn in percent.
    pub fn is_accuracy(&self) -> bool {
        matches!(
            self.name.as_str(),
            "acc" | "test_acc" | "train_acc" | "train_acc_running"
        )
    }

    /// The metric's value in a record of the right kind, if finite.
    pub fn value(&self, r: &Record) -> Option<f64> {
        let wanted = match self.source {
            Source::Step => "train",
            Source::Eval => "eval",
            Source::Trace => "trace",
        };
        if r.kind != wanted {
            return None;
        }
        let v = match self.name.as_str() {
            "loss" => r.loss,
            "acc" => r.acc,
            "lr" => r.lr,
            "grad_norm" => r.grad_norm,
            "grad_evals" => r.grad_evals.map(|v| v as f64),
            "images_per_s" => r.images_per_s,
            "test_acc" => r.test_acc,
            "test_loss" => r.test_loss,
            "train_acc" => r.train_acc,
            "train_loss" => r.train_loss,
            "train_acc_running" => r.train_acc_running,
            "train_loss_running" => r.train_loss_running,
            other => r.extra.get(other).copied(),
        };
        v.filter(|v| v.is_finite())
    }
}

word_enum! {
    /// The horizontal axis (`--x`).
    XAxis, "axis" {
        /// Optimizer steps completed.
        Step => "step",
        /// Epochs completed (fractional between evaluations).
        Epoch => "epoch",
        /// Cumulative gradient evaluations (`grad_queries` of the records; records without it
        /// are left out).
        GradQueries => "grad_queries",
        /// Cumulative per-sample gradient evaluations (`grad_samples` of the records; records
        /// without it are left out).
        GradSamples => "grad_samples",
    }
}

/// The image format of an output file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A PNG bitmap.
    Png,
    /// An SVG drawing.
    Svg,
}

impl Format {
    /// The format named by the extension of `out` (`.png` or `.svg`, any case).
    pub fn of(out: &Path) -> Result<Self> {
        let ext = out
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("png") => Ok(Format::Png),
            Some("svg") => Ok(Format::Svg),
            _ => bail!(
                "--out {}: unknown image format (the file name must end in .png or .svg)",
                out.display()
            ),
        }
    }
}

/// What to draw.
#[derive(Clone, Debug)]
pub struct PlotOptions {
    /// Metric names, one panel each; empty for [`DEFAULT_METRICS`].
    pub metrics: Vec<String>,
    /// The horizontal axis.
    pub x: XAxis,
    /// Moving-average window of per-step metrics (1: none); `None` picks one from the
    /// number of steps (an odd number near 1/25 of them, at most 51).
    pub smooth: Option<usize>,
    /// Figure title; `None` for none.
    pub title: Option<String>,
    /// Logarithmic vertical axes (values that are not positive are left out).
    pub log_y: bool,
    /// Size and resolution of the image.
    pub canvas: Canvas,
}

impl Default for PlotOptions {
    /// The default metrics against steps, automatic smoothing, no title, linear axes.
    fn default() -> Self {
        PlotOptions {
            metrics: Vec::new(),
            x: XAxis::Step,
            smooth: None,
            title: None,
            log_y: false,
            canvas: Canvas::default(),
        }
    }
}

/// Size and resolution of a rendered figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Canvas {
    /// Width in pixels at [`BASE_DPI`]; `None`: two panels a row of 760 pixels, plus the legend.
    pub width: Option<u32>,
    /// Height in pixels at [`BASE_DPI`]; `None`: 460 pixels a row of panels, plus the title.
    pub height: Option<u32>,
    /// Pixels per inch of a PNG: 200 gives twice the pixels in each direction, text and lines
    /// scaled with them (an SVG is vector and ignores it).
    pub dpi: u32,
}

impl Default for Canvas {
    /// The figure's natural size at [`BASE_DPI`].
    fn default() -> Self {
        Canvas {
            width: None,
            height: None,
            dpi: BASE_DPI,
        }
    }
}

impl Canvas {
    /// Checks the flags' ranges (`--width`, `--height`, `--dpi`) and the PNG's pixel count.
    pub fn check(&self, fig: &Figure) -> Result<()> {
        for (flag, v) in [("--width", self.width), ("--height", self.height)] {
            if let Some(v) = v.filter(|v| !SIZE_RANGE.contains(v)) {
                bail!(
                    "{flag} {v}: must be {} to {} pixels",
                    SIZE_RANGE.start(),
                    SIZE_RANGE.end()
                );
            }
        }
        if !DPI_RANGE.contains(&self.dpi) {
            bail!(
                "--dpi {}: must be {} to {}",
                self.dpi,
                DPI_RANGE.start(),
                DPI_RANGE.end()
            );
        }
        let (w, h) = self.png_size(fig);
        if u64::from(w) * u64::from(h) > MAX_PNG_PIXELS {
            bail!(
                "--dpi {}: a {w}x{h} image is more than {MAX_PNG_PIXELS} pixels; lower --dpi or the size",
                self.dpi
            );
        }
        Ok(())
    }

    /// The figure's size in pixels at [`BASE_DPI`].
    pub fn size(&self, fig: &Figure) -> (u32, u32) {
        let natural = figure_size(fig);
        (
            self.width.unwrap_or(natural.0),
            self.height.unwrap_or(natural.1),
        )
    }

    /// The pixel size of the figure as a PNG at this resolution.
    pub fn png_size(&self, fig: &Figure) -> (u32, u32) {
        let (w, h) = self.size(fig);
        let at = |v: u32| (u64::from(v) * u64::from(self.dpi)).div_ceil(u64::from(BASE_DPI));
        (
            u32::try_from(at(w)).unwrap_or(u32::MAX),
            u32::try_from(at(h)).unwrap_or(u32::MAX),
        )
    }
}

/// Drawing units per pixel of the figure's nominal sizes (fonts, strokes, margins).
#[derive(Clone, Copy, Debug)]
struct Scale(f64);

impl Scale {
    /// A length in drawing units.
    fn u(self, px: u32) -> u32 {
        (f64::from(px) * self.0).round() as u32
    }

    /// A coordinate in drawing units.
    fn i(self, px: i32) -> i32 {
        (f64::from(px) * self.0).round() as i32
    }

    /// A font size in drawing units.
    fn font(self, px: u32) -> f64 {
        f64::from(px) * self.0
    }
}

/// One line of a panel.
#[derive(Clone, Debug)]
pub struct Line {
    /// The run's label.
    pub label: String,
    /// The points drawn (smoothed for per-step metrics).
    pub points: Vec<(f64, f64)>,
    /// The raw points behind a smoothed line, when smoothing changed anything.
    pub raw: Option<Vec<(f64, f64)>>,
    /// Marks each point (evaluation metrics).
    pub markers: bool,
}

/// One panel of a figure: one metric, one line per run.
#[derive(Clone, Debug)]
pub struct Panel {
    /// The metric.
    pub metric: Metric,
    /// Caption drawn above the panel.
    pub caption: String,
    /// Vertical axis label.
    pub y_label: String,
    /// The lines, in run order.
    pub lines: Vec<Line>,
}

/// A figure ready to draw.
#[derive(Clone, Debug)]
pub struct Figure {
    /// Title drawn above the panels.
    pub title: Option<String>,
    /// Horizontal axis label.
    pub x_label: String,
    /// Logarithmic vertical axes.
    pub log_y: bool,
    /// The panels, in the order asked for.
    pub panels: Vec<Panel>,
}

/// Reads the metrics of the run folder `dir`. Errors (one line each): no such folder, not a
/// folder, no `metrics.jsonl`, a line that is not a metrics record (naming file and line),
/// no record at all.
pub fn read_run(dir: &Path) -> Result<Run> {
    if !dir.exists() {
        bail!("{}: no such run folder", dir.display());
    }
    if !dir.is_dir() {
        bail!(
            "{}: not a folder (expected a run folder written by flatmin train)",
            dir.display()
        );
    }
    let file = dir.join("metrics.jsonl");
    if !file.is_file() {
        bail!("{}: not a run folder (no metrics.jsonl)", dir.display());
    }
    let bytes = flatmin_engine::fsread::read_regular_file(&file, crate::train::MAX_METRICS_BYTES)
        .with_context(|| format!("{}: cannot read", file.display()))?;
    let records = parse_run_records(&file, &bytes)?;
    Ok(Run {
        label: folder_name(dir),
        dir: dir.to_path_buf(),
        records,
    })
}

/// Parses the bytes of a run's `metrics.jsonl` (`file` only names it in errors) as
/// [`read_run`] does: every line a record of a known kind, at least one record. Built on
/// [`crate::train::parse_records`]; fuzzed by `fuzz/fuzz_targets/metrics.rs`.
pub fn parse_run_records(file: &Path, bytes: &[u8]) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for (line, r) in crate::train::parse_records(file, bytes)? {
        if !["train", "eval", "trace", "skip"].contains(&r.kind.as_str()) {
            bail!(
                "{}: line {line}: unknown record kind '{}' (train, eval, trace or skip)",
                file.display(),
                r.kind
            );
        }
        records.push(r);
    }
    if records.is_empty() {
        bail!("{}: no records yet", file.display());
    }
    Ok(records)
}

/// The last component of `dir` (resolving `.` and `..`), else the path as given.
fn folder_name(dir: &Path) -> String {
    let named = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    dir.canonicalize()
        .ok()
        .and_then(|p| named(&p))
        .or_else(|| named(dir))
        .unwrap_or_else(|| dir.display().to_string())
}

/// Reads several run folders (see [`read_run`]); runs whose folder names coincide are
/// labelled by their paths as given instead.
pub fn read_runs(dirs: &[PathBuf]) -> Result<Vec<Run>> {
    if dirs.is_empty() {
        bail!("no run folder given");
    }
    let mut runs = dirs
        .iter()
        .map(|d| read_run(d))
        .collect::<Result<Vec<_>>>()?;
    let labels: Vec<String> = runs.iter().map(|r| r.label.clone()).collect();
    for run in &mut runs {
        if labels.iter().filter(|l| **l == run.label).count() > 1 {
            run.label = run.dir.display().to_string();
        }
    }
    Ok(runs)
}

/// Every metric that can be plotted for `runs`: the fixed ones, then the optimizer extras
/// (`extra` keys of the step records) that any run has, alphabetically.
pub fn available_metrics(runs: &[Run]) -> Vec<Metric> {
    let mut out: Vec<Metric> = EVAL_METRICS
        .iter()
        .map(|(n, d)| (n, d, Source::Eval))
        .chain(STEP_METRICS.iter().map(|(n, d)| (n, d, Source::Step)))
        .map(|(n, d, source)| Metric {
            name: n.to_string(),
            source,
            description: d.to_string(),
        })
        .collect();
    let extras: BTreeSet<&String> = runs
        .iter()
        .flat_map(|r| &r.records)
        .filter(|r| r.kind == "train")
        .flat_map(|r| r.extra.keys())
        .collect();
    for name in extras {
        if !out.iter().any(|m| &m.name == name) {
            out.push(Metric {
                name: name.clone(),
                source: Source::Step,
                description: name.replace('_', " "),
            });
        }
    }
    let traces: BTreeSet<&String> = runs
        .iter()
        .flat_map(|r| &r.records)
        .filter(|r| r.kind == "trace")
        .flat_map(|r| r.extra.keys())
        .collect();
    for name in traces {
        if !out.iter().any(|m| &m.name == name) {
            let description = match name.as_str() {
                "trace_norm" => "normalized Hessian trace tr(H)/d on the trace subset".into(),
                "trace" => "Hessian trace tr(H) on the trace subset".into(),
                _ => name.replace('_', " "),
            };
            out.push(Metric {
                name: name.clone(),
                source: Source::Trace,
                description,
            });
        }
    }
    out
}

/// The metric called `name`, or an error listing the available ones.
pub fn find_metric(name: &str, runs: &[Run]) -> Result<Metric> {
    let all = available_metrics(runs);
    if let Some(m) = all.iter().find(|m| m.name == name) {
        return Ok(m.clone());
    }
    let names: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
    bail!(
        "--metric {name}: unknown metric (available: {}){}",
        names.join(", "),
        crate::suggest::did_you_mean(name, names.iter())
    )
}

/// Optimizer steps per epoch, from the step records (a step `s` of epoch `e`, counted from 1,
/// satisfies `(e - 1) * n < s <= e * n`); `None` without step records.
fn steps_per_epoch(run: &Run) -> Option<f64> {
    run.records
        .iter()
        .filter(|r| r.kind == "train" && r.step > 0)
        .map(|r| r.step.div_ceil(r.epoch.max(1)))
        .max()
        .map(|n| n as f64)
}

/// The points `(x, value)` of `metric` in `run`, in record order; an error when the run has
/// none.
pub fn series(run: &Run, metric: &Metric, x: XAxis) -> Result<Vec<(f64, f64)>> {
    let per_epoch = steps_per_epoch(run);
    let scale = if metric.is_accuracy() { 100.0 } else { 1.0 };
    let points: Vec<(f64, f64)> = run
        .records
        .iter()
        .filter_map(|r| {
            let v = metric.value(r)?;
            let at = match (x, per_epoch) {
                (XAxis::GradQueries, _) => r.grad_queries? as f64,
                (XAxis::GradSamples, _) => r.grad_samples? as f64,
                (XAxis::Step, _) => r.step as f64,
                (XAxis::Epoch, Some(n)) => r.step as f64 / n,
                (XAxis::Epoch, None) => r.epoch as f64,
            };
            Some((at, v * scale))
        })
        .collect();
    if points.is_empty() {
        bail!(
            "--metric {}: run {} has no values of it ({})",
            metric.name,
            run.label,
            run.metrics_file().display()
        );
    }
    Ok(points)
}

/// Centred moving average of the values over `window` points (fewer at the ends).
pub fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let n = points.len();
    if window <= 1 || n == 0 {
        return points.to_vec();
    }
    let mut prefix = Vec::with_capacity(n + 1);
    prefix.push(0.0);
    for (_, y) in points {
        prefix.push(prefix.last().copied().unwrap_or(0.0) + y);
    }
    let (before, after) = ((window - 1) / 2, window / 2);
    (0..n)
        .map(|i| {
            let lo = i.saturating_sub(before);
            let hi = (i + after + 1).min(n);
            (points[i].0, (prefix[hi] - prefix[lo]) / (hi - lo) as f64)
        })
        .collect()
}

/// The automatic smoothing window for series of up to `n` points: odd, about `n / 25`, at
/// most 51 (none below 50 points).
fn auto_window(n: usize) -> usize {
    ((n / 25) | 1).clamp(1, 51)
}

/// Builds the figure of `opts` for `runs`. Errors: an unknown metric, a metric a run lacks
/// (only for metrics asked for; a default metric that some run lacks is left out), a zero
/// smoothing window, a log axis with no positive value.
pub fn figure(runs: &[Run], opts: &PlotOptions) -> Result<Figure> {
    if opts.smooth == Some(0) {
        bail!("--smooth must be at least 1 (1: no smoothing)");
    }
    let defaults = opts.metrics.is_empty();
    let names: Vec<String> = if defaults {
        DEFAULT_METRICS.iter().map(|s| s.to_string()).collect()
    } else {
        opts.metrics.clone()
    };
    let mut panels = Vec::new();
    let mut seen = BTreeSet::new();
    for name in &names {
        if !seen.insert(name.clone()) {
            continue;
        }
        let metric = find_metric(name, runs)?;
        let all: Result<Vec<_>> = runs.iter().map(|r| series(r, &metric, opts.x)).collect();
        let all = match all {
            Ok(all) => all,
            Err(_) if defaults => continue,
            Err(e) => return Err(e),
        };
        panels.push(panel(runs, metric, all, opts)?);
    }
    if panels.is_empty() {
        let names = DEFAULT_METRICS.join(" and ");
        bail!("the runs have no {names} values in common yet; pick metrics with --metric");
    }
    Ok(Figure {
        title: opts.title.clone(),
        x_label: opts.x.name().to_string(),
        log_y: opts.log_y,
        panels,
    })
}

/// One panel from the points of every run.
fn panel(
    runs: &[Run],
    metric: Metric,
    all: Vec<Vec<(f64, f64)>>,
    opts: &PlotOptions,
) -> Result<Panel> {
    let smoothable =
        metric.source == Source::Step && metric.name != "lr" && metric.name != "grad_evals";
    let longest = all.iter().map(Vec::len).max().unwrap_or(0);
    let window = if smoothable {
        opts.smooth.unwrap_or_else(|| auto_window(longest))
    } else {
        1
    };
    let mut lines = Vec::new();
    for (run, mut points) in runs.iter().zip(all) {
        points.retain(|p| drawable(p.1, opts.log_y));
        let (points, raw) = if window > 1 && points.len() > 1 {
            (moving_average(&points, window), Some(points))
        } else {
            (points, None)
        };
        lines.push(Line {
            label: run.label.clone(),
            points,
            raw,
            markers: metric.source != Source::Step,
        });
    }
    if lines.iter().all(|l| l.points.is_empty()) {
        if opts.log_y {
            bail!(
                "--log-y: metric {} has no values from {LOG_FLOOR:e} to {PLOT_LIMIT:e} (positive \
                 and not huge) to draw on a log axis",
                metric.name
            );
        }
        bail!(
            "--metric {}: every value is beyond ±{PLOT_LIMIT:e}, too large to plot",
            metric.name
        );
    }
    let mut caption = metric.description.clone();
    if window > 1 {
        caption.push_str(&format!(", moving average of {window}"));
    }
    let y_label = if metric.is_accuracy() {
        format!("{} (%)", metric.name)
    } else {
        metric.name.clone()
    };
    Ok(Panel {
        metric,
        caption,
        y_label,
        lines,
    })
}

/// Reads the run folders, builds the figure and writes it to `out` (PNG or SVG by its
/// extension).
pub fn plot_runs(dirs: &[PathBuf], opts: &PlotOptions, out: &Path) -> Result<()> {
    let format = Format::of(out)?;
    let runs = read_runs(dirs)?;
    let fig = figure(&runs, opts)?;
    render_on(&fig, out, format, &opts.canvas)
}

/// The pixel size of a figure: two panels a row (one when there is a single panel).
pub fn figure_size(fig: &Figure) -> (u32, u32) {
    let n = fig.panels.len().max(1) as u32;
    let cols = n.min(2);
    let rows = n.div_ceil(cols);
    let title = if fig.title.is_some() { TITLE_BAND } else { 0 };
    (
        cols * PANEL.0 + legend_column_width(fig),
        rows * PANEL.1 + title,
    )
}

/// The lines every panel has, one per run in run order (labels and colours are the same in
/// every panel).
fn legend_lines(fig: &Figure) -> &[Line] {
    fig.panels.first().map_or(&[], |p| &p.lines[..])
}

/// The width in pixels of the figure's one legend, a column right of the panels (0 when
/// there is no line to name).
pub fn legend_column_width(fig: &Figure) -> u32 {
    let lines = legend_lines(fig);
    if lines.is_empty() {
        return 0;
    }
    let chars = lines.iter().map(|l| l.label.chars().count()).max();
    56 + LEGEND_CHAR_W * chars.unwrap_or(0) as u32
}

/// Draws the legend column: a coloured stroke and the label of each run, top down.
fn draw_legend_column<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    fig: &Figure,
    sc: Scale,
) -> Result<()> {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let font = ("sans-serif", sc.font(15))
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for (i, line) in legend_lines(fig).iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let y = sc.i(56 + 24 * i as i32);
        area.draw(&PathElement::new(
            vec![(sc.i(8), y), (sc.i(36), y)],
            color.stroke_width(sc.u(3)),
        ))
        .map_err(draw_error)?;
        area.draw_text(&line.label, &font, (sc.i(46), y))
            .map_err(draw_error)?;
    }
    Ok(())
}

/// Draws `fig` into `out` (written atomically) at its natural size.
pub fn render(fig: &Figure, out: &Path, format: Format) -> Result<()> {
    render_on(fig, out, format, &Canvas::default())
}

/// Draws `fig` into `out` (written atomically) at the canvas's size and resolution.
pub fn render_on(fig: &Figure, out: &Path, format: Format, canvas: &Canvas) -> Result<()> {
    register_font()?;
    canvas.check(fig)?;
    let bytes = match format {
        Format::Png => render_png(fig, canvas)?,
        Format::Svg => render_svg(fig, canvas)?.into_bytes(),
    };
    flatmin_models::io::write_atomic(out, &bytes)
        .with_context(|| format!("--out {}: cannot write the figure", out.display()))?;
    Ok(())
}

/// The figure as PNG bytes: drawn supersampled, then each block of pixels averaged into one.
fn render_png(fig: &Figure, canvas: &Canvas) -> Result<Vec<u8>> {
    let size = canvas.png_size(fig);
    let pixels = u64::from(size.0) * u64::from(size.1);
    let k = (1..=SUPERSAMPLE)
        .rev()
        .find(|k| pixels * u64::from(k * k) <= MAX_DRAWN_PIXELS)
        .unwrap_or(1);
    let drawn = (size.0 * k, size.1 * k);
    let mut rgb = vec![0u8; drawn.0 as usize * drawn.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, drawn).into_drawing_area();
        let sc = Scale(f64::from(canvas.dpi) / f64::from(BASE_DPI) * f64::from(k));
        draw_figure(&root, fig, sc)?;
        root.present().map_err(draw_error)?;
    }
    encode_png(&downsample(&rgb, drawn, k), size, canvas.dpi)
}

/// Averages each `k` x `k` block of an RGB image of size `drawn` into one pixel.
fn downsample(rgb: &[u8], drawn: (u32, u32), k: u32) -> Vec<u8> {
    if k == 1 {
        return rgb.to_vec();
    }
    let (w, k) = (drawn.0 as usize, k as usize);
    let (ow, oh) = (w / k, drawn.1 as usize / k);
    let mut out = vec![0u8; ow * oh * 3];
    let mut sums = vec![0u32; ow * 3];
    for oy in 0..oh {
        sums.fill(0);
        for row in rgb[oy * k * w * 3..(oy + 1) * k * w * 3].chunks_exact(w * 3) {
            for (i, &v) in row[..ow * k * 3].iter().enumerate() {
                sums[(i / 3 / k) * 3 + i % 3] += u32::from(v);
            }
        }
        let n = (k * k) as u32;
        for (o, &t) in out[oy * ow * 3..(oy + 1) * ow * 3].iter_mut().zip(&sums) {
            *o = ((t + n / 2) / n) as u8;
        }
    }
    out
}

/// The figure as SVG text, drawn in tenths of a pixel: the root element keeps the figure's
/// size and its `viewBox` spans the finer drawing units.
fn render_svg(fig: &Figure, canvas: &Canvas) -> Result<String> {
    let (w, h) = canvas.size(fig);
    let drawn = (w * SVG_UNITS, h * SVG_UNITS);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, drawn).into_drawing_area();
        draw_figure(&root, fig, Scale(f64::from(SVG_UNITS)))?;
        root.present().map_err(draw_error)?;
    }
    let drawn_size = format!("width=\"{}\" height=\"{}\"", drawn.0, drawn.1);
    let shown_size = format!("width=\"{w}\" height=\"{h}\"");
    if !svg.contains(&drawn_size) {
        bail!("cannot draw the figure: unexpected SVG header");
    }
    Ok(svg.replacen(&drawn_size, &shown_size, 1))
}

/// Registers the embedded font as `sans-serif` (once per process).
fn register_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if !ok {
        bail!("the embedded font could not be loaded");
    }
    Ok(())
}

/// A drawing error as an `anyhow` error.
fn draw_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("cannot draw the figure: {e}")
}

/// An 8-bit RGB buffer as PNG bytes, its resolution recorded as `dpi`.
fn encode_png(rgb: &[u8], (w, h): (u32, u32), dpi: u32) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut bytes, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let per_meter = (f64::from(dpi) / 0.0254).round() as u32;
    enc.set_pixel_dims(Some(png::PixelDimensions {
        xppu: per_meter,
        yppu: per_meter,
        unit: png::Unit::Meter,
    }));
    let mut writer = enc.write_header().context("cannot encode the PNG")?;
    writer
        .write_image_data(rgb)
        .context("cannot encode the PNG")?;
    writer.finish().context("cannot encode the PNG")?;
    Ok(bytes)
}

/// Draws the title and every panel on `root`.
fn draw_figure<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    fig: &Figure,
    sc: Scale,
) -> Result<()> {
    root.fill(&WHITE).map_err(draw_error)?;
    let body = match &fig.title {
        Some(t) => {
            let (top, rest) = root.split_vertically(sc.u(TITLE_BAND));
            top.draw_text(
                t,
                &("sans-serif", sc.font(26))
                    .into_font()
                    .color(&BLACK)
                    .pos(text_anchor_center()),
                (
                    (root.dim_in_pixel().0 / 2) as i32,
                    (sc.u(TITLE_BAND) / 2) as i32,
                ),
            )
            .map_err(draw_error)?;
            rest
        }
        None => root.clone(),
    };
    let legend_w = sc
        .u(legend_column_width(fig))
        .min(body.dim_in_pixel().0 / 2);
    let body = if legend_w > 0 {
        let (panels, legend) = body.split_horizontally(body.dim_in_pixel().0 - legend_w);
        draw_legend_column(&legend, fig, sc)?;
        panels
    } else {
        body
    };
    let n = fig.panels.len().max(1);
    let cols = n.min(2);
    let rows = n.div_ceil(cols);
    let areas = body.split_evenly((rows, cols));
    for (panel, area) in fig.panels.iter().zip(&areas) {
        draw_panel(area, fig, panel, sc)?;
    }
    Ok(())
}

/// Centred text anchor (for the title).
fn text_anchor_center() -> plotters::style::text_anchor::Pos {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    Pos::new(HPos::Center, VPos::Center)
}

/// Largest magnitude of a value that is drawn: larger ones (a diverged run's loss of 1e308)
/// are left out like NaN and infinity, so that axis ranges, their padding, moving averages
/// and tick arithmetic stay finite and every tick loop is short.
pub const PLOT_LIMIT: f64 = 1e300;
/// Smallest value drawn on a log axis (the log axis spans at most 10^-307 to 10^307).
pub const LOG_FLOOR: f64 = 1e-300;

/// True when `v` can be drawn: within ±[`PLOT_LIMIT`], and on a log axis at least
/// [`LOG_FLOOR`].
fn drawable(v: f64, log_y: bool) -> bool {
    if log_y {
        (LOG_FLOOR..=PLOT_LIMIT).contains(&v)
    } else {
        v.abs() <= PLOT_LIMIT
    }
}

/// The extent of the points of a panel: `(x range, y range)`, padded a little. The points
/// are [`drawable`], so every bound is finite (a log axis's within 10^±307).
fn extent(panel: &Panel, log_y: bool) -> (Range<f64>, Range<f64>) {
    let pts = panel
        .lines
        .iter()
        .flat_map(|l| l.points.iter().chain(l.raw.iter().flatten()))
        .filter(|p| !log_y || p.1 > 0.0);
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, if log_y { 0.1 } else { 0.0 }, 1.0);
    }
    let x0 = x0.min(0.0);
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let y = if log_y {
        let (lo, hi) = if y1 > y0 {
            (y0, y1)
        } else {
            (y0 / 2.0, y0 * 2.0)
        };
        // In powers of ten: hi / lo may overflow (1e300 / 1e-300).
        let (l0, l1) = (lo.log10(), hi.log10());
        let pad = 0.05 * (l1 - l0);
        10f64.powf((l0 - pad).max(-307.0))..10f64.powf((l1 + pad).min(307.0))
    } else {
        let (lo, hi) = if y1 > y0 {
            (y0, y1)
        } else {
            let d = if y0 == 0.0 { 1.0 } else { y0.abs() * 0.1 };
            (y0 - d, y0 + d)
        };
        let pad = 0.05 * (hi - lo);
        lo - pad..hi + pad
    };
    (x0..x1, y)
}

/// Draws one panel, on a linear or logarithmic vertical axis.
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    fig: &Figure,
    panel: &Panel,
    sc: Scale,
) -> Result<()> {
    let (x, y) = extent(panel, fig.log_y);
    if fig.log_y {
        let y = LogAxis {
            lo: y.start,
            hi: y.end,
        };
        draw_chart(area, fig, panel, (x, y), sc)
    } else {
        draw_chart(area, fig, panel, (x, y), sc)
    }
}

/// A logarithmic axis from `lo` to `hi` (both positive) whose ticks are 1, 2 and 5 times
/// powers of ten, or every power of ten, or every digit, whichever fits the room; a range
/// narrower than a digit step gets linear ticks.
#[derive(Clone, Copy, Debug)]
struct LogAxis {
    lo: f64,
    hi: f64,
}

impl LogAxis {
    /// The values `m * 10^k` inside the axis for every mantissa `m` of `mantissas`, keeping
    /// every `stride`-th power of ten.
    fn ticks(&self, mantissas: &[f64], stride: i32) -> Vec<f64> {
        let (first, last) = (
            self.lo.log10().floor() as i32,
            self.hi.log10().ceil() as i32,
        );
        let mut out = Vec::new();
        for k in (first..=last).filter(|k| k.rem_euclid(stride) == 0) {
            for m in mantissas {
                let v = m * 10f64.powi(k);
                if v >= self.lo && v <= self.hi {
                    out.push(v);
                }
            }
        }
        out
    }
}

impl Ranged for LogAxis {
    type FormatOption = plotters::coord::ranged1d::DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let t = (value.ln() - self.lo.ln()) / (self.hi.ln() - self.lo.ln());
        limit.0 + (t * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: plotters::coord::ranged1d::KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        let max = hint.max_num_points();
        let digits: Vec<f64> = (1..10).map(f64::from).collect();
        for set in [&digits[..], &[1.0, 2.0, 5.0], &[1.0]] {
            let t = self.ticks(set, 1);
            if t.len() <= max && t.len() >= 2 {
                return t;
            }
            if t.len() < 2 {
                // Too narrow for log ticks: plain linear ones.
                let linear: RangedCoordf64 = (self.lo..self.hi).into();
                return linear.key_points(max);
            }
        }
        let mut stride = 2;
        loop {
            let t = self.ticks(&[1.0], stride);
            if t.len() <= max.max(1) {
                return t;
            }
            stride *= 2;
        }
    }

    fn range(&self) -> Range<f64> {
        self.lo..self.hi
    }
}

/// A tick label: the value to six significant digits without trailing zeros (ticks are
/// round numbers, so this shows them exactly and hides floating-point noise), in
/// scientific notation below 0.001 and from 10^7 on.
fn tick_label(v: f64) -> String {
    fn trim(s: &str) -> &str {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.')
        } else {
            s
        }
    }
    let a = v.abs();
    if a == 0.0 {
        return "0".into();
    }
    if !(1e-3..1e7).contains(&a) {
        let sci = format!("{v:.5e}");
        let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
        return format!("{}e{exp}", trim(mantissa));
    }
    let decimals = (5 - a.log10().floor() as i32).max(0) as usize;
    trim(&format!("{v:.decimals$}")).to_string()
}

/// Draws the axes and lines of one panel in the coordinates `x` by `y`.
fn draw_chart<DB, Y>(
    area: &DrawingArea<DB, Shift>,
    fig: &Figure,
    panel: &Panel,
    (x, y): (Range<f64>, Y),
    sc: Scale,
) -> Result<()>
where
    DB: DrawingBackend,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.caption, ("sans-serif", sc.font(20)))
        .margin(sc.u(14))
        .x_label_area_size(sc.u(46))
        .y_label_area_size(sc.u(70))
        .build_cartesian_2d(x, y)
        .map_err(draw_error)?;
    let fmt = |v: &f64| tick_label(*v);
    chart
        .configure_mesh()
        .x_desc(&fig.x_label)
        .y_desc(&panel.y_label)
        .x_label_formatter(&fmt)
        .y_label_formatter(&fmt)
        .label_style(("sans-serif", sc.font(14)))
        .axis_desc_style(("sans-serif", sc.font(16)))
        .set_all_tick_mark_size(sc.u(5))
        .axis_style(BLACK.stroke_width(sc.u(1)))
        .light_line_style(BLACK.mix(0.05).stroke_width(sc.u(1)))
        .bold_line_style(BLACK.mix(0.15).stroke_width(sc.u(1)))
        .draw()
        .map_err(draw_error)?;
    for (i, line) in panel.lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        if let Some(raw) = &line.raw {
            chart
                .draw_series(LineSeries::new(
                    raw.iter().copied(),
                    color.mix(0.25).stroke_width(sc.u(1)),
                ))
                .map_err(draw_error)?;
        }
        chart
            .draw_series(LineSeries::new(
                line.points.iter().copied(),
                color.stroke_width(sc.u(2)),
            ))
            .map_err(draw_error)?;
        if line.markers {
            let r = sc.u(4);
            chart
                .draw_series(
                    line.points
                        .iter()
                        .map(|&p| Circle::new(p, r, color.filled())),
                )
                .map_err(draw_error)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_average_is_centred_and_keeps_length() {
        let p: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, i as f64)).collect();
        let s = moving_average(&p, 3);
        assert_eq!(s.len(), 5);
        assert_eq!(s[0], (0.0, 0.5));
        assert_eq!(s[2], (2.0, 2.0));
        assert_eq!(s[4], (4.0, 3.5));
        assert_eq!(moving_average(&p, 1), p);
    }

    /// A figure of two panels with one line per run.
    fn figure_of(runs: usize) -> Figure {
        Figure {
            title: Some("t".into()),
            x_label: "step".into(),
            log_y: false,
            panels: ["test_acc", "loss"]
                .iter()
                .map(|name| Panel {
                    metric: Metric {
                        name: name.to_string(),
                        description: name.to_string(),
                        source: Source::Eval,
                    },
                    caption: name.to_string(),
                    y_label: name.to_string(),
                    lines: (0..runs)
                        .map(|i| Line {
                            label: format!("rho-0.01_eta-prime-{i}"),
                            points: vec![(0.0, i as f64), (10.0, 1.0)],
                            raw: None,
                            markers: true,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn one_legend_column_beside_the_panels_for_any_number_of_runs() {
        let dir = std::env::temp_dir().join(format!("flatmin-legend-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for runs in [1, 2, 9] {
            let fig = figure_of(runs);
            let w = legend_column_width(&fig);
            assert!(w >= 20 * LEGEND_CHAR_W, "{w}");
            assert_eq!(figure_size(&fig), (2 * PANEL.0 + w, PANEL.1 + TITLE_BAND));
            let svg_path = dir.join(format!("{runs}.svg"));
            render(&fig, &svg_path, Format::Svg).unwrap();
            let svg = std::fs::read_to_string(&svg_path).unwrap();
            // Every label once: in the legend column, not again inside each panel.
            for i in 0..runs {
                let label = format!("eta-prime-{i}\n</text>");
                assert_eq!(svg.matches(&label).count(), 1, "{runs} runs, run {i}");
            }
        }
        assert_eq!(legend_column_width(&figure_of(0)), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn svg_keeps_its_size_and_draws_in_tenths_of_a_pixel() {
        let fig = figure_of(2);
        let (w, h) = figure_size(&fig);
        let svg = render_svg(&fig, &Canvas::default()).unwrap();
        let head = &svg[..svg.find('>').unwrap()];
        let expected = format!(
            "width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {} {}\"",
            w * SVG_UNITS,
            h * SVG_UNITS
        );
        assert!(head.contains(&expected), "{head}");
    }

    #[test]
    fn png_size_follows_width_height_and_dpi_and_its_edges_are_smoothed() {
        let fig = figure_of(2);
        let canvas = Canvas {
            width: Some(900),
            height: Some(500),
            dpi: 200,
        };
        assert_eq!(canvas.png_size(&fig), (1800, 1000));
        canvas.check(&fig).unwrap();
        let png = render_png(&fig, &canvas).unwrap();
        let be = |i: usize| u32::from_be_bytes(png[i..i + 4].try_into().unwrap());
        assert_eq!((be(16), be(20)), (1800, 1000));
        // 200 dpi recorded as pixels per metre.
        let phys = png.windows(4).position(|w| w == b"pHYs").unwrap();
        assert_eq!(be(phys + 4), 7874);
        for bad in [
            Canvas { dpi: 0, ..canvas },
            Canvas {
                width: Some(10),
                ..canvas
            },
            Canvas {
                height: Some(1 << 30),
                ..canvas
            },
            Canvas {
                dpi: 1200,
                width: Some(20_000),
                height: Some(20_000),
            },
        ] {
            assert!(bad.check(&fig).is_err(), "{bad:?}");
        }
        // Anti-aliasing: a 2x2 block of black and white averages to grey.
        let small = downsample(&[0, 0, 0, 255, 255, 255, 0, 0, 0, 255, 255, 255], (2, 2), 2);
        assert_eq!(small, vec![128, 128, 128]);
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(0.25), "0.25");
        assert_eq!(tick_label(12.5), "12.5");
        assert_eq!(tick_label(300.0), "300");
        assert_eq!(tick_label(-0.7000000000000001), "-0.7");
        assert_eq!(tick_label(2.2620000000000005), "2.262");
        assert_eq!(tick_label(150000.0), "150000");
        assert_eq!(tick_label(1e-5), "1e-5");
        assert_eq!(tick_label(2.5e-4), "2.5e-4");
        assert_eq!(tick_label(3e8), "3e8");
    }

    #[test]
    fn log_axis_ticks() {
        let close = |a: Vec<f64>, b: &[f64]| {
            assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
            for (x, y) in a.iter().zip(b) {
                assert!((x / y - 1.0).abs() < 1e-12, "{a:?} vs {b:?}");
            }
        };
        let axis = LogAxis { lo: 0.6, hi: 1.9 };
        close(axis.key_points(10), &[0.6, 0.7, 0.8, 0.9, 1.0]);
        let wide = LogAxis { lo: 1e-5, hi: 0.05 };
        close(wide.key_points(5), &[1e-5, 1e-4, 1e-3, 1e-2]);
        close(wide.key_points(2), &[1e-4, 1e-2]);
        close(
            wide.key_points(13),
            &[
                1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2,
            ],
        );
    }

    #[test]
    fn epochs_from_steps() {
        let rec = |kind: &str, epoch, step| Record {
            kind: kind.into(),
            epoch,
            step,
            loss: Some(1.0),
            test_acc: Some(0.5),
            ..Record::default()
        };
        let run = Run {
            label: "r".into(),
            dir: PathBuf::from("r"),
            records: vec![
                rec("train", 1, 1),
                rec("train", 1, 2),
                rec("eval", 1, 2),
                rec("train", 2, 3),
            ],
        };
        let m = find_metric("test_acc", std::slice::from_ref(&run)).unwrap();
        assert_eq!(series(&run, &m, XAxis::Epoch).unwrap(), vec![(1.0, 50.0)]);
        let m = find_metric("loss", std::slice::from_ref(&run)).unwrap();
        assert_eq!(series(&run, &m, XAxis::Epoch).unwrap()[2], (1.5, 1.0));
    }
}

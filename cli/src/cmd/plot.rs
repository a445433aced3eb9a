//! `flatmin plot`: compare training runs in one figure (one panel per metric, one line per
//! run), as PNG or SVG.

use anyhow::Result;
use clap::Args;
use flatmin::plot::{plot_runs, Canvas, PlotOptions, XAxis, BASE_DPI};
use std::path::PathBuf;

/// Arguments of `flatmin plot`.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Run folders written by `flatmin train` (one line per run, labelled by folder name).
    #[arg(value_name = "RUN", required = true)]
    pub runs: Vec<PathBuf>,
    /// Metric to draw, one panel each (repeatable): test_acc, test_loss, train_acc,
    /// train_loss (per evaluation; train_acc_running, train_loss_running: the epoch's running
    /// minibatch means), loss, acc, lr, grad_norm, grad_evals, images_per_s
    /// (per step), trace_norm, trace (with --trace-every), or an optimizer extra [default: test_acc and loss].
    #[arg(long = "metric", value_name = "NAME", help_heading = "Panels")]
    pub metrics: Vec<String>,
    /// Horizontal axis.
    #[arg(long, value_name = "AXIS", value_enum, default_value_t = XAxis::Step, help_heading = "Panels")]
    pub x: XAxis,
    /// Output image, .png or .svg [default: RUN/plot.png for one run, plot.png for several].
    #[arg(long, value_name = "FILE", help_heading = "Image")]
    pub out: Option<PathBuf>,
    /// Figure title.
    #[arg(long, value_name = "T", help_heading = "Image")]
    pub title: Option<String>,
    /// Logarithmic vertical axes.
    #[arg(long, help_heading = "Panels")]
    pub log_y: bool,
    /// Moving-average window of per-step metrics, 1 for none [default: about 1/40 of the
    /// steps, at most 50].
    #[arg(long, value_name = "N", help_heading = "Panels")]
    pub smooth: Option<usize>,
    /// Figure width in pixels at 100 dpi [default: 760 per panel column, plus the legend].
    #[arg(long, value_name = "PX", help_heading = "Image")]
    pub width: Option<u32>,
    /// Figure height in pixels at 100 dpi [default: 460 per panel row, plus the title].
    #[arg(long, value_name = "PX", help_heading = "Image")]
    pub height: Option<u32>,
    /// Resolution of a PNG: 200 doubles its pixels in each direction, text and lines included
    /// (an SVG ignores it).
    #[arg(long, value_name = "N", default_value_t = BASE_DPI, help_heading = "Image")]
    pub dpi: u32,
}

/// Runs `flatmin plot`.
pub fn run(args: &PlotArgs) -> Result<()> {
    let opts = PlotOptions {
        metrics: args.metrics.clone(),
        x: args.x,
        smooth: args.smooth,
        title: args.title.clone(),
        log_y: args.log_y,
        canvas: Canvas {
            width: args.width,
            height: args.height,
            dpi: args.dpi,
        },
    };
    let out = match (&args.out, args.runs.as_slice()) {
        (Some(out), _) => out.clone(),
        (None, [one]) => one.join("plot.png"),
        (None, _) => PathBuf::from("plot.png"),
    };
    plot_runs(&args.runs, &opts, &out)?;
    println!("wrote {}", out.display());
    Ok(())
}

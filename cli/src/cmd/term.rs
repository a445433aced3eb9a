//! What the terminal gets: colour (clap's help and errors) and live progress (indicatif
//! bars), both decided from the environment and the stream they go to.
//!
//! `NO_COLOR` (set, non-empty) turns colour off; `TERM=dumb` turns colour and live bars off;
//! a stream that is not a terminal gets neither. Progress, bar or plain lines, always goes to
//! stderr, so stdout carries only results.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// True when `TERM` is `dumb` (a terminal that cannot move the cursor or show colour).
fn dumb_terminal() -> bool {
    std::env::var_os("TERM").is_some_and(|t| t == "dumb")
}

/// True when `NO_COLOR` is set to a non-empty value (<https://no-color.org>).
fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// Colour for clap's help and error text: never under `NO_COLOR` or `TERM=dumb`, else
/// where the stream is a terminal.
pub fn color_choice() -> clap::ColorChoice {
    if no_color() || dumb_terminal() {
        clap::ColorChoice::Never
    } else {
        clap::ColorChoice::Auto
    }
}

/// True when progress on stderr may be drawn live (a bar redrawn in place): stderr is a
/// terminal and `TERM` is not `dumb`. Otherwise progress is plain lines, or nothing.
pub fn live_progress() -> bool {
    std::io::stderr().is_terminal() && !dumb_terminal()
}

/// A progress bar on stderr with its position, total, rate and ETA (a spinner with the
/// count when `total` is `None`), labelled `prefix`; hidden when `show` is false or
/// progress cannot be drawn live ([`live_progress`]).
pub fn bar(prefix: &str, total: Option<u64>, unit: &str, show: bool) -> ProgressBar {
    let target = if show && live_progress() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(total, target);
    restyle(&bar, prefix, total.is_some(), unit);
    bar
}

/// Gives `bar` the label `prefix` and the look of a bar with a total (position/total, ETA)
/// or, when `total_known` is false, of a spinner with the count and the time so far.
pub fn restyle(bar: &ProgressBar, prefix: &str, total_known: bool, unit: &str) {
    let template = if total_known {
        format!("{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}} ETA {{eta}}")
    } else {
        format!("{{prefix}} {{spinner}} {{pos}} {unit} {{msg}} {{elapsed}}")
    };
    bar.set_style(
        ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
}

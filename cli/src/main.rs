//! `flatmin`: the command line of the flatmin stack.
//!
//! Each subcommand lives in its own module under `cmd/`. A malformed command line gets
//! clap's own error (the error, a tip such as "a similar argument exists", the usage line)
//! and exit status 2; every other failure ends the process with one line on stderr,
//! `error: <message>`, and status 1; no user input makes it panic.

mod cmd;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

/// Flat-minima research on the CPU: exact Hessian-vector products, training, traces.
#[derive(Debug, Parser)]
#[command(name = "flatmin", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model on CIFAR-10 (or the built-in synthetic stand-in) into a run folder.
    Train(Box<cmd::train::TrainArgs>),
    /// Loss, logits, gradient and one exact Hessian-vector product of a model on a batch.
    Hvp(cmd::hvp::HvpArgs),
    /// Time gradients, HVPs, batched HVPs and GEMM (last line: JSON).
    Bench(cmd::bench::BenchArgs),
    /// Download and install datasets (`data fetch cifar10`).
    Data(cmd::data::DataArgs),
    /// Compare runs in one figure: one panel per metric, one line per run (PNG or SVG).
    Plot(cmd::plot::PlotArgs),
    /// Loss and accuracy of a run's model (or a checkpoint) on the test or training split.
    Eval(cmd::eval::EvalArgs),
    /// Hessian trace of a model on images: exact (structural or basis HVPs) or estimated,
    /// with a per-tensor breakdown; top eigenvalues (Lanczos) or spectral density (SLQ).
    Trace(Box<cmd::trace::TraceArgs>),
    /// Top Hessian eigenvalues by Lanczos with full reorthogonalization (`--top K`).
    Eigen(Box<cmd::trace::EigenArgs>),
    /// Hessian spectral density by stochastic Lanczos quadrature, as a table and a plot
    /// (`--out density.svg`).
    Density(Box<cmd::trace::DensityArgs>),
    /// Run a grid of `flatmin train` settings (N at a time, or as a GNU parallel job list /
    /// Slurm array), then summarize it in a table and a plot.
    Sweep(Box<cmd::sweep::SweepArgs>),
    /// Export runs' records for other tools: TensorBoard event files (`--tensorboard DIR`).
    Export(cmd::export::ExportArgs),
    /// Print a shell completion script (`flatmin completions bash > ...`).
    Completions(cmd::shell::CompletionsArgs),
    /// Print the manual page, or write one page per command with `--out DIR`.
    Man(cmd::shell::ManArgs),
}

/// Parses the command line, with colour as [`cmd::term::color_choice`] allows.
fn parse() -> Result<Cli, clap::Error> {
    let mut command = Cli::command().color(cmd::term::color_choice());
    let mut matches = command.try_get_matches_from_mut(std::env::args_os())?;
    Cli::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut command))
}

fn main() -> ExitCode {
    flatmin_engine::runtime::tune_allocator();
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => return cmd::report_clap_error(e),
    };
    let result = match cli.command {
        Command::Train(args) => cmd::train::run(&args),
        Command::Hvp(args) => cmd::hvp::run(&args),
        Command::Bench(args) => cmd::bench::run(&args),
        Command::Data(args) => cmd::data::run(&args),
        Command::Plot(args) => cmd::plot::run(&args),
        Command::Eval(args) => cmd::eval::run(&args),
        Command::Trace(args) => cmd::trace::run(&args),
        Command::Eigen(args) => cmd::trace::run_eigen(&args),
        Command::Density(args) => cmd::trace::run_density(&args),
        Command::Sweep(args) => cmd::sweep::run(&args),
        Command::Export(args) => cmd::export::run(&args),
        Command::Completions(args) => cmd::shell::completions(&args, Cli::command()),
        Command::Man(args) => cmd::shell::man(&args, Cli::command()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cmd::report_error(&e);
            ExitCode::FAILURE
        }
    }
}

//! The subcommands, one module each, and the shared one-line error reporting.

pub mod bench;
pub mod data;
pub mod eval;
pub mod export;
pub mod hvp;
pub mod plot;
pub mod shell;
pub mod sweep;
pub mod term;
pub mod trace;
pub mod train;

use flatmin_models::BnUse;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// SIGINT and SIGTERM handling shared by `flatmin train` and `flatmin sweep`: the first
/// signal raises a flag (the command then stops cleanly: train checkpoints, sweep forwards
/// the signal to its runs and waits for them); a second one, of either kind, ends the
/// process at once with status 130.
pub struct Interrupt {
    any: Arc<AtomicBool>,
    int: Arc<AtomicBool>,
}

impl Interrupt {
    /// Installs the handlers for this process.
    pub fn install() -> anyhow::Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let any = Arc::new(AtomicBool::new(false));
        let int = Arc::new(AtomicBool::new(false));
        for sig in [SIGINT, SIGTERM] {
            // Order matters: the conditional exit sees the flag set by an earlier signal.
            signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&any))?;
            signal_hook::flag::register(sig, Arc::clone(&any))?;
        }
        signal_hook::flag::register(SIGINT, Arc::clone(&int))?;
        Ok(Interrupt { any, int })
    }

    /// The signal that arrived (SIGINT when one did, else SIGTERM), or `None`.
    pub fn received(&self) -> Option<i32> {
        if !self.any.load(Ordering::SeqCst) {
            None
        } else if self.int.load(Ordering::SeqCst) {
            Some(signal_hook::consts::SIGINT)
        } else {
            Some(signal_hook::consts::SIGTERM)
        }
    }
}

/// `SIGINT` or `SIGTERM` (or `signal N`), for messages.
pub fn signal_name(sig: i32) -> String {
    match sig {
        signal_hook::consts::SIGINT => "SIGINT".into(),
        signal_hook::consts::SIGTERM => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

/// Parses `--threads`: a positive integer.
pub fn parse_threads(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("the thread count must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a positive integer".into()),
    }
}

/// A `--bn-mode` choice: one [`BnUse`], named by [`BnUse::name`].
#[derive(Clone, Copy, Debug)]
struct BnModeArg(BnUse);

impl clap::ValueEnum for BnModeArg {
    fn value_variants<'a>() -> &'a [Self] {
        &[BnModeArg(BnUse::Eval), BnModeArg(BnUse::Train)]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        let help = match self.0 {
            BnUse::Eval => "running statistics",
            BnUse::Train => "batch statistics",
        };
        Some(clap::builder::PossibleValue::new(self.0.name()).help(help))
    }
}

/// The value parser of `--bn-mode`: parses `eval` or `train` straight into a [`BnUse`]
/// (`--help` and the error for another word list the choices).
pub fn bn_mode() -> impl clap::builder::TypedValueParser<Value = BnUse> {
    use clap::builder::TypedValueParser;
    clap::builder::EnumValueParser::<BnModeArg>::new().map(|m| m.0)
}

/// Runs `f` with `threads` rayon workers (or rayon's default, which honours
/// RAYON_NUM_THREADS, when `None`).
///
/// `f` runs on a worker of that pool, so the many short parallel regions of a step fork from
/// inside the pool instead of being injected from outside (each injection woke the pool and
/// put the calling thread to sleep: 15-20% of an mlp-s gradient). Its buffers come from the
/// one allocator arena that `tune_allocator` keeps warm for every thread (with per-thread
/// arenas a batched cnn-s HVP ran 2.7x slower).
pub fn with_threads<R: Send>(
    threads: Option<usize>,
    f: impl FnOnce() -> anyhow::Result<R> + Send,
) -> anyhow::Result<R> {
    use anyhow::Context;
    match threads {
        Some(t) => rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .with_context(|| format!("--threads {t}: cannot start the thread pool"))?
            .install(f),
        None => rayon::scope(|_| f()),
    }
}

/// Joins the lines of a message into one, collapsing runs of whitespace.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An error and its chain of causes on one line, `outer: inner: ...`, leaving out a cause
/// whose text the message already ends with (some library errors print their source in
/// their own message and also return it as their source).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = one_line(&cause.to_string());
        if msg.is_empty() {
            msg = text;
        } else if !text.is_empty() && !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg
}

/// Prints `error: <message>` for an error and its causes, on one line of stderr.
pub fn report_error(e: &anyhow::Error) {
    eprintln!("error: {}", error_line(e));
}

/// Handles a command line that clap did not turn into arguments: help, version and usage
/// errors are printed as clap renders them (a usage error: the error, clap's tip such as "a
/// similar argument exists", the usage line), with clap's status (2 for a usage error).
pub fn report_clap_error(e: clap::Error) -> ExitCode {
    // Printing can only fail on a closed pipe; nothing useful is left to do then.
    let _ = e.print();
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
}

/// A clap error on one line, its tip included (`unexpected argument '--lrr' found; tip: a
/// similar argument exists: '--lr'`), without the usage and `--help` lines: for a command
/// line checked inside another command (a sweep's runs).
pub fn clap_error_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let kept: Vec<String> = rendered
        .split("\n\n")
        .map(one_line)
        .filter(|p| !p.is_empty() && !p.starts_with("Usage:") && !p.starts_with("For more"))
        .collect();
    let line = kept.join("; ");
    line.strip_prefix("error: ").unwrap_or(&line).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Repeats(std::io::Error);
    impl std::fmt::Display for Repeats {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a.bin: {}", self.0)
        }
    }
    impl std::error::Error for Repeats {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn chain_on_one_line_without_repeats() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = anyhow::Error::new(Repeats(io)).context("--data");
        assert_eq!(error_line(&e), "--data: a.bin: gone");
        let e = anyhow::anyhow!("two\nlines   here").context("outer");
        assert_eq!(error_line(&e), "outer: two lines here");
    }
}

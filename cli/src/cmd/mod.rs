//! The subcommands, one module each, and the shared one-line error reporting.

pub mod hvp;

use clap::error::ErrorKind;
use std::process::ExitCode;

/// Joins the lines of a message into one, collapsing runs of whitespace.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Prints an error and its chain of causes on one line: `error: outer: inner: ...`.
pub fn report_error(e: &anyhow::Error) {
    eprintln!("error: {}", one_line(&format!("{e:#}")));
}

/// Handles a command-line parsing outcome of clap: help and version go to stdout with
/// status 0; a usage error becomes one `error: ...` line on stderr (its first paragraph,
/// which names the offending flag or value) with status 2.
pub fn report_clap_error(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // Printing help can only fail on a closed pipe; nothing useful is left to do then.
            let _ = e.print();
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
        }
        _ => {
            let rendered = e.render().to_string();
            let first_paragraph = rendered.split("\n\n").next().unwrap_or_default();
            let msg = one_line(first_paragraph);
            let msg = msg.strip_prefix("error:").map_or(msg.as_str(), str::trim);
            eprintln!("error: {msg} (see --help)");
            ExitCode::from(2)
        }
    }
}

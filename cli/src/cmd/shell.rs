//! `flatmin completions SHELL` and `flatmin man`: shell completion scripts (clap_complete)
//! and manual pages (clap_mangen), generated from the command line's own definition.

use anyhow::{Context, Result};
use clap::Args;
use clap_complete::Shell;
use std::path::PathBuf;

/// Arguments of `flatmin completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Arguments of `flatmin man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write one page per command into this folder (flatmin.1, flatmin-train.1,
    /// flatmin-data-fetch.1, ...) instead of printing the flatmin(1) page to stdout.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Prints the completion script for `args.shell` to stdout (an error, not clap_complete's
/// panic, when stdout cannot take it: the script is built in memory first).
pub fn completions(args: &CompletionsArgs, mut cmd: clap::Command) -> Result<()> {
    use std::io::Write;
    let name = cmd.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, name, &mut script);
    let mut out = std::io::stdout().lock();
    out.write_all(&script)
        .and_then(|()| out.flush())
        .context("writing the completion script to stdout")
}

/// Prints the flatmin(1) page, or writes every command's page into `--out`.
pub fn man(args: &ManArgs, cmd: clap::Command) -> Result<()> {
    use std::io::Write;
    match &args.out {
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .and_then(|()| out.flush())
                .context("writing the manual page to stdout")
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("--out {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("--out {}", dir.display()))?;
            println!("manual pages written to {}", dir.display());
            Ok(())
        }
    }
}

//! `flatmin export`: a run's records in another tool's format (TensorBoard event files).

use anyhow::{bail, Context, Result};
use clap::Args;
use flatmin::train::RunDir;
use std::path::PathBuf;

/// Arguments of `flatmin export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Run folders written by `flatmin train`.
    #[arg(value_name = "RUN", required = true)]
    pub runs: Vec<PathBuf>,
    /// Write TensorBoard event files: DIR/NAME/events.out.tfevents.flatmin for each run
    /// (NAME: the run folder's name; view with `tensorboard --logdir DIR`). Every number of
    /// every record is a scalar tagged KIND/NAME (eval/test_acc, train/loss, train/gate,
    /// trace/trace_norm) at its step.
    #[arg(long, value_name = "DIR", required = true)]
    pub tensorboard: PathBuf,
}

/// The event file's name in each run's folder under `--tensorboard`.
pub const EVENT_FILE: &str = "events.out.tfevents.flatmin";

/// Runs `flatmin export`.
pub fn run(args: &ExportArgs) -> Result<()> {
    let mut names = std::collections::HashSet::new();
    for run in &args.runs {
        let Some(name) = run
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_owned()))
        else {
            bail!("{}: not a run folder", run.display());
        };
        if !names.insert(name.clone()) {
            bail!(
                "{}: two runs named {} would share one TensorBoard folder",
                run.display(),
                name.to_string_lossy()
            );
        }
        let records = RunDir::open(run)?.records()?;
        let dir = args.tensorboard.join(&name);
        std::fs::create_dir_all(&dir).with_context(|| {
            format!(
                "--tensorboard {}: cannot create {}",
                args.tensorboard.display(),
                dir.display()
            )
        })?;
        let path = dir.join(EVENT_FILE);
        flatmin_models::io::write_atomic(&path, &flatmin::tensorboard::encode_events(&records))
            .with_context(|| format!("--tensorboard {}", args.tensorboard.display()))?;
        println!("wrote {} ({} records)", path.display(), records.len());
    }
    Ok(())
}

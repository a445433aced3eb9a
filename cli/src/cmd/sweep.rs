//! `flatmin sweep`: expand a grid of `flatmin train` settings into run folders, run them a
//! few at a time as child processes of this binary (or write a GNU parallel job list or a
//! Slurm array script instead), then summarize the sweep in a table and a plot.
//!
//! Each run is an ordinary `flatmin train` process with the common flags followed by its grid
//! settings, so its results are bit-identical to running that command alone. Rerunning the
//! same sweep skips finished runs, resumes interrupted ones and rewrites the summary (which is
//! how the results of `--emit parallel|slurm` are collected).

use anyhow::{bail, Context, Result};
use clap::{Args, Parser};
use flatmin::plot::{plot_runs, PlotOptions, XAxis};
use flatmin::train::{
    recipe_differences, BestModel, Locked, Record, RunDir, RunLock, TrainConfig, NETWORK_FILE,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Arguments of `flatmin sweep`.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The grid: space-separated `flag=v1,v2,...` (train flags without the leading `--`);
    /// every combination is one run. A value `on` passes the bare flag, `off` its `--no-`
    /// form (for example `augment=on,off`).
    #[arg(long, value_name = "GRID", help_heading = "Sweep")]
    pub grid: String,
    /// Runs at a time (each gets cores / N threads unless the common flags set --threads).
    #[arg(long, value_name = "N", default_value_t = 1, help_heading = "Sweep")]
    pub jobs: usize,
    /// Instead of running: write `jobs.txt` for GNU parallel (`parallel -j N < jobs.txt`), or
    /// `jobs.txt` and a Slurm array script `sweep.sbatch`. Rerun the sweep afterwards to
    /// write the summary.
    #[arg(long, value_name = "HOW", value_parser = ["parallel", "slurm"], help_heading = "Scheduler scripts (--emit)")]
    pub emit: Option<String>,
    /// Sweep folder: runs go to OUT/runs/NAME (NAME from the settings), logs to OUT/logs.
    #[arg(long, value_name = "DIR", help_heading = "Sweep")]
    pub out: PathBuf,
    /// Metric panels of the sweep plot [default: test_acc, and trace_norm when logged].
    #[arg(long = "metric", value_name = "NAME", help_heading = "Sweep")]
    pub metrics: Vec<String>,
    /// Slurm: the time limit of each array task (`#SBATCH --time`, e.g. 2:00:00).
    #[arg(long, value_name = "TIME", help_heading = "Scheduler scripts (--emit)")]
    pub time: Option<String>,
    /// Slurm: the memory of each array task (`#SBATCH --mem`, e.g. 4G).
    #[arg(long, value_name = "SIZE", help_heading = "Scheduler scripts (--emit)")]
    pub mem: Option<String>,
    /// Slurm: the partition to submit to (`#SBATCH --partition`).
    #[arg(long, value_name = "NAME", help_heading = "Scheduler scripts (--emit)")]
    pub partition: Option<String>,
    /// Slurm: cores of each array task, which is also each run's --threads [default: the
    /// train flags' --threads, else 1].
    #[arg(long, value_name = "N", value_parser = super::parse_threads, help_heading = "Scheduler scripts (--emit)")]
    pub cpus_per_task: Option<usize>,
    /// Slurm: the cluster's MaxArraySize (array indices run 0..N-1); a larger sweep is
    /// written as several scripts `sweep-0.sbatch`, `sweep-1.sbatch`, ... of at most N tasks
    /// each (the default is Slurm's own default).
    #[arg(long, value_name = "N", default_value_t = SLURM_MAX_ARRAY_SIZE, value_parser = super::parse_threads, help_heading = "Scheduler scripts (--emit)")]
    pub max_array_size: usize,
    /// Common `flatmin train` flags of every run (after `--`).
    #[arg(last = true, value_name = "TRAIN FLAGS")]
    pub common: Vec<String>,
}

/// One run of the sweep: its grid settings and folder name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// `(flag, value)` pairs in grid order.
    pub settings: Vec<(String, String)>,
    /// Folder name under `OUT/runs`.
    pub name: String,
}

/// Most runs a sweep may have: a larger grid is refused from the product of its axis
/// lengths, before any combination is built.
pub const MAX_RUNS: usize = 10_000;

/// Slurm's default `MaxArraySize`: array indices 0..=1000.
pub const SLURM_MAX_ARRAY_SIZE: usize = 1001;

/// Longest run-folder name (bytes): the usual limit of a file name.
const MAX_NAME_BYTES: usize = 255;

/// Parses a grid (`key=v1,v2 key2=w1`) into its axes, in order. A value given twice in one
/// axis (literally, or as two spellings of one number such as `0.1,1e-1`) and two values
/// whose run-folder names would be the same are refused, naming the flag and the values.
pub fn parse_grid(grid: &str) -> Result<Vec<(String, Vec<String>)>> {
    let mut axes: Vec<(String, Vec<String>)> = Vec::new();
    for item in grid.split_whitespace() {
        let Some((key, values)) = item.split_once('=') else {
            bail!("--grid: '{item}' is not flag=v1,v2,...");
        };
        let key = key.trim_start_matches("--").to_string();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("--grid: '{key}' is not a flag name");
        }
        if ["out", "resume", "overwrite", "config", "quiet"].contains(&key.as_str()) {
            bail!("--grid: --{key} is set by the sweep itself");
        }
        if axes.iter().any(|(k, _)| *k == key) {
            bail!("--grid: '{key}' appears twice");
        }
        let values: Vec<String> = values.split(',').map(str::to_string).collect();
        if values.iter().any(String::is_empty) {
            bail!("--grid: '{item}' has an empty value");
        }
        check_distinct(&key, &values)?;
        axes.push((key, values));
    }
    if axes.is_empty() {
        bail!("--grid is empty");
    }
    Ok(axes)
}

/// Refuses two values of the axis `key` that are the same run: equal, equal as numbers, or
/// equal once made safe for a folder name (one pass, hashed: the values are user input).
fn check_distinct(key: &str, values: &[String]) -> Result<()> {
    use std::collections::HashMap;
    let mut by_number: HashMap<u64, &str> = HashMap::new();
    let mut by_name: HashMap<String, &str> = HashMap::new();
    for a in values {
        // -0 and 0 are one number; NaN is never equal to itself, so it is left to the names.
        let number = a.parse::<f64>().ok().filter(|x| !x.is_nan());
        let bits = number.map(|x| if x == 0.0 { 0 } else { x.to_bits() });
        if let Some(b) = bits.and_then(|bits| by_number.insert(bits, a)) {
            if a == b {
                bail!("--grid: {key}={a} is given twice; each value makes one run");
            }
            bail!("--grid: {key}={b} and {key}={a} are the same number, so the same run");
        }
        if let Some(b) = by_name.insert(sanitize(a), a) {
            if a == b {
                bail!("--grid: {key}={a} is given twice; each value makes one run");
            }
            bail!(
                "--grid: {key}={b} and {key}={a} would share the run folder name '{key}-{}'; \
                 use values that differ in letters, digits, '.' or '-'",
                sanitize(a)
            );
        }
    }
    Ok(())
}

/// The number of runs of a grid (the product of its axis lengths), refused above
/// [`MAX_RUNS`] (an overflowing product included) before anything is built.
pub fn grid_size(axes: &[(String, Vec<String>)]) -> Result<usize> {
    let lengths: Vec<String> = axes.iter().map(|(_, v)| v.len().to_string()).collect();
    let count = axes
        .iter()
        .try_fold(1usize, |n, (_, v)| n.checked_mul(v.len()));
    match count {
        Some(n) if n <= MAX_RUNS => Ok(n),
        Some(n) => bail!(
            "--grid: {n} runs ({}), more than the {MAX_RUNS} a sweep may have; split the grid \
             into several sweeps",
            lengths.join(" x ")
        ),
        None => bail!(
            "--grid: more than 2^64 runs ({}), more than the {MAX_RUNS} a sweep may have",
            lengths.join(" x ")
        ),
    }
}

/// Every combination of the axes (the first axis varies slowest), with folder names. The
/// grid's size is checked first ([`grid_size`]); two runs with one folder name, or a name
/// too long for a folder, are refused.
pub fn expand(axes: &[(String, Vec<String>)]) -> Result<Vec<Job>> {
    let mut combos: Vec<Vec<(String, String)>> = Vec::with_capacity(grid_size(axes)?);
    combos.push(Vec::new());
    for (key, values) in axes {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((key.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    let jobs: Vec<Job> = combos
        .into_iter()
        .map(|settings| {
            let name = settings
                .iter()
                .map(|(k, v)| format!("{k}-{}", sanitize(v)))
                .collect::<Vec<_>>()
                .join("_");
            Job { settings, name }
        })
        .collect();
    let mut seen = std::collections::HashMap::with_capacity(jobs.len());
    for job in &jobs {
        if job.name.len() > MAX_NAME_BYTES {
            bail!(
                "--grid: the run folder name '{}…' is {} bytes, more than the {MAX_NAME_BYTES} a \
                 folder name may have; use shorter values",
                job.name.chars().take(60).collect::<String>(),
                job.name.len()
            );
        }
        if let Some(other) = seen.insert(job.name.as_str(), job) {
            bail!(
                "--grid: the runs {} and {} would share the run folder {}",
                settings_text(other),
                settings_text(job),
                job.name
            );
        }
    }
    Ok(jobs)
}

/// A job's settings as `flag=value flag=value`, for messages.
fn settings_text(job: &Job) -> String {
    job.settings
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A value made safe for a folder name.
fn sanitize(v: &str) -> String {
    v.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The train flags of a job's settings.
fn setting_flags(job: &Job) -> Vec<String> {
    let mut v = Vec::new();
    for (k, val) in &job.settings {
        match val.as_str() {
            "on" => v.push(format!("--{k}")),
            "off" => v.push(format!("--no-{k}")),
            _ => {
                v.push(format!("--{k}"));
                v.push(val.clone());
            }
        }
    }
    v
}

/// Checks a job's full `flatmin train` command line (flags known, recipe valid) without
/// running it; returns the recipe it gives the run.
fn check_job(common: &[String], job: &Job) -> Result<TrainConfig> {
    #[derive(Parser)]
    struct Probe {
        #[command(flatten)]
        train: super::train::TrainArgs,
    }
    let argv = std::iter::once("flatmin-train".to_string())
        .chain(common.iter().cloned())
        .chain(setting_flags(job));
    // The caller prints its own `error: `.
    let p = Probe::try_parse_from(argv)
        .map_err(|e| anyhow::anyhow!("{}", super::clap_error_line(&e)))?;
    let cfg = p.train.config()?;
    cfg.validate()?;
    Ok(cfg)
}

/// Refuses a sweep that would give the run `name`, already in `dir` (started or finished by
/// an earlier sweep into the same folder), another recipe than its `config.json` holds: a
/// rerun with a changed grid or changed common flags would otherwise resume that run with
/// its old recipe, or count it as done, and report it under the new settings. The recipes
/// are compared as `--resume` compares them ([`recipe_differences`]); a network file
/// `--model` is compared by being one (its copy in the run folder is what the run uses).
fn check_existing_run(dir: &Path, name: &str, mut cfg: TrainConfig) -> Result<()> {
    if state(dir) == State::New {
        return Ok(());
    }
    let run = RunDir::open(dir)?;
    let made = run.config()?;
    // Recorded when the run was made; the sweep cannot know it before.
    cfg.init_sha256.clone_from(&made.init_sha256);
    let was = run.recipe(&made)?;
    let mut now = run.recipe(&cfg)?;
    if was["model"] == NETWORK_FILE && flatmin_models::netfile::is_network_file(&cfg.model) {
        now["model"] = was["model"].clone();
    }
    let changed = recipe_differences(&was, &now).unwrap_or_default();
    if !changed.is_empty() {
        bail!(
            "--out: the run {name} ({}) was made with other settings than this sweep gives              it: {}; rerun the sweep with the grid and flags it was made with, or pick              another --out",
            dir.display(),
            changed.join(", ")
        );
    }
    Ok(())
}

/// Quotes an argument for a POSIX shell where needed.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./=:,+-@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Where a run stands on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// No run folder yet.
    New,
    /// Started, not finished (resumable).
    Partial,
    /// Finished (`summary.json` written).
    Done,
}

fn state(dir: &Path) -> State {
    if dir.join("summary.json").is_file() {
        State::Done
    } else if dir.join("config.json").is_file() {
        State::Partial
    } else {
        State::New
    }
}

/// The common flags without `--threads T` (or `--threads=T`), and that `T`.
fn split_threads(common: &[String]) -> (Vec<String>, Option<String>) {
    let mut rest = Vec::with_capacity(common.len());
    let mut threads = None;
    let mut it = common.iter();
    while let Some(a) = it.next() {
        if a == "--threads" {
            threads = it.next().cloned();
        } else if let Some(t) = a.strip_prefix("--threads=") {
            threads = Some(t.to_string());
        } else {
            rest.push(a.clone());
        }
    }
    (rest, threads)
}

/// Arguments after `flatmin` that start `job` in `dir` (`--threads` from the common flags).
fn start_argv(common: &[String], job: &Job, dir: &Path) -> Vec<String> {
    let mut v = vec!["train".to_string()];
    v.extend(common.iter().cloned());
    v.extend(setting_flags(job));
    v.push("--out".into());
    v.push(dir.display().to_string());
    // The common flags may hold --quiet already; the train flags take it once.
    if !v.iter().any(|a| a == "--quiet") {
        v.push("--quiet".into());
    }
    v
}

/// Arguments after `flatmin` that resume the run in `dir` (only `--threads` of the common
/// flags: the recipe comes from the run's config.json).
fn resume_argv(common: &[String], dir: &Path) -> Vec<String> {
    let mut v = vec![
        "train".to_string(),
        "--resume".into(),
        dir.display().to_string(),
    ];
    if let (_, Some(t)) = split_threads(common) {
        v.extend(["--threads".to_string(), t]);
    }
    v.push("--quiet".into());
    v
}

/// Arguments after `flatmin` of a job's process: resume a started run, else start it.
fn job_argv(common: &[String], job: &Job, dir: &Path) -> Vec<String> {
    match state(dir) {
        State::Partial => resume_argv(common, dir),
        State::New | State::Done => start_argv(common, job, dir),
    }
}

/// `argv` as one shell-quoted command line.
fn shell_line(argv: impl IntoIterator<Item = String>) -> String {
    argv.into_iter()
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A job as one line of `jobs.txt`, with absolute paths: decided when it runs, not when it
/// was written, it skips a finished run, resumes a started one (so a requeued Slurm task or
/// a rerun `parallel` continues its run) and starts a new one, with `--threads threads`,
/// appending to `logs/NAME.log`.
fn job_line(exe: &Path, common: &[String], job: &Job, dirs: [&Path; 2], threads: usize) -> String {
    let [dir, log] = dirs;
    let (mut common, _) = split_threads(common);
    common.extend(["--threads".to_string(), threads.to_string()]);
    let d = shell_quote(&dir.display().to_string());
    let exe = exe.display().to_string();
    format!(
        "if [ -f {d}/summary.json ]; then echo 'flatmin sweep: {name} is finished'; \
         elif [ -f {d}/config.json ]; then {resume}; else {start}; fi >> {log} 2>&1",
        name = job.name,
        resume = shell_line(std::iter::once(exe.clone()).chain(resume_argv(&common, dir))),
        start = shell_line(std::iter::once(exe).chain(start_argv(&common, job, dir))),
        log = shell_quote(&log.display().to_string()),
    )
}

/// Runs `flatmin sweep`.
pub fn run(args: &SweepArgs) -> Result<()> {
    if args.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    check_slurm_flags(args)?;
    let axes = parse_grid(&args.grid)?;
    let jobs = expand(&axes)?;
    let recipes = jobs
        .iter()
        .map(|job| check_job(&args.common, job).with_context(|| format!("run {}", job.name)))
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
    // Absolute, so the emitted job lines work from any folder.
    let root = std::path::absolute(&args.out).with_context(|| args.out.display().to_string())?;
    let runs = root.join("runs");
    let logs = root.join("logs");
    std::fs::create_dir_all(&runs).with_context(|| runs.display().to_string())?;
    std::fs::create_dir_all(&logs).with_context(|| logs.display().to_string())?;
    // One sweep at a time in a folder: a second one would start the same runs again.
    let _lock = RunLock::acquire_for(&root, "--out", Locked::Sweep)?;
    for (job, cfg) in jobs.iter().zip(recipes) {
        check_existing_run(&runs.join(&job.name), &job.name, cfg)?;
    }
    let exe = std::env::current_exe().context("cannot locate the flatmin binary")?;
    write_manifest(args, &axes, &jobs)?;
    if let Some(how) = &args.emit {
        return emit(args, how, &exe, &jobs, &root);
    }
    run_pool(args, &exe, &jobs, &runs, &logs)?;
    summarize(args, &jobs, &runs)
}

/// Refuses the Slurm flags without `--emit slurm`, and values that would break the script
/// (a line break or space would end its `#SBATCH` line).
fn check_slurm_flags(args: &SweepArgs) -> Result<()> {
    let slurm = args.emit.as_deref() == Some("slurm");
    let given = [
        ("--time", args.time.as_deref()),
        ("--mem", args.mem.as_deref()),
        ("--partition", args.partition.as_deref()),
    ];
    for (flag, value) in given {
        let Some(v) = value else { continue };
        if !slurm {
            bail!("{flag} is a Slurm setting: it needs --emit slurm");
        }
        if v.is_empty() || !v.chars().all(|c| c.is_ascii_graphic() && c != '#') {
            bail!("{flag} '{v}': expected one word of printable characters (no spaces or '#')");
        }
    }
    if !slurm && args.cpus_per_task.is_some() {
        bail!("--cpus-per-task is a Slurm setting: it needs --emit slurm (use --threads in the train flags)");
    }
    Ok(())
}

/// The threads of each emitted run: for Slurm `--cpus-per-task` (which must match a
/// `--threads` of the train flags; either gives the other, 1 when neither is given), for
/// GNU parallel the train flags' `--threads`, else this machine's cores / `--jobs`.
fn emit_threads(args: &SweepArgs, slurm: bool) -> Result<usize> {
    let given = match split_threads(&args.common).1 {
        Some(t) => {
            Some(super::parse_threads(&t).map_err(|e| anyhow::anyhow!("--threads '{t}': {e}"))?)
        }
        None => None,
    };
    if !slurm {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        return Ok(given.unwrap_or((cores / args.jobs).max(1)));
    }
    match (args.cpus_per_task, given) {
        (Some(c), Some(t)) if c != t => bail!(
            "--cpus-per-task {c} does not match --threads {t} in the train flags; give one of them"
        ),
        (c, t) => Ok(c.or(t).unwrap_or(1)),
    }
}

/// `--emit parallel|slurm`: writes `jobs.txt` (one resume-or-start line per run, absolute
/// paths, its `--threads` set) and for Slurm the array script(s); runs nothing.
fn emit(args: &SweepArgs, how: &str, exe: &Path, jobs: &[Job], root: &Path) -> Result<()> {
    let slurm = how == "slurm";
    let threads = emit_threads(args, slurm)?;
    let (runs, logs) = (root.join("runs"), root.join("logs"));
    let lines: Vec<String> = jobs
        .iter()
        .map(|j| {
            let log = logs.join(format!("{}.log", j.name));
            job_line(exe, &args.common, j, [&runs.join(&j.name), &log], threads)
        })
        .collect();
    let list = root.join("jobs.txt");
    std::fs::write(&list, lines.join("\n") + "\n").with_context(|| list.display().to_string())?;
    println!(
        "wrote {} ({} runs, {threads} threads each)",
        list.display(),
        jobs.len()
    );
    if !slurm {
        println!("run with: parallel -j {} < {}", args.jobs, list.display());
        return Ok(());
    }
    let scripts = write_sbatch(args, root, jobs.len(), threads)?;
    let submit: Vec<String> = scripts
        .iter()
        .map(|p| format!("sbatch {}", shell_quote(&p.display().to_string())))
        .collect();
    println!("submit with: {}", submit.join("; "));
    Ok(())
}

/// Writes the Slurm array script(s) for `n` runs: `sweep.sbatch`, or when `n` exceeds
/// `--max-array-size`, `sweep-0.sbatch`, `sweep-1.sbatch`, ... each covering the next
/// `--max-array-size` lines of `jobs.txt` (scripts of an earlier emit are removed first).
fn write_sbatch(args: &SweepArgs, root: &Path, n: usize, cpus: usize) -> Result<Vec<PathBuf>> {
    for entry in std::fs::read_dir(root).with_context(|| root.display().to_string())? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("sweep") && name.ends_with(".sbatch") {
            std::fs::remove_file(&path).with_context(|| path.display().to_string())?;
        }
    }
    let size = args.max_array_size;
    let parts = n.div_ceil(size);
    let mut written = Vec::with_capacity(parts);
    for part in 0..parts {
        let (first, count) = (part * size, size.min(n - part * size));
        let name = if parts == 1 {
            "sweep.sbatch".to_string()
        } else {
            format!("sweep-{part}.sbatch")
        };
        let path = root.join(name);
        let text = sbatch_text(args, root, cpus, first, count);
        std::fs::write(&path, text).with_context(|| path.display().to_string())?;
        written.push(path);
    }
    Ok(written)
}

/// One Slurm array script: tasks `0..count` run lines `first+1..=first+count` of
/// `jobs.txt`. Absolute paths only, so it runs from any folder; a requeued task reruns its
/// line, which resumes the run ([`job_line`]); output is appended, not replaced.
fn sbatch_text(args: &SweepArgs, root: &Path, cpus: usize, first: usize, count: usize) -> String {
    let q = |p: PathBuf| shell_quote(&p.display().to_string());
    let mut head = vec![
        "#!/bin/bash".to_string(),
        "#SBATCH --job-name=flatmin-sweep".into(),
        format!("#SBATCH --array=0-{}", count - 1),
        format!("#SBATCH --cpus-per-task={cpus}"),
    ];
    for (flag, v) in [
        ("time", &args.time),
        ("mem", &args.mem),
        ("partition", &args.partition),
    ] {
        if let Some(v) = v {
            head.push(format!("#SBATCH --{flag}={v}"));
        }
    }
    head.extend([
        format!("#SBATCH --output={}/slurm-%A_%a.out", q(root.join("logs"))),
        "#SBATCH --open-mode=append".into(),
        "#SBATCH --requeue".into(),
        format!(
            "# Array task i runs line i+{} of jobs.txt (resume-or-start: a requeued task \
             continues its run);\n# rerun the same `flatmin sweep` afterwards for the summary.",
            first + 1
        ),
        "set -euo pipefail".into(),
        format!("line=$((SLURM_ARRAY_TASK_ID + {}))", first + 1),
        format!("job=$(sed -n \"${{line}}p\" {})", q(root.join("jobs.txt"))),
        "[ -n \"$job\" ] || { echo \"flatmin sweep: no line $line in jobs.txt\" >&2; exit 1; }"
            .into(),
        "exec bash -c \"$job\"".into(),
    ]);
    head.join("\n") + "\n"
}

/// Writes `sweep.json`: the grid, the common flags, and each run's settings and folder.
fn write_manifest(args: &SweepArgs, axes: &[(String, Vec<String>)], jobs: &[Job]) -> Result<()> {
    let v = serde_json::json!({
        "grid": args.grid,
        "axes": axes.iter().map(|(k, v)| serde_json::json!({"flag": k, "values": v})).collect::<Vec<_>>(),
        "common": args.common,
        "runs": jobs.iter().map(|j| serde_json::json!({
            "name": j.name,
            "folder": format!("runs/{}", j.name),
            "settings": j.settings.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
    });
    let path = args.out.join("sweep.json");
    std::fs::write(&path, serde_json::to_string_pretty(&v)? + "\n")
        .with_context(|| path.display().to_string())
}

/// Starts the `flatmin train` process of `job`, its output going to `logs/NAME.log`.
///
/// The child gets its own process group, so a Ctrl-C on the terminal reaches only the sweep,
/// which forwards it once (a second signal would make the child exit without a
/// checkpoint); and, on Linux, SIGTERM when the sweep dies in any way (`kill -9` included),
/// so no run is left behind as an orphan: it checkpoints and exits.
fn spawn_job(args: &SweepArgs, exe: &Path, job: &Job, runs: &Path, logs: &Path) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let threads_given = args.common.iter().any(|a| a == "--threads");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_job = (cores / args.jobs).max(1);
    let dir = runs.join(&job.name);
    let log_path = logs.join(format!("{}.log", job.name));
    let log = std::fs::File::create(&log_path).with_context(|| log_path.display().to_string())?;
    let mut cmd = Command::new(exe);
    cmd.args(job_argv(&args.common, job, &dir))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    if !threads_given {
        cmd.env("RAYON_NUM_THREADS", per_job.to_string());
    }
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: between fork and exec only async-signal-safe calls (prctl, getppid,
        // raise) are made, and nothing is allocated.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The sweep died before the line above: act as if the signal came.
                if libc::getppid() != parent {
                    libc::raise(libc::SIGTERM);
                }
                Ok(())
            });
        }
    }
    cmd.spawn()
        .with_context(|| format!("cannot start {}", exe.display()))
}

/// Sends `sig` to each running child (one that has just exited, not yet reaped, ignores it).
fn forward(active: &[(&Job, Child)], sig: i32) {
    for (_, child) in active {
        // SAFETY: kill has no memory effects; the pid is a child not yet waited for, so it
        // cannot have been reused.
        unsafe {
            libc::kill(child.id() as libc::pid_t, sig);
        }
    }
}

/// Runs the jobs that are not finished, `--jobs` at a time; fails (after the others finish)
/// naming the runs that failed and their logs. On the first SIGINT or SIGTERM no run is
/// started any more, the signal is forwarded to the running ones, which checkpoint and exit,
/// and once all have exited the sweep fails naming them and how to resume (a second signal
/// ends the sweep at once, and its runs with it: see [`spawn_job`]).
fn run_pool(args: &SweepArgs, exe: &Path, jobs: &[Job], runs: &Path, logs: &Path) -> Result<()> {
    let todo: Vec<&Job> = jobs
        .iter()
        .filter(|j| state(&runs.join(&j.name)) != State::Done)
        .collect();
    println!(
        "sweep: {} runs ({} already done), {} at a time -> {}",
        jobs.len(),
        jobs.len() - todo.len(),
        args.jobs,
        args.out.display()
    );
    let interrupt = super::Interrupt::install()?;
    let started = Instant::now();
    let mut queue = todo.into_iter();
    let mut active: Vec<(&Job, Child)> = Vec::new();
    let (mut failed, mut stopped) = (Vec::new(), Vec::new());
    let mut forwarded = None;
    loop {
        if forwarded.is_none() {
            if let Some(sig) = interrupt.received() {
                forward(&active, sig);
                forwarded = Some(sig);
            }
        }
        while forwarded.is_none() && active.len() < args.jobs {
            let Some(job) = queue.next() else { break };
            active.push((job, spawn_job(args, exe, job, runs, logs)?));
            println!("  start {}", job.name);
        }
        if active.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut i = 0;
        while i < active.len() {
            let Some(status) = active[i].1.try_wait()? else {
                i += 1;
                continue;
            };
            let (job, _) = active.remove(i);
            if status.success() {
                let at = started.elapsed().as_secs_f64();
                println!("  done  {} ({at:.0}s into the sweep)", job.name);
            } else if forwarded.is_some() {
                println!("  stopped {} ({status})", job.name);
                stopped.push(job.name.clone());
            } else {
                println!("  FAILED {} ({status})", job.name);
                failed.push(job.name.clone());
            }
        }
    }
    // In name order, not the order in which they happened to exit.
    stopped.sort_unstable();
    failed.sort_unstable();
    pool_outcome(forwarded, &stopped, &failed, queue.len(), logs)
}

/// The end of [`run_pool`]: success, or one line naming the signal and the runs it stopped
/// (and those that failed), else the runs that failed.
fn pool_outcome(
    signal: Option<i32>,
    stopped: &[String],
    failed: &[String],
    not_started: usize,
    logs: &Path,
) -> Result<()> {
    let failed_too = if failed.is_empty() {
        String::new()
    } else {
        format!(", {} failed before it: {}", failed.len(), failed.join(", "))
    };
    if let Some(sig) = signal {
        let names = if stopped.is_empty() {
            "none".to_string()
        } else {
            stopped.join(", ")
        };
        bail!(
            "interrupted by {}: {} running run(s) stopped at their last checkpoint ({names}), \
             {not_started} not started{failed_too}; rerun the same `flatmin sweep` command to \
             resume",
            super::signal_name(sig),
            stopped.len(),
        );
    }
    if !failed.is_empty() {
        bail!(
            "{} run(s) failed: {} (see {}/NAME.log; rerun the sweep to resume them)",
            failed.len(),
            failed.join(", "),
            logs.display()
        );
    }
    Ok(())
}

/// The figures of one finished run for the summary table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunSummary {
    /// Test accuracy of the last evaluation.
    pub final_test_acc: Option<f64>,
    /// Best test accuracy over the evaluations.
    pub best_test_acc: Option<f64>,
    /// Train accuracy of the last evaluation (epoch mean).
    pub final_train_acc: Option<f64>,
    /// Normalized Hessian trace of the last `trace` record.
    pub final_trace_norm: Option<f64>,
    /// Normalized Hessian trace of the first `trace` record.
    pub first_trace_norm: Option<f64>,
    /// Gradient evaluations of the whole run.
    pub grad_queries: Option<u64>,
    /// Optimizer steps.
    pub steps: usize,
}

/// Summarizes a run's records.
pub fn summarize_records(recs: &[Record]) -> RunSummary {
    let evals: Vec<&Record> = recs.iter().filter(|r| r.kind == "eval").collect();
    let traces: Vec<&Record> = recs.iter().filter(|r| r.kind == "trace").collect();
    RunSummary {
        final_test_acc: evals.last().and_then(|r| r.test_acc),
        best_test_acc: BestModel::of_records(evals.iter().copied()).map(|b| b.test_acc),
        final_train_acc: evals.last().and_then(|r| r.train_acc),
        final_trace_norm: traces
            .last()
            .and_then(|r| r.extra.get("trace_norm").copied()),
        first_trace_norm: traces
            .first()
            .and_then(|r| r.extra.get("trace_norm").copied()),
        grad_queries: recs.iter().filter_map(|r| r.grad_queries).max(),
        steps: recs.iter().map(|r| r.step).max().unwrap_or(0),
    }
}

/// A cell of `summary.md`: accuracies in percent to 0.1, traces to three significant digits
/// (`summary.csv` keeps every digit); grid values and counts as they are.
fn md_cell(column: &str, value: &str) -> String {
    let Ok(x) = value.parse::<f64>() else {
        return value.to_string();
    };
    if column.ends_with("_acc") {
        format!("{:.1}%", 100.0 * x)
    } else if column.ends_with("_trace_norm") {
        format!("{x:.2e}")
    } else {
        value.to_string()
    }
}

/// The sweep's table: a row per run, its settings then its outcome.
struct SummaryTable {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    /// The runs' folders, in the rows' order.
    dirs: Vec<PathBuf>,
    /// Whether any run logged a trace.
    any_trace: bool,
    /// Whether every run logged its gradient evaluations (`grad_queries`).
    all_queries: bool,
}

/// Writes `summary.csv`, `summary.md` and `sweep.png` from the finished runs.
fn summarize(args: &SweepArgs, jobs: &[Job], runs: &Path) -> Result<()> {
    let table = summary_table(jobs, runs)?;
    let csv = std::iter::once(table.header.join(","))
        .chain(table.rows.iter().map(|r| r.join(",")))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    let csv_path = args.out.join("summary.csv");
    std::fs::write(&csv_path, csv).with_context(|| csv_path.display().to_string())?;
    let header = &table.header;
    let mut md = format!(
        "| {} |\n|{}\n",
        header.join(" | "),
        " --- |".repeat(header.len())
    );
    for r in &table.rows {
        let cells: Vec<String> = header.iter().zip(r).map(|(h, v)| md_cell(h, v)).collect();
        md.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    let md_path = args.out.join("summary.md");
    std::fs::write(&md_path, &md).with_context(|| md_path.display().to_string())?;
    print!("{md}");
    let png = plot_sweep(args, &table)?;
    println!(
        "wrote {}, {}, {}",
        csv_path.display(),
        md_path.display(),
        png.display()
    );
    Ok(())
}

/// Reads every finished run's records into the sweep's table.
fn summary_table(jobs: &[Job], runs: &Path) -> Result<SummaryTable> {
    let mut header: Vec<String> = jobs[0].settings.iter().map(|(k, _)| k.clone()).collect();
    header.extend(
        [
            "final_test_acc",
            "best_test_acc",
            "final_train_acc",
            "first_trace_norm",
            "final_trace_norm",
            "grad_queries",
            "steps",
            "run",
        ]
        .map(String::from),
    );
    let f = |v: Option<f64>| v.map(|x| format!("{x}")).unwrap_or_default();
    let mut table = SummaryTable {
        header,
        rows: Vec::new(),
        dirs: Vec::new(),
        any_trace: false,
        all_queries: true,
    };
    for job in jobs {
        let dir = runs.join(&job.name);
        let recs = RunDir::open(&dir)?.records()?;
        let s = summarize_records(&recs);
        table.any_trace |= s.final_trace_norm.is_some();
        table.all_queries &= recs.iter().any(|r| r.grad_queries.is_some());
        let mut row: Vec<String> = job.settings.iter().map(|(_, v)| v.clone()).collect();
        row.extend([
            f(s.final_test_acc),
            f(s.best_test_acc),
            f(s.final_train_acc),
            f(s.first_trace_norm),
            f(s.final_trace_norm),
            s.grad_queries.map(|q| q.to_string()).unwrap_or_default(),
            s.steps.to_string(),
            format!("runs/{}", job.name),
        ]);
        table.rows.push(row);
        table.dirs.push(dir);
    }
    Ok(table)
}

/// Draws `sweep.png`: `--metric` (default: test accuracy, and the trace norm when a run
/// logged one) against gradient evaluations when every run logged them, else steps.
fn plot_sweep(args: &SweepArgs, table: &SummaryTable) -> Result<PathBuf> {
    let metrics = if args.metrics.is_empty() {
        let mut m = vec!["test_acc".to_string()];
        if table.any_trace {
            m.push("trace_norm".into());
        }
        m
    } else {
        args.metrics.clone()
    };
    let opts = PlotOptions {
        metrics,
        x: if table.all_queries {
            XAxis::GradQueries
        } else {
            XAxis::Step
        },
        title: Some(format!("sweep {}", args.grid)),
        ..PlotOptions::default()
    };
    let png = args.out.join("sweep.png");
    plot_runs(&table.dirs, &opts, &png)?;
    Ok(png)
}

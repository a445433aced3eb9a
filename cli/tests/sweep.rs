//! `flatmin sweep`: grid expansion into run folders, N runs at a time with results
//! bit-identical to running each alone, the summary table and plot, the GNU parallel and
//! Slurm outputs, and rerunning a finished sweep.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("sweep-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    d
}

const COMMON: [&str; 18] = [
    "--model",
    "tiny-tanh",
    "--data",
    "synthetic",
    "--train-size",
    "100",
    "--test-size",
    "50",
    "--epochs",
    "2",
    "--batch-size",
    "50",
    "--momentum",
    "0",
    "--weight-decay",
    "0",
    "--trace-every",
    "2",
];

fn flatmin(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flatmin"))
        .args(args)
        .output()
        .unwrap()
}

fn sweep(out: &Path, grid: &str, extra: &[&str]) -> std::process::Output {
    let out = out.display().to_string();
    let mut args = vec!["sweep", "--grid", grid, "--out", &out];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(&COMMON);
    flatmin(&args)
}

#[test]
fn sweep_runs_the_grid_and_matches_single_runs() {
    let out = tmp("grid");
    let o = sweep(
        &out,
        "optimizer=rs,sa rho=0.01,0.05 seed=0",
        &["--jobs", "2"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let names = [
        "optimizer-rs_rho-0.01_seed-0",
        "optimizer-rs_rho-0.05_seed-0",
        "optimizer-sa_rho-0.01_seed-0",
        "optimizer-sa_rho-0.05_seed-0",
    ];
    for n in names {
        assert!(
            out.join("runs").join(n).join("summary.json").is_file(),
            "{n}"
        );
    }
    for f in ["summary.csv", "summary.md", "sweep.png", "sweep.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let csv = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 5, "{csv}");
    assert!(lines[0].starts_with("optimizer,rho,seed,final_test_acc,best_test_acc"));
    // rs and sa make two gradient queries a step: 2 epochs x 2 steps x 2.
    let header: Vec<&str> = lines[0].split(',').collect();
    let q = header.iter().position(|h| *h == "grad_queries").unwrap();
    let t = header
        .iter()
        .position(|h| *h == "final_trace_norm")
        .unwrap();
    for l in &lines[1..] {
        let cells: Vec<&str> = l.split(',').collect();
        assert_eq!(cells[q], "8", "{l}");
        assert!(cells[t].parse::<f64>().unwrap() > 0.0, "{l}");
    }
    // summary.md rounds for reading: accuracies in percent, traces to three digits.
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    let md_lines: Vec<&str> = md.lines().collect();
    assert_eq!(md_lines.len(), 6, "{md}");
    for (row, l) in md_lines[2..].iter().zip(&lines[1..]) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let raw: Vec<&str> = l.split(',').collect();
        let acc: f64 = raw[3].parse().unwrap();
        assert_eq!(cells[3], format!("{:.1}%", 100.0 * acc), "{row}");
        let tr: f64 = raw[t].parse().unwrap();
        assert_eq!(cells[t], format!("{tr:.2e}"), "{row}");
        assert!(cells[t].contains('e'), "{row}");
        assert_eq!(cells[..3], raw[..3], "{row}");
        assert_eq!(cells[q], "8", "{row}");
    }
    // The same run alone (other thread count) gives the same bits.
    let alone = tmp("alone");
    let alone_s = alone.display().to_string();
    let mut args = vec!["train", "--quiet", "--threads", "1", "--out", &alone_s];
    args.extend_from_slice(&COMMON);
    args.extend_from_slice(&["--optimizer", "sa", "--rho", "0.05", "--seed", "0"]);
    let o = flatmin(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = std::fs::read(alone.join("model.safetensors")).unwrap();
    let b = std::fs::read(out.join("runs").join(names[3]).join("model.safetensors")).unwrap();
    assert!(a == b, "sweep run differs from the run alone");
    // Rerunning the finished sweep runs nothing and rewrites the summary.
    let o = sweep(
        &out,
        "optimizer=rs,sa rho=0.01,0.05 seed=0",
        &["--jobs", "2"],
    );
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("4 already done"), "{text}");
    assert!(!text.contains("start"), "{text}");
}

#[test]
fn sweep_emits_parallel_and_slurm_and_rejects_bad_grids() {
    let out = tmp("emit");
    let o = sweep(&out, "optimizer=rs,sa seed=0,1,2", &["--emit", "parallel"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let jobs = std::fs::read_to_string(out.join("jobs.txt")).unwrap();
    assert_eq!(jobs.lines().count(), 6);
    assert!(jobs
        .lines()
        .all(|l| l.contains(" train ") && l.contains("--out")));
    assert!(!out.join("runs/optimizer-rs_seed-0/config.json").exists());
    // Each line sets --threads, so `parallel -j 2` does not oversubscribe the cores.
    let o = sweep(
        &out,
        "optimizer=rs,sa",
        &["--emit", "parallel", "--jobs", "2"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_job = format!(" --threads {} ", (cores / 2).max(1));
    let jobs = std::fs::read_to_string(out.join("jobs.txt")).unwrap();
    assert!(
        jobs.lines().all(|l| l.matches(&per_job).count() == 2),
        "{jobs}"
    );
    let out2 = tmp("slurm");
    let o = sweep(&out2, "optimizer=rs,sa seed=0,1,2", &["--emit", "slurm"]);
    assert!(o.status.success());
    let sb = std::fs::read_to_string(out2.join("sweep.sbatch")).unwrap();
    assert!(sb.contains("#SBATCH --array=0-5"), "{sb}");
    // Slurm settings from flags; --cpus-per-task must agree with the train flags' --threads.
    let slurm = |extra: &[&str]| {
        let out = out2.display().to_string();
        let mut args = vec![
            "sweep", "--grid", "seed=0,1", "--out", &out, "--emit", "slurm",
        ];
        args.extend_from_slice(extra);
        args.extend(["--", "--model", "tiny-tanh", "--threads", "3"]);
        flatmin(&args)
    };
    let o = slurm(&["--time", "1:00:00", "--mem", "2G", "--partition", "cpu"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sb = std::fs::read_to_string(out2.join("sweep.sbatch")).unwrap();
    for line in [
        "--time=1:00:00",
        "--mem=2G",
        "--partition=cpu",
        "--cpus-per-task=3",
    ] {
        assert!(sb.contains(&format!("#SBATCH {line}\n")), "{line}: {sb}");
    }
    // A relative --out: the script and the job lines still name absolute paths.
    let parent = out2.parent().unwrap();
    let rel = Command::new(env!("CARGO_BIN_EXE_flatmin"))
        .args([
            "sweep",
            "--grid",
            "seed=0,1",
            "--out",
            "slurm-rel",
            "--emit",
            "slurm",
        ])
        .args(["--", "--model", "tiny-tanh"])
        .current_dir(parent)
        .output()
        .unwrap();
    assert!(
        rel.status.success(),
        "{}",
        String::from_utf8_lossy(&rel.stderr)
    );
    let abs = parent.join("slurm-rel");
    let sb = std::fs::read_to_string(abs.join("sweep.sbatch")).unwrap();
    assert!(sb.contains(&format!(" {}/jobs.txt", abs.display())), "{sb}");
    let jobs = std::fs::read_to_string(abs.join("jobs.txt")).unwrap();
    assert!(
        jobs.contains(&format!("--out {}/runs/seed-0 ", abs.display())),
        "{jobs}"
    );
    let o = slurm(&["--cpus-per-task", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--cpus-per-task 2 does not match --threads 3"),
        "{err}"
    );
    let o = slurm(&["--time", "1:00 #x"]);
    assert!(!o.status.success());
    let o = sweep(&tmp("bad"), "seed=0,1", &["--mem", "2G"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--mem is a Slurm setting"),
        "{err}"
    );
    // A flag the optimizer does not take, an unknown flag, a malformed grid.
    for grid in ["optimizer=sgd probe-batch=1", "frobnicate=1,2", "optimizer"] {
        let o = sweep(&tmp("bad"), grid, &[]);
        assert!(!o.status.success(), "{grid}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.starts_with("error: "), "{err}");
        assert_eq!(err.matches("error:").count(), 1, "{err}");
    }
}

/// Common flags may include `--quiet` (as a train command line copied from the docs does):
/// the runs get it once, not twice (which `flatmin train` refuses).
#[test]
fn sweep_accepts_quiet_among_the_common_flags() {
    let out = tmp("quiet");
    let out_s = out.display().to_string();
    let mut args = vec!["sweep", "--grid", "seed=0", "--out", &out_s, "--"];
    args.extend_from_slice(&COMMON);
    args.push("--quiet");
    let o = flatmin(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("runs/seed-0/summary.json").is_file());
}

/// A grid of millions of runs (or more than 2^64) is refused from the product of its axis
/// lengths, at once and naming the count, before any combination is built; so are a value
/// given twice (literally or as two spellings of one number) and values or settings whose
/// run-folder names would be the same. Nothing is created.
#[test]
fn huge_grids_duplicates_and_colliding_names_are_refused() {
    let hundred: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    let hundred = hundred.join(",");
    let million = format!("seed={hundred} data-seed={hundred} checkpoint-every={hundred}");
    let ten = "0,1,2,3,4,5,6,7,8,9";
    let overflow = (0..20)
        .map(|i| format!("k{i}={ten}"))
        .collect::<Vec<_>>()
        .join(" ");
    let cases = [
        (
            million.as_str(),
            vec!["1000000 runs", "100 x 100 x 100", "10000"],
        ),
        (overflow.as_str(), vec!["more than 2^64 runs", "10000"]),
        ("seed=0,1 lr=0.1,0.2,0.1", vec!["lr=0.1 is given twice"]),
        (
            "lr=0.1,1e-1",
            vec!["lr=0.1 and lr=1e-1 are the same number"],
        ),
        ("seed=0,-0", vec!["same number"]),
        (
            "model=mlp:10:relu,mlp_10_relu",
            vec!["share the run folder name 'model-mlp_10_relu'"],
        ),
        (
            "aa=1_bb-2,1 bb=3,2_bb-3",
            vec!["aa=1_bb-2 bb=3 and aa=1 bb=2_bb-3", "aa-1_bb-2_bb-3"],
        ),
    ];
    for (grid, want) in cases {
        let out = tmp("huge");
        let args: Vec<String> = [
            "sweep",
            "--grid",
            grid,
            "--out",
            out.to_str().unwrap(),
            "--emit",
            "parallel",
            "--",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(COMMON.iter().map(|s| s.to_string()))
        .collect();
        let bin = env!("CARGO_BIN_EXE_flatmin");
        let (status, err) = common::run_bounded(bin, &args, Duration::from_secs(60));
        assert!(!status.success(), "{grid:.80}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("error: --grid: "), "{err}");
        for w in want {
            assert!(err.contains(w), "{grid:.80}: no '{w}' in {err}");
        }
        assert!(!out.exists(), "{grid:.80}: the sweep folder was created");
    }
    // Distinct values still make distinct runs.
    let o = sweep(
        &tmp("distinct"),
        "lr=0.1,0.01 seed=1,10",
        &["--emit", "parallel"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The `pid N` that a run's `.lock` file records, once it is written.
fn lock_pid(run: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(run.join(".lock")).ok()?;
    text.strip_prefix("pid ")?.split(' ').next()?.parse().ok()
}

/// True while a process `pid` runs `flatmin train` into a folder under `root` (a pid that
/// was reused by another program does not count).
fn trains_under(pid: u32, root: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat.rsplit(") ").next().is_some_and(|s| s.starts_with('Z'));
    !zombie && cmdline.contains("train") && cmdline.contains(root.to_str().unwrap())
}

/// A running `flatmin sweep` of three runs, two at a time (a real child process), once both
/// running runs have logged a step: its folder, its arguments, the process, the running
/// runs' folders and their `flatmin train` pids (from their `.lock` files).
struct Running {
    out: PathBuf,
    args: Vec<String>,
    parent: std::process::Child,
    runs: [PathBuf; 2],
    pids: Vec<u32>,
}

fn running_sweep(name: &str) -> Running {
    let out = tmp(name);
    let args: Vec<String> = [
        "sweep",
        "--grid",
        "seed=1,2,3",
        "--jobs",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--",
        "--model",
        "cnn-s",
        "--data",
        "synthetic",
        "--epochs",
        "12",
        "--train-size",
        "400",
        "--test-size",
        "100",
        "--batch-size",
        "40",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let mut parent = Command::new(env!("CARGO_BIN_EXE_flatmin"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait (bounded, as a hang guard) until both running runs have logged a step.
    let runs = [out.join("runs/seed-1"), out.join("runs/seed-2")];
    let started = Instant::now();
    let pids: Vec<u32> = loop {
        let pids: Vec<u32> = runs.iter().filter_map(|r| lock_pid(r)).collect();
        let logged = runs.iter().all(|r| {
            std::fs::read_to_string(r.join("metrics.jsonl")).is_ok_and(|m| m.contains("\"train\""))
        });
        if pids.len() == 2 && logged {
            break pids;
        }
        if started.elapsed() > Duration::from_secs(120) || parent.try_wait().unwrap().is_some() {
            let _ = parent.kill();
            panic!(
                "the sweep's runs did not start: {:?}",
                parent.wait_with_output()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Running {
        out,
        args,
        parent,
        runs,
        pids,
    }
}

/// Each stopped run has a checkpoint and no summary, its log says it was interrupted, the
/// third run was not started; then rerunning the sweep resumes the two, runs the third and
/// writes the summary.
fn stopped_runs_resume(out: &Path, args: &[String], runs: &[PathBuf]) {
    for run in runs {
        assert!(
            run.join("checkpoints/last.safetensors").is_file(),
            "{}: no checkpoint",
            run.display()
        );
        assert!(
            !run.join("summary.json").exists(),
            "{} finished",
            run.display()
        );
        let name = run.file_name().unwrap().to_str().unwrap();
        let log = std::fs::read_to_string(out.join("logs").join(format!("{name}.log")));
        assert!(log.unwrap().contains("interrupted after step"), "{name}");
    }
    assert!(!out.join("runs/seed-3").exists());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = flatmin(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for n in ["seed-1", "seed-2", "seed-3"] {
        assert!(
            out.join("runs").join(n).join("summary.json").is_file(),
            "{n}"
        );
    }
    let csv = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
}

/// SIGTERM to a running `flatmin sweep` (a real child process, two runs at a time, three in
/// the grid): the parent forwards it to its runs, which checkpoint and exit, waits for them,
/// then fails with one line naming the signal, the stopped runs and how to resume; no
/// `flatmin train` survives it. A second sweep on the same folder meanwhile is refused.
/// Rerunning the sweep resumes the stopped runs and finishes all three.
#[test]
fn sigterm_to_a_sweep_stops_its_runs_at_a_checkpoint_and_a_rerun_finishes() {
    let Running {
        out,
        args: owned_args,
        parent,
        runs,
        pids,
    } = running_sweep("sigterm");
    let args: Vec<&str> = owned_args.iter().map(String::as_str).collect();
    // A second sweep into the same folder is refused while this one runs.
    let second = flatmin(&args);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(
        err.contains("the sweep folder is in use by pid") && err.lines().count() == 1,
        "{err}"
    );
    let rc = unsafe { libc::kill(parent.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let o = parent.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("interrupted by SIGTERM")
            && err.contains("seed-1, seed-2")
            && err.contains("1 not started")
            && err.contains("rerun the same `flatmin sweep`"),
        "{err}"
    );
    for pid in &pids {
        assert!(
            !trains_under(*pid, &out),
            "flatmin train {pid} survived the sweep"
        );
    }
    stopped_runs_resume(&out, &owned_args, &runs);
}

/// `kill -9` of a running `flatmin sweep`: its runs are not left behind as orphans; each
/// gets SIGTERM from the kernel as the sweep dies (`PR_SET_PDEATHSIG`), checkpoints and
/// exits; rerunning the sweep resumes them and finishes all three.
#[cfg(target_os = "linux")]
#[test]
fn kill9_of_a_sweep_stops_its_runs_at_a_checkpoint() {
    let Running {
        out,
        args,
        mut parent,
        runs,
        pids,
    } = running_sweep("kill9");
    parent.kill().unwrap();
    parent.wait().unwrap();
    // The runs checkpoint and exit on their own; wait for that (bounded, a hang guard).
    let started = Instant::now();
    while pids.iter().any(|&p| trains_under(p, &out)) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the runs outlived the killed sweep by 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stopped_runs_resume(&out, &args, &runs);
}

/// Runs array task `task` of a Slurm script with bash, the way Slurm would (its variables
/// set by hand), from a folder that is not the sweep's.
fn array_task(script: &Path, task: usize, cwd: &Path) -> std::process::Child {
    Command::new("bash")
        .arg(script)
        .current_dir(cwd)
        .env("SLURM_ARRAY_TASK_ID", task.to_string())
        .env("SLURM_CPUS_PER_TASK", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The emitted Slurm scripts (split at --max-array-size, absolute paths) run with bash from
/// another folder: a task stopped by SIGTERM (what Slurm sends on preemption or a time limit)
/// and run again resumes its run instead of restarting or failing; running every task a
/// second time changes nothing and fails nothing; then the sweep rerun writes the summary.
#[test]
fn slurm_scripts_run_from_any_folder_and_a_requeued_task_resumes() {
    let out = tmp("slurm-run");
    let elsewhere = tmp("slurm-elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let mut args: Vec<String> = ["sweep", "--grid", "epochs=12,1,2", "--out"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.push(out.display().to_string());
    let common =
        "-- --model cnn-s --data synthetic --train-size 400 --test-size 100 --batch-size 40";
    let emit = "--emit slurm --max-array-size 2 --cpus-per-task 2 --time 0:30:00";
    let owned: Vec<String> = args
        .iter()
        .cloned()
        .chain(emit.split(' ').chain(common.split(' ')).map(String::from))
        .collect();
    let o = flatmin(&owned.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.join("sweep.sbatch").exists());
    let scripts = [out.join("sweep-0.sbatch"), out.join("sweep-1.sbatch")];
    let tasks = [(&scripts[0], 0), (&scripts[0], 1), (&scripts[1], 0)];
    // Task 0 (epochs-12) is stopped by SIGTERM once it has logged a step.
    let run = out.join("runs/epochs-12");
    let child = array_task(&scripts[0], 0, &elsewhere);
    let started = Instant::now();
    let pid = loop {
        let logged = std::fs::read_to_string(run.join("metrics.jsonl"))
            .is_ok_and(|m| m.contains("\"train\""));
        if let (Some(pid), true) = (lock_pid(&run), logged) {
            break pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the task did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success());
    assert!(run.join("checkpoints/last.safetensors").is_file());
    assert!(!run.join("summary.json").exists());
    // Every task, twice: the stopped one resumes and finishes, then nothing changes.
    for pass in 0..2 {
        for (script, task) in tasks {
            let o = array_task(script, task, &elsewhere)
                .wait_with_output()
                .unwrap();
            assert!(
                o.status.success(),
                "pass {pass}, {} task {task}: {}",
                script.display(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    let log = std::fs::read_to_string(out.join("logs/epochs-12.log")).unwrap();
    assert!(
        log.contains("interrupted after step")
            && log.contains("done: ")
            && log.contains("epochs-12 is finished"),
        "{log}"
    );
    for name in ["epochs-12", "epochs-1", "epochs-2"] {
        assert!(
            out.join("runs").join(name).join("summary.json").is_file(),
            "{name}"
        );
    }
    let o = flatmin(
        &args
            .iter()
            .map(String::as_str)
            .chain(common.split(' '))
            .collect::<Vec<_>>(),
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("3 already done"), "{text}");
    let csv = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
}

/// A sweep rerun into the same folder with other common flags (or a grid that gives an
/// existing run folder other settings) is refused, naming the run and each setting that
/// differs, before any run starts: otherwise a finished run would be counted as done and a
/// stopped one resumed with its old recipe, both reported under the new settings. The same
/// sweep, and a grid that only adds runs, still rerun.
#[test]
fn a_rerun_with_other_settings_is_refused_naming_the_run_and_setting() {
    let out = tmp("changed");
    let o = sweep(&out, "seed=0,1", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let snapshot = || {
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        for run in ["seed-0", "seed-1"] {
            for f in ["config.json", "metrics.jsonl", "summary.json"] {
                let p = out.join("runs").join(run).join(f);
                files.push((
                    p.display().to_string(),
                    std::fs::read(&p).unwrap_or_default(),
                ));
            }
        }
        files
    };
    let before = snapshot();
    // Other common flags (a later --lr overrides the first); then one run stopped midway.
    for stopped in [false, true] {
        if stopped {
            std::fs::remove_file(out.join("runs/seed-1/summary.json")).unwrap();
        }
        let before = snapshot();
        let dir = out.display().to_string();
        let mut args = vec!["sweep", "--grid", "seed=0,1", "--out", &dir, "--"];
        args.extend_from_slice(&COMMON);
        args.extend_from_slice(&["--lr", "0.2"]);
        let o = flatmin(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("error: --out: the run seed-0"), "{err}");
        assert!(err.contains("lr 0.05 -> 0.2"), "{err}");
        assert_eq!(snapshot(), before, "a refused sweep changed a run");
    }
    // The same sweep resumes the stopped run; a grid that adds a run runs only that one.
    let o = sweep(&out, "seed=0,1", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(snapshot()[..3], before[..3]);
    let o = sweep(&out, "seed=0,1,2", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("2 already done"), "{text}");
    assert!(out.join("runs/seed-2/summary.json").is_file());
}

//! `flatmin sweep`: grid expansion into run folders, N runs at a time with results
//! bit-identical to running each alone, the summary table and plot, the GNU parallel and
//! Slurm outputs, and rerunning a finished sweep.

use std::path::{Path, PathBuf};
use std::process::Command;

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
    let out2 = tmp("slurm");
    let o = sweep(&out2, "optimizer=rs,sa seed=0,1,2", &["--emit", "slurm"]);
    assert!(o.status.success());
    let sb = std::fs::read_to_string(out2.join("sweep.sbatch")).unwrap();
    assert!(sb.contains("#SBATCH --array=0-5"), "{sb}");
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

//! Interruption and divergence with a real child process: SIGINT finishes the step, writes a
//! checkpoint and exits non-zero with how to resume, and the resumed run is bit-identical to
//! an uninterrupted one; a second signal exits at once; `kill -9` at any moment leaves a
//! loadable checkpoint; NaN/inf stops with the step and tensor named, or skips the step.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::metrics_without_wall_time;

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("robust-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const RUN: [&str; 16] = [
    "train",
    "--data",
    "synthetic",
    "--model",
    "cnn-s",
    "--epochs",
    "12",
    "--train-size",
    "400",
    "--test-size",
    "100",
    "--batch-size",
    "40",
    "--seed",
    "4",
    "--quiet",
];

fn spawn(args: &[&str], cwd: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_flatmin"))
        .args(args)
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn run(args: &[&str], cwd: &Path) -> Output {
    spawn(args, cwd).wait_with_output().unwrap()
}

fn train_records(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .map(|s| s.lines().filter(|l| l.contains("\"train\"")).count())
        .unwrap_or(0)
}

fn wait_for_records(dir: &Path, n: usize) {
    let t0 = Instant::now();
    while train_records(dir) < n {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the run did not make progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn sigint_checkpoints_and_resume_is_bit_identical() {
    let dir = tmp("sigint");
    let mut full = RUN.to_vec();
    full.extend(["--out", "full"]);
    assert!(run(&full, &dir).status.success());

    let mut part = RUN.to_vec();
    part.extend(["--out", "part"]);
    let child = spawn(&part, &dir);
    wait_for_records(&dir.join("part"), 13);
    signal(&child, "-INT");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an interrupted run must exit non-zero"
    );
    assert!(
        stderr.contains("interrupted after step") && stderr.contains("flatmin train --resume"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let stopped_at = train_records(&dir.join("part"));
    assert!(
        stopped_at < 120,
        "the run finished before the signal took effect"
    );
    let out = run(&["train", "--resume", "part", "--quiet"], &dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        metrics_without_wall_time(&dir.join("full/metrics.jsonl")),
        metrics_without_wall_time(&dir.join("part/metrics.jsonl"))
    );
    assert_eq!(
        std::fs::read(dir.join("full/model.safetensors")).unwrap(),
        std::fs::read(dir.join("part/model.safetensors")).unwrap(),
        "final weights differ after an interrupted and resumed run"
    );
}

#[test]
fn second_signal_exits_at_once_and_kill9_never_corrupts() {
    let dir = tmp("kill");
    let mut args = RUN.to_vec();
    args.extend(["--out", "r"]);
    let child = spawn(&args, &dir);
    wait_for_records(&dir.join("r"), 25);
    signal(&child, "-INT");
    signal(&child, "-INT");
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    // SIGKILL at several moments; after each, the checkpoint (if any) loads and the run resumes.
    for (i, delay) in [7u64, 23, 41, 3, 57].iter().enumerate() {
        let child = spawn(&["train", "--resume", "r", "--quiet"], &dir);
        std::thread::sleep(Duration::from_millis(120 + delay * 3));
        signal(&child, "-KILL");
        let _ = child.wait_with_output().unwrap();
        let ckpt = dir.join("r/checkpoints/last.safetensors");
        if ckpt.exists() {
            let raw = flatmin_models::io::read_safetensors(&ckpt)
                .unwrap_or_else(|e| panic!("kill {i}: checkpoint unreadable: {e}"));
            assert!(raw.iter().any(|t| t.name == "trainer/step"));
            let mut m = flatmin_models::Model::<f32>::named("cnn-s", 0).unwrap();
            m.load(&dir.join("r/model.safetensors"))
                .unwrap_or_else(|e| panic!("kill {i}: model unreadable: {e}"));
        }
    }
    let out = run(&["train", "--resume", "r", "--quiet"], &dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(train_records(&dir.join("r")), 120);
}

#[test]
fn divergence_stops_with_step_and_tensor_or_skips() {
    let dir = tmp("nan");
    let base = [
        "train",
        "--data",
        "synthetic",
        "--model",
        "mlp:3072,64,10:relu",
        "--epochs",
        "2",
        "--train-size",
        "200",
        "--test-size",
        "100",
        "--batch-size",
        "50",
        "--lr",
        "1e30",
        "--quiet",
    ];
    let mut args = base.to_vec();
    args.extend(["--out", "stop"]);
    let out = run(&args, &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("diverged: non-finite") && stderr.contains("at step"),
        "{stderr}"
    );
    let mut args = base.to_vec();
    args.extend(["--out", "skip", "--on-nonfinite", "skip-step"]);
    let out = run(&args, &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Skipping keeps the parameters of the last good step, so the run completes, unless the
    // parameters themselves overflow (then it stops naming the parameter).
    if out.status.success() {
        let m = std::fs::read_to_string(dir.join("skip/metrics.jsonl")).unwrap();
        assert!(m.contains("\"skip\""), "no skipped step recorded");
    } else {
        assert!(stderr.contains("parameter '"), "{stderr}");
    }
    let out = run(&["train", "--on-nonfinite", "ignore"], &dir);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--on-nonfinite"));
}

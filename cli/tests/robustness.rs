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

/// Resumes the run folder `dir/r` to its end; it must succeed without a panic.
fn resume_to_the_end(dir: &Path) {
    let out = run(&["train", "--resume", "r", "--quiet"], dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
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
fn sigterm_checkpoints_like_sigint() {
    let dir = tmp("sigterm");
    let mut args = RUN.to_vec();
    args.extend(["--out", "r"]);
    let child = spawn(&args, &dir);
    wait_for_records(&dir.join("r"), 13);
    signal(&child, "-TERM");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a terminated run must exit non-zero");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("interrupted after step") && stderr.contains("flatmin train --resume r"),
        "{stderr}"
    );
    let stopped_at = train_records(&dir.join("r"));
    assert!(stopped_at < 120, "the run finished before the signal");
    let raw =
        flatmin_models::io::read_safetensors(&dir.join("r/checkpoints/last.safetensors")).unwrap();
    let step = raw.iter().find(|t| t.name == "trainer/step").unwrap();
    assert_eq!(
        step.data,
        flatmin_models::io::RawData::I64(vec![stopped_at as i64]),
        "the checkpoint is not at the last logged step"
    );
    resume_to_the_end(&dir);
    assert_eq!(train_records(&dir.join("r")), 120);
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
    resume_to_the_end(&dir);
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
    // No checkpoint exists yet: the message must not claim one is kept.
    assert!(
        stderr.contains("no checkpoint was written yet") && !stderr.contains("is kept"),
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

#[test]
fn divergence_after_a_checkpoint_keeps_it_and_skip_step_keeps_params_finite() {
    // lr 10 makes this MLP overflow in its fourth epoch (4 steps an epoch), after three
    // checkpoints.
    let dir = tmp("nan-late");
    let base = [
        "train",
        "--data",
        "synthetic",
        "--model",
        "mlp:3072,64,10:relu",
        "--epochs",
        "6",
        "--train-size",
        "200",
        "--test-size",
        "100",
        "--batch-size",
        "50",
        "--lr",
        "10",
        "--quiet",
    ];
    let ckpt_step = |run: &str| -> i64 {
        let raw = flatmin_models::io::read_safetensors(
            &dir.join(run).join("checkpoints/last.safetensors"),
        )
        .unwrap();
        match &raw.iter().find(|t| t.name == "trainer/step").unwrap().data {
            flatmin_models::io::RawData::I64(v) => v[0],
            other => panic!("{other:?}"),
        }
    };
    let mut args = base.to_vec();
    args.extend(["--out", "stop"]);
    let out = run(&args, &dir);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("the last good checkpoint stop/checkpoints/last.safetensors is kept"),
        "{stderr}"
    );
    let at: i64 = stderr
        .split("non-finite loss at step ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no step in: {stderr}"));
    let kept = ckpt_step("stop");
    assert!(kept > 0, "diverged before the first checkpoint: {stderr}");
    assert_eq!(kept, (at - 1) / 4 * 4, "not the last epoch's checkpoint");
    let mut m = flatmin_models::Model::<f32>::named("mlp:3072,64,10:relu", 0).unwrap();
    m.load(&dir.join("stop/model.safetensors")).unwrap();
    // Resuming from the kept checkpoint replays the same steps and diverges at the same one.
    let out = run(&["train", "--resume", "stop", "--quiet"], &dir);
    assert_eq!(String::from_utf8_lossy(&out.stderr), stderr);
    assert_eq!(ckpt_step("stop"), kept);

    let mut args = base.to_vec();
    args.extend(["--out", "skip", "--on-nonfinite", "skip-step"]);
    let out = run(&args, &dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = std::fs::read_to_string(dir.join("skip/metrics.jsonl")).unwrap();
    let skipped = metrics.lines().filter(|l| l.contains("\"skip\"")).count();
    assert!(skipped > 0, "no step was skipped");
    assert_eq!(
        metrics.lines().filter(|l| l.contains("\"train\"")).count() + skipped,
        24
    );
    // Skipped steps leave the parameters as they were: finite (Model::load refuses others).
    let mut m = flatmin_models::Model::<f32>::named("mlp:3072,64,10:relu", 0).unwrap();
    m.load(&dir.join("skip/model.safetensors")).unwrap();
}

/// `kill -9` inside a checkpoint write, not at a random moment: the test watches the
/// checkpoint folder and kills the process the instant the temporary file of the next write
/// appears (a large model makes each write take a while). The previous checkpoint must be
/// intact and loadable, and the run must resume and finish.
#[test]
fn kill9_during_a_checkpoint_write_keeps_the_previous_checkpoint() {
    let dir = tmp("kill-in-write");
    // 3072 x 2048 + 2048 x 10 weights: a checkpoint of about 50 MB (weights + momentum).
    let args = [
        "train",
        "--data",
        "synthetic",
        "--model",
        "mlp:3072,2048,10:relu",
        "--epochs",
        "6",
        "--train-size",
        "64",
        "--test-size",
        "20",
        "--batch-size",
        "32",
        "--seed",
        "3",
        "--quiet",
        "--out",
        "r",
    ];
    let ckdir = dir.join("r/checkpoints");
    let last = ckdir.join("last.safetensors");
    let mut child = spawn(&args, &dir);
    let writing = || {
        std::fs::read_dir(&ckdir)
            .map(|it| {
                it.flatten()
                    .any(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            })
            .unwrap_or(false)
    };
    // Wait for a first complete checkpoint, then for the temporary file of a later write.
    // The process is stopped first, so that the checkpoint read as "before" is the one on
    // disk at the kill (a whole write could otherwise finish between two polls); where the
    // write finished before the stop took hold, the run continues and the next one is caught.
    let t0 = Instant::now();
    let mut before: Option<Vec<u8>> = None;
    let mut seen_complete = false;
    while t0.elapsed() < Duration::from_secs(120) {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        match (seen_complete, writing()) {
            (false, false) => seen_complete = last.exists(),
            (true, true) => {
                signal(&child, "-STOP");
                if writing() {
                    before = Some(std::fs::read(&last).expect("the complete checkpoint reads"));
                    signal(&child, "-KILL");
                    break;
                }
                signal(&child, "-CONT");
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let killed_in_write = before.is_some();
    let _ = child.wait();
    assert!(
        killed_in_write,
        "no checkpoint write was caught in progress (the run ended or stalled)"
    );
    let before = before.expect("a complete checkpoint before the kill");
    // The killed write left its temporary file; the checkpoint is the previous one, intact.
    let left: Vec<String> = std::fs::read_dir(&ckdir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.iter().any(|n| n.contains(".tmp-")), "{left:?}");
    assert_eq!(
        std::fs::read(&last).unwrap(),
        before,
        "the previous checkpoint changed"
    );
    let raw = flatmin_models::io::read_safetensors(&last).expect("the checkpoint loads");
    assert!(raw.iter().any(|t| t.name == "trainer/step"));
    // Resuming from it finishes the run despite the leftover temporary file.
    resume_to_the_end(&dir);
    assert_eq!(train_records(&dir.join("r")), 12);
}

/// A divergence in the parameters themselves on the very first step (`--lr 1e39` is infinite
/// in f32, so the first update makes the weights infinite though the loss and gradient were
/// finite) says that no checkpoint exists, not that "the last good checkpoint is kept".
#[test]
fn parameter_divergence_on_the_first_step_claims_no_checkpoint() {
    let dir = tmp("nan-first-step");
    let train = |out: &str, lr: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--data",
            "synthetic",
            "--model",
            "tiny-tanh",
            "--epochs",
            "1",
            "--train-size",
            "64",
            "--test-size",
            "32",
            "--lr",
            lr,
            "--quiet",
            "--out",
            out,
        ];
        args.extend_from_slice(extra);
        run(&args, &dir)
    };
    // Without and with a trace logged before the first step (a step-0 record).
    for (out, extra) in [("first", &[][..]), ("traced", &["--trace-every", "1"][..])] {
        let failed = train(out, "1e39", extra);
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert!(!failed.status.success());
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("parameter '") && stderr.contains("at step 1 "),
            "{stderr}"
        );
        assert!(
            stderr.contains("no checkpoint was written yet") && !stderr.contains("is kept"),
            "{stderr}"
        );
        assert!(!dir.join(out).join("checkpoints/last.safetensors").exists());
        // Nothing was trained: the same --out takes a new run without --overwrite, and its
        // metrics hold each record once (one step-0 trace, not the failed run's as well).
        let again = train(out, "0.05", extra);
        let stderr = String::from_utf8_lossy(&again.stderr);
        assert!(again.status.success(), "{out}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        let lines = metrics_without_wall_time(&dir.join(out).join("metrics.jsonl"));
        let step0 = lines
            .iter()
            .filter(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"] == 0)
            .count();
        assert_eq!(step0, usize::from(!extra.is_empty()), "{lines:?}");
        assert!(dir.join(out).join("model.safetensors").is_file());
    }
}

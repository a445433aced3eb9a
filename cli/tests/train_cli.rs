//! `flatmin train` through the binary: a short run, the synthetic fallback warning, real data
//! (the CIFAR-10 subset of `flatmin_datasets::test_data`; skipped without it), and one-line
//! errors naming the flag for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::metrics_without_wall_time;

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("train-cli-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn flatmin(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flatmin"))
        .args(args)
        .current_dir(cwd)
        .env_remove("FLATMIN_DATA")
        .env("HOME", cwd)
        .env("XDG_CACHE_HOME", cwd.join("cache"))
        .output()
        .unwrap()
}

const SMALL: [&str; 12] = [
    "--model",
    "tiny-tanh",
    "--epochs",
    "1",
    "--train-size",
    "200",
    "--test-size",
    "100",
    "--batch-size",
    "50",
    "--warmup",
    "0",
];

#[test]
fn short_run_with_synthetic_fallback_warns_loudly() {
    let dir = tmp("auto");
    let mut args = vec!["train"];
    args.extend(SMALL);
    args.extend(["--out", "run", "--quiet"]);
    let out = flatmin(&args, &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("SYNTHETIC") && stderr.contains("flatmin data fetch cifar10"),
        "{stderr}"
    );
    for f in [
        "config.json",
        "metrics.jsonl",
        "metrics.csv",
        "model.safetensors",
        "checkpoints/last.safetensors",
    ] {
        assert!(dir.join("run").join(f).is_file(), "{f}");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("test accuracy"), "{stdout}");
    // Default run folder naming: runs/MODEL-OPTIMIZER-sSEED, numbered when taken.
    let mut args = vec!["train"];
    args.extend(SMALL);
    args.extend(["--data", "synthetic", "--quiet"]);
    for want in ["runs/tiny-tanh-sgd-s0", "runs/tiny-tanh-sgd-s0-2"] {
        let out = flatmin(&args, &dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(dir.join(want).join("config.json").is_file(), "{want}");
    }
}

#[test]
fn trains_on_real_cifar10_subset() {
    // Skipped (with a SKIPPED line on stderr) without the subset, unless
    // FLATMIN_REQUIRE_TEST_DATA=1.
    let Some(data) = flatmin_datasets::test_data::subset_dir() else {
        return;
    };
    let data = data.to_str().expect("a UTF-8 data path");
    let dir = tmp("real");
    let out = flatmin(
        &[
            "train",
            "--model",
            "tiny-tanh",
            "--epochs",
            "2",
            "--train-size",
            "1000",
            "--test-size",
            "500",
            "--batch-size",
            "100",
            "--data",
            data,
            "--out",
            "run",
        ],
        &dir,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("SYNTHETIC"), "{stderr}");
    assert!(
        stderr.contains("epoch 2:"),
        "plain progress lines on stderr expected when it is not a terminal: {stderr}"
    );
    let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    let acc = last["test_acc"].as_f64().unwrap();
    assert!(
        acc > 0.15,
        "tiny-tanh should beat chance on real CIFAR-10 after 2 epochs, got {acc}"
    );
}

#[test]
fn bad_flags_give_one_line_errors() {
    let dir = tmp("errors");
    let run = tmp("errors-run");
    let mut args = vec!["train"];
    args.extend(SMALL);
    args.extend(["--data", "synthetic", "--out"]);
    let run_s = run.join("r").display().to_string();
    args.push(&run_s);
    args.push("--quiet");
    assert!(flatmin(&args, &dir).status.success());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["train", "--epochs", "0"], "--epochs"),
        (vec!["train", "--lr", "-1"], "--lr"),
        (vec!["train", "--lr", "nan"], "--lr"),
        (vec!["train", "--momentum", "1.5"], "--momentum"),
        (vec!["train", "--batch-size", "0"], "--batch-size"),
        (vec!["train", "--optimizer", "lion"], "--optimizer"),
        (vec!["train", "--model", "resnet99"], "--model"),
        (vec!["train", "--schedule", "linear"], "--schedule"),
        (vec!["train", "--dtype", "f16"], "--dtype"),
        (vec!["train", "--threads", "0"], "--threads"),
        // Epoch counts whose step counts overflow (these used to panic).
        (
            vec![
                "train",
                "--data",
                "synthetic",
                "--epochs",
                "18446744073709551615",
            ],
            "--epochs 18446744073709551615: too large",
        ),
        (
            vec![
                "train",
                "--data",
                "synthetic",
                "--schedule",
                "step",
                "--step-every",
                "18446744073709551615",
            ],
            "--step-every 18446744073709551615: too large",
        ),
        (
            vec![
                "train",
                "--data",
                "synthetic",
                "--warmup",
                "18446744073709551615",
            ],
            "--warmup 18446744073709551615: too large",
        ),
        (
            vec!["train", "--data", "/nonexistent/cifar"],
            "/nonexistent/cifar",
        ),
        (
            vec!["train", "--data", "synthetic", "--train-size", "100000"],
            "--train-size",
        ),
        (
            vec!["train", "--resume", "/nonexistent/run"],
            "/nonexistent/run",
        ),
        (vec!["train", "--resume", &run_s, "--lr", "0.1"], "--lr"),
        (
            vec!["train", "--data", "synthetic", "--out", &run_s],
            "already holds a run",
        ),
    ];
    for (args, needle) in cases {
        let out = flatmin(&args, &dir);
        common::assert_error(&out, needle, &format!("{args:?}"));
    }
}

#[test]
fn config_rerun_is_identical_and_overwrite_replaces() {
    let dir = tmp("rerun");
    let mut args = vec!["train"];
    args.extend(SMALL.iter().map(|a| if *a == "1" { "2" } else { a })); // two epochs
    args.extend([
        "--data",
        "synthetic",
        "--seed",
        "3",
        "--out",
        "a",
        "--quiet",
    ]);
    let out = flatmin(&args, &dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("a/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["seed"], 3);
    assert_eq!(cfg["flatmin_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(cfg["dataset"]["train_images"], 200);
    assert_eq!(cfg["dataset"]["train_sha256"].as_str().unwrap().len(), 64);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("a/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["steps"], 8);
    assert!(summary["final"]["test_acc"].as_f64().is_some());
    // `flatmin eval --checkpoint` reproduces the run's final test accuracy.
    let out = flatmin(
        &[
            "eval",
            "--checkpoint",
            "a/checkpoints/last.safetensors",
            "--json",
        ],
        &dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let ev: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert_eq!(
        ev["acc"].as_f64(),
        summary["final"]["test_acc"].as_f64(),
        "{line}"
    );
    // Rerun the recorded experiment exactly.
    let out = flatmin(
        &[
            "train",
            "--config",
            "a/config.json",
            "--out",
            "b",
            "--quiet",
        ],
        &dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        metrics_without_wall_time(&dir.join("a/metrics.jsonl")),
        metrics_without_wall_time(&dir.join("b/metrics.jsonl"))
    );
    // Flags override the file.
    let out = flatmin(
        &[
            "train",
            "--config",
            "a/config.json",
            "--epochs",
            "1",
            "--out",
            "c",
            "--quiet",
        ],
        &dir,
    );
    assert!(out.status.success());
    assert_eq!(
        metrics_without_wall_time(&dir.join("c/metrics.jsonl")).len(),
        4 + 1
    );
    // --overwrite replaces an existing run; without it the folder is refused.
    let out = flatmin(
        &[
            "train",
            "--config",
            "a/config.json",
            "--epochs",
            "1",
            "--out",
            "b",
            "--quiet",
        ],
        &dir,
    );
    assert!(!out.status.success());
    let out = flatmin(
        &[
            "train",
            "--config",
            "a/config.json",
            "--epochs",
            "1",
            "--out",
            "b",
            "--overwrite",
            "--quiet",
        ],
        &dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        metrics_without_wall_time(&dir.join("b/metrics.jsonl")).len(),
        5
    );
}

#[test]
fn unwritable_run_folder_fails_before_training() {
    let dir = tmp("unwritable");
    std::fs::write(dir.join("plain-file"), b"x").unwrap();
    let mut args = vec!["train"];
    args.extend(SMALL);
    args.extend(["--data", "synthetic", "--out", "plain-file/run"]);
    let out = flatmin(&args, &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.starts_with("error: --out plain-file/run"),
        "{stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("epoch"),
        "training must not start"
    );
    let out = flatmin(&["train", "--config", "missing.json"], &dir);
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: --config missing.json"));
}

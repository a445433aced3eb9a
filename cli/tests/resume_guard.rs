//! Resumes that cannot silently change the experiment (real child processes): a
//! `config.json` edited since the checkpoint, other images under `--data`, and a
//! `metrics.jsonl` that no longer reaches the checkpoint are refused with one line naming
//! what differs, changing nothing; a run that stopped between its last checkpoint and its
//! final files gets them on `--resume`; a setup error leaves no folder that blocks the rerun.

use flatmin_models::io::{read_safetensors, write_safetensors};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

fn tmp(name: &str) -> PathBuf {
    common::scratch("resume-guard", name)
}

/// `flatmin ARGS` run in `cwd`.
fn flatmin(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flatmin"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

/// A small run into `out`: 2 epochs of 4 steps on synthetic data (extra flags appended).
fn train(cwd: &Path, out: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--data",
        "synthetic",
        "--model",
        "mlp:48,4,10:tanh:pool8",
        "--epochs",
        "2",
        "--train-size",
        "80",
        "--test-size",
        "40",
        "--batch-size",
        "20",
        "--seed",
        "3",
        "--quiet",
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    flatmin(&args, cwd)
}

fn ok(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The one `error:` line of a failed command (no panic, non-zero status).
fn error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "succeeded: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    errors[0].to_string()
}

/// Every file of a folder but the lock file (whose record names the last process that
/// took the lock), with its bytes, sorted: to show that a refusal changed nothing.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() == ".lock" {
            continue;
        }
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

fn resume(cwd: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--resume", "r", "--quiet"];
    args.extend_from_slice(extra);
    flatmin(&args, cwd)
}

fn edit_config(cwd: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = cwd.join("r/config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn an_edited_config_or_other_data_is_refused_naming_what_differs() {
    let dir = tmp("edited");
    ok(&train(&dir, "r", &[]));
    let original = std::fs::read(dir.join("r/config.json")).unwrap();
    let refused = |edit: &dyn Fn(&mut serde_json::Value), needles: &[&str]| {
        std::fs::write(dir.join("r/config.json"), &original).unwrap();
        edit_config(&dir, |v| edit(v));
        let before = snapshot(&dir.join("r"));
        let err = error_line(&resume(&dir, &[]));
        assert!(
            err.starts_with("error: r/config.json was changed since the checkpoint: "),
            "{err}"
        );
        for n in needles {
            assert!(err.contains(n), "{n:?} not in: {err}");
        }
        assert!(
            snapshot(&dir.join("r")) == before,
            "a refusal changed the run"
        );
    };
    refused(
        &|v| {
            v["lr"] = 0.2.into();
            v["epochs"] = 9.into();
        },
        &["epochs 2 -> 9", "lr 0.05 -> 0.2"],
    );
    refused(
        &|v| v["dtype"] = "f64".into(),
        &["dtype \"f32\" -> \"f64\""],
    );
    refused(&|v| v["train_size"] = 60.into(), &["train_size 80 -> 60"]);
    refused(&|v| v["seed"] = 4.into(), &["seed 3 -> 4"]);
    refused(
        &|v| v["optimizer"] = "adamw".into(),
        &["optimizer \"sgd\" -> \"adamw\""],
    );
    // The same recipe written another way (compact, other key order) is no change.
    std::fs::write(dir.join("r/config.json"), &original).unwrap();
    edit_config(&dir, |v| {
        let lr = v["lr"].clone();
        let o = v.as_object_mut().unwrap();
        o.remove("lr");
        o.insert("lr".into(), lr);
    });
    ok(&resume(&dir, &[]));

    // Other images under --data: a CIFAR-10 folder of random records.
    let data = dir.join("other");
    std::fs::create_dir_all(&data).unwrap();
    common::write_cifar(&data.join("data_batch_1.bin"), 400, 7);
    common::write_cifar(&data.join("test_batch.bin"), 200, 8);
    let before = snapshot(&dir.join("r"));
    let err = error_line(&resume(&dir, &["--data", "other"]));
    assert!(
        err.starts_with("error: --resume r: the data loaded from other holds other images than the run was trained on"),
        "{err}"
    );
    assert!(
        err.contains("synthetic true vs false") && err.contains("training sha256"),
        "{err}"
    );
    assert!(
        snapshot(&dir.join("r")) == before,
        "a refusal changed the run"
    );
    // The run's own data under --data is fine.
    ok(&resume(&dir, &["--data", "synthetic"]));
}

#[test]
fn metrics_that_no_longer_reach_the_checkpoint_are_refused() {
    let dir = tmp("metrics");
    ok(&train(&dir, "r", &[]));
    let metrics = dir.join("r/metrics.jsonl");
    let full = std::fs::read_to_string(&metrics).unwrap();
    let lines: Vec<&str> = full.lines().collect();
    // 8 train records and 2 eval records; the checkpoint is at step 8.
    assert_eq!(lines.len(), 10);
    let without = |skip: usize| -> String {
        lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, l)| format!("{l}\n"))
            .collect()
    };
    let cases: Vec<(String, String)> = vec![
        // Truncated after step 4 (and its evaluation).
        (
            lines[..5].iter().map(|l| format!("{l}\n")).collect(),
            "ends at step 4, but the checkpoint is at step 8".into(),
        ),
        // Emptied.
        (
            String::new(),
            "holds no step, but the checkpoint is at step 8".into(),
        ),
        // The last line cut in half (the final evaluation).
        (
            full[..full.len() - 30].to_string(),
            "holds 9 records up to step 8, but the checkpoint at step 8 was written after 10"
                .into(),
        ),
        // A line removed in the middle (step 3).
        (
            without(2),
            "the record of step 3 is missing (the next one is of step 4)".into(),
        ),
    ];
    for (text, want) in cases {
        std::fs::write(&metrics, &text).unwrap();
        let before = snapshot(&dir.join("r"));
        let err = error_line(&resume(&dir, &[]));
        assert!(err.starts_with("error: r/metrics.jsonl: "), "{err}");
        assert!(err.contains(&want), "{want:?} not in: {err}");
        assert!(
            snapshot(&dir.join("r")) == before,
            "a refusal changed the run"
        );
    }
    // Another run's records (SAM: two gradients a step) with as many lines.
    ok(&train(&dir, "s", &["--optimizer", "sam"]));
    std::fs::copy(dir.join("s/metrics.jsonl"), &metrics).unwrap();
    let err = error_line(&resume(&dir, &[]));
    assert!(err.contains("gradient queries"), "{err}");
    // The intact file resumes.
    std::fs::write(&metrics, &full).unwrap();
    ok(&resume(&dir, &[]));
    // metrics.csv, emptied or cut, is rebuilt exactly from metrics.jsonl (a repair, since
    // every row is one record's).
    let csv = std::fs::read(dir.join("r/metrics.csv")).unwrap();
    for cut in [0, 300] {
        std::fs::write(dir.join("r/metrics.csv"), &csv[..cut]).unwrap();
        ok(&resume(&dir, &[]));
        assert!(std::fs::read(dir.join("r/metrics.csv")).unwrap() == csv);
    }
}

/// A resume continues the gradient counters from the checkpoint: stopped after epoch 1 and
/// resumed, the run's records equal an uninterrupted run's (grad_queries included).
#[test]
fn counters_continue_from_the_checkpoint() {
    let dir = tmp("counters");
    ok(&train(&dir, "full", &["--optimizer", "sam"]));
    // A run rolled back to its checkpoint after epoch 1 (its numbered copy) and the records
    // written up to it, as if killed right after that checkpoint.
    ok(&train(
        &dir,
        "k",
        &["--optimizer", "sam", "--checkpoint-every", "1"],
    ));
    let k = dir.join("k");
    std::fs::copy(
        k.join("checkpoints/epoch-0001.safetensors"),
        k.join("checkpoints/last.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(k.join("metrics.jsonl")).unwrap();
    let first_epoch: String = text.lines().take(5).map(|l| format!("{l}\n")).collect();
    std::fs::write(k.join("metrics.jsonl"), first_epoch).unwrap();
    std::fs::remove_file(k.join("model.safetensors")).unwrap();
    std::fs::remove_file(k.join("summary.json")).unwrap();
    ok(&flatmin(&["train", "--resume", "k", "--quiet"], &dir));
    assert_eq!(common::outcome(&k), common::outcome(&dir.join("full")));
    let last = common::metrics_without_wall_time(&k.join("metrics.jsonl"));
    assert!(
        last.last().unwrap().contains("\"grad_queries\":16"),
        "{last:?}"
    );
}

#[test]
fn a_resume_at_the_end_writes_missing_or_stale_final_files() {
    let dir = tmp("final-files");
    ok(&train(&dir, "r", &[]));
    let model = std::fs::read(dir.join("r/model.safetensors")).unwrap();
    let summary = std::fs::read(dir.join("r/summary.json")).unwrap();
    // Killed after the last checkpoint, before the final files.
    std::fs::remove_file(dir.join("r/model.safetensors")).unwrap();
    std::fs::remove_file(dir.join("r/summary.json")).unwrap();
    ok(&resume(&dir, &[]));
    assert_eq!(
        std::fs::read(dir.join("r/model.safetensors")).unwrap(),
        model
    );
    let again: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("r/summary.json")).unwrap()).unwrap();
    let first: serde_json::Value = serde_json::from_slice(&summary).unwrap();
    assert_eq!(again["steps"], first["steps"]);
    assert_eq!(again["final"]["test_acc"], first["final"]["test_acc"]);
    // A half-written (corrupt) model file, and a stale one (another run's weights).
    std::fs::write(dir.join("r/model.safetensors"), &model[..model.len() / 2]).unwrap();
    ok(&resume(&dir, &[]));
    assert_eq!(
        std::fs::read(dir.join("r/model.safetensors")).unwrap(),
        model
    );
    ok(&train(&dir, "s", &["--lr", "0.1"]));
    std::fs::copy(
        dir.join("s/model.safetensors"),
        dir.join("r/model.safetensors"),
    )
    .unwrap();
    ok(&resume(&dir, &[]));
    assert_eq!(
        std::fs::read(dir.join("r/model.safetensors")).unwrap(),
        model
    );
}

#[test]
fn a_setup_error_leaves_nothing_that_blocks_the_rerun() {
    let dir = tmp("setup-error");
    // A model file of another shape for --init-from: refused after the folder was made.
    ok(&flatmin(
        &[
            "train",
            "--data",
            "synthetic",
            "--model",
            "mlp:48,8,10:tanh:pool8",
            "--epochs",
            "1",
            "--train-size",
            "80",
            "--test-size",
            "40",
            "--batch-size",
            "20",
            "--quiet",
            "--out",
            "wide",
        ],
        &dir,
    ));
    let bad = ["--init-from", "wide/model.safetensors"];
    let err = error_line(&train(&dir, "r", &bad));
    assert!(err.contains("--init-from wide/model.safetensors"), "{err}");
    // The folder this run created is gone; the rerun with the same --out trains.
    assert!(!dir.join("r").exists(), "a stub was left behind");
    ok(&train(&dir, "r", &[]));
    // A folder that existed before (with the user's file) is kept, and its stub config.json
    // does not block the rerun.
    std::fs::create_dir_all(dir.join("mine")).unwrap();
    std::fs::write(dir.join("mine/notes.txt"), b"keep").unwrap();
    error_line(&train(&dir, "mine", &bad));
    assert_eq!(std::fs::read(dir.join("mine/notes.txt")).unwrap(), b"keep");
    assert!(dir.join("mine/config.json").is_file());
    ok(&train(&dir, "mine", &[]));
    assert_eq!(std::fs::read(dir.join("mine/notes.txt")).unwrap(), b"keep");
    assert!(dir.join("mine/model.safetensors").is_file());
    // A folder whose run recorded steps (no checkpoint yet) still holds a run.
    std::fs::remove_dir_all(dir.join("mine/checkpoints")).unwrap();
    std::fs::remove_file(dir.join("mine/model.safetensors")).unwrap();
    std::fs::remove_file(dir.join("mine/summary.json")).unwrap();
    let err = error_line(&train(&dir, "mine", &[]));
    assert!(err.contains("already holds a run"), "{err}");
}

#[test]
fn a_checkpoint_without_the_record_resumes_with_a_warning() {
    let dir = tmp("old-checkpoint");
    ok(&train(&dir, "r", &[]));
    let ckpt = dir.join("r/checkpoints/last.safetensors");
    let mut raw = read_safetensors(&ckpt).unwrap();
    raw.retain(|t| {
        ![
            "trainer/run_record",
            "trainer/grad_queries",
            "trainer/grad_samples",
            "trainer/records",
        ]
        .contains(&t.name.as_str())
    });
    write_safetensors(&ckpt, &raw).unwrap();
    let out = resume(&dir, &[]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: r/checkpoints/last.safetensors was written by a flatmin without a record of its recipe and data"),
        "{stderr}"
    );
    // Its data is still compared, with config.json's record.
    let data = dir.join("other");
    std::fs::create_dir_all(&data).unwrap();
    common::write_cifar(&data.join("data_batch_1.bin"), 400, 7);
    common::write_cifar(&data.join("test_batch.bin"), 200, 8);
    let err = error_line(&resume(&dir, &["--data", "other"]));
    assert!(
        err.contains("recorded in config.json vs loaded now"),
        "{err}"
    );
    // So is a run's with no checkpoint yet.
    std::fs::remove_file(&ckpt).unwrap();
    let err = error_line(&resume(&dir, &["--data", "other"]));
    assert!(
        err.contains("recorded in config.json vs loaded now"),
        "{err}"
    );
}

/// The checkpoint supersedes `--init-from`: a run started from an init file resumes after
/// the file was moved away (or replaced by other bytes), ends equal to an uninterrupted run,
/// and its `config.json` still names the init file and its SHA-256. Without a checkpoint the
/// init file is still needed, and its absence is one line naming `--init-from`.
#[test]
fn a_resume_does_not_need_the_init_file_once_a_checkpoint_exists() {
    let dir = tmp("init-from");
    ok(&train(&dir, "base", &["--lr", "0.1"]));
    std::fs::copy(
        dir.join("base/model.safetensors"),
        dir.join("init.safetensors"),
    )
    .unwrap();
    let init = ["--init-from", "init.safetensors"];
    ok(&train(&dir, "full", &init));
    ok(&train(
        &dir,
        "r",
        &[&init[..], &["--checkpoint-every", "1"]].concat(),
    ));
    // Rolled back to the checkpoint after epoch 1, as if killed right after it.
    let r = dir.join("r");
    std::fs::copy(
        r.join("checkpoints/epoch-0001.safetensors"),
        r.join("checkpoints/last.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(r.join("metrics.jsonl")).unwrap();
    let first_epoch: String = text.lines().take(5).map(|l| format!("{l}\n")).collect();
    std::fs::write(r.join("metrics.jsonl"), first_epoch).unwrap();
    std::fs::remove_file(r.join("model.safetensors")).unwrap();
    std::fs::remove_file(r.join("summary.json")).unwrap();
    let config = std::fs::read(r.join("config.json")).unwrap();
    std::fs::rename(dir.join("init.safetensors"), dir.join("moved.safetensors")).unwrap();
    ok(&resume(&dir, &[]));
    assert_eq!(common::outcome(&r), common::outcome(&dir.join("full")));
    assert_eq!(std::fs::read(r.join("config.json")).unwrap(), config);
    let cfg: serde_json::Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(cfg["init_from"], "init.safetensors", "{cfg}");
    assert!(
        cfg["init_sha256"].as_str().is_some_and(|s| s.len() == 64),
        "{cfg}"
    );
    // Another file under the init's name does not matter either.
    std::fs::write(dir.join("init.safetensors"), b"not the init").unwrap();
    std::fs::remove_file(r.join("model.safetensors")).unwrap();
    ok(&resume(&dir, &[]));
    assert_eq!(common::outcome(&r), common::outcome(&dir.join("full")));
    // A run with no checkpoint yet still loads its init file: gone, it is one line.
    std::fs::remove_file(dir.join("init.safetensors")).unwrap();
    std::fs::remove_dir_all(r.join("checkpoints")).unwrap();
    std::fs::write(r.join("metrics.jsonl"), b"").unwrap();
    std::fs::write(r.join("metrics.csv"), b"").unwrap();
    std::fs::remove_file(r.join("model.safetensors")).unwrap();
    std::fs::remove_file(r.join("summary.json")).unwrap();
    let err = error_line(&resume(&dir, &[]));
    assert!(err.contains("--init-from"), "{err}");
    assert!(err.contains("init.safetensors"), "{err}");
}

/// A checkpoint path that holds something other than a regular file (a folder, a FIFO, a
/// link to nothing), or a `checkpoints` that is a file, is refused naming it, with nothing
/// changed: it is not taken for "no checkpoint", which would restart the run from step 0
/// and drop its records. With the checkpoint back, the run resumes to its end.
#[test]
fn a_checkpoint_that_is_not_a_file_is_refused_not_taken_for_none() {
    let dir = tmp("checkpoint-kind");
    ok(&train(&dir, "full", &[]));
    ok(&train(&dir, "r", &[]));
    let ckpt = dir.join("r/checkpoints/last.safetensors");
    let saved = std::fs::read(&ckpt).unwrap();
    std::fs::remove_file(dir.join("r/model.safetensors")).unwrap();
    std::fs::remove_file(dir.join("r/summary.json")).unwrap();
    let cases: [(&str, &dyn Fn()); 4] = [
        ("a folder", &|| std::fs::create_dir(&ckpt).unwrap()),
        ("a FIFO", &|| common::mkfifo(&ckpt)),
        ("a link to nothing", &|| {
            std::os::unix::fs::symlink("gone.safetensors", &ckpt).unwrap()
        }),
        ("checkpoints", &|| {
            std::fs::remove_dir_all(dir.join("r/checkpoints")).unwrap();
            std::fs::write(dir.join("r/checkpoints"), b"").unwrap();
        }),
    ];
    for (what, make) in cases {
        let _ = std::fs::remove_file(&ckpt);
        make();
        // The run's own files (the checkpoint path may be a FIFO, which cannot be read).
        let files = || {
            ["config.json", "metrics.jsonl", "metrics.csv"]
                .map(|f| std::fs::read(dir.join("r").join(f)).unwrap())
        };
        let before = files();
        let err = error_line(&resume(&dir, &[]));
        assert!(err.contains("r/checkpoints"), "{what}: {err}");
        if what != "checkpoints" {
            assert!(err.contains(what), "{what}: {err}");
        }
        assert!(files() == before, "{what}: the run's files changed");
        let p = dir.join("r/checkpoints");
        if p.is_file() {
            std::fs::remove_file(&p).unwrap();
            std::fs::create_dir(&p).unwrap();
        } else if ckpt.is_dir() {
            std::fs::remove_dir(&ckpt).unwrap();
        } else {
            std::fs::remove_file(&ckpt).unwrap();
        }
    }
    std::fs::write(&ckpt, &saved).unwrap();
    ok(&resume(&dir, &[]));
    assert_eq!(
        common::outcome(&dir.join("r")),
        common::outcome(&dir.join("full"))
    );
}

/// `--out` naming a regular file, or a path under one, is one line saying what it is.
#[test]
fn an_out_that_is_a_file_is_named_as_one() {
    let dir = tmp("out-file");
    std::fs::write(dir.join("afile"), b"mine").unwrap();
    for out in ["afile", "afile/r"] {
        let err = error_line(&train(&dir, out, &[]));
        assert!(
            err.contains(&format!(
                "--out {out}: cannot create the run folder: afile is a regular file, not a folder"
            )),
            "{err}"
        );
    }
    assert_eq!(std::fs::read(dir.join("afile")).unwrap(), b"mine");
}

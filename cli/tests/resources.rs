//! Resource limits with a real child process: a full disk (simulated with `RLIMIT_FSIZE`,
//! under which a write past the limit fails with EFBIG as on a full file system), a run
//! folder that cannot be created or written, and a run too large for memory. Each fails
//! with one `error:` line naming the file, folder or flag, before training or at the
//! write that failed, and keeps the last checkpoint intact, loadable and resumable.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::outcome;

fn tmp(name: &str) -> PathBuf {
    common::scratch("resources", name)
}

/// `flatmin ARGS` in `cwd`; with `fsize`, every file the child writes is limited to that
/// many bytes (SIGXFSZ ignored, so the write fails with EFBIG instead of killing it).
fn flatmin(args: &[&str], cwd: &Path, fsize: Option<u64>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flatmin"));
    cmd.args(args).current_dir(cwd);
    if let Some(limit) = fsize {
        // SAFETY: only async-signal-safe calls (signal, setrlimit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR {
                    return Err(std::io::Error::last_os_error());
                }
                let lim = libc::rlimit {
                    rlim_cur: limit as libc::rlim_t,
                    rlim_max: limit as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.output().unwrap()
}

/// The stderr of a failed run: exactly one `error:` line, no panic.
fn one_error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the run should have failed");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

fn train_records(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .map(|s| s.lines().filter(|l| l.contains("\"train\"")).count())
        .unwrap_or(0)
}

/// The step a checkpoint was written at, after checking it loads (model and trainer state).
fn checkpoint_step(dir: &Path, model: &str) -> i64 {
    let ckpt = dir.join("checkpoints/last.safetensors");
    let raw = flatmin_models::io::read_safetensors(&ckpt).unwrap();
    let mut m = flatmin_models::Model::<f32>::named(model, 0).unwrap();
    let model_part: Vec<_> = raw
        .iter()
        .filter(|t| !t.name.starts_with("optimizer/") && !t.name.starts_with("trainer/"))
        .cloned()
        .collect();
    m.load_raw(&ckpt, model_part).unwrap();
    let step = raw.iter().find(|t| t.name == "trainer/step").unwrap();
    match &step.data {
        flatmin_models::io::RawData::I64(v) => v[0],
        other => panic!("trainer/step is {other:?}"),
    }
}

/// No temporary file of an atomic write was left behind in the run folder.
fn no_temporaries(dir: &Path) {
    for sub in [dir.to_path_buf(), dir.join("checkpoints")] {
        for e in std::fs::read_dir(&sub).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.contains(".tmp-"), "left behind: {}", name);
        }
    }
}

/// A tiny MLP (pooled input, 4 hidden units): a 3.4 KB parameter set, 10 steps an epoch.
const SMALL: &str = "mlp:192,4,10:relu:pool4";
/// The same with 32 hidden units: its checkpoint is larger than two epochs of metrics.
const WIDE: &str = "mlp:192,32,10:relu:pool4";

fn recipe<'a>(model: &'a str, epochs: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        "synthetic",
        "--model",
        model,
        "--epochs",
        epochs,
        "--train-size",
        "200",
        "--test-size",
        "100",
        "--batch-size",
        "20",
        "--seed",
        "3",
        "--quiet",
        "--out",
        out,
    ]
}

#[test]
fn disk_full_before_training_names_the_file() {
    let dir = tmp("nothing-fits");
    let out = flatmin(&recipe(SMALL, "2", "r"), &dir, Some(64));
    let err = one_error_line(&out);
    assert!(err.contains("config.json"), "{err}");
    assert!(err.contains("File too large"), "{err}");
    assert_eq!(train_records(&dir.join("r")), 0, "trained with a full disk");
    assert!(!dir.join("r/checkpoints/last.safetensors").exists());
}

#[test]
fn disk_full_mid_run_keeps_the_checkpoint_and_resumes_bit_identically() {
    let dir = tmp("metrics-full");
    let out = flatmin(&recipe(SMALL, "8", "ref"), &dir, None);
    assert!(out.status.success(), "{out:?}");
    let ckpt = size(&dir.join("ref/checkpoints/last.safetensors"));
    let biggest = ckpt
        .max(size(&dir.join("ref/model.safetensors")))
        .max(size(&dir.join("ref/config.json")))
        .max(size(&dir.join("ref/summary.json")));
    // Every checkpoint fits; metrics.jsonl outgrows the limit part-way through the run.
    let limit = biggest + 512;
    let metrics = std::fs::read_to_string(dir.join("ref/metrics.jsonl")).unwrap();
    let first_epoch: usize = metrics
        .lines()
        .take_while(|l| !l.contains("\"eval\""))
        .map(|l| l.len() + 1)
        .sum();
    assert!(
        (first_epoch as u64) < limit && metrics.len() as u64 > limit + 4096,
        "limit {limit}: the metrics ({} bytes, {first_epoch} in epoch 1) must cross it after epoch 1",
        metrics.len()
    );

    let out = flatmin(&recipe(SMALL, "8", "r"), &dir, Some(limit));
    let err = one_error_line(&out);
    assert!(
        err.contains("r/metrics.jsonl: cannot append a record: File too large")
            && err.contains("training stopped, the last checkpoint r/checkpoints/last.safetensors is kept; resume with: flatmin train --resume r"),
        "{err}"
    );
    let run = dir.join("r");
    let step = checkpoint_step(&run, SMALL);
    assert!(step >= 10 && step % 10 == 0, "checkpoint at step {step}");
    assert!(train_records(&run) < 80);
    no_temporaries(&run);

    // With room again, the run resumes from that checkpoint and ends as if never stopped.
    let out = flatmin(&["train", "--resume", "r", "--quiet"], &dir, None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(outcome(&dir.join("ref")), outcome(&run));
}

#[test]
fn disk_full_at_the_checkpoint_keeps_the_previous_one() {
    let dir = tmp("checkpoint-full");
    // The first epoch, checkpointed, in-process; then the same run by the command line.
    let cfg = flatmin::train::TrainConfig {
        model: WIDE.into(),
        epochs: 4,
        train_size: 200,
        test_size: 100,
        batch_size: 20,
        seed: 3,
        data: "synthetic".into(),
        ..flatmin::train::TrainConfig::default()
    };
    let data = flatmin::data::resolve("synthetic", cfg.seed).unwrap();
    let run = dir.join("r");
    let mut t = flatmin::train::Trainer::<f32>::create(cfg, data, &run, false).unwrap();
    let stopped = t
        .run_until(&mut flatmin::train::Silent, &|s| s >= 10)
        .unwrap();
    assert!(matches!(
        stopped,
        flatmin::train::Outcome::Stopped { step: 10 }
    ));
    drop(t);
    let ckpt_path = run.join("checkpoints/last.safetensors");
    let before = std::fs::read(&ckpt_path).unwrap();
    let ckpt = before.len() as u64;
    let metrics = size(&run.join("metrics.jsonl"));
    // Room for the next epoch's metrics, not for the checkpoint after it.
    assert!(
        3 * metrics < ckpt - 1,
        "metrics {metrics}, checkpoint {ckpt}"
    );
    assert!(size(&run.join("model.safetensors")) < ckpt - 1);

    let resume = ["train", "--resume", "r", "--quiet"];
    let out = flatmin(&resume, &dir, Some(ckpt - 1));
    let err = one_error_line(&out);
    assert!(
        err.starts_with("error: r/checkpoints/last.safetensors: File too large")
            && err.contains("the last checkpoint r/checkpoints/last.safetensors is kept"),
        "{err}"
    );
    assert_eq!(
        train_records(&run),
        20,
        "the failure was not at the checkpoint"
    );
    assert_eq!(
        std::fs::read(&ckpt_path).unwrap(),
        before,
        "checkpoint changed"
    );
    assert_eq!(checkpoint_step(&run, WIDE), 10);
    no_temporaries(&run);

    // With room again: resumes from the kept checkpoint, same result as a run never stopped.
    let out = flatmin(&resume, &dir, None);
    assert!(out.status.success(), "{out:?}");
    let out = flatmin(&recipe(WIDE, "4", "ref"), &dir, None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(outcome(&dir.join("ref")), outcome(&run));
}

#[test]
fn unwritable_run_folder_fails_before_training() {
    let dir = tmp("read-only");
    std::fs::write(dir.join("plain-file"), b"not a folder").unwrap();
    // Root ignores permission bits, so use places no one can write: a path under a regular
    // file, and the kernel's read-only /proc and /sys.
    for out_dir in [
        "plain-file/run",
        "/proc/flatmin-run",
        "/proc/self/flatmin-run",
        "/sys/flatmin-run",
    ] {
        let out = flatmin(&recipe(SMALL, "2", out_dir), &dir, None);
        let err = one_error_line(&out);
        assert!(
            err.contains(&format!("--out {out_dir}")) && err.contains("cannot create"),
            "{out_dir}: {err}"
        );
    }
    assert_eq!(
        std::fs::read(dir.join("plain-file")).unwrap(),
        b"not a folder"
    );
    // An existing folder where files cannot be created: /proc/self is a folder, read-only.
    let out = flatmin(&recipe(SMALL, "2", "/proc/self"), &dir, None);
    let err = one_error_line(&out);
    assert!(err.contains("--out /proc/self"), "{err}");
}

#[test]
fn too_large_for_memory_fails_at_once_with_an_estimate() {
    let dir = tmp("memory");
    let started = std::time::Instant::now();
    let mut args = recipe("resnet18", "1", "r");
    let batch = args.iter().position(|a| *a == "--batch-size").unwrap();
    args[batch + 1] = "10000000";
    let out = flatmin(&args, &dir, None);
    let err = one_error_line(&out);
    assert!(
        err.contains("--batch-size 10000000 with resnet18 needs about")
            && err.contains("GiB")
            && err.contains("are available (MemAvailable)"),
        "{err}"
    );
    assert!(
        started.elapsed().as_secs() < 30,
        "took {:?}",
        started.elapsed()
    );
    assert!(!dir.join("r").exists(), "the run folder was created");

    // A model too large to build is refused from its layout, without allocating it; one
    // whose size overflows is refused by the model parser.
    let mut args = recipe("mlp:3072,1000000,10:relu", "1", "r");
    args.push("--max-memory");
    args.push("64G");
    let out = flatmin(&args, &dir, None);
    let err = one_error_line(&out);
    assert!(
        err.contains("--model mlp:3072,1000000,10:relu needs about 92 GiB for its parameters"),
        "{err}"
    );
    for huge in [
        "mlp:3072,1000000000,10:relu",
        "mlp:3072,100000000000000000,10:relu",
    ] {
        let out = flatmin(&recipe(huge, "1", "r"), &dir, None);
        let err = one_error_line(&out);
        assert!(
            err.contains("--model") && err.contains("more than the 4294967296"),
            "{err}"
        );
    }
    assert!(!dir.join("r").exists(), "the run folder was created");

    // --max-memory sets the budget instead of the memory available.
    let out = flatmin(
        &[recipe(SMALL, "1", "s").as_slice(), &["--max-memory", "1M"]].concat(),
        &dir,
        None,
    );
    let err = one_error_line(&out);
    assert!(
        err.contains("needs about") && err.contains("but --max-memory allows only 1.0 MiB;"),
        "{err}"
    );
    let out = flatmin(
        &[
            recipe(SMALL, "1", "s").as_slice(),
            &["--max-memory", "lots"],
        ]
        .concat(),
        &dir,
        None,
    );
    let err = one_error_line(&out);
    assert!(err.contains("--max-memory"), "{err}");
    let out = flatmin(
        &[recipe(SMALL, "1", "s").as_slice(), &["--max-memory", "64G"]].concat(),
        &dir,
        None,
    );
    assert!(out.status.success(), "{out:?}");
}

//! Helpers shared by the training tests: scratch folders, the small synthetic dataset, a small
//! recipe, and a run's outcome (final weights and metrics without wall-clock fields).
#![allow(dead_code)] // each test file uses a subset

use flatmin::data::DataSource;
use flatmin::train::TrainConfig;
use flatmin_datasets::synthetic;
use std::path::{Path, PathBuf};

/// An empty scratch folder `CARGO_TARGET_TMPDIR/<prefix>-<name>` (not created).
pub fn tmp(prefix: &str, name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{prefix}-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// 160 training and 60 test images of the synthetic dataset (seed 11).
pub fn data() -> DataSource {
    let (train, test) = synthetic(160, 60, 11);
    DataSource {
        train,
        test,
        origin: "synthetic".into(),
        synthetic: true,
    }
}

/// A fast recipe: 3 epochs of batch 32 over all of [`data`], lr 0.05, seed 5.
pub fn cfg(model: &str) -> TrainConfig {
    TrainConfig {
        model: model.into(),
        epochs: 3,
        batch_size: 32,
        train_size: 0,
        test_size: 0,
        lr: 0.05,
        warmup: 0,
        seed: 5,
        data: "synthetic".into(),
        ..TrainConfig::default()
    }
}

/// The lines of a `metrics.jsonl` without the wall-clock fields (`wall_s`, `images_per_s`).
pub fn metrics_without_wall_time(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("wall_s");
            o.remove("images_per_s");
            v.to_string()
        })
        .collect()
}

/// Final weights (bytes of `model.safetensors`) and metrics without wall-clock fields.
pub fn outcome(dir: &Path) -> (Vec<u8>, Vec<String>) {
    let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
    (
        weights,
        metrics_without_wall_time(&dir.join("metrics.jsonl")),
    )
}

/// A fresh empty folder `CARGO_TARGET_TMPDIR/<prefix>-<name>` (created).
pub fn scratch(prefix: &str, name: &str) -> PathBuf {
    let dir = tmp(prefix, name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// xorshift64*: a tiny deterministic generator for test inputs.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

/// A CIFAR-10 batch file of `n` random records.
pub fn write_cifar(path: &Path, n: usize, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut bytes = Vec::with_capacity(n * 3073);
    for _ in 0..n {
        bytes.push((rng.next() % 10) as u8);
        bytes.extend((0..3072).map(|_| (rng.next() >> 56) as u8));
    }
    std::fs::write(path, bytes).unwrap();
}

/// Makes a FIFO (named pipe) at `path` with `mkfifo`.
pub fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

/// Runs the `flatmin` binary `bin` with `args`, killing it and failing the test if it has
/// not exited within `limit` (a process blocked on a FIFO or reading a device for ever).
/// Returns its exit status and its stderr.
pub fn run_bounded(
    bin: &str,
    args: &[String],
    limit: std::time::Duration,
) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let mut child = std::process::Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the flatmin binary");
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("flatmin {args:?} still running after {limit:?}; killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

/// The error report of a failed `flatmin` run, checked: a usage error (status 2) is clap's
/// own rendering, whose first line is `error: ...` and which ends with the `--help` line
/// (returned whole, the tip and usage included); any other failure is exactly one
/// `error: ...` line (returned), `warning:` lines aside. Never a panic.
pub fn error_text(out: &std::process::Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{what} succeeded");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("warning:"))
        .collect();
    assert!(
        lines.first().is_some_and(|l| l.starts_with("error: ")),
        "{what}: {stderr}"
    );
    if out.status.code() == Some(2) {
        assert!(
            stderr.contains("For more information, try '--help'."),
            "{what}: {stderr}"
        );
        stderr
    } else {
        assert_eq!(lines.len(), 1, "{what}: {stderr}");
        lines[0].to_string()
    }
}

/// Checks a failed run's report ([`error_text`]) names `needle`.
pub fn assert_error(out: &std::process::Output, needle: &str, what: &str) {
    let text = error_text(out, what);
    assert!(text.contains(needle), "{what}: no '{needle}' in {text}");
}

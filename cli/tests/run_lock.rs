//! One writer per run folder, with real child processes: while a `flatmin train` runs, a
//! second `--resume` or `--overwrite` of its folder is refused at once, naming the folder
//! and the pid holding it, and changes nothing; after the first is killed with SIGKILL, the
//! lock it left is taken again and `--resume` trains. Every child is killed when the test
//! ends, whichever way it ends, and every wait has a deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long any one wait may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(120);

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("run-lock-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `flatmin train` of tiny-tanh on synthetic data into `out`: 10 steps an epoch, a
/// checkpoint at the end of each. With many epochs, a run far longer than the test (which
/// always stops it).
fn train_args<'a>(epochs: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        "synthetic",
        "--model",
        "tiny-tanh",
        "--epochs",
        epochs,
        "--train-size",
        "400",
        "--test-size",
        "100",
        "--batch-size",
        "40",
        "--seed",
        "4",
        "--quiet",
        "--out",
        out,
    ]
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so that no path out of
/// a test, a failed assertion included, leaves it running.
struct Running(Child);

impl Running {
    fn spawn(args: &[&str], cwd: &Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_flatmin"))
            .args(args)
            .current_dir(cwd)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Running(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sends `sig` (`-INT`, `-KILL`) and waits for the exit; returns the stderr.
    fn stop(mut self, sig: &str) -> (std::process::ExitStatus, String) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                t0.elapsed() < DEADLINE,
                "the child did not exit after {sig}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        (status, err)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the binary to its end, with a deadline (the child is killed past it).
fn run(args: &[&str], cwd: &Path) -> (Output, Duration) {
    let t0 = Instant::now();
    let mut child = Running::spawn(args, cwd);
    while child.0.try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < DEADLINE, "flatmin {args:?} did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut err = Vec::new();
    if let Some(mut e) = child.0.stderr.take() {
        use std::io::Read;
        e.read_to_end(&mut err).unwrap();
    }
    let status = child.0.wait().unwrap();
    let out = Output {
        status,
        stdout: Vec::new(),
        stderr: err,
    };
    (out, t0.elapsed())
}

fn train_records(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .map(|s| s.lines().filter(|l| l.contains("\"train\"")).count())
        .unwrap_or(0)
}

/// Waits until `dir` holds at least `n` training records and a checkpoint.
fn wait_for_progress(dir: &Path, n: usize, child: &mut Running) {
    let t0 = Instant::now();
    while train_records(dir) < n || !dir.join("checkpoints/last.safetensors").is_file() {
        if let Some(s) = child.0.try_wait().unwrap() {
            panic!("the training child exited early ({s})");
        }
        assert!(t0.elapsed() < DEADLINE, "the run did not make progress");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The one `error:` line of a run that failed with status 1 and without a panic.
fn error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr.trim_end().to_string()
}

/// Every file under `dir` (relative path and bytes), for "nothing changed" checks.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

#[test]
fn a_running_folder_is_refused_to_resume_and_overwrite_until_its_writer_dies() {
    let dir = tmp("busy");
    let mut first = Running::spawn(&train_args("100000", "r"), &dir);
    let run_dir = dir.join("r");
    wait_for_progress(&run_dir, 12, &mut first);
    let holder = format!("in use by pid {} on ", first.pid());
    let config = std::fs::read(run_dir.join("config.json")).unwrap();

    // (a) --resume of the running folder: refused at once, naming the folder and the pid.
    let (out, took) = run(&["train", "--resume", "r", "--quiet"], &dir);
    let err = error_line(&out);
    assert!(err.starts_with("error: --resume r: "), "{err}");
    assert!(err.contains(&holder), "{err}");
    assert!(
        err.contains("r/.lock") && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");

    // (b) --overwrite of it: refused, and the running run keeps its files.
    let before = train_records(&run_dir);
    let mut over = train_args("100000", "r");
    over.push("--overwrite");
    let (out, _) = run(&over, &dir);
    let err = error_line(&out);
    assert!(err.starts_with("error: --out r: "), "{err}");
    assert!(err.contains(&holder), "{err}");
    assert_eq!(std::fs::read(run_dir.join("config.json")).unwrap(), config);
    assert!(train_records(&run_dir) >= before, "metrics were truncated");
    assert!(run_dir.join("checkpoints/last.safetensors").is_file());
    assert!(run_dir.join(".lock").is_file());
    // The first run was not disturbed: it goes on training.
    wait_for_progress(&run_dir, before + 10, &mut first);

    // SIGKILL: the kernel releases the lock; the stale lock file is simply locked again.
    let (status, _) = first.stop("-KILL");
    assert!(!status.success());
    let stale = std::fs::read_to_string(run_dir.join(".lock")).unwrap();
    assert!(stale.contains("pid "), "{stale}");
    let killed_at = train_records(&run_dir);
    let mut resumed = Running::spawn(&["train", "--resume", "r", "--quiet"], &dir);
    let mine = format!("pid {} on ", resumed.pid());
    // It trains past the last checkpoint (metrics are cut back to it first, so wait for
    // more records than the killed run had left).
    wait_for_progress(&run_dir, killed_at + 1, &mut resumed);
    let record = std::fs::read_to_string(run_dir.join(".lock")).unwrap();
    assert!(record.starts_with(&mine), "{record}");
    let (status, stderr) = resumed.stop("-INT");
    assert!(!status.success());
    assert!(stderr.contains("interrupted after step"), "{stderr}");
    assert!(!stderr.contains("in use"), "{stderr}");
}

#[test]
fn overwrite_of_an_idle_run_keeps_the_lock_file_and_nothing_else() {
    let dir = tmp("idle");
    // A short run that ends by itself; its lock file stays, unlocked.
    let mut args = train_args("1", "r");
    let (out, _) = run(&args, &dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run_dir = dir.join("r");
    std::fs::write(run_dir.join("checkpoints/epoch-0099.safetensors"), b"old").unwrap();
    let old = snapshot(&run_dir);

    // Refused without --overwrite: nothing changes.
    let err = error_line(&run(&args, &dir).0);
    assert!(err.contains("already holds a run"), "{err}");
    assert_eq!(snapshot(&run_dir), old);

    // --overwrite replaces the run: the old run's extra file is gone.
    args.push("--overwrite");
    let (out, _) = run(&args, &dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!run_dir.join("checkpoints/epoch-0099.safetensors").exists());
    assert_eq!(train_records(&run_dir), 10);
    assert!(run_dir.join(".lock").is_file());
}

/// Makes something at a path (a test case's odd file).
type MakeAt<'a> = &'a dyn Fn(&Path);

/// A `.lock` that is not a regular file (a FIFO, a folder, a link to the user's file) makes
/// `--resume`, `--overwrite` and `flatmin sweep` fail at once with one line naming it and
/// what it is: the lock file is opened without blocking and without following links. The
/// linked file is left as it was. Before the fix a FIFO hung `--resume` and `--overwrite`
/// for ever (the child is killed after 20 s), and a link had its target truncated and
/// overwritten with the pid.
#[test]
fn a_lock_file_that_is_not_a_file_is_refused_at_once() {
    let dir = tmp("odd-lock");
    let (out, _) = run(&train_args("1", "r"), &dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
    std::fs::create_dir(dir.join("s")).unwrap();
    let bin = env!("CARGO_BIN_EXE_flatmin");
    let arg = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let r = dir.join("r").display().to_string();
    let s = dir.join("s").display().to_string();
    let mut overwrite = arg(&train_args("1", &r));
    overwrite.push("--overwrite".into());
    let sweep = arg(&[
        "sweep", "--grid", "seed=1", "--out", &s, "--", "--epochs", "1",
    ]);
    let resume = arg(&["train", "--resume", &r, "--quiet"]);
    let cases: [(&str, MakeAt); 3] = [
        ("is a FIFO", &|p| {
            let status = Command::new("mkfifo").arg(p).status().unwrap();
            assert!(status.success());
        }),
        ("is a folder", &|p| std::fs::create_dir(p).unwrap()),
        ("is a symbolic link", &|p| {
            std::os::unix::fs::symlink(dir.join("notes.txt"), p).unwrap()
        }),
    ];
    for (what, make) in cases {
        for (args, folder) in [(&resume, "r"), (&overwrite, "r"), (&sweep, "s")] {
            let lock = dir.join(folder).join(".lock");
            let _ = std::fs::remove_file(&lock);
            let _ = std::fs::remove_dir(&lock);
            make(&lock);
            let config = std::fs::read(dir.join("r/config.json")).unwrap();
            let (status, err) = run_bounded(bin, args, DEADLINE / 6);
            assert_eq!(status.code(), Some(1), "{what}: {err}");
            assert!(!err.contains("panicked"), "{err}");
            let line = err.trim_end();
            assert_eq!(line.lines().count(), 1, "{err}");
            assert!(line.contains(".lock") && line.contains(what), "{err}");
            assert_eq!(std::fs::read(dir.join("r/config.json")).unwrap(), config);
            assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"mine");
        }
    }
}

/// Runs `bin args`, killing it and failing past `limit`; returns its status and stderr.
fn run_bounded(bin: &str, args: &[String], limit: Duration) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let mut child = Running(
        Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < limit,
            "flatmin {args:?} still running after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

//! Stress (real child processes of `flatmin`, a seeded sequence): two writers on one run
//! folder, a signal storm on `flatmin sweep`, and resumes of damaged run folders (metrics
//! cut at a random byte, a record duplicated, the checkpoint or the model deleted or cut,
//! `config.json` edited, `kill -9` at a random moment), in a loop of a fixed number of
//! iterations. After every step the run folders are checked: no duplicated and no missing
//! record, `metrics.csv` row for row the records of `metrics.jsonl`, the checkpoint's run
//! record equal to `config.json`'s recipe, a finished run's final files present and the
//! run equal (weights and records) to an uninterrupted run of the recipe `config.json`
//! describes, every refusal one `error:` line, and no panic anywhere.
//!
//! `FLATMIN_STRESS_SEED` and `FLATMIN_STRESS_ITERATIONS` change the sequence and its
//! length; every iteration prints the seed, its number and what it does, so a failure can be
//! replayed alone.

use flatmin::train::{csv_columns, find_record, parse_records, Record, RunDir, CSV_HEADER};
use flatmin_models::io::read_safetensors;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

/// How long any one child may run before the test fails (a hang, not a timing assertion).
const DEADLINE: Duration = Duration::from_secs(120);
/// Iterations of the loop unless `FLATMIN_STRESS_ITERATIONS` says otherwise.
const ITERATIONS: usize = 24;
/// 80 training images in batches of 20: 4 steps an epoch, 3 epochs, a trace every 3 steps.
const STEPS_PER_EPOCH: usize = 4;
const EPOCHS: usize = 3;
const TRACE_EVERY: usize = 3;

/// The recipe flags of every run here but `--seed` and `--lr`.
fn recipe(seed: u64, lr: &str) -> Vec<String> {
    let fixed = [
        "--data",
        "synthetic",
        "--model",
        "tiny-tanh",
        "--epochs",
        "3",
        "--train-size",
        "80",
        "--test-size",
        "40",
        "--batch-size",
        "20",
        "--trace-every",
        "3",
    ];
    let mut v: Vec<String> = fixed.iter().map(|s| s.to_string()).collect();
    v.extend(["--seed".into(), seed.to_string(), "--lr".into(), lr.into()]);
    v
}

/// A child `flatmin` process, killed (SIGKILL) and reaped if dropped while running.
struct Running(Child);

impl Running {
    fn spawn(args: &[String], cwd: &Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_flatmin"))
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the flatmin binary");
        Running(child)
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory effects; the child has not been waited for.
        unsafe { libc::kill(self.0.id() as libc::pid_t, sig) };
    }

    fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }

    /// Waits for the exit (failing past [`DEADLINE`]); returns success and the stderr.
    fn finish(mut self) -> (bool, String) {
        use std::io::Read;
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                break s;
            }
            assert!(t0.elapsed() < DEADLINE, "a flatmin child hung");
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut err = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            e.read_to_string(&mut err).unwrap();
        }
        assert!(!err.contains("panicked"), "a panic: {err}");
        (status.success(), err)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A refusal: exactly one `error:` line, naming a flag or a file of the run.
fn check_refusal(err: &str, what: &str) {
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("warning:")).collect();
    assert_eq!(lines.len(), 1, "{what}: not one line: {err}");
    assert!(lines[0].starts_with("error: "), "{what}: {err}");
    assert!(
        lines[0].contains("--") || lines[0].contains(".json") || lines[0].contains(".safetensors"),
        "{what}: names no flag or file: {err}"
    );
}

/// The records a run of [`recipe`] writes, in order, as (kind, step), up to the end.
fn expected_sequence() -> Vec<(String, usize)> {
    let total = STEPS_PER_EPOCH * EPOCHS;
    let mut v = vec![("trace".to_string(), 0)];
    for s in 1..=total {
        v.push(("train".into(), s));
        if s % TRACE_EVERY == 0 || s == total {
            v.push(("trace".into(), s));
        }
        if s % STEPS_PER_EPOCH == 0 {
            v.push(("eval".into(), s));
        }
    }
    v
}

/// The complete records of `dir/metrics.jsonl` (a last line without its newline, cut by a
/// kill, left out when `allow_cut`).
fn complete_records(dir: &Path, allow_cut: bool) -> Vec<Record> {
    let bytes = std::fs::read(dir.join("metrics.jsonl")).unwrap_or_default();
    let end = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None => 0,
    };
    assert!(
        allow_cut || end == bytes.len(),
        "metrics.jsonl ends in a cut line"
    );
    let path = dir.join("metrics.jsonl");
    parse_records(&path, &bytes[..end])
        .unwrap_or_else(|e| panic!("{e:#}"))
        .into_iter()
        .map(|(_, r)| r)
        .collect()
}

/// The invariants of a run folder. `quiet`: no process is writing it and the last command
/// on it ended normally (so the files must agree exactly); else (after a kill) the records
/// must only be a prefix of the run's.
fn check_folder(dir: &Path, quiet: bool, refs: &mut References, cwd: &Path) {
    if !dir.join("config.json").is_file() {
        return;
    }
    let records = complete_records(dir, !quiet);
    let want = expected_sequence();
    let got: Vec<(String, usize)> = records.iter().map(|r| (r.kind.clone(), r.step)).collect();
    assert!(
        got.len() <= want.len() && got[..] == want[..got.len()],
        "{}: records duplicated, missing or out of order: {got:?}",
        dir.display()
    );
    for r in &records {
        assert_eq!(
            r.grad_queries,
            Some(r.step as u64),
            "{}: {r:?}",
            dir.display()
        );
    }
    if !quiet {
        return;
    }
    let run = RunDir::open(dir).unwrap();
    let cfg = run.config().unwrap();
    // The run's columns: the base ones, then its optimizer's per-step figures.
    let columns = csv_columns(cfg.optimizer);
    let figures = &columns[CSV_HEADER.split(',').count()..];
    let mut rows = vec![columns.join(",") + "\n"];
    rows.extend(records.iter().map(|r| r.csv_row(figures)));
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    assert_eq!(csv, rows.concat(), "{}: metrics.csv", dir.display());
    let ckpt = dir.join("checkpoints/last.safetensors");
    if ckpt.is_file() {
        let raw = read_safetensors(&ckpt).unwrap();
        let record = find_record(&ckpt, &raw).unwrap().expect("a run record");
        assert_eq!(
            record.recipe,
            run.recipe(&cfg).unwrap(),
            "{}: config.json is not the checkpoint's recipe",
            dir.display()
        );
    }
    if got.len() == want.len() {
        for f in [
            "model.safetensors",
            "summary.json",
            "checkpoints/last.safetensors",
        ] {
            assert!(
                dir.join(f).is_file(),
                "{}: finished without {f}",
                dir.display()
            );
        }
        let reference = refs.get(cfg.seed, &format!("{}", cfg.lr), cwd);
        assert!(
            common::outcome(dir) == *reference,
            "{}: differs from an uninterrupted run of its config.json",
            dir.display()
        );
    }
}

/// Outcomes of uninterrupted runs, by (seed, lr), made on first use.
#[derive(Default)]
struct References(HashMap<(u64, String), (Vec<u8>, Vec<String>)>);

impl References {
    fn get(&mut self, seed: u64, lr: &str, cwd: &Path) -> &(Vec<u8>, Vec<String>) {
        self.0.entry((seed, lr.to_string())).or_insert_with(|| {
            let out = format!("ref-{seed}-{lr}");
            let mut args = vec![
                "train".to_string(),
                "--quiet".into(),
                "--out".into(),
                out.clone(),
            ];
            args.extend(recipe(seed, lr));
            let (ok, err) = Running::spawn(&args, cwd).finish();
            assert!(ok, "reference run: {err}");
            common::outcome(&cwd.join(out))
        })
    }
}

/// A copy of every file of a run folder (the lock file aside), to restore after a refusal.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else if p.file_name().unwrap() != ".lock" {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

/// Puts the files of `snapshot` back (the checkpoints folder as it was).
fn restore(dir: &Path, files: &[(PathBuf, Vec<u8>)]) {
    let _ = std::fs::remove_dir_all(dir.join("checkpoints"));
    for (p, bytes) in files {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}

/// `train` of the recipe with `seed` into `run` (replacing what is there with `overwrite`).
fn train_args(run: &str, seed: u64, overwrite: bool) -> Vec<String> {
    let mut args = vec![
        "train".to_string(),
        "--quiet".into(),
        "--out".into(),
        run.into(),
    ];
    args.extend(recipe(seed, "0.05"));
    if overwrite {
        args.push("--overwrite".into());
    }
    args
}

/// `train --resume run`.
fn resume_args(run: &str) -> Vec<String> {
    vec![
        "train".into(),
        "--quiet".into(),
        "--resume".into(),
        run.into(),
    ]
}

/// Brings the run folder `run` to its end: `--resume` (or a new run if it holds none),
/// which must succeed, then the full check.
fn finish_run(cwd: &Path, run: &str, seed: u64, refs: &mut References) {
    let args = if cwd.join(run).join("config.json").is_file() {
        resume_args(run)
    } else {
        train_args(run, seed, false)
    };
    let (ok, err) = Running::spawn(&args, cwd).finish();
    assert!(ok, "finishing {run}: {err}");
    check_folder(&cwd.join(run), true, refs, cwd);
}

/// Starts a run or a resume of `run` and kills it (SIGKILL) after a random delay.
fn kill9_mid_run(rng: &mut StdRng, cwd: &Path, run: &str, seed: u64, refs: &mut References) {
    let args = if cwd.join(run).join("config.json").is_file() && rng.gen_bool(0.5) {
        resume_args(run)
    } else {
        train_args(run, seed, true)
    };
    let mut child = Running::spawn(&args, cwd);
    std::thread::sleep(Duration::from_millis(rng.gen_range(0..900)));
    let was_alive = child.alive();
    child.signal(libc::SIGKILL);
    let (_, err) = child.finish();
    assert!(!err.contains("panicked"), "{err}");
    check_folder(&cwd.join(run), !was_alive, refs, cwd);
}

/// Two writers on one folder: started together, or the second while the first trains.
fn two_writers(rng: &mut StdRng, cwd: &Path, run: &str, seed: u64, refs: &mut References) -> usize {
    let pick = |rng: &mut StdRng| {
        if rng.gen_bool(0.5) {
            resume_args(run)
        } else {
            train_args(run, seed, true)
        }
    };
    let (a, b) = (pick(rng), pick(rng));
    let mut first = Running::spawn(&a, cwd);
    if rng.gen_bool(0.5) {
        // The second while the first trains: once it has written a record, if it still runs.
        let t0 = Instant::now();
        while first.alive() && t0.elapsed() < DEADLINE {
            let text = std::fs::read_to_string(cwd.join(run).join("metrics.jsonl"));
            if text.is_ok_and(|t| t.contains("\"train\"")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let second = Running::spawn(&b, cwd);
    let mut in_use = 0;
    for (ok, err) in [first.finish(), second.finish()] {
        if !ok {
            check_refusal(&err, "a writer");
            in_use += usize::from(err.contains("is in use by"));
        }
    }
    check_folder(&cwd.join(run), true, refs, cwd);
    in_use
}

/// Damage to a stopped run folder, chosen at random; returns what was done.
fn damage(rng: &mut StdRng, dir: &Path) -> &'static str {
    let cut = |rng: &mut StdRng, f: &Path| {
        if let Ok(bytes) = std::fs::read(f) {
            let at = rng.gen_range(0..=bytes.len());
            std::fs::write(f, &bytes[..at]).unwrap();
        }
    };
    match rng.gen_range(0..10) {
        0 => "nothing",
        1 => {
            cut(rng, &dir.join("metrics.jsonl"));
            "metrics.jsonl cut at a random byte"
        }
        2 => {
            cut(rng, &dir.join("metrics.csv"));
            "metrics.csv cut at a random byte"
        }
        3 => {
            let _ = std::fs::remove_file(dir.join("checkpoints/last.safetensors"));
            "checkpoint deleted"
        }
        4 => {
            cut(rng, &dir.join("checkpoints/last.safetensors"));
            "checkpoint cut at a random byte"
        }
        5 => {
            if rng.gen_bool(0.5) {
                let _ = std::fs::remove_file(dir.join("model.safetensors"));
            } else {
                cut(rng, &dir.join("model.safetensors"));
            }
            "model.safetensors deleted or cut"
        }
        6 => {
            let p = dir.join("config.json");
            if let Ok(text) = std::fs::read_to_string(&p) {
                std::fs::write(&p, text.replace("\"lr\": 0.05", "\"lr\": 0.07")).unwrap();
            }
            "config.json lr edited"
        }
        7 => {
            let p = dir.join("checkpoints/last.safetensors");
            let _ = std::fs::remove_file(&p);
            let _ = std::fs::create_dir_all(&p);
            "checkpoint replaced by a folder"
        }
        8 => {
            // Another run's checkpoint (the other seed's uninterrupted run) copied in.
            let seed = if dir.join("config.json").is_file() {
                other_seed(dir)
            } else {
                1
            };
            let other = dir.parent().unwrap().join(format!("ref-{seed}-0.05"));
            let _ = std::fs::copy(
                other.join("checkpoints/last.safetensors"),
                dir.join("checkpoints/last.safetensors"),
            );
            "another run's checkpoint copied in"
        }
        _ => {
            let p = dir.join("metrics.jsonl");
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() && text.ends_with('\n') {
                let i = rng.gen_range(0..lines.len());
                let mut out: Vec<&str> = lines.clone();
                out.insert(i + 1, lines[i]);
                std::fs::write(&p, out.join("\n") + "\n").unwrap();
            }
            "a metrics record duplicated"
        }
    }
}

/// The seed of the other reference run than the one `dir`'s `config.json` describes.
fn other_seed(dir: &Path) -> u64 {
    let cfg = RunDir::open(dir).unwrap().config().unwrap();
    3 - cfg.seed.clamp(1, 2)
}

/// Kill, damage, resume: a refused resume is one line, changes nothing, and the restored
/// folder then resumes to the run's end.
fn damaged_resume(
    rng: &mut StdRng,
    cwd: &Path,
    run: &str,
    seed: u64,
    refs: &mut References,
) -> bool {
    for s in [1, 2] {
        refs.get(s, "0.05", cwd);
    }
    kill9_mid_run(rng, cwd, run, seed, refs);
    let dir = cwd.join(run);
    let before = snapshot(&dir);
    let what = damage(rng, &dir);
    eprintln!("  damage: {what}");
    let damaged = snapshot(&dir);
    let (ok, err) = Running::spawn(&resume_args(run), cwd).finish();
    if ok {
        check_folder(&dir, true, refs, cwd);
        return false;
    }
    check_refusal(&err, what);
    assert!(
        snapshot(&dir) == damaged,
        "{what}: a refused resume changed the folder: {err}"
    );
    restore(&dir, &before);
    finish_run(cwd, run, seed, refs);
    true
}

/// A sweep of two runs (seeds 1 and 2) hit by SIGINT/SIGTERM at a random moment, sometimes
/// twice; then the same sweep rerun to completion. Returns how many signals were sent.
fn signal_storm(rng: &mut StdRng, cwd: &Path, out: &str, refs: &mut References) -> usize {
    let mut args: Vec<String> = ["sweep", "--grid", "seed=1,2", "--jobs", "2", "--out", out]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push("--".into());
    args.extend(recipe(0, "0.05")[..14].iter().cloned());
    args.extend(["--lr".into(), "0.05".into()]);
    if rng.gen_bool(0.7) {
        let _ = std::fs::remove_dir_all(cwd.join(out));
    }
    let sweep = Running::spawn(&args, cwd);
    let mut sent = 0;
    std::thread::sleep(Duration::from_millis(rng.gen_range(0..1500)));
    for _ in 0..rng.gen_range(1..=2) {
        sweep.signal(if rng.gen_bool(0.5) {
            libc::SIGINT
        } else {
            libc::SIGTERM
        });
        sent += 1;
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
    }
    let (ok, err) = sweep.finish();
    if !ok && !err.is_empty() {
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert!(errors.len() <= 1, "{err}");
    }
    // The runs may still be finishing their checkpoint when a second signal ended the sweep.
    wait_for_unlocked(&cwd.join(out).join("runs"));
    for seed in [1, 2] {
        check_folder(
            &cwd.join(out).join(format!("runs/seed-{seed}")),
            false,
            refs,
            cwd,
        );
    }
    let started = [1, 2].map(|s| cwd.join(out).join(format!("runs/seed-{s}/config.json")));
    if started.iter().any(|p| p.is_file()) && rng.gen_bool(0.3) {
        // The same sweep with another --lr: refused, naming a run and the setting.
        let mut changed = args.clone();
        *changed.last_mut().unwrap() = "0.07".into();
        let (ok, err) = Running::spawn(&changed, cwd).finish();
        assert!(!ok, "a sweep with other settings ran: {err}");
        check_refusal(&err, "a sweep with other settings");
        assert!(err.contains("lr 0.05 -> 0.07"), "{err}");
    }
    let (ok, err) = Running::spawn(&args, cwd).finish();
    assert!(ok, "the rerun sweep: {err}");
    for seed in [1, 2] {
        check_folder(
            &cwd.join(out).join(format!("runs/seed-{seed}")),
            true,
            refs,
            cwd,
        );
    }
    for log in std::fs::read_dir(cwd.join(out).join("logs")).unwrap() {
        let text = std::fs::read_to_string(log.unwrap().path()).unwrap();
        assert!(!text.contains("panicked"), "{text}");
    }
    sent
}

/// Waits until no process holds the lock of any run folder under `runs`.
fn wait_for_unlocked(runs: &Path) {
    let t0 = Instant::now();
    let Ok(entries) = std::fs::read_dir(runs) else {
        return;
    };
    for e in entries {
        let dir = e.unwrap().path();
        while flatmin::train::RunLock::check_free(&dir, "--resume").is_err() {
            assert!(t0.elapsed() < DEADLINE, "{} stays locked", dir.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn writers_signals_and_damage_never_duplicate_lose_or_misdescribe() {
    let seed: u64 = std::env::var("FLATMIN_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0015);
    let iterations: usize = std::env::var("FLATMIN_STRESS_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(ITERATIONS);
    let cwd = common::scratch("stress", "loop");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut refs = References::default();
    let (mut counts, mut in_use, mut refused, mut signals) = ([0usize; 3], 0, 0, 0);
    for i in 0..iterations {
        let run_seed = rng.gen_range(1..=2u64);
        let scenario = rng.gen_range(0..3usize);
        let run = format!("r{}", rng.gen_range(0..3));
        eprintln!("stress: FLATMIN_STRESS_SEED={seed} iteration {i}: scenario {scenario} on {run} (seed {run_seed})");
        counts[scenario] += 1;
        match scenario {
            0 => {
                in_use += two_writers(&mut rng, &cwd, &run, run_seed, &mut refs);
                finish_run(&cwd, &run, run_seed, &mut refs);
            }
            1 => signals += signal_storm(&mut rng, &cwd, &format!("sweep{}", i % 2), &mut refs),
            _ => refused += usize::from(damaged_resume(&mut rng, &cwd, &run, run_seed, &mut refs)),
        }
        // The next iteration on this folder starts from a finished run or from scratch.
        if rng.gen_bool(0.3) {
            let _ = std::fs::remove_dir_all(cwd.join(&run));
        }
    }
    eprintln!(
        "stress: {iterations} iterations (two writers {}, signal storms {}, damaged resumes {}): \
         {in_use} writers refused as in use, {signals} signals, {refused} damaged resumes refused",
        counts[0], counts[1], counts[2]
    );
}

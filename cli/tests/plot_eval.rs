//! `flatmin plot` and `flatmin eval` end to end: runs are trained through the library on a
//! small synthetic dataset (written in the CIFAR-10 binary layout, so the command line can
//! read the very same images), then the binary draws and evaluates them.

use flatmin::data::DataSource;
use flatmin::train::{Record, RunDir, Silent, TrainConfig, Trainer};
use flatmin_datasets::{synthetic, Batch};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

mod common;

/// A fresh folder under the target's temporary folder.
fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("plot-eval-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes `batch` as a CIFAR-10 binary batch file (label byte, then 3072 pixel bytes).
fn write_batch(path: &Path, batch: &Batch) {
    let mut bytes = Vec::with_capacity(batch.len() * 3073);
    for i in 0..batch.len() {
        bytes.push(batch.labels[i]);
        bytes.extend_from_slice(batch.image(i));
    }
    std::fs::write(path, bytes).unwrap();
}

/// The data folder and two finished runs on it (trained once for all tests).
struct Fixture {
    data: PathBuf,
    a: PathBuf,
    b: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = tmp("fixture");
        let data = root.join("cifar-10-batches-bin");
        std::fs::create_dir_all(&data).unwrap();
        let (train, test) = synthetic(160, 60, 11);
        write_batch(&data.join("data_batch_1.bin"), &train);
        write_batch(&data.join("test_batch.bin"), &test);
        let train_run = |name: &str, seed: u64, lr: f64| {
            let dir = root.join(name);
            let cfg = TrainConfig {
                model: "tiny-tanh".into(),
                epochs: 2,
                batch_size: 32,
                train_size: 0,
                test_size: 0,
                lr,
                warmup: 1,
                seed,
                data: data.display().to_string(),
                ..TrainConfig::default()
            };
            let (train, test) = synthetic(160, 60, 11);
            let source = DataSource {
                train,
                test,
                origin: "synthetic".into(),
                synthetic: true,
            };
            Trainer::<f32>::new(cfg, source, &dir)
                .unwrap()
                .run(&mut Silent)
                .unwrap();
            dir
        };
        let a = train_run("run-a", 5, 0.05);
        let b = train_run("run-b", 6, 0.02);
        Fixture { data, a, b }
    })
}

fn flatmin(args: &[&str]) -> Output {
    flatmin_in(None, args)
}

fn flatmin_in(cwd: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flatmin"));
    cmd.args(args).env("RAYON_NUM_THREADS", "2");
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    cmd.output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The single `error: ...` line of a failed command (nothing else on stderr).
fn error_line(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    common::error_text(out, "flatmin")
}

/// Checks the PNG signature and header, and returns the image's width and height.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{}: not a PNG",
        path.display()
    );
    assert_eq!(&bytes[12..16], b"IHDR");
    assert!(bytes.ends_with(&[0xae, 0x42, 0x60, 0x82]), "no IEND chunk");
    // A figure with axes, text and lines compresses to tens of kilobytes, not to nothing.
    assert!(
        (10_000..5_000_000).contains(&bytes.len()),
        "{} bytes",
        bytes.len()
    );
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn plot_of_one_run_defaults_to_a_png_in_the_run_folder() {
    let f = fixture();
    let out = flatmin(&["plot", s(&f.a)]);
    assert_ok(&out);
    let png = f.a.join("plot.png");
    let (w, h) = png_size(&png);
    // Two default panels (test_acc, loss) side by side.
    assert!(w > h && w >= 1000 && h >= 300, "{w}x{h}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("plot.png"));
}

#[test]
fn plot_of_two_runs_as_png_and_svg() {
    let f = fixture();
    let dir = tmp("two");
    // Several runs: plot.png in the current folder by default.
    assert_ok(&flatmin_in(Some(&dir), &["plot", s(&f.a), s(&f.b)]));
    png_size(&dir.join("plot.png"));

    let png = dir.join("cmp.png");
    let args = [
        "plot",
        s(&f.a),
        s(&f.b),
        "--metric",
        "test_acc",
        "--metric",
        "loss",
        "--metric",
        "lr",
        "--metric",
        "test_loss",
        "--x",
        "epoch",
        "--smooth",
        "3",
        "--title",
        "two runs",
        "--out",
        s(&png),
    ];
    assert_ok(&flatmin(&args));
    let (w, h) = png_size(&png);
    assert!(w >= 1000 && h >= 600, "four panels in a 2x2 grid: {w}x{h}");
    assert_ok(&flatmin(&[
        "plot",
        s(&f.a),
        s(&f.b),
        "--metric",
        "grad_norm",
        "--log-y",
        "--out",
        s(&dir.join("log.png")),
    ]));
    png_size(&dir.join("log.png"));

    let svg = dir.join("cmp.svg");
    assert_ok(&flatmin(&[
        "plot",
        s(&f.a),
        s(&f.b),
        "--title",
        "two runs",
        "--out",
        s(&svg),
    ]));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.starts_with("<svg") && text.trim_end().ends_with("</svg>"),
        "not an SVG"
    );
    for needle in [
        "run-a",
        "run-b",
        "two runs",
        "test accuracy",
        "step",
        "<polyline",
    ] {
        assert!(text.contains(needle), "SVG lacks {needle}");
    }
}

#[test]
fn plot_size_and_resolution_flags() {
    let f = fixture();
    let dir = tmp("sized");
    let png = dir.join("sized.png");
    let sized = |extra: &[&str], out: &Path| {
        let mut args = vec!["plot", s(&f.a), s(&f.b), "--out", s(out)];
        args.extend_from_slice(extra);
        flatmin(&args)
    };
    let flags = ["--width", "900", "--height", "500", "--dpi", "200"];
    assert_ok(&sized(&flags, &png));
    assert_eq!(png_size(&png), (1800, 1000), "900x500 at 200 dpi");
    let svg = dir.join("sized.svg");
    assert_ok(&sized(&flags, &svg));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.starts_with("<svg width=\"900\" height=\"500\" viewBox=\"0 0 9000 5000\""),
        "{}",
        &text[..120]
    );
    for (bad, flag) in [
        (&["--dpi", "0"][..], "--dpi"),
        (&["--width", "50"][..], "--width"),
        (&["--height", "99999"][..], "--height"),
    ] {
        let e = error_line(&sized(bad, &dir.join("bad.png")));
        assert!(e.starts_with(&format!("error: {flag}")), "{e}");
    }
    assert!(!dir.join("bad.png").exists());
}

#[test]
fn plot_errors_are_one_line() {
    let f = fixture();
    let dir = tmp("plot-errors");
    let out = |name: &str| dir.join(name).display().to_string();

    let missing = dir.join("no-such-run");
    let e = error_line(&flatmin(&["plot", s(&missing), "--out", &out("x.png")]));
    assert!(
        e.contains("no-such-run") && e.contains("no such run folder"),
        "{e}"
    );

    let e = error_line(&flatmin(&["plot", s(&dir), "--out", &out("x.png")]));
    assert!(e.contains("no metrics.jsonl"), "{e}");

    // A malformed line: the error names the file and the line.
    let bad = dir.join("bad-run");
    std::fs::create_dir_all(&bad).unwrap();
    let mut text = std::fs::read_to_string(f.a.join("metrics.jsonl")).unwrap();
    let lines = text.lines().count();
    text.push_str("{\"kind\": \"train\", \"epoch\": oops}\n");
    std::fs::write(bad.join("metrics.jsonl"), text).unwrap();
    let e = error_line(&flatmin(&[
        "plot",
        s(&f.a),
        s(&bad),
        "--out",
        &out("x.png"),
    ]));
    assert!(
        e.contains("metrics.jsonl") && e.contains(&format!("line {}", lines + 1)),
        "{e}"
    );

    // An unknown metric: the error lists the available ones.
    let e = error_line(&flatmin(&[
        "plot",
        s(&f.a),
        "--metric",
        "accuracy",
        "--out",
        &out("x.png"),
    ]));
    assert!(e.contains("--metric accuracy"), "{e}");
    for name in [
        "test_acc",
        "test_loss",
        "train_loss",
        "train_acc",
        "loss",
        "acc",
        "lr",
        "grad_norm",
    ] {
        assert!(e.contains(name), "{e} lacks {name}");
    }

    // A metric that one run lacks (a run stopped before its first evaluation).
    let early = dir.join("early-run");
    std::fs::create_dir_all(&early).unwrap();
    let first: String = std::fs::read_to_string(f.a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .take(3)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(early.join("metrics.jsonl"), first).unwrap();
    let e = error_line(&flatmin(&[
        "plot",
        s(&f.a),
        s(&early),
        "--metric",
        "test_acc",
        "--out",
        &out("x.png"),
    ]));
    assert!(e.contains("test_acc") && e.contains("early-run"), "{e}");
    // ... but its per-step metrics plot.
    assert_ok(&flatmin(&["plot", s(&early), "--out", &out("early.png")]));

    let e = error_line(&flatmin(&["plot", s(&f.a), "--out", &out("x.gif")]));
    assert!(e.contains("--out") && e.contains("x.gif"), "{e}");
    let e = error_line(&flatmin(&[
        "plot",
        s(&f.a),
        "--smooth",
        "0",
        "--out",
        &out("x.png"),
    ]));
    assert!(e.contains("--smooth"), "{e}");
    let e = error_line(&flatmin(&[
        "plot",
        s(&f.a),
        "--x",
        "time",
        "--out",
        &out("x.png"),
    ]));
    assert!(e.contains("--x"), "{e}");
    let e = error_line(&flatmin(&[
        "plot",
        s(&f.a),
        "--out",
        &dir.join("no-dir").join("x.png").display().to_string(),
    ]));
    assert!(e.contains("--out") && e.contains("no-dir"), "{e}");
    let e = error_line(&flatmin(&["plot"]));
    assert!(e.contains("RUN"), "{e}");
    assert!(
        !dir.join("x.png").exists(),
        "a failed plot wrote its output"
    );
}

fn last_eval(run: &Path) -> Record {
    RunDir::open(run)
        .unwrap()
        .records()
        .unwrap()
        .into_iter()
        .rev()
        .find(|r| r.kind == "eval")
        .unwrap()
}

fn eval_json(args: &[&str]) -> serde_json::Value {
    let out = flatmin(args);
    assert_ok(&out);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line expected: {stdout}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn eval_of_a_run_reproduces_its_last_evaluation() {
    let f = fixture();
    let last = last_eval(&f.a);
    let (acc, loss) = (last.test_acc.unwrap(), last.test_loss.unwrap());

    // The run folder: its data, seed, dtype and test subset come from config.json.
    let v = eval_json(&["eval", s(&f.a), "--json"]);
    assert_eq!(v["acc"].as_f64().unwrap(), acc, "{v}");
    assert_eq!(v["loss"].as_f64().unwrap(), loss, "{v}");
    assert_eq!(v["images"], 60);
    assert_eq!(v["split"], "test");
    assert_eq!(v["model"], "tiny-tanh");
    assert_eq!(v["bn_mode"], "eval");

    // The human line.
    let out = flatmin(&["eval", s(&f.a)]);
    assert_ok(&out);
    let human = String::from_utf8(out.stdout).unwrap();
    assert!(
        human.contains(&format!("test accuracy {:.2}%", 100.0 * acc)),
        "{human}"
    );

    // The model file, the training checkpoint (optimizer state left out) and a copy of the
    // weights outside the run folder (with --model and --data) give the same numbers.
    let copy = tmp("eval-copy").join("weights.safetensors");
    std::fs::copy(f.a.join("model.safetensors"), &copy).unwrap();
    let targets = [
        vec![
            "eval".to_string(),
            f.a.join("model.safetensors").display().to_string(),
        ],
        vec![
            "eval".to_string(),
            f.a.join("checkpoints")
                .join("last.safetensors")
                .display()
                .to_string(),
        ],
        vec![
            "eval".into(),
            copy.display().to_string(),
            "--model".into(),
            "tiny-tanh".into(),
            "--data".into(),
            f.data.display().to_string(),
        ],
    ];
    for t in targets {
        let mut args: Vec<&str> = t.iter().map(String::as_str).collect();
        args.push("--json");
        let v = eval_json(&args);
        assert_eq!(v["acc"].as_f64().unwrap(), acc, "{args:?}: {v}");
        assert_eq!(v["loss"].as_f64().unwrap(), loss, "{args:?}: {v}");
    }

    // Other splits, subsets, BatchNorm modes and float types run and report what they did.
    let v = eval_json(&[
        "eval",
        s(&f.a),
        "--split",
        "train",
        "--size",
        "40",
        "--json",
    ]);
    assert_eq!(v["images"], 40);
    assert_eq!(v["split"], "train");
    let v = eval_json(&[
        "eval",
        s(&f.b),
        "--size",
        "20",
        "--bn-mode",
        "train",
        "--dtype",
        "f64",
        "--json",
    ]);
    assert_eq!(v["images"], 20);
    assert_eq!(v["bn_mode"], "train");
    assert_eq!(v["dtype"], "f64");
    let a = v["acc"].as_f64().unwrap();
    assert!(
        (0.0..=1.0).contains(&a) && v["loss"].as_f64().unwrap().is_finite(),
        "{v}"
    );
}

#[test]
fn eval_errors_are_one_line() {
    let f = fixture();
    let dir = tmp("eval-errors");
    let e = error_line(&flatmin(&["eval", s(&dir.join("nothing"))]));
    assert!(
        e.contains("nothing") && e.contains("no such run folder or checkpoint"),
        "{e}"
    );
    let e = error_line(&flatmin(&["eval", s(&dir)]));
    assert!(e.contains("no config.json"), "{e}");

    let lone = dir.join("lone.safetensors");
    std::fs::copy(f.a.join("model.safetensors"), &lone).unwrap();
    let e = error_line(&flatmin(&["eval", s(&lone)]));
    assert!(
        e.contains("--model") && e.contains("lone.safetensors"),
        "{e}"
    );
    let e = error_line(&flatmin(&[
        "eval",
        s(&lone),
        "--model",
        "cnn-s",
        "--data",
        s(&f.data),
    ]));
    assert!(e.contains("lone.safetensors"), "{e}");

    let e = error_line(&flatmin(&["eval", s(&f.a), "--model", "mlp-s"]));
    assert!(
        e.contains("--model mlp-s") && e.contains("tiny-tanh"),
        "{e}"
    );
    let e = error_line(&flatmin(&["eval", s(&f.a), "--size", "1000"]));
    assert!(e.contains("--size 1000") && e.contains("60"), "{e}");
    let e = error_line(&flatmin(&[
        "eval",
        s(&f.a),
        "--data",
        s(&dir.join("no-data")),
    ]));
    assert!(e.contains("no-data"), "{e}");
    let e = error_line(&flatmin(&["eval", s(&f.a), "--split", "valid"]));
    assert!(e.contains("--split"), "{e}");
    let e = error_line(&flatmin(&["eval", s(&f.a), "--bn-mode", "frozen"]));
    assert!(e.contains("--bn-mode"), "{e}");

    let broken = dir.join("broken.safetensors");
    std::fs::write(&broken, b"not a safetensors file").unwrap();
    let e = error_line(&flatmin(&[
        "eval",
        s(&broken),
        "--model",
        "tiny-tanh",
        "--data",
        s(&f.data),
    ]));
    assert!(e.contains("broken.safetensors"), "{e}");
}

/// A run folder holding only a `metrics.jsonl` whose train records have the losses `losses`
/// (JSON number text) and whose eval records have them as test losses.
fn run_with_losses(dir: &Path, losses: &[&str]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut text = String::new();
    for (i, l) in losses.iter().enumerate() {
        let step = i + 1;
        text.push_str(&format!(
            "{{\"kind\":\"train\",\"epoch\":0,\"step\":{step},\"lr\":0.1,\"loss\":{l},\"acc\":0.5,\"grad_queries\":{step},\"wall_s\":0.1}}\n"
        ));
        text.push_str(&format!(
            "{{\"kind\":\"eval\",\"epoch\":0,\"step\":{step},\"grad_queries\":{step},\"test_loss\":{l},\"test_acc\":0.5,\"wall_s\":0.1}}\n"
        ));
    }
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
    dir.to_path_buf()
}

/// Huge metric values (1e308, -1.7e308, the smallest subnormal) are plotted, linear and log,
/// in bounded time: values beyond ±1e300 (or below 1e-300 on a log axis) are left out like
/// NaN, so the axis range and its ticks stay finite. A metric with only such values is
/// refused naming it, and a value out of the f64 range (`1e400`, JSON's nearest to
/// infinity) is refused naming the file and line. Before the fix several of these spun in
/// the tick computation for ever (the child is killed after 60 s).
#[test]
fn huge_and_extreme_values_plot_or_are_refused_in_bounded_time() {
    let dir = tmp("huge-values");
    let bin = env!("CARGO_BIN_EXE_flatmin");
    let limit = std::time::Duration::from_secs(60);
    let plot = |run: &Path, extra: &[&str], out: &str| {
        let mut args: Vec<String> = ["plot", s(run), "--metric", "loss", "--metric", "test_loss"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        args.extend(["--out".to_string(), dir.join(out).display().to_string()]);
        common::run_bounded(bin, &args, limit)
    };
    let mixed = run_with_losses(
        &dir.join("mixed"),
        &["1.0", "1e308", "-1.7e308", "2.0", "5e-324", "1e300", "3.0"],
    );
    for (extra, out) in [(&[][..], "mixed.png"), (&["--log-y"][..], "mixed-log.svg")] {
        let (status, err) = plot(&mixed, extra, out);
        assert!(status.success(), "{extra:?}: {err}");
        assert!(dir.join(out).is_file(), "{extra:?}");
    }
    // Only huge values: refused, naming the metric.
    let huge = run_with_losses(&dir.join("huge"), &["1e308", "-1e308", "1.7e308"]);
    let (status, err) = plot(&huge, &[], "huge.png");
    assert!(!status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--metric loss") && err.contains("too large to plot"),
        "{err}"
    );
    let (status, err) = plot(&huge, &["--log-y"], "huge-log.png");
    assert!(!status.success());
    assert!(err.contains("--log-y") && err.contains("log axis"), "{err}");
    // One value each side of the log range.
    let ends = run_with_losses(&dir.join("ends"), &["5e-324", "1e308"]);
    let (status, err) = plot(&ends, &["--log-y"], "ends.png");
    assert!(!status.success(), "{err}");
    // Out of the f64 range: refused with the file and line.
    let inf = run_with_losses(&dir.join("inf"), &["1.0", "1e400"]);
    let (status, err) = plot(&inf, &[], "inf.png");
    assert!(!status.success());
    assert!(
        err.contains("metrics.jsonl") && err.contains("line 3"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// `plot --x epoch` of a run folder written by an older flatmin (`metrics.jsonl`'s epochs from
/// 0) draws the same figure as of today's folder (epochs from 1): one numbering on the axis.
#[test]
fn plot_by_epoch_of_an_older_flatmins_folder_matches_todays() {
    let root = tmp("epoch-numbering");
    let mut svgs = Vec::new();
    for (folder, first_epoch) in [("today", 1), ("older", 0)] {
        // 6 steps, 3 an epoch, an evaluation after each epoch.
        let run = root.join(folder).join("r");
        std::fs::create_dir_all(&run).unwrap();
        let mut text = String::new();
        for step in 1..=6usize {
            let epoch = first_epoch + (step - 1) / 3;
            let loss = 2.0 / step as f64;
            text.push_str(&format!(
                "{{\"kind\":\"train\",\"epoch\":{epoch},\"step\":{step},\"loss\":{loss},\"wall_s\":0.1}}\n"
            ));
            if step % 3 == 0 {
                text.push_str(&format!(
                    "{{\"kind\":\"eval\",\"epoch\":{epoch},\"step\":{step},\"test_acc\":{},\"wall_s\":0.1}}\n",
                    0.1 * step as f64
                ));
            }
        }
        std::fs::write(run.join("metrics.jsonl"), text).unwrap();
        let svg = root.join(format!("{folder}.svg"));
        assert_ok(&flatmin(&[
            "plot",
            s(&run),
            "--x",
            "epoch",
            "--out",
            s(&svg),
        ]));
        svgs.push(std::fs::read_to_string(&svg).unwrap());
    }
    assert!(
        svgs[0] == svgs[1],
        "the two numberings draw different figures"
    );
}

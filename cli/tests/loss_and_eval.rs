//! `--loss mse` end to end (training, the logged traces, `eval`, `trace`, `hvp`), and the
//! evaluation records' training figures: an evaluation of the model on the training subset,
//! equal to what `flatmin eval --split train` reports for the same weights.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

fn tmp(name: &str) -> PathBuf {
    common::tmp("loss-eval", name)
}

fn flatmin(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_flatmin"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "flatmin {args:?}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The JSON object on the last line of stdout.
fn last_json(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().expect("a JSON line")).unwrap()
}

fn records(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Trains tiny-tanh on synthetic data with `extra` flags, two epochs, a trace every 3 steps.
fn train(name: &str, extra: &[&str]) -> PathBuf {
    let run = tmp(name);
    let mut args = vec![
        "train",
        "--model",
        "tiny-tanh",
        "--data",
        "synthetic",
        "--train-size",
        "200",
        "--test-size",
        "100",
        "--epochs",
        "2",
        "--batch-size",
        "50",
        "--lr",
        "0.1",
        "--trace-every",
        "3",
        "--trace-samples",
        "40",
        "--out",
        s(&run),
    ];
    args.extend_from_slice(extra);
    flatmin(&args);
    run
}

#[test]
fn mse_runs_log_traces_of_their_own_loss() {
    let mse = train("mse", &["--loss", "mse", "--seed", "3"]);
    let ce = train("ce", &["--seed", "3"]);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(mse.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["loss"], "mse");
    let trace_of = |run: &Path| -> Vec<f64> {
        let recs = records(run);
        let traces: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "trace").collect();
        assert!(traces.len() >= 3, "{}", run.display());
        traces
            .iter()
            .map(|r| r["extra"]["trace"].as_f64().unwrap())
            .collect()
    };
    for r in records(&mse).iter().filter(|r| r["kind"] == "trace") {
        assert_eq!(r["loss_fn"], "mse", "{r}");
    }
    for r in records(&ce).iter().filter(|r| r["kind"] == "trace") {
        assert_eq!(r["loss_fn"], "ce", "{r}");
    }
    // Same initialization (step 0), different objectives: different Hessians.
    let (t_mse, t_ce) = (trace_of(&mse), trace_of(&ce));
    assert!(
        (t_mse[0] - t_ce[0]).abs() > 1e-3 * t_ce[0].abs(),
        "{t_mse:?} {t_ce:?}"
    );
    // MSE training losses are those of the one-hot squared error: far below ln 10 at the start.
    let first = records(&mse)
        .into_iter()
        .find(|r| r["kind"] == "train")
        .unwrap();
    let l0 = first["loss"].as_f64().unwrap();
    assert!(
        l0 < 1.0,
        "an MSE loss near 0.1, not a cross-entropy near 2.3: {l0}"
    );

    // The curvature commands take the run's loss by default and say which; --loss overrides.
    let measure = |extra: &[&str]| -> Value {
        let mut args = vec![
            "trace",
            "--run",
            s(&mse),
            "--split",
            "train",
            "--size",
            "40",
            "--json",
        ];
        args.extend_from_slice(extra);
        last_json(&flatmin(&args))
    };
    let own = measure(&[]);
    assert_eq!(own["loss_fn"], "mse");
    assert_eq!(own["method"], "structural");
    let other = measure(&["--loss", "ce"]);
    assert_eq!(other["loss_fn"], "ce");
    let (a, b) = (
        own["trace"].as_f64().unwrap(),
        other["trace"].as_f64().unwrap(),
    );
    assert!((a - b).abs() > 1e-3 * b.abs(), "{a} vs {b}");
    // --trace-subset measures the images of the run's trace records: the final record again.
    let logged = trace_of(&mse).last().copied().unwrap();
    let again = last_json(&flatmin(&[
        "trace",
        "--run",
        s(&mse),
        "--trace-subset",
        "--json",
    ]));
    assert_eq!(again["samples"], 40);
    let t = again["trace"].as_f64().unwrap();
    assert!(
        (t - logged).abs() <= 1e-9 * logged,
        "logged {logged} vs --trace-subset {t}"
    );
    // Exact by basis HVPs agrees with the structural MSE trace.
    let basis = measure(&["--method", "basis", "--dtype", "f64"]);
    let structural = measure(&["--dtype", "f64"]);
    let (tb, ts) = (
        basis["trace"].as_f64().unwrap(),
        structural["trace"].as_f64().unwrap(),
    );
    assert!(
        (tb - ts).abs() <= 1e-9 * ts.abs(),
        "basis {tb} structural {ts}"
    );
}

/// Asserts that every evaluation record's training figures are those `flatmin eval --split
/// train` reports for the weights of that epoch (numbered checkpoints), and returns the
/// last record.
fn eval_records_match_flatmin_eval(run: &Path) -> Value {
    let recs = records(run);
    let evals: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "eval").collect();
    assert_eq!(evals.len(), 2);
    for r in &evals {
        let epoch = r["epoch"].as_u64().unwrap();
        let ckpt = run.join(format!("checkpoints/epoch-{epoch:04}.safetensors"));
        let e = last_json(&flatmin(&["eval", s(&ckpt), "--split", "train", "--json"]));
        assert_eq!(e["images"], 200);
        let (acc, loss) = (
            r["train_acc"].as_f64().unwrap(),
            r["train_loss"].as_f64().unwrap(),
        );
        assert_eq!(acc, e["acc"].as_f64().unwrap(), "epoch {epoch}: {r} vs {e}");
        assert!(
            (loss - e["loss"].as_f64().unwrap()).abs() <= 1e-12 * loss.abs(),
            "epoch {epoch}: {r} vs {e}"
        );
        // The running minibatch means are kept under their own names.
        assert!(r["train_acc_running"].as_f64().is_some(), "{r}");
        assert!(r["train_loss_running"].as_f64().is_some(), "{r}");
    }
    (*evals.last().unwrap()).clone()
}

#[test]
fn eval_records_evaluate_the_training_subset() {
    for (name, extra) in [
        ("eval-ce", vec![]),
        ("eval-mse", vec!["--loss", "mse"]),
        ("eval-random", vec!["--random-labels"]),
    ] {
        let mut flags = vec!["--checkpoint-every", "1", "--seed", "4"];
        flags.extend(extra.iter().copied());
        let run = train(name, &flags);
        let last = eval_records_match_flatmin_eval(&run);
        if name == "eval-random" {
            let e = last_json(&flatmin(&["eval", s(&run), "--split", "train", "--json"]));
            assert_eq!(e["random_labels"], true, "{e}");
        }
        if name == "eval-mse" {
            let e = last_json(&flatmin(&["eval", s(&run), "--json"]));
            assert_eq!(e["loss_fn"], "mse");
            assert_eq!(last["test_loss"].as_f64(), e["loss"].as_f64());
        }
    }
}

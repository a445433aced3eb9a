//! Training additions: `--trace-every` (trace records, bit-identical resume), cumulative
//! gradient queries, `--random-labels` and `--init-from`.

use flatmin::train::{file_sha256, Outcome, Silent, TrainConfig, Trainer};
use std::path::{Path, PathBuf};

mod common;
use common::{data, outcome};

fn tmp(name: &str) -> PathBuf {
    common::tmp("train-trace", name)
}

/// The header and rows of a `metrics.csv`, split at commas (no field holds one).
fn csv_table(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text
        .lines()
        .map(|l| l.split(',').map(String::from).collect());
    let header: Vec<String> = lines.next().expect("a header");
    let rows: Vec<Vec<String>> = lines.collect();
    for r in &rows {
        assert_eq!(r.len(), header.len(), "{}: {r:?}", path.display());
    }
    (header, rows)
}

/// A `metrics.csv` without its wall-clock columns (`wall_s`, `images_per_s`).
fn csv_without_wall_time(path: &Path) -> Vec<Vec<String>> {
    let (header, rows) = csv_table(path);
    let keep: Vec<usize> = (0..header.len())
        .filter(|&i| header[i] != "wall_s" && header[i] != "images_per_s")
        .collect();
    std::iter::once(header)
        .chain(rows)
        .map(|r| keep.iter().map(|&i| r[i].clone()).collect())
        .collect()
}

/// Rewrites a run's `metrics.csv` in the columns written before `grad_queries`, `method` and
/// the trace figures were added (the first 14), as a folder from an older flatmin holds it.
fn downgrade_csv(dir: &Path) {
    let p = dir.join("metrics.csv");
    let old: String = std::fs::read_to_string(&p)
        .unwrap()
        .lines()
        .map(|l| l.split(',').take(14).collect::<Vec<_>>().join(",") + "\n")
        .collect();
    assert!(old.starts_with("kind,epoch,step,lr,loss,acc,grad_norm,grad_evals,train_loss,train_acc,test_loss,test_acc,images_per_s,wall_s\n"));
    std::fs::write(&p, old).unwrap();
}

fn cfg(model: &str) -> TrainConfig {
    TrainConfig {
        model: model.into(),
        epochs: 3,
        batch_size: 32,
        train_size: 0,
        test_size: 0,
        lr: 0.05,
        seed: 5,
        data: "synthetic".into(),
        trace_every: 2,
        trace_size: 48,
        ..TrainConfig::default()
    }
}

#[test]
fn trace_every_logs_traces_and_resumes_bit_identically() {
    for (model, opt) in [("tiny-tanh", "sa"), ("resnet20", "sgd")] {
        let mut c = cfg(model);
        c.optimizer = opt.parse().unwrap();
        if opt == "sa" {
            c.momentum = 0.0;
            c.weight_decay = 0.0;
            c.probe_batch = 1;
        }
        if model == "resnet20" {
            c.epochs = 2;
            c.trace_size = 16;
        }
        let full = tmp(&format!("full-{model}-{opt}"));
        let mut t = Trainer::<f32>::new(c.clone(), data(), &full).unwrap();
        t.run(&mut Silent).unwrap();
        let recs = t.run_dir().records().unwrap();
        let total = c.epochs * 5;
        let traces: Vec<_> = recs.iter().filter(|r| r.kind == "trace").collect();
        // Step 0, every second step, and the last step.
        let want_steps: Vec<usize> = (0..=total).filter(|s| s % 2 == 0 || *s == total).collect();
        let got_steps: Vec<usize> = traces.iter().map(|r| r.step).collect();
        assert_eq!(got_steps, want_steps, "{model}/{opt}");
        for r in &traces {
            assert_eq!(r.method.as_deref(), Some("structural"));
            assert_eq!(
                r.bn_mode.as_deref(),
                Some("eval"),
                "the measured loss is named"
            );
            let norm = r.extra["trace_norm"];
            assert!(norm.is_finite() && norm > 0.0, "{norm}");
        }
        // grad_queries is the running sum of grad_evals.
        let mut sum = 0u64;
        for r in recs.iter().filter(|r| r.kind == "train") {
            sum += r.grad_evals.unwrap() as u64;
            assert_eq!(r.grad_queries, Some(sum));
        }
        if opt == "sa" {
            assert!(sum > total as u64, "sa makes more than one query a step");
        }
        // metrics.csv: one row per record, with the queries, the trace method and figures.
        let (header, rows) = csv_table(&full.join("metrics.csv"));
        let base = flatmin::train::CSV_HEADER.split(',').count();
        assert_eq!(header[..base].join(","), flatmin::train::CSV_HEADER);
        assert_eq!(header, flatmin::train::csv_columns(c.optimizer));
        assert_eq!(
            header[base - 8..base],
            [
                "grad_queries",
                "method",
                "trace",
                "trace_norm",
                "trace_std_error",
                "grad_samples",
                "train_loss_running",
                "train_acc_running"
            ]
        );
        let col = |name: &str| header.iter().position(|h| h == name).unwrap();
        assert_eq!(rows.len(), recs.len());
        for (row, r) in rows.iter().zip(&recs) {
            let num = |name: &str| row[col(name)].parse::<f64>().ok();
            assert_eq!(row[col("kind")], r.kind);
            assert_eq!(row[col("step")], r.step.to_string());
            let q = r.grad_queries.expect("every record counts the queries");
            assert_eq!(row[col("grad_queries")], q.to_string(), "{row:?}");
            let n = r.grad_samples.expect("every record counts the samples");
            assert_eq!(row[col("grad_samples")], n.to_string(), "{row:?}");
            match r.kind.as_str() {
                "trace" => {
                    assert_eq!(row[col("method")], "structural");
                    assert_eq!(num("trace"), Some(r.extra["trace"]));
                    assert_eq!(num("trace_norm"), Some(r.extra["trace_norm"]));
                    assert!(num("trace_norm").unwrap() > 0.0);
                    assert_eq!(row[col("trace_std_error")], "");
                }
                _ => {
                    for c in ["method", "trace", "trace_norm", "trace_std_error"] {
                        assert_eq!(row[col(c)], "", "{c}: {row:?}");
                    }
                }
            }
            if r.kind == "train" {
                assert_eq!(num("grad_evals"), r.grad_evals.map(|v| v as f64));
                assert_eq!(num("loss"), r.loss);
            }
        }
        let want = outcome(&full);
        let want_csv = csv_without_wall_time(&full.join("metrics.csv"));
        // Stop mid-epoch at a trace step (4), then at an epoch boundary (5). The first part
        // leaves a metrics.csv of the old, narrower columns: resuming rebuilds it.
        let part = tmp(&format!("part-{model}-{opt}"));
        let mut t = Trainer::<f32>::new(c.clone(), data(), &part).unwrap();
        assert_eq!(
            t.run_until(&mut Silent, &|s| s == 4).unwrap(),
            Outcome::Stopped { step: 4 }
        );
        drop(t);
        downgrade_csv(&part);
        let mut t = Trainer::<f32>::resume(&part, data()).unwrap();
        assert_eq!(
            t.run_until(&mut Silent, &|s| s == 5).unwrap(),
            Outcome::Stopped { step: 5 }
        );
        drop(t);
        let mut t = Trainer::<f32>::resume(&part, data()).unwrap();
        assert_eq!(
            t.run_until(&mut Silent, &|_| false).unwrap(),
            Outcome::Finished
        );
        let got = outcome(&part);
        assert_eq!(got.1, want.1, "{model}/{opt}: metrics differ after resume");
        assert_eq!(
            csv_without_wall_time(&part.join("metrics.csv")),
            want_csv,
            "{model}/{opt}: metrics.csv differs after resume"
        );
        assert!(
            got.0 == want.0,
            "{model}/{opt}: weights differ after resume"
        );
    }
}

#[test]
fn random_labels_and_init_from() {
    let base = tmp("base");
    let mut c = cfg("tiny-tanh");
    c.trace_every = 0;
    c.random_labels = true;
    c.epochs = 1;
    let mut t = Trainer::<f32>::new(c.clone(), data(), &base).unwrap();
    t.run(&mut Silent).unwrap();
    let plain = tmp("plain");
    let mut c2 = c.clone();
    c2.random_labels = false;
    Trainer::<f32>::new(c2, data(), &plain).unwrap();
    let meta = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
    };
    // Random labels change the training labels (and so the recorded data identity), the
    // images stay.
    let (a, b) = (meta(&base), meta(&plain));
    let sha = |v: &serde_json::Value| v["dataset"]["train_sha256"].as_str().unwrap().to_string();
    assert_ne!(sha(&a), sha(&b));
    // A run started from base's model begins at base's weights; path and hash are recorded.
    let init = base.join("model.safetensors");
    let next = tmp("next");
    let mut c3 = cfg("tiny-tanh");
    c3.trace_every = 1;
    c3.epochs = 1;
    c3.init_from = Some(init.display().to_string());
    let mut t = Trainer::<f32>::new(c3, data(), &next).unwrap();
    let cfg_written = t.run_dir().config().unwrap();
    assert_eq!(
        cfg_written.init_sha256.as_deref(),
        Some(file_sha256(&init).unwrap().as_str())
    );
    let mut m = flatmin_models::Model::<f32>::named("tiny-tanh", 0).unwrap();
    m.load(&init).unwrap();
    let want: Vec<f32> = m
        .params_cloned()
        .iter()
        .flat_map(|p| p.data().to_vec())
        .collect();
    let got: Vec<f32> = t
        .model()
        .params_cloned()
        .iter()
        .flat_map(|p| p.data().to_vec())
        .collect();
    assert!(want == got, "--init-from did not load the weights");
    t.run(&mut Silent).unwrap();
    // A checkpoint file works as well (its optimizer and trainer entries are skipped).
    let from_ckpt = tmp("from-ckpt");
    let mut c4 = cfg("tiny-tanh");
    c4.epochs = 1;
    c4.init_from = Some(
        base.join("checkpoints/last.safetensors")
            .display()
            .to_string(),
    );
    Trainer::<f32>::new(c4, data(), &from_ckpt).unwrap();
}

/// `trace_method = hutchinson` logs estimates with standard errors at the same steps as the
/// structural log, and each estimate lies within five standard errors of the exact trace at
/// the same (bit-identical) parameters.
#[test]
fn hutchinson_trace_log_brackets_the_structural_one() {
    let mut c = cfg("tiny-tanh");
    c.epochs = 1;
    let exact_dir = tmp("trace-structural");
    let mut t = Trainer::<f32>::new(c.clone(), data(), &exact_dir).unwrap();
    t.run(&mut Silent).unwrap();
    let exact = t.run_dir().records().unwrap();
    c.trace_method = flatmin::train::TraceMethod::Hutchinson;
    c.trace_probes = 64;
    let est_dir = tmp("trace-hutchinson");
    let mut t = Trainer::<f32>::new(c.clone(), data(), &est_dir).unwrap();
    t.run(&mut Silent).unwrap();
    let est = t.run_dir().records().unwrap();
    let traces = |r: &[flatmin::train::Record]| -> Vec<(usize, f64, Option<f64>, String)> {
        r.iter()
            .filter(|r| r.kind == "trace")
            .map(|r| {
                (
                    r.step,
                    r.extra["trace"],
                    r.extra.get("trace_std_error").copied(),
                    r.method.clone().unwrap(),
                )
            })
            .collect()
    };
    // The standard error reaches metrics.csv, in its column.
    let (header, rows) = csv_table(&est_dir.join("metrics.csv"));
    let se = header.iter().position(|h| h == "trace_std_error").unwrap();
    let se_rows: Vec<f64> = rows
        .iter()
        .filter(|r| r[0] == "trace")
        .map(|r| r[se].parse().unwrap())
        .collect();
    let se_recs: Vec<f64> = est
        .iter()
        .filter(|r| r.kind == "trace")
        .map(|r| r.extra["trace_std_error"])
        .collect();
    assert_eq!(se_rows, se_recs);
    assert!(rows
        .iter()
        .any(|r| r[0] == "trace" && r[15] == "hutchinson"));
    let (a, b) = (traces(&exact), traces(&est));
    assert_eq!(a.len(), b.len());
    assert!(a.len() >= 3);
    for ((sa, ta, sea, ma), (sb, tb, seb, mb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        assert_eq!((ma.as_str(), mb.as_str()), ("structural", "hutchinson"));
        assert!(sea.is_none());
        let se = seb.expect("a Hutchinson record carries its standard error");
        assert!(se > 0.0 && se < 0.5 * ta.abs(), "se {se} vs trace {ta}");
        assert!(
            (tb - ta).abs() <= 5.0 * se,
            "step {sa}: {tb} ± {se} vs {ta}"
        );
    }
    // An unknown method is refused when the configuration is read, naming the key and the
    // choices.
    let mut v = serde_json::to_value(&c).unwrap();
    v["trace_method"] = "lanczos".into();
    let e = TrainConfig::from_json(&v.to_string())
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("trace_method") && e.contains("lanczos") && e.contains("hutchinson"),
        "{e}"
    );
}

/// `data_seed` fixes the data choices (subsets, random labels) apart from `seed`: runs with
/// different seeds and one data seed train on the same images (the same recorded SHA-256)
/// and still differ in initialization and order; without it the seed picks the data.
#[test]
fn data_seed_keeps_the_images_while_the_seed_varies() {
    let meta = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
    };
    let sha = |v: &serde_json::Value, k: &str| v["dataset"][k].as_str().unwrap().to_string();
    let recipe = |seed: u64, data_seed: Option<u64>| TrainConfig {
        trace_every: 0,
        epochs: 1,
        train_size: 100,
        test_size: 50,
        random_labels: true,
        seed,
        data_seed,
        ..cfg("tiny-tanh")
    };
    let mut outcomes = Vec::new();
    for (name, seed, data_seed) in [
        ("ds-a", 1, Some(7)),
        ("ds-b", 2, Some(7)),
        ("ds-c", 7, None),
    ] {
        let dir = tmp(name);
        let mut t = Trainer::<f32>::new(recipe(seed, data_seed), data(), &dir).unwrap();
        t.run(&mut Silent).unwrap();
        outcomes.push((meta(&dir), outcome(&dir)));
    }
    let (a, b, c) = (&outcomes[0], &outcomes[1], &outcomes[2]);
    for k in ["train_sha256", "test_sha256"] {
        assert_eq!(sha(&a.0, k), sha(&b.0, k), "{k}");
        assert_eq!(sha(&a.0, k), sha(&c.0, k), "{k}: data seed 7 = seed 7");
    }
    assert!(a.1 .0 != b.1 .0, "different seeds, different weights");
    // Without a data seed, another seed picks other images.
    let dir = tmp("ds-d");
    Trainer::<f32>::new(recipe(1, None), data(), &dir).unwrap();
    assert_ne!(sha(&meta(&dir), "train_sha256"), sha(&a.0, "train_sha256"));
}

/// The per-step growth of `grad_samples` over a run's train records, with the records.
fn sample_steps(dir: &Path) -> Vec<(u64, flatmin::train::Record)> {
    let recs = flatmin::train::read_records(&dir.join("metrics.jsonl")).unwrap();
    let mut last = 0;
    let mut steps = Vec::new();
    for r in recs {
        let now = r.grad_samples.expect("every record counts the samples");
        if r.kind == "train" {
            steps.push((now - last, r));
        } else {
            assert_eq!(now, last, "{} records add no samples", r.kind);
        }
        last = now;
    }
    steps
}

#[test]
fn grad_samples_count_the_images_of_every_gradient_evaluation() {
    // 150 images in batches of 32: four full batches and a last one of 22, per epoch.
    let mut c = cfg("tiny-tanh");
    c.trace_every = 0;
    c.epochs = 2;
    c.train_size = 150;
    let batches = [32, 32, 32, 32, 22, 32, 32, 32, 32, 22];
    let sgd = tmp("samples-sgd");
    Trainer::<f32>::new(c.clone(), data(), &sgd)
        .unwrap()
        .run(&mut Silent)
        .unwrap();
    let got: Vec<u64> = sample_steps(&sgd).iter().map(|s| s.0).collect();
    assert_eq!(got, batches);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sgd.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["grad_samples"], 300);
    // SA with a probe batch of B: the minibatch gradient, then the probe gradient and the
    // perturbed probe gradient on B images each (the gate is always open without eps0).
    c.optimizer = flatmin::train::Optimizer::Sa;
    c.probe_batch = 4;
    let sa = tmp("samples-sa");
    Trainer::<f32>::new(c, data(), &sa)
        .unwrap()
        .run(&mut Silent)
        .unwrap();
    let steps = sample_steps(&sa);
    assert_eq!(steps.len(), batches.len());
    for ((grown, r), n) in steps.iter().zip(batches) {
        assert_eq!(r.extra["zero_grad_fix"], 0.0, "{r:?}");
        assert_eq!(r.grad_evals, Some(3));
        assert_eq!(*grown, n + 2 * 4, "step {}", r.step);
    }
    // The plot's horizontal axis.
    let png = sgd.join("by-samples.png");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flatmin"))
        .args(["plot", "--x", "grad_samples", "--out"])
        .args([&png, &sgd, &sa])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::metadata(&png).unwrap().len() > 0);
}

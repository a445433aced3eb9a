//! Training runs through the library: run folder contents, resume equivalence (bit for bit,
//! from mid-epoch and epoch-boundary checkpoints), and thread-count independence.

use flatmin::train::{Outcome, Silent, Trainer};
use std::path::PathBuf;

mod common;
use common::{cfg, data, outcome};

fn tmp(name: &str) -> PathBuf {
    common::tmp("train", name)
}

#[test]
fn run_folder_holds_config_metrics_and_checkpoints() {
    let dir = tmp("folder");
    let mut c = cfg("tiny-tanh");
    c.checkpoint_every = 2;
    let mut t = Trainer::<f32>::new(c.clone(), data(), &dir).unwrap();
    t.run(&mut Silent).unwrap();
    for f in [
        "config.json",
        "metrics.jsonl",
        "metrics.csv",
        "model.safetensors",
        "checkpoints/last.safetensors",
        "checkpoints/epoch-0002.safetensors",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let recs = t.run_dir().records().unwrap();
    let steps = 3 * 5; // 160 / 32 = 5 batches per epoch
    assert_eq!(recs.iter().filter(|r| r.kind == "train").count(), steps);
    assert_eq!(recs.iter().filter(|r| r.kind == "eval").count(), 3);
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + steps + 3);
    // The run learns the synthetic task.
    let last = recs.iter().rev().find(|r| r.kind == "eval").unwrap();
    assert!(
        last.test_acc.unwrap() > 0.3,
        "test accuracy {:?}",
        last.test_acc
    );
    // config.json round-trips, and the folder cannot be reused for a new run.
    assert_eq!(t.run_dir().config().unwrap(), c);
    let err = Trainer::<f32>::new(c, data(), &dir)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("already holds a run"), "{err}");
    // model.safetensors is a plain state_dict that loads into the model.
    let mut m = flatmin_models::Model::<f32>::named("tiny-tanh", 0).unwrap();
    m.load(&dir.join("model.safetensors")).unwrap();
}

#[test]
fn resume_is_bit_identical_for_sgd_and_adamw_with_batchnorm() {
    for (model, opt) in [
        ("tiny-tanh", "sgd"),
        ("resnet20", "sgd"),
        ("tiny-tanh", "adamw"),
    ] {
        let mut c = cfg(model);
        c.optimizer = opt.parse().unwrap();
        if model == "resnet20" {
            c.epochs = 2;
        }
        let full = tmp(&format!("full-{model}-{opt}"));
        Trainer::<f32>::new(c.clone(), data(), &full)
            .unwrap()
            .run(&mut Silent)
            .unwrap();
        let want = outcome(&full);
        // Interrupt mid-epoch (step 3), then at an epoch boundary (step 5), resuming each time.
        let part = tmp(&format!("part-{model}-{opt}"));
        let mut t = Trainer::<f32>::new(c.clone(), data(), &part).unwrap();
        assert_eq!(
            t.run_until(&mut Silent, &|s| s == 3).unwrap(),
            Outcome::Stopped { step: 3 }
        );
        drop(t);
        let mut t = Trainer::<f32>::resume(&part, data()).unwrap();
        assert_eq!(t.step(), 3);
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
        assert!(
            got.0 == want.0,
            "{model}/{opt}: final weights differ after resume"
        );
    }
}

#[test]
fn same_seed_same_bits_for_one_and_two_threads() {
    let mut runs = Vec::new();
    for threads in [1, 2] {
        let dir = tmp(&format!("threads-{threads}"));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut c = cfg("resnet20");
            c.epochs = 1;
            Trainer::<f32>::new(c, data(), &dir)
                .unwrap()
                .run(&mut Silent)
                .unwrap()
        });
        runs.push(outcome(&dir));
    }
    assert_eq!(
        runs[0].1, runs[1].1,
        "metrics differ between 1 and 2 threads"
    );
    assert!(
        runs[0].0 == runs[1].0,
        "weights differ between 1 and 2 threads"
    );
}

/// `metrics.csv` (read back with the csv crate) has the columns of the run's optimizer after
/// the common ones, for every optimizer: each figure a step reports (`StepInfo::extra`) has
/// its column and its value there, none is left in `metrics.jsonl` only; `epoch` is
/// `metrics.jsonl`'s; one row per record.
#[test]
fn metrics_csv_has_the_optimizers_figures_as_columns() {
    for &opt in flatmin::train::Optimizer::ALL {
        let dir = tmp(&format!("csv-{}", opt.name()));
        let mut c = cfg("tiny-tanh");
        c.optimizer = opt;
        c.epochs = 1;
        let mut t = Trainer::<f32>::new(c, data(), &dir).unwrap();
        t.run(&mut Silent).unwrap();
        let recs = t.run_dir().records().unwrap();
        let mut reader = csv::Reader::from_path(dir.join("metrics.csv")).unwrap();
        let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
        assert_eq!(header, flatmin::train::csv_columns(opt), "{}", opt.name());
        let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), recs.len(), "{}", opt.name());
        let col = |name: &str| header.iter().position(|h| h == name).unwrap();
        for (row, r) in rows.iter().zip(&recs) {
            assert_eq!(row[col("epoch")], r.epoch.to_string());
            if r.kind != "train" {
                continue;
            }
            for (k, v) in &r.extra {
                assert!(
                    opt.step_figures().contains(&k.as_str()),
                    "{}: {k} has no column",
                    opt.name()
                );
                assert_eq!(
                    row[col(k)].parse::<f64>().unwrap(),
                    *v,
                    "{}: {k}",
                    opt.name()
                );
            }
        }
        let with_figures = recs
            .iter()
            .any(|r| r.kind == "train" && !r.extra.is_empty());
        assert_eq!(
            with_figures,
            !opt.step_figures().is_empty(),
            "{}",
            opt.name()
        );
    }
}

/// `best.safetensors` holds the model of the evaluation with the highest test accuracy (the
/// earlier of two equal ones), and a run stopped after it and resumed keeps it: the file is
/// byte-identical to the uninterrupted run's, where forgetting the best on resume would let
/// a later, worse evaluation replace it.
#[test]
fn best_safetensors_keeps_the_best_evaluation_across_a_resume() {
    let mut c = cfg("tiny-tanh");
    c.lr = 0.5;
    c.epochs = 6;
    let full = tmp("best-full");
    let mut t = Trainer::<f32>::new(c.clone(), data(), &full).unwrap();
    t.run(&mut Silent).unwrap();
    let best = t.best().expect("a best evaluation");
    let evals: Vec<_> = t
        .run_dir()
        .records()
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == "eval")
        .collect();
    let later: Vec<f64> = evals
        .iter()
        .filter(|r| r.step > best.step)
        .map(|r| r.test_acc.unwrap())
        .collect();
    // Later evaluations are worse (else the resume below could not fail); two earlier
    // ones tie, and the first of them is the best of the records up to the second.
    assert!(
        !later.is_empty() && later.iter().all(|&a| a < best.test_acc),
        "{evals:?}"
    );
    let tie = evals
        .windows(2)
        .position(|w| w[0].test_acc == w[1].test_acc);
    let tie = tie.unwrap_or_else(|| panic!("the recipe no longer has a tie: {evals:?}"));
    let first_best = flatmin::train::BestModel::of_records(&evals[..=tie + 1]).unwrap();
    assert_eq!(first_best.step, evals[tie].step);
    let bytes = std::fs::read(full.join("best.safetensors")).unwrap();
    assert_ne!(
        bytes,
        std::fs::read(full.join("model.safetensors")).unwrap()
    );
    let mut m = flatmin_models::Model::<f32>::named("tiny-tanh", 0).unwrap();
    m.load(&full.join("best.safetensors")).unwrap();
    let (_, acc) = flatmin::train::evaluate(&m, &data().test).unwrap();
    assert_eq!(acc, best.test_acc);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["best_step"], best.step);
    assert_eq!(summary["best_test_acc"], best.test_acc);
    // Stopped two steps after the best evaluation, then resumed to the end.
    let part = tmp("best-part");
    let mut t = Trainer::<f32>::new(c, data(), &part).unwrap();
    let stop = best.step + 2;
    assert_eq!(
        t.run_until(&mut Silent, &|s| s == stop).unwrap(),
        Outcome::Stopped { step: stop }
    );
    drop(t);
    let mut t = Trainer::<f32>::resume(&part, data()).unwrap();
    assert_eq!(t.best(), Some(best));
    t.run(&mut Silent).unwrap();
    assert!(std::fs::read(part.join("best.safetensors")).unwrap() == bytes);
}

/// The epochs of a run's own `metrics.jsonl` lines (as written, not renumbered).
fn written_epochs(dir: &std::path::Path) -> Vec<(String, u64, u64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let n = |k: &str| v[k].as_u64().unwrap();
            (
                v["kind"].as_str().unwrap().to_string(),
                n("epoch"),
                n("step"),
            )
        })
        .collect()
}

/// One epoch numbering everywhere, from 1 as on screen: `metrics.jsonl` (the step-0 trace
/// included), `metrics.csv`, `summary.json`'s `best_epoch` and the numbered checkpoints.
#[test]
fn epochs_count_from_one_in_every_file() {
    let dir = tmp("epochs-from-one");
    let mut c = cfg("tiny-tanh");
    c.checkpoint_every = 1;
    c.trace_every = 5;
    Trainer::<f32>::new(c, data(), &dir)
        .unwrap()
        .run(&mut Silent)
        .unwrap();
    let written = written_epochs(&dir);
    // 5 steps an epoch: step s is of epoch ceil(s / 5), the step-0 trace of epoch 1.
    for (kind, epoch, step) in &written {
        assert_eq!(*epoch, step.div_ceil(5).max(1), "{kind} at step {step}");
    }
    let evals: Vec<u64> = written
        .iter()
        .filter(|r| r.0 == "eval")
        .map(|r| r.1)
        .collect();
    assert_eq!(evals, [1, 2, 3]);
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let csv_epochs: Vec<u64> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(csv_epochs, written.iter().map(|r| r.1).collect::<Vec<_>>());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let best_step = summary["best_step"].as_u64().unwrap();
    let best = written
        .iter()
        .find(|r| r.0 == "eval" && r.2 == best_step)
        .unwrap();
    assert_eq!(summary["best_epoch"].as_u64(), Some(best.1), "{summary}");
    assert!(dir.join("checkpoints/epoch-0001.safetensors").is_file());
}

/// A run folder of a flatmin that numbered `metrics.jsonl`'s epochs from 0 reads in today's
/// numbering (`flatmin plot`, `export`, `sweep`'s summary all read through one parser), and
/// `--resume` renumbers its records, so the finished file is an uninterrupted run's.
#[test]
fn an_older_flatmins_run_folder_reads_and_resumes_in_one_numbering() {
    let c = cfg("tiny-tanh");
    let full = tmp("old-numbering-full");
    Trainer::<f32>::new(c.clone(), data(), &full)
        .unwrap()
        .run(&mut Silent)
        .unwrap();
    let want = outcome(&full);
    let old = tmp("old-numbering");
    let mut t = Trainer::<f32>::new(c, data(), &old).unwrap();
    assert_eq!(
        t.run_until(&mut Silent, &|s| s == 7).unwrap(),
        Outcome::Stopped { step: 7 }
    );
    drop(t);
    // Rewrite its records as the older flatmin wrote them: epochs from 0.
    let text = std::fs::read_to_string(old.join("metrics.jsonl")).unwrap();
    let older: String = text
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["epoch"] = (v["epoch"].as_u64().unwrap() - 1).into();
            format!("{v}\n")
        })
        .collect();
    assert!(older.contains("\"epoch\":0"), "{older}");
    std::fs::write(old.join("metrics.jsonl"), older).unwrap();
    let run = flatmin::plot::read_run(&old).unwrap();
    let full_recs = flatmin::plot::read_run(&full).unwrap().records;
    let epochs = |r: &[flatmin::train::Record]| r.iter().map(|r| r.epoch).collect::<Vec<_>>();
    assert_eq!(
        epochs(&run.records),
        epochs(&full_recs[..run.records.len()])
    );
    let mut t = Trainer::<f32>::resume(&old, data()).unwrap();
    t.run(&mut Silent).unwrap();
    assert_eq!(outcome(&old).1, want.1, "metrics differ after resume");
    assert!(written_epochs(&old).iter().all(|r| r.1 >= 1));
}

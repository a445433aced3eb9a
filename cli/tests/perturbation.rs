//! The perturbation optimizers in training runs: every `--optimizer` name trains tiny-tanh on
//! synthetic data and logs what it did per step; sam, rs and sa (with sub-batch probes, fresh
//! probe batches, random output iterates and the final GD phase) resume bit for bit, also
//! with BatchNorm; bad optimizer flags give one-line errors naming the flag.

use flatmin::train::{Optimizer, Outcome, OutputIterate, ProbeData, Silent, TrainConfig, Trainer};
use std::path::PathBuf;
use std::process::Command;

mod common;
use common::{data, outcome};

fn tmp(name: &str) -> PathBuf {
    common::tmp("perturb", name)
}

fn cfg(optimizer: &str) -> TrainConfig {
    TrainConfig {
        model: "tiny-tanh".into(),
        optimizer: optimizer.parse().unwrap(),
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

/// Optimizer name, config tweaks, extra keys logged on every step, evaluations per step.
type Case = (
    &'static str,
    fn(&mut TrainConfig),
    &'static [&'static str],
    usize,
);

#[test]
fn every_optimizer_trains_and_logs_its_step() {
    // (name, tweaks, extra keys expected on every step, gradient evaluations per step)
    let cases: Vec<Case> = vec![
        ("sgd", |_| {}, &[], 1),
        ("adamw", |c| c.lr = 1e-3, &[], 1),
        ("sam", |_| {}, &["pert_norm", "perturbed_grad_norm"], 2),
        ("sam", |c| c.m_sharpness = 8, &["pert_norm", "chunks"], 9),
        ("asam", |c| c.rho = 0.5, &["pert_norm"], 2),
        ("usam", |_| {}, &["pert_norm"], 2),
        ("sam1", |_| {}, &["probe_grad_norm", "pert_norm"], 3),
        ("rps", |_| {}, &["pert_norm"], 2),
        ("label-noise", |c| c.label_noise = 0.3, &["label_noise"], 1),
        (
            "rs",
            |_| {},
            &[
                "gate",
                "pert_norm",
                "probe_grad_norm",
                "v_norm",
                "v_cos_grad",
                "eta_prime",
            ],
            2,
        ),
        ("rs", |c| c.eps0 = Some(0.0), &["gate"], 1),
        (
            "sa",
            |_| {},
            &["phase", "gate", "sign", "pert_norm", "v_norm", "v_cos_grad"],
            2,
        ),
        ("sa", |c| c.probe_batch = 1, &["sign", "probe_grad_norm"], 3),
        ("sa", |c| c.probe_data = ProbeData::Fresh, &["sign"], 3),
    ];
    let mut names: Vec<&str> = cases.iter().map(|c| c.0).collect();
    names.dedup();
    let all: Vec<&str> = Optimizer::ALL.iter().map(|o| o.name()).collect();
    assert_eq!(names, all, "every optimizer name is covered");
    for (k, (name, tweak, keys, evals)) in cases.into_iter().enumerate() {
        let mut c = cfg(name);
        c.epochs = 1;
        tweak(&mut c);
        let dir = tmp(&format!("each-{k}-{name}"));
        let mut t = Trainer::<f32>::new(c, data(), &dir).unwrap();
        t.run(&mut Silent).unwrap();
        let recs = t.run_dir().records().unwrap();
        let train: Vec<_> = recs.iter().filter(|r| r.kind == "train").collect();
        assert_eq!(train.len(), 5, "{name}");
        for r in &train {
            assert!(
                r.loss.unwrap().is_finite() && r.grad_norm.unwrap().is_finite(),
                "{name}: {r:?}"
            );
            assert_eq!(
                r.grad_evals,
                Some(evals),
                "{name} case {k}: gradient evaluations"
            );
            for key in keys {
                let v = r
                    .extra
                    .get(*key)
                    .unwrap_or_else(|| panic!("{name}: no '{key}' in {:?}", r.extra));
                assert!(v.is_finite(), "{name}: {key} = {v}");
            }
        }
        // What the optimizers did, as logged.
        let first = &train[0].extra;
        match name {
            "rs" if keys.len() > 1 => {
                assert_eq!(first["gate"], 1.0);
                assert!((first["pert_norm"] - 0.05).abs() < 1e-12);
                assert!(
                    first["v_cos_grad"].abs() < 1e-3,
                    "projected: v ⟂ ∇f, cos {}",
                    first["v_cos_grad"]
                );
            }
            "rs" => assert_eq!(first["gate"], 0.0, "ε0 = 0 closes the gate"),
            "sa" => assert!(first["sign"].abs() == 1.0 && first["phase"] == 1.0),
            _ => {}
        }
        let last = recs.iter().rev().find(|r| r.kind == "eval").unwrap();
        assert!(last.test_loss.unwrap().is_finite(), "{name}");
    }
}

fn resume_matches(name: &str, c: TrainConfig, stops: &[usize]) {
    let full = tmp(&format!("full-{name}"));
    Trainer::<f32>::new(c.clone(), data(), &full)
        .unwrap()
        .run(&mut Silent)
        .unwrap();
    let want = outcome(&full);
    let part = tmp(&format!("part-{name}"));
    let mut t = Trainer::<f32>::new(c, data(), &part).unwrap();
    for &stop in stops {
        assert_eq!(
            t.run_until(&mut Silent, &|s| s == stop).unwrap(),
            Outcome::Stopped { step: stop },
            "{name}"
        );
        drop(t);
        t = Trainer::<f32>::resume(&part, data()).unwrap();
        assert_eq!(t.step(), stop);
    }
    assert_eq!(
        t.run_until(&mut Silent, &|_| false).unwrap(),
        Outcome::Finished
    );
    let got = outcome(&part);
    assert_eq!(got.1, want.1, "{name}: metrics differ after resume");
    assert!(got.0 == want.0, "{name}: final weights differ after resume");
}

#[test]
fn resume_is_bit_identical_for_sam_rs_and_sa() {
    // 3 epochs of 5 steps; interrupted mid-epoch, at an epoch boundary and after the
    // perturbed phase of sa (11 steps + 4 GD steps) handed on its random iterate.
    let mut sam = cfg("sam");
    sam.m_sharpness = 8;
    resume_matches("sam", sam, &[3, 5, 12]);
    let mut rs = cfg("rs");
    rs.output_iterate = OutputIterate::Random;
    rs.probe_data = ProbeData::Fresh;
    rs.probe_batch = 16;
    rs.eps0 = Some(5.0);
    rs.eta_prime = Some(0.02);
    resume_matches("rs", rs, &[3, 5, 12]);
    let mut sa = cfg("sa");
    sa.output_iterate = OutputIterate::Random;
    sa.probe_batch = 1;
    sa.t_gd = 4;
    sa.momentum = 0.0;
    sa.weight_decay = 0.0;
    resume_matches("sa", sa, &[3, 5, 12]);
}

#[test]
fn resume_is_bit_identical_for_sa_with_batchnorm() {
    let mut sa = cfg("sa");
    sa.model = "resnet20".into();
    sa.epochs = 1;
    sa.probe_batch = 4;
    sa.t_gd = 1;
    sa.output_iterate = OutputIterate::Random;
    resume_matches("sa-bn", sa, &[2]);
}

#[test]
fn sa_hands_its_random_iterate_to_the_gd_phase() {
    let mut c = cfg("sa");
    c.epochs = 1;
    c.t_gd = 2;
    c.output_iterate = OutputIterate::Random;
    let dir = tmp("phases");
    let mut t = Trainer::<f32>::new(c, data(), &dir).unwrap();
    t.run(&mut Silent).unwrap();
    let recs = t.run_dir().records().unwrap();
    let phases: Vec<f64> = recs
        .iter()
        .filter(|r| r.kind == "train")
        .map(|r| r.extra["phase"])
        .collect();
    assert_eq!(phases, [1.0, 1.0, 1.0, 2.0, 2.0]);
    let switch = &recs
        .iter()
        .filter(|r| r.kind == "train")
        .nth(2)
        .unwrap()
        .extra;
    assert!((1.0..=3.0).contains(&switch["output_pick"]), "{switch:?}");
}

#[test]
fn bad_optimizer_flags_give_one_line_errors() {
    let dir = tmp("errors");
    std::fs::create_dir_all(&dir).unwrap();
    let base = [
        "train",
        "--model",
        "tiny-tanh",
        "--epochs",
        "1",
        "--train-size",
        "100",
        "--test-size",
        "50",
        "--batch-size",
        "50",
        "--data",
        "synthetic",
        "--quiet",
    ];
    let cases: [(&[&str], &str); 9] = [
        (&["--optimizer", "sgd", "--eps0", "0.1"], "--eps0"),
        (&["--optimizer", "sam", "--t-gd", "3"], "--t-gd"),
        (
            &["--optimizer", "rs", "--probe-data", "other"],
            "--probe-data",
        ),
        (&["--optimizer", "sa", "--rho", "-1"], "--rho"),
        (&["--optimizer", "sa", "--t-gd", "2"], "--t-gd"),
        (
            &["--optimizer", "label-noise", "--label-noise", "1.5"],
            "--label-noise",
        ),
        (&["--optimizer", "rs", "--eta-prime", "-0.1"], "--eta-prime"),
        (
            &["--optimizer", "rs", "--output-iterate", "best"],
            "--output-iterate",
        ),
        (&["--optimizer", "nope"], "--optimizer"),
    ];
    for (extra, needle) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_flatmin"))
            .args(base)
            .args(extra)
            .args(["--out", &format!("run-{}", needle.trim_start_matches("--"))])
            .current_dir(&dir)
            .output()
            .unwrap();
        common::assert_error(&out, needle, &format!("{extra:?}"));
    }
}

//! `--resume` from a hostile or damaged checkpoint: every case loads and steps, or fails
//! with an error naming the file, never a panic. The runs are those of the `checkpoint` fuzz
//! target (`fuzz/fuzz_targets/checkpoint.rs`), so its crashing inputs, kept in
//! `tests/fuzz_regressions/checkpoint/` (first byte: which run, the rest: the checkpoint),
//! replay here in the stable suite.

use flatmin::data::DataSource;
use flatmin::train::{OutputIterate, Silent, TrainConfig, Trainer};
use flatmin_models::io::{read_safetensors, write_safetensors, RawData, RawTensor};
use std::path::{Path, PathBuf};

mod common;

/// The fuzz target's runs, in its selector order.
const OPTIMIZERS: [&str; 5] = ["sgd", "adamw", "sam", "rs", "sa"];

fn data() -> DataSource {
    let (train, test) = flatmin_datasets::synthetic(20, 10, 1);
    DataSource {
        train,
        test,
        origin: "synthetic".into(),
        synthetic: true,
    }
}

/// A run of `opt` checkpointed after one of its four steps (as in the fuzz target).
fn run(opt: &str, name: &str) -> PathBuf {
    let dir = common::tmp("hostile-ckpt", name);
    let cfg = TrainConfig {
        model: "mlp:48,4,10:tanh:pool8".into(),
        optimizer: opt.parse().unwrap(),
        lr: 0.01,
        epochs: 2,
        batch_size: 10,
        train_size: 0,
        test_size: 0,
        data: "synthetic".into(),
        output_iterate: if opt == "rs" || opt == "sa" {
            OutputIterate::Random
        } else {
            OutputIterate::Last
        },
        t_gd: if opt == "sa" { 1 } else { 0 },
        ..TrainConfig::default()
    };
    let mut t = Trainer::<f32>::create(cfg, data(), &dir, false).unwrap();
    t.run_until(&mut Silent, &|s| s >= 1).unwrap();
    dir
}

fn ckpt(dir: &Path) -> PathBuf {
    dir.join("checkpoints/last.safetensors")
}

/// Resumes and takes one step; the error, if any, as text.
fn resume_and_step(dir: &Path) -> Result<(), String> {
    let mut t = Trainer::<f32>::resume(dir, data()).map_err(|e| format!("{e:#}"))?;
    let start = t.step();
    t.run_until(&mut Silent, &|s| s > start)
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
}

/// Rewrites the checkpoint with `edit` applied to its tensors.
fn tamper(dir: &Path, edit: impl FnOnce(&mut Vec<RawTensor>)) {
    let mut raw = read_safetensors(&ckpt(dir)).unwrap();
    edit(&mut raw);
    write_safetensors(&ckpt(dir), &raw).unwrap();
}

fn tensor<'a>(raw: &'a mut [RawTensor], name: &str) -> &'a mut RawTensor {
    raw.iter_mut()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no {name}"))
}

fn expect_error(dir: &Path, needles: &[&str]) {
    let err = resume_and_step(dir).expect_err("a hostile checkpoint was accepted");
    assert!(err.contains("last.safetensors"), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
}

#[test]
fn fuzz_found_checkpoints_replay_without_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions/checkpoint");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for (k, file) in files.iter().enumerate() {
        let bytes = std::fs::read(file).unwrap();
        let opt = OPTIMIZERS[bytes[0] as usize % OPTIMIZERS.len()];
        let run_dir = run(opt, &format!("replay-{k}"));
        std::fs::write(ckpt(&run_dir), &bytes[1..]).unwrap();
        // Loading or refusing are both fine; panicking is not (the test would fail).
        let _ = resume_and_step(&run_dir);
    }
}

#[test]
fn untouched_checkpoints_resume() {
    for opt in OPTIMIZERS {
        let dir = run(opt, &format!("clean-{opt}"));
        resume_and_step(&dir).unwrap_or_else(|e| panic!("{opt}: {e}"));
    }
}

#[test]
fn adamw_step_count_must_be_a_whole_number_in_range() {
    // The fuzzer's find: a step count read as 7.1e22 (the bytes "hape"), above u64::MAX,
    // saturated to u64::MAX and overflowed `t + 1` in the next step.
    for bad in [f32::INFINITY, f32::NAN, -1.0, 2.5, 7.1e22, 3e9] {
        let dir = run("adamw", "adamw-t");
        tamper(&dir, |raw| {
            tensor(raw, "optimizer/adamw.t").data = RawData::F32(vec![bad]);
        });
        expect_error(&dir, &["optimizer state", "adamw.t"]);
    }
}

#[test]
fn per_parameter_state_must_match_the_parameters() {
    // A momentum buffer of another shape.
    let dir = run("sgd", "momentum-shape");
    tamper(&dir, |raw| {
        let t = tensor(raw, "optimizer/sgd.momentum.1");
        t.shape = vec![2, 2];
        t.data = RawData::F32(vec![0.0; 4]);
    });
    expect_error(
        &dir,
        &["optimizer tensor 'sgd.momentum.1' has shape [2, 2]"],
    );
    // One buffer too few (the step would have left a parameter without momentum).
    let dir = run("sgd", "momentum-missing");
    tamper(&dir, |raw| {
        raw.retain(|t| t.name != "optimizer/sgd.momentum.3")
    });
    expect_error(
        &dir,
        &["optimizer state 'sgd.momentum' holds 3 tensors, not one for each of the model's 4"],
    );
    // A kept iterate of the wrong shape in RS's reservoir.
    let dir = run("rs", "reservoir-shape");
    tamper(&dir, |raw| {
        let t = tensor(raw, "optimizer/rs.reservoir.x.0");
        t.shape = vec![1];
        t.data = RawData::F32(vec![0.0]);
    });
    expect_error(&dir, &["optimizer tensor 'rs.reservoir.x.0' has shape [1]"]);
}

#[test]
fn counters_at_their_maximum_do_not_overflow() {
    // rs.t and the reservoir's count of seen iterates at u64::MAX (4 limbs of 16 bits).
    let dir = run("rs", "counters");
    tamper(&dir, |raw| {
        tensor(raw, "optimizer/rs.t").data = RawData::F32(vec![65535.0; 4]);
        if let RawData::F32(v) = &mut tensor(raw, "optimizer/rs.reservoir.counters").data {
            v[4..8].fill(65535.0);
        }
    });
    resume_and_step(&dir).unwrap();
    let dir = run("sa", "gd-steps");
    tamper(&dir, |raw| {
        tensor(raw, "optimizer/sa.gd_steps").data = RawData::F32(vec![65535.0; 4]);
        tensor(raw, "optimizer/sa.t").data = RawData::F32(vec![65535.0; 4]);
    });
    let _ = resume_and_step(&dir);
}

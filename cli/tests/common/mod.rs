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

//! Reads the real CIFAR-10 subset (10,000 train and 2,000 test records; found by
//! `flatmin_datasets::test_data::subset_dir`: `$FLATMIN_TEST_DATA`, else
//! `../shared/data/cifar10-subset` beside the workspace) and checks it against the manifest
//! and statistics shipped with it. Without the subset each test says `SKIPPED` on stderr and
//! passes, unless `FLATMIN_REQUIRE_TEST_DATA=1`, which makes it fail.

use flatmin_datasets::test_data::{default_subset_dir, subset_dir, DATA_VAR};
use flatmin_datasets::{
    normalize_f32, normalize_f64, read_batch_file, Cifar10, Cifar10Files, CLASS_NAMES, MEAN, STD,
};
use std::path::Path;

/// `(split, record, label)` rows of `manifest.csv`.
fn manifest(dir: &Path) -> Vec<(String, usize, u8, String)> {
    let text = std::fs::read_to_string(dir.join("manifest.csv")).expect("manifest.csv");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("split,record,label,class,source"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                f[0].to_string(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].to_string(),
            )
        })
        .collect()
}

/// Per-channel mean and standard deviation on the 0-255 scale.
fn channel_stats(pixels: &[u8]) -> ([f64; 3], [f64; 3]) {
    let mut sum = [0f64; 3];
    let mut sq = [0f64; 3];
    let mut count = [0f64; 3];
    for (plane, bytes) in pixels.chunks(1024).enumerate() {
        let c = plane % 3;
        for &p in bytes {
            let p = f64::from(p);
            sum[c] += p;
            sq[c] += p * p;
        }
        count[c] += bytes.len() as f64;
    }
    let mean: [f64; 3] = std::array::from_fn(|c| sum[c] / count[c]);
    let std = std::array::from_fn(|c| (sq[c] / count[c] - mean[c] * mean[c]).sqrt());
    (mean, std)
}

#[test]
fn subset_dir_is_the_variable_or_the_folder_beside_the_workspace() {
    let Some(dir) = subset_dir() else { return };
    let want = match std::env::var_os(DATA_VAR).filter(|d| !d.is_empty()) {
        Some(d) => d.into(),
        None => default_subset_dir(),
    };
    assert_eq!(dir, want);
    assert!(dir.join("manifest.csv").is_file(), "{}", dir.display());
}

#[test]
fn folder_counts_classes_and_names() {
    let Some(dir) = subset_dir() else { return };
    let files = Cifar10Files::scan(&dir).unwrap();
    assert_eq!(files.train.len(), 1);
    assert_eq!(files.train_records(), 10_000);
    assert_eq!(files.test_records(), 2_000);
    assert!(files.meta.is_some());

    let data = Cifar10::open(&dir).unwrap();
    assert_eq!(data.train().len(), 10_000);
    assert_eq!(data.test().len(), 2_000);
    assert_eq!(data.train().pixels.len(), 10_000 * 3072);
    assert_eq!(data.test().pixels.len(), 2_000 * 3072);
    assert_eq!(data.class_names(), CLASS_NAMES);
    for (batch, per_class) in [(data.train(), 1000), (data.test(), 200)] {
        let mut counts = [0usize; 10];
        for &l in &batch.labels {
            counts[usize::from(l)] += 1;
        }
        assert_eq!(counts, [per_class; 10]);
    }

    // Labels agree with manifest.csv, record by record.
    let rows = manifest(&dir);
    assert_eq!(rows.len(), 12_000);
    for (split, record, label, class) in rows {
        let batch = match split.as_str() {
            "train" => data.train(),
            "test" => data.test(),
            other => panic!("unknown split {other}"),
        };
        assert_eq!(batch.labels[record], label, "{split} record {record}");
        assert_eq!(data.class_names()[usize::from(label)], class);
    }

    // Pixel statistics agree with stats.json (rounded to 3 decimals there).
    let want = [
        (
            data.train(),
            [125.818, 123.194, 113.997],
            [62.739, 62.234, 66.7],
        ),
        (
            data.test(),
            [126.766, 124.458, 116.008],
            [62.493, 61.631, 66.602],
        ),
    ];
    for (batch, want_mean, want_std) in want {
        let (mean, std) = channel_stats(&batch.pixels);
        for c in 0..3 {
            assert!((mean[c] - want_mean[c]).abs() < 1e-3, "{mean:?}");
            assert!((std[c] - want_std[c]).abs() < 1e-3, "{std:?}");
        }
    }
}

#[test]
fn single_file_and_normalization() {
    let Some(dir) = subset_dir() else { return };
    let test = read_batch_file(dir.join("test_batch.bin")).unwrap();
    assert_eq!(test.len(), 2_000);
    assert_eq!(test.labels_usize().len(), 2_000);
    let x64 = normalize_f64(&test);
    let x32 = normalize_f32(&test);
    assert_eq!(x64.len(), 2_000 * 3 * 32 * 32);
    for (i, (&a, &b)) in x64.iter().zip(&x32).enumerate() {
        let c = (i / 1024) % 3;
        let want = ((test.pixels[i] as f64) / 255.0 - MEAN[c]) / STD[c];
        assert_eq!(a.to_bits(), want.to_bits(), "value {i}");
        assert_eq!(b.to_bits(), (want as f32).to_bits(), "value {i}");
    }
    // Normalized per-channel statistics: close to zero mean and unit deviation.
    let (mean, std) = channel_stats(&test.pixels);
    for c in 0..3 {
        let n: Vec<f64> = x64
            .chunks(1024)
            .enumerate()
            .filter(|(p, _)| p % 3 == c)
            .flat_map(|(_, v)| v.iter().copied())
            .collect();
        let m = n.iter().sum::<f64>() / n.len() as f64;
        assert!((m - (mean[c] / 255.0 - MEAN[c]) / STD[c]).abs() < 1e-9);
        assert!(m.abs() < 0.1, "channel {c} mean {m}");
        let s = (n.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / n.len() as f64).sqrt();
        assert!((s - std[c] / 255.0 / STD[c]).abs() < 1e-9);
        assert!((s - 1.0).abs() < 0.1, "channel {c} std {s}");
    }
}

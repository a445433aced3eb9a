//! The subset, augmentation and loader pipeline on the real CIFAR-10 subset, found by
//! `flatmin_datasets::test_data::subset_dir` (`$FLATMIN_TEST_DATA`, else
//! `../shared/data/cifar10-subset` beside the workspace). Without it each test says
//! `SKIPPED` on stderr and passes, unless `FLATMIN_REQUIRE_TEST_DATA=1`.

use flatmin_datasets::test_data::subset_dir;
use flatmin_datasets::{
    balanced_indices, balanced_subset, Augment, Batch, Cifar10, Loader, MiniBatch, CLASSES,
    IMAGE_BYTES,
};
use std::sync::Arc;

/// The subset, or `None` when the test is skipped.
fn data() -> Option<Cifar10> {
    let dir = subset_dir()?;
    Some(Cifar10::open(&dir).unwrap_or_else(|e| panic!("reading the CIFAR-10 subset: {e}")))
}

fn class_counts(b: &Batch) -> [usize; CLASSES] {
    let mut n = [0; CLASSES];
    b.labels.iter().for_each(|&l| n[usize::from(l)] += 1);
    n
}

/// Per-channel mean and standard deviation of normalized NCHW values.
fn channel_stats(batches: &[MiniBatch<f32>]) -> ([f64; 3], [f64; 3]) {
    let (mut sum, mut sq, mut n) = ([0f64; 3], [0f64; 3], [0f64; 3]);
    for b in batches {
        for (plane, values) in b.x.chunks_exact(1024).enumerate() {
            let c = plane % 3;
            for &v in values {
                sum[c] += f64::from(v);
                sq[c] += f64::from(v) * f64::from(v);
                n[c] += 1.0;
            }
        }
    }
    let mean: [f64; 3] = std::array::from_fn(|c| sum[c] / n[c]);
    let std = std::array::from_fn(|c| (sq[c] / n[c] - mean[c] * mean[c]).sqrt());
    (mean, std)
}

#[test]
fn balanced_subset_of_real_data() {
    let Some(data) = data() else { return };
    let train = data.train();
    let sub = balanced_subset(train, 1000, 17).unwrap();
    assert_eq!(sub.len(), 1000);
    assert_eq!(class_counts(&sub), [100; CLASSES]);
    assert_eq!(sub, balanced_subset(train, 1000, 17).unwrap(), "same seed");
    assert_ne!(sub, balanced_subset(train, 1000, 18).unwrap(), "other seed");
    // Whole records, in the original order.
    let idx = balanced_indices(train, 1000, 17).unwrap();
    assert!(idx.windows(2).all(|w| w[0] < w[1]));
    for (k, &i) in idx.iter().enumerate() {
        assert_eq!(sub.labels[k], train.labels[i]);
        assert_eq!(sub.image(k), train.image(i));
    }
    // Nested in a larger subset with the same seed; remainder to the low classes.
    let larger = balanced_indices(train, 2005, 17).unwrap();
    assert!(idx.iter().all(|i| larger.binary_search(i).is_ok()));
    let odd = balanced_subset(train, 2005, 17).unwrap();
    assert_eq!(
        class_counts(&odd),
        [201, 201, 201, 201, 201, 200, 200, 200, 200, 200]
    );
    // The test split holds 200 per class: 2000 is all of it, 2001 is an error.
    let test = data.test();
    assert_eq!(&balanced_subset(test, 2000, 1).unwrap(), test);
    let err = balanced_subset(test, 2001, 1).unwrap_err();
    assert!(err.to_string().contains("2001"), "{err}");
    // A class with too few records is an error naming it, not a panic.
    let mut lopsided = train.clone();
    lopsided
        .labels
        .iter_mut()
        .filter(|l| **l == 9)
        .for_each(|l| *l = 0);
    let err = balanced_subset(&lopsided, 1000, 1).unwrap_err();
    assert!(err.to_string().contains("class 9 has 0 records"), "{err}");
}

#[test]
fn loader_over_real_subset_is_normalized() {
    let Some(data) = data() else { return };
    let sub = Arc::new(balanced_subset(data.train(), 1000, 3).unwrap());
    let loader = Loader::new(sub.clone(), 128, true, false, Augment::none(), 5).unwrap();
    assert_eq!(loader.batches_per_epoch(), 8);
    let batches: Vec<MiniBatch<f32>> = loader.epoch(0).collect();
    assert_eq!(batches.len(), 8);
    assert_eq!(batches[7].len(), 1000 - 7 * 128);
    let mut seen = vec![false; 1000];
    for b in &batches {
        assert_eq!(b.x.len(), b.len() * IMAGE_BYTES);
        for (&r, &l) in b.records.iter().zip(&b.labels) {
            assert!(!seen[r]);
            seen[r] = true;
            assert_eq!(usize::from(sub.labels[r]), l);
        }
    }
    assert!(seen.iter().all(|&s| s));
    let (mean, std) = channel_stats(&batches);
    eprintln!("no augmentation: mean {mean:.3?}, std {std:.3?}");
    for c in 0..3 {
        assert!(mean[c].abs() < 0.1, "channel {c} mean {}", mean[c]);
        assert!((std[c] - 1.0).abs() < 0.1, "channel {c} std {}", std[c]);
    }
    // With the standard augmentation, the black padding (-mean/std, about -2 after
    // normalization) pulls the mean down a little and widens the spread; still roughly
    // standardized.
    let aug = Loader::new(sub, 100, true, true, Augment::standard(), 5).unwrap();
    let batches: Vec<MiniBatch<f32>> = aug.epoch(0).collect();
    assert_eq!(batches.len(), 10);
    let (mean, std) = channel_stats(&batches);
    eprintln!("standard augmentation: mean {mean:.3?}, std {std:.3?}");
    for c in 0..3 {
        assert!(
            (-0.5..0.0).contains(&mean[c]),
            "channel {c} mean {}",
            mean[c]
        );
        assert!((0.95..1.3).contains(&std[c]), "channel {c} std {}", std[c]);
    }
    // Resuming the augmented epoch mid-way gives the same batches.
    let resumed: Vec<MiniBatch<f32>> = aug.epoch_from(0, 6).collect();
    assert_eq!(&batches[6..], &resumed[..]);
}

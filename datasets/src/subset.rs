//! Class-balanced, deterministic subsets of a [`Batch`].
//!
//! [`balanced_subset`] takes `size / 10` records of every class (the remainder one more each
//! for the lowest class ids), chosen by a seeded shuffle of each class's records, and keeps
//! the original record order. For a fixed seed the subsets are nested: the records chosen
//! for size `n` are among those chosen for any larger size (each class's shuffle does not
//! depend on `size`, and the per-class counts grow with `size`).

use crate::cifar10::{Batch, CLASSES, IMAGE_BYTES};
use crate::seed::{derived_rng, tag};
use rand::seq::SliceRandom;
use thiserror::Error;

/// Why a subset (or a loader) cannot be built from a batch.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum SubsetError {
    /// The requested size is zero.
    #[error("subset size must be at least 1")]
    ZeroSize,
    /// The requested size exceeds the number of records available.
    #[error("subset size {size} is larger than the {available} records available")]
    TooLarge {
        /// The requested size.
        size: usize,
        /// Records in the batch.
        available: usize,
    },
    /// One class has fewer records than its share of the subset.
    #[error(
        "class {class} has {available} records, but a balanced subset of {size} needs {needed} \
         of it"
    )]
    ClassTooSmall {
        /// The class id.
        class: usize,
        /// Records the subset needs of that class.
        needed: usize,
        /// Records of that class in the batch.
        available: usize,
        /// The requested subset size.
        size: usize,
    },
    /// The batch is inconsistent (hand-built): pixel bytes not `len() * 3072`, or a label
    /// above 9.
    #[error("malformed batch: {0}")]
    Malformed(String),
}

/// Checks that `batch` has `len() * 3072` pixel bytes and labels 0..=9.
pub(crate) fn check_batch(batch: &Batch) -> Result<(), SubsetError> {
    if batch.pixels.len() != batch.labels.len() * IMAGE_BYTES {
        return Err(SubsetError::Malformed(format!(
            "{} pixel bytes for {} labels (expected {} bytes)",
            batch.pixels.len(),
            batch.labels.len(),
            batch.labels.len() * IMAGE_BYTES
        )));
    }
    if let Some((i, &l)) = batch
        .labels
        .iter()
        .enumerate()
        .find(|(_, &l)| usize::from(l) >= CLASSES)
    {
        return Err(SubsetError::Malformed(format!(
            "record {i} has label {l}, expected 0..=9"
        )));
    }
    Ok(())
}

/// Records per class of a balanced subset of `size`: `size / 10` each, plus one for each of
/// the `size % 10` lowest class ids.
pub fn class_counts(size: usize) -> [usize; CLASSES] {
    std::array::from_fn(|c| size / CLASSES + usize::from(c < size % CLASSES))
}

/// The record indices (ascending) of the balanced subset that [`balanced_subset`] returns.
///
/// For each class `c`, the indices of its records are shuffled with a `StdRng` seeded from
/// `(seed, c)` and the first `class_counts(size)[c]` are kept.
///
/// Errors: `size` zero or larger than the batch, a class with too few records, or a
/// malformed batch.
pub fn balanced_indices(batch: &Batch, size: usize, seed: u64) -> Result<Vec<usize>, SubsetError> {
    check_batch(batch)?;
    if size == 0 {
        return Err(SubsetError::ZeroSize);
    }
    if size > batch.len() {
        return Err(SubsetError::TooLarge {
            size,
            available: batch.len(),
        });
    }
    let mut by_class: [Vec<usize>; CLASSES] = Default::default();
    for (i, &l) in batch.labels.iter().enumerate() {
        by_class[usize::from(l)].push(i);
    }
    let counts = class_counts(size);
    let mut chosen = Vec::with_capacity(size);
    for (class, (mut records, needed)) in by_class.into_iter().zip(counts).enumerate() {
        if records.len() < needed {
            return Err(SubsetError::ClassTooSmall {
                class,
                needed,
                available: records.len(),
                size,
            });
        }
        records.shuffle(&mut derived_rng(seed, &[tag::SUBSET, class as u64]));
        chosen.extend_from_slice(&records[..needed]);
    }
    chosen.sort_unstable();
    Ok(chosen)
}

/// The records of `batch` at `indices`, in that order.
///
/// # Panics
/// If an index is out of range.
pub fn select(batch: &Batch, indices: &[usize]) -> Batch {
    let mut out = Batch {
        labels: Vec::with_capacity(indices.len()),
        pixels: Vec::with_capacity(indices.len() * IMAGE_BYTES),
    };
    for &i in indices {
        out.labels.push(batch.labels[i]);
        out.pixels.extend_from_slice(batch.image(i));
    }
    out
}

/// A class-balanced subset of `size` records of `batch`, the same for the same `seed`, in
/// the original record order. See [`balanced_indices`] for the choice and the errors.
pub fn balanced_subset(batch: &Batch, size: usize, seed: u64) -> Result<Batch, SubsetError> {
    let indices = balanced_indices(batch, size, seed)?;
    Ok(select(batch, &indices))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch whose image `i` is filled with `i % 251` and whose labels are `labels`.
    fn synthetic(labels: &[u8]) -> Batch {
        Batch {
            labels: labels.to_vec(),
            pixels: (0..labels.len())
                .flat_map(|i| [(i % 251) as u8; IMAGE_BYTES])
                .collect(),
        }
    }

    /// 20 records of every class, interleaved pseudo-randomly.
    fn twenty_each() -> Batch {
        let labels: Vec<u8> = (0..200).map(|i| ((i * 7 + i / 10) % 10) as u8).collect();
        for c in 0..10 {
            assert_eq!(labels.iter().filter(|&&l| l == c).count(), 20);
        }
        synthetic(&labels)
    }

    #[test]
    fn counts_spread_remainder_to_low_classes() {
        assert_eq!(class_counts(10), [1; 10]);
        assert_eq!(class_counts(23), [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]);
        assert_eq!(class_counts(7), [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]);
    }

    #[test]
    fn balanced_deterministic_and_ordered() {
        let b = twenty_each();
        for size in [1, 10, 57, 100, 200] {
            let idx = balanced_indices(&b, size, 42).unwrap();
            assert_eq!(idx.len(), size);
            assert!(idx.windows(2).all(|w| w[0] < w[1]), "ascending, no repeats");
            let sub = balanced_subset(&b, size, 42).unwrap();
            assert_eq!(sub, select(&b, &idx));
            assert_eq!(sub.pixels.len(), size * IMAGE_BYTES);
            for (c, &want) in class_counts(size).iter().enumerate() {
                let n = sub.labels.iter().filter(|&&l| usize::from(l) == c).count();
                assert_eq!(n, want, "size {size} class {c}");
            }
            // Records are carried whole: image i is filled with i % 251.
            for (k, &i) in idx.iter().enumerate() {
                assert_eq!(sub.labels[k], b.labels[i]);
                assert!(sub.image(k).iter().all(|&p| p == (i % 251) as u8));
            }
            assert_eq!(sub, balanced_subset(&b, size, 42).unwrap(), "same seed");
        }
        let a = balanced_indices(&b, 50, 1).unwrap();
        let c = balanced_indices(&b, 50, 2).unwrap();
        assert_ne!(a, c, "another seed chooses other records");
        // The whole batch is the identity, whatever the seed.
        assert_eq!(balanced_subset(&b, 200, 9).unwrap(), b);
    }

    #[test]
    fn subsets_are_nested() {
        let b = twenty_each();
        let small = balanced_indices(&b, 30, 5).unwrap();
        let large = balanced_indices(&b, 120, 5).unwrap();
        assert!(small.iter().all(|i| large.contains(i)));
    }

    #[test]
    fn errors_not_panics() {
        let b = twenty_each();
        assert_eq!(balanced_subset(&b, 0, 0), Err(SubsetError::ZeroSize));
        assert_eq!(
            balanced_subset(&b, 201, 0),
            Err(SubsetError::TooLarge {
                size: 201,
                available: 200
            })
        );
        // Class 3 has only two records; a subset of 30 needs three of each class.
        let mut labels: Vec<u8> = (0..100).map(|i| (i % 10) as u8).collect();
        for l in labels.iter_mut().filter(|l| **l == 3).skip(2) {
            *l = 4;
        }
        let skewed = synthetic(&labels);
        let err = balanced_subset(&skewed, 30, 0).unwrap_err();
        assert_eq!(
            err,
            SubsetError::ClassTooSmall {
                class: 3,
                needed: 3,
                available: 2,
                size: 30
            }
        );
        assert!(err.to_string().contains("class 3 has 2 records"), "{err}");
        assert_eq!(balanced_subset(&skewed, 20, 0).unwrap().len(), 20);
        let mut bad = synthetic(&[0, 1]);
        bad.pixels.pop();
        assert!(matches!(
            balanced_subset(&bad, 1, 0),
            Err(SubsetError::Malformed(_))
        ));
        let bad = synthetic(&[0, 10]);
        let err = balanced_subset(&bad, 1, 0).unwrap_err();
        assert!(err.to_string().contains("record 1 has label 10"), "{err}");
        assert_eq!(
            balanced_subset(&Batch::default(), 1, 0),
            Err(SubsetError::TooLarge {
                size: 1,
                available: 0
            })
        );
    }
}

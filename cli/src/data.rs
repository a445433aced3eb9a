//! Where training data comes from: `--data auto|synthetic|PATH`.

use anyhow::{bail, Context, Result};
use flatmin_datasets::{balanced_subset, synthetic, Batch, Cifar10};
use std::path::{Path, PathBuf};

/// Name of the folder of the official binary release.
pub const RELEASE_DIR: &str = "cifar-10-batches-bin";

/// Training and test images and where they came from.
pub struct DataSource {
    /// Training images.
    pub train: Batch,
    /// Test images.
    pub test: Batch,
    /// Human-readable origin (a folder, or `synthetic`).
    pub origin: String,
    /// True when the built-in synthetic data stands in for CIFAR-10.
    pub synthetic: bool,
}

/// The per-user cache folder for downloaded data (`$XDG_CACHE_HOME/flatmin` or
/// `~/.cache/flatmin`).
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("flatmin"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("flatmin"))
}

/// The folders `--data auto` looks in, in order: `$FLATMIN_DATA`, `./data/cifar-10-batches-bin`,
/// then the cache folder.
pub fn auto_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os("FLATMIN_DATA").filter(|d| !d.is_empty()) {
        v.push(PathBuf::from(d));
    }
    v.push(Path::new("data").join(RELEASE_DIR));
    if let Some(c) = cache_dir() {
        v.push(c.join(RELEASE_DIR));
    }
    v
}

/// Size of the synthetic stand-in when no size is requested.
const SYNTHETIC_TRAIN: usize = 10_000;
const SYNTHETIC_TEST: usize = 2_000;

/// Resolves `--data`: `auto` (first folder of [`auto_candidates`] that holds CIFAR-10, else
/// synthetic data), `synthetic`, or a folder of the official binary release.
pub fn resolve(spec: &str, seed: u64) -> Result<DataSource> {
    match spec {
        "synthetic" => Ok(synthetic_source(seed)),
        "auto" => {
            for dir in auto_candidates() {
                if dir.is_dir() {
                    return open(&dir);
                }
            }
            Ok(synthetic_source(seed))
        }
        path => {
            let dir = Path::new(path);
            if !dir.is_dir() {
                bail!("{path}: not a folder (expected the official cifar-10-batches-bin layout, 'auto' or 'synthetic')");
            }
            open(dir)
        }
    }
}

fn open(dir: &Path) -> Result<DataSource> {
    let data = Cifar10::open(dir).with_context(|| format!("--data {}", dir.display()))?;
    let (train, test) = data.into_batches();
    if train.is_empty() {
        bail!(
            "--data {}: no training batch file (data_batch_N.bin) found",
            dir.display()
        );
    }
    if test.is_empty() {
        bail!("--data {}: no test_batch.bin found", dir.display());
    }
    Ok(DataSource {
        train,
        test,
        origin: dir.display().to_string(),
        synthetic: false,
    })
}

fn synthetic_source(seed: u64) -> DataSource {
    let (train, test) = synthetic(SYNTHETIC_TRAIN, SYNTHETIC_TEST, seed);
    DataSource {
        train,
        test,
        origin: "synthetic".into(),
        synthetic: true,
    }
}

/// The seeded class-balanced subset of `size` images of `batch` (0, or exactly all of them:
/// the whole batch). Errors name the size flag `flag` and where the images came from,
/// `source` (e.g. `--split test`).
pub fn sized_subset(
    batch: Batch,
    size: usize,
    seed: u64,
    flag: &str,
    source: &str,
) -> Result<Batch> {
    if batch.is_empty() {
        bail!("{source}: no images");
    }
    if size == 0 || size == batch.len() {
        return Ok(batch);
    }
    if size > batch.len() {
        bail!(
            "{flag} {size} exceeds the {} images available ({source})",
            batch.len()
        );
    }
    balanced_subset(&batch, size, seed).with_context(|| format!("{flag} {size}"))
}

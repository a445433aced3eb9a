//! Where training data comes from: `--data auto|synthetic|PATH`.

use anyhow::{bail, Context, Result};
use flatmin_datasets::{balanced_subset, synthetic, Batch, Cifar10, TEST_FILE, TRAIN_FILES};
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

/// The folders `--data auto` looks in, in order (for messages): `$FLATMIN_DATA` (when set and
/// not empty), `./data/cifar-10-batches-bin`, then the cache folder. See [`auto_release`]
/// for how each is used.
pub fn auto_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    v.extend(env_data());
    v.push(Path::new("data").join(RELEASE_DIR));
    if let Some(c) = cache_dir() {
        v.push(c.join(RELEASE_DIR));
    }
    v
}

/// `$FLATMIN_DATA`, when set and not empty.
fn env_data() -> Option<PathBuf> {
    std::env::var_os("FLATMIN_DATA")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// True when `dir` holds at least one CIFAR-10 batch file (`data_batch_N.bin`,
/// `test_batch.bin`).
fn holds_batches(dir: &Path) -> bool {
    TRAIN_FILES
        .iter()
        .chain(&[TEST_FILE])
        .any(|f| dir.join(f).exists())
}

/// The release folder that `dir` names: `dir` itself when it holds batch files, else its
/// `cifar-10-batches-bin` subfolder when that holds them (the parent form, torchvision's
/// `root`), else `None`.
pub fn release_in(dir: &Path) -> Option<PathBuf> {
    if holds_batches(dir) {
        return Some(dir.to_path_buf());
    }
    let inner = dir.join(RELEASE_DIR);
    holds_batches(&inner).then_some(inner)
}

/// A release folder to read, and how the user named it (the start of error messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// The folder holding the batch files.
    pub dir: PathBuf,
    /// `--data DIR`, `FLATMIN_DATA=DIR`, or `DIR (found by --data auto)`, with the release
    /// folder in parentheses when it is the `cifar-10-batches-bin` inside the named one.
    pub label: String,
}

impl Located {
    /// `named` as given by `how` (such as `--data` or `FLATMIN_DATA=`), read from `dir`.
    fn new(how: &str, named: &Path, dir: PathBuf) -> Self {
        let label = if dir == named {
            format!("{how}{}", named.display())
        } else {
            format!("{how}{} ({})", named.display(), dir.display())
        };
        Located { dir, label }
    }
}

/// The folder `--data auto` reads, or `None` when it falls back to synthetic data.
///
/// A set, non-empty `$FLATMIN_DATA` must name the `cifar-10-batches-bin` folder or its
/// parent; if it holds no batch files either way, that is an error naming `FLATMIN_DATA` and
/// the path (no fallback). Otherwise the first existing folder of
/// `./data/cifar-10-batches-bin` and the cache folder is used.
pub fn auto_release() -> Result<Option<Located>> {
    if let Some(named) = env_data() {
        let shown = named.display();
        if !named.is_dir() {
            let what = if named.exists() {
                "not a folder"
            } else {
                "no such folder"
            };
            bail!(
                "FLATMIN_DATA={shown}: {what} (set it to a cifar-10-batches-bin folder \
                 or its parent, e.g. one installed by `flatmin data fetch cifar10 --dir DIR`, \
                 or unset it)"
            );
        }
        let Some(dir) = release_in(&named) else {
            bail!(
                "FLATMIN_DATA={shown}: no CIFAR-10 batch files (data_batch_N.bin, \
                 test_batch.bin) in it or in its {RELEASE_DIR} folder (install them with \
                 `flatmin data fetch cifar10 --dir {shown}/{RELEASE_DIR}`, or unset it)"
            );
        };
        return Ok(Some(Located::new("FLATMIN_DATA=", &named, dir)));
    }
    Ok(auto_candidates()
        .into_iter()
        .find(|d| d.is_dir())
        .map(|dir| Located {
            label: format!("{} (found by --data auto)", dir.display()),
            dir,
        }))
}

/// Size of the synthetic stand-in when no size is requested.
const SYNTHETIC_TRAIN: usize = 10_000;
const SYNTHETIC_TEST: usize = 2_000;

/// Resolves `--data`: `auto` (see [`auto_release`]; synthetic data when it finds nothing),
/// `synthetic`, or a folder of the official binary release or its parent. Errors start with
/// the flag or the variable that named the folder.
pub fn resolve(spec: &str, seed: u64) -> Result<DataSource> {
    match spec {
        "synthetic" => Ok(synthetic_source(seed)),
        "auto" => match auto_release()? {
            Some(found) => open(&found),
            None => Ok(synthetic_source(seed)),
        },
        path => {
            let named = Path::new(path);
            if !named.is_dir() {
                bail!(
                    "--data {path}: not a folder (expected a {RELEASE_DIR} folder or its \
                     parent, 'auto' or 'synthetic')"
                );
            }
            let dir = release_in(named).unwrap_or_else(|| named.to_path_buf());
            open(&Located::new("--data ", named, dir))
        }
    }
}

fn open(found: &Located) -> Result<DataSource> {
    let (dir, label) = (&found.dir, &found.label);
    let data = Cifar10::open(dir).with_context(|| label.clone())?;
    let (train, test) = data.into_batches();
    if train.is_empty() {
        bail!("{label}: no training batch file (data_batch_N.bin) found");
    }
    if test.is_empty() {
        bail!("{label}: no test_batch.bin found");
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

/// Warns on stderr when `spec` (`auto` or unset) fell back to the built-in synthetic data
/// because no CIFAR-10 was found, naming where it looked and what `doing` on it means
/// (e.g. "measuring").
pub fn warn_if_synthetic_fallback(spec: &str, data: &DataSource, doing: &str) {
    if data.synthetic && spec != "synthetic" {
        let looked: Vec<String> = auto_candidates()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        eprintln!(
            "warning: no CIFAR-10 found (looked in {}); {doing} on the built-in SYNTHETIC dataset",
            looked.join(", ")
        );
    }
}

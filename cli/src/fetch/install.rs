//! Validating a release folder, and installing a release atomically: extract into a
//! temporary sibling of the destination, validate, rename into place.
//!
//! Temporary names are hidden siblings of the destination (`.NAME.partial-PID-N`,
//! `.NAME.download-PID-N`, `.NAME.old-PID-N`), so that the final rename never crosses file
//! systems; every one is removed when the operation ends, successful or not.

use super::{extract_release, release_files, ReleaseSpec, README_FILE};
use anyhow::{anyhow, bail, Context, Result};
use flatmin_datasets::{Cifar10, META_FILE};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Image counts of a validated release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReleaseInfo {
    /// Training images (all five batches).
    pub train: usize,
    /// Test images.
    pub test: usize,
}

/// Checks that `dir` holds exactly a release as `spec` describes: the six batch files of
/// `spec.batch_bytes` bytes each and `batches.meta.txt`, all regular files, nothing else
/// except an optional `readme.html`; and that [`Cifar10::open`] reads it (labels in range,
/// ten class names).
pub fn validate_release(dir: &Path, spec: &ReleaseSpec) -> Result<ReleaseInfo> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("{}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let known = release_files().contains(&name.as_ref());
        if !known && name != README_FILE {
            bail!(
                "{}: unexpected file in a CIFAR-10 release folder",
                path.display()
            );
        }
        let meta =
            std::fs::symlink_metadata(&path).with_context(|| format!("{}", path.display()))?;
        if !meta.is_file() {
            bail!("{}: not a regular file", path.display());
        }
        if known && name != META_FILE && meta.len() != spec.batch_bytes {
            bail!(
                "{}: {} bytes, expected {} ({} records)",
                path.display(),
                meta.len(),
                spec.batch_bytes,
                spec.records_per_batch()
            );
        }
    }
    for name in release_files() {
        let path = dir.join(name);
        if std::fs::symlink_metadata(&path).is_err() {
            bail!("{}: missing", path.display());
        }
    }
    let data = Cifar10::open(dir)?;
    Ok(ReleaseInfo {
        train: data.train().len(),
        test: data.test().len(),
    })
}

/// The folder that holds `path` (`.` for a bare name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The stem of a temporary sibling of `dest` for `purpose`: `.NAME.PURPOSE`.
pub fn temp_stem(dest: &Path, purpose: &str) -> String {
    let name = dest
        .file_name()
        .map_or_else(|| "release".into(), |n| n.to_string_lossy().into_owned());
    format!(".{name}.{purpose}")
}

/// Errors unless `dest` ends in a name that a folder can be renamed to (not `/`, `.` or
/// `..`).
pub fn check_dest(dest: &Path) -> Result<()> {
    if dest.file_name().is_none() {
        bail!(
            "{}: not a folder name to install into (give the folder to create, such as \
             data/cifar-10-batches-bin)",
            dest.display()
        );
    }
    Ok(())
}

/// True when something other than an empty folder is at `path` (a link counts, whatever it
/// points to).
pub fn occupied(path: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(anyhow!("{}: {e}", path.display())),
        Ok(m) if m.is_dir() => {
            let mut entries =
                std::fs::read_dir(path).with_context(|| format!("{}", path.display()))?;
            Ok(entries.next().is_some())
        }
        Ok(_) => Ok(true),
    }
}

/// A temporary file or folder, removed (with its contents) when dropped unless kept.
pub struct TempPath {
    path: PathBuf,
    armed: bool,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl TempPath {
    fn candidates<'a>(parent: &'a Path, stem: &str) -> impl Iterator<Item = PathBuf> + 'a {
        let pid = std::process::id();
        let stem = stem.to_string();
        (0..100).map(move |_| {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            parent.join(format!("{stem}-{pid}-{n}"))
        })
    }

    /// Creates a new, empty folder `PARENT/STEM-PID-N`.
    pub fn create_dir(parent: &Path, stem: &str) -> Result<TempPath> {
        let mut last = None;
        for path in Self::candidates(parent, stem) {
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(TempPath { path, armed: true }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(path),
                Err(e) => {
                    return Err(anyhow!(
                        "cannot create a temporary folder {}: {e}",
                        path.display()
                    ))
                }
            }
        }
        bail!(
            "cannot create a temporary folder: {} and others exist",
            last.unwrap_or_default().display()
        )
    }

    /// Creates a new, empty file `PARENT/STEM-PID-N` and opens it for writing.
    pub fn create_file(parent: &Path, stem: &str) -> Result<(TempPath, std::fs::File)> {
        let mut last = None;
        for path in Self::candidates(parent, stem) {
            match std::fs::File::options()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => return Ok((TempPath { path, armed: true }, f)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(path),
                Err(e) => {
                    return Err(anyhow!(
                        "cannot create a temporary file {}: {e}",
                        path.display()
                    ))
                }
            }
        }
        bail!(
            "cannot create a temporary file: {} and others exist",
            last.unwrap_or_default().display()
        )
    }

    /// A fresh name `PARENT/STEM-PID-N` that nothing uses yet (nothing is created).
    fn unused(parent: &Path, stem: &str) -> Result<PathBuf> {
        Self::candidates(parent, stem)
            .find(|p| std::fs::symlink_metadata(p).is_err())
            .ok_or_else(|| {
                anyhow!(
                    "cannot find an unused temporary name in {}",
                    parent.display()
                )
            })
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the path: it is not removed on drop.
    pub fn keep(mut self) -> PathBuf {
        self.armed = false;
        std::mem::take(&mut self.path)
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Best effort: a failure here cannot be reported any better than by the error that
        // is usually being returned already.
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.is_dir() => {
                let _ = std::fs::remove_dir_all(&self.path);
            }
            Ok(_) => {
                let _ = std::fs::remove_file(&self.path);
            }
            Err(_) => {}
        }
    }
}

/// Flushes a folder's entries to disk where the platform allows it (ignored elsewhere).
fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Installs the release held by the `.tar.gz` file `archive` into `dest`; see
/// [`install_from`]. Archive errors name the file.
pub fn install_archive(
    archive: &Path,
    dest: &Path,
    spec: &ReleaseSpec,
    replace: bool,
) -> Result<ReleaseInfo> {
    let file = std::fs::File::open(archive).with_context(|| format!("{}", archive.display()))?;
    install_from(
        std::io::BufReader::new(file),
        &archive.display().to_string(),
        dest,
        spec,
        replace,
    )
}

/// Installs the release held by a `.tar.gz` stream into the folder `dest`, atomically.
///
/// The archive is extracted with [`extract_release`] into a new temporary sibling of
/// `dest`, which is validated with [`validate_release`] and then renamed to `dest`. `dest`
/// may be absent or an empty folder; anything else is replaced only when `replace` is set
/// (the old one is moved aside, the new one renamed into place, the old one removed; if the
/// second rename fails the old one is put back). `source` names the archive in errors (a
/// file or a URL). On error `dest` is unchanged and no temporary is left.
pub fn install_from(
    archive: impl Read,
    source: &str,
    dest: &Path,
    spec: &ReleaseSpec,
    replace: bool,
) -> Result<ReleaseInfo> {
    spec.check()?;
    check_dest(dest)?;
    if !replace && occupied(dest)? {
        bail!(
            "{} already exists; not replacing it (use --force)",
            dest.display()
        );
    }
    let parent = parent_of(dest);
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create the folder {}", parent.display()))?;
    let tmp = TempPath::create_dir(&parent, &temp_stem(dest, "partial"))?;
    extract_release(archive, tmp.path(), spec).with_context(|| source.to_string())?;
    let info = validate_release(tmp.path(), spec)
        .with_context(|| format!("{source}: the extracted files are not a valid release"))?;
    sync_dir(tmp.path());
    put_in_place(tmp, dest, replace)?;
    sync_dir(&parent);
    Ok(info)
}

/// Renames the folder `tmp` to `dest` (see [`install_from`] for what may be at `dest`).
fn put_in_place(tmp: TempPath, dest: &Path, replace: bool) -> Result<()> {
    let rename_err = |e: std::io::Error| {
        anyhow!(
            "cannot move {} into place as {}: {e}",
            tmp.path().display(),
            dest.display()
        )
    };
    if !occupied(dest)? {
        if std::fs::symlink_metadata(dest).is_ok() {
            // An empty folder: replaced by the new one.
            std::fs::remove_dir(dest).with_context(|| format!("{}", dest.display()))?;
        }
        std::fs::rename(tmp.path(), dest).map_err(rename_err)?;
        tmp.keep();
        return Ok(());
    }
    if !replace {
        bail!(
            "{} already exists; not replacing it (use --force)",
            dest.display()
        );
    }
    let parent = parent_of(dest);
    let old = TempPath::unused(&parent, &temp_stem(dest, "old"))?;
    std::fs::rename(dest, &old).with_context(|| {
        format!(
            "cannot move the existing {} aside to {}",
            dest.display(),
            old.display()
        )
    })?;
    let mut old = TempPath {
        path: old,
        armed: false,
    };
    if let Err(e) = std::fs::rename(tmp.path(), dest) {
        let err = rename_err(e);
        return match std::fs::rename(old.path(), dest) {
            Ok(()) => Err(err),
            Err(back) => Err(err.context(format!(
                "and the previous contents could not be put back: they are in {} ({back})",
                old.path().display()
            ))),
        };
    }
    tmp.keep();
    // The new release is in place; the old copy is removed when `old` is dropped.
    old.armed = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_paths_are_removed_unless_kept() {
        let base = std::env::temp_dir().join(format!("flatmin-temp-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let d = TempPath::create_dir(&base, ".x.partial").unwrap();
        std::fs::write(d.path().join("f"), b"1").unwrap();
        let dp = d.path().to_path_buf();
        assert!(dp
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".x.partial-"));
        drop(d);
        assert!(!dp.exists());
        let (f, _file) = TempPath::create_file(&base, ".x.download").unwrap();
        let fp = f.keep();
        assert!(fp.is_file());
        assert!(occupied(&base).unwrap());
        std::fs::remove_file(&fp).unwrap();
        assert!(!occupied(&base).unwrap());
        assert!(!occupied(&base.join("absent")).unwrap());
        std::fs::remove_dir(&base).unwrap();
        assert_eq!(parent_of(Path::new("x")), PathBuf::from("."));
        assert_eq!(temp_stem(Path::new("a/b"), "old"), ".b.old");
        for bad in ["/", ".", "..", "a/.."] {
            let err = check_dest(Path::new(bad)).unwrap_err().to_string();
            assert!(err.starts_with(bad), "{err}");
        }
        check_dest(Path::new("data/cifar-10-batches-bin")).unwrap();
    }
}

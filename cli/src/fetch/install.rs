//! Validating a release folder, and installing a release atomically: extract into a
//! temporary sibling of the destination, validate, rename into place (the whole folder when
//! the destination is absent or empty; with `--force`, only the release files, leaving the
//! destination's other files alone).
//!
//! Temporary names are hidden siblings of the destination (`.NAME.partial-PID-N`,
//! `.NAME.download-PID-N`, `.NAME.old-PID-N`), so that the final rename never crosses file
//! systems; every one is removed when the operation ends, successful or not.

use super::{extract_release, release_files, release_files_phrase, ReleaseSpec, README_FILE};
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
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let known = release_files().contains(&name.as_ref());
        if !known && name != README_FILE {
            bail!(
                "{}: unexpected file in a CIFAR-10 release folder",
                entry.path().display()
            );
        }
        if !known {
            let path = entry.path();
            let meta =
                std::fs::symlink_metadata(&path).with_context(|| format!("{}", path.display()))?;
            if !meta.is_file() {
                bail!("{}: not a regular file", path.display());
            }
        }
    }
    validate_installed(dir, spec)
}

/// Checks that the release files of `dir` (see [`release_files`]) are there and sound, as
/// [`validate_release`] does, but ignores every other entry of `dir`: a folder where a
/// release was installed beside the user's own files (`flatmin data fetch --force` leaves
/// those alone) still counts as holding the release.
pub fn validate_installed(dir: &Path, spec: &ReleaseSpec) -> Result<ReleaseInfo> {
    for name in release_files() {
        let path = dir.join(name);
        let meta = match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("{}: missing", path.display())
            }
            other => other.with_context(|| format!("{}", path.display()))?,
        };
        if !meta.is_file() {
            bail!("{}: not a regular file", path.display());
        }
        if name != META_FILE && meta.len() != spec.batch_bytes {
            bail!(
                "{}: {} bytes, expected {} ({} records)",
                path.display(),
                meta.len(),
                spec.batch_bytes,
                spec.records_per_batch()
            );
        }
    }
    let data = Cifar10::open(dir)?;
    Ok(ReleaseInfo {
        train: data.train().len(),
        test: data.test().len(),
    })
}

/// Errors unless `--force` may install into `dest`, which is occupied: it must be a folder
/// (not a link or a file), and each of its release paths (see [`release_files`]) must be
/// absent or a regular file. The error says that nothing was changed.
pub fn check_replaceable(dest: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(dest).with_context(|| format!("{}", dest.display()))?;
    if !meta.is_dir() {
        bail!(
            "{}: not a folder but a {}; --force replaces only the release files inside a folder, \
             so nothing was changed",
            dest.display(),
            kind_of(&meta)
        );
    }
    for name in release_files() {
        let path = dest.join(name);
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("{}: {e}", path.display()),
            Ok(m) if m.is_file() => {}
            Ok(m) => bail!(
                "{}: a {} where the release has a file; --force replaces only regular files, \
                 so nothing was changed (move it away first)",
                path.display(),
                kind_of(&m)
            ),
        }
    }
    Ok(())
}

/// What a non-regular entry is, in words.
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_symlink() {
        "link"
    } else if t.is_dir() {
        "folder"
    } else if t.is_file() {
        "file"
    } else {
        "special file"
    }
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
/// `dest` and validated with [`validate_release`]. An absent `dest` or an empty folder is
/// then replaced by the temporary folder (one rename). Any other `dest` is an error unless
/// `replace` is set; then `dest` must pass [`check_replaceable`], and only its release files
/// are replaced (see [`replace_release_files`]): every other file in it is left alone.
/// `source` names the archive in errors (a file or a URL). On error `dest` is unchanged and
/// no temporary is left.
pub fn install_from(
    archive: impl Read,
    source: &str,
    dest: &Path,
    spec: &ReleaseSpec,
    replace: bool,
) -> Result<ReleaseInfo> {
    spec.check()?;
    check_dest(dest)?;
    if occupied(dest)? {
        if !replace {
            bail!("{}", not_replacing(dest));
        }
        check_replaceable(dest)?;
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

/// The refusal to touch an occupied `dest` without `--force`, saying what `--force` would
/// replace.
pub fn not_replacing(dest: &Path) -> String {
    format!(
        "{} already exists; not replacing it (--force replaces {} in it and leaves its other \
         files alone)",
        dest.display(),
        release_files_phrase()
    )
}

/// Puts the validated release folder `tmp` in place as `dest` (see [`install_from`] for
/// what may be at `dest`).
fn put_in_place(tmp: TempPath, dest: &Path, replace: bool) -> Result<()> {
    if occupied(dest)? {
        if !replace {
            bail!("{}", not_replacing(dest));
        }
        return replace_release_files(&tmp, dest);
    }
    if std::fs::symlink_metadata(dest).is_ok() {
        // An empty folder: replaced by the new one.
        std::fs::remove_dir(dest).with_context(|| format!("{}", dest.display()))?;
    }
    std::fs::rename(tmp.path(), dest).map_err(|e| {
        anyhow!(
            "cannot move {} into place as {}: {e}",
            tmp.path().display(),
            dest.display()
        )
    })?;
    tmp.keep();
    Ok(())
}

/// Moves the release files of the validated folder `tmp` into the existing folder `dest`,
/// replacing the ones there and leaving every other entry of `dest` untouched.
///
/// The release paths of `dest` are checked first ([`check_replaceable`]). The old release
/// files are moved aside into a temporary sibling `.NAME.old-PID-N`, then the new ones are
/// renamed in; if a rename fails, the new files placed so far are removed and the old ones
/// put back, so `dest` ends as it was. The old files are removed once all new ones are in.
pub fn replace_release_files(tmp: &TempPath, dest: &Path) -> Result<()> {
    check_replaceable(dest)?;
    let old = TempPath::create_dir(&parent_of(dest), &temp_stem(dest, "old"))?;
    let mut aside = Vec::new();
    let mut placed = Vec::new();
    let Err(e) = swap_files(tmp.path(), dest, old.path(), &mut aside, &mut placed) else {
        sync_dir(dest);
        return Ok(());
    };
    for name in &placed {
        let _ = std::fs::remove_file(dest.join(name));
    }
    let stuck: Vec<&str> = aside
        .iter()
        .copied()
        .filter(|name| std::fs::rename(old.path().join(name), dest.join(name)).is_err())
        .collect();
    if stuck.is_empty() {
        return Err(e);
    }
    let kept = old.keep();
    Err(e.context(format!(
        "and the previous {} could not be put back into {}: they are in {}",
        stuck.join(", "),
        dest.display(),
        kept.display()
    )))
}

/// The renames of [`replace_release_files`]: every existing release file of `dest` into
/// `old` (recorded in `aside`), then every release file of `tmp` into `dest` (recorded in
/// `placed`).
fn swap_files(
    tmp: &Path,
    dest: &Path,
    old: &Path,
    aside: &mut Vec<&'static str>,
    placed: &mut Vec<&'static str>,
) -> Result<()> {
    for name in release_files() {
        let path = dest.join(name);
        if std::fs::symlink_metadata(&path).is_ok() {
            std::fs::rename(&path, old.join(name))
                .with_context(|| format!("cannot move the existing {} aside", path.display()))?;
            aside.push(name);
        }
    }
    for name in release_files() {
        std::fs::rename(tmp.join(name), dest.join(name)).with_context(|| {
            format!(
                "cannot move {} into place as {}",
                tmp.join(name).display(),
                dest.join(name).display()
            )
        })?;
        placed.push(name);
    }
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

    /// A folder `base/NAME` holding `notes.txt` and every release file with `tag-FILE` in it.
    fn folder_with(base: &Path, name: &str, tag: &str) -> PathBuf {
        let d = base.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in release_files() {
            std::fs::write(d.join(f), format!("{tag}-{f}")).unwrap();
        }
        std::fs::write(d.join("notes.txt"), "mine").unwrap();
        d
    }

    fn contents(dir: &Path, tag: &str) -> bool {
        release_files()
            .iter()
            .all(|f| std::fs::read_to_string(dir.join(f)).ok() == Some(format!("{tag}-{f}")))
    }

    #[test]
    fn release_files_are_swapped_in_or_all_put_back() {
        let base = std::env::temp_dir().join(format!("flatmin-swap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dest = folder_with(&base, "dest", "old");
        // A new release missing its last file: the last rename fails, everything is undone.
        let tmp = TempPath::create_dir(&base, ".dest.partial").unwrap();
        for f in &release_files()[..6] {
            std::fs::write(tmp.path().join(f), format!("new-{f}")).unwrap();
        }
        let err = format!("{:#}", replace_release_files(&tmp, &dest).unwrap_err());
        assert!(err.contains("batches.meta.txt"), "{err}");
        assert!(contents(&dest, "old"), "the old release was not put back");
        drop(tmp);
        // A complete one: swapped in, the other file kept, no temporary left.
        let full = folder_with(&base, ".dest.partial-new", "new");
        std::fs::remove_file(full.join("notes.txt")).unwrap();
        let tmp = TempPath {
            path: full,
            armed: true,
        };
        replace_release_files(&tmp, &dest).unwrap();
        drop(tmp);
        assert!(contents(&dest, "new"));
        assert_eq!(
            std::fs::read_to_string(dest.join("notes.txt")).unwrap(),
            "mine"
        );
        let left: Vec<_> = std::fs::read_dir(&base).unwrap().collect();
        assert_eq!(left.len(), 1, "temporaries left: {left:?}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}

//! Extraction of the release archive (a gzip-compressed tar) with safety checks.
//!
//! Nothing in the archive decides where bytes are written: each member's path is checked
//! and then matched against a fixed list, and only a matching regular file is written, under
//! its bare file name, into the target folder. In order, a member is refused when
//!
//! 1. its path is empty, absolute or has a `..` component (it would leave the target
//!    folder);
//! 2. it is anything but a regular file or a folder: symbolic and hard links, devices,
//!    FIFOs, sparse files (pax global headers, which only carry metadata, are skipped);
//! 3. it is not `cifar-10-batches-bin/` itself, one of the release files under it (see
//!    [`release_files`](super::release_files)), or `cifar-10-batches-bin/readme.html`
//!    (accepted and not written);
//! 4. it appears twice, or its size is not the expected one (batch files), or over
//!    [`META_MAX_BYTES`](super::META_MAX_BYTES) (`batches.meta.txt`).
//!
//! `.` components and repeated slashes are ignored (`./cifar-10-batches-bin//test_batch.bin`
//! is accepted). After the last member every release file must have been seen, and the rest
//! of the gzip stream is read so that its CRC is checked.

use super::{release_files, ReleaseSpec, META_MAX_BYTES, README_FILE};
use crate::data::RELEASE_DIR;
use anyhow::{anyhow, bail, Context, Result};
use flate2::read::GzDecoder;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use tar::EntryType;

/// What a member path names, once checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Member {
    /// The release folder itself, `cifar-10-batches-bin/`.
    Folder,
    /// A release file, by its bare name.
    File(&'static str),
    /// `cifar-10-batches-bin/readme.html`: accepted, not written.
    Readme,
}

/// The components of a member path (the raw bytes of the archive), `.` and empty ones
/// left out, after checking that it stays inside the target folder.
///
/// Errors: an empty path, an absolute path, a `..` component.
pub fn safe_components(path: &[u8]) -> Result<Vec<&[u8]>> {
    if path.is_empty() {
        bail!("a member has an empty name");
    }
    if path[0] == b'/' {
        bail!("absolute path, which would be written outside the target folder");
    }
    let parts: Vec<&[u8]> = path
        .split(|&b| b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
        .collect();
    if parts.iter().any(|p| *p == b"..") {
        bail!("the path has a '..' component, which would leave the target folder");
    }
    Ok(parts)
}

/// Checks a member path (the raw bytes of the archive) and says what it names.
///
/// Errors: those of [`safe_components`], and anything that is not the release folder, a
/// release file in it, or its `readme.html`.
pub fn classify(path: &[u8]) -> Result<Member> {
    let parts = safe_components(path)?;
    match parts.as_slice() {
        [dir] if *dir == RELEASE_DIR.as_bytes() => Ok(Member::Folder),
        [dir, name] if *dir == RELEASE_DIR.as_bytes() => {
            if let Some(known) = release_files().into_iter().find(|f| f.as_bytes() == *name) {
                Ok(Member::File(known))
            } else if *name == README_FILE.as_bytes() {
                Ok(Member::Readme)
            } else {
                Err(unexpected())
            }
        }
        _ => Err(unexpected()),
    }
}

fn unexpected() -> anyhow::Error {
    anyhow!(
        "not a file of the CIFAR-10 binary release (expected only {RELEASE_DIR}/ holding {} \
         and {README_FILE})",
        release_files().join(", ")
    )
}

/// A description of a refused entry type.
fn kind_name(t: EntryType) -> String {
    match t {
        EntryType::Symlink => "a symbolic link".into(),
        EntryType::Link => "a hard link".into(),
        EntryType::Char => "a character device".into(),
        EntryType::Block => "a block device".into(),
        EntryType::Fifo => "a FIFO".into(),
        EntryType::GNUSparse => "a sparse file".into(),
        other => format!("an entry of type {:?}", other.as_byte() as char),
    }
}

/// Extracts the release from a `.tar.gz` stream into `into`, an existing (empty) folder:
/// the six batch files and `batches.meta.txt` are written there under their bare names.
///
/// Errors name the offending member; see the module documentation for what is refused.
/// On error, files already written into `into` are left for the caller to remove (the
/// caller extracts into a temporary folder and removes it as a whole).
pub fn extract_release(archive: impl Read, into: &Path, spec: &ReleaseSpec) -> Result<()> {
    let mut tar = tar::Archive::new(GzDecoder::new(archive));
    let mut seen = BTreeSet::new();
    let mut readme_seen = false;
    let entries = tar
        .entries()
        .map_err(|e| anyhow!("not a readable .tar.gz archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| anyhow!("corrupt archive: {e}"))?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let ctx = || format!("archive member '{shown}'");
        let kind = entry.header().entry_type();
        if kind == EntryType::XGlobalHeader {
            continue;
        }
        safe_components(&raw).with_context(ctx)?;
        if !matches!(kind, EntryType::Regular | EntryType::Directory) {
            return Err(anyhow!(
                "{}; only regular files are extracted",
                kind_name(kind)
            ))
            .with_context(ctx);
        }
        match (kind, classify(&raw).with_context(ctx)?) {
            (EntryType::Directory, Member::Folder) => continue,
            (EntryType::Regular, Member::Readme) => {
                if readme_seen {
                    return Err(anyhow!("appears twice in the archive")).with_context(ctx);
                }
                readme_seen = true;
                continue;
            }
            (EntryType::Regular, Member::File(name)) => {
                if !seen.insert(name) {
                    return Err(anyhow!("appears twice in the archive")).with_context(ctx);
                }
                let size = entry.size();
                if name == flatmin_datasets::META_FILE {
                    if size > META_MAX_BYTES {
                        return Err(anyhow!("{size} bytes, more than the {META_MAX_BYTES} accepted for a class-name list"))
                            .with_context(ctx);
                    }
                } else if size != spec.batch_bytes {
                    return Err(anyhow!(
                        "{size} bytes, expected {} ({} records)",
                        spec.batch_bytes,
                        spec.records_per_batch()
                    ))
                    .with_context(ctx);
                }
                write_member(&mut entry, &into.join(name), size).with_context(ctx)?;
            }
            (_, _) => {
                let what = if kind == EntryType::Directory {
                    "a folder"
                } else {
                    "a file"
                };
                return Err(anyhow!("{what} where the release has none")).with_context(ctx);
            }
        }
    }
    if let Some(missing) = release_files().into_iter().find(|f| !seen.contains(f)) {
        bail!("the archive lacks {RELEASE_DIR}/{missing}");
    }
    std::io::copy(&mut tar.into_inner(), &mut std::io::sink())
        .map_err(|e| anyhow!("corrupt archive after its last member: {e}"))?;
    Ok(())
}

/// Writes the `size` bytes of a member into a new file at `path` (which must not exist).
fn write_member(data: &mut impl Read, path: &Path, size: u64) -> Result<()> {
    let mut file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let mut limited = data.take(size);
    let written =
        std::io::copy(&mut limited, &mut file).map_err(|e| anyhow!("corrupt archive: {e}"))?;
    if written != size {
        bail!("truncated: {written} of {size} bytes");
    }
    file.flush()
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_paths() {
        assert_eq!(classify(b"cifar-10-batches-bin/").unwrap(), Member::Folder);
        assert_eq!(classify(b"./cifar-10-batches-bin").unwrap(), Member::Folder);
        assert_eq!(
            classify(b"cifar-10-batches-bin/data_batch_3.bin").unwrap(),
            Member::File("data_batch_3.bin")
        );
        assert_eq!(
            classify(b"./cifar-10-batches-bin//./test_batch.bin").unwrap(),
            Member::File("test_batch.bin")
        );
        assert_eq!(
            classify(b"cifar-10-batches-bin/readme.html").unwrap(),
            Member::Readme
        );
        let msg = |p: &[u8]| classify(p).unwrap_err().to_string();
        assert!(msg(b"/etc/passwd").contains("absolute"));
        assert!(msg(b"/cifar-10-batches-bin/test_batch.bin").contains("absolute"));
        assert!(msg(b"../evil").contains("'..'"));
        assert!(msg(b"cifar-10-batches-bin/../../evil").contains("'..'"));
        assert!(
            msg(b"cifar-10-batches-bin/../cifar-10-batches-bin/test_batch.bin").contains("'..'")
        );
        assert!(msg(b"").contains("empty"));
        for p in [
            &b"readme.html"[..],
            b"test_batch.bin",
            b"cifar-10-batches-bin/extra.bin",
            b"cifar-10-batches-bin/sub/test_batch.bin",
            b"cifar-10-batches-py/data_batch_1",
            b"cifar-10-batches-bin/test_batch.bin\\..",
        ] {
            assert!(
                msg(p).contains("not a file of the CIFAR-10 binary release"),
                "{p:?}"
            );
        }
    }
}

//! Downloading and installing the official CIFAR-10 binary release (`flatmin data fetch`).
//!
//! The work is split so that everything but the transfer can be used and tested without a
//! network:
//!
//! - [`md5`]: digests of streams and files (the archive is hashed while it downloads);
//! - [`archive`]: extraction of the `.tar.gz` with safety checks: only the expected files
//!   under `cifar-10-batches-bin/` are written, and a member whose path leaves the target
//!   folder, a link, a device, or any unexpected file makes the whole extraction fail;
//! - [`install`]: validation of a release folder and the atomic install (extract into a
//!   temporary sibling folder, validate, rename into place; nothing is left behind on
//!   failure); `--force` replaces only the release files of an existing folder;
//! - [`http`]: the only network code, a streaming download with timeouts, optionally
//!   through an HTTP proxy (`HTTPS_PROXY` and friends, read by [`proxy_from_env`]);
//! - [`fetch_release`]: the whole command: skip when a valid release is already there,
//!   download into a temporary file next to the destination (or take a local copy of the
//!   archive, [`FetchOptions::from`]), check the MD5, install.
//!
//! **What is kept from the archive.** The official archive holds the six batch files,
//! `batches.meta.txt`, and `readme.html` (a page that only links to the dataset's web
//! site). The six batch files and `batches.meta.txt` are installed; `readme.html` is
//! accepted and skipped. An existing folder that also holds `readme.html` (an archive
//! unpacked by hand) still counts as a valid release.
//!
//! **Overriding the expectations (tests, mirrors).** [`ReleaseSpec`] holds the expected MD5
//! of the archive and the exact size of each batch file; [`ReleaseSpec::official`] is the
//! published release. Tests build small archives of the same layout (a few records per
//! batch) and pass their own spec; on the command line the hidden flags `--md5` and
//! `--batch-bytes` do the same.

pub mod archive;
pub mod http;
pub mod install;
pub mod md5;

pub use archive::extract_release;
pub use http::{download, proxy_for, proxy_from_env, Downloaded, HttpOptions, HttpProxy};
pub use install::{
    check_replaceable, install_archive, install_from, validate_installed, validate_release,
    ReleaseInfo,
};
pub use md5::{HashingWriter, Md5Digest};

use crate::data::RELEASE_DIR;
use anyhow::{bail, Context, Result};
use flatmin_datasets::{META_FILE, RECORD_BYTES, TEST_FILE, TRAIN_FILES};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Where the official archive is published.
pub const OFFICIAL_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// The published MD5 of the official archive.
pub const OFFICIAL_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";
/// Size in bytes of each of the six batch files of the official release (10,000 records).
pub const OFFICIAL_BATCH_BYTES: u64 = 10_000 * RECORD_BYTES as u64;
/// The one file of the archive that is accepted but not installed.
pub const README_FILE: &str = "readme.html";
/// Largest accepted `batches.meta.txt` (the official one is a few dozen bytes).
pub const META_MAX_BYTES: u64 = 64 * 1024;

/// The files an installed release holds, in a fixed order: the five training batches, the
/// test batch, and `batches.meta.txt`.
pub fn release_files() -> [&'static str; 7] {
    let [a, b, c, d, e] = TRAIN_FILES;
    [a, b, c, d, e, TEST_FILE, META_FILE]
}

/// The release files in words, for messages: `data_batch_1.bin to data_batch_5.bin,
/// test_batch.bin and batches.meta.txt`.
pub fn release_files_phrase() -> String {
    let f = release_files();
    format!("{} to {}, {} and {}", f[0], f[4], f[5], f[6])
}

/// What the downloaded archive must be: its MD5 and the exact size of each batch file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReleaseSpec {
    /// MD5 of the `.tar.gz` archive as downloaded.
    pub md5: Md5Digest,
    /// Exact size in bytes of each of `data_batch_1.bin` ... `data_batch_5.bin` and
    /// `test_batch.bin` (a positive multiple of the 3073-byte record).
    pub batch_bytes: u64,
}

impl ReleaseSpec {
    /// The published release: MD5 [`OFFICIAL_MD5`], batch files of [`OFFICIAL_BATCH_BYTES`].
    pub fn official() -> Self {
        ReleaseSpec {
            md5: Md5Digest::parse(OFFICIAL_MD5).unwrap_or(Md5Digest([0; 16])),
            batch_bytes: OFFICIAL_BATCH_BYTES,
        }
    }

    /// Records per batch file.
    pub fn records_per_batch(&self) -> usize {
        (self.batch_bytes / RECORD_BYTES as u64) as usize
    }

    /// The largest archive accepted for this release (downloaded, or given with `--from`):
    /// the six batch files uncompressed, an eighth more, and 4 MiB for the other members and
    /// the tar and gzip framing. A valid archive is smaller (gzip grows incompressible data
    /// by a fraction of a percent); for the official release (170,052,171 bytes) the limit
    /// is about 212 MB.
    pub fn max_archive_bytes(&self) -> u64 {
        let batches = 6u64.saturating_mul(self.batch_bytes);
        batches.saturating_add(batches / 8).saturating_add(4 << 20)
    }

    /// Errors unless `batch_bytes` is a positive multiple of the record size.
    pub fn check(&self) -> Result<()> {
        if !whole_records(self.batch_bytes) {
            bail!(
                "batch file size {} is not a positive multiple of the {RECORD_BYTES}-byte record",
                self.batch_bytes
            );
        }
        Ok(())
    }
}

/// True when `bytes` is a positive whole number of 3073-byte records.
pub fn whole_records(bytes: u64) -> bool {
    let record = RECORD_BYTES as u64;
    bytes > 0 && bytes / record * record == bytes
}

impl Default for ReleaseSpec {
    fn default() -> Self {
        ReleaseSpec::official()
    }
}

/// Observes a fetch: the download's progress and the steps after it. Every method does
/// nothing by default.
pub trait Progress {
    /// The server answered; `total` is the announced size (Content-Length), if any.
    fn download_started(&mut self, _url: &str, _total: Option<u64>) {}
    /// `bytes` have arrived so far.
    fn downloaded(&mut self, _bytes: u64) {}
    /// The body arrived completely: `bytes` in all.
    fn download_finished(&mut self, _bytes: u64) {}
    /// A step after the download begins (a short description such as "extracting").
    fn step(&mut self, _what: &str) {}
}

/// A [`Progress`] that reports nothing.
pub struct Silent;

impl Progress for Silent {}

/// What [`fetch_release`] should do.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Where the archive is downloaded from.
    pub url: String,
    /// A local copy of the archive to install instead of downloading `url` (for machines
    /// without internet); checked against the same MD5 and installed the same way.
    pub from: Option<PathBuf>,
    /// The release folder to create (its contents are the batch files themselves).
    pub dest: PathBuf,
    /// What the archive and its files must be.
    pub spec: ReleaseSpec,
    /// Download and install even when `dest` already holds a valid release (or something
    /// else): its release files (see [`release_files`]) are replaced, its other files are
    /// left alone.
    pub force: bool,
    /// Connection and read timeouts, and the proxy.
    pub http: HttpOptions,
}

impl FetchOptions {
    /// The official release from [`OFFICIAL_URL`] into `dest`, without `force`, with the
    /// default timeouts and no proxy.
    pub fn new(dest: impl Into<PathBuf>) -> Self {
        FetchOptions {
            url: OFFICIAL_URL.into(),
            from: None,
            dest: dest.into(),
            spec: ReleaseSpec::official(),
            force: false,
            http: HttpOptions::default(),
        }
    }
}

/// What [`fetch_release`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// The destination already held a valid release; nothing was downloaded.
    AlreadyPresent(ReleaseInfo),
    /// The archive was downloaded, verified and installed.
    Installed {
        /// The installed release.
        info: ReleaseInfo,
        /// Size of the archive (downloaded or local).
        bytes: u64,
        /// Its MD5 (equal to the expected one).
        md5: Md5Digest,
    },
}

/// The default destination: `cifar-10-batches-bin` in the per-user cache folder, one of the
/// folders `--data auto` looks in.
pub fn default_dest() -> Option<PathBuf> {
    crate::data::cache_dir().map(|c| c.join(RELEASE_DIR))
}

/// Downloads (or takes from [`FetchOptions::from`]), verifies and installs the release
/// described by `opts`.
///
/// Unless `opts.force` is set, a destination that already holds a valid release (see
/// [`validate_installed`]: other files beside it are allowed) is left alone
/// ([`Fetched::AlreadyPresent`]), and one that holds anything else (except an empty folder)
/// is an error. With `opts.force`, an occupied destination must pass [`check_replaceable`]
/// before anything is downloaded, and only its release files are replaced. The archive is
/// downloaded into a temporary file next to the destination and hashed on the way (a local
/// archive is hashed where it is); an MD5 different from `opts.spec.md5` is an error naming
/// both digests and the URL or file. The archive is then installed with [`install_from`].
/// On any error the destination is as it was and the temporary files are gone.
pub fn fetch_release(opts: &FetchOptions, progress: &mut dyn Progress) -> Result<Fetched> {
    opts.spec.check()?;
    if let Some(file) = &opts.from {
        // Fail on a mistyped file even when there is nothing to do.
        if !file.exists() {
            bail!("{}: no such archive file", file.display());
        }
        // A FIFO, a device or a folder is named for what it is, before anything else.
        flatmin_engine::fsread::open_regular_file(file)
            .with_context(|| file.display().to_string())?;
    }
    let dest = &opts.dest;
    if !opts.force && install::occupied(dest)? {
        return match validate_installed(dest, &opts.spec) {
            Ok(info) => Ok(Fetched::AlreadyPresent(info)),
            Err(e) => Err(e.context(format!(
                "{} already exists but is not a complete CIFAR-10 release; remove it, or pass \
                 --force to replace {} in it (its other files are left alone)",
                dest.display(),
                release_files_phrase()
            ))),
        };
    }
    install::check_dest(dest)?;
    if install::occupied(dest)? {
        // Refuse before downloading what could not be installed.
        check_replaceable(dest)?;
    }
    match &opts.from {
        Some(file) => install_local(file, opts, progress),
        None => download_and_install(opts, progress),
    }
}

/// Errors unless `got` is the MD5 that `spec` expects; `source` names the archive, `noun`
/// says what it is (`file`, `download`).
fn check_md5(got: &Downloaded, spec: &ReleaseSpec, source: &str, noun: &str) -> Result<()> {
    if got.md5 != spec.md5 {
        bail!(
            "{source}: MD5 mismatch: expected {}, got {} ({} bytes); the {noun} is damaged or \
             is not the CIFAR-10 binary release (cifar-10-binary.tar.gz)",
            spec.md5,
            got.md5,
            got.bytes,
        );
    }
    Ok(())
}

/// The `--from` half of [`fetch_release`]: hash the local archive, then install it.
fn install_local(file: &Path, opts: &FetchOptions, progress: &mut dyn Progress) -> Result<Fetched> {
    let shown = file.display().to_string();
    // Only a regular file (a FIFO would block, a device never end), and not a huge one.
    let (reader, bytes) =
        flatmin_engine::fsread::open_regular_file(file).with_context(|| shown.clone())?;
    let max = opts.spec.max_archive_bytes();
    if bytes > max {
        bail!(
            "{shown}: {bytes} bytes, more than the {max}-byte limit for this archive \
             (is it the CIFAR-10 binary release, cifar-10-binary.tar.gz?)"
        );
    }
    progress.step(&format!("checking the MD5 of {shown}"));
    let mut hasher = HashingWriter::new(std::io::sink());
    std::io::copy(&mut reader.take(max), &mut hasher).with_context(|| shown.clone())?;
    let got = Downloaded {
        bytes,
        md5: hasher.finish().1,
    };
    check_md5(&got, &opts.spec, &shown, "file")?;
    progress.step(&format!("MD5 {} verified; extracting", got.md5));
    let info = install_archive(file, &opts.dest, &opts.spec, opts.force)?;
    Ok(Fetched::Installed {
        info,
        bytes: got.bytes,
        md5: got.md5,
    })
}

/// The network half of [`fetch_release`]: download into a temporary file, then install it.
fn download_and_install(opts: &FetchOptions, progress: &mut dyn Progress) -> Result<Fetched> {
    http::require_download(&opts.url)?;
    let dest = &opts.dest;
    let parent = install::parent_of(dest);
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create the folder {}", parent.display()))?;
    let (tmp, file) =
        install::TempPath::create_file(&parent, &install::temp_stem(dest, "download"))?;

    let mut out = BufWriter::new(file);
    let max = opts.spec.max_archive_bytes();
    let got = download(&opts.url, &mut out, &opts.http, max, progress)?;
    out.flush()
        .and_then(|()| out.get_ref().sync_all())
        .with_context(|| format!("{}: cannot write the download", tmp.path().display()))?;
    drop(out);
    check_md5(&got, &opts.spec, &opts.url, "download")?;
    progress.step(&format!("MD5 {} verified; extracting", got.md5));
    let file = std::fs::File::open(tmp.path())
        .with_context(|| format!("{}: cannot reopen the download", tmp.path().display()))?;
    let info = install_from(
        std::io::BufReader::new(file),
        &format!("archive from {}", opts.url),
        dest,
        &opts.spec,
        opts.force,
    )?;
    drop(tmp);
    Ok(Fetched::Installed {
        info,
        bytes: got.bytes,
        md5: got.md5,
    })
}

/// True when `--data auto` would read `dir`: it is the folder [`auto_release`] finds
/// (compared as given and after resolving links).
///
/// [`auto_release`]: crate::data::auto_release
pub fn found_by_auto(dir: &Path) -> bool {
    let Ok(Some(found)) = crate::data::auto_release() else {
        return false;
    };
    found.dir == dir
        || matches!(
            (std::fs::canonicalize(&found.dir), std::fs::canonicalize(dir)),
            (Ok(a), Ok(b)) if a == b
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_spec() {
        let s = ReleaseSpec::official();
        assert_eq!(s.md5.to_string(), OFFICIAL_MD5);
        assert_eq!(s.batch_bytes, 30_730_000);
        assert_eq!(s.records_per_batch(), 10_000);
        s.check().unwrap();
        let bad = ReleaseSpec {
            batch_bytes: 3074,
            ..s
        };
        assert!(bad.check().unwrap_err().to_string().contains("3074"));
        assert_eq!(release_files()[5], "test_batch.bin");
        assert_eq!(release_files()[6], "batches.meta.txt");
    }
}

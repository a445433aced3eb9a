//! One writer per run folder: an exclusive advisory lock (`flock`) on `RUN/.lock`, held for
//! the whole life of the process that trains in the folder.
//!
//! The lock is the kernel's, not the file's: it is released when the holder closes the file
//! or dies in any way (`kill -9` included), so a `.lock` file left by a dead process is
//! simply locked again. The file's contents, `pid PID on HOST`, only name the holder in the
//! refusal; they are written after the lock is taken, best effort (a full disk does not stop
//! a run from taking its lock).

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The lock file's name inside a run folder.
pub const LOCK_FILE: &str = ".lock";

/// The exclusive lock of one run folder, released when dropped (or when the process ends).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

/// What a locked folder holds, for the refusal's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Locked {
    /// A run folder, written by one `flatmin train`.
    Run,
    /// A sweep folder, driven by one `flatmin sweep`.
    Sweep,
}

impl Locked {
    /// `run` or `sweep`.
    fn name(self) -> &'static str {
        match self {
            Locked::Run => "run",
            Locked::Sweep => "sweep",
        }
    }
}

/// What `flock` answered.
enum Attempt {
    Locked,
    Held,
}

/// `flock(LOCK_EX | LOCK_NB)` on `file`: never waits.
fn try_flock(file: &File) -> std::io::Result<Attempt> {
    // SAFETY: `flock` only reads the descriptor number, which `file` keeps open for the
    // duration of the call; it touches no memory of this process.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Attempt::Locked);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(Attempt::Held),
        _ => Err(err),
    }
}

/// Opens the lock file `path` (created when `create`) without following a link and without
/// blocking: a FIFO put there must not hang `flatmin train`, and a link must not make it
/// truncate and write the file it points to. Anything but a regular file is an error saying
/// what it is.
fn open_lock_file(path: &Path, create: bool) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(create)
        .create(create)
        .truncate(false)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => std::io::Error::other("is a symbolic link, not a regular file"),
            Some(libc::EISDIR) => std::io::Error::other("is a folder, not a regular file"),
            _ => e,
        })?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(std::io::Error::other(format!(
            "is {}, not a regular file",
            flatmin_engine::fsread::describe_kind(&kind)
        )));
    }
    Ok(file)
}

/// The refusal when another process holds the lock of `root`: names the folder, the holder
/// as recorded in the lock file, and what to do.
fn held_error(root: &Path, flag: &str, kind: Locked, file: &mut File) -> anyhow::Error {
    let mut text = String::new();
    let holder = match file.read_to_string(&mut text) {
        Ok(_) if !text.trim().is_empty() => text.trim().to_string(),
        _ => "another process (its pid is not recorded yet)".to_string(),
    };
    anyhow::anyhow!(
        "{flag} {}: the {what} folder is in use by {holder} (lock {}); wait for that {what} to \
         end or stop it first; nothing was changed",
        root.display(),
        root.join(LOCK_FILE).display(),
        what = kind.name()
    )
}

/// `pid PID on HOST` for this process.
fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "an unknown host".into());
    format!("pid {} on {host}\n", std::process::id())
}

impl RunLock {
    /// Takes the lock of the existing run folder `root`, creating `root/.lock` when absent,
    /// and records this process in it. Fails at once, without waiting and without changing
    /// anything else, when another process holds it: the error begins with `flag` (`--out`,
    /// `--resume`) and the folder, and names the holder's pid and host.
    pub fn acquire(root: &Path, flag: &str) -> Result<Self> {
        Self::acquire_for(root, flag, Locked::Run)
    }

    /// [`RunLock::acquire`] for a folder of the given kind (the refusal says which).
    pub fn acquire_for(root: &Path, flag: &str, kind: Locked) -> Result<Self> {
        let path = root.join(LOCK_FILE);
        let mut file = open_lock_file(&path, true).with_context(|| {
            format!(
                "{flag} {}: cannot open the lock file {}",
                root.display(),
                path.display()
            )
        })?;
        match try_flock(&file) {
            Ok(Attempt::Locked) => {}
            Ok(Attempt::Held) => return Err(held_error(root, flag, kind, &mut file)),
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "{flag} {}: cannot lock {}: {e}",
                    root.display(),
                    path.display()
                ))
            }
        }
        // Best effort: the lock is held either way; the record only improves the refusal.
        let _ = file
            .set_len(0)
            .and_then(|()| file.write_all(holder().as_bytes()));
        Ok(RunLock { _file: file })
    }

    /// Errors as [`RunLock::acquire`] does when another process holds the lock of `root`;
    /// otherwise returns holding nothing. Creates nothing: a folder without `.lock` is free.
    /// (To tell, it takes the lock for an instant, so a writer starting in that instant is
    /// refused as if the folder were in use.)
    pub fn check_free(root: &Path, flag: &str) -> Result<()> {
        let path = root.join(LOCK_FILE);
        let mut file = match open_lock_file(&path, false) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "{flag} {}: cannot open {}: {e}",
                    root.display(),
                    path.display()
                ))
            }
        };
        match try_flock(&file) {
            Ok(Attempt::Locked) => Ok(()),
            Ok(Attempt::Held) => Err(held_error(root, flag, Locked::Run, &mut file)),
            Err(e) => Err(anyhow::anyhow!(
                "{flag} {}: cannot lock {}: {e}",
                root.display(),
                path.display()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_until_the_first_is_dropped() {
        let dir = std::env::temp_dir().join(format!("flatmin-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        RunLock::check_free(&dir, "--resume").unwrap();
        assert!(!dir.join(LOCK_FILE).exists(), "check_free created the file");
        let first = RunLock::acquire(&dir, "--out").unwrap();
        let err = RunLock::acquire(&dir, "--resume").unwrap_err().to_string();
        let me = format!("pid {} on ", std::process::id());
        assert!(
            err.starts_with(&format!("--resume {}", dir.display())),
            "{err}"
        );
        assert!(err.contains(&me), "{err}");
        let err = RunLock::check_free(&dir, "--out").unwrap_err().to_string();
        assert!(err.contains(&me), "{err}");
        drop(first);
        RunLock::check_free(&dir, "--out").unwrap();
        drop(RunLock::acquire(&dir, "--resume").unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

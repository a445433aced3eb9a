//! Reading user-named files safely: only regular files are read, and never more than a
//! format's limit.
//!
//! A FIFO opened for reading blocks until a writer appears, and a device such as
//! `/dev/zero` never ends, so every reader of a data, weights, vector, network, config or
//! metrics file goes through [`open_regular_file`] or [`read_regular_file`]: the path's
//! metadata (following symlinks, so a symlink to a regular file is fine) is checked before
//! the file is opened, the file is opened non-blocking where the platform allows (so a path
//! swapped for a FIFO in between cannot block either) and checked again once open, and the
//! read is bounded with [`Read::take`] so a file that grows while it is read cannot exceed
//! the limit.

use std::fs::{File, FileType, OpenOptions};
use std::io::{self, Read};
use std::path::Path;

/// What a file system object of type `kind` is, in words ("a regular file", "a FIFO", "a
/// character device", "a folder", ...), for error messages.
pub fn describe_kind(kind: &FileType) -> &'static str {
    if kind.is_file() {
        return "a regular file";
    }
    if kind.is_dir() {
        return "a folder";
    }
    if kind.is_symlink() {
        return "a symbolic link";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_char_device() {
            return "a character device";
        }
        if kind.is_block_device() {
            return "a block device";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

/// The error for a path that is not a regular file: "is a FIFO, not a regular file".
fn not_regular(kind: &FileType) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("is {}, not a regular file", describe_kind(kind)),
    )
}

/// Opens `path` for reading only if it is a regular file (symlinks followed), and returns
/// the open file with its size in bytes.
///
/// Never blocks on a FIFO: the path's metadata is checked before opening, and on Unix the
/// file is opened with `O_NONBLOCK` (which does not affect reads of regular files) and
/// checked again once open. Anything else (a FIFO, a device, a folder, a socket) is an
/// [`io::ErrorKind::InvalidInput`] error saying what it is; the caller names the path.
pub fn open_regular_file(path: &Path) -> io::Result<(File, u64)> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(not_regular(&meta.file_type()));
    }
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular(&meta.file_type()));
    }
    Ok((file, meta.len()))
}

/// The error for a file larger than `max_bytes`.
fn too_large(size: u64, max_bytes: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("file of {size} bytes is larger than the {max_bytes}-byte limit"),
    )
}

/// Reads the whole regular file `path`, refusing it (before reading anything) if it is
/// larger than `max_bytes`, and reading at most `max_bytes` even if it grows meanwhile (a
/// file that grows past the limit while it is read is an error too).
///
/// Errors as [`open_regular_file`], plus [`io::ErrorKind::InvalidData`] ("file of N bytes
/// is larger than the M-byte limit") for a file over the limit.
pub fn read_regular_file(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let (file, size) = open_regular_file(path)?;
    if size > max_bytes {
        return Err(too_large(size, max_bytes));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(bytes.len() as u64, max_bytes));
    }
    Ok(bytes)
}

/// [`read_regular_file`] for a UTF-8 text file; text that is not UTF-8 is an
/// [`io::ErrorKind::InvalidData`] error, as with [`std::fs::read_to_string`].
pub fn read_regular_to_string(path: &Path, max_bytes: u64) -> io::Result<String> {
    let bytes = read_regular_file(path, max_bytes)?;
    String::from_utf8(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("stream did not contain valid UTF-8: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("flatmin-fsread-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn regular_files_and_symlinks_to_them_are_read_within_the_limit() {
        let dir = scratch("regular");
        let file = dir.join("f.bin");
        std::fs::write(&file, b"hello").unwrap();
        assert_eq!(read_regular_file(&file, 5).unwrap(), b"hello");
        assert_eq!(read_regular_to_string(&file, 100).unwrap(), "hello");
        let err = read_regular_file(&file, 4).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string()
                .contains("5 bytes is larger than the 4-byte limit"),
            "{err}"
        );
        #[cfg(unix)]
        {
            let link = dir.join("link.bin");
            std::os::unix::fs::symlink(&file, &link).unwrap();
            assert_eq!(read_regular_file(&link, 5).unwrap(), b"hello");
        }
        std::fs::write(&file, [0xff, 0xfe]).unwrap();
        let err = read_regular_to_string(&file, 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let missing = read_regular_file(&dir.join("missing"), 5).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn folders_fifos_and_devices_are_refused_without_blocking() {
        let dir = scratch("special");
        let err = read_regular_file(&dir, 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(err.to_string(), "is a folder, not a regular file");
        #[cfg(unix)]
        {
            let fifo = dir.join("fifo");
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            let start = Instant::now();
            let err = read_regular_file(&fifo, 100).unwrap_err();
            assert_eq!(err.to_string(), "is a FIFO, not a regular file");
            let err = open_regular_file(&fifo).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            // A symlink to a FIFO is followed and refused the same way.
            let link = dir.join("link");
            std::os::unix::fs::symlink(&fifo, &link).unwrap();
            assert_eq!(
                read_regular_file(&link, 100).unwrap_err().to_string(),
                "is a FIFO, not a regular file"
            );
            assert!(start.elapsed() < Duration::from_secs(5));
            let err = read_regular_file(Path::new("/dev/zero"), 100).unwrap_err();
            assert_eq!(err.to_string(), "is a character device, not a regular file");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The CIFAR-10 binary format: one file is a sequence of 3073-byte records, each a label byte
//! (0..=9) followed by the red, green and blue 32x32 planes, row-major.

use crate::error::{DataError, Result};
use std::io::Read;
use std::path::Path;

/// Image side length in pixels.
pub const SIDE: usize = 32;
/// Colour channels per image (R, G, B).
pub const CHANNELS: usize = 3;
/// Pixels in one channel plane (32 x 32).
pub const PLANE_BYTES: usize = SIDE * SIDE;
/// Pixel bytes of one image (3 x 32 x 32).
pub const IMAGE_BYTES: usize = CHANNELS * PLANE_BYTES;
/// Bytes of one record: the label byte, then the image.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
/// Number of classes.
pub const CLASSES: usize = 10;
/// The canonical class names, in label order (used when a folder has no `batches.meta.txt`).
pub const CLASS_NAMES: [&str; CLASSES] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Images and labels of one or more CIFAR-10 records, in file order.
///
/// `pixels` holds `len() * 3072` bytes: for each image the R, G and B planes, each 32x32
/// row-major, which is the NCHW layout `[N, 3, 32, 32]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// One class index (0..=9) per image.
    pub labels: Vec<u8>,
    /// `labels.len() * 3072` pixel bytes, image after image, in NCHW order.
    pub pixels: Vec<u8>,
}

impl Batch {
    /// Parses the bytes of a whole batch file. `path` only names the file in errors.
    ///
    /// Errors: no bytes at all, a length that is not a multiple of 3073, or a label byte
    /// above 9 (naming the record).
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let n = checked_record_count(path, bytes.len() as u64)?;
        let mut labels = Vec::with_capacity(n);
        let mut pixels = Vec::with_capacity(n * IMAGE_BYTES);
        for (record, chunk) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
            let byte = chunk[0];
            if usize::from(byte) >= CLASSES {
                return Err(DataError::Label {
                    path: path.to_path_buf(),
                    record,
                    offset: (record * RECORD_BYTES) as u64,
                    byte,
                });
            }
            labels.push(byte);
            pixels.extend_from_slice(&chunk[1..]);
        }
        Ok(Batch { labels, pixels })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The labels as `usize` class indices (what the loss functions take).
    pub fn labels_usize(&self) -> Vec<usize> {
        self.labels.iter().map(|&l| usize::from(l)).collect()
    }

    /// The 3072 pixel bytes of image `i` (R, G, B planes).
    ///
    /// # Panics
    /// If `i >= len()`, or if `pixels` is shorter than `len() * 3072` (only possible for a
    /// hand-built batch).
    pub fn image(&self, i: usize) -> &[u8] {
        &self.pixels[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// Appends the images of `other` after those of `self`.
    pub fn extend(&mut self, other: &Batch) {
        self.labels.extend_from_slice(&other.labels);
        self.pixels.extend_from_slice(&other.pixels);
    }
}

/// Number of records of a file of `size` bytes, or the error naming `path` when the size is
/// zero or not a whole number of records.
fn checked_record_count(path: &Path, size: u64) -> Result<usize> {
    if size == 0 {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    let remainder = size % RECORD_BYTES as u64;
    if remainder != 0 {
        return Err(DataError::Size {
            path: path.to_path_buf(),
            size,
            remainder,
        });
    }
    usize::try_from(size / RECORD_BYTES as u64).map_err(|_| DataError::Size {
        path: path.to_path_buf(),
        size,
        remainder,
    })
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |error| DataError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// Opens `path` as a regular file and returns it with its size in bytes. A FIFO, a device
/// or a folder is refused without blocking, naming what it is
/// ([`flatmin_engine::fsread::open_regular_file`]).
fn open_file(path: &Path) -> Result<(std::fs::File, u64)> {
    flatmin_engine::fsread::open_regular_file(path).map_err(io_error(path))
}

/// Number of records in a batch file, from its size alone (`size / 3073`), without reading
/// it. Errors as [`read_batch_file`] for a missing, empty or wrongly sized file.
pub fn record_count(path: &Path) -> Result<usize> {
    let (_, size) = open_file(path)?;
    checked_record_count(path, size)
}

/// Reads every record of one CIFAR-10 batch file (`data_batch_N.bin`, `test_batch.bin`, or
/// any file in that format; the record count comes from the file size).
///
/// Errors, each naming the file: missing or unreadable file, empty file, size not a multiple
/// of 3073 bytes (with the size and the remainder), label byte above 9 (with the record).
pub fn read_batch_file(path: impl AsRef<Path>) -> Result<Batch> {
    let path = path.as_ref();
    let (file, size) = open_file(path)?;
    // Check the size before reading, so a wrong multi-gigabyte file is rejected at once.
    checked_record_count(path, size)?;
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(size)
        .read_to_end(&mut bytes)
        .map_err(io_error(path))?;
    // The file may have changed since its size was read; parse what was actually read.
    Batch::from_bytes(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TempDir;

    fn record(label: u8, fill: u8) -> Vec<u8> {
        let mut r = vec![label];
        r.extend((0..IMAGE_BYTES).map(|i| fill.wrapping_add(i as u8)));
        r
    }

    #[test]
    fn reads_records_in_order() {
        let dir = TempDir::new("reads_records");
        let path = dir.path().join("b.bin");
        let mut bytes = record(3, 0);
        bytes.extend(record(9, 100));
        bytes.extend(record(0, 200));
        std::fs::write(&path, &bytes).unwrap();
        let b = read_batch_file(&path).unwrap();
        assert_eq!(b.len(), 3);
        assert!(!b.is_empty());
        assert_eq!(b.labels, vec![3, 9, 0]);
        assert_eq!(b.labels_usize(), vec![3, 9, 0]);
        assert_eq!(b.pixels.len(), 3 * IMAGE_BYTES);
        assert_eq!(b.image(1), &record(9, 100)[1..]);
        assert_eq!(b.image(2)[0], 200);
        assert_eq!(
            b.image(2)[IMAGE_BYTES - 1],
            200u8.wrapping_add((IMAGE_BYTES - 1) as u8)
        );
        assert_eq!(record_count(&path).unwrap(), 3);
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = TempDir::new("missing_file");
        let path = dir.path().join("nope.bin");
        let err = read_batch_file(&path).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("nope.bin"), "{msg}");
        assert!(matches!(record_count(&path), Err(DataError::Io { .. })));
    }

    #[test]
    fn directory_is_not_a_batch() {
        let dir = TempDir::new("directory");
        let err = read_batch_file(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err:?}");
        assert!(
            err.to_string().contains("is a folder, not a regular file"),
            "{err}"
        );
    }

    #[test]
    fn empty_file_is_an_error() {
        let dir = TempDir::new("empty_file");
        let path = dir.path().join("empty.bin");
        std::fs::write(&path, b"").unwrap();
        let err = read_batch_file(&path).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }), "{err:?}");
        assert!(err.to_string().contains("empty.bin"), "{err}");
        assert!(matches!(record_count(&path), Err(DataError::Empty { .. })));
    }

    #[test]
    fn size_not_a_multiple_reports_size_and_remainder() {
        let dir = TempDir::new("bad_size");
        for (name, len, rem) in [
            ("short.bin", 100usize, 100u64),
            ("long.bin", 2 * 3073 + 5, 5),
        ] {
            let path = dir.path().join(name);
            let mut bytes = vec![0u8; len];
            bytes[0] = 1;
            std::fs::write(&path, &bytes).unwrap();
            let err = read_batch_file(&path).unwrap_err();
            match &err {
                DataError::Size {
                    size, remainder, ..
                } => {
                    assert_eq!(*size, len as u64);
                    assert_eq!(*remainder, rem);
                }
                other => panic!("expected a size error, got {other:?}"),
            }
            let msg = err.to_string();
            assert!(msg.contains(name), "{msg}");
            assert!(msg.contains(&format!("size {len} bytes")), "{msg}");
            assert!(msg.contains(&format!("remainder {rem} bytes")), "{msg}");
            assert!(msg.contains("3073"), "{msg}");
            assert!(matches!(record_count(&path), Err(DataError::Size { .. })));
        }
    }

    #[test]
    fn label_above_nine_names_record_and_byte() {
        let dir = TempDir::new("bad_label");
        let path = dir.path().join("labels.bin");
        let mut bytes = record(1, 0);
        bytes.extend(record(9, 0));
        bytes.extend(record(10, 0));
        bytes.extend(record(255, 0));
        std::fs::write(&path, &bytes).unwrap();
        let err = read_batch_file(&path).unwrap_err();
        match &err {
            DataError::Label {
                record,
                byte,
                offset,
                ..
            } => {
                assert_eq!((*record, *byte, *offset), (2, 10, 2 * 3073));
            }
            other => panic!("expected a label error, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("labels.bin"), "{msg}");
        assert!(msg.contains("record 2"), "{msg}");
        assert!(msg.contains("label byte 10"), "{msg}");
        // The size alone is fine.
        assert_eq!(record_count(&path).unwrap(), 4);
    }

    #[test]
    fn from_bytes_and_extend() {
        let p = Path::new("mem");
        let mut a = Batch::from_bytes(p, &record(4, 7)).unwrap();
        let b = Batch::from_bytes(p, &[record(5, 1), record(6, 2)].concat()).unwrap();
        a.extend(&b);
        assert_eq!(a.labels, vec![4, 5, 6]);
        assert_eq!(a.image(2), &record(6, 2)[1..]);
        assert!(Batch::default().is_empty());
        assert!(matches!(
            Batch::from_bytes(p, &[]),
            Err(DataError::Empty { .. })
        ));
    }
}

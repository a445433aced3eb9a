//! A folder in the layout of the official `cifar-10-batches-bin` release: any subset of
//! `data_batch_1.bin` ... `data_batch_5.bin` (training) and `test_batch.bin` (test), and
//! optionally `batches.meta.txt` (class names, one per line).

use crate::cifar10::{read_batch_file, record_count, Batch, CLASSES, CLASS_NAMES};
use crate::error::{DataError, Result};
use std::path::{Path, PathBuf};

/// File names of the training batches, in order.
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// File name of the test batch.
pub const TEST_FILE: &str = "test_batch.bin";
/// File name of the class-name list.
pub const META_FILE: &str = "batches.meta.txt";

/// One batch file found in a folder, with its record count (from its size).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchFile {
    /// Path of the file.
    pub path: PathBuf,
    /// Number of records (`size / 3073`).
    pub records: usize,
}

/// The CIFAR-10 files present in a folder, found without reading their contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cifar10Files {
    /// The folder.
    pub dir: PathBuf,
    /// The training batches present, in `data_batch_1` ... `data_batch_5` order.
    pub train: Vec<BatchFile>,
    /// The test batch, when present.
    pub test: Option<BatchFile>,
    /// `batches.meta.txt`, when present.
    pub meta: Option<PathBuf>,
}

/// True when `path` exists; an error other than "not found" is reported.
fn present(path: &Path) -> Result<bool> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(DataError::Io {
            path: path.to_path_buf(),
            error,
        }),
    }
}

impl Cifar10Files {
    /// Lists the batch files of `dir` and their record counts (from the file sizes).
    ///
    /// Errors: `dir` missing or not a folder, a present batch file that is empty or not a
    /// whole number of records, or none of the six batch files present.
    pub fn scan(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let meta = std::fs::metadata(dir).map_err(|error| DataError::Io {
            path: dir.to_path_buf(),
            error,
        })?;
        if !meta.is_dir() {
            return Err(DataError::Io {
                path: dir.to_path_buf(),
                error: std::io::Error::other("not a directory"),
            });
        }
        let batch_file = |name: &str| -> Result<Option<BatchFile>> {
            let path = dir.join(name);
            if !present(&path)? {
                return Ok(None);
            }
            let records = record_count(&path)?;
            Ok(Some(BatchFile { path, records }))
        };
        let mut train = Vec::new();
        for name in TRAIN_FILES {
            train.extend(batch_file(name)?);
        }
        let test = batch_file(TEST_FILE)?;
        if train.is_empty() && test.is_none() {
            return Err(DataError::NoBatches {
                path: dir.to_path_buf(),
            });
        }
        let meta_path = dir.join(META_FILE);
        let meta = present(&meta_path)?.then_some(meta_path);
        Ok(Cifar10Files {
            dir: dir.to_path_buf(),
            train,
            test,
            meta,
        })
    }

    /// Total number of training records.
    pub fn train_records(&self) -> usize {
        self.train.iter().map(|f| f.records).sum()
    }

    /// Number of test records (0 without a test batch).
    pub fn test_records(&self) -> usize {
        self.test.as_ref().map_or(0, |f| f.records)
    }
}

/// Largest `batches.meta.txt` read (bytes): ten class names (the official file has 61 bytes).
const MAX_META_BYTES: u64 = 1 << 20;

/// Parses `batches.meta.txt`: ten class names, one per line, in label order. Surrounding
/// whitespace (and CR of CRLF line endings) is ignored, as are blank lines (the official
/// file ends with some).
pub fn read_class_names(path: &Path) -> Result<Vec<String>> {
    let bytes =
        flatmin_engine::fsread::read_regular_file(path, MAX_META_BYTES).map_err(|error| {
            DataError::Io {
                path: path.to_path_buf(),
                error,
            }
        })?;
    let meta_err = |detail: String| DataError::Meta {
        path: path.to_path_buf(),
        detail,
    };
    let text = String::from_utf8(bytes).map_err(|e| meta_err(format!("not UTF-8 text: {e}")))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != CLASSES {
        return Err(meta_err(format!(
            "{} class names, expected {CLASSES} (one per line)",
            names.len()
        )));
    }
    Ok(names)
}

/// A CIFAR-10 folder read into memory: the training batches joined in file order, the test
/// batch, and the class names.
#[derive(Clone, Debug)]
pub struct Cifar10 {
    files: Cifar10Files,
    train: Batch,
    test: Batch,
    class_names: Vec<String>,
}

impl Cifar10 {
    /// Reads every batch file present in `dir` (see [`Cifar10Files::scan`]) and the class
    /// names from `batches.meta.txt` when present (else the canonical names).
    ///
    /// Errors name the offending file: those of [`Cifar10Files::scan`] and
    /// [`read_batch_file`], and a `batches.meta.txt` that is not ten names.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let files = Cifar10Files::scan(dir)?;
        let mut train = Batch::default();
        for f in &files.train {
            train.extend(&read_batch_file(&f.path)?);
        }
        let test = match &files.test {
            Some(f) => read_batch_file(&f.path)?,
            None => Batch::default(),
        };
        let class_names = match &files.meta {
            Some(path) => read_class_names(path)?,
            None => CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
        };
        Ok(Cifar10 {
            files,
            train,
            test,
            class_names,
        })
    }

    /// The files that were read.
    pub fn files(&self) -> &Cifar10Files {
        &self.files
    }

    /// All training images (the `data_batch_N.bin` present, joined in order); empty when
    /// the folder has none.
    pub fn train(&self) -> &Batch {
        &self.train
    }

    /// The test images (`test_batch.bin`); empty when the folder has none.
    pub fn test(&self) -> &Batch {
        &self.test
    }

    /// The ten class names in label order.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// Consumes the dataset, returning the training and test batches.
    pub fn into_batches(self) -> (Batch, Batch) {
        (self.train, self.test)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cifar10::{IMAGE_BYTES, RECORD_BYTES};
    use crate::test_util::TempDir;

    fn write_records(path: &Path, labels: &[u8]) {
        let mut bytes = Vec::with_capacity(labels.len() * RECORD_BYTES);
        for (i, &l) in labels.iter().enumerate() {
            bytes.push(l);
            bytes.extend(vec![i as u8; IMAGE_BYTES]);
        }
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn subset_of_files_in_order() {
        let dir = TempDir::new("folder_subset");
        write_records(&dir.path().join("data_batch_3.bin"), &[3, 3]);
        write_records(&dir.path().join("data_batch_1.bin"), &[1]);
        write_records(&dir.path().join("test_batch.bin"), &[7, 8, 9]);
        let files = Cifar10Files::scan(dir.path()).unwrap();
        assert_eq!(files.train.len(), 2);
        assert!(files.train[0].path.ends_with("data_batch_1.bin"));
        assert!(files.train[1].path.ends_with("data_batch_3.bin"));
        assert_eq!((files.train_records(), files.test_records()), (3, 3));
        assert_eq!(files.meta, None);
        let data = Cifar10::open(dir.path()).unwrap();
        assert_eq!(data.train().labels, vec![1, 3, 3]);
        assert_eq!(data.train().image(2)[0], 1); // second record of data_batch_3
        assert_eq!(data.test().labels, vec![7, 8, 9]);
        assert_eq!(data.class_names()[0], "airplane");
        assert_eq!(data.class_names()[9], "truck");
        let (train, test) = data.into_batches();
        assert_eq!((train.len(), test.len()), (3, 3));
    }

    #[test]
    fn test_only_and_meta_file() {
        let dir = TempDir::new("folder_meta");
        write_records(&dir.path().join("test_batch.bin"), &[0]);
        let names = "a\r\nb\nc\nd\ne\nf\ng\nh\ni\nj\n\n\n";
        std::fs::write(dir.path().join(META_FILE), names).unwrap();
        let data = Cifar10::open(dir.path()).unwrap();
        assert!(data.train().is_empty());
        assert_eq!(data.test().len(), 1);
        assert_eq!(
            data.class_names(),
            ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
        );
    }

    #[test]
    fn bad_meta_file() {
        let dir = TempDir::new("folder_bad_meta");
        write_records(&dir.path().join("data_batch_2.bin"), &[0]);
        std::fs::write(dir.path().join(META_FILE), "a\nb\n").unwrap();
        let err = Cifar10::open(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::Meta { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(META_FILE) && msg.contains("2 class names"),
            "{msg}"
        );
        std::fs::write(dir.path().join(META_FILE), [0xffu8, 0xfe, b'\n']).unwrap();
        let err = Cifar10::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }

    #[test]
    fn folder_errors() {
        let dir = TempDir::new("folder_errors");
        // Missing folder.
        let missing = dir.path().join("nowhere");
        let err = Cifar10::open(&missing).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("nowhere"), "{err}");
        // A file, not a folder.
        let file = dir.path().join("plain.txt");
        std::fs::write(&file, "x").unwrap();
        let err = Cifar10::open(&file).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        // No batch files.
        let err = Cifar10::open(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::NoBatches { .. }), "{err:?}");
        // A bad batch file is reported by name, by scan (size) and by open (label).
        write_records(&dir.path().join("data_batch_1.bin"), &[0, 12]);
        let err = Cifar10::open(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::Label {
                    record: 1,
                    byte: 12,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("data_batch_1.bin"), "{err}");
        std::fs::write(dir.path().join("test_batch.bin"), vec![0u8; 3074]).unwrap();
        let err = Cifar10Files::scan(dir.path()).unwrap_err();
        assert!(
            matches!(err, DataError::Size { remainder: 1, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("test_batch.bin"), "{err}");
        std::fs::write(dir.path().join("test_batch.bin"), b"").unwrap();
        let err = Cifar10Files::scan(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }), "{err:?}");
    }
}

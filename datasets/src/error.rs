//! Typed errors of the dataset readers; every variant names the offending file or folder.

use std::path::PathBuf;
use thiserror::Error;

use crate::cifar10::RECORD_BYTES;

/// What can go wrong reading CIFAR-10 files.
#[derive(Debug, Error)]
pub enum DataError {
    /// A file or folder could not be opened or read (missing, unreadable, not a file).
    ///
    /// The message includes the OS error, which is therefore not also returned by
    /// `Error::source` (a reporter printing the chain would repeat it).
    #[error("{path}: {error}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A batch file holds no bytes at all.
    #[error("{path}: empty file (a CIFAR-10 batch holds {RECORD_BYTES}-byte records)")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A batch file's size is not a whole number of records.
    #[error(
        "{path}: size {size} bytes is not a multiple of the {RECORD_BYTES}-byte CIFAR-10 record \
         (remainder {remainder} bytes; truncated or not a CIFAR-10 batch?)"
    )]
    Size {
        /// The file.
        path: PathBuf,
        /// The file size in bytes.
        size: u64,
        /// `size % 3073`.
        remainder: u64,
    },
    /// A record's label byte is not a class index 0..=9.
    #[error(
        "{path}: record {record} (byte offset {offset}) has label byte {byte}, expected 0..=9"
    )]
    Label {
        /// The file.
        path: PathBuf,
        /// Index of the record in the file, from 0.
        record: usize,
        /// Byte offset of the label in the file.
        offset: u64,
        /// The label byte found.
        byte: u8,
    },
    /// `batches.meta.txt` is not a list of ten class names.
    #[error("{path}: {detail}")]
    Meta {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A folder holds none of the CIFAR-10 batch files.
    #[error(
        "{path}: no CIFAR-10 batch files (expected data_batch_1.bin ... data_batch_5.bin and/or \
         test_batch.bin)"
    )]
    NoBatches {
        /// The folder.
        path: PathBuf,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, DataError>;

//! flatmin-datasets: the CIFAR-10 binary format (one batch file or the folder of the
//! official release), the normalization used everywhere in flatmin, and typed errors that
//! name the offending file.
//!
//! ```no_run
//! use flatmin_datasets::{normalize_f32, read_batch_file, Cifar10};
//! # fn main() -> Result<(), flatmin_datasets::DataError> {
//! let batch = read_batch_file("data/cifar-10-batches-bin/test_batch.bin")?;
//! let x = normalize_f32(&batch); // NCHW [N, 3, 32, 32]
//! assert_eq!(x.len(), batch.len() * 3072);
//! let labels = batch.labels_usize();
//!
//! let data = Cifar10::open("data/cifar-10-batches-bin")?;
//! println!("{} train, {} test images", data.train().len(), data.test().len());
//! # let _ = labels; Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod augment;
pub mod cifar10;
pub mod error;
pub mod folder;
pub mod loader;
pub mod normalize;
mod seed;
pub mod subset;
pub mod synthetic;
pub mod test_data;
#[cfg(test)]
mod test_util;

pub use augment::{apply_draw, flip_horizontal, Augment, AugmentDraw};
pub use cifar10::{
    read_batch_file, record_count, Batch, CLASSES, CLASS_NAMES, IMAGE_BYTES, RECORD_BYTES,
};
pub use error::{DataError, Result};
pub use folder::{
    read_class_names, BatchFile, Cifar10, Cifar10Files, META_FILE, TEST_FILE, TRAIN_FILES,
};
pub use loader::{Batches, Element, Loader, LoaderError, MiniBatch, DEFAULT_PREFETCH};
pub use normalize::{
    normalize_f32, normalize_f64, normalize_pixel, normalize_pixels_f32, normalize_pixels_f64,
    MEAN, STD,
};
pub use subset::{balanced_indices, balanced_subset, class_counts, select, SubsetError};
pub use synthetic::synthetic;

//! flatmin as a library: reproducible training runs on CIFAR-10 (data sources, run folders
//! with config, metrics and atomic checkpoints, bit-identical resume), used by the `flatmin`
//! command line and usable from Rust.
#![warn(missing_docs)]

pub mod data;
pub mod fetch;
pub mod plot;
pub mod train;

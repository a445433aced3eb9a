//! flatmin-models: the preset networks of flatmin (`tiny-tanh`, `mlp-s`, `cnn-s`, `resnet20`,
//! `resnet18`) and custom MLPs, matching the PyTorch definitions in `reference_models.md`
//! (names, shapes, layouts, forward, default initialization), with safetensors state I/O.
#![warn(missing_docs)]

pub mod arch;
pub mod error;
pub mod io;
pub mod model;
mod structure;

pub use arch::{Activation, Arch, MAX_PARAMS, PRESETS};
pub use error::{ModelError, Result};
pub use model::{BnUse, Entry, EntryKind, EntryValue, Evaluation, Model};

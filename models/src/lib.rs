//! flatmin-models: models on flatmin-engine's network description ([`Net`]): the presets
//! (`tiny-tanh`, `mlp-s`, `cnn-s`, `resnet20`, `resnet18`) and custom MLPs, matching the
//! PyTorch definitions in `reference_models.md` (names, shapes, layouts, forward, default
//! initialization), networks read from network files (`docs/network-file.md`), and
//! safetensors state I/O.
#![warn(missing_docs)]

pub mod arch;
pub mod error;
pub mod io;
pub mod measure;
pub mod model;
pub mod netfile;
pub mod spectrum;

pub use arch::{Activation, Arch, MAX_PARAMS, PRESETS};
pub use error::{ModelError, Result};
pub use flatmin_engine::net::Net;
pub use model::{BnUse, Entry, EntryKind, EntryValue, Evaluation, Model};
pub use netfile::{network_json, parse_network, read_network};

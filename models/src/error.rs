//! Errors of model construction and state I/O; every variant names the offending file,
//! tensor or model.

use std::path::PathBuf;
use thiserror::Error;

/// What can go wrong building a model or moving its state through files.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error (part of the message, so a chain printer does not repeat it).
        cause: std::io::Error,
    },
    /// A file is not a valid safetensors file.
    #[error("{path}: not a valid safetensors file: {detail}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A tensor the model needs is absent from the file.
    #[error("{path}: missing tensor '{name}'")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// The file holds a tensor the model does not have.
    #[error("{path}: unexpected tensor '{name}' (not part of this model)")]
    Unexpected {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("{path}: tensor '{name}' has shape {got:?}, expected {expected:?}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A tensor has an unsupported element type.
    #[error("{path}: tensor '{name}' has dtype {dtype}, expected {expected}")]
    Dtype {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The dtype in the file.
        dtype: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// A tensor holds NaN or infinity where finite values are required.
    #[error("{path}: tensor '{name}' contains non-finite values")]
    NonFinite {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// The destination exists but is not a regular file (a folder, link or device).
    #[error("{0}: exists and is not a regular file; refusing to replace it")]
    NotAFile(PathBuf),
    /// A network file that cannot be used (`docs/network-file.md`).
    #[error("{origin}: {detail}")]
    Network {
        /// The file.
        origin: String,
        /// What is wrong, naming the layer.
        detail: String,
    },
    /// An unknown model name or malformed model spec.
    #[error("unknown model '{0}' (presets: tiny-tanh, mlp-s, cnn-s, resnet20, resnet18; custom: mlp:W1,W2,...:ACT; or a network file NAME.json)")]
    UnknownModel(String),
    /// A custom model with more parameters than [`crate::arch::MAX_PARAMS`] (or than a
    /// machine word can count).
    #[error("model '{name}' has {params} parameters, more than the {max} a model may have")]
    TooLarge {
        /// The model spec.
        name: String,
        /// Its parameter count, as a decimal string ("more than 2^64" on overflow).
        params: String,
        /// The limit.
        max: usize,
    },
    /// A curvature measurement that cannot be made as asked ([`crate::measure`]).
    #[error(transparent)]
    Measure(#[from] crate::measure::MeasureError),
    /// An engine error (shapes, labels).
    #[error(transparent)]
    Engine(#[from] flatmin_engine::EngineError),
}

impl From<ModelError> for flatmin_engine::EngineError {
    /// An engine error as it was; any other model error as a shape error of the forward pass
    /// carrying its message (for loss closures that must return engine errors).
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Engine(e) => e,
            other => flatmin_engine::EngineError::Shape {
                op: "forward",
                detail: other.to_string(),
            },
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;

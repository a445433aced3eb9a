//! Errors of model construction and state I/O; every variant names the offending file,
//! tensor or model.

use std::borrow::Cow;
use std::path::PathBuf;
use thiserror::Error;

/// Most characters of a name taken from a file (a tensor name, a dtype) that a message shows.
pub const MAX_NAME_CHARS: usize = 120;
/// Most characters of a format error's detail that a message shows.
const MAX_DETAIL_CHARS: usize = 400;
/// Most dimensions of a shape that a message shows.
pub const MAX_SHAPE_DIMS: usize = 8;

/// `text` cut to at most `max` characters, with what was left out counted, so that a file
/// cannot make an error message arbitrarily long.
fn clip(text: &str, max: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => Cow::Borrowed(text),
        Some((at, _)) => Cow::Owned(format!("{}… ({} more bytes)", &text[..at], text.len() - at)),
    }
}

/// A name taken from a file, for a one-line message: at most [`MAX_NAME_CHARS`] characters.
pub fn brief(name: &str) -> Cow<'_, str> {
    clip(name, MAX_NAME_CHARS)
}

/// A shape for a one-line message: `[2, 3]`, or, beyond [`MAX_SHAPE_DIMS`] dimensions, the
/// first ones and the count (`[1, 1, 1, 1, 1, 1, 1, 1, … (50000 dimensions)]`).
pub fn brief_shape(shape: &[usize]) -> String {
    let shown: Vec<String> = shape
        .iter()
        .take(MAX_SHAPE_DIMS)
        .map(|d| d.to_string())
        .collect();
    if shape.len() > MAX_SHAPE_DIMS {
        format!("[{}, … ({} dimensions)]", shown.join(", "), shape.len())
    } else {
        format!("[{}]", shown.join(", "))
    }
}

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
    #[error("{path}: not a valid safetensors file: {}", clip(.detail, MAX_DETAIL_CHARS))]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A tensor the model needs is absent from the file.
    #[error("{path}: missing tensor '{}'", brief(.name))]
    Missing {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// The file holds a tensor the model does not have.
    #[error("{path}: unexpected tensor '{}' (not part of this model)", brief(.name))]
    Unexpected {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("{path}: tensor '{}' has shape {}, expected {}", brief(.name), brief_shape(.got), brief_shape(.expected))]
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
    #[error("{path}: tensor '{}' has dtype {}, expected {expected}", brief(.name), brief(.dtype))]
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
    #[error("{path}: tensor '{}' contains non-finite values", brief(.name))]
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

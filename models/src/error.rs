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

/// Most names of each list that a name-mismatch message shows.
const MAX_LISTED_NAMES: usize = 6;

/// Names for a one-line message: the first [`MAX_LISTED_NAMES`], each clipped, and the count.
fn listed<'a>(names: impl ExactSizeIterator<Item = &'a str>) -> String {
    let n = names.len();
    let shown: Vec<String> = names
        .take(MAX_LISTED_NAMES)
        .map(|s| format!("'{}'", brief(s)))
        .collect();
    let more = if n > MAX_LISTED_NAMES { ", …" } else { "" };
    format!("{n}: {}{more}", shown.join(", "))
}

/// The detail of a name mismatch: what the file holds, what the model expects, and, when
/// every name of the file is an expected one behind one prefix (a wrapped `state_dict`:
/// `model.`, `module.`), the `--strip-prefix` that loads it.
pub fn names_held_and_expected(found: &[&str], expected: &[&str]) -> String {
    let mut text = format!(
        "the file holds {}; the model expects {}",
        listed(found.iter().copied()),
        listed(expected.iter().copied())
    );
    let prefix = found.first().and_then(|n| n.find('.').map(|i| &n[..=i]));
    if let Some(p) = prefix {
        let stripped = |n: &&str| n.strip_prefix(p).is_some_and(|s| expected.contains(&s));
        if found.iter().all(stripped) {
            text.push_str(&format!(
                "; the file's names carry the prefix '{}': pass --strip-prefix {}",
                brief(p),
                brief(p)
            ));
        }
    }
    text
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
    #[error("{path}: missing tensor '{}'; {names}", brief(.name))]
    Missing {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// What the file holds and what the model expects ([`names_held_and_expected`]).
        names: String,
    },
    /// The file holds a tensor the model does not have.
    #[error("{path}: unexpected tensor '{}' (not part of this model); {names}", brief(.name))]
    Unexpected {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// What the file holds and what the model expects ([`names_held_and_expected`]).
        names: String,
    },
    /// The file was written by `torch.save` (a zip archive or a legacy pickle), not as
    /// safetensors.
    #[error(
        "{path}: this is a PyTorch {kind} file (torch.save), not safetensors: convert it with: \
         python -c \"import torch; from safetensors.torch import save_file; sd = torch.load('{path}', \
         map_location='cpu'); sd = sd.get('state_dict', sd); save_file({{k: v.contiguous() for k, v \
         in sd.items()}}, '{converted}')\"",
        converted = .path.with_extension("safetensors").display()
    )]
    Torch {
        /// The file.
        path: PathBuf,
        /// `zip` or `legacy pickle`.
        kind: &'static str,
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

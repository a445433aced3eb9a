//! Typed errors of the engine, checked once when an op is recorded.

use thiserror::Error;

/// What can go wrong when building or differentiating a computation.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum EngineError {
    /// Input shapes do not fit the op.
    #[error("{op}: shape mismatch: {detail}")]
    Shape {
        /// Name of the op.
        op: &'static str,
        /// What did not fit, with the shapes.
        detail: String,
    },
    /// A tensor's data length does not match its shape.
    #[error("tensor of shape {shape:?} needs {expected} elements, got {got}")]
    DataLength {
        /// The requested shape.
        shape: Vec<usize>,
        /// The element count the shape implies.
        expected: usize,
        /// The element count supplied.
        got: usize,
    },
    /// A class label outside `0..classes`.
    #[error("{op}: label {label} at row {row} is outside 0..{classes}")]
    Label {
        /// Name of the op.
        op: &'static str,
        /// Offending label.
        label: usize,
        /// Row of the batch.
        row: usize,
        /// Number of classes.
        classes: usize,
    },
    /// A tangent has the wrong shape for its value.
    #[error("tangent of shape {got:?} does not match [K={k}] + {value:?}")]
    Tangent {
        /// The tape's number of directions.
        k: usize,
        /// The value's shape.
        value: Vec<usize>,
        /// The tangent's shape.
        got: Vec<usize>,
    },
    /// The backward pass was started from a non-scalar value.
    #[error("backward needs a scalar output, got shape {0:?}")]
    NotScalar(Vec<usize>),
    /// A network description that does not hold together (see [`crate::net::Net`]).
    #[error("layer '{layer}': {detail}")]
    Net {
        /// Name of the offending layer.
        layer: String,
        /// What is wrong, with the shapes or names involved.
        detail: String,
    },
    /// A Var from another tape, or one out of range.
    #[error("variable {0} does not belong to this tape")]
    UnknownVar(usize),
}

/// Result alias of the engine.
pub type Result<T> = std::result::Result<T, EngineError>;

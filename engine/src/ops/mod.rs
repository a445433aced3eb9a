//! Ops, one file per family. Each op keeps its four rules together: value, JVP (tangent of
//! the value), VJP (adjoint), and the tangent of the VJP. The value and JVP run when the op
//! is recorded (a `Tape` method in the family's file); the VJP and its tangent run in the
//! family's [`Rule`] implementation. Adding an op: one file (or one variant in a family) plus
//! one line in [`Op`].

pub(crate) mod activation;
pub(crate) mod conv;
pub(crate) mod conv_pool;
pub(crate) mod conv_stream;
pub(crate) mod elementwise;
pub(crate) mod loss;
pub(crate) mod matmul;
pub(crate) mod norm;
pub(crate) mod pool;
pub(crate) mod shape;

use crate::scalar::Scalar;
use crate::tape::{Sink, Tape};
use crate::tensor::Tensor;

pub use activation::Unary;
pub use conv_pool::MaxPoolAfter;
pub use loss::{Loss, SampleHead};
pub use norm::{BatchStats, BnMode};

/// Backward rules of one recorded op.
pub(crate) trait Rule<T: Scalar> {
    /// Tape ids of the op's inputs.
    fn inputs(&self) -> Vec<usize>;
    /// Given the output's adjoint `gy` (and its tangent `gdot`, `[K, ...]`), deposit the
    /// inputs' adjoints and adjoint tangents into `sink`. `out` is the op's own node id.
    fn backward(
        &self,
        tape: &Tape<T>,
        out: usize,
        gy: &Tensor<T>,
        gdot: Option<&Tensor<T>>,
        sink: &mut Sink<T>,
    );
}

/// The closed set of recorded ops.
pub(crate) enum Op<T> {
    Leaf,
    Unary(activation::UnaryOp<T>),
    Binary(elementwise::BinaryOp),
    Product(matmul::Product),
    Conv2d(conv::Conv2d),
    ConvMaxPool(conv_pool::ConvMaxPool),
    MaxPool2d(pool::MaxPool2d),
    AvgPool2d(pool::AvgPool2d),
    BatchNorm2d(norm::BatchNorm2d<T>),
    Sum(shape::Sum),
    Reshape(shape::Reshape),
    LogSoftmax(loss::LogSoftmax),
    CrossEntropy(loss::CrossEntropy<T>),
}

impl<T: Scalar> Op<T> {
    fn rule(&self) -> Option<&dyn Rule<T>> {
        match self {
            Op::Leaf => None,
            Op::Unary(o) => Some(o),
            Op::Binary(o) => Some(o),
            Op::Product(o) => Some(o),
            Op::Conv2d(o) => Some(o),
            Op::ConvMaxPool(o) => Some(o),
            Op::MaxPool2d(o) => Some(o),
            Op::AvgPool2d(o) => Some(o),
            Op::BatchNorm2d(o) => Some(o),
            Op::Sum(o) => Some(o),
            Op::Reshape(o) => Some(o),
            Op::LogSoftmax(o) => Some(o),
            Op::CrossEntropy(o) => Some(o),
        }
    }

    pub(crate) fn inputs(&self) -> Vec<usize> {
        self.rule().map(|r| r.inputs()).unwrap_or_default()
    }

    pub(crate) fn backward(
        &self,
        tape: &Tape<T>,
        out: usize,
        gy: &Tensor<T>,
        gdot: Option<&Tensor<T>>,
        sink: &mut Sink<T>,
    ) {
        if let Some(r) = self.rule() {
            r.backward(tape, out, gy, gdot, sink);
        }
    }
}

/// Shape of the tangents of a value: `[k, ...shape]`.
pub(crate) fn tangent_shape(k: usize, shape: &[usize]) -> Vec<usize> {
    let mut s = Vec::with_capacity(shape.len() + 1);
    s.push(k);
    s.extend_from_slice(shape);
    s
}

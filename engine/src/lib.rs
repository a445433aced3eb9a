//! flatmin-engine: a reverse-mode tape autodiff with exact Hessian-vector products.
//!
//! Build a computation on a [`Tape`], call [`Tape::backward`] from a scalar, and read
//! gradients — and, when the tape carries `K` tangent directions, the exact Hessian-vector
//! products `H v_1 … H v_K` (forward-over-reverse). Kernels are GEMM-based (packed
//! AVX-512 / AVX2+FMA microkernels chosen at run time, `matrixmultiply` elsewhere), parallel
//! with `rayon` in fixed chunks (bit-identical for any thread count), and generic over `f32`
//! and `f64`.
//!
//! ```
//! use flatmin_engine::{Tape, Tensor};
//! // f(w) = sum(tanh(x w)) at w, and H v for one direction v.
//! let mut tape = Tape::<f64>::new(1);
//! let x = tape.constant(Tensor::from_vec(&[1, 2], vec![0.5, -1.0]).unwrap());
//! let w = tape.param(
//!     Tensor::from_vec(&[2, 1], vec![0.3, 0.2]).unwrap(),
//!     Some(Tensor::from_vec(&[1, 2, 1], vec![1.0, 0.0]).unwrap()),
//! ).unwrap();
//! let y = tape.matmul(x, w).unwrap();
//! let t = tape.tanh(y).unwrap();
//! let f = tape.sum(t).unwrap();
//! let grads = tape.backward(f).unwrap();
//! let g = grads.grad(&tape, w);   // ∇f, shape [2, 1]
//! let hv = grads.hvp(&tape, w);   // H v, shape [1, 2, 1]
//! assert_eq!(g.shape(), &[2, 1]);
//! assert_eq!(hv.shape(), &[1, 2, 1]);
//! ```
#![warn(missing_docs)]

pub mod check;
pub mod curvature;
pub mod error;
pub mod fsread;
pub mod kernels;
pub mod net;
mod ops;
pub mod runtime;
pub mod scalar;
mod tape;
pub mod tensor;

pub use error::{EngineError, Result};
pub use ops::{BatchStats, BnMode, Loss, MaxPoolAfter, SampleHead, Unary};
pub use scalar::{DType, Scalar};
pub use tape::{Grads, Tape, Var};
pub use tensor::Tensor;

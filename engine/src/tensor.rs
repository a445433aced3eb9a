//! `Tensor<T>`: a shape and a contiguous row-major buffer.

use crate::error::{EngineError, Result};
use crate::scalar::Scalar;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use std::sync::Arc;

/// A dense, contiguous, row-major n-dimensional array.
///
/// The buffer is shared between clones and copied on the first write to a shared one
/// ([`Tensor::data_mut`]), so handing parameters and inputs to a tape costs no copy while
/// clones still behave as independent values.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<T> {
    shape: Vec<usize>,
    data: Arc<Vec<T>>,
}

/// Number of elements of a shape (1 for a scalar shape `[]`).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl<T: Scalar> Tensor<T> {
    /// Wraps `data` with `shape`; fails if the lengths disagree.
    pub fn from_vec(shape: &[usize], data: Vec<T>) -> Result<Self> {
        if numel(shape) != data.len() {
            return Err(EngineError::DataLength {
                shape: shape.to_vec(),
                expected: numel(shape),
                got: data.len(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data: Arc::new(data),
        })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: Arc::new(vec![T::zero(); numel(shape)]),
        }
    }

    /// A tensor filled with `v`.
    pub fn full(shape: &[usize], v: T) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: Arc::new(vec![v; numel(shape)]),
        }
    }

    /// A scalar (shape `[]`).
    pub fn scalar(v: T) -> Self {
        Tensor {
            shape: vec![],
            data: Arc::new(vec![v]),
        }
    }

    /// Standard-normal entries drawn from `rng`.
    pub fn randn<R: Rng + ?Sized>(shape: &[usize], rng: &mut R) -> Self {
        let data = (0..numel(shape))
            .map(|_| {
                let z: f64 = StandardNormal.sample(rng);
                T::c(z)
            })
            .collect();
        Tensor {
            shape: shape.to_vec(),
            data: Arc::new(data),
        }
    }

    /// Uniform entries in `[lo, hi)` drawn from `rng`.
    pub fn uniform<R: Rng + ?Sized>(shape: &[usize], lo: f64, hi: f64, rng: &mut R) -> Self {
        let data = (0..numel(shape))
            .map(|_| T::c(rng.gen_range(lo..hi)))
            .collect();
        Tensor {
            shape: shape.to_vec(),
            data: Arc::new(data),
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The elements in row-major order.
    pub fn data(&self) -> &[T] {
        &self.data
    }

    /// Mutable elements in row-major order (copies the buffer first if a clone shares it).
    pub fn data_mut(&mut self) -> &mut [T] {
        Arc::make_mut(&mut self.data).as_mut_slice()
    }

    /// True when no clone shares the buffer (a write would not copy it first).
    pub(crate) fn is_unique(&self) -> bool {
        Arc::strong_count(&self.data) == 1
    }

    /// Consumes the tensor, returning its buffer (a copy if a clone shares it).
    pub fn into_vec(self) -> Vec<T> {
        Arc::try_unwrap(self.data).unwrap_or_else(|shared| shared.as_ref().clone())
    }

    /// The single element of a one-element tensor.
    pub fn item(&self) -> Option<T> {
        if self.data.len() == 1 {
            Some(self.data[0])
        } else {
            None
        }
    }

    /// The same data under another shape with the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        if numel(shape) != self.data.len() {
            return Err(EngineError::DataLength {
                shape: shape.to_vec(),
                expected: numel(shape),
                got: self.data.len(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data: self.data,
        })
    }

    /// Converts every element to another float type.
    pub fn cast<U: Scalar>(&self) -> Tensor<U> {
        Tensor {
            shape: self.shape.clone(),
            data: Arc::new(
                self.data
                    .iter()
                    .map(|&x| U::c(x.to_f64().unwrap_or(f64::NAN)))
                    .collect(),
            ),
        }
    }

    /// Sum of elementwise products with `other` (same element count), accumulated in f64.
    pub fn dot(&self, other: &Tensor<T>) -> f64 {
        self.data
            .iter()
            .zip(other.data.iter())
            .map(|(&a, &b)| a.to_f64().unwrap_or(f64::NAN) * b.to_f64().unwrap_or(f64::NAN))
            .sum()
    }

    /// Largest absolute entry (0 for an empty tensor).
    pub fn max_abs(&self) -> f64 {
        self.data
            .iter()
            .map(|x| x.to_f64().unwrap_or(f64::NAN).abs())
            .fold(0.0, f64::max)
    }

    /// True when every entry is finite.
    pub fn all_finite(&self) -> bool {
        self.data.iter().all(|x| x.is_finite())
    }

    /// `self += alpha * other` elementwise (same element count).
    pub fn axpy(&mut self, alpha: T, other: &Tensor<T>) {
        for (a, &b) in self.data_mut().iter_mut().zip(other.data.iter()) {
            *a = *a + alpha * b;
        }
    }

    /// Slice `i` along the leading dimension, as a new tensor (sharing the buffer, copied on
    /// a later write, when the leading dimension is 1).
    pub fn index0(&self, i: usize) -> Tensor<T> {
        let inner = numel(&self.shape[1..]);
        if self.shape[0] == 1 && i == 0 {
            return Tensor {
                shape: self.shape[1..].to_vec(),
                data: Arc::clone(&self.data),
            };
        }
        Tensor {
            shape: self.shape[1..].to_vec(),
            data: Arc::new(self.data[i * inner..(i + 1) * inner].to_vec()),
        }
    }

    /// Stacks equally shaped tensors along a new leading dimension (one part: its buffer is
    /// shared, not copied).
    pub fn stack(parts: &[Tensor<T>]) -> Result<Tensor<T>> {
        let inner = parts.first().map(|p| p.shape.clone()).unwrap_or_default();
        if let [only] = parts {
            let mut shape = vec![1];
            shape.extend_from_slice(&inner);
            return Ok(Tensor {
                shape,
                data: Arc::clone(&only.data),
            });
        }
        let mut data = Vec::with_capacity(parts.len() * numel(&inner));
        for p in parts {
            if p.shape != inner {
                return Err(EngineError::Shape {
                    op: "stack",
                    detail: format!("{:?} vs {:?}", p.shape, inner),
                });
            }
            data.extend_from_slice(&p.data);
        }
        let mut shape = vec![parts.len()];
        shape.extend_from_slice(&inner);
        Ok(Tensor {
            shape,
            data: Arc::new(data),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clones share the buffer until one is written; then they are independent values.
    #[test]
    fn clones_are_copy_on_write() {
        let a = Tensor::from_vec(&[3], vec![1.0f64, 2.0, 3.0]).unwrap();
        let mut b = a.clone();
        assert!(
            std::ptr::eq(a.data().as_ptr(), b.data().as_ptr()),
            "clone shares"
        );
        b.data_mut()[0] = 10.0;
        assert_eq!(a.data(), &[1.0, 2.0, 3.0]);
        assert_eq!(b.data(), &[10.0, 2.0, 3.0]);
        let r = a.clone().reshape(&[1, 3]).unwrap();
        assert_eq!(r.shape(), &[1, 3]);
        assert!(a.clone().reshape(&[2, 2]).is_err());
        assert_eq!(a.clone().into_vec(), vec![1.0, 2.0, 3.0]);
        assert_eq!(a.data(), &[1.0, 2.0, 3.0]);
    }

    /// Stacking one part and taking the only slice of a leading 1 share the buffer and keep
    /// their values when either side is written; two parts and other slices copy.
    #[test]
    fn single_stacks_and_slices_share_until_written() {
        let a = Tensor::from_vec(&[2], vec![1.0f64, 2.0]).unwrap();
        let mut one = Tensor::stack(std::slice::from_ref(&a)).unwrap();
        assert_eq!(one.shape(), &[1, 2]);
        assert!(std::ptr::eq(a.data().as_ptr(), one.data().as_ptr()));
        let mut back = one.index0(0);
        assert_eq!(back.shape(), &[2]);
        assert!(std::ptr::eq(a.data().as_ptr(), back.data().as_ptr()));
        one.data_mut()[0] = 5.0;
        back.data_mut()[1] = 7.0;
        assert_eq!(a.data(), &[1.0, 2.0]);
        assert_eq!(one.data(), &[5.0, 2.0]);
        assert_eq!(back.data(), &[1.0, 7.0]);
        let two = Tensor::stack(&[a.clone(), back]).unwrap();
        assert_eq!(two.shape(), &[2, 2]);
        assert_eq!(two.data(), &[1.0, 2.0, 1.0, 7.0]);
        assert_eq!(two.index0(1).data(), &[1.0, 7.0]);
        assert!(Tensor::stack(&[a, Tensor::zeros(&[3])]).is_err());
    }
}

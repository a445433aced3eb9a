//! Conversions between numpy arrays and flatmin tensors, and flatmin errors as Python
//! exceptions. Every check names the argument it refuses.

use flatmin_engine::{Scalar, Tensor};
use flatmin_models::ModelError;
use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

/// A `ValueError` with `msg`.
pub fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

/// An error's message followed by its causes (those not already part of it).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !msg.contains(&part) {
            msg.push_str(": ");
            msg.push_str(&part);
        }
        source = s.source();
    }
    msg
}

/// A model error as a Python exception: reading a file that failed is an `OSError`,
/// everything else (bad names, shapes, values, options) a `ValueError`.
pub fn model_error(e: ModelError) -> PyErr {
    let msg = chain(&e);
    match e {
        ModelError::Io { .. } => PyOSError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// The elements and shape of a float32 or float64 numpy array, converted to `T`.
/// Contiguous arrays (what the Python layer passes) are copied as slices, a plain memory copy
/// when the types agree.
pub fn tensor<T: Scalar>(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Tensor<T>> {
    let (shape, data): (Vec<usize>, Vec<T>) = if let Ok(a) = obj.cast::<PyArrayDyn<f64>>() {
        let ro = a.readonly();
        let data = match ro.as_slice() {
            Ok(s) => converted(s),
            Err(_) => ro.as_array().iter().map(|&x| T::c(x)).collect(),
        };
        (a.shape().to_vec(), data)
    } else if let Ok(a) = obj.cast::<PyArrayDyn<f32>>() {
        let ro = a.readonly();
        let data = match ro.as_slice() {
            Ok(s) => converted(s),
            Err(_) => ro.as_array().iter().map(|&x| T::c(x as f64)).collect(),
        };
        (a.shape().to_vec(), data)
    } else {
        return Err(value_error(format!(
            "{what}: expected a float32 or float64 numpy array, got {}",
            describe(obj)
        )));
    };
    Tensor::from_vec(&shape, data).map_err(|e| value_error(format!("{what}: {e}")))
}

/// `s` in the float type `T`: a plain copy when `S` is `T`, else element by element.
fn converted<S: Scalar, T: Scalar>(s: &[S]) -> Vec<T> {
    let copy: Box<dyn std::any::Any> = Box::new(s.to_vec());
    match copy.downcast::<Vec<T>>() {
        Ok(same) => *same,
        Err(_) => s
            .iter()
            .map(|&x| T::c(x.to_f64().unwrap_or(f64::NAN)))
            .collect(),
    }
}

/// Whether every element is finite (a fold without early exit, which vectorizes).
pub fn all_finite<T: Scalar>(v: &[T]) -> bool {
    v.iter().fold(true, |ok, x| ok & x.is_finite())
}

/// Labels from an int64 numpy array of shape `[n]`, each in `0..classes`.
pub fn labels(
    obj: &Bound<'_, PyAny>,
    n: usize,
    classes: usize,
    what: &str,
) -> PyResult<Vec<usize>> {
    let a = obj.cast::<PyArrayDyn<i64>>().map_err(|_| {
        value_error(format!(
            "{what}: expected an integer numpy array of labels, got {}",
            describe(obj)
        ))
    })?;
    if a.shape() != [n] {
        return Err(value_error(format!(
            "{what}: expected shape [{n}] (one label per image), got {:?}",
            a.shape()
        )));
    }
    let ro = a.readonly();
    ro.as_array()
        .iter()
        .map(|&l| {
            usize::try_from(l)
                .ok()
                .filter(|&l| l < classes)
                .ok_or_else(|| {
                    value_error(format!(
                        "{what}: label {l} is out of range; the network has {classes} classes (0..{})",
                        classes - 1
                    ))
                })
        })
        .collect()
}

/// A short description of a Python value for error messages (its type, and for arrays the
/// dtype).
fn describe(obj: &Bound<'_, PyAny>) -> String {
    let ty = obj
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into());
    match obj.getattr("dtype") {
        Ok(d) => format!("{ty} of dtype {d}"),
        Err(_) => ty,
    }
}

/// A tensor as a numpy array of its own float type and shape (the data is moved, not copied).
pub fn array<'py, T: Scalar + numpy::Element>(
    py: Python<'py>,
    t: Tensor<T>,
) -> PyResult<Bound<'py, PyAny>> {
    let shape = t.shape().to_vec();
    let flat = t.into_vec().into_pyarray(py);
    Ok(flat.reshape(shape)?.into_any())
}

/// Flat values as a 1-D float64 numpy array.
pub fn vector<'py>(py: Python<'py>, v: Vec<f64>) -> Bound<'py, PyAny> {
    v.into_pyarray(py).into_any()
}

//! Vector operations on parameter lists (one tensor per parameter, seen together as one flat
//! vector): inner products and norms accumulated in f64, shifted points, and the
//! projecting-out operator `Proj⊥_u(w)` of paper.md §1.4.

use flatmin_engine::{Scalar, Tensor};

/// `⟨a, b⟩` over all tensors, accumulated in f64.
pub fn dot<T: Scalar>(a: &[Tensor<T>], b: &[Tensor<T>]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x.dot(y)).sum()
}

/// Euclidean norm over all tensors (same as [`crate::global_norm`]).
pub fn norm<T: Scalar>(a: &[Tensor<T>]) -> f64 {
    dot(a, a).sqrt()
}

/// `x + s · dir`, as new tensors (the parameters are not touched).
pub fn shifted<T: Scalar>(x: &[Tensor<T>], dir: &[Tensor<T>], s: f64) -> Vec<Tensor<T>> {
    let s = T::c(s);
    x.iter()
        .zip(dir)
        .map(|(p, d)| {
            let mut out = p.clone();
            out.axpy(s, d);
            out
        })
        .collect()
}

/// `s · a`, as new tensors.
pub fn scaled<T: Scalar>(a: &[Tensor<T>], s: f64) -> Vec<Tensor<T>> {
    let s = T::c(s);
    a.iter()
        .map(|t| {
            let mut out = t.clone();
            out.data_mut().iter_mut().for_each(|v| *v = *v * s);
            out
        })
        .collect()
}

/// `acc += s · a`.
pub fn add_scaled<T: Scalar>(acc: &mut [Tensor<T>], a: &[Tensor<T>], s: f64) {
    let s = T::c(s);
    for (x, y) in acc.iter_mut().zip(a) {
        x.axpy(s, y);
    }
}

/// Zero tensors shaped like `like`.
pub fn zeros_like<T: Scalar>(like: &[Tensor<T>]) -> Vec<Tensor<T>> {
    like.iter().map(|t| Tensor::zeros(t.shape())).collect()
}

/// `Proj⊥_u(w) = w − (⟨u, w⟩ / ‖u‖²) u`: removes from `w` its component along `u`.
///
/// Convention (paper.md §1.4, (X)): when `u = 0` (or `‖u‖²` is not a positive finite
/// number) there is no direction to remove and `w` is returned unchanged.
pub fn proj_out<T: Scalar>(u: &[Tensor<T>], w: &[Tensor<T>]) -> Vec<Tensor<T>> {
    let uu = dot(u, u);
    if !(uu > 0.0 && uu.is_finite()) {
        return w.to_vec();
    }
    let c = dot(u, w) / uu;
    shifted(w, u, -c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f64]) -> Vec<Tensor<f64>> {
        vec![Tensor::from_vec(&[v.len()], v.to_vec()).unwrap()]
    }

    #[test]
    fn projection_is_orthogonal_idempotent_and_safe_at_zero() {
        let u = t(&[1.0, 2.0, -2.0]);
        let w = t(&[0.5, -1.0, 3.0]);
        let p = proj_out(&u, &w);
        assert!(dot(&u, &p).abs() < 1e-14);
        let pp = proj_out(&u, &p);
        for (a, b) in p[0].data().iter().zip(pp[0].data()) {
            assert!((a - b).abs() < 1e-15);
        }
        // Hand value: <u,w> = 0.5 - 2 - 6 = -7.5, |u|^2 = 9 -> w + (7.5/9) u.
        let want = [0.5 + 7.5 / 9.0, -1.0 + 15.0 / 9.0, 3.0 - 15.0 / 9.0];
        for (a, b) in p[0].data().iter().zip(want) {
            assert!((a - b).abs() < 1e-15);
        }
        let zero = t(&[0.0, 0.0, 0.0]);
        assert_eq!(proj_out(&zero, &w), w);
    }
}

//! Pooling over one plane (H x W), no padding.

use crate::scalar::Scalar;

/// Shape of a pooling window over one plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    /// Plane height.
    pub h: usize,
    /// Plane width.
    pub w: usize,
    /// Window height.
    pub kh: usize,
    /// Window width.
    pub kw: usize,
    /// Stride (both directions).
    pub stride: usize,
}

impl PoolGeom {
    /// Output height.
    pub fn ho(&self) -> usize {
        (self.h - self.kh) / self.stride + 1
    }
    /// Output width.
    pub fn wo(&self) -> usize {
        (self.w - self.kw) / self.stride + 1
    }
    /// Output elements per plane.
    pub fn out_len(&self) -> usize {
        self.ho() * self.wo()
    }
}

/// Max pooling of one plane; `arg` receives the in-plane index of each maximum.
/// Ties go to the first maximum in row-major window order (NaN propagates).
pub fn max_plane<T: Scalar>(g: &PoolGeom, x: &[T], y: &mut [T], arg: &mut [u32]) {
    let wo = g.wo();
    for oy in 0..g.ho() {
        for ox in 0..wo {
            let mut best = T::neg_infinity();
            let mut bi = (oy * g.stride) * g.w + ox * g.stride;
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let idx = (oy * g.stride + ki) * g.w + ox * g.stride + kj;
                    let v = x[idx];
                    if v > best || v.is_nan() {
                        best = v;
                        bi = idx;
                        if v.is_nan() {
                            break;
                        }
                    }
                }
            }
            y[oy * wo + ox] = x[bi];
            arg[oy * wo + ox] = bi as u32;
        }
    }
}

/// Average pooling of one plane (linear; also the adjoint's partner of [`avg_plane_adjoint`]).
pub fn avg_plane<T: Scalar>(g: &PoolGeom, x: &[T], y: &mut [T]) {
    let wo = g.wo();
    let inv = T::one() / T::from_usize_lossy(g.kh * g.kw);
    for oy in 0..g.ho() {
        for ox in 0..wo {
            let mut s = T::zero();
            for ki in 0..g.kh {
                let row = (oy * g.stride + ki) * g.w + ox * g.stride;
                for kj in 0..g.kw {
                    s = s + x[row + kj];
                }
            }
            y[oy * wo + ox] = s * inv;
        }
    }
}

/// Adds the adjoint of average pooling applied to `gy` into `dx`.
pub fn avg_plane_adjoint<T: Scalar>(g: &PoolGeom, gy: &[T], dx: &mut [T]) {
    let wo = g.wo();
    let inv = T::one() / T::from_usize_lossy(g.kh * g.kw);
    for oy in 0..g.ho() {
        for ox in 0..wo {
            let v = gy[oy * wo + ox] * inv;
            for ki in 0..g.kh {
                let row = (oy * g.stride + ki) * g.w + ox * g.stride;
                for kj in 0..g.kw {
                    dx[row + kj] = dx[row + kj] + v;
                }
            }
        }
    }
}

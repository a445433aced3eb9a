//! im2col / col2im for 2-D convolution over one sample (CHW layout, zero padding).

use crate::scalar::Scalar;

/// Shape of a 2-D convolution over one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    /// Input channels.
    pub c_in: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub c_out: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both directions).
    pub stride: usize,
    /// Zero padding (both directions).
    pub pad: usize,
}

impl ConvGeom {
    /// Output height.
    pub fn ho(&self) -> usize {
        (self.h + 2 * self.pad - self.kh) / self.stride + 1
    }
    /// Output width.
    pub fn wo(&self) -> usize {
        (self.w + 2 * self.pad - self.kw) / self.stride + 1
    }
    /// Rows of the column matrix: `c_in * kh * kw`.
    pub fn patch(&self) -> usize {
        self.c_in * self.kh * self.kw
    }
    /// Output positions per channel: `ho * wo`.
    pub fn positions(&self) -> usize {
        self.ho() * self.wo()
    }
    /// Input elements per sample.
    pub fn in_len(&self) -> usize {
        self.c_in * self.h * self.w
    }
    /// Output elements per sample.
    pub fn out_len(&self) -> usize {
        self.c_out * self.positions()
    }
    /// True when the column matrix equals the input itself (1x1, stride 1, no padding).
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
}

/// For stride 1 and kernel column `kj`: the output columns `lo..hi` whose input column
/// `ox + kj - pad` lies inside the image.
#[inline]
fn valid_run(g: &ConvGeom, kj: usize, wo: usize) -> (usize, usize) {
    let lo = g.pad.saturating_sub(kj).min(wo);
    let hi = (g.w + g.pad).saturating_sub(kj).min(wo).max(lo);
    (lo, hi)
}

/// Fills the `patch x positions` block of `cols` that starts at column `col0` of a row-major
/// matrix with row stride `ld`, from one CHW sample `x`.
pub fn im2col<T: Scalar>(g: &ConvGeom, x: &[T], cols: &mut [T], ld: usize, col0: usize) {
    let (ho, wo) = (g.ho(), g.wo());
    let p = ho * wo;
    for c in 0..g.c_in {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = (c * g.kh + ki) * g.kw + kj;
                let dst = &mut cols[row * ld + col0..row * ld + col0 + p];
                let (lo, hi) = valid_run(g, kj, wo);
                for oy in 0..ho {
                    let iy = (oy * g.stride + ki) as isize - g.pad as isize;
                    let d = &mut dst[oy * wo..(oy + 1) * wo];
                    if iy < 0 || iy >= g.h as isize {
                        d.fill(T::zero());
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    if g.stride == 1 {
                        // ix = ox + kj - pad: one contiguous run, zeros at the edges.
                        d[..lo].fill(T::zero());
                        d[lo..hi].copy_from_slice(&src[lo + kj - g.pad..hi + kj - g.pad]);
                        d[hi..].fill(T::zero());
                        continue;
                    }
                    for (ox, v) in d.iter_mut().enumerate() {
                        let ix = (ox * g.stride + kj) as isize - g.pad as isize;
                        *v = if ix < 0 || ix >= g.w as isize {
                            T::zero()
                        } else {
                            src[ix as usize]
                        };
                    }
                }
            }
        }
    }
}

/// Adds the `patch x positions` block of `cols` (row stride `ld`, first column `col0`) back
/// into the CHW sample gradient `dx` (the adjoint of [`im2col`]).
pub fn col2im_add<T: Scalar>(g: &ConvGeom, cols: &[T], ld: usize, col0: usize, dx: &mut [T]) {
    let (ho, wo) = (g.ho(), g.wo());
    let p = ho * wo;
    for c in 0..g.c_in {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = (c * g.kh + ki) * g.kw + kj;
                let src = &cols[row * ld + col0..row * ld + col0 + p];
                let (lo, hi) = valid_run(g, kj, wo);
                for oy in 0..ho {
                    let iy = (oy * g.stride + ki) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let drow = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    if g.stride == 1 {
                        let s_row = &src[oy * wo + lo..oy * wo + hi];
                        for (d, &v) in drow[lo + kj - g.pad..hi + kj - g.pad].iter_mut().zip(s_row)
                        {
                            *d = *d + v;
                        }
                        continue;
                    }
                    for ox in 0..wo {
                        let ix = (ox * g.stride + kj) as isize - g.pad as isize;
                        if ix >= 0 && ix < g.w as isize {
                            drow[ix as usize] = drow[ix as usize] + src[oy * wo + ox];
                        }
                    }
                }
            }
        }
    }
}

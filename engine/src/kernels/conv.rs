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

/// Padded width of a stride-1 implicit convolution's input: `w + 2 pad`.
fn padded_w(g: &ConvGeom) -> usize {
    g.w + 2 * g.pad
}

/// Length of one sample as a zero-padded CHW image: `c_in (h + 2 pad) (w + 2 pad)`.
pub fn padded_chw_len(g: &ConvGeom) -> usize {
    g.c_in * (g.h + 2 * g.pad) * padded_w(g)
}

/// Columns of a stride-1 implicit convolution over one sample: the output positions laid out
/// at the padded row pitch, `(ho - 1)(w + 2 pad) + wo` (the `wp - wo` columns between output
/// rows are computed and dropped by [`compact_rows`]).
pub fn implicit_cols(g: &ConvGeom) -> usize {
    (g.ho() - 1) * padded_w(g) + g.wo()
}

/// Row offsets of the implicit column matrix of a stride-1 convolution, in the `(c, ki, kj)`
/// order of [`im2col`]: row `(c, ki, kj)` is the padded CHW image (see [`pad_chw`]) read from
/// `(c (h + 2 pad) + ki)(w + 2 pad) + kj` for [`implicit_cols`] elements, which is the same
/// matrix as [`im2col`]'s at the padded row pitch. Every row ends inside the image.
pub fn implicit_offsets(g: &ConvGeom) -> Vec<usize> {
    debug_assert_eq!(g.stride, 1, "implicit convolution needs stride 1");
    let (hp, wp) = (g.h + 2 * g.pad, padded_w(g));
    let mut offs = Vec::with_capacity(g.patch());
    for c in 0..g.c_in {
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                offs.push((c * hp + ki) * wp + kj);
            }
        }
    }
    debug_assert!(offs
        .iter()
        .all(|&o| o + implicit_cols(g) <= padded_chw_len(g)));
    offs
}

/// Makes `buf` a zeroed buffer of `len` elements unless it already has that length: scratch
/// for [`pad_chw`] and [`expand_rows`], whose gaps stay zero while the buffer is reused for
/// the same geometry.
pub fn zeroed_scratch<T: Scalar>(buf: &mut Vec<T>, len: usize) {
    if buf.len() != len {
        buf.clear();
        buf.resize(len, T::zero());
    }
}

/// Writes the CHW sample `x` into the interior of the zero-padded CHW image `out`
/// ([`padded_chw_len`] long, from [`zeroed_scratch`]): only the interior is written, so the
/// zero borders stay as they are when the buffer is reused for the same geometry.
pub fn pad_chw<T: Scalar>(g: &ConvGeom, x: &[T], out: &mut [T]) {
    let (hp, wp, p) = (g.h + 2 * g.pad, padded_w(g), g.pad);
    let out = &mut out[..padded_chw_len(g)];
    for (plane, src) in out.chunks_exact_mut(hp * wp).zip(x.chunks_exact(g.h * g.w)) {
        let body = &mut plane[p * wp..(p + g.h) * wp];
        for (row, s) in body.chunks_exact_mut(wp).zip(src.chunks_exact(g.w)) {
            row[p..p + g.w].copy_from_slice(s);
        }
    }
}

/// Copies the `c_out` rows of an implicit product (`tmp`, rows `ld` apart, output rows at
/// the padded pitch `w + 2 pad`) into the `[c_out, ho, wo]` sample `out`, adding `bias[c]` per
/// channel when given; every element of `out` is written.
pub fn compact_rows<T: Scalar>(
    g: &ConvGeom,
    tmp: &[T],
    ld: usize,
    out: &mut [T],
    bias: Option<&[T]>,
) {
    super::cpu::vectorized(
        #[inline(always)]
        || {
            for (co, plane) in out.chunks_exact_mut(g.positions()).enumerate() {
                compact_plane(g, &tmp[co * ld..], plane, bias.map(|b| b[co]));
            }
        },
    )
}

/// One channel of [`compact_rows`]: copies the channel's row of an implicit product (`row`,
/// output rows at the padded pitch) into its `[ho, wo]` plane, adding `bias` when given.
#[inline(always)]
pub fn compact_plane<T: Scalar>(g: &ConvGeom, row: &[T], plane: &mut [T], bias: Option<T>) {
    let (wo, wp) = (g.wo(), padded_w(g));
    for (oy, out) in plane.chunks_exact_mut(wo).enumerate() {
        let src = &row[oy * wp..oy * wp + wo];
        match bias {
            Some(b) => {
                for (o, &v) in out.iter_mut().zip(src) {
                    *o = v + b;
                }
            }
            None => out.copy_from_slice(src),
        }
    }
}

/// The inverse of [`compact_rows`]: lays the `[c_out, ho, wo]` sample `src` out at the padded
/// row pitch in `out` (`c_out` rows of [`implicit_cols`], from [`zeroed_scratch`]), leaving
/// the zeros between output rows, so that a product over the implicit columns counts each
/// position once.
pub fn expand_rows<T: Scalar>(g: &ConvGeom, src: &[T], out: &mut [T]) {
    let (wo, wp, nc) = (g.wo(), padded_w(g), implicit_cols(g));
    for (row, plane) in out[..g.c_out * nc]
        .chunks_exact_mut(nc)
        .zip(src.chunks_exact(g.positions()))
    {
        for (oy, s) in plane.chunks_exact(wo).enumerate() {
            row[oy * wp..oy * wp + wo].copy_from_slice(s);
        }
    }
}

/// The weight of the input gradient of a stride-1 convolution as a convolution of the output
/// gradient: `[c_in, c_out, kh, kw]` with `out[c, co, ki, kj] = w[co, c, kh-1-ki, kw-1-kj]`,
/// from one `[c_out, c_in, kh, kw]` weight `w`.
pub fn flip_weight<T: Scalar>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    let (kh, kw) = (g.kh, g.kw);
    let mut out = Vec::with_capacity(w.len());
    for c in 0..g.c_in {
        for co in 0..g.c_out {
            let base = (co * g.c_in + c) * kh * kw;
            for ki in 0..kh {
                for kj in 0..kw {
                    out.push(w[base + (kh - 1 - ki) * kw + (kw - 1 - kj)]);
                }
            }
        }
    }
    out
}

/// The geometry of a stride-1 convolution's input gradient as a convolution of the output
/// gradient with [`flip_weight`]: `c_out` input channels of `ho x wo`, padding
/// `kh - 1 - pad`, `c_in` outputs of `h x w`. `None` unless stride 1, a square kernel and
/// `pad < kh`.
pub fn transposed_geom(g: &ConvGeom) -> Option<ConvGeom> {
    (g.stride == 1 && g.kh == g.kw && g.pad < g.kh).then(|| ConvGeom {
        c_in: g.c_out,
        h: g.ho(),
        w: g.wo(),
        c_out: g.c_in,
        kh: g.kh,
        kw: g.kw,
        stride: 1,
        pad: g.kh - 1 - g.pad,
    })
}

/// Length of one sample as a zero-padded HWC image: `(h + 2 pad) (w + 2 pad) c_in`.
pub fn padded_hwc_len(g: &ConvGeom) -> usize {
    (g.h + 2 * g.pad) * (g.w + 2 * g.pad) * g.c_in
}

/// Writes the CHW sample `x` into `out` as a zero-padded HWC image (channels innermost), the
/// layout in which every patch row of [`im2row`] is `kh` contiguous runs. Works one image row
/// at a time so the destination row stays in cache while the channels are interleaved.
pub fn pad_hwc<T: Scalar>(g: &ConvGeom, x: &[T], out: &mut [T]) {
    let (c, wp, plane) = (g.c_in, g.w + 2 * g.pad, g.h * g.w);
    let out = &mut out[..padded_hwc_len(g)];
    let (top, rest) = out.split_at_mut(g.pad * wp * c);
    top.fill(T::zero());
    let (body, bottom) = rest.split_at_mut(g.h * wp * c);
    bottom.fill(T::zero());
    for (y, orow) in body.chunks_exact_mut(wp * c).enumerate() {
        let (left, tail) = orow.split_at_mut(g.pad * c);
        left.fill(T::zero());
        let (inner, right) = tail.split_at_mut(g.w * c);
        right.fill(T::zero());
        let src = &x[y * g.w..];
        for (xi, px) in inner.chunks_exact_mut(c).enumerate() {
            for (ch, o) in px.iter_mut().enumerate() {
                *o = src[ch * plane + xi];
            }
        }
    }
}

/// Row matrix of one padded HWC sample (see [`pad_hwc`]): row `oy * wo + ox` of `rows`
/// (rows of `patch` elements, contiguous) holds the input patch under that output position in
/// `(ki, kj, c)` order. It is the transpose of [`im2col`]'s block with the patch index permuted,
/// laid out so that a GEMM reading it as its right operand packs contiguous runs.
pub fn im2row<T: Scalar>(g: &ConvGeom, padded: &[T], rows: &mut [T]) {
    let (ho, wo, patch) = (g.ho(), g.wo(), g.patch());
    let (wp, run) = (g.w + 2 * g.pad, g.kw * g.c_in);
    for oy in 0..ho {
        for ox in 0..wo {
            let row = &mut rows[(oy * wo + ox) * patch..(oy * wo + ox + 1) * patch];
            for (ki, dst) in row.chunks_exact_mut(run).enumerate() {
                let src = ((oy * g.stride + ki) * wp + ox * g.stride) * g.c_in;
                dst.copy_from_slice(&padded[src..src + run]);
            }
        }
    }
}

/// Reorders a `[rows, kh, kw, c_in]` block (the patch order of [`im2row`]) into PyTorch's
/// `[rows, c_in, kh, kw]` weight layout.
pub fn khwc_to_ckhw<T: Scalar>(g: &ConvGeom, src: &[T], dst: &mut [T]) {
    let (khw, patch) = (g.kh * g.kw, g.patch());
    for (s, d) in src.chunks_exact(patch).zip(dst.chunks_exact_mut(patch)) {
        for (q, &v) in s.iter().enumerate() {
            let (kk, c) = (q / g.c_in, q % g.c_in);
            d[c * khw + kk] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// im2row of the padded HWC image is im2col transposed, patch index permuted, for strided,
    /// padded, rectangular and pointwise geometries.
    #[test]
    fn im2row_is_permuted_transpose_of_im2col() {
        for g in [
            ConvGeom {
                c_in: 3,
                h: 7,
                w: 5,
                c_out: 1,
                kh: 3,
                kw: 3,
                stride: 1,
                pad: 1,
            },
            ConvGeom {
                c_in: 2,
                h: 8,
                w: 6,
                c_out: 1,
                kh: 3,
                kw: 2,
                stride: 2,
                pad: 1,
            },
            ConvGeom {
                c_in: 4,
                h: 6,
                w: 6,
                c_out: 1,
                kh: 1,
                kw: 1,
                stride: 2,
                pad: 0,
            },
            ConvGeom {
                c_in: 2,
                h: 4,
                w: 4,
                c_out: 1,
                kh: 1,
                kw: 1,
                stride: 1,
                pad: 0,
            },
        ] {
            let x: Vec<f64> = (0..g.in_len()).map(|i| i as f64 + 0.5).collect();
            let (p, patch) = (g.positions(), g.patch());
            let mut cols = vec![f64::NAN; patch * p];
            im2col(&g, &x, &mut cols, p, 0);
            let mut padded = vec![f64::NAN; padded_hwc_len(&g)];
            pad_hwc(&g, &x, &mut padded);
            let mut rows = vec![f64::NAN; p * patch];
            im2row(&g, &padded, &mut rows);
            // rows as a [p, patch] block in (ki, kj, c) order, reordered to (c, ki, kj)
            let mut reordered = vec![f64::NAN; p * patch];
            khwc_to_ckhw(&g, &rows, &mut reordered);
            for l in 0..p {
                for q in 0..patch {
                    assert_eq!(
                        reordered[l * patch + q],
                        cols[q * p + l],
                        "{g:?} l={l} q={q}"
                    );
                }
            }
        }
    }
}

//! Layouts for 2-D convolution over one sample (CHW layout, zero padding): im2col / col2im
//! and im2row for the lowered products, and the phase layout ([`Phases`]) and row offsets of
//! the implicit ones.

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

/// The phase layout of a convolution's zero-padded input, in which a convolution of any
/// stride is an implicit product (see [`implicit_offsets`]). For stride `s`, each channel's
/// padded image `Xpad` (`(h + 2 pad) x (w + 2 pad)`) is split into the phase planes
/// `P_ab[y][x] = Xpad[s y + a][s x + b]`, each `hq x wq` with `hq = ceil((h + 2 pad) / s)` and
/// `wq = ceil((w + 2 pad) / s)` (entries past the padded image are zero), for the phases some
/// tap reads (`a < min(s, kh)`, `b < min(s, kw)`), channel by channel, then by `a`, then `b`.
/// Tap `(c, ki, kj)` reads plane `(ki % s, kj % s)` from row `ki / s`, column `kj / s`, and
/// output position `(oy, ox)` is column `oy wq + ox` of the product. Stride 1 is one phase:
/// the padded image itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Phases {
    /// The stride.
    pub s: usize,
    /// Phase rows kept: `min(s, kh)`.
    pub rows: usize,
    /// Phase columns kept: `min(s, kw)`.
    pub cols: usize,
    /// Height of a phase plane.
    pub hq: usize,
    /// Width of a phase plane: the row pitch of the planes and of an implicit product.
    pub wq: usize,
}

impl Phases {
    /// The phase layout of `g`'s input.
    #[inline]
    pub fn of(g: &ConvGeom) -> Phases {
        let s = g.stride;
        // No division for stride 1: this runs once per output plane in `compact_plane`.
        let per_phase = |n: usize| if s == 1 { n } else { n.div_ceil(s) };
        Phases {
            s,
            rows: s.min(g.kh),
            cols: s.min(g.kw),
            hq: per_phase(g.h + 2 * g.pad),
            wq: per_phase(g.w + 2 * g.pad),
        }
    }

    /// Elements of one phase plane.
    fn plane_len(&self) -> usize {
        self.hq * self.wq
    }

    /// Where phase plane `(a, b)` of channel `c` starts.
    fn plane(&self, c: usize, a: usize, b: usize) -> usize {
        ((c * self.rows + a) * self.cols + b) * self.plane_len()
    }

    /// Where tap `(c, ki, kj)` reads its first element.
    fn tap(&self, c: usize, ki: usize, kj: usize) -> usize {
        let s = self.s;
        self.plane(c, ki % s, kj % s) + (ki / s) * self.wq + kj / s
    }
}

/// The elements of a line of `len` inputs, zero-padded by `pad` at its start, that fall in
/// phase `b` of stride `s` (padded index `≡ b mod s`): `(first input index, its index in the
/// phase line, count)`; the next ones are `s` inputs and one phase index apart.
pub fn phase_run(len: usize, pad: usize, s: usize, b: usize) -> (usize, usize, usize) {
    let first = (b + s - pad % s) % s;
    let count = if first < len {
        (len - first).div_ceil(s)
    } else {
        0
    };
    (first, (first + pad) / s, count)
}

/// Length of one sample in the phase layout ([`Phases`]): `c_in` channels of `min(s, kh) x
/// min(s, kw)` planes of `hq x wq`; for stride 1, `c_in (h + 2 pad) (w + 2 pad)`.
pub fn padded_chw_len(g: &ConvGeom) -> usize {
    let p = Phases::of(g);
    g.c_in * p.rows * p.cols * p.plane_len()
}

/// Columns of an implicit convolution over one sample: the output positions laid out at the
/// phase pitch `wq` ([`Phases`]; `w + 2 pad` for stride 1), `(ho - 1) wq + wo` (the `wq - wo`
/// columns between output rows are computed and dropped by [`compact_rows`]).
pub fn implicit_cols(g: &ConvGeom) -> usize {
    (g.ho() - 1) * Phases::of(g).wq + g.wo()
}

/// Row offsets of the implicit column matrix of a convolution, in the `(c, ki, kj)` order of
/// [`im2col`]: row `(c, ki, kj)` is the phase layout (see [`pad_chw`]) read from
/// [`Phases`]' tap offset for [`implicit_cols`] elements, which is the same matrix as
/// [`im2col`]'s at the phase pitch (for stride 1, offset `(c (h + 2 pad) + ki)(w + 2 pad) +
/// kj` in the padded image). Every row ends inside the layout.
pub fn implicit_offsets(g: &ConvGeom) -> Vec<usize> {
    tap_offsets(g, 0, 0)
}

/// [`implicit_offsets`] for the taps `ki >= ki0`, `kj >= kj0` only (same order).
pub fn tap_offsets(g: &ConvGeom, ki0: usize, kj0: usize) -> Vec<usize> {
    let p = Phases::of(g);
    let mut offs = Vec::with_capacity(g.patch());
    for c in 0..g.c_in {
        for ki in ki0..g.kh {
            for kj in kj0..g.kw {
                offs.push(p.tap(c, ki, kj));
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

/// Writes the CHW sample `x` into the interior of its phase layout `out` ([`Phases`],
/// [`padded_chw_len`] long, from [`zeroed_scratch`]; for stride 1 the zero-padded CHW image):
/// only the interior is written, so the zero borders stay as they are when the buffer is
/// reused for the same geometry.
pub fn pad_chw<T: Scalar>(g: &ConvGeom, x: &[T], out: &mut [T]) {
    let p = Phases::of(g);
    let out = &mut out[..padded_chw_len(g)];
    if p.s == 1 {
        // One phase: the padded image, row by row.
        let (wp, pad) = (p.wq, g.pad);
        for (plane, src) in out
            .chunks_exact_mut(p.plane_len())
            .zip(x.chunks_exact(g.h * g.w))
        {
            let body = &mut plane[pad * wp..(pad + g.h) * wp];
            for (row, s) in body.chunks_exact_mut(wp).zip(src.chunks_exact(g.w)) {
                row[pad..pad + g.w].copy_from_slice(s);
            }
        }
        return;
    }
    let mut planes = out.chunks_exact_mut(p.plane_len());
    super::cpu::vectorized(
        #[inline(always)]
        || {
            for src in x.chunks_exact(g.h * g.w) {
                for a in 0..p.rows {
                    let (y0, u0, ny) = phase_run(g.h, g.pad, p.s, a);
                    for b in 0..p.cols {
                        let (x0, v0, nx) = phase_run(g.w, g.pad, p.s, b);
                        let plane = planes.next().expect("phase plane");
                        if nx == 0 {
                            continue;
                        }
                        let body = &mut plane[u0 * p.wq..(u0 + ny) * p.wq];
                        for (r, row) in body.chunks_exact_mut(p.wq).enumerate() {
                            let from = &src[(y0 + r * p.s) * g.w + x0..][..(nx - 1) * p.s + 1];
                            every_nth(p.s, from, &mut row[v0..v0 + nx]);
                        }
                    }
                }
            }
        },
    )
}

/// `to[i] = from[s i]` for every element of `to` (`from` holds `(len - 1) s + 1`).
#[inline(always)]
fn every_nth<T: Scalar>(s: usize, from: &[T], to: &mut [T]) {
    if s == 2 {
        // A constant stride: the compiler de-interleaves whole vectors.
        let (last, body) = to.split_last_mut().expect("a run of at least one");
        for (t, f) in body.iter_mut().zip(from.chunks_exact(2)) {
            *t = f[0];
        }
        *last = from[from.len() - 1];
        return;
    }
    for (i, t) in to.iter_mut().enumerate() {
        *t = from[s * i];
    }
}

/// Copies the `c_out` rows of an implicit product (`tmp`, rows `ld` apart, output rows at
/// the phase pitch `wq` of [`Phases`], `w + 2 pad` for stride 1) into the `[c_out, ho, wo]` sample `out`, adding `bias[c]` per
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
/// output rows at the phase pitch) into its `[ho, wo]` plane, adding `bias` when given.
#[inline(always)]
pub fn compact_plane<T: Scalar>(g: &ConvGeom, row: &[T], plane: &mut [T], bias: Option<T>) {
    copy_plane(g.wo(), Phases::of(g).wq, row, plane, bias);
}

/// [`compact_plane`] from rows `pitch` apart (`wo` elements of each copied).
#[inline(always)]
pub fn copy_plane<T: Scalar>(wo: usize, pitch: usize, row: &[T], plane: &mut [T], bias: Option<T>) {
    for (oy, out) in plane.chunks_exact_mut(wo).enumerate() {
        let src = &row[oy * pitch..oy * pitch + wo];
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

/// The inverse of [`compact_rows`]: lays the `[c_out, ho, wo]` sample `src` out at the phase
/// pitch in `out` (`c_out` rows of [`implicit_cols`], from [`zeroed_scratch`]), leaving
/// the zeros between output rows, so that a product over the implicit columns counts each
/// position once.
pub fn expand_rows<T: Scalar>(g: &ConvGeom, src: &[T], out: &mut [T]) {
    let (wo, wp, nc) = (g.wo(), Phases::of(g).wq, implicit_cols(g));
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
/// from one `[c_out, c_in, kh, kw]` weight `w` ([`flip_phase`] of the one phase).
pub fn flip_weight<T: Scalar>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    debug_assert_eq!(g.stride, 1, "flip_weight is for stride 1");
    flip_phase(g, w, (0, 0))
}

/// Taps of a kernel dimension of size `k` whose index is `a` modulo the stride `s`:
/// `ceil((k - a) / s)`, none for `a >= k`.
pub fn phase_taps(k: usize, s: usize, a: usize) -> usize {
    k.saturating_sub(a).div_ceil(s)
}

/// The weight of phase `(a, b)` of the input gradient of the convolution `g` as a stride-1
/// convolution of the output gradient: `[c_in, c_out, ka, kb]` (`ka`, `kb` from
/// [`phase_taps`]) with `out[c, co, i, j] = w[co, c, s (ka-1-i) + a, s (kb-1-j) + b]`, from one
/// `[c_out, c_in, kh, kw]` weight `w`: the taps of that phase, flipped. For stride 1 and
/// phase `(0, 0)`, the whole weight flipped.
pub fn flip_phase<T: Scalar>(g: &ConvGeom, w: &[T], (a, b): (usize, usize)) -> Vec<T> {
    let (kh, kw, s) = (g.kh, g.kw, g.stride);
    let (ka, kb) = (phase_taps(kh, s, a), phase_taps(kw, s, b));
    let mut out = Vec::with_capacity(g.c_in * g.c_out * ka * kb);
    for c in 0..g.c_in {
        for co in 0..g.c_out {
            let base = (co * g.c_in + c) * kh * kw;
            for i in 0..ka {
                for j in 0..kb {
                    out.push(w[base + (s * (ka - 1 - i) + a) * kw + s * (kb - 1 - j) + b]);
                }
            }
        }
    }
    out
}

/// The geometry under which each phase of a strided convolution's input gradient is a
/// stride-1 convolution of the output gradient: `c_out` input channels of `ho x wo`, kernel
/// `kq = ceil(kh / s)`, padding `kq - 1` (the full correlation, whose `ho + kq - 1` output
/// rows hold every phase row a tap reaches), `c_in` outputs. Phase `(a, b)` (see
/// [`Phases`]) is `X̄pad[s u + a][s v + b] = Σ W[co, c, s i + a, s j + b] Ȳ[co, u - i, v - j]`:
/// the taps [`tap_offsets`]`(gt, kq - ka, kq - kb)` with weight [`flip_phase`], written back
/// by [`write_phase`]. `None` unless the stride is above 1 and the kernel square.
pub fn phase_transposed_geom(g: &ConvGeom) -> Option<ConvGeom> {
    let kq = g.kh.div_ceil(g.stride);
    (g.stride > 1 && g.kh == g.kw).then(|| ConvGeom {
        c_in: g.c_out,
        h: g.ho(),
        w: g.wo(),
        c_out: g.c_in,
        kh: kq,
        kw: kq,
        stride: 1,
        pad: kq - 1,
    })
}

/// Writes phase `(a, b)` of the input gradient of the strided convolution `g`, the `c_in`
/// rows of an implicit product over `gt` from [`phase_transposed_geom`] (rows `ld` apart,
/// phase position `(u, v)` at column `u (wo + 2 pad_t) + v`), into the CHW sample gradient
/// `dx`: input `(y, x)` with `y + pad = s u + a` and `x + pad = s v + b` gets `(u, v)` where
/// the product has it; the other inputs of the phase are left as they are (no tap reaches
/// them: their gradient is zero).
pub fn write_phase<T: Scalar>(
    g: &ConvGeom,
    gt: &ConvGeom,
    (a, b): (usize, usize),
    tmp: &[T],
    ld: usize,
    dx: &mut [T],
) {
    let (s, pitch) = (g.stride, Phases::of(gt).wq);
    let (y0, u0, ny) = phase_run(g.h, g.pad, s, a);
    let (x0, v0, nx) = phase_run(g.w, g.pad, s, b);
    let (ny, nx) = (
        ny.min(gt.ho().saturating_sub(u0)),
        nx.min(gt.wo().saturating_sub(v0)),
    );
    if nx == 0 {
        return;
    }
    super::cpu::vectorized(
        #[inline(always)]
        || {
            for (c, plane) in dx[..g.in_len()].chunks_exact_mut(g.h * g.w).enumerate() {
                let row = &tmp[c * ld..];
                for r in 0..ny {
                    let from = &row[(u0 + r) * pitch + v0..][..nx];
                    let to = &mut plane[(y0 + r * s) * g.w + x0..][..(nx - 1) * s + 1];
                    to_every_nth(s, from, to);
                }
            }
        },
    )
}

/// `to[s i] = from[i]` for every element of `from` (`to` holds `(len - 1) s + 1`); the
/// elements between are left as they are.
#[inline(always)]
fn to_every_nth<T: Scalar>(s: usize, from: &[T], to: &mut [T]) {
    if s == 2 {
        // A constant stride: the compiler interleaves whole vectors.
        let (last, body) = from.split_last().expect("a run of at least one");
        for (t, &f) in to.chunks_exact_mut(2).zip(body) {
            t[0] = f;
        }
        to[to.len() - 1] = *last;
        return;
    }
    for (i, &f) in from.iter().enumerate() {
        to[s * i] = f;
    }
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

    fn geom(
        c_in: usize,
        h: usize,
        w: usize,
        k: (usize, usize),
        stride: usize,
        pad: usize,
    ) -> ConvGeom {
        ConvGeom {
            c_in,
            h,
            w,
            c_out: 1,
            kh: k.0,
            kw: k.1,
            stride,
            pad,
        }
    }

    /// The implicit column matrix (the phase layout read at [`implicit_offsets`], output
    /// `(oy, ox)` at column `oy wq + ox`) is im2col's, for strides 1 to 3, square and
    /// rectangular kernels, pads 0 to 2, odd and even sizes; the phase positions no output
    /// reads stay as [`zeroed_scratch`] left them.
    #[test]
    fn phase_layout_reads_the_im2col_matrix() {
        for g in [
            geom(2, 7, 6, (3, 3), 1, 1),
            geom(3, 9, 9, (3, 3), 2, 1),
            geom(2, 10, 11, (1, 1), 2, 0),
            geom(2, 11, 10, (5, 5), 2, 2),
            geom(1, 8, 9, (2, 2), 2, 0),
            geom(2, 13, 14, (3, 3), 3, 1),
            geom(1, 12, 12, (1, 1), 3, 2),
            geom(2, 9, 8, (3, 2), 2, 1),
            geom(1, 16, 15, (5, 5), 3, 2),
            // Phases no input falls in (each input column is padding-phase 1).
            geom(2, 5, 1, (1, 1), 2, 1),
            geom(1, 1, 4, (1, 1), 2, 1),
        ] {
            let x: Vec<f64> = (0..g.in_len()).map(|i| i as f64 + 0.5).collect();
            let (p, wo) = (g.positions(), g.wo());
            let mut cols = vec![f64::NAN; g.patch() * p];
            im2col(&g, &x, &mut cols, p, 0);
            let mut padded = Vec::new();
            zeroed_scratch(&mut padded, padded_chw_len(&g));
            pad_chw(&g, &x, &mut padded);
            let (offs, pitch) = (implicit_offsets(&g), Phases::of(&g).wq);
            assert_eq!(offs.len(), g.patch());
            for (r, &o) in offs.iter().enumerate() {
                assert!(o + implicit_cols(&g) <= padded.len(), "{g:?} row {r}");
                for l in 0..p {
                    let got = padded[o + (l / wo) * pitch + l % wo];
                    assert_eq!(got, cols[r * p + l], "{g:?} row {r} position {l}");
                }
            }
            // Every input of a kept phase lands exactly once, the others nowhere.
            let ph = Phases::of(&g);
            let kept = |i: usize| {
                let (y, xx) = ((i / g.w) % g.h, i % g.w);
                (y + g.pad) % g.stride < ph.rows && (xx + g.pad) % g.stride < ph.cols
            };
            let want: f64 = (0..x.len()).filter(|&i| kept(i)).map(|i| x[i]).sum();
            assert_eq!(padded.iter().sum::<f64>(), want, "{g:?}");
        }
    }

    /// Stride 1 is the plain zero-padded CHW image, element for element.
    #[test]
    fn stride_one_phase_layout_is_the_padded_image() {
        let g = geom(3, 5, 7, (3, 3), 1, 2);
        let (hp, wp) = (g.h + 2 * g.pad, g.w + 2 * g.pad);
        assert_eq!(padded_chw_len(&g), g.c_in * hp * wp);
        assert_eq!(implicit_cols(&g), (g.ho() - 1) * wp + g.wo());
        let x: Vec<f64> = (0..g.in_len()).map(|i| i as f64 + 1.0).collect();
        let mut padded = vec![0.0; padded_chw_len(&g)];
        pad_chw(&g, &x, &mut padded);
        let mut want = vec![0.0; padded.len()];
        for c in 0..g.c_in {
            for y in 0..g.h {
                for xx in 0..g.w {
                    want[(c * hp + y + g.pad) * wp + xx + g.pad] = x[(c * g.h + y) * g.w + xx];
                }
            }
        }
        assert_eq!(padded, want);
        let offs = implicit_offsets(&g);
        assert_eq!(offs[g.kh * g.kw + g.kw + 2], (hp + 1) * wp + 2);
    }
}

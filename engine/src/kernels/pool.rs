//! Pooling over one plane (H x W), no padding.

use crate::ops::activation::relu_d1;
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
    if g.kh == 2 && g.kw == 2 && g.stride == 2 {
        super::cpu::vectorized(
            #[inline(always)]
            || max_plane_2x2::<T, true>(g, x, y, arg),
        )
    } else {
        max_plane_any(g, x, y, arg)
    }
}

/// [`max_plane`]'s values without the argmax (inference): the same values, bit for bit;
/// `arg` is scratch, used only by windows other than 2x2 with stride 2.
pub fn max_plane_values<T: Scalar>(g: &PoolGeom, x: &[T], y: &mut [T], arg: &mut Vec<u32>) {
    if g.kh == 2 && g.kw == 2 && g.stride == 2 {
        super::cpu::vectorized(
            #[inline(always)]
            || max_plane_2x2::<T, false>(g, x, y, &mut []),
        )
    } else {
        arg.resize(g.out_len(), 0);
        max_plane_any(g, x, y, arg)
    }
}

/// [`max_plane`] for any window.
fn max_plane_any<T: Scalar>(g: &PoolGeom, x: &[T], y: &mut [T], arg: &mut [u32]) {
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

/// [`max_plane`] for the common 2x2 window with stride 2: the same values and (with `ARG`)
/// indices; without `ARG`, `arg` is not touched. A window without NaN takes a branch-light
/// compare chain (first maximum in row-major order); a window with a NaN goes through the
/// generic rule. Whole planes of groups of 16 windows go to the vector path where it runs
/// ([`wide_2x2::plane`]); the rows it leaves run row pair by row pair.
#[inline(always)]
fn max_plane_2x2<T: Scalar, const ARG: bool>(g: &PoolGeom, x: &[T], y: &mut [T], arg: &mut [u32]) {
    let (w, wo) = (g.w, g.wo());
    for oy in wide_2x2::plane::<T, ARG>(g, x, y, arg)..g.ho() {
        let r0 = 2 * oy * w;
        let top = &x[r0..r0 + 2 * wo];
        let bottom = &x[r0 + w..r0 + w + 2 * wo];
        let ys = &mut y[oy * wo..(oy + 1) * wo];
        let args = if ARG {
            &mut arg[oy * wo..(oy + 1) * wo]
        } else {
            &mut []
        };
        let done = wide_2x2::rows::<T, ARG>(top, bottom, ys, args, r0, w);
        // The windows of the blocks the wide path left (all of them where it does not run).
        let left = (0..wo.div_ceil(wide_2x2::WINDOWS))
            .filter(|&b| b >= 64 || done & (1 << b) == 0)
            .flat_map(|b| b * wide_2x2::WINDOWS..((b + 1) * wide_2x2::WINDOWS).min(wo));
        for ox in left {
            let (best, at) = window_2x2(x, r0 + 2 * ox, w);
            ys[ox] = best;
            if ARG {
                args[ox] = (r0 + 2 * ox + at) as u32;
            }
        }
    }
}

/// The maximum of the 2x2 window whose top-left value is `x[base]` (rows `w` apart) and its
/// offset from `base`: the first maximum in row-major order, or the generic rule where the
/// window holds a NaN (rows in order, a NaN wins and ends its row).
#[inline(always)]
fn window_2x2<T: Scalar>(x: &[T], base: usize, w: usize) -> (T, usize) {
    let (a, b, c, d) = (x[base], x[base + 1], x[base + w], x[base + w + 1]);
    if a.is_nan() || b.is_nan() || c.is_nan() || d.is_nan() {
        let mut best = (T::neg_infinity(), 0);
        for row in [[(a, 0), (b, 1)], [(c, w), (d, w + 1)]] {
            for (v, at) in row {
                if v > best.0 || v.is_nan() {
                    best = (v, at);
                    if v.is_nan() {
                        break;
                    }
                }
            }
        }
        return best;
    }
    // Selects, not branches: which of four values is largest is a coin toss the branch
    // predictor loses half the time.
    let (mut best, mut at) = (a, 0);
    for (v, offset) in [(b, 1), (c, w), (d, w + 1)] {
        let larger = v > best;
        best = if larger { v } else { best };
        at = if larger { offset } else { at };
    }
    (best, at)
}

/// The 2x2, stride-2 windows in blocks of up to 16 with AVX-512 (f32): a select chain over
/// the four corners of 16 windows at once, with [`max_plane_2x2`]'s order (first maximum in
/// row-major order, `v > best`). Whole planes go in groups of 16 windows where the output
/// rows hold a multiple of 16 windows (one row per group) or exactly 8 (two rows per group);
/// otherwise row pair by row pair. A block holding a NaN is left to the scalar rule.
mod wide_2x2 {
    use crate::scalar::Scalar;

    /// Windows per block.
    pub(super) const WINDOWS: usize = 16;
    /// Most blocks one call reports on (one bit each; longer rows: the rest run the generic
    /// loop).
    const MAX_BLOCKS: usize = 64;

    /// Pools the blocks of a row pair (`top`, `bottom`: `2 wo` values from the plane offset
    /// `r0`, rows `w` apart; the last block may be shorter) into `ys` (and `args`, with
    /// `ARG`); bit `b` of the result is set where block `b` was written.
    #[inline(always)]
    pub(super) fn rows<T: Scalar, const ARG: bool>(
        top: &[T],
        bottom: &[T],
        ys: &mut [T],
        args: &mut [u32],
        r0: usize,
        w: usize,
    ) -> u64 {
        let mut done = 0u64;
        #[cfg(target_arch = "x86_64")]
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && crate::kernels::cpu::isa() == crate::kernels::cpu::Isa::Avx512
        {
            let blocks = ys.len().div_ceil(WINDOWS).min(MAX_BLOCKS);
            // SAFETY: T is f32 (the TypeId test), so the casts keep type and length.
            let (top, bottom, ys) = unsafe {
                (
                    std::slice::from_raw_parts(top.as_ptr().cast::<f32>(), top.len()),
                    std::slice::from_raw_parts(bottom.as_ptr().cast::<f32>(), bottom.len()),
                    std::slice::from_raw_parts_mut(ys.as_mut_ptr().cast::<f32>(), ys.len()),
                )
            };
            for b in 0..blocks {
                let o = b * WINDOWS;
                let (n, i) = (WINDOWS.min(ys.len() - o), 2 * o);
                let args = if ARG {
                    &mut args[o..o + n]
                } else {
                    &mut [][..]
                };
                // SAFETY: the machine runs AVX-512 (`isa`); the slices hold the block.
                let written = unsafe {
                    block::<ARG>(
                        &top[i..i + 2 * n],
                        &bottom[i..i + 2 * n],
                        &mut ys[o..o + n],
                        args,
                        (r0 + i) as u32,
                        w as u32,
                    )
                };
                done |= u64::from(written) << b;
            }
        }
        let _ = (top, bottom, ys, args, r0, w);
        done
    }

    /// Pools every window of the first output rows of the plane in groups of 16 where the
    /// vector path runs (f32 with AVX-512) and the plane's layout suits it: output rows of a
    /// multiple of 16 windows (a group is 16 windows of one row) or of 8 (a group is two
    /// rows; an odd last row is left). Returns how many output rows it pooled (0 where it
    /// does not run); [`max_plane_2x2`] pools the rest.
    #[inline(always)]
    pub(super) fn plane<T: Scalar, const ARG: bool>(
        g: &super::PoolGeom,
        x: &[T],
        y: &mut [T],
        arg: &mut [u32],
    ) -> usize {
        #[cfg(target_arch = "x86_64")]
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && crate::kernels::cpu::isa() == crate::kernels::cpu::Isa::Avx512
        {
            let (w, wo, ho) = (g.w, g.wo(), g.ho());
            // The distance from a group's first 8 windows' top-left corners to its last 8's.
            let (rows, delta) = if wo % WINDOWS == 0 {
                (ho, WINDOWS)
            } else if 2 * wo == WINDOWS {
                (ho / 2 * 2, 2 * w)
            } else {
                return 0;
            };
            assert!(x.len() >= g.h * w && y.len() >= rows * wo && (!ARG || arg.len() >= rows * wo));
            // SAFETY: T is f32 (the TypeId test), so the casts keep type and length; the
            // machine runs AVX-512 (`isa`); the lengths are checked above.
            unsafe {
                let x = std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len());
                let y = std::slice::from_raw_parts_mut(y.as_mut_ptr().cast::<f32>(), y.len());
                groups::<ARG>(x, y, arg, (w, wo, rows), delta);
            }
            return rows;
        }
        let _ = (g, x, y, arg);
        0
    }

    /// The `rows·wo/16` groups of [`plane`]: group `i` holds output windows `16i..16i+16` in
    /// row-major order, its first 8 top-left corners at `first, first+2, ..` and its last 8
    /// at `first+delta, first+delta+2, ..`.
    ///
    /// # Safety
    /// The machine runs AVX-512F; `x` holds a plane `w` wide of at least `2·rows` rows (plus
    /// one where `delta = 2w`: the layout [`plane`] picks), `y` (and `arg`, with `ARG`) at
    /// least `rows·wo` windows.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn groups<const ARG: bool>(
        x: &[f32],
        y: &mut [f32],
        arg: &mut [u32],
        (w, wo, rows): (usize, usize, usize),
        delta: usize,
    ) {
        use std::arch::x86_64::*;
        let (even, _) = lane_offsets();
        // Offsets of the corners from `first`: the last 8 lanes start `delta` on.
        let offsets =
            _mm512_mask_add_epi32(even, 0xff00, even, _mm512_set1_epi32(delta as i32 - 16));
        for o in (0..rows * wo).step_by(WINDOWS) {
            let first = 2 * (o / wo) * w + 2 * (o % wo);
            let p = x.as_ptr().add(first);
            let q = p.add(delta);
            let corners = [
                (_mm512_loadu_ps(p), _mm512_loadu_ps(q)),
                (_mm512_loadu_ps(p.add(w)), _mm512_loadu_ps(q.add(w))),
            ];
            match select(corners, w) {
                Some((best, at)) => {
                    _mm512_storeu_ps(y.as_mut_ptr().add(o), best);
                    if ARG {
                        let base = _mm512_set1_epi32(first as i32);
                        let idx = _mm512_add_epi32(_mm512_add_epi32(base, offsets), at);
                        _mm512_storeu_si512(arg.as_mut_ptr().add(o).cast(), idx);
                    }
                }
                None => {
                    for i in o..o + WINDOWS {
                        let base = 2 * (i / wo) * w + 2 * (i % wo);
                        let (best, at) = super::window_2x2(x, base, w);
                        y[i] = best;
                        if ARG {
                            arg[i] = (base + at) as u32;
                        }
                    }
                }
            }
        }
    }

    /// [`super::max_plane_adjoint`] of 2x2, stride-2 windows into the zeroed `out`, 16
    /// windows at a time, where the vector path runs (f32 with AVX-512): each window's
    /// element `relu'(relu_at) · (0 + src)` (the scalar rule's operations: the add into the
    /// zero, then the mask) is placed at the corner its argmax names, the window's other three
    /// corners get zeros, and each pair of input rows is written whole. Returns false, having
    /// written nothing, where it does not run.
    #[inline(always)]
    pub(super) fn adjoint<T: Scalar>(
        g: &super::PoolGeom,
        arg: &[u32],
        src: &[T],
        relu_at: Option<&[T]>,
        out: &mut [T],
        (pad, pitch): (usize, usize),
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && crate::kernels::cpu::isa() == crate::kernels::cpu::Isa::Avx512
            && (g.kh, g.kw, g.stride) == (2, 2, 2)
        {
            let (ho, wo) = (g.ho(), g.wo());
            let len = ho * wo;
            assert!(arg.len() >= len && src.len() >= len && relu_at.is_none_or(|z| z.len() >= len));
            assert!(pitch >= g.w + 2 * pad && out.len() >= (2 * ho + pad) * pitch);
            // SAFETY: T is f32 (the TypeId test), so the casts keep type and length; the
            // machine runs AVX-512 (`isa`); the lengths are checked above.
            unsafe {
                let f32s = |v: &[T]| std::slice::from_raw_parts(v.as_ptr().cast::<f32>(), len);
                let out = std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<f32>(), out.len());
                let relu_at = relu_at.map(f32s);
                adjoint_rows(
                    g.w,
                    (ho, wo),
                    &arg[..len],
                    f32s(src),
                    relu_at,
                    out,
                    (pad, pitch),
                );
            }
            return true;
        }
        let _ = (g, arg, src, relu_at, out, pad, pitch);
        false
    }

    /// [`adjoint`]'s loop: output row `oy`'s windows in blocks of 16 (the last one masked)
    /// write input rows `2 oy` and `2 oy + 1` from column `0` to `2 wo`.
    ///
    /// # Safety
    /// The machine runs AVX-512F; `arg`, `src` (and `relu_at`) hold `ho·wo` windows of a plane
    /// `w` wide, every `arg` inside its window; `out` holds `2 ho` rows at `pitch` after `pad`
    /// rows, each with `pad + 2 wo` elements.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn adjoint_rows(
        w: usize,
        (ho, wo): (usize, usize),
        arg: &[u32],
        src: &[f32],
        relu_at: Option<&[f32]>,
        out: &mut [f32],
        (pad, pitch): (usize, usize),
    ) {
        use crate::kernels::masked::avx512::mask16;
        use std::arch::x86_64::*;
        let (even, _) = lane_offsets();
        let first_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let second_half = _mm512_add_epi32(first_half, _mm512_set1_epi32(8));
        let (zero, one) = (_mm512_setzero_ps(), _mm512_set1_ps(1.0));
        let corner = |c: usize| _mm512_set1_epi32(c as i32);
        let corners = [[corner(0), corner(1)], [corner(w), corner(w + 1)]];
        for oy in 0..ho {
            for ox in (0..wo).step_by(WINDOWS) {
                let n = (wo - ox).min(WINDOWS);
                let m = mask16(n);
                let i = oy * wo + ox;
                let a = _mm512_maskz_loadu_epi32(m, arg.as_ptr().add(i).cast());
                let mut v = _mm512_add_ps(zero, _mm512_maskz_loadu_ps(m, src.as_ptr().add(i)));
                if let Some(z) = relu_at {
                    let z = _mm512_maskz_loadu_ps(m, z.as_ptr().add(i));
                    let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(z, zero);
                    v = _mm512_mul_ps(_mm512_maskz_mov_ps(positive, one), v);
                }
                // Each window's argmax relative to its top-left corner: 0, 1, w or w + 1.
                let top_left =
                    _mm512_add_epi32(_mm512_set1_epi32((2 * (oy * w + ox)) as i32), even);
                let at = _mm512_sub_epi32(a, top_left);
                for (dr, [left, right]) in corners.iter().enumerate() {
                    let l = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(at, *left), v);
                    let r = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(at, *right), v);
                    let p = out
                        .as_mut_ptr()
                        .add((2 * oy + dr + pad) * pitch + pad + 2 * ox);
                    let (lo, hi) = (
                        _mm512_permutex2var_ps(l, first_half, r),
                        _mm512_permutex2var_ps(l, second_half, r),
                    );
                    if n == WINDOWS {
                        _mm512_storeu_ps(p, lo);
                        _mm512_storeu_ps(p.add(16), hi);
                    } else {
                        _mm512_mask_storeu_ps(p, mask16(2 * n), lo);
                        if n > 8 {
                            _mm512_mask_storeu_ps(p.add(16), mask16(2 * n - 16), hi);
                        }
                    }
                }
            }
        }
    }

    /// Lane indices `0, 2, .., 30` and `1, 3, .., 31`: the top-left and top-right corners of
    /// 16 windows in a run of 32 values.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lane_offsets() -> (std::arch::x86_64::__m512i, std::arch::x86_64::__m512i) {
        use std::arch::x86_64::*;
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        (even, _mm512_add_epi32(even, _mm512_set1_epi32(1)))
    }

    /// The select chain over 16 windows whose top rows are the 32 values `top` (two
    /// vectors) and bottom rows `bottom` (`[top, bottom]`; rows `w` apart): each window's
    /// maximum and its corner's offset (0, 1, `w` or `w + 1`), or `None` where a window holds
    /// a NaN.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn select(
        [(t0, t1), (b0, b1)]: [(std::arch::x86_64::__m512, std::arch::x86_64::__m512); 2],
        w: usize,
    ) -> Option<(std::arch::x86_64::__m512, std::arch::x86_64::__m512i)> {
        use std::arch::x86_64::*;
        let (even, odd) = lane_offsets();
        let a = _mm512_permutex2var_ps(t0, even, t1);
        let corners = [
            (_mm512_permutex2var_ps(t0, odd, t1), 1),
            (_mm512_permutex2var_ps(b0, even, b1), w),
            (_mm512_permutex2var_ps(b0, odd, b1), w + 1),
        ];
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, corners[0].0)
            | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(corners[1].0, corners[2].0);
        if nan != 0 {
            return None;
        }
        let (mut best, mut at) = (a, _mm512_setzero_si512());
        for (v, off) in corners {
            let larger = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, best);
            best = _mm512_mask_blend_ps(larger, best, v);
            at = _mm512_mask_blend_epi32(larger, at, _mm512_set1_epi32(off as i32));
        }
        Some((best, at))
    }

    /// One block of `n` ≤ 16 windows (`n = ys.len()`): `top` and `bottom` hold `2 n` values
    /// each (nothing past them is read), `first` is the plane offset of the first window's
    /// top-left value. False (nothing written) on a NaN.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const ARG: bool>(
        top: &[f32],
        bottom: &[f32],
        ys: &mut [f32],
        args: &mut [u32],
        first: u32,
        w: u32,
    ) -> bool {
        use std::arch::x86_64::*;
        let n = ys.len();
        assert!(n <= 16 && top.len() == 2 * n && bottom.len() == 2 * n);
        assert!(!ARG || args.len() == n);
        // A shorter block goes through zero-padded copies: plain loads and stores only
        // (masked stores cost far more than these copies on Zen 5).
        let load = |row: &[f32]| {
            let mut full = [0f32; 32];
            let p = if n == 16 {
                row.as_ptr()
            } else {
                full[..2 * n].copy_from_slice(row);
                full.as_ptr()
            };
            (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
        };
        let Some((best, at)) = select([load(top), load(bottom)], w as usize) else {
            return false;
        };
        let idx = _mm512_add_epi32(
            _mm512_add_epi32(_mm512_set1_epi32(first as i32), lane_offsets().0),
            at,
        );
        if n == 16 {
            _mm512_storeu_ps(ys.as_mut_ptr(), best);
            if ARG {
                _mm512_storeu_si512(args.as_mut_ptr().cast(), idx);
            }
        } else {
            let (mut v, mut i) = ([0f32; 16], [0u32; 16]);
            _mm512_storeu_ps(v.as_mut_ptr(), best);
            ys.copy_from_slice(&v[..n]);
            if ARG {
                _mm512_storeu_si512(i.as_mut_ptr().cast(), idx);
                args.copy_from_slice(&i[..n]);
            }
        }
        true
    }
}

/// The adjoint of max pooling for one plane: `out` is zeroed, each window's `src` value is
/// added at its argmax `arg` (windows in row-major order), then, with `relu_at` (the pooled
/// values of a ReLU before the pooling), each argmax element is multiplied by ReLU's
/// derivative at its window's value. `out` holds the input plane (`g.h x g.w`) with `pad`
/// zero rows and columns around it and row pitch `pitch` (`(0, g.w)`: the plain plane).
/// Disjoint 2x2 windows run 16 at a time where the vector path runs (f32 with AVX-512),
/// with the same operations on every element.
pub fn max_plane_adjoint<T: Scalar>(
    g: &PoolGeom,
    arg: &[u32],
    src: &[T],
    relu_at: Option<&[T]>,
    out: &mut [T],
    (pad, pitch): (usize, usize),
) {
    out.fill(T::zero());
    if !wide_2x2::adjoint(g, arg, src, relu_at, out, (pad, pitch)) {
        max_plane_adjoint_any(g, arg, src, relu_at, out, (pad, pitch));
    }
}

/// [`max_plane_adjoint`] for any window, into the zeroed `out`.
fn max_plane_adjoint_any<T: Scalar>(
    g: &PoolGeom,
    arg: &[u32],
    src: &[T],
    relu_at: Option<&[T]>,
    out: &mut [T],
    (pad, pitch): (usize, usize),
) {
    let (w, wo) = (g.w, g.wo());
    // Each window's argmax as an index into `out`: its row within the window found by
    // comparisons, not a division or a branch (which row wins is a coin toss).
    let index = |oy: usize, a: u32| {
        let r0 = oy * g.stride;
        let rel = a as usize - r0 * w;
        let mut dr = 0;
        for t in 1..g.kh {
            dr += usize::from(rel >= t * w);
        }
        (r0 + dr + pad) * pitch + rel - dr * w + pad
    };
    let rows = arg[..g.out_len()].chunks_exact(wo).enumerate();
    for ((oy, a), v) in rows.clone().zip(src.chunks_exact(wo)) {
        for (&a, &v) in a.iter().zip(v) {
            let d = index(oy, a);
            out[d] = out[d] + v;
        }
    }
    if let Some(z) = relu_at {
        for ((oy, a), z) in rows.zip(z.chunks_exact(wo)) {
            for (&a, &z) in a.iter().zip(z) {
                let d = index(oy, a);
                out[d] = relu_d1(z) * out[d];
            }
        }
    }
}

/// Average pooling of one plane (linear; also the adjoint's partner of [`avg_plane_adjoint`]):
/// each window summed from zero in row-major order, then scaled. Square windows of 2, 3 or 4
/// with the stride of the window (disjoint windows, e.g. the input pooling of the `mlp`
/// presets) run row by row at the vector width, with the same sums.
pub fn avg_plane<T: Scalar>(g: &PoolGeom, x: &[T], y: &mut [T]) {
    let disjoint = (g.kh == g.kw && g.kw == g.stride).then_some(g.kh);
    match disjoint {
        Some(2) => avg_plane_disjoint::<T, 2>(g, x, y),
        Some(3) => avg_plane_disjoint::<T, 3>(g, x, y),
        Some(4) => avg_plane_disjoint::<T, 4>(g, x, y),
        _ => avg_plane_any(g, x, y),
    }
}

/// [`avg_plane`] for any window.
fn avg_plane_any<T: Scalar>(g: &PoolGeom, x: &[T], y: &mut [T]) {
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

/// [`avg_plane`] for `K x K` windows with stride `K`: a row of outputs at a time, each
/// window's `K` values of an input row added in order (`K` a constant, so the compiler
/// loads the row's windows as whole vectors and deinterleaves them), row after row; the
/// operations on each output are [`avg_plane_any`]'s.
fn avg_plane_disjoint<T: Scalar, const K: usize>(g: &PoolGeom, x: &[T], y: &mut [T]) {
    super::cpu::vectorized(
        #[inline(always)]
        || avg_rows_disjoint::<T, K>(g, x, y),
    )
}

/// [`avg_plane_disjoint`]'s loop, inlined into the vector-width copy.
#[inline(always)]
fn avg_rows_disjoint<T: Scalar, const K: usize>(g: &PoolGeom, x: &[T], y: &mut [T]) {
    let (w, wo) = (g.w, g.wo());
    let inv = T::one() / T::from_usize_lossy(K * K);
    for (oy, ys) in y[..g.ho() * wo].chunks_exact_mut(wo).enumerate() {
        ys.fill(T::zero());
        for ki in 0..K {
            let row = &x[(oy * K + ki) * w..][..wo * K];
            for (s, window) in ys.iter_mut().zip(row.chunks_exact(K)) {
                for &v in window {
                    *s = *s + v;
                }
            }
        }
        for s in ys.iter_mut() {
            *s = *s * inv;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The 2x2 fast path gives the generic loop's values and indices, ties, infinities and
    /// NaNs included, and so does the values-only path, on planes that go in groups of 16
    /// windows and on planes that go row pair by row pair.
    #[test]
    fn max_2x2_matches_the_generic_window_loop() {
        let specials = [
            0.5,
            0.5,
            f64::NEG_INFINITY,
            f64::NAN,
            2.0,
            -1.0,
            f64::INFINITY,
        ];
        let mut state = 7u64;
        // Whole planes in groups (32x32, 6x64; two rows a group: 16x16, 18x17 with an odd last
        // row), row pairs (the rest).
        let sizes = [
            (2, 2),
            (4, 6),
            (7, 9),
            (32, 32),
            (6, 64),
            (16, 16),
            (18, 17),
            (5, 200),
            (2, 2100),
        ];
        // With NaN (most windows take the generic rule) and without (the select chain, ties
        // of equal values and of zeros of both signs).
        let no_nan = [
            0.5,
            0.5,
            0.0,
            -0.0,
            f64::NEG_INFINITY,
            2.0,
            -1.0,
            f64::INFINITY,
        ];
        for (h, w, specials) in sizes
            .iter()
            .map(|&(h, w)| (h, w, &specials[..]))
            .chain(sizes.iter().map(|&(h, w)| (h, w, &no_nan[..])))
        {
            let x: Vec<f64> = (0..h * w)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    specials[(state >> 33) as usize % specials.len()]
                })
                .collect();
            let g = PoolGeom {
                h,
                w,
                kh: 2,
                kw: 2,
                stride: 2,
            };
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            agree(&g, &x, |v| v.to_bits());
            agree(&g, &x32, |v| v.to_bits() as u64);
        }
    }

    /// Average pooling over disjoint square windows (the row-wise path) gives the generic
    /// loop's values bit for bit, on planes that are and are not a multiple of the window.
    #[test]
    fn disjoint_average_pooling_matches_the_generic_window_loop() {
        let mut state = 11u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f64 / (1u64 << 24) as f64 - 0.5) * 3.0
        };
        for k in 1..=5 {
            for (h, w) in [(8, 8), (32, 32), (9, 14), (k, 3 * k + 1)] {
                if h < k || w < k {
                    continue;
                }
                let g = PoolGeom {
                    h,
                    w,
                    kh: k,
                    kw: k,
                    stride: k,
                };
                let x: Vec<f64> = (0..h * w).map(|_| next()).collect();
                let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
                let (mut y, mut want) = (vec![0.0; g.out_len()], vec![0.0; g.out_len()]);
                avg_plane(&g, &x, &mut y);
                avg_plane_any(&g, &x, &mut want);
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y), bits(&want), "f64 {k} {h}x{w}");
                let (mut y, mut want) = (vec![0f32; g.out_len()], vec![0f32; g.out_len()]);
                avg_plane(&g, &x32, &mut y);
                avg_plane_any(&g, &x32, &mut want);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y), bits(&want), "f32 {k} {h}x{w}");
            }
        }
    }

    /// The adjoint of 2x2 max pooling (f32 on AVX-512: the vector path) gives the generic
    /// scatter's bits, with and without the ReLU mask, into plain and padded planes: rows of
    /// 16 windows, 8, and tails, odd edges left zero, NaN, infinities and signed zeros in the
    /// values and the mask.
    #[test]
    fn max_2x2_adjoint_matches_the_generic_scatter() {
        let specials = [
            0.5f32,
            -0.0,
            0.0,
            f32::NAN,
            f32::INFINITY,
            -2.0,
            1.5,
            f32::NEG_INFINITY,
        ];
        let mut state = 5u64;
        let mut pick = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            specials[(state >> 33) as usize % specials.len()]
        };
        let sizes = [
            (2, 2),
            (32, 32),
            (16, 16),
            (18, 17),
            (6, 64),
            (7, 9),
            (4, 70),
            (3, 37),
        ];
        for (h, w) in sizes {
            let g = PoolGeom {
                h,
                w,
                kh: 2,
                kw: 2,
                stride: 2,
            };
            let x: Vec<f32> = (0..h * w).map(|_| pick()).collect();
            let (mut z, mut arg) = (vec![0f32; g.out_len()], vec![0u32; g.out_len()]);
            max_plane_any(&g, &x, &mut z, &mut arg);
            let src: Vec<f32> = (0..g.out_len()).map(|_| pick()).collect();
            for (pad, extra) in [(0, 0), (1, 0), (2, 3)] {
                let pitch = w + 2 * pad + extra;
                let len = (h + 2 * pad) * pitch;
                for relu_at in [None, Some(&z[..])] {
                    let mut got = vec![7f32; len];
                    max_plane_adjoint(&g, &arg, &src, relu_at, &mut got, (pad, pitch));
                    let mut want = vec![0f32; len];
                    max_plane_adjoint_any(&g, &arg, &src, relu_at, &mut want, (pad, pitch));
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    let case =
                        format!("{h}x{w} pad {pad} pitch {pitch} relu {}", relu_at.is_some());
                    assert_eq!(bits(&got), bits(&want), "{case}");
                }
            }
        }
    }

    /// The 2x2 path (with and without the argmax; f32 on AVX-512 runs the vector blocks)
    /// gives the generic loop's values and indices on the plane `x`.
    fn agree<T: Scalar>(g: &PoolGeom, x: &[T], bits: impl Fn(T) -> u64) {
        let (h, w) = (g.h, g.w);
        let (mut y1, mut a1) = (vec![T::zero(); g.out_len()], vec![0u32; g.out_len()]);
        let (mut y2, mut a2) = (vec![T::zero(); g.out_len()], vec![0u32; g.out_len()]);
        let mut y3 = vec![T::zero(); g.out_len()];
        max_plane(g, x, &mut y1, &mut a1);
        max_plane_any(g, x, &mut y2, &mut a2);
        max_plane_values(g, x, &mut y3, &mut Vec::new());
        assert_eq!(a1, a2, "{h}x{w}");
        let all = |v: &[T]| v.iter().map(|&x| bits(x)).collect::<Vec<_>>();
        assert_eq!(all(&y1), all(&y2), "{h}x{w}");
        assert_eq!(all(&y3), all(&y2), "values only, {h}x{w}");
    }
}

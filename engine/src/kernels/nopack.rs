//! A packing-free GEMM for products with few output rows and a right operand whose rows are
//! contiguous: `C (m x n) = alpha A (m x k) B (k x n) + beta C`, with `m` small (a
//! convolution's output channels) and `n` long (positions).
//!
//! `matrixmultiply` copies ("packs") both operands before its kernel runs. When `m` is small,
//! each packed element of `B` is used only `m` times, so packing costs about as much as the
//! multiply-adds (the profiles of the 16-channel ResNet layers show it). Here a register tile
//! of rows by two vectors of columns of `C` (AVX-512: 8 rows by 32 f32 or 16 f64 columns;
//! AVX2+FMA: 6 rows by 16 f32 or 8 f64 columns) is accumulated straight from `B`'s rows,
//! with one broadcast element of `A` per row and step: no copies at all. Every row tile of a
//! column strip reads the same `k` short runs of `B` (from L1 when they fit, else from L2).
//! Without AVX2 and FMA (or under `FLATMIN_ISA=portable`) [`try_gemm`] declines and the
//! general GEMM runs.
//!
//! The one copy that pays is of `A` itself, when one `A` serves many products (a
//! convolution's weight, once per sample): [`PackedA`] lays it out tile by tile, so a tile
//! reads each step's elements at fixed offsets from one pointer instead of one row stride
//! apart. Without the row strides to keep, AVX-512 f32 tiles grow to 12 rows (24
//! accumulators): measured on an Intel Xeon Ice Lake-SP, 4-17% faster on the convolution
//! shapes of cnn-s and of resnet20's 32- and 64-channel stages, even on the 16-channel one.
//!
//! Every element of `C` is one fused multiply-add chain over `p = 0..k` in order, whatever
//! tile it falls in and whichever instruction set runs, so results depend only on the
//! operands: the AVX2 and AVX-512 kernels give the same bits.

#[cfg(target_arch = "x86_64")]
use super::cpu::Isa;
use crate::scalar::Scalar;

/// Largest `m` for which [`try_gemm`] runs this kernel; above it, packing pays for itself.
pub const MAX_ROWS: usize = 64;
/// Smallest `n` for which [`try_gemm`] runs this kernel (narrower products are too small to
/// matter, and mostly tail).
pub const MIN_COLS: usize = 16;

/// Operands of one product, as raw strided pointers (rows of `b` contiguous, `c` row-major).
#[derive(Clone, Copy)]
struct Operands<T> {
    k: usize,
    alpha: T,
    a: *const T,
    rsa: usize,
    csa: usize,
    b: *const T,
    ldb: usize,
    /// When not null: row `p` of `b` starts at `b + boff[p]` instead of `b + p * ldb`.
    boff: *const usize,
    /// `a` is laid out tile by tile ([`PackedA`]; `rsa = k`, `csa` unused).
    packed: bool,
    /// When not null: `b` is a compact CHW sample read through these taps' border masks
    /// ([`try_gemm_compact_packed`]; `boff` holds the taps' offsets then).
    compact: *const CompactTaps,
    beta: T,
    c: *mut T,
    ldc: usize,
}

/// Runs the product with this kernel when the machine has the vector instructions it is
/// built for (AVX-512F) and the shape suits it; returns `false`, having done nothing,
/// otherwise.
///
/// # Safety
/// `a` must cover `m x k` elements at strides `(rsa, csa)`, `b` must cover `k` rows of `n`
/// contiguous elements `ldb` apart, and `c` must cover `m` rows of `n` elements `ldc` apart,
/// initialized and not aliasing `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn try_gemm<T: Scalar>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    (a, rsa, csa): (*const T, usize, usize),
    (b, ldb): (*const T, usize),
    beta: T,
    (c, ldc): (*mut T, usize),
) -> bool {
    if k == 0 || !accepts(m, n) {
        return false;
    }
    let ops = Operands {
        k,
        alpha,
        a,
        rsa,
        csa,
        b,
        ldb,
        boff: std::ptr::null(),
        packed: false,
        compact: std::ptr::null(),
        beta,
        c,
        ldc,
    };
    dispatch(m, n, ops)
}

/// True when [`try_gemm`] and [`try_gemm_rows`] run this kernel for an `m x n` product of
/// element type `T` on this machine (a choice that depends only on the shape and the CPU).
pub fn accepts_type<T: Scalar>(m: usize, n: usize) -> bool {
    use std::any::TypeId;
    let typed =
        TypeId::of::<T>() == TypeId::of::<f32>() || TypeId::of::<T>() == TypeId::of::<f64>();
    typed && accepts(m, n) && has_kernel()
}

fn accepts(m: usize, n: usize) -> bool {
    m > 0 && m <= MAX_ROWS && n >= MIN_COLS
}

#[cfg(target_arch = "x86_64")]
fn has_kernel() -> bool {
    super::cpu::isa() >= Isa::Avx2
}

#[cfg(not(target_arch = "x86_64"))]
fn has_kernel() -> bool {
    false
}

/// [`try_gemm`] with the rows of `B` anywhere in one buffer: row `p` (for `p` in
/// `0..offsets.len()`, so `k = offsets.len()`) is the `n` contiguous elements at
/// `b + offsets[p]`. A stride-1 convolution over a zero-padded image is such a product with
/// no lowered copy at all: row `(c, ki, kj)` of its column matrix is the padded image read
/// from offset `(c·hp + ki)·wp + kj` on (see `ops::conv`). Same order of operations per
/// element of `C` as [`try_gemm`].
///
/// # Safety
/// `a` must cover `m x k` elements at strides `(rsa, csa)`, `b + offsets[p] .. + n` must be
/// readable for every `p`, and `c` must cover `m` rows of `n` elements `ldc` apart,
/// initialized and not aliasing `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn try_gemm_rows<T: Scalar>(
    m: usize,
    n: usize,
    alpha: T,
    (a, rsa, csa): (*const T, usize, usize),
    (b, offsets): (*const T, &[usize]),
    beta: T,
    (c, ldc): (*mut T, usize),
) -> bool {
    if offsets.is_empty() || !accepts(m, n) {
        return false;
    }
    let ops = Operands {
        k: offsets.len(),
        alpha,
        a,
        rsa,
        csa,
        b,
        ldb: 0,
        boff: offsets.as_ptr(),
        packed: false,
        compact: std::ptr::null(),
        beta,
        c,
        ldc,
    };
    dispatch(m, n, ops)
}

/// A left operand `A` (`m x k`) copied once into the layout the register tiles of this
/// machine's kernel read: the tile of `r` rows from row `i` (see `tile_plan`) holds its `k`
/// steps' `r` elements contiguously from `i·k` on, so each step's elements lie at fixed
/// offsets from one pointer. A convolution packs its weight once and runs every sample's
/// product on it ([`try_gemm_rows_packed`]); the products' bits are those of the unpacked `A`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub struct PackedA<T> {
    m: usize,
    k: usize,
    #[cfg(target_arch = "x86_64")]
    isa: Isa,
    data: Vec<T>,
}

impl<T: Scalar> PackedA<T> {
    /// Packs the row-major `m x k` matrix `a`, or `None` where [`try_gemm_rows_packed`] would
    /// decline every product with `m` rows (see [`accepts_type`]).
    pub fn new(m: usize, k: usize, a: &[T]) -> Option<Self> {
        assert_eq!(a.len(), m * k, "packed operand of {m} x {k}");
        if !accepts_type::<T>(m, MIN_COLS) {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        return Some(Self::for_isa(super::cpu::isa(), m, k, a));
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    /// [`PackedA::new`] for the kernel of `isa` (which the machine must run).
    #[cfg(target_arch = "x86_64")]
    fn for_isa(isa: Isa, m: usize, k: usize, a: &[T]) -> Self {
        let mut data = Vec::with_capacity(m * k);
        for (i, r) in tile_plan::<T>(isa, m) {
            for p in 0..k {
                data.extend((i..i + r).map(|row| a[row * k + p]));
            }
        }
        PackedA { m, k, isa, data }
    }

    /// Rows of `A`.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// The kernel's operands for `C = alpha A B + beta C` with row `p` of `B` at
    /// `b + offsets[p]`, read through the masks of `compact` taps when not null.
    #[cfg(target_arch = "x86_64")]
    fn operands(
        &self,
        alpha: T,
        (b, offsets): (*const T, &[usize]),
        compact: *const CompactTaps,
        beta: T,
        (c, ldc): (*mut T, usize),
    ) -> Operands<T> {
        Operands {
            k: self.k,
            alpha,
            a: self.data.as_ptr(),
            rsa: self.k,
            csa: 0,
            b,
            ldb: 0,
            boff: offsets.as_ptr(),
            packed: true,
            compact,
            beta,
            c,
            ldc,
        }
    }
}

/// The register tiles of an `m`-row product of `T` over packed `A` on `isa`, as `(first row,
/// rows)` in the order the kernel runs them: [`packed_tiles`] tiles of the packed height, then
/// tiles of the plain height, then 4, 2 and 1 rows (the loop of the kernel's rows function).
#[cfg(target_arch = "x86_64")]
fn tile_plan<T: Scalar>(isa: Isa, m: usize) -> Vec<(usize, usize)> {
    let f32_type = std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>();
    let [packed, plain] = match isa {
        Isa::Avx512 if f32_type => avx512::F32_ROWS,
        Isa::Avx512 => avx512::F64_ROWS,
        _ => avx2::ROWS,
    };
    let mut tiles: Vec<(usize, usize)> = (0..packed_tiles(m, packed, plain))
        .map(|t| (t * packed, packed))
        .collect();
    let mut i = tiles.len() * packed;
    for (r, repeat) in [(plain, true), (4, false), (2, false), (1, false)] {
        while i + r <= m {
            tiles.push((i, r));
            i += r;
            if !repeat {
                break;
            }
        }
    }
    tiles
}

/// How many tiles of `packed` rows an `m`-row product over packed `A` starts with (the rest
/// goes to tiles of `plain`, 4, 2 and 1 rows): as many as fit, less one where that turns a
/// tail of fewer than `plain` rows into whole `plain`-row tiles (64 rows with tiles of 12
/// and 8: 12 x 4 + 8 x 2, not 12 x 5 + 4, whose 4-row tile has a third of the multiply-adds
/// per load).
const fn packed_tiles(m: usize, packed: usize, plain: usize) -> usize {
    let (whole, tail) = (m / packed, m % packed);
    if packed > plain
        && whole > 0
        && tail > 0
        && tail < plain
        && (packed + tail).is_multiple_of(plain)
    {
        whole - 1
    } else {
        whole
    }
}

/// [`try_gemm_rows`] with `A` packed ([`PackedA`]): `C = alpha A B + beta C` with row `p` of
/// `B` at `b + offsets[p]` (`offsets.len()` must be `A`'s `k`). Returns `false`, having done
/// nothing, where the shape does not suit the kernel.
///
/// # Safety
/// As [`try_gemm_rows`].
pub unsafe fn try_gemm_rows_packed<T: Scalar>(
    n: usize,
    alpha: T,
    a: &PackedA<T>,
    (b, offsets): (*const T, &[usize]),
    beta: T,
    (c, ldc): (*mut T, usize),
) -> bool {
    assert_eq!(offsets.len(), a.k, "packed operand's k");
    if a.k == 0 || !accepts(a.m, n) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let ops = a.operands(alpha, (b, offsets), std::ptr::null(), beta, (c, ldc));
        dispatch_with(a.isa, a.m, n, ops)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (alpha, b, beta, c, ldc);
        false
    }
}

/// Largest kernel side of [`CompactTaps`] (7 x 7 taps).
const MAX_SIDE: usize = 7;
/// Largest number of taps of [`CompactTaps`].
const MAX_TAPS: usize = MAX_SIDE * MAX_SIDE;

/// The taps of a "same" stride-1 convolution (a square `k x k` kernel, `k = 2 pad + 1`, so the
/// output has the input's `h x w` positions) read straight from a compact CHW sample, without
/// a zero-padded copy: position `q` of the output reads the input at
/// `q + ki·w + kj - pad·w - pad` for tap `(ki, kj)`, and the lanes whose tap falls outside the
/// image (the padding) are masked off, so they load as the zeros the padded copy would hold. Each element of the
/// product is the same fused multiply-add chain as over the padded copy, with the same bits.
pub struct CompactTaps {
    h: usize,
    w: usize,
    side: usize,
    pad: usize,
    /// Offset of row `(c, ki, kj)` (the weight's column order) from the sample shifted back
    /// by `pad·w + pad`: `c·h·w + ki·w + kj`.
    offsets: Vec<usize>,
    /// Tap `ki·side + kj` of each row.
    tap: Vec<u8>,
}

impl CompactTaps {
    /// The taps of a `side x side` convolution with padding `pad` over `c_in` channels of
    /// `h x w`, or `None` unless `side = 2 pad + 1 <= 7`.
    pub fn new(c_in: usize, h: usize, w: usize, side: usize, pad: usize) -> Option<Self> {
        if side != 2 * pad + 1 || side > MAX_SIDE || h == 0 || w == 0 {
            return None;
        }
        let mut offsets = Vec::with_capacity(c_in * side * side);
        let mut tap = Vec::with_capacity(c_in * side * side);
        for c in 0..c_in {
            for ki in 0..side {
                for kj in 0..side {
                    offsets.push(c * h * w + ki * w + kj);
                    tap.push((ki * side + kj) as u8);
                }
            }
        }
        Some(CompactTaps {
            h,
            w,
            side,
            pad,
            offsets,
            tap,
        })
    }

    /// Output (and input) positions per channel, `h·w`.
    pub fn positions(&self) -> usize {
        self.h * self.w
    }

    /// Rows of the implicit column matrix, `c_in·side²` (the packed weight's `k`).
    pub fn rows(&self) -> usize {
        self.offsets.len()
    }

    /// For the column strip of `2·lanes` output positions from `j`: per tap, the lanes whose
    /// input lies inside the image (bit `l` of word `v` for position `j + v·lanes + l`;
    /// positions past the last are off).
    fn strip_bits(&self, j: usize, lanes: usize, out: &mut [[u32; 2]; MAX_TAPS]) {
        let (w, pad, side) = (self.w, self.pad, self.side);
        // Lanes whose input row (per ki) and column (per kj) lie inside the image, built one
        // image row of the strip at a time (a few per strip), not lane by lane.
        let (mut rows, mut cols) = ([0u64; MAX_SIDE], [0u64; MAX_SIDE]);
        let (mut y, mut x, mut l) = (j / w, j % w, 0);
        while l < 2 * lanes && y < self.h {
            let seg = (w - x).min(2 * lanes - l);
            let run = |from: usize, to: usize| {
                let (from, to) = (from.clamp(x, x + seg), to.clamp(x, x + seg));
                if to > from {
                    ((1u64 << (to - from)) - 1) << (l + from - x)
                } else {
                    0
                }
            };
            for (ki, r) in rows.iter_mut().enumerate().take(side) {
                if y + ki >= pad && y + ki < self.h + pad {
                    *r |= run(x, x + seg);
                }
            }
            for (kj, c) in cols.iter_mut().enumerate().take(side) {
                // Input column x + kj - pad inside [0, w): x in [pad - kj, w + pad - kj).
                *c |= run(pad.saturating_sub(kj), (w + pad).saturating_sub(kj));
            }
            l += seg;
            y += 1;
            x = 0;
        }
        let low = (1u64 << lanes) - 1;
        for ki in 0..self.side {
            for kj in 0..self.side {
                let bits = rows[ki] & cols[kj];
                out[ki * self.side + kj] = [(bits & low) as u32, (bits >> lanes) as u32];
            }
        }
    }
}

/// True when [`try_gemm_compact_packed`] runs for an `m`-row product of element type `T` over
/// `positions` output positions on this machine and pays: with AVX-512. The AVX2 kernel
/// takes compact taps too (and gives the same bits), but its masked loads and mask vectors
/// make its steps load-bound (12 loads per 12 multiply-adds against 9 over the padded copy):
/// resnet20's gradient was 3% slower than with the padded copy (AMD EPYC Zen 4,
/// `FLATMIN_ISA=avx2`, 1 thread), where with AVX-512 it is 5% faster.
pub fn compact_taps_pay<T: Scalar>(m: usize, positions: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return accepts_type::<T>(m, positions) && super::cpu::isa() >= Isa::Avx512;
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, positions);
        false
    }
}

/// `C = alpha A ⊛ x + beta C` for one compact CHW sample `x` of a "same" stride-1
/// convolution ([`CompactTaps`]): `C` holds `A`'s `m` rows of [`CompactTaps::positions`]
/// elements `ldc` apart, in the compact output layout, so neither a padded copy of `x` nor a
/// compaction of the product is needed. Returns `false`, having done nothing, where the
/// shape does not suit the kernel. Same bits as [`try_gemm_rows_packed`] over the padded copy.
///
/// # Safety
/// `x` must cover `c_in·h·w` elements (the taps' channels) and `c` must cover `m` rows of
/// `positions` elements `ldc` apart, initialized and not aliasing `x`.
pub unsafe fn try_gemm_compact_packed<T: Scalar>(
    alpha: T,
    a: &PackedA<T>,
    taps: &CompactTaps,
    x: *const T,
    beta: T,
    (c, ldc): (*mut T, usize),
) -> bool {
    assert_eq!(taps.rows(), a.k, "packed operand's k");
    let n = taps.positions();
    if a.k == 0 || !accepts(a.m, n) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let b = x.wrapping_sub(taps.pad * taps.w + taps.pad);
        let ops = a.operands(alpha, (b, &taps.offsets), taps, beta, (c, ldc));
        dispatch_with(a.isa, a.m, n, ops)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (alpha, x, beta, c, ldc);
        false
    }
}

#[cfg(target_arch = "x86_64")]
unsafe fn dispatch<T: Scalar>(m: usize, n: usize, ops: Operands<T>) -> bool {
    dispatch_with(super::cpu::isa(), m, n, ops)
}

/// [`dispatch`] with the kernel of instruction set `isa` (which the machine must run).
#[cfg(target_arch = "x86_64")]
unsafe fn dispatch_with<T: Scalar>(isa: Isa, m: usize, n: usize, ops: Operands<T>) -> bool {
    use std::any::TypeId;
    macro_rules! run {
        ($module:ident, $strips:ident, $t:ty) => {{
            // SAFETY: T is exactly the type named by the TypeId test.
            let ops = std::mem::transmute_copy::<Operands<T>, Operands<$t>>(&ops);
            // Packed `A` only comes with an offset table (`try_gemm_rows_packed`), and compact
            // taps only with packed `A` (`try_gemm_compact_packed`).
            match (ops.boff.is_null(), ops.packed, ops.compact.is_null()) {
                (true, false, true) => $module::$strips::<false, false, false>(m, n, ops),
                (false, false, true) => $module::$strips::<true, false, false>(m, n, ops),
                (false, true, true) => $module::$strips::<true, true, false>(m, n, ops),
                (false, true, false) => $module::$strips::<true, true, true>(m, n, ops),
                _ => unreachable!("operands of no kernel variant"),
            }
            true
        }};
    }
    let f32_type = TypeId::of::<T>() == TypeId::of::<f32>();
    let f64_type = TypeId::of::<T>() == TypeId::of::<f64>();
    match isa {
        Isa::Avx512 if f32_type => run!(avx512, f32_strips, f32),
        Isa::Avx512 if f64_type => run!(avx512, f64_strips, f64),
        Isa::Avx2 if f32_type => run!(avx2, f32_strips, f32),
        Isa::Avx2 if f64_type => run!(avx2, f64_strips, f64),
        _ => false,
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dispatch<T: Scalar>(_m: usize, _n: usize, _ops: Operands<T>) -> bool {
    false
}

/// The kernel, written once for every instruction set: `$rows` rows by two vectors of
/// `$lanes` columns per register tile, then tiles of 4, 2 and 1 rows; full column strips
/// with plain loads and stores, the last strip masked (`$mask_of` lanes). Each element of
/// `C` is `alpha · (FMA chain over p in order) (+ beta · C)`, whatever the tile or the
/// instruction set, so every instruction set gives the same bits. With `MASKED` (compact
/// taps, [`CompactTaps`]), each row of `B` loads under its tap's lane masks for the strip
/// (`$mask_bits` turns a word of lane bits into a mask), zeros where the padding would be.
#[cfg(target_arch = "x86_64")]
macro_rules! kernel {
    ($feature:literal, $strips:ident, $rows_fn:ident, $tile:ident, $t:ty, $lanes:expr, $rows:expr,
     $packed_rows:expr,
     $mask:ty, $mask_of:ident, $mask_bits:ident, $zero:ident, $set1:ident, $loadu:ident,
     $load_masked:ident, $storeu:ident, $store_masked:ident, $fmadd:ident, $mul:ident) => {
        /// Every column strip and row tile of the product.
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn $strips<const TABLE: bool, const PACKED: bool, const MASKED: bool>(
            m: usize,
            n: usize,
            o: Operands<$t>,
        ) {
            // Per tap, the lane masks of the current strip's rows of `B` (`MASKED` only).
            let mut tap_masks = [[$mask_bits(0); 2]; super::MAX_TAPS];
            let mut bits = [[0u32; 2]; super::MAX_TAPS];
            let mut j = 0;
            while j < n {
                if MASKED {
                    let taps = &*o.compact;
                    taps.strip_bits(j, $lanes, &mut bits);
                    for (mk, b) in tap_masks.iter_mut().zip(&bits).take(taps.side * taps.side) {
                        *mk = [$mask_bits(b[0]), $mask_bits(b[1])];
                    }
                }
                let tm = tap_masks.as_ptr();
                let cols = (n - j).min(2 * $lanes);
                if cols == 2 * $lanes {
                    $rows_fn::<TABLE, true, PACKED, MASKED>(m, j, [$mask_of($lanes); 2], tm, o);
                } else {
                    let masks = [$mask_of(cols), $mask_of(cols.saturating_sub($lanes))];
                    $rows_fn::<TABLE, false, PACKED, MASKED>(m, j, masks, tm, o);
                }
                j += 2 * $lanes;
            }
        }

        /// Every row tile of the column strip at `j`.
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn $rows_fn<
            const TABLE: bool,
            const FULL: bool,
            const PACKED: bool,
            const MASKED: bool,
        >(
            m: usize,
            j: usize,
            masks: [$mask; 2],
            tm: *const [$mask; 2],
            o: Operands<$t>,
        ) {
            let mut i = 0;
            if PACKED {
                for _ in 0..super::packed_tiles(m, $packed_rows, $rows) {
                    $tile::<{ $packed_rows }, TABLE, FULL, PACKED, MASKED>(i, j, masks, tm, o);
                    i += $packed_rows;
                }
            }
            while i + $rows <= m {
                $tile::<{ $rows }, TABLE, FULL, PACKED, MASKED>(i, j, masks, tm, o);
                i += $rows;
            }
            if i + 4 <= m {
                $tile::<4, TABLE, FULL, PACKED, MASKED>(i, j, masks, tm, o);
                i += 4;
            }
            if i + 2 <= m {
                $tile::<2, TABLE, FULL, PACKED, MASKED>(i, j, masks, tm, o);
                i += 2;
            }
            if i < m {
                $tile::<1, TABLE, FULL, PACKED, MASKED>(i, j, masks, tm, o);
            }
        }

        /// Rows `i..i+R`, columns `j..` (under `masks`, one per vector, unless `FULL`; the
        /// rows of `B` under their tap's masks `tm` when `MASKED`).
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn $tile<
            const R: usize,
            const TABLE: bool,
            const FULL: bool,
            const PACKED: bool,
            const MASKED: bool,
        >(
            i: usize,
            j: usize,
            masks: [$mask; 2],
            tm: *const [$mask; 2],
            o: Operands<$t>,
        ) {
            let load = |p: *const $t, v: usize| {
                if FULL {
                    $loadu(p)
                } else {
                    $load_masked(p, masks[v])
                }
            };
            let mut acc = [[$zero(); 2]; R];
            let a = o.a.add(i * o.rsa);
            // A compact sample's base lies before the buffer (its masked lanes are not read).
            let b = o.b.wrapping_add(j);
            let tap = if MASKED {
                (*o.compact).tap.as_ptr()
            } else {
                std::ptr::null()
            };
            for p in 0..o.k {
                let bp = if TABLE {
                    b.wrapping_add(*o.boff.add(p))
                } else {
                    b.wrapping_add(p * o.ldb)
                };
                let (b0, b1) = if MASKED {
                    let mk = *tm.add(usize::from(*tap.add(p)));
                    (
                        $load_masked(bp, mk[0]),
                        $load_masked(bp.wrapping_add($lanes), mk[1]),
                    )
                } else {
                    (load(bp, 0), load(bp.wrapping_add($lanes), 1))
                };
                let ap = a.add(p * if PACKED { R } else { o.csa });
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let av = $set1(*ap.add(if PACKED { r } else { r * o.rsa }));
                    acc_r[0] = $fmadd(av, b0, acc_r[0]);
                    acc_r[1] = $fmadd(av, b1, acc_r[1]);
                }
            }
            let (alpha, beta) = ($set1(o.alpha), $set1(o.beta));
            for (r, acc_r) in acc.iter().enumerate() {
                let cp = o.c.add((i + r) * o.ldc + j);
                for (v, &x) in acc_r.iter().enumerate() {
                    let dst = cp.wrapping_add(v * $lanes);
                    let mut y = $mul(alpha, x);
                    if o.beta != 0.0 {
                        y = $fmadd(beta, load(dst, v), y);
                    }
                    if FULL {
                        $storeu(dst, y);
                    } else {
                        $store_masked(dst, masks[v], y);
                    }
                }
            }
        }
    };
}

/// AVX-512 tiles: up to 8 rows by two 64-byte vectors of columns (16 of the 32 vector
/// registers hold accumulators).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::masked::avx512::{bits16, bits8, load_f32, load_f64, mask16, mask8};
    use super::Operands;
    use std::arch::x86_64::*;

    /// Rows of the full register tiles over packed and over plain `A`, f32 (24 of the 32
    /// vector registers hold accumulators over packed `A`, whose steps need no row strides).
    pub(super) const F32_ROWS: [usize; 2] = [12, 8];
    /// Rows of the full register tiles over packed and over plain `A`, f64.
    pub(super) const F64_ROWS: [usize; 2] = [8, 8];

    kernel!(
        "avx512f",
        f32_strips,
        f32_rows,
        f32_tile,
        f32,
        16,
        F32_ROWS[1],
        F32_ROWS[0],
        __mmask16,
        mask16,
        bits16,
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        load_f32,
        _mm512_storeu_ps,
        _mm512_mask_storeu_ps,
        _mm512_fmadd_ps,
        _mm512_mul_ps
    );
    kernel!(
        "avx512f",
        f64_strips,
        f64_rows,
        f64_tile,
        f64,
        8,
        F64_ROWS[1],
        F64_ROWS[0],
        __mmask8,
        mask8,
        bits8,
        _mm512_setzero_pd,
        _mm512_set1_pd,
        _mm512_loadu_pd,
        load_f64,
        _mm512_storeu_pd,
        _mm512_mask_storeu_pd,
        _mm512_fmadd_pd,
        _mm512_mul_pd
    );
}

/// AVX2 tiles: up to 6 rows by two 32-byte vectors of columns (12 of the 16 vector registers
/// hold accumulators, two the rows of `B`, one the broadcast element of `A`).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::masked::avx2::{
        bits_f32, bits_f64, mask_f32, mask_f64, store_f32, store_f64,
    };
    use super::Operands;
    use std::arch::x86_64::*;

    /// Rows of the full register tiles over packed and over plain `A`.
    pub(super) const ROWS: [usize; 2] = [6, 6];

    kernel!(
        "avx2,fma",
        f32_strips,
        f32_rows,
        f32_tile,
        f32,
        8,
        ROWS[1],
        ROWS[0],
        __m256i,
        mask_f32,
        bits_f32,
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        _mm256_maskload_ps,
        _mm256_storeu_ps,
        store_f32,
        _mm256_fmadd_ps,
        _mm256_mul_ps
    );
    kernel!(
        "avx2,fma",
        f64_strips,
        f64_rows,
        f64_tile,
        f64,
        4,
        ROWS[1],
        ROWS[0],
        __m256i,
        mask_f64,
        bits_f64,
        _mm256_setzero_pd,
        _mm256_set1_pd,
        _mm256_loadu_pd,
        _mm256_maskload_pd,
        _mm256_storeu_pd,
        store_f64,
        _mm256_fmadd_pd,
        _mm256_mul_pd
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Every tile shape (row and column tails), strided A (plain and transposed), beta 0 and
    /// not, in f64 and f32, against a naive product; and the kernel really runs where the
    /// machine has the instructions.
    #[test]
    fn matches_naive_product_on_every_tail() {
        let mut rng = StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        let mut next = || rng.gen_range(-0.5f64..0.5);
        for &m in &[1, 3, 5, 8, 13, 64] {
            for &n in &[16, 17, 31, 45, 100] {
                for &k in &[1, 7, 300] {
                    let a: Vec<f64> = (0..m * k).map(|_| next()).collect();
                    let b: Vec<f64> = (0..k * (n + 3)).map(|_| next()).collect();
                    let c0: Vec<f64> = (0..m * n).map(|_| next()).collect();
                    let ldb = n + 3;
                    for transposed in [false, true] {
                        // A as m x k row-major, or the transpose view of a k x m matrix.
                        let (adata, rsa, csa) = if transposed {
                            let at: Vec<f64> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
                            (at, 1, m)
                        } else {
                            (a.clone(), k, 1)
                        };
                        for beta in [0.0, 0.5] {
                            let mut want = vec![0.0; m * n];
                            for i in 0..m {
                                for j in 0..n {
                                    let s: f64 =
                                        (0..k).map(|p| a[i * k + p] * b[p * ldb + j]).sum();
                                    want[i * n + j] = 1.5 * s + beta * c0[i * n + j];
                                }
                            }
                            let mut c = c0.clone();
                            let ran = unsafe {
                                try_gemm(
                                    m,
                                    k,
                                    n,
                                    1.5,
                                    (adata.as_ptr(), rsa, csa),
                                    (b.as_ptr(), ldb),
                                    beta,
                                    (c.as_mut_ptr(), n),
                                )
                            };
                            assert_eq!(ran, has_kernel(), "m={m} n={n} k={k}");
                            if !ran {
                                continue;
                            }
                            for (x, y) in c.iter().zip(&want) {
                                assert!(
                                    (x - y).abs() <= 1e-12 * (1.0 + y.abs()),
                                    "f64 m={m} n={n} k={k} t={transposed} beta={beta}: {x} vs {y}"
                                );
                            }
                            let a32: Vec<f32> = adata.iter().map(|&v| v as f32).collect();
                            let b32: Vec<f32> = b.iter().map(|&v| v as f32).collect();
                            let mut c32: Vec<f32> = c0.iter().map(|&v| v as f32).collect();
                            unsafe {
                                try_gemm(
                                    m,
                                    k,
                                    n,
                                    1.5f32,
                                    (a32.as_ptr(), rsa, csa),
                                    (b32.as_ptr(), ldb),
                                    beta as f32,
                                    (c32.as_mut_ptr(), n),
                                );
                            }
                            for (x, y) in c32.iter().zip(&want) {
                                assert!(
                                    (*x as f64 - y).abs() <= 1e-4 * (1.0 + y.abs()),
                                    "f32 m={m} n={n} k={k}: {x} vs {y}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Rows of B read through an offset table (overlapping, out of order) give the product
    /// of the matrix those rows form, bit for bit the same as the strided call on a copy.
    #[test]
    fn offset_rows_match_the_gathered_product() {
        let mut rng = StdRng::seed_from_u64(7);
        for &(m, n, k) in &[(1, 16, 1), (5, 45, 9), (16, 78, 144), (64, 100, 27)] {
            let buf: Vec<f32> = (0..n + 4 * k)
                .map(|_| rng.gen_range(-1.0f32..1.0))
                .collect();
            let offsets: Vec<usize> = (0..k).map(|_| rng.gen_range(0..=4 * k)).collect();
            let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            let gathered: Vec<f32> = offsets
                .iter()
                .flat_map(|&o| buf[o..o + n].iter().copied())
                .collect();
            let c0: Vec<f32> = (0..m * n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            for beta in [0.0f32, 0.5] {
                let (mut want, mut got) = (c0.clone(), c0.clone());
                let ran = unsafe {
                    try_gemm(
                        m,
                        k,
                        n,
                        1.5,
                        (a.as_ptr(), k, 1),
                        (gathered.as_ptr(), n),
                        beta,
                        (want.as_mut_ptr(), n),
                    )
                };
                let ran_rows = unsafe {
                    try_gemm_rows(
                        m,
                        n,
                        1.5,
                        (a.as_ptr(), k, 1),
                        (buf.as_ptr(), &offsets),
                        beta,
                        (got.as_mut_ptr(), n),
                    )
                };
                assert_eq!((ran, ran_rows), (has_kernel(), has_kernel()));
                assert_eq!(accepts_type::<f32>(m, n), has_kernel());
                if ran {
                    assert_eq!(got, want, "m={m} n={n} k={k} beta={beta}");
                }
            }
        }
    }

    /// The AVX2 and AVX-512 kernels give the same bits on every tile shape and tail (plain
    /// and offset rows, beta 0 and not, f32 and f64), where the machine runs both; where it
    /// runs AVX2 only, the AVX2 kernel is checked against the naive product above.
    #[cfg(target_arch = "x86_64")]
    /// Products over packed `A` give the plain operand's bits for every row count up to
    /// [`MAX_ROWS`] (every mix of full and remainder tiles), column tails, beta 0 and not,
    /// f32 and f64, with each instruction set this machine runs.
    #[test]
    fn packed_rows_match_the_plain_operand_bit_for_bit() {
        use crate::kernels::cpu::vector_isas;
        fn each<T: Scalar>(isa: Isa, m: usize, n: usize, k: usize, seed: u64) {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut next = || T::c(rng.gen_range(-1.0..1.0));
            let buf: Vec<T> = (0..n + 4 * k).map(|_| next()).collect();
            let offsets: Vec<usize> = (0..k).map(|p| (p * 5 + 1) % (3 * k + 1)).collect();
            let a: Vec<T> = (0..m * k).map(|_| next()).collect();
            let c0: Vec<T> = (0..m * n).map(|_| next()).collect();
            let packed = PackedA::for_isa(isa, m, k, &a);
            for beta in [T::zero(), T::c(0.5)] {
                let (mut want, mut got) = (c0.clone(), c0.clone());
                let ops = |a: *const T, rsa: usize, c: *mut T, packed: bool| Operands {
                    k,
                    alpha: T::c(1.5),
                    a,
                    rsa,
                    csa: 1,
                    b: buf.as_ptr(),
                    ldb: 0,
                    boff: offsets.as_ptr(),
                    packed,
                    compact: std::ptr::null(),
                    beta,
                    c,
                    ldc: n,
                };
                // SAFETY: the operands cover their shapes; `isa` runs on this machine.
                unsafe {
                    assert!(dispatch_with(
                        isa,
                        m,
                        n,
                        ops(a.as_ptr(), k, want.as_mut_ptr(), false)
                    ));
                    let p = ops(packed.data.as_ptr(), k, got.as_mut_ptr(), true);
                    assert!(dispatch_with(isa, m, n, p));
                }
                let bits = |v: &[T]| {
                    v.iter()
                        .map(|x| x.to_f64().map(f64::to_bits))
                        .collect::<Vec<_>>()
                };
                assert_eq!(bits(&got), bits(&want), "{isa:?} m={m} n={n} k={k}");
            }
        }
        let isas = vector_isas();
        if isas.is_empty() {
            println!("SKIPPED: this machine has no AVX2 kernel to pack for");
            return;
        }
        for isa in isas {
            for m in 1..=MAX_ROWS {
                for (n, k) in [(16, 9), (45, 27), (33, 1)] {
                    each::<f32>(isa, m, n, k, m as u64);
                    each::<f64>(isa, m, n, k, m as u64 + 100);
                }
            }
        }
    }

    #[test]
    fn instruction_sets_agree_bit_for_bit() {
        use crate::kernels::cpu::detected;
        if detected() < Isa::Avx512 {
            println!("SKIPPED: this machine has no AVX-512 to compare the AVX2 kernel against");
            return;
        }
        fn both<T: Scalar>(m: usize, n: usize, k: usize, beta: T, table: bool, seed: u64) {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut next = || T::c(rng.gen_range(-1.0..1.0));
            let ldb = n + 5;
            let buf: Vec<T> = (0..ldb * k + 4 * k).map(|_| next()).collect();
            let offsets: Vec<usize> = (0..k).map(|p| (p * 7 + 3) % (ldb * k - n)).collect();
            let a: Vec<T> = (0..m * k).map(|_| next()).collect();
            let c0: Vec<T> = (0..m * n).map(|_| next()).collect();
            let run = |isa: Isa| {
                let mut c = c0.clone();
                let ops = Operands {
                    k,
                    alpha: T::c(1.5),
                    a: a.as_ptr(),
                    rsa: k,
                    csa: 1,
                    b: buf.as_ptr(),
                    ldb,
                    boff: if table {
                        offsets.as_ptr()
                    } else {
                        std::ptr::null()
                    },
                    packed: false,
                    compact: std::ptr::null(),
                    beta,
                    c: c.as_mut_ptr(),
                    ldc: n,
                };
                // SAFETY: a is m x k, every row of b (strided or offset) holds n elements,
                // c is m x n; the machine runs both instruction sets (checked above).
                assert!(unsafe { dispatch_with(isa, m, n, ops) });
                c
            };
            let (wide, narrow) = (run(Isa::Avx512), run(Isa::Avx2));
            let bits = |v: &[T]| {
                v.iter()
                    .map(|x| x.to_f64().map(f64::to_bits))
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                bits(&wide),
                bits(&narrow),
                "m={m} n={n} k={k} table={table}"
            );
        }
        for &m in &[1, 2, 3, 5, 6, 7, 8, 12, 13, 16, 64] {
            for &n in &[16, 17, 24, 33, 47, 64, 100] {
                for (i, &k) in [1usize, 9, 144].iter().enumerate() {
                    let seed = (m * 1000 + n * 10 + i) as u64;
                    for table in [false, true] {
                        both::<f32>(m, n, k, 0.0, table, seed);
                        both::<f32>(m, n, k, 0.5, table, seed);
                        both::<f64>(m, n, k, 0.0, table, seed);
                        both::<f64>(m, n, k, 0.5, table, seed);
                    }
                }
            }
        }
    }

    #[test]
    fn declines_shapes_it_is_not_for() {
        let (a, b) = (vec![1.0f64; 65 * 4], vec![1.0f64; 4 * 16]);
        let mut c = vec![0.0f64; 65 * 16];
        let ran = unsafe {
            try_gemm(
                65,
                4,
                16,
                1.0,
                (a.as_ptr(), 4, 1),
                (b.as_ptr(), 16),
                0.0,
                (c.as_mut_ptr(), 16),
            )
        };
        assert!(!ran, "65 rows is above MAX_ROWS");
        let ran = unsafe {
            try_gemm(
                4,
                4,
                15,
                1.0,
                (a.as_ptr(), 4, 1),
                (b.as_ptr(), 16),
                0.0,
                (c.as_mut_ptr(), 15),
            )
        };
        assert!(!ran, "15 columns is below MIN_COLS");
    }

    /// One case of [`compact_taps_match_the_padded_copy`]: `m` rows over `c_in` channels of
    /// `h x w` with a `side x side` kernel, on `isa`.
    fn compact_case<T: Scalar>(
        isa: Isa,
        m: usize,
        (c_in, h, w, side): (usize, usize, usize, usize),
    ) {
        use crate::kernels::conv::{implicit_offsets, pad_chw, padded_chw_len, ConvGeom};
        let pad = side / 2;
        let g = ConvGeom {
            c_in,
            h,
            w,
            c_out: m,
            kh: side,
            kw: side,
            stride: 1,
            pad,
        };
        let mut rng = StdRng::seed_from_u64((m * 1000 + h * 10 + side) as u64);
        let mut next = || T::c(rng.gen_range(-1.0..1.0));
        let x: Vec<T> = (0..c_in * h * w).map(|_| next()).collect();
        let a: Vec<T> = (0..m * g.patch()).map(|_| next()).collect();
        let (positions, wp) = (h * w, w + 2 * pad);
        let c0: Vec<T> = (0..m * positions).map(|_| next()).collect();
        let packed = PackedA::for_isa(isa, m, g.patch(), &a);
        let taps = CompactTaps::new(c_in, h, w, side, pad).expect("same taps");
        let mut padded = vec![T::zero(); padded_chw_len(&g)];
        pad_chw(&g, &x, &mut padded);
        let offs = implicit_offsets(&g);
        let ld = (h - 1) * wp + w;
        for beta in [T::zero(), T::c(0.5)] {
            // Over the padded copy at the padded pitch, then compacted.
            let mut tmp = vec![T::zero(); m * ld];
            for (r, row) in c0.chunks(positions).enumerate() {
                for (y, src) in row.chunks(w).enumerate() {
                    tmp[r * ld + y * wp..][..w].copy_from_slice(src);
                }
            }
            let mut got = c0.clone();
            let op = |b: *const T, offs: &[usize], compact: *const CompactTaps, c: *mut T, ldc| {
                Operands {
                    k: g.patch(),
                    alpha: T::c(1.5),
                    a: packed.data.as_ptr(),
                    rsa: g.patch(),
                    csa: 0,
                    b,
                    ldb: 0,
                    boff: offs.as_ptr(),
                    packed: true,
                    compact,
                    beta,
                    c,
                    ldc,
                }
            };
            let shifted = x.as_ptr().wrapping_sub(pad * w + pad);
            // SAFETY: the operands cover their shapes; `isa` runs on this machine.
            unsafe {
                let p = op(
                    padded.as_ptr(),
                    &offs,
                    std::ptr::null(),
                    tmp.as_mut_ptr(),
                    ld,
                );
                assert!(dispatch_with(isa, m, ld, p));
                let c = op(shifted, &taps.offsets, &taps, got.as_mut_ptr(), positions);
                assert!(dispatch_with(isa, m, positions, c));
            }
            let bits = |v: &[T]| {
                v.iter()
                    .map(|x| x.to_f64().map(f64::to_bits))
                    .collect::<Vec<_>>()
            };
            let want: Vec<T> = (0..m * positions)
                .map(|q| tmp[(q / positions) * ld + (q % positions / w) * wp + q % w])
                .collect();
            let case = format!("{isa:?} m={m} c_in={c_in} {h}x{w} side {side}");
            assert_eq!(bits(&got), bits(&want), "{case}");
        }
    }

    /// Compact taps give the bits of the product over the zero-padded copy (which the other
    /// tests check against naive products) on every vector instruction set, in f32 and f64,
    /// for kernels of 1 to 7 taps a side, rows of every tile height, strips with every tail,
    /// images narrower than a vector and beta 0 and not (the inputs are random, so a missing
    /// border mask reads a neighbouring nonzero input and fails it).
    #[test]
    fn compact_taps_match_the_padded_copy() {
        use crate::kernels::cpu::vector_isas;
        let isas = vector_isas();
        if isas.is_empty() {
            println!("SKIPPED: this machine has no AVX2 kernel for compact taps");
            return;
        }
        let shapes = [
            (3, 5, 7, 3),
            (2, 8, 8, 3),
            (3, 16, 16, 3),
            (2, 32, 32, 3),
            (2, 6, 9, 5),
            (3, 4, 4, 1),
            (1, 7, 3, 7),
            (2, 3, 17, 3),
        ];
        for isa in isas {
            for m in [1, 5, 12, 16, 20, 64] {
                for shape in shapes {
                    compact_case::<f32>(isa, m, shape);
                    compact_case::<f64>(isa, m, shape);
                }
            }
        }
    }
}

//! A packed, cache-blocked GEMM with hand-written register microkernels for AVX-512 and
//! AVX2+FMA: `C (m x n, row-major) = alpha A (m x k) B (k x n) + beta C`, any strides for `A`
//! and `B` (transposes cost nothing but a different packing order).
//!
//! The structure is the classic five loops: the rows of `C` in blocks of `mc`, the inner
//! dimension in blocks of `kc` (an `mc x kc` block of `A` is packed into strips `mr` rows
//! tall, and stays in L3), the columns in blocks of `nc` (a `kc x nc` block of `B` is packed
//! into strips `nr` columns wide, and stays in L2), then every `mr x nr` tile of `C` is one
//! call of the microkernel, which keeps the whole tile in vector registers (`mr` rows by two
//! vectors) while it walks the two packed strips. A strip of `A` (the broadcast operand, the
//! smaller strip) stays in L1 while the strips of `B` stream past it from L2. Edge tiles run
//! the same microkernel on a copy of their part of `C`, so every element of `C` sees exactly
//! the same operations wherever it falls: for each `kc` block in order, one fused
//! multiply-add chain over that block, then `alpha * sum + beta * C` (`beta` = 1 after the
//! first block). Results depend only on the operands and the machine's instruction set, never
//! on how [`super::gemm::gemm_par`] splits the output among threads.
//!
//! Packing reads each strip along whichever direction is contiguous: rows contiguous along
//! the inner dimension go through in-register transposes ([`RowPacker`]); strips whose
//! elements for one step are side by side (a plain `B`, a transposed `A`) are copied a
//! vector at a time, masked at the edges, zeros written in the same stores ([`RunPacker`]).
//!
//! [`try_gemm`] declines (returns `false`) where no kernel applies: a CPU without AVX2+FMA,
//! `FLATMIN_ISA=portable`, or an element type other than `f32`/`f64`. Then `matrixmultiply`
//! runs, and it is also the reference the tests compare against.

use super::cpu::{isa, Isa};
use crate::scalar::Scalar;
use std::any::TypeId;
use std::sync::Mutex;

/// A strided read-only operand: element `(i, j)` is at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub struct Strided<T> {
    /// Element `(0, 0)`.
    pub ptr: *const T,
    /// Distance between rows, in elements.
    pub rs: usize,
    /// Distance between columns, in elements.
    pub cs: usize,
}

// SAFETY: a read-only view of `T`s; sharing it is sharing `&[T]`.
unsafe impl<T: Sync> Send for Strided<T> {}
unsafe impl<T: Sync> Sync for Strided<T> {}

impl<T> Strided<T> {
    /// The element `(i, j)`.
    unsafe fn at(self, i: usize, j: usize) -> *const T {
        self.ptr.add(i * self.rs + j * self.cs)
    }

    /// The transpose (rows and columns swap strides).
    fn t(self) -> Self {
        Strided {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// One microkernel: `kc` steps over a packed `mr`-row strip of `A` and a packed `nr`-column
/// strip of `B`, then `C = alpha * acc + beta * C` on a full `mr x nr` tile at row stride `ldc`
/// (`C` is not read when `beta == 0`).
type Tile<T> = unsafe fn(usize, *const T, *const T, *mut T, usize, T, T);

/// A microkernel with the block sizes it is tuned for.
struct Kernel<T> {
    /// Rows of a tile (the strip of `A`).
    mr: usize,
    /// Columns of a tile (the strip of `B`).
    nr: usize,
    /// The inner dimension's block: a strip of `A` (`mr x kc`) fits in L1 beside a few strips
    /// of `B` streaming through.
    kc: usize,
    /// Rows of `A` packed at once (an L3 block; `B`'s block is packed again for each).
    mc: usize,
    /// Columns of `B` packed at once: a `kc x nc` block that stays in L2.
    nc: usize,
    tile: Tile<T>,
    /// Packs rows that are contiguous along `p` with vector transposes (see [`RowPacker`]).
    pack_rows: Option<RowPacker<T>>,
    /// Packs strips whose elements for one `p` are contiguous with vector copies (see
    /// [`RunPacker`]).
    pack_runs: RunPacker<T>,
}

/// Packs `rows.len()` rows, each contiguous along `p`, into a strip `width` wide: element
/// `(i, p)` goes to `dst[p * width + i]`, for `p` in `0..kc`.
type RowPacker<T> = unsafe fn(&[*const T], usize, *mut T, usize);

/// Packs a strip whose `live` elements for each `p` are contiguous: for `p` in `0..kc`, the
/// run at `src + p * stride` goes to `dst[p * width..]`, followed by zeros up to `width`
/// (arguments `src, stride, kc, live, dst, width`).
type RunPacker<T> = unsafe fn(*const T, usize, usize, usize, *mut T, usize);

/// Rows and columns that are whole tiles of every kernel (a multiple of every `mr` and of
/// every `nr`): an output block of such a size needs no edge tiles.
pub const TILE_MULTIPLE: (usize, usize) = (12, 32);
/// Largest `mr * nr` of any kernel (the edge-tile scratch size).
const MAX_TILE: usize = 12 * 32;
/// Largest `mr` or `nr` of any kernel (the widest packed strip).
const MAX_WIDTH: usize = 32;

/// Runs the product through this module's kernel for the machine's instruction set and `T`
/// on the calling thread; returns `false`, having done nothing, when there is no kernel (see
/// the module doc).
///
/// # Safety
/// `a` must cover `m x k` elements and `b` `k x n` elements at their strides; `c` must cover
/// `m` rows of `n` elements `ldc` apart, not aliasing `a` or `b`, initialized unless
/// `beta == 0`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn try_gemm<T: Scalar>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: Strided<T>,
    b: Strided<T>,
    beta: T,
    (c, ldc): (*mut T, usize),
) -> bool {
    gemm_with(isa(), m, k, n, alpha, a, b, beta, (c, ldc))
}

/// [`try_gemm`] with the kernel of instruction set `isa` (for tests and benchmarks that
/// compare the paths on one machine).
///
/// # Safety
/// As [`try_gemm`]; and `isa` must not exceed [`super::cpu::detected`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_with<T: Scalar>(
    isa: Isa,
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: Strided<T>,
    b: Strided<T>,
    beta: T,
    (c, ldc): (*mut T, usize),
) -> bool {
    assert!(
        isa <= super::cpu::detected(),
        "{isa:?} kernel on a machine without it"
    );
    if m == 0 || n == 0 || k == 0 {
        return false;
    }
    let Some(kernel) = kernel_for::<T>(isa) else {
        return false;
    };
    run(&kernel, m, k, n, alpha, Lhs::Strided(a), b, beta, c, ldc);
    true
}

/// A left operand `A` (`m x k`) packed once, every `mc x kc` block of it, for several
/// products that share it (the column blocks of one product, the parts of a group): they
/// then skip packing `A`. The packed values, and so the results, are those the products
/// would pack themselves.
pub struct PackedLhs<T> {
    ptr: *const T,
    m: usize,
    k: usize,
    isa: Isa,
}

// SAFETY: the packed buffer is written before the value exists and only read after.
unsafe impl<T: Sync> Send for PackedLhs<T> {}
unsafe impl<T: Sync> Sync for PackedLhs<T> {}

impl<T: Scalar> PackedLhs<T> {
    /// Where block `(ic, pc)` starts: the blocks of rows `ic..` follow every block of the
    /// rows above (`ic * k` elements), those of columns `pc..` follow the same rows' blocks
    /// of the columns to the left.
    fn offset(kern: &Kernel<T>, (m, k): (usize, usize), ic: usize, pc: usize) -> usize {
        let rows = kern.mc.min(m - ic).div_ceil(kern.mr) * kern.mr;
        ic * k + rows * pc
    }

    /// The packed block `(ic, pc)`.
    ///
    /// # Safety
    /// `ic` and `pc` must start blocks of `kern`, the kernel it was packed with.
    unsafe fn block(&self, kern: &Kernel<T>, ic: usize, pc: usize) -> *const T {
        self.ptr.add(Self::offset(kern, (self.m, self.k), ic, pc))
    }
}

/// Runs `f` with `a` (`m x k`) packed by the machine's kernel, its blocks packed in parallel
/// ([`PackedLhs`]), or with `None` where no kernel runs.
///
/// # Safety
/// `a` must cover `m x k` elements at its strides.
pub unsafe fn with_packed_lhs<T: Scalar, R>(
    m: usize,
    k: usize,
    a: Strided<T>,
    f: impl FnOnce(Option<&PackedLhs<T>>) -> R,
) -> R {
    use rayon::prelude::*;
    let isa = isa();
    let Some(kern) = kernel_for::<T>(isa).filter(|_| m > 0 && k > 0) else {
        return f(None);
    };
    let last = (m - 1) / kern.mc * kern.mc;
    let len = PackedLhs::offset(&kern, (m, k), last, k);
    let blocks: Vec<(usize, usize)> = (0..m)
        .step_by(kern.mc)
        .flat_map(|ic| (0..k).step_by(kern.kc).map(move |pc| (ic, pc)))
        .collect();
    with_buffer::<T, _>(len, |buf| {
        let dst = super::par::SendPtr(buf);
        blocks.par_iter().for_each(|&(ic, pc)| {
            let (mc, kc) = (kern.mc.min(m - ic), kern.kc.min(k - pc));
            let src = Strided {
                ptr: a.at(ic, pc),
                ..a
            };
            let at = dst.at(PackedLhs::offset(&kern, (m, k), ic, pc));
            pack_strips(&kern, at.0, src, mc, kc, kern.mr);
        });
        let packed = PackedLhs {
            ptr: buf,
            m,
            k,
            isa,
        };
        f(Some(&packed))
    })
}

/// [`try_gemm`] with `A` packed already: `C (a.m x n) = alpha A B + beta C`.
///
/// # Safety
/// As [`try_gemm`] for `B` and `C`; `b` has `a.k` rows.
pub unsafe fn gemm_packed_lhs<T: Scalar>(
    a: &PackedLhs<T>,
    n: usize,
    alpha: T,
    b: Strided<T>,
    beta: T,
    (c, ldc): (*mut T, usize),
) {
    let kern = kernel_for::<T>(a.isa).expect("packed with this kernel");
    if n > 0 {
        run(&kern, a.m, a.k, n, alpha, Lhs::Packed(a), b, beta, c, ldc);
    }
}

/// The left operand of [`run`]: strided (packed block by block as the loops reach it) or
/// packed already.
#[derive(Clone, Copy)]
enum Lhs<'a, T> {
    Strided(Strided<T>),
    Packed(&'a PackedLhs<T>),
}

/// The kernel for instruction set `isa` and element type `T`, if one is written.
fn kernel_for<T: Scalar>(isa: Isa) -> Option<Kernel<T>> {
    let f32_kernel = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Kernel::<f32> {
            mr: 12,
            nr: 32,
            kc: 384,
            mc: 3072,
            nc: 384,
            tile: x86::avx512_f32,
            pack_rows: Some(x86::pack_rows_f32),
            pack_runs: x86::pack_runs_f32_avx512,
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Kernel::<f32> {
            mr: 6,
            nr: 16,
            kc: 256,
            mc: 3072,
            nc: 512,
            tile: x86::avx2_f32,
            pack_rows: Some(x86::pack_rows_f32),
            pack_runs: x86::pack_runs_f32_avx2,
        },
        _ => return None,
    };
    let f64_kernel = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Kernel::<f64> {
            mr: 12,
            nr: 16,
            kc: 384,
            mc: 3072,
            nc: 192,
            tile: x86::avx512_f64,
            pack_rows: Some(x86::pack_rows_f64),
            pack_runs: x86::pack_runs_f64_avx512,
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Kernel::<f64> {
            mr: 6,
            nr: 8,
            kc: 256,
            mc: 3072,
            nc: 256,
            tile: x86::avx2_f64,
            pack_rows: Some(x86::pack_rows_f64),
            pack_runs: x86::pack_runs_f64_avx2,
        },
        _ => return None,
    };
    let id = TypeId::of::<T>();
    // SAFETY (both transmutes): T is exactly the type named by the TypeId test, so the
    // kernel's layout (a function pointer over T and sizes) is unchanged.
    if id == TypeId::of::<f32>() {
        Some(unsafe { std::mem::transmute::<Kernel<f32>, Kernel<T>>(f32_kernel) })
    } else if id == TypeId::of::<f64>() {
        Some(unsafe { std::mem::transmute::<Kernel<f64>, Kernel<T>>(f64_kernel) })
    } else {
        None
    }
}

/// Packing buffers kept for reuse (no allocation per product in the steady state). Each is
/// taken out for one use and put back, so a thread that picks up other rayon work while it
/// waits never shares a buffer with that work.
static POOL: Mutex<Vec<Vec<u64>>> = Mutex::new(Vec::new());
/// Most buffers the pool keeps.
const POOL_MAX: usize = 64;

/// Runs `f` on a 64-byte aligned scratch buffer of at least `elems` elements of `T`.
pub(crate) fn with_buffer<T, R>(elems: usize, f: impl FnOnce(*mut T) -> R) -> R {
    let words = (elems * std::mem::size_of::<T>()).div_ceil(8) + 8;
    let pool = || POOL.lock().unwrap_or_else(|e| e.into_inner());
    let mut buf = pool().pop().unwrap_or_default();
    if buf.len() < words {
        buf.resize(words, 0);
    }
    let base = buf.as_mut_ptr() as *mut T;
    // SAFETY: the 8 spare words cover the at most 63 bytes skipped to align.
    let out = f(unsafe { base.add(base.align_offset(64)) });
    let mut kept = pool();
    if kept.len() < POOL_MAX {
        kept.push(buf);
    }
    out
}

/// The five loops (see the module doc), on the calling thread.
#[allow(clippy::too_many_arguments)]
unsafe fn run<T: Scalar>(
    kern: &Kernel<T>,
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: Lhs<T>,
    b: Strided<T>,
    beta: T,
    c: *mut T,
    ldc: usize,
) {
    let (mr, nr) = (kern.mr, kern.nr);
    let kc_max = kern.kc.min(k);
    let a_len = match a {
        Lhs::Strided(_) => kc_max * kern.mc.min(m.div_ceil(mr) * mr),
        Lhs::Packed(_) => 0,
    };
    let b_len = kc_max * kern.nc.min(n.div_ceil(nr) * nr);
    with_buffer::<T, _>(a_len + b_len + 64, |ap| {
        let bp = ap.add(a_len);
        let bp = bp.add(bp.align_offset(64));
        for ic in (0..m).step_by(kern.mc) {
            let mc = kern.mc.min(m - ic);
            for pc in (0..k).step_by(kern.kc) {
                let kc = kern.kc.min(k - pc);
                let a_strips = match a {
                    Lhs::Strided(a) => {
                        let a_block = Strided {
                            ptr: a.at(ic, pc),
                            ..a
                        };
                        pack_strips(kern, ap, a_block, mc, kc, mr);
                        ap.cast_const()
                    }
                    Lhs::Packed(packed) => packed.block(kern, ic, pc),
                };
                for jc in (0..n).step_by(kern.nc) {
                    let nc = kern.nc.min(n - jc);
                    // B's block as strips of nr columns: the transpose's rows are B's columns.
                    let b_block = Strided {
                        ptr: b.at(pc, jc),
                        ..b
                    };
                    pack_strips(kern, bp, b_block.t(), nc, kc, nr);
                    let block = Block {
                        kc,
                        ap: a_strips,
                        bp,
                        c: c.add(ic * ldc + jc),
                        ldc,
                        alpha,
                        beta: if pc == 0 { beta } else { T::one() },
                    };
                    block.tiles(kern, mc, nc);
                }
            }
        }
    });
}

/// One packed `mc x kc` block of `A` against one packed `kc x nc` block of `B`.
struct Block<T> {
    kc: usize,
    ap: *const T,
    bp: *const T,
    c: *mut T,
    ldc: usize,
    alpha: T,
    beta: T,
}

impl<T: Scalar> Block<T> {
    /// Every tile of the block: row strips outside (a strip of `A` stays in L1 while the
    /// strips of `B` stream past it from L2), column strips inside.
    unsafe fn tiles(&self, kern: &Kernel<T>, mc: usize, nc: usize) {
        let (mr, nr, kc) = (kern.mr, kern.nr, self.kc);
        for (is, i0) in (0..mc).step_by(mr).enumerate() {
            let rows = mr.min(mc - i0);
            let a_strip = self.ap.add(is * mr * kc);
            for (js, j0) in (0..nc).step_by(nr).enumerate() {
                let cols = nr.min(nc - j0);
                let b_strip = self.bp.add(js * nr * kc);
                let c_tile = self.c.add(i0 * self.ldc + j0);
                if rows == mr && cols == nr {
                    (kern.tile)(
                        kc, a_strip, b_strip, c_tile, self.ldc, self.alpha, self.beta,
                    );
                } else {
                    self.edge_tile(kern, (a_strip, b_strip), c_tile, rows, cols);
                }
            }
        }
    }

    /// A partial tile: the microkernel runs on a scratch copy of the tile's part of `C`.
    unsafe fn edge_tile(
        &self,
        kern: &Kernel<T>,
        (a_strip, b_strip): (*const T, *const T),
        c_tile: *mut T,
        rows: usize,
        cols: usize,
    ) {
        let nr = kern.nr;
        let mut scratch = [T::zero(); MAX_TILE];
        if self.beta != T::zero() {
            for i in 0..rows {
                for j in 0..cols {
                    scratch[i * nr + j] = *c_tile.add(i * self.ldc + j);
                }
            }
        }
        let s = scratch.as_mut_ptr();
        (kern.tile)(self.kc, a_strip, b_strip, s, nr, self.alpha, self.beta);
        for i in 0..rows {
            for j in 0..cols {
                *c_tile.add(i * self.ldc + j) = scratch[i * nr + j];
            }
        }
    }
}

/// Packs `rows.len()` rows of `kc` contiguous elements into a strip `width` wide, with the
/// vector transposes of [`RowPacker`] (element `(i, p)` to `dst[p * width + i]`).
///
/// # Safety
/// Every row must be readable for `kc` elements, `dst` writable for `kc * width`, and
/// `rows.len() <= width`; the machine must have AVX, and `T` must be `f32` or `f64`.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn pack_rows_into<T: Scalar>(
    rows: &[*const T],
    kc: usize,
    dst: *mut T,
    width: usize,
) {
    let id = TypeId::of::<T>();
    // SAFETY (both casts): T is exactly the type named by the TypeId test.
    if id == TypeId::of::<f32>() {
        let rows = std::slice::from_raw_parts(rows.as_ptr().cast::<*const f32>(), rows.len());
        x86::pack_rows_f32(rows, kc, dst.cast(), width);
    } else if id == TypeId::of::<f64>() {
        let rows = std::slice::from_raw_parts(rows.as_ptr().cast::<*const f64>(), rows.len());
        x86::pack_rows_f64(rows, kc, dst.cast(), width);
    } else {
        unreachable!("pack_rows_into runs for f32 and f64 only");
    }
}

/// Packs the `rows x kc` matrix `src` into strips of `width` rows: strip `s` holds, for each
/// `p` in `0..kc`, the `width` elements `src[s*width .. s*width+width][p]` side by side, with
/// zeros below the last row. Reads along whichever direction is contiguous.
unsafe fn pack_strips<T: Scalar>(
    kern: &Kernel<T>,
    dst: *mut T,
    src: Strided<T>,
    rows: usize,
    kc: usize,
    width: usize,
) {
    for (s, r0) in (0..rows).step_by(width).enumerate() {
        let live = width.min(rows - r0);
        let d = dst.add(s * width * kc);
        if src.rs == 1 {
            // The strip's elements for one p are contiguous: vector copies, zeros included.
            (kern.pack_runs)(src.at(r0, 0), src.cs, kc, live, d, width);
            continue;
        }
        // Walk the strip's rows side by side (one read stream per row, writes in order).
        let mut rows_at = [std::ptr::null::<T>(); MAX_WIDTH];
        for (i, r) in rows_at.iter_mut().enumerate().take(live) {
            *r = src.at(r0 + i, 0);
        }
        if let (1, Some(pack_rows)) = (src.cs, kern.pack_rows) {
            pack_rows(&rows_at[..live], kc, d, width);
        } else {
            for p in 0..kc {
                let out = d.add(p * width);
                for (i, r) in rows_at.iter().enumerate().take(live) {
                    *out.add(i) = *r.add(p * src.cs);
                }
            }
        }
        if live < width {
            for p in 0..kc {
                for i in live..width {
                    *d.add(p * width + i) = T::zero();
                }
            }
        }
    }
}

/// The microkernels: `mr` rows by two vectors of columns, accumulated in registers.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Steps of the microkernel's loop body per iteration.
    const UNROLL: usize = 4;

    macro_rules! microkernel {
        ($name:ident, $feature:literal, $t:ty, $lanes:expr, $mr:expr, $zero:ident,
         $set1:ident, $load:ident, $store:ident, $fmadd:ident, $mul:ident) => {
            /// One `mr x 2 vectors` tile (see [`super::Tile`]).
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(
                kc: usize,
                a: *const $t,
                b: *const $t,
                c: *mut $t,
                ldc: usize,
                alpha: $t,
                beta: $t,
            ) {
                let mut acc = [[$zero(); 2]; $mr];
                let (mut a, mut b) = (a, b);
                // One step: two vectors of B's row, each element of A's column broadcast.
                let mut step = |a: *const $t, b: *const $t| {
                    let b0 = $load(b);
                    let b1 = $load(b.add($lanes));
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        let av = $set1(*a.add(r));
                        acc_r[0] = $fmadd(av, b0, acc_r[0]);
                        acc_r[1] = $fmadd(av, b1, acc_r[1]);
                    }
                };
                for _ in 0..kc / UNROLL {
                    for u in 0..UNROLL {
                        step(a.add(u * $mr), b.add(u * 2 * $lanes));
                    }
                    a = a.add(UNROLL * $mr);
                    b = b.add(UNROLL * 2 * $lanes);
                }
                for _ in 0..kc % UNROLL {
                    step(a, b);
                    a = a.add($mr);
                    b = b.add(2 * $lanes);
                }
                let (alpha, betav) = ($set1(alpha), $set1(beta));
                for (r, acc_r) in acc.iter().enumerate() {
                    for (v, &x) in acc_r.iter().enumerate() {
                        let dst = c.add(r * ldc + v * $lanes);
                        let mut y = $mul(alpha, x);
                        if beta != 0.0 {
                            y = $fmadd(betav, $load(dst), y);
                        }
                        $store(dst, y);
                    }
                }
            }
        };
    }

    macro_rules! row_packer {
        ($name:ident, $t:ty, $p_step:expr, $(($group:expr, $transpose:ident)),+) => {
            /// [`super::RowPacker`]: groups of rows (largest first) through in-register
            /// transposes of `group x p_step` blocks; the rows and `p` left over one by one.
            #[target_feature(enable = "avx")]
            pub(super) unsafe fn $name(rows: &[*const $t], kc: usize, dst: *mut $t, width: usize) {
                let whole_p = kc / $p_step * $p_step;
                let mut i0 = 0;
                $(
                    while rows.len() - i0 >= $group {
                        let (r, out) = (&rows[i0..i0 + $group], dst.add(i0));
                        for p0 in (0..whole_p).step_by($p_step) {
                            $transpose(r, p0, out.add(p0 * width), width);
                        }
                        for p in whole_p..kc {
                            for (i, row) in r.iter().enumerate() {
                                *out.add(p * width + i) = *row.add(p);
                            }
                        }
                        i0 += $group;
                    }
                )+
                for (i, row) in rows.iter().enumerate().skip(i0) {
                    for p in 0..kc {
                        *dst.add(p * width + i) = *row.add(p);
                    }
                }
            }
        };
    }

    /// Four rows of 8 (`rows[i][p0..p0 + 8]`) interleaved: element `q` of the result holds
    /// column `q` of the four rows in its low half and column `q + 4` in its high half.
    #[target_feature(enable = "avx")]
    #[inline]
    unsafe fn interleave4_f32(rows: &[*const f32], p0: usize) -> [__m256; 4] {
        let r: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(rows[i].add(p0)));
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
        ];
        [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        ]
    }

    /// The 8 x 8 block `rows[i][p0 + j]` stored transposed: row `j` of the result at
    /// `out + j * width`.
    #[target_feature(enable = "avx")]
    #[inline]
    unsafe fn transpose8_f32(rows: &[*const f32], p0: usize, out: *mut f32, width: usize) {
        let (lo, hi) = (
            interleave4_f32(&rows[..4], p0),
            interleave4_f32(&rows[4..], p0),
        );
        for q in 0..4 {
            let first = _mm256_permute2f128_ps::<0x20>(lo[q], hi[q]);
            let second = _mm256_permute2f128_ps::<0x31>(lo[q], hi[q]);
            _mm256_storeu_ps(out.add(q * width), first);
            _mm256_storeu_ps(out.add((q + 4) * width), second);
        }
    }

    /// The 4 x 8 block `rows[i][p0 + j]` stored transposed: row `j` of the result (4
    /// elements) at `out + j * width`.
    #[target_feature(enable = "avx")]
    #[inline]
    unsafe fn transpose4x8_f32(rows: &[*const f32], p0: usize, out: *mut f32, width: usize) {
        for (q, v) in interleave4_f32(rows, p0).into_iter().enumerate() {
            _mm_storeu_ps(out.add(q * width), _mm256_castps256_ps128(v));
            _mm_storeu_ps(out.add((q + 4) * width), _mm256_extractf128_ps::<1>(v));
        }
    }

    /// The 4 x 4 block `rows[i][p0 + j]` stored transposed (as [`transpose8_f32`]).
    #[target_feature(enable = "avx")]
    #[inline]
    unsafe fn transpose4_f64(rows: &[*const f64], p0: usize, out: *mut f64, width: usize) {
        let r: [__m256d; 4] = std::array::from_fn(|i| _mm256_loadu_pd(rows[i].add(p0)));
        let t = [
            _mm256_unpacklo_pd(r[0], r[1]),
            _mm256_unpackhi_pd(r[0], r[1]),
            _mm256_unpacklo_pd(r[2], r[3]),
            _mm256_unpackhi_pd(r[2], r[3]),
        ];
        let cols = [
            _mm256_permute2f128_pd::<0x20>(t[0], t[2]),
            _mm256_permute2f128_pd::<0x20>(t[1], t[3]),
            _mm256_permute2f128_pd::<0x31>(t[0], t[2]),
            _mm256_permute2f128_pd::<0x31>(t[1], t[3]),
        ];
        for (j, c) in cols.iter().enumerate() {
            _mm256_storeu_pd(out.add(j * width), *c);
        }
    }

    row_packer!(
        pack_rows_f32,
        f32,
        8,
        (8, transpose8_f32),
        (4, transpose4x8_f32)
    );
    row_packer!(pack_rows_f64, f64, 4, (4, transpose4_f64));

    macro_rules! run_packer {
        ($name:ident, $feature:literal, $t:ty, $lanes:expr, $mask_ty:ty, $mask:path,
         $loadu:ident, $storeu:ident, $load_masked:path, $store_masked:ident) => {
            /// [`super::RunPacker`]: whole vectors where the runs fill the strip's vectors,
            /// else masked loads of the first `live` lanes (zeros beyond). A row's last
            /// vector may spill past `width` into the next row's start, which that row then
            /// overwrites; only the last row stores under a mask.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(
                src: *const $t,
                stride: usize,
                kc: usize,
                live: usize,
                dst: *mut $t,
                width: usize,
            ) {
                const MAX_VECTORS: usize = super::MAX_WIDTH.div_ceil($lanes);
                let vectors = width.div_ceil($lanes);
                assert!(
                    vectors <= MAX_VECTORS && live <= width,
                    "strip wider than a kernel's"
                );
                if live == width && width % $lanes == 0 {
                    for p in 0..kc {
                        let (from, to) = (src.add(p * stride), dst.add(p * width));
                        for v in 0..vectors {
                            $storeu(to.add(v * $lanes), $loadu(from.add(v * $lanes)));
                        }
                    }
                    return;
                }
                assert!(
                    vectors * $lanes - width <= width,
                    "a spill must land in the next row"
                );
                let lanes = |v: usize, len: usize| $mask(len.saturating_sub(v * $lanes));
                let loads: [$mask_ty; MAX_VECTORS] = std::array::from_fn(|v| lanes(v, live));
                let last: [$mask_ty; MAX_VECTORS] = std::array::from_fn(|v| lanes(v, width));
                for p in 0..kc {
                    // Wrapping: a vector wholly past the run is never read (its mask is empty).
                    let (from, to) = (src.wrapping_add(p * stride), dst.add(p * width));
                    for v in 0..vectors {
                        let x = $load_masked(from.wrapping_add(v * $lanes), loads[v]);
                        if p + 1 < kc {
                            $storeu(to.add(v * $lanes), x);
                        } else {
                            $store_masked(to.add(v * $lanes), last[v], x);
                        }
                    }
                }
            }
        };
    }

    use super::super::masked::{avx2, avx512};
    run_packer!(
        pack_runs_f32_avx2,
        "avx2,fma",
        f32,
        8,
        __m256i,
        avx2::mask_f32,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_maskload_ps,
        _mm256_maskstore_ps
    );
    run_packer!(
        pack_runs_f64_avx2,
        "avx2,fma",
        f64,
        4,
        __m256i,
        avx2::mask_f64,
        _mm256_loadu_pd,
        _mm256_storeu_pd,
        _mm256_maskload_pd,
        _mm256_maskstore_pd
    );
    run_packer!(
        pack_runs_f32_avx512,
        "avx512f",
        f32,
        16,
        __mmask16,
        avx512::mask16,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        avx512::load_f32,
        _mm512_mask_storeu_ps
    );
    run_packer!(
        pack_runs_f64_avx512,
        "avx512f",
        f64,
        8,
        __mmask8,
        avx512::mask8,
        _mm512_loadu_pd,
        _mm512_storeu_pd,
        avx512::load_f64,
        _mm512_mask_storeu_pd
    );

    microkernel!(
        avx512_f32,
        "avx512f",
        f32,
        16,
        12,
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_fmadd_ps,
        _mm512_mul_ps
    );
    microkernel!(
        avx512_f64,
        "avx512f",
        f64,
        8,
        12,
        _mm512_setzero_pd,
        _mm512_set1_pd,
        _mm512_loadu_pd,
        _mm512_storeu_pd,
        _mm512_fmadd_pd,
        _mm512_mul_pd
    );
    microkernel!(
        avx2_f32,
        "avx2,fma",
        f32,
        8,
        6,
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_fmadd_ps,
        _mm256_mul_ps
    );
    microkernel!(
        avx2_f64,
        "avx2,fma",
        f64,
        4,
        6,
        _mm256_setzero_pd,
        _mm256_set1_pd,
        _mm256_loadu_pd,
        _mm256_storeu_pd,
        _mm256_fmadd_pd,
        _mm256_mul_pd
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::{detected, vector_isas};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// `alpha A B + beta C` by `matrixmultiply` (the reference) and by the kernel of `isa`,
    /// for `A` given plain or transposed and `B` plain or transposed.
    fn check<T: Scalar>(isa: Isa, (m, k, n): (usize, usize, usize), tol: f64, rng: &mut StdRng) {
        let draw = |len: usize, rng: &mut StdRng| -> Vec<T> {
            (0..len).map(|_| T::c(rng.gen_range(-1.0..1.0))).collect()
        };
        let (a, b, c0) = (draw(m * k, rng), draw(k * n, rng), draw(m * n, rng));
        let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
        let a_views = [(&a, k, 1), (&at, 1, m)];
        let b_views = [(&b, n, 1), (&bt, 1, k)];
        let cases = [0.0, 0.75]
            .into_iter()
            .flat_map(|beta| (0..4).map(move |i| (beta, i / 2, i % 2)));
        for (beta, ai, bi) in cases {
            let (av, bv) = (a_views[ai], b_views[bi]);
            let sa = Strided {
                ptr: av.0.as_ptr(),
                rs: av.1,
                cs: av.2,
            };
            let sb = Strided {
                ptr: bv.0.as_ptr(),
                rs: bv.1,
                cs: bv.2,
            };
            let (alpha, beta) = (T::c(1.25), T::c(beta));
            let mut want = c0.clone();
            let mut got = if beta == T::zero() {
                vec![T::c(f64::NAN); m * n]
            } else {
                c0.clone()
            };
            unsafe {
                T::gemm_raw(
                    m,
                    k,
                    n,
                    alpha,
                    sa.ptr,
                    sa.rs as isize,
                    sa.cs as isize,
                    sb.ptr,
                    sb.rs as isize,
                    sb.cs as isize,
                    beta,
                    want.as_mut_ptr(),
                    n as isize,
                    1,
                );
                assert!(gemm_with(
                    isa,
                    m,
                    k,
                    n,
                    alpha,
                    sa,
                    sb,
                    beta,
                    (got.as_mut_ptr(), n)
                ));
            }
            let scale = (k as f64).sqrt();
            for (i, (x, y)) in got.iter().zip(&want).enumerate() {
                let (x, y) = (x.to_f64().unwrap(), y.to_f64().unwrap());
                assert!(
                    (x - y).abs() <= tol * scale * (1.0 + y.abs()),
                    "{isa:?} {m}x{k}x{n} strides a{:?} b{:?} beta {beta:?}: [{i}] {x} vs {y}",
                    (sa.rs, sa.cs),
                    (sb.rs, sb.cs)
                );
            }
        }
    }

    fn transpose<T: Copy>(x: &[T], rows: usize, cols: usize) -> Vec<T> {
        (0..rows * cols)
            .map(|i| x[(i % rows) * cols + i / rows])
            .collect()
    }

    /// Every row and column tail of both tile shapes, more than one block along every
    /// dimension (`kc`, `mc`, `nc`), plain and transposed operands, beta 0 and not, in f32 and
    /// f64, against `matrixmultiply`.
    #[test]
    fn matches_matrixmultiply_on_every_tail_and_block_edge() {
        let mut rng = StdRng::seed_from_u64(0x5851_f42d_4c95_7f2d);
        let shapes = [
            (1, 1, 1),
            (5, 3, 7),
            (12, 256, 32),
            (13, 257, 33),
            (11, 100, 31),
            (7, 9, 17),
            (150, 300, 70),
            (73, 513, 2100),
            (290, 40, 45),
            (3100, 5, 40),
        ];
        for isa in vector_isas() {
            for &s in &shapes {
                check::<f64>(isa, s, 1e-14, &mut rng);
                check::<f32>(isa, s, 1e-6, &mut rng);
            }
        }
    }

    /// Each kernel is bit-identical to itself whatever block of the output a call covers
    /// (what the thread split of `gemm_par` relies on); the shape spans several `kc` blocks
    /// and column strips with tails.
    #[test]
    fn output_blocks_are_bit_identical_to_the_whole() {
        let (m, k, n) = (100, 900, 130);
        let mut rng = StdRng::seed_from_u64(7);
        let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let product = |isa, (r0, rows): (usize, usize), (c0, cols), out: &mut [f32]| {
            let sa = Strided {
                ptr: a[r0 * k..].as_ptr(),
                rs: k,
                cs: 1,
            };
            let sb = Strided {
                ptr: b[c0..].as_ptr(),
                rs: n,
                cs: 1,
            };
            let c = (out[r0 * n + c0..].as_mut_ptr(), n);
            // SAFETY: the views and the output block lie inside their buffers.
            let ran = unsafe { gemm_with(isa, rows, k, cols, 1.0, sa, sb, 0.0, c) };
            assert!(ran);
        };
        for isa in vector_isas() {
            let mut whole = vec![0f32; m * n];
            product(isa, (0, m), (0, n), &mut whole);
            let mut pieces = vec![0f32; m * n];
            for rows in [(0, 37), (37, 63)] {
                for cols in [(0, 50), (50, 80)] {
                    product(isa, rows, cols, &mut pieces);
                }
            }
            assert_eq!(bits(&pieces), bits(&whole), "{isa:?} blocks");
        }
    }

    /// Every kernel's run packer, at both strip widths and every `live`, writes each row's
    /// run then zeros up to `width`, and nothing past the strip's `kc * width` elements.
    fn check_run_packer<T: Scalar>(isa: Isa) {
        let kern = kernel_for::<T>(isa).expect("a kernel");
        let pack = kern.pack_runs;
        let stride = 41;
        let src: Vec<T> = (0..6 * stride).map(|i| T::c(i as f64 + 1.0)).collect();
        for width in [kern.mr, kern.nr] {
            for live in 1..=width {
                for kc in [1, 2, 5] {
                    let sentinel = T::c(-7.0);
                    let mut dst = vec![sentinel; kc * width + 64];
                    unsafe { pack(src.as_ptr(), stride, kc, live, dst.as_mut_ptr(), width) };
                    for p in 0..kc {
                        for i in 0..width {
                            let want = if i < live {
                                src[p * stride + i]
                            } else {
                                T::zero()
                            };
                            assert_eq!(dst[p * width + i], want, "{isa:?} w{width} live{live}");
                        }
                    }
                    let past = dst[kc * width..].iter().all(|&x| x == sentinel);
                    assert!(
                        past,
                        "{isa:?} width {width} live {live} kc {kc}: wrote past"
                    );
                }
            }
        }
    }

    #[test]
    fn run_packers_copy_runs_pad_with_zeros_and_stay_in_the_strip() {
        for isa in vector_isas() {
            check_run_packer::<f32>(isa);
            check_run_packer::<f64>(isa);
        }
    }

    /// A left operand packed once gives every product the bits of packing it inside, over
    /// several row blocks (`mc`), inner blocks (`kc`) and row tails, plain and transposed.
    #[test]
    fn prepacked_left_operand_gives_the_same_bits() {
        let mut rng = StdRng::seed_from_u64(0x243f_6a88_85a3_08d3);
        for (m, k, n) in [(3100, 800, 40), (13, 5, 70), (3100, 5, 33)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let at = transpose(&a, m, k);
            let sb = Strided {
                ptr: b.as_ptr(),
                rs: n,
                cs: 1,
            };
            for (data, rs, cs) in [(&a, k, 1), (&at, 1, m)] {
                let sa = Strided {
                    ptr: data.as_ptr(),
                    rs,
                    cs,
                };
                let mut want = vec![0.5f32; m * n];
                let mut got = want.clone();
                unsafe {
                    // Without a kernel (FLATMIN_ISA=portable) neither packs: both decline.
                    let ran = try_gemm(m, k, n, 1.5, sa, sb, 0.25, (want.as_mut_ptr(), n));
                    with_packed_lhs(m, k, sa, |packed| match packed {
                        Some(p) => gemm_packed_lhs(p, n, 1.5, sb, 0.25, (got.as_mut_ptr(), n)),
                        None => assert!(!ran, "packed inside but not once"),
                    });
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{m}x{k}x{n} a strides {rs},{cs}");
            }
        }
    }

    #[test]
    fn declines_without_a_kernel() {
        let a = [1.0f32; 4];
        let mut c = [0.0f32; 4];
        let sa = Strided {
            ptr: a.as_ptr(),
            rs: 2,
            cs: 1,
        };
        let mut ran =
            |isa, k| unsafe { gemm_with(isa, 2, k, 2, 1.0, sa, sa, 0.0, (c.as_mut_ptr(), 2)) };
        assert!(!ran(Isa::Portable, 2));
        assert!(!ran(detected(), 0), "k = 0 is left to matrixmultiply");
    }
}

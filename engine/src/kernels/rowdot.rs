//! A packing-free `C += A Bᵀ` for products whose inner dimension is long and whose rows of
//! `A` and `B` are contiguous runs: the weight gradient of a stride-1 convolution,
//! `W̄[co, (c, ki, kj)] += Σ_q Ȳ[co, q] X_pad[(c·hp + ki)·wp + kj + q]`, with `Ȳ` laid out at
//! the padded row pitch (zeros between output rows) and the rows of `B` read out of the padded
//! image through an offset table, so no im2row copy is made.
//!
//! A register tile of 4 rows of `A` by 4 rows of `B` (AVX-512; 4 by 3 with AVX2+FMA) keeps
//! one vector accumulator per element, each summing lane-wise products over the inner
//! dimension in steps of one vector (the last one masked); each is then reduced across lanes
//! and added to its element of `C`. The order of operations depends only on `k` and the
//! vector width, so results depend only on the operands and the instruction set (AVX2 sums
//! 8 f32 lanes where AVX-512 sums 16: the two agree to rounding, not bit for bit).
//!
//! The tiles run strip by strip of 4 rows of `C` (every column of a strip, then the next
//! strip), so a strip's rows of `A` stay in L1 while its tiles sweep `B`. Where a product
//! is wide enough, those rows (all segments) are first copied to an aligned buffer at a
//! pitch of whole vectors, so that no load of `A` splits a cache line; the copy holds the
//! same values and the tiles do the same operations in the same order, so the results are
//! bit for bit those of reading `A` in place. (Blocking the inner dimension for L1, with the
//! tiles' unreduced sums kept in memory between blocks, was measured and was slower on every
//! shape: `docs/performance.md`.)
//!
//! Where the rows of `C` fill whole vectors and there are enough columns, the entry point
//! hands the product to [`super::outer`], which puts the rows of `C` along the lanes and
//! needs no lane reductions (faster on those shapes); this kernel takes the rest.

use crate::scalar::Scalar;

#[cfg(target_arch = "x86_64")]
use super::cpu::Isa;
/// Operands of one product, as raw pointers.
#[derive(Clone, Copy)]
struct Operands<T> {
    k: usize,
    segs: usize,
    a: *const T,
    lda: usize,
    a_seg: usize,
    b: *const T,
    boff: *const usize,
    b_seg: usize,
    c: *mut T,
    ldc: usize,
}

/// True when [`try_gemm_abt_rows`] runs on this machine for element type `T` (f32 or f64,
/// with AVX2+FMA or AVX-512F; not under `FLATMIN_ISA=portable`).
pub fn accepts_type<T: Scalar>() -> bool {
    use std::any::TypeId;
    let typed =
        TypeId::of::<T>() == TypeId::of::<f32>() || TypeId::of::<T>() == TypeId::of::<f64>();
    typed && cfg!(target_arch = "x86_64") && super::cpu::isa() >= super::cpu::Isa::Avx2
}

/// `C (m x n) += Σ_s A_s (m x k) B_sᵀ` over `segs` segments (consecutive samples), by
/// [`super::outer`] where it accepts the shape (output channels that fill its vectors, at
/// least [`super::outer::MIN_COLS`] columns), else by this module's kernel; with
/// row `i` of `A_s` the `k` contiguous elements at `a + s·a_seg + i·lda`, row `j` of `B_s`
/// (`n = offsets.len()`) the `k` contiguous elements at `b + s·b_seg + offsets[j]`, and `C`
/// row-major with row stride `ldc`. Each register tile keeps its lane-wise sums across the
/// segments and reduces them once. Returns `false`, having done nothing, where
/// [`accepts_type`] does not hold.
///
/// # Safety
/// Every row of every `A_s` and `B_s` must be readable for `k` elements, `c` must cover `m`
/// rows of `n` elements `ldc` apart, initialized and not aliasing `a` or `b`.
pub unsafe fn try_gemm_abt_rows<T: Scalar>(
    (m, k, segs): (usize, usize, usize),
    (a, lda, a_seg): (*const T, usize, usize),
    (b, offsets, b_seg): (*const T, &[usize], usize),
    (c, ldc): (*mut T, usize),
) -> bool {
    if !accepts_type::<T>() {
        return false;
    }
    if m == 0 || k == 0 || segs == 0 || offsets.is_empty() {
        return true;
    }
    if super::outer::try_gemm((m, k, segs), (a, lda, a_seg), (b, offsets, b_seg), (c, ldc)) {
        return true;
    }
    let ops = Operands {
        k,
        segs,
        a,
        lda,
        a_seg,
        b,
        boff: offsets.as_ptr(),
        b_seg,
        c,
        ldc,
    };
    dispatch(m, offsets.len(), ops);
    true
}

#[cfg(target_arch = "x86_64")]
unsafe fn dispatch<T: Scalar>(m: usize, n: usize, ops: Operands<T>) {
    dispatch_with(super::cpu::isa(), m, n, ops)
}

/// [`dispatch`] with the kernel of instruction set `isa` (AVX2 or AVX-512, which the machine
/// must run).
#[cfg(target_arch = "x86_64")]
unsafe fn dispatch_with<T: Scalar>(isa: Isa, m: usize, n: usize, ops: Operands<T>) {
    use std::any::TypeId;
    let f32_type = TypeId::of::<T>() == TypeId::of::<f32>();
    // SAFETY (every cast): T is exactly the type named by the TypeId test.
    let (o32, o64) = (
        || std::mem::transmute_copy::<_, Operands<f32>>(&ops),
        || std::mem::transmute_copy::<_, Operands<f64>>(&ops),
    );
    match (isa, f32_type) {
        (Isa::Avx512, true) => avx512::f32_tiles(m, n, o32()),
        (Isa::Avx512, false) => avx512::f64_tiles(m, n, o64()),
        (Isa::Avx2, true) => avx2::f32_tiles(m, n, o32()),
        (Isa::Avx2, false) => avx2::f64_tiles(m, n, o64()),
        (Isa::Portable, _) => unreachable!("accepts_type is false without AVX2"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dispatch<T: Scalar>(_m: usize, _n: usize, _ops: Operands<T>) {
    unreachable!("accepts_type is false off x86_64")
}

/// Fewest rows of `B` (columns of `C`) for which [`Strip`] copies `A`: the copy costs
/// about `tile columns / n` of the tiles' loads of `A`, and saves a split cache line on
/// most of them. Measured per shape with AVX-512 (`docs/performance.md`): on Zen 5, cnn-s
/// conv1's 27 columns lose 11% with the copy, resnet20 stage 1's 144 break even, 288 and
/// more gain 5-8%; on Ice Lake, where a split load costs more, the 144 columns gain 15-22%.
/// The AVX2 kernel uses the same bound.
#[cfg(target_arch = "x86_64")]
const COPY_MIN_COLS: usize = 128;

/// The rows of `A` that one strip of register tiles reads, every segment: where the
/// product has at least [`COPY_MIN_COLS`] columns and `A`'s rows are not all aligned to the
/// vector `V`, copied to whole vectors (so aligned) at a pitch of whole vectors, so that no
/// load of `A` in the tiles splits a cache line; the copy is made once per strip and read
/// by all its tiles. Otherwise read in place.
#[cfg(target_arch = "x86_64")]
struct Strip<V> {
    /// The copy: `rows` rows per segment at most, `row` vectors each.
    buf: Vec<V>,
    /// Vectors per copied row; 0 where `A` is read in place.
    row: usize,
}

#[cfg(target_arch = "x86_64")]
impl<V: Copy> Strip<V> {
    /// The strip for the product `o` with `n` columns, at most `rows` rows of `A` at a time.
    fn new<T>(o: &Operands<T>, n: usize, rows: usize, zero: V) -> Self {
        let (vector, size) = (std::mem::size_of::<V>(), std::mem::size_of::<T>());
        let whole = |bytes: usize| bytes.is_multiple_of(vector);
        let aligned = whole(o.a as usize) && whole(o.lda * size) && whole(o.a_seg * size);
        let row = if n >= COPY_MIN_COLS && !aligned {
            o.k.div_ceil(vector / size)
        } else {
            0
        };
        Strip {
            buf: vec![zero; rows * o.segs * row],
            row,
        }
    }

    /// `o` restricted to rows `i..i + rows` of `A` and `C` (its row 0 is row `i`),
    /// reading `A` from this strip's copy where there is one (segment `s`, row `r` at
    /// `(s·rows + r)·pitch`).
    ///
    /// # Safety
    /// `o` must satisfy [`try_gemm_abt_rows`]'s contract, with `i + rows <= m`, `rows` at
    /// most the `rows` given to [`Strip::new`] and `V` a vector of `T`.
    unsafe fn rows<T: Copy>(&mut self, o: Operands<T>, i: usize, rows: usize) -> Operands<T> {
        let c = o.c.add(i * o.ldc);
        if self.row == 0 {
            return Operands {
                a: o.a.add(i * o.lda),
                c,
                ..o
            };
        }
        let pitch = self.row * std::mem::size_of::<V>() / std::mem::size_of::<T>();
        let dst = self.buf.as_mut_ptr().cast::<T>();
        for s in 0..o.segs {
            for r in 0..rows {
                let src = o.a.add(s * o.a_seg + (i + r) * o.lda);
                std::ptr::copy_nonoverlapping(src, dst.add((s * rows + r) * pitch), o.k);
            }
        }
        Operands {
            a: dst,
            lda: pitch,
            a_seg: rows * pitch,
            c,
            ..o
        }
    }
}

/// The kernel, written once for every instruction set: register tiles of `$rows` rows of
/// `A` by `$cols` rows of `B` (then single rows and columns at the edges), strip by strip
/// of rows through [`Strip`]; whole vectors with plain loads, the last partial vector of
/// each row under the mask `$mask_of(left)`; `$reduce` sums a vector's lanes.
#[cfg(target_arch = "x86_64")]
macro_rules! kernel {
    ($feature:literal, $tiles:ident, $tile:ident, $t:ty, $v:ty, $lanes:expr, $rows:expr,
     $cols:expr, $mask:ty, $mask_of:ident, $zero:ident, $loadu:ident, $load_masked:ident,
     $fmadd:ident, $reduce:ident) => {
        /// Every register tile of the product (full tiles, then single rows and columns),
        /// strip by strip of rows, each strip's rows of `A` read through [`Strip`].
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn $tiles(m: usize, n: usize, o: Operands<$t>) {
            let mut strip = Strip::<$v>::new(&o, n, $rows, $zero());
            let mut i = 0;
            while i < m {
                let full_rows = m - i >= $rows;
                let rows = if full_rows { $rows } else { 1 };
                let os = strip.rows(o, i, rows);
                let mut j = 0;
                while j < n {
                    let full_cols = n - j >= $cols;
                    match (full_rows, full_cols) {
                        (true, true) => $tile::<{ $rows }, { $cols }>(j, os),
                        (true, false) => $tile::<{ $rows }, 1>(j, os),
                        (false, true) => $tile::<1, { $cols }>(j, os),
                        (false, false) => $tile::<1, 1>(j, os),
                    }
                    j += if full_cols { $cols } else { 1 };
                }
                i += rows;
            }
        }

        /// `C[..R, j..j+S] += A[..R] · B[j..j+S]ᵀ`.
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn $tile<const R: usize, const S: usize>(j: usize, o: Operands<$t>) {
            let mut acc = [[$zero(); S]; R];
            let tail: $mask = $mask_of(o.k % $lanes);
            for seg in 0..o.segs {
                let (a0, b0) = (o.a.add(seg * o.a_seg), o.b.add(seg * o.b_seg));
                let ap: [*const $t; R] = std::array::from_fn(|r| a0.add(r * o.lda));
                let bp: [*const $t; S] = std::array::from_fn(|s| b0.add(*o.boff.add(j + s)));
                // One step of the inner dimension at `q`: whole vectors, or the masked tail.
                let mut step = |q: usize, whole: bool| {
                    let load = |p: *const $t| {
                        if whole {
                            $loadu(p)
                        } else {
                            $load_masked(p, tail)
                        }
                    };
                    let bv: [_; S] = std::array::from_fn(|s| load(bp[s].add(q)));
                    for (acc_r, &a_r) in acc.iter_mut().zip(&ap) {
                        let av = load(a_r.add(q));
                        for (x, &b) in acc_r.iter_mut().zip(&bv) {
                            *x = $fmadd(av, b, *x);
                        }
                    }
                };
                let mut q = 0;
                while q + $lanes <= o.k {
                    step(q, true);
                    q += $lanes;
                }
                if q < o.k {
                    step(q, false);
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                let cp = o.c.add(r * o.ldc + j);
                for (s, &x) in acc_r.iter().enumerate() {
                    *cp.add(s) += $reduce(x);
                }
            }
        }
    };
}

/// AVX-512: tiles of 4 x 4 (16 of the 32 vector registers hold sums), masks as `k` registers.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::masked::avx512::{load_f32, load_f64, mask16, mask8};
    use super::{Operands, Strip};
    use std::arch::x86_64::*;

    kernel!(
        "avx512f",
        f32_tiles,
        f32_tile,
        f32,
        __m512,
        16,
        4,
        4,
        __mmask16,
        mask16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        load_f32,
        _mm512_fmadd_ps,
        _mm512_reduce_add_ps
    );
    kernel!(
        "avx512f",
        f64_tiles,
        f64_tile,
        f64,
        __m512d,
        8,
        4,
        4,
        __mmask8,
        mask8,
        _mm512_setzero_pd,
        _mm512_loadu_pd,
        load_f64,
        _mm512_fmadd_pd,
        _mm512_reduce_add_pd
    );
}

/// AVX2: tiles of 4 x 3 (12 of the 16 vector registers hold sums, three the rows of `B`, one
/// a row of `A`), masks as vectors; the lanes of a sum are added as
/// `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))` (f32) or `(l0 + l2) + (l1 + l3)` (f64).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::masked::avx2::{mask_f32, mask_f64};
    use super::{Operands, Strip};
    use std::arch::x86_64::*;

    /// The sum of the 8 lanes of `v`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn sum_f32(v: __m256) -> f32 {
        let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)))
    }

    /// The sum of the 4 lanes of `v`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn sum_f64(v: __m256d) -> f64 {
        let half = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
        _mm_cvtsd_f64(_mm_add_sd(half, _mm_unpackhi_pd(half, half)))
    }

    kernel!(
        "avx2,fma",
        f32_tiles,
        f32_tile,
        f32,
        __m256,
        8,
        4,
        3,
        __m256i,
        mask_f32,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_maskload_ps,
        _mm256_fmadd_ps,
        sum_f32
    );
    kernel!(
        "avx2,fma",
        f64_tiles,
        f64_tile,
        f64,
        __m256d,
        4,
        4,
        3,
        __m256i,
        mask_f64,
        _mm256_setzero_pd,
        _mm256_loadu_pd,
        _mm256_maskload_pd,
        _mm256_fmadd_pd,
        sum_f64
    );
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::kernels::abt_case::Case;
    use crate::kernels::cpu::vector_isas;
    use rand::{rngs::StdRng, SeedableRng};

    /// `C0 + A Bᵀ` by the kernel of `isa` (which this machine runs), in `T`.
    fn run<T: Scalar>(case: &Case, isa: Isa) -> Vec<T> {
        let (m, n, k, segs) = case.dims;
        let (a, b, mut c) = case.operands::<T>();
        let ops = Operands {
            k,
            segs,
            a: a.as_ptr(),
            lda: case.lda,
            a_seg: case.a_seg,
            b: b.as_ptr(),
            boff: case.offsets.as_ptr(),
            b_seg: case.b_seg,
            c: c.as_mut_ptr(),
            ldc: n,
        };
        // SAFETY: every row of A and B lies inside its buffer, C is m x n, and the machine
        // runs `isa` (`runnable`).
        unsafe { dispatch_with(isa, m, n, ops) };
        c
    }

    /// The kernel's order of operations without blocks or tiles: lane `l` of element `(i, j)`
    /// sums `a·b` over the segments in order and, within one, over `q ≡ l` (mod lanes) in
    /// order, one fused multiply-add each (zeros past `k`); the lanes are then reduced by the
    /// kernel's own reduction and added to `C0`.
    fn lanewise<T: Scalar>(case: &Case, vector_bytes: usize, reduce: fn(&[T]) -> T) -> Vec<T> {
        let (_, n, k, segs) = case.dims;
        let (a, b, mut c) = case.operands::<T>();
        let lanes = vector_bytes / std::mem::size_of::<T>();
        for (e, ce) in c.iter_mut().enumerate() {
            let mut acc = vec![T::zero(); lanes];
            for s in 0..segs {
                for q0 in (0..k).step_by(lanes) {
                    for (l, x) in acc.iter_mut().enumerate() {
                        let q = q0 + l;
                        let (av, bv) = if q < k {
                            case.term((&a, &b), (e / n, e % n), s, q)
                        } else {
                            (T::zero(), T::zero())
                        };
                        *x = av.mul_add(bv, *x);
                    }
                }
            }
            *ce = *ce + reduce(&acc);
        }
        c
    }

    /// The shapes of the tests: every tile shape and tail of `k`, products wide enough for
    /// the copied strips of `A` with a tail of single rows, then the weight gradients of
    /// resnet20's three stages and cnn-s's two convolutions at their samples per call.
    fn cases(rng: &mut StdRng) -> Vec<Case> {
        let mut cases: Vec<Case> = [
            (1, 1, 1, 1),
            (3, 7, 15, 2),
            (4, 6, 16, 1),
            (5, 13, 33, 3),
            (16, 144, 1086, 1),
            (64, 9, 78, 4),
            (5, 200, 33, 3),
            (7, 195, 17, 2),
        ]
        .into_iter()
        .map(|d| Case::random(rng, d))
        .collect();
        for conv in [
            (16, 16, 32, 1),
            (32, 32, 16, 7),
            (64, 64, 8, 8),
            (64, 32, 16, 7),
            (32, 3, 32, 1),
        ] {
            cases.push(Case::conv(rng, conv));
        }
        cases
    }

    /// The entry point runs the kernel exactly where [`accepts_type`] says so.
    #[test]
    fn runs_where_it_accepts_the_type() {
        let (a, b) = ([1.0f32; 20], [2.0f32; 20]);
        let mut c = [0.5f32; 1];
        // SAFETY: one row of 20 in each operand, C is 1 x 1.
        let ran = unsafe {
            try_gemm_abt_rows(
                (1, 20, 1),
                (a.as_ptr(), 20, 20),
                (b.as_ptr(), &[0], 20),
                (c.as_mut_ptr(), 1),
            )
        };
        assert_eq!(ran, accepts_type::<f32>());
        assert_eq!(c[0], if ran { 40.5 } else { 0.5 });
    }

    /// Every tile shape, tail of `k`, segment count and convolution shape against a naive
    /// product, f64 and f32, accumulating into a non-zero `C`, by the kernel of every
    /// instruction set the machine runs.
    #[test]
    fn matches_naive_product_on_every_tail() {
        let mut rng = StdRng::seed_from_u64(11);
        for case in cases(&mut rng) {
            let (m, n, k, segs) = case.dims;
            let want = case.exact();
            for isa in vector_isas() {
                let c = run::<f64>(&case, isa);
                for (x, y) in c.iter().zip(&want) {
                    assert!(
                        (x - y).abs() <= 1e-12 * (1.0 + y.abs()),
                        "{isa:?} f64 {m}x{n}x{k}: {x} vs {y}"
                    );
                }
                let c32 = run::<f32>(&case, isa);
                for (x, y) in c32.iter().zip(&want) {
                    let tol = 1e-5 * (1.0 + (segs * k) as f64).sqrt() * (1.0 + y.abs());
                    assert!(
                        (*x as f64 - y).abs() <= tol,
                        "{isa:?} f32 {m}x{n}x{k}: {x} vs {y}"
                    );
                }
            }
        }
    }

    /// Every shape (every tile shape, tails of `k` and of the rows, the convolutions'
    /// weight gradients) gives bit for bit the sums of the plain lane-wise order of its
    /// instruction set's vector width and lane reduction, in f32 and f64: a change in the
    /// order of the roundings (a reduction per segment, sums split across tiles, another
    /// lane grouping) fails here.
    #[test]
    fn equals_the_lanewise_order_bit_for_bit() {
        use std::arch::x86_64::*;
        // SAFETY (all four): called only for an instruction set the machine runs.
        let wide32: fn(&[f32]) -> f32 =
            |l| unsafe { _mm512_reduce_add_ps(_mm512_loadu_ps(l.as_ptr())) };
        let wide64: fn(&[f64]) -> f64 =
            |l| unsafe { _mm512_reduce_add_pd(_mm512_loadu_pd(l.as_ptr())) };
        let narrow32: fn(&[f32]) -> f32 = |l| unsafe { avx2::sum_f32(_mm256_loadu_ps(l.as_ptr())) };
        let narrow64: fn(&[f64]) -> f64 = |l| unsafe { avx2::sum_f64(_mm256_loadu_pd(l.as_ptr())) };
        let mut rng = StdRng::seed_from_u64(12);
        let cases = cases(&mut rng);
        for isa in vector_isas() {
            let (bytes, r32, r64) = match isa {
                Isa::Avx512 => (64, wide32, wide64),
                _ => (32, narrow32, narrow64),
            };
            for case in &cases {
                let bits32 = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let bits64 = |v: Vec<f64>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let got32 = bits32(run::<f32>(case, isa));
                assert!(
                    got32 == bits32(lanewise(case, bytes, r32)),
                    "{isa:?} f32 {:?}",
                    case.dims
                );
                let got64 = bits64(run::<f64>(case, isa));
                assert!(
                    got64 == bits64(lanewise(case, bytes, r64)),
                    "{isa:?} f64 {:?}",
                    case.dims
                );
            }
        }
    }
}

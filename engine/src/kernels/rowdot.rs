//! A packing-free `C += A Bᵀ` for products whose inner dimension is long and whose rows of
//! `A` and `B` are contiguous runs: the weight gradient of a stride-1 convolution,
//! `W̄[co, (c, ki, kj)] += Σ_q Ȳ[co, q] X_pad[(c·hp + ki)·wp + kj + q]`, with `Ȳ` laid out at
//! the padded row pitch (zeros between output rows) and the rows of `B` read out of the padded
//! image through an offset table, so no im2row copy is made.
//!
//! A register tile of 4 rows of `A` by 4 rows of `B` keeps 16 vector accumulators, each
//! summing lane-wise products over the inner dimension in steps of one vector (the last one
//! masked); each is then reduced across lanes and added to its element of `C`. The order of
//! operations depends only on `k`, so results depend only on the operands.
//!
//! The tiles run strip by strip of 4 rows of `C` (every column of a strip, then the next
//! strip), so a strip's rows of `A` stay in L1 while its tiles sweep `B`. Where a product
//! is wide enough, those rows (all segments) are first copied to an aligned buffer at a
//! pitch of whole vectors, so that no load of `A` splits a cache line; the copy holds the
//! same values and the tiles do the same operations in the same order, so the results are
//! bit for bit those of reading `A` in place. (Blocking the inner dimension for L1, with the
//! tiles' unreduced sums kept in memory between blocks, was measured and was slower on every
//! shape: `docs/performance.md`.)

use crate::scalar::Scalar;

/// Rows of `A` per register tile.
const TILE_ROWS: usize = 4;
/// Rows of `B` per register tile.
const TILE_COLS: usize = 4;

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

/// True when [`try_gemm_abt_rows`] runs on this machine for element type `T` (AVX-512F,
/// f32 or f64; not under `FLATMIN_ISA=avx2`).
pub fn accepts_type<T: Scalar>() -> bool {
    use std::any::TypeId;
    let typed =
        TypeId::of::<T>() == TypeId::of::<f32>() || TypeId::of::<T>() == TypeId::of::<f64>();
    typed && cfg!(target_arch = "x86_64") && super::cpu::isa() == super::cpu::Isa::Avx512
}

/// `C (m x n) += Σ_s A_s (m x k) B_sᵀ` over `segs` segments (consecutive samples), with
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
    use std::any::TypeId;
    // SAFETY (both casts): T is exactly the type named by the TypeId test.
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        avx512::f32_tiles(m, n, std::mem::transmute_copy::<_, Operands<f32>>(&ops));
    } else {
        avx512::f64_tiles(m, n, std::mem::transmute_copy::<_, Operands<f64>>(&ops));
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dispatch<T: Scalar>(_m: usize, _n: usize, _ops: Operands<T>) {
    unreachable!("accepts_type is false off x86_64")
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Operands, TILE_COLS, TILE_ROWS};
    use std::arch::x86_64::*;

    /// Fewest rows of `B` (columns of `C`) for which [`Strip`] copies `A`: the copy costs
    /// about `TILE_COLS / n` of the tiles' loads of `A`, and saves a split cache line on
    /// most of them. Measured per shape on Zen 5 (`docs/performance.md`): cnn-s conv1's 27
    /// columns lose 11% with the copy, resnet20 stage 1's 144 break even, 288 and more gain
    /// 5-8%.
    const COPY_MIN_COLS: usize = 192;

    /// The rows of `A` that one strip of register tiles reads, every segment: where the
    /// product has at least [`COPY_MIN_COLS`] columns and `A`'s rows are not all 64-byte
    /// aligned, copied to whole vectors (`V`, so aligned) at a pitch of whole vectors, so
    /// that no load of `A` in the tiles splits a cache line; the copy is made once per
    /// strip and read by all its tiles. Otherwise read in place.
    struct Strip<V> {
        /// The copy: `TILE_ROWS` rows per segment at most, `row` vectors each.
        buf: Vec<V>,
        /// Vectors per copied row; 0 where `A` is read in place.
        row: usize,
    }

    impl<V: Copy> Strip<V> {
        /// The strip for the product `o` with `n` columns.
        fn new<T>(o: &Operands<T>, n: usize, zero: V) -> Self {
            let lanes = std::mem::size_of::<V>() / std::mem::size_of::<T>();
            let whole_lines = |bytes: usize| bytes.is_multiple_of(64);
            let size = std::mem::size_of::<T>();
            let aligned = whole_lines(o.a as usize)
                && whole_lines(o.lda * size)
                && whole_lines(o.a_seg * size);
            let row = if n >= COPY_MIN_COLS && !aligned {
                o.k.div_ceil(lanes)
            } else {
                0
            };
            Strip {
                buf: vec![zero; TILE_ROWS * o.segs * row],
                row,
            }
        }

        /// `o` restricted to rows `i..i + rows` of `A` and `C` (its row 0 is row `i`),
        /// reading `A` from this strip's copy where there is one (segment `s`, row `r` at
        /// `(s·rows + r)·pitch`).
        ///
        /// # Safety
        /// `o` must satisfy [`super::try_gemm_abt_rows`]'s contract, with `i + rows <= m`,
        /// `rows <= TILE_ROWS` and `V` a vector of `T` (64 bytes).
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

    macro_rules! kernel {
        ($tiles:ident, $tile:ident, $t:ty, $v:ty, $lanes:expr, $mask:ty, $zero:ident,
         $load:ident, $fmadd:ident, $reduce:ident) => {
            /// Every register tile of the product (full tiles, then single rows and columns),
            /// strip by strip of rows, each strip's rows of `A` read through [`Strip`].
            #[target_feature(enable = "avx512f")]
            pub(super) unsafe fn $tiles(m: usize, n: usize, o: Operands<$t>) {
                let mut strip = Strip::<$v>::new(&o, n, $zero());
                let mut i = 0;
                while i < m {
                    let full_rows = m - i >= TILE_ROWS;
                    let rows = if full_rows { TILE_ROWS } else { 1 };
                    let os = strip.rows(o, i, rows);
                    let mut j = 0;
                    while j < n {
                        let full_cols = n - j >= TILE_COLS;
                        match (full_rows, full_cols) {
                            (true, true) => $tile::<TILE_ROWS, TILE_COLS>(j, os),
                            (true, false) => $tile::<TILE_ROWS, 1>(j, os),
                            (false, true) => $tile::<1, TILE_COLS>(j, os),
                            (false, false) => $tile::<1, 1>(j, os),
                        }
                        j += if full_cols { TILE_COLS } else { 1 };
                    }
                    i += rows;
                }
            }

            /// `C[..R, j..j+S] += A[..R] · B[j..j+S]ᵀ`.
            #[target_feature(enable = "avx512f")]
            #[inline]
            unsafe fn $tile<const R: usize, const S: usize>(j: usize, o: Operands<$t>) {
                let mut acc = [[$zero(); S]; R];
                for seg in 0..o.segs {
                    let (a0, b0) = (o.a.add(seg * o.a_seg), o.b.add(seg * o.b_seg));
                    let ap: [*const $t; R] = std::array::from_fn(|r| a0.add(r * o.lda));
                    let bp: [*const $t; S] = std::array::from_fn(|s| b0.add(*o.boff.add(j + s)));
                    let mut q = 0;
                    while q < o.k {
                        let left = o.k - q;
                        let mask: $mask = if left >= $lanes {
                            <$mask>::MAX
                        } else {
                            ((1u32 << left) - 1) as $mask
                        };
                        let bv: [_; S] =
                            std::array::from_fn(|s| $load($zero(), mask, bp[s].add(q)));
                        for (acc_r, &a_r) in acc.iter_mut().zip(&ap) {
                            let av = $load($zero(), mask, a_r.add(q));
                            for (x, &b) in acc_r.iter_mut().zip(&bv) {
                                *x = $fmadd(av, b, *x);
                            }
                        }
                        q += $lanes;
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

    kernel!(
        f32_tiles,
        f32_tile,
        f32,
        __m512,
        16,
        __mmask16,
        _mm512_setzero_ps,
        _mm512_mask_loadu_ps,
        _mm512_fmadd_ps,
        _mm512_reduce_add_ps
    );
    kernel!(
        f64_tiles,
        f64_tile,
        f64,
        __m512d,
        8,
        __mmask8,
        _mm512_setzero_pd,
        _mm512_mask_loadu_pd,
        _mm512_fmadd_pd,
        _mm512_reduce_add_pd
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// One product's operands: `segs` blocks of `m` rows of `A` (`lda`, `a_seg` apart) and
    /// of a buffer `B` read through `offsets` (`b_seg` apart), with a non-zero `C`.
    struct Case {
        dims: (usize, usize, usize, usize),
        lda: usize,
        a_seg: usize,
        b_seg: usize,
        a: Vec<f64>,
        b: Vec<f64>,
        offsets: Vec<usize>,
        c0: Vec<f64>,
    }

    impl Case {
        /// Random operands, rows of `A` with a little padding and random offsets into `B`.
        fn random(rng: &mut StdRng, (m, n, k, segs): (usize, usize, usize, usize)) -> Case {
            let (lda, a_seg) = (k + 2, m * (k + 2) + 5);
            let b_seg = k + 3 * n + 1;
            let mut draw =
                |len: usize| -> Vec<f64> { (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect() };
            let (a, b, c0) = (draw(segs * a_seg), draw(segs * b_seg), draw(m * n));
            let offsets = (0..n).map(|_| rng.gen_range(0..=3 * n)).collect();
            Case {
                dims: (m, n, k, segs),
                lda,
                a_seg,
                b_seg,
                a,
                b,
                offsets,
                c0,
            }
        }

        /// A convolution's weight gradient: `A` the output gradient at the padded pitch
        /// (`k = (h - 1)·(w + 2) + w`), `B` padded `c_in x (h + 2) x (w + 2)` images read at
        /// the offsets of the 3x3 taps.
        fn conv(rng: &mut StdRng, (c_out, c_in, h, segs): (usize, usize, usize, usize)) -> Case {
            let wp = h + 2;
            let k = (h - 1) * wp + h;
            let plane = wp * wp;
            let offsets: Vec<usize> = (0..c_in * 9)
                .map(|e| (e / 9) * plane + (e % 9 / 3) * wp + e % 3)
                .collect();
            let mut case = Case::random(rng, (c_out, c_in * 9, k, segs));
            (case.lda, case.a_seg, case.b_seg) = (k, c_out * k, c_in * plane + 2);
            case.a.truncate(segs * case.a_seg);
            case.b = (0..segs * case.b_seg)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            case.offsets = offsets;
            case
        }

        /// `C0 + A Bᵀ` by the kernel, in `T`; `None` where the kernel does not run on this
        /// machine.
        fn run<T: Scalar>(&self) -> Option<Vec<T>> {
            let (m, n, k, segs) = self.dims;
            let (a, b) = (cast::<T>(&self.a), cast::<T>(&self.b));
            let mut c = cast::<T>(&self.c0);
            // SAFETY: every row of A and B lies inside its buffer, C is m x n.
            let ran = unsafe {
                try_gemm_abt_rows(
                    (m, k, segs),
                    (a.as_ptr(), self.lda, self.a_seg),
                    (b.as_ptr(), &self.offsets, self.b_seg),
                    (c.as_mut_ptr(), n),
                )
            };
            assert_eq!(ran, accepts_type::<T>());
            ran.then_some(c)
        }

        /// The kernel's order of operations without blocks or tiles: lane `l` of element
        /// `(i, j)` sums `a·b` over the segments in order and, within one, over `q ≡ l` (mod
        /// lanes) in order, one fused multiply-add each (zeros past `k`); the lanes are then
        /// reduced by the kernel's own reduction and added to `C0`.
        fn lanewise<T: Scalar>(&self, reduce: fn(&[T]) -> T) -> Vec<T> {
            let (_, n, k, segs) = self.dims;
            let (a, b) = (cast::<T>(&self.a), cast::<T>(&self.b));
            let lanes = 64 / std::mem::size_of::<T>();
            let mut c = cast::<T>(&self.c0);
            for (e, ce) in c.iter_mut().enumerate() {
                let (i, j) = (e / n, e % n);
                let mut acc = vec![T::zero(); lanes];
                for s in 0..segs {
                    let ar = &a[s * self.a_seg + i * self.lda..];
                    let br = &b[s * self.b_seg + self.offsets[j]..];
                    for q0 in (0..k).step_by(lanes) {
                        for (l, x) in acc.iter_mut().enumerate() {
                            let q = q0 + l;
                            let (av, bv) = if q < k {
                                (ar[q], br[q])
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
    }

    /// `v` converted to `T`.
    fn cast<T: Scalar>(v: &[f64]) -> Vec<T> {
        v.iter().map(|&x| T::c(x)).collect()
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

    /// Every tile shape, tail of `k`, segment count and convolution shape against a naive
    /// product, f64 and f32, accumulating into a non-zero `C`; the kernel really runs where
    /// the machine has the instructions.
    #[test]
    fn matches_naive_product_on_every_tail() {
        let mut rng = StdRng::seed_from_u64(11);
        for case in cases(&mut rng) {
            let (m, n, k, segs) = case.dims;
            let want: Vec<f64> = (0..m * n)
                .map(|e| {
                    let (i, j) = (e / n, e % n);
                    let term = |s: usize, q: usize| {
                        case.a[s * case.a_seg + i * case.lda + q]
                            * case.b[s * case.b_seg + case.offsets[j] + q]
                    };
                    case.c0[e]
                        + (0..segs)
                            .flat_map(|s| (0..k).map(move |q| (s, q)))
                            .map(|(s, q)| term(s, q))
                            .sum::<f64>()
                })
                .collect();
            let Some(c) = case.run::<f64>() else {
                continue;
            };
            for (x, y) in c.iter().zip(&want) {
                assert!(
                    (x - y).abs() <= 1e-12 * (1.0 + y.abs()),
                    "f64 {m}x{n}x{k}: {x} vs {y}"
                );
            }
            let c32 = case.run::<f32>().expect("f32 runs where f64 does");
            for (x, y) in c32.iter().zip(&want) {
                let tol = 1e-5 * (1.0 + (segs * k) as f64).sqrt() * (1.0 + y.abs());
                assert!((*x as f64 - y).abs() <= tol, "f32 {m}x{n}x{k}: {x} vs {y}");
            }
        }
    }

    /// Every shape (every tile shape, tails of `k` and of the rows, the convolutions'
    /// weight gradients) gives bit for bit the sums of the plain lane-wise order, in f32 and
    /// f64: a change in the order of the roundings (a reduction per segment, sums split
    /// across tiles, another lane grouping) fails here.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn equals_the_lanewise_order_bit_for_bit() {
        use std::arch::x86_64::*;
        // SAFETY (both): called only where the kernel runs, so where AVX-512F is present.
        let r32: fn(&[f32]) -> f32 =
            |l| unsafe { _mm512_reduce_add_ps(_mm512_loadu_ps(l.as_ptr())) };
        let r64: fn(&[f64]) -> f64 =
            |l| unsafe { _mm512_reduce_add_pd(_mm512_loadu_pd(l.as_ptr())) };
        if !accepts_type::<f32>() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(12);
        for case in cases(&mut rng) {
            let bits32 = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let bits64 = |v: Vec<f64>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let got32 = bits32(case.run::<f32>().expect("the kernel runs"));
            assert!(got32 == bits32(case.lanewise(r32)), "f32 {:?}", case.dims);
            let got64 = bits64(case.run::<f64>().expect("the kernel runs"));
            assert!(got64 == bits64(case.lanewise(r64)), "f64 {:?}", case.dims);
        }
    }
}

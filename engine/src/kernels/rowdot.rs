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

    macro_rules! kernel {
        ($tiles:ident, $tile:ident, $t:ty, $lanes:expr, $mask:ty, $zero:ident, $load:ident,
         $fmadd:ident, $reduce:ident) => {
            /// Every register tile of the product (full tiles, then single rows and columns).
            #[target_feature(enable = "avx512f")]
            pub(super) unsafe fn $tiles(m: usize, n: usize, o: Operands<$t>) {
                let mut i = 0;
                while i < m {
                    let full_rows = m - i >= TILE_ROWS;
                    let mut j = 0;
                    while j < n {
                        let full_cols = n - j >= TILE_COLS;
                        match (full_rows, full_cols) {
                            (true, true) => $tile::<TILE_ROWS, TILE_COLS>(i, j, o),
                            (true, false) => $tile::<TILE_ROWS, 1>(i, j, o),
                            (false, true) => $tile::<1, TILE_COLS>(i, j, o),
                            (false, false) => $tile::<1, 1>(i, j, o),
                        }
                        j += if full_cols { TILE_COLS } else { 1 };
                    }
                    i += if full_rows { TILE_ROWS } else { 1 };
                }
            }

            /// `C[i..i+R, j..j+S] += A[i..i+R] · B[j..j+S]ᵀ`.
            #[target_feature(enable = "avx512f")]
            #[inline]
            unsafe fn $tile<const R: usize, const S: usize>(i: usize, j: usize, o: Operands<$t>) {
                let mut acc = [[$zero(); S]; R];
                for seg in 0..o.segs {
                    let (a0, b0) = (o.a.add(seg * o.a_seg), o.b.add(seg * o.b_seg));
                    let ap: [*const $t; R] = std::array::from_fn(|r| a0.add((i + r) * o.lda));
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
                    let cp = o.c.add((i + r) * o.ldc + j);
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

    /// Every tile shape, tail of `k` and segment count against a naive product, f64 and
    /// f32, accumulating into a non-zero `C`; the kernel really runs where the machine has
    /// the instructions.
    #[test]
    fn matches_naive_product_on_every_tail() {
        let mut rng = StdRng::seed_from_u64(11);
        for &(m, n, k, segs) in &[
            (1, 1, 1, 1),
            (3, 7, 15, 2),
            (4, 6, 16, 1),
            (5, 13, 33, 3),
            (16, 144, 1086, 1),
            (64, 9, 78, 4),
        ] {
            let (lda, a_seg) = (k + 2, m * (k + 2) + 5);
            let b_seg = k + 3 * n + 1;
            let a: Vec<f64> = (0..segs * a_seg)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            let buf: Vec<f64> = (0..segs * b_seg)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            let offsets: Vec<usize> = (0..n).map(|_| rng.gen_range(0..=3 * n)).collect();
            let c0: Vec<f64> = (0..m * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let want: Vec<f64> = (0..m * n)
                .map(|e| {
                    let (i, j) = (e / n, e % n);
                    let term = |s: usize, q: usize| {
                        a[s * a_seg + i * lda + q] * buf[s * b_seg + offsets[j] + q]
                    };
                    c0[e]
                        + (0..segs)
                            .flat_map(|s| (0..k).map(move |q| (s, q)))
                            .map(|(s, q)| term(s, q))
                            .sum::<f64>()
                })
                .collect();
            let mut c = c0.clone();
            let ran = unsafe {
                try_gemm_abt_rows(
                    (m, k, segs),
                    (a.as_ptr(), lda, a_seg),
                    (buf.as_ptr(), &offsets, b_seg),
                    (c.as_mut_ptr(), n),
                )
            };
            assert_eq!(ran, accepts_type::<f64>());
            if !ran {
                continue;
            }
            for (x, y) in c.iter().zip(&want) {
                assert!(
                    (x - y).abs() <= 1e-12 * (1.0 + y.abs()),
                    "f64 {m}x{n}x{k}: {x} vs {y}"
                );
            }
            let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
            let b32: Vec<f32> = buf.iter().map(|&v| v as f32).collect();
            let mut c32: Vec<f32> = c0.iter().map(|&v| v as f32).collect();
            unsafe {
                try_gemm_abt_rows(
                    (m, k, segs),
                    (a32.as_ptr(), lda, a_seg),
                    (b32.as_ptr(), &offsets, b_seg),
                    (c32.as_mut_ptr(), n),
                );
            }
            for (x, y) in c32.iter().zip(&want) {
                let tol = 1e-5 * (1.0 + (segs * k) as f64).sqrt() * (1.0 + y.abs());
                assert!((*x as f64 - y).abs() <= tol, "f32 {m}x{n}x{k}: {x} vs {y}");
            }
        }
    }
}

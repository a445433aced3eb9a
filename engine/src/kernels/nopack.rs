//! A packing-free GEMM for products with few output rows and a right operand whose rows are
//! contiguous: `C (m x n) = alpha A (m x k) B (k x n) + beta C`, with `m` small (a
//! convolution's output channels) and `n` long (positions).
//!
//! `matrixmultiply` copies ("packs") both operands before its kernel runs. When `m` is small,
//! each packed element of `B` is used only `m` times, so packing costs about as much as the
//! multiply-adds (the profiles of the 16-channel ResNet layers show it). Here a register tile
//! of 8 rows by 32 (f32) or 16 (f64) columns of `C` is accumulated straight from `B`'s rows,
//! with one broadcast element of `A` per row and step: no copies at all. Every row tile of a
//! column strip reads the same `k` short runs of `B` (from L1 when they fit, else from L2; the
//! resnet20 profile puts the kernel at about 60% of peak). It needs AVX-512F; elsewhere
//! (or under `FLATMIN_ISA=avx2`) [`try_gemm`] declines and the packed kernels run.
//!
//! Every element of `C` is one fused multiply-add chain over `p = 0..k` in order, whatever
//! tile it falls in, so results depend only on the operands.

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
    super::cpu::isa() == super::cpu::Isa::Avx512
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
        beta,
        c,
        ldc,
    };
    dispatch(m, n, ops)
}

#[cfg(target_arch = "x86_64")]
unsafe fn dispatch<T: Scalar>(m: usize, n: usize, ops: Operands<T>) -> bool {
    use std::any::TypeId;
    if !has_kernel() {
        return false;
    }
    // SAFETY (both casts): T is exactly the type named by the TypeId test.
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        let ops = std::mem::transmute_copy::<Operands<T>, Operands<f32>>(&ops);
        if ops.boff.is_null() {
            avx512::f32_strips::<false>(m, n, ops);
        } else {
            avx512::f32_strips::<true>(m, n, ops);
        }
        true
    } else if TypeId::of::<T>() == TypeId::of::<f64>() {
        let ops = std::mem::transmute_copy::<Operands<T>, Operands<f64>>(&ops);
        if ops.boff.is_null() {
            avx512::f64_strips::<false>(m, n, ops);
        } else {
            avx512::f64_strips::<true>(m, n, ops);
        }
        true
    } else {
        false
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dispatch<T: Scalar>(_m: usize, _n: usize, _ops: Operands<T>) -> bool {
    false
}

/// AVX-512 tiles: up to 8 rows by two 64-byte vectors of columns (16 of the 32 vector
/// registers hold accumulators); the last strip of columns is masked.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Operands;
    use std::arch::x86_64::*;

    macro_rules! kernel {
        ($strips:ident, $tile:ident, $t:ty, $lanes:expr, $mask:ty, $zero:ident, $set1:ident,
         $load:ident, $store:ident, $fmadd:ident, $mul:ident) => {
            /// Every column strip and row tile of the product.
            #[target_feature(enable = "avx512f")]
            pub(super) unsafe fn $strips<const TABLE: bool>(m: usize, n: usize, o: Operands<$t>) {
                let mut j = 0;
                while j < n {
                    let cols = (n - j).min(2 * $lanes);
                    let lane_mask = |c: usize| -> $mask {
                        if c >= $lanes {
                            <$mask>::MAX
                        } else {
                            ((1u32 << c) - 1) as $mask
                        }
                    };
                    let masks = [lane_mask(cols), lane_mask(cols.saturating_sub($lanes))];
                    let mut i = 0;
                    while i + 8 <= m {
                        $tile::<8, TABLE>(i, j, masks, o);
                        i += 8;
                    }
                    if i + 4 <= m {
                        $tile::<4, TABLE>(i, j, masks, o);
                        i += 4;
                    }
                    if i + 2 <= m {
                        $tile::<2, TABLE>(i, j, masks, o);
                        i += 2;
                    }
                    if i < m {
                        $tile::<1, TABLE>(i, j, masks, o);
                    }
                    j += 2 * $lanes;
                }
            }

            /// Rows `i..i+R`, columns `j..` under `masks` (one per vector).
            #[target_feature(enable = "avx512f")]
            #[inline]
            unsafe fn $tile<const R: usize, const TABLE: bool>(
                i: usize,
                j: usize,
                masks: [$mask; 2],
                o: Operands<$t>,
            ) {
                let mut acc = [[$zero(); 2]; R];
                let a = o.a.add(i * o.rsa);
                let b = o.b.add(j);
                for p in 0..o.k {
                    let bp = if TABLE {
                        b.add(*o.boff.add(p))
                    } else {
                        b.add(p * o.ldb)
                    };
                    let b0 = $load($zero(), masks[0], bp);
                    let b1 = $load($zero(), masks[1], bp.wrapping_add($lanes));
                    let ap = a.add(p * o.csa);
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        let av = $set1(*ap.add(r * o.rsa));
                        acc_r[0] = $fmadd(av, b0, acc_r[0]);
                        acc_r[1] = $fmadd(av, b1, acc_r[1]);
                    }
                }
                let (alpha, beta) = ($set1(o.alpha), $set1(o.beta));
                for (r, acc_r) in acc.iter().enumerate() {
                    let cp = o.c.add((i + r) * o.ldc + j);
                    for (v, (&x, &mask)) in acc_r.iter().zip(&masks).enumerate() {
                        let dst = cp.wrapping_add(v * $lanes);
                        let mut y = $mul(alpha, x);
                        if o.beta != 0.0 {
                            y = $fmadd(beta, $load($zero(), mask, dst), y);
                        }
                        $store(dst, mask, y);
                    }
                }
            }
        };
    }

    kernel!(
        f32_strips,
        f32_tile,
        f32,
        16,
        __mmask16,
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_mask_loadu_ps,
        _mm512_mask_storeu_ps,
        _mm512_fmadd_ps,
        _mm512_mul_ps
    );
    kernel!(
        f64_strips,
        f64_tile,
        f64,
        8,
        __mmask8,
        _mm512_setzero_pd,
        _mm512_set1_pd,
        _mm512_mask_loadu_pd,
        _mm512_mask_storeu_pd,
        _mm512_fmadd_pd,
        _mm512_mul_pd
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
}

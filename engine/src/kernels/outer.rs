//! The weight gradient of a convolution as outer products: `C (m x n) += Σ_s A_s B_sᵀ`, the
//! product of [`super::rowdot`] (row `i` of `A_s` the output gradient of channel `i` at the
//! padded row pitch, row `j` of `B_s` the padded image read from an offset), computed with
//! the output channels along the vector lanes instead of the inner dimension.
//!
//! Each segment's `A_s` is first transposed, two vectors of channels at a time, into strips
//! whose step `q` holds those channels' values at position `q` side by side. A register tile
//! keeps two vectors of channels by `rows` rows of `B` (12 with AVX-512, 6 with AVX2+FMA): at
//! every position it loads the strip's two vectors and broadcasts one element of each of its
//! rows of `B`, one fused multiply-add per pair. That is the packed GEMM's microkernel (two
//! vector loads and `rows` broadcasts per `2 x rows` multiply-adds), where the lane-wise dot
//! products of [`super::rowdot`] load a vector of both operands per multiply-add and reduce
//! every accumulator across its lanes at the end. On an Intel Xeon Ice Lake-SP (f32, one
//! thread) it is 1.3-1.5x faster on the weight gradients of cnn-s's conv2 and of resnet20's
//! 32- and 64-channel stages (1.07-1.19x with AVX2), and no faster on cnn-s's conv1 (27
//! columns: a quarter of its last tile is padding), hence [`MIN_COLS`].
//!
//! Segments run one after the other, every tile of one before the next (its strips stay in
//! L1), and each tile's sums carry over from segment to segment in a scratch block: every
//! element of `C` gets one fused multiply-add chain from zero over the segments and positions
//! in order, then is added to `C`. So the results depend only on the operands and `segs`, and
//! the AVX2 and AVX-512 kernels give the same bits.

#[cfg(target_arch = "x86_64")]
use super::cpu::Isa;
use crate::scalar::Scalar;

/// Fewest columns of `C` (rows of `B`) for which [`accepts`] holds: below this the last
/// tile's padding rows cost more than the kernel gains (see the module doc).
pub const MIN_COLS: usize = 64;
/// Largest rows-of-`B` count of a tile.
const MAX_ROWS: usize = 12;
/// Widest tile, in elements (two AVX-512 vectors of f32).
const MAX_WIDTH: usize = 32;

/// One register tile: `k` steps over a transposed strip of `A` (`width` elements per step)
/// against `rows` rows of `B` (`b[r]`), accumulated onto the sums at `out[r * width + v]`.
type Tile<T> = unsafe fn(usize, *const T, &[*const T; MAX_ROWS], *mut T);

/// A tile function with its width (channels: two vectors) and its rows of `B`.
struct Kernel<T> {
    width: usize,
    rows: usize,
    tile: Tile<T>,
}

/// The kernel of instruction set `isa` for `T`, if one is written.
#[cfg(target_arch = "x86_64")]
fn kernel_for<T: Scalar>(isa: Isa) -> Option<Kernel<T>> {
    use std::any::TypeId;
    let id = TypeId::of::<T>();
    let (f32_type, f64_type) = (id == TypeId::of::<f32>(), id == TypeId::of::<f64>());
    let pick = |w32: usize, w64: usize, rows: usize, t32: Tile<f32>, t64: Tile<f64>| {
        // SAFETY (both transmutes): T is exactly the type named by the TypeId test.
        let (width, tile) = if f32_type {
            (w32, unsafe {
                std::mem::transmute::<Tile<f32>, Tile<T>>(t32)
            })
        } else if f64_type {
            (w64, unsafe {
                std::mem::transmute::<Tile<f64>, Tile<T>>(t64)
            })
        } else {
            return None;
        };
        Some(Kernel { width, rows, tile })
    };
    match isa {
        Isa::Avx512 => pick(32, 16, 12, x86::avx512_f32, x86::avx512_f64),
        Isa::Avx2 => pick(16, 8, 6, x86::avx2_f32, x86::avx2_f64),
        Isa::Portable => None,
    }
}

/// The kernel for this machine and `T`, if any.
fn kernel<T: Scalar>() -> Option<Kernel<T>> {
    #[cfg(target_arch = "x86_64")]
    return kernel_for(super::cpu::isa());
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// True when [`try_gemm`] runs on this machine for `m` rows and `n` columns of `C`: `T` is
/// f32 or f64 with AVX2+FMA or AVX-512F (not under `FLATMIN_ISA=portable`), `m` is a
/// multiple of the kernel's two vectors and `n` at least [`MIN_COLS`].
pub fn accepts<T: Scalar>(m: usize, n: usize) -> bool {
    kernel::<T>().is_some_and(|k| fits(&k, m, n))
}

/// True when `kern` runs a product with `m` rows and `n` columns of `C`.
fn fits<T>(kern: &Kernel<T>, m: usize, n: usize) -> bool {
    m > 0 && m.is_multiple_of(kern.width) && n >= MIN_COLS
}

/// `C (m x n) += Σ_s A_s (m x k) B_sᵀ` over `segs` segments, with the operands of
/// [`super::rowdot::try_gemm_abt_rows`] (`n = offsets.len()`); returns `false`, having done
/// nothing, where [`accepts`] does not hold.
///
/// # Safety
/// As [`super::rowdot::try_gemm_abt_rows`].
pub unsafe fn try_gemm<T: Scalar>(
    (m, k, segs): (usize, usize, usize),
    a: (*const T, usize, usize),
    b: (*const T, &[usize], usize),
    c: (*mut T, usize),
) -> bool {
    match kernel::<T>().filter(|kern| fits(kern, m, b.1.len())) {
        Some(kern) => {
            run(&kern, (m, k, segs), a, b, c);
            true
        }
        None => false,
    }
}

/// [`try_gemm`] with `kern`, which [`fits`] the product.
unsafe fn run<T: Scalar>(
    kern: &Kernel<T>,
    (m, k, segs): (usize, usize, usize),
    (a, lda, a_seg): (*const T, usize, usize),
    (b, offsets, b_seg): (*const T, &[usize], usize),
    (c, ldc): (*mut T, usize),
) {
    let n = offsets.len();
    if k == 0 || segs == 0 {
        return;
    }
    let (width, rows) = (kern.width, kern.rows);
    let (strip, tiles, tile_len) = (k * width, n.div_ceil(rows), rows * width);
    let sums_len = m / width * tiles * tile_len;
    super::packed::with_buffer::<T, _>(m * k + sums_len, |strips| {
        let sums = strips.add(m * k);
        std::ptr::write_bytes(sums, 0, sums_len);
        for s in 0..segs {
            for (block, i0) in (0..m).step_by(width).enumerate() {
                let a_rows: [*const T; MAX_WIDTH] =
                    std::array::from_fn(|i| a.add(s * a_seg + (i0 + i.min(width - 1)) * lda));
                transpose(&a_rows[..width], k, strips.add(block * strip), width);
            }
            for block in 0..m / width {
                let at = strips.add(block * strip).cast_const();
                for (t, j0) in (0..n).step_by(rows).enumerate() {
                    let live = rows.min(n - j0);
                    // Rows past the last repeat it; their sums are dropped.
                    let b_rows: [*const T; MAX_ROWS] =
                        std::array::from_fn(|r| b.add(s * b_seg + offsets[j0 + r.min(live - 1)]));
                    (kern.tile)(k, at, &b_rows, sums.add((block * tiles + t) * tile_len));
                }
            }
        }
        for (block, i0) in (0..m).step_by(width).enumerate() {
            for (t, j0) in (0..n).step_by(rows).enumerate() {
                let tile = sums.add((block * tiles + t) * tile_len);
                for r in 0..rows.min(n - j0) {
                    for v in 0..width {
                        let dst = c.add((i0 + v) * ldc + j0 + r);
                        *dst = *dst + *tile.add(r * width + v);
                    }
                }
            }
        }
    });
}

/// Rows of `k` contiguous elements into a strip `width` wide (the packed GEMM's transposes).
#[cfg(target_arch = "x86_64")]
unsafe fn transpose<T: Scalar>(rows: &[*const T], k: usize, dst: *mut T, width: usize) {
    super::packed::pack_rows_into(rows, k, dst, width)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transpose<T: Scalar>(_: &[*const T], _: usize, _: *mut T, _: usize) {
    unreachable!("no outer-product kernel off x86_64")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::MAX_ROWS;
    use std::arch::x86_64::*;

    macro_rules! outer_tile {
        ($name:ident, $feature:literal, $t:ty, $lanes:expr, $rows:expr,
         $set1:ident, $load:ident, $store:ident, $fmadd:ident) => {
            /// One tile (see [`super::Tile`]).
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(
                k: usize,
                strip: *const $t,
                b: &[*const $t; MAX_ROWS],
                out: *mut $t,
            ) {
                let mut acc: [[_; 2]; $rows] = std::array::from_fn(|r| {
                    let at = out.add(r * 2 * $lanes);
                    [$load(at), $load(at.add($lanes))]
                });
                let rows: [*const $t; $rows] = std::array::from_fn(|r| b[r]);
                for q in 0..k {
                    let v0 = $load(strip.add(q * 2 * $lanes));
                    let v1 = $load(strip.add(q * 2 * $lanes + $lanes));
                    for (row, acc_r) in rows.iter().zip(acc.iter_mut()) {
                        let x = $set1(*row.add(q));
                        acc_r[0] = $fmadd(x, v0, acc_r[0]);
                        acc_r[1] = $fmadd(x, v1, acc_r[1]);
                    }
                }
                for (r, acc_r) in acc.iter().enumerate() {
                    let at = out.add(r * 2 * $lanes);
                    $store(at, acc_r[0]);
                    $store(at.add($lanes), acc_r[1]);
                }
            }
        };
    }

    #[rustfmt::skip]
    outer_tile!(avx512_f32, "avx512f", f32, 16, 12,
        _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps);
    #[rustfmt::skip]
    outer_tile!(avx512_f64, "avx512f", f64, 8, 12,
        _mm512_set1_pd, _mm512_loadu_pd, _mm512_storeu_pd, _mm512_fmadd_pd);
    #[rustfmt::skip]
    outer_tile!(avx2_f32, "avx2,fma", f32, 8, 6,
        _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps);
    #[rustfmt::skip]
    outer_tile!(avx2_f64, "avx2,fma", f64, 4, 6,
        _mm256_set1_pd, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_fmadd_pd);
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::kernels::abt_case::Case;
    use crate::kernels::cpu::vector_isas;
    use rand::{rngs::StdRng, SeedableRng};

    /// `C0 + Σ_s A_s B_sᵀ` by the kernel of `isa` (which the machine runs) in `T`.
    fn run_case<T: Scalar>(case: &Case, isa: Isa) -> Vec<T> {
        let (m, n, k, segs) = case.dims;
        let (a, b, mut c) = case.operands::<T>();
        let kern = kernel_for::<T>(isa).expect("a kernel for f32 and f64");
        assert!(
            fits(&kern, m, n),
            "test shape {:?} the kernel takes",
            case.dims
        );
        // SAFETY: every row of A and B lies inside its buffer and C is m x n.
        unsafe {
            run(
                &kern,
                (m, k, segs),
                (a.as_ptr(), case.lda, case.a_seg),
                (b.as_ptr(), &case.offsets, case.b_seg),
                (c.as_mut_ptr(), n),
            )
        };
        c
    }

    /// The documented order without tiles: element `(i, j)` is one fused multiply-add chain
    /// from zero over the segments and positions in order, then added to `C0`.
    fn chained<T: Scalar>(case: &Case) -> Vec<T> {
        let (_, n, k, segs) = case.dims;
        let (a, b, mut c) = case.operands::<T>();
        for (e, ce) in c.iter_mut().enumerate() {
            let mut sum = T::zero();
            for s in 0..segs {
                for q in 0..k {
                    let (x, y) = case.term((&a, &b), (e / n, e % n), s, q);
                    sum = x.mul_add(y, sum);
                }
            }
            *ce = *ce + sum;
        }
        c
    }

    /// Shapes every kernel takes (`m` a multiple of 32): every tail of the last tile's rows
    /// (`n` from 64 to 76), short and long `k`, one to three segments, and the weight
    /// gradients of cnn-s's conv2 and resnet20's 32- and 64-channel stages at their samples
    /// per call.
    fn cases(rng: &mut StdRng) -> Vec<Case> {
        let mut cases: Vec<Case> = (64..=76)
            .map(|n| (32, n, 5 + n % 7, 1 + n % 3))
            .chain([(32, 144, 1086, 1), (96, 100, 1, 2)])
            .map(|d| Case::random(rng, d))
            .collect();
        for conv in [(64, 32, 16, 7), (32, 32, 16, 7), (64, 64, 8, 8)] {
            cases.push(Case::conv(rng, conv));
        }
        cases
    }

    /// Every shape, by the kernel of every instruction set the machine runs, in f32 and
    /// f64, gives bit for bit the documented chain order: a change in the order of the
    /// roundings (sums split per segment, segments in another order, rows of `B` mixed up
    /// across tiles) fails here, and so the AVX2 and AVX-512 kernels agree bit for bit.
    #[test]
    fn equals_one_chain_per_element_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(21);
        for case in cases(&mut rng) {
            let want32: Vec<u32> = chained::<f32>(&case).iter().map(|x| x.to_bits()).collect();
            let want64: Vec<u64> = chained::<f64>(&case).iter().map(|x| x.to_bits()).collect();
            for isa in vector_isas() {
                let got32: Vec<u32> = run_case::<f32>(&case, isa)
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                assert!(got32 == want32, "{isa:?} f32 {:?}", case.dims);
                let got64: Vec<u64> = run_case::<f64>(&case, isa)
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                assert!(got64 == want64, "{isa:?} f64 {:?}", case.dims);
            }
        }
    }

    /// The same shapes against the exact sum (f64, to 1e-12), so the chain order above is
    /// also the right product.
    #[test]
    fn matches_the_naive_product() {
        let mut rng = StdRng::seed_from_u64(22);
        for case in cases(&mut rng) {
            let want = case.exact();
            for isa in vector_isas() {
                for (x, y) in run_case::<f64>(&case, isa).iter().zip(&want) {
                    assert!(
                        (x - y).abs() <= 1e-12 * (1.0 + y.abs()),
                        "{isa:?} {:?}: {x} vs {y}",
                        case.dims
                    );
                }
            }
        }
    }

    /// [`accepts`] follows the kernel's width and [`MIN_COLS`], and [`try_gemm`] declines,
    /// touching nothing, where it does not hold.
    #[test]
    fn declines_narrow_or_ragged_products() {
        let have = kernel::<f32>().is_some();
        assert_eq!(accepts::<f32>(32, MIN_COLS), have);
        assert!(!accepts::<f32>(32, MIN_COLS - 1));
        assert!(!accepts::<f32>(24, 100));
        assert!(!accepts::<f32>(0, 100));
        let (a, b) = ([1.0f32; 8], [1.0f32; 8]);
        let mut c = [0.5f32; 27];
        // SAFETY: the product is declined before any operand is read.
        let ran = unsafe {
            try_gemm(
                (1, 8, 1),
                (a.as_ptr(), 8, 8),
                (b.as_ptr(), &[0; 27], 8),
                (c.as_mut_ptr(), 27),
            )
        };
        assert!(!ran && c.iter().all(|&x| x == 0.5));
    }
}

//! The first lanes of a vector as a mask, and masked loads and stores in the form the kernel
//! macros take them (`nopack`, `rowdot`): one place for each instruction set's way of writing
//! "the first `c` lanes". Masked-out lanes are neither read nor written (no fault past the end
//! of a buffer) and load as zero.

/// AVX-512: masks are `k` registers.
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    /// The first `c` of 16 lanes.
    #[inline(always)]
    pub(crate) fn mask16(c: usize) -> __mmask16 {
        ((1u32 << c.min(16)) - 1) as __mmask16
    }

    /// The first `c` of 8 lanes.
    #[inline(always)]
    pub(crate) fn mask8(c: usize) -> __mmask8 {
        mask16(c.min(8)) as __mmask8
    }

    /// The lanes whose bits are set in `bits` (16 lanes).
    #[inline(always)]
    pub(crate) fn bits16(bits: u32) -> __mmask16 {
        bits as __mmask16
    }

    /// The lanes whose bits are set in `bits` (8 lanes).
    #[inline(always)]
    pub(crate) fn bits8(bits: u32) -> __mmask8 {
        bits as __mmask8
    }

    /// The lanes of `k` from `p`, zeros elsewhere.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) unsafe fn load_f32(p: *const f32, k: __mmask16) -> __m512 {
        _mm512_mask_loadu_ps(_mm512_setzero_ps(), k, p)
    }

    /// The lanes of `k` from `p`, zeros elsewhere.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) unsafe fn load_f64(p: *const f64, k: __mmask8) -> __m512d {
        _mm512_mask_loadu_pd(_mm512_setzero_pd(), k, p)
    }
}

/// AVX2: masks are vectors whose lanes are all ones or all zeros.
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// The first `c` of 8 single-precision lanes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) unsafe fn mask_f32(c: usize) -> __m256i {
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(c.min(8) as i32), lane)
    }

    /// The first `c` of 4 double-precision lanes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) unsafe fn mask_f64(c: usize) -> __m256i {
        let lane = _mm256_setr_epi64x(0, 1, 2, 3);
        _mm256_cmpgt_epi64(_mm256_set1_epi64x(c.min(4) as i64), lane)
    }

    /// The single-precision lanes whose bits are set in `bits` (8 lanes).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) unsafe fn bits_f32(bits: u32) -> __m256i {
        let lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        let set = _mm256_and_si256(_mm256_set1_epi32(bits as i32), lane);
        _mm256_cmpeq_epi32(set, lane)
    }

    /// The double-precision lanes whose bits are set in `bits` (4 lanes).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) unsafe fn bits_f64(bits: u32) -> __m256i {
        let lane = _mm256_setr_epi64x(1, 2, 4, 8);
        let set = _mm256_and_si256(_mm256_set1_epi64x(i64::from(bits)), lane);
        _mm256_cmpeq_epi64(set, lane)
    }

    /// The lanes of `k` of `v` stored to `p` (the argument order of the kernel macros).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) unsafe fn store_f32(p: *mut f32, k: __m256i, v: __m256) {
        _mm256_maskstore_ps(p, k, v)
    }

    /// The lanes of `k` of `v` stored to `p` (the argument order of the kernel macros).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) unsafe fn store_f64(p: *mut f64, k: __m256i, v: __m256d) {
        _mm256_maskstore_pd(p, k, v)
    }
}

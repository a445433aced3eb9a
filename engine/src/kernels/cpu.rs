//! Which vector instructions the kernels use, decided once per process at run time.
//!
//! The kernels are compiled for every instruction set they support and pick one by CPU
//! detection, so one binary runs at its best on an AVX-512 Xeon, an AVX2 EPYC, or anything
//! else (where `matrixmultiply` and plain loops serve). `FLATMIN_ISA=avx2` (or `portable`)
//! caps the choice below what the machine has, so the AVX2 path can be tested on an AVX-512
//! machine; a request above what the machine has is capped at what it has.

use std::sync::OnceLock;

/// A vector instruction set the kernels are written for, ordered from least to most capable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// No hand-written kernel: `matrixmultiply` and plain loops.
    Portable,
    /// 256-bit AVX2 with fused multiply-add (Haswell and later, AMD Zen).
    Avx2,
    /// 512-bit AVX-512F (Skylake-SP Xeons and later, AMD Zen 4).
    Avx512,
}

impl Isa {
    /// The name `FLATMIN_ISA` accepts and `flatmin bench` reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Parses a `FLATMIN_ISA` value.
    pub fn parse(s: &str) -> Option<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(s.trim()))
    }
}

/// The most capable instruction set this machine runs.
pub fn detected() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// The instruction sets with hand-written kernels (AVX2+FMA, AVX-512) that this machine runs,
/// whatever `FLATMIN_ISA` says: the kernels' tests run each of them side by side.
#[cfg(test)]
pub(crate) fn vector_isas() -> Vec<Isa> {
    [Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|&i| i <= detected())
        .collect()
}

/// The instruction set the kernels use: [`detected`], capped by `FLATMIN_ISA` when set.
/// An unrecognized `FLATMIN_ISA` is reported once on stderr and ignored.
pub fn isa() -> Isa {
    static CHOSEN: OnceLock<Isa> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let have = detected();
        match std::env::var("FLATMIN_ISA") {
            Ok(v) if !v.trim().is_empty() => match Isa::parse(&v) {
                Some(want) => want.min(have),
                None => {
                    eprintln!(
                        "warning: FLATMIN_ISA={v:?} is not one of avx512, avx2, portable; \
                         using {}",
                        have.name()
                    );
                    have
                }
            },
            _ => have,
        }
    })
}

/// Runs `f` compiled for the widest vectors of [`isa`]: plain loops handed in (elementwise
/// passes, reductions) are inlined into a copy of this function built for AVX-512 or
/// AVX2+FMA, so they vectorize at that width, while the binary itself targets baseline
/// x86-64. One definition of each loop serves every instruction set. Rust never contracts a
/// multiply and an add into an FMA on its own, and the loops' order of operations is the
/// source's, so the results are bit for bit those of the portable build.
///
/// The loop must be inlined into `f` for this to work: callers mark `f` and the closures
/// it calls `#[inline(always)]` (without it, a closure may stay a separate function compiled
/// for baseline x86-64, in another codegen unit).
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    match isa() {
        // SAFETY: `isa` only reports instruction sets this machine runs.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { wide::avx512(f) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { wide::avx2(f) },
        _ => f(),
    }
}

/// The target-feature copies behind [`vectorized`].
#[cfg(target_arch = "x86_64")]
mod wide {
    /// `f()` built with AVX-512F (and the AVX2/FMA it implies).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
        f()
    }

    /// `f()` built with AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
}

/// Single-precision fused multiply-add throughput of one thread, in GFLOP/s (2 flops per
/// lane and FMA), with the widest vectors of [`isa`], over at least `seconds` of work: the
/// ceiling that GEMM figures are read against. `None` where no vector kernel is written.
pub fn fma_peak_gflops(seconds: f64) -> Option<f64> {
    let (lanes, run): (usize, unsafe fn(u64) -> f32) = match isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => (16, peak::avx512),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => (8, peak::avx2),
        _ => return None,
    };
    let mut iters = 1u64 << 16;
    loop {
        let t = std::time::Instant::now();
        // SAFETY: the kernel for the chosen instruction set, which this machine runs.
        std::hint::black_box(unsafe { run(iters) });
        let dt = t.elapsed().as_secs_f64();
        if dt >= seconds || iters >= 1 << 40 {
            let flops = (iters * peak::CHAINS as u64 * lanes as u64 * 2) as f64;
            return Some(flops / dt / 1e9);
        }
        iters *= 2;
    }
}

/// Independent FMA chains, enough to cover the latency of two FMA pipes.
#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    /// Independent accumulators per loop iteration.
    pub const CHAINS: usize = 12;

    macro_rules! chains {
        ($name:ident, $feature:literal, $zero:ident, $set1:ident, $fmadd:ident, $add:ident,
         $sum:expr) => {
            /// `iters` rounds of [`CHAINS`] independent FMAs; returns a sum so nothing is
            /// optimized away.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(iters: u64) -> f32 {
                let (x, y) = ($set1(0.999_99), $set1(1e-3));
                let mut acc = [$zero(); CHAINS];
                for _ in 0..iters {
                    for a in acc.iter_mut() {
                        *a = $fmadd(*a, x, y);
                    }
                }
                let total = acc.iter().fold($zero(), |s, &a| $add(s, a));
                $sum(total)
            }
        };
    }

    chains!(
        avx512,
        "avx512f",
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps,
        |v| _mm512_reduce_add_ps(v)
    );
    chains!(
        avx2,
        "avx2,fma",
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps,
        |v: __m256| {
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), v);
            out.iter().sum()
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_order() {
        for i in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
            assert_eq!(Isa::parse(i.name()), Some(i));
        }
        assert_eq!(Isa::parse(" AVX2 "), Some(Isa::Avx2));
        assert_eq!(Isa::parse("sse"), None);
        assert!(Isa::Portable < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        assert!(isa() <= detected());
    }

    #[test]
    fn fma_peak_is_measured_where_a_kernel_exists() {
        match fma_peak_gflops(0.01) {
            Some(g) => assert!(g.is_finite() && g > 1.0, "{g}"),
            None => assert_eq!(isa(), Isa::Portable),
        }
    }
}

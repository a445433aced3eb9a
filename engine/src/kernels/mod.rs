//! Raw loops on slices: GEMM, im2col, pooling, reductions, parallel helpers.
//!
//! Nothing here knows about the tape. Every parallel split uses chunk boundaries that depend
//! only on the problem's shape, never on the number of threads, so results are bit-identical
//! for any thread count.

#[cfg(test)]
mod abt_case;
pub mod conv;
pub mod cpu;
pub mod gemm;
#[cfg(target_arch = "x86_64")]
mod masked;
pub mod nopack;
pub mod outer;
pub mod packed;
pub mod par;
pub mod pool;
pub mod reduce;
pub mod rowdot;

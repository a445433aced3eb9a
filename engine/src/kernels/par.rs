//! Fixed-chunk parallel helpers.

use rayon::prelude::*;

/// Elements per task for elementwise loops (fixed, independent of the thread count).
pub const ELEMWISE_CHUNK: usize = 1 << 14;

/// Applies `f(offset, chunk)` to fixed-size chunks of `out` in parallel.
pub fn par_chunks<T: Send>(out: &mut [T], f: impl Fn(usize, &mut [T]) + Sync + Send) {
    if out.len() <= ELEMWISE_CHUNK {
        f(0, out);
        return;
    }
    out.par_chunks_mut(ELEMWISE_CHUNK)
        .enumerate()
        .for_each(|(i, c)| f(i * ELEMWISE_CHUNK, c));
}

/// `out[i] = f(i)` for every index, in parallel fixed chunks.
pub fn par_fill<T: Send>(out: &mut [T], f: impl Fn(usize) -> T + Sync + Send) {
    par_chunks(out, |off, c| {
        for (j, o) in c.iter_mut().enumerate() {
            *o = f(off + j);
        }
    });
}

/// A raw pointer that may cross threads; used only to hand out provably disjoint regions.
#[derive(Clone, Copy)]
pub struct SendPtr<T>(pub *mut T);
// SAFETY: users only write disjoint regions from different tasks.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer `off` elements further on.
    ///
    /// # Safety
    /// `off` must stay within the allocation.
    pub unsafe fn at(&self, off: usize) -> SendPtr<T> {
        SendPtr(self.0.add(off))
    }

    /// Mutable slice `[off, off + len)` of the underlying buffer.
    ///
    /// # Safety
    /// The range must be in bounds and not accessed by anyone else while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, off: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }
}

/// Splits `n` items into at most `max_chunks` contiguous ranges of near-equal size
/// (a function of `n` and `max_chunks` only).
pub fn fixed_ranges(n: usize, max_chunks: usize) -> Vec<std::ops::Range<usize>> {
    let chunks = max_chunks.clamp(1, n.max(1));
    let size = n.div_ceil(chunks).max(1);
    (0..n).step_by(size).map(|s| s..(s + size).min(n)).collect()
}
